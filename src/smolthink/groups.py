"""Where the RL budget goes: one `GroupResult` per GRPO group (a question and its G completions), and the metrics
a buffer fill's groups give.

Correctness here is strict: a completion counts as solved when its `RewardParts.correct` is 1 (under
`reward.strict: false` only full partial credit counts). A group's pass rate is its share of solved completions;
an all-correct or all-wrong group carries no correctness signal (and, with the default rewards, usually no reward
signal either: `zero_std` is the reward's own test)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from .types import Example, RewardParts, Rollout


@dataclass
class GroupResult:
    """One question's group of completions in a rollout batch."""

    example: Example
    origin: str  # "train" (the fixed train set) | "curriculum" (generated at a level) | "replay" (the replay pool)
    level: dict[str, int] | None  # the curriculum levels a "curriculum" question was generated at
    n: int  # completions (G)
    solved: int  # completions scored fully correct
    tokens: int  # completion tokens generated for the group
    zero_std: bool  # every completion got the same reward: no advantage signal
    dropped: bool = False  # left out of the buffer by drop_zero_std_groups

    @property
    def pass_rate(self) -> float:
        """The group's share of solved completions."""
        return self.solved / self.n

    def row(self, step: int, fill: int) -> dict[str, Any]:
        """The group as a groups/step_*.jsonl row."""
        return {"step": step, "fill": fill, "task": self.example.task, "question": self.example.question,
                "origin": self.origin, "level": self.level, "pass_rate": self.pass_rate, "solved": self.solved,
                "n": self.n, "tokens": self.tokens, "zero_std": self.zero_std, "dropped": self.dropped}


def solved(part: RewardParts) -> bool:
    """A completion counts as solved when its strict correctness is full."""
    return part.correct >= 1.0


def group_results(examples: Sequence[Example], origins: Sequence[str], levels: Sequence[dict[str, int] | None],
                  rollouts: Sequence[Sequence[Rollout]], parts: Sequence[RewardParts],
                  zero: Sequence[bool]) -> list[GroupResult]:
    """The groups of one rollout batch: rollouts [P][G], parts flat [P*G] in the same order, zero [P]."""
    out = []
    for b, (ex, row) in enumerate(zip(examples, rollouts)):
        g = len(row)
        mine = parts[b * g : (b + 1) * g]
        out.append(GroupResult(example=ex, origin=origins[b], level=levels[b], n=g,
                               solved=sum(solved(p) for p in mine),
                               tokens=sum(len(r.completion_ids) for r in row), zero_std=bool(zero[b])))
    return out


def group_metrics(groups: Sequence[GroupResult]) -> dict[str, float]:
    """A fill's groups -> the groups/* and rollout/tokens_* metrics (see docs/CONTRACTS.md)."""
    n = max(len(groups), 1)
    rates = [g.pass_rate for g in groups]
    tokens = max(sum(g.tokens for g in groups), 1)
    all_right = [g for g in groups if g.solved == g.n]
    all_wrong = [g for g in groups if g.solved == 0]
    return {"reward/frac_zero_std_groups": sum(g.zero_std for g in groups) / n,
            "groups/total": float(len(groups)),
           "groups/dropped": float(sum(g.dropped for g in groups)),
           "groups/all_correct_frac": len(all_right) / n,
           "groups/all_wrong_frac": len(all_wrong) / n,
           "groups/low_pass_frac": sum(0 < r < 0.5 for r in rates) / n,
           "groups/high_pass_frac": sum(0.5 <= r < 1 for r in rates) / n,
           "groups/pass_rate_mean": sum(rates) / n,
           "rollout/tokens_all_correct_frac": sum(g.tokens for g in all_right) / tokens,
           "rollout/tokens_all_wrong_frac": sum(g.tokens for g in all_wrong) / tokens}
