"""Pieces every training stage (SFT, GRPO) shares: the held-out eval written into the run directory."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

from .evaluate import evaluate
from .log import write_json, write_jsonl
from .rewards import RewardConfig
from .tasks import TaskSpec
from .types import Example, SamplingParams

log = logging.getLogger(__name__)


def eval_to_dir(model, tokenizer, engine, examples: Sequence[Example], prompts: Sequence[list[int]], scorer,
                specs: Sequence[TaskSpec], out_dir: Path, step: int, *, max_new_tokens: int, model_name: str,
                task: str, reward_cfg: RewardConfig | None = None, prefill: str = "", seed: int = 0,
                batch_size: int = 64) -> dict[str, Any]:
    """Greedy eval on the held-out set -> <out_dir>/eval/step_XXXXXX.json (summary) and
    step_XXXXXX.completions.jsonl (every prompt/completion/score); logs one line and returns the summary."""
    sampling = SamplingParams(max_new_tokens, 0.0, 1.0)
    summary, records = evaluate(model, tokenizer, engine, examples, prompts, scorer, specs, sampling,
                                batch_size=batch_size, reward_cfg=reward_cfg, prefill=prefill, seed=seed)
    summary.update(step=step, model=model_name, task=task)
    out_dir = Path(out_dir)
    write_json(out_dir / "eval" / f"step_{step:06d}.json", summary)
    write_jsonl(out_dir / "eval" / f"step_{step:06d}.completions.jsonl", records)
    lo, hi = summary["accuracy_ci95"]
    log.info("eval @ step %d: accuracy %.3f [%.3f, %.3f], balanced %s, format %.3f, majority baseline %s",
             step, summary["accuracy"], lo, hi, _f(summary["balanced_accuracy"]), summary["format_rate"],
             _f(summary["majority_baseline"]))
    return summary


def eval_metrics(summary: dict[str, Any]) -> dict[str, Any]:
    """The eval/* entries of a metrics.jsonl row."""
    return {"eval/accuracy": summary["accuracy"], "eval/format_rate": summary["format_rate"],
            "eval/balanced_accuracy": summary["balanced_accuracy"]}


def _f(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"
