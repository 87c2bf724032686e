"""Teacher traces: a model shown the question and its true answer (STaR-style rationalisation) writes the
reasoning, either a local model (`teacher_candidates`) or an OpenAI-compatible API (`api_candidates`); and the
check that a kept trace never quotes the hint it saw (`leaks_hint`)."""
from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from typing import Any, Sequence
from urllib.parse import urlparse

from .chat import build_messages
from .config import DataConfig
from .errors import SmolthinkError
from .log import progress_bar
from .seeds import derive_seed
from .tasks import reference_answer
from .types import Example

HINT = "The correct answer is: {answer}. Explain step by step why, then answer."
# A rationale that quotes the hint teaches the student to cite a hint it will never see: rejected.
HINT_LEAK = re.compile(r"\bhint\b|correct answer is:|\b(?:we are|we were|I am|I was|you are) (?:told|given)\b|"
                       r"\bthe (?:given|provided|stated) answer\b", re.IGNORECASE)


def leaks_hint(trace: str) -> bool:
    """True when a hinted teacher's trace mentions the hint (a student would learn to cite a hint it never sees)."""
    return HINT_LEAK.search(trace) is not None


def hinted_messages(ex: Example) -> list[dict[str, str]]:
    """System prompt + the question followed by the answer hint (what a teacher sees)."""
    return build_messages(f"{ex.question}\n\n{HINT.format(answer=reference_answer(ex))}")


def teacher_candidates(examples: Sequence[Example], seed: int, cfg: DataConfig, model=None, tokenizer=None,
                       batch_size: int = 8, **_: Any) -> tuple[list[list[str | None]], dict]:
    """`cfg.samples_per_question` samples from a local model prompted with the question and its answer."""
    from .chat import render_prompt
    from .models import eos_ids
    from .rollout import make_engine
    from .types import SamplingParams

    if model is None or tokenizer is None:
        raise SmolthinkError("source 'teacher' needs a local model and tokenizer")
    eng = make_engine("auto", model, eos_ids(tokenizer, model), tokenizer.pad_token_id)
    sampling = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=1.0)
    out: list[list[str | None]] = []
    counters = Counter()
    with progress_bar("teacher traces", len(examples)) as advance:
        for start in range(0, len(examples), batch_size):
            batch = examples[start : start + batch_size]
            prompts = [render_prompt(tokenizer, hinted_messages(ex)) for ex in batch]
            rows = eng.generate(model, prompts, cfg.samples_per_question, sampling, seed=derive_seed(seed, "teacher", start))
            for prompt, row in zip(prompts, rows):
                out.append([tokenizer.decode(r.completion_ids, skip_special_tokens=True).strip() for r in row])
                counters["prompt_tokens"] += len(prompt) * len(row)
                counters["completion_tokens"] += sum(len(r.completion_ids) for r in row)
                counters["truncated"] += sum(r.truncated for r in row)
            advance(len(batch))
    return out, {f"teacher_{k}": v for k, v in counters.items()}


def api_settings(cfg: DataConfig, teacher_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """APITeacher settings: base_url / model from cfg (else OPENAI_BASE_URL / OPENAI_MODEL), the key from
    OPENAI_API_KEY, concurrency from cfg; teacher_kwargs (tests: a cache directory, a key) override them."""
    kw = {"base_url": cfg.api_base_url, "model": cfg.api_model, "concurrency": cfg.api_concurrency,
          **(teacher_kwargs or {})}
    for key, env in (("base_url", "OPENAI_BASE_URL"), ("model", "OPENAI_MODEL"), ("api_key", "OPENAI_API_KEY")):
        if not kw.get(key):
            kw[key] = os.environ.get(env) or None
    if not kw["base_url"] or not kw["model"]:
        raise SmolthinkError("source 'api' needs a base URL and a model: pass --base-url/--api-model or set "
                             "OPENAI_BASE_URL and OPENAI_MODEL (and OPENAI_API_KEY)")
    if not kw["api_key"] and (urlparse(kw["base_url"]).hostname or "") not in ("localhost", "127.0.0.1", "::1"):
        raise SmolthinkError(f"no API key for {kw['base_url']}: set OPENAI_API_KEY")  # loopback servers need none
    return kw


def api_candidates(examples: Sequence[Example], seed: int, cfg: DataConfig, teacher_kwargs: dict | None = None,
                   **_: Any) -> tuple[list[list[str | None]], dict]:
    """`cfg.samples_per_question` samples per question from an OpenAI-compatible API (APITeacher: concurrency,
    retries, on-disk cache keyed by model + prompt + sampling settings), prompted with the question and its
    answer. Token counts are summed over every answer used (cached ones included: what the traces cost)."""
    from .teacher_api import APITeacher

    teacher = APITeacher(**api_settings(cfg, teacher_kwargs))
    requests = []
    for k, ex in enumerate(examples):
        messages = hinted_messages(ex)
        body = {"messages": messages, "temperature": cfg.temperature, "max_tokens": cfg.max_new_tokens,
                "n": cfg.samples_per_question, "seed": derive_seed(seed, "api", k)}
        ident = json.dumps([teacher.base_url, teacher.model, body], ensure_ascii=False, sort_keys=True)
        requests.append({"key": hashlib.sha256(ident.encode()).hexdigest()[:40], **body})
    responses = teacher.complete_many(requests)
    if not any(responses):  # every later round would ask the same server in vain
        raise SmolthinkError(f"the API teacher at {teacher.url} answered none of {len(requests)} requests: "
                             f"{teacher.last_error}")
    out: list[list[str | None]] = []
    usage = Counter()
    for resp in responses:
        if not resp:
            out.append([None])
            usage["failed_requests"] += 1
            continue
        texts = [((c.get("message") or {}).get("content") or "").strip() or None for c in resp.get("choices") or []]
        out.append(texts or [None])
        u = resp.get("usage") or {}
        for k in ("prompt_tokens", "completion_tokens"):
            if isinstance(u.get(k), int):
                usage[k] += u[k]
    extra = {f"teacher_{k}": v for k, v in usage.items()}
    st = _plain(teacher.stats)
    extra.update(teacher_cost_usd=st.get("cost_usd", 0.0), teacher_cache_hits=st.get("cache_hits", 0),
                 teacher_http_requests=st.get("requests", 0), teacher_api_stats=st)
    return out, extra


def _plain(obj: Any) -> Any:
    """A JSON-able copy of a stats object (dict or dataclass)."""
    import dataclasses

    if dataclasses.is_dataclass(obj):
        obj = dataclasses.asdict(obj)
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj if isinstance(obj, (int, float, str, bool)) or obj is None else str(obj)
