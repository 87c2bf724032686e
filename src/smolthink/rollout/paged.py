"""Rollouts through transformers' continuous batching (`generate_batch`): a paged KV cache, requests scheduled
token by token (a finished row frees its slot for the next, no padding to the longest row), the `n` samples of a
prompt forked from its prefilled cache. Built for GPUs, where HF `generate`'s padded batches leave the device
idle; it runs on CPU too (the tests check it against HFEngine there), but on CPU FastEngine is the engine to use.

Weight sync: none is needed, because this engine holds no weights. Every `generate` call runs the module it is
given (unwrapped from peft / accelerate / torch.compile by `logprobs.causal_lm`): its parameters are the very
tensors the optimizer updates, and under LoRA peft's layers run the adapter unmerged (y = x W^T + s x A^T B^T), so
whatever the last optimizer step wrote is what samples. Merging instead (peft `merge_adapter` / `unmerge_adapter`)
would add and subtract s B A in the base weights every rollout and drift them by rounding. The paged cache, the
scheduler and (on CUDA with flash attention) the captured graphs live for one call: nothing derived from the
weights outlives it. An engine that keeps its own copy of the weights (vLLM) needs the contract in
docs/ARCHITECTURE.md ("The vLLM seam") instead.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..errors import SmolthinkError
from ..logprobs import causal_lm
from ..types import Rollout, SamplingParams
from .base import group_rollouts


class PagedEngine:
    """`n` completions per prompt through `model.generate_batch` (see the module docstring for the weights).

    Greedy (temperature == 0) decodes each prompt once and repeats the row n times (transformers refuses n > 1
    without sampling; greedy rows are identical anyway). Sampling applies temperature, top-k (0: off) and top-p
    (1: off) through transformers' logits processors and draws with `torch.multinomial` from a generator seeded
    with `seed` (the continuous-batching config's seed); the caller's global RNG state is restored afterwards. The
    same (weights, prompts, n, sampling, seed, page_size, max_batch_tokens) give the same tokens on one device;
    a token's draw depends on which rows share its batch, so the same seed does not reproduce HFEngine's samples.

    The cache is sized for the call (every row at its longest: prompt + max_new_tokens, in pages of `page_size`
    tokens) instead of transformers' default of most of the free device memory; `max_batch_tokens` caps the tokens
    of one forward (prefill is split beyond it). `Rollout.logprobs` is None: transformers' log-probs are taken
    after the top-k / top-p cut, and the trainer's are before it.
    """

    def __init__(self, eos_ids: Sequence[int], pad_id: int, page_size: int = 256, max_batch_tokens: int = 8192):
        require_cache_config()
        self.eos_ids = set(int(e) for e in eos_ids)
        self.pad_id = int(pad_id)
        self.page_size = page_size
        self.max_batch_tokens = max_batch_tokens

    def generate(self, model: torch.nn.Module, prompts: Sequence[list[int]], n: int, sampling: SamplingParams,
                 seed: int | None = None) -> list[list[Rollout]]:
        """Generate n completions per prompt -> [prompt][sample] Rollouts."""
        if not prompts:
            return []
        lm = causal_lm(model)
        per_prompt = 1 if sampling.temperature <= 0 else n
        if seed is None:  # a fresh draw from the global RNG, as HF generate without a seed would consume it
            seed = int(torch.randint(0, 2**31 - 1, ()).item())
        device = next(lm.parameters()).device
        was_training = lm.training
        # continuous batching seeds torch's global generators (in its own thread): keep the caller's
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            try:
                outputs = lm.generate_batch([list(p) for p in prompts],
                                            generation_config=self.generation_config(sampling, per_prompt),
                                            continuous_batching_config=self.cache_config(prompts, per_prompt,
                                                                                         sampling, seed),
                                            progress_bar=False)
            finally:
                lm.train(was_training)  # the manager switches the model to eval mode
        rows = ordered_rows(list(outputs.values()), prompts, per_prompt)
        if per_prompt != n:
            rows = [r for r in rows for _ in range(n)]
        return group_rollouts(prompts, rows, n, self.eos_ids, sampling.max_new_tokens)

    def generation_config(self, sampling: SamplingParams, per_prompt: int):
        """The transformers GenerationConfig of one call: greedy, or sampling with `per_prompt` samples each."""
        from transformers import GenerationConfig

        kwargs = dict(do_sample=False) if sampling.temperature <= 0 else dict(
            do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
            num_return_sequences=per_prompt)
        return GenerationConfig(max_new_tokens=sampling.max_new_tokens, eos_token_id=sorted(self.eos_ids),
                                pad_token_id=self.pad_id, **kwargs)

    def cache_config(self, prompts: Sequence[list[int]], per_prompt: int, sampling: SamplingParams, seed: int):
        """The ContinuousBatchingConfig of one call: a cache holding every row at its longest, `seed` for sampling."""
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        rows = len(prompts) * per_prompt
        longest = max(map(len, prompts)) + sampling.max_new_tokens
        pages_per_row = -(-longest // self.page_size)
        # one forward prefills every prompt (the samples fork from it) or decodes one token of every row
        batch_tokens = min(self.max_batch_tokens, max(rows, sum(map(len, prompts))))
        return ContinuousBatchingConfig(page_size=self.page_size, num_blocks=rows * pages_per_row,
                                        max_batch_tokens=batch_tokens, seed=seed)


def require_cache_config() -> None:
    """The installed transformers must take the ContinuousBatchingConfig this engine writes (its fields changed
    between 5.x releases); otherwise a one-line error says what to do."""
    import inspect

    import transformers

    try:
        from transformers.generation.configuration_utils import ContinuousBatchingConfig
    except ImportError:
        ContinuousBatchingConfig = None
    needed = {"page_size", "num_blocks", "max_batch_tokens", "seed"}
    if ContinuousBatchingConfig is None or not needed <= set(inspect.signature(ContinuousBatchingConfig).parameters):
        raise SmolthinkError(f"engine 'paged' needs a transformers whose ContinuousBatchingConfig takes "
                             f"{sorted(needed)} (5.24 does; this is {transformers.__version__}): upgrade "
                             f"transformers or use engine hf")


def ordered_rows(outputs: list, prompts: Sequence[list[int]], per_prompt: int) -> list[list[int]]:
    """generate_batch's outputs (each prompt's `per_prompt` samples together, in prompt order) -> generated token
    rows [len(prompts) * per_prompt][>= 0]. generate_batch logs a failed or lost request and returns the rest:
    here that is an error, as is an output whose prompt is not the one expected at its place."""
    failed = [f"{o.request_id}: {o.error}" for o in outputs if o.error is not None]
    if failed or len(outputs) != len(prompts) * per_prompt:
        raise RuntimeError(f"paged engine: {len(outputs)} of {len(prompts) * per_prompt} completions came back"
                           + (f"; failed: {failed[:3]}" if failed else ""))
    for i, o in enumerate(outputs):
        if list(o.prompt_ids) != list(prompts[i // per_prompt]):
            raise RuntimeError(f"paged engine: completion {i} ({o.request_id}) belongs to another prompt")
    return [list(o.generated_tokens) for o in outputs]
