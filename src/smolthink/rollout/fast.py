"""FastEngine: pure-torch rollouts of Llama-family models on CPU, behind the same interface as `HFEngine`.

Why it is faster than `model.generate` on a small CPU (measurements in benchmarks/README.md):

* prefill once: the prefix common to every prompt of the call (system prompt + chat template) is run once and
  its K/V shared by every row (attended with one GEMM for all rows, not copied per row); each prompt's own
  tokens are run once and their K/V copied into its n sample rows;
* a preallocated KV cache written in place, one column per row per step (no per-step re-copy of the cache);
* continuous batching over a fixed pool of `max_rows` slots: a finished row leaves the batch at once (a live row
  from the end of the batch moves into its slot: O(rows moved), not O(batch)), and when enough slots are free
  the next prompts of the call are prefilled and admitted, so compute follows the live rows and, with more
  prompts than fit, the pool stays full until the prompts run out (memory is bounded by the pool);
* the decoder itself (`llama.py`) computes with fused, pre-packed oneDNN linear layers and a one-multiply RoPE;
* top-p without a full-vocabulary sort (`sampling.top_p_filter`), keeping exactly the full sort's token set;
* its own `torch.Generator` (the global RNG is never touched): one uniform per live row per step, inverse-CDF
  sampling; the same seed gives the same tokens;
* `precision="bf16"`: the linear layers' weights (LoRA merged in fp32 first) and GEMM inputs in bf16, which halves
  the weight bytes a memory-bound decode step reads and doubles the dot-product rate on AVX512-BF16; oneDNN
  accumulates in fp32, and the residual stream, RMSNorm, RoPE, the KV cache, attention, softmax, the logits and
  sampling stay fp32. Its tokens can differ from the fp32 engine's where two candidates are nearly tied.

Each sampled completion carries the log-probability of every token under the temperature-scaled distribution it
was drawn from, before top-k / top-p truncation (fp32, `Rollout.logprobs`); greedy decoding carries none.

Weights are read from the given model on every `generate` call (the policy changes between calls); for a peft
LoRA model the effective weights W + scale * B @ A are computed once per call; the model is never modified.
Models that are not Llama-like raise `UnsupportedModelError` (a ValueError): use `HFEngine` for those.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Sequence

import torch

from ..types import Rollout, SamplingParams
from .base import group_rollouts
from .llama import (UnsupportedModelError, Weights, check_supported, decode_step, effective_weight, extract_weights,
                    linear_dtype, prefill)
from .sampling import sample_tokens

NEG_INF = float("-inf")


def common_prefix_len(prompts: Sequence[Sequence[int]]) -> int:
    """Length of the token prefix shared by all prompts, capped so every prompt keeps >= 1 token of its own."""
    first, n = prompts[0], min(len(p) for p in prompts) - 1
    for i in range(max(n, 0)):
        t = first[i]
        if any(p[i] != t for p in prompts):
            return i
    return max(n, 0)


@dataclass
class _Slots:
    """The decode slot pool of one generate call: live rows occupy slots [0, live); tensors are indexed by slot."""

    cache: torch.Tensor  # [layers, 2, cap, KV, width, hd]: a row's own prompt tokens from column 0, then its completion
    orig: torch.Tensor  # [cap] output row of each slot
    pos: torch.Tensor  # [cap] rope position of the token fed next
    col: torch.Tensor  # [cap] cache column it is written to
    done_t: torch.Tensor  # [cap] tokens generated so far
    tok: torch.Tensor  # [cap] the token sampled last
    logits: torch.Tensor  # [live, V] next-token logits of the live rows
    live: int = 0

    @classmethod
    def empty(cls, w: Weights, cap: int, width: int) -> "_Slots":
        """A pool of `cap` free slots, each with `width` cache columns."""
        # zeros, not empty: columns past a row's own end are inside the attention window of longer rows; they
        # are masked (-inf), but must hold finite numbers (NaN * 0 = NaN)
        cache = torch.zeros(len(w.layers), 2, cap, w.n_kv, width, w.head_dim)
        def per_slot():
            return torch.zeros(cap, dtype=torch.long)

        return cls(cache, orig=per_slot(), pos=per_slot(), col=per_slot(), done_t=per_slot(), tok=per_slot(),
                   logits=torch.empty(0, w.vocab))

    def compact(self, keep: torch.Tensor) -> None:
        """Drop the live rows where `keep` [live] is False: the kept rows from the end move into the freed slots
        among the first `keep.sum()` (O(rows moved)), so the live rows stay contiguous."""
        nl = int(keep.sum())
        holes = (~keep[:nl]).nonzero().squeeze(1)  # dead slots among the first nl ...
        if holes.numel():
            donors = keep[nl:].nonzero().squeeze(1) + nl  # ... get the live rows from the end
            hi = int(self.col[donors].max())
            self.cache[:, :, holes, :, :hi] = self.cache[:, :, donors, :, :hi]
            for ten in (self.orig, self.pos, self.col, self.done_t, self.tok):
                ten[holes] = ten[donors]
        self.live = nl


class FastEngine:
    """Pure-torch rollouts for Llama-like models on CPU (see the module docstring). Same interface as HFEngine.

    max_rows: size of the decode slot pool (live rows at most; at least n); the KV cache is max_rows x (longest
    prompt suffix + max_new_tokens) columns, so memory stays bounded however many prompts a call has. Passing
    many prompts in one call lets finished rows be replaced by new prompts (no per-batch tail).
    top_p_k: the top-k pre-cut of the nucleus filter; onednn: None = oneDNN packed linear layers when available,
    False = F.linear; precision: "bf16" | "fp32", the linear layers' weights (see the module docstring; bf16 only
    on a CPU with bf16 dot products, else fp32: `linear_dtype`). After each call `last_stats` holds timings and
    counts (prep/prefill/decode/sampling seconds, decode steps, row-steps, tokens, shared prefix length, prefill
    calls).
    The sampled tokens are a deterministic function of (weights, prompts, n, sampling, seed, max_rows, precision).
    """

    def __init__(self, eos_ids: Sequence[int], pad_id: int, max_rows: int = 64, top_p_k: int = 64,
                 onednn: bool | None = None, precision: str = "bf16"):
        self.eos_ids = sorted(set(int(e) for e in eos_ids))
        self.pad_id = int(pad_id)
        self.max_rows = max(1, int(max_rows))
        self.top_p_k = int(top_p_k)
        self.onednn = onednn
        self.dtype = linear_dtype(precision)
        self.last_stats: dict[str, float] = {}

    def supports(self, model) -> bool:
        """True when `model` is a Llama-like decoder this engine implements."""
        try:
            check_supported(model)
            if hasattr(model, "peft_config"):
                for mod in model.get_base_model().modules():
                    if hasattr(mod, "base_layer"):
                        effective_weight(mod)
            return True
        except UnsupportedModelError:
            return False

    @torch.inference_mode()
    def generate(
        self,
        model: torch.nn.Module,
        prompts: Sequence[list[int]],
        n: int,
        sampling: SamplingParams,
        seed: int | None = None,
    ) -> list[list[Rollout]]:
        """Generate n completions per prompt -> [prompt][sample] Rollouts."""
        stats = dict(prep_s=0.0, prefill_s=0.0, decode_s=0.0, sample_s=0.0, steps=0, row_steps=0, tokens=0,
                     prefix_len=0, prefill_tokens=0, prefill_calls=0, decode_wall_s=0.0)
        self.last_stats = stats
        if not prompts:
            return []
        if any(len(p) == 0 for p in prompts):
            raise ValueError("empty prompt")
        t0 = time.perf_counter()
        w = extract_weights(model, self.onednn, dtype=self.dtype)
        if max(max(p) for p in prompts) >= w.vocab:
            raise ValueError("prompt token id out of the model's vocabulary")
        gen = torch.Generator()
        gen.manual_seed(int(seed) if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
        prompts = [list(map(int, p)) for p in prompts]
        lc = common_prefix_len(prompts)
        max_new = int(sampling.max_new_tokens)
        w.rot(max(len(p) for p in prompts) + max_new + 1)
        stats["prep_s"] = time.perf_counter() - t0
        prefix = self._prefill_shared(w, prompts[0][:lc], stats) if lc > 0 else None
        out = torch.full((len(prompts) * n, max(max_new, 1)), self.pad_id, dtype=torch.long)  # [rows, max_new]
        logp = torch.zeros(out.shape) if sampling.temperature > 0 else None  # [rows, max_new] fp32
        if max_new > 0:
            self._decode(w, prompts, n, sampling, gen, prefix, lc, stats, out, logp)
        return group_rollouts(prompts, out.tolist(), n, set(self.eos_ids), max_new,
                              None if logp is None else logp.tolist())

    def _prefill_shared(self, w: Weights, head: list[int], stats) -> torch.Tensor:
        """The prefix every prompt shares (system prompt + template), run once for the whole call -> its K/V
        [layers, 2, KV, lc, hd]."""
        t1 = time.perf_counter()
        lc = len(head)
        pc = torch.empty(len(w.layers), 2, 1, w.n_kv, lc, w.head_dim)
        prefill(w, torch.tensor([head]), torch.arange(lc)[None], pc, 0)
        stats["prefill_s"] += time.perf_counter() - t1
        stats["prefix_len"] = lc
        stats["prefill_tokens"] += lc
        return pc[:, :, 0]

    def _prefill(self, w: Weights, suffix: list[list[int]], prefix, lc: int,
                 stats) -> tuple[torch.Tensor, torch.Tensor]:
        """Each prompt's own tokens (after the shared prefix), right padded, run once: -> KV cache
        [layers, 2, P, KV, lc + S, hd] (prefix columns included) and the logits [P, V] after each prompt."""
        t1 = time.perf_counter()
        P, S = len(suffix), max(len(s) for s in suffix)
        cache = torch.empty(len(w.layers), 2, P, w.n_kv, lc + S, w.head_dim)
        if lc:
            cache[:, :, :, :, :lc] = prefix[:, :, None]
        ids = torch.full((P, S), self.pad_id, dtype=torch.long)
        for i, s in enumerate(suffix):
            ids[i, : len(s)] = torch.tensor(s)
        pos = torch.arange(lc, lc + S)[None].expand(P, S)
        logits = prefill(w, ids, pos, cache, lc, last=torch.tensor([len(s) - 1 for s in suffix]))
        stats["prefill_s"] += time.perf_counter() - t1
        stats["prefill_tokens"] += sum(len(s) for s in suffix)
        stats["prefill_calls"] += 1
        return cache, logits

    def _decode(self, w: Weights, prompts: list[list[int]], n: int, sampling: SamplingParams, gen: torch.Generator,
                prefix, lc: int, stats, out: torch.Tensor, logp: torch.Tensor | None) -> None:
        """Continuous batching over a fixed pool of `max_rows` cache slots: live rows occupy slots [0, B); a
        finished row's slot is refilled at once by swap-compaction (a live row from the end moves in), and
        whenever enough slots are free the next prompts are prefilled and their n sample rows admitted, so
        compute follows live rows and the pool stays full until the prompts run out. Writes out[row, t] and
        (unless None) the token's log-probability logp[row, t]."""
        max_new = int(sampling.max_new_tokens)
        suffix = [p[lc:] for p in prompts]
        cap = max(min(self.max_rows, len(prompts) * n), n)
        admit_at = max(n, cap // 8)  # batch admissions: one prefill call for several prompts
        slots = _Slots.empty(w, cap, width=max(len(s) for s in suffix) + max_new)
        eos = torch.tensor(self.eos_ids, dtype=torch.long)
        nxt, P = 0, len(prompts)
        t_dec = time.perf_counter()
        while True:
            # -- admit the next prompts into free slots (one prefill for all of them) --
            free, B = cap - slots.live, slots.live
            if nxt < P and (free >= admit_at or (B == 0 and free >= n) or (free >= n and P - nxt <= free // n)):
                k = min(free // n, P - nxt)
                self._admit(w, slots, prompts, suffix, range(nxt, nxt + k), n, prefix, lc, stats)
                nxt += k
            if slots.live == 0:
                break
            # -- sample one token per live row; finished rows leave the pool --
            finished = self._sample(slots, sampling, gen, eos, max_new, stats, out, logp)
            if bool(finished.any()):
                slots.compact(~finished)
                if slots.live == 0:
                    slots.logits = slots.logits[:0]
                    continue
            # -- one forward step for the live rows --
            self._forward(w, slots, prefix, stats)
        stats["decode_wall_s"] = time.perf_counter() - t_dec

    def _admit(self, w: Weights, slots: _Slots, prompts: list[list[int]], suffix: list[list[int]], ids: range,
               n: int, prefix, lc: int, stats) -> None:
        """Prefill prompts `ids` in one call and place their n sample rows in the free slots after the live ones."""
        pcache, plog = self._prefill(w, [suffix[i] for i in ids], prefix, lc, stats)
        B = slots.live
        for j, i in enumerate(ids):
            sl, s = slice(B + j * n, B + (j + 1) * n), len(suffix[i])
            slots.cache[:, :, sl, :, :s] = pcache[:, :, j:j + 1, :, lc: lc + s]
            slots.orig[sl] = torch.arange(i * n, (i + 1) * n)
            slots.pos[sl], slots.col[sl], slots.done_t[sl] = len(prompts[i]), s, 0
        del pcache  # before the logits grow: the prefill cache is the larger allocation
        slots.logits = torch.cat([slots.logits, plog.repeat_interleave(n, dim=0)])
        slots.live += len(ids) * n

    def _sample(self, slots: _Slots, sampling: SamplingParams, gen: torch.Generator, eos: torch.Tensor,
                max_new: int, stats, out: torch.Tensor, logp: torch.Tensor | None) -> torch.Tensor:
        """One token per live row from its logits, written to out[row, t] (its log-probability to logp[row, t]
        unless None) -> finished [live] (EOS or max_new)."""
        B = slots.live
        ts = time.perf_counter()
        u = torch.rand(B, generator=gen, dtype=torch.float64)
        slots.tok[:B], lp = sample_tokens(slots.logits, sampling, u, self.top_p_k)
        if logp is not None:
            logp[slots.orig[:B], slots.done_t[:B]] = lp
        stats["sample_s"] += time.perf_counter() - ts
        out[slots.orig[:B], slots.done_t[:B]] = slots.tok[:B]
        slots.done_t[:B] += 1
        stats["tokens"] += B
        return torch.isin(slots.tok[:B], eos) | (slots.done_t[:B] >= max_new)

    def _forward(self, w: Weights, slots: _Slots, prefix, stats) -> None:
        """Feed each live row its last sampled token; leaves the next logits [live, V] in `slots.logits`."""
        td = time.perf_counter()
        B = slots.live
        c = slots.col[:B]
        lo_c, hi_c = int(c.min()), int(c.max())
        if lo_c == hi_c:  # every row writes the same column: nothing to mask
            slots.logits = decode_step(w, slots.tok[:B], slots.pos[:B], prefix, slots.cache, hi_c, hi_c + 1, None)
        else:
            bias = torch.zeros(B, hi_c + 1).masked_fill_(torch.arange(hi_c + 1)[None, :] > c[:, None], NEG_INF)
            slots.logits = decode_step(w, slots.tok[:B], slots.pos[:B], prefix, slots.cache, c.clone(), hi_c + 1, bias)
        slots.pos[:B] += 1
        slots.col[:B] += 1
        stats["steps"] += 1
        stats["row_steps"] += B
        stats["decode_s"] += time.perf_counter() - td
