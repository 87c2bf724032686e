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
