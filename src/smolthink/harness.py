"""The training harness both loops (SFT, GRPO) share, so each loop is only its own phases:

* `TrainContext`: what every stage builds at set-up (policy, tokenizer, accelerate, optimizer, schedule, training
  numerics, scorer, held-out evaluator), typed;
* `build_context`: that set-up;
* `training_run(out_dir, resume)`: a context manager owning the run directory's life: which checkpoint to
  continue from (`open_run`), leftovers of killed writes, Ctrl-C / SIGTERM (finish the step, checkpoint, stop),
  the metrics writer, per-step logging with ETA, the stop after too many non-finite steps, periodic, interrupt and
  final checkpoints, the final eval and model, and DONE;
* `clip_and_step`: sum the processes' gradients, clip, optimizer step unless the loss or gradient is NaN/inf, zero
  grads (the one grad-norm line);
* `save_step`: the loop's checkpoint, with every process's RNG.

Under torchrun / `accelerate launch` every process runs the loop in lock-step (`parallel`); process 0 alone
writes the run directory (config, metrics, evals, checkpoints, final model, DONE) and runs the evals, the others
wait for it.
"""
from __future__ import annotations

import contextlib
import logging
import math
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from . import parallel
from .checkpoint import MANIFEST, Checkpoint, newest_intact, rng_state, save_checkpoint, step_dirs
from .config import StageConfig
from .configlib import config_yaml
from .errors import SmolthinkError, Stopped
from .evaluate import Evaluator, eval_metrics, make_evaluator
from .log import MetricsWriter, console, eval_table
from .onednn import OneDNNLinears
from .precision import Autocast, training_device, training_numerics
from .rss import process_peak_gb, rss_phase
from .rundir import RunDir, atomic_write, discard, remove_leftovers
from .runtime import between_phases, make_optimizer, make_scheduler, set_threads
from .tasks import TaskSpec, parse_tasks

log = logging.getLogger(__name__)


@dataclass
class TrainContext:
    """Everything a training stage builds at set-up; the loops add their own fields in a subclass."""

    cfg: StageConfig
    run: RunDir
    specs: list[TaskSpec]
    model: torch.nn.Module  # prepared by accelerate (unwrap with accelerator.unwrap_model)
    tok: Any
    accelerator: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    numerics: OneDNNLinears | Autocast  # `with numerics.active():` around training forwards (see `precision`)
    scorer: Any
    evaluator: Evaluator

    @property
    def params(self) -> list[torch.Tensor]:
        """The trainable parameters."""
        return [p for p in self.model.parameters() if p.requires_grad]

    @property
    def device(self) -> torch.device:
        """Where training tensors go."""
        return self.accelerator.device


def start_process(cfg: StageConfig) -> None:
    """Threads, then torch's and Python's global RNGs seeded (LoRA's initialisation draws from torch's; data
    order and sampling take their own seeded generators). First thing a stage's set-up does."""
    set_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)


def build_context(cls: type, cfg: StageConfig, run: RunDir, total_steps: int, model, tok, **extra: Any) -> Any:
    """Finish a stage's set-up around its loaded policy (LoRA attached): accelerate, AdamW and its schedule over
    `total_steps`, the training numerics (`precision`), the sandboxed scorer and the held-out evaluator ->
    `cls(...)` (a TrainContext subclass; `extra` fills its own fields)."""
    from accelerate import Accelerator

    from .sandbox import Scorer

    specs = parse_tasks(cfg.task)
    accelerator = Accelerator(cpu=training_device() == "cpu")
    optimizer = make_optimizer(model, cfg)
    # placed (and mixed precision applied) but not wrapped in DDP, whose reducer the log-prob path never calls:
    # `clip_and_step` sums the processes' gradients instead (see `parallel`)
    model = accelerator.prepare_model(model, evaluation_mode=True)
    optimizer = accelerator.prepare_optimizer(optimizer)
    scheduler = make_scheduler(optimizer, cfg.lr_scheduler_type, cfg.warmup_steps, total_steps)
    scorer = Scorer(timeout=cfg.reward.scorer_timeout)
    evaluator = make_evaluator(model, tok, specs, cfg.eval, cfg.reward, cfg.seed, scorer,
                               engine=getattr(cfg, "engine", "auto"))
    return cls(cfg=cfg, run=run, specs=specs, model=model, tok=tok, accelerator=accelerator, optimizer=optimizer,
               scheduler=scheduler,
               numerics=training_numerics(model, accelerator.device, cfg.onednn_linears, cfg.precision,
                                          cfg.use_lora),
               scorer=scorer, evaluator=evaluator, **extra)


def clip_and_step(ctx: TrainContext, loss: float) -> dict[str, float]:
    """Sum the gradients over the processes, clip them (when max_grad_norm > 0), step the optimizer and the
    schedule, zero the gradients. A step whose `loss` (the step's summed loss, over every process) or gradient norm
    is NaN or inf is skipped on every process: weights, optimizer moments and the schedule stay as they were, and
    only the gradients are dropped -> {"grad_norm": the pre-clip norm, "train/skipped_nonfinite": 1.0 when skipped,
    else 0.0}."""
    params = ctx.params
    parallel.sum_gradients(params)
    if ctx.cfg.max_grad_norm > 0:
        norm = float(ctx.accelerator.clip_grad_norm_(params, ctx.cfg.max_grad_norm))
    else:
        norm = float(torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))
    finite = math.isfinite(loss) and math.isfinite(norm)  # both already on the host: no extra sync
    if finite:
        ctx.optimizer.step()
        ctx.scheduler.step()
    ctx.optimizer.zero_grad(set_to_none=True)
    return {"grad_norm": norm, "train/skipped_nonfinite": 0.0 if finite else 1.0}


def run_eval(ctx: TrainContext, step: int) -> dict[str, Any]:
    """The held-out eval after `step` optimizer steps -> eval/step_XXXXXX.json (+ completions); run by process 0,
    its summary handed to every process. The eval itself hands its pages back and re-checks the threads after
    every batch (`evaluate.evaluate`)."""
    def evaluate() -> dict[str, Any]:
        with rss_phase("eval"):
            return ctx.evaluator.run(ctx.model, ctx.run.eval(step), ctx.run.eval_completions(step),
                                     {"step": step, "model": ctx.cfg.model or "embedded", "task": str(ctx.cfg.task)})
    return parallel.from_main(evaluate)


def save_step(ctx: TrainContext, step: int, counters: dict[str, Any], extra: dict[str, Any] | None = None) -> Path:
    """Checkpoint the loop after `step` optimizer steps (`checkpoint.save_checkpoint`): every process's RNG state
    gathered, process 0 writes -> the checkpoint's path, on every process."""
    (rngs,) = parallel.gather_lists([rng_state()])
    return parallel.from_main(lambda: save_checkpoint(ctx.run.checkpoints, step, ctx.model, ctx.optimizer,
                                                      ctx.scheduler, counters, extra, keep=ctx.cfg.keep_checkpoints,
                                                      rng_states=rngs))


@dataclass
class TrainingRun:
    """What `training_run` hands a loop. The loop calls `start` once its state exists, `end_step` after each
    optimizer step, and returns `finish(...)`."""

    run: RunDir
    resume_from: Checkpoint | None  # the checkpoint to continue from, read and verified (None: from step 0)
    stop_signal: str | None = None  # set by the first Ctrl-C / SIGTERM: finish this step, checkpoint, stop
    metrics: MetricsWriter | None = None
    ctx: TrainContext | None = None
    save: Callable[[], Path] | None = None  # checkpoints the loop's state after its last finished step
    t_start: float = field(default_factory=time.time)
    steps_timed: int = 0
    t_step: float = field(default_factory=time.time)
    nonfinite_streak: int = 0  # optimizer steps skipped in a row for a NaN/inf loss or gradient

    @property
    def stopping(self) -> bool:
        """True once a stop signal arrived, on any process (a collective: every process reads it at the same
        points, the loop's condition and `finish`, so all of them stop after the same step)."""
        return parallel.any_process(self.stop_signal is not None)

    def start(self, ctx: TrainContext, step: int, save: Callable[[], Path], config: Any = None) -> None:
        """Begin (or continue at `step`): write config.yaml on a fresh run, open metrics.jsonl (dropping lines past
        a resumed checkpoint), evaluate before the first step when configured."""
        self.ctx, self.save = ctx, save
        if parallel.is_main():
            if self.resume_from is None:
                atomic_write(self.run.config, config_yaml(config if config is not None else ctx.cfg))
            self.metrics = MetricsWriter(self.run.metrics,
                                         truncate_after_step=step if self.resume_from is not None else None)
        if self.resume_from is None and ctx.cfg.eval.n > 0 and ctx.cfg.eval.at_start:
            run_eval(ctx, 0)
        self.t_start = self.t_step = time.time()

    def end_step(self, step: int, total: int, metrics: dict[str, Any], line: Callable[..., str]) -> None:
        """After optimizer step `step` of `total`: add memory and step time, evaluate when due, write the metrics
        row and print the console line with its ETA every log_every steps (process 0), stop after
        max_nonfinite_steps skipped steps in a row (SmolthinkError), checkpoint when due."""
        cfg = self.ctx.cfg
        between_phases()  # activations and merged weights are gone: hand their pages back
        metrics.update({"perf/peak_rss_gb": process_peak_gb(), "perf/step_s": time.time() - self.t_step})
        if cfg.eval.every and step % cfg.eval.every == 0 and step < total and cfg.eval.n:
            metrics.update(eval_metrics(run_eval(self.ctx, step)))
        self.steps_timed += 1
        eta = (time.time() - self.t_start) / self.steps_timed * (total - step)
        if self.metrics is not None:  # process 0
            self.metrics.write(step, metrics)
            if step % cfg.log_every == 0 or step == total or step == 1:
                console.print(line(step, total, metrics, metrics["perf/step_s"], eta), soft_wrap=True, markup=False)
        self.check_nonfinite(step, metrics["train/skipped_nonfinite"])
        if cfg.save_every and step % cfg.save_every == 0 and step < total:
            self.save()
        self.t_step = time.time()

    def check_nonfinite(self, step: int, skipped: float) -> None:
        """Count a step skipped for a NaN/inf loss or gradient (warned); raise SmolthinkError once
        max_nonfinite_steps came in a row (training diverged: more steps would skip too)."""
        if not skipped:
            self.nonfinite_streak = 0
            return
        self.nonfinite_streak += 1
        limit = self.ctx.cfg.max_nonfinite_steps
        log.warning("step %d skipped: NaN or inf loss or gradient (%d in a row, stop at %d)", step,
                    self.nonfinite_streak, limit)
        if self.nonfinite_streak >= limit:
            raise SmolthinkError(f"stopped at step {step}: {self.nonfinite_streak} steps in a row had a NaN or inf "
                                 f"loss or gradient (max_nonfinite_steps={limit}); lower learning_rate, or check "
                                 f"the data and reward functions")

    def finish(self, step: int, title: str) -> dict[str, Any]:
        """The end: checkpoint; when stopped by a signal raise Stopped (saying how to continue); else the final
        eval ({} without one), the final model (peft adapter + merged) and DONE -> the final eval summary. The
        checkpoint refuses non-finite weights, so a NaN model never reaches final/."""
        self.save()
        if self.stopping:
            signum = signal.Signals[self.stop_signal].value if self.stop_signal else None
            raise Stopped(f"stopped at step {step}, checkpoint saved; continue with --resume {self.run.root}", signum)
        ctx, final = self.ctx, {}
        if ctx.cfg.eval.n > 0:
            final = run_eval(ctx, step)
            if parallel.is_main():
                console.print(eval_table(final, f"{title} (step {step})"))
        parallel.from_main(lambda: self.write_final(step))
        return final

    def write_final(self, step: int) -> None:
        """The final model (peft adapter + merged) and DONE."""
        from .models import save_final

        with rss_phase("save_final"):
            save_final(self.ctx.accelerator.unwrap_model(self.ctx.model), self.ctx.tok, self.run.final)
        log.info("final model: %s/merged (transformers) and %s/adapter (peft)", self.run.final, self.run.final)
        self.run.mark_done(time.time() - self.t_start, steps=step)


def _stop_handler(tr: TrainingRun):
    """The first Ctrl-C / SIGTERM finishes the current step and checkpoints; a second Ctrl-C aborts at once (the
    checkpoint then holds the last finished step)."""
    def handler(signum, frame):
        if tr.stop_signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        tr.stop_signal = signal.Signals(signum).name
        log.warning("%s: stopping after this step (Ctrl-C again to stop now)", tr.stop_signal)
    return handler


def open_run(run: RunDir, resume: bool) -> Checkpoint | None:
    """Decide how a run starts in `run.root` and tidy it -> the checkpoint to continue from, or None for step 0.

    A directory holds a run when it has DONE or an intact checkpoint (one that matches its manifest and loads).
    * fresh (resume=False): a directory that holds a run is refused; one that does not (a run stopped before its
      first checkpoint) is cleared and started again;
    * resume (of an existing directory): continue from the newest intact checkpoint, deleting newer damaged ones
      (each logged with the reason); with none intact, refuse when damaged checkpoints or DONE are there, else
      clear it and start from step 0.
    Leftovers of killed writes and unfinished step directories (no manifest) are deleted once it is decided (by
    process 0, once every process has read the directory)."""
    if resume and not run.root.is_dir():
        raise SmolthinkError(f"nothing to resume: {run.root} does not exist")
    ckpt, damaged = newest_intact(run.checkpoints)
    if not resume and (ckpt is not None or run.done() is not None):
        raise SmolthinkError(f"{run.root} already holds a run: pass --resume {run.root} or another --out")
    if resume and ckpt is None and run.done() is not None:
        raise SmolthinkError(f"{run.root} holds a finished run and no intact checkpoint to continue it from")
    if resume and ckpt is None and damaged:
        reasons = "; ".join(f"{p.name}: {why}" for p, why in damaged)
        raise SmolthinkError(f"no intact checkpoint to resume in {run.root} ({reasons}); start it again with "
                             f"--out {run.root}")
    parallel.barrier()
    if parallel.is_main():
        tidy_run(run, ckpt, damaged)
    parallel.barrier()
    return ckpt


def tidy_run(run: RunDir, ckpt: Checkpoint | None, damaged: list[tuple[Path, str]]) -> None:
    """`open_run`'s decision carried out: leftovers of killed writes and unfinished checkpoints deleted; a run
    resumed from `ckpt` loses the damaged checkpoints newer than it; without one, a started directory is cleared."""
    for parent in (run.root, run.checkpoints):
        remove_leftovers(parent)
    for d in step_dirs(run.checkpoints):
        if not (d / MANIFEST).is_file():  # a write or a deletion that was killed part-way
            log.warning("removing unfinished checkpoint %s", d)
            discard(d)
    for path, why in damaged:
        log.warning("skipping damaged checkpoint %s: %s", path, why)
    if ckpt is None:
        if run.started():
            log.warning("%s holds no intact checkpoint yet: starting the run again from step 0", run.root)
            run.clear()
        run.root.mkdir(parents=True, exist_ok=True)
        return
    for path, _ in damaged:  # newer than the one resumed from: the resumed run writes those steps again
        discard(path)


def holds_run(run_dir: Path) -> bool:
    """True when `run_dir` has DONE or an intact checkpoint (what `open_run` refuses to start afresh over)."""
    run = RunDir(Path(run_dir))
    return run.done() is not None or newest_intact(run.checkpoints)[0] is not None


@contextlib.contextmanager
def training_run(out_dir: Path, resume: bool) -> Iterator[TrainingRun]:
    """Own one training run's directory: pick the checkpoint to continue from and tidy the directory
    (`open_run`), install the stop handlers, and on the way out save a checkpoint on an abort (second Ctrl-C; on
    one process only, as processes interrupted at different points cannot meet to checkpoint), restore the
    handlers and close the metrics and the scorer. Processes other than 0 log warnings and errors only."""
    if not parallel.is_main():
        logging.getLogger("smolthink").setLevel(logging.WARNING)
    run = RunDir(Path(out_dir))
    tr = TrainingRun(run, open_run(run, resume))
    previous = {sig: signal.signal(sig, _stop_handler(tr)) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield tr
    except KeyboardInterrupt:
        if tr.save is not None and parallel.world() == 1:
            tr.ctx.optimizer.zero_grad(set_to_none=True)
            path = tr.save()
            log.warning("interrupted: checkpoint saved to %s; continue with --resume %s", path, run.root)
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if tr.metrics is not None:
            tr.metrics.close()
        if tr.ctx is not None:
            tr.ctx.scorer.close()
    if tr.stop_signal is not None:  # it arrived after finish's last look (during the final eval or save)
        raise Stopped(f"{tr.stop_signal} arrived after the last step: the run in {run.root} finished, nothing else "
                      f"starts", signal.Signals[tr.stop_signal].value)
