"""Tiny Llama models and prompts for the rollout tests (importable with tests/ on sys.path)."""
import torch

VOCAB = 96
PAD = 2


def spiky(model, std: float = 0.25, seed: int = 0):
    """Re-initialise a tiny random model with larger weights so greedy text is varied (default init is ~uniform)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def tiny(vocab=VOCAB, seed=0, **overrides):
    """A 2-layer random LlamaForCausalLM (GQA: 4 heads, 2 kv heads), spiky weights; `overrides` go to its config."""
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


def hf_last_logits(model, seqs):
    """HF's fp32 logits [T, V] for each sequence run alone (the reference for the fast decoder)."""
    out = []
    for s in seqs:
        with torch.no_grad():
            out.append(model(torch.tensor([s])).logits[0].float())
    return out


def real_chat_prompts(tok):
    """Three short questions rendered with the real chat template (system prompt included) -> prompt ids."""
    from smolthink.chat import build_messages, render_prompt

    questions = ["What is 2 + 3?", "Name a colour.", "Is every square a rectangle? Answer Yes or No, briefly."]
    return [render_prompt(tok, build_messages(q)) for q in questions]


def hf_greedy(model, prompts, max_new, eos=(PAD,)):
    """HF generate's greedy completions, one per prompt: the reference tokens."""
    from smolthink.rollout.hf import HFEngine
    from smolthink.types import SamplingParams

    return HFEngine(list(eos), PAD).generate(model, prompts, 1, SamplingParams(max_new_tokens=max_new, temperature=0))


def mixed_eos(rollouts):
    """A token that some prompts' greedy completions contain and others do not: used as EOS so that some rows
    stop (at different steps) and others run to the length limit."""
    present = [set(r[0].completion_ids) for r in rollouts]
    candidates = sorted(set().union(*present) - set.intersection(*present),
                        key=lambda t: (-sum(t in p for p in present), t))
    assert candidates, "test prompts give identical token sets"
    return [candidates[0]]


def assert_greedy_equals_reference(prompts, ref, got, n, eos, max_new):
    """`got` ([prompt][n] Rollouts) holds n copies of the reference's greedy completion of each prompt (`ref`:
    [prompt][1]), token for token with its finish reason: EOS kept and only at the end, or exactly max_new tokens
    without EOS; the prompts mix both endings."""
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
