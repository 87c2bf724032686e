"""Console output (one grep-able line per step, progress bars, tables) and metrics.jsonl."""
from __future__ import annotations

import json
import logging
import math
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from .task_metrics import per_task_line

console = Console(stderr=True, highlight=False)


def setup_logging(verbose: bool = False) -> None:
    """Quiet third-party noise (transformers progress bars, warnings); our own INFO lines via rich."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s",
                        handlers=[RichHandler(console=console, show_path=False, show_time=False)], force=True)


def fmt_duration(seconds: float) -> str:
    """1h02m / 3m05s / 12s; "?" for a missing or non-finite value."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def step_line(step: int, total: int, m: dict[str, float], step_s: float, eta_s: float) -> str:
    """`step 12/200 | reward 0.41±0.22 | acc 0.38 | fmt 0.97 | len 143 | loss +0.0123 | all-right 0.50 all-wrong
    0.12 | 31.2 s/step | eta 1h02m` (all-right / all-wrong: shares of groups with no correctness signal)."""
    return (f"step {step}/{total} | reward {m.get('reward/mean', 0):.3f}±{m.get('reward/std', 0):.2f} | "
            f"acc {m.get('reward/correct', 0):.2f} | fmt {m.get('reward/format', 0):.2f} | "
            f"len {m.get('completion/mean_len', 0):.0f} | loss {m.get('loss/total', 0):+.4f} | "
            f"all-right {m.get('groups/all_correct_frac', 0):.2f} all-wrong {m.get('groups/all_wrong_frac', 0):.2f} | "
            f"{step_s:.1f} s/step | eta {fmt_duration(eta_s)}{per_task_line(m)}")


class MetricsWriter:
    """Appends one JSON object per step to metrics.jsonl (flushed, so a crash loses at most one line)."""

    def __init__(self, path: Path, truncate_after_step: int | None = None):
        self.path = Path(path)
        if truncate_after_step is not None and self.path.exists():  # resume: drop lines past the checkpoint
            keep = [ln for ln in self.path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= truncate_after_step]
            self.path.write_text("".join(k + "\n" for k in keep))
        self.f = open(self.path, "a")

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        """Write one step's metrics."""
        row = {"step": step, "time": time.time(), **{k: _plain(v) for k, v in metrics.items()}}
        self.f.write(json.dumps(row) + "\n")
        self.f.flush()

    def close(self) -> None:
        """Close the file."""
        self.f.close()


def _plain(v: Any) -> Any:
    """Tensors and numpy scalars -> Python numbers."""
    if hasattr(v, "item"):
        return v.item()
    return v


@contextmanager
def progress_bar(description: str, total: int) -> Iterator[Any]:
    """A rich progress bar with ETA; yields advance(n)."""
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("eta"), TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=True) as p:
        task = p.add_task(description, total=total)
        yield lambda n=1: p.advance(task, n)


def eval_table(summary: dict[str, Any], title: str = "evaluation") -> Table:
    """A summary table of one eval result."""
    t = Table(title=title, show_header=True)
    t.add_column("metric")
    t.add_column("value", justify="right")
    lo, hi = summary["accuracy_ci95"]
    t.add_row("accuracy", f"{summary['accuracy']:.3f}  [{lo:.3f}, {hi:.3f}] 95% CI")
    if summary.get("balanced_accuracy") is not None:
        t.add_row("balanced accuracy", f"{summary['balanced_accuracy']:.3f}")
        for cls, acc in summary["per_class_accuracy"].items():
            t.add_row(f"  accuracy on '{cls}'", f"{acc:.3f}")
        t.add_row(f"majority baseline ('{summary['majority_class']}')", f"{summary['majority_baseline']:.3f}")
    t.add_row("format rate", f"{summary['format_rate']:.3f}")
    for task, row in (summary.get("per_task") or {}).items():
        lo_t, hi_t = row["accuracy_ci95"]
        t.add_row(f"  {task}: accuracy / format", f"{row['accuracy']:.3f}  [{lo_t:.3f}, {hi_t:.3f}] / "
                  f"{row['format_rate']:.3f}  (n={row['n']})")
    t.add_row("task partial credit (mean)", f"{summary['partial_credit']:.3f}")
    t.add_row("mean completion length", f"{summary['mean_completion_len']:.1f} tokens")
    t.add_row("truncated", f"{summary['truncated_frac']:.3f}")
    top = ", ".join(f"{a!r} {p:.0%}" for a, p in list(summary.get("answer_distribution", {}).items())[:4])
    t.add_row("answers given", top)
    if summary.get("pass@k") is not None:
        k = summary["samples_per_question"]
        t.add_row(f"pass@{k} / mean@{k}", f"{summary['pass@k']:.3f} / {summary['mean@k']:.3f}")
    t.add_row("scoring errors", str(summary["scoring_errors"]))
    t.add_row("questions x samples", f"{summary['n']} x {summary['samples_per_question']}")
    t.add_row("time", fmt_duration(summary.get("seconds", float('nan'))))
    return t
