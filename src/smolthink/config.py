"""Configs are documented data: dataclasses with one help line per field, set from YAML files and
`--set key=value` overrides, validated at start-up (unknown keys fail with a close-match suggestion)."""
from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence, TypeVar, get_type_hints

import yaml

from .errors import SmolthinkError

T = TypeVar("T")


def opt(default: Any, help: str):
    """A dataclass field with a default and its one-line documentation."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class ModelArgs:
    """Shared model / LoRA / task fields (mixed into the stage configs)."""

    model: str | None = opt(None, "hub id, local dir, .gguf file, or None for the embedded SmolLM2-135M-Instruct")
    task: Any = opt("syllogism", "reasoning-gym task name, 'a:2,b:1' mixture, or list of {name, weight, config}")
    seed: int = opt(0, "base seed: data, sampling, minibatch order")
    use_lora: bool = opt(True, "train a LoRA adapter (False: full fine-tuning)")
    lora_r: int = opt(32, "LoRA rank")
    lora_alpha: int = opt(64, "LoRA alpha")
    lora_dropout: float = opt(0.0, "LoRA dropout")
    lora_target_modules: list = opt(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                                    "modules that get LoRA adapters")
    gradient_checkpointing: bool = opt(False, "recompute activations in backward to save memory")
    max_tokens_per_forward: int = opt(512, "split each micro-batch into forward/backward chunks of at most this many "
                                      "padded tokens (0: no split); same gradient, lower peak memory")
    onednn_linears: bool = opt(True, "CPU fp32: LoRA layers (one merged W + sBA GEMM) and frozen layers (LM head) "
                                     "train through oneDNN (2x MKL's GEMMs, same math, one merged weight copy: "
                                     "~425 MB for the 135M model)")
    threads: int = opt(0, "torch threads (0: all cores)")
    eval_n: int = opt(100, "held-out eval questions")
    eval_balanced: bool = opt(True, "balance answer classes of the eval set (e.g. 50% Yes / 50% No)")
    eval_every: int = opt(0, "evaluate every N optimizer steps (0: only at start and end)")
    eval_at_start: bool = opt(True, "evaluate before the first step (the pipeline reuses the previous stage's)")
    eval_max_new_tokens: int = opt(0, "eval generation length (0: same as max_completion_length)")
    save_every: int = opt(0, "checkpoint every N optimizer steps (0: only at the end and on interrupt)")
    keep_checkpoints: int = opt(2, "how many step checkpoints to keep")
    learning_rate: float = opt(1e-5, "peak learning rate (AdamW)")
    lr_scheduler_type: str = opt("constant", "constant | linear | cosine (after warm-up)")
    warmup_steps: int = opt(0, "linear warm-up optimizer steps")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    adam_beta1: float = opt(0.9, "AdamW beta1")
    adam_beta2: float = opt(0.99, "AdamW beta2")
    max_grad_norm: float = opt(1.0, "gradient clipping norm (0: off)")
    max_steps: int = opt(30, "optimizer steps to train")


@dataclass
class GRPOConfig(ModelArgs):
    """GRPO: experience collection then clipped-surrogate training on random minibatches (TRL knob names)."""

    prompts_per_rollout: int = opt(4, "questions per rollout batch")
    num_generations: int = opt(4, "completions per question (G)")
    max_completion_length: int = opt(160, "max new tokens per completion")
    temperature: float = opt(0.7, "sampling temperature (rollouts and log-prob scaling)")
    top_p: float = opt(0.95, "nucleus sampling")
    top_k: int = opt(0, "top-k sampling (0: off)")
    buffer_size: int = opt(16, "completions collected per rollout phase before training on them")
    minibatch_size: int = opt(8, "sequences per forward/backward (micro-batch)")
    gradient_accumulation_steps: int = opt(2, "micro-batches per optimizer step")
    num_iterations: int = opt(1, "passes (epochs) over each buffer")
    epsilon: float = opt(0.2, "PPO clip range below 1 (and above, unless epsilon_high)")
    epsilon_high: float | None = opt(None, "upper clip range (DAPO clip-higher); None: same as epsilon")
    beta: float = opt(0.0, "KL coefficient to the reference policy (k3 estimator); 0: no reference pass")
    entropy_coef: float = opt(0.0, "entropy bonus coefficient")
    loss_type: str = opt("dapo", "grpo (per-sequence mean) | dapo (token mean) | dr_grpo (constant normaliser)")
    scale_rewards: str = opt("group", "advantage scaling: group | batch | none")
    mask_truncated_completions: bool = opt(False, "exclude completions cut at max length from the loss")
    drop_zero_std_groups: bool = opt(False, "drop groups whose rewards are all equal and keep sampling (DAPO)")
    max_resample_attempts: int = opt(4, "cap on extra rollout batches per buffer fill when dropping groups")
    group_by_length: bool = opt(True, "length-aware minibatches to cut padding")
    share_prompts: bool = opt(True, "training forwards run each GRPO group's prompt once and its completions on "
                                    "its KV cache (P + G*C tokens instead of G*(P+C)); same loss and gradient; "
                                    "off under gradient_checkpointing")
    correct_weight: float = opt(0.85, "reward weight of strict correctness")
    format_weight: float = opt(0.15, "reward weight of the think/answer format")
    strict_scoring: bool = opt(True, "strict correctness (False: the task scorer's partial credit)")
    length_penalty: float = opt(0.0, "overlong penalty coefficient (0: off)")
    length_target: int = opt(200, "tokens after which the overlong penalty starts")
    reward_functions: list = opt([], "extra rewards 'module:function[=weight]'")
    scorer_timeout: float = opt(2.0, "seconds a task scorer may run before it scores 0")
    engine: str = opt("auto", "rollout engine: auto | fast | hf")
    train_size: int = opt(5000, "train questions generated (disjoint from eval)")
    log_every: int = opt(1, "console line every N steps")
    sample_every: int = opt(5, "write samples/ every N steps")


@dataclass
class SFTConfig(ModelArgs):
    """Warm-up supervised fine-tuning on reasoning traces (loss on assistant tokens only)."""

    data: str = opt("", "JSONL of traces (chat messages); empty: generate scripted traces")
    num_traces: int = opt(400, "scripted traces to generate when no data file is given")
    num_epochs: int = opt(2, "passes over the traces")
    max_steps: int = opt(0, "optimizer steps (0: from num_epochs)")
    learning_rate: float = opt(2e-4, "peak learning rate (AdamW)")
    lr_scheduler_type: str = opt("cosine", "constant | linear | cosine (after warm-up)")
    warmup_steps: int = opt(5, "linear warm-up optimizer steps")
    minibatch_size: int = opt(8, "sequences per forward/backward")
    gradient_accumulation_steps: int = opt(1, "micro-batches per optimizer step")
    max_length: int = opt(512, "max tokens per training sequence (longer ones are dropped)")
    max_completion_length: int = opt(200, "eval generation length")
    log_every: int = opt(5, "console line every N steps")


def field_help(cls) -> dict[str, str]:
    """{field name: help line} for a config dataclass."""
    return {f.name: f.metadata.get("help", "") for f in fields(cls)}


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Coerce a YAML/--set value to the field's type, or fail with one line."""
    text = str(hint)
    if value is None:
        if "None" in text or "Any" in text:
            return None
        raise SmolthinkError(f"{name} cannot be null")
    try:
        if hint is bool or text == "bool":
            if isinstance(value, bool):
                return value
            raise ValueError
        if hint is int or text == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if hint is float or text.startswith("float"):
            return float(value)
        if hint is list or text == "list":
            return list(value) if isinstance(value, (list, tuple)) else [value]
        if "str" in text and not isinstance(value, str):
            raise ValueError
    except (TypeError, ValueError):
        raise SmolthinkError(f"bad value for {name}: {value!r} (expected {text.replace('typing.', '')})") from None
    return value


RENAMED_KEYS = {"packed_linears": "onednn_linears"}  # old name -> new name, so older config.yaml files still load


def build_config(cls: type[T], sources: Sequence[dict[str, Any]]) -> T:
    """Merge dicts (later wins) into a validated `cls`. Unknown keys fail with a close-match suggestion; renamed
    keys (RENAMED_KEYS) are read under their new name."""
    hints = get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    merged: dict[str, Any] = {}
    for src in sources:
        for key, value in (src or {}).items():
            key = RENAMED_KEYS.get(key, key)
            if key not in hints:
                close = difflib.get_close_matches(key, names, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise SmolthinkError(f"unknown config key '{key}'{hint}")
            merged[key] = _coerce(key, value, hints[key])
    cfg = cls(**merged)
    validate(cfg)
    return cfg


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML mapping, failing with one line on a missing file or bad YAML."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise SmolthinkError(f"config file not found: {path}") from None
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


def validate(cfg: Any) -> None:
    """Fail at start-up on bad values and impossible combinations."""
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise SmolthinkError(msg)

    need(cfg.lora_r > 0 and cfg.lora_alpha > 0, "lora_r and lora_alpha must be > 0")
    need(cfg.learning_rate > 0, "learning_rate must be > 0")
    need(cfg.lr_scheduler_type in ("constant", "linear", "cosine"), "lr_scheduler_type: constant | linear | cosine")
    need(cfg.minibatch_size >= 1 and cfg.gradient_accumulation_steps >= 1,
         "minibatch_size and gradient_accumulation_steps must be >= 1")
    need(cfg.eval_n >= 0 and cfg.max_steps >= 0, "eval_n and max_steps must be >= 0")
    need(cfg.max_tokens_per_forward >= 0, "max_tokens_per_forward must be >= 0 (0: no split)")
    if isinstance(cfg, GRPOConfig):
        need(cfg.num_generations >= 2, f"num_generations must be >= 2 for group advantages (got {cfg.num_generations})")
        need(cfg.prompts_per_rollout >= 1, "prompts_per_rollout must be >= 1")
        need(cfg.temperature > 0, "temperature must be > 0: greedy sampling makes every completion in a group equal")
        need(0 < cfg.top_p <= 1, "top_p must be in (0, 1]")
        need(cfg.max_completion_length >= 1, "max_completion_length must be >= 1")
        need(cfg.buffer_size >= cfg.minibatch_size, "buffer_size must be >= minibatch_size")
        need(cfg.loss_type in ("grpo", "dapo", "dr_grpo"), "loss_type: grpo | dapo | dr_grpo")
        need(cfg.scale_rewards in ("group", "batch", "none"), "scale_rewards: group | batch | none")
        need(cfg.epsilon > 0 and (cfg.epsilon_high is None or cfg.epsilon_high > 0), "epsilon must be > 0")
        need(cfg.beta >= 0 and cfg.entropy_coef >= 0, "beta and entropy_coef must be >= 0")
        need(cfg.num_iterations >= 1, "num_iterations must be >= 1")
        need(cfg.engine in ("auto", "fast", "hf"), "engine: auto | fast | hf")
        need(cfg.train_size >= cfg.prompts_per_rollout, "train_size must be >= prompts_per_rollout")
    if isinstance(cfg, SFTConfig):
        need(cfg.num_epochs >= 1, "num_epochs must be >= 1")


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as a plain dict (for config.yaml in the run directory)."""
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: Path) -> None:
    """Write the resolved config as YAML."""
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


@dataclass
class PipelineConfig:
    """One YAML, one run directory: base eval -> warm-up traces -> SFT -> GRPO -> final eval -> report.
    Top-level keys apply to every stage; `sft:` and `grpo:` hold stage-specific overrides."""

    model: str | None = opt(None, "hub id, local dir, .gguf file, or None for the embedded SmolLM2-135M-Instruct")
    task: Any = opt("syllogism", "reasoning-gym task or mixture")
    seed: int = opt(0, "base seed")
    threads: int = opt(0, "torch threads (0: all cores)")
    eval_n: int = opt(400, "held-out eval questions (balanced) for base, SFT and final evals")
    eval_max_new_tokens: int = opt(256, "eval generation length")
    data_source: str = opt("scripted", "warm-up traces: scripted | teacher | api")
    num_traces: int = opt(1280, "warm-up traces to keep (SFT: one epoch of 160 steps at 8 per step)")
    teacher_model: str | None = opt(None, "local teacher model for data_source=teacher (default: the policy)")
    sft: dict = opt({"num_epochs": 1, "learning_rate": 4e-4}, "SFTConfig overrides for the SFT stage")
    grpo: dict = opt({"max_steps": 10, "max_completion_length": 256}, "GRPOConfig overrides for the GRPO stage")


def build_pipeline_config(sources: Sequence[dict[str, Any]]) -> PipelineConfig:
    """Merge and validate a pipeline config, including its sft/grpo sections."""
    hints = get_type_hints(PipelineConfig)
    names = [f.name for f in fields(PipelineConfig)]
    merged: dict[str, Any] = {}
    for src in sources:
        for key, value in (src or {}).items():
            if "." in key and key.split(".", 1)[0] in ("sft", "grpo"):  # --set grpo.max_steps=5
                section, sub = key.split(".", 1)
                merged.setdefault(section, {})[sub] = value
                continue
            if key not in hints:
                close = difflib.get_close_matches(key, names, n=1)
                raise SmolthinkError(f"unknown pipeline key '{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
            if key in ("sft", "grpo"):
                merged.setdefault(key, {}).update(value or {})
            else:
                merged[key] = _coerce(key, value, hints[key])
    cfg = PipelineConfig(**merged)
    if cfg.data_source not in ("scripted", "teacher", "api"):
        raise SmolthinkError("data_source: scripted | teacher | api")
    shared = stage_shared(cfg)
    build_config(SFTConfig, [shared, cfg.sft])  # validate the sections now, not an hour later
    build_config(GRPOConfig, [shared, cfg.grpo])
    return cfg


def stage_shared(cfg: PipelineConfig) -> dict[str, Any]:
    """Keys the pipeline passes to every stage config."""
    return {"model": cfg.model, "task": cfg.task, "seed": cfg.seed, "threads": cfg.threads, "eval_n": cfg.eval_n,
            "eval_max_new_tokens": cfg.eval_max_new_tokens}
