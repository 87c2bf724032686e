"""How a training step's items become forward chunks, chosen once per run (`make_packing`):

* `PaddedChunks`: every sequence whole (prompt + completion), right-padded, cut by token budget;
* `SharedPromptChunks`: the completions of one prompt (a GRPO group) together, the prompt run once into a KV
  cache and the completions on top of it (`logprobs.shared_prompt_logprobs`).

Both give the same per-token log-probs of the completion tokens. The loss normalisers are the whole step's, so
which chunk an item lands in never changes the step's gradient."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import torch
from torch import Tensor

from .buffer import Batch, ExperienceBuffer, SharedBatch
from .logprobs import shared_prompt_logprobs, token_logprobs


@dataclass(frozen=True)
class PaddedChunks:
    """Whole sequences, length-sorted within each minibatch, at most `max_tokens` padded tokens per chunk."""

    max_tokens: int
    pad_id: int

    def chunks(self, buffer: ExperienceBuffer, minibatches: list[list[int]]) -> list[list[int]]:
        """The forward/backward chunks of these minibatches (each minibatch cut by length)."""
        return [c for mb in minibatches for c in buffer.split_by_tokens(mb, self.max_tokens)]

    def collate(self, buffer: ExperienceBuffer, idx: list[int], device) -> Batch:
        """One chunk as a padded Batch on `device`."""
        return buffer.collate(idx, self.pad_id).to(device)

    @staticmethod
    def logprobs(model, batch: Batch, temperature: float = 1.0, with_entropy: bool = False,
                 entropy_grad: bool = True) -> tuple[Tensor, Tensor | None]:
        """Per-token log-probs (and entropies) of the chunk's completion tokens: [n, T] each."""
        return token_logprobs(model, batch.input_ids, batch.attention_mask, batch.completion_mask,
                              temperature=temperature, with_entropy=with_entropy, entropy_grad=entropy_grad)

    @staticmethod
    def computed_tokens(batch: Batch) -> int:
        """Tokens the chunk's forward runs, padding excluded."""
        return int(batch.attention_mask.sum())

    @staticmethod
    def completion_logp(batch: Batch, logp: Tensor, row: int) -> Tensor:
        """Row `row`'s completion log-probs [Tc] out of the chunk's [n, T]."""
        start = batch.prompt_lens[row]
        return logp[row, start : start + batch.completion_lens[row]]


@dataclass(frozen=True)
class SharedPromptChunks:
    """Each prompt's completions together (one prompt forward per chunk), at most `max_tokens` computed tokens
    per chunk (`ExperienceBuffer.prompt_chunks`)."""

    max_tokens: int
    pad_id: int

    def chunks(self, buffer: ExperienceBuffer, minibatches: list[list[int]]) -> list[list[int]]:
        """The forward/backward chunks of these minibatches (grouped by prompt across them)."""
        return buffer.prompt_chunks([i for mb in minibatches for i in mb], self.max_tokens)

    def collate(self, buffer: ExperienceBuffer, idx: list[int], device) -> SharedBatch:
        """One chunk as a SharedBatch on `device`."""
        return buffer.collate_shared(idx, self.pad_id).to(device)

    @staticmethod
    def logprobs(model, batch: SharedBatch, temperature: float = 1.0, with_entropy: bool = False,
                 entropy_grad: bool = True) -> tuple[Tensor, Tensor | None]:
        """Per-token log-probs (and entropies) of the chunk's completions: [n, C] each."""
        return shared_prompt_logprobs(model, batch.prompt_ids, batch.completion_ids, batch.completion_mask,
                                      temperature=temperature, with_entropy=with_entropy, entropy_grad=entropy_grad)

    @staticmethod
    def computed_tokens(batch: SharedBatch) -> int:
        """Tokens the chunk's forwards run: the prompt once plus every completion token."""
        return batch.prompt_ids.shape[1] + int(batch.completion_mask.sum())

    @staticmethod
    def completion_logp(batch: SharedBatch, logp: Tensor, row: int) -> Tensor:
        """Row `row`'s completion log-probs [Tc] out of the chunk's [n, C]."""
        return logp[row, : batch.completion_lens[row]]


Packing = Union[PaddedChunks, SharedPromptChunks]


def make_packing(share_prompts: bool, max_tokens: int, pad_id: int) -> Packing:
    """The chunking a run uses: shared prompts (GRPO groups) or whole padded sequences."""
    return (SharedPromptChunks if share_prompts else PaddedChunks)(max_tokens, pad_id)


@torch.no_grad()
def fill_old_logprobs(model, buffer: ExperienceBuffer, packing: Packing, temperature: float, per_forward: int,
                      device, indices: Sequence[int] | None = None) -> None:
    """Set `old_logp` of the buffer items at `indices` (default: every item) with the training numerics (the same
    chunks, function, temperature and masks), in length-sorted groups of `per_forward` items."""
    order = sorted(range(len(buffer)) if indices is None else indices, key=buffer.seq_len)
    for idx in packing.chunks(buffer, [order[s : s + per_forward] for s in range(0, len(order), per_forward)]):
        batch = packing.collate(buffer, idx, device)
        logp, _ = packing.logprobs(model, batch, temperature)
        for row, i in enumerate(idx):
            buffer.items[i].old_logp = packing.completion_logp(batch, logp, row).cpu().clone()
