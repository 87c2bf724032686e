"""The `smolthink` command: eval | train | sft | data | pipeline | bench | report | serve | tasks."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .errors import SmolthinkError

log = logging.getLogger("smolthink")


def cmd_eval(args: argparse.Namespace) -> None:
    """Evaluate a model on a held-out, balanced set and print the summary table."""
    from .chat import template_prefill
    from .evaluate import evaluate
    from .log import console, eval_table, progress_bar, write_json, write_jsonl
    from .models import eos_ids, load_model
    from .rollout import make_engine
    from .runtime import render_prompts, set_threads
    from .sandbox import Scorer
    from .tasks import make_examples, parse_tasks
    from .types import SamplingParams

    set_threads(args.threads)
    specs = parse_tasks(args.task)
    examples = make_examples(specs, args.n, args.seed, "eval", balanced=not args.unbalanced)
    model, tok = load_model(args.model)
    engine = make_engine(args.engine, model, eos_ids(tok, model), tok.pad_token_id)
    prompts = render_prompts(tok, examples)
    sampling = SamplingParams(max_new_tokens=args.max_new_tokens,
                              temperature=args.temperature if args.samples > 1 or args.temperature > 0 else 0.0,
                              top_p=args.top_p)
    if args.samples > 1 and sampling.temperature <= 0:
        sampling.temperature = 0.7
    log.info("evaluating %s on %d %s questions (%s), %d sample(s) each, engine %s",
             args.model or "embedded SmolLM2-135M-Instruct", len(examples), args.task,
             "unbalanced" if args.unbalanced else "balanced", args.samples, type(engine).__name__)
    with Scorer(timeout=args.scorer_timeout) as scorer, progress_bar("eval", len(examples)) as advance:
        summary, records = evaluate(model, tok, engine, examples, prompts, scorer, specs, sampling,
                                    samples_per_question=args.samples, batch_size=args.batch_size, seed=args.seed,
                                    prefill=template_prefill(tok), progress=advance)
    summary.update(step=0, model=args.model or "embedded", task=args.task)
    console.print(eval_table(summary, f"{args.task}: {summary['model']}"))
    if args.out:
        out = Path(args.out)
        write_json(out / "eval.json", summary)
        write_jsonl(out / "completions.jsonl", records)
        log.info("wrote %s and %s", out / "eval.json", out / "completions.jsonl")


def load_stage_config(cls, args: argparse.Namespace):
    """Config from defaults <- --config YAML <- --model/--task flags <- --set overrides."""
    from .config import build_config, load_yaml, parse_overrides

    sources = [load_yaml(args.config) if args.config else {}]
    flags = {k: getattr(args, k) for k in ("model", "task") if getattr(args, k, None) is not None}
    return build_config(cls, sources + [flags, parse_overrides(args.set or [])])


def resolve_run_dir(args: argparse.Namespace, kind: str) -> tuple[Path, bool]:
    """(run directory, resuming?) from --out / --resume; a fresh default name under runs/."""
    import time

    if args.resume:
        return Path(args.resume), True
    if args.out:
        return Path(args.out), False
    return Path("runs") / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}", False


def cmd_train(args: argparse.Namespace) -> None:
    """GRPO training."""
    from .config import GRPOConfig, load_yaml
    from .train_grpo import train

    out, resume = resolve_run_dir(args, "grpo")
    if resume and not args.config and (out / "config.yaml").is_file():
        args.config = str(out / "config.yaml")  # resume with the run's own resolved config
    cfg = load_stage_config(GRPOConfig, args)
    log.info("run directory: %s", out)
    train(cfg, out, resume=resume)


def cmd_pipeline(args: argparse.Namespace) -> None:
    """The whole recipe in one run directory."""
    from .config import build_pipeline_config, load_yaml, parse_overrides
    from .pipeline import run_pipeline

    out = Path(args.out or args.resume or "runs/pipeline")
    if not args.config and (out / "pipeline.yaml").is_file():
        args.config = str(out / "pipeline.yaml")  # a rerun continues with the run's own config
    sources = [load_yaml(args.config) if args.config else {}]
    sources.append({k: getattr(args, k) for k in ("model", "task") if getattr(args, k, None) is not None})
    cfg = build_pipeline_config(sources + [parse_overrides(args.set or [])])
    log.info("pipeline run directory: %s", out)
    run_pipeline(cfg, out)


def cmd_report(args: argparse.Namespace) -> None:
    """Report from a run directory."""
    from .report import write_report

    run = Path(args.run_dir)
    if not run.is_dir():
        from .errors import SmolthinkError

        raise SmolthinkError(f"no such run directory: {run}")
    log.info("wrote %s", write_report(run))


def cmd_sft(args: argparse.Namespace) -> None:
    """Warm-up LoRA SFT on reasoning traces."""
    from .config import SFTConfig
    from .train_sft import train_sft

    out, resume = resolve_run_dir(args, "sft")
    if resume and not args.config and (out / "config.yaml").is_file():
        args.config = str(out / "config.yaml")
    cfg = load_stage_config(SFTConfig, args)
    log.info("run directory: %s", out)
    train_sft(cfg, out, resume=resume)


def cmd_data(args: argparse.Namespace) -> None:
    """Warm-up traces: scripted solvers, a local teacher, or an OpenAI-compatible API teacher."""
    from .data import make_traces
    from .tasks import make_examples, parse_tasks

    specs = parse_tasks(args.task)
    eval_q = [e.question for e in make_examples(specs, args.eval_n, args.seed, "eval", balanced=True)]
    model = tok = None
    if args.source == "teacher":
        from .models import load_model

        model, tok = load_model(args.model)
    teacher = {k: v for k, v in (("base_url", args.base_url), ("model", args.api_model), ("api_key", None),
                                  ("concurrency", args.concurrency)) if v is not None}
    stats = make_traces(args.source, specs, args.n, args.seed, Path(args.out), exclude_questions=eval_q,
                        model=model, tokenizer=tok, teacher_kwargs=teacher or None)
    log.info("kept %s of %s traces (rejection rate %.1f%%) -> %s", stats.get("kept"), stats.get("requested"),
             100 * stats.get("rejection_rate", 0.0), args.out)


def cmd_serve(args: argparse.Namespace) -> None:
    """A local OpenAI-compatible server for a model smolthink can load."""
    from .serve import serve

    serve(args.model, args.host, args.port)


def cmd_bench(args: argparse.Namespace) -> None:
    """Rollout and GRPO-step benchmark vs HF generate and TRL."""
    from .bench import main

    main(args)


def cmd_tasks(args: argparse.Namespace) -> None:
    """List reasoning-gym tasks."""
    from .tasks import available_tasks

    print("\n".join(available_tasks()))


def add_stage_args(p: argparse.ArgumentParser) -> None:
    """Flags shared by train / sft / pipeline."""
    p.add_argument("--config", default=None, help="YAML config file")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    p.add_argument("--model", default=None, help="hub id, local dir, .gguf; default: embedded SmolLM2-135M")
    p.add_argument("--task", default=None, help="task name or mixture 'a:2,b:1'")
    p.add_argument("--out", default=None, help="run directory (default runs/<kind>-<time>)")
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue a run from its last checkpoint")


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree of every subcommand."""
    from . import bench

    p = argparse.ArgumentParser(prog="smolthink", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("eval", help="evaluate a model on held-out reasoning-gym questions")
    e.add_argument("--model", default=None, help="hub id, local dir, .gguf; default: embedded SmolLM2-135M")
    e.add_argument("--task", default="syllogism", help="task name or mixture 'a:2,b:1'")
    e.add_argument("--n", type=int, default=100, help="questions")
    e.add_argument("--samples", type=int, default=1, help="samples per question (pass@k / mean@k when > 1)")
    e.add_argument("--out", default=None, help="directory for eval.json and completions.jsonl")
    e.add_argument("--max-new-tokens", type=int, default=300)
    e.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default for 1 sample)")
    e.add_argument("--top-p", type=float, default=0.95)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--unbalanced", action="store_true", help="keep the task's natural answer skew")
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--engine", default="auto", choices=["auto", "fast", "hf"])
    e.add_argument("--scorer-timeout", type=float, default=2.0)
    e.add_argument("--threads", type=int, default=0)
    e.set_defaults(func=cmd_eval)

    t = sub.add_parser("train", help="GRPO training (our own loop)")
    add_stage_args(t)
    t.set_defaults(func=cmd_train)

    sf = sub.add_parser("sft", help="warm-up LoRA SFT on reasoning traces")
    add_stage_args(sf)
    sf.set_defaults(func=cmd_sft)

    da = sub.add_parser("data", help="write verified warm-up traces (JSONL of chat messages)")
    da.add_argument("--source", default="scripted", choices=["scripted", "teacher", "api"])
    da.add_argument("--task", default="syllogism")
    da.add_argument("--n", type=int, default=400, help="traces to keep")
    da.add_argument("--out", default="traces.jsonl")
    da.add_argument("--model", default=None, help="local teacher model (source=teacher)")
    da.add_argument("--base-url", default=None, help="OpenAI-compatible base URL (or OPENAI_BASE_URL)")
    da.add_argument("--api-model", default=None, help="API model name (or OPENAI_MODEL); key from OPENAI_API_KEY")
    da.add_argument("--concurrency", type=int, default=None)
    da.add_argument("--eval-n", type=int, default=400, help="eval questions to exclude (same seed as eval)")
    da.add_argument("--seed", type=int, default=0)
    da.set_defaults(func=cmd_data)

    sv = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API (loopback by default)")
    sv.add_argument("--model", default=None)
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
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
    """Entry point: run a subcommand; user errors print one line, Ctrl-C exits 130."""
    from .log import setup_logging

    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        args.func(args)
    except SmolthinkError as e:
        print(f"smolthink: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("smolthink: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
