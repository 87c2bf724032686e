"""Reading a run directory for the report: JSON / JSONL / YAML readers that tolerate half-written files, and the
metrics, eval points, training stages, stage status and wall times built from them. File names come from
smolthink.rundir; nothing here writes."""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..rundir import PIPELINE_STAGES, PipelineDir, RunDir, read_done

log = logging.getLogger(__name__)

# The pipeline stages whose directories hold results; "report" is this package's own output.
RESULT_STAGES = tuple(s for s in PIPELINE_STAGES if s != "report")


def read_json(path: Path) -> Any:
    """Parsed JSON, or None when the file is missing or unreadable (a half-written file must not kill a report)."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("report: cannot read %s: %s", path, e)
        return None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file; blank and cut-off lines (a crash mid-write) are skipped."""
    try:
        text = Path(path).read_text()
    except OSError:
        return []
    rows = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict):
            rows.append(obj)
    return rows


def read_yaml(path: Path) -> dict[str, Any]:
    """A config YAML as a dict ({} when missing/unreadable)."""
    if not Path(path).is_file():
        return {}
    try:
        import yaml

        data = yaml.safe_load(Path(path).read_text())
    except Exception as e:  # noqa: BLE001 - a broken config only costs the summary a field
        log.warning("report: cannot read %s: %s", path, e)
        return {}
    return data if isinstance(data, dict) else {}


def is_num(v: Any) -> bool:
    """True for a finite int or float (not a bool): the values a metric or summary field may be plotted from."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# ----------------------------------------------------------------------------------------------- metrics


def load_metrics(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl rows sorted by step (a later line for the same step wins)."""
    by_step: dict[int, dict[str, Any]] = {}
    for row in read_jsonl(path):
        if is_num(row.get("step")):
            by_step[int(row["step"])] = row
    return [by_step[s] for s in sorted(by_step)]


def series(rows: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the rows holding a finite number under key."""
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if is_num(v):
            xs.append(int(r["step"]))
            ys.append(float(v))
    return xs, ys


def has_metric(rows: Sequence[dict[str, Any]], key: str) -> bool:
    """True when any row holds a finite number under key."""
    return any(is_num(r.get(key)) for r in rows)


# ----------------------------------------------------------------------------------------------- evals


@dataclass
class EvalPoint:
    """One eval summary (eval/step_*.json or <stage>/eval.json) and its completions file when present."""

    step: int
    summary: dict[str, Any]
    path: Path
    completions: Path | None


def _eval_point(path: Path, completions: Path, step: int | None) -> EvalPoint | None:
    """The summary at `path` (None when missing or not a JSON object); step None: the summary's own step."""
    summary = read_json(path)
    if not isinstance(summary, dict):
        return None
    if step is None:
        step = int(summary["step"]) if is_num(summary.get("step")) else 0
    return EvalPoint(step, summary, path, completions if completions.is_file() else None)


def load_evals(run: RunDir) -> list[EvalPoint]:
    """A training run's eval/step_*.json, sorted by step."""
    points = [_eval_point(run.eval(s), run.eval_completions(s), s) for s in run.eval_steps()]
    return [p for p in points if p is not None]


def load_stage_eval(pipe: PipelineDir, stage: str) -> EvalPoint | None:
    """An eval stage's <stage>/eval.json (+ completions.jsonl), or None when it is missing."""
    return _eval_point(pipe.eval_json(stage), pipe.completions(stage), None)


def load_transfer(pipe: PipelineDir) -> dict[str, EvalPoint]:
    """The transfer stage's evals that exist: {"base": ..., "final": ...}."""
    points = {m: _eval_point(pipe.transfer_eval(m), pipe.transfer_completions(m), None) for m in ("base", "final")}
    return {m: p for m, p in points.items() if p is not None}


# ----------------------------------------------------------------------------------------------- stages


@dataclass
class Stage:
    """A training-stage run directory (single-stage run, or pipeline sft/ or grpo/)."""

    name: str  # "sft", "grpo", or "run" for a single-stage run
    path: Path
    metrics: list[dict[str, Any]]
    evals: list[EvalPoint]
    samples_file: Path | None  # the latest samples/step_*.jsonl
    samples: list[dict[str, Any]]  # its decoded rollouts
    config: dict[str, Any]
    done: bool

    @property
    def kind(self) -> str:
        """'SFT' or 'GRPO' from the metrics (or the pipeline stage name), else 'training'."""
        if has_metric(self.metrics, "loss/sft") or self.name == "sft":
            return "SFT"
        if has_metric(self.metrics, "reward/mean") or self.name == "grpo":
            return "GRPO"
        return "training"

    @property
    def last_step(self) -> int | None:
        """The last step with metrics or an eval, or None when nothing was logged."""
        steps = [int(r["step"]) for r in self.metrics] + [e.step for e in self.evals]
        return max(steps) if steps else None


def load_stage(name: str, run: RunDir) -> Stage:
    """Everything the report shows of one training run directory."""
    sample_steps = run.sample_steps()
    samples_file = run.samples(sample_steps[-1]) if sample_steps else None
    return Stage(name, run.root, load_metrics(run.metrics), load_evals(run), samples_file,
                 read_jsonl(samples_file) if samples_file else [], read_yaml(run.config), run.done() is not None)


def rl_on(config: dict[str, Any]) -> bool:
    """Whether a pipeline.yaml runs the GRPO stage; a config from before `rl` existed always did."""
    return config.get("rl") is not False


# Pipeline stages a config may turn off, and how pipeline.yaml says they are on (as pipeline.stage_enabled decides;
# a config from before a stage existed does not name it: off).
OPTIONAL_STAGES = {"grpo": rl_on, "sft_control": lambda c: c.get("sft_control") is True,
                   "passk": lambda c: isinstance(c.get("passk"), dict) and c["passk"].get("enabled") is True
                   and (c.get("eval") or {}).get("n", 1) != 0,
                   "transfer": lambda c: isinstance(c.get("transfer"), dict) and bool(c["transfer"].get("tasks"))}


def stage_status(pipe: PipelineDir, stage: str, config: dict[str, Any]) -> str:
    """'done' (DONE written), 'off' (turned off in the config), 'incomplete (no DONE marker)' (started), or
    'missing'."""
    if pipe.done(stage) is not None:
        return "done"
    if stage in OPTIONAL_STAGES and not OPTIONAL_STAGES[stage](config):
        return "off"
    d = pipe.stage(stage)
    if d.is_dir() and any(d.iterdir()):
        return "incomplete (no DONE marker)"
    return "missing"


def stage_timing(directory: Path, stage: Stage | None, recorded: Any = None) -> tuple[float | None, str]:
    """Wall time of a stage -> (seconds, where it came from): `recorded` (its timings.json entry), else its DONE
    record, else metrics.jsonl timestamps (approximate); (None, "") when none of them knows."""
    if is_num(recorded):
        return float(recorded), "timings.json"
    done = read_done(directory)
    if done is not None and is_num(done["seconds"]):
        return float(done["seconds"]), "DONE"
    if stage is not None:
        xs, ts = series(stage.metrics, "time")
        if len(ts) >= 2:
            per_step = (ts[-1] - ts[0]) / max(xs[-1] - xs[0], 1)
            return ts[-1] - ts[0] + per_step, "approx., from metrics.jsonl timestamps"
    return None, ""


def accuracy_ci(summary: dict[str, Any]) -> tuple[float, float] | None:
    """An eval summary's 95% accuracy interval (lo, hi), or None when it has none."""
    ci = summary.get("accuracy_ci95")
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(is_num(v) for v in ci):
        return float(ci[0]), float(ci[1])
    return None
