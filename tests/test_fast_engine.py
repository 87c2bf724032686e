"""FastEngine against the HF reference: logits, greedy tokens (tiny, peft LoRA, real model), seeds, EOS handling,
exact top-p, unsupported models. No test asserts a speed."""
import pytest
import torch

from smolthink.rollout.fast import (FastEngine, UnsupportedModelError, common_prefix_len, decode_step,
                                    extract_weights, prefill, sample_tokens, top_p_filter)
from smolthink.rollout.hf import HFEngine
from smolthink.types import SamplingParams

VOCAB = 96
PAD = 2


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: these tests are tiny, and on a shared 2-core machine two OpenMP threads stall each other."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def spiky(model, std: float = 0.25, seed: int = 0):
    """Re-initialise a tiny random model with larger weights so greedy text is varied (default init is ~uniform)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def tiny(vocab=VOCAB, seed=0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=1024, bos_token_id=1,
               eos_token_id=2, pad_token_id=2)
    cfg.update(overrides)
    return spiky(LlamaForCausalLM(LlamaConfig(**cfg)), seed=seed)


def chat_like_prompts(vocab=VOCAB, lengths=(7, 12, 4, 9), head=(5, 6, 7, 8, 9), seed=0):
    """Prompts with a shared head (like a system prompt) and own tails of mixed lengths."""
    g = torch.Generator().manual_seed(seed)
    return [list(head) + torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def hf_greedy(model, prompts, max_new, eos=(PAD,)):
    return HFEngine(list(eos), PAD).generate(model, prompts, 1, SamplingParams(max_new_tokens=max_new, temperature=0))


def mixed_eos(rollouts):
    """A token that some prompts' greedy completions contain and others do not: used as EOS so that some rows
    stop (at different steps) and others run to the length limit."""
    present = [set(r[0].completion_ids) for r in rollouts]
    candidates = sorted(set().union(*present) - set.intersection(*present),
                        key=lambda t: (-sum(t in p for p in present), t))
    assert candidates, "test prompts give identical token sets"
    return [candidates[0]]


# ---------------------------------------------------------------------------------------------------------------
# logits


def hf_last_logits(model, seqs):
    out = []
    for s in seqs:
        with torch.no_grad():
            out.append(model(torch.tensor([s])).logits[0].float())
    return out


@pytest.mark.parametrize("onednn", [True, False])
def test_prefill_logits_match_hf_on_a_right_padded_batch(onednn):
    model = tiny()
    seqs = chat_like_prompts()
    w = extract_weights(model, onednn=onednn)
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), PAD)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
    cache = torch.empty(len(w.layers), 2, len(seqs), w.n_kv, width, w.head_dim)
    got = prefill(w, ids, torch.arange(width)[None].expand(len(seqs), width), cache, 0,
                  last=torch.tensor([len(s) - 1 for s in seqs]))
    want = torch.stack([lg[-1] for lg in hf_last_logits(model, seqs)])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("onednn", [True, False])
def test_decode_step_logits_match_hf_with_shared_prefix_and_masked_rows(onednn):
    """Shared prefix + right-aligned per-row suffixes (masked left columns) + several decode steps."""
    model = tiny(seed=1)
    seqs = chat_like_prompts(lengths=(6, 3, 8), seed=1)
    lc = common_prefix_len(seqs)
    w = extract_weights(model, onednn=onednn)
    steps = 4
    full = [s + [(7 * i + 3 * j) % (VOCAB - 3) + 3 for j in range(steps)] for i, s in enumerate(seqs)]
    want = hf_last_logits(model, full)
    pc = torch.empty(len(w.layers), 2, 1, w.n_kv, lc, w.head_dim)
    prefill(w, torch.tensor([seqs[0][:lc]]), torch.arange(lc)[None], pc, 0)
    prefix = pc[:, :, 0]
    suffix = [s[lc:] for s in seqs]
    ws = max(len(s) for s in suffix)
    B = len(seqs)
    cache = torch.zeros(len(w.layers), 2, B, w.n_kv, ws + steps, w.head_dim)
    start = []
    for i, s in enumerate(suffix):  # each suffix prefilled alone, then right-aligned into the per-row cache
        c = torch.empty(len(w.layers), 2, 1, w.n_kv, lc + len(s), w.head_dim)
        c[:, :, :, :, :lc] = prefix[:, :, None]
        lg = prefill(w, torch.tensor([s]), torch.arange(lc, lc + len(s))[None], c, lc)
        torch.testing.assert_close(lg[0], want[i][len(seqs[i]) - 1], atol=1e-4, rtol=1e-4)
        cache[:, :, i, :, ws - len(s): ws] = c[:, :, 0, :, lc:]
        start.append(ws - len(s))
    bias = torch.zeros(B, ws)
    for i, st in enumerate(start):
        bias[i, :st] = float("-inf")
    for t in range(steps):
        tok = torch.tensor([f[len(s) + t] for f, s in zip(full, seqs)])
        pos = torch.tensor([len(s) + t for s in seqs])
        got = decode_step(w, tok, pos, prefix, cache, ws + t, ws + t + 1, torch.nn.functional.pad(bias, (0, t + 1)))
        for i, s in enumerate(seqs):
            torch.testing.assert_close(got[i], want[i][len(s) + t], atol=1e-4, rtol=1e-4)
    # the same rows left-aligned, each writing its own column (the engine's layout), one more step
    left = torch.zeros(*cache.shape[:4], ws + steps + 1, cache.shape[5])
    cols = []
    for i, st in enumerate(start):
        n_i = ws + steps - st
        left[:, :, i, :, :n_i] = cache[:, :, i, :, st: ws + steps]
        cols.append(n_i)
    full2 = [f + [11 + i] for i, f in enumerate(full)]
    want2 = hf_last_logits(model, full2)
    col = torch.tensor(cols)
    mask = torch.zeros(B, max(cols) + 1).masked_fill_(torch.arange(max(cols) + 1)[None, :] > col[:, None],
                                                       float("-inf"))
    got = decode_step(w, torch.tensor([f[-1] for f in full2]), torch.tensor([len(f) - 1 for f in full2]), prefix,
                      left, col, max(cols) + 1, mask)
    for i in range(B):
        torch.testing.assert_close(got[i], want2[i][-1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["rope_linear", "rope_llama3", "qwen2", "mistral"])
def test_other_llama_like_configs_match_hf_logits(arch):
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    if arch == "rope_linear":
        model = tiny(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0})
    elif arch == "rope_llama3":
        model = tiny(rope_parameters={"rope_type": "llama3", "factor": 8.0, "rope_theta": 500000.0,
                                      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 64})
    elif arch == "qwen2":  # q/k/v biases
        model = spiky(Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=False)))
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_proj.bias.normal_(0, 0.5)
                layer.self_attn.k_proj.bias.normal_(0, 0.5)
                layer.self_attn.v_proj.bias.normal_(0, 0.5)
    else:
        model = spiky(MistralForCausalLM(MistralConfig(**common, sliding_window=None)))
    seq = chat_like_prompts(lengths=(40,))[0]
    w = extract_weights(model)
    cache = torch.empty(len(w.layers), 2, 1, w.n_kv, len(seq), w.head_dim)
    got = prefill(w, torch.tensor([seq]), torch.arange(len(seq))[None], cache, 0)
    torch.testing.assert_close(got[0], hf_last_logits(model, [seq])[0][-1], atol=1e-4, rtol=1e-4)


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
    got = FastEngine(eos, PAD, max_rows=max_rows, onednn=onednn).generate(
        model, prompts, n, SamplingParams(max_new_tokens=max_new, temperature=0))
    assert len(got) == len(prompts) and all(len(g) == n for g in got)
    reasons = set()
    for p, r, g in zip(prompts, ref, got):
        for s in g:
            assert s.prompt_ids == p
            assert s.completion_ids == r[0].completion_ids
            assert s.finish_reason == r[0].finish_reason
            reasons.add(s.finish_reason)
            if s.finish_reason == "stop":
                assert s.completion_ids[-1] in eos and not set(s.completion_ids[:-1]) & set(eos)
            else:
                assert len(s.completion_ids) == max_new and not set(s.completion_ids) & set(eos)
    assert reasons == {"stop", "length"}


def test_greedy_without_shared_prefix_and_single_token_prompts():
    model = tiny(seed=2)
    prompts = [[4], [9, 10, 11], [3, 50]]
    assert common_prefix_len(prompts) == 0
    ref = hf_greedy(model, prompts, 10)
    got = FastEngine([PAD], PAD).generate(model, prompts, 2, SamplingParams(max_new_tokens=10, temperature=0))
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
    got = FastEngine([PAD], PAD).generate(model, prompts, 2, SamplingParams(max_new_tokens=16, temperature=0))
    assert [[s.completion_ids for s in g] for g in got] == [[r[0].completion_ids] * 2 for r in ref]
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(getattr(m, "merged", False) for m in model.modules())


@pytest.mark.slow
def test_greedy_equals_hf_on_the_embedded_model(embedded):
    from smolthink.chat import build_messages, render_prompt
    from smolthink.models import eos_ids

    model, tok = embedded
    questions = ["What is 2 + 3?", "Name a colour.", "Is every square a rectangle? Answer Yes or No, briefly."]
    prompts = [render_prompt(tok, build_messages(q)) for q in questions]
    eos = eos_ids(tok, model)
    sp = SamplingParams(max_new_tokens=12, temperature=0)
    ref = HFEngine(eos, tok.pad_token_id).generate(model, prompts, 1, sp)
    got = FastEngine(eos, tok.pad_token_id).generate(model, prompts, 2, sp)
    for r, g in zip(ref, got):
        assert [s.completion_ids for s in g] == [r[0].completion_ids] * 2
        assert [s.finish_reason for s in g] == [r[0].finish_reason] * 2
    # logits of the real decoder equal HF's on a batch of prompts
    w = extract_weights(model)
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), tok.pad_token_id)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(p)
    cache = torch.empty(len(w.layers), 2, len(prompts), w.n_kv, width, w.head_dim)
    got_logits = prefill(w, ids, torch.arange(width)[None].expand(len(prompts), width), cache, 0,
                         last=torch.tensor([len(p) - 1 for p in prompts]))
    want = torch.stack([lg[-1] for lg in hf_last_logits(model, prompts)])
    torch.testing.assert_close(got_logits, want, atol=2e-3, rtol=1e-3)


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


def reference_top_p(probs: torch.Tensor, top_p: float) -> list[dict[int, float]]:
    """Full descending sort; keep a token iff the mass ranked before it is < top_p; renormalise."""
    out = []
    for row in probs:
        vals, idx = row.sort(descending=True)
        before = torch.cat([torch.zeros(1, dtype=vals.dtype), vals.cumsum(0)[:-1]])
        keep = before < top_p
        keep[0] = True
        kept = vals[keep]
        out.append(dict(zip(idx[keep].tolist(), (kept / kept.sum()).tolist())))
    return out


@pytest.mark.parametrize("top_p", [0.3, 0.9, 0.95, 0.999])
@pytest.mark.parametrize("k0", [1, 4, 64])
def test_top_p_filter_keeps_exactly_the_full_sort_set(top_p, k0):
    g = torch.Generator().manual_seed(int(top_p * 1000) + k0)
    V = 1000
    scales = torch.tensor([0.1, 1.0, 3.0, 8.0, 20.0] * 4)[:, None]  # flat rows force widening, peaked rows don't
    logits = torch.randn(len(scales), V, generator=g) * scales
    probs = torch.softmax(logits, -1)
    vals, idx = top_p_filter(probs, top_p, k0=k0)
    for row, ref in enumerate(reference_top_p(probs, top_p)):
        kept = vals[row] > 0
        got = dict(zip(idx[row][kept].tolist(), (vals[row][kept] / vals[row][kept].sum()).tolist()))
        assert set(got) == set(ref)
        torch.testing.assert_close(torch.tensor([got[k] for k in ref]), torch.tensor(list(ref.values())))


@pytest.mark.parametrize("top_p,top_k", [(0.9, 0), (1.0, 0), (0.8, 5), (1.0, 7)])
def test_sampled_distribution_equals_the_reference(top_p, top_k):
    """Inverse-CDF sampling on an even grid of uniforms reproduces the filtered distribution (deterministic)."""
    g = torch.Generator().manual_seed(7)
    V, N, temp = 50, 20000, 0.7
    logits = torch.randn(1, V, generator=g) * 2
    u = (torch.arange(N, dtype=torch.float64) + 0.5) / N
    toks = sample_tokens(logits.expand(N, V), SamplingParams(temperature=temp, top_p=top_p, top_k=top_k), u)
    freq = torch.bincount(toks, minlength=V).double() / N
    scores = logits[0] / temp
    if top_k:
        scores = scores.masked_fill(scores < scores.topk(top_k).values[-1], float("-inf"))
    ref = reference_top_p(torch.softmax(scores, -1)[None].double(), top_p)[0]
    want = torch.zeros(V, dtype=torch.float64)
    want[list(ref)] = torch.tensor(list(ref.values()), dtype=torch.float64)
    assert set(freq.nonzero().squeeze(1).tolist()) <= set(ref)
    torch.testing.assert_close(freq, want, atol=2.0 / N, rtol=0)


def test_greedy_sampling_is_argmax():
    logits = torch.randn(5, 30)
    tok = sample_tokens(logits, SamplingParams(temperature=0), torch.rand(5, dtype=torch.float64))
    assert torch.equal(tok, logits.argmax(-1))


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
