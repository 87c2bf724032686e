"""Configs are documented data: dataclasses with one help line per field, its type, and its allowed range, set
from YAML files and `--set key=value` overrides (dotted keys reach into sections: `--set eval.n=100`).
Everything is checked at start-up: unknown keys fail with a close-match suggestion, and a wrong type, a
non-finite number or a value out of range fails with one line naming the field, the value and what is allowed.

Sections shared by every command live here once: `EvalConfig` (the held-out eval), `RewardConfig` (the reward
and the task scorer) and `DataConfig` (warm-up traces)."""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Sequence, TypeVar, Union, get_args, get_origin, get_type_hints

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


# ----------------------------------------------------------------------------------------------- sections


@dataclass
class EvalConfig:
    """The held-out evaluation every command shares (`smolthink eval`, the pipeline, both training stages)."""

    n: int = opt(400, "held-out eval questions", ge=0)
    balanced: bool = opt(True, "balance answer classes (e.g. 50% Yes / 50% No) where a task has a small answer set")
    max_new_tokens: int = opt(256, "generation length of eval completions", ge=1)
    samples: int = opt(1, "completions per question; > 1 adds pass@k and mean@k (needs temperature > 0)", ge=1)
    temperature: float = opt(0.0, "sampling temperature (0: greedy)", ge=0)
    top_p: float = opt(0.95, "nucleus sampling when temperature > 0", gt=0, le=1)
    batch_size: int = opt(64, "questions per generation batch", ge=1)
    every: int = opt(0, "training: evaluate every N optimizer steps (0: only at start and end)", ge=0)
    at_start: bool = opt(True, "training: evaluate before the first step")


@dataclass
class RewardConfig:
    """The reward: weighted parts, scored strictly by the task's own scorer in the sandbox."""

    correct_weight: float = opt(0.85, "weight of strict correctness")
    format_weight: float = opt(0.15, "weight of the think/answer format")
    strict: bool = opt(True, "strict correctness (False: the task scorer's partial credit)")
    length_penalty: float = opt(0.0, "overlong penalty coefficient (0: off)", ge=0)
    length_target: int = opt(200, "tokens after which the overlong penalty starts", ge=0)
    functions: list[str] = opt([], "extra rewards 'module:function[=weight]'")
    scorer_timeout: float = opt(2.0, "seconds a task scorer may run before it scores 0", gt=0, le=3600)


@dataclass
class DataConfig:
    """Warm-up traces: where they come from and how many (`smolthink data`, the pipeline, `smolthink sft`)."""

    path: str = opt("", "traces JSONL to train SFT on (empty: generate them from `source`)")
    source: str = opt("scripted", "scripted | teacher | api", choices=("scripted", "teacher", "api"))
    num_traces: int = opt(1280, "verified traces to keep", ge=1)
    balanced: bool = opt(True, "equal answer classes per task where a task has a small answer set")
    teacher_model: str | None = opt(None, "local teacher for source=teacher (default: the policy's model)")
    samples_per_question: int = opt(4, "teacher samples per question (the first that verifies is kept)", ge=1)
    temperature: float = opt(0.8, "teacher sampling temperature", gt=0)
    max_new_tokens: int = opt(300, "teacher generation length", ge=1)
    top_up_rounds: int = opt(3, "extra rounds of fresh questions to replace rejected ones", ge=0)
    api_base_url: str | None = opt(None, "OpenAI-compatible base URL for source=api (default $OPENAI_BASE_URL)")
    api_model: str | None = opt(None, "API model name (default $OPENAI_MODEL; key from $OPENAI_API_KEY)")
    api_concurrency: int = opt(8, "concurrent API requests", ge=1, le=256)


# ----------------------------------------------------------------------------------------------- stages

LR_SCHEDULES = ("constant", "linear", "cosine")


@dataclass
class StageConfig:
    """Fields every training stage shares: model, task, LoRA, optimizer, schedule, checkpoints, eval, reward."""

    model: str | None = opt(None, "hub id, local dir, .gguf file, or None for the embedded SmolLM2-135M-Instruct")
    task: Any = opt("syllogism", "reasoning-gym task name, 'a:2,b:1' mixture, or list of {name, weight, config}")
    seed: int = opt(0, "base seed: data, sampling, minibatch order")
    threads: int = opt(0, "torch threads (0: all cores)", ge=0)
    use_lora: bool = opt(True, "train a LoRA adapter (False: full fine-tuning)")
    lora_r: int = opt(32, "LoRA rank", ge=1)
    lora_alpha: int = opt(64, "LoRA alpha", gt=0)
    lora_dropout: float = opt(0.0, "LoRA dropout", ge=0, lt=1)
    lora_target_modules: list[str] = opt(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                          "down_proj"], "modules that get LoRA adapters")
    gradient_checkpointing: bool = opt(False, "recompute activations in backward to save memory")
    max_tokens_per_forward: int = opt(512, "split each micro-batch into forward/backward chunks of at most this "
                                      "many padded tokens (0: no split); same gradient, lower peak memory", ge=0)
    onednn_linears: bool = opt(True, "CPU: LoRA layers (one merged W + sBA GEMM) and frozen layers (LM head) train "
                                     "through oneDNN (fp32: the same math; one merged weight copy)")
    precision: str = opt("fp32", "training GEMMs: fp32 | bf16 (bf16: the oneDNN layers' forward and input-gradient "
                                 "GEMMs in bf16 with fp32 accumulation; LoRA weights, optimizer, norms, attention "
                                 "and log-softmax stay fp32; needs onednn_linears, use_lora and avx512_bf16)",
                         choices=("fp32", "bf16"))
    learning_rate: float = opt(1e-5, "peak learning rate (AdamW)", gt=0, le=1)
    lr_scheduler_type: str = opt("constant", "constant | linear | cosine (after warm-up)", choices=LR_SCHEDULES)
    warmup_steps: int = opt(0, "linear warm-up optimizer steps", ge=0)
    weight_decay: float = opt(0.0, "AdamW weight decay", ge=0)
    adam_beta1: float = opt(0.9, "AdamW beta1", ge=0, lt=1)
    adam_beta2: float = opt(0.99, "AdamW beta2", ge=0, lt=1)
    max_grad_norm: float = opt(1.0, "gradient clipping norm (0: off)", ge=0)
    max_steps: int = opt(10, "optimizer steps to train", ge=0)
    save_every: int = opt(0, "checkpoint every N optimizer steps (0: only at the end and on interrupt)", ge=0)
    keep_checkpoints: int = opt(2, "how many step checkpoints to keep", ge=1)
    log_every: int = opt(1, "console line every N steps", ge=1)
    eval: EvalConfig = section(EvalConfig, "held-out eval")
    reward: RewardConfig = section(RewardConfig, "reward parts and the task scorer")


@dataclass
class GRPOConfig(StageConfig):
    """GRPO: experience collection then clipped-surrogate training on random minibatches (TRL knob names)."""

    prompts_per_rollout: int = opt(4, "questions per rollout batch", ge=1)
    num_generations: int = opt(4, "completions per question (G)", ge=2)
    max_completion_length: int = opt(256, "max new tokens per completion", ge=1)
    temperature: float = opt(0.7, "sampling temperature (rollouts and log-prob scaling)", gt=0)
    top_p: float = opt(0.95, "nucleus sampling", gt=0, le=1)
    top_k: int = opt(0, "top-k sampling (0: off)", ge=0)
    buffer_size: int = opt(16, "completions collected per rollout phase before training on them", ge=1)
    minibatch_size: int = opt(8, "sequences per forward/backward (micro-batch)", ge=1)
    gradient_accumulation_steps: int = opt(2, "micro-batches per optimizer step", ge=1)
    num_iterations: int = opt(1, "passes (epochs) over each buffer", ge=1)
    epsilon: float = opt(0.2, "PPO clip range below 1 (and above, unless epsilon_high)", gt=0, lt=1)
    epsilon_high: float | None = opt(None, "upper clip range (DAPO clip-higher); None: same as epsilon", gt=0)
    beta: float = opt(0.0, "KL coefficient to the reference policy (k3 estimator); 0: no reference pass", ge=0)
    entropy_coef: float = opt(0.0, "entropy bonus coefficient", ge=0)
    loss_type: str = opt("dapo", "grpo (per-sequence mean) | dapo (token mean) | dr_grpo (constant normaliser)",
                         choices=("grpo", "dapo", "dr_grpo"))
    scale_rewards: str = opt("group", "advantage scaling: group | batch | none", choices=("group", "batch", "none"))
    mask_truncated_completions: bool = opt(False, "exclude completions cut at max length from the loss")
    drop_zero_std_groups: bool = opt(False, "drop groups whose rewards are all equal and keep sampling (DAPO)")
    max_resample_attempts: int = opt(4, "cap on extra rollout batches per buffer fill when dropping groups", ge=0)
    group_by_length: bool = opt(True, "length-aware minibatches to cut padding")
    share_prompts: bool = opt(True, "training forwards run each GRPO group's prompt once and its completions on "
                                    "its KV cache (P + G*C tokens instead of G*(P+C)); same loss and gradient; "
                                    "off under gradient_checkpointing")
    engine: str = opt("auto", "rollout engine: auto | fast | hf", choices=("auto", "fast", "hf"))
    train_size: int = opt(5000, "train questions generated (disjoint from eval)", ge=1)
    sample_every: int = opt(5, "write samples/ every N steps (0: never)", ge=0)


@dataclass
class SFTConfig(StageConfig):
    """Warm-up supervised fine-tuning on reasoning traces (loss on assistant tokens only)."""

    data: DataConfig = section(DataConfig, "the traces to train on (or to generate)")
    num_epochs: int = opt(1, "passes over the traces", ge=1)
    max_steps: int = opt(0, "optimizer steps (0: from num_epochs)", ge=0)
    learning_rate: float = opt(4e-4, "peak learning rate (AdamW)", gt=0, le=1)
    lr_scheduler_type: str = opt("cosine", "constant | linear | cosine (after warm-up)", choices=LR_SCHEDULES)
    warmup_steps: int = opt(5, "linear warm-up optimizer steps", ge=0)
    minibatch_size: int = opt(8, "sequences per forward/backward", ge=1)
    gradient_accumulation_steps: int = opt(1, "micro-batches per optimizer step", ge=1)
    max_length: int = opt(512, "max tokens per training sequence (longer ones are dropped)", ge=2)
    log_every: int = opt(5, "console line every N steps", ge=1)


@dataclass
class PipelineConfig:
    """One YAML, one run directory: base eval -> warm-up traces -> SFT -> GRPO -> final eval -> report.
    Top-level keys apply to every stage; `sft:` and `grpo:` hold stage-specific overrides."""

    model: str | None = opt(None, "hub id, local dir, .gguf file, or None for the embedded SmolLM2-135M-Instruct")
    task: Any = opt("syllogism", "reasoning-gym task or mixture")
    seed: int = opt(0, "base seed")
    threads: int = opt(0, "torch threads (0: all cores)", ge=0)
    eval: EvalConfig = section(EvalConfig, "held-out eval of every stage")
    reward: RewardConfig = section(RewardConfig, "reward parts and the task scorer")
    data: DataConfig = section(DataConfig, "warm-up traces")
    sft: dict = opt({}, "SFTConfig overrides for the SFT stage")
    grpo: dict = opt({}, "GRPOConfig overrides for the GRPO stage")


@dataclass
class EvalRunConfig:
    """`smolthink eval`: one model on a task's held-out set."""

    model: str | None = opt(None, "hub id, local dir, .gguf file, or None for the embedded SmolLM2-135M-Instruct")
    task: Any = opt("syllogism", "reasoning-gym task or mixture")
    seed: int = opt(0, "base seed (the eval set, sampling)")
    threads: int = opt(0, "torch threads (0: all cores)", ge=0)
    engine: str = opt("auto", "generation engine: auto | fast | hf", choices=("auto", "fast", "hf"))
    eval: EvalConfig = section(EvalConfig, "held-out eval")
    reward: RewardConfig = section(RewardConfig, "reward parts and the task scorer")


@dataclass
class DataRunConfig:
    """`smolthink data`: verified warm-up traces on train questions, never the eval set's."""

    model: str | None = opt(None, "the policy's model (the default local teacher)")
    task: Any = opt("syllogism", "reasoning-gym task or mixture")
    seed: int = opt(0, "base seed (the same as the eval's, so its questions are excluded)")
    threads: int = opt(0, "torch threads (0: all cores)", ge=0)
    data: DataConfig = section(DataConfig, "warm-up traces")
    eval: EvalConfig = section(EvalConfig, "the held-out eval set whose questions are excluded")
    reward: RewardConfig = section(RewardConfig, "the task scorer that verifies each trace")


# Keys that moved into a section: older config.yaml files and commands keep loading.
MOVED_KEYS = {
    "packed_linears": "onednn_linears",
    "eval_n": "eval.n", "eval_balanced": "eval.balanced", "eval_every": "eval.every",
    "eval_at_start": "eval.at_start", "eval_max_new_tokens": "eval.max_new_tokens",
    "correct_weight": "reward.correct_weight", "format_weight": "reward.format_weight",
    "strict_scoring": "reward.strict", "length_penalty": "reward.length_penalty",
    "length_target": "reward.length_target", "reward_functions": "reward.functions",
    "scorer_timeout": "reward.scorer_timeout",
    "num_traces": "data.num_traces", "data_source": "data.source", "teacher_model": "data.teacher_model",
}


# ----------------------------------------------------------------------------------------------- building


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


def _collect(cls: type, src: Mapping, into: dict, prefix: str, root: type) -> None:
    """Merge one source mapping (nested or dotted keys) into `into`, a nested dict shaped like `cls`."""
    hints = _hints(cls)
    for raw, value in src.items():
        if not isinstance(raw, str):
            raise SmolthinkError(f"config keys must be strings, got {raw!r}")
        key = MOVED_KEYS.get(raw, raw) if not prefix else raw
        head, dot, rest = key.partition(".")
        if head not in hints:
            close = difflib.get_close_matches(prefix + key, _all_keys(root), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise SmolthinkError(f"unknown config key '{prefix + key}'{hint}")
        kind = hints[head]
        if dataclasses.is_dataclass(kind):
            sub = into.setdefault(head, {})
            if dot:
                _collect(kind, {rest: value}, sub, f"{prefix}{head}.", root)
            elif isinstance(value, Mapping):
                _collect(kind, value, sub, f"{prefix}{head}.", root)
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


def build_config(cls: type[T], sources: Sequence[Mapping[str, Any] | None]) -> T:
    """Merge mappings (later wins; nested sections or dotted keys) into a validated `cls`."""
    merged: dict[str, Any] = {}
    for src in sources:
        if src is None:
            continue
        if not isinstance(src, Mapping):
            raise SmolthinkError(f"a config must be a mapping of key: value, got {type(src).__name__}")
        _collect(cls, src, merged, "", cls)
    cfg = _construct(cls, merged)
    validate(cfg)
    return cfg


def validate(cfg: Any) -> None:
    """Checks that involve more than one field (each field's own range is checked as it is read)."""
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise SmolthinkError(msg)

    if hasattr(cfg, "task"):
        from .tasks import parse_tasks

        parse_tasks(cfg.task)
    ev = getattr(cfg, "eval", None)
    if isinstance(ev, EvalConfig):
        need(ev.samples == 1 or ev.temperature > 0, "eval.samples > 1 needs eval.temperature > 0 (e.g. 0.7)")
    if isinstance(cfg, StageConfig):
        need(cfg.precision == "fp32" or (cfg.onednn_linears and cfg.use_lora),
             "precision=bf16 needs onednn_linears=true and use_lora=true (it runs the oneDNN LoRA layers in bf16)")
    if isinstance(cfg, GRPOConfig):
        need(cfg.buffer_size >= cfg.minibatch_size, "buffer_size must be >= minibatch_size")
        need(cfg.train_size >= cfg.prompts_per_rollout, "train_size must be >= prompts_per_rollout")


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


def build_pipeline_config(sources: Sequence[Mapping[str, Any] | None]) -> PipelineConfig:
    """Merge and validate a pipeline config, including its sft/grpo sections (built now, not an hour later)."""
    cfg = build_config(PipelineConfig, sources)
    stage_config(cfg, SFTConfig)
    stage_config(cfg, GRPOConfig)
    return cfg


def stage_config(cfg: PipelineConfig, cls: type[T], **fixed: Any) -> T:
    """The config of one pipeline stage: the pipeline's shared keys, then `fixed` (what the pipeline wires, e.g.
    the SFT model path), then the stage's own section."""
    shared = {"model": cfg.model, "task": cfg.task, "seed": cfg.seed, "threads": cfg.threads,
              "eval": to_dict(cfg.eval), "reward": to_dict(cfg.reward)}
    if cls is SFTConfig:
        shared["data"] = to_dict(cfg.data)
    own = cfg.sft if cls is SFTConfig else cfg.grpo
    return build_config(cls, [shared, fixed, own])
