"""Where GRPO's questions come from. Each rollout batch of n questions is:

* fresh questions, in the fixed train set's order (a new seeded shuffle per pass; its tasks follow the mixture's
  weights). A task with a curriculum (`grpo.curriculum.enabled`) has its slots refilled with questions generated on
  demand at its current level: each generation uses a fresh seed, derive_seed(seed, "curriculum", task, call),
  never reused, and drops held-out eval questions (by text), duplicates and mislabelled items (tasks.GOLD_CHECKS);
* replayed questions (`grpo.replay.fraction` of the batch, once the pool holds any), drawn from the replay pool.

`record` feeds each batch's group results back: curriculum windows (fresh groups at the current level only) and
the replay pool. The whole source state (train cursor, generation count, levels, windows, pool) is plain data
for checkpoints, so a resumed run draws exactly the questions the uninterrupted one would."""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from .config import GRPOConfig
from .curriculum import TaskCurriculum, build_curricula
from .groups import GroupResult
from .replay import ReplayPool
from .seeds import derive_seed
from .tasks import TaskSpec, make_examples
from .types import Example

log = logging.getLogger(__name__)


@dataclass
class Drawn:
    """A question of a rollout batch and where it came from (see GroupResult.origin)."""

    example: Example
    origin: str  # "train" | "curriculum" | "replay"
    level: dict[str, int] | None = None  # curriculum levels it was generated at


class QuestionSource:
    """The train cursor, the curricula and the replay pool behind GRPO's rollout batches (module docstring)."""

    def __init__(self, train: Sequence[Example], seed: int, curricula: dict[str, TaskCurriculum],
                 replay: ReplayPool | None, replay_fraction: float, exclude: Iterable[str] = ()):
        self.train, self.seed = list(train), seed
        self.curricula, self.replay, self.replay_fraction = curricula, replay, replay_fraction
        self.exclude = set(exclude)
        self.data_pos = 0  # fresh questions taken from the train set
        self.generated = 0  # curriculum generation calls made (each with its own seed)
        self._order: tuple[int, list[int]] | None = None  # (pass, permutation) of the current pass

    def next_batch(self, n: int, batch: int) -> list[Drawn]:
        """The questions of rollout batch number `batch`: fresh ones first, then replayed ones."""
        k = min(round(self.replay_fraction * n), len(self.replay)) if self.replay is not None else 0
        fresh = self._fresh(n - k)
        replayed = self.replay.sample(k, random.Random(derive_seed(self.seed, "replay", batch))) if k else []
        return fresh + [Drawn(ex, "replay") for ex in replayed]

    def record(self, groups: Sequence[GroupResult]) -> None:
        """Feed a batch's groups back: curriculum windows (fresh groups of the current level), then the pool."""
        for g in groups:
            cur = self.curricula.get(g.example.task)
            if cur is not None and g.origin == "curriculum" and g.level == cur.levels:
                cur.observe(g.pass_rate)
        if self.replay is not None:
            self.replay.record(groups)

    def metrics(self, groups: Sequence[GroupResult]) -> dict[str, float]:
        """curriculum/<task>/<attr> levels and window accuracy; replay pool size, share and pass rate."""
        out: dict[str, float] = {}
        for task, cur in self.curricula.items():
            out.update({f"curriculum/{task}/{a}": float(level) for a, level in cur.levels.items()})
            acc = cur.window_accuracy()
            if acc is not None:
                out[f"curriculum/{task}/window_acc"] = acc
        if self.replay is not None:
            replayed = [g for g in groups if g.origin == "replay"]
            out["replay/pool_size"] = float(len(self.replay))
            out["replay/groups_frac"] = len(replayed) / max(len(groups), 1)
            if replayed:
                out["replay/pass_rate_mean"] = sum(g.pass_rate for g in replayed) / len(replayed)
        return out

    # ---- fresh questions

    def _fresh(self, n: int) -> list[Drawn]:
        """The train set's next n questions, a curriculum task's slots refilled at its current level."""
        picks = [self._next_train() for _ in range(n)]
        out = [Drawn(ex, "train") for ex in picks]
        for task, cur in self.curricula.items():
            slots = [i for i, ex in enumerate(picks) if ex.task == task]
            if slots:
                level = cur.levels
                for i, ex in zip(slots, self._generate(cur.task_spec(), len(slots))):
                    out[i] = Drawn(ex, "curriculum", level)
        return out

    def _next_train(self) -> Example:
        """The next train example: a fresh seeded shuffle each pass over the train set."""
        epoch, i = divmod(self.data_pos, len(self.train))
        if self._order is None or self._order[0] != epoch:
            order = list(range(len(self.train)))
            random.Random(derive_seed(self.seed, "questions", epoch)).shuffle(order)
            self._order = (epoch, order)
        self.data_pos += 1
        return self.train[self._order[1][i]]

    def _generate(self, spec: TaskSpec, n: int) -> list[Example]:
        """n new questions of one task at its current level, from a seed never used before."""
        seed = derive_seed(self.seed, "curriculum", spec.name, self.generated)
        self.generated += 1
        return make_examples([spec], n, seed, "curriculum", exclude=self.exclude)

    # ---- checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Everything that decides the next questions, as plain data (a copy: later draws do not change it)."""
        return {"data_pos": self.data_pos, "generated": self.generated,
                "curricula": {t: c.state_dict() for t, c in self.curricula.items()},
                "replay": self.replay.state_dict() if self.replay is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what state_dict returned."""
        self.data_pos, self.generated = state["data_pos"], state["generated"]
        for task, cur_state in state["curricula"].items():
            self.curricula[task].load_state_dict(cur_state)
        if self.replay is not None:
            self.replay.load_state_dict(state["replay"])


def make_source(cfg: GRPOConfig, specs: Sequence[TaskSpec], train: Sequence[Example],
                eval_questions: Iterable[str]) -> QuestionSource:
    """The question source a GRPO config asks for; a task without a curriculum is said once."""
    exclude = set(eval_questions)
    curricula: dict[str, TaskCurriculum] = {}
    if cfg.curriculum.enabled:
        curricula, without = build_curricula(specs, cfg.curriculum)
        if without:
            log.info("curriculum: %s has no reasoning-gym curriculum (or no attribute to move): its questions keep "
                     "the configured difficulty", ", ".join(without))
        for task, cur in curricula.items():
            log.info("curriculum: %s starts at %s%s", task, cur.levels,
                     f" (no level reproduces the configured {', '.join(cur.unmatched)}: level 0)" if cur.unmatched
                     else "")
    replay = ReplayPool(cfg.replay, exclude) if cfg.replay.fraction > 0 else None
    return QuestionSource(train, cfg.seed, curricula, replay, cfg.replay.fraction, exclude)
