"""Settings that the native libraries under torch read once, when they load or first run, so they are set as
environment variables by the entry points (`cli.main`, `python -m smolthink.bench`) before anything imports torch.

* LRU_CACHE_CAPACITY (ideep, torch's oneDNN layer) and ONEDNN_PRIMITIVE_CACHE_CAPACITY (oneDNN) = 256 instead of
  1024: both keep objects per GEMM shape, ~10 MB per new forward + backward chunk shape in all, and training's
  chunk shapes, the engine's decode batch sizes and prefill shapes are new all the time, so at 1024 the resident
  floor rose ~10 MB per step for hundreds of steps. 256 holds the primitives of several chunk shapes (~40 each,
  a forward + backward) and bounds the caches at ~0.1 GB; SFT steps run at the same speed with either.

The OpenMP wait policy is left to libgomp (spin a few ms at a barrier, then sleep): on a quiet machine the
passive policy (sleep at once) cost 42% of rollout and 10-20% of training throughput, and on a busy one the
automatic thread count (`cpuload`, `runtime.set_threads`) already drops to one thread, which has no barrier to
spin at (benchmarks/README.md, `bench --contention`). A user's OMP_WAIT_POLICY or GOMP_SPINCOUNT is respected.
"""
from __future__ import annotations

import os

CACHE_CAPACITY = 256
NAMES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "LRU_CACHE_CAPACITY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY")


def native_env() -> dict[str, str]:
    """Set the cache capacities above unless the user set them; call it before torch is imported: later changes
    do nothing -> the native settings in effect (unset ones left out)."""
    for name in ("LRU_CACHE_CAPACITY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY"):
        os.environ.setdefault(name, str(CACHE_CAPACITY))
    return {k: os.environ[k] for k in NAMES if k in os.environ}
