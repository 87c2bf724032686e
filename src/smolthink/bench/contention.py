"""`smolthink bench --contention`: rollout and training throughput on a quiet machine and with one CPU-bound
process beside them (a subprocess spinning `while True: pass`), for each torch thread count (2, 1, 0 = auto) and
OpenMP wait policy (passive, active, default), as ratios to quiet, in one run.

Each measurement is its own child process (`--child contention`), because libgomp reads OMP_WAIT_POLICY once when
torch loads it, and so that `threads: 0` sees the spinner the way a user's run would: from its start. A child
loads the model, runs one FastEngine rollout of the bench's shape (`--prompts` x `--group`, `--max-new-tokens`)
after a short warm-up, calls `runtime.between_phases` (the re-check a training loop makes), then times LoRA
forward + backward chunks of 2 x 256 tokens through `OneDNNLinears` (training's path). The quiet and busy children
of one configuration run back to back, configurations interleaved, `--reps` times.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from .tables import summarize

# OMP_WAIT_POLICY per policy name; "default" is libgomp's own (spin ~300k iterations, then sleep), what smolthink
# runs with unless the user sets one
POLICY_ENV = {"passive": {"OMP_WAIT_POLICY": "PASSIVE"}, "active": {"OMP_WAIT_POLICY": "ACTIVE"}, "default": {}}
SPIN = "while True: pass"


def parse_list(text: str, cast=str) -> list:
    """'2,1,0' -> [2, 1, 0] (with cast=int)."""
    return [cast(x.strip()) for x in text.split(",") if x.strip()]


def child_env(policy: str) -> dict[str, str]:
    """The environment of a child measuring `policy`: the bench's own, OpenMP's wait settings replaced."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    return {**env, **POLICY_ENV[policy]}


def run_one(argv: Sequence[str], threads: int, policy: str, busy: bool) -> dict[str, Any]:
    """One child measurement (with a spinner beside it when `busy`) -> its result, or {"error": ...}."""
    spinner = subprocess.Popen([sys.executable, "-c", SPIN]) if busy else None
    try:
        if spinner:
            time.sleep(0.5)  # running before the child starts, as a user's other work would be
        load = os.getloadavg() if hasattr(os, "getloadavg") else None
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "child.json"
            cmd = [sys.executable, "-m", "smolthink.bench", *argv, f"--threads={threads}", "--child", "contention",
                   "--child-out", str(out)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(policy))
            if proc.returncode != 0 or not out.is_file():
                tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-2:]
                return {"error": f"exit {proc.returncode}: {' | '.join(tail)[-300:]}"}
            res = json.loads(out.read_text())
    finally:
        if spinner:
            spinner.kill()
            spinner.wait()
    return {**res, "load_avg_before": list(load) if load else None}


def contention_bench(args, argv: Sequence[str]) -> dict[str, Any]:
    """Every (policy, threads) configuration quiet and busy, `args.reps` times -> runs and per-configuration
    medians with busy / quiet ratios (and busy / the best quiet configuration: what a user who would otherwise run
    the fastest quiet setting keeps)."""
    configs = [(p, t) for p in parse_list(args.contention_policies) for t in parse_list(args.contention_threads, int)]
    runs: list[dict[str, Any]] = []
    for rep in range(args.reps):
        for policy, threads in configs:
            for busy in (False, True):
                r = run_one(argv, threads, policy, busy)
                runs.append({"rep": rep, "policy": policy, "threads": threads, "busy": busy, **r})
                print(f"  contention {policy:7s} threads {threads} {'busy ' if busy else 'quiet'}: "
                      + (r.get("error") or f"rollout {r['rollout_tok_s']:.0f} tok/s, train {r['train_tok_s']:.0f}"
                         f" tok/s (threads {r['threads_rollout']}/{r['threads_train']})"),
                      file=sys.stderr, flush=True)
    return {"runs": runs, "summary": summarize_contention(runs), "spinner": SPIN,
            "shape": {"prompts": args.prompts, "group": args.group, "max_new_tokens": args.max_new_tokens,
                      "train_chunk": "2 x 256 tokens, LoRA r32 on all projections, OneDNNLinears"}}


def summarize_contention(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (policy, threads): quiet and busy medians of rollout and training tokens/s, busy / quiet of the same
    configuration, and busy / the best quiet median of any configuration."""
    ok = [r for r in runs if "error" not in r]
    best = {k: max((r[k] for r in ok if not r["busy"]), default=None) for k in ("rollout_tok_s", "train_tok_s")}
    keys = sorted({(r["policy"], r["threads"]) for r in runs}, key=lambda c: (c[0], -c[1] if c[1] else -99))
    rows = []
    for policy, threads in keys:
        mine = [r for r in ok if (r["policy"], r["threads"]) == (policy, threads)]
        row: dict[str, Any] = {"policy": policy, "threads": threads}
        for k in ("rollout_tok_s", "train_tok_s"):
            quiet = summarize([r[k] for r in mine if not r["busy"]])
            busy = summarize([r[k] for r in mine if r["busy"]])
            row[k] = {"quiet": quiet, "busy": busy,
                      "busy_over_quiet": busy["median"] / quiet["median"] if quiet["n"] and busy["n"] else None,
                      "busy_over_best_quiet": busy["median"] / best[k] if best[k] and busy["n"] else None}
        row["threads_used_busy"] = sorted({(r["threads_rollout"], r["threads_train"]) for r in mine if r["busy"]})
        rows.append(row)
    return rows


def run_contention_child(args) -> dict[str, Any]:
    """The child: threads as given (0: auto), one timed rollout, `between_phases`, timed training chunks."""
    import torch

    from ..models import attach_lora, eos_ids, load_model
    from ..rollout.fast import FastEngine
    from ..runtime import between_phases, set_threads
    from ..types import SamplingParams
    from .rollout import recipe_prompts

    threads = set_threads(args.threads)
    model, tok = load_model(args.model)
    model.eval()
    prompts, _ = recipe_prompts(tok, args.prompts, args.seed)
    eng = FastEngine(eos_ids(tok, model), tok.pad_token_id)
    eng.generate(model, prompts[:2], 2, SamplingParams(8, args.temperature, args.top_p), seed=1)  # warm-up
    t0, c0 = time.perf_counter(), time.process_time()
    out = eng.generate(model, prompts, args.group, SamplingParams(args.max_new_tokens, args.temperature, args.top_p),
                       seed=args.seed)
    rollout_s, rollout_cpu = time.perf_counter() - t0, time.process_time() - c0
    tokens = sum(len(r.completion_ids) for g in out for r in g)
    between_phases()
    train = _train_chunks(attach_lora(model), torch.randint(0, tok.vocab_size, (2, 256),
                                                            generator=torch.Generator().manual_seed(0)))
    return {"threads_rollout": threads, "threads_train": torch.get_num_threads(), "rollout_tok_s": tokens / rollout_s,
            "rollout_s": rollout_s, "rollout_cpu_s": rollout_cpu, "tokens": tokens, **train,
            "wait_policy": os.environ.get("OMP_WAIT_POLICY"), "spincount": os.environ.get("GOMP_SPINCOUNT")}


def _train_chunks(model, ids, chunks: int = 3) -> dict[str, float]:
    """Forward + backward of `ids` [B, T] (loss: mean -log p of every next token) through OneDNNLinears: one
    warm-up chunk, then `chunks` timed -> tokens/s."""
    import torch

    from ..logprobs import token_logprobs
    from ..onednn import OneDNNLinears

    model.train()
    layers = OneDNNLinears(model, True)
    mask = torch.ones_like(ids)
    seconds = []
    with layers.active():
        for i in range(chunks + 1):
            t0 = time.perf_counter()
            logp, _ = token_logprobs(model, ids, mask, mask)  # [B, T]
            (-logp.mean()).backward()
            model.zero_grad(set_to_none=True)
            seconds.append(time.perf_counter() - t0)
    return {"train_tok_s": ids.numel() * chunks / sum(seconds[1:]), "train_s": sum(seconds[1:])}
