"""Token sampling against a full-sort reference: exact top-p set, the sampled distribution, greedy."""
import pytest
import torch

from smolthink.rollout.sampling import sample_tokens, top_p_filter
from smolthink.types import SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")


def reference_top_p(probs: torch.Tensor, top_p: float) -> list[dict[int, float]]:
    """Full descending sort; keep a token iff the mass ranked before it is < top_p; renormalise."""
    out = []
    for row in probs:
        vals, idx = row.sort(descending=True)
        before = torch.cat([torch.zeros(1, dtype=vals.dtype), vals.cumsum(0)[:-1]])
        keep = before < top_p
        keep[0] = True
        kept = vals[keep]
        out.append(dict(zip(idx[keep].tolist(), (kept / kept.sum()).tolist())))
    return out


@pytest.mark.parametrize("top_p", [0.3, 0.9, 0.95, 0.999])
@pytest.mark.parametrize("k0", [1, 4, 64])
def test_top_p_filter_keeps_exactly_the_full_sort_set(top_p, k0):
    g = torch.Generator().manual_seed(int(top_p * 1000) + k0)
    V = 1000
    scales = torch.tensor([0.1, 1.0, 3.0, 8.0, 20.0] * 4)[:, None]  # flat rows force widening, peaked rows don't
    logits = torch.randn(len(scales), V, generator=g) * scales
    probs = torch.softmax(logits, -1)
    vals, idx = top_p_filter(probs, top_p, k0=k0)
    for row, ref in enumerate(reference_top_p(probs, top_p)):
        kept = vals[row] > 0
        got = dict(zip(idx[row][kept].tolist(), (vals[row][kept] / vals[row][kept].sum()).tolist()))
        assert set(got) == set(ref)
        torch.testing.assert_close(torch.tensor([got[k] for k in ref]), torch.tensor(list(ref.values())))


@pytest.mark.parametrize("top_p,top_k", [(0.9, 0), (1.0, 0), (0.8, 5), (1.0, 7)])
def test_sampled_distribution_equals_the_reference(top_p, top_k):
    """Inverse-CDF sampling on an even grid of uniforms reproduces the filtered distribution (deterministic)."""
    g = torch.Generator().manual_seed(7)
    V, N, temp = 50, 20000, 0.7
    logits = torch.randn(1, V, generator=g) * 2
    u = (torch.arange(N, dtype=torch.float64) + 0.5) / N
    toks, _ = sample_tokens(logits.expand(N, V), SamplingParams(temperature=temp, top_p=top_p, top_k=top_k), u)
    freq = torch.bincount(toks, minlength=V).double() / N
    scores = logits[0] / temp
    if top_k:
        scores = scores.masked_fill(scores < scores.topk(top_k).values[-1], float("-inf"))
    ref = reference_top_p(torch.softmax(scores, -1)[None].double(), top_p)[0]
    want = torch.zeros(V, dtype=torch.float64)
    want[list(ref)] = torch.tensor(list(ref.values()), dtype=torch.float64)
    assert set(freq.nonzero().squeeze(1).tolist()) <= set(ref)
    torch.testing.assert_close(freq, want, atol=2.0 / N, rtol=0)



@pytest.mark.parametrize("top_p,top_k", [(0.9, 0), (1.0, 0), (0.8, 5), (1.0, 7)])
def test_sampled_logprobs_are_the_full_distributions(top_p, top_k):
    """Whatever the cut, each token's log-prob is log softmax(logits / T)[token] over the whole vocabulary."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(64, 40, generator=g) * 4
    sp = SamplingParams(temperature=0.7, top_p=top_p, top_k=top_k)
    tok, logp = sample_tokens(logits, sp, torch.rand(64, generator=g, dtype=torch.float64))
    want = torch.log_softmax(logits / 0.7, -1).gather(1, tok[:, None]).squeeze(1)
    torch.testing.assert_close(logp, want, atol=1e-5, rtol=1e-5)
    if top_p < 1 or top_k:
        assert (want < torch.log_softmax(logits / 0.7, -1).max(-1).values).any()  # not only top-1 tokens drawn


def test_greedy_sampling_is_argmax():
    logits = torch.randn(5, 30)
    tok, logp = sample_tokens(logits, SamplingParams(temperature=0), torch.rand(5, dtype=torch.float64))
    assert torch.equal(tok, logits.argmax(-1)) and logp is None
