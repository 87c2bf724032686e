"""Training numerics by device (`precision`): CUDA takes bf16 autocast with fp32 master weights, the CPU keeps the
oneDNN layers exactly; the config's bf16 conditions apply on CPU only. The device is an argument, so the CUDA
choice is tested here without a GPU; autocast's effect on the log-prob path is tested through CPU autocast."""
import pytest
import torch

from smolthink import precision
from smolthink.config import GRPOConfig, build_config
from smolthink.errors import SmolthinkError
from smolthink.logprobs import token_logprobs
from smolthink.onednn import OneDNNLinears, onednn_available
from smolthink.precision import Autocast, precision_problem, resolve_precision, training_numerics
from test_onednn import batch, lora_tiny

CPU_BF16 = "precision=bf16 needs onednn_linears=true and use_lora=true"


@pytest.fixture()
def gpu_bf16(monkeypatch):
    """A CUDA device that has native bf16 (set per test: `gpu_bf16(False)` for an older GPU)."""
    def set_supported(ok: bool = True):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: ok)
    set_supported()
    return set_supported


@pytest.mark.parametrize("prec", ["fp32", "bf16"])
def test_cuda_takes_autocast_and_leaves_the_model_alone(gpu_bf16, prec):
    model = lora_tiny()
    numerics = training_numerics(model, torch.device("cuda"), onednn_linears=True, precision=prec, use_lora=True)
    assert isinstance(numerics, Autocast)
    assert (numerics.device_type, numerics.enabled) == ("cuda", prec == "bf16")
    with numerics.active():  # no layer is patched: the forwards stay peft's / nn.Linear's
        assert not any("forward" in vars(m) for m in model.modules())
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights


def test_cuda_bf16_is_refused_on_a_gpu_without_it(gpu_bf16):
    gpu_bf16(False)
    with pytest.raises(SmolthinkError, match="needs a GPU with bf16 support"):
        training_numerics(lora_tiny(), torch.device("cuda"), True, "bf16", True)
    assert not training_numerics(lora_tiny(), torch.device("cuda"), True, "fp32", True).enabled


@pytest.mark.skipif(not onednn_available(), reason="oneDNN linear not available here")
@pytest.mark.parametrize("enabled", [True, False])
def test_cpu_keeps_the_onednn_layers(enabled):
    model = lora_tiny()
    numerics = training_numerics(model, torch.device("cpu"), onednn_linears=enabled, precision="fp32",
                                 use_lora=True)
    assert isinstance(numerics, OneDNNLinears)
    assert len(numerics) == len(OneDNNLinears(model, enabled, "fp32")) and (len(numerics) > 0) == enabled


@pytest.mark.parametrize("prec,onednn,lora,device,problem", [
    ("bf16", False, True, "cpu", CPU_BF16),
    ("bf16", True, False, "cpu", CPU_BF16),
    ("bf16", True, True, "cpu", None),
    ("fp32", False, False, "cpu", None),
    ("bf16", False, False, "cuda", None),
    ("bf16", True, True, "cuda", None),
])
def test_precision_problem_applies_to_cpu_bf16_only(prec, onednn, lora, device, problem):
    got = precision_problem(prec, onednn, lora, device)
    assert got == problem if problem is None else got.startswith(problem)


def test_config_checks_bf16_against_the_training_device(monkeypatch):
    sets = {"precision": "bf16", "use_lora": False, "onednn_linears": False}
    monkeypatch.setattr(precision, "training_device", lambda: "cpu")
    with pytest.raises(SmolthinkError, match=CPU_BF16):
        build_config(GRPOConfig, [sets])
    monkeypatch.setattr(precision, "training_device", lambda: "cuda")
    assert build_config(GRPOConfig, [sets]).precision == "bf16"


def logp_and_grads(model, numerics, data, grad: bool = True):
    """Per-token log-probs [N, T] and the trainable gradients (flattened) under `numerics`."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    with numerics.active(), torch.set_grad_enabled(grad):
        logp, _ = token_logprobs(model, *data, chunk_size=7)
        if grad:
            (logp * data[2]).sum().backward()
    return logp.detach(), torch.cat([p.grad.flatten() for p in params]) if grad else None


def test_autocast_keeps_log_probs_gradients_and_weights_fp32_and_the_ratio_exact():
    """What autocast does to the log-prob path, on CPU autocast (the same mechanism as CUDA's): bf16 ran (log-probs
    move by bf16 rounding, under 2e-2 nats), but log-probs, gradients and weights are fp32; no_grad and training
    forwards give the same bits (an on-policy ratio of exactly 1); disabled, it is plain fp32."""
    model = lora_tiny(seed=1)
    data = batch(1)
    lp32, g32 = logp_and_grads(model, Autocast("cpu", False), data)
    lp16, g16 = logp_and_grads(model, Autocast("cpu", True), data)
    assert lp16.dtype == g16.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert 0 < float((lp16 - lp32).abs().max()) < 2e-2
    assert float(torch.nn.functional.cosine_similarity(g16, g32, dim=0)) > 0.99
    assert torch.equal(logp_and_grads(model, Autocast("cpu", True), data, grad=False)[0], lp16)
    assert torch.equal(logp_and_grads(model, Autocast("cpu", False), data, grad=False)[0], lp32)


@pytest.mark.parametrize("onednn,lora,native,want", [
    (True, True, True, "bf16"), (False, True, True, "fp32"), (True, False, True, "fp32"), (True, True, False, "fp32"),
])
def test_auto_is_bf16_on_a_cpu_only_where_it_is_native(monkeypatch, onednn, lora, native, want):
    monkeypatch.setattr(precision, "bf16_available", lambda: native)
    assert resolve_precision("auto", onednn, lora, "cpu") == want
    assert resolve_precision("fp32", onednn, lora, "cpu") == "fp32"  # an explicit choice is kept
    assert resolve_precision("bf16", onednn, lora, "cpu") == "bf16"


@pytest.mark.parametrize("supported", [True, False])
def test_auto_on_cuda_follows_the_gpu(gpu_bf16, supported):
    gpu_bf16(supported)
    assert resolve_precision("auto", True, True, "cuda") == ("bf16" if supported else "fp32")


def test_auto_is_the_default():
    cfg = build_config(GRPOConfig, [{}])
    assert cfg.precision == "auto"
