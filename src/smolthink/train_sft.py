"""Warm-up LoRA SFT (`smolthink sft`): next-token loss on the assistant tokens of verified reasoning traces (and
the EOS that ends them), token-averaged over each optimizer step; held-out eval before and after, atomic
checkpoints, graceful Ctrl-C / SIGTERM and exact resume.

Token layout = what GRPO scores: prompt ids are the chat-templated conversation up to the assistant turn's
opening (`chat.render_prompt(tok, messages[:-1])`), completion ids are the assistant text tokenised on its own
plus the EOS token, exactly like a rollout that stopped by itself. Masks come from lengths, never from the pad id
(SmolLM2 pads with its EOS)."""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .buffer import Experience, ExperienceBuffer
from .chat import render_prompt, template_prefill
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import SFTConfig, save_config
from .errors import SmolthinkError
from .log import MetricsWriter, console, eval_table, fmt_duration, write_json
from .logprobs import token_logprobs
from .models import eos_ids, save_final
from .onednn import OneDNNLinears
from .runtime import (load_policy, make_optimizer, make_scheduler, peak_rss_gb, render_prompts, set_threads,
                      trim_heap)
from .stage import eval_metrics, eval_to_dir
from .tasks import make_examples, parse_tasks

log = logging.getLogger(__name__)


@dataclass
class SFTState:
    """Loop counters exact resume needs (the data order is a pure function of seed and epoch)."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # current pass over the traces
    pos: int = 0  # optimizer steps done within the current epoch
    data_sha256: str = ""  # the traces file trained on (a resume on other data fails)


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
    gen = torch.Generator().manual_seed(cfg.seed * 104729 + 7 + epoch)
    mbs = list(buffer.minibatches(cfg.minibatch_size, gen, group_by_length=True))
    ga = cfg.gradient_accumulation_steps
    return [mbs[s : s + ga] for s in range(0, len(mbs), ga)]


def steps_per_epoch(n: int, cfg: SFTConfig) -> int:
    """Optimizer steps in one pass over n examples."""
    return math.ceil(math.ceil(n / cfg.minibatch_size) / cfg.gradient_accumulation_steps)


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a (small) file."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# one optimizer step
# ---------------------------------------------------------------------------------------------------------------

def sft_loss(model, batch, n_tokens_total: int) -> tuple[torch.Tensor, int]:
    """Sum of -log p over the batch's assistant tokens (+ EOS), divided by the whole step's assistant token count
    (so accumulated micro-batch losses add up to the big-batch token mean) -> (loss, tokens in this batch)."""
    logp, _ = token_logprobs(model, batch.input_ids, batch.attention_mask, batch.completion_mask)
    mask = batch.completion_mask.to(logp.dtype)
    return -(logp * mask).sum() / max(n_tokens_total, 1), int(batch.completion_mask.sum())


def optimizer_step(ctx: dict, minibatches: list[list[int]]) -> dict[str, float]:
    """Forward/backward every micro-batch of the step, clip, step, schedule -> metrics."""
    cfg, model, buffer = ctx["cfg"], ctx["model"], ctx["buffer"]
    t0 = time.time()
    n_tok = sum(len(buffer.items[i].completion_ids) for mb in minibatches for i in mb)
    loss_sum, tokens_seen = 0.0, 0
    with ctx["onednn"].active():  # forward and backward (checkpointed head chunks recompute in backward)
        for mb in [c for mb in minibatches for c in buffer.split_by_tokens(mb, cfg.max_tokens_per_forward)]:
            batch = buffer.collate(mb, ctx["tok"].pad_token_id).to(next(model.parameters()).device)
            loss, _ = sft_loss(model, batch, n_tok)
            loss.backward()
            loss_sum += loss.item()
            tokens_seen += int(batch.attention_mask.sum())
    params = ctx["params"]
    if cfg.max_grad_norm > 0:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
    else:
        grad_norm = float(torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))
    lr = ctx["scheduler"].get_last_lr()[0]
    ctx["optimizer"].step()
    ctx["optimizer"].zero_grad(set_to_none=True)
    ctx["scheduler"].step()
    seconds = time.time() - t0
    return {"loss/sft": loss_sum, "lr": lr, "grad_norm": grad_norm, "perf/train_s": seconds,
            "perf/train_tok_s": tokens_seen / max(seconds, 1e-9), "train/sequences": float(sum(map(len, minibatches))),
            "train/assistant_tokens": float(n_tok)}


def sft_line(step: int, total: int, m: dict[str, float], step_s: float, eta_s: float) -> str:
    """`sft 12/200 | loss 0.812 | lr 1.9e-04 | gnorm 0.53 | epoch 1.25 | 812 tok/s | 3.1 s/step | eta 4m05s`."""
    return (f"sft {step}/{total} | loss {m.get('loss/sft', 0):.4f} | lr {m.get('lr', 0):.2e} | "
            f"gnorm {m.get('grad_norm', 0):.2f} | epoch {m.get('epoch', 0):.2f} | "
            f"{m.get('perf/train_tok_s', 0):.0f} tok/s | {step_s:.1f} s/step | eta {fmt_duration(eta_s)}")


# ---------------------------------------------------------------------------------------------------------------
# set-up
# ---------------------------------------------------------------------------------------------------------------

def resolve_traces(cfg: SFTConfig, out_dir: Path, traces_path: Path | None, resume: bool,
                   eval_questions: Sequence[str]) -> Path:
    """The traces to train on: traces_path, else cfg.data, else <out>/traces.jsonl (scripted traces generated
    now, cfg.num_traces of them on train questions disjoint from the eval set; reused on resume)."""
    if traces_path is not None:
        return Path(traces_path)
    if cfg.data:
        return Path(cfg.data)
    path = out_dir / "traces.jsonl"
    if resume and path.is_file():
        return path
    from .data import make_traces

    log.info("no traces given: writing %d scripted traces to %s", cfg.num_traces, path)
    make_traces("scripted", parse_tasks(cfg.task), cfg.num_traces, cfg.seed, path,
                exclude_questions=eval_questions)
    return path


def setup(cfg: SFTConfig, out_dir: Path, traces_path: Path | None, resume: bool) -> dict[str, Any]:
    """Held-out eval set, traces, policy, optimizer, scheduler, eval engine."""
    from .data import load_traces
    from .rollout import make_engine

    set_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    specs = parse_tasks(cfg.task)
    eval_set = make_examples(specs, cfg.eval_n, cfg.seed, "eval", balanced=cfg.eval_balanced) if cfg.eval_n else []
    eval_q = [e.question for e in eval_set]
    traces = resolve_traces(cfg, out_dir, traces_path, resume, eval_q)
    model, tok = load_policy(cfg)
    exps, data_stats = build_experiences(tok, load_traces(traces), cfg.max_length, eval_q)
    if not exps:
        raise SmolthinkError(f"no usable traces in {traces} ({data_stats['dropped_too_long']} longer than "
                             f"max_length={cfg.max_length}, {data_stats['dropped_eval_overlap']} eval questions)")
    if data_stats["dropped_eval_overlap"]:
        log.warning("dropped %d traces whose question is in the held-out eval set", data_stats["dropped_eval_overlap"])
    if data_stats["dropped_too_long"]:
        log.warning("dropped %d traces longer than max_length=%d", data_stats["dropped_too_long"], cfg.max_length)
    buffer = ExperienceBuffer()
    buffer.extend(exps)
    per_epoch = steps_per_epoch(len(exps), cfg)
    total = cfg.max_steps or cfg.num_epochs * per_epoch
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg.lr_scheduler_type, cfg.warmup_steps, total)
    data_stats.update(path=str(traces), sha256=file_sha256(traces), steps_per_epoch=per_epoch, total_steps=total,
                      sequences_per_step=cfg.minibatch_size * cfg.gradient_accumulation_steps)
    return {"cfg": cfg, "specs": specs, "eval": eval_set, "model": model, "tok": tok, "buffer": buffer,
            "traces": traces, "data_stats": data_stats, "steps_per_epoch": per_epoch, "total": total,
            "optimizer": optimizer, "scheduler": scheduler, "params": [p for p in model.parameters() if p.requires_grad],
            "onednn": OneDNNLinears(model, cfg.onednn_linears),
            "eval_prompts": render_prompts(tok, eval_set), "prefill": template_prefill(tok),
            "engine": make_engine("auto", model, eos_ids(tok, model), tok.pad_token_id), "plans": {}}


def run_eval(ctx: dict, out_dir: Path, step: int) -> dict[str, Any]:
    """Greedy held-out eval -> eval/step_XXXXXX.json (+ completions), in eval mode (no LoRA dropout)."""
    cfg, model = ctx["cfg"], ctx["model"]
    model.eval()
    try:
        return eval_to_dir(model, ctx["tok"], ctx["engine"], ctx["eval"], ctx["eval_prompts"], ctx["scorer"],
                           ctx["specs"], out_dir, step, max_new_tokens=cfg.eval_max_new_tokens or cfg.max_completion_length,
                           model_name=cfg.model or "embedded", task=str(cfg.task), prefill=ctx["prefill"],
                           seed=cfg.seed)
    finally:
        model.train()
        trim_heap()


def save(ctx: dict, out_dir: Path, state: SFTState) -> Path:
    """Checkpoint after the last finished optimizer step."""
    counters = {"epoch": state.epoch, "pos": state.pos, "data_sha256": state.data_sha256}
    return save_checkpoint(out_dir / "checkpoints", state.step, ctx["model"], ctx["optimizer"], ctx["scheduler"],
                           counters, keep=ctx["cfg"].keep_checkpoints)


def next_step(ctx: dict, state: SFTState) -> list[list[int]]:
    """The minibatches of the next optimizer step (advancing to the next epoch when one is finished)."""
    if state.pos >= ctx["steps_per_epoch"]:
        state.epoch, state.pos = state.epoch + 1, 0
    plans = ctx["plans"]
    if state.epoch not in plans:
        plans.clear()
        plans[state.epoch] = epoch_plan(ctx["buffer"], ctx["cfg"], state.epoch)
    return plans[state.epoch][state.pos]


# ---------------------------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------------------------

def train_sft(cfg: SFTConfig, out_dir: Path, resume: bool = False, traces_path: Path | None = None,
              on_step: Callable[[int, dict[str, Any]], None] | None = None) -> dict[str, Any] | None:
    """Run warm-up SFT into out_dir; returns the final eval summary ({} when eval_n == 0), or None when stopped
    by a signal (a checkpoint is saved; continue with resume=True). `on_step(step, metrics)` runs after each
    optimizer step (progress hooks, tests)."""
    from .sandbox import Scorer
    from .train_grpo import graceful_stop

    out_dir = Path(out_dir)
    # ---- 1. set-up ----
    ckpt = latest_checkpoint(out_dir) if resume else None
    if resume and ckpt is None:
        raise SmolthinkError(f"nothing to resume in {out_dir} (no complete checkpoint)")
    if not resume and (out_dir / "metrics.jsonl").exists():
        raise SmolthinkError(f"{out_dir} already holds a run: pass --resume {out_dir} or another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = setup(cfg, out_dir, traces_path, resume)
    ds = ctx["data_stats"]
    total = ctx["total"]
    log.info("SFT: %d traces (%d dropped: %d too long, %d eval overlap), %d assistant tokens; %d sequences per "
             "optimizer step (%d x %d accumulation); %d steps per epoch; %d steps", ds["used"],
             ds["traces"] - ds["used"], ds["dropped_too_long"], ds["dropped_eval_overlap"], ds["assistant_tokens"],
             ds["sequences_per_step"], cfg.minibatch_size, cfg.gradient_accumulation_steps, ctx["steps_per_epoch"],
             total)
    state = SFTState(data_sha256=ds["sha256"])
    # ---- 2. resume ----
    if ckpt is not None:
        counters, _ = load_checkpoint(ckpt, ctx["model"], ctx["optimizer"], ctx["scheduler"])
        if counters.get("data_sha256") and counters["data_sha256"] != ds["sha256"]:
            raise SmolthinkError(f"{ctx['traces']} changed since the checkpoint: resume needs the same traces")
        state = SFTState(step=counters["step"], epoch=counters["epoch"], pos=counters["pos"],
                         data_sha256=ds["sha256"])
        log.info("resumed from %s (step %d, epoch %d)", ckpt, state.step, state.epoch)
    else:
        save_config(dataclasses.replace(cfg, data=str(ctx["traces"])), out_dir / "config.yaml")
    write_json(out_dir / "data_stats.json", ds)
    metrics = MetricsWriter(out_dir / "metrics.jsonl", truncate_after_step=state.step if ckpt else None)
    stop = {"signal": None}
    previous = {sig: signal.signal(sig, graceful_stop(stop, sig)) for sig in (signal.SIGTERM, signal.SIGINT)}
    ctx["scorer"] = scorer = Scorer()
    final: dict[str, Any] | None = None
    try:
        if ckpt is None and cfg.eval_n > 0 and cfg.eval_at_start:
            run_eval(ctx, out_dir, 0)
        t_start, steps_timed = time.time(), 0
        while state.step < total and stop["signal"] is None:
            t_step = time.time()
            # ---- 3a. one optimizer step ----
            m = optimizer_step(ctx, next_step(ctx, state))
            trim_heap()  # activations and merged weights are gone: hand their pages back
            state.pos += 1
            state.step += 1
            # ---- 3b. log ----
            m.update({"epoch": state.epoch + state.pos / ctx["steps_per_epoch"], "perf/peak_rss_gb": peak_rss_gb(),
                      "perf/step_s": time.time() - t_step})
            if cfg.eval_every and state.step % cfg.eval_every == 0 and state.step < total and cfg.eval_n:
                m.update(eval_metrics(run_eval(ctx, out_dir, state.step)))
            metrics.write(state.step, m)
            steps_timed += 1
            per_step = (time.time() - t_start) / steps_timed
            if state.step % cfg.log_every == 0 or state.step == total or state.step == 1:
                console.print(sft_line(state.step, total, m, m["perf/step_s"], per_step * (total - state.step)),
                              soft_wrap=True, markup=False)
            # ---- 3c. checkpoint ----
            if cfg.save_every and state.step % cfg.save_every == 0 and state.step < total:
                save(ctx, out_dir, state)
            if on_step is not None:
                on_step(state.step, m)
        # ---- 4. the end: checkpoint, final eval, final model, DONE ----
        save(ctx, out_dir, state)
        if stop["signal"]:
            log.warning("%s: checkpoint saved at step %d; continue with --resume %s", stop["signal"], state.step,
                        out_dir)
            return None
        final = {}
        if cfg.eval_n > 0:
            final = run_eval(ctx, out_dir, state.step)
            console.print(eval_table(final, f"eval after SFT (step {state.step})"))
        save_final(ctx["model"], ctx["tok"], out_dir / "final")
        log.info("final model: %s/final/merged (transformers) and %s/final/adapter (peft)", out_dir, out_dir)
        (out_dir / "DONE").write_text(f"{state.step}\n")
    except KeyboardInterrupt:
        ctx["optimizer"].zero_grad(set_to_none=True)
        path = save(ctx, out_dir, state)
        log.warning("interrupted: checkpoint of step %d saved to %s; continue with --resume %s", state.step, path,
                    out_dir)
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        metrics.close()
        scorer.close()
    return final
