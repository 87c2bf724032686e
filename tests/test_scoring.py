"""Sandboxed scoring against the real reasoning-gym scorers, with real payloads."""
import os
import subprocess
import sys
import time

import pytest
import reasoning_gym as rg

from smolthink.scoring import Scorer


def entry(task, seed=1, **cfg):
    return rg.create_dataset(task, seed=seed, size=1, **cfg)[0]


@pytest.fixture(scope="module")
def scorer():
    with Scorer(timeout=1.5) as s:
        yield s


def test_normal_scores(scorer):
    e = entry("syllogism")
    assert scorer.score("syllogism", {}, e["answer"], e) == (1.0, None)
    assert scorer.score("syllogism", {}, "Maybe", e) == (0.0, None)
    assert scorer.score("syllogism", {}, None, e) == (0.0, None)
    p = entry("propositional_logic")
    p1, p2 = p["metadata"]["premises"][:2]
    both = f"({p1} ∧ {p2})"  # the conjunction of two premises is entailed (and not a tautology)
    assert scorer.score("propositional_logic", {}, both, p) == (1.0, None)
    v = p["metadata"]["variables"]
    wrong = f"(¬{v[0]} ∧ {v[0]})"  # well-formed but not entailed (a contradiction)
    assert scorer.score("propositional_logic", {}, wrong, p) == (0.05, None)


PAYLOAD = "__import__('os').system('touch {path}')"


def test_payload_really_runs_without_sandbox(tmp_path):
    """Control: binary_matrix's scorer evals the answer, so the payload creates the canary when unsandboxed."""
    canary = tmp_path / "CANARY"
    code = ("import reasoning_gym as rg; ds = rg.create_dataset('binary_matrix', seed=1, size=1); "
            f"ds.score_answer({PAYLOAD.format(path=canary)!r}, ds[0])")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)
    assert canary.exists()


@pytest.mark.parametrize("payload", [
    PAYLOAD,
    "open('{path}', 'w').write('x')",
    "__import__('pathlib').Path('{path}').touch()",
    "__import__('shutil').copy('/etc/hostname', '{path}')",
    "__import__('subprocess').run(['touch', '{path}'])",
])
def test_payloads_never_touch_the_file_system(scorer, tmp_path, payload):
    canary = tmp_path / "CANARY"
    e = entry("binary_matrix")
    score, _ = scorer.score("binary_matrix", {}, payload.format(path=canary), e)
    assert score == 0.0
    assert not canary.exists()
    assert scorer.score("binary_matrix", {}, e["answer"], e) == (1.0, None)  # still works


def test_hanging_payload_times_out_and_scorer_recovers(scorer):
    e = entry("binary_matrix")
    t0 = time.monotonic()
    assert scorer.score("binary_matrix", {}, "9**9**9", e) == (0.0, "timeout")
    assert time.monotonic() - t0 < scorer.timeout + 1.0
    c = entry("countdown")  # sympy.parse_expr path
    t0 = time.monotonic()
    assert scorer.score("countdown", {}, "9**9**9**9", c)[1] == "timeout"
    assert time.monotonic() - t0 < scorer.timeout + 10  # includes a fresh worker's start-up
    assert scorer.score("binary_matrix", {}, e["answer"], e) == (1.0, None)


def test_crashing_payload_is_an_error_not_a_crash(scorer):
    e = entry("binary_matrix")
    score, err = scorer.score("binary_matrix", {}, "__import__('os')._exit(3)", e)
    assert score == 0.0 and err.startswith("crashed")
    assert scorer.score("binary_matrix", {}, "[0]*(10**10)", e)[0] == 0.0  # memory limit, not a dead machine
    assert scorer.score("binary_matrix", {}, e["answer"], e) == (1.0, None)


def test_score_many_keeps_order_and_isolates_a_timeout():
    s = entry("syllogism")
    b = entry("binary_matrix")
    with Scorer(timeout=1.5, workers=2) as sc:
        out = sc.score_many([("syllogism", {}, s["answer"], s), ("binary_matrix", {}, "9**9**9", b),
                             ("binary_matrix", {}, b["answer"], b), ("syllogism", {}, "nope", s)])
    assert out == [(1.0, None), (0.0, "timeout"), (1.0, None), (0.0, None)]
