"""Golden values of the GRPO math, computed by hand in plain Python."""
import math

import pytest
import torch

from smolthink.grpo import group_advantages, policy_loss, zero_std_groups


def test_advantages_constant_group_is_zero_no_nan():
    r = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 1.0, 0.0, 1.0]])
    adv = group_advantages(r)
    assert torch.equal(adv[0], torch.zeros(4)) and not torch.isnan(adv).any()
    std = math.sqrt(sum((x - 0.5) ** 2 for x in [0, 1, 0, 1]) / 3)  # unbiased
    assert adv[1].tolist() == pytest.approx([-0.5 / (std + 1e-4), 0.5 / (std + 1e-4)] * 2, rel=1e-6)
    assert zero_std_groups(r).tolist() == [True, False]


def test_advantage_scaling_variants():
    r = torch.tensor([[0.0, 2.0], [1.0, 1.0]])
    assert group_advantages(r, "none").tolist() == [[-1.0, 1.0], [0.0, 0.0]]
    batch_std = torch.tensor([0.0, 2.0, 1.0, 1.0]).std().item()
    assert group_advantages(r, "batch")[0, 1].item() == pytest.approx(1.0 / (batch_std + 1e-4), rel=1e-6)


# two sequences, T = 3; seq 0 has 2 completion tokens, seq 1 has 1
LOGP = [[0.0, -1.0, -2.0], [0.0, -0.5, 0.0]]
OLD = [[0.0, -1.1, -1.5], [0.0, -0.5, 0.0]]
MASK = [[0, 1, 1], [0, 1, 0]]
ADV = [1.0, -2.0]


def hand_token_losses(eps=0.2, eps_high=0.2):
    out = []
    for i in range(2):
        row = []
        for t in range(3):
            if not MASK[i][t]:
                row.append(0.0)
                continue
            r = math.exp(LOGP[i][t] - OLD[i][t])
            a = ADV[i]
            row.append(-min(r * a, min(max(r, 1 - eps), 1 + eps_high) * a))
        out.append(row)
    return out


def tensors():
    return (torch.tensor(LOGP, requires_grad=True), torch.tensor(OLD), torch.tensor(ADV), torch.tensor(MASK))


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_loss_golden_values(loss_type):
    tl = hand_token_losses()
    if loss_type == "grpo":
        want = ((tl[0][1] + tl[0][2]) / 2 + tl[1][1] / 1) / 2
    elif loss_type == "dapo":
        want = (tl[0][1] + tl[0][2] + tl[1][1]) / 3
    else:
        want = (tl[0][1] + tl[0][2] + tl[1][1]) / (2 * 5)
    logp, old, adv, mask = tensors()
    loss, stats = policy_loss(logp, old, adv, mask, loss_type=loss_type, max_completion_length=5)
    assert loss.item() == pytest.approx(want, rel=1e-6)


def test_clipping_both_sides_zeroes_gradient():
    # token 0: A > 0 and ratio 1.5 > 1.2 -> clipped, no gradient; token 1: A < 0 and ratio 0.5 < 0.8 -> clipped;
    # token 2: A > 0 and ratio 1.1 -> inside, gradient -A * ratio / n
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1]])).requires_grad_(True)
    old = torch.zeros(1, 3)
    for adv, t_clip in ((1.0, 0), (-1.0, 1)):
        lp = logp.detach().clone().requires_grad_(True)
        loss, stats = policy_loss(lp, old, torch.tensor([adv]), torch.ones(1, 3), loss_type="dapo")
        loss.backward()
        assert lp.grad[0, t_clip].item() == 0.0
    lp = logp.detach().clone().requires_grad_(True)
    loss, stats = policy_loss(lp, old, torch.tensor([1.0]), torch.ones(1, 3), loss_type="dapo")
    loss.backward()
    assert lp.grad[0, 2].item() == pytest.approx(-1.1 / 3, rel=1e-5)
    assert lp.grad[0, 1].item() == pytest.approx(-0.5 / 3, rel=1e-5)  # A > 0, ratio < 1: unclipped side
    assert stats["clip/frac_high"].item() == pytest.approx(1 / 3)


def test_epsilon_high_is_asymmetric():
    logp = torch.log(torch.tensor([[1.25]]))
    old = torch.zeros(1, 1)
    sym, _ = policy_loss(logp, old, torch.tensor([1.0]), torch.ones(1, 1), epsilon=0.2, loss_type="dapo")
    high, _ = policy_loss(logp, old, torch.tensor([1.0]), torch.ones(1, 1), epsilon=0.2, epsilon_high=0.28,
                          loss_type="dapo")
    assert sym.item() == pytest.approx(-1.2) and high.item() == pytest.approx(-1.25)


def test_ratio_one_and_kl_zero_when_on_policy():
    logp = torch.tensor([[-1.0, -2.0, -0.3]])
    loss, stats = policy_loss(logp, logp.clone(), torch.tensor([0.7]), torch.ones(1, 3), ref_logp=logp.clone(),
                              beta=0.1, loss_type="grpo")
    assert stats["ratio/mean"].item() == 1.0 and stats["loss/kl"].item() == 0.0
    assert stats["clip/frac"].item() == 0.0
    assert loss.item() == pytest.approx(-0.7)


def test_kl_k3_value():
    logp = torch.tensor([[-1.0]])
    ref = torch.tensor([[-1.5]])
    loss, stats = policy_loss(logp, logp.clone(), torch.tensor([0.0]), torch.ones(1, 1), ref_logp=ref, beta=0.5,
                              loss_type="dapo")
    k3 = math.exp(-0.5) - (-0.5) - 1
    assert stats["loss/kl"].item() == pytest.approx(k3, rel=1e-6)
    assert loss.item() == pytest.approx(0.5 * k3, rel=1e-6)


def test_masked_tokens_contribute_nothing_even_if_garbage():
    logp = torch.tensor([[-1.0, float("-inf")]], requires_grad=True)
    old = torch.tensor([[-1.0, 5.0]])
    loss, _ = policy_loss(logp, old, torch.tensor([1.0]), torch.tensor([[1, 0]]), loss_type="grpo")
    loss.backward()
    assert torch.isfinite(loss) and loss.item() == pytest.approx(-1.0)
    assert logp.grad[0, 1].item() == 0.0


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_gradient_accumulation_equals_big_batch(loss_type):
    torch.manual_seed(0)
    n, t = 6, 5
    w = torch.randn(n, t, requires_grad=True)  # stands in for the model: logp = f(w)
    old = torch.randn(n, t) * 0.1 - 1
    adv = torch.randn(n)
    lengths = [5, 2, 4, 1, 3, 5]
    mask = torch.tensor([[1 if j < L else 0 for j in range(t)] for L in lengths])
    logp = lambda rows: torch.nn.functional.logsigmoid(w[rows])
    kw = dict(loss_type=loss_type, max_completion_length=t)
    big, _ = policy_loss(logp(slice(None)), old, adv, mask, **kw)
    g_big, = torch.autograd.grad(big, w)
    total = torch.zeros_like(w)
    for rows in ([0, 1], [2, 3, 4], [5]):
        loss, _ = policy_loss(logp(rows), old[rows], adv[rows], mask[rows], num_sequences_total=n,
                              num_tokens_total=int(mask.sum()), **kw)
        total += torch.autograd.grad(loss, w)[0]
    assert torch.allclose(total, g_big, atol=1e-6)
