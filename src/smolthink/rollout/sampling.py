"""Next-token sampling for the fast engine: temperature, top-k and exact top-p on logits, then one token per row by
inverse CDF from caller-supplied uniforms (so the caller owns the RNG and the same uniforms give the same tokens);
the sampled tokens' log-probabilities.

Pure tensor functions: no model, no state.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..types import SamplingParams


def top_p_filter(probs: torch.Tensor, top_p: float, k0: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Nucleus (top-p) cut of each row of `probs` [B, V] without sorting the whole vocabulary.

    Returns (sorted_probs [B, k], token_ids [B, k]) in descending order with the dropped tail set to 0; k may
    exceed the kept count. A token is kept iff the mass of the tokens ranked before it is < top_p (the smallest
    prefix of the descending order whose mass reaches top_p; the first token is always kept) - the same rule as
    a full descending sort. Exactness: the top-k values are the first k entries of the full sort, so the running
    sums agree; the first token outside the top-k has exactly the top-k mass before it, and it and every later
    token are dropped iff that mass is >= top_p. Rows where it is not are widened (at least k x 4, and at least the
    count the missing mass needs at the k-th probability; at most V) and redone.
    """
    V = probs.shape[1]
    k = min(max(1, k0), V)
    vals, idx = probs.topk(k, dim=-1)  # sorted, descending
    cum = vals.cumsum(-1)
    out = vals * _keep_from_cum(cum, top_p)
    if k < V:
        short = cum[:, -1] < top_p  # the nucleus may extend past the top-k: widen those rows
        if bool(short.any()):
            rows = short.nonzero().squeeze(1)
            # every token outside the top-k has probability <= the k-th largest, so the nucleus needs at least
            # deficit / p_k more tokens: a lower bound that skips hopeless sizes on flat distributions
            need = ((top_p - cum[rows, -1]) / vals[rows, -1].clamp_min(1e-30)).max().item()
            wide_vals, wide_idx = top_p_filter(probs[rows], top_p, k0=int(min(V, max(4 * k, k + need + 1))))
            extra = wide_vals.shape[1] - k
            out, idx = F.pad(out, (0, extra)), F.pad(idx, (0, extra))  # zero probability: dropped
            out[rows], idx[rows] = wide_vals, wide_idx
    return out, idx


def sample_tokens(logits: torch.Tensor, sampling: SamplingParams, u: torch.Tensor,
                  k0: int = 64) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One token per row of `logits` [B, V] (fp32): greedy when temperature <= 0, else temperature -> top-k (if
    > 0) -> top-p (if < 1), sampled by inverse CDF with the uniforms `u` [B] (float64 in [0, 1)). `k0` is the
    top-k pre-cut `top_p_filter` starts from. Returns (token ids [B], their log-probs [B] under
    softmax(logits / temperature) before the top-k / top-p cut, as the trainer scores them; None when greedy).
    The log-probs come from the full softmax the top-p path computes anyway (log of an fp32 probability: ~1e-7
    from log_softmax); the top-k path, which softmaxes k values only, pays one logsumexp."""
    if sampling.temperature <= 0:
        return logits.argmax(-1), None
    scores = logits / sampling.temperature
    top_k, top_p = int(sampling.top_k or 0), float(sampling.top_p if sampling.top_p is not None else 1.0)
    full = None  # softmax(scores) [B, V] when computed
    if top_k > 0 and top_k < scores.shape[1]:
        top_vals, cand = scores.topk(top_k, dim=-1)
        probs = torch.softmax(top_vals, -1)
        if top_p < 1.0:
            probs = probs * _nucleus_mask_sorted(probs, top_p)
    elif top_p < 1.0:
        full = torch.softmax(scores, -1)
        probs, cand = top_p_filter(full, top_p, k0)
    else:
        full = probs = torch.softmax(scores, -1)
        cand = None
    cdf = probs.cumsum(-1, dtype=torch.float64)
    target = u.to(torch.float64) * cdf[:, -1]
    pick = torch.searchsorted(cdf, target.unsqueeze(1), right=True).squeeze(1)
    # u * total may round up to total: then take the row's last positive-probability entry
    over = pick >= probs.shape[1]
    if bool(over.any()):
        pick[over] = (probs[over] > 0).cumsum(-1).argmax(-1)
    tok = pick if cand is None else cand.gather(1, pick.unsqueeze(1)).squeeze(1)  # [B]
    if full is not None:
        return tok, full.gather(1, tok[:, None]).squeeze(1).log()
    return tok, scores.gather(1, tok[:, None]).squeeze(1) - torch.logsumexp(scores, -1)


def _keep_from_cum(cum: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep mask from the running sums of descending probabilities: the mass ranked before a token is < top_p."""
    before = torch.cat([torch.zeros_like(cum[:, :1]), cum[:, :-1]], dim=1)
    keep = before < top_p
    keep[:, 0] = True
    return keep


def _nucleus_mask_sorted(sorted_probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep mask for probabilities already sorted in descending order (same rule as `top_p_filter`)."""
    return _keep_from_cum(sorted_probs.cumsum(-1), top_p)
