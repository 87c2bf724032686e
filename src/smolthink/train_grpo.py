"""The GRPO loop (`smolthink train`): collect experience (G samples per question, strict rewards, group
advantages) into an unpadded buffer, then train on random minibatches with the clipped PPO surrogate and
gradient accumulation; eval, samples, atomic checkpoints and exact resume (through `harness.training_run`).
Reads as named phases."""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .buffer import Experience, ExperienceBuffer
from .checkpoint import restore_checkpoint, save_checkpoint
from .config import GRPOConfig
from .grpo import group_advantages, policy_loss, zero_std_groups
from .groups import GroupResult, group_metrics, group_results
from .harness import TrainContext, TrainingRun, build_context, clip_and_step, start_process, training_run
from .log import step_line
from .packing import Packing, fill_old_logprobs, make_packing
from .questions import QuestionSource, make_source
from .rewards import load_functions, score_completions
from .rundir import write_jsonl
from .runtime import load_policy, render_prompts, trim_heap
from .seeds import derive_seed
from .task_metrics import per_task_metrics
from .tasks import parse_tasks, train_eval_split
from .types import Example, RewardParts, Rollout, SamplingParams

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


@dataclass
class Fill:
    """What one buffer fill collected."""

    exps: list[Experience]
    stats: dict[str, float]
    samples: list[dict]  # the first few decoded completions
    groups: list[GroupResult]


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


def rollout_batch(ctx: GRPOContext, examples: list[Example], index: int) -> tuple:
    """Generate G completions per question and score them -> (rollouts [P][G], texts [P*G], reward parts [P*G],
    advantages [P, G], zero-std flags [P])."""
    cfg: GRPOConfig = ctx.cfg
    sampling = SamplingParams(cfg.max_completion_length, cfg.temperature, cfg.top_p, cfg.top_k)
    rollouts = ctx.engine.generate(ctx.model, render_prompts(ctx.tok, examples), cfg.num_generations, sampling,
                                   seed=derive_seed(cfg.seed, "rollout", index))  # [P][G]
    flat = [r for row in rollouts for r in row]
    texts = [ctx.tok.decode(r.completion_ids, skip_special_tokens=True) for r in flat]
    parts = score_completions(texts, [ex for ex in examples for _ in range(cfg.num_generations)],
                              [len(r.completion_ids) for r in flat], ctx.scorer, ctx.specs,
                              cfg.reward, cfg.max_completion_length, ctx.evaluator.prefill, ctx.user_fns)
    rewards = torch.tensor([p.total for p in parts], dtype=torch.float32).view(len(examples), -1)  # [P, G]
    return rollouts, texts, parts, group_advantages(rewards, cfg.scale_rewards), zero_std_groups(rewards)


def collect_experience(ctx: GRPOContext, state: LoopState) -> Fill:
    """Fill a buffer: rollout batches of P questions (from the question source) x G samples, scored and turned into
    group advantages; each batch's groups go back to the source (curricula, replay). Zero-signal groups are
    counted, and dropped (with a cap on extra batches) when drop_zero_std_groups."""
    cfg: GRPOConfig = ctx.cfg
    min_batches = derived_numbers(cfg)["rollouts_per_fill"]
    exps, all_parts, all_rollouts, groups, samples = [], [], [], [], []
    t0, batches = time.time(), 0
    while len(exps) < cfg.buffer_size:
        drawn = ctx.source.next_batch(cfg.prompts_per_rollout, state.rollouts)
        examples = [d.example for d in drawn]
        rollouts, texts, parts, adv, zero = rollout_batch(ctx, examples, state.rollouts)
        state.rollouts += 1
        batches += 1
        batch_groups = group_results(examples, [d.origin for d in drawn], [d.level for d in drawn], rollouts,
                                     parts, zero.tolist())
        ctx.source.record(batch_groups)
        drop = cfg.drop_zero_std_groups and batches - min_batches < cfg.max_resample_attempts
        for b, group in enumerate(batch_groups):
            group.dropped = drop and group.zero_std
            if group.dropped:
                continue
            for g in range(cfg.num_generations):
                k = b * cfg.num_generations + g
                r = rollouts[b][g]
                exps.append(Experience(prompt_ids=r.prompt_ids, completion_ids=r.completion_ids, old_logp=None,
                                       advantage=float(adv[b, g]), reward=parts[k].total,
                                       parts={"correct": parts[k].correct, "format": parts[k].format},
                                       truncated=r.truncated, group=state.rollouts * 1000 + b))
                if len(samples) < 12:
                    samples.append({"prompt": examples[b].question, "completion": texts[k],
                                    "gold": examples[b].answer, "reward": parts[k].total,
                                    "correct": parts[k].correct, "format": parts[k].format,
                                    "advantage": float(adv[b, g]), "truncated": r.truncated})
        groups += batch_groups
        all_parts += parts
        all_rollouts += [r for row in rollouts for r in row]
    stats = fill_stats(cfg, all_parts, all_rollouts, time.time() - t0)
    stats.update(group_metrics(groups))
    stats.update(per_task_metrics(groups, all_parts, [s.name for s in ctx.specs]))
    stats.update({"rollout/batches": float(batches), "rollout/extra_batches": float(batches - min_batches)})
    stats.update(ctx.source.metrics(groups))
    return Fill(exps, stats, samples, groups)


def fill_stats(cfg: GRPOConfig, parts: list[RewardParts], rollouts: list[Rollout], seconds: float) -> dict[str, float]:
    """Reward, length and rollout-speed metrics of a fill's completions (dropped groups included)."""
    rs = torch.tensor([p.total for p in parts])
    n = len(parts)
    lengths = [len(r.completion_ids) for r in rollouts]
    stats = {"reward/mean": rs.mean().item(), "reward/std": rs.std().item() if n > 1 else 0.0,
             "reward/correct": sum(p.correct for p in parts) / n,
             "reward/format": sum(p.format for p in parts) / n,
             "reward/partial": sum(p.partial for p in parts) / n,
             "reward/length": sum(p.length for p in parts) / n,
             "reward/scoring_errors": float(sum(p.error is not None for p in parts)),
             "completion/mean_len": sum(lengths) / n,
             "completion/clipped_frac": sum(r.truncated for r in rollouts) / n,
             "perf/rollout_s": seconds, "perf/rollout_tok_s": sum(lengths) / max(seconds, 1e-9)}
    for name in cfg.reward.functions:
        stats[f"reward/{name.partition('=')[0]}"] = sum(p.extras.get(name.partition('=')[0], 0.0)
                                                      for p in parts) / n
    return stats


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


def fill_buffer(ctx: GRPOContext, state: LoopState, buffer: ExperienceBuffer, on_policy: bool) -> float:
    """Collect a buffer fill (on a copy of the counters, and the question source's state is taken only once the
    fill is complete, so an interrupt mid-collection leaves the state of the last finished step), plan its
    optimizer steps, and compute old log-probs when more than one update follows -> rollout seconds."""
    fill_state = dataclasses.replace(state)
    fill = collect_experience(ctx, fill_state)
    trim_heap()  # the rollout's KV caches are gone: hand their pages back before training
    buffer.clear()
    buffer.extend(fill.exps)
    state.rollouts, state.source = fill_state.rollouts, ctx.source.state_dict()
    state.fill_stats, state.samples = {**fill.stats, "rollout/fill": float(state.fills)}, fill.samples
    state.groups = [g.row(state.step + 1, state.fills) for g in fill.groups]
    state.plan = plan_steps(buffer, ctx.cfg, state.fills)
    state.fills += 1
    if not on_policy:
        t0 = time.time()
        with ctx.onednn.active():
            fill_old_logprobs(ctx.model, buffer, ctx.packing, ctx.cfg.temperature, ctx.cfg.minibatch_size,
                              ctx.device)
        state.fill_stats["perf/old_logp_s"] = time.time() - t0
    return state.fill_stats["perf/rollout_s"]


def chunk_backward(ctx: GRPOContext, batch, n_seqs: int, n_tok: int) -> tuple[float, dict[str, Any]]:
    """Forward and backward of one chunk of a step: per-token log-probs, the clipped surrogate normalised by the
    whole step's sequence / token counts, gradients accumulated -> (loss value, loss stats)."""
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
    ctx.accelerator.backward(loss)
    return loss.item(), stats


def accumulate(totals: dict[str, float], loss: float, stats: dict[str, Any], weight: float) -> None:
    """Fold one chunk's loss and stats into the step's: sums, token-weighted means, mins and maxes."""
    totals["loss/total"] = totals.get("loss/total", 0.0) + loss
    for k, v in stats.items():
        if k.endswith("/min"):
            totals[k] = min(totals.get(k, float("inf")), float(v))
        elif k.endswith("/max"):
            totals[k] = max(totals.get(k, float("-inf")), float(v))
        else:
            totals[k] = totals.get(k, 0.0) + float(v) * weight


def optimizer_step(ctx: GRPOContext, buffer: ExperienceBuffer, minibatches: list[list[int]]) -> dict[str, float]:
    """One optimizer step over gradient_accumulation minibatches, each split into chunks of at most
    max_tokens_per_forward tokens; normalisers are the whole step's, so the accumulated gradient equals the
    big-batch gradient. A NaN/inf loss or gradient skips the update (`harness.clip_and_step`)."""
    t0 = time.time()
    items = [i for mb in minibatches for i in mb]
    n_seqs = len(items)
    n_tok = sum(len(buffer.items[i].completion_ids) for i in items)
    totals: dict[str, float] = {}
    tokens_run = 0
    with ctx.onednn.active():  # forward and backward (checkpointed head chunks recompute in backward)
        for idx in ctx.packing.chunks(buffer, minibatches):
            batch = ctx.packing.collate(buffer, idx, ctx.device)
            loss, stats = chunk_backward(ctx, batch, n_seqs, n_tok)
            accumulate(totals, loss, stats, batch.completion_mask.sum().item() / max(n_tok, 1))
            tokens_run += ctx.packing.computed_tokens(batch)
    lr = ctx.scheduler.get_last_lr()[0]
    totals.update(clip_and_step(ctx, totals["loss/total"]))
    seconds = time.time() - t0
    seq_tokens = sum(buffer.seq_len(i) for i in items)
    totals.update({"lr": lr, "perf/train_s": seconds,
                   "perf/train_tok_s": seq_tokens / max(seconds, 1e-9),
                   "perf/train_computed_tok_s": tokens_run / max(seconds, 1e-9),
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

def setup(cfg: GRPOConfig, run) -> GRPOContext:
    """Build everything a run needs: the question source, policy, engine, scorer, optimizer, scheduler,
    evaluator."""
    start_process(cfg)
    specs = parse_tasks(cfg.task)
    train, eval_set = train_eval_split(specs, cfg.train_size, cfg.eval.n, cfg.seed, balanced_eval=cfg.eval.balanced)
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
    return save_checkpoint(ctx.run.checkpoints, state.step, ctx.model, ctx.optimizer, ctx.scheduler, counters,
                           extra, keep=ctx.cfg.keep_checkpoints)


def restore(ctx: GRPOContext, tr: TrainingRun, buffer: ExperienceBuffer) -> LoopState:
    """A fresh loop state, or the checkpoint's (weights, optimizer, RNG, buffer and question source restored)."""
    if tr.resume_from is None:
        return LoopState(source=ctx.source.state_dict())
    counters, extra = restore_checkpoint(tr.resume_from, ctx.model, ctx.optimizer, ctx.scheduler)
    state = LoopState(step=counters["step"], rollouts=counters["rollouts"], fills=counters["fills"], **extra)
    buffer.load_state_dict(state.buffer)
    ctx.source.load_state_dict(state.source)
    log.info("resumed from %s (step %d)", tr.resume_from.path, state.step)
    return state


def describe(cfg: GRPOConfig, d: dict[str, Any]) -> None:
    """The derived numbers, once at start-up."""
    log.info("GRPO: %d prompts x G=%d = %d completions per rollout; %d rollouts per buffer fill (%d completions); "
             "%d sequences per optimizer step (%d x %d accumulation); %d optimizer steps per fill%s; "
             "%d steps = %d fills", cfg.prompts_per_rollout, cfg.num_generations, d["completions_per_rollout"],
             d["rollouts_per_fill"], d["completions_per_fill"], d["sequences_per_step"], cfg.minibatch_size,
             cfg.gradient_accumulation_steps, d["steps_per_fill"],
             " (on-policy: old log-prob pass skipped)" if d["on_policy"] else "", cfg.max_steps, d["fills"])


# ---------------------------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------------------------

def train(cfg: GRPOConfig, out_dir: Path, resume: bool = False) -> dict[str, Any] | None:
    """Run GRPO for cfg.max_steps optimizer steps into out_dir; returns the final eval summary ({} when eval.n
    is 0), or None when stopped by Ctrl-C / SIGTERM (a checkpoint is saved; continue with resume=True)."""
    with training_run(out_dir, resume) as tr:
        # ---- 1. set-up: data, policy, engine, scorer, optimizer ----
        ctx = setup(cfg, tr.run)
        d = derived_numbers(cfg)
        describe(cfg, d)
        # ---- 2. start or resume ----
        buffer = ExperienceBuffer()
        state = restore(ctx, tr, buffer)
        tr.start(ctx, state.step, save=lambda: save(ctx, state, buffer))
        while state.step < cfg.max_steps and not tr.stopping:
            # ---- 3. experience: a new buffer fill when the planned steps are used up ----
            rollout_s = fill_buffer(ctx, state, buffer, d["on_policy"]) if not state.plan else 0.0
            # ---- 4. one optimizer step ----
            m = optimizer_step(ctx, buffer, state.plan[0])
            state.plan.pop(0)
            state.step += 1
            # ---- 5. samples, groups, log, eval, checkpoint ----
            if cfg.sample_every and (state.step % cfg.sample_every == 0 or state.step == 1) and rollout_s:
                write_jsonl(tr.run.samples(state.step), [{"step": state.step, **s} for s in state.samples])
            if rollout_s:
                write_jsonl(tr.run.groups(state.step), state.groups)
            tr.end_step(state.step, cfg.max_steps, {**state.fill_stats, **m, "perf/rollout_s": rollout_s}, step_line)
        # ---- 6. the end: checkpoint, final eval, final model, DONE ----
        return tr.finish(state.step, "final eval")
