"""The run directory is the contract between stages: training writes these files, and the pipeline, resume and
the report only read them. Every file name lives here, and so does the one atomic writer (temp file, fsync,
rename, fsync of the directory), so a crash or a power cut leaves either the old file or the new one.

Stage run directory (`smolthink sft`, `smolthink train`, or a pipeline stage):
    config.yaml  metrics.jsonl  data_stats.json  traces.jsonl  DONE
    eval/step_000010.json (+ .completions.jsonl)   samples/step_000010.jsonl   groups/step_000010.jsonl
    checkpoints/step_000010/   final/adapter/  final/merged/
Pipeline run directory:
    pipeline.yaml  timings.json  rss.json  report.md  plots/
    base_eval/eval.json (+ completions.jsonl)   data/traces.jsonl  data/stats.json
    sft/  grpo/  sft_control/  (stage run directories)   final_eval/eval.json (+ completions.jsonl)
    passk/{sft,grpo,sft_control}.json (+ .completions.jsonl)
    transfer/base.json  transfer/final.json (+ .completions.jsonl)

DONE is written last by whoever finishes a stage, and always holds the same JSON: {"seconds": wall seconds,
"steps": optimizer steps or null}.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from .errors import SmolthinkError

STEP_FILE = re.compile(r"^step_(\d{6,})\.json$")
STEP_SAMPLES = re.compile(r"^step_(\d{6,})\.jsonl$")
STEP_DIR = re.compile(r"^step_(\d{6,})$")


def step_name(step: int) -> str:
    """`step_000010`: the zero-padded name every per-step file and directory uses."""
    return f"step_{step:06d}"


def _steps(directory: Path, pattern: re.Pattern) -> list[int]:
    """The steps of the per-step files in `directory` whose names match `pattern`, ascending."""
    if not directory.is_dir():
        return []
    return sorted(int(m.group(1)) for p in directory.iterdir() if (m := pattern.match(p.name)))


# ----------------------------------------------------------------------------------------------- atomic writes


def writable_dir(path: Path, what: str = "output directory") -> Path:
    """Create directory `path` (with its parents) and check that a file can be written in it -> path. Checked
    where a command starts, so a file in the way, a read-only disk or a missing permission is one line naming
    the path, before any work rather than when the first result is written."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SmolthinkError(f"{what} {path} is a file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:
        raise SmolthinkError(f"cannot write to {what} {path}: {e.strerror or e}") from None
    return path


def writable_file(path: Path, what: str = "output file") -> Path:
    """Check a file a command writes at its end, before it starts: not a directory, its directory writable."""
    path = Path(path)
    if path.is_dir():
        raise SmolthinkError(f"{what} {path} is a directory, not a file")
    writable_dir(path.parent, f"the directory of {what}")
    return path


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a rename into it) durable. A no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, data: str | bytes) -> Path:
    """Write a file completely or not at all: a temp file in the same directory, flushed and fsynced, renamed
    over `path`, then the directory fsynced."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
    return path


def write_json(path: Path, obj: Any) -> Path:
    """Write JSON atomically."""
    return atomic_write(path, json.dumps(obj, indent=2, ensure_ascii=False))


def write_jsonl(path: Path, rows: Iterable[Any]) -> Path:
    """Write rows as JSONL atomically."""
    return atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under root (before a directory is renamed into place)."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(dirpath))


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Build a directory under a temp name and rename it to `target` when the block succeeds (fsynced first), so
    `target` is complete or absent; an older `target` is replaced only after the new one is complete. On an
    exception the temp directory is removed and `target` is left as it was."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp_{target.name}.", dir=target.parent))
    try:
        yield tmp
        fsync_tree(tmp)
        old = move_aside(target) if target.exists() else None
        os.replace(tmp, target)
        fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def move_aside(path: Path) -> Path:
    """Rename `path` to an `.old_` name in the same directory (what remove_leftovers deletes) -> the new name."""
    old = path.with_name(f".old_{path.name}.{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(path, old)
    return old


def discard(path: Path) -> None:
    """Delete a directory so that a kill part-way never leaves it half-deleted under its own name: it is renamed
    aside first, and a kill during the deletion leaves an `.old_` leftover."""
    shutil.rmtree(move_aside(Path(path)), ignore_errors=True)


def remove_leftovers(parent: Path) -> list[Path]:
    """Delete the temp and replaced directories/files that a killed `atomic_dir` or `atomic_write` left in
    `parent` (names starting `.tmp_`, `.old_`, or ending `.tmp`) -> what was removed."""
    parent = Path(parent)
    if not parent.is_dir():
        return []
    gone = []
    for p in parent.iterdir():
        if p.name.startswith((".tmp_", ".old_")) or (p.name.startswith(".") and p.name.endswith(".tmp")):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    p.unlink()
            gone.append(p)
    return gone


# ----------------------------------------------------------------------------------------------- DONE


def mark_done(directory: Path, seconds: float, steps: int | None = None) -> Path:
    """Write <directory>/DONE: the stage finished, in `seconds` of wall time and `steps` optimizer steps."""
    return write_json(Path(directory) / "DONE", {"seconds": round(float(seconds), 1), "steps": steps})


def read_done(directory: Path) -> dict[str, Any] | None:
    """The DONE record of a finished stage ({"seconds", "steps"}), or None when it has not finished. A DONE file
    that is not the expected JSON still marks the stage finished, with unknown seconds and steps."""
    path = Path(directory) / "DONE"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = None
    if not isinstance(data, dict):
        return {"seconds": None, "steps": None}
    return {"seconds": data.get("seconds"), "steps": data.get("steps")}


# ----------------------------------------------------------------------------------------------- layouts


@dataclass(frozen=True)
class RunDir:
    """The files of one stage run directory (see the module docstring)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    config = property(lambda self: self.root / "config.yaml", doc="the resolved config, written before step 0")
    metrics = property(lambda self: self.root / "metrics.jsonl", doc="one JSON object per optimizer step")
    data_stats = property(lambda self: self.root / "data_stats.json", doc="SFT: what the traces held")
    traces = property(lambda self: self.root / "traces.jsonl", doc="SFT: traces generated for a stand-alone run")
    checkpoints = property(lambda self: self.root / "checkpoints", doc="checkpoints/step_XXXXXX/")
    final = property(lambda self: self.root / "final", doc="final/adapter (peft) and final/merged (transformers)")
    final_merged = property(lambda self: self.root / "final" / "merged", doc="the merged final model")
    eval_dir = property(lambda self: self.root / "eval", doc="eval/step_XXXXXX.json")
    samples_dir = property(lambda self: self.root / "samples", doc="samples/step_XXXXXX.jsonl")
    groups_dir = property(lambda self: self.root / "groups", doc="groups/step_XXXXXX.jsonl")

    def eval(self, step: int) -> Path:
        """eval/step_XXXXXX.json: the eval summary after `step` optimizer steps (0: before training)."""
        return self.eval_dir / f"{step_name(step)}.json"

    def eval_completions(self, step: int) -> Path:
        """eval/step_XXXXXX.completions.jsonl: every eval prompt, completion and score."""
        return self.eval_dir / f"{step_name(step)}.completions.jsonl"

    def eval_steps(self) -> list[int]:
        """Steps with an eval summary, ascending."""
        return _steps(self.eval_dir, STEP_FILE)

    def samples(self, step: int) -> Path:
        """samples/step_XXXXXX.jsonl: decoded rollouts of that step."""
        return self.samples_dir / f"{step_name(step)}.jsonl"

    def sample_steps(self) -> list[int]:
        """Steps with decoded rollouts, ascending."""
        return _steps(self.samples_dir, STEP_SAMPLES)

    def started(self) -> bool:
        """True once a training run has begun writing here (metrics.jsonl or checkpoints/ exist)."""
        return self.metrics.is_file() or self.checkpoints.is_dir()

    def clear(self) -> None:
        """Delete what a training run writes here, to start it again (traces.jsonl stays: an input a restart may
        reuse)."""
        for path in (self.config, self.metrics, self.data_stats):
            path.unlink(missing_ok=True)
        for path in (self.checkpoints, self.eval_dir, self.samples_dir, self.final):
            if path.is_dir():
                discard(path)

    def groups(self, step: int) -> Path:
        """groups/step_XXXXXX.jsonl: every GRPO group of the buffer fill first trained on at that step."""
        return self.groups_dir / f"{step_name(step)}.jsonl"

    def group_steps(self) -> list[int]:
        """Steps with a groups file, ascending."""
        return _steps(self.groups_dir, STEP_SAMPLES)

    def checkpoint(self, step: int) -> Path:
        """checkpoints/step_XXXXXX/."""
        return self.checkpoints / step_name(step)

    def done(self) -> dict[str, Any] | None:
        """The DONE record, or None while unfinished."""
        return read_done(self.root)

    def is_run(self) -> bool:
        """True when root looks like a stage run (its config, metrics or evals exist)."""
        return self.config.is_file() or self.metrics.is_file() or self.eval_dir.is_dir()

    def mark_done(self, seconds: float, steps: int | None = None) -> Path:
        """Mark the run finished (written last)."""
        return mark_done(self.root, seconds, steps)


PIPELINE_STAGES = ("base_eval", "data", "sft", "grpo", "final_eval", "transfer", "sft_control", "passk",
                   "report")


@dataclass(frozen=True)
class PipelineDir:
    """The files of a pipeline run directory (see the module docstring)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    config = property(lambda self: self.root / "pipeline.yaml", doc="the resolved pipeline config")
    timings = property(lambda self: self.root / "timings.json", doc="{stage: wall seconds} of finished stages")
    rss = property(lambda self: self.root / "rss.json", doc="the last pipeline process's per-phase RSS timeline")
    report = property(lambda self: self.root / "report.md", doc="written by `smolthink report`")
    plots = property(lambda self: self.root / "plots", doc="the report's PNG plots")
    traces = property(lambda self: self.root / "data" / "traces.jsonl", doc="warm-up traces")
    data_stats = property(lambda self: self.root / "data" / "stats.json", doc="the data stage's yield")

    def stage(self, name: str) -> Path:
        """The directory of one pipeline stage."""
        if name not in PIPELINE_STAGES:
            raise ValueError(f"unknown pipeline stage {name!r} (stages: {', '.join(PIPELINE_STAGES)})")
        return self.root / name

    def run(self, name: str) -> RunDir:
        """A training stage's run directory (sft, grpo, sft_control)."""
        return RunDir(self.stage(name))

    def eval_json(self, stage: str) -> Path:
        """<stage>/eval.json of an eval stage (base_eval, final_eval)."""
        return self.stage(stage) / "eval.json"

    def completions(self, stage: str) -> Path:
        """<stage>/completions.jsonl of an eval stage."""
        return self.stage(stage) / "completions.jsonl"

    def passk(self, model: str) -> Path:
        """passk/<model>.json: the pass@k / mean@k eval of one stage's final model (sft, grpo, sft_control)."""
        return self.stage("passk") / f"{model}.json"

    def passk_completions(self, model: str) -> Path:
        """passk/<model>.completions.jsonl: every sample of that eval."""
        return self.stage("passk") / f"{model}.completions.jsonl"

    def transfer_eval(self, model: str) -> Path:
        """transfer/<model>.json: the base or final model on the tasks outside the mixture (per_task inside)."""
        return self.stage("transfer") / f"{model}.json"

    def transfer_completions(self, model: str) -> Path:
        """transfer/<model>.completions.jsonl: every transfer prompt, completion and score of that model."""
        return self.stage("transfer") / f"{model}.completions.jsonl"

    def done(self, stage: str) -> dict[str, Any] | None:
        """A stage's DONE record, or None while unfinished."""
        return read_done(self.stage(stage))

    def mark_done(self, stage: str, seconds: float, steps: int | None = None) -> None:
        """Record a finished stage: its DONE record and its wall time in timings.json."""
        mark_done(self.stage(stage), seconds, steps)
        timings = self.read_timings()
        timings[stage] = round(float(seconds), 1)
        write_json(self.timings, timings)

    def read_timings(self) -> dict[str, float]:
        """timings.json, or {} when missing or unreadable."""
        try:
            data = json.loads(self.timings.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def is_pipeline(self) -> bool:
        """True when root looks like a pipeline run (its config or any stage directory exists)."""
        return self.config.is_file() or any((self.root / s).is_dir() for s in PIPELINE_STAGES)
