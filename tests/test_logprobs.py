import torch

from smolthink.logprobs import token_logprobs
from smolthink.models import attach_lora, tiny_model


def naive(model, ids, attn, temperature=1.0):
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits.float() / temperature
    lp = torch.log_softmax(logits[:, :-1], -1).gather(2, ids[:, 1:, None]).squeeze(2)
    return torch.cat([torch.zeros(ids.shape[0], 1), lp], dim=1)


def batch():
    ids = torch.tensor([[1, 5, 9, 13, 2, 2], [1, 7, 8, 2, 2, 2]])
    attn = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]])
    comp = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 0, 1, 1, 0, 0]])  # includes each row's real EOS
    return ids, attn, comp


def test_matches_naive_full_logits_with_temperature_and_chunks():
    model = tiny_model()
    ids, attn, comp = batch()
    for temp in (1.0, 0.7):
        want = naive(model, ids, attn, temp) * comp
        got, ent = token_logprobs(model, ids, attn, comp, temperature=temp, chunk_size=2, with_entropy=True)
        assert torch.allclose(got, want, atol=1e-5)
        assert (got[comp == 0] == 0).all() and (ent[comp == 1] > 0).all()


def test_no_grad_equals_grad_path_exactly_and_grads_flow():
    model = attach_lora(tiny_model(), r=4, alpha=8)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    ids, attn, comp = batch()
    with torch.no_grad():
        old, _ = token_logprobs(model, ids, attn, comp)
    new, _ = token_logprobs(model, ids, attn, comp)
    assert torch.equal(old, new)  # the importance ratio is exactly 1 before any update
    new.sum().backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    assert torch.allclose(new.detach(), naive(model, ids, attn) * comp, atol=1e-5)


def test_left_padding_gives_same_values():
    model = tiny_model()
    ids, attn, comp = batch()
    right, _ = token_logprobs(model, ids[1:2, :4], attn[1:2, :4], comp[1:2, :4])
    left_ids = torch.tensor([[2, 2, 1, 7, 8, 2]])
    left_attn = torch.tensor([[0, 0, 1, 1, 1, 1]])
    left_comp = torch.tensor([[0, 0, 0, 0, 1, 1]])
    left, _ = token_logprobs(model, left_ids, left_attn, left_comp)
    assert torch.allclose(left[0, 4:], right[0, 2:4], atol=1e-5)
