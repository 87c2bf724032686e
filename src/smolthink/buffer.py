"""Experience storage without padding; random (optionally length-aware) minibatches, re-padded on demand."""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Iterator

import torch
from torch import Tensor


@dataclass
class Experience:
    """One scored completion, unpadded. old_logp [Tc] (Tc = len(completion_ids)): old_logp[j] is the sampling
    policy's log p(completion_ids[j] | prompt_ids + completion_ids[:j]), or None until computed. completion_ids
    end with EOS unless truncated. group: id of the question group the advantage was computed in."""

    prompt_ids: list[int]
    completion_ids: list[int]
    old_logp: Tensor | None
    advantage: float
    reward: float
    parts: dict[str, float] = field(default_factory=dict)
    truncated: bool = False
    group: int = 0


@dataclass
class Batch:
    """A right-padded minibatch of n items, T = longest prompt + completion. Masks come from the stored
    lengths, never from the pad id (SmolLM2's pad id is its EOS id)."""

    input_ids: Tensor  # [n, T] prompt + completion, then padding
    attention_mask: Tensor  # [n, T] 1 on real tokens
    completion_mask: Tensor  # [n, T] 1 exactly on completion tokens (final EOS included)
    old_logp: Tensor | None  # [n, T] float32; [r, t] is the old log-prob of input_ids[r, t]; 0 off completion
    advantages: Tensor  # [n]
    prompt_lens: list[int]
    completion_lens: list[int]

    def to(self, device) -> "Batch":
        """The same batch on another device."""
        move = lambda t: t.to(device) if t is not None else None
        return Batch(move(self.input_ids), move(self.attention_mask), move(self.completion_mask),
                     move(self.old_logp), move(self.advantages), self.prompt_lens, self.completion_lens)


class ExperienceBuffer:
    """A list of Experience with minibatch sampling and re-padding."""

    def __init__(self) -> None:
        self.items: list[Experience] = []

    def __len__(self) -> int:
        return len(self.items)

    def add(self, exp: Experience) -> None:
        """Store one experience."""
        self.items.append(exp)

    def extend(self, exps) -> None:
        """Store several experiences."""
        self.items.extend(exps)

    def clear(self) -> None:
        """Drop everything (after the training phase of a fill)."""
        self.items.clear()

    def seq_len(self, i: int) -> int:
        """Prompt + completion length of item i."""
        return len(self.items[i].prompt_ids) + len(self.items[i].completion_ids)

    def minibatches(self, size: int, generator: torch.Generator, group_by_length: bool = False,
                    window: int = 8) -> Iterator[list[int]]:
        """Index lists of a random permutation, chunked into minibatches (the last may be smaller).

        group_by_length: within windows of `window` minibatches of the permutation, sort by length before
        chunking (similar lengths share a minibatch, cutting padding), then shuffle the minibatch order; every
        item still appears exactly once per pass and membership stays random across windows.
        """
        if size < 1 or window < 1:
            raise ValueError(f"size and window must be >= 1, got {size}, {window}")
        perm = torch.randperm(len(self.items), generator=generator).tolist()
        if group_by_length:
            span = size * window
            perm = [i for s in range(0, len(perm), span) for i in sorted(perm[s : s + span], key=self.seq_len)]
        chunks = [perm[s : s + size] for s in range(0, len(perm), size)]
        if group_by_length:
            order = torch.randperm(len(chunks), generator=generator).tolist()
            chunks = [chunks[k] for k in order]
        yield from chunks

    def split_by_tokens(self, indices: list[int], max_tokens: int) -> list[list[int]]:
        """Cut one micro-batch into chunks whose padded size (rows x longest row) is at most max_tokens (a longer
        single item is a chunk of its own); items are sorted by length first, so chunks also pad less. 0: one chunk.
        With step-wide loss normalisers the summed chunk gradients equal the micro-batch gradient."""
        if max_tokens <= 0 or not indices:
            return [list(indices)]
        chunks: list[list[int]] = [[]]
        for i in sorted(indices, key=self.seq_len):  # ascending, so the newest item is the chunk's longest
            if chunks[-1] and (len(chunks[-1]) + 1) * self.seq_len(i) > max_tokens:
                chunks.append([])
            chunks[-1].append(i)
        return chunks

    def collate(self, indices: list[int], pad_id: int) -> Batch:
        """Re-pad the given items into one right-padded Batch (see Batch); T = longest prompt + completion.

        Masks are built from the stored lengths, so a pad id equal to EOS never drops a real EOS. old_logp is
        returned when every item has it (None when none has; a mix is an error)."""
        if not indices:
            raise ValueError("collate needs at least one index")
        items = [self.items[i] for i in indices]
        p_lens = [len(e.prompt_ids) for e in items]
        c_lens = [len(e.completion_ids) for e in items]
        width = max(p + c for p, c in zip(p_lens, c_lens))
        n = len(items)
        ids = torch.full((n, width), pad_id, dtype=torch.long)
        attn = torch.zeros((n, width), dtype=torch.long)
        cmask = torch.zeros((n, width), dtype=torch.long)
        n_old = sum(e.old_logp is not None for e in items)
        if 0 < n_old < len(items):
            raise ValueError(f"{len(items) - n_old} of {len(items)} items lack old_logp")
        has_old = n_old == len(items)
        old = torch.zeros((n, width), dtype=torch.float32) if has_old else None
        for r, (e, p, c) in enumerate(zip(items, p_lens, c_lens)):
            ids[r, : p + c] = torch.tensor(e.prompt_ids + e.completion_ids, dtype=torch.long)
            attn[r, : p + c] = 1
            cmask[r, p : p + c] = 1
            if old is not None:
                if e.old_logp.shape != (c,):
                    raise ValueError(f"old_logp of item {indices[r]} has shape {tuple(e.old_logp.shape)}, "
                                     f"expected ({c},)")
                old[r, p : p + c] = e.old_logp.detach().float().cpu()
        adv = torch.tensor([e.advantage for e in items], dtype=torch.float32)
        return Batch(ids, attn, cmask, old, adv, p_lens, c_lens)

    def state_dict(self) -> dict:
        """{"items": [one dict of plain lists / floats / tensors per Experience]}, torch.save-able (loads with
        weights_only=True); a deep copy, so later changes to the buffer do not alter it (exact resume)."""
        return {"items": [asdict(e) for e in self.items]}

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict() returned (copies it, so the buffer and `state` stay independent)."""
        self.items = [Experience(**copy.deepcopy(d)) for d in state.get("items", [])]
