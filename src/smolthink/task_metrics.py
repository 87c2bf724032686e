"""A mixture's GRPO rollouts broken down per task: `reward/<task>/mean`, `reward/<task>/correct` (accuracy),
`reward/<task>/format` and `reward/<task>/frac_zero_std_groups` (the share of that task's groups with no learning
signal). Pure: scored parts in, numbers out. A single-task run gets none (they would repeat the totals)."""
from __future__ import annotations

from typing import Any, Sequence

from .groups import GroupResult
from .types import RewardParts

PARTS = ("mean", "correct", "format", "frac_zero_std_groups")


def task_key(task: str, part: str) -> str:
    """The metrics.jsonl key of one task's part: `reward/<task>/<part>`."""
    return f"reward/{task}/{part}"


def per_task_metrics(groups: Sequence[GroupResult], parts: Sequence[RewardParts],
                     mixture: Sequence[str]) -> dict[str, float]:
    """{reward/<task>/<part>: value} for every task of a fill. `parts` holds the fill's completions group by group,
    in the order of `groups`; `mixture` is the run's task list: {} when it names one task."""
    if len(set(mixture)) < 2:
        return {}
    by_task: dict[str, tuple[list[GroupResult], list[RewardParts]]] = {}
    pos = 0
    for g in groups:
        mine = by_task.setdefault(g.example.task, ([], []))
        mine[0].append(g)
        mine[1].extend(parts[pos : pos + g.n])
        pos += g.n
    out: dict[str, float] = {}
    for task, (gs, ps) in sorted(by_task.items()):
        out[task_key(task, "mean")] = sum(p.total for p in ps) / len(ps)
        out[task_key(task, "correct")] = sum(p.correct for p in ps) / len(ps)
        out[task_key(task, "format")] = sum(p.format for p in ps) / len(ps)
        out[task_key(task, "frac_zero_std_groups")] = sum(g.zero_std for g in gs) / len(gs)
    return out


def tasks_in(metrics: dict[str, Any]) -> list[str]:
    """The tasks a metrics row breaks down, in order of first appearance."""
    out: list[str] = []
    for key in metrics:
        head, _, part = key.rpartition("/")
        if part == "correct" and head.startswith("reward/") and head != "reward" and head[7:] not in out:
            out.append(head[7:])
    return out


def per_task_line(metrics: dict[str, Any]) -> str:
    """` | acc by task: a 0.40, b 0.25` for the console line; "" without a breakdown."""
    tasks = tasks_in(metrics)
    if not tasks:
        return ""
    return " | acc by task: " + ", ".join(f"{t} {metrics[task_key(t, 'correct')]:.2f}" for t in tasks)
