"""The Llama-family decoder the fast engine runs: weights read from a transformers model (LoRA folded in; the
linear layers in fp32 or bf16) and a pure-torch forward over a preallocated fp32 KV cache.

* `extract_weights(model)` -> `Weights`: q/k/v fused into one matrix, q rows pre-scaled by the attention scaling
  and q/k rows re-ordered so RoPE is one complex multiply (exact re-arrangements, see `Weights`); linear weights
  pre-packed for oneDNN when it is available (same fp32 arithmetic as `F.linear`, different summation order;
  the residual adds and silu(gate) * up ride in its fused epilogues). The model is never modified.
* `prefill` runs a block of tokens per row causally and `decode_step` one token per row; both write their K/V into
  the caller's cache in place and return the logits after the row's last token.

Supported: llama, mistral and qwen2 configs with full attention, SiLU MLPs and a static RoPE; anything else
raises `UnsupportedModelError` (a ValueError) saying to use the hf engine.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..onednn import onednn_available, onednn_linear, pack_weight

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")  # inv_freq does not depend on the sequence length
# logits recomputed in fp32 under bf16 (see `_logits`): enough to hold every token whose bf16 head output could
# rank above the row's fp32 maximum (those lie within ~0.3 of it: a handful at most)
REFINED = 16


class UnsupportedModelError(ValueError):
    """The model is not a Llama-like decoder this engine implements; use HFEngine."""


# ----------------------------------------------------------------------------------------------------------------
# Weights


def _plain(module) -> bool:
    """Exactly a torch Linear/Embedding (a LoRA wrapper or any subclass is not)."""
    return type(module) in (torch.nn.Linear, torch.nn.Embedding)


def effective_weight(module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) a Linear/Embedding computes with, LoRA deltas of the active adapters folded in."""
    if _plain(module):
        return module.weight, getattr(module, "bias", None)
    from peft.tuners.lora import LoraLayer  # here, not at the top: only LoRA models need peft imported

    base = getattr(module, "base_layer", None)
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
    """One decoder layer's weights: norms fp32, the linear ones in `Weights.dtype`, packed for oneDNN when
    `Weights.onednn`."""

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
    """Everything the decoder computes with, derived from a model once per generate call: the linear layers in
    `dtype` (their inputs are cast to it, their outputs come in it), everything else in fp32.

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
    dtype: torch.dtype = torch.float32  # the linear layers' weights, inputs and outputs (see `extract_weights`)
    head_f32: torch.Tensor | None = None  # [V, D] the fp32 LM head (the model's own tensor), when dtype is not fp32
    _rot: torch.Tensor | None = field(default=None, repr=False)

    def rot(self, n_pos: int) -> torch.Tensor:
        """complex (cos + i sin) [n_pos, hd / 2], cos/sin computed exactly as transformers' rotary embedding."""
        if self._rot is None or self._rot.shape[0] < n_pos:
            pos = torch.arange(max(n_pos, 1024), dtype=torch.float32)
            freqs = pos[:, None] * self.inv_freq[None, :].float()
            self._rot = torch.complex(freqs.cos() * self.rope_scale, freqs.sin() * self.rope_scale)
        return self._rot

    # linear layers: oneDNN with packed weights (fused epilogues) or F.linear, in `dtype`; inputs are cast to it
    def linear(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        """x [N, in] @ w^T + b -> [N, out] in `dtype`"""
        x = x.to(self.dtype)
        if self.onednn:
            return onednn_linear(x, w, b)
        return F.linear(x, w, b)

    def linear_add(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, other: torch.Tensor) -> torch.Tensor:
        """linear(x) + other, in other's dtype (the residual stream stays fp32 under bf16 GEMMs)"""
        if other.dtype != self.dtype:
            return other + self.linear(x, w, b)
        if self.onednn:
            return torch.ops.mkldnn._linear_pointwise.binary(x, other, w, b, "add")
        return F.linear(x, w, b).add_(other)

    def linear_silu(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        """silu(linear(x)) in `dtype`"""
        x = x.to(self.dtype)
        if self.onednn:
            return torch.ops.mkldnn._linear_pointwise(x, w, b, "swish", [], "")
        return F.silu(F.linear(x, w, b), inplace=True)

    def linear_mul(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, other: torch.Tensor) -> torch.Tensor:
        """linear(x) * other in `dtype` (other: the same dtype)"""
        x = x.to(self.dtype)
        if self.onednn:
            return torch.ops.mkldnn._linear_pointwise.binary(x, other, w, b, "mul")
        return F.linear(x, w, b).mul_(other)


def check_supported(model) -> tuple[torch.nn.Module, object]:
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


def linear_dtype(precision: str) -> torch.dtype:
    """The linear layers' dtype for `precision` ("fp32" | "bf16"): bf16 only where the CPU has bf16 dot products
    (AVX512-BF16 or AMX); elsewhere oneDNN emulates bf16, slower than fp32, so fp32."""
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    if precision == "bf16" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()):
        return torch.bfloat16
    return torch.float32


def _interleave_rows(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Reorder the rows of each head from (0..hd/2-1, hd/2..hd-1) pairs to interleaved (0, hd/2, 1, hd/2+1, ...)."""
    half = head_dim // 2
    perm = torch.stack([torch.arange(half), torch.arange(half) + half], dim=1).reshape(-1)
    perm = (torch.arange(n_heads)[:, None] * head_dim + perm[None, :]).reshape(-1)
    return w[perm]


def extract_weights(model, onednn: bool | None = None, pack_rows: int = 64,
                    dtype: torch.dtype = torch.float32) -> Weights:
    """The weights of a Llama-like model (LoRA folded in, in fp32, before any rounding), rearranged as described
    in `Weights`, the linear layers' weights and biases in `dtype` (fp32 or bf16) and packed for oneDNN when
    `onednn` (None: when available). Embeddings and norm weights stay fp32. The model is not modified."""
    base, cfg = check_supported(model)
    use_dnn = onednn_available() if onednn is None else bool(onednn and onednn_available())
    inner = base.model
    n_heads = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    scaling = float(getattr(inner.layers[0].self_attn, "scaling", head_dim ** -0.5))

    def f32(t):
        return None if t is None else t.detach().to(torch.float32)

    def pack(w):
        w = w.detach().to(dtype).contiguous()
        return pack_weight(w, pack_rows) if use_dnn else w

    def bias(t):
        return None if t is None else t.detach().to(dtype)

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
                               f32(bv) if bv is not None else zeros[2]]).to(dtype)
        layers.append(Layer(
            ln1=f32(layer.input_layernorm.weight), ln2=f32(layer.post_attention_layernorm.weight),
            qkv=pack(qkv), qkv_b=qkv_b, o=pack(wo), o_b=bias(bo), gate=pack(wg), gate_b=bias(bg),
            up=pack(wu), up_b=bias(bu), down=pack(wd), down_b=bias(bd)))
    embed, _ = effective_weight(inner.embed_tokens)
    head, head_b = effective_weight(base.lm_head)
    if head_b is not None:
        raise UnsupportedModelError("fast engine: lm_head bias not supported; use the hf engine")
    rot = inner.rotary_emb
    return Weights(
        embed=f32(embed).contiguous(), layers=layers, norm=f32(inner.norm.weight), lm_head=pack(head),
        head_f32=f32(head) if dtype != torch.float32 else None,
        eps=float(getattr(inner.norm, "variance_epsilon", cfg.rms_norm_eps)), n_heads=n_heads, n_kv=n_kv,
        head_dim=head_dim, inv_freq=rot.inv_freq.detach().float().clone(),
        rope_scale=float(getattr(rot, "attention_scaling", 1.0)), onednn=use_dnn, vocab=embed.shape[0],
        dtype=dtype)


# ----------------------------------------------------------------------------------------------------------------
# Decoder


def _rope(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """RoPE on interleaved pairs: x [..., hd] (real) times rot [..., hd / 2] (complex, broadcastable)."""
    shape = x.shape
    xc = torch.view_as_complex(x.reshape(*shape[:-1], shape[-1] // 2, 2))
    return torch.view_as_real(xc * rot).view(shape)


def _norm(w: Weights, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """RMSNorm of the fp32 residual stream x [N, D] (fp32 statistics) -> [N, D] in the linear layers' dtype."""
    return F.rms_norm(x, (x.shape[-1],), weight, w.eps).to(w.dtype)


def _layer_rest(w: Weights, L: Layer, x: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
    """x + o_proj(att), then + down(silu(gate) * up) of its norm: the rest of a decoder layer."""
    x = w.linear_add(att, L.o, L.o_b, x)
    h = _norm(w, x, L.ln2)
    act = w.linear_mul(h, L.up, L.up_b, w.linear_silu(h, L.gate, L.gate_b))
    return w.linear_add(act, L.down, L.down_b, x)


def _logits(w: Weights, x: torch.Tensor) -> torch.Tensor:
    """Final norm and LM head: hidden states x [B, D] -> fp32 logits [B, V].

    Under bf16 the `REFINED` largest logits of each row are recomputed in fp32 from the fp32 norm output and the
    fp32 head rows: a bf16 output rounds logits of ~30 to steps of 0.25, which ties near-equal top tokens (greedy
    picks the lower id) and moves their log-probs; the tail, whose rounding barely moves the softmax, stays."""
    h = F.rms_norm(x, (x.shape[-1],), w.norm, w.eps)  # [B, D] fp32
    z = w.linear(h, w.lm_head).float()  # [B, V]
    if w.head_f32 is not None:
        top = top_indices(z, min(REFINED, z.shape[1]))  # [B, k]
        z.scatter_(1, top, torch.einsum("bd,bkd->bk", h, w.head_f32[top]))
    return z


def top_indices(z: torch.Tensor, k: int, block: int = 256) -> torch.Tensor:
    """Indices [B, k] of the k largest entries of each row of z [B, V], in two cheap stages: the k blocks of
    `block` columns with the largest maxima hold every one of them (a top-k entry's block has a maximum at least
    as large as the k-th largest entry), so topk runs over k * block columns, not V. torch's CPU topk is a slow
    scalar scan, a block amax a vectorised one: ~4x less time on [48, 49152]. Plain topk when V does not split
    into enough blocks."""
    B, V = z.shape
    if V % block or V < 4 * k * block:
        return z.topk(k, dim=-1).indices
    blocks = z.view(B, V // block, block).amax(-1).topk(k, dim=-1).indices  # [B, k]
    cols = (blocks[:, :, None] * block + torch.arange(block)).view(B, k * block)  # [B, k * block]
    return cols.gather(1, z.gather(1, cols).topk(k, dim=-1).indices)


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
        qkv = w.linear(_norm(w, x, L.ln1), L.qkv, L.qkv_b).float().view(B, T, H + 2 * KV, hd)  # fp32 cache
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
        qkv = w.linear(_norm(w, x, L.ln1), L.qkv, L.qkv_b).float().view(B, H + 2 * KV, hd)  # fp32 cache
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
