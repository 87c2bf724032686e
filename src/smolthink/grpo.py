"""GRPO math, pure: group advantages and the clipped surrogate loss with optional KL and entropy terms.
Tensors and numbers in, (loss, stats) out; no model, config, I/O or logging.

Shapes: B questions, G samples per question; N sequences, T padded token positions."""
from __future__ import annotations

import torch
from torch import Tensor

# Numerical guard: log-ratios (policy/old and ref/policy) are clamped to [-MAX_LOG_RATIO, MAX_LOG_RATIO] before
# exp, so a wildly off-policy token gives a large finite loss and zero gradient instead of inf/NaN. Inactive for
# any sane update (|log-ratio| <= 20 means a ratio within [2e-9, 5e8]).
MAX_LOG_RATIO = 20.0

SCALES = ("group", "batch", "none")
LOSS_TYPES = ("grpo", "dapo", "dr_grpo")


def zero_std_groups(rewards: Tensor) -> Tensor:
    """[B] bool from rewards [B, G]: groups whose G rewards are all exactly equal (no learning signal)."""
    return (rewards == rewards[:, :1]).all(dim=1)


def group_advantages(rewards: Tensor, scale: str = "group", eps: float = 1e-4) -> Tensor:
    """Advantages [B, G] from rewards [B, G] (one row per question, G samples each).

    A = r - mean(group), then divided by
      "group": (std of the group + eps)        - GRPO / DeepSeekMath;
      "batch": (std of all B*G rewards + eps)  - one scale for the whole batch;
      "none":  nothing                         - Dr. GRPO (no std normalisation).
    std is the unbiased (Bessel, N-1) sample std, i.e. torch.std's default, as TRL computes it; eps (default
    1e-4, TRL's value) keeps near-constant groups from exploding. A group whose rewards are all exactly equal
    gets exact zeros (not the float residue of r - mean, e.g. seven rewards of 0.1), and G == 1 or a single
    reward in the batch gives zeros, never NaN.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [B, G], got shape {tuple(rewards.shape)}")
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    rewards = rewards if rewards.is_floating_point() else rewards.float()
    centred = rewards - rewards.mean(dim=1, keepdim=True)  # [B, G]
    if scale == "group" and rewards.shape[1] > 1:
        centred = centred / (rewards.std(dim=1, keepdim=True) + eps)  # std [B, 1]
    elif scale == "batch" and rewards.numel() > 1:
        centred = centred / (rewards.std() + eps)  # std scalar
    flat = zero_std_groups(rewards).unsqueeze(1)  # [B, 1]
    return torch.where(flat, torch.zeros_like(centred), centred)


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

    logp, old_logp, mask, and optional ref_logp, entropy: [N, T], mask 1 on completion tokens; adv: [N],
    broadcast over the tokens of its sequence. Per token, with r = exp(logp - old_logp) and
    k3 = exp(ref - logp) - (ref - logp) - 1:
        l = -min(r A, clip(r, 1 - epsilon, 1 + epsilon_high) A) + beta k3 - entropy_coef H
    (epsilon_high defaults to epsilon; the KL term needs ref_logp, the entropy term needs entropy).
    Masked tokens contribute exactly 0 to the loss and get exactly 0 gradient, whatever logp, old_logp,
    ref_logp or entropy hold there (inf / NaN included): every masked value is replaced with torch.where before
    any op whose backward could multiply by it.

    Aggregation (`loss_type`), n_seq sequences, n_tok completion tokens:
      grpo    - mean over each sequence's tokens, then sum over sequences / n_seq (DeepSeekMath; a sequence
                with no completion token counts as a sequence with loss 0);
      dapo    - sum over all tokens / n_tok (token-level mean);
      dr_grpo - sum over all tokens / (n_seq * max_completion_length) (constant normaliser).
    Gradient accumulation: when this call sees one micro-batch of an optimizer step, pass the whole step's
    counts: num_sequences_total (used by grpo, dr_grpo) and num_tokens_total (used by dapo). The micro-batch
    loss is then normalised by the global count, so summing the micro-batch losses (and so their gradients)
    gives exactly the big-batch loss (gradient) up to float summation order. Without them the counts are this
    call's own.

    stats (detached scalars, token means over mask unless noted): "loss/policy" (the clipped surrogate alone),
    "loss/kl" (k3; 0 without ref_logp, reported even when beta == 0), "loss/entropy" (0 without entropy),
    "clip/frac_low" (r < 1 - epsilon with A < 0), "clip/frac_high" (r > 1 + epsilon_high with A > 0),
    "clip/frac" (either: tokens whose gradient the clip zeroed), "ratio/mean", "ratio/min", "ratio/max".
    """
    _check_inputs(logp, old_logp, adv, mask, ref_logp, entropy, loss_type, max_completion_length)

    maskb = mask.bool()  # [N, T]
    zeros = torch.zeros_like(logp)  # [N, T]
    eps_low = epsilon
    eps_high = epsilon if epsilon_high is None else epsilon_high

    log_ratio = torch.where(maskb, logp - old_logp.to(logp.dtype), zeros)  # [N, T]; 0 on masked tokens
    ratio = torch.exp(log_ratio.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))  # [N, T]; exactly 1 on masked tokens
    a = adv.to(logp.dtype).unsqueeze(1)  # [N, 1]
    surrogate = -torch.min(ratio * a, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * a)  # [N, T]
    surrogate = torch.where(maskb, surrogate, zeros)
    per_token = surrogate  # [N, T]

    kl = None
    if ref_logp is not None:
        d = torch.where(maskb, ref_logp.to(logp.dtype) - logp, zeros).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
        kl = torch.exp(d) - d - 1  # [N, T]; exactly 0 on masked tokens and where ref == logp
        if beta != 0:
            per_token = per_token + beta * kl
    ent = None
    if entropy is not None:
        ent = torch.where(maskb, entropy.to(logp.dtype), zeros)  # [N, T]
        if entropy_coef != 0:
            per_token = per_token - entropy_coef * ent

    n_seq = logp.shape[0] if num_sequences_total is None else num_sequences_total
    if loss_type == "grpo":
        seq_tokens = maskb.sum(dim=1).clamp(min=1).to(logp.dtype)  # [N]
        loss = (per_token.sum(dim=1) / seq_tokens).sum() / max(n_seq, 1)
    elif loss_type == "dapo":
        n_tok = int(maskb.sum()) if num_tokens_total is None else num_tokens_total
        loss = per_token.sum() / max(n_tok, 1)
    else:  # dr_grpo
        loss = per_token.sum() / (max(n_seq, 1) * max_completion_length)

    stats = _loss_stats(surrogate, ratio, a, maskb, kl, ent, eps_low, eps_high)
    return loss, stats


def _check_inputs(logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor, ref_logp: Tensor | None,
                  entropy: Tensor | None, loss_type: str, max_completion_length: int | None) -> None:
    """Shapes and options of policy_loss, checked before any math."""
    if not (logp.shape == old_logp.shape == mask.shape) or logp.dim() != 2:
        raise ValueError(f"logp, old_logp, mask must share one [N, T] shape, got {tuple(logp.shape)}, "
                         f"{tuple(old_logp.shape)}, {tuple(mask.shape)}")
    if adv.shape != logp.shape[:1]:
        raise ValueError(f"adv must be [N] = [{logp.shape[0]}], got {tuple(adv.shape)}")
    for name, t in (("ref_logp", ref_logp), ("entropy", entropy)):
        if t is not None and t.shape != logp.shape:
            raise ValueError(f"{name} must be {tuple(logp.shape)}, got {tuple(t.shape)}")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if loss_type == "dr_grpo" and not max_completion_length:
        raise ValueError("loss_type dr_grpo needs max_completion_length")


@torch.no_grad()
def _loss_stats(surrogate: Tensor, ratio: Tensor, a: Tensor, maskb: Tensor, kl: Tensor | None, ent: Tensor | None,
                eps_low: float, eps_high: float) -> dict[str, Tensor]:
    """policy_loss's detached stats: token means over the mask of the surrogate, KL, entropy, clip fractions, and
    the ratio's mean / min / max. surrogate, ratio, maskb, kl, ent: [N, T]; a: [N, 1]."""
    n = maskb.sum().clamp(min=1).to(surrogate.dtype)  # scalar token count
    low = (ratio < 1 - eps_low) & (a < 0) & maskb  # [N, T] clipped from below (negative advantage)
    high = (ratio > 1 + eps_high) & (a > 0) & maskb  # [N, T] clipped from above (positive advantage)
    masked_ratio = ratio[maskb]  # [K]
    one = surrogate.new_ones(())
    stats = {
        "loss/policy": surrogate.sum() / n,
        "loss/kl": kl.sum() / n if kl is not None else surrogate.new_zeros(()),
        "loss/entropy": ent.sum() / n if ent is not None else surrogate.new_zeros(()),
        "clip/frac_low": low.sum() / n,
        "clip/frac_high": high.sum() / n,
        "clip/frac": (low | high).sum() / n,
        "ratio/mean": masked_ratio.mean() if masked_ratio.numel() else one,
        "ratio/min": masked_ratio.min() if masked_ratio.numel() else one,
        "ratio/max": masked_ratio.max() if masked_ratio.numel() else one,
    }
    return {k: v.detach() for k, v in stats.items()}
