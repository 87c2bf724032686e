"""GRPO's experience phase: rollout batches (G samples per question from the question source), strict rewards,
group advantages and the budget metrics, turned into the unpadded Experience a buffer fill holds.

Across N processes (`parallel`): every process draws the same rollout batch and generates and scores its slice
of the questions (sampling seeded per process); the batch's results are gathered to every process."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from . import parallel
from .buffer import Experience
from .config import GRPOConfig
from .grpo import group_advantages, zero_std_groups
from .groups import GroupResult, group_metrics, group_results
from .rewards import score_completions
from .runtime import render_prompts
from .seeds import derive_seed
from .task_metrics import per_task_metrics
from .types import Example, RewardParts, Rollout, SamplingParams

if TYPE_CHECKING:
    from .train_grpo import GRPOContext, LoopState


@dataclass
class Fill:
    """What one buffer fill collected."""

    exps: list[Experience]
    stats: dict[str, float]
    samples: list[dict]  # the first few decoded completions
    groups: list[GroupResult]


def rollout_batch(ctx: GRPOContext, examples: list[Example], index: int) -> tuple:
    """Generate G completions per question and score them (each process its slice of the questions, gathered to
    every process) -> (rollouts [P][G], texts [P*G], reward parts [P*G], advantages [P, G], zero-std flags [P])."""
    cfg: GRPOConfig = ctx.cfg
    mine = parallel.share(examples)  # P_r questions: every group and its advantages on one process
    sampling = SamplingParams(cfg.max_completion_length, cfg.temperature, cfg.top_p, cfg.top_k)
    rollouts = ctx.engine.generate(ctx.model, render_prompts(ctx.tok, mine), cfg.num_generations, sampling,
                                   seed=parallel.process_seed(derive_seed(cfg.seed, "rollout", index)))  # [P_r][G]
    flat = [r for row in rollouts for r in row]
    texts = [ctx.tok.decode(r.completion_ids, skip_special_tokens=True) for r in flat]
    parts = score_completions(texts, [ex for ex in mine for _ in range(cfg.num_generations)],
                              [len(r.completion_ids) for r in flat], ctx.scorer, ctx.specs,
                              cfg.reward, cfg.max_completion_length, ctx.evaluator.prefill, ctx.user_fns)
    rewards = torch.tensor([p.total for p in parts], dtype=torch.float32).view(len(mine), -1)  # [P_r, G]
    rollouts, texts, parts, adv, zero = parallel.gather_lists(rollouts, texts, parts, [group_advantages(
        rewards, cfg.scale_rewards)], [zero_std_groups(rewards)])
    return rollouts, texts, parts, torch.cat(adv), torch.cat(zero)  # [P][G], [P*G], [P*G], [P, G], [P]


def collect_experience(ctx: GRPOContext, state: LoopState, min_batches: int) -> Fill:
    """Fill a buffer: rollout batches of P questions (from the question source) x G samples, scored and turned into
    group advantages; each batch's groups go back to the source (curricula, replay). Zero-signal groups are
    counted, and dropped (with a cap of max_resample_attempts batches beyond the `min_batches` a fill needs) when
    drop_zero_std_groups. `state.rollouts` counts the batches (it seeds the sampler)."""
    cfg: GRPOConfig = ctx.cfg
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
                                       truncated=r.truncated, group=state.rollouts * 1000 + b,
                                       engine_logp=None if r.logprobs is None else torch.tensor(r.logprobs)))
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
