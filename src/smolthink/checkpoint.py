"""Atomic, verifiable checkpoints and exact resume: trainable weights (safetensors), optimizer, scheduler, RNG
states (one per process) and loop state, written to a temporary directory with a manifest (every file's size and sha256) written
last, then renamed, so a crash never leaves a half checkpoint under a real name. Resume reads the newest
checkpoint that matches its manifest and loads, falling back to older ones."""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .errors import SmolthinkError
from .models import file_sha256
from .rundir import STEP_DIR, atomic_dir, discard, step_name

MANIFEST = "manifest.json"  # {"step": int, "files": {name: {"bytes": int, "sha256": str}}}, written last
FILES = ("trainable.safetensors", "optimizer.pt", "trainer.pt", "state.json")


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors the optimizer updates, by parameter name (the LoRA adapter under LoRA)."""
    return {n: p.detach().contiguous().clone() for n, p in model.named_parameters() if p.requires_grad}


def nonfinite_tensor(model: torch.nn.Module) -> str | None:
    """The name of the first trainable tensor holding a NaN or inf, or None when all are finite."""
    return next((n for n, p in model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()), None)


def require_finite(model: torch.nn.Module, what: str) -> None:
    """Refuse to write `what` from non-finite weights: a saved NaN model would look like a finished run."""
    bad = nonfinite_tensor(model)
    if bad is not None:
        raise SmolthinkError(f"refusing to save {what}: weight {bad} holds NaN or inf (training diverged: lower "
                             f"learning_rate or resume from an earlier checkpoint)")


def rng_state() -> dict[str, Any]:
    """Global RNG states of python, numpy and torch."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what rng_state() returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def write_manifest(directory: Path, step: int) -> None:
    """manifest.json: the size and sha256 of every file in `directory`; its presence marks the write finished."""
    files = {p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
             for p in sorted(Path(directory).iterdir()) if p.is_file() and p.name != MANIFEST}
    (Path(directory) / MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=2))


def save_checkpoint(ckpt_root: Path, step: int, model, optimizer, scheduler, state: dict[str, Any],
                    extra: dict[str, Any] | None = None, keep: int = 2,
                    rng_states: list[dict[str, Any]] | None = None) -> Path:
    """Write checkpoints/step_XXXXXX atomically (`rundir.atomic_dir`: built under a temp name, fsynced, renamed)
    with its manifest last; keep the newest `keep` ones. `state` is JSON (loop counters), `extra` is torch-saved
    (buffer, pending plan), `rng_states` every process's `rng_state()` by rank (default: this process's alone).
    Non-finite weights are refused (SmolthinkError)."""
    require_finite(model, f"the step {step} checkpoint")
    ckpt_root = Path(ckpt_root)
    final = ckpt_root / step_name(step)
    with atomic_dir(final) as tmp:
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save({"scheduler": scheduler.state_dict(), "rng": rng_states or [rng_state()], "extra": extra or {}},
                   tmp / "trainer.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2))
        write_manifest(tmp, step)
    for old in list_checkpoints(ckpt_root)[:-keep] if keep > 0 else []:
        discard(old)
    return final


def step_dirs(ckpt_root: Path) -> list[Path]:
    """Every checkpoints/step_XXXXXX directory, finished or not, oldest first."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if STEP_DIR.match(p.name) and p.is_dir()),
                  key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Checkpoint directories whose write finished (manifest present), oldest first; they may still be damaged
    (see read_checkpoint)."""
    return [p for p in step_dirs(ckpt_root) if (p / MANIFEST).is_file()]


class DamagedCheckpoint(Exception):
    """A checkpoint that does not match its manifest or does not load; the message says why."""


@dataclass
class Checkpoint:
    """A checkpoint read into memory (verified against its manifest), ready to restore."""

    path: Path
    state: dict[str, Any]  # state.json: {"step": int, loop counters...}
    weights: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    trainer: dict[str, Any]  # {"scheduler", "rng": [rng_state() of each process, by rank], "extra"}

    @property
    def step(self) -> int:
        """Optimizer steps done when it was written."""
        return int(self.state["step"])


def verify_manifest(path: Path) -> None:
    """Raise DamagedCheckpoint unless every file the manifest lists (and every file a checkpoint needs) is there
    with the recorded size and sha256."""
    try:
        files = {str(name): (int(f["bytes"]), str(f["sha256"]))
                 for name, f in json.loads((path / MANIFEST).read_text())["files"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise DamagedCheckpoint(f"unreadable {MANIFEST} ({type(e).__name__})") from None
    for name in FILES:
        if name not in files:
            raise DamagedCheckpoint(f"{name} is not in its manifest")
    for name, (size, sha256) in files.items():
        p = path / name
        if not p.is_file():
            raise DamagedCheckpoint(f"{name} is missing")
        if p.stat().st_size != size:
            raise DamagedCheckpoint(f"{name} has {p.stat().st_size} bytes, the manifest says {size}")
        if file_sha256(p) != sha256:
            raise DamagedCheckpoint(f"{name} does not match its sha256 in the manifest")


def read_checkpoint(path: Path) -> Checkpoint:
    """Verify a checkpoint against its manifest and load its files (not yet into a model) -> Checkpoint; raises
    DamagedCheckpoint saying why it cannot be resumed from."""
    path = Path(path)
    verify_manifest(path)
    try:
        return Checkpoint(path=path, state=json.loads((path / "state.json").read_text()),
                          weights=load_file(str(path / "trainable.safetensors")),
                          optimizer=torch.load(path / "optimizer.pt", weights_only=False),
                          trainer=torch.load(path / "trainer.pt", weights_only=False))
    except Exception as e:  # the load check: whatever a reader raises, this checkpoint cannot be resumed from
        raise DamagedCheckpoint(f"does not load ({type(e).__name__}: {e})") from None


def newest_intact(ckpt_root: Path) -> tuple[Checkpoint | None, list[tuple[Path, str]]]:
    """The newest finished checkpoint that verifies and loads, and the newer ones skipped with the reason each
    was skipped -> (checkpoint or None, [(path, reason), ...])."""
    skipped = []
    for path in reversed(list_checkpoints(ckpt_root)):
        try:
            return read_checkpoint(path), skipped
        except DamagedCheckpoint as e:
            skipped.append((path, str(e)))
    return None, skipped


def restore_checkpoint(ckpt: Checkpoint, model, optimizer, scheduler, rank: int = 0,
                       world: int = 1) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore weights, optimizer, scheduler and process `rank`'s RNG from a read checkpoint -> (state, extra). The
    checkpoint must come from a run of `world` processes (each process's RNG and rollout seeds are its own)."""
    rngs = ckpt.trainer["rng"]
    if len(rngs) != world:
        raise SmolthinkError(f"{ckpt.path} was written by a run of {len(rngs)} process(es): resume it with "
                             f"{len(rngs)}, not {world}")
    params = dict(model.named_parameters())
    missing = [n for n in ckpt.weights if n not in params]
    if missing:
        raise SmolthinkError(f"checkpoint does not match the model (e.g. {missing[0]}): same config and model?")
    with torch.no_grad():
        for n, t in ckpt.weights.items():
            params[n].copy_(t)
    optimizer.load_state_dict(ckpt.optimizer)
    scheduler.load_state_dict(ckpt.trainer["scheduler"])
    set_rng_state(rngs[rank])
    return ckpt.state, ckpt.trainer["extra"]
