"""Settings that the native libraries under torch read once, when they load or first run, so they are set as
environment variables by the entry points (`cli.main`, `python -m smolthink.bench`) before anything imports torch.

* OMP_WAIT_POLICY=PASSIVE (libgomp, torch's OpenMP): a thread that waits at a barrier sleeps at once instead of
  spinning (libgomp's default spins ~300k iterations, a few ms, first), so it does not burn the time slices that
  the team member it waits for, or another process, needs. On a loaded machine, 2 threads that spin ran rollouts
  at 1-7% of the speed 2 passive threads kept (benchmarks/README.md, `bench --contention`). KMP_BLOCKTIME, the
  same knob for Intel's OpenMP, does not apply: torch's CPU wheels ship libgomp.
* LRU_CACHE_CAPACITY (ideep, torch's oneDNN layer) and ONEDNN_PRIMITIVE_CACHE_CAPACITY (oneDNN) = 256 instead of
  1024: both keep objects per GEMM shape, ~10 MB per new forward + backward chunk shape in all, and training's
  chunk shapes, the engine's decode batch sizes and prefill shapes are new all the time, so at 1024 the resident
  floor rose ~10 MB per step for hundreds of steps. 256 holds the primitives of several chunk shapes (~40 each,
  a forward + backward) and bounds the caches at ~0.1 GB.
"""
from __future__ import annotations

import os

WAIT_POLICY = "PASSIVE"
CACHE_CAPACITY = 256


def native_env() -> dict[str, str]:
    """Set the variables above unless the user set them (a wait policy counts as set when OMP_WAIT_POLICY or
    GOMP_SPINCOUNT is there); call it before torch is imported: later changes do nothing -> the values in effect
    (unset ones left out)."""
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = WAIT_POLICY
    for name in ("LRU_CACHE_CAPACITY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY"):
        os.environ.setdefault(name, str(CACHE_CAPACITY))
    names = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "LRU_CACHE_CAPACITY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY")
    return {k: os.environ[k] for k in names if k in os.environ}
