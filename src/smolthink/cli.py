"""The `smolthink` command: eval | train | sft | data | pipeline | bench | report | serve | tasks."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from .config import ENGINES
from .configlib import flag_type
from .errors import SmolthinkError, run_reported
from .rundir import PipelineDir, RunDir, writable_dir, writable_file

log = logging.getLogger("smolthink")


def flag_values(args: argparse.Namespace, keys: dict[str, str]) -> dict[str, Any]:
    """{config key: value} for the flags the user gave (flags default to None, so the config's own defaults stay
    the one source); keys maps a flag's dest to its dotted config key."""
    return {key: getattr(args, dest) for dest, key in keys.items() if getattr(args, dest, None) is not None}


def load_command_config(cls, args: argparse.Namespace, flags: dict[str, str]):
    """Config from defaults <- --config YAML <- flags <- --set overrides."""
    from .config import build_config
    from .configlib import load_yaml, parse_overrides

    sources = [load_yaml(args.config) if getattr(args, "config", None) else {}]
    return build_config(cls, sources + [flag_values(args, flags), parse_overrides(args.set or [])])


EVAL_FLAGS = {"model": "model", "task": "task", "seed": "seed", "threads": "threads", "engine": "engine",
              "n": "eval.n", "samples": "eval.samples", "max_new_tokens": "eval.max_new_tokens",
              "temperature": "eval.temperature", "top_p": "eval.top_p", "batch_size": "eval.batch_size",
              "balanced": "eval.balanced", "scorer_timeout": "reward.scorer_timeout"}


def cmd_eval(args: argparse.Namespace) -> None:
    """Evaluate a model on a held-out, balanced set and print the summary table."""
    from .config import EvalRunConfig
    from .evaluate import make_evaluator
    from .log import console, eval_table, progress_bar
    from .models import load_model
    from .runtime import set_threads
    from .sandbox import Scorer
    from .tasks import parse_tasks

    cfg = load_command_config(EvalRunConfig, args, EVAL_FLAGS)
    out = writable_dir(Path(args.out), "--out") if args.out else None
    set_threads(cfg.threads)
    model, tok = load_model(cfg.model)
    with Scorer(timeout=cfg.reward.scorer_timeout) as scorer:
        ev = make_evaluator(model, tok, parse_tasks(cfg.task), cfg.eval, cfg.reward, cfg.seed, scorer, cfg.engine)
        log.info("evaluating %s on %d %s questions (%s), %d sample(s) each, engine %s",
                 cfg.model or "embedded SmolLM2-135M-Instruct", len(ev.examples), cfg.task,
                 "balanced" if cfg.eval.balanced else "unbalanced", cfg.eval.samples, type(ev.engine).__name__)
        with progress_bar("eval", len(ev.examples)) as advance:
            summary = ev.run(model, out / "eval.json" if out else None, out / "completions.jsonl" if out else None,
                             {"step": 0, "model": cfg.model or "embedded", "task": str(cfg.task)}, progress=advance)
    console.print(eval_table(summary, f"{cfg.task}: {summary['model']}"))
    if out:
        log.info("wrote %s and %s", out / "eval.json", out / "completions.jsonl")


STAGE_FLAGS = {"model": "model", "task": "task"}


def resolve_run_dir(args: argparse.Namespace, kind: str) -> tuple[Path, bool]:
    """(run directory, resuming?) from --out / --resume; a fresh default name under runs/. Resuming without
    --config reads the run's own resolved config.yaml."""
    import time

    if args.resume:
        out = Path(args.resume)
        if not args.config and (out / "config.yaml").is_file():
            args.config = str(out / "config.yaml")
        return out, True
    if args.out:
        return Path(args.out), False
    return Path("runs") / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}", False


def run_stage(args: argparse.Namespace, kind: str, cls: type, train) -> None:
    """One training stage from the command line: run directory, config, then `train(cfg, out, resume=)` (a run
    that a signal stopped raises Stopped after its checkpoint)."""
    out, resume = resolve_run_dir(args, kind)
    cfg = load_command_config(cls, args, STAGE_FLAGS)
    if not resume:
        writable_dir(out, "run directory")
    log.info("run directory: %s", out)
    train(cfg, out, resume=resume)


def cmd_train(args: argparse.Namespace) -> None:
    """GRPO training."""
    from .config import GRPOConfig
    from .train_grpo import train

    run_stage(args, "grpo", GRPOConfig, train)


def cmd_sft(args: argparse.Namespace) -> None:
    """Warm-up LoRA SFT on reasoning traces."""
    from .config import SFTConfig
    from .train_sft import train_sft

    run_stage(args, "sft", SFTConfig, train_sft)


def cmd_pipeline(args: argparse.Namespace) -> None:
    """The whole recipe in one run directory."""
    from .config import build_pipeline_config
    from .configlib import load_yaml, parse_overrides
    from .pipeline import run_pipeline

    out = Path(args.out or args.resume or "runs/pipeline")
    if not args.config and (out / "pipeline.yaml").is_file():
        args.config = str(out / "pipeline.yaml")  # a rerun continues with the run's own config
    sources = [load_yaml(args.config) if args.config else {}, flag_values(args, STAGE_FLAGS)]
    cfg = build_pipeline_config(sources + [parse_overrides(args.set or [])])
    run_pipeline(cfg, out)


def cmd_report(args: argparse.Namespace) -> None:
    """Report from a run directory."""
    from .report import write_report

    run = Path(args.run_dir)
    if not run.is_dir():
        raise SmolthinkError(f"no such run directory: {run}")
    if not (RunDir(run).is_run() or PipelineDir(run).is_pipeline()):
        raise SmolthinkError(f"{run} is not a run directory (no config.yaml, metrics.jsonl, eval/ or pipeline "
                             "stages)")
    log.info("wrote %s", write_report(run))


DATA_FLAGS = {"model": "model", "task": "task", "seed": "seed", "source": "data.source", "n": "data.num_traces",
              "base_url": "data.api_base_url", "api_model": "data.api_model", "concurrency": "data.api_concurrency",
              "eval_n": "eval.n"}


def cmd_data(args: argparse.Namespace) -> None:
    """Warm-up traces: scripted solvers, a local teacher, or an OpenAI-compatible API teacher."""
    from .config import DataRunConfig
    from .data import make_traces, require_traces, trace_specs
    from .evaluate import eval_examples
    from .runtime import set_threads
    from .tasks import parse_tasks

    cfg = load_command_config(DataRunConfig, args, DATA_FLAGS)
    out = writable_file(Path(args.out), "--out")
    set_threads(cfg.threads)
    eval_q = [e.question for e in eval_examples(parse_tasks(cfg.task), cfg.eval, cfg.seed)]
    stats = make_traces(cfg.data, trace_specs(cfg.data, cfg.task), cfg.seed, out, exclude_questions=eval_q,
                        reward=cfg.reward, policy_model=cfg.model)
    require_traces(stats)
    log.info("kept %s of %s traces (rejection rate %.1f%%) -> %s", stats.get("kept"), stats.get("requested"),
             100 * stats.get("rejection_rate", 0.0), args.out)


def cmd_serve(args: argparse.Namespace) -> None:
    """A local OpenAI-compatible server for a model smolthink can load."""
    from .serve import serve

    serve(args.model, args.host, args.port)


def cmd_bench(args: argparse.Namespace) -> None:
    """Rollout and GRPO-step benchmark vs HF generate and TRL."""
    from .bench import main

    if not args.child:
        writable_file(Path(args.out), "--out")
    main(args)


def cmd_tasks(args: argparse.Namespace) -> None:
    """List reasoning-gym tasks."""
    from .tasks import available_tasks

    print("\n".join(available_tasks()))


def add_config_args(p: argparse.ArgumentParser) -> None:
    """--config and --set, for every command with a config."""
    p.add_argument("--config", default=None, help="YAML config file")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config key, dotted into sections (eval.n=100); repeatable")


def add_stage_args(p: argparse.ArgumentParser) -> None:
    """Flags shared by train / sft / pipeline."""
    add_config_args(p)
    p.add_argument("--model", default=None, help="hub id, local dir, .gguf; default: embedded SmolLM2-135M")
    p.add_argument("--task", default=None, help="task name or mixture 'a:2,b:1'")
    p.add_argument("--out", default=None, help="run directory (default runs/<kind>-<time>)")
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue a run from its last checkpoint")


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree of every subcommand."""
    from . import bench

    p = argparse.ArgumentParser(prog="smolthink", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--debug", action="store_true", help="print the traceback of an error")
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("eval", help="evaluate a model on held-out reasoning-gym questions")
    add_config_args(e)
    e.add_argument("--model", default=None, help="hub id, local dir, .gguf; default: embedded SmolLM2-135M")
    e.add_argument("--task", default=None, help="task name or mixture 'a:2,b:1' (default syllogism)")
    e.add_argument("--n", type=int, default=None, help="questions (eval.n)")
    e.add_argument("--samples", type=int, default=None, help="samples per question: pass@k / mean@k when > 1")
    e.add_argument("--out", default=None, help="directory for eval.json and completions.jsonl")
    e.add_argument("--max-new-tokens", type=int, default=None, help="eval.max_new_tokens")
    e.add_argument("--temperature", type=float, default=None, help="0: greedy (eval.temperature)")
    e.add_argument("--top-p", type=float, default=None, help="eval.top_p")
    e.add_argument("--seed", type=int, default=None)
    e.add_argument("--unbalanced", dest="balanced", action="store_const", const=False, default=None,
                   help="keep the task's natural answer skew")
    e.add_argument("--batch-size", type=int, default=None, help="eval.batch_size")
    e.add_argument("--engine", default=None, choices=ENGINES)
    e.add_argument("--scorer-timeout", type=float, default=None, help="reward.scorer_timeout")
    e.add_argument("--threads", type=int, default=None)
    e.set_defaults(func=cmd_eval)

    t = sub.add_parser("train", help="GRPO training (our own loop)")
    add_stage_args(t)
    t.set_defaults(func=cmd_train)

    sf = sub.add_parser("sft", help="warm-up LoRA SFT on reasoning traces")
    add_stage_args(sf)
    sf.set_defaults(func=cmd_sft)

    da = sub.add_parser("data", help="write verified warm-up traces (JSONL of chat messages)")
    add_config_args(da)
    da.add_argument("--source", default=None, choices=["auto", "scripted", "teacher", "api"], help="data.source")
    da.add_argument("--task", default=None)
    da.add_argument("--n", type=int, default=None, help="traces to keep (data.num_traces)")
    da.add_argument("--out", default="traces.jsonl")
    da.add_argument("--model", default=None, help="local teacher model (source=teacher)")
    da.add_argument("--base-url", default=None, help="OpenAI-compatible base URL (or OPENAI_BASE_URL)")
    da.add_argument("--api-model", default=None, help="API model name (or OPENAI_MODEL); key from OPENAI_API_KEY")
    da.add_argument("--concurrency", type=int, default=None)
    da.add_argument("--eval-n", type=int, default=None, help="eval questions to exclude (same seed as eval)")
    da.add_argument("--seed", type=int, default=None)
    da.set_defaults(func=cmd_data)

    sv = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API (loopback by default)")
    sv.add_argument("--model", default=None)
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=flag_type(int, "--port", ge=0, le=65535), default=8000)
    sv.set_defaults(func=cmd_serve)

    be = sub.add_parser("bench", help="benchmark rollouts and GRPO steps against HF generate and TRL",
                        description=bench.__doc__.split("\n\n")[0],
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    bench.add_bench_args(be)
    be.set_defaults(func=cmd_bench)

    ta = sub.add_parser("tasks", help="list reasoning-gym tasks")
    ta.set_defaults(func=cmd_tasks)

    pl = sub.add_parser("pipeline", help="base eval -> traces -> SFT -> GRPO -> final eval -> report")
    add_stage_args(pl)
    pl.set_defaults(func=cmd_pipeline)

    r = sub.add_parser("report", help="report.md and plots from a run directory")
    r.add_argument("run_dir")
    r.set_defaults(func=cmd_report)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point: run a subcommand -> its exit code. Every failure is one line on stderr (errors.run_reported:
    a traceback only with --debug), Ctrl-C exits 130, a run stopped by a signal 128 + its number."""
    from .nativeenv import native_env
    from .log import setup_logging

    native_env()  # before anything imports torch: the native libraries read it once
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    return run_reported(lambda: args.func(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
