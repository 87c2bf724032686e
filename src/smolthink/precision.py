"""The numerics training forwards run under (`precision: auto | fp32 | bf16`), chosen by the device they run on:

* CPU: `onednn.OneDNNLinears`, the linear layers through oneDNN (fp32, or bf16 GEMMs with fp32 accumulation);
  bf16 needs the oneDNN LoRA layers (onednn_linears, use_lora) and a CPU with native bf16 dot products;
* CUDA: `Autocast`, the forward under `torch.autocast("cuda", dtype=torch.bfloat16)` for bf16 (nothing for fp32).
  The parameters stay fp32 (master weights: LoRA A and B, or every weight under full fine-tuning, with fp32
  gradients and AdamW moments); autocast runs the matmuls (linear layers, attention) on bf16 casts of them and
  keeps reductions, norms and softmax in fp32; `logprobs` casts the head's logits to fp32 before the log-softmax,
  so log-probs and the loss are fp32. onednn_linears does not apply on CUDA.

`auto` (the default) is bf16 wherever it runs natively (a CPU with avx512_bf16 training LoRA through the oneDNN
layers, a GPU with bf16) and fp32 elsewhere: it trains faster at the same held-out accuracy (measured in
benchmarks/README.md).

Both are used the same way, `with numerics.active():` around every training-numerics forward and the backward it
records (the trainer's log-probs, the old and reference log-probs), so old and new log-probs share numerics and
the importance ratio is exactly 1 on-policy. Rollouts and evals run outside it, in the model's own fp32.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import torch

from .errors import SmolthinkError
from .onednn import OneDNNLinears, bf16_available

log = logging.getLogger(__name__)


def training_device() -> str:
    """"cuda" when a GPU is visible, else "cpu": where `harness.build_context` places training."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def precision_problem(precision: str, onednn_linears: bool, use_lora: bool, device_type: str) -> str | None:
    """Why the config's `precision` cannot run on `device_type` ("cpu" | "cuda"), as one line; None when it can.
    Only CPU bf16 has conditions: it is the oneDNN LoRA layers in bf16."""
    if precision == "bf16" and device_type != "cuda" and not (onednn_linears and use_lora):
        return "precision=bf16 needs onednn_linears=true and use_lora=true (it runs the oneDNN LoRA layers in bf16)"
    return None


def resolve_precision(precision: str, onednn_linears: bool, use_lora: bool, device_type: str) -> str:
    """The precision a run trains in: "auto" -> "bf16" where it is native (CUDA with bf16; a CPU with native bf16
    dot products training LoRA through the oneDNN layers), else "fp32"; "fp32" and "bf16" as given."""
    if precision != "auto":
        return precision
    if device_type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp32"
    native = precision_problem("bf16", onednn_linears, use_lora, device_type) is None and bf16_available()
    return "bf16" if native else "fp32"


class Autocast:
    """bf16 autocast on `device_type` inside `active()` when `enabled` (see the module docstring); a no-op when
    not. Holds no weights: autocast casts them per op and drops the casts when the outermost `active()` exits,
    which is before every optimizer step."""

    def __init__(self, device_type: str, enabled: bool):
        self.device_type, self.enabled = device_type, enabled

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Within the block, forwards (and their backward) run under autocast in bf16."""
        with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.enabled):
            yield


def training_numerics(model: torch.nn.Module, device: torch.device, onednn_linears: bool, precision: str,
                      use_lora: bool) -> OneDNNLinears | Autocast:
    """The numerics of `model`'s training forwards on `device`: autocast on CUDA (bf16 refused on a GPU without
    bf16 support, where it would be emulated), the oneDNN layers elsewhere (exactly the CPU path); "auto" is
    resolved first (`resolve_precision`) and the choice logged."""
    if precision == "auto":
        precision = resolve_precision(precision, onednn_linears, use_lora, device.type)
        log.info("training precision: %s (auto)", precision)
    if device.type == "cuda":
        if precision == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False):
            raise SmolthinkError("precision=bf16 needs a GPU with bf16 support (Ampere or newer); use precision=fp32")
        return Autocast("cuda", precision == "bf16")
    return OneDNNLinears(model, onednn_linears, precision)
