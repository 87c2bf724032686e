"""`smolthink bench`: one run, one model, one machine, one workload, warm-up excluded, several repetitions.

(a) the measured fp32 GEMM limit (GFLOP/s at 48 rows x 576 and at 2048 rows, torch threads = cores), with MKL
    (`torch.matmul`, what transformers uses) and with oneDNN packed weights (what FastEngine uses): `limits`;
(b) rollouts at the recipe's shape (8 syllogism prompts x G=6, up to 300 new tokens, temperature 0.7, top_p 0.95):
    HF generate vs FastEngine, real generated tokens/s (only tokens in completion_ids), their ratio, % of the
    fp32 FLOP limit at ~2 x n_params FLOPs per token, and where FastEngine's time goes: `rollout`;
(c) GRPO steps for the same work: TRL's GRPOTrainer and smolthink's `train_grpo.train` (each in its own
    subprocess, so peak RSS is its own): seconds per step, rollout vs train split, peak RSS: `grpo`.

The flags live on the main CLI parser (`add_bench_args`); `main(args)` runs `run_bench`, prints
`tables.format_table` and writes the JSON file. The submodules import torch and the models inside their
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
from .grpo import grpo_bench, run_child
from .limits import gemm_limit, machine_info
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
        add("--engines", type=flag_list("--engines", ("hf", "fast")), default="hf,fast",
            help="rollout engines to compare"),
        add("--parts", type=flag_list("--parts", ("flops", "rollout", "profile", "grpo")),
            default="flops,rollout,grpo", help="any of flops,rollout,profile,grpo"),
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
    `--flag=value` keeps a value that starts with '-' a value."""
    argv = []
    for dest, flag in _user_flags().items():
        value = getattr(args, dest)
        if value is None:
            continue
        argv += [f"{flag}={v}" for v in (value if isinstance(value, list) else [value])]
    return argv


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    """Run the selected parts -> results dict (also what the JSON file holds)."""
    from ..runtime import set_threads

    threads = set_threads(args.threads)
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    results: dict[str, Any] = {"schema": SCHEMA, "machine": machine_info(threads), "args": bench_options(args)}
    limit = None
    if "flops" in parts:
        print("(a) fp32 GEMM limit", file=sys.stderr, flush=True)
        results["gemm"] = gemm_limit()
        limit = results["gemm"]["limit_gflops_48"]
    if parts & {"rollout", "profile"}:
        from ..models import load_model

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
        results["grpo"] = grpo_bench(args, bench_argv(args))
        if results.get("gemm"):
            results["training_flops"] = training_flops(results, args)
    results["machine"]["load_avg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return results


def main(args: argparse.Namespace) -> int:
    """`smolthink bench [flags]`: run the bench, print the table, write the JSON file; with --child, run one GRPO
    side (this is how `grpo_bench` starts its subprocesses)."""
    if args.child:
        run_child(args)
        return 0
    results = run_bench(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(format_table(results))
    print(f"results: {out}")
    return 0
