import io

import pytest
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


def test_old_logp_none_mixed_and_length_checks():
    buf, _ = make_buffer()
    for e in buf.items:
        e.old_logp = None
    assert buf.collate([0, 1], pad_id=EOS).old_logp is None
    buf.items[0].old_logp = torch.zeros(3)
    with pytest.raises(ValueError):
        buf.collate([0, 1], pad_id=EOS)  # one item has old_logp, the other not
    buf.items[1].old_logp = torch.zeros(5)  # completion has 1 token
    with pytest.raises(ValueError):
        buf.collate([0, 1], pad_id=EOS)
    with pytest.raises(ValueError):
        buf.collate([], pad_id=EOS)


def test_collate_feeds_token_logprobs_shapes():
    buf, data = make_buffer()
    b = buf.collate([3, 0], pad_id=0)  # another pad id: same masks
    assert b.prompt_lens == [4, 3] and b.completion_lens == [1, 3]
    assert b.completion_mask.sum(1).tolist() == [1, 3]
    assert b.attention_mask.sum(1).tolist() == [5, 6]
    assert b.input_ids[0].tolist() == [7, 7, 7, 7, EOS, 0]
    assert b.advantages.dtype == torch.float32 and b.input_ids.dtype == torch.long


def test_state_dict_saves_with_weights_only_and_is_a_copy():
    buf, data = make_buffer()
    buf.items[1].parts = {"correct": 1.0, "format": 0.0}
    state = buf.state_dict()
    blob = io.BytesIO()
    torch.save(state, blob)
    blob.seek(0)
    loaded = torch.load(blob, weights_only=True)
    other = ExperienceBuffer()
    other.load_state_dict(loaded)
    buf.items[0].completion_ids.append(99)  # later changes do not leak into the saved state
    assert state["items"][0]["completion_ids"] == [8, 9, EOS]
    for a, b in zip(other.items, make_buffer()[0].items):
        assert (a.prompt_ids, a.completion_ids, a.advantage, a.reward, a.truncated, a.group) == \
            (b.prompt_ids, b.completion_ids, b.advantage, b.reward, b.truncated, b.group)
        assert torch.equal(a.old_logp, b.old_logp)
    assert other.items[1].parts == {"correct": 1.0, "format": 0.0}
    # a resumed buffer yields the same minibatches and batches
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    mb1, mb2 = list(make_buffer()[0].minibatches(3, g1)), list(other.minibatches(3, g2))
    assert mb1 == mb2
    assert torch.equal(make_buffer()[0].collate(mb1[0], EOS).input_ids, other.collate(mb2[0], EOS).input_ids)


def test_clear_and_bad_sizes():
    buf, _ = make_buffer()
    with pytest.raises(ValueError):
        list(buf.minibatches(0, torch.Generator()))
    buf.clear()
    assert len(buf) == 0 and list(buf.minibatches(4, torch.Generator())) == []


def test_split_by_tokens_bounds_padded_size():
    buf = ExperienceBuffer()
    lens = [3, 9, 4, 7, 2, 8]
    for n in lens:
        buf.add(Experience([1] * 2, [5] * n, None, 0.0, 0.0))
    idx = list(range(len(lens)))
    assert buf.split_by_tokens(idx, 0) == [idx]
    for budget in (1, 11, 20, 40, 1000):
        chunks = buf.split_by_tokens(idx, budget)
        assert sorted(i for c in chunks for i in c) == idx  # every item once
        for c in chunks:
            assert len(c) == 1 or len(c) * max(buf.seq_len(i) for i in c) <= budget
    assert len(buf.split_by_tokens(idx, 1000)) == 1 and len(buf.split_by_tokens(idx, 1)) == len(lens)


def test_prompt_chunks_group_by_prompt_within_the_budget():
    buf = ExperienceBuffer()
    prompts = [[1, 2, 3], [4, 5], [1, 2, 3], [4, 5], [1, 2, 3], [9]]
    lens = [4, 2, 6, 3, 1, 5]
    for p, n in zip(prompts, lens):
        buf.add(Experience(p, [7] * n, None, 0.0, 0.0))
    idx = list(range(len(prompts)))
    # by prompt, shortest first; prompt [1, 2, 3] with lengths 1, 4, 6: (3 + 1) + (3 + 2 x 6) < 3 + 3 x 6
    assert buf.prompt_chunks(idx, 0) == [[4], [0, 2], [1, 3], [5]]
    for budget in (1, 8, 12, 100):
        chunks = buf.prompt_chunks(idx, budget)
        assert sorted(i for c in chunks for i in c) == idx  # every item once
        for c in chunks:
            assert len({tuple(buf.items[i].prompt_ids) for i in c}) == 1
            p = len(buf.items[c[0]].prompt_ids)
            assert len(c) == 1 or p + len(c) * max(len(buf.items[i].completion_ids) for i in c) <= budget


def test_cheapest_cuts_trade_prompt_reruns_against_padding():
    from smolthink.buffer import _cheapest_cuts

    # a long prompt: one chunk beats re-running it, however much the short rows pad
    assert _cheapest_cuts(100, [1, 2, 50], 0) == [(0, 3)]
    # a short prompt: the long row goes alone (2 + 1 + 2 + 2 + 50 = 57 < 2 + 3 x 50 = 152)
    assert _cheapest_cuts(2, [1, 2, 50], 0) == [(0, 2), (2, 3)]
    # the budget forces cuts; the cheapest feasible ones are chosen: (10 + 2 x 3) + (10 + 2 x 9) = 44
    assert _cheapest_cuts(10, [2, 3, 8, 9], 30) == [(0, 2), (2, 4)]
    # brute force over every set of cut points agrees on random cases
    import itertools
    import random

    rng = random.Random(0)
    for _ in range(200):
        lens = sorted(rng.randint(1, 40) for _ in range(rng.randint(1, 7)))
        p, budget = rng.randint(1, 60), rng.choice([0, 50, 90, 200])

        def cost(runs):
            return sum(p + (b - a) * lens[b - 1] for a, b in runs)

        def ok(runs):
            return all(b - a == 1 or budget == 0 or p + (b - a) * lens[b - 1] <= budget for a, b in runs)

        n = len(lens)
        options = []
        for k in range(n):
            for cuts in itertools.combinations(range(1, n), k):
                edges = [0, *cuts, n]
                runs = list(zip(edges, edges[1:]))
                if ok(runs):
                    options.append(cost(runs))
        got = _cheapest_cuts(p, lens, budget)
        assert ok(got) and [a for a, _ in got] == sorted(a for a, _ in got) and cost(got) == min(options)


def test_collate_shared_masks_from_lengths_and_one_prompt_only():
    buf, data = make_buffer()
    buf.add(Experience([5, 6, 7], [EOS], torch.tensor([-1.5]), 3.0, 0.0))
    b = buf.collate_shared([0, 4], pad_id=EOS)
    assert b.prefix_ids.tolist() == [[5, 6, 7]]
    assert b.input_ids.tolist() == [[8, 9, EOS], [EOS, EOS, EOS]]
    assert b.completion_mask.tolist() == [[1, 1, 1], [1, 0, 0]]  # the real EOS is in, the padding out
    assert b.attention_mask.tolist() == b.completion_mask.tolist() and b.prompt_lens == [0, 0]
    assert b.old_logp.tolist() == [[-5.0, -4.0, -3.0], [-1.5, 0.0, 0.0]]
    assert b.advantages.tolist() == [0.0, 3.0] and b.completion_lens == [3, 1]
    with pytest.raises(ValueError, match="share one prompt"):
        buf.collate_shared([0, 1], pad_id=EOS)


def test_engine_logp_is_padded_like_old_logp_and_survives_a_checkpoint():
    buf, data = make_buffer()
    assert buf.collate([0, 1], pad_id=EOS).engine_logp is None  # an engine without log-probs
    for k, e in enumerate(buf.items):
        e.engine_logp = torch.arange(len(e.completion_ids), dtype=torch.float32) * 0.5 - k
    b = buf.collate([0, 2], pad_id=EOS)
    assert b.engine_logp.shape == b.old_logp.shape
    comp = b.completion_mask.bool()
    assert b.engine_logp[0][comp[0]].tolist() == [0.0, 0.5, 1.0]
    assert b.engine_logp[1][comp[1]].tolist() == [-2.0, -1.5, -1.0, -0.5]
    assert b.engine_logp[~comp].abs().sum() == 0
    buf.add(Experience([5, 6, 7], [EOS], torch.tensor([-1.5]), 3.0, 0.0, engine_logp=torch.tensor([-1.25])))
    s = buf.collate_shared([0, 4], pad_id=EOS)
    assert s.engine_logp.tolist() == [[0.0, 0.5, 1.0], [-1.25, 0.0, 0.0]]
    other = ExperienceBuffer()
    other.load_state_dict(buf.state_dict())
    assert torch.equal(other.items[4].engine_logp, torch.tensor([-1.25]))
    state = buf.state_dict()
    for d in state["items"]:
        del d["engine_logp"]  # a checkpoint written before the field existed still loads
    other.load_state_dict(state)
    assert other.items[0].engine_logp is None
    buf.items[1].engine_logp = None
    with pytest.raises(ValueError, match="lack engine_logp"):
        buf.collate([0, 1], pad_id=EOS)
    buf.items[1].engine_logp = torch.zeros(4)  # its completion has 1 token
    with pytest.raises(ValueError, match="engine_logp of item 1"):
        buf.collate([0, 1], pad_id=EOS)


def test_collate_shared_on_a_common_prefix_keeps_each_prompts_rest_unscored():
    """SFT layout: the rows share a prompt prefix and go on with their own prompt tokens, then the completion;
    the rest is attended to (attention_mask) but only the completion scored (completion_mask, old_logp)."""
    buf = ExperienceBuffer()
    for p, c in (([5, 6, 7, 8], [9, EOS]), ([5, 6, 3], [4, 4, EOS]), ([5, 6], [EOS])):
        buf.add(Experience(p, c, torch.arange(len(c), dtype=torch.float32) - 5, 0.0, 0.0))
    idx = [0, 1, 2]
    assert buf.common_prefix_len(idx) == 2 and buf.common_prefix_len([0, 1]) == 2
    assert buf.common_prefix_len([0]) == 4 and buf.common_prefix_len([0, 0]) == 4  # never past a prompt
    b = buf.collate_shared(idx, pad_id=EOS, prefix_len=2)
    assert b.prefix_ids.tolist() == [[5, 6]]
    assert b.input_ids.tolist() == [[7, 8, 9, EOS], [3, 4, 4, EOS], [EOS, EOS, EOS, EOS]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert b.completion_mask.tolist() == [[0, 0, 1, 1], [0, 1, 1, 1], [1, 0, 0, 0]]
    assert b.old_logp.tolist() == [[0, 0, -5, -4], [0, -5, -4, -3], [-5, 0, 0, 0]]
    assert b.prompt_lens == [2, 1, 0] and b.completion_lens == [2, 3, 1]
    # the same sequences as collate's, the prefix split off
    full = buf.collate(idx, pad_id=EOS)
    assert torch.equal(torch.cat([b.prefix_ids.expand(3, -1), b.input_ids], 1), full.input_ids)
    assert torch.equal(b.completion_mask, full.completion_mask[:, 2:])
    for bad in (0, 3):  # nothing to share; more than the rows share
        with pytest.raises(ValueError, match="share one prompt prefix"):
            buf.collate_shared(idx, pad_id=EOS, prefix_len=bad)


def test_prefix_chunks_sort_by_length_within_the_budget():
    buf = ExperienceBuffer()
    lens = [30, 5, 12, 40, 8, 20]
    for k, n in enumerate(lens):
        buf.add(Experience([1, 2, 3, 4, 5, 6, 7, 8, 9, 10] + [100 + k], [7] * n, None, 0.0, 0.0))
    idx = list(range(len(lens)))
    assert buf.prefix_chunks([], 100) == []
    p = buf.common_prefix_len(idx)
    assert p == 10
    rest = lambda c: max(buf.seq_len(i) for i in c) - p  # rows restart after the common prefix
    # no limit: a short prefix costs less to re-run than padding, so the long rows go alone:
    # (10 + 3 x 13) + (10 + 21) + (10 + 31) + (10 + 41) = 172 < 10 + 6 x 41 = 256
    assert buf.prefix_chunks(idx, 0) == [[1, 4, 2], [5], [0], [3]]
    for budget in (1, 40, 60, 100, 1000):
        chunks = buf.prefix_chunks(idx, budget)
        assert sorted(i for c in chunks for i in c) == idx  # every item once
        assert [i for c in chunks for i in c] == sorted(idx, key=buf.seq_len)  # sorted by length
        for c in chunks:
            assert len(c) == 1 or p + len(c) * rest(c) <= budget
    assert buf.prefix_chunks(idx, 1) == [[i] for i in sorted(idx, key=buf.seq_len)]
