"""The replay pool: sampling weights follow pass rates (1 - p), solved and over-replayed questions leave, the oldest
leave first when it is full, eval questions never enter, and its state restores exactly."""
import random

from smolthink.config import ReplayConfig
from smolthink.groups import GroupResult
from smolthink.replay import ReplayPool
from smolthink.types import Example


def ex(i: int) -> Example:
    return Example(id=f"t/{i}", task="syllogism", question=f"question {i}?", answer="Yes", entry={"i": i})


def group(i: int, solved: int, origin: str = "train", n: int = 4) -> GroupResult:
    return GroupResult(ex(i), origin, None, n, solved, tokens=10 * n, zero_std=solved in (0, n))


def test_sampling_weights_follow_pass_rates():
    pool = ReplayPool(ReplayConfig(fraction=0.5))
    pool.record([group(0, 0), group(1, 1), group(2, 2), group(3, 3), group(4, 4)])  # p = 0, .25, .5, .75, 1
    assert [e.example.question for e in pool.entries.values()] == ["question 0?", "question 1?", "question 2?",
                                                                  "question 3?"]  # p = 1 never enters
    trials = 20000
    counts = [0] * 4
    rng = random.Random(1234)
    for _ in range(trials):
        (drawn,) = pool.sample(1, rng)
        counts[int(drawn.entry["i"])] += 1
    expected = [trials * w / 2.5 for w in (1.0, 0.75, 0.5, 0.25)]  # weight 1 - p, normalised
    chi2 = sum((c - e) ** 2 / e for c, e in zip(counts, expected))
    assert chi2 < 16.27, (counts, expected)  # 3 degrees of freedom, p = 0.001
    # uniform weights would be far off: the test can tell them apart
    assert sum((c - trials / 4) ** 2 / (trials / 4) for c in counts) > 1000
    # a draw of several is without replacement
    many = pool.sample(4, random.Random(0))
    assert len({e.question for e in many}) == 4 and len(pool.sample(10, random.Random(0))) == 4


def test_solved_and_over_replayed_questions_leave_and_the_oldest_go_first():
    pool = ReplayPool(ReplayConfig(fraction=0.5, max_repeats=2, pool_size=3))
    pool.record([group(0, 1), group(1, 2)])
    pool.record([group(0, 4, "replay")])  # solved every time: leaves
    assert list(pool.entries) == ["question 1?"]
    pool.record([group(1, 3, "replay")])
    assert pool.entries["question 1?"].pass_rate == 0.75 and pool.entries["question 1?"].replays == 1
    pool.record([group(1, 3, "replay")])  # second replay: max_repeats reached
    assert "question 1?" not in pool.entries
    pool.record([group(i, 0) for i in range(2, 7)])
    assert list(pool.entries) == ["question 4?", "question 5?", "question 6?"]


def test_replay_never_yields_an_eval_question():
    held_out = {f"question {i}?" for i in range(0, 10, 2)}
    pool = ReplayPool(ReplayConfig(fraction=1.0), exclude=held_out)
    pool.record([group(i, i % 4) for i in range(10)])
    rng = random.Random(0)
    drawn = {e.question for _ in range(200) for e in pool.sample(3, rng)}
    assert drawn == {"question 1?", "question 3?", "question 5?", "question 7?", "question 9?"}


def test_pool_state_restores_exactly():
    pool = ReplayPool(ReplayConfig(fraction=0.5))
    pool.record([group(i, i % 3) for i in range(6)])
    pool.record([group(1, 2, "replay")])
    copy = ReplayPool(ReplayConfig(fraction=0.5))
    copy.load_state_dict(pool.state_dict())
    assert copy.state_dict() == pool.state_dict()
    assert copy.sample(3, random.Random(7)) == pool.sample(3, random.Random(7))
