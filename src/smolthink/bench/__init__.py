"""`smolthink bench`: one run, one model, one machine, one workload, warm-up excluded, several repetitions.

(a) the measured limits: GEMM GFLOP/s at 48 rows x 576 and at 2048 rows (torch threads as set) in fp32 with MKL
    (`torch.matmul`, what transformers uses) and oneDNN (packed: FastEngine; plain: training) and in bf16 through
    oneDNN (plain and packed), the memory bandwidth (a streaming copy), and the decode limit of the model as a FLOP
    bound and a bandwidth bound in fp32 and bf16: `limits`;
(b) rollouts at the recipe's shape (8 syllogism prompts x G=6, up to 300 new tokens, temperature 0.7, top_p 0.95):
    HF generate vs FastEngine, real generated tokens/s (only tokens in completion_ids), their ratio, % of the
    fp32 FLOP limit at ~2 x n_params FLOPs per token, and where FastEngine's time goes: `rollout`;
(c) GRPO steps for the same work: TRL's GRPOTrainer and smolthink's `train_grpo.train` (each in its own
    subprocess, so peak RSS is its own): seconds per step, rollout vs train split, peak RSS: `grpo`;
(d) with `--contention` (only that part): rollout and training throughput quiet vs beside one CPU-bound process,
    per thread count and OpenMP wait policy: `contention`.

The whole run records a per-phase RSS timeline (`rss.rss_timeline`; each part and rollout engine a phase), in the
results and the table. The flags live on the main CLI parser (`add_bench_args`); `main(args)` runs `run_bench`,
prints `tables.format_table` and writes the JSON file. The submodules import torch and the models inside their
functions, so building the CLI parser (which imports this package) stays cheap.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from ..configlib import flag_list, flag_type
from .contention import contention_bench, run_contention_child
from .grpo import grpo_bench, run_child
from .limits import decode_bounds, gemm_limit, machine_info, memory_bandwidth
from .rollout import profile_fast_step, rollout_bench
from .tables import format_table, training_flops

SCHEMA = 1


def add_bench_args(p: argparse.ArgumentParser) -> list[argparse.Action]:
    """Declare the bench's flags on `p` (the `bench` subcommand's parser) -> the actions added."""
    add = p.add_argument
    return [
        add("--model", default=None, help="hub id, local dir, .gguf; default: embedded SmolLM2-135M"),
        add("--prompts", type=flag_type(int, "--prompts", ge=1), default=8, help="questions per rollout batch"),
        add("--group", type=flag_type(int, "--group", ge=2), default=6, help="completions per question (G)"),
        add("--max-new-tokens", type=flag_type(int, "--max-new-tokens", ge=1), default=300),
        add("--temperature", type=flag_type(float, "--temperature", gt=0), default=0.7),
        add("--top-p", type=flag_type(float, "--top-p", gt=0, le=1), default=0.95),
        add("--reps", type=flag_type(int, "--reps", ge=1), default=3, help="measured repetitions per rollout engine"),
        add("--threads", type=flag_type(int, "--threads", ge=0), default=0, help="torch threads (0: all cores)"),
        add("--seed", type=flag_type(int, "--seed"), default=0, help="data and sampling seed"),
        add("--engines", type=flag_list("--engines", ("hf", "fast", "paged")), default="hf,fast",
            help="rollout engines to compare: any of hf,fast,paged"),
        add("--parts", type=flag_list("--parts", ("flops", "rollout", "profile", "grpo", "contention")),
            default="flops,rollout,grpo", help="any of flops,rollout,profile,grpo,contention"),
        add("--grpo", type=flag_list("--grpo", ("trl", "smolthink")), default="trl,smolthink",
            help="GRPO sides to run in (c)"),
        add("--grpo-steps", type=flag_type(int, "--grpo-steps", ge=1), default=2,
            help="measured GRPO steps (after 1 warm-up step)"),
        add("--minibatch", type=flag_type(int, "--minibatch", ge=1), default=8,
            help="GRPO micro-batch (both sides; 48 / minibatch accum.)"),
        add("--max-tokens-per-forward", type=flag_type(int, "--max-tokens-per-forward", ge=0), default=None,
            help="smolthink side: padded tokens per forward/backward chunk (default: GRPOConfig's)"),
        add("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
            help="smolthink side: any other GRPOConfig field, e.g. share_prompts=false (repeatable)"),
        add("--out", default="benchmarks/results.json", help="JSON results file"),
        add("--contention", action="store_true",
            help="run only the contention part: throughput quiet vs beside one CPU-bound process (--parts contention)"),
        add("--contention-threads", default="2,1,0", help="contention: torch thread counts to compare (0: auto)"),
        add("--contention-policies", default="default,passive",
            help="contention: OpenMP wait policies to compare (passive, active, default: libgomp's own)"),
        # internal: the GRPO side a child process runs, and where it writes its result
        add("--child", default=None, help=argparse.SUPPRESS),
        add("--child-out", default=None, help=argparse.SUPPRESS),
    ]


def _user_flags() -> dict[str, str]:
    """dest -> option string of every flag a user passes (the hidden child flags left out)."""
    actions = add_bench_args(argparse.ArgumentParser(add_help=False))
    return {a.dest: a.option_strings[0] for a in actions if a.help is not argparse.SUPPRESS}


def bench_options(args: argparse.Namespace) -> dict[str, Any]:
    """The bench flags' values in `args` (what results.json records under "args")."""
    return {dest: getattr(args, dest) for dest in _user_flags()}


def bench_argv(args: argparse.Namespace) -> list[str]:
    """Command-line words that parse back to the bench flags' values in `args`: what a child process gets.
    `--flag=value` keeps a value that starts with '-' a value; a switch is its flag alone when on."""
    argv = []
    for dest, flag in _user_flags().items():
        value = getattr(args, dest)
        if value is None or value is False:
            continue
        if value is True:
            argv.append(flag)
            continue
        argv += [f"{flag}={v}" for v in (value if isinstance(value, list) else [value])]
    return argv


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    """Run the selected parts, each a phase of one RSS timeline -> results dict (also what the JSON file holds)."""
    from ..rss import rss_timeline

    with rss_timeline() as timeline:
        results = _run_parts(args)
    results["rss"] = timeline.summary()
    results["machine"]["load_avg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return results


def _run_parts(args: argparse.Namespace) -> dict[str, Any]:
    from ..rss import rss_phase
    from ..runtime import set_threads

    threads = set_threads(args.threads)
    parts = {"contention"} if args.contention else {p.strip() for p in args.parts.split(",") if p.strip()}
    results: dict[str, Any] = {"schema": SCHEMA, "machine": machine_info(threads), "args": bench_options(args)}
    limit, model = None, None
    if parts & {"flops", "rollout", "profile"}:
        from ..models import load_model

        with rss_phase("load_model"):
            model, tok = load_model(args.model)
        model.eval()
        n_params = sum(p.numel() for p in model.parameters())
        results["model"] = {"name": args.model or "embedded SmolLM2-135M-Instruct", "n_params": n_params,
                            "flops_per_token": 2 * n_params}
    if "flops" in parts:
        print("(a) GEMM limits, memory bandwidth", file=sys.stderr, flush=True)
        with rss_phase("flops"):
            results["gemm"] = gemm_limit()
            results["bandwidth"] = memory_bandwidth()
        limit = results["gemm"]["limit_gflops_48"]
        results["model"]["decode_limit_tok_s"] = limit * 1e9 / (2 * n_params)
        results["decode_bounds"] = decode_bounds(results["gemm"], results["bandwidth"]["copy_gb_s"]["median"],
                                                 n_params, kv_bytes_per_token=_kv_bytes_per_token(model.config))
    if "rollout" in parts:
        print("(b) rollouts", file=sys.stderr, flush=True)
        results["rollout"] = rollout_bench(args, model, tok, n_params, limit)
    if "profile" in parts:
        print("    FastEngine step profile", file=sys.stderr, flush=True)
        with rss_phase("profile"):
            results["fast_step_profile"] = profile_fast_step(model, tok, args.prompts, args.group, seed=args.seed)
    del model
    if "grpo" in parts:
        print("(c) GRPO steps", file=sys.stderr, flush=True)
        results["grpo"] = grpo_bench(args, bench_argv(args))
        if results.get("gemm"):
            results["training_flops"] = training_flops(results, args)
    if "contention" in parts:
        print("(d) contention: quiet vs one CPU-bound process beside it", file=sys.stderr, flush=True)
        results["contention"] = contention_bench(args, [w for w in bench_argv(args) if w != "--contention"])
    return results


def _kv_bytes_per_token(config) -> int:
    """fp32 bytes of one token's K and V over all layers of a Llama-like config."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers * 2 * (getattr(config, "num_key_value_heads", None) or heads) * head_dim * 4


def main(args: argparse.Namespace) -> int:
    """`smolthink bench [flags]`: run the bench, print the table, write the JSON file; with --child, run one
    child measurement (a GRPO side, or a contention configuration) and write its result to --child-out."""
    if args.child:
        res = run_contention_child(args) if args.child == "contention" else run_child(args)
        Path(args.child_out).write_text(json.dumps(res))
        return 0
    results = run_bench(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(format_table(results))
    print(f"results: {out}")
    return 0
