"""Baseline engine: batched Hugging Face `generate` with left padding. The reference the fast engine is tested
and benchmarked against, and the fallback for architectures the fast engine does not know."""
from __future__ import annotations

from typing import Sequence

import torch

from ..types import Rollout, SamplingParams
from .base import group_rollouts


class HFEngine:
    """Rollouts through `model.generate`. Masks come from lengths, never from the pad id (pad == EOS here).
    `Rollout.logprobs` is None: generate's raw logits would cost [steps, rows, vocab] of memory, and this engine
    runs the model's own forward (in its own precision), so the trainer's log-probs are the reference anyway."""

    def __init__(self, eos_ids: Sequence[int], pad_id: int, batch_size: int = 64):
        self.eos_ids = set(int(e) for e in eos_ids)
        self.pad_id = int(pad_id)
        self.batch_size = batch_size  # prompts x n rows per generate call

    @torch.no_grad()
    def generate(
        self,
        model: torch.nn.Module,
        prompts: Sequence[list[int]],
        n: int,
        sampling: SamplingParams,
        seed: int | None = None,
    ) -> list[list[Rollout]]:
        """Generate n completions per prompt -> [prompt][sample] Rollouts."""
        out: list[list[Rollout]] = []
        per_call = max(1, self.batch_size // n)
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            for start in range(0, len(prompts), per_call):
                out += self._generate_chunk(model, prompts[start : start + per_call], n, sampling)
        return out

    def _generate_chunk(self, model, prompts, n, sampling) -> list[list[Rollout]]:
        width = max(len(p) for p in prompts)
        # left padding: [B, P]
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        greedy = sampling.temperature <= 0
        kwargs = dict(do_sample=False) if greedy else dict(
            do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k or None
        )
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        seqs = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=sampling.max_new_tokens,
            num_return_sequences=n,
            eos_token_id=sorted(self.eos_ids),
            pad_token_id=self.pad_id,
            **kwargs,
        )  # [B*n, P + T]
        model.train(was_training)
        return group_rollouts(prompts, seqs[:, width:].tolist(), n, self.eos_ids, sampling.max_new_tokens)
