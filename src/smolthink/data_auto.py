"""`data.source: auto`, the default: warm-up traces for any reasoning-gym task.

Per task: the scripted solver where one exists (`solvers.SUPPORTED_TASKS`); elsewhere the local teacher shown the
true answer (STaR rationalisation, `teachers.teacher_candidates`), sampled `samples_per_question` times, a trace kept
only when it verifies and does not leak the hint.

The teacher's budget: `data.teacher_questions` questions in all (default 64, split over the teacher tasks by
weight), then no more. Measured with the embedded SmolLM2-135M as teacher (4 questions x 4 samples on
letter_counting and family_relationships): 157 tokens a sample, about 2 s a question on 2 quiet cores (estimated
from CPU time on a busy machine), and 0 of 8 questions verified: shown the answer, it writes prose without the
tags. 64 questions are about 2 minutes, enough to see whether a (larger, `data.teacher_model`) teacher yields
anything; 1280 would be about 45 minutes. What the teacher leaves short is topped up with format-only traces: the
question restated briefly, then the verified reference answer, labelled `"source": "format_only"`. They teach the
format and nothing else; GRPO supplies the reasoning. With `data.format_only_top_up` off, a task for which no
trace verified stops the data stage with one line saying what to do.

This module holds the choices and the checks; `data.make_traces` runs the rounds.
"""
from __future__ import annotations

import logging
import re
from collections import Counter
from typing import Any, Sequence

from .chat import format_trace
from .config import DataConfig
from .errors import SmolthinkError
from .tasks import TaskSpec, reference_answer, split_counts
from .types import Example

log = logging.getLogger(__name__)

FORMAT_ONLY = "format_only"
SOURCE_ORDER = ("scripted", "teacher", "api", FORMAT_ONLY)  # the order sources run in (cheapest first)
MAX_RESTATE_WORDS = 40  # a format-only trace restates the question's last line, cut to this many words


def task_sources(source: str, specs: Sequence[TaskSpec]) -> dict[str, str]:
    """{task: the source that writes its traces}: `source` itself for every task, or under "auto" the scripted
    solver where one exists and the local teacher elsewhere."""
    from .solvers import SUPPORTED_TASKS

    if source != "auto":
        return {s.name: source for s in specs}
    return {s.name: "scripted" if s.name in SUPPORTED_TASKS else "teacher" for s in specs}


def source_groups(specs: Sequence[TaskSpec], sources: dict[str, str]) -> list[tuple[str, list[TaskSpec]]]:
    """The specs grouped by source, in SOURCE_ORDER; a single-source run is one group of all specs in order."""
    return [(src, [s for s in specs if sources[s.name] == src]) for src in SOURCE_ORDER
            if any(sources[s.name] == src for s in specs)]


def question_caps(cfg: DataConfig, specs: Sequence[TaskSpec], sources: dict[str, str]) -> dict[str, int]:
    """The most questions each task's source may try: under "auto", the teacher budget split over the teacher
    tasks by weight; no cap elsewhere (absent from the dict)."""
    if cfg.source != "auto":
        return {}
    teach = [s for s in specs if sources[s.name] == "teacher"]
    return dict(zip((s.name for s in teach), split_counts(teach, cfg.teacher_questions))) if teach else {}


def restate(question: str) -> str:
    """The question's last non-empty line (where reasoning-gym puts the ask), at most MAX_RESTATE_WORDS words."""
    lines = [ln.strip() for ln in question.strip().splitlines() if ln.strip()]
    words = (lines[-1] if lines else "").split()
    text = " ".join(words[:MAX_RESTATE_WORDS]) + (" ..." if len(words) > MAX_RESTATE_WORDS else "")
    return re.sub(r"</?(?:think|answer)>", "", text)  # a tag in the question must not break the trace's format


def format_only_trace(ex: Example) -> str:
    """`<think> The question asks: ... </think> <answer> REFERENCE </answer>`: the format, without reasoning."""
    return format_trace([f"the question asks: {restate(ex.question)}"], reference_answer(ex))


def format_only_candidates(examples: Sequence[Example], seed: int, cfg: DataConfig,
                           **_: Any) -> tuple[list[list[str | None]], dict[str, Any]]:
    """One format-only trace per example (verified like every other candidate: a task whose scorer rejects its
    own reference answer gets none)."""
    return [[format_only_trace(ex)] for ex in examples], {}


def task_yield(counts: Counter, source: str, target: int, reasons: Sequence[str]) -> dict[str, Any]:
    """One task's row of the data stats from its round counters ("questions", "kept/teacher", "rejected/wrong",
    ...): the source, target, questions tried, kept and rejected, by source and by reason."""
    def by_prefix(prefix: str) -> dict[str, int]:
        return {k[len(prefix):]: v for k, v in counts.items() if k.startswith(prefix)}

    return {"source": source, "target": target, "questions": counts["questions"], "kept": counts["kept"],
            "rejected": counts["rejected"], "rejection_rate": counts["rejected"] / max(counts["questions"], 1),
            "kept_by_source": by_prefix("kept/"), "questions_by_source": by_prefix("questions/"),
            "rejected_by_reason": {r: counts[f"rejected/{r}"] for r in reasons}}


def check_yield(cfg: DataConfig, sources: dict[str, str], by_task: dict[str, dict[str, Any]]) -> None:
    """Under "auto": a task that kept no trace stops the data stage with one line saying what to do; a task that
    kept fewer than its target is logged."""
    if cfg.source != "auto":
        return
    for task, row in by_task.items():
        if row["kept"] == 0:
            tried = row["questions_by_source"].get(sources[task], 0)
            if sources[task] == "teacher" and not cfg.format_only_top_up:
                raise SmolthinkError(
                    f"no teacher trace verified for task '{task}' in {tried} questions x {cfg.samples_per_question} "
                    f"samples: set data.format_only_top_up=true (RL then supplies the reasoning), raise "
                    f"data.teacher_questions, or name a stronger data.teacher_model")
            raise SmolthinkError(
                f"no warm-up trace verified for task '{task}' ({row['questions']} questions tried; rejected: "
                f"{_reasons(row['rejected_by_reason']) or 'none'}): check the task's config "
                f"(task: [{{name: {task}, config: {{...}}}}]), or give your own traces with data.path")
        if row["kept"] < row["target"]:
            log.warning("task %s: kept %d of %d warm-up traces", task, row["kept"], row["target"])


def _reasons(reasons: dict[str, int]) -> str:
    """'wrong 12, format 3': the non-zero rejection counts."""
    return ", ".join(f"{k} {v}" for k, v in reasons.items() if v)


def yield_lines(stats: dict[str, Any]) -> list[str]:
    """One line per task of a data run's stats: its source, what it kept by source, what its teacher tried and
    why items were rejected (the console and the report's summary)."""
    out = []
    for task, row in (stats.get("by_task") or {}).items():
        kept = row.get("kept_by_source") or {}
        parts = " + ".join(f"{v} {k.replace('_', '-')}" for k, v in kept.items() if v)
        line = f"{task} ({row.get('source', '?')}): kept {row.get('kept', 0)} of {row.get('target', '?')}"
        line += f" ({parts})" if parts else ""
        tried = {k: v for k, v in (row.get("questions_by_source") or {}).items() if v and k != FORMAT_ONLY}
        for src, n in tried.items():
            rate = kept.get(src, 0) / n
            line += f"; {src} tried {n} questions, {100 * rate:.0f}% verified"
        reasons = _reasons(row.get("rejected_by_reason") or {})
        out.append(line + (f"; rejected {row.get('rejected', 0)} ({reasons})" if reasons else ""))
    return out


def shortfall(target: Counter, kept: dict[str, int], names: Sequence[str], caps: dict[str, int],
              asked: dict[str, int]) -> Counter:
    """Questions to ask next per task: what it still lacks, no more than its cap leaves."""
    want = Counter()
    for t in names:
        n = target[t] - kept.get(t, 0)
        if t in caps:
            n = min(n, caps[t] - asked.get(t, 0))
        if n > 0:
            want[t] = n
    return want

