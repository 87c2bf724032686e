"""The pipeline's `transfer` stage: the base model and the final model on reasoning-gym tasks outside the training
mixture (`transfer.tasks`, `transfer.n` questions each), so that a model that learned its task and forgot how to
answer anything else shows in the report (transfer/base.json, transfer/final.json; each task in `per_task` when
there are several). The questions, their balancing and the scoring are the held-out eval's (`eval.*`)."""
from __future__ import annotations

import dataclasses
import gc
import logging
from typing import Any

from .config import PipelineConfig, final_stage
from .rundir import PipelineDir

log = logging.getLogger(__name__)


def transfer_tasks(cfg: PipelineConfig) -> list[str]:
    """The configured transfer tasks that are not in the training mixture."""
    from .tasks import parse_tasks

    trained = {s.name for s in parse_tasks(cfg.task)}
    skipped = [t for t in cfg.transfer.tasks if t in trained]
    if skipped:
        log.info("transfer: %s skipped (in the training mixture)", ", ".join(skipped))
    return [t for t in cfg.transfer.tasks if t not in trained]


def run_transfer(cfg: PipelineConfig, pipe: PipelineDir) -> None:
    """Evaluate the base model, then the final model (GRPO's, or SFT's without RL), on the transfer tasks as one
    equal-weight mixture of transfer.n questions per task; writes transfer/<model>.json (+ completions)."""
    from .evaluate import make_evaluator
    from .log import console, eval_table, progress_bar
    from .models import load_model
    from .runtime import between_phases
    from .sandbox import Scorer
    from .tasks import parse_tasks

    tasks = transfer_tasks(cfg)
    if not tasks:
        log.info("transfer: no tasks outside the training mixture; nothing to evaluate")
        return
    specs = parse_tasks(tasks)
    eval_cfg = dataclasses.replace(cfg.eval, n=cfg.transfer.n * len(specs))
    models = {"base": cfg.model, "final": str(pipe.run(final_stage(cfg)).final_merged)}
    with Scorer(timeout=cfg.reward.scorer_timeout) as scorer:
        for label, path in models.items():
            model, tok = load_model(path)
            ev = make_evaluator(model, tok, specs, eval_cfg, cfg.reward, cfg.seed, scorer)
            meta: dict[str, Any] = {"step": 0, "model": path or "embedded", "task": ",".join(tasks),
                                    "stage": f"transfer/{label}"}
            with progress_bar(f"transfer: {label} model", len(ev.examples)) as advance:
                summary = ev.run(model, pipe.transfer_eval(label), pipe.transfer_completions(label), meta,
                                 progress=advance)
            console.print(eval_table(summary, f"transfer: {label} model on {', '.join(tasks)}"))
            del model, tok, ev
            gc.collect()  # one model at a time
            between_phases()
