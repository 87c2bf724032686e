"""`smolthink pipeline`: base eval -> warm-up traces -> SFT -> GRPO -> final eval -> report, in one run
directory. Each stage writes <stage>/DONE last; a rerun skips finished stages and resumes an interrupted one."""
from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from .config import GRPOConfig, PipelineConfig, SFTConfig, build_config, save_config, stage_shared, to_dict
from .log import console, eval_table, write_json

log = logging.getLogger(__name__)
STAGES = ("base_eval", "data", "sft", "grpo", "final_eval", "report")


class StageStopped(Exception):
    """A training stage stopped early on Ctrl-C / SIGTERM after saving a checkpoint: not DONE."""


def stage_done(run: Path, stage: str) -> bool:
    """True when the stage finished in an earlier run."""
    return (run / stage / "DONE").is_file()


def mark_done(run: Path, stage: str, seconds: float) -> None:
    """Record a finished stage and its wall time (timings.json)."""
    (run / stage).mkdir(parents=True, exist_ok=True)
    (run / stage / "DONE").write_text(f"{seconds:.1f}\n")
    timings_path = run / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    timings[stage] = round(seconds, 1)
    write_json(timings_path, timings)


def base_eval(cfg: PipelineConfig, run: Path) -> None:
    """Evaluate the untrained model on the held-out set."""
    from .chat import template_prefill
    from .evaluate import evaluate
    from .log import progress_bar, write_jsonl
    from .models import eos_ids, load_model
    from .rollout import make_engine
    from .runtime import render_prompts
    from .sandbox import Scorer
    from .tasks import make_examples, parse_tasks
    from .types import SamplingParams

    specs = parse_tasks(cfg.task)
    examples = make_examples(specs, cfg.eval_n, cfg.seed, "eval", balanced=True)
    model, tok = load_model(cfg.model)
    engine = make_engine("auto", model, eos_ids(tok, model), tok.pad_token_id)
    with Scorer() as scorer, progress_bar("base eval", len(examples)) as advance:
        summary, records = evaluate(model, tok, engine, examples, render_prompts(tok, examples), scorer, specs,
                                    SamplingParams(cfg.eval_max_new_tokens, 0.0, 1.0), seed=cfg.seed, batch_size=64,
                                    prefill=template_prefill(tok), progress=advance)
    summary.update(step=0, model=cfg.model or "embedded", task=str(cfg.task), stage="base")
    write_json(run / "base_eval" / "eval.json", summary)
    write_jsonl(run / "base_eval" / "completions.jsonl", records)
    console.print(eval_table(summary, "base model"))


def make_data(cfg: PipelineConfig, run: Path) -> None:
    """Warm-up traces from train questions (never eval questions)."""
    from .data import make_traces
    from .tasks import make_examples, parse_tasks

    specs = parse_tasks(cfg.task)
    eval_q = [e.question for e in make_examples(specs, cfg.eval_n, cfg.seed, "eval", balanced=True)]
    model = tok = None
    if cfg.data_source == "teacher":
        from .models import load_model

        model, tok = load_model(cfg.teacher_model or cfg.model)
    stats = make_traces(cfg.data_source, specs, cfg.num_traces, cfg.seed, run / "data" / "traces.jsonl",
                        exclude_questions=eval_q, model=model, tokenizer=tok)
    write_json(run / "data" / "stats.json", stats)
    log.info("warm-up traces: kept %s of %s (rejection rate %.1f%%)", stats.get("kept"), stats.get("requested"),
             100 * stats.get("rejection_rate", 0.0))


def run_sft(cfg: PipelineConfig, run: Path) -> None:
    """LoRA SFT on the traces."""
    from .train_sft import train_sft

    sft_cfg = build_config(SFTConfig, [stage_shared(cfg), {"eval_at_start": False,
                                                           "data": str(run / "data" / "traces.jsonl")}, cfg.sft])
    out = run / "sft"
    if train_sft(sft_cfg, out, resume=_resumable(out)) is None:
        raise StageStopped("sft")


def run_grpo(cfg: PipelineConfig, run: Path) -> None:
    """GRPO from the SFT model."""
    from .train_grpo import train

    grpo_cfg = build_config(GRPOConfig, [stage_shared(cfg), {"eval_at_start": False,
                                                             "model": str(run / "sft" / "final" / "merged")}, cfg.grpo])
    out = run / "grpo"
    if train(grpo_cfg, out, resume=_resumable(out)) is None:
        raise StageStopped("grpo")


def final_eval(cfg: PipelineConfig, run: Path) -> None:
    """The GRPO stage's last eval (same held-out set) is the final eval: copied, not recomputed."""
    evals = sorted((run / "grpo" / "eval").glob("step_*.json"))
    if not evals:
        raise FileNotFoundError("grpo stage wrote no eval")
    last = evals[-1]
    summary = json.loads(last.read_text())
    summary["stage"] = "final"
    (run / "final_eval").mkdir(parents=True, exist_ok=True)
    write_json(run / "final_eval" / "eval.json", summary)
    comp = last.with_name(last.stem + ".completions.jsonl")
    if comp.exists():
        shutil.copyfile(comp, run / "final_eval" / "completions.jsonl")
    console.print(eval_table(summary, "final model (after GRPO)"))


def make_report(cfg: PipelineConfig, run: Path) -> None:
    """report.md and plots from the run directory."""
    from .report import write_report

    path = write_report(run)
    log.info("report: %s", path)


def _resumable(stage_dir: Path) -> bool:
    """Resume a stage that was interrupted after its first checkpoint; restart one that never checkpointed."""
    from .checkpoint import latest_checkpoint

    if latest_checkpoint(stage_dir) is not None:
        return True
    if stage_dir.exists():
        shutil.rmtree(stage_dir)
    return False


RUNNERS: dict[str, Callable[[PipelineConfig, Path], None]] = {
    "base_eval": base_eval, "data": make_data, "sft": run_sft, "grpo": run_grpo, "final_eval": final_eval,
    "report": make_report,
}


def run_pipeline(cfg: PipelineConfig, run: Path) -> dict[str, Any]:
    """Run every unfinished stage in order -> {stage: seconds}."""
    import gc

    from .runtime import set_threads, trim_heap

    run.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run / "pipeline.yaml")
    set_threads(cfg.threads)
    timings = {}
    t_all = time.time()
    for i, stage in enumerate(STAGES, 1):
        if stage_done(run, stage):
            log.info("[%d/%d] %s: done in an earlier run, skipped", i, len(STAGES), stage)
            continue
        log.info("[%d/%d] %s ... (pipeline elapsed %s)", i, len(STAGES), stage, _elapsed(t_all))
        t0 = time.time()
        try:
            RUNNERS[stage](cfg, run)
        except StageStopped:
            log.warning("stage %s stopped before the end (checkpoint saved); rerun `smolthink pipeline --out %s` to "
                        "continue", stage, run)
            return timings
        timings[stage] = time.time() - t0
        gc.collect()  # the stage's model, optimizer and engine caches, before the next stage loads its own
        trim_heap()
        mark_done(run, stage, timings[stage])
        log.info("[%d/%d] %s finished in %s", i, len(STAGES), stage, _elapsed(t0))
    return timings


def _elapsed(t0: float) -> str:
    from .log import fmt_duration

    return fmt_duration(time.time() - t0)
