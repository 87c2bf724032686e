"""oneDNN fp32 linear layers on CPU: the primitives FastEngine uses (packed weights) and `OneDNNLinears`, which
runs training's linear layers through oneDNN with LoRA merged into one weight.

On this machine kind (AVX-512, 2 threads) oneDNN's `_linear_pointwise` runs fp32 GEMMs at 430-500 GFLOP/s with a
plain weight and ~500 with a pre-packed ("reordered") one, against ~210 for the MKL path behind `F.linear`
(benchmarks/README.md). peft's LoRA forward also adds four skinny rank-r GEMMs and two [T, out] element-wise
passes per layer, which on a CPU cost as much as the base GEMM.

`OneDNNLinears(model)` prepares two kinds of layer; `with layers.active():` routes their forward through oneDNN
and restores the original forward on exit:

* a peft LoRA `Linear` (one active adapter, no dropout, no DoRA, fp32 CPU, frozen base): y = x W'^T + b with the
  merged weight W' = W + s B A (one GEMM instead of base + A + B), dx = dy W' (the same plain W', transposed
  view: no second copy), and the adapter gradients dA = s (dy B)^T x and dB = s dy^T (x A^T) in `LoraLinearFn`
  from the saved x and u = x A^T. W' is rebuilt in place when the version counters of W, A or B move (every
  optimizer step): one rank-r GEMM per layer per step, no new allocation;
* a plain frozen `nn.Linear` (the tied LM head, any frozen layer outside an adapter): its own weight, forward
  and backward (no copy, no weight gradient).

Same fp32 arithmetic, different summation order: outputs agree with the peft / `F.linear` path to ~1e-6 relative,
and one input always gives the same output, so old and new log-probs computed under `active()` still give an
importance ratio of exactly 1 on-policy. Memory: one merged copy of each adapted weight (~425 MB for
SmolLM2-135M with all seven projections), held only inside `active()`. Pre-packing would add ~10% GEMM speed
for a second and third copy (W' and W'^T packed: ~1.1 GB in all), which is what pushed the recipe-shape GRPO step
over 4 GB. Anything else (a disabled adapter for the reference pass, bf16, CUDA) runs the original forward.
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


class FrozenLinearFn(torch.autograd.Function):
    """y = x W^T + b for a frozen W: backward dx = dy W only (no dW, no db)."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:  # noqa: D102
        ctx.w = w.detach()
        return onednn_linear(x, ctx.w, bias)

    @staticmethod
    def backward(ctx, grad_y: Tensor):  # noqa: D102
        grad_x = onednn_linear(grad_y.contiguous(), ctx.w.t()) if ctx.needs_input_grad[0] else None
        return grad_x, None, None


class LoraLinearFn(torch.autograd.Function):
    """y = x W'^T + b with W' = W + s B A (frozen W, trainable A [r, in] and B [out, r]), given the merged W':
    backward dx = dy W', dA = s (dy B)^T x, dB = s dy^T (x A^T)."""

    @staticmethod
    def forward(ctx, x: Tensor, lora_a: Tensor, lora_b: Tensor, merged: Tensor, bias: Tensor | None,
                scale: float) -> Tensor:  # noqa: D102
        ctx.merged, ctx.scale = merged, scale
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            x2 = x.reshape(-1, x.shape[-1])  # [M, in]
            u = onednn_linear(x2, lora_a)  # [M, r]
            ctx.save_for_backward(x2, u, lora_b)
        return onednn_linear(x, merged, bias)  # [..., out]

    @staticmethod
    def backward(ctx, grad_y: Tensor):  # noqa: D102
        grad_y = grad_y.contiguous()
        grad_x = onednn_linear(grad_y, ctx.merged.t()) if ctx.needs_input_grad[0] else None  # [..., in]
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
    """The merged weight W' = W + s B A of one peft LoRA Linear, rebuilt in place when W, A or B change."""

    def __init__(self, module: torch.nn.Module, adapter: str):
        self.module, self.adapter = module, adapter
        self.versions: tuple[int, ...] = ()
        self.merged: Tensor | None = None

    def parts(self) -> tuple[Tensor, Tensor, Tensor, float]:
        """(W [out, in], A [r, in], B [out, r], scale) of the adapter."""
        m = self.module
        return (m.base_layer.weight, m.lora_A[self.adapter].weight, m.lora_B[self.adapter].weight,
                float(m.scaling[self.adapter]))

    def refresh(self) -> None:
        """Rebuild W' (into the same storage) when any of W, A, B changed in place since the last build. Safe
        because every graph that saved W' has run its backward before the optimizer changes A or B."""
        w, a, b, scale = self.parts()
        versions = (w._version, a._version, b._version)
        if versions != self.versions:
            with torch.no_grad():
                if self.merged is None:
                    self.merged = torch.empty_like(w)
                torch.addmm(w, b, a, alpha=scale, out=self.merged)  # [out, in]
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
    """A frozen plain nn.Linear routed through `FrozenLinearFn` (nothing to build or release)."""

    def __init__(self, module: torch.nn.Linear):
        self.module = module

    def release(self) -> None:
        """Nothing is held."""

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        """The patched nn.Linear forward: x [..., in] -> [..., out]."""
        if args or kwargs or x.dtype != torch.float32 or x.device.type != "cpu":
            return type(self.module).forward(self.module, x, *args, **kwargs)
        return FrozenLinearFn.apply(x, self.module.weight, self.module.bias)


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
    """A model's LoRA and frozen linear layers run through oneDNN inside `active()` (see the module docstring).
    Empty (a no-op) when disabled, when oneDNN is unavailable or nothing is frozen."""

    def __init__(self, model: torch.nn.Module, enabled: bool = True):
        self.layers: list[_MergedLora | _Frozen] = []
        if not (enabled and onednn_available()):
            return
        inside_lora = set()
        for m in model.modules():
            name = _lora_adapter(m)
            if name is not None:
                self.layers.append(_MergedLora(m, name))
                inside_lora.add(id(m.base_layer))
        seen = set(inside_lora)
        for m in model.modules():
            if id(m) not in seen and _frozen_plain(m):
                seen.add(id(m))
                self.layers.append(_Frozen(m))

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
