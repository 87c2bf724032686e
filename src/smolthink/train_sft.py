"""Warm-up LoRA SFT (`smolthink sft`): next-token loss on the assistant tokens of verified reasoning traces (and
the EOS that ends them), token-averaged over each optimizer step; held-out eval before and after, atomic
checkpoints, graceful Ctrl-C / SIGTERM and exact resume.

Token layout = what GRPO scores: prompt ids are the chat-templated conversation up to the assistant turn's
opening (`chat.render_prompt(tok, messages[:-1])`), completion ids are the assistant text tokenised on its own
plus the EOS token, exactly like a rollout that stopped by itself. Masks come from lengths, never from the pad id
(SmolLM2 pads with its EOS).

Across N processes (`parallel`): every process holds the traces and the same step plan, and trains on its rows of
each step's minibatches; the loss is normalised by the whole step's assistant tokens."""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .buffer import Experience, ExperienceBuffer
from .chat import render_prompt
from . import parallel
from .checkpoint import restore_checkpoint
from .config import SFTConfig
from .errors import SmolthinkError
from .harness import TrainContext, TrainingRun, build_context, clip_and_step, save_step, start_process, training_run
from .log import fmt_duration
from .packing import Packing, make_packing
from .rundir import RunDir, write_json
from .models import file_sha256
from .rss import rss_phase
from .runtime import load_policy
from .seeds import derive_seed

log = logging.getLogger(__name__)


@dataclass
class SFTState:
    """Loop counters exact resume needs (the data order is a pure function of seed and epoch)."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # current pass over the traces
    pos: int = 0  # optimizer steps done within the current epoch
    data_sha256: str = ""  # the traces file trained on (a resume on other data fails)
    seconds: float = 0.0  # training seconds before this process (a max_seconds budget continues on resume)


# ---------------------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------------------

def tokenize_messages(tokenizer, messages: Sequence[dict[str, str]]) -> tuple[list[int], list[int]]:
    """(prompt_ids, completion_ids) of one conversation ending with the assistant turn: the prompt exactly as
    eval and rollouts render it, the completion as the policy would generate it (assistant text + EOS)."""
    prompt = render_prompt(tokenizer, list(messages[:-1]))
    completion = tokenizer(messages[-1]["content"], add_special_tokens=False)["input_ids"]
    return prompt, list(completion) + [tokenizer.eos_token_id]


def build_experiences(tokenizer, rows: Sequence[dict[str, Any]], max_length: int,
                      exclude_questions: Sequence[str] = ()) -> tuple[list[Experience], dict[str, Any]]:
    """Tokenised SFT examples (Experience with advantage 0, so buffer.collate batches them) and data stats;
    sequences longer than max_length and rows whose question is held out are dropped and counted."""
    banned = set(exclude_questions)
    exps, too_long, overlap, lengths = [], 0, 0, []
    for row in rows:
        messages = row["messages"]
        if messages[-2]["content"] in banned or row.get("question") in banned:
            overlap += 1
            continue
        prompt, completion = tokenize_messages(tokenizer, messages)
        if len(prompt) + len(completion) > max_length:
            too_long += 1
            continue
        exps.append(Experience(prompt_ids=prompt, completion_ids=completion, old_logp=None, advantage=0.0,
                               reward=0.0))
        lengths.append(len(prompt) + len(completion))
    stats = {"traces": len(rows), "used": len(exps), "dropped_too_long": too_long,
             "dropped_eval_overlap": overlap, "max_length": max_length,
             "assistant_tokens": sum(len(e.completion_ids) for e in exps), "tokens": sum(lengths),
             "mean_seq_len": sum(lengths) / max(len(lengths), 1), "max_seq_len": max(lengths, default=0)}
    return exps, stats


def epoch_plan(buffer: ExperienceBuffer, cfg: SFTConfig, epoch: int) -> list[list[list[int]]]:
    """Optimizer steps of one pass: a seeded permutation (length-grouped minibatches to cut padding), cut into
    minibatches and grouped gradient_accumulation_steps at a time (the last step may be smaller)."""
    gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "sft-order", epoch))
    mbs = list(buffer.minibatches(cfg.minibatch_size, gen, group_by_length=True))
    ga = cfg.gradient_accumulation_steps
    return [mbs[s : s + ga] for s in range(0, len(mbs), ga)]


def steps_per_epoch(n: int, cfg: SFTConfig) -> int:
    """Optimizer steps in one pass over n examples."""
    return math.ceil(math.ceil(n / cfg.minibatch_size) / cfg.gradient_accumulation_steps)


# ---------------------------------------------------------------------------------------------------------------
# one optimizer step
# ---------------------------------------------------------------------------------------------------------------

def sft_loss(model, packing: Packing, batch, n_tokens_total: int) -> tuple[torch.Tensor, int]:
    """Sum of -log p over the chunk's assistant tokens (+ EOS), divided by the whole step's assistant token count
    (so accumulated chunk losses add up to the big-batch token mean) -> (loss, tokens in this chunk)."""
    logp, _ = packing.logprobs(model, batch)  # [n, T]
    mask = batch.completion_mask.to(logp.dtype)
    return -(logp * mask).sum() / max(n_tokens_total, 1), int(batch.completion_mask.sum())


def optimizer_step(ctx: "SFTContext", minibatches: list[list[int]]) -> dict[str, float]:
    """Forward/backward every chunk of the step's micro-batches (this process's rows of them), clip, step, schedule
    (skipped on a NaN/inf loss or gradient) -> metrics of the whole step."""
    t0 = time.time()
    buffer = ctx.buffer
    n_tok = sum(len(buffer.items[i].completion_ids) for mb in minibatches for i in mb)
    loss_sum, tokens_run = 0.0, 0
    lr = ctx.scheduler.get_last_lr()[0]
    with ctx.numerics.active():  # forward and backward (checkpointed head chunks recompute in backward)
        for idx in ctx.packing.chunks(buffer, parallel.rows(minibatches)):
            batch = ctx.packing.collate(buffer, idx, ctx.device)
            loss, _ = sft_loss(ctx.model, ctx.packing, batch, n_tok)
            ctx.accelerator.backward(loss)
            loss_sum += loss.item()
            tokens_run += ctx.packing.computed_tokens(batch)
    step = parallel.merge({"loss/sft": loss_sum, "tokens": float(tokens_run)})
    stepped = clip_and_step(ctx, step["loss/sft"])
    seconds = time.time() - t0
    seq_tokens = sum(buffer.seq_len(i) for mb in minibatches for i in mb)  # every process's
    return {"loss/sft": step["loss/sft"], "lr": lr, **stepped, "perf/train_s": seconds,
            "perf/train_tok_s": seq_tokens / max(seconds, 1e-9),
            "perf/train_computed_tok_s": step["tokens"] / max(seconds, 1e-9),
            "train/sequences": float(sum(map(len, minibatches))), "train/assistant_tokens": float(n_tok)}


def sft_line(step: int, total: int, m: dict[str, float], step_s: float, eta_s: float) -> str:
    """`sft 12/200 | loss 0.812 | lr 1.9e-04 | gnorm 0.53 | epoch 1.25 | 812 tok/s | 3.1 s/step | eta 4m05s`."""
    return (f"sft {step}/{total} | loss {m.get('loss/sft', 0):.4f} | lr {m.get('lr', 0):.2e} | "
            f"gnorm {m.get('grad_norm', 0):.2f} | epoch {m.get('epoch', 0):.2f} | "
            f"{m.get('perf/train_tok_s', 0):.0f} tok/s | {step_s:.1f} s/step | eta {fmt_duration(eta_s)}")


class Budget:
    """A training time budget (`max_seconds`, 0: none), checked between optimizer steps: it counts this process's
    seconds since the loop began plus those a resumed checkpoint had already spent."""

    def __init__(self, max_seconds: float, spent_before: float):
        self.max_seconds, self.before, self.t0 = max_seconds, spent_before, time.time()

    def elapsed(self) -> float:
        """Training seconds so far."""
        return self.before + time.time() - self.t0

    def spent(self) -> bool:
        """True once the budget is used up (never without one)."""
        return self.max_seconds > 0 and self.elapsed() >= self.max_seconds

    def line(self, line: Callable[..., str]) -> Callable[..., str]:
        """The console line with its ETA capped by the time left (the step cap of a clock-bound run is far off)."""
        if self.max_seconds <= 0:
            return line
        return lambda step, total, m, step_s, eta_s: line(step, total, m, step_s,
                                                          min(eta_s, max(0.0, self.max_seconds - self.elapsed())))


# ---------------------------------------------------------------------------------------------------------------
# set-up
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class SFTContext(TrainContext):
    """The shared context plus the SFT data: tokenised traces, their stats, the step plan of the current epoch."""

    buffer: ExperienceBuffer = field(default_factory=ExperienceBuffer)
    packing: Packing | None = None
    data_stats: dict[str, Any] = field(default_factory=dict)
    steps_per_epoch: int = 0
    total: int = 0
    plans: dict[int, list] = field(default_factory=dict)


def resolve_traces(cfg: SFTConfig, run: RunDir, resume: bool, eval_questions: Sequence[str]) -> Path:
    """The traces to train on: cfg.data.path, else <run>/traces.jsonl (generated now from cfg.data on train
    questions disjoint from the eval set; reused on resume)."""
    if cfg.data.path:
        return Path(cfg.data.path)
    path = run.traces
    if resume and path.is_file():
        return path
    from .data import make_traces, require_traces, trace_specs

    log.info("no traces given: writing %d %s traces to %s", cfg.data.num_traces, cfg.data.source, path)
    require_traces(make_traces(cfg.data, trace_specs(cfg.data, cfg.task), cfg.seed, path,
                               exclude_questions=eval_questions, reward=cfg.reward, policy_model=cfg.model))
    return path


def setup(cfg: SFTConfig, run: RunDir, resume: bool) -> SFTContext:
    """Held-out eval set, traces, policy, optimizer, scheduler, evaluator."""
    from .data import load_traces
    from .evaluate import eval_examples
    from .tasks import parse_tasks

    start_process(cfg)
    eval_q = [e.question for e in eval_examples(parse_tasks(cfg.task), cfg.eval, cfg.seed)]
    traces = parallel.from_main(lambda: resolve_traces(cfg, run, resume, eval_q))
    rows = load_traces(traces)  # a bad file fails before the model loads
    model, tok = load_policy(cfg)
    exps, data_stats = build_experiences(tok, rows, cfg.max_length, eval_q)
    if not exps:
        raise SmolthinkError(f"no usable traces in {traces} ({data_stats['dropped_too_long']} longer than "
                             f"max_length={cfg.max_length}, {data_stats['dropped_eval_overlap']} eval questions)")
    for key, what in (("dropped_eval_overlap", "whose question is in the held-out eval set"),
                      ("dropped_too_long", f"longer than max_length={cfg.max_length}")):
        if data_stats[key]:
            log.warning("dropped %d traces %s", data_stats[key], what)
    buffer = ExperienceBuffer()
    buffer.extend(exps)
    per_epoch = steps_per_epoch(len(exps), cfg)
    total = cfg.max_steps or cfg.num_epochs * per_epoch
    data_stats.update(path=str(traces), sha256=file_sha256(traces), steps_per_epoch=per_epoch, total_steps=total,
                      sequences_per_step=cfg.minibatch_size * cfg.gradient_accumulation_steps)
    # every chat-templated trace starts with the same system turn; traces with no common first token share nothing
    share = "prefix" if cfg.share_prefix and buffer.common_prefix_len(range(len(buffer))) else None
    packing = make_packing(share, cfg.max_tokens_per_forward, tok.pad_token_id, cfg.gradient_checkpointing)
    return build_context(SFTContext, cfg, run, total, model=model, tok=tok, buffer=buffer, packing=packing,
                         data_stats=data_stats, steps_per_epoch=per_epoch, total=total)


def save(ctx: SFTContext, state: SFTState) -> Path:
    """Checkpoint after the last finished optimizer step."""
    counters = {"epoch": state.epoch, "pos": state.pos, "data_sha256": state.data_sha256, "seconds": state.seconds}
    return save_step(ctx, state.step, counters)


def restore(ctx: SFTContext, tr: TrainingRun) -> SFTState:
    """The loop state to start from: a fresh one, or the checkpoint's (weights, optimizer, RNG restored)."""
    sha = ctx.data_stats["sha256"]
    if tr.resume_from is None:
        return SFTState(data_sha256=sha)
    counters, _ = restore_checkpoint(tr.resume_from, ctx.model, ctx.optimizer, ctx.scheduler, parallel.rank(),
                                     parallel.world())
    if counters.get("data_sha256") and counters["data_sha256"] != sha:
        raise SmolthinkError(f"{ctx.data_stats['path']} changed since the checkpoint: resume needs the same traces")
    log.info("resumed from %s (step %d, epoch %d)", tr.resume_from.path, counters["step"], counters["epoch"])
    return SFTState(step=counters["step"], epoch=counters["epoch"], pos=counters["pos"], data_sha256=sha,
                    seconds=counters["seconds"])


def next_step(ctx: SFTContext, state: SFTState) -> list[list[int]]:
    """The minibatches of the next optimizer step (advancing to the next epoch when one is finished)."""
    if state.pos >= ctx.steps_per_epoch:
        state.epoch, state.pos = state.epoch + 1, 0
    if state.epoch not in ctx.plans:
        ctx.plans.clear()
        ctx.plans[state.epoch] = epoch_plan(ctx.buffer, ctx.cfg, state.epoch)
    return ctx.plans[state.epoch][state.pos]


def describe(ctx: SFTContext) -> None:
    """The derived numbers, once at start-up."""
    ds, cfg = ctx.data_stats, ctx.cfg
    log.info("SFT: %d traces (%d dropped: %d too long, %d eval overlap), %d assistant tokens; %d sequences per "
             "optimizer step (%d x %d accumulation); %d steps per epoch; %d steps%s", ds["used"],
             ds["traces"] - ds["used"], ds["dropped_too_long"], ds["dropped_eval_overlap"], ds["assistant_tokens"],
             ds["sequences_per_step"], cfg.minibatch_size, cfg.gradient_accumulation_steps, ctx.steps_per_epoch,
             ctx.total, f" or {fmt_duration(cfg.max_seconds)} of training, whichever ends first"
             if cfg.max_seconds else "")


# ---------------------------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------------------------

def train_sft(cfg: SFTConfig, out_dir: Path, resume: bool = False,
              on_step: Callable[[int, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run warm-up SFT into out_dir -> the final eval summary ({} when eval.n == 0); raises errors.Stopped when a
    signal stopped it (a checkpoint is saved; continue with resume=True). `on_step(step, metrics)` runs after each
    optimizer step (progress hooks, tests)."""
    with training_run(out_dir, resume) as tr:
        # ---- 1. set-up: eval set, traces, policy, optimizer ----
        with rss_phase("setup"):
            ctx = setup(cfg, tr.run, resume)
        describe(ctx)
        # ---- 2. start or resume ----
        state = restore(ctx, tr)
        if parallel.is_main():
            write_json(tr.run.data_stats, ctx.data_stats)
        tr.start(ctx, state.step, save=lambda: save(ctx, state),
                 config=dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=ctx.data_stats["path"])))
        budget = Budget(cfg.max_seconds, state.seconds)
        while state.step < ctx.total and not tr.stopping and not parallel.any_process(budget.spent()):
            # ---- 3. one optimizer step ----
            with rss_phase("train"):
                m = optimizer_step(ctx, next_step(ctx, state))
            state.pos += 1
            state.step += 1
            state.seconds = budget.elapsed()
            # ---- 4. log, eval, checkpoint ----
            m["epoch"] = state.epoch + state.pos / ctx.steps_per_epoch
            tr.end_step(state.step, ctx.total, m, budget.line(sft_line))
            if on_step is not None:
                on_step(state.step, m)
        # ---- 5. the end: checkpoint, final eval, final model, DONE ----
        return tr.finish(state.step, "eval after SFT")
