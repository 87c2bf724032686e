"""Scripted solvers: decider vs gold, trace format, real reasoning-gym scoring, wording variety, length."""
from __future__ import annotations

import random
from collections import Counter

import pytest
import reasoning_gym as rg

from smolthink import solvers
from smolthink.chat import extract_answer, format_ok
from smolthink.solvers import solve
from smolthink.solvers.propositional import parse_formula, prop_entails, show
from smolthink.solvers.syllogism import parse_statement, syllogism_verdict

MAX_TOKENS = 300  # rough estimate len(text) / 4


def _items(task: str, n_seeds: int, size: int):
    """(dataset, entry) pairs from seeds far apart (item i of seed s is Random(s + i), so close seeds overlap)."""
    out = []
    for k in range(n_seeds):
        ds = rg.create_dataset(task, seed=1_000 + 100_000 * k, size=size)
        out += [(ds, ds[i]) for i in range(size)]
    return out


@pytest.fixture(scope="module")
def syllogisms():
    return _items("syllogism", 6, 400)  # 2400 items


@pytest.fixture(scope="module")
def props():
    return _items("propositional_logic", 3, 250)  # 750 items


def _is_known_gold_error(entry) -> bool:
    """reasoning-gym's rule checker skips "the middle term must be distributed": it calls
    All S are M + Some M are (not) P => Some S are (not) P valid, a fallacy (see solvers' docstring)."""
    m = entry["metadata"]
    q1, q2, q3 = (parse_statement(m[k])[0] for k in ("premise1", "premise2", "conclusion"))
    return m["type"] == "syllogism" and m["is_valid"] and q1 == "all" and q2 in ("some", "some_not") and q3 == q2


def test_supported_tasks_and_unsupported_input():
    assert solvers.SUPPORTED_TASKS == ("syllogism", "propositional_logic")
    assert solve("basic_arithmetic", {"question": "1+1", "answer": "2", "metadata": {}}, random.Random(0)) is None
    assert solve("syllogism", {"metadata": {"premise1": "Cats meow"}}, random.Random(0)) is None
    assert solve("propositional_logic", {"metadata": {}}, random.Random(0)) is None


def test_parse_statement_forms():
    assert parse_statement("All teachers are parents") == ("all", "teachers", "parents")
    assert parse_statement("No fish are birds") == ("no", "fish", "birds")
    assert parse_statement("Some children are artists") == ("some", "children", "artists")
    assert parse_statement("Some butterflies are not insects") == ("some_not", "butterflies", "insects")
    with pytest.raises(ValueError):
        parse_statement("All cats are not dogs")


def _entry(p1, p2, c, answer=None):
    return {"answer": answer, "metadata": {"premise1": p1, "premise2": p2, "conclusion": c}}


def test_decider_uses_existential_import_and_rejects_undistributed_middle():
    # Barbari / Celaront hold only with existential import, which reasoning-gym's generator assumes
    assert syllogism_verdict(_entry("All dogs are mammals", "All mammals are animals", "Some dogs are animals"))
    assert syllogism_verdict(_entry("All dogs are mammals", "No mammals are fish", "Some dogs are not fish"))
    assert syllogism_verdict(_entry("All cats are mammals", "No dogs are fish", "Some mammals are cats"))  # converse
    assert not syllogism_verdict(_entry("All cats are mammals", "No dogs are fish", "All mammals are cats"))
    # undistributed middle: invalid, although reasoning-gym's checker labels this form valid
    assert not syllogism_verdict(_entry("All dogs are mammals", "Some mammals are cats", "Some dogs are cats"))
    assert solve("syllogism", _entry("All dogs are mammals", "Some mammals are cats", "Some dogs are cats", "Yes"),
                 random.Random(0)) is None


def test_decider_agrees_with_gold(syllogisms):
    wrong_gold = agree = 0
    for _, e in syllogisms:
        verdict = syllogism_verdict(e)
        if verdict == e["metadata"]["is_valid"]:
            agree += 1
        else:  # every disagreement is the known gold bug, where the logic says No
            assert _is_known_gold_error(e) and verdict is False, e["metadata"]
            wrong_gold += 1
    n = len(syllogisms)
    print(f"\nsyllogism decider: {agree}/{n} = {agree / n:.1%} raw agreement with gold; "
          f"{agree}/{n - wrong_gold} = 100% on items whose gold is logically right; {wrong_gold} known gold errors")
    assert agree >= 2000 and wrong_gold < 0.15 * n


def _check_common(traces: list[str]):
    assert all(len(t) / 4 < MAX_TOKENS for t in traces), max(len(t) for t in traces)
    openings = Counter(t.split(".")[0] for t in traces)
    assert len(openings) >= 3, openings
    assert len(set(traces)) > 0.9 * len(traces)


def test_syllogism_traces_are_correct_and_scored(syllogisms):
    traces, types = [], Counter()
    for i, (ds, e) in enumerate(syllogisms[:800]):
        t = solve("syllogism", e, random.Random(i))
        if _is_known_gold_error(e):
            assert t is None
            continue
        assert t is not None and format_ok(t), (e["metadata"], t)
        ans = extract_answer(t)
        assert ans in ("Yes", "No") and ans == e["answer"]
        assert ds.score_answer(ans, e) == 1.0
        if e["metadata"]["type"] == "inversion":
            assert "gives, with " in t and "list" in t
        else:
            assert t.count("Rule ") == 4 and ("broken" in t) == (ans == "No")
        traces.append(t)
        types[(e["metadata"]["type"], ans)] += 1
    assert len(types) == 4, types  # both task types, both answers
    _check_common(traces)
    # seeded: same rng seed, same trace; another seed can change the wording, never the answer
    ds, e = syllogisms[0]
    assert solve("syllogism", e, random.Random(5)) == solve("syllogism", e, random.Random(5))
    words = {solve("syllogism", e, random.Random(s)) for s in range(20)}
    assert len(words) > 1 and {extract_answer(t) for t in words} == {e["answer"]}


def test_syllogism_decisions_sit_next_to_the_item_that_decides_them(syllogisms):
    """A small model copies the verdict of the item it has just written: every rule line's verdict follows from its
    last item alone (rules 1-3), and an inversion's list marks "(the conclusion)" on its last item exactly when the
    answer is Yes."""
    import re

    rule_line = re.compile(r"Rule ([123]) \([^)]*\): (.*?), (ok|broken)\.")
    seen = Counter()
    for i, (_, e) in enumerate(syllogisms[:800]):
        t = solve("syllogism", e, random.Random(i))
        if t is None:
            continue
        yes = extract_answer(t) == "Yes"
        if e["metadata"]["type"] == "inversion":
            listed = re.search(r"first: (.*?)\. ", t).group(1).split("; ")
            assert (t.count("(the conclusion)") == 1) == yes, t
            assert "(the conclusion)" not in "; ".join(listed[:-1]), t  # the list stops at the conclusion
            seen["inversion", yes] += 1
            continue
        for rule, items, verdict in rule_line.findall(t):
            last = re.split(r"[;,] ", items)[-1]
            broken = {"1": last.endswith("undistributed"), "2": bool(re.search(r"premise \d undistributed$", last)),
                      "3": last.endswith("negative")}[rule]
            assert broken == (verdict == "broken"), (rule, items, verdict)
            seen[rule, verdict] += 1
    assert all(seen[r, v] for r in "123" for v in ("ok", "broken")), seen
    assert seen["inversion", True] and seen["inversion", False], seen


def test_syllogism_rules_decide_exactly_what_entailment_decides():
    """Over every 3-term form (any quantifiers, any term order) with consistent premises: the four classical rules
    (standard forms) and the immediate-consequence lists (conclusion on one premise's terms) equal `entails`."""
    from itertools import permutations, product

    from smolthink.solvers.syllogism import _CONSEQUENCES, _allowed, entails, rule_checks

    qs = ("all", "no", "some", "some_not")
    counts = Counter()
    for (q1, q2, q3), (a, b, c) in product(product(qs, repeat=3), product(permutations(range(3), 2), repeat=3)):
        prem, concl = [(q1, *a), (q2, *b)], (q3, *c)
        if {*a} == {*b} or _allowed(prem, 3) is None:
            continue
        same = [st for st in prem if {*st[1:]} == {*c}]
        if same:
            q, x, y = same[0]
            got = concl in [(cq, x, y) if fwd else (cq, y, x) for cq, fwd in _CONSEQUENCES[q]]
        else:
            got = all(rule_checks(prem, concl))
        want = entails(prem, concl, 3)
        assert got == want, (prem, concl)
        counts[(bool(same), want)] += 1
    assert counts[(False, True)] > 0 and counts[(True, True)] > 0 and counts[(False, False)] > 0


def test_parse_and_show_round_trip(props):
    for _, e in props:
        for text in e["metadata"]["premises"] + [e["metadata"]["example_answer"]]:
            assert show(parse_formula(text)) == text


def test_propositional_traces_score_full_marks(props):
    traces, rules, none = [], Counter(), 0
    for i, (ds, e) in enumerate(props):
        t = solve("propositional_logic", e, random.Random(i))
        if t is None:  # only when every premise is a tautology: nothing non-trivial follows
            premises = [parse_formula(p) for p in e["metadata"]["premises"]]
            assert all(prop_entails([], p) for p in premises), e["metadata"]
            none += 1
            continue
        assert format_ok(t), t
        ans = extract_answer(t)
        assert ds.score_answer(ans, e) == 1.0, (e["metadata"], t)
        if ans in e["metadata"]["premises"]:  # a premise copy only when nothing else is available
            assert "The only usable fact" in t, t
        traces.append(t)
        rules.update(r for r in ("modus ponens", "∧-elimination", "conjunction", "∨-introduction")
                     if r in t or (r == "conjunction" and "Both" in t))
    assert none < 0.02 * len(props)
    assert all(rules[r] for r in ("modus ponens", "conjunction", "∨-introduction")), rules
    _check_common(traces)


@pytest.mark.parametrize("premises, expected", [
    (["P", "(P → (Q ∨ R))"], "(Q ∨ R)"),  # modus ponens
    (["(P → Q)", "¬Q", "R"], "¬P"),  # modus tollens
    (["(P ∨ ¬Q)", "¬P"], "¬Q"),  # disjunctive syllogism
    (["¬(P ↔ Q)", "P"], "¬Q"),
    (["Q", "(Q → P)"], "(P ∧ Q)"),  # a derived variable joined with a premise
    (["(P → Q)", "(R → Q)"], "((P → Q) ∧ (R → Q))"),  # nothing applies: conjunction of premises
    (["P", "P"], "(P ∨ Q)"),  # a single variable: ∨-introduction
])
def test_propositional_rules(premises, expected):
    entry = {"answer": None, "metadata": {"premises": premises, "variables": ["P", "Q", "R"]}}
    t = solve("propositional_logic", entry, random.Random(0))
    assert t is not None and format_ok(t) and extract_answer(t) == expected, t
    ds = rg.create_dataset("propositional_logic", seed=0, size=1)
    assert ds.score_answer(expected, entry) == 1.0
    assert solve("propositional_logic", {"metadata": {"premises": ["(P ∨ ¬P)"], "variables": ["P"]}},
                 random.Random(0)) is None
