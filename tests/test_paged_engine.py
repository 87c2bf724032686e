"""PagedEngine (transformers' continuous batching) on CPU against the HF reference: greedy tokens equal token for
token (same model, same fp32 numerics), EOS and length handling, n samples per prompt, seeds, the live weights of
a peft LoRA model, the caller's state left as it was, and failures reported instead of dropped."""
from types import SimpleNamespace

import pytest
import torch

from rollout_helpers import PAD, assert_greedy_equals_reference, chat_like_prompts, hf_greedy, mixed_eos, tiny
from smolthink.rollout import make_engine
from smolthink.rollout.paged import PagedEngine, ordered_rows
from smolthink.types import SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")


def greedy(max_new):
    return SamplingParams(max_new_tokens=max_new, temperature=0)


def ids(rollouts):
    return [[r.completion_ids for r in row] for row in rollouts]


def test_greedy_equals_hf_token_for_token_with_eos_and_n_copies():
    model = tiny()
    prompts = chat_like_prompts()
    max_new = 24
    eos = mixed_eos(hf_greedy(model, prompts, max_new))
    got = PagedEngine(eos, PAD).generate(model, prompts, 3, greedy(max_new))
    assert_greedy_equals_reference(prompts, hf_greedy(model, prompts, max_new, eos), got, 3, eos, max_new)
    assert all(s.logprobs is None for g in got for s in g)


def test_sampling_n_per_prompt_lengths_eos_and_seeds():
    model = tiny(seed=1)
    prompts = chat_like_prompts(seed=1)
    max_new = 20
    eos = mixed_eos(hf_greedy(model, prompts, max_new))
    sampling = SamplingParams(max_new_tokens=max_new, temperature=1.0, top_p=0.95, top_k=40)
    engine = PagedEngine(eos, PAD)
    a = engine.generate(model, prompts, 4, sampling, seed=7)
    assert [len(g) for g in a] == [4] * len(prompts)
    for p, g in zip(prompts, a):
        for s in g:
            assert s.prompt_ids == p and 1 <= len(s.completion_ids) <= max_new
            assert (s.finish_reason == "stop") == (s.completion_ids[-1] in eos)
            assert not set(s.completion_ids[:-1]) & set(eos)
    assert len({tuple(s.completion_ids) for g in a for s in g}) > len(prompts)  # samples differ, not n copies
    assert ids(engine.generate(model, prompts, 4, sampling, seed=7)) == ids(a)
    assert ids(engine.generate(model, prompts, 4, sampling, seed=8)) != ids(a)


def test_callers_rng_mode_and_attention_are_left_as_they_were():
    model = tiny(seed=2).train()
    attn = model.config._attn_implementation
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    PagedEngine([PAD], PAD).generate(model, chat_like_prompts(), 2, SamplingParams(max_new_tokens=6), seed=1)
    assert torch.equal(torch.rand(3), expected)  # continuous batching seeds the global RNG in its thread
    assert model.training and all(m.training for m in model.modules())
    assert model.config._attn_implementation == attn


def test_peft_lora_weights_are_read_live_on_every_call():
    """An in-place change of the adapter (what an optimizer step does) shows in the very next rollout."""
    from smolthink.models import attach_lora

    model = attach_lora(tiny(seed=3), r=4, alpha=8).eval()
    prompts = chat_like_prompts(seed=3)
    engine = PagedEngine([PAD], PAD)
    before = engine.generate(model, prompts, 1, greedy(12))
    assert ids(before) == ids(hf_greedy(model, prompts, 12))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn(p.shape, generator=g))
    after = engine.generate(model, prompts, 1, greedy(12))
    assert ids(after) == ids(hf_greedy(model, prompts, 12))
    assert ids(after) != ids(before)


def test_cache_is_sized_for_the_call():
    engine = PagedEngine([PAD], PAD, page_size=16, max_batch_tokens=40)
    cfg = engine.cache_config([[1] * 10, [1] * 25], 3, SamplingParams(max_new_tokens=20), seed=4)
    # 6 rows, each at most 25 + 20 = 45 tokens = 3 pages of 16; one forward: 35 prompt tokens
    assert (cfg.num_blocks, cfg.max_batch_tokens, cfg.seed, cfg.page_size) == (18, 35, 4, 16)
    assert engine.cache_config([[1] * 30] * 2, 1, SamplingParams(max_new_tokens=5), seed=0).max_batch_tokens == 40


def test_lost_failed_or_misplaced_outputs_raise():
    prompts = [[5, 6], [7]]
    out = lambda rid, p, err=None: SimpleNamespace(request_id=rid, prompt_ids=p, generated_tokens=[3], error=err)
    good = [out("a", [5, 6]), out("b", [5, 6]), out("c", [7]), out("d", [7])]
    assert ordered_rows(good, prompts, 2) == [[3]] * 4
    with pytest.raises(RuntimeError, match="3 of 4 completions"):
        ordered_rows(good[:3], prompts, 2)
    with pytest.raises(RuntimeError, match="failed: .'c: boom'"):
        ordered_rows(good[:2] + [out("c", [7], "boom"), good[3]], prompts, 2)
    with pytest.raises(RuntimeError, match="belongs to another prompt"):
        ordered_rows([good[0], good[2], good[1], good[3]], prompts, 2)


def test_engine_choice_is_wired_through_configs_and_make_engine():
    from smolthink.config import EvalRunConfig, GRPOConfig, build_config
    from smolthink.errors import SmolthinkError

    assert isinstance(make_engine("paged", tiny(), [PAD], PAD), PagedEngine)
    assert type(make_engine("auto", tiny(), [PAD], PAD)).__name__ != "PagedEngine"  # not auto until measured
    assert build_config(GRPOConfig, [{"engine": "paged"}]).engine == "paged"
    assert build_config(EvalRunConfig, [{"engine": "paged"}]).engine == "paged"
    with pytest.raises(SmolthinkError, match="paged"):
        build_config(GRPOConfig, [{"engine": "vllm"}])


def test_a_transformers_with_another_cache_config_gets_one_line(monkeypatch):
    """transformers 5.17's ContinuousBatchingConfig has no page_size: the engine refuses at construction with what
    to do, instead of a TypeError at the first rollout."""
    import transformers.generation.configuration_utils as cu

    from smolthink.errors import SmolthinkError

    class OlderConfig:
        def __init__(self, num_blocks=None, max_batch_tokens=None):
            pass

    monkeypatch.setattr(cu, "ContinuousBatchingConfig", OlderConfig)
    with pytest.raises(SmolthinkError, match="engine 'paged' needs a transformers .* use engine hf"):
        PagedEngine([PAD], PAD)
