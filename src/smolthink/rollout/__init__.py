"""Rollout engines behind one interface (`base.Engine`): `hf` (baseline, any model), `fast` (Llama-family CPU
engine: the batching loop in `fast`, the decoder and its weights in `llama`, token sampling in `sampling`) and
`paged` (transformers' continuous batching, for GPUs).
`make_engine` is the package API; import an engine class from its module."""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def make_engine(name: str, model, eos_ids, pad_id: int, precision: str = "bf16"):
    """Engine by name: "hf", "fast", "paged", or "auto" (fast when the architecture is supported and the model is
    on CPU, else hf: on a GPU paged has not beaten HF generate, benchmarks/README.md); `precision` ("bf16" |
    "fp32") is the fast engine's linear-layer precision (HF generate and continuous batching run the model as it
    is)."""
    from .hf import HFEngine

    if name == "paged":
        from .paged import PagedEngine

        return PagedEngine(eos_ids, pad_id)
    on_cpu = next(model.parameters()).device.type == "cpu"
    if name == "hf" or (name == "auto" and not on_cpu):  # the fast engine is a CPU engine
        return HFEngine(eos_ids, pad_id)
    try:
        from .fast import FastEngine

        engine = FastEngine(eos_ids, pad_id, precision=precision)
        if not engine.supports(model):
            raise ValueError(f"unsupported architecture {type(model).__name__}")
        return engine
    except (ImportError, ValueError) as e:
        if name == "fast":
            raise
        log.info("fast engine unavailable (%s): using HF generate", e)
        return HFEngine(eos_ids, pad_id)
