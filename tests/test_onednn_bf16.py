"""bf16 training GEMMs (`precision: bf16`): gradients close to fp32 within bf16 rounding, deterministic log-probs
(an on-policy ratio of exactly 1), and SFT / GRPO runs that follow their fp32 curves.

The tolerance. bf16 keeps 8 significant bits, so rounding an input costs up to 2^-9 relative. A K-term dot
product of rounded x and W carries K independent errors of random sign: their sum grows like sqrt(K) 2^-8
times a typical term, i.e. about 2^-8 of the result when the terms do not cancel; rounding the output adds
2^-9 more. A LoRA gradient is a product of forward activations and backward gradients that each passed
through a chain of such GEMMs, and independent errors add in quadrature: on the tiny model (2 layers) a
gradient sees about n = 2 x (2 layers x 3 GEMMs on the path + the head) = 14 of them, so we expect a relative
error of sqrt(14) 2^-8 = 1.5% on the whole gradient and allow twice that, 3% (cosine > 1 - 0.03^2 / 2). A real
bug (a stale merged weight, a lost scale, a wrong transpose) is off by tens of percent. The lower bound
(> 2^-12) shows bf16 really ran: fp32 differs from itself only by ~1e-6.
"""
import json

import pytest
import torch

from smolthink.config import SFTConfig, build_config
from smolthink.errors import SmolthinkError
from smolthink.logprobs import token_logprobs
from smolthink.onednn import OneDNNLinears, bf16_available
from test_onednn import batch, lora_tiny

pytestmark = pytest.mark.skipif(not bf16_available(), reason="no native bf16 GEMMs in oneDNN here")

GRAD_RTOL = 0.03


def grads(model, precision: str, data) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token log-probs [N, T], all trainable gradients flattened, float64) under one precision."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    with OneDNNLinears(model, precision=precision).active():
        logp, _ = token_logprobs(model, *data, chunk_size=7)
        (logp * data[2]).sum().backward()
    return logp.detach(), torch.cat([p.grad.flatten() for p in params]).double()


def test_bf16_gradients_match_fp32_within_rounding_across_optimizer_steps():
    model = lora_tiny(seed=3)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    data = batch(3)
    for _ in range(3):  # the bf16 merged weights must follow every step
        lp32, g32 = grads(model, "fp32", data)
        lp16, g16 = grads(model, "bf16", data)
        rel = float((g16 - g32).norm() / g32.norm())
        assert 2**-12 < rel < GRAD_RTOL, rel
        assert float(torch.nn.functional.cosine_similarity(g16, g32, dim=0)) > 1 - GRAD_RTOL**2 / 2
        assert abs(float(g16.norm() / g32.norm()) - 1) < GRAD_RTOL
        assert 0 < float((lp16 - lp32).abs().max()) < 2e-2  # log-probs ~2.5 nats: under 1% apart
        for p, g in zip([p for p in model.parameters() if p.requires_grad], g32.split(
                [p.numel() for p in model.parameters() if p.requires_grad])):
            p.grad = g.view_as(p).float()
        opt.step()  # both precisions see the same (fp32-driven) parameters next round


def test_bf16_log_probs_are_deterministic_with_and_without_grad():
    """Old log-probs (no_grad) and the training forward give the same bits: an on-policy ratio of exactly 1."""
    model = lora_tiny(seed=1)
    layers = OneDNNLinears(model, precision="bf16")
    data = batch(1)
    with layers.active():
        with torch.no_grad():
            old, _ = token_logprobs(model, *data)
        new, _ = token_logprobs(model, *data)
        again, _ = token_logprobs(model, *data)
    assert old.dtype == torch.float32  # the head's bf16 logits reach the log-softmax as fp32
    assert torch.equal(old, new.detach()) and torch.equal(new, again)
    assert torch.exp(new - old)[data[2].bool()].eq(1).all()
    with torch.no_grad():
        fp32, _ = token_logprobs(model, *data)
    assert not torch.equal(old, fp32)  # the bf16 GEMMs ran


def test_bf16_holds_half_size_weights_only_inside_active():
    model = lora_tiny()
    layers = OneDNNLinears(model, precision="bf16")
    with layers.active():
        token_logprobs(model, *batch())
        held = [p.merged if hasattr(p, "merged") else p.weight for p in layers.layers]
        assert all(w is not None and w.dtype == torch.bfloat16 for w in held)
    assert all(getattr(p, "merged", None) is None and getattr(p, "weight", None) is None for p in layers.layers)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32


def test_bf16_refused_where_onednn_cannot_run_it(monkeypatch):
    from smolthink import onednn

    monkeypatch.setattr(onednn, "bf16_available", lambda: False)
    with pytest.raises(SmolthinkError, match="precision=bf16 needs oneDNN"):
        OneDNNLinears(lora_tiny(), precision="bf16")
    assert len(OneDNNLinears(lora_tiny(), precision="fp32")) > 0


def _sft_losses(tiny_dir, traces, out, precision):
    """The per-step SFT losses of a short LoRA run on the 8 traces."""
    from smolthink.train_sft import train_sft

    cfg = build_config(SFTConfig, [{"model": str(tiny_dir), "threads": 2, "eval.n": 0, "minibatch_size": 4,
                                    "warmup_steps": 1, "max_steps": 6, "learning_rate": 3e-3,
                                    "lr_scheduler_type": "constant", "data.path": str(traces),
                                    "precision": precision}])
    train_sft(cfg, out)
    return [json.loads(line)["loss/sft"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_sft_bf16_follows_the_fp32_loss_curve(tmp_path, tiny_dir, traces):
    fp32 = _sft_losses(tiny_dir, traces, tmp_path / "a", "fp32")
    bf16 = _sft_losses(tiny_dir, traces, tmp_path / "b", "bf16")
    drop = fp32[0] - fp32[-1]
    assert len(fp32) == len(bf16) == 6 and drop > 0.1  # it learns, so the curve has a shape to follow
    for a, b in zip(fp32, bf16):  # a tenth of the curve's drop (measured: ~1e-4 nats apart)
        assert abs(a - b) < 0.1 * drop, (fp32, bf16)


def test_grpo_bf16_follows_fp32_with_an_exact_on_policy_ratio(tmp_path, tiny_dir):
    """Rollouts are fp32 (the HF engine) and the first fill is the same, so the two runs differ only by the
    training GEMMs: the gradient norms within the gradient tolerance, the same rewards, and a ratio of exactly
    1 on-policy; with two passes over each buffer the separate old-log-prob pass matches training too, and the
    reference pass (adapter disabled: its LoRA layers run peft's fp32 forward, the head bf16) stays close."""
    from test_train_grpo import TOY, metrics, run

    common = ["max_steps=3", "eval_n=0", "learning_rate=1e-3", *TOY]
    run(tmp_path / "fp32", tiny_dir, *common)
    run(tmp_path / "bf16", tiny_dir, *common, "precision=bf16")
    run(tmp_path / "off", tiny_dir, *common, "precision=bf16", "num_iterations=2", "beta=0.04")
    fp32, bf16, off = metrics(tmp_path / "fp32"), metrics(tmp_path / "bf16"), metrics(tmp_path / "off")
    assert len(fp32) == len(bf16) == 3
    for a, b in zip(fp32, bf16):
        assert b["ratio/mean"] == 1.0 and b["clip/frac"] == 0.0
        assert abs(b["grad_norm"] / a["grad_norm"] - 1) < GRAD_RTOL, (a, b)
        assert a["grad_norm"] != b["grad_norm"]  # the bf16 GEMMs ran
        assert abs(a["reward/mean"] - b["reward/mean"]) < 1e-3 and abs(a["loss/total"] - b["loss/total"]) < 1e-3
    assert abs(off[0]["ratio/mean"] - 1.0) < 1e-5 and off[0]["clip/frac"] == 0.0
    assert 0 <= off[0]["loss/kl"] < 1e-3  # LoRA B starts at 0: the reference is the policy up to rounding
