"""Experience storage without padding; random (optionally length-aware) minibatches, re-padded on demand."""
from __future__ import annotations

import copy
import os
from dataclasses import asdict, dataclass, field
from typing import Iterator

import torch
from torch import Tensor


@dataclass
class Experience:
    """One scored completion, unpadded. old_logp [Tc] (Tc = len(completion_ids)): old_logp[j] is the sampling
    policy's log p(completion_ids[j] | prompt_ids + completion_ids[:j]) with the training numerics, or None until
    computed. engine_logp [Tc]: the same log-probs as the rollout engine computed them while sampling
    (`Rollout.logprobs`), or None when the engine gives none; only compared, never trained on. completion_ids
    end with EOS unless truncated. group: id of the question group the advantage was computed in."""

    prompt_ids: list[int]
    completion_ids: list[int]
    old_logp: Tensor | None
    advantage: float
    reward: float
    parts: dict[str, float] = field(default_factory=dict)
    truncated: bool = False
    group: int = 0
    engine_logp: Tensor | None = None


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
    engine_logp: Tensor | None = None  # [n, T] float32 like old_logp, the rollout engine's log-probs

    def to(self, device) -> "Batch":
        """The same batch on another device."""
        move = lambda t: t.to(device) if t is not None else None
        return Batch(move(self.input_ids), move(self.attention_mask), move(self.completion_mask),
                     move(self.old_logp), move(self.advantages), self.prompt_lens, self.completion_lens,
                     move(self.engine_logp))


@dataclass
class SharedBatch:
    """n sequences that start with one prefix (see `logprobs.shared_prompt_logprobs`): the prefix once, then each
    row's remaining tokens (the rest of its prompt, then its completion), right-padded to C = the longest. Tensors
    are [n, C] over the remaining positions only, so a loss written for Batch (logp, old_logp, completion mask of
    the same shape) applies unchanged."""

    prefix_ids: Tensor  # [1, P] the prompt tokens every row starts with (a GRPO group: the whole prompt)
    input_ids: Tensor  # [n, C] the rest of the prompt + completion, then padding
    attention_mask: Tensor  # [n, C] 1 on real tokens
    completion_mask: Tensor  # [n, C] 1 exactly on completion tokens (final EOS included)
    old_logp: Tensor | None  # [n, C] float32, 0 off completion
    advantages: Tensor  # [n]
    prompt_lens: list[int]  # each row's prompt tokens after the prefix (0 when the prefix is its whole prompt)
    completion_lens: list[int]
    engine_logp: Tensor | None = None  # [n, C] float32 like old_logp, the rollout engine's log-probs

    def to(self, device) -> "SharedBatch":
        """The same batch on another device."""
        move = lambda t: t.to(device) if t is not None else None
        return SharedBatch(move(self.prefix_ids), move(self.input_ids), move(self.attention_mask),
                           move(self.completion_mask), move(self.old_logp), move(self.advantages), self.prompt_lens,
                           self.completion_lens, move(self.engine_logp))


def _cheapest_cuts(prompt_len: int, lens: list[int], max_tokens: int) -> list[tuple[int, int]]:
    """Split ascending lengths of rows that follow one shared prefix of prompt_len tokens into contiguous runs
    [a, b) minimising the sum of prompt_len + (b - a) * lens[b - 1] (computed tokens, padding included), each run
    within max_tokens unless it is a single row (0: no limit). Dynamic programming over the cut points,
    O(len(lens)^2)."""
    n = len(lens)
    best = [0.0] + [float("inf")] * n  # best[b]: cheapest cost of the first b rows
    cut = [0] * (n + 1)
    for b in range(1, n + 1):
        for a in range(b - 1, -1, -1):
            cost = prompt_len + (b - a) * lens[b - 1]
            if b - a > 1 and 0 < max_tokens < cost:
                break  # longer runs ending at b only cost more
            if best[a] + cost < best[b]:
                best[b], cut[b] = best[a] + cost, a
    runs, b = [], n
    while b > 0:
        runs.append((cut[b], b))
        b = cut[b]
    return runs[::-1]


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

    def prompt_chunks(self, indices: list[int], max_tokens: int) -> list[list[int]]:
        """Group items by identical prompt (a GRPO group), then cut each group into chunks that run as one
        `SharedBatch`. A chunk computes P + rows x its longest completion tokens (padding included); the cut
        minimises the group's total (each extra chunk re-runs the prompt, each long row pads the short ones)
        with every chunk at most max_tokens (a single row may exceed it; 0: no limit). Completions are sorted
        by length, so a chunk is a run of similar lengths. Groups keep the order of their first item; with
        step-wide loss normalisers the chunk gradients sum to the step's."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for i in indices:
            groups.setdefault(tuple(self.items[i].prompt_ids), []).append(i)
        chunks: list[list[int]] = []
        for prompt, members in groups.items():
            members = sorted(members, key=lambda i: len(self.items[i].completion_ids))
            lens = [len(self.items[i].completion_ids) for i in members]
            chunks += [members[a:b] for a, b in _cheapest_cuts(len(prompt), lens, max_tokens)]
        return chunks

    def prefix_chunks(self, indices: list[int], max_tokens: int) -> list[list[int]]:
        """Cut one micro-batch into chunks that each run as one `SharedBatch` on their common prompt prefix (SFT:
        the chat template's system turn). Items are sorted by length; a chunk computes P + rows x its longest
        remainder tokens (padding included; P = the micro-batch's common prefix, which bounds each chunk's cost
        from above, as a chunk's own prefix can only be longer); the cut minimises the total with every chunk at
        most max_tokens (a single row may exceed it; 0: no limit), as `prompt_chunks` does within a group."""
        order = sorted(indices, key=self.seq_len)
        p = self.common_prefix_len(order) if order else 0
        return [order[a:b] for a, b in _cheapest_cuts(p, [self.seq_len(i) - p for i in order], max_tokens)]

    def common_prefix_len(self, indices) -> int:
        """Length of the longest common prefix of the items' prompts (at most the shortest prompt)."""
        # commonprefix compares any sequences element-wise, not only strings
        return len(os.path.commonprefix([self.items[i].prompt_ids for i in indices]))

    def collate_shared(self, indices: list[int], pad_id: int, prefix_len: int | None = None) -> SharedBatch:
        """The given items as a SharedBatch on their first `prefix_len` prompt tokens, which they must share (None:
        the first item's whole prompt, a GRPO group's); masks from the stored lengths, as in `collate`."""
        b = self.collate(indices, pad_id)  # [n, T]; the shared prefix is real in every row
        p = b.prompt_lens[0] if prefix_len is None else prefix_len
        prefix = b.input_ids[:, :p]  # [n, P]
        if not 0 < p <= min(b.prompt_lens) or (prefix != prefix[:1]).any():
            raise ValueError(f"collate_shared: the items do not share one prompt prefix of {p} tokens")
        rest = lambda t: t[:, p:] if t is not None else None  # [n, T - P]
        return SharedBatch(prefix[:1], rest(b.input_ids), rest(b.attention_mask), rest(b.completion_mask),
                           rest(b.old_logp), b.advantages, [q - p for q in b.prompt_lens], b.completion_lens,
                           rest(b.engine_logp))

    @staticmethod
    def _token_rows(items: list[Experience], indices: list[int], attr: str, width: int,
                    starts: list[int]) -> Tensor | None:
        """Each item's per-completion-token `attr` ("old_logp" / "engine_logp", [Tc] each) placed at columns
        starts[r] .. starts[r] + Tc of row r -> [n, width] float32, 0 elsewhere; None when no item has it (a
        mix is an error)."""
        have = sum(getattr(e, attr) is not None for e in items)
        if 0 < have < len(items):
            raise ValueError(f"{len(items) - have} of {len(items)} items lack {attr}")
        if have == 0:
            return None
        out = torch.zeros((len(items), width), dtype=torch.float32)
        for r, e in enumerate(items):
            t, c = getattr(e, attr), len(e.completion_ids)
            if t.shape != (c,):
                raise ValueError(f"{attr} of item {indices[r]} has shape {tuple(t.shape)}, expected ({c},)")
            out[r, starts[r] : starts[r] + c] = t.detach().float().cpu()
        return out

    def collate(self, indices: list[int], pad_id: int) -> Batch:
        """Re-pad the given items into one right-padded Batch (see Batch); T = longest prompt + completion.

        Masks are built from the stored lengths, so a pad id equal to EOS never drops a real EOS. old_logp (and
        engine_logp) is returned when every item has it (None when none has; a mix is an error)."""
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
        for r, (e, p, c) in enumerate(zip(items, p_lens, c_lens)):
            ids[r, : p + c] = torch.tensor(e.prompt_ids + e.completion_ids, dtype=torch.long)
            attn[r, : p + c] = 1
            cmask[r, p : p + c] = 1
        adv = torch.tensor([e.advantage for e in items], dtype=torch.float32)
        return Batch(ids, attn, cmask, self._token_rows(items, indices, "old_logp", width, p_lens), adv, p_lens,
                     c_lens, self._token_rows(items, indices, "engine_logp", width, p_lens))

    def state_dict(self) -> dict:
        """{"items": [one dict of plain lists / floats / tensors per Experience]}, torch.save-able (loads with
        weights_only=True); a deep copy, so later changes to the buffer do not alter it (exact resume)."""
        return {"items": [asdict(e) for e in self.items]}

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict() returned (copies it, so the buffer and `state` stay independent)."""
        self.items = [Experience(**copy.deepcopy(d)) for d in state.get("items", [])]
