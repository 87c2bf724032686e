"""The report's memory section: peak resident memory per phase of the pipeline process (rss.json)."""
from __future__ import annotations

from .context import ReportContext


def memory_section(ctx: ReportContext) -> list[str]:
    """Peak RSS per phase (sub-phases inside their stage's peak), RSS at entry and exit, and time; none without
    rss.json."""
    rss = ctx.rss
    if not rss or not rss.get("phases"):
        return []
    out = ["## Memory", "",
           f"Peak resident memory of the pipeline process: **{rss.get('process_peak_gb', 0):.2f} GB** (kernel "
           f"high-water mark; sampled every {1e3 * rss.get('interval_s', 0.05):.0f} ms: "
           f"{rss.get('peak_gb', 0):.2f} GB). Per phase (a stage's peak includes its sub-phases; file = memory-mapped "
           "files inside the peak, e.g. model weights and libraries):", "",
           "| phase | peak GB | file GB | at entry → exit GB | seconds | times |", "|---|---:|---:|---:|---:|---:|"]
    for label, p in rss["phases"].items():
        name = label if "/" not in label else "&nbsp;&nbsp;" + label.split("/", 1)[1]
        out.append(f"| {name} | {p['peak_gb']:.2f} | {p['peak_file_gb']:.2f} | {p['start_gb']:.2f} → "
                   f"{p['end_gb']:.2f} | {p['seconds']:.0f} | {p['n']} |")
    return out + [""]
