"""Chunked completion-only log-probs against a naive full-logits log_softmax, plain and through peft LoRA."""
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from smolthink.logprobs import split_body_head, token_logprobs

EOS = 2  # pad id == eos id, as in SmolLM2


def tiny():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      pad_token_id=EOS, eos_token_id=EOS, bos_token_id=1)
    return LlamaForCausalLM(cfg)


def tiny_lora():
    model = get_peft_model(tiny(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                              lora_dropout=0.0, task_type="CAUSAL_LM"))
    with torch.no_grad():  # lora_B starts at 0; make the adapter change the outputs
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    return model


def naive(model, ids, attn, comp, temperature=1.0):
    """Full [N, T, V] logits -> (logp, entropy) [N, T], zero off the completion and at t = 0."""
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits.float() / temperature
    logsm = torch.log_softmax(logits[:, :-1], -1)  # predicts tokens 1..T-1
    lp = logsm.gather(2, ids[:, 1:, None]).squeeze(2)
    ent = -(logsm.exp() * logsm).sum(-1)
    pad = torch.zeros(ids.shape[0], 1)
    keep = comp.bool().clone()
    keep[:, 0] = False
    lp, ent = torch.cat([pad, lp], 1), torch.cat([pad, ent], 1)
    return torch.where(keep, lp, 0.0), torch.where(keep, ent, 0.0)


def batch():
    """Right-padded with pad == EOS; each row's real final EOS is inside the completion mask."""
    ids = torch.tensor([[1, 5, 9, 13, 30, EOS, EOS, EOS], [1, 7, 8, EOS, EOS, EOS, EOS, EOS],
                        [1, 4, 4, 11, 12, 40, 50, EOS]])
    attn = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0, 0, 0], [1] * 8])
    comp = torch.tensor([[0, 0, 0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 1, 1, 1, 1]])
    return ids, attn, comp


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_naive_full_logits(temperature):
    model = tiny()
    ids, attn, comp = batch()
    want_lp, want_ent = naive(model, ids, attn, comp, temperature)
    for chunk in (1, 3, 1024):
        lp, ent = token_logprobs(model, ids, attn, comp, temperature=temperature, chunk_size=chunk,
                                 with_entropy=True)
        assert lp.dtype == torch.float32 and lp.shape == ids.shape
        assert torch.allclose(lp, want_lp, atol=1e-5) and torch.allclose(ent, want_ent, atol=1e-5)
        assert (lp[comp == 0] == 0).all() and (ent[comp == 0] == 0).all()
        assert (lp[comp == 1] < 0).all() and (ent[comp == 1] > 0).all()
    lp, none = token_logprobs(model, ids, attn, comp, temperature=temperature)
    assert none is None and torch.allclose(lp, want_lp, atol=1e-5)


def test_gradients_match_naive():
    model = tiny()
    ids, attn, comp = batch()
    weights = torch.randn(ids.shape, generator=torch.Generator().manual_seed(2))
    params = [p for p in model.parameters()]

    lp, ent = token_logprobs(model, ids, attn, comp, temperature=0.8, chunk_size=2, with_entropy=True)
    got = torch.autograd.grad((lp * weights).sum() + ent.sum(), params)
    want_lp, want_ent = naive(model, ids, attn, comp, 0.8)
    want = torch.autograd.grad((want_lp * weights).sum() + want_ent.sum(), params)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-5)


def test_peft_lora_path_matches_naive_grad_and_no_grad_identical():
    model = tiny_lora()
    body, head = split_body_head(model)
    assert type(body).__name__ == "LlamaModel" and head is model.get_base_model().lm_head
    ids, attn, comp = batch()
    with torch.no_grad():
        old, _ = token_logprobs(model, ids, attn, comp, chunk_size=4)
        with model.disable_adapter():
            base, _ = token_logprobs(model, ids, attn, comp, chunk_size=4)
            base_naive, _ = naive(model, ids, attn, comp)
    new, _ = token_logprobs(model, ids, attn, comp, chunk_size=4)
    assert torch.equal(old, new)  # identical numerics with and without grad: ratio exactly 1
    assert torch.allclose(new.detach(), naive(model, ids, attn, comp)[0], atol=1e-5)
    assert torch.allclose(base, base_naive, atol=1e-5)
    assert (base - old).abs().max() > 1e-3  # the adapter is really part of the body
    new.sum().backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, _ in trainable)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in trainable)


def test_left_padding_gives_same_values():
    model = tiny()
    ids, attn, comp = batch()
    right, _ = token_logprobs(model, ids[1:2, :4], attn[1:2, :4], comp[1:2, :4])
    left_ids = torch.tensor([[EOS, EOS, 1, 7, 8, EOS]])
    left_attn = torch.tensor([[0, 0, 1, 1, 1, 1]])
    left_comp = torch.tensor([[0, 0, 0, 0, 1, 1]])
    left, _ = token_logprobs(model, left_ids, left_attn, left_comp)
    assert torch.allclose(left[0, 4:], right[0, 2:4], atol=1e-5)
    assert (left[0, :4] == 0).all()
    # and a row alone equals the same row inside a padded batch
    alone, _ = token_logprobs(model, ids[1:2, :4], attn[1:2, :4], comp[1:2, :4])
    full, _ = token_logprobs(model, ids, attn, comp)
    assert torch.allclose(full[1, :4], alone[0], atol=1e-5)


def test_empty_completion_mask_and_bad_chunk():
    model = tiny()
    ids, attn, comp = batch()
    lp, ent = token_logprobs(model, ids, attn, torch.zeros_like(comp), with_entropy=True)
    assert (lp == 0).all() and (ent == 0).all()
    with pytest.raises(ValueError):
        token_logprobs(model, ids, attn, comp, chunk_size=0)


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("tails", [[[], [], []], [[13, 21], [], [14, 15, 16]]], ids=["group", "prefix"])
def test_shared_prompt_matches_the_concatenated_sequences(lora, tails):
    """One prefix + three rows of different lengths, the prefix run once on a KV cache: the same log-probs,
    entropies and gradients as token_logprobs on the three full sequences. "group": every row's prompt is the
    prefix (GRPO); "prefix": rows continue their prompt after it (SFT), those tokens attended to but not scored."""
    from smolthink.logprobs import shared_prompt_logprobs

    model = tiny_lora() if lora else tiny()
    prefix = [1, 5, 9, 13, 21]
    comps = [[30, 31, EOS], [40, EOS], [50, 51, 52, 53, EOS]]
    rests = [t + c for t, c in zip(tails, comps)]
    n, p, c = len(comps), len(prefix), max(map(len, rests))
    ids = torch.full((n, p + c), EOS)
    attn, full_comp = torch.zeros(n, p + c, dtype=torch.long), torch.zeros(n, p + c, dtype=torch.long)
    rids = torch.full((n, c), EOS)
    rattn, cmask = torch.zeros(n, c, dtype=torch.long), torch.zeros(n, c, dtype=torch.long)
    for r, (tail, comp, rest) in enumerate(zip(tails, comps, rests)):
        ids[r, : p + len(rest)] = torch.tensor(prefix + rest)
        attn[r, : p + len(rest)] = 1
        full_comp[r, p + len(tail) : p + len(rest)] = 1
        rids[r, : len(rest)] = torch.tensor(rest)
        rattn[r, : len(rest)] = 1
        cmask[r, len(tail) : len(rest)] = 1
    params = [q for q in model.parameters() if q.requires_grad]

    def run(fn):
        for q in params:
            q.grad = None
        lp, ent = fn()
        (lp.sum() + 0.3 * ent.sum()).backward()
        return lp.detach(), ent.detach(), [q.grad.clone() for q in params]

    lp, ent, g = run(lambda: token_logprobs(model, ids, attn, full_comp, temperature=0.7, with_entropy=True))
    slp, sent, sg = run(lambda: shared_prompt_logprobs(model, torch.tensor([prefix]), rids, rattn, cmask,
                                                       temperature=0.7, with_entropy=True))
    assert torch.allclose(slp, lp[:, p:], atol=1e-5) and torch.allclose(sent, ent[:, p:], atol=1e-5)
    assert (slp[cmask == 0] == 0).all() and (slp[cmask == 1] < 0).all()
    for a, b in zip(sg, g):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_shared_prompt_needs_a_prefix():
    from smolthink.logprobs import shared_prompt_logprobs

    ids = torch.tensor([[30, EOS]])
    with pytest.raises(ValueError, match="P >= 1"):
        shared_prompt_logprobs(tiny(), torch.zeros(1, 0, dtype=torch.long), ids, torch.ones_like(ids),
                               torch.ones_like(ids))


def test_entropy_without_grad_has_the_same_values():
    model = tiny()
    ids, attn, comp = batch()
    lp, ent = token_logprobs(model, ids, attn, comp, temperature=0.7, with_entropy=True)
    lp2, ent2 = token_logprobs(model, ids, attn, comp, temperature=0.7, with_entropy=True, entropy_grad=False)
    assert ent.requires_grad and not ent2.requires_grad and lp2.requires_grad
    assert torch.equal(ent.detach(), ent2) and torch.equal(lp.detach(), lp2.detach())
