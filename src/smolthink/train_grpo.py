"""The GRPO loop (`smolthink train`): collect experience (G samples per question, strict rewards, group
advantages) into an unpadded buffer, then train on random minibatches with the clipped PPO surrogate and
gradient accumulation; eval, samples, atomic checkpoints and exact resume. Reads as named phases."""
from __future__ import annotations

import dataclasses
import logging
import math
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .buffer import Batch, Experience, ExperienceBuffer, SharedBatch
from .chat import template_prefill
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import GRPOConfig, save_config
from .errors import SmolthinkError
from .grpo import group_advantages, policy_loss, zero_std_groups
from .log import MetricsWriter, console, eval_table, step_line, write_jsonl
from .logprobs import shared_prompt_logprobs, token_logprobs
from .models import eos_ids, save_final
from .onednn import OneDNNLinears
from .rewards import RewardConfig, load_functions, score_completions
from .rollout import make_engine
from .runtime import (load_policy, make_optimizer, make_scheduler, peak_rss_gb, render_prompts, set_threads,
                      trim_heap)
from .sandbox import Scorer
from .stage import eval_metrics, eval_to_dir
from .tasks import parse_tasks, train_eval_split
from .types import SamplingParams

log = logging.getLogger(__name__)
PERF_KEYS = ("time", "perf/")


@dataclass
class LoopState:
    """Everything besides weights/optimizer that exact resume needs (JSON-able counters + torch-saved extras)."""

    step: int = 0  # optimizer steps done
    rollouts: int = 0  # rollout batches generated (seeds the sampler)
    fills: int = 0  # buffer fills done (seeds minibatch order)
    data_pos: int = 0  # next train question
    plan: list = field(default_factory=list)  # pending optimizer steps: [[minibatch indices, ...], ...]
    fill_stats: dict = field(default_factory=dict)  # stats of the fill being trained on
    buffer: dict = field(default_factory=dict)  # ExperienceBuffer.state_dict()
    samples: list = field(default_factory=list)  # a few decoded rollouts of the current fill


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


def next_questions(train: list, state: LoopState, n: int, seed: int) -> list:
    """The next n train examples: a fresh seeded shuffle each pass over the train set."""
    out = []
    for _ in range(n):
        epoch, i = divmod(state.data_pos, len(train))
        order = list(range(len(train)))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        out.append(train[order[i]])
        state.data_pos += 1
    return out


def collect_experience(ctx: dict, state: LoopState) -> tuple[list[Experience], dict[str, float], list[dict]]:
    """Fill a buffer: rollout batches of P questions x G samples, scored and turned into group advantages.
    Zero-signal groups are counted, and dropped (with a cap on extra batches) when drop_zero_std_groups."""
    cfg: GRPOConfig = ctx["cfg"]
    tok, model = ctx["tok"], ctx["model"]
    sampling = SamplingParams(cfg.max_completion_length, cfg.temperature, cfg.top_p, cfg.top_k)
    min_batches = derived_numbers(cfg)["rollouts_per_fill"]
    exps, all_parts, lengths, truncs, zero, groups, samples = [], [], [], [], 0, 0, []
    t0, gen_tokens, batches = time.time(), 0, 0
    while len(exps) < cfg.buffer_size:
        examples = next_questions(ctx["train"], state, cfg.prompts_per_rollout, cfg.seed)
        prompts = render_prompts(tok, examples)
        rollouts = ctx["engine"].generate(model, prompts, cfg.num_generations, sampling,
                                          seed=cfg.seed * 7919 + state.rollouts)  # [P][G]
        state.rollouts += 1
        batches += 1
        flat = [r for row in rollouts for r in row]
        texts = [tok.decode(r.completion_ids, skip_special_tokens=True) for r in flat]
        parts = score_completions(texts, [ex for ex in examples for _ in range(cfg.num_generations)],
                                  [len(r.completion_ids) for r in flat], ctx["scorer"], ctx["specs"],
                                  ctx["reward_cfg"], cfg.max_completion_length, ctx["prefill"], ctx["user_fns"])
        rewards = torch.tensor([p.total for p in parts], dtype=torch.float32).view(len(examples), -1)  # [P, G]
        adv = group_advantages(rewards, cfg.scale_rewards)  # [P, G]
        flat_zero = zero_std_groups(rewards)  # [P]
        drop = cfg.drop_zero_std_groups and batches - min_batches < cfg.max_resample_attempts
        for b in range(len(examples)):
            groups += 1
            zero += int(flat_zero[b])
            if drop and flat_zero[b]:
                continue
            for g in range(cfg.num_generations):
                k = b * cfg.num_generations + g
                r = flat[k]
                exps.append(Experience(prompt_ids=r.prompt_ids, completion_ids=r.completion_ids, old_logp=None,
                                       advantage=float(adv[b, g]), reward=parts[k].total,
                                       parts={"correct": parts[k].correct, "format": parts[k].format},
                                       truncated=r.truncated, group=state.rollouts * 1000 + b))
                if len(samples) < 12:
                    samples.append({"prompt": examples[b].question, "completion": texts[k],
                                    "gold": examples[b].answer, "reward": parts[k].total,
                                    "correct": parts[k].correct, "format": parts[k].format,
                                    "advantage": float(adv[b, g]), "truncated": r.truncated})
        all_parts += parts
        lengths += [len(r.completion_ids) for r in flat]
        truncs += [r.truncated for r in flat]
        gen_tokens += sum(len(r.completion_ids) for r in flat)
    seconds = time.time() - t0
    rs = torch.tensor([p.total for p in all_parts])
    n = len(all_parts)
    stats = {"reward/mean": rs.mean().item(), "reward/std": rs.std().item() if n > 1 else 0.0,
             "reward/correct": sum(p.correct for p in all_parts) / n,
             "reward/format": sum(p.format for p in all_parts) / n,
             "reward/partial": sum(p.partial for p in all_parts) / n,
             "reward/length": sum(p.length for p in all_parts) / n,
             "reward/scoring_errors": float(sum(p.error is not None for p in all_parts)),
             "reward/frac_zero_std_groups": zero / max(groups, 1),
             "completion/mean_len": sum(lengths) / n, "completion/clipped_frac": sum(truncs) / n,
             "perf/rollout_s": seconds, "perf/rollout_tok_s": gen_tokens / max(seconds, 1e-9)}
    for name in ctx["reward_cfg"].functions:
        stats[f"reward/{name.partition('=')[0]}"] = sum(p.extras.get(name.partition('=')[0], 0.0)
                                                      for p in all_parts) / n
    return exps, stats, samples


def plan_steps(buffer: ExperienceBuffer, cfg: GRPOConfig, fill: int) -> list[list[list[int]]]:
    """Split num_iterations shuffled passes over the buffer into optimizer steps of
    gradient_accumulation_steps minibatches each (the last step of a pass may be smaller)."""
    plan = []
    keep = None
    if cfg.mask_truncated_completions:
        keep = {i for i, e in enumerate(buffer.items) if not e.truncated}
    for it in range(cfg.num_iterations):
        gen = torch.Generator().manual_seed(cfg.seed * 104729 + fill * 31 + it)
        mbs = [mb for mb in buffer.minibatches(cfg.minibatch_size, gen, group_by_length=cfg.group_by_length)]
        if keep is not None:
            mbs = [[i for i in mb if i in keep] for mb in mbs]
            mbs = [mb for mb in mbs if mb]
        for s in range(0, len(mbs), cfg.gradient_accumulation_steps):
            plan.append(mbs[s : s + cfg.gradient_accumulation_steps])
    return plan


@torch.no_grad()
def fill_old_logprobs(ctx: dict, buffer: ExperienceBuffer) -> float:
    """Old per-token log-probs with the training numerics (same function, temperature, masks and oneDNN layers)
    -> seconds."""
    t0 = time.time()
    with ctx["onednn"].active():
        _fill_old_logprobs(ctx, buffer)
    return time.time() - t0


def _fill_old_logprobs(ctx: dict, buffer: ExperienceBuffer) -> None:
    """Set `old_logp` of every buffer item, in the chunks training uses (shared prompts or length-sorted)."""
    cfg = ctx["cfg"]
    order = sorted(range(len(buffer)), key=buffer.seq_len)
    per = cfg.minibatch_size
    for idx in step_chunks(ctx, buffer, [order[s : s + per] for s in range(0, len(order), per)]):
        batch = collate_chunk(ctx, buffer, idx)
        logp, _ = policy_logprobs(ctx["model"], batch, cfg.temperature)
        for row, i in enumerate(idx):
            e = buffer.items[i]
            start = 0 if isinstance(batch, SharedBatch) else batch.prompt_lens[row]
            e.old_logp = logp[row, start : start + len(e.completion_ids)].cpu().clone()


def step_chunks(ctx: dict, buffer: ExperienceBuffer, minibatches: list[list[int]]) -> list[list[int]]:
    """The forward/backward chunks of these minibatches: with shared prompts, each prompt's completions from all
    of them together (one prompt forward per chunk), else each minibatch cut by length; at most
    max_tokens_per_forward computed tokens per chunk either way. Which chunk an item lands in does not change
    the step's gradient (step-wide normalisers)."""
    budget = ctx["cfg"].max_tokens_per_forward
    if ctx["share_prompts"]:
        return buffer.prompt_chunks([i for mb in minibatches for i in mb], budget)
    return [c for mb in minibatches for c in buffer.split_by_tokens(mb, budget)]


def collate_chunk(ctx: dict, buffer: ExperienceBuffer, idx: list[int]) -> Batch | SharedBatch:
    """One chunk as a SharedBatch (shared prompts) or a padded Batch, on the training device."""
    pad = ctx["tok"].pad_token_id
    batch = buffer.collate_shared(idx, pad) if ctx["share_prompts"] else buffer.collate(idx, pad)
    return batch.to(ctx["accelerator"].device)


def computed_tokens(batch: Batch | SharedBatch) -> int:
    """Tokens the chunk's forward runs (padding excluded): P + completions when shared, every row's tokens else."""
    if isinstance(batch, SharedBatch):
        return batch.prompt_ids.shape[1] + int(batch.completion_mask.sum())
    return int(batch.attention_mask.sum())


def policy_logprobs(model, batch: Batch | SharedBatch, temperature: float, with_entropy: bool = False,
                    entropy_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs (and entropies) of a chunk: [n, T] for a Batch, [n, C] for a SharedBatch."""
    if isinstance(batch, SharedBatch):
        return shared_prompt_logprobs(model, batch.prompt_ids, batch.completion_ids, batch.completion_mask,
                                      temperature=temperature, with_entropy=with_entropy, entropy_grad=entropy_grad)
    return token_logprobs(model, batch.input_ids, batch.attention_mask, batch.completion_mask,
                          temperature=temperature, with_entropy=with_entropy, entropy_grad=entropy_grad)


def chunk_backward(ctx: dict, batch, n_seqs: int, n_tok: int) -> tuple[float, dict[str, Any]]:
    """Forward and backward of one chunk of a step: per-token log-probs, the clipped surrogate normalised by the
    whole step's sequence / token counts, gradients accumulated -> (loss value, loss stats)."""
    cfg, model = ctx["cfg"], ctx["model"]
    logp, entropy = policy_logprobs(model, batch, cfg.temperature, with_entropy=True,
                                    entropy_grad=cfg.entropy_coef != 0)  # [n, T] each
    ref = reference_logprobs(ctx, batch) if cfg.beta > 0 else None
    old = batch.old_logp if batch.old_logp is not None else logp.detach()  # on-policy: ratio exactly 1
    loss, stats = policy_loss(logp, old, batch.advantages, batch.completion_mask, epsilon=cfg.epsilon,
                              epsilon_high=cfg.epsilon_high, loss_type=cfg.loss_type,
                              max_completion_length=cfg.max_completion_length, ref_logp=ref, beta=cfg.beta,
                              entropy=entropy, entropy_coef=cfg.entropy_coef,
                              num_sequences_total=n_seqs, num_tokens_total=n_tok)
    ctx["accelerator"].backward(loss)
    return loss.item(), stats


def optimizer_step(ctx: dict, buffer: ExperienceBuffer, minibatches: list[list[int]]) -> dict[str, float]:
    """One optimizer step over gradient_accumulation minibatches, each split into chunks of at most
    max_tokens_per_forward tokens; normalisers are the whole step's, so the accumulated gradient equals the
    big-batch gradient."""
    cfg = ctx["cfg"]
    t0 = time.time()
    items = [i for mb in minibatches for i in mb]
    n_seqs = len(items)
    n_tok = sum(len(buffer.items[i].completion_ids) for i in items)
    totals: dict[str, float] = {}
    tokens_run = 0
    with ctx["onednn"].active():  # forward and backward (checkpointed head chunks recompute in backward)
        for mb in step_chunks(ctx, buffer, minibatches):
            batch = collate_chunk(ctx, buffer, mb)
            loss, stats = chunk_backward(ctx, batch, n_seqs, n_tok)
            weight = batch.completion_mask.sum().item() / max(n_tok, 1)
            totals["loss/total"] = totals.get("loss/total", 0.0) + loss
            for k, v in stats.items():
                if k.endswith("/min"):
                    totals[k] = min(totals.get(k, float("inf")), float(v))
                elif k.endswith("/max"):
                    totals[k] = max(totals.get(k, float("-inf")), float(v))
                else:
                    totals[k] = totals.get(k, 0.0) + float(v) * weight
            tokens_run += computed_tokens(batch)
    grad_norm = clip_and_step(ctx)
    seconds = time.time() - t0
    seq_tokens = sum(buffer.seq_len(i) for i in items)
    totals.update({"grad_norm": grad_norm, "lr": ctx["scheduler"].get_last_lr()[0], "perf/train_s": seconds,
                   "perf/train_tok_s": seq_tokens / max(seconds, 1e-9),
                   "perf/train_computed_tok_s": tokens_run / max(seconds, 1e-9),
                   "train/sequences": float(n_seqs)})
    ctx["scheduler"].step()
    return totals


def clip_and_step(ctx: dict) -> float:
    """Clip gradients (when max_grad_norm > 0), step the optimizer, zero the gradients -> pre-clip norm."""
    cfg, model, opt = ctx["cfg"], ctx["model"], ctx["optimizer"]
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.max_grad_norm > 0:
        norm = float(ctx["accelerator"].clip_grad_norm_(params, cfg.max_grad_norm))
    else:
        norm = float(torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))
    opt.step()
    opt.zero_grad(set_to_none=True)
    return norm


@torch.no_grad()
def reference_logprobs(ctx: dict, batch) -> torch.Tensor:
    """Log-probs under the reference policy: the same model with the LoRA adapter disabled (no second copy),
    or a frozen copy under full fine-tuning."""
    cfg, model = ctx["cfg"], ctx["model"]
    if cfg.use_lora:
        with model.disable_adapter():
            return policy_logprobs(model, batch, cfg.temperature)[0]
    if "ref_model" not in ctx:
        import copy

        ctx["ref_model"] = copy.deepcopy(model).requires_grad_(False).eval()
    return policy_logprobs(ctx["ref_model"], batch, cfg.temperature)[0]


def run_eval(ctx: dict, out_dir: Path, step: int) -> dict[str, Any]:
    """Greedy eval on the held-out set -> eval/step_XXXXXX.json (+ completions)."""
    cfg = ctx["cfg"]
    try:
        return eval_to_dir(ctx["model"], ctx["tok"], ctx["engine"], ctx["eval"], ctx["eval_prompts"], ctx["scorer"],
                           ctx["specs"], out_dir, step,
                           max_new_tokens=cfg.eval_max_new_tokens or cfg.max_completion_length,
                           model_name=cfg.model or "embedded", task=str(cfg.task), reward_cfg=ctx["reward_cfg"],
                           prefill=ctx["prefill"], seed=cfg.seed)
    finally:
        trim_heap()


def setup(cfg: GRPOConfig, out_dir: Path) -> dict[str, Any]:
    """Build everything a run needs: data, policy, engine, scorer, optimizer, scheduler."""
    from accelerate import Accelerator

    set_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    specs = parse_tasks(cfg.task)
    train, eval_set = train_eval_split(specs, cfg.train_size, cfg.eval_n, cfg.seed, balanced_eval=cfg.eval_balanced)
    model, tok = load_policy(cfg)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    optimizer = make_optimizer(model, cfg)
    model, optimizer = accelerator.prepare(model, optimizer)
    scheduler = make_scheduler(optimizer, cfg.lr_scheduler_type, cfg.warmup_steps, cfg.max_steps)
    share = cfg.share_prompts and not cfg.gradient_checkpointing
    if cfg.share_prompts and not share:
        log.info("share_prompts is off: gradient checkpointing does not keep the prompt's KV cache")
    return {"cfg": cfg, "specs": specs, "train": train, "eval": eval_set, "model": model, "tok": tok,
            "share_prompts": share, "onednn": OneDNNLinears(model, cfg.onednn_linears),
            "eval_prompts": render_prompts(tok, eval_set),
            "accelerator": accelerator, "optimizer": optimizer,
            "scheduler": scheduler, "prefill": template_prefill(tok),
            "engine": make_engine(cfg.engine, model, eos_ids(tok, model), tok.pad_token_id),
            "reward_cfg": RewardConfig(cfg.correct_weight, cfg.format_weight, cfg.strict_scoring, cfg.length_penalty,
                                       cfg.length_target, list(cfg.reward_functions)),
            "user_fns": load_functions(cfg.reward_functions)}


def save(ctx: dict, out_dir: Path, state: LoopState, buffer: ExperienceBuffer) -> Path:
    """Checkpoint the state after the last finished optimizer step."""
    state.buffer = buffer.state_dict()
    counters = {k: getattr(state, k) for k in ("rollouts", "fills", "data_pos")}
    extra = {k: getattr(state, k) for k in ("plan", "fill_stats", "buffer", "samples")}
    return save_checkpoint(out_dir / "checkpoints", state.step, ctx["model"], ctx["optimizer"], ctx["scheduler"],
                           counters, extra, keep=ctx["cfg"].keep_checkpoints)


def graceful_stop(stop: dict, sig: int):
    """Signal handler: the first Ctrl-C / SIGTERM finishes the current step and checkpoints; a second Ctrl-C
    aborts at once (the checkpoint then holds the last finished step)."""
    def handler(signum, frame):
        if stop["signal"] is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop["signal"] = signal.Signals(signum).name
        log.warning("%s: stopping after this step (Ctrl-C again to stop now)", stop["signal"])
    return handler


def train(cfg: GRPOConfig, out_dir: Path, resume: bool = False) -> dict[str, Any] | None:
    """Run GRPO for cfg.max_steps optimizer steps into out_dir; returns the final eval summary ({} when eval_n
    is 0), or None when stopped by Ctrl-C / SIGTERM (a checkpoint is saved; continue with resume=True)."""
    out_dir = Path(out_dir)
    # ---- 1. set-up: data, policy, engine, scorer, optimizer ----
    ckpt = latest_checkpoint(out_dir) if resume else None
    if resume and ckpt is None:
        raise SmolthinkError(f"nothing to resume in {out_dir} (no complete checkpoint)")
    if not resume and (out_dir / "metrics.jsonl").exists():
        raise SmolthinkError(f"{out_dir} already holds a run: pass --resume {out_dir} or another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = setup(cfg, out_dir)
    d = derived_numbers(cfg)
    log.info("GRPO: %d prompts x G=%d = %d completions per rollout; %d rollouts per buffer fill (%d completions); "
             "%d sequences per optimizer step (%d x %d accumulation); %d optimizer steps per fill%s; "
             "%d steps = %d fills", cfg.prompts_per_rollout, cfg.num_generations, d["completions_per_rollout"],
             d["rollouts_per_fill"], d["completions_per_fill"], d["sequences_per_step"], cfg.minibatch_size,
             cfg.gradient_accumulation_steps, d["steps_per_fill"],
             " (on-policy: old log-prob pass skipped)" if d["on_policy"] else "", cfg.max_steps, d["fills"])
    state = LoopState()
    buffer = ExperienceBuffer()
    # ---- 2. resume ----
    if ckpt is not None:
        counters, extra = load_checkpoint(ckpt, ctx["model"], ctx["optimizer"], ctx["scheduler"])
        state = LoopState(step=counters["step"], rollouts=counters["rollouts"], fills=counters["fills"],
                          data_pos=counters["data_pos"], **extra)
        buffer.load_state_dict(state.buffer)
        log.info("resumed from %s (step %d)", ckpt, state.step)
    else:
        save_config(cfg, out_dir / "config.yaml")
    metrics = MetricsWriter(out_dir / "metrics.jsonl", truncate_after_step=state.step if ckpt else None)
    stop = {"signal": None}
    previous = {sig: signal.signal(sig, graceful_stop(stop, sig)) for sig in (signal.SIGTERM, signal.SIGINT)}
    scorer = Scorer(timeout=cfg.scorer_timeout)
    ctx["scorer"] = scorer
    final: dict[str, Any] = {}  # the final eval summary ({} without eval); None means stopped by a signal
    try:
        if ckpt is None and cfg.eval_n > 0 and cfg.eval_at_start:
            run_eval(ctx, out_dir, 0)
        t_start, steps_timed = time.time(), 0
        while state.step < cfg.max_steps and stop["signal"] is None:
            t_step = time.time()
            rollout_s = 0.0
            # ---- 3a. experience collection (when the plan is empty; on a copy of the counters, so an
            #      interrupt mid-collection leaves the state of the last finished step) ----
            if not state.plan:
                fill_state = dataclasses.replace(state)
                exps, fill_stats, samples = collect_experience(ctx, fill_state)
                trim_heap()  # the rollout's KV caches are gone: hand their pages back before training
                buffer.clear()
                buffer.extend(exps)
                state.rollouts, state.data_pos = fill_state.rollouts, fill_state.data_pos
                state.fill_stats, state.samples = fill_stats, samples
                state.plan = plan_steps(buffer, cfg, state.fills)
                state.fills += 1
                rollout_s = state.fill_stats["perf/rollout_s"]
                # ---- 3b. old log-probs, only when more than one update follows the fill ----
                if not d["on_policy"]:
                    state.fill_stats["perf/old_logp_s"] = fill_old_logprobs(ctx, buffer)
            # ---- 3c. one optimizer step ----
            step_stats = optimizer_step(ctx, buffer, state.plan[0])
            trim_heap()  # activations and merged weights are gone: hand their pages back
            state.plan.pop(0)
            state.step += 1
            # ---- 3d. log ----
            m = {**state.fill_stats, **step_stats, "perf/rollout_s": rollout_s,
                 "perf/peak_rss_gb": peak_rss_gb(), "perf/step_s": time.time() - t_step}
            if cfg.eval_every and state.step % cfg.eval_every == 0 and state.step < cfg.max_steps and cfg.eval_n:
                m.update(eval_metrics(run_eval(ctx, out_dir, state.step)))
            metrics.write(state.step, m)
            steps_timed += 1
            per_step = (time.time() - t_start) / steps_timed
            if state.step % cfg.log_every == 0 or state.step == cfg.max_steps:
                console.print(step_line(state.step, cfg.max_steps, m, m["perf/step_s"],
                                        per_step * (cfg.max_steps - state.step)), soft_wrap=True, markup=False)
            if cfg.sample_every and (state.step % cfg.sample_every == 0 or state.step == 1) and rollout_s:
                write_jsonl(out_dir / "samples" / f"step_{state.step:06d}.jsonl",
                            [{"step": state.step, **s} for s in state.samples])
            # ---- 3e. checkpoint ----
            if cfg.save_every and state.step % cfg.save_every == 0 and state.step < cfg.max_steps:
                save(ctx, out_dir, state, buffer)
        # ---- 4. the end: checkpoint, final eval, final model ----
        save(ctx, out_dir, state, buffer)
        if stop["signal"]:
            log.warning("%s: checkpoint saved at step %d; continue with --resume %s", stop["signal"], state.step, out_dir)
            return None
        if cfg.eval_n > 0:
            final = run_eval(ctx, out_dir, state.step)
            console.print(eval_table(final, f"final eval (step {state.step})"))
        save_final(ctx["accelerator"].unwrap_model(ctx["model"]), ctx["tok"], out_dir / "final")
        log.info("final model: %s/final/merged (transformers) and %s/final/adapter (peft)", out_dir, out_dir)
    except KeyboardInterrupt:
        ctx["optimizer"].zero_grad(set_to_none=True)
        path = save(ctx, out_dir, state, buffer)
        log.warning("interrupted: checkpoint of step %d saved to %s; continue with --resume %s", state.step, path,
                    out_dir)
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        metrics.close()
        scorer.close()
    return final
