"""Evaluation that tells the truth: accuracy with a 95% interval, balanced accuracy, per-class accuracy, the
majority-class baseline, format rate, lengths, truncation, pass@k / mean@k."""
from __future__ import annotations

import logging
import math
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from .chat import answer_label, extract_answer
from .config import EvalConfig, RewardConfig
from .rewards import score_completions
from .rundir import write_json, write_jsonl
from .runtime import between_phases
from .seeds import derive_seed
from .tasks import TaskSpec, majority_class, make_examples
from .types import Example, RewardParts, SamplingParams

log = logging.getLogger(__name__)


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (well-behaved near 0 and 1)."""
    if n == 0:
        return (0.0, 0.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def mean_interval(values: Sequence[float], z: float = 1.96) -> tuple[float, float]:
    """Normal-approximation interval of a mean of per-question scores (used when k > 1 samples per question)."""
    n = len(values)
    if n < 2:
        return (0.0, 1.0)
    m = sum(values) / n
    var = sum((v - m) ** 2 for v in values) / (n - 1)
    half = z * math.sqrt(var / n)
    return (max(0.0, m - half), min(1.0, m + half))


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k estimator (Chen et al. 2021) for n samples with c correct."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


# The fields of a mixture's per-task breakdown (`summary["per_task"][task]`).
PER_TASK_KEYS = ("n", "accuracy", "accuracy_ci95", "balanced_accuracy", "per_class_accuracy", "majority_class",
                 "majority_baseline", "format_rate", "mean_reward", "mean_completion_len", "truncated_frac", "pass@k")


def summarize(examples: Sequence[Example], parts: Sequence[Sequence[RewardParts]], completions: Sequence[Sequence[str]],
              lengths: Sequence[Sequence[int]], truncated: Sequence[Sequence[bool]]) -> dict[str, Any]:
    """Metrics from per-question lists of k scored completions ([question][sample]); a mixture's summary adds
    `per_task`: {task: the PER_TASK_KEYS of that task's questions alone}."""
    k = len(parts[0]) if parts else 1
    flat = [p for row in parts for p in row]
    n_q = len(examples)
    per_q = [sum(p.correct for p in row) / len(row) for row in parts]
    acc = sum(per_q) / max(n_q, 1)
    ci = wilson_interval(sum(p.correct for p in flat) / k, n_q) if k == 1 else mean_interval(per_q)
    golds = [ex.answer for ex in examples]
    maj_cls, maj = majority_class(golds)
    per_class: dict[str, float] = {}
    balanced = None
    if maj_cls is not None:
        by_cls: dict[str, list[float]] = defaultdict(list)
        for ex, s in zip(examples, per_q):
            by_cls[str(ex.answer)].append(s)
        per_class = {c: sum(v) / len(v) for c, v in sorted(by_cls.items())}
        balanced = sum(per_class.values()) / len(per_class)
    answers = Counter(answer_label(extract_answer(c), ex.answer) or "<none>"
                      for ex, row in zip(examples, completions) for c in row)
    total = max(len(flat), 1)
    summary = {
        "n": n_q,
        "samples_per_question": k,
        "accuracy": acc,
        "accuracy_ci95": list(ci),
        "balanced_accuracy": balanced,
        "per_class_accuracy": per_class,
        "majority_class": maj_cls,
        "majority_baseline": maj,
        "answer_distribution": {a: c / total for a, c in answers.most_common(10)},
        "format_rate": sum(p.format for p in flat) / total,
        "partial_credit": sum(p.partial for p in flat) / total,
        "mean_reward": sum(p.total for p in flat) / total,
        "mean_completion_len": sum(sum(r) for r in lengths) / total,
        "truncated_frac": sum(sum(r) for r in truncated) / total,
        "scoring_errors": sum(p.error is not None for p in flat),
        "pass@k": None,
        "mean@k": None,
    }
    if k > 1:
        # with exactly k samples, pass@k of a question is 1 when any sample is right: a proportion, Wilson interval
        passed = sum(pass_at_k(k, int(sum(p.correct for p in row)), k) for row in parts)
        summary["pass@k"] = passed / n_q
        summary["pass@k_ci95"] = list(wilson_interval(passed, n_q))
        summary["mean@k"] = acc
    tasks = sorted({ex.task for ex in examples})
    if len(tasks) > 1:
        summary["per_task"] = {}
        for task in tasks:
            idx = [i for i, ex in enumerate(examples) if ex.task == task]
            sub = summarize(*([seq[i] for i in idx] for seq in (examples, parts, completions, lengths, truncated)))
            summary["per_task"][task] = {key: sub[key] for key in PER_TASK_KEYS}
    return summary


def evaluate(
    model,
    tokenizer,
    engine,
    examples: Sequence[Example],
    prompts: Sequence[list[int]],
    scorer,
    specs: Sequence[TaskSpec],
    sampling: SamplingParams,
    samples_per_question: int = 1,
    batch_size: int = 16,
    seed: int = 0,
    reward_cfg: RewardConfig | None = None,
    prefill: str = "",
    progress: Callable[[int], None] | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Generate k completions per example, score them strictly, and summarise -> (summary, records), where
    records hold every prompt/completion/score. `progress(n_done)` is called after each batch."""
    reward_cfg = reward_cfg or RewardConfig()
    t0 = time.time()
    all_parts, all_comps, all_lens, all_trunc, records = [], [], [], [], []
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        rollouts = engine.generate(model, prompts[start : start + batch_size], samples_per_question, sampling,
                                   seed=derive_seed(seed, "eval", start))
        for ex, row in zip(batch, rollouts):
            texts = [tokenizer.decode(r.completion_ids, skip_special_tokens=True) for r in row]
            parts = score_completions(texts, [ex] * len(row), [len(r.completion_ids) for r in row], scorer, specs,
                                      reward_cfg, sampling.max_new_tokens, prefill)
            all_parts.append(parts)
            all_comps.append(texts)
            all_lens.append([len(r.completion_ids) for r in row])
            all_trunc.append([r.truncated for r in row])
            for text, r, p in zip(texts, row, parts):
                records.append({"id": ex.id, "task": ex.task, "question": ex.question, "completion": text,
                                "answer": extract_answer(text), "gold": ex.answer, "correct": p.correct,
                                "format": p.format, "partial": p.partial, "reward": p.total, "error": p.error,
                                "length": len(r.completion_ids), "truncated": r.truncated})
        if progress:
            progress(len(batch))
        between_phases()  # a batch's KV cache is gone: hand its pages back, re-check the load (a long eval)
    summary = summarize(examples, all_parts, all_comps, all_lens, all_trunc)
    summary["seconds"] = time.time() - t0
    summary["samples"] = [{k: r[k] for k in ("question", "completion", "answer", "gold", "correct", "format")}
                          for r in records[:8]]
    return summary, records


# ----------------------------------------------------------------------------------------------- eval to files


def eval_examples(specs: Sequence[TaskSpec], cfg: EvalConfig, seed: int) -> list[Example]:
    """The held-out eval set: the same questions for a seed wherever it is built (eval, data, both stages)."""
    return make_examples(specs, cfg.n, seed, "eval", balanced=cfg.balanced) if cfg.n else []


def eval_sampling(cfg: EvalConfig) -> SamplingParams:
    """Greedy at temperature 0, else sampled at the configured temperature / top_p."""
    if cfg.temperature <= 0:
        return SamplingParams(cfg.max_new_tokens, 0.0, 1.0)
    return SamplingParams(cfg.max_new_tokens, cfg.temperature, cfg.top_p)


@dataclass
class Evaluator:
    """A held-out eval ready to run on any state of a model: the questions and their rendered prompts, the
    engine, the sandboxed scorer and the settings. One per process; `run` writes the summary and every
    completion to the given files."""

    tok: Any
    engine: Any
    scorer: Any
    specs: Sequence[TaskSpec]
    examples: list[Example]
    prompts: list[list[int]]
    cfg: EvalConfig
    reward: RewardConfig
    prefill: str = ""
    seed: int = 0

    def run(self, model, summary_path: Path | None, completions_path: Path | None, meta: dict[str, Any],
            progress: Callable[[int], None] | None = None) -> dict[str, Any]:
        """Evaluate `model` (in eval mode) -> the summary (with `meta` merged in: step, model, task, stage), written
        to summary_path and every completion to completions_path when given; logs one line."""
        was_training = model.training
        model.eval()
        try:
            summary, records = evaluate(model, self.tok, self.engine, self.examples, self.prompts, self.scorer,
                                        self.specs, eval_sampling(self.cfg), samples_per_question=self.cfg.samples,
                                        batch_size=self.cfg.batch_size, seed=self.seed, reward_cfg=self.reward,
                                        prefill=self.prefill, progress=progress)
        finally:
            model.train(was_training)
        summary.update(meta)
        if summary_path is not None:
            write_json(summary_path, summary)
        if completions_path is not None:
            write_jsonl(completions_path, records)
        lo, hi = summary["accuracy_ci95"]
        log.info("eval%s: accuracy %.3f [%.3f, %.3f], balanced %s, format %.3f, majority baseline %s",
                 f" @ step {meta['step']}" if "step" in meta else "", summary["accuracy"], lo, hi,
                 _f3(summary["balanced_accuracy"]), summary["format_rate"], _f3(summary["majority_baseline"]))
        return summary


def make_evaluator(model, tok, specs: Sequence[TaskSpec], cfg: EvalConfig, reward: RewardConfig, seed: int,
                   scorer, engine: str = "auto") -> Evaluator:
    """An Evaluator on the held-out set of `specs` for this seed (the engine is built for `model`)."""
    from .chat import template_prefill
    from .models import eos_ids
    from .rollout import make_engine
    from .runtime import render_prompts

    examples = eval_examples(specs, cfg, seed)
    return Evaluator(tok=tok, engine=make_engine(engine, model, eos_ids(tok, model), tok.pad_token_id,
                                                 precision=cfg.engine_precision),
                     scorer=scorer, specs=specs, examples=examples, prompts=render_prompts(tok, examples), cfg=cfg,
                     reward=reward, prefill=template_prefill(tok), seed=seed)


def eval_metrics(summary: dict[str, Any]) -> dict[str, Any]:
    """The eval/* entries of a metrics.jsonl row."""
    return {"eval/accuracy": summary["accuracy"], "eval/format_rate": summary["format_rate"],
            "eval/balanced_accuracy": summary["balanced_accuracy"]}


def _f3(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"
