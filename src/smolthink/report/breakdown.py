"""Report sections that break results down by task: a mixture's eval and GRPO rollouts per task, and the transfer
table (base vs final model on tasks outside the training mixture). Each is `(ReportContext) -> lines`."""
from __future__ import annotations

from typing import Any

from ..task_metrics import PARTS, task_key, tasks_in
from .context import ReportContext
from .fmt import acc_cell, f3, majority_cell, md_cell, pts
from .load import accuracy_ci, is_num, series


def by_task(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{task: its eval fields}: a mixture's per_task breakdown, or a one-task summary under its own task name."""
    per = summary.get("per_task")
    if isinstance(per, dict) and per:
        return {t: row for t, row in per.items() if isinstance(row, dict)}
    return {str(summary.get("task", "?")): summary}


def _eval_rows(ctx: ReportContext) -> list[str]:
    """One table row per task and eval stage, from the eval summaries' per_task breakdowns."""
    points = [(row.label, row.point) for row in ctx.rows
              if row.point is not None and isinstance(row.point.summary.get("per_task"), dict)]
    if not points:
        return []
    tasks = sorted({t for _, p in points for t in p.summary["per_task"]})
    out = ["### Held-out eval per task", "",
           "| task | stage | n | accuracy [95% CI] | balanced acc. | majority baseline | format rate |",
           "|---|---|---:|---|---:|---|---:|"]
    for task in tasks:
        for label, p in points:
            s = p.summary["per_task"].get(task)
            if isinstance(s, dict):
                out.append(f"| {md_cell(task)} | {label} | {s.get('n', '—')} | {acc_cell(s)} | "
                           f"{f3(s.get('balanced_accuracy'))} | {majority_cell(s)} | {f3(s.get('format_rate'))} |")
    return out + [""]


def _first_last(rows: list[dict[str, Any]], key: str) -> str:
    """'0.250 → 0.625' over the steps that logged key ('—' when none did)."""
    _, ys = series(rows, key)
    return f"{ys[0]:.3f} → {ys[-1]:.3f}" if ys else "—"


def _rollout_rows(ctx: ReportContext) -> list[str]:
    """One table row per task and training stage, from metrics.jsonl's reward/<task>/* keys."""
    out = []
    for st in ctx.stages:
        tasks = []
        for r in st.metrics:
            tasks += [t for t in tasks_in(r) if t not in tasks]
        if not tasks:
            continue
        out += [f"### {st.kind} rollouts per task ({st.name}, first → last step)", "",
                "| task | reward | accuracy | format | groups with no signal (mean) |", "|---|---|---|---|---:|"]
        for task in tasks:
            _, zero = series(st.metrics, task_key(task, PARTS[3]))
            cells = [_first_last(st.metrics, task_key(task, part)) for part in PARTS[:3]]
            mean_zero = f3(sum(zero) / len(zero)) if zero else "—"
            out.append(f"| {md_cell(task)} | " + " | ".join(cells) + f" | {mean_zero} |")
        out.append("")
    return out


def per_task_section(ctx: ReportContext) -> list[str]:
    """A mixture's results per task: held-out eval per stage, then GRPO rollouts (reward, accuracy, format,
    zero-signal share); [] for a single-task run."""
    body = _eval_rows(ctx) + _rollout_rows(ctx)
    return ["## Per task", ""] + body if body else []


def _transfer_row(task: str, base: dict[str, Any] | None, final: dict[str, Any] | None) -> str:
    """One transfer table row: n, accuracies with intervals, the change and its reading, formats."""
    acc = [s.get("accuracy") if s else None for s in (base, final)]
    delta, reading = "—", ""
    if all(is_num(a) for a in acc):
        delta = pts(acc[1] - acc[0])
        ci = [accuracy_ci(s) for s in (base, final)]
        if all(ci):
            overlap = ci[0][0] <= ci[1][1] and ci[1][0] <= ci[0][1]
            reading = "intervals overlap" if overlap else ("lower: forgot" if acc[1] < acc[0] else "higher")
    n = next((s.get("n") for s in (final, base) if s), "—")
    cells = [acc_cell(s) if s else "*missing*" for s in (base, final)]
    fmts = [f3(s.get("format_rate")) if s else "—" for s in (base, final)]
    return f"| {md_cell(task)} | {n} | {cells[0]} | {cells[1]} | {delta} | {reading} | {fmts[0]} | {fmts[1]} |"


def transfer_section(ctx: ReportContext) -> list[str]:
    """Base vs final model on the transfer tasks (pipeline stage `transfer`), with intervals and the change."""
    if not ctx.pipeline or (not ctx.transfer and ctx.status.get("transfer") != "done"):
        return []
    out = ["## Transfer to tasks outside the training mixture", ""]
    if not ctx.transfer:
        return out + ["*No transfer tasks outside the training mixture (`transfer.tasks`).*", ""]
    rows = {m: by_task(p.summary) for m, p in ctx.transfer.items()}
    tasks = list(dict.fromkeys(t for per in rows.values() for t in per))
    out += ["| task | n | base accuracy [95% CI] | final accuracy [95% CI] | Δ acc (pts) | reading | base format | "
            "final format |", "|---|---:|---|---|---:|---|---:|---:|"]
    out += [_transfer_row(t, rows.get("base", {}).get(t), rows.get("final", {}).get(t)) for t in tasks]
    return out + ["", "Format counts a completion only when both blocks hold real content (`chat.format_ok`): a copy "
                  "of the system prompt's example (`<think> your reasoning </think>`) scores 0.", ""]
