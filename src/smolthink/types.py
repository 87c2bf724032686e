"""Plain data types that flow between smolthink's modules (see DESIGN.md, "Data flow")."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Example:
    """One verifiable question drawn from a reasoning-gym dataset.

    `entry` is the raw reasoning-gym item (question, answer, metadata) so that the task's own scorer can be
    called on it; `answer` may be None for tasks verified by a checker (propositional_logic).
    """

    id: str
    task: str
    question: str
    answer: str | None
    entry: dict[str, Any] = field(repr=False)


@dataclass
class SamplingParams:
    """How to sample completions. temperature == 0 means greedy decoding."""

    max_new_tokens: int = 300
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0


@dataclass
class Rollout:
    """One generated completion for one prompt.

    completion_ids holds exactly the tokens the trainer scores: the generated tokens, including the final EOS
    token when the model stopped by itself (finish_reason "stop"); no padding ever.
    """

    prompt_ids: list[int]
    completion_ids: list[int]
    finish_reason: str  # "stop" (EOS emitted) | "length" (cut at max_new_tokens)
    # log softmax(z / temperature)[token] of each completion token under the distribution the engine sampled it
    # from, before top-k / top-p truncation (fp32), so it compares with the trainer's log-probs; None when the
    # engine does not compute them (HFEngine, greedy decoding)
    logprobs: list[float] | None = None

    @property
    def truncated(self) -> bool:
        """True when the completion was cut at max_new_tokens."""
        return self.finish_reason == "length"


@dataclass
class RewardParts:
    """The parts of one completion's reward and their weighted total."""

    correct: float  # strict correctness in [0, 1]
    format: float  # 1.0 when the think/answer format is exact, else 0.0
    total: float
    partial: float = 0.0  # the task scorer's own (possibly partial) credit, kept visible
    length: float = 0.0  # optional length penalty term (<= 0)
    error: str | None = None  # scorer error (exception, timeout, crash) -> correctness 0
    extras: dict[str, float] = field(default_factory=dict)  # user reward functions, by name
