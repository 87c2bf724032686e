"""GRPO math, pure: group advantages and the clipped surrogate loss with optional KL and entropy terms.
Tensors and numbers in, (loss, stats) out; no model, config, I/O or logging."""
from __future__ import annotations

import torch
from torch import Tensor


def group_advantages(rewards: Tensor, scale: str = "group", eps: float = 1e-4) -> Tensor:
    """Advantages [B, G] from rewards [B, G]: r - mean(group), divided by (std + eps) per group ("group"), by
    the whole batch's std ("batch"), or not at all ("none"). std is the unbiased sample std (torch default, as
    TRL); a constant group gives exact zeros."""
    centred = rewards - rewards.mean(dim=1, keepdim=True)  # [B, G]
    if scale == "group":
        return centred / (rewards.std(dim=1, keepdim=True) + eps)
    if scale == "batch":
        return centred / (rewards.std() + eps)
    if scale == "none":
        return centred
    raise ValueError(f"scale must be group | batch | none, got {scale!r}")


def zero_std_groups(rewards: Tensor) -> Tensor:
    """[B] bool: groups whose G rewards are all equal (no learning signal)."""
    return (rewards == rewards[:, :1]).all(dim=1)


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    adv: Tensor,
    mask: Tensor,
    *,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    loss_type: str = "grpo",
    max_completion_length: int | None = None,
    ref_logp: Tensor | None = None,
    beta: float = 0.0,
    entropy: Tensor | None = None,
    entropy_coef: float = 0.0,
    num_sequences_total: int | None = None,
    num_tokens_total: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped PPO surrogate over completion tokens -> (scalar loss, detached stats).

    logp, old_logp, ref_logp, entropy, mask: [N, T] (mask 1 on completion tokens); adv: [N], broadcast over the
    tokens of its sequence. Per token: -min(r A, clip(r, 1 - eps, 1 + eps_high) A) + beta k3 - entropy_coef H,
    with r = exp(logp - old_logp) and k3 = exp(ref - logp) - (ref - logp) - 1.
    Aggregation (`loss_type`):
      grpo    - mean over each sequence's tokens, then mean over sequences (DeepSeek);
      dapo    - sum over all tokens / number of tokens (token-level mean);
      dr_grpo - sum over all tokens / (number of sequences * max_completion_length).
    Gradient accumulation: pass the whole optimizer step's num_sequences_total (grpo, dr_grpo) or
    num_tokens_total (dapo); each micro-batch is then normalised by the global count, so the sum of micro-batch
    losses (and gradients) equals the big batch's exactly.
    """
    maskb = mask.bool()
    maskf = maskb.to(logp.dtype)
    eps_high = epsilon if epsilon_high is None else epsilon_high
    delta = torch.where(maskb, logp - old_logp, torch.zeros_like(logp))  # [N, T]; 0 on masked tokens
    ratio = torch.exp(delta)
    a = adv.to(logp.dtype).unsqueeze(1)  # [N, 1]
    unclipped = ratio * a
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + eps_high) * a
    per_token = -torch.min(unclipped, clipped)  # [N, T]
    kl = None
    if ref_logp is not None and beta > 0:
        d = torch.where(maskb, ref_logp - logp, torch.zeros_like(logp))
        kl = torch.exp(d) - d - 1
        per_token = per_token + beta * kl
    if entropy is not None and entropy_coef > 0:
        per_token = per_token - entropy_coef * torch.where(maskb, entropy, torch.zeros_like(entropy))
    per_token = torch.where(maskb, per_token, torch.zeros_like(per_token))

    n_seq = num_sequences_total if num_sequences_total is not None else logp.shape[0]
    if loss_type == "grpo":
        seq_len = maskf.sum(dim=1).clamp(min=1)  # [N]
        loss = (per_token.sum(dim=1) / seq_len).sum() / n_seq
    elif loss_type == "dapo":
        n_tok = num_tokens_total if num_tokens_total is not None else maskf.sum()
        loss = per_token.sum() / max(float(n_tok), 1.0)
    elif loss_type == "dr_grpo":
        if not max_completion_length:
            raise ValueError("dr_grpo needs max_completion_length")
        loss = per_token.sum() / (n_seq * max_completion_length)
    else:
        raise ValueError(f"loss_type must be grpo | dapo | dr_grpo, got {loss_type!r}")

    with torch.no_grad():
        n = maskf.sum().clamp(min=1)
        low = (ratio < 1 - epsilon) & (a < 0) & maskb  # clipped from below (negative advantage)
        high = (ratio > 1 + eps_high) & (a > 0) & maskb  # clipped from above (positive advantage)
        stats = {
            "loss/policy": (torch.where(maskb, -torch.min(unclipped, clipped), torch.zeros_like(ratio)).sum() / n),
            "loss/kl": (kl.sum() / n) if kl is not None else torch.zeros(()),
            "loss/entropy": (torch.where(maskb, entropy, torch.zeros_like(entropy)).sum() / n)
            if entropy is not None else torch.zeros(()),
            "clip/frac_low": low.sum() / n,
            "clip/frac_high": high.sum() / n,
            "clip/frac": (low | high).sum() / n,
            "ratio/mean": ratio[maskb].mean() if maskb.any() else torch.ones(()),
            "ratio/min": ratio[maskb].min() if maskb.any() else torch.ones(()),
            "ratio/max": ratio[maskb].max() if maskb.any() else torch.ones(()),
        }
    return loss, {k: v.detach() for k, v in stats.items()}
