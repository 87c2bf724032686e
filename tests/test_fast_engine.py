"""FastEngine against the HF reference: greedy tokens (tiny, peft LoRA, real model; the fp32 engine, which differs
from HF only in summation order), seeds, EOS handling, unsupported models, edge cases. No test asserts a speed."""
import pytest
import torch

from rollout_helpers import (PAD, VOCAB, assert_greedy_equals_reference, chat_like_prompts, hf_greedy, mixed_eos,
                             real_chat_prompts, tiny)
from smolthink.rollout.fast import FastEngine, common_prefix_len
from smolthink.rollout.hf import HFEngine
from smolthink.rollout.llama import UnsupportedModelError
from smolthink.types import SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------------------------
# greedy tokens


@pytest.mark.parametrize("onednn,max_rows", [(True, 64), (False, 64), (True, 4), (True, 7)])
def test_greedy_equals_hf_with_mixed_lengths_n_samples_and_eos(onednn, max_rows):
    model = tiny()
    prompts = chat_like_prompts()
    max_new = 24
    eos = mixed_eos(hf_greedy(model, prompts, max_new))
    ref = hf_greedy(model, prompts, max_new, eos)
    n = 3
    got = FastEngine(eos, PAD, max_rows=max_rows, onednn=onednn, precision="fp32").generate(
        model, prompts, n, SamplingParams(max_new_tokens=max_new, temperature=0))
    assert_greedy_equals_reference(prompts, ref, got, n, eos, max_new)


def test_greedy_without_shared_prefix_and_single_token_prompts():
    model = tiny(seed=2)
    prompts = [[4], [9, 10, 11], [3, 50]]
    assert common_prefix_len(prompts) == 0
    ref = hf_greedy(model, prompts, 10)
    got = FastEngine([PAD], PAD, precision="fp32").generate(model, prompts, 2,
                                                          SamplingParams(max_new_tokens=10, temperature=0))
    assert [[s.completion_ids for s in g] for g in got] == [[r[0].completion_ids] * 2 for r in ref]


def test_peft_lora_model_matches_hf_peft_greedy_and_is_left_untouched():
    from smolthink.models import attach_lora

    model = attach_lora(tiny(seed=3), r=4, alpha=8)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prompts = chat_like_prompts(seed=3)
    ref = hf_greedy(model, prompts, 16)
    with model.disable_adapter():
        base_ref = hf_greedy(model, prompts, 16)
    assert ref != base_ref  # the adapter changes the output, so the comparison below means something
    got = FastEngine([PAD], PAD, precision="fp32").generate(model, prompts, 2,
                                                          SamplingParams(max_new_tokens=16, temperature=0))
    assert [[s.completion_ids for s in g] for g in got] == [[r[0].completion_ids] * 2 for r in ref]
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(getattr(m, "merged", False) for m in model.modules())


@pytest.mark.slow
def test_greedy_equals_hf_on_the_embedded_model(embedded):
    from smolthink.models import eos_ids

    model, tok = embedded
    prompts = real_chat_prompts(tok)
    eos = eos_ids(tok, model)
    sp = SamplingParams(max_new_tokens=12, temperature=0)
    ref = HFEngine(eos, tok.pad_token_id).generate(model, prompts, 1, sp)
    got = FastEngine(eos, tok.pad_token_id, precision="fp32").generate(model, prompts, 2, sp)
    for r, g in zip(ref, got):
        assert [s.completion_ids for s in g] == [r[0].completion_ids] * 2
        assert [s.finish_reason for s in g] == [r[0].finish_reason] * 2


# ---------------------------------------------------------------------------------------------------------------
# sampling


def test_same_seed_same_tokens_different_seed_different_and_global_rng_untouched():
    model = tiny(seed=4)
    prompts = chat_like_prompts(seed=4)
    sp = SamplingParams(max_new_tokens=20, temperature=1.0, top_p=0.9)
    engine = FastEngine([PAD], PAD)
    state = torch.get_rng_state()
    a = engine.generate(model, prompts, 3, sp, seed=11)
    b = engine.generate(model, prompts, 3, sp, seed=11)
    c = engine.generate(model, prompts, 3, sp, seed=12)
    assert torch.equal(state, torch.get_rng_state())
    ids = lambda out: [[s.completion_ids for s in g] for g in out]  # noqa: E731
    assert ids(a) == ids(b)
    assert ids(a) != ids(c)
    assert len({tuple(s.completion_ids) for s in a[0]}) > 1  # the n samples of one prompt differ


# ---------------------------------------------------------------------------------------------------------------
# errors and fallbacks


def test_unsupported_model_raises_clearly_and_auto_falls_back_to_hf():
    from transformers import GPT2Config, GPT2LMHeadModel

    from smolthink.rollout import make_engine

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=1, n_head=2))
    engine = FastEngine([PAD], PAD)
    assert not engine.supports(gpt2)
    with pytest.raises(UnsupportedModelError, match="hf engine"):
        engine.generate(gpt2, [[3, 4]], 1, SamplingParams(max_new_tokens=2))
    assert type(make_engine("auto", gpt2, [PAD], PAD)).__name__ == "HFEngine"
    assert type(make_engine("auto", tiny(), [PAD], PAD)).__name__ == "FastEngine"
    with pytest.raises(ValueError):
        make_engine("fast", gpt2, [PAD], PAD)


def test_edge_cases():
    model = tiny()
    engine = FastEngine([PAD], PAD)
    assert engine.generate(model, [], 2, SamplingParams()) == []
    out = engine.generate(model, [[5, 6]], 2, SamplingParams(max_new_tokens=0))
    assert [[(s.completion_ids, s.finish_reason) for s in g] for g in out] == [[([], "length")] * 2]
    out = engine.generate(model, [[5, 6], [5, 7, 8]], 1, SamplingParams(max_new_tokens=1, temperature=0))
    assert all(len(g[0].completion_ids) == 1 for g in out)
    with pytest.raises(ValueError):
        engine.generate(model, [[]], 1, SamplingParams())
    with pytest.raises(ValueError):
        engine.generate(model, [[VOCAB + 5]], 1, SamplingParams())
