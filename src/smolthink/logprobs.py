"""Per-token log-probs (and entropies) of given sequences without ever materialising [N, T, V] logits: the
transformer body runs once, the LM head runs in row chunks on completion positions only."""
from __future__ import annotations

import inspect

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint


def causal_lm(model) -> torch.nn.Module:
    """The transformers causal-LM module under any wrapper: peft PeftModel (LoRA layers are injected in place, so
    the module it returns already runs the adapter and honours `disable_adapter()`), DDP / accelerate (`.module`)
    and torch.compile (`._orig_mod`). The weights are the wrapper's own tensors, not a copy."""
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
    return m


def split_body_head(model) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(decoder body, lm_head) of a causal LM under any wrapper (`causal_lm`). The body returns last_hidden_state
    after the final norm; the head maps it to logits (true for Llama / SmolLM2; models that post-process logits
    are refused)."""
    m = causal_lm(model)
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


def _head_chunk(head: torch.nn.Module, h: Tensor, targets: Tensor, temperature: float, with_entropy: bool,
                entropy_grad: bool = True) -> tuple[Tensor, Tensor | None]:
    """Log-prob of the targets and entropy for one chunk of hidden rows: h [k, H], targets [k] -> [k], [k].
    A bias-free head scales h [k, H] by 1 / temperature instead of the [k, V] logits (one pass over 576 columns
    instead of 49k, forward and backward). entropy_grad=False computes the entropy outside autograd (a logged
    metric when the loss has no entropy term: no backward through the [k, V] softmax). The head may run its GEMM
    in bf16 (`OneDNNLinears` with precision bf16): its logits still reach the log-softmax as fp32."""
    if temperature != 1.0 and getattr(head, "bias", None) is None:
        logits = head(h / temperature).float()  # [k, V] = z / T
    else:
        logits = head(h).float()
        logits = logits / temperature if temperature != 1.0 else logits
    lse = torch.logsumexp(logits, dim=-1)  # [k]
    lp = logits.gather(1, targets[:, None]).squeeze(1) - lse  # [k]
    ent = None
    if with_entropy:  # H = lse - sum_v p_v z_v
        with torch.set_grad_enabled(torch.is_grad_enabled() and entropy_grad):
            ent = lse - (torch.exp(logits - lse[:, None]) * logits).sum(dim=-1)  # [k]
    return lp, ent


def token_logprobs(model, input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor,
                   temperature: float = 1.0, chunk_size: int = 1024, with_entropy: bool = False,
                   entropy_grad: bool = True) -> tuple[Tensor, Tensor | None]:
    """Per-token log-probs of the given tokens -> (logp [N, T] float32, entropy [N, T] float32 or None).

    input_ids, attention_mask, completion_mask: [N, T], left- or right-padded (masks come from lengths, never
    from comparing ids with the pad id, which equals EOS for SmolLM2). logp[:, t] = log softmax(z_{t-1} /
    temperature)[input_ids[:, t]] where z_{t-1} are the logits after input_ids[:, :t]; it is filled only where
    completion_mask is 1 (0 elsewhere, and always 0 at t = 0, which has no context). entropy[:, t] is the
    entropy of that same temperature-scaled distribution (0 where logp is 0). position_ids are
    cumsum(attention_mask) - 1, so padding on either side does not shift positions. entropy_grad=False computes
    the entropy outside autograd (for logging when the loss has no entropy term).

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
    return _head_logprobs(head, hidden[rows, cols - 1], input_ids, rows, cols, temperature, chunk_size, with_entropy,
                          entropy_grad)


def shared_prompt_logprobs(model, prefix_ids: Tensor, input_ids: Tensor, attention_mask: Tensor,
                           completion_mask: Tensor, temperature: float = 1.0, chunk_size: int = 1024,
                           with_entropy: bool = False, entropy_grad: bool = True) -> tuple[Tensor, Tensor | None]:
    """Per-token log-probs of n sequences that start with ONE prefix, the prefix run once -> (logp [n, C],
    entropy [n, C] or None), the same values as `token_logprobs` on the n whole sequences (up to summation order).

    prefix_ids: [1, P], P >= 1; input_ids, attention_mask, completion_mask: [n, C], each row's tokens after the
    prefix, right-padded, masks from lengths: attention_mask 1 on real tokens, completion_mask 1 on the tokens to
    score (a subset of them). A GRPO group: the prefix is its prompt, the rest its completions (both masks equal);
    SFT: the prefix is the chat template's system turn, the rest each question then its scored answer. The
    prefix's forward fills a KV cache (its keys and values stay in the autograd graph), the cache is repeated n
    times and the rest runs on top of it at positions P..P+C-1; token 0 after the prefix is predicted from the
    prefix's last hidden state, token j from position j - 1. Gradients reach the prefix's activations from every
    row, summed: n rows cost P + n C tokens of compute instead of n (P + C). Needs a model whose forward fills a
    `DynamicCache` (no gradient checkpointing).
    """
    from transformers.cache_utils import DynamicCache

    if prefix_ids.dim() != 2 or prefix_ids.shape[0] != 1 or prefix_ids.shape[1] < 1:
        raise ValueError("prefix_ids must be [1, P] with P >= 1")
    if not input_ids.shape == attention_mask.shape == completion_mask.shape:
        raise ValueError("input_ids, attention_mask and completion_mask must share one [n, C] shape")
    body, head = split_body_head(model)
    n, c = input_ids.shape
    p = prefix_ids.shape[1]
    device = input_ids.device
    cache = DynamicCache(config=getattr(body, "config", None))
    # transformers 5 names the argument `cache` (`past_key_values` is its deprecated alias), 4.x `past_key_values`
    kw = "cache" if "cache" in inspect.signature(body.forward).parameters else "past_key_values"
    h_prefix = body(input_ids=prefix_ids, attention_mask=torch.ones_like(prefix_ids),
                    position_ids=torch.arange(p, device=device)[None], use_cache=True,
                    **{kw: cache}).last_hidden_state  # [1, P, H]
    if cache.get_seq_length() != p:
        raise RuntimeError("the model's forward did not fill the KV cache (gradient checkpointing on?)")
    cache.batch_repeat_interleave(n)  # [n, kv, P, d] per layer, differentiable
    full_mask = torch.cat([torch.ones(n, p, dtype=torch.long, device=device), attention_mask.long()], 1)  # [n, P+C]
    position_ids = (p + torch.arange(c, device=device))[None].expand(n, c)  # [n, C]
    h_rest = body(input_ids=input_ids, attention_mask=full_mask, position_ids=position_ids,
                  use_cache=True, **{kw: cache}).last_hidden_state  # [n, C, H]
    before = torch.cat([h_prefix[:, p - 1 :].expand(n, 1, -1), h_rest[:, :-1]], 1)  # [n, C, H]: state before token j
    rows, cols = completion_mask.bool().nonzero(as_tuple=True)  # [K], [K]
    return _head_logprobs(head, before[rows, cols], input_ids, rows, cols, temperature, chunk_size,
                          with_entropy, entropy_grad)


def _head_logprobs(head: torch.nn.Module, h: Tensor, ids: Tensor, rows: Tensor, cols: Tensor, temperature: float,
                   chunk_size: int, with_entropy: bool, entropy_grad: bool = True) -> tuple[Tensor, Tensor | None]:
    """Log-probs (and entropies) of the tokens ids[rows, cols] from the hidden rows h [K, H] that predict them,
    `chunk_size` rows of [chunk_size, V] logits at a time -> [N, T] tensors (zeros elsewhere)."""
    targets = ids[rows, cols]  # [K]
    recompute = torch.is_grad_enabled() and h.requires_grad
    out_lp: list[Tensor] = []
    out_ent: list[Tensor] = []
    for s in range(0, h.shape[0], chunk_size):
        args = (head, h[s : s + chunk_size], targets[s : s + chunk_size], temperature, with_entropy, entropy_grad)
        lp, ent = checkpoint(_head_chunk, *args, use_reentrant=False) if recompute else _head_chunk(*args)
        out_lp.append(lp)  # [k]
        if ent is not None:
            out_ent.append(ent)

    def scatter(parts: list[Tensor]) -> Tensor:
        """[K] values -> [N, T] zeros with them at (rows, cols)."""
        full = torch.zeros(ids.shape, dtype=torch.float32, device=h.device)
        if not parts:
            return full
        return full.index_put((rows, cols), torch.cat(parts))

    return scatter(out_lp), scatter(out_ent) if with_entropy else None
