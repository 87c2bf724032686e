"""Reward parts and their weighted total: correctness (strict, from the task), format, an optional length
penalty and optional user reward functions `module:function`."""
from __future__ import annotations

import importlib
import logging
import math
from typing import Callable, Sequence

from .chat import extract_answer, format_ok
from .config import RewardConfig
from .errors import SmolthinkError
from .tasks import TaskSpec, spec_for, strict_match
from .types import Example, RewardParts

log = logging.getLogger(__name__)


def length_penalty(n_tokens: int, target: int, max_tokens: int, coef: float) -> float:
    """Linear overlong penalty: 0 up to `target` tokens, falling to -coef at `max_tokens` (DAPO-style)."""
    if coef <= 0 or n_tokens <= target or max_tokens <= target:
        return 0.0
    return -coef * min(1.0, (n_tokens - target) / (max_tokens - target))


def load_functions(specs: Sequence[str]) -> list[tuple[str, Callable, float]]:
    """Import user reward functions given as "module:function" or "module:function=weight".
    Each is called as fn(completion: str, example: Example) -> float."""
    out = []
    for spec in specs:
        target, _, weight = spec.partition("=")
        mod, _, name = target.partition(":")
        try:
            fn = getattr(importlib.import_module(mod), name)
        except (ImportError, AttributeError, ValueError) as e:
            raise SmolthinkError(f"cannot load reward function '{spec}': {e}") from None
        out.append((target, fn, float(weight) if weight else 1.0))
    return out


def score_user_functions(user_fns: Sequence[tuple[str, Callable, float]], completions: Sequence[str],
                         examples: Sequence[Example]) -> list[dict[str, float]]:
    """Every user reward function's score of each completion -> [{name: score}] per completion. A function that
    raises or returns NaN/inf scores 0 there (one NaN would poison its whole group's advantages) and never kills
    the run; each failing function is logged once per call, with how many completions it failed on."""
    out: list[dict[str, float]] = [{} for _ in completions]
    for name, fn, _ in user_fns:
        failed, first = 0, ""
        for scores, comp, ex in zip(out, completions, examples):
            try:
                value = float(fn(comp, ex))
                problem = f"returned {value}"
            except Exception as e:  # user code: whatever it raises costs this completion its score, not the run
                value, problem = math.nan, f"raised {type(e).__name__}: {e}"
            if not math.isfinite(value):
                failed, first, value = failed + 1, first or problem, 0.0
            scores[name] = value
        if failed:
            log.warning("reward function %s failed on %d of %d completions, scored 0 (first: %s)", name, failed,
                        len(out), first)
    return out


def score_completions(
    completions: Sequence[str],
    examples: Sequence[Example],
    n_tokens: Sequence[int],
    scorer,
    specs: Sequence[TaskSpec],
    cfg: RewardConfig,
    max_tokens: int,
    prefill: str = "",
    user_fns: Sequence[tuple[str, Callable, float]] = (),
) -> list[RewardParts]:
    """Score each completion against its example -> RewardParts. The task scorer runs in the sandbox
    (`scorer.score_many`) only when the strict exact match did not already settle it."""
    answers = [extract_answer(c) for c in completions]
    exact = [strict_match(a, ex.answer) for a, ex in zip(answers, examples)]
    todo = [i for i, ok in enumerate(exact) if not ok and answers[i] is not None]
    task_scores = {i: (1.0, None) for i, ok in enumerate(exact) if ok}
    if todo:
        items = [(examples[i].task, spec_for(examples[i], specs).config, answers[i], examples[i].entry) for i in todo]
        task_scores.update(zip(todo, scorer.score_many(items)))
    user_scores = score_user_functions(user_fns, completions, examples)
    out = []
    for i, (comp, ex) in enumerate(zip(completions, examples)):
        partial, error = task_scores.get(i, (0.0, None))
        correct = 1.0 if (exact[i] or partial >= 1.0) else 0.0
        if not cfg.strict:
            correct = partial
        fmt = 1.0 if format_ok(comp, prefill) else 0.0
        length = length_penalty(n_tokens[i], cfg.length_target, max_tokens, cfg.length_penalty)
        extras = user_scores[i]
        total = cfg.correct_weight * correct + cfg.format_weight * fmt + length
        total += sum(w * extras[name] for name, _, w in user_fns)
        out.append(RewardParts(correct=correct, format=fmt, total=total, partial=partial, length=length,
                               error=error, extras=extras))
    return out
