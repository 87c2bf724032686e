import math

import pytest

from smolthink.evaluate import mean_interval, pass_at_k, summarize, wilson_interval
from smolthink.types import Example, RewardParts


def test_wilson_interval_known_values():
    lo, hi = wilson_interval(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-4) and hi == pytest.approx(0.5962, abs=1e-4)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0


def test_pass_at_k():
    assert pass_at_k(4, 0, 4) == 0.0 and pass_at_k(4, 1, 4) == 1.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - (3 / 5) * (2 / 4))


def _ex(i, gold):
    return Example(id=str(i), task="syllogism", question=f"q{i}", answer=gold, entry={})


def _parts(c, f=1.0):
    return RewardParts(correct=c, format=f, total=0.85 * c + 0.15 * f, partial=c)


def test_always_yes_model_is_exposed():
    """A model that always answers Yes gets 50% on a balanced set: balanced accuracy 0.5, per-class 1.0 / 0.0."""
    golds = ["Yes", "No"] * 10
    exs = [_ex(i, g) for i, g in enumerate(golds)]
    comps = [["<think> x </think> <answer> Yes </answer>"] for _ in golds]
    parts = [[_parts(1.0 if g == "Yes" else 0.0)] for g in golds]
    s = summarize(exs, parts, comps, [[10]] * 20, [[False]] * 20)
    assert s["accuracy"] == 0.5 and s["balanced_accuracy"] == 0.5
    assert s["per_class_accuracy"] == {"No": 0.0, "Yes": 1.0}
    assert s["majority_baseline"] == 0.5
    assert s["answer_distribution"] == {"Yes": 1.0}


def test_summary_with_k_samples_and_truncation():
    exs = [_ex(0, "Yes"), _ex(1, "No"), _ex(2, "No")]
    parts = [[_parts(1), _parts(0)], [_parts(0), _parts(0, 0.0)], [_parts(1), _parts(1)]]
    comps = [["<answer>Yes</answer>", "<answer>No</answer>"], ["<answer>Yes</answer>", "no tags"],
             ["<answer>No</answer>", "<answer>no</answer>"]]
    s = summarize(exs, parts, comps, [[10, 20], [30, 40], [5, 5]], [[False, True], [False, False], [False, False]])
    assert s["accuracy"] == pytest.approx((0.5 + 0 + 1) / 3)
    assert s["pass@k"] == pytest.approx(2 / 3) and s["mean@k"] == s["accuracy"]
    assert s["format_rate"] == pytest.approx(5 / 6)
    assert s["truncated_frac"] == pytest.approx(1 / 6)
    assert s["mean_completion_len"] == pytest.approx(110 / 6)
    assert s["majority_class"] == "No" and s["majority_baseline"] == pytest.approx(2 / 3)
    assert s["answer_distribution"]["No"] == pytest.approx(3 / 6)
    lo, hi = s["accuracy_ci95"]
    assert lo < s["accuracy"] < hi


def test_mean_interval_shrinks_with_n():
    a = mean_interval([0, 1] * 10)
    b = mean_interval([0, 1] * 100)
    assert (a[1] - a[0]) > (b[1] - b[0]) > 0
    assert math.isclose((b[0] + b[1]) / 2, 0.5, abs_tol=1e-9)
