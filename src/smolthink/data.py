"""Warm-up reasoning traces (`smolthink data`): written by scripted solvers, by a local teacher model shown the
answer (STaR-style rationalisation), or by an OpenAI-compatible API teacher; every trace is verified (strict
format + strict correctness, the same scoring the rewards use) before it is kept.

One output format, JSONL loadable with `datasets.load_dataset("json", data_files=...)`:
    {"id", "task", "question", "answer" (gold, null when a checker verifies), "source": "scripted"|"teacher"|"api",
     "messages": [{"role": "system", ...}, {"role": "user", "content": question}, {"role": "assistant", ...}]}
The saved user message is always the plain question: the answer hint a teacher saw is never stored.
"""
from __future__ import annotations

import json
import logging
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from .chat import SYSTEM_PROMPT, format_ok
from .config import DataConfig, RewardConfig
from .configlib import show_value
from .data_auto import (FORMAT_ONLY, check_yield, format_only_candidates, question_caps, shortfall, source_groups,
                        task_sources, task_yield, yield_lines)
from .errors import SmolthinkError
from .rewards import score_completions
from .rundir import write_json, write_jsonl
from .seeds import derive_seed
from .tasks import TaskSpec, make_examples, parse_tasks
from .teachers import api_candidates, api_settings, leaks_hint, teacher_candidates
from .types import Example

log = logging.getLogger(__name__)

REJECT_REASONS = ("no_trace", "format", "wrong", "leaks_hint")


# ---------------------------------------------------------------------------------------------------------------
# verification
# ---------------------------------------------------------------------------------------------------------------

def verify(traces: Sequence[str | None], examples: Sequence[Example], scorer, specs: Sequence[TaskSpec],
           check_hint_leak: bool = False) -> list[str | None]:
    """Why each trace is rejected, or None when it is kept: "no_trace" (nothing produced), "format" (not the
    strict `<think> ... </think> <answer> ... </answer>` format), "wrong" (its answer does not score 1.0 under the
    reward's strict scoring), "leaks_hint" (a hinted teacher's trace that mentions the hint)."""
    reasons: list[str | None] = [None] * len(traces)
    todo = []
    for i, t in enumerate(traces):
        if not t or not t.strip():
            reasons[i] = "no_trace"
        elif not format_ok(t):
            reasons[i] = "format"
        elif check_hint_leak and leaks_hint(t):
            reasons[i] = "leaks_hint"
        else:
            todo.append(i)
    if todo:
        parts = score_completions([traces[i] for i in todo], [examples[i] for i in todo], [0] * len(todo), scorer,
                                  specs, RewardConfig(), max_tokens=1)
        for i, p in zip(todo, parts):
            if p.correct != 1.0 or p.format != 1.0:
                reasons[i] = "wrong" if p.correct != 1.0 else "format"
    return reasons


def trace_row(ex: Example, trace: str, source: str) -> dict[str, Any]:
    """One output row: the plain question (never the hint) and the verified trace as the assistant turn."""
    return {"id": ex.id, "task": ex.task, "question": ex.question, "answer": ex.answer, "source": source,
            "messages": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": ex.question},
                         {"role": "assistant", "content": trace}]}


# ---------------------------------------------------------------------------------------------------------------
# candidate generators: examples -> [per example: candidate traces in preference order]
# ---------------------------------------------------------------------------------------------------------------

def scripted_candidates(examples: Sequence[Example], seed: int, cfg: DataConfig, solver: Callable | None = None,
                        **_: Any) -> tuple[list[list[str | None]], dict[str, Any]]:
    """One solver trace per example (`solvers.solve(task, entry, rng)`), seeded per question."""
    solve = solver
    if solve is None:
        from . import solvers

        solve = solvers.solve
        missing = sorted({ex.task for ex in examples} - set(solvers.SUPPORTED_TASKS))
        if missing:
            raise SmolthinkError(f"no scripted solver for {', '.join(missing)} (supported: "
                                 f"{', '.join(sorted(solvers.SUPPORTED_TASKS))}); use --source teacher or api")
    return [[solve(ex.task, ex.entry, random.Random(derive_seed(seed, "scripted", ex.id)))] for ex in examples], {}


GENERATORS = {"scripted": scripted_candidates, "teacher": teacher_candidates, "api": api_candidates,
              FORMAT_ONLY: format_only_candidates}
HINTED = ("teacher", "api")  # sources that saw the answer hint: their traces are checked for leaks


# ---------------------------------------------------------------------------------------------------------------
# the entry point
# ---------------------------------------------------------------------------------------------------------------

def stats_path_for(out_path: Path) -> Path:
    """Where make_traces writes its stats by default: traces.jsonl -> traces.stats.json."""
    out_path = Path(out_path)
    return out_path.with_name(out_path.stem + ".stats.json")


def _merge_counters(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """a + b for (nested) numeric counters; other values from b."""
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge_counters(out[k], v)
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and isinstance(out.get(k), (int, float)):
            out[k] = out[k] + v
        else:
            out[k] = v
    return out


@dataclass
class _Tally:
    """What a make_traces run has kept and rejected so far."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    reasons: Counter = field(default_factory=Counter)
    by_task: dict[str, Counter] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    samples: int = 0
    samples_ok: int = 0
    questions: int = 0
    rounds: int = 0
    generate_s: float = 0.0


def _run_round(source: str, cfg: DataConfig, examples: list[Example], seed: int, scorer, specs, tally: _Tally,
               banned: set[str], gen_kwargs: dict[str, Any]) -> None:
    """One round: candidates for every question, all verified in one scoring pass, the first verified trace of
    each question kept, each rejected question counted under its most informative reason."""
    tally.rounds += 1
    t_gen = time.time()
    candidates, more = GENERATORS[source](examples, seed, cfg, **gen_kwargs)
    tally.generate_s += time.time() - t_gen
    tally.extra = _merge_counters(tally.extra, more)
    flat_ex = [ex for ex, cands in zip(examples, candidates) for _ in cands]
    flat = [c for cands in candidates for c in cands]
    verdicts = verify(flat, flat_ex, scorer, specs, check_hint_leak=source in HINTED)
    pos = 0
    for ex, cands in zip(examples, candidates):
        mine = verdicts[pos : pos + len(cands)]
        pos += len(cands)
        tally.samples += len(cands)
        tally.samples_ok += sum(v is None for v in mine)
        tally.questions += 1
        banned.add(ex.question)
        counts = tally.by_task[ex.task]
        counts.update(["questions", f"questions/{source}"])
        keep = next((c for c, v in zip(cands, mine) if v is None), None)
        if keep is not None:
            tally.rows.append(trace_row(ex, keep, source))
            counts.update(["kept", f"kept/{source}"])
        else:  # the most informative reason among its samples: wrong > leak > format > none
            reason = next(r for r in ("wrong", "leaks_hint", "format", "no_trace") if r in mine)
            tally.reasons[reason] += 1
            counts.update(["rejected", f"rejected/{reason}"])


def _top_up_questions(cfg: DataConfig, specs: Sequence[TaskSpec], want: Counter, seed: int,
                      banned: set[str]) -> list[Example]:
    """Fresh questions for each task: `want[task]` of them, so a mixture keeps its proportions."""
    examples: list[Example] = []
    for spec in specs:
        short = want[spec.name]
        if short <= 0 or any(e.task == spec.name for e in examples):
            continue
        try:
            examples += make_examples([spec], short, seed, "train", balanced=cfg.balanced, exclude=banned)
        except SmolthinkError as e:  # the task ran out of distinct questions
            log.warning("no top-up for %s: %s", spec.name, e)
    return examples


def _kept(tally: _Tally) -> dict[str, int]:
    """{task: traces kept so far}."""
    return {t: c["kept"] for t, c in tally.by_task.items()}


def _collect(source: str, cfg: DataConfig, examples: list[Example], seed: int, scorer, specs: Sequence[TaskSpec],
             group: Sequence[TaskSpec], target: Counter, caps: dict[str, int], tally: _Tally, banned: set[str],
             gen_kwargs: dict[str, Any]) -> None:
    """Round 0 on `examples`, then up to cfg.top_up_rounds rounds of fresh questions for the shortfall of the
    group's tasks (within their question caps)."""
    names = [s.name for s in group]
    for k in range(cfg.top_up_rounds + 1):
        if not examples:
            return
        _run_round(source, cfg, examples, derive_seed(seed, "round", tally.rounds), scorer, specs, tally, banned,
                   gen_kwargs)
        if k < cfg.top_up_rounds:
            asked = {t: tally.by_task[t][f"questions/{source}"] for t in names}
            want = shortfall(target, _kept(tally), names, caps, asked)
            examples = _top_up_questions(cfg, group, want, derive_seed(seed, "top-up", tally.rounds), banned)


def _trace_stats(source: str, cfg: DataConfig, specs: Sequence[TaskSpec], seed: int, out_path: Path,
                 target: Counter, tally: _Tally, seconds: float, sources: dict[str, str]) -> dict[str, Any]:
    """The data stage's record: yield overall and per task, rejections by reason, answers, cost."""
    kept, questions = len(tally.rows), tally.questions
    return {
        "source": source, "tasks": [s.name for s in specs], "seed": seed, "out": str(out_path),
        "requested": cfg.num_traces, "balanced": cfg.balanced, "questions": questions, "rounds": tally.rounds,
        "kept": kept, "rejected": questions - kept, "rejection_rate": (questions - kept) / max(questions, 1),
        "rejected_by_reason": {r: tally.reasons.get(r, 0) for r in REJECT_REASONS},
        "kept_by_source": dict(Counter(r["source"] for r in tally.rows)),
        "by_task": {t: task_yield(c, sources[t], target[t], REJECT_REASONS) for t, c in sorted(tally.by_task.items())},
        "answer_distribution": dict(Counter(str(r["answer"]) for r in tally.rows).most_common(10)),
        "samples_per_question": 1 if source == "scripted" else cfg.samples_per_question,
        "samples": tally.samples, "samples_verified": tally.samples_ok,
        "sample_pass_rate": tally.samples_ok / max(tally.samples, 1),
        "seconds": seconds, "generate_s": tally.generate_s, "traces_per_s": kept / max(seconds, 1e-9),
        **tally.extra,
    }


def trace_specs(cfg: DataConfig, task: Any) -> list[TaskSpec]:
    """The tasks the warm-up traces come from: `cfg.task` where set, else the run's `task`."""
    return parse_tasks(task if cfg.task is None else cfg.task)


def make_traces(cfg: DataConfig, specs: Sequence[TaskSpec], seed: int, out_path: Path, *,
                exclude_questions: Iterable[str] = (), reward: RewardConfig | None = None, model=None,
                tokenizer=None, policy_model: str | None = None, solver: Callable | None = None,
                teacher_kwargs: dict[str, Any] | None = None, stats_path: Path | None = None) -> dict[str, Any]:
    """Write up to cfg.num_traces verified warm-up traces on train questions (disjoint from `exclude_questions`,
    e.g. the eval set) to out_path (JSONL) and their stats to stats_path (default <out>.stats.json) -> the stats.

    cfg.source: "scripted" (solvers.solve; `solver` replaces it, a seam for tests and custom tasks), "teacher"
    (the local `model`, else cfg.teacher_model or `policy_model` loaded now, shown the answer,
    cfg.samples_per_question samples, the first verified one kept), "api"
    (the same prompt through APITeacher), "auto" (per task: scripted where a solver exists, else the teacher
    within the cfg.teacher_questions budget, then format-only top-up: see `data_auto`). Round 0 takes each
    source's share of num_traces questions split over its tasks by weight (cfg.balanced: equal answer classes per
    task where the task has a small answer set, so syllogism's natural 2:1 Yes:No skew does not teach a Yes
    prior); up to cfg.top_up_rounds further rounds draw fresh questions for each task's shortfall. The task scorer
    runs in the sandbox with `reward.scorer_timeout`. Nothing unverified is written."""
    from .sandbox import Scorer
    from .tasks import split_counts

    source, reward, specs = cfg.source, reward or RewardConfig(), list(specs)
    sources = task_sources(source, specs)
    if "api" in sources.values():
        api_settings(cfg, teacher_kwargs)  # fail before generating any question
    if "teacher" in sources.values() and model is None:
        from .models import load_model

        model, tokenizer = load_model(cfg.teacher_model or policy_model)
    t0 = time.time()
    target = Counter()
    for spec, k in zip(specs, split_counts(specs, cfg.num_traces)):
        target[spec.name] += k
    banned = set(exclude_questions)
    tally = _Tally(by_task={name: Counter() for name in target})
    gen_kwargs = {"model": model, "tokenizer": tokenizer, "solver": solver, "teacher_kwargs": teacher_kwargs}
    caps = question_caps(cfg, specs, sources)
    with Scorer(timeout=reward.scorer_timeout) as scorer:
        for src, group in source_groups(specs, sources):
            n = sum(min(target[s.name], caps.get(s.name, target[s.name])) for s in group)
            examples = make_examples(group, n, seed, "train", balanced=cfg.balanced, exclude=banned) if n else []
            _collect(src, cfg, examples, seed, scorer, specs, group, target, caps, tally, banned, gen_kwargs)
        auto_top_up = source == "auto" and cfg.format_only_top_up
        topped = [s for s in specs if sources[s.name] == "teacher"] if auto_top_up else []
        if topped:
            want = shortfall(target, _kept(tally), [s.name for s in topped], {}, {})
            examples = _top_up_questions(cfg, topped, want, derive_seed(seed, FORMAT_ONLY), banned)
            _collect(FORMAT_ONLY, cfg, examples, seed, scorer, specs, topped, target, {}, tally, banned, gen_kwargs)
    stats = _trace_stats(source, cfg, specs, seed, Path(out_path), target, tally, time.time() - t0, sources)
    check_yield(cfg, sources, stats["by_task"])
    write_jsonl(out_path, tally.rows)
    write_json(Path(stats_path) if stats_path else stats_path_for(out_path), stats)
    log.info("%s traces: kept %d of %d (%d questions in %d round(s), rejection rate %.1f%%: %s) in %.1fs -> %s",
             source, stats["kept"], cfg.num_traces, stats["questions"], tally.rounds, 100 * stats["rejection_rate"],
             ", ".join(f"{k} {v}" for k, v in stats["rejected_by_reason"].items() if v) or "none",
             stats["seconds"], out_path)
    for line in yield_lines(stats):
        log.info("  %s", line)
    return stats


def require_traces(stats: dict[str, Any]) -> None:
    """Fail a data run that kept no trace (an empty file is no warm-up data): one line with the rejections by
    reason."""
    if stats["kept"]:
        return
    reasons = ", ".join(f"{r} {n}" for r, n in stats["rejected_by_reason"].items() if n) or "none generated"
    raise SmolthinkError(f"kept 0 of {stats['requested']} traces for {stats['out']} ({stats['questions']} "
                         f"questions, rejected as {reasons})")


def _row_problem(row: Any) -> str | None:
    """What is wrong with one traces row, or None: `messages` of mappings with string role and content, ending
    with a user then an assistant turn; `question`, when present, a string."""
    msgs = row.get("messages") if isinstance(row, dict) else None
    if not isinstance(msgs, list) or len(msgs) < 2:
        return "expected 'messages', a list of chat messages"
    for m in msgs:
        if not isinstance(m, dict):
            return f"a message is {type(m).__name__}, not a mapping"
        for key in ("role", "content"):
            if not isinstance(m.get(key), str):
                return f"a message's '{key}' is {show_value(m.get(key), 40)}, not a string"
    if not isinstance(row.get("question"), (str, type(None))):
        return f"'question' is {show_value(row['question'], 40)}, not a string"
    if msgs[-1]["role"] != "assistant" or msgs[-2]["role"] != "user":
        return "expected 'messages' ending with a user then an assistant turn"
    return None


def load_traces(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a traces JSONL (the format above; only `messages` is required: string role and content in every
    message, ending with a user then an assistant turn); a bad row is one line naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise SmolthinkError(f"traces file not found: {path}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise SmolthinkError(f"{path} is not UTF-8 text (expected JSONL traces)") from None
    rows = []
    for k, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise SmolthinkError(f"{path}:{k}: not JSON ({e.msg})") from None
        problem = _row_problem(row)
        if problem:
            raise SmolthinkError(f"{path}:{k}: {problem}")
        rows.append(row)
    if not rows:
        raise SmolthinkError(f"no traces in {path}")
    return rows
