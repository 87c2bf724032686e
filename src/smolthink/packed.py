"""oneDNN packed fp32 linear layers for CPU training of LoRA adapters (and anything else over frozen weights).

On this machine kind (AVX-512, 2 threads) oneDNN's `_linear_pointwise` with a pre-packed ("reordered") weight runs
fp32 GEMMs 2-2.5x faster than the MKL path behind `F.linear` (benchmarks/README.md), and peft's LoRA forward adds
four skinny rank-r GEMMs and two [T, out] element-wise passes per layer that cost as much as the base GEMM on a CPU.

`PackedLinears(model)` prepares two kinds of layer; `with packs.active():` routes their forward through them and
restores the original forward on exit:

* a peft LoRA `Linear` (one active adapter, no dropout, no DoRA, fp32 CPU, frozen base): the merged weight
  W' = W + s B A, packed for the forward (y = x W'^T + b: one GEMM instead of base + A + B) and transposed for the
  backward (dx = dy W'); the adapter gradients dB = s dy^T (x A^T) and dA = s (dy B)^T x are computed in
  `LoraLinearFn` from the saved x and u = x A^T. W' and its packs are rebuilt when W, A or B change (their version
  counters move: every optimizer step), which costs one rank-r GEMM and two copies of W per layer per step;
* a plain frozen `nn.Linear` (the tied LM head; any frozen layer outside an adapter): W packed for the forward and
  W^T for the backward (no weight gradient is needed).

Same fp32 arithmetic, different summation order: outputs agree with the peft / `F.linear` path to ~1e-6 relative,
and one input always gives the same output, so old and new log-probs computed under `active()` still give an
importance ratio of exactly 1 on-policy. Memory: two packed copies of every prepared weight (about 1.1 GB for
SmolLM2-135M), held only inside `active()`. Anything else (a disabled adapter for the reference pass, bf16, CUDA)
runs the original forward.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

_ONEDNN: bool | None = None


def onednn_available() -> bool:
    """True when oneDNN's packed linear works here and agrees with F.linear (checked once per process; the
    environment variable SMOLTHINK_NO_ONEDNN (or the older SMOLTHINK_FAST_NO_ONEDNN) turns it off)."""
    global _ONEDNN
    if _ONEDNN is None:
        _ONEDNN = False
        if os.environ.get("SMOLTHINK_NO_ONEDNN") or os.environ.get("SMOLTHINK_FAST_NO_ONEDNN"):
            return False
        if not torch.backends.mkldnn.is_available():
            return False
        try:
            g = torch.Generator().manual_seed(0)
            w, x = torch.randn(24, 16, generator=g), torch.randn(5, 16, generator=g)
            y = packed_linear(x, pack_weight(w, 8))
            _ONEDNN = bool(torch.allclose(y, F.linear(x, w), atol=1e-5, rtol=1e-5))
        except Exception:  # noqa: BLE001 - any failure means "not available"
            _ONEDNN = False
    return _ONEDNN


def pack_weight(w: Tensor, rows_hint: int) -> Tensor:
    """A [out, in] fp32 weight reordered into oneDNN's blocked layout for inputs of about `rows_hint` rows."""
    return torch.ops.mkldnn._reorder_linear_weight(w.detach().contiguous(), rows_hint)


def packed_linear(x: Tensor, w_packed: Tensor, bias: Tensor | None = None) -> Tensor:
    """x [..., in] @ W^T (+ bias) with a packed weight -> [..., out] (no autograd: see `PackedLinearFn`)."""
    return torch.ops.mkldnn._linear_pointwise(x, w_packed, bias, "none", [], "")


class PackedLinearFn(torch.autograd.Function):
    """y = x W^T + b for a frozen W: forward with packed W, backward dx = dy W with packed W^T (no dW, no db)."""

    @staticmethod
    def forward(ctx, x: Tensor, w_packed: Tensor, wt_packed: Tensor, bias: Tensor | None) -> Tensor:  # noqa: D102
        ctx.wt_packed = wt_packed
        return packed_linear(x, w_packed, bias)

    @staticmethod
    def backward(ctx, grad_y: Tensor):  # noqa: D102
        grad_x = packed_linear(grad_y.contiguous(), ctx.wt_packed) if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None


class _FrozenPacks:
    """The packed W and W^T of one frozen nn.Linear, re-packed when the weight's version counter moves."""

    def __init__(self, module: torch.nn.Linear, rows_hint: int):
        self.module, self.rows_hint, self.version = module, rows_hint, -1
        self.w = self.wt = None

    def refresh(self) -> None:
        """Re-pack when the weight changed in place since the last pack."""
        w = self.module.weight
        if w._version != self.version:
            self.w = pack_weight(w, self.rows_hint)  # [out, in] packed
            self.wt = pack_weight(w.detach().t(), self.rows_hint)  # [in, out] packed
            self.version = w._version

    def release(self) -> None:
        """Drop the packs (rebuilt on the next use)."""
        self.w = self.wt = None
        self.version = -1

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        """The patched nn.Linear forward: x [..., in] -> [..., out]."""
        if args or kwargs or x.dtype != torch.float32 or x.device.type != "cpu":
            return type(self.module).forward(self.module, x, *args, **kwargs)
        self.refresh()
        return PackedLinearFn.apply(x, self.w, self.wt, self.module.bias)


class LoraLinearFn(torch.autograd.Function):
    """y = x (W + s B A)^T + b with a frozen W and trainable A [r, in], B [out, r]: one packed GEMM forward with the
    merged weight, backward dx = dy W' (packed W'^T), dA = s (dy B)^T x, dB = s dy^T (x A^T)."""

    @staticmethod
    def forward(ctx, x: Tensor, lora_a: Tensor, lora_b: Tensor, wm_packed: Tensor, wmt_packed: Tensor,
                bias: Tensor | None, scale: float) -> Tensor:  # noqa: D102
        ctx.wmt_packed, ctx.scale = wmt_packed, scale
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            x2 = x.reshape(-1, x.shape[-1])  # [M, in]
            u = x2 @ lora_a.t()  # [M, r]
            ctx.save_for_backward(x2, u, lora_b)
        return packed_linear(x, wm_packed, bias)  # [..., out]

    @staticmethod
    def backward(ctx, grad_y: Tensor):  # noqa: D102
        grad_y = grad_y.contiguous()
        grad_x = packed_linear(grad_y, ctx.wmt_packed) if ctx.needs_input_grad[0] else None  # [..., in]
        grad_a = grad_b = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            x2, u, lora_b = ctx.saved_tensors
            g2 = grad_y.reshape(-1, grad_y.shape[-1])  # [M, out]
            if ctx.needs_input_grad[1]:
                grad_a = (g2 @ lora_b).t() @ x2 * ctx.scale  # [r, M] @ [M, in] -> [r, in]
            if ctx.needs_input_grad[2]:
                grad_b = g2.t() @ u * ctx.scale  # [out, M] @ [M, r] -> [out, r]
        return grad_x, grad_a, grad_b, None, None, None, None


class _LoraPacks:
    """The packed merged weight W' = W + s B A (and W'^T) of one peft LoRA Linear, rebuilt when W, A or B change."""

    def __init__(self, module: torch.nn.Module, adapter: str, rows_hint: int):
        self.module, self.adapter, self.rows_hint = module, adapter, rows_hint
        self.versions: tuple[int, ...] = ()
        self.wm = self.wmt = None

    def parts(self) -> tuple[Tensor, Tensor, Tensor, float]:
        """(W [out, in], A [r, in], B [out, r], scale) of the adapter."""
        m = self.module
        return (m.base_layer.weight, m.lora_A[self.adapter].weight, m.lora_B[self.adapter].weight,
                float(m.scaling[self.adapter]))

    def refresh(self) -> None:
        """Rebuild the merged packs when any of W, A, B changed in place since the last build."""
        w, a, b, scale = self.parts()
        versions = (w._version, a._version, b._version)
        if versions != self.versions:
            with torch.no_grad():
                merged = torch.addmm(w, b, a, alpha=scale)  # [out, in]
            self.wm = pack_weight(merged, self.rows_hint)
            self.wmt = pack_weight(merged.t(), self.rows_hint)
            self.versions = versions

    def release(self) -> None:
        """Drop the packs (rebuilt on the next use)."""
        self.wm = self.wmt = None
        self.versions = ()

    def usable(self, x: Tensor, args: tuple, kwargs: dict) -> bool:
        """The fused path applies: plain call, adapter on and unmerged, the same single adapter, fp32 CPU input."""
        m = self.module
        return (not args and not kwargs and not m.disable_adapters and not m.merged
                and list(m.active_adapters) == [self.adapter] and x.dtype == torch.float32
                and x.device.type == "cpu")

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        """The patched LoRA forward: x [..., in] -> [..., out]."""
        if not self.usable(x, args, kwargs):
            return type(self.module).forward(self.module, x, *args, **kwargs)
        self.refresh()
        _, a, b, scale = self.parts()
        return LoraLinearFn.apply(x, a, b, self.wm, self.wmt, self.module.base_layer.bias, scale)


def _lora_adapter(m: torch.nn.Module) -> str | None:
    """The adapter name when `m` is a peft LoRA Linear the fused path supports, else None."""
    try:
        from peft.tuners.lora import Linear as LoraLinear
    except ImportError:  # pragma: no cover - peft is a dependency
        return None
    if type(m) is not LoraLinear or type(m.base_layer) is not torch.nn.Linear:
        return None
    names = list(m.active_adapters)
    if len(names) != 1 or names[0] not in m.lora_A or names[0] in getattr(m, "lora_variant", {}):
        return None
    name = names[0]
    if getattr(m, "use_dora", {}).get(name) or type(m.lora_dropout[name]) is not torch.nn.Identity:
        return None
    base = m.base_layer
    frozen = not base.weight.requires_grad and (base.bias is None or not base.bias.requires_grad)
    tensors = [base.weight, m.lora_A[name].weight, m.lora_B[name].weight]
    if not frozen or m.lora_A[name].bias is not None or m.lora_B[name].bias is not None:
        return None
    return name if all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors) else None


def _frozen_plain(m: torch.nn.Module) -> bool:
    """A plain fp32 CPU nn.Linear whose weight and bias take no gradient."""
    if type(m) is not torch.nn.Linear:
        return False
    params = [m.weight] + ([m.bias] if m.bias is not None else [])
    return not any(p.requires_grad for p in params) and all(p.dtype == torch.float32 and p.device.type == "cpu"
                                                              for p in params)


class PackedLinears:
    """Packed copies of a model's frozen linear layers, built once (see the module docstring); `active()` patches
    them in for a block. Empty (a no-op) when disabled, when oneDNN is unavailable or nothing is frozen."""

    def __init__(self, model: torch.nn.Module, enabled: bool = True, rows_hint: int = 512):
        self.packs: list[_FrozenPacks | _LoraPacks] = []
        if not (enabled and onednn_available()):
            return
        inside_lora = set()
        for m in model.modules():
            name = _lora_adapter(m)
            if name is not None:
                self.packs.append(_LoraPacks(m, name, rows_hint))
                inside_lora.add(id(m.base_layer))
        seen = set(inside_lora)
        for m in model.modules():
            if id(m) not in seen and _frozen_plain(m):
                seen.add(id(m))
                self.packs.append(_FrozenPacks(m, rows_hint))

    @property
    def lora_layers(self) -> int:
        """How many LoRA layers run fused."""
        return sum(isinstance(p, _LoraPacks) for p in self.packs)

    def __len__(self) -> int:
        return len(self.packs)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Within the block the prepared layers run through their packed weights; on exit the original forwards
        are restored and the packs dropped. Nothing is lost: a LoRA layer's merged weight changes with every
        optimizer step anyway, and re-packing a frozen layer costs milliseconds; rollouts and evals between
        training phases get the memory back."""
        for p in self.packs:
            p.module.forward = p.forward  # instance attribute shadows nn.Linear.forward
        try:
            yield
        finally:
            for p in self.packs:
                p.module.__dict__.pop("forward", None)
                p.release()
