"""The Llama decoder of the fast engine against HF: prefill and decode-step logits on tiny models (right padding,
shared prefix, masked rows, oneDNN and F.linear) and on the other supported configs."""
import pytest
import torch

from rollout_helpers import PAD, VOCAB, chat_like_prompts, hf_last_logits, real_chat_prompts, spiky, tiny
from smolthink.rollout.fast import common_prefix_len
from smolthink.rollout.llama import decode_step, extract_weights, prefill

pytestmark = pytest.mark.usefixtures("one_thread")


def assert_padded_prefill_matches_hf(model, seqs, pad, onednn=None, atol=1e-4, rtol=1e-4):
    """`prefill` of `seqs` as one right-padded batch gives HF's logits after each sequence's last token."""
    w = extract_weights(model, onednn=onednn)
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
    cache = torch.empty(len(w.layers), 2, len(seqs), w.n_kv, width, w.head_dim)
    got = prefill(w, ids, torch.arange(width)[None].expand(len(seqs), width), cache, 0,
                  last=torch.tensor([len(s) - 1 for s in seqs]))
    want = torch.stack([lg[-1] for lg in hf_last_logits(model, seqs)])
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)


@pytest.mark.parametrize("onednn", [True, False])
def test_prefill_logits_match_hf_on_a_right_padded_batch(onednn):
    assert_padded_prefill_matches_hf(tiny(), chat_like_prompts(), PAD, onednn=onednn)


@pytest.mark.slow
def test_prefill_logits_match_hf_on_the_embedded_model(embedded):
    """The real decoder on a batch of chat prompts."""
    model, tok = embedded
    assert_padded_prefill_matches_hf(model, real_chat_prompts(tok), tok.pad_token_id, atol=2e-3, rtol=1e-3)


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
