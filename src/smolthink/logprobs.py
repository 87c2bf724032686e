"""Per-token log-probs (and entropies) of given sequences without ever materialising [N, T, V] logits: the
transformer body runs once, the LM head runs in row chunks on completion positions only."""
from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint


def _body(model):
    """The decoder stack under any wrapper (peft injects LoRA in place, so the body includes the adapter)."""
    m = model.get_base_model() if hasattr(model, "get_base_model") else model
    m = getattr(m, "module", m)  # DDP
    return m.get_decoder(), m.get_output_embeddings()


def _head_chunk(head, h: Tensor, targets: Tensor, temperature: float, with_entropy: bool):
    """Log-prob of the targets and entropy for one chunk of hidden rows: h [k, H], targets [k] -> [k], [k]."""
    logits = head(h).float()  # [k, V]
    if temperature != 1.0:
        logits = logits / temperature
    lse = torch.logsumexp(logits, dim=-1)  # [k]
    lp = logits.gather(1, targets[:, None]).squeeze(1) - lse
    ent = lse - (torch.softmax(logits, dim=-1) * logits).sum(-1) if with_entropy else None
    return lp, ent


def token_logprobs(model, input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor,
                   temperature: float = 1.0, chunk_size: int = 1024, with_entropy: bool = False
                   ) -> tuple[Tensor, Tensor | None]:
    """logp[N, T] with logp[:, t] = log p(input_ids[:, t] | input_ids[:, :t]) / temperature-scaled, on positions
    where completion_mask is 1 (0 elsewhere, and at t = 0); entropy[N, T] of the same distributions if asked.

    Memory: hidden states [N, T, H] plus one [chunk_size, V] logits block at a time. The same ops and shapes
    run with or without gradients, so no-grad old log-probs equal training log-probs on the same batch.
    """
    decoder, head = _body(model)
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # right or left padding
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                     use_cache=False).last_hidden_state  # [N, T, H]
    # token t is predicted by the hidden state at t - 1
    target_mask = completion_mask.bool().clone()
    target_mask[:, 0] = False
    rows, cols = target_mask.nonzero(as_tuple=True)  # [K]
    h = hidden[rows, cols - 1]  # [K, H]
    targets = input_ids[rows, cols]  # [K]
    out_lp, out_ent = [], []
    recompute = torch.is_grad_enabled() and h.requires_grad
    for s in range(0, h.shape[0], chunk_size):
        args = (h[s : s + chunk_size], targets[s : s + chunk_size])
        if recompute:  # keep only the [k, H] input per chunk; logits are recomputed in backward
            lp, ent = checkpoint(_head_chunk, head, *args, temperature, with_entropy, use_reentrant=False)
        else:
            lp, ent = _head_chunk(head, *args, temperature, with_entropy)
        out_lp.append(lp)
        if with_entropy:
            out_ent.append(ent)
    logp = torch.zeros(input_ids.shape, dtype=torch.float32, device=input_ids.device)
    flat = torch.cat(out_lp) if out_lp else logp.new_zeros(0)
    logp = logp.index_put((rows, cols), flat)
    entropy = None
    if with_entropy:
        entropy = torch.zeros(input_ids.shape, dtype=torch.float32, device=input_ids.device)
        entropy = entropy.index_put((rows, cols), torch.cat(out_ent) if out_ent else entropy.new_zeros(0))
    return logp, entropy
