"""The GRPO loop (`smolthink train`): collect experience (G samples per question, strict rewards, group
advantages) into an unpadded buffer, then train on random minibatches with the clipped PPO surrogate and
gradient accumulation; eval, samples, atomic checkpoints and exact resume (through `harness.training_run`).
Reads as named phases.

Across N processes (`parallel`): every process draws the same rollout batch and generates and scores its slice
of the questions (sampling seeded per process); the batch's results are gathered to every process, which then
holds the same buffer, question source and plan, and trains on its rows of each optimizer step."""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .buffer import ExperienceBuffer
from . import parallel
from .checkpoint import restore_checkpoint
from .config import GRPOConfig
from .errors import SmolthinkError
from .grpo import policy_loss
from .harness import TrainContext, TrainingRun, build_context, clip_and_step, save_step, start_process, training_run
from .log import step_line
from .experience import collect_experience
from .packing import Packing, fill_old_logprobs, make_packing
from .questions import QuestionSource, make_source
from .rewards import load_functions
from .rundir import write_jsonl
from .rss import rss_phase
from .runtime import between_phases, load_policy
from .seeds import derive_seed
from .tasks import parse_tasks, train_eval_split

log = logging.getLogger(__name__)


@dataclass
class GRPOContext(TrainContext):
    """The shared context plus GRPO's own pieces: where questions come from (train set, curricula, replay), how
    forwards are chunked, the rollout engine (the evaluator's), user reward functions, and (full fine-tuning with
    beta > 0) a frozen reference copy."""

    source: QuestionSource | None = None
    packing: Packing | None = None
    user_fns: list = field(default_factory=list)
    ref_model: Any = None

    @property
    def engine(self):
        """The rollout engine (the same one evaluates)."""
        return self.evaluator.engine


@dataclass
class LoopState:
    """Everything besides weights/optimizer that exact resume needs (JSON-able counters + torch-saved extras)."""

    step: int = 0  # optimizer steps done
    rollouts: int = 0  # rollout batches generated (seeds the sampler)
    fills: int = 0  # buffer fills done (seeds minibatch order)
    plan: list = field(default_factory=list)  # pending optimizer steps: [[minibatch indices, ...], ...]
    fill_stats: dict = field(default_factory=dict)  # stats of the fill being trained on
    buffer: dict = field(default_factory=dict)  # ExperienceBuffer.state_dict()
    samples: list = field(default_factory=list)  # a few decoded rollouts of the current fill
    groups: list = field(default_factory=list)  # groups/step_*.jsonl rows of the current fill
    source: dict = field(default_factory=dict)  # QuestionSource.state_dict() after the last finished fill


def derived_numbers(cfg: GRPOConfig) -> dict[str, Any]:
    """How rollout batches, buffer fills and optimizer steps relate (printed at start-up)."""
    per_rollout = cfg.prompts_per_rollout * cfg.num_generations
    rollouts_per_fill = math.ceil(cfg.buffer_size / per_rollout)
    per_fill = rollouts_per_fill * per_rollout
    per_step = cfg.minibatch_size * cfg.gradient_accumulation_steps
    steps_per_fill = cfg.num_iterations * math.ceil(per_fill / per_step)
    return {"completions_per_rollout": per_rollout, "rollouts_per_fill": rollouts_per_fill,
            "completions_per_fill": per_fill, "sequences_per_step": per_step, "steps_per_fill": steps_per_fill,
            "fills": math.ceil(cfg.max_steps / steps_per_fill), "on_policy": steps_per_fill == 1}


def plan_steps(buffer: ExperienceBuffer, cfg: GRPOConfig, fill: int) -> list[list[list[int]]]:
    """Split num_iterations shuffled passes over the buffer into optimizer steps of
    gradient_accumulation_steps minibatches each (the last step of a pass may be smaller)."""
    plan = []
    keep = None
    if cfg.mask_truncated_completions:
        keep = {i for i, e in enumerate(buffer.items) if not e.truncated}
    for it in range(cfg.num_iterations):
        gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "plan", fill, it))
        mbs = [mb for mb in buffer.minibatches(cfg.minibatch_size, gen, group_by_length=cfg.group_by_length)]
        if keep is not None:
            mbs = [[i for i in mb if i in keep] for mb in mbs]
            mbs = [mb for mb in mbs if mb]
        for s in range(0, len(mbs), cfg.gradient_accumulation_steps):
            plan.append(mbs[s : s + cfg.gradient_accumulation_steps])
    return plan


def fill_buffer(ctx: GRPOContext, state: LoopState, buffer: ExperienceBuffer) -> float:
    """Collect a buffer fill (on a copy of the counters, and the question source's state is taken only once the
    fill is complete, so an interrupt mid-collection leaves the state of the last finished step), plan its
    optimizer steps, and compute old log-probs when more than one update follows -> rollout seconds. That is
    decided from the plan, not the config: dynamic sampling's last batch can overfill the buffer by whole groups,
    and the extra step it makes runs off-policy."""
    fill_state = dataclasses.replace(state)
    fill = collect_experience(ctx, fill_state, derived_numbers(ctx.cfg)["rollouts_per_fill"])
    between_phases()  # the rollout's KV caches are gone: hand their pages back before training
    buffer.clear()
    buffer.extend(fill.exps)
    state.rollouts, state.source = fill_state.rollouts, ctx.source.state_dict()
    state.fill_stats, state.samples = {**fill.stats, "rollout/fill": float(state.fills)}, fill.samples
    state.groups = [g.row(state.step + 1, state.fills) for g in fill.groups]
    state.plan = plan_steps(buffer, ctx.cfg, state.fills)
    state.fills += 1
    if len(state.plan) > 1:
        t0 = time.time()
        old_logprobs(ctx, buffer)
        state.fill_stats["perf/old_logp_s"] = time.time() - t0
    return state.fill_stats["perf/rollout_s"]


def old_logprobs(ctx: GRPOContext, buffer: ExperienceBuffer) -> None:
    """Every buffer item's old log-probs, with the training numerics: each process computes its slice of the
    buffer, then the slices are gathered to every process."""
    mine = parallel.share(range(len(buffer)))
    with ctx.numerics.active():
        fill_old_logprobs(ctx.model, buffer, ctx.packing, ctx.cfg.temperature, ctx.cfg.minibatch_size, ctx.device,
                          indices=mine)
    (pairs,) = parallel.gather_lists([(i, buffer.items[i].old_logp) for i in mine])
    for i, old in pairs:
        buffer.items[i].old_logp = old


def chunk_backward(ctx: GRPOContext, batch, n_seqs: int, n_tok: int) -> tuple[float, dict[str, Any]]:
    """Forward and backward of one chunk of a step: per-token log-probs, the clipped surrogate normalised by the
    whole step's sequence / token counts, gradients accumulated -> (loss value, loss stats, with the
    engine/trainer log-prob mismatch when the engine gave log-probs: against old_logp, which the sampling weights
    gave, so later steps of a fill measure numerics, not how far the policy moved since)."""
    cfg = ctx.cfg
    logp, entropy = ctx.packing.logprobs(ctx.model, batch, cfg.temperature, with_entropy=True,
                                         entropy_grad=cfg.entropy_coef != 0)  # [n, T] each
    ref = reference_logprobs(ctx, batch) if cfg.beta > 0 else None
    old = batch.old_logp if batch.old_logp is not None else logp.detach()  # on-policy: ratio exactly 1
    loss, stats = policy_loss(logp, old, batch.advantages, batch.completion_mask, epsilon=cfg.epsilon,
                              epsilon_high=cfg.epsilon_high, loss_type=cfg.loss_type,
                              max_completion_length=cfg.max_completion_length, ref_logp=ref, beta=cfg.beta,
                              entropy=entropy, entropy_coef=cfg.entropy_coef,
                              num_sequences_total=n_seqs, num_tokens_total=n_tok)
    if batch.engine_logp is not None:  # against the sampling weights' log-probs: numerics, not policy drift
        stats.update(logp_mismatch(old, batch.engine_logp, batch.completion_mask))
    ctx.accelerator.backward(loss)
    return loss.item(), stats


def logp_mismatch(logp: torch.Tensor, engine_logp: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """|log p_engine - log p_trainer| over the sampled tokens (mask [n, T] 1 on them; logp, engine_logp [n, T],
    the same weights and temperature) -> "rollout/logp_mismatch" (token mean) and "rollout/logp_mismatch/max".
    The sampler's numerics (e.g. bf16 weights) against the trainer's: an off-policy error the ratio never sees."""
    gap = (logp - engine_logp).abs()[mask.bool()]  # [K]
    if gap.numel() == 0:
        return {}
    return {"rollout/logp_mismatch": gap.mean(), "rollout/logp_mismatch/max": gap.max()}


def accumulate(totals: dict[str, float], loss: float, stats: dict[str, Any], weight: float) -> None:
    """Fold one chunk's loss and stats into the step's: sums, token-weighted means, mins and maxes."""
    parallel.fold(totals, "loss/total", loss)
    for k, v in stats.items():
        parallel.fold(totals, k, float(v), weight)


def optimizer_step(ctx: GRPOContext, buffer: ExperienceBuffer, minibatches: list[list[int]]) -> dict[str, float]:
    """One optimizer step over gradient_accumulation minibatches (this process's rows of them), each split into
    chunks of at most max_tokens_per_forward tokens; normalisers are the whole step's, so the accumulated gradient,
    summed over the processes, equals the big-batch gradient, and the loss and stats are the whole step's. A NaN/inf
    loss or gradient skips the update (`harness.clip_and_step`)."""
    t0 = time.time()
    items = [i for mb in minibatches for i in mb]
    n_seqs = len(items)
    n_tok = sum(len(buffer.items[i].completion_ids) for i in items)
    totals: dict[str, float] = {}
    tokens_run = 0
    with ctx.numerics.active():  # forward and backward (checkpointed head chunks recompute in backward)
        for idx in ctx.packing.chunks(buffer, parallel.rows(minibatches)):
            batch = ctx.packing.collate(buffer, idx, ctx.device)
            loss, stats = chunk_backward(ctx, batch, n_seqs, n_tok)
            accumulate(totals, loss, stats, batch.completion_mask.sum().item() / max(n_tok, 1))
            tokens_run += ctx.packing.computed_tokens(batch)
    totals["perf/train_computed_tok_s"] = float(tokens_run)  # a token count (summed over processes) until / seconds
    totals = parallel.merge(totals)
    lr = ctx.scheduler.get_last_lr()[0]
    totals.update(clip_and_step(ctx, totals["loss/total"]))
    seconds = time.time() - t0
    seq_tokens = sum(buffer.seq_len(i) for i in items)
    totals.update({"lr": lr, "perf/train_s": seconds,
                   "perf/train_tok_s": seq_tokens / max(seconds, 1e-9),
                   "perf/train_computed_tok_s": totals["perf/train_computed_tok_s"] / max(seconds, 1e-9),
                   "train/sequences": float(n_seqs)})
    return totals


@torch.no_grad()
def reference_logprobs(ctx: GRPOContext, batch) -> torch.Tensor:
    """Log-probs under the reference policy: the same model with the LoRA adapter disabled (no second copy),
    or a frozen copy under full fine-tuning."""
    cfg, model = ctx.cfg, ctx.model
    if cfg.use_lora:
        with model.disable_adapter():
            return ctx.packing.logprobs(model, batch, cfg.temperature)[0]
    if ctx.ref_model is None:
        import copy

        ctx.ref_model = copy.deepcopy(model).requires_grad_(False).eval()
    return ctx.packing.logprobs(ctx.ref_model, batch, cfg.temperature)[0]


# ---------------------------------------------------------------------------------------------------------------
# set-up, checkpoints
# ---------------------------------------------------------------------------------------------------------------

def grpo_questions(cfg: GRPOConfig, specs) -> tuple[list, list]:
    """The run's (train, held-out eval) questions; a task that cannot produce that many distinct ones raises
    SmolthinkError."""
    return train_eval_split(specs, cfg.train_size, cfg.eval.n, cfg.seed, balanced_eval=cfg.eval.balanced,
                            balanced_train=cfg.balanced_train)


def setup(cfg: GRPOConfig, run) -> GRPOContext:
    """Build everything a run needs: the question source, policy, engine, scorer, optimizer, scheduler,
    evaluator."""
    start_process(cfg)
    if cfg.prompts_per_rollout < parallel.world():
        raise SmolthinkError(f"prompts_per_rollout ({cfg.prompts_per_rollout}) must be at least the number of "
                             f"processes ({parallel.world()}): each generates a share of every rollout batch")
    specs = parse_tasks(cfg.task)
    train, eval_set = grpo_questions(cfg, specs)
    source = make_source(cfg, specs, train, (e.question for e in eval_set))
    model, tok = load_policy(cfg)
    return build_context(GRPOContext, cfg, run, cfg.max_steps, model, tok, source=source,
                         packing=make_packing("prompt" if cfg.share_prompts else None, cfg.max_tokens_per_forward,
                                              tok.pad_token_id, cfg.gradient_checkpointing),
                         user_fns=load_functions(cfg.reward.functions))


def save(ctx: GRPOContext, state: LoopState, buffer: ExperienceBuffer) -> Path:
    """Checkpoint the state after the last finished optimizer step."""
    state.buffer = buffer.state_dict()
    counters = {k: getattr(state, k) for k in ("rollouts", "fills")}
    extra = {k: getattr(state, k) for k in ("plan", "fill_stats", "buffer", "samples", "groups", "source")}
    return save_step(ctx, state.step, counters, extra)


def restore(ctx: GRPOContext, tr: TrainingRun, buffer: ExperienceBuffer) -> LoopState:
    """A fresh loop state, or the checkpoint's (weights, optimizer, RNG, buffer and question source restored)."""
    if tr.resume_from is None:
        return LoopState(source=ctx.source.state_dict())
    counters, extra = restore_checkpoint(tr.resume_from, ctx.model, ctx.optimizer, ctx.scheduler, parallel.rank(),
                                         parallel.world())
    state = LoopState(step=counters["step"], rollouts=counters["rollouts"], fills=counters["fills"], **extra)
    buffer.load_state_dict(state.buffer)
    ctx.source.load_state_dict(state.source)
    log.info("resumed from %s (step %d)", tr.resume_from.path, state.step)
    return state


def write_fill(tr: TrainingRun, cfg: GRPOConfig, state: LoopState, rollout_s: float) -> None:
    """After the first step of a fill: its groups file, and its samples when due."""
    if cfg.sample_every and (state.step % cfg.sample_every == 0 or state.step == 1) and rollout_s:
        write_jsonl(tr.run.samples(state.step), [{"step": state.step, **s} for s in state.samples])
    if rollout_s:
        write_jsonl(tr.run.groups(state.step), state.groups)


def describe(cfg: GRPOConfig, d: dict[str, Any]) -> None:
    """The derived numbers, once at start-up."""
    log.info("GRPO: %d prompts x G=%d = %d completions per rollout; %d rollouts per buffer fill (%d completions); "
             "%d sequences per optimizer step (%d x %d accumulation); %d optimizer steps per fill%s; "
             "%d steps = %d fills", cfg.prompts_per_rollout, cfg.num_generations, d["completions_per_rollout"],
             d["rollouts_per_fill"], d["completions_per_fill"], d["sequences_per_step"], cfg.minibatch_size,
             cfg.gradient_accumulation_steps, d["steps_per_fill"],
             (" (on-policy: old log-prob pass skipped" + (", except for a fill that dynamic sampling overfills"
                                                          if cfg.drop_zero_std_groups else "") + ")")
             if d["on_policy"] else "", cfg.max_steps, d["fills"])


# ---------------------------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------------------------

def train(cfg: GRPOConfig, out_dir: Path, resume: bool = False) -> dict[str, Any]:
    """Run GRPO for cfg.max_steps optimizer steps into out_dir -> the final eval summary ({} when eval.n is 0);
    raises errors.Stopped when Ctrl-C / SIGTERM stopped it (a checkpoint is saved; continue with resume=True)."""
    with training_run(out_dir, resume) as tr:
        # ---- 1. set-up: data, policy, engine, scorer, optimizer ----
        with rss_phase("setup"):
            ctx = setup(cfg, tr.run)
        d = derived_numbers(cfg)
        describe(cfg, d)
        # ---- 2. start or resume ----
        buffer = ExperienceBuffer()
        state = restore(ctx, tr, buffer)
        tr.start(ctx, state.step, save=lambda: save(ctx, state, buffer))
        while state.step < cfg.max_steps and not tr.stopping:
            # ---- 3. experience: a new buffer fill when the planned steps are used up ----
            with rss_phase("rollout"):
                rollout_s = fill_buffer(ctx, state, buffer) if not state.plan else 0.0
            # ---- 4. one optimizer step ----
            with rss_phase("train"):
                m = optimizer_step(ctx, buffer, state.plan[0])
            state.plan.pop(0)
            state.step += 1
            # ---- 5. samples, groups (process 0), log, eval, checkpoint ----
            if parallel.is_main():
                write_fill(tr, cfg, state, rollout_s)
            tr.end_step(state.step, cfg.max_steps, {**state.fill_stats, **m, "perf/rollout_s": rollout_s}, step_line)
        # ---- 6. the end: checkpoint, final eval, final model, DONE ----
        return tr.finish(state.step, "final eval")
