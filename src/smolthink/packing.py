"""How a training step's items become forward chunks, chosen once per run (`make_packing`):

* `PaddedChunks`: every sequence whole (prompt + completion), right-padded, cut by token budget;
* `SharedChunks`: the common prompt prefix of a chunk's sequences run once into a KV cache and the rest of each
  on top of it (`logprobs.shared_prompt_logprobs`): a GRPO group's whole prompt (`share="prompt"`), or the
  common prefix of an SFT micro-batch's sequences, the chat template's system turn (`share="prefix"`).

All give the same per-token log-probs of the completion tokens. The loss normalisers are the whole step's, so
which chunk an item lands in never changes the step's gradient."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence, Union

import torch
from torch import Tensor

from .buffer import Batch, ExperienceBuffer, SharedBatch
from .logprobs import shared_prompt_logprobs, token_logprobs

log = logging.getLogger(__name__)


def completion_logp(batch: Batch | SharedBatch, logp: Tensor, row: int) -> Tensor:
    """Row `row`'s completion log-probs [Tc] out of a chunk's [n, T] (its prompt, or the rest of it after a shared
    prefix, comes first)."""
    start = batch.prompt_lens[row]
    return logp[row, start : start + batch.completion_lens[row]]


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


@dataclass(frozen=True)
class SharedChunks:
    """Chunks that run their sequences' common prompt prefix once, at most `max_tokens` computed tokens each
    (prefix once + rows x longest remainder). by_prompt: each prompt's completions together across the step's
    minibatches, the prefix their whole prompt (GRPO groups, `ExperienceBuffer.prompt_chunks`); else each
    minibatch cut by length, the prefix each chunk's longest common one (SFT, `ExperienceBuffer.prefix_chunks`)."""

    max_tokens: int
    pad_id: int
    by_prompt: bool

    def chunks(self, buffer: ExperienceBuffer, minibatches: list[list[int]]) -> list[list[int]]:
        """The forward/backward chunks of these minibatches."""
        if self.by_prompt:
            return buffer.prompt_chunks([i for mb in minibatches for i in mb], self.max_tokens)
        return [c for mb in minibatches for c in buffer.prefix_chunks(mb, self.max_tokens)]

    def collate(self, buffer: ExperienceBuffer, idx: list[int], device) -> SharedBatch:
        """One chunk as a SharedBatch on `device`."""
        prefix_len = None if self.by_prompt else buffer.common_prefix_len(idx)
        return buffer.collate_shared(idx, self.pad_id, prefix_len).to(device)

    @staticmethod
    def logprobs(model, batch: SharedBatch, temperature: float = 1.0, with_entropy: bool = False,
                 entropy_grad: bool = True) -> tuple[Tensor, Tensor | None]:
        """Per-token log-probs (and entropies) of the chunk's completion tokens: [n, C] each."""
        return shared_prompt_logprobs(model, batch.prefix_ids, batch.input_ids, batch.attention_mask,
                                      batch.completion_mask, temperature=temperature, with_entropy=with_entropy,
                                      entropy_grad=entropy_grad)

    @staticmethod
    def computed_tokens(batch: SharedBatch) -> int:
        """Tokens the chunk's forwards run: the prefix once plus every other real token."""
        return batch.prefix_ids.shape[1] + int(batch.attention_mask.sum())


Packing = Union[PaddedChunks, SharedChunks]


def make_packing(share: str | None, max_tokens: int, pad_id: int, gradient_checkpointing: bool) -> Packing:
    """The chunking a run uses: share="prompt" (GRPO groups), "prefix" (SFT's common system turn) or None (whole
    padded sequences). Sharing needs the prefix's KV cache, which gradient checkpointing does not keep."""
    if share and gradient_checkpointing:
        log.info("sharing the %s is off: gradient checkpointing does not keep its KV cache", share)
        share = None
    if share is None:
        return PaddedChunks(max_tokens, pad_id)
    return SharedChunks(max_tokens, pad_id, by_prompt=share == "prompt")


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
            buffer.items[i].old_logp = completion_logp(batch, logp, row).cpu().clone()
