"""The machine the bench runs on: CPU, cores, versions, and the measured fp32 GEMM limit (part (a))."""
from __future__ import annotations

import os
import platform
import time
from typing import Any

from .tables import summarize


def machine_info(threads: int) -> dict[str, Any]:
    """CPU model, cores, load, library versions."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("transformers", "peft", "trl"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - absent is fine
            versions[mod] = None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "cores": cores, "torch_threads": threads, "platform": platform.platform(),
            "load_avg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "onednn": torch.backends.mkldnn.is_available(), "versions": versions,
            "time": time.strftime("%Y-%m-%d %H:%M:%S")}


def gemm_limit(reps: int = 7) -> dict[str, Any]:
    """fp32 GEMM GFLOP/s: x [M, 576] @ W [576, 1536] (the MLP shape) for M = 48 (decode batch) and 2048 (prefill /
    training), with torch.matmul (MKL) and oneDNN packed weights; median / min / max over `reps` samples."""
    import torch

    from ..onednn import onednn_available, onednn_linear, pack_weight

    out: dict[str, Any] = {}
    K, N = 576, 1536
    g = torch.Generator().manual_seed(0)
    W = torch.randn(N, K, generator=g)
    Wt = W.t().contiguous()
    for M in (48, 2048):
        x = torch.randn(M, K, generator=g)
        flops = 2 * M * K * N
        iters = max(1, int(2e9 // flops))  # ~2 GFLOP per sample
        backends = {"mkl": lambda: torch.matmul(x, Wt)}
        if onednn_available():
            Wp = pack_weight(W, M)
            backends["onednn"] = lambda: onednn_linear(x, Wp)
        for name, fn in backends.items():
            for _ in range(3):
                fn()
            samples = []
            for _ in range(reps):
                t0 = time.perf_counter()
                for _ in range(iters):
                    fn()
                samples.append(flops * iters / (time.perf_counter() - t0) / 1e9)
            out[f"{name}_m{M}"] = summarize(samples)
    out["limit_gflops_48"] = max(v["median"] for k, v in out.items() if k.endswith("_m48"))
    out["limit_gflops_2048"] = max(v["median"] for k, v in out.items() if k.endswith("_m2048"))
    if onednn_available():  # weights streamed from memory as in a real forward (64 matrices, ~226 MB > caches)
        x = torch.randn(48, K, generator=g)
        packs = [pack_weight(torch.randn(N, K, generator=g), 48) for _ in range(64)]
        for p in packs[:3]:
            onednn_linear(x, p)
        samples = []
        for _ in range(reps):
            t0 = time.perf_counter()
            for p in packs:
                onednn_linear(x, p)
            samples.append(2 * 48 * K * N * len(packs) / (time.perf_counter() - t0) / 1e9)
        out["onednn_m48_streamed"] = summarize(samples)
    return out
