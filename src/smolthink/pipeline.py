"""`smolthink pipeline`: base eval -> warm-up traces -> SFT -> GRPO -> final eval -> transfer -> SFT-only
control -> pass@k -> report, in one run directory (`rundir.PipelineDir`). Each stage writes <stage>/DONE last; a
rerun skips finished stages and resumes an interrupted one; a stage turned off (`rl: false` and `sft_control: false`,
the defaults, `passk.enabled: false`, `transfer.tasks: []`) is skipped without a DONE. Without GRPO the SFT model is
the final model. A training stage that Ctrl-C / SIGTERM stopped ends the pipeline as `errors.Stopped`.

The control answers "is the RL worth its time?": SFT-only, continued from the SFT stage's final model (merged, with
a fresh LoRA adapter: the same start and parameterisation GRPO gets) over the same traces (more epochs, not more
traces) for the GRPO stage's wall time as its DONE records it, then the same held-out eval. That wall time
includes GRPO's set-up and final eval, which the control spends training, so the comparison leans towards the
control: an RL gain that survives it is real."""
from __future__ import annotations

import gc
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from .config import GRPOConfig, PipelineConfig, SFTConfig, control_config, final_stage, stage_config
from .configlib import config_yaml
from .errors import SmolthinkError, Stopped
from .log import console, eval_table, fmt_duration
from .rundir import PIPELINE_STAGES, PipelineDir, atomic_write, writable_dir, write_json
from .transfer import run_transfer

log = logging.getLogger(__name__)


def train_stage(stage: str, pipe: PipelineDir, train: Callable[[], Any]) -> None:
    """Run a training stage; Ctrl-C / SIGTERM stopping it early (after its checkpoint; not DONE, so a rerun
    resumes it) ends the pipeline with a Stopped that says how to continue."""
    try:
        train()
    except Stopped as e:
        if pipe.done(stage) is not None:  # the signal came during the stage's final eval: the stage is complete
            raise Stopped(f"the {stage} stage finished, then a signal stopped the pipeline; rerun "
                          f"`smolthink pipeline --out {pipe.root}` to continue with the next stage", e.signum) from None
        raise Stopped(f"the {stage} stage stopped before its end (checkpoint saved); rerun "
                      f"`smolthink pipeline --out {pipe.root}` to continue", e.signum) from None


def eval_questions(cfg: PipelineConfig) -> list[str]:
    """The held-out questions every stage excludes from training."""
    from .evaluate import eval_examples
    from .tasks import parse_tasks

    return [e.question for e in eval_examples(parse_tasks(cfg.task), cfg.eval, cfg.seed)]


def base_eval(cfg: PipelineConfig, pipe: PipelineDir) -> None:
    """Evaluate the untrained model on the held-out set."""
    from .evaluate import make_evaluator
    from .log import progress_bar
    from .models import load_model
    from .sandbox import Scorer
    from .tasks import parse_tasks

    model, tok = load_model(cfg.model)
    with Scorer(timeout=cfg.reward.scorer_timeout) as scorer:
        ev = make_evaluator(model, tok, parse_tasks(cfg.task), cfg.eval, cfg.reward, cfg.seed, scorer)
        with progress_bar("base eval", len(ev.examples)) as advance:
            summary = ev.run(model, pipe.eval_json("base_eval"), pipe.completions("base_eval"),
                             {"step": 0, "model": cfg.model or "embedded", "task": str(cfg.task), "stage": "base"},
                             progress=advance)
    console.print(eval_table(summary, "base model"))


def make_data(cfg: PipelineConfig, pipe: PipelineDir) -> None:
    """Warm-up traces from train questions (never eval questions)."""
    from .data import make_traces, require_traces, trace_specs

    require_traces(make_traces(cfg.data, trace_specs(cfg.data, cfg.task), cfg.seed, pipe.traces,
                               exclude_questions=eval_questions(cfg), reward=cfg.reward, policy_model=cfg.model,
                               stats_path=pipe.data_stats))


def run_sft(cfg: PipelineConfig, pipe: PipelineDir) -> None:
    """LoRA SFT on the traces."""
    from .train_sft import train_sft

    sft_cfg = stage_config(cfg, SFTConfig, **{"eval.at_start": False, "data.path": str(pipe.traces)})
    out = pipe.stage("sft")
    train_stage("sft", pipe, lambda: train_sft(sft_cfg, out, resume=_resumable(out)))


def run_grpo(cfg: PipelineConfig, pipe: PipelineDir) -> None:
    """GRPO from the SFT model."""
    from .train_grpo import train

    grpo_cfg = stage_config(cfg, GRPOConfig, **{"eval.at_start": False,
                                                "model": str(pipe.run("sft").final_merged)})
    out = pipe.stage("grpo")
    train_stage("grpo", pipe, lambda: train(grpo_cfg, out, resume=_resumable(out)))


def final_eval(cfg: PipelineConfig, pipe: PipelineDir) -> None:
    """The final training stage's last eval (same held-out set: GRPO's, or SFT's without RL) is the final eval:
    copied, not recomputed."""
    name = final_stage(cfg)
    run = pipe.run(name)
    steps = run.eval_steps()
    if not steps:
        raise FileNotFoundError(f"{name} stage wrote no eval")
    summary = json.loads(run.eval(steps[-1]).read_text())
    summary["stage"] = "final"
    write_json(pipe.eval_json("final_eval"), summary)
    if run.eval_completions(steps[-1]).exists():
        shutil.copyfile(run.eval_completions(steps[-1]), pipe.completions("final_eval"))
    console.print(eval_table(summary, f"final model (after {name.upper()})"))


def run_sft_control(cfg: PipelineConfig, pipe: PipelineDir) -> None:
    """The equal-time SFT-only control (module docstring): `max_seconds` = the grpo stage's DONE seconds."""
    from .train_sft import train_sft

    budget = (pipe.done("grpo") or {}).get("seconds")
    if not isinstance(budget, (int, float)) or budget <= 0:
        raise SmolthinkError(f"sft_control needs the grpo stage's wall time: {pipe.stage('grpo')}/DONE has none")
    start = pipe.run("sft").final_merged
    ctl_cfg = control_config(cfg, **{"eval.at_start": False, "data.path": str(pipe.traces), "model": str(start),
                                     "max_seconds": float(budget)})
    log.info("sft_control: SFT from %s for %s (the grpo stage's wall time)", start, fmt_duration(budget))
    out = pipe.stage("sft_control")
    train_stage("sft_control", pipe, lambda: train_sft(ctl_cfg, out, resume=_resumable(out)))


def passk_eval(cfg: PipelineConfig, pipe: PipelineDir) -> None:
    """pass@k and mean@k: passk.k samples per question at passk.temperature on the first passk.n held-out
    questions, for the final models of sft, grpo (with rl) and sft_control (when it ran); the same questions and
    sampling seeds for each."""
    import dataclasses

    from .evaluate import make_evaluator
    from .models import load_model
    from .sandbox import Scorer
    from .tasks import parse_tasks

    pk = cfg.passk
    ev_cfg = dataclasses.replace(cfg.eval, samples=pk.k, temperature=pk.temperature, top_p=pk.top_p)
    stages = ["sft"] + (["grpo"] if cfg.rl else []) + (["sft_control"] if cfg.sft_control else [])
    with Scorer(timeout=cfg.reward.scorer_timeout) as scorer:
        for name in stages:
            model, tok = load_model(str(pipe.run(name).final_merged))
            ev = make_evaluator(model, tok, parse_tasks(cfg.task), ev_cfg, cfg.reward, cfg.seed, scorer)
            ev.examples, ev.prompts = ev.examples[: pk.n], ev.prompts[: pk.n]
            summary = ev.run(model, pipe.passk(name), pipe.passk_completions(name),
                             {"model": str(pipe.run(name).final_merged), "task": str(cfg.task),
                              "stage": name})
            console.print(eval_table(summary, f"{name}: {pk.k} samples per question"))
            del model
            gc.collect()


def stage_enabled(cfg: PipelineConfig, stage: str) -> bool:
    """False for a stage the config turns off."""
    return {"grpo": cfg.rl, "sft_control": cfg.sft_control, "passk": cfg.passk.enabled and cfg.eval.n > 0,
            "transfer": bool(cfg.transfer.tasks)}.get(stage, True)


def make_report(cfg: PipelineConfig, pipe: PipelineDir) -> None:
    """report.md and plots from the run directory."""
    from .report import write_report

    log.info("report: %s", write_report(pipe.root))


def _resumable(stage_dir: Path) -> bool:
    """Resume a stage that holds a run (an intact checkpoint); the training run restarts one that never
    checkpointed (`harness.open_run`)."""
    from .harness import holds_run

    return holds_run(stage_dir)


RUNNERS: dict[str, Callable[[PipelineConfig, PipelineDir], None]] = {
    "base_eval": base_eval, "data": make_data, "sft": run_sft, "grpo": run_grpo, "final_eval": final_eval,
    "transfer": run_transfer, "sft_control": run_sft_control, "passk": passk_eval, "report": make_report,
}


def check_question_supply(cfg: PipelineConfig) -> None:
    """Before any stage runs: the task must yield the GRPO stage's train questions, all distinct and apart from
    the held-out set (seconds here; otherwise the run would stop at the GRPO stage, after SFT)."""
    from .tasks import parse_tasks
    from .train_grpo import grpo_questions

    grpo = stage_config(cfg, GRPOConfig)
    try:
        grpo_questions(grpo, parse_tasks(cfg.task))
    except SmolthinkError as e:
        raise SmolthinkError(f"{e} (the GRPO stage needs grpo.train_size={grpo.train_size} train + eval.n="
                             f"{grpo.eval.n} held-out questions): lower them, or widen the task's settings") from None


def run_pipeline(cfg: PipelineConfig, run: Path) -> dict[str, Any]:
    """Run every unfinished stage in order -> {stage: seconds}; raises Stopped when a signal stopped a stage."""
    from .rss import rss_timeline

    pipe = PipelineDir(writable_dir(run, "run directory"))
    if cfg.rl and pipe.done("grpo") is None:  # before the run directory holds a config for a run that cannot start
        check_question_supply(cfg)
    atomic_write(pipe.config, config_yaml(cfg))
    log.info("pipeline run directory: %s", pipe.root)
    with rss_timeline(pipe.rss) as timeline:
        return _run_stages(cfg, pipe, timeline)


def _run_stages(cfg: PipelineConfig, pipe: PipelineDir, timeline) -> dict[str, Any]:
    """The stage loop of `run_pipeline`, each stage an RSS phase of `timeline` (rss.json rewritten after each, so
    the report stage reads the stages before it)."""
    from .rss import rss_phase
    from .runtime import between_phases, set_threads

    set_threads(cfg.threads)
    timings = {}
    t_all = time.time()
    for i, stage in enumerate(PIPELINE_STAGES, 1):
        if pipe.done(stage) is not None:
            log.info("[%d/%d] %s: done in an earlier run, skipped", i, len(PIPELINE_STAGES), stage)
            continue
        if not stage_enabled(cfg, stage):
            log.info("[%d/%d] %s: off in the config, skipped", i, len(PIPELINE_STAGES), stage)
            continue
        log.info("[%d/%d] %s ... (pipeline elapsed %s)", i, len(PIPELINE_STAGES), stage,
                 fmt_duration(time.time() - t_all))
        t0 = time.time()
        with rss_phase(stage):
            RUNNERS[stage](cfg, pipe)
        timings[stage] = time.time() - t0
        gc.collect()  # the stage's model, optimizer and engine caches, before the next stage loads its own
        between_phases()
        timeline.write(pipe.rss)
        steps = (pipe.run(stage).done() or {}).get("steps") if stage in ("sft", "grpo", "sft_control") else None
        pipe.mark_done(stage, timings[stage], steps)
        log.info("[%d/%d] %s finished in %s", i, len(PIPELINE_STAGES), stage, fmt_duration(timings[stage]))
    return timings
