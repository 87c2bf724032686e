"""GRPO math against golden values computed by hand in plain Python (never by calling the code under test)."""
import math

import pytest
import torch

from smolthink.grpo import group_advantages, policy_loss, zero_std_groups


def py_std(xs, unbiased=True):
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - (1 if unbiased else 0)))


# ---------------------------------------------------------------- advantages


def test_group_advantages_golden_unbiased_std():
    rows = [[0.0, 1.0, 0.0, 1.0], [0.2, 0.9, 0.5, 0.0]]
    adv = group_advantages(torch.tensor(rows))
    for row, got in zip(rows, adv.tolist()):
        m, s = sum(row) / 4, py_std(row)
        assert got == pytest.approx([(x - m) / (s + 1e-4) for x in row], rel=1e-5)
    eps_adv = group_advantages(torch.tensor(rows), eps=0.5)
    m, s = sum(rows[1]) / 4, py_std(rows[1])
    assert eps_adv[1].tolist() == pytest.approx([(x - m) / (s + 0.5) for x in rows[1]], rel=1e-5)


def test_advantage_scaling_variants():
    r = torch.tensor([[0.0, 2.0], [1.0, 4.0]])
    assert group_advantages(r, "none").tolist() == [[-1.0, 1.0], [-1.5, 1.5]]
    bs = py_std([0.0, 2.0, 1.0, 4.0])
    got = group_advantages(r, "batch").flatten().tolist()
    assert got == pytest.approx([x / (bs + 1e-4) for x in (-1, 1, -1.5, 1.5)], rel=1e-5)
    with pytest.raises(ValueError):
        group_advantages(r, "rank")


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_constant_groups_give_exact_zeros_never_nan(scale):
    # 0.1 * 7 and 0.3 * 6 leave a float residue in r - mean; they must still give exact zeros
    r = torch.tensor([[0.1] * 7, [0.3] * 6 + [0.3], [1.0] * 7, [0.0, 1, 0, 0, 0, 0, 1]])
    adv = group_advantages(r, scale)
    assert torch.equal(adv[:3], torch.zeros(3, 7)) and torch.isfinite(adv).all()
    assert (adv[3] != 0).all()
    assert zero_std_groups(r).tolist() == [True, True, True, False]
    single = group_advantages(torch.tensor([[0.7], [0.2]]), scale)  # G == 1: no NaN from the unbiased std
    assert torch.equal(single, torch.zeros(2, 1))
    assert torch.equal(group_advantages(torch.tensor([[3.0]]), scale), torch.zeros(1, 1))


# ---------------------------------------------------------------- loss: golden values

# three sequences, T = 4, position 0 is prompt. Ratios r = exp(logp - old):
#   seq 0 (A = +1):   1.35 (above 1 + eps_high: clipped), 1.25 (inside with eps_high 0.28), 0.9
#   seq 1 (A = -0.5): 0.67 (below 1 - eps: clipped), 1.22 (A < 0 and r high: unclipped), masked garbage
#   seq 2 (A = +2):   0.61 (A > 0 and r low: unclipped), masked, masked
R = [[1.0, 1.35, 1.25, 0.9], [1.0, 0.67, 1.22, 1.0], [1.0, 0.61, 1.0, 1.0]]
OLD = [[0.0, -1.0, -2.0, -0.5], [0.0, -0.3, -0.9, 0.0], [0.0, -1.2, 0.0, 0.0]]
LOGP = [[o + math.log(r) for o, r in zip(orow, rrow)] for orow, rrow in zip(OLD, R)]
LOGP[1][3] = float("nan")  # garbage under the mask
LOGP[2][2] = float("-inf")
REF = [[0.0, -1.1, -1.7, -0.6], [0.0, -0.4, -0.8, 7.0], [0.0, -1.0, 3.0, 0.0]]
ENT = [[0.0, 2.0, 1.5, 0.5], [0.0, 1.0, 3.0, float("inf")], [0.0, 0.25, 9.0, 9.0]]
MASK = [[0, 1, 1, 1], [0, 1, 1, 0], [0, 1, 0, 0]]
ADV = [1.0, -0.5, 2.0]
EPS, EPS_HIGH, BETA, ENT_COEF, L_MAX = 0.2, 0.28, 0.04, 0.01, 5


def hand(loss_type, eps_high=EPS_HIGH, beta=BETA, ent_coef=ENT_COEF):
    """(loss, d loss / d logp [3][4]) by hand."""
    lens = [sum(m) for m in MASK]
    n_seq, n_tok = len(MASK), sum(lens)
    token_loss = [[0.0] * 4 for _ in MASK]
    token_grad = [[0.0] * 4 for _ in MASK]
    for i in range(3):
        a = ADV[i]
        for t in range(4):
            if not MASK[i][t]:
                continue
            r = R[i][t]
            clipped_r = min(max(r, 1 - EPS), 1 + eps_high)
            surr = -min(r * a, clipped_r * a)
            clip_active = clipped_r * a < r * a  # min picks the clipped (constant) branch
            d = REF[i][t] - LOGP[i][t]
            k3 = math.exp(d) - d - 1
            token_loss[i][t] = surr + beta * k3 - ent_coef * ENT[i][t]
            # d surr / d logp = -a r (unclipped branch) or 0; d k3 / d logp = 1 - exp(d)
            token_grad[i][t] = (0.0 if clip_active else -a * r) + beta * (1 - math.exp(d))
    if loss_type == "grpo":
        w = [1 / (lens[i] * n_seq) for i in range(3)]
    elif loss_type == "dapo":
        w = [1 / n_tok] * 3
    else:
        w = [1 / (n_seq * L_MAX)] * 3
    loss = sum(w[i] * sum(token_loss[i]) for i in range(3))
    grad = [[w[i] * g for g in token_grad[i]] for i in range(3)]
    return loss, grad


def run(loss_type, **kw):
    logp = torch.tensor(LOGP, dtype=torch.float64, requires_grad=True)
    args = dict(epsilon=EPS, epsilon_high=EPS_HIGH, loss_type=loss_type, max_completion_length=L_MAX,
                ref_logp=torch.tensor(REF, dtype=torch.float64), beta=BETA,
                entropy=torch.tensor(ENT, dtype=torch.float64), entropy_coef=ENT_COEF)
    args.update(kw)
    loss, stats = policy_loss(logp, torch.tensor(OLD, dtype=torch.float64), torch.tensor(ADV, dtype=torch.float64),
                              torch.tensor(MASK), **args)
    loss.backward()
    return loss, stats, logp.grad


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_loss_and_gradient_golden_values(loss_type):
    want_loss, want_grad = hand(loss_type)
    loss, stats, grad = run(loss_type)
    assert loss.item() == pytest.approx(want_loss, rel=1e-9)
    assert torch.isfinite(grad).all()
    assert grad.tolist() == [pytest.approx(row, rel=1e-9, abs=1e-15) for row in want_grad]
    # masked positions: exactly zero gradient despite nan / -inf logp, 7.0 ref, inf entropy there
    assert grad[1, 3].item() == 0.0 and grad[2, 2].item() == 0.0 and grad[2, 3].item() == 0.0
    assert grad[:, 0].abs().sum().item() == 0.0


def test_plain_surrogate_golden_without_kl_and_entropy():
    for loss_type in ("grpo", "dapo", "dr_grpo"):
        want, _ = hand(loss_type, beta=0.0, ent_coef=0.0)
        loss, _, _ = run(loss_type, ref_logp=None, beta=0.0, entropy=None, entropy_coef=0.0)
        assert loss.item() == pytest.approx(want, rel=1e-9)


def test_stats_golden():
    _, stats, _ = run("dapo")
    n = 6
    masked_r = [R[i][t] for i in range(3) for t in range(4) if MASK[i][t]]
    assert stats["clip/frac_high"].item() == pytest.approx(1 / n)  # seq 0, r = 1.35 > 1.28
    assert stats["clip/frac_low"].item() == pytest.approx(1 / n)  # seq 1, r = 0.67 < 0.8
    assert stats["clip/frac"].item() == pytest.approx(2 / n)
    assert stats["ratio/mean"].item() == pytest.approx(sum(masked_r) / n, rel=1e-9)
    assert stats["ratio/min"].item() == pytest.approx(min(masked_r), rel=1e-9)
    assert stats["ratio/max"].item() == pytest.approx(max(masked_r), rel=1e-9)
    kl = [math.exp(REF[i][t] - LOGP[i][t]) - (REF[i][t] - LOGP[i][t]) - 1
          for i in range(3) for t in range(4) if MASK[i][t]]
    assert stats["loss/kl"].item() == pytest.approx(sum(kl) / n, rel=1e-9)
    assert stats["loss/entropy"].item() == pytest.approx(sum(ENT[i][t] for i in range(3) for t in range(4)
                                                             if MASK[i][t]) / n, rel=1e-9)
    surr = [-min(R[i][t] * ADV[i], min(max(R[i][t], 0.8), 1.28) * ADV[i])
            for i in range(3) for t in range(4) if MASK[i][t]]
    assert stats["loss/policy"].item() == pytest.approx(sum(surr) / n, rel=1e-9)
    assert all(not v.requires_grad for v in stats.values())
    # symmetric epsilon: r = 1.25 with A > 0 is clipped too
    _, sym, _ = run("dapo", epsilon_high=None)
    assert sym["clip/frac_high"].item() == pytest.approx(2 / n)


# ---------------------------------------------------------------- loss: clipping, epsilon_high, on-policy


def test_clipping_both_sides_zeroes_gradient():
    # ratios 1.5, 0.5, 1.1 on one sequence
    old = torch.zeros(1, 3)
    ratios = [1.5, 0.5, 1.1]
    for adv, t_clipped in ((1.0, 0), (-1.0, 1)):  # A > 0 with r > 1.2; A < 0 with r < 0.8
        lp = torch.log(torch.tensor([ratios])).requires_grad_(True)
        loss, stats = policy_loss(lp, old, torch.tensor([adv]), torch.ones(1, 3), loss_type="dapo")
        loss.backward()
        assert lp.grad[0, t_clipped].item() == 0.0
        for t in range(3):
            if t != t_clipped:  # the unclipped side of the min: gradient -A r / n_tok
                assert lp.grad[0, t].item() == pytest.approx(-adv * ratios[t] / 3, rel=1e-5)
        assert stats["clip/frac"].item() == pytest.approx(1 / 3)


def test_epsilon_high_is_asymmetric():
    old, adv, mask = torch.zeros(1, 1), torch.tensor([1.0]), torch.ones(1, 1)
    grads = {}
    for eps_high in (None, 0.28):
        lp = torch.log(torch.tensor([[1.25]])).requires_grad_(True)
        loss, _ = policy_loss(lp, old, adv, mask, epsilon=0.2, epsilon_high=eps_high, loss_type="dapo")
        loss.backward()
        grads[eps_high] = (loss.item(), lp.grad.item())
    assert grads[None] == (pytest.approx(-1.2), 0.0)  # clipped at 1 + 0.2
    assert grads[0.28] == (pytest.approx(-1.25), pytest.approx(-1.25))  # inside 1 + 0.28
    # the low side still uses epsilon: A < 0, r = 0.75 < 0.8 is clipped whatever epsilon_high is
    lp = torch.log(torch.tensor([[0.75]])).requires_grad_(True)
    loss, _ = policy_loss(lp, old, -adv, mask, epsilon=0.2, epsilon_high=0.28, loss_type="dapo")
    loss.backward()
    assert loss.item() == pytest.approx(0.8) and lp.grad.item() == 0.0


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_on_policy_ratio_exactly_one_kl_exactly_zero(loss_type):
    logp = torch.tensor([[0.0, -1.0, -2.0, -0.3], [0.0, -0.7, -0.1, 0.0]], requires_grad=True)
    mask = torch.tensor([[0, 1, 1, 1], [0, 1, 1, 0]])
    adv = torch.tensor([0.7, -0.4])
    loss, stats = policy_loss(logp, logp.detach().clone(), adv, mask, ref_logp=logp.detach().clone(), beta=0.1,
                              loss_type=loss_type, max_completion_length=4)
    assert stats["ratio/mean"].item() == 1.0 and stats["ratio/min"].item() == 1.0
    assert stats["ratio/max"].item() == 1.0
    assert stats["loss/kl"].item() == 0.0 and stats["clip/frac"].item() == 0.0
    loss.backward()
    w = {"grpo": [1 / (3 * 2), 1 / (2 * 2)], "dapo": [1 / 5, 1 / 5], "dr_grpo": [1 / 8, 1 / 8]}[loss_type]
    want = {"grpo": -(0.7 - 0.4) / 2, "dapo": -(0.7 * 3 - 0.4 * 2) / 5, "dr_grpo": -(0.7 * 3 - 0.4 * 2) / 8}
    assert loss.item() == pytest.approx(want[loss_type], rel=1e-6)
    expect = [[0.0] + [-0.7 * w[0]] * 3, [0.0, 0.4 * w[1], 0.4 * w[1], 0.0]]
    assert logp.grad.tolist() == [pytest.approx(row, rel=1e-6) for row in expect]


def test_kl_k3_value_and_gradient():
    logp = torch.tensor([[-1.0]], requires_grad=True)
    ref = torch.tensor([[-1.5]])
    loss, stats = policy_loss(logp, logp.detach().clone(), torch.tensor([0.0]), torch.ones(1, 1), ref_logp=ref,
                              beta=0.5, loss_type="dapo")
    k3 = math.exp(-0.5) - (-0.5) - 1
    assert stats["loss/kl"].item() == pytest.approx(k3, rel=1e-6)
    assert loss.item() == pytest.approx(0.5 * k3, rel=1e-6)
    loss.backward()
    assert logp.grad.item() == pytest.approx(0.5 * (1 - math.exp(-0.5)), rel=1e-6)
    _, no_beta = policy_loss(logp, logp.detach(), torch.tensor([0.0]), torch.ones(1, 1), ref_logp=ref)
    assert no_beta["loss/kl"].item() == pytest.approx(k3, rel=1e-6)  # reported even when beta == 0


def test_masked_tokens_contribute_nothing_even_if_garbage():
    nan, inf = float("nan"), float("inf")
    logp = torch.tensor([[-1.0, -inf, nan]], requires_grad=True)
    ent = torch.tensor([[0.5, nan, inf]], requires_grad=True)
    loss, stats = policy_loss(logp, torch.tensor([[-1.0, 5.0, inf]]), torch.tensor([1.0]), torch.tensor([[1, 0, 0]]),
                              ref_logp=torch.tensor([[-1.0, inf, nan]]), beta=0.1, entropy=ent, entropy_coef=0.1,
                              loss_type="grpo")
    loss.backward()
    assert loss.item() == pytest.approx(-1.0 - 0.1 * 0.5)
    assert logp.grad[0].tolist() == [pytest.approx(-1.0), 0.0, 0.0]
    assert ent.grad[0].tolist() == [pytest.approx(-0.1), 0.0, 0.0]
    assert all(torch.isfinite(v) for v in stats.values())


def test_wildly_off_policy_tokens_stay_finite():
    logp = torch.tensor([[0.0, 0.0]], requires_grad=True)
    old = torch.tensor([[-200.0, 200.0]])  # log-ratios +200 and -200
    for a in (1.0, -1.0):
        loss, stats = policy_loss(logp, old, torch.tensor([a]), torch.ones(1, 2), loss_type="dapo")
        g, = torch.autograd.grad(loss, logp)
        assert torch.isfinite(loss) and torch.isfinite(g).all()


def test_argument_validation():
    x, m = torch.zeros(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError):
        policy_loss(x, x, torch.zeros(2), m, loss_type="ppo")
    with pytest.raises(ValueError):
        policy_loss(x, x, torch.zeros(2), m, loss_type="dr_grpo")  # needs max_completion_length
    with pytest.raises(ValueError):
        policy_loss(x, x, torch.zeros(3), m)
    with pytest.raises(ValueError):
        policy_loss(x, x[:, :2], torch.zeros(2), m)


# ---------------------------------------------------------------- gradient accumulation


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_gradient_accumulation_equals_big_batch(loss_type):
    torch.manual_seed(0)
    n, t = 7, 6
    w = torch.randn(n, t, requires_grad=True)  # stands in for the model: logp = logsigmoid(w), ent = sigmoid(w)
    old = torch.nn.functional.logsigmoid(torch.randn(n, t))
    ref = torch.nn.functional.logsigmoid(torch.randn(n, t))
    adv = torch.randn(n)
    lengths = [6, 2, 4, 1, 3, 5, 0]  # includes a sequence with no completion token
    mask = torch.tensor([[1 if 0 < j <= L else 0 for j in range(t)] for L in lengths])
    kw = dict(loss_type=loss_type, max_completion_length=t, beta=0.05, entropy_coef=0.01, epsilon_high=0.3)

    def loss_of(rows, **extra):
        logp = torch.nn.functional.logsigmoid(w[rows])
        loss, _ = policy_loss(logp, old[rows], adv[rows], mask[rows], ref_logp=ref[rows],
                              entropy=torch.sigmoid(w[rows]), **kw, **extra)
        return loss

    big = loss_of(slice(None))
    g_big, = torch.autograd.grad(big, w)
    total_loss, total_grad = 0.0, torch.zeros_like(w)
    for rows in ([0, 1], [2, 3, 4], [5], [6]):
        loss = loss_of(rows, num_sequences_total=n, num_tokens_total=int(mask.sum()))
        total_loss += loss.item()
        total_grad += torch.autograd.grad(loss, w)[0]
    assert total_loss == pytest.approx(big.item(), rel=1e-6, abs=1e-7)
    assert torch.allclose(total_grad, g_big, atol=1e-6)
    assert (g_big[mask == 0] == 0).all()
    # without the global normalisers the micro-batch sum differs (so the test above is meaningful)
    naive = sum(torch.autograd.grad(loss_of(rows), w)[0] for rows in ([0, 1], [2, 3, 4], [5]))
    assert not torch.allclose(naive, g_big, atol=1e-6)
