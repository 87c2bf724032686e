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


def _gflops(fn, flops: int, reps: int, work: float) -> dict[str, float]:
    """GFLOP/s of `fn` (`flops` per call): 3 warm-up calls, then `reps` samples of about `work` FLOPs each."""
    iters = max(1, int(work // flops))
    for _ in range(3):
        fn()
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        samples.append(flops * iters / (time.perf_counter() - t0) / 1e9)
    return summarize(samples)


def gemm_limit(reps: int = 7, rows: tuple[int, ...] = (48, 2048), k: int = 576, n: int = 1536,
               work: float = 2e9, streamed: int = 64) -> dict[str, Any]:
    """GEMM GFLOP/s of x [M, k] @ W [k, n] (default: the MLP shape) for M in `rows` (48: a decode batch; 2048:
    prefill / training), median / min / max over `reps` samples of ~`work` FLOPs:
    `mkl` (torch.matmul, fp32: what transformers uses); through oneDNN (`torch.ops.mkldnn._linear_pointwise`)
    `onednn` (fp32, packed weight: FastEngine), `onednn_plain` (fp32, plain weight: training's merged W'),
    `bf16_plain` and `bf16_packed` (bf16 x and W, bf16 out, fp32 accumulation inside oneDNN; only where oneDNN
    runs bf16 at all, not on AVX2-only CPUs). The fp32 limits are
    the best fp32 medians per row count (`limit_gflops_48`, `limit_gflops_2048`), the bf16 ones the best bf16
    (`limit_bf16_gflops_*`). With `streamed` > 0 also oneDNN fp32 packed at the first row count with `streamed`
    different weights (64: ~226 MB, more than the caches), so they stream from RAM as in a real forward."""
    import torch

    from ..onednn import bf16_runs, onednn_available, onednn_linear, pack_weight

    out: dict[str, Any] = {}
    g = torch.Generator().manual_seed(0)
    W = torch.randn(n, k, generator=g)
    Wt, Wb = W.t().contiguous(), W.bfloat16()
    for M in rows:
        x = torch.randn(M, k, generator=g)
        xb = x.bfloat16()
        backends = {"mkl": lambda: torch.matmul(x, Wt)}
        if onednn_available():
            Wp = pack_weight(W, M)
            backends.update({"onednn": lambda: onednn_linear(x, Wp), "onednn_plain": lambda: onednn_linear(x, W)})
        if bf16_runs():
            Wbp = pack_weight(Wb, M)
            backends.update({"bf16_plain": lambda: onednn_linear(xb, Wb),
                             "bf16_packed": lambda: onednn_linear(xb, Wbp)})
        for name, fn in backends.items():
            out[f"{name}_m{M}"] = _gflops(fn, 2 * M * k * n, reps, work)
        for prefix, names in (("limit_gflops", ("mkl", "onednn", "onednn_plain")),
                              ("limit_bf16_gflops", ("bf16_plain", "bf16_packed"))):
            medians = [out[f"{b}_m{M}"]["median"] for b in names if f"{b}_m{M}" in out]
            if medians:
                out[f"{prefix}_{M}"] = max(medians)
    if onednn_available() and streamed:
        M = rows[0]
        x = torch.randn(M, k, generator=g)
        packs = [pack_weight(torch.randn(n, k, generator=g), M) for _ in range(streamed)]
        out[f"onednn_m{M}_streamed"] = _gflops(lambda: [onednn_linear(x, p) for p in packs],
                                               2 * M * k * n * streamed, reps, 0)
    return out


def memory_bandwidth(nbytes: int = 256 << 20, reps: int = 7) -> dict[str, Any]:
    """The machine's memory bandwidth as a streaming copy: `dst.copy_(src)` of two `nbytes` fp32 buffers (far
    larger than the caches), torch threads as set. GB/s counts the bytes read plus the bytes written (2 x nbytes
    per copy); a write-allocate cache reads the destination too, so the bus moves up to 1.5x that."""
    import torch

    src = torch.ones(nbytes // 4)
    dst = torch.zeros_like(src)  # zeros, not empty: every page is resident before the clock starts
    for _ in range(2):
        dst.copy_(src)
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        dst.copy_(src)
        samples.append(2 * nbytes / (time.perf_counter() - t0) / 1e9)
    return {"copy_gb_s": summarize(samples), "buffer_mb": nbytes / 2**20}


def decode_bounds(gemm: dict[str, Any], bandwidth_gb_s: float | None, n_params: int, rows: int = 48,
                  context: int = 300, kv_bytes_per_token: int | None = None) -> dict[str, Any]:
    """The decode limit of a model with `n_params` weights at `rows` live rows, per precision (fp32, bf16), two
    ways: a FLOP bound (the GEMM limit at 48 rows / 2 n_params FLOPs per token) and a bandwidth bound (every
    weight read once per decode step: bandwidth / (n_params x bytes per weight) = steps per second), each as
    decode steps/s and tokens/s. With `kv_bytes_per_token` (fp32 K and V of one token, all layers) also the KV
    cache bytes a step reads at `rows` rows of `context` tokens, which the weights-only bound leaves out."""
    out: dict[str, Any] = {"n_params": n_params, "rows": rows, "context": context}
    for prec, nbytes in (("fp32", 4), ("bf16", 2)):
        limit = gemm.get("limit_gflops_48" if prec == "fp32" else "limit_bf16_gflops_48")
        b: dict[str, Any] = {"weight_bytes_per_step": n_params * nbytes}
        if limit:
            tok_s = limit * 1e9 / (2 * n_params)
            b.update(flop_tok_s=tok_s, flop_steps_s=tok_s / rows)
        if bandwidth_gb_s:
            steps = bandwidth_gb_s * 1e9 / (n_params * nbytes)
            b.update(bandwidth_steps_s=steps, bandwidth_tok_s=steps * rows)
        if kv_bytes_per_token:
            b["kv_bytes_per_step"] = rows * context * kv_bytes_per_token * nbytes // 4
        out[prec] = b
    return out
