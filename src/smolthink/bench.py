"""`smolthink bench`: one run, one model, one machine, one workload, warm-up excluded, several repetitions.

(a) the measured fp32 GEMM limit (GFLOP/s at 48 rows x 576 and at 2048 rows, torch threads = cores), with MKL
    (`torch.matmul`, what transformers uses) and with oneDNN packed weights (what FastEngine uses);
(b) rollouts at the recipe's shape (8 syllogism prompts x G=6, up to 300 new tokens, temperature 0.7, top_p 0.95):
    HF generate vs FastEngine, real generated tokens/s (only tokens in completion_ids), their ratio, % of the
    fp32 FLOP limit at ~2 x n_params FLOPs per token, and where FastEngine's time goes;
(c) GRPO steps for the same work: TRL's GRPOTrainer and smolthink's `train_grpo.train` (each in its own
    subprocess, so peak RSS is its own): seconds per step, rollout vs train split, peak RSS.

`main_bench(argv)` parses flags, runs `run_bench`, prints `format_table` and writes the JSON file.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Sequence

import torch

SCHEMA = 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="smolthink bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="hub id, local dir, .gguf; default: embedded SmolLM2-135M")
    p.add_argument("--prompts", type=int, default=8, help="questions per rollout batch")
    p.add_argument("--group", type=int, default=6, help="completions per question (G)")
    p.add_argument("--max-new-tokens", type=int, default=300)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--reps", type=int, default=3, help="measured repetitions per rollout engine")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    p.add_argument("--seed", type=int, default=0, help="data and sampling seed")
    p.add_argument("--engines", default="hf,fast", help="rollout engines to compare")
    p.add_argument("--parts", default="flops,rollout,grpo", help="any of flops,rollout,profile,grpo")
    p.add_argument("--grpo", default="trl,smolthink", help="GRPO sides to run in (c)")
    p.add_argument("--grpo-steps", type=int, default=2, help="measured GRPO steps (after 1 warm-up step)")
    p.add_argument("--minibatch", type=int, default=8, help="GRPO micro-batch (both sides; 48 / minibatch accum.)")
    p.add_argument("--max-tokens-per-forward", type=int, default=None,
                   help="smolthink side: padded tokens per forward/backward chunk (default: GRPOConfig's)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="smolthink side: any other GRPOConfig field, e.g. share_prompts=false (repeatable)")
    p.add_argument("--out", default="benchmarks/results.json", help="JSON results file")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: run one GRPO side
    p.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    return p


# ----------------------------------------------------------------------------------------------------------------
# helpers


def summarize(values: Sequence[float]) -> dict[str, float]:
    """median / min / max / n of a list of numbers."""
    v = [float(x) for x in values]
    if not v:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    return {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v)}


class RSSPeak:
    """Peak resident memory of this process while the block runs (sampled every 20 ms), in GB."""

    def __enter__(self):
        self.peak = self.start = _rss_gb()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _rss_gb())

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss_gb())
        return False


def _rss_gb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9
    except OSError:  # not Linux
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def machine_info(threads: int) -> dict[str, Any]:
    """CPU model, cores, load, library versions."""
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


def recipe_prompts(tok, n: int, seed: int) -> tuple[list[list[int]], list[dict]]:
    """n real syllogism questions rendered with the chat protocol -> (prompt ids, reasoning-gym entries)."""
    import reasoning_gym

    from .chat import build_messages, render_prompt

    entries = list(reasoning_gym.create_dataset("syllogism", seed=seed, size=n))
    return [render_prompt(tok, build_messages(e["question"])) for e in entries], entries


# ----------------------------------------------------------------------------------------------------------------
# (a) GEMM limit


def gemm_limit(reps: int = 7) -> dict[str, Any]:
    """fp32 GEMM GFLOP/s: x [M, 576] @ W [576, 1536] (the MLP shape) for M = 48 (decode batch) and 2048 (prefill /
    training), with torch.matmul (MKL) and oneDNN packed weights; median / min / max over `reps` samples."""
    from .onednn import onednn_available, onednn_linear, pack_weight

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


# ----------------------------------------------------------------------------------------------------------------
# (b) rollouts


def rollout_bench(args, model, tok, n_params: int, limit_gflops: float | None) -> dict[str, Any]:
    """HF generate vs FastEngine on the same prompts, interleaved repetitions after one warm-up call each."""
    from .models import eos_ids
    from .rollout.fast import FastEngine
    from .rollout.hf import HFEngine
    from .types import SamplingParams

    prompts, _ = recipe_prompts(tok, args.prompts, args.seed)
    eos = eos_ids(tok, model)
    engines = {}
    for name in [e.strip() for e in args.engines.split(",") if e.strip()]:
        engines[name] = HFEngine(eos, tok.pad_token_id) if name == "hf" else FastEngine(eos, tok.pad_token_id)
    sampling = SamplingParams(args.max_new_tokens, args.temperature, args.top_p)
    for eng in engines.values():  # warm-up: allocator, oneDNN primitives, lazy imports
        eng.generate(model, prompts[:2], 2, SamplingParams(16, args.temperature, args.top_p), seed=12345)
    runs: dict[str, list[dict]] = {k: [] for k in engines}
    for rep in range(args.reps):
        for name, eng in engines.items():
            t_cpu, t0 = time.process_time(), time.perf_counter()
            with RSSPeak() as mem:
                out = eng.generate(model, prompts, args.group, sampling, seed=args.seed + rep)
            wall = time.perf_counter() - t0
            lens = [len(r.completion_ids) for g in out for r in g]
            rows = len(lens)
            steps = max(lens)
            run = {"rep": rep, "wall_s": wall, "cpu_s": time.process_time() - t_cpu, "tokens": sum(lens),
                   "tok_s": sum(lens) / wall, "tok_per_cpu_s": sum(lens) / max(time.process_time() - t_cpu, 1e-9),
                   "rows": rows, "steps": steps,
                   "real_row_frac": sum(lens) / (rows * steps),
                   "truncated": sum(x >= args.max_new_tokens for x in lens),
                   "ms_per_step": 1e3 * wall / steps, "rss_peak_gb": mem.peak, "rss_added_gb": mem.peak - mem.start}
            stats = getattr(eng, "last_stats", None)
            if stats:
                run["phases"] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in stats.items()}
                run["decode_ms_per_step"] = 1e3 * stats["decode_s"] / max(1, stats["steps"])
                run["rows_per_step"] = stats["row_steps"] / max(1, stats["steps"])
                # rows it computed that produced a real token (finished rows leave the batch at once)
                run["real_row_frac"] = sum(lens) / max(1, stats["row_steps"] + rows)
            runs[name].append(run)
            print(f"  rollout {name} rep {rep}: {wall:.1f}s, {sum(lens)} tokens, {sum(lens) / wall:.1f} tok/s",
                  file=sys.stderr, flush=True)
    res: dict[str, Any] = {"prompts": args.prompts, "group": args.group, "max_new_tokens": args.max_new_tokens,
                           "temperature": args.temperature, "top_p": args.top_p, "n_params": n_params,
                           "prompt_tokens": [len(p) for p in prompts], "runs": runs, "summary": {}}
    for name, rs in runs.items():
        keys = ("tok_s", "tok_per_cpu_s", "wall_s", "cpu_s", "tokens", "ms_per_step", "real_row_frac", "rss_peak_gb")
        s = {k: summarize([r[k] for r in rs if k in r]) for k in keys}
        if limit_gflops:
            s["pct_flop_limit"] = summarize([100 * r["tok_s"] * 2 * n_params / (limit_gflops * 1e9) for r in rs])
        res["summary"][name] = s
    if "hf" in runs and "fast" in runs:
        res["ratio_fast_over_hf"] = (res["summary"]["fast"]["tok_s"]["median"]
                                     / res["summary"]["hf"]["tok_s"]["median"])
    return res


def profile_fast_step(model, tok, prompts: int = 8, group: int = 6, steps: int = 32, seed: int = 0) -> dict[str, float]:
    """Where a FastEngine decoding step goes with prompts x group live rows (the recipe's syllogism prompts, EOS
    disabled so every row runs all steps), from torch.profiler: ms per step in GEMMs (linear layers incl.
    lm_head), attention (bmm/softmax), sampling ops and the rest."""
    from torch.profiler import ProfilerActivity, profile

    from .rollout.fast import FastEngine
    from .types import SamplingParams

    ids, _ = recipe_prompts(tok, prompts, seed)
    eng = FastEngine([model.config.vocab_size + 1], tok.pad_token_id)  # an EOS id that never comes
    eng.generate(model, ids, group, SamplingParams(4, 0.7, 0.95), seed=0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        eng.generate(model, ids, group, SamplingParams(steps, 0.7, 0.95), seed=0)
    cats = {"gemm": 0.0, "attention_bmm": 0.0, "softmax": 0.0, "sampling": 0.0, "other": 0.0}
    for ev in prof.key_averages():
        name, t = ev.key, ev.self_cpu_time_total / 1e3
        if "linear_pointwise" in name or name in ("aten::addmm", "aten::mm", "aten::linear"):
            cats["gemm"] += t
        elif name in ("aten::bmm", "aten::_scaled_dot_product_flash_attention_for_cpu"):
            cats["attention_bmm"] += t
        elif name == "aten::_softmax":  # attention and sampling softmax
            cats["softmax"] += t
        elif name in ("aten::topk", "aten::cumsum", "aten::searchsorted", "aten::div", "aten::isin"):
            cats["sampling"] += t
        else:
            cats["other"] += t
    st = eng.last_stats
    n = max(1, st["steps"])
    out = {f"{k}_ms_per_step": v / n for k, v in cats.items()}  # prefill is < 2% of these totals
    out.update({"rows": prompts * group, "steps": n, "profiled_s": sum(cats.values()) / 1e3,
                "wall_ms_per_step": 1e3 * st["decode_wall_s"] / n,
                "decode_ms_per_step": 1e3 * st["decode_s"] / n, "sample_ms_per_step": 1e3 * st["sample_s"] / n})
    return out


# ----------------------------------------------------------------------------------------------------------------
# (c) GRPO steps, each side in a subprocess


def strict_syllogism_reward(completion: str, gold: str, prefill: str = "") -> float:
    """smolthink's strict reward for a Yes/No syllogism: 0.85 * exact answer + 0.15 * strict format."""
    from .chat import extract_answer, format_ok
    from .tasks import strict_match

    return 0.85 * float(strict_match(extract_answer(completion), gold)) + 0.15 * float(format_ok(completion, prefill))


def _child_trl(args) -> dict[str, Any]:
    """TRL GRPOTrainer on the same work: 8 prompts x 6 per step, one optimizer update per generation, LoRA r32/a64
    on all projections, beta 0, fp32 CPU, no gradient checkpointing; per-step wall, generation and train split."""
    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    from trl.extras import profiling

    from .chat import build_messages
    from .models import LORA_TARGETS, load_model
    from .runtime import peak_rss_gb, set_threads

    set_threads(args.threads)
    model, tok = load_model(args.model)
    steps = args.grpo_steps + 1
    import reasoning_gym

    entries = list(reasoning_gym.create_dataset("syllogism", seed=args.seed + 1, size=args.prompts * steps))
    ds = Dataset.from_list([{"prompt": build_messages(e["question"]), "answer": e["answer"]} for e in entries])

    def reward(prompts, completions, answer, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [strict_syllogism_reward(t, a) for t, a in zip(texts, answer)]

    timings: list[tuple[str, float, float]] = []  # (name, end time, seconds)
    original = profiling.ProfilingContext._log_metrics

    def capture(self, duration):
        timings.append((self.name, time.perf_counter(), duration))
        return original(self, duration)

    profiling.ProfilingContext._log_metrics = capture
    group = args.prompts * args.group
    accum = max(1, group // args.minibatch)
    cfg = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-bench-"), per_device_train_batch_size=args.minibatch,
        gradient_accumulation_steps=accum, steps_per_generation=accum, num_generations=args.group,
        max_completion_length=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=0,
        beta=0.0, num_iterations=1, learning_rate=1e-6, loss_type="grpo", scale_rewards="group",
        max_steps=steps, logging_steps=1, report_to="none", use_cpu=True, bf16=False, fp16=False,
        gradient_checkpointing=False, save_strategy="no", disable_tqdm=True, seed=args.seed,
        dataloader_num_workers=0, shuffle_dataset=False)
    peft_cfg = LoraConfig(r=32, lora_alpha=64, lora_dropout=0.0, target_modules=list(LORA_TARGETS),
                          task_type="CAUSAL_LM")

    marks: list[tuple[float, float]] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            marks.append((time.perf_counter(), 0.0))

        def on_step_end(self, a, state, control, **kw):
            marks[-1] = (marks[-1][0], time.perf_counter())

    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=cfg, train_dataset=ds, processing_class=tok,
                          peft_config=peft_cfg, callbacks=[StepTimer()])
    trainer.train()
    per_step = []
    for i, (t0, t1) in enumerate(marks):
        inside = [(n, d) for n, end, d in timings if t0 <= end <= t1]
        gen = sum(d for n, d in inside if n.endswith("transformers.generate"))
        prep = sum(d for n, d in inside if n.endswith("_prepare_inputs"))
        per_step.append({"step": i + 1, "step_s": t1 - t0, "generate_s": gen, "rollout_s": prep,
                         "train_s": (t1 - t0) - prep})
    return {"side": "trl", "version": trl.__version__, "per_step": per_step, "peak_rss_gb": peak_rss_gb(),
            "note": "rollout_s = GRPOTrainer._prepare_inputs (generation + rewards + log-prob bookkeeping); "
                    "train_s = step time - rollout_s"}


def _child_smolthink(args) -> dict[str, Any]:
    """smolthink's GRPO loop on the same work, read back from its metrics.jsonl."""
    try:
        from .train_grpo import train
    except ImportError as e:
        return {"side": "smolthink", "available": False, "reason": f"smolthink.train_grpo not importable: {e}"}
    from .config import GRPOConfig

    steps = args.grpo_steps + 1
    group = args.prompts * args.group
    cfg = GRPOConfig(model=args.model, task="syllogism", seed=args.seed, prompts_per_rollout=args.prompts,
                     num_generations=args.group, max_completion_length=args.max_new_tokens,
                     temperature=args.temperature, top_p=args.top_p, buffer_size=group, minibatch_size=args.minibatch,
                     gradient_accumulation_steps=max(1, group // args.minibatch), num_iterations=1, beta=0.0,
                     learning_rate=1e-6, loss_type="grpo", use_lora=True, lora_r=32, lora_alpha=64,
                     gradient_checkpointing=False, threads=args.threads, max_steps=steps, eval_n=0,
                     eval_at_start=False, save_every=0, sample_every=0, train_size=max(64, args.prompts * steps))
    if args.max_tokens_per_forward is not None:
        cfg.max_tokens_per_forward = args.max_tokens_per_forward
    if args.sets:
        from .config import build_config, parse_overrides

        cfg = build_config(GRPOConfig, [dataclasses.asdict(cfg), parse_overrides(args.sets)])
    out = Path(tempfile.mkdtemp(prefix="smolthink-bench-")) / "run"
    train(cfg, out)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    keys = ("perf/rollout_s", "perf/train_s", "perf/peak_rss_gb", "perf/rollout_tok_s", "perf/train_tok_s",
            "perf/train_computed_tok_s", "perf/step_s")
    per_step = [{"step": r["step"], **{k.split("/", 1)[1]: r.get(k) for k in keys}} for r in rows]
    return {"side": "smolthink", "available": True, "per_step": per_step,
            "peak_rss_gb": max((r.get("perf/peak_rss_gb") or 0.0) for r in rows) if rows else None,
            "engine": "auto (FastEngine for Llama-like models)"}


def grpo_bench(args, argv: Sequence[str]) -> dict[str, Any]:
    """Run each GRPO side in a subprocess (its own peak RSS) and summarise steps after the first (warm-up)."""
    res: dict[str, Any] = {}
    for side in [s.strip() for s in args.grpo.split(",") if s.strip()]:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "child.json"
            cmd = [sys.executable, "-m", "smolthink.bench", *argv, "--child", side, "--child-out", str(out)]
            print(f"  GRPO {side}: {args.grpo_steps} measured steps + 1 warm-up (subprocess)", file=sys.stderr,
                  flush=True)
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0 or not out.is_file():
                lines = [x for x in (proc.stderr or proc.stdout or "").strip().splitlines()
                         if x.strip() and "warn" not in x.lower() and "%|" not in x]
                why = "killed by SIGKILL (out of memory?)" if proc.returncode == -9 else f"exit {proc.returncode}"
                detail = (": " + " | ".join(lines[-3:])[-400:]) if lines else ""
                res[side] = {"available": False, "reason": why + detail}
                continue
            r = json.loads(out.read_text())
            r["wall_s_total"] = time.perf_counter() - t0
        steps = r.get("per_step") or []
        measured = steps[1:] if len(steps) > 1 else steps
        if measured:
            for key in ("step_s", "rollout_s", "train_s", "generate_s", "rollout_tok_s", "train_tok_s",
                        "train_computed_tok_s"):
                vals = [s[key] for s in measured if s.get(key) is not None]
                if key == "step_s" and not vals:  # smolthink: rollout + train
                    vals = [s["rollout_s"] + s["train_s"] for s in measured]
                if vals:
                    r[f"{key}_summary"] = summarize(vals)
        res[side] = r
    return res


# ----------------------------------------------------------------------------------------------------------------
# driver


def run_bench(args: argparse.Namespace, argv: Sequence[str] = ()) -> dict[str, Any]:
    """Run the selected parts -> results dict (also what the JSON file holds)."""
    from .runtime import set_threads

    threads = set_threads(args.threads)
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    results: dict[str, Any] = {"schema": SCHEMA, "machine": machine_info(threads),
                               "args": {k: v for k, v in vars(args).items() if not k.startswith("child")}}
    limit = None
    if "flops" in parts:
        print("(a) fp32 GEMM limit", file=sys.stderr, flush=True)
        results["gemm"] = gemm_limit()
        limit = results["gemm"]["limit_gflops_48"]
    if parts & {"rollout", "profile"}:
        from .models import load_model

        model, tok = load_model(args.model)
        model.eval()
        n_params = sum(p.numel() for p in model.parameters())
        results["model"] = {"name": args.model or "embedded SmolLM2-135M-Instruct", "n_params": n_params,
                            "flops_per_token": 2 * n_params}
        if limit:
            results["model"]["decode_limit_tok_s"] = limit * 1e9 / (2 * n_params)
        if "rollout" in parts:
            print("(b) rollouts", file=sys.stderr, flush=True)
            results["rollout"] = rollout_bench(args, model, tok, n_params, limit)
        if "profile" in parts:
            print("    FastEngine step profile", file=sys.stderr, flush=True)
            results["fast_step_profile"] = profile_fast_step(model, tok, args.prompts, args.group, seed=args.seed)
        del model
    if "grpo" in parts:
        print("(c) GRPO steps", file=sys.stderr, flush=True)
        results["grpo"] = grpo_bench(args, argv)
        if results.get("gemm"):
            results["training_flops"] = training_flops(results, args)
    results["machine"]["load_avg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return results


def training_flops(results: dict[str, Any], args) -> dict[str, Any] | None:
    """smolthink's GRPO training throughput as GFLOP/s and % of the GEMM limit at 2048 rows (training shapes), two
    ways: per sequence token (every prompt + completion token of the step's sequences: the work TRL does; with
    shared prompts each group's prompt runs once, so this is an effective rate) and per computed token (what the
    forwards actually ran: the hardware efficiency). FLOPs per token: 4 x n_params (forward 2N + input-gradient
    backward 2N; the frozen base weights take no weight gradient). Not counted: attention scores (~+10-15% at
    these lengths) and LoRA's own rank-r GEMMs (~+3%); over-counted: the LM head (~20% of N) on prompt
    positions, which never run it. The two roughly cancel."""
    side = (results.get("grpo") or {}).get("smolthink") or {}
    tok_s = (side.get("train_tok_s_summary") or {}).get("median")
    if not tok_s:
        return None
    computed = (side.get("train_computed_tok_s_summary") or {}).get("median") or tok_s
    n_params = (results.get("model") or {}).get("n_params")
    if not n_params:
        from .models import load_model

        model, _ = load_model(args.model)
        n_params = sum(p.numel() for p in model.parameters())
        del model
    limit = results["gemm"]["limit_gflops_2048"]
    mkl = results["gemm"].get("mkl_m2048", {}).get("median")
    out = {"flops_per_token": 4 * n_params, "limit_gflops_2048": limit}
    for name, rate in (("", tok_s), ("computed_", computed)):
        gflops = rate * 4 * n_params / 1e9
        out.update({f"{name}train_tok_s": rate, f"{name}gflops": gflops, f"{name}pct_limit": 100 * gflops / limit,
                    f"{name}pct_mkl_2048": 100 * gflops / mkl if mkl else None})
    return out


def _fmt(s: dict | None, digits: int = 1) -> str:
    if not s or not s.get("n"):
        return "n/a"
    return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}-{s['max']:.{digits}f}]"


def format_table(results: dict[str, Any]) -> str:
    """Plain-text table of a results dict: median [min-max]."""
    m = results.get("machine", {})
    lines = [f"machine: {m.get('cpu')} | {m.get('cores')} cores, torch threads {m.get('torch_threads')} | "
             f"load avg at start {', '.join(f'{x:.1f}' for x in (m.get('load_avg_start') or []))} | "
             + ", ".join(f"{k} {v}" for k, v in (m.get("versions") or {}).items() if v)]
    g = results.get("gemm")
    if g:
        lines.append("(a) fp32 GEMM GFLOP/s, x[M,576] @ W[576,1536]   median [min-max]")
        for key in ("mkl_m48", "onednn_m48", "mkl_m2048", "onednn_m2048", "onednn_m48_streamed"):
            if key in g:
                lib, rows = key.split("_m", 1)
                note = "  (weights streamed from RAM, as in a forward)" if rows.endswith("streamed") else ""
                lines.append(f"    {lib:7s} M={rows.split('_')[0]:5s} {_fmt(g[key])}{note}")
        model = results.get("model", {})
        lim = f"{g['limit_gflops_48']:.0f} GFLOP/s at 48 rows"
        if model.get("decode_limit_tok_s"):
            lim += f" -> decode limit {model['decode_limit_tok_s']:.0f} tok/s ({model['n_params'] / 1e6:.1f}M params)"
        lines.append(f"    limit used below: {lim}")
    r = results.get("rollout")
    if r:
        lines.append(f"(b) rollouts: {r['prompts']} prompts x G={r['group']}, <= {r['max_new_tokens']} new tokens, "
                     f"T={r['temperature']}, top_p={r['top_p']}; {len(next(iter(r['runs'].values())))} reps")
        lines.append(f"    {'engine':6s} {'real tok/s':>22s} {'wall s':>22s} {'ms/step (wall/steps)':>22s} "
                     f"{'% FLOP limit':>18s} {'real rows':>9s} {'peak RSS GB':>12s}")
        for name, s in r["summary"].items():
            lines.append(f"    {name:6s} {_fmt(s['tok_s']):>22s} {_fmt(s['wall_s']):>22s} "
                         f"{_fmt(s['ms_per_step']):>22s} "
                         f"{_fmt(s.get('pct_flop_limit')):>18s} {s['real_row_frac']['median'] * 100:8.0f}% "
                         f"{s['rss_peak_gb']['max']:12.2f}")
        if "ratio_fast_over_hf" in r:
            lines.append(f"    FastEngine / HF real tokens/s (medians): {r['ratio_fast_over_hf']:.1f}x")
        lines.append("    real tokens per CPU-second of this process (less sensitive to other load): "
                     + ", ".join(f"{name} {_fmt(s.get('tok_per_cpu_s'))}" for name, s in r["summary"].items()))
        fast = r["runs"].get("fast") or []
        if fast and "phases" in fast[0]:
            ph = [x["phases"] for x in fast]
            med = {k: statistics.median(p[k] for p in ph) for k in ("prep_s", "prefill_s", "decode_s", "sample_s")}
            lines.append("    fast phases (median s): " + ", ".join(f"{k[:-2]} {v:.2f}" for k, v in med.items())
                         + f"; rows/step {statistics.median(x['rows_per_step'] for x in fast):.1f}, "
                           f"shared prefix {ph[0]['prefix_len']} tokens")
    p = results.get("fast_step_profile")
    if p:
        lines.append(f"    fast decode step at {p['rows']} rows (profiler, ms/step): "
                     + ", ".join(f"{k} {p[k + '_ms_per_step']:.1f}"
                                 for k in ("gemm", "attention_bmm", "softmax", "sampling", "other")
                                 if k + "_ms_per_step" in p)
                     + f"; engine timers (profiler on): forward {p['decode_ms_per_step']:.1f} + sampling "
                       f"{p['sample_ms_per_step']:.1f}")
    gr = results.get("grpo")
    if gr:
        lines.append("(c) GRPO step, same work (s, median [min-max] over measured steps; first step excluded)")
        for side, v in gr.items():
            if not v.get("available", True):
                lines.append(f"    {side:9s} not available: {v.get('reason')}")
                continue
            ver = f" {v['version']}" if v.get("version") else ""
            lines.append(f"    {side + ver:14s} step {_fmt(v.get('step_s_summary'))}  rollout "
                         f"{_fmt(v.get('rollout_s_summary'))}  train {_fmt(v.get('train_s_summary'))}  "
                         f"peak RSS {v.get('peak_rss_gb') or float('nan'):.2f} GB")
        sides = {k: v.get("step_s_summary", {}).get("median") for k, v in gr.items()}
        if sides.get("trl") and sides.get("smolthink"):
            lines.append(f"    smolthink / TRL seconds per step (medians): {sides['smolthink'] / sides['trl']:.2f}x")
    tf = results.get("training_flops")
    if tf:
        for name, what in (("", "sequence tokens (all prompt + completion tokens of the step)"),
                           ("computed_", "computed tokens (what the forwards ran; prompts once per chunk)")):
            if name and tf.get("computed_train_tok_s", tf["train_tok_s"]) == tf["train_tok_s"]:
                continue
            mkl = f", {tf[name + 'pct_mkl_2048']:.0f}% of MKL's" if tf.get(name + "pct_mkl_2048") else ""
            lines.append(f"    smolthink training, {what}: {tf[name + 'train_tok_s']:.0f} tok/s x "
                         f"{tf['flops_per_token'] / 1e9:.2f} GFLOP/token = {tf[name + 'gflops']:.0f} GFLOP/s = "
                         f"{tf[name + 'pct_limit']:.0f}% of the GEMM limit at 2048 rows "
                         f"({tf['limit_gflops_2048']:.0f} GFLOP/s{mkl})")
    return "\n".join(lines)


def main_bench(argv: Sequence[str] | None = None) -> int:
    """CLI entry: `smolthink bench [flags]`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.child:
        from .runtime import set_threads

        set_threads(args.threads)
        res = _child_trl(args) if args.child == "trl" else _child_smolthink(args)
        Path(args.child_out).write_text(json.dumps(res))
        return 0
    results = run_bench(args, argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(format_table(results))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main_bench())
