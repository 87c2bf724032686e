"""Per-token log-probs (and entropies) of given sequences without ever materialising [N, T, V] logits: the
transformer body runs once, the LM head runs in row chunks on completion positions only."""
from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint


def split_body_head(model) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(decoder body, lm_head) of a causal LM, under any wrapper: peft PeftModel (LoRA layers are injected in
    place, so the body already includes the adapter and honours `disable_adapter()`), DDP / accelerate
    (`.module`) and torch.compile (`._orig_mod`). The body returns last_hidden_state after the final norm;
    the head maps it to logits (true for Llama / SmolLM2; models that post-process logits are refused)."""
    m = model
    for _ in range(8):  # unwrap nested wrappers
        if hasattr(m, "get_base_model") and hasattr(m, "peft_config"):
            m = m.get_base_model()
        elif hasattr(m, "_orig_mod"):
            m = m._orig_mod
        elif isinstance(getattr(m, "module", None), torch.nn.Module) and not hasattr(m, "get_output_embeddings"):
            m = m.module
        else:
            break
    head = m.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(m).__name__} has no output embeddings (lm_head)")
    cfg = getattr(m, "config", None)
    for attr in ("final_logit_softcapping", "logit_scale"):
        if getattr(cfg, attr, None) not in (None, 1.0):
            raise NotImplementedError(f"{type(m).__name__} post-processes its logits ({attr}); not supported")
    body = m.get_decoder() if hasattr(m, "get_decoder") else None
    if body is None or body is m:
        body = getattr(m, "base_model", None)
    if body is None or body is m:
        raise ValueError(f"cannot find the decoder body of {type(m).__name__}")
    return body, head


def _head_chunk(head: torch.nn.Module, h: Tensor, targets: Tensor, temperature: float, with_entropy: bool
                ) -> tuple[Tensor, Tensor | None]:
    """Log-prob of the targets and entropy for one chunk of hidden rows: h [k, H], targets [k] -> [k], [k]."""
    logits = head(h).float()  # [k, V]
    if temperature != 1.0:
        logits = logits / temperature
    lse = torch.logsumexp(logits, dim=-1)  # [k]
    lp = logits.gather(1, targets[:, None]).squeeze(1) - lse  # [k]
    ent = None
    if with_entropy:  # H = lse - sum_v p_v z_v
        ent = lse - (torch.softmax(logits, dim=-1) * logits).sum(dim=-1)  # [k]
    return lp, ent


def token_logprobs(model, input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor,
                   temperature: float = 1.0, chunk_size: int = 1024, with_entropy: bool = False
                   ) -> tuple[Tensor, Tensor | None]:
    """Per-token log-probs of the given tokens -> (logp [N, T] float32, entropy [N, T] float32 or None).

    input_ids, attention_mask, completion_mask: [N, T], left- or right-padded (masks come from lengths, never
    from comparing ids with the pad id, which equals EOS for SmolLM2). logp[:, t] = log softmax(z_{t-1} /
    temperature)[input_ids[:, t]] where z_{t-1} are the logits after input_ids[:, :t]; it is filled only where
    completion_mask is 1 (0 elsewhere, and always 0 at t = 0, which has no context). entropy[:, t] is the
    entropy of that same temperature-scaled distribution (0 where logp is 0). position_ids are
    cumsum(attention_mask) - 1, so padding on either side does not shift positions.

    Memory: the body's hidden states [N, T, H] plus one [chunk_size, V] logits block at a time (the hidden rows
    of the K completion positions are gathered into [K, H] and the head runs on `chunk_size` rows per step;
    with gradients each chunk is checkpointed, so backward recomputes its logits instead of storing them).
    The same ops on the same shapes run with or without gradients, so log-probs computed under no_grad equal
    the training-time ones bit for bit on the same batch (importance ratio exactly 1 before any update).
    """
    if input_ids.shape != attention_mask.shape or input_ids.shape != completion_mask.shape:
        raise ValueError("input_ids, attention_mask and completion_mask must share one [N, T] shape")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    body, head = split_body_head(model)
    attention_mask = attention_mask.long()
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # [N, T]
    hidden = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                  use_cache=False).last_hidden_state  # [N, T, H]

    # token t is predicted from the hidden state at t - 1; t = 0 has no context
    target_mask = completion_mask.bool().clone()  # [N, T]
    target_mask[:, 0] = False
    rows, cols = target_mask.nonzero(as_tuple=True)  # [K], [K] in row-major order
    h = hidden[rows, cols - 1]  # [K, H]
    targets = input_ids[rows, cols]  # [K]

    recompute = torch.is_grad_enabled() and h.requires_grad
    out_lp: list[Tensor] = []
    out_ent: list[Tensor] = []
    for s in range(0, h.shape[0], chunk_size):
        args = (head, h[s : s + chunk_size], targets[s : s + chunk_size], temperature, with_entropy)
        lp, ent = checkpoint(_head_chunk, *args, use_reentrant=False) if recompute else _head_chunk(*args)
        out_lp.append(lp)  # [k]
        if ent is not None:
            out_ent.append(ent)

    def scatter(parts: list[Tensor]) -> Tensor:
        """[K] values -> [N, T] zeros with them at (rows, cols)."""
        full = torch.zeros(input_ids.shape, dtype=torch.float32, device=hidden.device)
        if not parts:
            return full
        return full.index_put((rows, cols), torch.cat(parts))

    return scatter(out_lp), scatter(out_ent) if with_entropy else None
