"""`write_report(run_dir)`: gather the run directory once, then write report.md section by section."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..rundir import PipelineDir, atomic_write
from .breakdown import per_task_section, transfer_section
from .context import ReportContext, gather
from .flips import flips_section
from .memory import memory_section
from .rl import budget_section, collapse_section, control_section
from .sections import (answers_section, before_after_section, header_section, plots_section, samples_section,
                       stages_section, summary_section)

# The report, top to bottom. A new section is one function `(ReportContext) -> list[str]` in sections.py, added
# here.
SECTIONS: list[Callable[[ReportContext], list[str]]] = [
    header_section,
    summary_section,
    stages_section,
    before_after_section,
    per_task_section,
    transfer_section,
    control_section,
    collapse_section,
    flips_section,
    answers_section,
    budget_section,
    memory_section,
    plots_section,
    samples_section,
]


def write_report(run_dir: Path) -> Path:
    """Write <run>/report.md and <run>/plots/*.png from a single-stage or pipeline run directory -> report path."""
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"no such run directory: {run}")
    ctx = gather(run)
    lines = [line for section in SECTIONS for line in section(ctx)]
    # A single-stage run directory keeps its report at the same name as a pipeline's.
    return atomic_write(PipelineDir(run).report, "\n".join(lines).rstrip() + "\n")
