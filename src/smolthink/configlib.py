"""Config machinery, independent of smolthink's own configs: documented fields with allowed ranges (`opt`),
nested sections (`section`), and building a dataclass from YAML mappings and `--set key=value` overrides with
nested or dotted keys, every value checked against its field's type, finiteness and range (one-line errors)."""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
from dataclasses import field, fields
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from .errors import SmolthinkError

T = TypeVar("T")


def opt(default: Any, help: str, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
        lt: float | None = None, choices: Sequence[str] | None = None):
    """A config field: its default, one line of documentation, and what values are allowed (bounds on a number,
    or a fixed set of strings). Floats must also be finite."""
    meta = {"help": help, "ge": ge, "gt": gt, "le": le, "lt": lt, "choices": tuple(choices) if choices else None}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def section(cls: type, help: str):
    """A nested config section (a dataclass of its own), e.g. `eval: EvalConfig`."""
    return field(default_factory=cls, metadata={"help": help})


def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key a config class accepts (for close-match suggestions)."""
    out = []
    for name, hint in _hints(cls).items():
        out.append(prefix + name)
        if dataclasses.is_dataclass(hint):
            out += _all_keys(hint, f"{prefix}{name}.")
    return out


def _collect(cls: type, src: Mapping, into: dict, prefix: str, root: type, moved: Mapping[str, str]) -> None:
    """Merge one source mapping (nested or dotted keys) into `into`, a nested dict shaped like `cls`."""
    hints = _hints(cls)
    for raw, value in src.items():
        if not isinstance(raw, str):
            raise SmolthinkError(f"config keys must be strings, got {raw!r}")
        key = moved.get(raw, raw) if not prefix else raw
        head, dot, rest = key.partition(".")
        if head not in hints:
            close = difflib.get_close_matches(prefix + key, _all_keys(root), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise SmolthinkError(f"unknown config key '{prefix + key}'{hint}")
        kind = hints[head]
        if dataclasses.is_dataclass(kind):
            sub = into.setdefault(head, {})
            if dot:
                _collect(kind, {rest: value}, sub, f"{prefix}{head}.", root, moved)
            elif isinstance(value, Mapping):
                _collect(kind, value, sub, f"{prefix}{head}.", root, moved)
            elif value is not None:
                raise SmolthinkError(f"config section '{prefix}{head}' takes a mapping of key: value, got {value!r}")
        elif kind is dict:
            sub = dict(into.get(head) or {})
            if dot:
                sub[rest] = value
            elif isinstance(value, Mapping):
                sub.update(value)
            elif value is not None:
                raise SmolthinkError(f"config key '{prefix}{head}' takes a mapping of key: value, got {value!r}")
            into[head] = sub
        elif dot:
            raise SmolthinkError(f"unknown config key '{prefix}{key}' ('{prefix}{head}' is not a section)")
        else:
            into[head] = value


def _describe_range(meta: Mapping[str, Any]) -> str:
    """'one of a | b', '0 <= value < 1', 'value > 0', or ''."""
    if meta.get("choices"):
        return "one of " + " | ".join(meta["choices"])
    lo = next((f"{meta[k]} {op} " for k, op in (("ge", "<="), ("gt", "<")) if meta.get(k) is not None), "")
    hi = next((f" {op} {meta[k]}" for k, op in (("le", "<="), ("lt", "<")) if meta.get(k) is not None), "")
    if lo and not hi:  # read a lone lower bound the natural way round: "value >= 0"
        bound, op = lo.split()[0], lo.split()[1]
        return f"value {'>=' if op == '<=' else '>'} {bound}"
    return f"{lo}value{hi}" if hi else ""


def _in_range(x: float, meta: Mapping[str, Any]) -> bool:
    checks = (("ge", lambda b: x >= b), ("gt", lambda b: x > b), ("le", lambda b: x <= b), ("lt", lambda b: x < b))
    return all(meta.get(k) is None or ok(meta[k]) for k, ok in checks)


def show_value(value: Any, limit: int = 60) -> str:
    """repr of a user's value for a one-line error, cut to `limit` characters (a 5,000-digit int has no repr)."""
    try:
        text = repr(value)
    except ValueError:
        return f"<a {type(value).__name__} too large to print>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


MAX_INT = 10**12  # no count, size or seed needs more; larger ints overflow float maths (schedules, ETAs)


def _unwrap_optional(hint: Any) -> tuple[Any, bool]:
    """(the type inside `X | None`, whether None is allowed)."""
    args = get_args(hint)
    if get_origin(hint) in (Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else Any), True
    return hint, hint is Any


def coerce_value(name: str, value: Any, hint: Any, meta: Mapping[str, Any] | None = None) -> Any:
    """Check one value against its field's type and allowed range -> the typed value, or a one-line error."""
    meta = meta or {}
    kind, optional = _unwrap_optional(hint)

    def bad(expected: str) -> SmolthinkError:
        return SmolthinkError(f"bad value for {name}: {show_value(value)} (expected {expected})")

    if value is None:
        if optional:
            return None
        raise bad(f"a value of type {getattr(kind, '__name__', kind)}")
    if kind is Any:
        return value
    if kind is bool:
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if kind in (int, float):
        number = _number(value, integer=kind is int)
        if number is None:
            raise bad("an integer" if kind is int else "a number")
        if kind is int and abs(number) > MAX_INT:
            raise bad(f"an integer of at most {MAX_INT:.0e} in size")
        if kind is float and not math.isfinite(number):
            raise bad("a finite number")
        if not _in_range(number, meta):
            raise bad(_describe_range(meta))
        return number
    if kind is str:
        if not isinstance(value, str):
            raise bad("a string")
        if meta.get("choices") and value not in meta["choices"]:
            raise bad(_describe_range(meta))
        return value
    if kind is list or get_origin(kind) is list:
        item = (get_args(kind) or (Any,))[0]
        if not isinstance(value, (list, tuple)) or (item is str and not all(isinstance(v, str) for v in value)):
            raise bad("a list of strings" if item is str else "a list")
        return list(value)
    if kind is dict:
        if not isinstance(value, Mapping):
            raise bad("a mapping")
        return dict(value)
    return value


def flag_type(kind: type, flag: str, **allowed: Any) -> Callable[[str], Any]:
    """An argparse `type=` for a flag that feeds no config (serve --port, the bench's numbers): the same type,
    finiteness and range check as a config field (`allowed`: ge= / gt= / le= / lt= / choices=), which argparse
    reports as one usage line."""
    import argparse

    def parse(text: str) -> Any:
        try:
            return coerce_value(flag, text, kind, allowed)
        except SmolthinkError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse


def flag_list(flag: str, choices: Sequence[str]) -> Callable[[str], str]:
    """An argparse `type=` for a comma-separated, non-empty subset of `choices` (bench --parts): the text as given,
    checked item by item."""
    import argparse

    def parse(text: str) -> str:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items or any(t not in choices for t in items):
            raise argparse.ArgumentTypeError(f"bad value for {flag}: {show_value(text)} (expected a comma-separated "
                                             f"list of {' | '.join(choices)})")
        return text

    return parse


def _number(value: Any, integer: bool) -> int | float | None:
    """A YAML / --set value as an int or float, or None when it is not one (bools are not numbers)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if integer else float(value)
    try:
        number = float(value) if isinstance(value, (float, str)) else None
    except (ValueError, OverflowError):
        return None
    if number is None or not integer:
        return number
    if isinstance(value, str) and not re.fullmatch(r"\s*[+-]?\d+\s*", value):
        return None
    if not math.isfinite(number) or not number.is_integer():
        return None
    return int(value) if isinstance(value, str) else int(number)


def _construct(cls: type[T], values: Mapping[str, Any], prefix: str = "") -> T:
    hints = _hints(cls)
    kwargs = {}
    for f in fields(cls):
        if f.name not in values:
            continue
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            kwargs[f.name] = _construct(hint, values[f.name], f"{prefix}{f.name}.")
        else:
            kwargs[f.name] = coerce_value(prefix + f.name, values[f.name], hint, f.metadata)
    return cls(**kwargs)


def build(cls: type[T], sources: Sequence[Mapping[str, Any] | None], moved: Mapping[str, str] = {}) -> T:
    """Merge mappings (later wins; nested sections or dotted keys) into `cls`, each value checked against its
    field. `moved` maps old top-level keys to their new (dotted) names."""
    merged: dict[str, Any] = {}
    for src in sources:
        if src is None:
            continue
        if not isinstance(src, Mapping):
            raise SmolthinkError(f"a config must be a mapping of key: value, got {type(src).__name__}")
        _collect(cls, src, merged, "", cls, moved)
    return _construct(cls, merged)


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as a plain nested dict (for config.yaml in the run directory)."""
    return dataclasses.asdict(cfg)


def config_yaml(cfg: Any) -> str:
    """The resolved config as YAML text."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML mapping, failing with one line on a missing, unreadable or malformed file."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise SmolthinkError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise SmolthinkError(f"config path is a directory, not a YAML file: {path}") from None
    except UnicodeDecodeError:
        raise SmolthinkError(f"config file is not UTF-8 text: {path}") from None
    except OSError as e:
        raise SmolthinkError(f"cannot read config file {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise SmolthinkError(f"bad YAML in {path}: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SmolthinkError(f"{path} must hold a mapping of key: value")
    return data


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """`key=value` strings -> dict, values parsed as YAML scalars (`lr=1e-6`, `use_lora=false`)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SmolthinkError(f"--set expects key=value, got '{item}'")
        try:
            out[key.strip()] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            out[key.strip()] = value
    return out
