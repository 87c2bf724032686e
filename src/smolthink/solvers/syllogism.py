"""Scripted syllogism traces: the four rules of the categorical syllogism, decided on Venn regions.

Syllogism decider: each statement is a constraint on the Venn regions of its terms (a region = which terms an
object belongs to). "All S are P" empties the S-and-not-P regions, "No S are P" the S-and-P regions, "Some S are
(not) P" needs one of them non-empty; every term is non-empty (existential import, the convention of reasoning-gym's
generator: it accepts AAI and EAO). Such constraints are satisfiable iff every "some" set meets the regions no
universal empties, so "premises entail C" = premises + import + not-C is unsatisfiable.
Known gold errors: reasoning-gym's rule checker forgets "the middle term must be distributed", so it labels
"All S are M, Some M are P => Some S are P" and "All S are M, Some M are not P => Some S are not P" as valid (about
one syllogism item in eight). The decider says No there; `solve` then returns None rather than argue a fallacy.
"""
from __future__ import annotations

import random
import re
from typing import Any

from ..chat import format_trace

# statement: (q, s, p) with q in {"all", "no", "some", "some_not"}; s, p term indices (or plural names when parsed)
# constraint: ("empty" | "exists", frozenset of regions); a region is a bitmask over term indices

_STMT_RE = re.compile(r"^\s*(All|No|Some)\s+(.+?)\s+are\s+(not\s+)?(.+?)\s*[.?]?\s*$", re.IGNORECASE)
_CONTRA = {"all": "some_not", "some_not": "all", "no": "some", "some": "no"}


def parse_statement(text: str) -> tuple[str, str, str]:
    """'Some cats are not dogs' -> ("some_not", "cats", "dogs"); raises ValueError on other shapes."""
    m = _STMT_RE.match(text)
    if not m or (m.group(3) and m.group(1).lower() != "some"):
        raise ValueError(f"not a categorical statement: {text!r}")
    q = m.group(1).lower() + ("_not" if m.group(3) else "")
    return q, m.group(2), m.group(4)


def _constraint(stmt: tuple[str, int, int], n: int) -> tuple[str, frozenset[int]]:
    q, s, p = stmt
    want_p = q in ("no", "some")  # the regions All/Some-not talk about lack P; No/Some's have it
    regions = frozenset(r for r in range(2**n) if r >> s & 1 and bool(r >> p & 1) == want_p)
    return ("empty" if q in ("all", "no") else "exists"), regions


def _allowed(stmts: list[tuple[str, int, int]], n: int) -> frozenset[int] | None:
    """Regions a model may fill (all non-emptied ones, the largest model), or None when unsatisfiable
    (with every term non-empty)."""
    cons = [_constraint(s, n) for s in stmts] + [("exists", frozenset(r for r in range(2**n) if r >> t & 1))
                                                 for t in range(n)]
    allowed = frozenset(range(2**n)).difference(*[rs for kind, rs in cons if kind == "empty"])
    return allowed if all(allowed & rs for kind, rs in cons if kind == "exists") else None


def entails(premises: list[tuple[str, int, int]], stmt: tuple[str, int, int], n: int) -> bool:
    """Premises (with existential import) entail stmt: no model has the premises and stmt's contradictory."""
    return _allowed(premises + [(_CONTRA[stmt[0]], stmt[1], stmt[2])], n) is None


def _parse_item(entry: dict[str, Any]) -> tuple[list[str], list[tuple[str, int, int]], tuple[str, int, int]]:
    meta = entry["metadata"]
    raw = [parse_statement(meta["premise1"]), parse_statement(meta["premise2"]), parse_statement(meta["conclusion"])]
    names: list[str] = []
    for _, s, p in raw:
        names += [t for t in (s, p) if t not in names]
    if len(names) > 4:
        raise ValueError("too many terms")
    idx = [(q, names.index(s), names.index(p)) for q, s, p in raw]
    return names, idx[:2], idx[2]


def syllogism_verdict(entry: dict[str, Any]) -> bool | None:
    """True iff the conclusion follows from the two premises (None: unparsable or inconsistent premises).
    Disagrees with reasoning-gym's `is_valid` exactly on its undistributed-middle errors (module docstring)."""
    try:
        names, prem, concl = _parse_item(entry)
    except (KeyError, ValueError):
        return None
    return None if _allowed(prem, len(names)) is None else entails(prem, concl, len(names))


# The trace applies the classical rules of the categorical syllogism. Under existential import they decide exactly
# what `entails` decides (checked over every 3-term form in tests/test_solvers.py), and each step is a lookup or a
# copy that a small model can imitate: what each statement distributes, then four rules, then the verdict.
# Items whose conclusion re-reads one premise (reasoning-gym's "inversion" type) list that premise's immediate
# consequences (conversion, subalternation) about the conclusion's subject, marking the conclusion where it appears.
# Every verdict sits next to the item that decides it: a 135M model copies the last thing it wrote far more
# reliably than it compares a statement with a list written earlier.
_PLAIN = {"all": "all {S} are {P}", "no": "no {S} are {P}", "some": "some {S} are {P}",
          "some_not": "some {S} are not {P}"}
_NEGATIVE = ("no", "some_not")
_CONSEQUENCES = {  # (q, X, Y) -> statements about X, Y that it alone entails (existential import), as (q, X-first)
    "all": [("all", True), ("some", True), ("some", False)],
    "no": [("no", True), ("some_not", True), ("no", False), ("some_not", False)],
    "some": [("some", True), ("some", False)],
    "some_not": [("some_not", True)],
}
_VALID = ["So the conclusion follows.", "Hence the conclusion is valid."]
_INVALID = ["So the conclusion does not follow.", "Hence the conclusion is not valid."]


def distributes(stmt: tuple[str, int, int]) -> list[int]:
    """Terms a statement says something about in full: All S-P -> S, No -> S and P, Some -> none, Some-not -> P."""
    q, s, p = stmt
    return {"all": [s], "no": [s, p], "some": [], "some_not": [p]}[q]


def rule_checks(prem: list[tuple[str, int, int]], concl: tuple[str, int, int]) -> list[bool]:
    """The four rules for a standard syllogism (conclusion terms in different premises), in trace order:
    middle term distributed at least once; no term distributed in the conclusion but not in its premise; not two
    negative premises; the conclusion is negative iff one premise is."""
    m = ({0, 1, 2} - {concl[1], concl[2]}).pop()
    n_neg = sum(q in _NEGATIVE for q, _, _ in prem)
    home = {t: next(st for st in prem if t in st[1:]) for t in (concl[1], concl[2])}
    return [any(m in distributes(st) for st in prem),
            all(t in distributes(home[t]) for t in distributes(concl)),
            n_neg < 2,
            (concl[0] in _NEGATIVE) == (n_neg == 1)]


def _upto(items: list[str], flags: list[bool], decides_on: bool) -> list[str]:
    """`items` up to and including the first whose flag equals `decides_on` (all of them when none does)."""
    cut = next((i for i, f in enumerate(flags) if f == decides_on), len(items) - 1)
    return items[: cut + 1]


def solve_syllogism(entry: dict[str, Any], rng: random.Random) -> str | None:
    """Rule-by-rule trace (or, for a conclusion about one premise's terms, that premise's consequences) -> Yes/No."""
    names, prem, concl = _parse_item(entry)
    if len(names) != 3 or _allowed(prem, 3) is None:  # reasoning-gym items always have 3 terms
        return None

    def say(stmt: tuple[str, int, int]) -> str:
        return _PLAIN[stmt[0]].format(S=names[stmt[1]], P=names[stmt[2]])

    q, s, p = concl
    # first copy which terms each statement links: the branch below is then a comparison of two term pairs
    about = [f"Premise {k + 1} links {names[a]} and {names[b]}." for k, (_, a, b) in enumerate(prem)]
    about.append(f"The conclusion links {names[s]} and {names[p]}.")
    # then look each conclusion term up in the premise lines: the branch is read off two short lookups
    where = {t: [k + 1 for k, st in enumerate(prem) if t in st[1:]] for t in (s, p)}
    about.append("Where they occur: " + "; ".join(
        f"{names[t]} in premise {where[t][0]}" if len(where[t]) == 1 else f"{names[t]} in premises 1 and 2"
        for t in (s, p)) + ".")
    together = [k for k, (_, a, b) in enumerate(prem) if {a, b} == {s, p}]
    if together:
        k = together[0]
        pq, x, y = prem[k]
        listed = [(cq, x, y) if same else (cq, y, x) for cq, same in _CONSEQUENCES[pq]]
        valid = concl in listed
        # only the consequences about the conclusion's subject, each marked as it is written, up to the conclusion:
        # the verdict is then a copy of the mark on the line just written, not a search back through a list
        shown = []
        for st in (st for st in listed if st[1] == s):
            shown.append(say(st) + (" (the conclusion)" if st == concl else ""))
            if st == concl:
                break
        steps = about + [f"Both are in premise {k + 1}, so it must follow from premise {k + 1} alone.",
                         f'Premise {k + 1} "{say(prem[k])}" gives, with {names[s]} first: '
                         + ("; ".join(shown) if shown else "nothing") + ".",
                         rng.choice(["The conclusion is in this list, so it follows." if valid else
                                     "The conclusion is not in this list, so it does not follow.",
                                     "That list contains the conclusion, so it follows." if valid else
                                     "That list does not contain the conclusion, so it does not follow."])]
    else:
        m = ({0, 1, 2} - {s, p}).pop()
        checks = rule_checks(prem, concl)
        valid = all(checks)
        n_neg = sum(st[0] in _NEGATIVE for st in prem)
        home = {t: where[t][0] for t in (s, p)}  # a standard syllogism's conclusion terms occur in one premise each
        concl_d = distributes(concl)
        ok = {True: "ok", False: "broken"}
        steps = about + [f"They are in different premises, so the middle term is {names[m]}."]
        # every check copies a status written earlier next to the same term name (a lookup, not a search)
        status = lambda st, t: "distributed" if t in distributes(st) else "undistributed"
        quality = lambda st: "negative" if st[0] in _NEGATIVE else "affirmative"
        for label, st in [("Premise 1", prem[0]), ("Premise 2", prem[1]), ("Conclusion", concl)]:
            steps.append(f'{label} "{say(st)}": {quality(st)}; {names[st[1]]} {status(st, st[1])}, '
                         f"{names[st[2]]} {status(st, st[2])}.")
        # each rule lists its items only up to the one that decides it, so the verdict copies the item just written
        rule1 = _upto([f"premise {k + 1} {status(st, m)}" for k, st in enumerate(prem)],
                      [m in distributes(st) for st in prem], decides_on=True)
        steps.append(f"Rule 1 (middle term {names[m]}): " + ", ".join(rule1) + f", {ok[checks[0]]}.")
        items2 = [f"{names[t]} distributed, premise {home[t]} {status(prem[home[t] - 1], t)}" if t in concl_d
                  else f"{names[t]} undistributed" for t in (s, p)]
        fine2 = [t not in concl_d or t in distributes(prem[home[t] - 1]) for t in (s, p)]
        steps.append("Rule 2 (conclusion terms): " + "; ".join(_upto(items2, fine2, decides_on=False))
                     + f", {ok[checks[1]]}.")
        rule3 = _upto([f"premise {k + 1} {quality(st)}" for k, st in enumerate(prem)],
                      [st[0] not in _NEGATIVE for st in prem], decides_on=True)
        steps.append("Rule 3 (negative premises): " + ", ".join(rule3) + f", {ok[checks[2]]}.")
        steps.append(f"Rule 4 (quality): conclusion {quality(concl)}, {['no', 'one', 'two'][n_neg]} negative "
                     f"premise{'s' if n_neg == 2 else ''}, {ok[checks[3]]}.")
        broken = [str(r + 1) for r, good in enumerate(checks) if not good]
        steps.append(f"Broken rules: {', '.join(broken) if broken else 'none'}.")
        steps.append(rng.choice(_VALID if valid else _INVALID))
    if valid != entails(prem, concl, 3):  # the rules are exact (tested); this guards against a regression
        return None
    answer = "Yes" if valid else "No"
    gold = entry.get("answer")
    if gold is not None and str(gold).strip().casefold() != answer.casefold():
        return None  # the gold label disagrees with the logic (see the module docstring): no trace
    return format_trace(steps, answer)
