"""oneDNN linear layers on CPU: the fp32 primitives FastEngine uses (packed weights) and `OneDNNLinears`, which
runs training's linear layers through oneDNN with LoRA merged into one weight, in fp32 or bf16.

Why: on AVX-512 CPUs oneDNN's `_linear_pointwise` runs these GEMMs about twice as fast as the MKL path behind
`F.linear`, and bf16 (native with avx512_bf16) about twice fp32 again. peft's LoRA forward also adds four skinny
rank-r GEMMs and two [T, out] element-wise passes per layer, which on a CPU cost as much as the base GEMM. The
measured figures are in benchmarks/README.md ("Numbers behind the training layers").

`OneDNNLinears(model, precision=...)` prepares two kinds of layer; `with layers.active():` routes their forward
through oneDNN and restores the original forward on exit:

* a peft LoRA `Linear` (one active adapter, no dropout, no DoRA, fp32 CPU, frozen base): y = x W'^T + b with the
  merged weight W' = W + s B A (one GEMM instead of base + A + B), dx = dy W' (the same plain W', transposed
  view: no second copy), and the adapter gradients dA = s (dy B)^T x and dB = s dy^T (x A^T) in `LoraLinearFn`
  from the saved x and u = x A^T. W' is rebuilt in place when the version counters of W, A or B move (every
  optimizer step): one rank-r GEMM per layer per step (in fp32 into the same storage);
* a plain frozen `nn.Linear` (the tied LM head, any frozen layer outside an adapter): forward and backward
  (no weight gradient) on its own weight in fp32, on a bf16 copy of it in bf16.

fp32: the same arithmetic as peft / `F.linear` in another summation order (outputs agree to ~1e-6 relative).
bf16: the big GEMMs (x W'^T, dy W', the head's forward and dx) take bf16 weights and the fp32 activations cast to
bf16 at the GEMM; oneDNN accumulates in fp32 and its output (the logits too) is rounded to bf16 and cast back to
fp32, so every tensor between layers, RMSNorm, attention, the logits' log-softmax and the loss stay fp32, as do A,
B and their optimizer state. The cost is rounding inputs and output to 8 significant bits, about 2^-8 relative per
GEMM (tests/test_onednn_bf16.py derives the gradient tolerance from it). A bf16 W' is summed in fp32 and rounded
once. The rank-r adapter GEMMs stay fp32: they are a small share of the work and carry the gradient of the trained
weights. Activations stay fp32 because HF's RMSNorm upcasts inside and attention accumulates in fp32 anyway (bf16
end to end moved the casts without saving time, and a bf16 residual stream adds error). Plain, not pre-packed,
weights in both precisions: packing needs a second copy for W'^T and buys a few percent of GEMM time.

In both precisions one input always gives the same output, so old and new log-probs computed under `active()`
give an importance ratio of exactly 1 on-policy. Memory: one merged copy of each adapted weight in the chosen
precision (bf16 halves it) plus, in bf16, a copy of the head, held only inside `active()`. Anything else (a
disabled adapter for the reference pass, a model already in bf16, CUDA) runs the original forward.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import SmolthinkError

_ONEDNN: bool | None = None


def onednn_available() -> bool:
    """True when oneDNN's linear works here and agrees with F.linear (checked once per process; the environment
    variable SMOLTHINK_NO_ONEDNN (or the older SMOLTHINK_FAST_NO_ONEDNN) turns it off)."""
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
            ok = [torch.allclose(onednn_linear(x, ww), F.linear(x, w), atol=1e-5, rtol=1e-5)
                  for ww in (w, pack_weight(w, 8))]
            _ONEDNN = all(ok)
        except Exception:  # noqa: BLE001 - any failure means "not available"
            _ONEDNN = False
    return _ONEDNN


def pack_weight(w: Tensor, rows_hint: int) -> Tensor:
    """A [out, in] fp32 weight reordered into oneDNN's blocked layout for inputs of about `rows_hint` rows."""
    return torch.ops.mkldnn._reorder_linear_weight(w.detach().contiguous(), rows_hint)


def onednn_linear(x: Tensor, w: Tensor, bias: Tensor | None = None) -> Tensor:
    """x [..., in] @ W^T (+ bias) -> [..., out] through oneDNN; W is a plain [out, in] tensor (any strides, e.g.
    a transposed view) or one from `pack_weight`. No autograd: see `FrozenLinearFn` and `LoraLinearFn`."""
    return torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")


def bf16_runs() -> bool:
    """True when oneDNN can run bf16 GEMMs here at all: natively, or emulated by conversions on AVX-512 CPUs
    without avx512_bf16. AVX2-only CPUs cannot (oneDNN has no bf16 primitive for them)."""
    return onednn_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def bf16_available() -> bool:
    """True when oneDNN runs bf16 GEMMs on native bf16 dot products here (avx512_bf16: other CPUs emulate them
    by conversions, which would spend the speed bf16 is for)."""
    return torch.cpu._is_avx512_bf16_supported() and bf16_runs()


def _gemm(x: Tensor, w: Tensor, bias: Tensor | None = None) -> Tensor:
    """x [..., in] @ W^T (+ bias) in W's dtype, returned in x's dtype: a bf16 W casts x at the GEMM and the
    output back (oneDNN accumulates in fp32 either way), an fp32 W is the plain `onednn_linear` call."""
    if x.dtype == w.dtype:
        return onednn_linear(x, w, bias)
    b = bias.to(w.dtype) if bias is not None else None
    return onednn_linear(x.to(w.dtype), w, b).to(x.dtype)


class FrozenLinearFn(torch.autograd.Function):
    """y = x W^T + b for a frozen W: backward dx = dy W only (no dW, no db)."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:  # noqa: D102
        ctx.w = w.detach()
        return _gemm(x, ctx.w, bias)

    @staticmethod
    def backward(ctx, grad_y: Tensor):  # noqa: D102
        grad_x = _gemm(grad_y.contiguous(), ctx.w.t()) if ctx.needs_input_grad[0] else None
        return grad_x, None, None


class LoraLinearFn(torch.autograd.Function):
    """y = x W'^T + b with W' = W + s B A (frozen W, trainable A [r, in] and B [out, r]), given the merged W':
    backward dx = dy W', dA = s (dy B)^T x, dB = s dy^T (x A^T). The two big GEMMs run in W''s dtype (fp32 or
    bf16); the rank-r adapter GEMMs always in fp32 from the fp32 x and dy."""

    @staticmethod
    def forward(ctx, x: Tensor, lora_a: Tensor, lora_b: Tensor, merged: Tensor, bias: Tensor | None,
                scale: float) -> Tensor:  # noqa: D102
        ctx.merged, ctx.scale = merged, scale
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            x2 = x.reshape(-1, x.shape[-1])  # [M, in]
            u = onednn_linear(x2, lora_a)  # [M, r]
            ctx.save_for_backward(x2, u, lora_b)
        return _gemm(x, merged, bias)  # [..., out]

    @staticmethod
    def backward(ctx, grad_y: Tensor):  # noqa: D102
        grad_y = grad_y.contiguous()
        grad_x = _gemm(grad_y, ctx.merged.t()) if ctx.needs_input_grad[0] else None  # [..., in]
        grad_a = grad_b = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            x2, u, lora_b = ctx.saved_tensors
            g2 = grad_y.reshape(-1, grad_y.shape[-1])  # [M, out]
            if ctx.needs_input_grad[1]:
                gb = onednn_linear(g2, lora_b.t()) * ctx.scale  # s dy B: [M, r]
                grad_a = onednn_linear(gb.t(), x2.t())  # [r, M] @ [M, in] -> [r, in]
            if ctx.needs_input_grad[2]:
                grad_b = g2.t() @ u * ctx.scale  # [out, M] @ [M, r] -> [out, r] (MKL is faster on this one)
        return grad_x, grad_a, grad_b, None, None, None


class _MergedLora:
    """The merged weight W' = W + s B A of one peft LoRA Linear in `dtype`, rebuilt in place when W, A or B
    change."""

    def __init__(self, module: torch.nn.Module, adapter: str, dtype: torch.dtype):
        self.module, self.adapter, self.dtype = module, adapter, dtype
        self.versions: tuple[int, ...] = ()
        self.merged: Tensor | None = None

    def parts(self) -> tuple[Tensor, Tensor, Tensor, float]:
        """(W [out, in], A [r, in], B [out, r], scale) of the adapter."""
        m = self.module
        return (m.base_layer.weight, m.lora_A[self.adapter].weight, m.lora_B[self.adapter].weight,
                float(m.scaling[self.adapter]))

    def refresh(self) -> None:
        """Rebuild W' (into the same storage) when any of W, A, B changed in place since the last build. Safe
        because every graph that saved W' has run its backward before the optimizer changes A or B. A bf16 W'
        is summed in fp32 and rounded once, so B A is not lost under W's rounding."""
        w, a, b, scale = self.parts()
        versions = (w._version, a._version, b._version)
        if versions != self.versions:
            with torch.no_grad():
                if self.merged is None:
                    self.merged = torch.empty_like(w, dtype=self.dtype)
                if self.dtype == w.dtype:
                    torch.addmm(w, b, a, alpha=scale, out=self.merged)  # [out, in]
                else:
                    self.merged.copy_(torch.addmm(w, b, a, alpha=scale))  # fp32 [out, in] -> bf16
            self.versions = versions

    def release(self) -> None:
        """Drop W' (rebuilt on the next use)."""
        self.merged = None
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
        return LoraLinearFn.apply(x, a, b, self.merged, self.module.base_layer.bias, scale)


class _Frozen:
    """A frozen plain nn.Linear routed through `FrozenLinearFn`, its weight used as it is (fp32) or as a `dtype`
    copy built on first use and dropped by `release`."""

    def __init__(self, module: torch.nn.Linear, dtype: torch.dtype):
        self.module, self.dtype = module, dtype
        self.weight: Tensor | None = None

    def release(self) -> None:
        """Drop the cast copy."""
        self.weight = None

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        """The patched nn.Linear forward: x [..., in] -> [..., out]."""
        if args or kwargs or x.dtype != torch.float32 or x.device.type != "cpu":
            return type(self.module).forward(self.module, x, *args, **kwargs)
        w = self.module.weight
        if self.dtype != w.dtype:
            if self.weight is None:  # frozen: no version to follow
                self.weight = w.detach().to(self.dtype)
            w = self.weight
        return FrozenLinearFn.apply(x, w, self.module.bias)


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


class OneDNNLinears:
    """A model's LoRA and frozen linear layers run through oneDNN inside `active()` (see the module docstring),
    their big GEMMs in `precision` ("fp32" or "bf16"). Empty (a no-op) when disabled, when oneDNN is unavailable
    or nothing is frozen; bf16 on a CPU without native bf16 GEMMs is refused (it would run fp32 silently)."""

    def __init__(self, model: torch.nn.Module, enabled: bool = True, precision: str = "fp32"):
        self.layers: list[_MergedLora | _Frozen] = []
        if enabled and precision == "bf16" and not bf16_available():
            raise SmolthinkError("precision=bf16 needs oneDNN and a CPU with native bf16 dot products "
                                 "(avx512_bf16); use precision=fp32 here")
        if not (enabled and onednn_available()):
            return
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
        inside_lora = set()
        for m in model.modules():
            name = _lora_adapter(m)
            if name is not None:
                self.layers.append(_MergedLora(m, name, dtype))
                inside_lora.add(id(m.base_layer))
        seen = set(inside_lora)
        for m in model.modules():
            if id(m) not in seen and _frozen_plain(m):
                seen.add(id(m))
                self.layers.append(_Frozen(m, dtype))

    @property
    def lora_layers(self) -> int:
        """How many LoRA layers run fused."""
        return sum(isinstance(p, _MergedLora) for p in self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Within the block the prepared layers run through oneDNN; on exit the original forwards are restored
        and the merged weights dropped (they change with every optimizer step anyway), so rollouts and evals
        between training phases get the memory back."""
        for p in self.layers:
            p.module.forward = p.forward  # instance attribute shadows the class's forward
        try:
            yield
        finally:
            for p in self.layers:
                p.module.__dict__.pop("forward", None)
                p.release()
