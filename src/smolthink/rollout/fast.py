"""FastEngine: a pure-torch Llama-family decoder for CPU rollouts, behind the same interface as `HFEngine`.

Why it is faster than `model.generate` on a small CPU (numbers in benchmarks/README.md):

* prefill once: the prefix common to every prompt of the call (system prompt + chat template) is run once and
  its K/V shared by every row (attended with one GEMM for all rows, not copied per row); each prompt's own
  tokens are run once and their K/V copied into its n sample rows;
* a preallocated KV cache written in place, one column per row per step (no per-step re-copy of the cache);
* continuous batching over a fixed pool of `max_rows` slots: a finished row leaves the batch at once (a live row
  from the end of the batch moves into its slot: O(rows moved), not O(batch)), and when enough slots are free
  the next prompts of the call are prefilled and admitted, so compute follows the live rows and, with more
  prompts than fit, the pool stays full until the prompts run out (memory is bounded by the pool);
* linear layers go through oneDNN with pre-packed weights when available (2-2.5x MKL's fp32 GEMM at 48 rows on
  this AVX-512 CPU; same fp32 arithmetic, different summation order), else `F.linear`; q/k/v are fused, the
  residual adds and silu(gate) * up ride in oneDNN's fused epilogues; the attention scaling is folded into the q
  rows and RoPE is one complex multiply (q/k rows re-ordered to interleaved pairs; exact re-arrangements);
* top-p without a full-vocabulary sort: `topk(k)` pre-cut, widened (k x 4, up to the full vocabulary) for the rows
  whose top-k mass is below top_p, which keeps exactly the same token set as the full sort (see `top_p_filter`);
* its own `torch.Generator` (the global RNG is never touched): one uniform per live row per step, inverse-CDF
  sampling; the same seed gives the same tokens.

Weights are read from the given model on every `generate` call (the policy changes between calls); for a peft
LoRA model the effective weights W + scale * B @ A are computed once per call; the model is never modified.
Models that are not Llama-like raise `UnsupportedModelError` (a ValueError): use `HFEngine` for those.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

from ..onednn import onednn_available, onednn_linear, pack_weight
from ..types import Rollout, SamplingParams
from .base import split_completion

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")  # inv_freq does not depend on the sequence length
NEG_INF = float("-inf")


class UnsupportedModelError(ValueError):
    """The model is not a Llama-like decoder this engine implements; use HFEngine."""


# ----------------------------------------------------------------------------------------------------------------
# Sampling


def top_p_filter(probs: torch.Tensor, top_p: float, k0: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Nucleus (top-p) cut of each row of `probs` [B, V] without sorting the whole vocabulary.

    Returns (sorted_probs [B, k], token_ids [B, k]) in descending order with the dropped tail set to 0; k may
    exceed the kept count. A token is kept iff the mass of the tokens ranked before it is < top_p (the smallest
    prefix of the descending order whose mass reaches top_p; the first token is always kept) - the same rule as
    a full descending sort. Exactness: the top-k values are the first k entries of the full sort, so the running
    sums agree; the first token outside the top-k has exactly the top-k mass before it, and it and every later
    token are dropped iff that mass is >= top_p. Rows where it is not are widened (at least k x 4, and at least the
    count the missing mass needs at the k-th probability; at most V) and redone.
    """
    V = probs.shape[1]
    k = min(max(1, k0), V)
    vals, idx = probs.topk(k, dim=-1)  # sorted, descending
    cum = vals.cumsum(-1)
    out = vals * _keep_from_cum(cum, top_p)
    if k < V:
        short = cum[:, -1] < top_p  # the nucleus may extend past the top-k: widen those rows
        if bool(short.any()):
            rows = short.nonzero().squeeze(1)
            # every token outside the top-k has probability <= the k-th largest, so the nucleus needs at least
            # deficit / p_k more tokens: a lower bound that skips hopeless sizes on flat distributions
            need = ((top_p - cum[rows, -1]) / vals[rows, -1].clamp_min(1e-30)).max().item()
            wide_vals, wide_idx = top_p_filter(probs[rows], top_p, k0=int(min(V, max(4 * k, k + need + 1))))
            extra = wide_vals.shape[1] - k
            out, idx = F.pad(out, (0, extra)), F.pad(idx, (0, extra))  # zero probability: dropped
            out[rows], idx[rows] = wide_vals, wide_idx
    return out, idx


def sample_tokens(logits: torch.Tensor, sampling: SamplingParams, u: torch.Tensor, k0: int = 64) -> torch.Tensor:
    """One token per row of `logits` [B, V] (fp32): greedy when temperature <= 0, else temperature -> top-k (if
    > 0) -> top-p (if < 1), sampled by inverse CDF with the uniforms `u` [B] (float64 in [0, 1))."""
    if sampling.temperature <= 0:
        return logits.argmax(-1)
    scores = logits / sampling.temperature
    top_k, top_p = int(sampling.top_k or 0), float(sampling.top_p if sampling.top_p is not None else 1.0)
    if top_k > 0 and top_k < scores.shape[1]:
        top_vals, cand = scores.topk(top_k, dim=-1)
        probs = torch.softmax(top_vals, -1)
        if top_p < 1.0:
            probs = probs * _nucleus_mask_sorted(probs, top_p)
    elif top_p < 1.0:
        probs, cand = top_p_filter(torch.softmax(scores, -1), top_p, k0)
    else:
        probs, cand = torch.softmax(scores, -1), None
    cdf = probs.cumsum(-1, dtype=torch.float64)
    target = u.to(torch.float64) * cdf[:, -1]
    pick = torch.searchsorted(cdf, target.unsqueeze(1), right=True).squeeze(1)
    # u * total may round up to total: then take the row's last positive-probability entry
    over = pick >= probs.shape[1]
    if bool(over.any()):
        pick[over] = (probs[over] > 0).cumsum(-1).argmax(-1)
    return pick if cand is None else cand.gather(1, pick.unsqueeze(1)).squeeze(1)


def _keep_from_cum(cum: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep mask from the running sums of descending probabilities: the mass ranked before a token is < top_p."""
    before = torch.cat([torch.zeros_like(cum[:, :1]), cum[:, :-1]], dim=1)
    keep = before < top_p
    keep[:, 0] = True
    return keep


def _nucleus_mask_sorted(sorted_probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep mask for probabilities already sorted in descending order (same rule as `top_p_filter`)."""
    return _keep_from_cum(sorted_probs.cumsum(-1), top_p)


# ----------------------------------------------------------------------------------------------------------------
# Weights


def _plain(module) -> bool:
    return type(module) in (torch.nn.Linear, torch.nn.Embedding)


def effective_weight(module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) a Linear/Embedding computes with, LoRA deltas of the active adapters folded in."""
    if _plain(module):
        return module.weight, getattr(module, "bias", None)
    base = getattr(module, "base_layer", None)
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        LoraLayer = ()  # type: ignore[assignment]
    if base is None or not isinstance(module, LoraLayer) or not _plain(base):
        raise UnsupportedModelError(f"fast engine: unsupported layer type {type(module).__name__}; use the hf engine")
    weight, bias = base.weight, getattr(base, "bias", None)
    if module.disable_adapters or module.merged:  # merged: the base weight already holds the delta
        return weight, bias
    for name in module.active_adapters:
        if name not in module.lora_A and name not in getattr(module, "lora_embedding_A", {}):
            continue
        if getattr(module, "use_dora", {}).get(name) or getattr(module, "lora_bias", {}).get(name):
            raise UnsupportedModelError("fast engine: DoRA / LoRA bias adapters are not supported; use the hf engine")
        weight = weight + module.get_delta_weight(name).to(weight.dtype)
    return weight, bias


@dataclass
class Layer:
    ln1: torch.Tensor
    qkv: torch.Tensor  # [(H + 2 KV) * hd, D]: q rows pre-scaled by the attention scaling; q/k rows interleaved
    qkv_b: torch.Tensor | None
    o: torch.Tensor
    o_b: torch.Tensor | None
    ln2: torch.Tensor
    gate: torch.Tensor
    gate_b: torch.Tensor | None
    up: torch.Tensor
    up_b: torch.Tensor | None
    down: torch.Tensor
    down_b: torch.Tensor | None


@dataclass
class Weights:
    """Everything the decoder computes with, in fp32, derived from a model once per generate call.

    Two exact re-arrangements make a decoding step cheaper: the q rows of qkv are multiplied by the attention
    scaling (so scores need no extra multiply), and within each head the q/k rows are reordered from HF's
    rotate-half layout (pairs i, i + hd/2) to interleaved pairs (2i, 2i + 1), so RoPE is one complex multiply.
    q.k is unchanged by the same permutation of both; the cached keys are stored in the permuted layout.
    """

    embed: torch.Tensor
    layers: list[Layer]
    norm: torch.Tensor
    lm_head: torch.Tensor
    eps: float
    n_heads: int
    n_kv: int
    head_dim: int
    inv_freq: torch.Tensor
    rope_scale: float
    onednn: bool
    vocab: int = 0
    _rot: torch.Tensor | None = field(default=None, repr=False)

    def rot(self, n_pos: int) -> torch.Tensor:
        """complex (cos + i sin) [n_pos, hd / 2], cos/sin computed exactly as transformers' rotary embedding."""
        if self._rot is None or self._rot.shape[0] < n_pos:
            pos = torch.arange(max(n_pos, 1024), dtype=torch.float32)
            freqs = pos[:, None] * self.inv_freq[None, :].float()
            self._rot = torch.complex(freqs.cos() * self.rope_scale, freqs.sin() * self.rope_scale)
        return self._rot

    # linear layers: oneDNN with packed weights (fused epilogues) or F.linear
    def linear(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        if self.onednn:
            return onednn_linear(x, w, b)
        return F.linear(x, w, b)

    def linear_add(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, other: torch.Tensor) -> torch.Tensor:
        """linear(x) + other"""
        if self.onednn:
            return torch.ops.mkldnn._linear_pointwise.binary(x, other, w, b, "add")
        return F.linear(x, w, b).add_(other)

    def linear_silu(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        if self.onednn:
            return torch.ops.mkldnn._linear_pointwise(x, w, b, "swish", [], "")
        return F.silu(F.linear(x, w, b), inplace=True)

    def linear_mul(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, other: torch.Tensor) -> torch.Tensor:
        """linear(x) * other"""
        if self.onednn:
            return torch.ops.mkldnn._linear_pointwise.binary(x, other, w, b, "mul")
        return F.linear(x, w, b).mul_(other)


def _check_supported(model) -> tuple[torch.nn.Module, object]:
    """(HF causal-LM module, config) of a supported model, else UnsupportedModelError with the reason."""
    base = model.get_base_model() if hasattr(model, "peft_config") and hasattr(model, "get_base_model") else model
    cfg = getattr(base, "config", None)
    mtype = getattr(cfg, "model_type", None)
    if mtype not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(f"fast engine supports {SUPPORTED_MODEL_TYPES} models, not {mtype!r} "
                                    f"({type(base).__name__}); use the hf engine")
    param = next(base.parameters(), None)
    if param is not None and param.device.type != "cpu":
        raise UnsupportedModelError(f"fast engine runs on CPU; the model is on {param.device}: use the hf engine")
    inner = getattr(base, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(base, "lm_head"):
        raise UnsupportedModelError(f"fast engine: unexpected module layout in {type(base).__name__}")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"fast engine: activation {cfg.hidden_act!r} not supported; use the hf engine")
    rope_type = getattr(getattr(inner, "rotary_emb", None), "rope_type", None)
    if rope_type not in STATIC_ROPE_TYPES:
        raise UnsupportedModelError(f"fast engine: RoPE type {rope_type!r} not supported; use the hf engine")
    layer_types = getattr(cfg, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types) or (
            mtype == "mistral" and getattr(cfg, "sliding_window", None) is not None):
        raise UnsupportedModelError("fast engine: sliding-window attention not supported; use the hf engine")
    for layer in inner.layers:
        attn = layer.self_attn
        if not all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")) or \
                any(hasattr(attn, n) for n in ("q_norm", "k_norm")):
            raise UnsupportedModelError("fast engine: unexpected attention block; use the hf engine")
    return base, cfg


def _interleave_rows(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Reorder the rows of each head from (0..hd/2-1, hd/2..hd-1) pairs to interleaved (0, hd/2, 1, hd/2+1, ...)."""
    half = head_dim // 2
    perm = torch.stack([torch.arange(half), torch.arange(half) + half], dim=1).reshape(-1)
    perm = (torch.arange(n_heads)[:, None] * head_dim + perm[None, :]).reshape(-1)
    return w[perm]


def extract_weights(model, onednn: bool | None = None, pack_rows: int = 64) -> Weights:
    """fp32 weights of a Llama-like model (LoRA folded in), rearranged as described in `Weights` and packed for
    oneDNN when `onednn` (None: when available). The model is not modified."""
    base, cfg = _check_supported(model)
    use_dnn = onednn_available() if onednn is None else bool(onednn and onednn_available())
    inner = base.model
    n_heads = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    scaling = float(getattr(inner.layers[0].self_attn, "scaling", head_dim ** -0.5))

    def f32(t):
        return None if t is None else t.detach().to(torch.float32)

    def pack(w):
        w = w.detach().to(torch.float32).contiguous()
        return pack_weight(w, pack_rows) if use_dnn else w

    def qkv_part(t, heads, scale):
        """q or k weight/bias rows: interleaved RoPE pairs, q scaled."""
        return None if t is None else _interleave_rows(f32(t) * scale, heads, head_dim)

    layers = []
    for layer in inner.layers:
        a, m = layer.self_attn, layer.mlp
        (wq, bq), (wk, bk), (wv, bv) = (effective_weight(x) for x in (a.q_proj, a.k_proj, a.v_proj))
        wo, bo = effective_weight(a.o_proj)
        (wg, bg), (wu, bu), (wd, bd) = (effective_weight(x) for x in (m.gate_proj, m.up_proj, m.down_proj))
        qkv = torch.cat([qkv_part(wq, n_heads, scaling), qkv_part(wk, n_kv, 1.0), f32(wv)])
        qkv_b = None
        if any(x is not None for x in (bq, bk, bv)):
            zeros = [torch.zeros(x.shape[0]) for x in (wq, wk, wv)]
            qkv_b = torch.cat([qkv_part(bq if bq is not None else zeros[0], n_heads, scaling),
                               qkv_part(bk if bk is not None else zeros[1], n_kv, 1.0),
                               f32(bv) if bv is not None else zeros[2]])
        layers.append(Layer(
            ln1=f32(layer.input_layernorm.weight), ln2=f32(layer.post_attention_layernorm.weight),
            qkv=pack(qkv), qkv_b=qkv_b, o=pack(wo), o_b=f32(bo), gate=pack(wg), gate_b=f32(bg),
            up=pack(wu), up_b=f32(bu), down=pack(wd), down_b=f32(bd)))
    embed, _ = effective_weight(inner.embed_tokens)
    head, head_b = effective_weight(base.lm_head)
    if head_b is not None:
        raise UnsupportedModelError("fast engine: lm_head bias not supported; use the hf engine")
    rot = inner.rotary_emb
    return Weights(
        embed=f32(embed).contiguous(), layers=layers, norm=f32(inner.norm.weight), lm_head=pack(head),
        eps=float(getattr(inner.norm, "variance_epsilon", cfg.rms_norm_eps)), n_heads=n_heads, n_kv=n_kv,
        head_dim=head_dim, inv_freq=rot.inv_freq.detach().float().clone(),
        rope_scale=float(getattr(rot, "attention_scaling", 1.0)), onednn=use_dnn, vocab=embed.shape[0])


# ----------------------------------------------------------------------------------------------------------------
# Decoder


def _rope(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """RoPE on interleaved pairs: x [..., hd] (real) times rot [..., hd / 2] (complex, broadcastable)."""
    shape = x.shape
    xc = torch.view_as_complex(x.reshape(*shape[:-1], shape[-1] // 2, 2))
    return torch.view_as_real(xc * rot).view(shape)


def _layer_rest(w: Weights, L: Layer, x: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
    """x + o_proj(att), then + down(silu(gate) * up) of its norm: the rest of a decoder layer."""
    x = w.linear_add(att, L.o, L.o_b, x)
    h = F.rms_norm(x, (x.shape[-1],), L.ln2, w.eps)
    act = w.linear_mul(h, L.up, L.up_b, w.linear_silu(h, L.gate, L.gate_b))
    return w.linear_add(act, L.down, L.down_b, x)


def _logits(w: Weights, x: torch.Tensor) -> torch.Tensor:
    return w.linear(F.rms_norm(x, (x.shape[-1],), w.norm, w.eps), w.lm_head)


def prefill(w: Weights, ids: torch.Tensor, pos: torch.Tensor, cache: torch.Tensor, col: int,
            last: torch.Tensor | None = None) -> torch.Tensor:
    """Run a block of tokens `ids` [B, T] at rope positions `pos` [B, T] causally: their K/V go to cache columns
    [col, col + T) (cache [layers, 2, B, KV, L, hd]) and they attend to every column before theirs (columns
    [0, col) must already hold K/V). Returns the logits [B, V] after token `last[b]` of each row (default: T-1).
    Right padding is harmless: a real token never sees the later pad tokens."""
    B, T = ids.shape
    H, KV, hd = w.n_heads, w.n_kv, w.head_dim
    hi = col + T
    rot = w.rot(int(pos.max()) + 1)[pos].unsqueeze(2)  # [B, T, 1, hd/2]
    mask = (torch.arange(hi)[None, :] <= torch.arange(col, hi)[:, None])[None, None]  # [1, 1, T, hi]
    x = w.embed[ids].view(B * T, -1)
    for li, L in enumerate(w.layers):
        h = F.rms_norm(x, (x.shape[-1],), L.ln1, w.eps)
        qkv = w.linear(h, L.qkv, L.qkv_b).view(B, T, H + 2 * KV, hd)
        qk = _rope(qkv[:, :, : H + KV], rot)  # [B, T, H + KV, hd]
        kc, vc = cache[li, 0], cache[li, 1]  # [B, KV, L, hd]
        kc[:, :, col:hi] = qk[:, :, H:].transpose(1, 2)
        vc[:, :, col:hi] = qkv[:, :, H + KV:].transpose(1, 2)
        q = qk[:, :, :H].transpose(1, 2)  # [B, H, T, hd], already scaled
        att = F.scaled_dot_product_attention(q, kc[:, :, :hi], vc[:, :, :hi], attn_mask=mask, scale=1.0,
                                             enable_gqa=KV != H)
        x = _layer_rest(w, L, x, att.transpose(1, 2).reshape(B * T, H * hd))
    x = x.view(B, T, -1)
    x = x[:, -1] if last is None else x[torch.arange(B), last]
    return _logits(w, x)


def decode_step(w: Weights, tok: torch.Tensor, pos: torch.Tensor, prefix: torch.Tensor | None, cache: torch.Tensor,
                col: torch.Tensor | int, width: int, bias: torch.Tensor | None) -> torch.Tensor:
    """One decoding step for B rows: token `tok` [B] at rope position `pos` [B]; its K/V are written to column
    `col` (per row [B], or one int for all rows) of the per-row cache [layers, 2, >=B, KV, L, hd]; it attends to
    the shared prefix K/V `prefix` [layers, 2, KV, lc, hd] (every row sees all of it; None when empty) and to
    per-row columns [0, width), with the additive mask `bias` [B, width] (0 / -inf; None: nothing masked).
    Returns logits [B, V].

    The shared prefix is one GEMM per kv head for all rows (B * rep queries), not a per-row product, so the
    prefix K/V is read once per step instead of once per row."""
    B = tok.shape[0]
    H, KV, hd = w.n_heads, w.n_kv, w.head_dim
    rep = H // KV
    rot = w.rot(int(pos.max()) + 1)[pos].unsqueeze(1)  # [B, 1, hd/2]
    lc = 0 if prefix is None else prefix.shape[3]
    if bias is not None:
        if lc:
            bias = torch.cat([bias.new_zeros(B, lc), bias], dim=1)
        bias = bias[:, None, None, :]  # [B, 1, 1, lc + width]
    rows = slice(0, B) if isinstance(col, int) else torch.arange(B)
    x = w.embed[tok]  # [B, D]
    for li, L in enumerate(w.layers):
        h = F.rms_norm(x, (x.shape[-1],), L.ln1, w.eps)
        qkv = w.linear(h, L.qkv, L.qkv_b).view(B, H + 2 * KV, hd)
        qk = _rope(qkv[:, : H + KV], rot)  # [B, H + KV, hd]
        kc, vc = cache[li, 0], cache[li, 1]
        kc[rows, :, col] = qk[:, H:]
        vc[rows, :, col] = qkv[:, H + KV:]
        q = qk[:, :H].view(B, KV, rep, hd)  # already scaled
        s = torch.matmul(q, kc[:B, :, :width].transpose(-1, -2))  # [B, KV, rep, width]
        if lc:
            sp = torch.matmul(q.transpose(0, 1).reshape(KV, B * rep, hd), prefix[li, 0].transpose(-1, -2))
            s = torch.cat([sp.view(KV, B, rep, lc).transpose(0, 1), s], dim=-1)  # [B, KV, rep, lc + width]
        if bias is not None:
            s.add_(bias)
        p = torch.softmax(s, -1)
        att = torch.matmul(p[..., lc:], vc[:B, :, :width])  # [B, KV, rep, hd]
        if lc:
            pp = p[..., :lc].transpose(0, 1).reshape(KV, B * rep, lc)
            att = att + torch.matmul(pp, prefix[li, 1]).view(KV, B, rep, hd).transpose(0, 1)
        x = _layer_rest(w, L, x, att.reshape(B, H * hd))
    return _logits(w, x)


def common_prefix_len(prompts: Sequence[Sequence[int]]) -> int:
    """Length of the token prefix shared by all prompts, capped so every prompt keeps >= 1 token of its own."""
    first, n = prompts[0], min(len(p) for p in prompts) - 1
    for i in range(max(n, 0)):
        t = first[i]
        if any(p[i] != t for p in prompts):
            return i
    return max(n, 0)


# ----------------------------------------------------------------------------------------------------------------
# Engine


class FastEngine:
    """Pure-torch rollouts for Llama-like models on CPU (see the module docstring). Same interface as HFEngine.

    max_rows: size of the decode slot pool (live rows at most; at least n); the KV cache is max_rows x (longest
    prompt suffix + max_new_tokens) columns, so memory stays bounded however many prompts a call has. Passing
    many prompts in one call lets finished rows be replaced by new prompts (no per-batch tail).
    top_p_k: the top-k pre-cut of the nucleus filter; onednn: None = oneDNN packed linear layers when available,
    False = F.linear. After each call `last_stats` holds timings and counts (prep/prefill/decode/sampling
    seconds, decode steps, row-steps, tokens, shared prefix length, prefill calls).
    The sampled tokens are a deterministic function of (weights, prompts, n, sampling, seed, max_rows).
    """

    def __init__(self, eos_ids: Sequence[int], pad_id: int, max_rows: int = 64, top_p_k: int = 64,
                 onednn: bool | None = None):
        self.eos_ids = sorted(set(int(e) for e in eos_ids))
        self.pad_id = int(pad_id)
        self.max_rows = max(1, int(max_rows))
        self.top_p_k = int(top_p_k)
        self.onednn = onednn
        self.last_stats: dict[str, float] = {}

    def supports(self, model) -> bool:
        """True when `model` is a Llama-like decoder this engine implements."""
        try:
            _check_supported(model)
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
        w = extract_weights(model, self.onednn)
        if max(max(p) for p in prompts) >= w.vocab:
            raise ValueError("prompt token id out of the model's vocabulary")
        gen = torch.Generator()
        gen.manual_seed(int(seed) if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
        prompts = [list(map(int, p)) for p in prompts]
        # The prefix every prompt shares (system prompt + template) is computed once for the whole call.
        lc = common_prefix_len(prompts)
        max_new = int(sampling.max_new_tokens)
        longest = max(len(p) for p in prompts)
        w.rot(longest + max_new + 1)
        stats["prep_s"] = time.perf_counter() - t0
        prefix = None
        if lc > 0:
            t1 = time.perf_counter()
            pc = torch.empty(len(w.layers), 2, 1, w.n_kv, lc, w.head_dim)
            prefill(w, torch.tensor([prompts[0][:lc]]), torch.arange(lc)[None], pc, 0)
            prefix = pc[:, :, 0]  # [layers, 2, KV, lc, hd]
            stats["prefill_s"] += time.perf_counter() - t1
            stats["prefix_len"] = lc
            stats["prefill_tokens"] += lc
        out = torch.full((len(prompts) * n, max(max_new, 1)), self.pad_id, dtype=torch.long)
        if max_new > 0:
            self._decode(w, prompts, n, sampling, gen, prefix, lc, stats, out)
        gen_rows = out.tolist()
        eos_set = set(self.eos_ids)
        result = []
        for i, p in enumerate(prompts):
            row = []
            for j in range(n):
                comp, reason = split_completion(gen_rows[i * n + j], eos_set, max_new)
                row.append(Rollout(prompt_ids=list(p), completion_ids=comp, finish_reason=reason))
            result.append(row)
        return result

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
                prefix, lc: int, stats, out: torch.Tensor) -> None:
        """Continuous batching over a fixed pool of `max_rows` cache slots: live rows occupy slots [0, B); a
        finished row's slot is refilled at once by swap-compaction (a live row from the end moves in), and
        whenever enough slots are free the next prompts are prefilled and their n sample rows admitted, so
        compute follows live rows and the pool stays full until the prompts run out. Writes out[row, t]."""
        max_new = int(sampling.max_new_tokens)
        suffix = [p[lc:] for p in prompts]
        slen = [len(s) for s in suffix]
        cap = max(min(self.max_rows, len(prompts) * n), n)
        admit_at = max(n, cap // 8)  # batch admissions: one prefill call for several prompts
        width = max(slen) + max_new  # a row: its own prompt tokens from column 0, then its completion
        L = len(w.layers)
        # zeros, not empty: columns past a row's own end are inside the attention window of longer rows; they
        # are masked (-inf), but must hold finite numbers (NaN * 0 = NaN)
        cache = torch.zeros(L, 2, cap, w.n_kv, width, w.head_dim)
        orig = torch.zeros(cap, dtype=torch.long)  # output row of each slot
        pos = torch.zeros(cap, dtype=torch.long)  # rope position of the token fed next
        col = torch.zeros(cap, dtype=torch.long)  # cache column it is written to
        done_t = torch.zeros(cap, dtype=torch.long)  # tokens generated so far
        tok = torch.zeros(cap, dtype=torch.long)
        logits = torch.empty(0, w.vocab)
        eos = torch.tensor(self.eos_ids, dtype=torch.long)
        B, nxt, P = 0, 0, len(prompts)
        t_dec = time.perf_counter()
        while True:
            # -- admit the next prompts into free slots (one prefill for all of them) --
            free = cap - B
            if nxt < P and (free >= admit_at or (B == 0 and free >= n) or (free >= n and P - nxt <= free // n)):
                k = min(free // n, P - nxt)
                ids = list(range(nxt, nxt + k))
                pcache, plog = self._prefill(w, [suffix[i] for i in ids], prefix, lc, stats)
                for j, i in enumerate(ids):
                    sl = slice(B + j * n, B + (j + 1) * n)
                    cache[:, :, sl, :, : slen[i]] = pcache[:, :, j:j + 1, :, lc: lc + slen[i]]
                    orig[sl] = torch.arange(i * n, (i + 1) * n)
                    pos[sl], col[sl], done_t[sl] = len(prompts[i]), slen[i], 0
                del pcache
                logits = torch.cat([logits, plog.repeat_interleave(n, dim=0)])
                B, nxt = B + k * n, nxt + k
            if B == 0:
                break
            # -- sample one token per live row --
            ts = time.perf_counter()
            u = torch.rand(B, generator=gen, dtype=torch.float64)
            tok[:B] = sample_tokens(logits, sampling, u, self.top_p_k)
            stats["sample_s"] += time.perf_counter() - ts
            out[orig[:B], done_t[:B]] = tok[:B]
            done_t[:B] += 1
            stats["tokens"] += B
            finished = torch.isin(tok[:B], eos) | (done_t[:B] >= max_new)
            if bool(finished.any()):
                live = ~finished
                nl = int(live.sum())
                holes = (~live[:nl]).nonzero().squeeze(1)  # dead slots among the first nl ...
                if holes.numel():
                    donors = live[nl:].nonzero().squeeze(1) + nl  # ... get the live rows from the end
                    hi = int(col[donors].max())
                    cache[:, :, holes, :, :hi] = cache[:, :, donors, :, :hi]
                    for ten in (orig, pos, col, done_t, tok):
                        ten[holes] = ten[donors]
                B = nl
                if B == 0:
                    logits = logits[:0]
                    continue
            # -- one forward step for the live rows --
            td = time.perf_counter()
            c = col[:B]
            lo_c, hi_c = int(c.min()), int(c.max())
            if lo_c == hi_c:  # every row writes the same column: nothing to mask
                logits = decode_step(w, tok[:B], pos[:B], prefix, cache, hi_c, hi_c + 1, None)
            else:
                bias = torch.zeros(B, hi_c + 1).masked_fill_(torch.arange(hi_c + 1)[None, :] > c[:, None], NEG_INF)
                logits = decode_step(w, tok[:B], pos[:B], prefix, cache, c.clone(), hi_c + 1, bias)
            pos[:B] += 1
            col[:B] += 1
            stats["steps"] += 1
            stats["row_steps"] += B
            stats["decode_s"] += time.perf_counter() - td
        stats["decode_wall_s"] = time.perf_counter() - t_dec
