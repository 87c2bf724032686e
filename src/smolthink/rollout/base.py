"""The small interface every rollout engine implements."""
from __future__ import annotations

from typing import Protocol, Sequence

import torch

from ..types import Rollout, SamplingParams


class Engine(Protocol):
    """Generates `n` completions for each prompt with the *current* weights of `model`.

    `model` is passed on every call because the policy changes between rollout phases (an engine may cache
    whatever it derives from the weights, but must refresh it when they change). The result is indexed
    [prompt][sample]; each Rollout carries exactly the tokens the trainer will score, and their sampling
    log-probabilities where the engine computes them (`Rollout.logprobs`, else None).
    """

    def generate(
        self,
        model: torch.nn.Module,
        prompts: Sequence[list[int]],
        n: int,
        sampling: SamplingParams,
        seed: int | None = None,
    ) -> list[list[Rollout]]:
        """`n` completions of each prompt (token ids) under `sampling` -> [prompt][sample] Rollouts; the same
        `seed` gives the same tokens."""
        ...


def split_completion(tokens: list[int], eos_ids: set[int], max_new_tokens: int) -> tuple[list[int], str]:
    """Cut generated tokens at the first EOS (kept) -> (completion_ids, finish_reason).

    Padding after EOS (SmolLM2 pads with its EOS id) is dropped because only the first EOS counts; a row that
    never emits EOS was cut at max_new_tokens.
    """
    for i, t in enumerate(tokens[:max_new_tokens]):
        if t in eos_ids:
            return tokens[: i + 1], "stop"
    return tokens[:max_new_tokens], "length"


def group_rollouts(prompts: Sequence[list[int]], rows: list[list[int]], n: int, eos_ids: set[int],
                   max_new_tokens: int, logprob_rows: list[list[float]] | None = None) -> list[list[Rollout]]:
    """Generated token rows [len(prompts) * n][>= 0] (the n samples of prompt i at rows i*n .. i*n+n-1), cut at
    the first EOS -> [prompt][sample] Rollouts; `logprob_rows` (the same layout, one log-prob per generated
    token) are cut with them into `Rollout.logprobs`."""
    result = []
    for i, p in enumerate(prompts):
        row = []
        for j in range(n):
            comp, reason = split_completion(rows[i * n + j], eos_ids, max_new_tokens)
            lp = None if logprob_rows is None else logprob_rows[i * n + j][: len(comp)]
            row.append(Rollout(prompt_ids=list(p), completion_ids=comp, finish_reason=reason, logprobs=lp))
        result.append(row)
    return result
