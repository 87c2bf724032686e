"""Prioritised replay: spend rollouts again on train questions the policy gets wrong, or right only sometimes.

The pool keeps, per question, the pass rate p of its latest group (the policy moves, so older groups say less)
and how often it has been replayed. A question enters after a group with p < 1; it leaves when a group solves it
every time (p = 1), after `max_repeats` replays, or as the oldest entry when the pool holds more than `pool_size`.
`sample(n)` draws n distinct questions, each draw with probability proportional to its weight w = 1 - p
(without replacement: Efraimidis-Spirakis keys u^(1/w), the n largest win), so a question never solved is drawn
most, one solved 3 times in 4 a quarter as often. Questions in `exclude` (the held-out eval set) never enter."""
from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from .config import ReplayConfig
from .groups import GroupResult
from .types import Example


@dataclass
class PoolEntry:
    """A question in the pool: its latest pass rate and how often it has been replayed."""

    example: Example
    pass_rate: float
    replays: int = 0

    @property
    def weight(self) -> float:
        """Its sampling weight, 1 - p (> 0: solved questions are not in the pool)."""
        return 1.0 - self.pass_rate


class ReplayPool:
    """The replay pool, oldest entry first (see the module docstring)."""

    def __init__(self, cfg: ReplayConfig, exclude: Iterable[str] = ()):
        self.cfg = cfg
        self.exclude = set(exclude)
        self.entries: dict[str, PoolEntry] = {}  # question text -> entry, in the order they entered

    def __len__(self) -> int:
        return len(self.entries)

    def sample(self, n: int, rng: random.Random) -> list[Example]:
        """Up to n distinct questions drawn by weight without replacement (fewer when the pool is smaller)."""
        keyed = sorted(((rng.random() ** (1.0 / e.weight), q) for q, e in self.entries.items()), reverse=True)
        return [self.entries[q].example for _, q in keyed[:n]]

    def record(self, groups: Sequence[GroupResult]) -> None:
        """Update the pool from a rollout batch's groups: pass rates, replay counts, entries and departures."""
        for g in groups:
            q = g.example.question
            entry = self.entries.get(q)
            if q in self.exclude or (g.origin == "replay" and entry is None):
                continue
            if g.origin == "replay":
                entry.replays += 1
            if g.pass_rate >= 1.0 or (entry is not None and entry.replays >= self.cfg.max_repeats):
                self.entries.pop(q, None)
            elif entry is None:
                self.entries[q] = PoolEntry(g.example, g.pass_rate)
            else:
                entry.pass_rate = g.pass_rate
        while len(self.entries) > self.cfg.pool_size:
            self.entries.pop(next(iter(self.entries)))

    def state_dict(self) -> dict[str, Any]:
        """The entries in order, as plain data (for checkpoints)."""
        return {"entries": [{"example": dataclasses.asdict(e.example), "pass_rate": e.pass_rate,
                             "replays": e.replays} for e in self.entries.values()]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what state_dict returned."""
        self.entries = {}
        for d in state["entries"]:
            ex = Example(**d["example"])
            self.entries[ex.question] = PoolEntry(ex, d["pass_rate"], d["replays"])
