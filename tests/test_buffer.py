import torch

from smolthink.buffer import Experience, ExperienceBuffer

EOS = 2  # pad id == eos id, as in SmolLM2


def make_buffer():
    buf = ExperienceBuffer()
    data = [([5, 6, 7], [8, 9, EOS]), ([5], [EOS]), ([5, 6], [10, 11, 12, 13]), ([7, 7, 7, 7], [EOS, ])]
    for k, (p, c) in enumerate(data):
        buf.add(Experience(prompt_ids=p, completion_ids=c, old_logp=torch.arange(len(c), dtype=torch.float32) - 5,
                           advantage=float(k), reward=0.0, truncated=c[-1] != EOS, group=k // 2))
    return buf, data


def test_collate_round_trip_and_masks_keep_eos():
    buf, data = make_buffer()
    b = buf.collate([0, 1, 2, 3], pad_id=EOS)
    assert b.input_ids.shape == (4, 6)
    for r, (p, c) in enumerate(data):
        real = b.attention_mask[r].bool()
        assert b.input_ids[r][real].tolist() == p + c  # un-pad gives back the stored ids
        comp = b.completion_mask[r].bool()
        assert b.input_ids[r][comp].tolist() == c  # the final EOS is inside the completion mask
        assert int(comp.sum()) == len(c)
        assert b.old_logp[r][comp].tolist() == (torch.arange(len(c)) - 5.0).tolist()
        assert b.old_logp[r][~comp].abs().sum() == 0
    # row 1's padding has the same id as its EOS; only the real EOS is masked in
    assert b.input_ids[1].tolist() == [5, EOS, EOS, EOS, EOS, EOS]
    assert b.completion_mask[1].tolist() == [0, 1, 0, 0, 0, 0]
    assert b.advantages.tolist() == [0.0, 1.0, 2.0, 3.0]


def test_minibatches_cover_every_item_once():
    buf = ExperienceBuffer()
    for k in range(37):
        buf.add(Experience([1] * (k % 7 + 1), [3] * (k % 5 + 1), None, 0.0, 0.0))
    for by_len in (False, True):
        mbs = list(buf.minibatches(8, torch.Generator().manual_seed(1), group_by_length=by_len))
        flat = [i for mb in mbs for i in mb]
        assert sorted(flat) == list(range(37)) and [len(m) for m in mbs].count(8) == 4
    a = list(buf.minibatches(8, torch.Generator().manual_seed(1)))
    b = list(buf.minibatches(8, torch.Generator().manual_seed(1)))
    assert a == b


def test_length_grouping_cuts_padding():
    buf = ExperienceBuffer()
    g = torch.Generator().manual_seed(0)
    for k in range(64):
        buf.add(Experience([1], [3] * int(torch.randint(1, 200, (1,), generator=g)), None, 0.0, 0.0))
    def padding(mbs):
        return sum(len(mb) * max(buf.seq_len(i) for i in mb) - sum(buf.seq_len(i) for i in mb) for mb in mbs)
    plain = padding(buf.minibatches(8, torch.Generator().manual_seed(3)))
    grouped = padding(buf.minibatches(8, torch.Generator().manual_seed(3), group_by_length=True))
    assert grouped < plain / 2


def test_state_dict_round_trip():
    buf, _ = make_buffer()
    other = ExperienceBuffer()
    other.load_state_dict(buf.state_dict())
    assert len(other) == 4
    assert other.items[2].completion_ids == buf.items[2].completion_ids
    assert torch.equal(other.items[0].old_logp, buf.items[0].old_logp)
