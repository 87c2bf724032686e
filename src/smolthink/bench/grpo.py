"""Part (c): GRPO steps for the same work, TRL's GRPOTrainer vs smolthink's loop, each side in a subprocess that
runs `python -m smolthink.bench ... --child SIDE` (so peak RSS is that side's own)."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from .tables import summarize


def strict_syllogism_reward(completion: str, gold: str, prefill: str = "") -> float:
    """smolthink's strict reward for a Yes/No syllogism: 0.85 * exact answer + 0.15 * strict format."""
    from ..chat import extract_answer, format_ok
    from ..tasks import strict_match

    return 0.85 * float(strict_match(extract_answer(completion), gold)) + 0.15 * float(format_ok(completion, prefill))


def _child_trl(args) -> dict[str, Any]:
    """TRL GRPOTrainer on the same work: 8 prompts x 6 per step, one optimizer update per generation, LoRA r32/a64
    on all projections, beta 0, fp32 CPU, no gradient checkpointing; per-step wall, generation and train split."""
    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    from trl.extras import profiling

    from ..chat import build_messages
    from ..models import LORA_TARGETS, load_model
    from ..rss import process_peak_gb
    from ..runtime import set_threads

    set_threads(args.threads)
    model, tok = load_model(args.model)
    steps = args.grpo_steps + 1
    import reasoning_gym

    entries = list(reasoning_gym.create_dataset("syllogism", seed=args.seed + 1, size=args.prompts * steps))
    ds = Dataset.from_list([{"prompt": build_messages(e["question"]), "answer": e["answer"]} for e in entries])

    def reward(prompts, completions, answer, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [strict_syllogism_reward(t, a) for t, a in zip(texts, answer)]

    timings: list[tuple[str, float, float]] = []  # (name, end time, seconds)
    original = profiling.ProfilingContext._log_metrics

    def capture(self, duration):
        timings.append((self.name, time.perf_counter(), duration))
        return original(self, duration)

    profiling.ProfilingContext._log_metrics = capture
    group = args.prompts * args.group
    accum = max(1, group // args.minibatch)
    cfg = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-bench-"), per_device_train_batch_size=args.minibatch,
        gradient_accumulation_steps=accum, steps_per_generation=accum, num_generations=args.group,
        max_completion_length=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=0,
        beta=0.0, num_iterations=1, learning_rate=1e-6, loss_type="grpo", scale_rewards="group",
        max_steps=steps, logging_steps=1, report_to="none", use_cpu=True, bf16=False, fp16=False,
        gradient_checkpointing=False, save_strategy="no", disable_tqdm=True, seed=args.seed,
        dataloader_num_workers=0, shuffle_dataset=False)
    peft_cfg = LoraConfig(r=32, lora_alpha=64, lora_dropout=0.0, target_modules=list(LORA_TARGETS),
                          task_type="CAUSAL_LM")

    marks: list[tuple[float, float]] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            marks.append((time.perf_counter(), 0.0))

        def on_step_end(self, a, state, control, **kw):
            marks[-1] = (marks[-1][0], time.perf_counter())

    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=cfg, train_dataset=ds, processing_class=tok,
                          peft_config=peft_cfg, callbacks=[StepTimer()])
    trainer.train()
    per_step = []
    for i, (t0, t1) in enumerate(marks):
        inside = [(n, d) for n, end, d in timings if t0 <= end <= t1]
        gen = sum(d for n, d in inside if n.endswith("transformers.generate"))
        prep = sum(d for n, d in inside if n.endswith("_prepare_inputs"))
        per_step.append({"step": i + 1, "step_s": t1 - t0, "generate_s": gen, "rollout_s": prep,
                         "train_s": (t1 - t0) - prep})
    return {"side": "trl", "version": trl.__version__, "per_step": per_step, "peak_rss_gb": process_peak_gb(),
            "note": "rollout_s = GRPOTrainer._prepare_inputs (generation + rewards + log-prob bookkeeping); "
                    "train_s = step time - rollout_s"}


def _child_smolthink(args) -> dict[str, Any]:
    """smolthink's GRPO loop on the same work, read back from its metrics.jsonl."""
    try:
        from ..train_grpo import train
    except ImportError as e:
        return {"side": "smolthink", "available": False, "reason": f"smolthink.train_grpo not importable: {e}"}
    from ..config import GRPOConfig

    steps = args.grpo_steps + 1
    group = args.prompts * args.group
    from ..config import build_config
    from ..configlib import parse_overrides

    recipe = dict(model=args.model, task="syllogism", seed=args.seed, prompts_per_rollout=args.prompts,
                  num_generations=args.group, max_completion_length=args.max_new_tokens, temperature=args.temperature,
                  top_p=args.top_p, buffer_size=group, minibatch_size=args.minibatch,
                  gradient_accumulation_steps=max(1, group // args.minibatch), num_iterations=1, beta=0.0,
                  learning_rate=1e-6, loss_type="grpo", use_lora=True, lora_r=32, lora_alpha=64,
                  gradient_checkpointing=False, threads=args.threads, max_steps=steps, save_every=0, sample_every=0,
                  train_size=max(64, args.prompts * steps), eval={"n": 0, "at_start": False})
    if args.max_tokens_per_forward is not None:
        recipe["max_tokens_per_forward"] = args.max_tokens_per_forward
    cfg = build_config(GRPOConfig, [recipe, parse_overrides(args.sets or [])])
    out = Path(tempfile.mkdtemp(prefix="smolthink-bench-")) / "run"
    train(cfg, out)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    keys = ("perf/rollout_s", "perf/train_s", "perf/peak_rss_gb", "perf/rollout_tok_s", "perf/train_tok_s",
            "perf/train_computed_tok_s", "perf/step_s")
    per_step = [{"step": r["step"], **{k.split("/", 1)[1]: r.get(k) for k in keys}} for r in rows]
    return {"side": "smolthink", "available": True, "per_step": per_step,
            "peak_rss_gb": max((r.get("perf/peak_rss_gb") or 0.0) for r in rows) if rows else None,
            "engine": "auto (FastEngine for Llama-like models)"}


def grpo_bench(args, argv: Sequence[str]) -> dict[str, Any]:
    """Run each GRPO side in a subprocess (its own peak RSS) and summarise steps after the first (warm-up).
    `argv`: the bench flags as command-line words (`bench.bench_argv(args)`), parsed again by the child."""
    res: dict[str, Any] = {}
    for side in [s.strip() for s in args.grpo.split(",") if s.strip()]:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "child.json"
            cmd = [sys.executable, "-m", "smolthink.bench", *argv, "--child", side, "--child-out", str(out)]
            print(f"  GRPO {side}: {args.grpo_steps} measured steps + 1 warm-up (subprocess)", file=sys.stderr,
                  flush=True)
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0 or not out.is_file():
                lines = [x for x in (proc.stderr or proc.stdout or "").strip().splitlines()
                         if x.strip() and "warn" not in x.lower() and "%|" not in x]
                why = "killed by SIGKILL (out of memory?)" if proc.returncode == -9 else f"exit {proc.returncode}"
                detail = (": " + " | ".join(lines[-3:])[-400:]) if lines else ""
                res[side] = {"available": False, "reason": why + detail}
                continue
            r = json.loads(out.read_text())
            r["wall_s_total"] = time.perf_counter() - t0
        steps = r.get("per_step") or []
        measured = steps[1:] if len(steps) > 1 else steps
        if measured:
            for key in ("step_s", "rollout_s", "train_s", "generate_s", "rollout_tok_s", "train_tok_s",
                        "train_computed_tok_s"):
                vals = [s[key] for s in measured if s.get(key) is not None]
                if key == "step_s" and not vals:  # smolthink: rollout + train
                    vals = [s["rollout_s"] + s["train_s"] for s in measured]
                if vals:
                    r[f"{key}_summary"] = summarize(vals)
        res[side] = r
    return res


def run_child(args: argparse.Namespace) -> dict[str, Any]:
    """The child process of `grpo_bench`: run the GRPO side `args.child` -> its result."""
    from ..runtime import set_threads

    set_threads(args.threads)
    return _child_trl(args) if args.child == "trl" else _child_smolthink(args)
