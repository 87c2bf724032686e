"""reasoning-gym tasks: datasets and weighted mixtures, provably disjoint train/eval splits, answer balancing,
and strict correctness scoring on top of the task's own (sandboxed) scorer."""
from __future__ import annotations

import difflib
import math
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from .chat import is_case_free, normalize_answer
from .errors import SmolthinkError
from .seeds import derive_seed
from .types import Example



@dataclass
class TaskSpec:
    """One reasoning-gym dataset, its generator kwargs and its weight in a mixture."""

    name: str
    weight: float = 1.0
    config: dict[str, Any] = field(default_factory=dict)


def available_tasks() -> list[str]:
    """Names of all registered reasoning-gym datasets."""
    from reasoning_gym.factory import DATASETS

    return sorted(DATASETS)


def parse_tasks(value: str | Sequence[Any]) -> list[TaskSpec]:
    """Accept "syllogism", "syllogism:2,propositional_logic:1", or a list of names / dicts
    {name, weight, config}; check every name exists (with a close-match suggestion)."""
    items: list[Any]
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",") if v.strip()]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise SmolthinkError(f"task must be a name, a 'a:2,b:1' mixture or a list, got {value!r}")
    specs = []
    for item in items:
        if isinstance(item, TaskSpec):
            spec = item
        elif isinstance(item, dict):
            unknown = set(item) - {"name", "weight", "config"}
            if unknown or not isinstance(item.get("name"), str) or not isinstance(item.get("config") or {}, dict):
                raise SmolthinkError(f"task entries take name (str), weight, config (mapping); got {item!r}")
            spec = TaskSpec(item["name"], _weight(item["name"], item.get("weight", 1.0)), dict(item.get("config") or {}))
        elif isinstance(item, str):
            name, sep, w = item.partition(":")
            spec = TaskSpec(name.strip(), _weight(name.strip(), w if sep else 1.0))
        else:
            raise SmolthinkError(f"task entries are names or mappings, got {item!r}")
        known = available_tasks()
        if spec.name not in known:
            close = difflib.get_close_matches(spec.name, known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else " (see `smolthink tasks`)"
            raise SmolthinkError(f"unknown task '{spec.name}'{hint}")
        check_config(spec)
        specs.append(spec)
    if not specs:
        raise SmolthinkError("no task given")
    return specs


def check_config(spec: TaskSpec) -> None:
    """Build and validate the task's reasoning-gym config now (microseconds), so a bad or missing generator
    setting fails at start-up rather than when the first questions are drawn, after a model has loaded."""
    from reasoning_gym.factory import DATASETS

    try:
        config = DATASETS[spec.name][1](**spec.config)
        if hasattr(config, "validate"):
            config.validate()
    except (TypeError, ValueError, AssertionError) as e:
        raise config_error(spec, e) from None


def _weight(name: str, value: Any) -> float:
    """A mixture weight: a finite number > 0, or a one-line error naming the task."""
    try:
        w = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        w = math.nan
    if not (math.isfinite(w) and w > 0):
        raise SmolthinkError(f"bad mixture weight for task '{name}': {value!r} (expected a finite number > 0, "
                             f"e.g. {name}:1)")
    return w


def _syllogism_gold_ok(entry: dict) -> bool:
    """reasoning-gym's syllogism checker skips the undistributed-middle rule, so ~12% of its labels are wrong
    (e.g. "All S are M, Some M are P" does not give "Some S are P"); keep items whose label is logically right."""
    from .solvers.syllogism import syllogism_verdict

    return syllogism_verdict(entry) == entry["metadata"]["is_valid"]


# Tasks whose generator is known to mislabel some items: a check that keeps only correctly labelled ones.
GOLD_CHECKS = {"syllogism": _syllogism_gold_ok}


def _generate(spec: TaskSpec, seed: int, size: int) -> list[dict]:
    """Raw reasoning-gym entries for one spec; bad generator kwargs become a one-line error."""
    import reasoning_gym as rg

    try:
        ds = rg.create_dataset(spec.name, seed=seed, size=size, **spec.config)
    except (TypeError, ValueError, AssertionError) as e:
        raise config_error(spec, e) from None
    return [ds[i] for i in range(size)]


def config_error(spec: TaskSpec, e: Exception) -> SmolthinkError:
    """The one-line error for generator settings reasoning-gym refused: what was given and what it takes."""
    given = f"config {spec.config}" if spec.config else "no settings given"
    return SmolthinkError(f"bad config for task '{spec.name}': {e} ({given}); {settings_hint(spec.name)}")


def settings_hint(name: str) -> str:
    """What to do about a task's generator settings: the list form that carries them and the fields its
    reasoning-gym config takes."""
    import dataclasses

    from reasoning_gym.factory import DATASETS

    fields = [f.name for f in dataclasses.fields(DATASETS[name][1]) if f.name not in ("seed", "size")]
    return (f"set its generator settings as task: [{{name: {name}, config: {{...}}}}] in the YAML (fields: "
            f"{', '.join(fields) or 'none'})")


def split_counts(specs: Sequence[TaskSpec], n: int) -> list[int]:
    """Split n items over specs by weight (largest remainder, sums exactly to n)."""
    total = sum(s.weight for s in specs)
    raw = [n * s.weight / total for s in specs]
    counts = [int(r) for r in raw]
    order = sorted(range(len(specs)), key=lambda i: raw[i] - counts[i], reverse=True)
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


def _balanced(entries: list[dict], n: int, rng: random.Random) -> list[dict] | None:
    """n entries with (as near as possible) equal counts per gold answer class; None when the task has no
    small answer set. A class with too few entries (a skewed task such as letter_counting, where a count of 9 is
    rare) gives all it has and the other classes share its shortfall equally."""
    classes = Counter(e["answer"] for e in entries)
    if None in classes or not 2 <= len(classes) <= 10:
        return None
    per = {c: [e for e in entries if e["answer"] == c] for c in classes}
    want = dict(zip(per, split_counts([TaskSpec(str(c)) for c in per], n)))
    short = sum(max(0, k - len(per[c])) for c, k in want.items())
    while short:  # hand the shortfall out one by one to classes that still have entries to give
        spare = [c for c in per if len(per[c]) > want[c]]
        if not spare:
            return None  # fewer than n entries in all
        for c in spare[:short]:
            want[c] += 1
        short -= len(spare[:short])
    out = []
    for c, items in per.items():
        out += items[: min(want[c], len(items))]
    rng.shuffle(out)
    return out


def make_examples(
    specs: Sequence[TaskSpec],
    n: int,
    seed: int,
    split: str,
    balanced: bool = False,
    exclude: Iterable[str] = (),
    check_gold: bool = True,
) -> list[Example]:
    """n examples from the mixture, each task's items generated from its own seed derived from (seed, split, task,
    attempt), so the eval and train splits never share reasoning-gym seed ranges; every question in `exclude` is
    removed and duplicates dropped; `balanced` equalises answer classes per task;
    `check_gold` drops items whose gold label is logically wrong (GOLD_CHECKS)."""
    banned = set(exclude)
    rng = random.Random(derive_seed(seed, "balance", split))
    out: list[Example] = []
    for k, (spec, count) in enumerate(zip(specs, split_counts(specs, n))):
        if count == 0:
            continue
        pool_size, picked = int(count * (3 if balanced else 1.25)) + 16, None
        for attempt in range(6):
            check = GOLD_CHECKS.get(spec.name) if check_gold else None
            pool = [e for e in _generate(spec, derive_seed(seed, split, spec.name, k, attempt), pool_size)
                    if e["question"] not in banned and (check is None or check(e))]
            pool = list({e["question"]: e for e in pool}.values())  # dedupe, keep order
            picked = _balanced(pool, count, rng) if balanced else None
            if picked is None and len(pool) >= count:
                picked = pool[:count]
            if picked is not None and len(picked) == count:
                break
            pool_size *= 2
        if picked is None or len(picked) < count:
            raise SmolthinkError(f"task '{spec.name}' cannot produce {count} distinct {split} questions")
        for i, e in enumerate(picked):
            out.append(Example(id=f"{spec.name}/{split}/{seed}/{i}", task=spec.name, question=e["question"],
                               answer=e["answer"], entry=e))
            banned.add(e["question"])
    if len(specs) > 1:
        rng.shuffle(out)
    return out


def train_eval_split(specs: Sequence[TaskSpec], n_train: int, n_eval: int, seed: int = 0,
                     balanced_eval: bool = True, balanced_train: bool = False) -> tuple[list[Example], list[Example]]:
    """Held-out eval set first, then a train set from another seed with every eval question excluded."""
    eval_set = make_examples(specs, n_eval, seed, "eval", balanced=balanced_eval)
    train = make_examples(specs, n_train, seed, "train", balanced=balanced_train,
                          exclude=(e.question for e in eval_set))
    return train, eval_set


def spec_for(example: Example, specs: Sequence[TaskSpec]) -> TaskSpec:
    """The spec an example came from."""
    for s in specs:
        if s.name == example.task:
            return s
    return TaskSpec(example.task)


def reference_answer(ex: Example) -> str:
    """One answer that scores as correct: the gold answer, or for checker-verified tasks (gold None, e.g.
    propositional_logic) the valid answer the item's metadata gives (what a teacher is told, and what a
    format-only trace answers)."""
    if ex.answer is not None:
        return str(ex.answer)
    meta = ex.entry.get("metadata") or {}
    if meta.get("example_answer") is not None:
        return str(meta["example_answer"])
    raise SmolthinkError(f"task '{ex.task}' has no gold answer and no metadata example_answer to hint with")


def strict_match(answer: str | None, gold: str | None) -> bool:
    """Exact match after normalisation (case-folded for Yes/No-like gold answers)."""
    if answer is None or gold is None:
        return False
    case_free = is_case_free(gold)
    return normalize_answer(answer, case_free) == normalize_answer(gold, case_free)


def majority_class(golds: Sequence[str | None]) -> tuple[str | None, float | None]:
    """Most common gold answer and its share; (None, None) when answers are open-ended (>10 classes or None)."""
    counts = Counter(golds)
    if None in counts or not counts or len(counts) > 10:
        return None, None
    cls, k = counts.most_common(1)[0]
    return cls, k / len(golds)
