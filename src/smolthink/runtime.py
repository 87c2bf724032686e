"""Process set-up shared by every command: threads, policy + tokenizer, prompts, engine, scorer."""
from __future__ import annotations

import os
from typing import Sequence

import torch

from .chat import build_messages, render_prompt
from .types import Example


def set_threads(n: int = 0) -> int:
    """Use n torch threads (0: every core this process may run on). Returns the number set."""
    if n <= 0:
        n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(n)
    return n


def render_prompts(tokenizer, examples: Sequence[Example], few_shot: Sequence[tuple[str, str]] = ()) -> list[list[int]]:
    """Chat-templated prompt ids for each example."""
    return [render_prompt(tokenizer, build_messages(ex.question, few_shot=few_shot)) for ex in examples]
