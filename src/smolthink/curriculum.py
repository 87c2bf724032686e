"""Difficulty scheduling through reasoning-gym's own curricula (`reasoning_gym.factory.create_curriculum`).

A task's curriculum names its difficulty attributes (syllogism: which quantifiers are allowed; propositional_logic:
how many variables, statements, operator depth), each with a list of levels. `TaskCurriculum` holds the current
level of each attribute it moves, turns them into the task's generator kwargs (`BaseCurriculum.
generate_configuration`, ranges in reasoning-gym's default "inclusive" mode: [level 0's value, this level's]),
and moves them from the accuracy of groups of fresh questions drawn at the current level: the mean over the last
`window` such groups above `raise_above` raises every moved attribute one level (those already at the top stay),
below `lower_below` lowers every one (those at 0 stay); after a move the window starts empty, so the next decision
is made on questions of the new level only.

Start level (curriculum.start_level None): for each attribute, the highest level whose generated fields equal the
task's configured ones (its `config:` over the generator's defaults), so the run starts at the difficulty the eval
set is drawn at; an attribute no level reproduces starts at 0 (the question source logs it).
"""
from __future__ import annotations

import dataclasses
import logging
from collections import deque
from typing import Any, Sequence

from .config import CurriculumConfig
from .errors import SmolthinkError
from .tasks import TaskSpec

log = logging.getLogger(__name__)


def attribute_fields(attr) -> list[str]:
    """The generator config fields a reasoning-gym attribute sets (one for a scalar, lower/upper for a range)."""
    return [attr.field_name] if hasattr(attr, "field_name") else [attr.lower_field_name, attr.upper_field_name]


class TaskCurriculum:
    """One task's difficulty levels, moved by group accuracy (see the module docstring)."""

    def __init__(self, spec: TaskSpec, rg_curriculum, moving: Sequence[str], levels: dict[str, int],
                 cfg: CurriculumConfig, unmatched: Sequence[str] = ()):
        self.spec, self.rg, self.moving, self.cfg = spec, rg_curriculum, list(moving), cfg
        self.unmatched = list(unmatched)  # attributes no level of which reproduces the configured difficulty
        self.window: deque[float] = deque(maxlen=cfg.window)
        self.set_levels(levels)

    @property
    def levels(self) -> dict[str, int]:
        """The current level of each moved attribute."""
        return {a: self.rg.get_attr_level(a) for a in self.moving}

    def set_levels(self, levels: dict[str, int]) -> None:
        """Set the moved attributes' levels (reasoning-gym checks each is in range)."""
        for a, level in levels.items():
            self.rg.set_attr_level(a, int(level))

    def task_spec(self) -> TaskSpec:
        """The task with its generator kwargs at the current levels: the configured kwargs, with the fields of the
        moved attributes replaced by the curriculum's (attributes not moved keep the configured difficulty)."""
        generated = dataclasses.asdict(self.rg.generate_configuration(dict(self.spec.config)))
        fields = [f for a in self.moving for f in attribute_fields(self.rg.attributes[a])]
        return TaskSpec(self.spec.name, self.spec.weight, {**self.spec.config, **{f: generated[f] for f in fields}})

    def observe(self, accuracy: float) -> int:
        """Add one fresh group's accuracy (its share of fully correct completions) at the current level; move when
        the full window's mean leaves the target band -> +1 raised, -1 lowered, 0 unchanged."""
        self.window.append(float(accuracy))
        if len(self.window) < self.cfg.window:
            return 0
        mean = sum(self.window) / len(self.window)
        step = 1 if mean > self.cfg.raise_above else -1 if mean < self.cfg.lower_below else 0
        if step == 0:
            return 0
        before = self.levels
        for a in self.moving:
            top = len(self.rg.attributes[a].levels) - 1
            self.rg.set_attr_level(a, min(top, max(0, before[a] + step)))
        if self.levels == before:
            return 0  # at the top (or the bottom) already: keep the window sliding
        self.window.clear()
        log.info("curriculum: %s %s to %s (accuracy %.2f over %d groups)", self.spec.name,
                 "raised" if step > 0 else "lowered", self.levels, mean, self.cfg.window)
        return step

    def window_accuracy(self) -> float | None:
        """Mean accuracy of the groups in the current window, None while it is empty."""
        return sum(self.window) / len(self.window) if self.window else None

    def state_dict(self) -> dict[str, Any]:
        """Levels and the window, for checkpoints."""
        return {"levels": self.levels, "window": list(self.window)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what state_dict returned."""
        self.set_levels(state["levels"])
        self.window.clear()
        self.window.extend(state["window"])


def _rg_curriculum(name: str):
    """reasoning-gym's curriculum for a task, or None when it has none (or one without attributes)."""
    from reasoning_gym.factory import create_curriculum, has_curriculum

    if not has_curriculum(name):
        return None
    cur = create_curriculum(name)
    return cur if cur.attributes else None


def _configured(spec: TaskSpec) -> dict[str, Any]:
    """The task's generator config as a dict: its defaults with the configured kwargs over them."""
    from reasoning_gym.factory import DATASETS

    return dataclasses.asdict(DATASETS[spec.name][1](**spec.config))


def matching_level(rg_curriculum, attr: str, configured: dict[str, Any]) -> int | None:
    """The highest level at which the curriculum generates the configured values of `attr`'s fields, or None."""
    definition = rg_curriculum.attributes[attr]
    fields = attribute_fields(definition)
    saved = rg_curriculum.get_attr_level(attr)
    found = None
    for level in range(len(definition.levels)):
        rg_curriculum.set_attr_level(attr, level)
        generated = dataclasses.asdict(rg_curriculum.generate_configuration())
        if all(generated[f] == configured.get(f) for f in fields):
            found = level
    rg_curriculum.set_attr_level(attr, saved)
    return found


def _moving(specs: Sequence[TaskSpec], found: dict[str, Any], wanted: Sequence[str]) -> dict[str, list[str]]:
    """The attributes to move per task: `wanted` names ('attr' for every task that has it, 'task.attr' for one),
    empty for all; an unknown name is a one-line error naming the valid ones."""
    valid = [f"{t}.{a}" for t, cur in found.items() for a in cur.attributes]
    listed = ", ".join(valid) or "none: no task here has a curriculum"
    for name in wanted:
        if name not in valid and not any(v.split(".", 1)[1] == name for v in valid):
            raise SmolthinkError(f"unknown curriculum attribute '{name}' (valid: {listed})")
    return {t: [a for a in cur.attributes if not wanted or a in wanted or f"{t}.{a}" in wanted]
            for t, cur in found.items()}


def _start_levels(spec: TaskSpec, cur, moving: Sequence[str], start: int | None) -> tuple[dict[str, int], list[str]]:
    """Each moved attribute's start level: `start` (checked against its range: one line naming the valid levels)
    or the level matching the configured difficulty, else 0 -> (levels, the attributes that fell back to 0)."""
    levels, unmatched = {}, []
    configured = _configured(spec) if start is None else {}
    for a in moving:
        top = len(cur.attributes[a].levels) - 1
        if start is not None:
            if start > top:
                raise SmolthinkError(f"curriculum.start_level {start} is out of range for {spec.name}.{a} "
                                     f"(valid levels: 0-{top})")
            levels[a] = start
            continue
        match = matching_level(cur, a, configured)
        if match is None:
            unmatched.append(a)
        levels[a] = match or 0
    return levels, unmatched


def build_curricula(specs: Sequence[TaskSpec], cfg: CurriculumConfig) -> tuple[dict[str, TaskCurriculum], list[str]]:
    """A TaskCurriculum per task that has a reasoning-gym curriculum and an attribute to move -> (curricula by task
    name, the names of the tasks without one). Unknown attributes and start levels out of range fail here."""
    found = {s.name: cur for s in specs if (cur := _rg_curriculum(s.name)) is not None}
    moving = _moving(specs, found, cfg.attributes)
    out = {}
    for spec in specs:
        if moving.get(spec.name):
            levels, unmatched = _start_levels(spec, found[spec.name], moving[spec.name], cfg.start_level)
            out[spec.name] = TaskCurriculum(spec, found[spec.name], moving[spec.name], levels, cfg, unmatched)
    return out, [s.name for s in specs if s.name not in out]
