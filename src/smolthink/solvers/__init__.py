"""Scripted solvers: short, regular step-by-step traces for warm-up SFT, written from a reasoning-gym item's
metadata with no model (`solve(task, entry, rng)`).

Every trace is `<think> ... </think> <answer> ANSWER </answer>` (see `chat.format_ok`). The answer comes from the
solver's own derivation and is then checked (syllogism: against the gold label; propositional_logic: by a truth
table, as the task's scorer does); an item that fails the check gets None, never a trace with a wrong answer.

One module per task: `syllogism`, `propositional`.
"""
from __future__ import annotations

import random
from typing import Any

from .propositional import solve_propositional
from .syllogism import solve_syllogism

SUPPORTED_TASKS = ("syllogism", "propositional_logic")


def solve(task: str, entry: dict[str, Any], rng: random.Random) -> str | None:
    """Full trace for one reasoning-gym item, or None if the task is unsupported or nothing verified derives."""
    try:
        if task == "syllogism":
            return solve_syllogism(entry, rng)
        if task == "propositional_logic":
            return solve_propositional(entry, rng)
    except (KeyError, ValueError, TypeError, RecursionError):
        return None
    return None
