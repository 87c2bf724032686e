"""Process set-up shared by every command: threads, heap, policy + tokenizer, prompts, optimizer."""
from __future__ import annotations

import functools
import logging
from typing import Sequence

import torch

from .chat import build_messages, render_prompt
from .cpuload import PROCESS_CLOCK, allowed_cpus, choose_threads
from .types import Example

log = logging.getLogger(__name__)

_auto = False  # threads chosen automatically (`threads: 0`): `between_phases` re-checks them


def set_threads(n: int = 0) -> int:
    """Use n torch threads, fixed; n = 0: automatic, as many as the cores other processes leave free
    (`cpuload.choose_threads` on the load since the previous check), re-checked by `between_phases`. Logs the
    choice and pins glibc's mmap threshold. Returns the number set."""
    global _auto
    cores = len(allowed_cpus())
    _auto = n <= 0
    if n > 0:
        log.info("torch threads: %d (fixed; %d cores)", n, cores)
    else:
        load = PROCESS_CLOCK.other_load(wait=True)
        n = choose_threads(cores, load)
        log.info("torch threads: %d (auto: %d cores, other processes busy on %s of them)", n, cores,
                 "?" if load is None else f"{load:.1f}")
    torch.set_num_threads(n)
    fixed_mmap_threshold()
    return n


def between_phases() -> None:
    """Between two phases (a rollout, an optimizer step, an eval, a pipeline stage): hand the heap's free pages
    back (`trim_heap`) and, with automatic threads, re-check the load over the phase that just ended and change
    the thread count when the cores other processes use changed (logged)."""
    trim_heap()
    if not _auto:
        return
    load = PROCESS_CLOCK.other_load()
    n = choose_threads(len(PROCESS_CLOCK.cpus), load)
    if load is not None and n != torch.get_num_threads():
        log.info("torch threads %d -> %d: other processes kept %.1f of %d cores busy", torch.get_num_threads(), n,
                 load, len(PROCESS_CLOCK.cpus))
        torch.set_num_threads(n)


def fixed_mmap_threshold(nbytes: int = 32 << 20) -> bool:
    """Pin glibc's mmap threshold at nbytes (default 32 MB, the top of glibc's own adaptive range) from the start.

    glibc starts at 128 KB and raises the threshold each time an mmapped block is freed, so where a multi-MB block
    lives (its own mapping, returned on free; or the heap, reused without page faults) changes as a run goes on.
    Pinned, blocks under 32 MB (activations, merged weights) are reused from the heap and the [rows, vocab] logits
    blocks above it go back to the OS at once; `trim_heap` returns the heap's free pages between phases. A low
    threshold costs training speed (a page fault per 4 KB page of every re-mapped activation); the measurements
    behind 32 MB are in benchmarks/README.md. Returns False where there is no glibc (macOS, musl)."""
    libc = _glibc()
    return bool(libc.mallopt(-3, int(nbytes))) if libc else False  # M_MMAP_THRESHOLD = -3


def trim_heap() -> bool:
    """Hand the heap's free pages back to the OS (glibc `malloc_trim`), between phases whose allocations differ
    (rollout KV caches, training activations): without it the freed holes stay resident and the resident floor
    creeps up step after step (benchmarks/README.md). Cheap next to a phase. False where there is no glibc."""
    libc = _glibc()
    return bool(libc.malloc_trim(0)) if libc else False


@functools.lru_cache(maxsize=1)
def _glibc():
    """glibc through ctypes (loaded once), or None where there is none (macOS, musl: no mallopt / malloc_trim)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def render_prompts(tokenizer, examples: Sequence[Example], few_shot: Sequence[tuple[str, str]] = ()) -> list[list[int]]:
    """Chat-templated prompt ids for each example."""
    return [render_prompt(tokenizer, build_messages(ex.question, few_shot=few_shot)) for ex in examples]


def load_policy(cfg):
    """Model + tokenizer for training: LoRA attached (or all weights trainable), gradient checkpointing if set."""
    from .models import attach_lora, load_model

    model, tok = load_model(cfg.model)
    if cfg.use_lora:
        model = attach_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules)
    else:
        model.requires_grad_(True)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads() if cfg.use_lora else None
        model.config.use_cache = False
    model.train()
    return model, tok


def make_optimizer(model, cfg):
    """AdamW over the trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                             weight_decay=cfg.weight_decay)


def make_scheduler(optimizer, kind: str, warmup_steps: int, total_steps: int):
    """Linear warm-up, then constant / linear decay / cosine decay to 0 over total_steps."""
    import math

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 1.0 - progress if kind == "linear" else 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
