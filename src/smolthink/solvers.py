"""Scripted solvers: short, regular step-by-step traces for warm-up SFT, written from a reasoning-gym item's
metadata with no model (`solve(task, entry, rng)`).

Every trace is `<think> ... </think> <answer> ANSWER </answer>` (see `chat.format_ok`). The answer comes from the
solver's own derivation and is then checked (syllogism: against the gold label; propositional_logic: by a truth
table, as the task's scorer does); an item that fails the check gets None, never a trace with a wrong answer.

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
from itertools import combinations, product
from typing import Any

SUPPORTED_TASKS = ("syllogism", "propositional_logic")


def solve(task: str, entry: dict[str, Any], rng: random.Random) -> str | None:
    """Full trace for one reasoning-gym item, or None if the task is unsupported or nothing verified derives."""
    try:
        if task == "syllogism":
            return solve_syllogism(entry, rng)
        if task == "propositional_logic":
            return solve_propositional(entry, rng)
    except (KeyError, ValueError, TypeError, RecursionError):
        return None
    return None


def _trace(steps: list[str], answer: str) -> str:
    """Join sentences (each capitalised) into the think block, then the answer block."""
    text = " ".join(st[:1].upper() + st[1:] for st in steps)
    return f"<think> {text} </think> <answer> {answer} </answer>"


# ---------------------------------------------------------------------------------------------------------------
# syllogism
# ---------------------------------------------------------------------------------------------------------------
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
# consequences (conversion, subalternation) and look the conclusion up in the list.
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
        steps = about + [f"Both are in premise {k + 1}, so it must follow from premise {k + 1} alone.",
                         f'Premise {k + 1} "{say(prem[k])}" gives: ' + "; ".join(say(st) for st in listed) + ".",
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
        steps.append(f"Rule 1 (middle term {names[m]}): " + ", ".join(
            f"premise {k + 1} {status(st, m)}" for k, st in enumerate(prem)) + f", {ok[checks[0]]}.")
        parts = []
        for t in (s, p):
            if t in concl_d:
                parts.append(f"{names[t]} distributed, premise {home[t]} {status(prem[home[t] - 1], t)}")
            else:
                parts.append(f"{names[t]} undistributed")
        steps.append("Rule 2 (conclusion terms): " + "; ".join(parts) + f", {ok[checks[1]]}.")
        steps.append("Rule 3 (negative premises): " + ", ".join(
            f"premise {k + 1} {quality(st)}" for k, st in enumerate(prem)) + f", {ok[checks[2]]}.")
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
    return _trace(steps, answer)


# ---------------------------------------------------------------------------------------------------------------
# propositional_logic
# ---------------------------------------------------------------------------------------------------------------
# formula: ("var", "P") | ("¬", f) | (op, f, g) with op in "∧∨→↔"; written as reasoning-gym writes them:
# "¬f", "(f op g)". A derived fact maps formula -> (rule, parent formulas, index in derivation order).

_BINARY = ("↔", "→", "∨", "∧")  # loosest first, as reasoning-gym's parser splits


def parse_formula(text: str) -> tuple:
    """Parse reasoning-gym's notation with its own precedence (↔ < → < ∨ < ∧, split at the rightmost)."""
    s = text.strip()
    if not s:
        raise ValueError("empty formula")
    if s[0] == "(" and s[-1] == ")":
        level = 0
        for c in s[1:-1]:
            level += (c == "(") - (c == ")")
            if level < 0:
                break
        if level == 0:
            return parse_formula(s[1:-1])
    for op in _BINARY:
        level = 0
        for i in range(len(s) - 1, -1, -1):
            level += (s[i] == ")") - (s[i] == "(")
            if level == 0 and s[i] == op:
                return (op, parse_formula(s[:i]), parse_formula(s[i + 1:]))
    if s.startswith("¬"):
        return ("¬", parse_formula(s[1:]))
    return ("var", s)


def show(f: tuple) -> str:
    """A formula in the dataset's notation."""
    if f[0] == "var":
        return f[1]
    if f[0] == "¬":
        return "¬" + show(f[1])
    return f"({show(f[1])} {f[0]} {show(f[2])})"


def _value(f: tuple, env: dict[str, bool]) -> bool:
    op = f[0]
    if op == "var":
        return env[f[1]]
    if op == "¬":
        return not _value(f[1], env)
    a, b = _value(f[1], env), _value(f[2], env)
    return {"∧": a and b, "∨": a or b, "→": (not a) or b, "↔": a == b}[op]


def _vars(f: tuple) -> set[str]:
    return {f[1]} if f[0] == "var" else set().union(*(_vars(g) for g in f[1:]))


def prop_entails(premises: list[tuple], goal: tuple) -> bool:
    """Truth-table entailment (the task scorer's test)."""
    names = sorted(set().union(_vars(goal), *(_vars(p) for p in premises)))
    for bits in product((False, True), repeat=len(names)):
        env = dict(zip(names, bits))
        if all(_value(p, env) for p in premises) and not _value(goal, env):
            return False
    return True


def _trivial(f: tuple) -> bool:
    """What the scorer gives only 0.25 for: a bare variable or a tautology."""
    return f[0] == "var" or prop_entails([], f)


def _degenerate(f: tuple) -> bool:
    """Has a part like (A ∨ A): true but an odd thing to conclude."""
    return f[0] != "var" and ((len(f) == 3 and f[1] == f[2]) or any(_degenerate(g) for g in f[1:]))


def _neg(f: tuple) -> tuple:
    return f[1] if f[0] == "¬" else ("¬", f)


def _one_step(f: tuple) -> list[tuple[tuple, str, tuple]]:
    """(result, rule, parents) for every one-step rule with f as its main premise; parents[1:] must be facts too."""
    op, g = f[0], f[1]
    if op == "∧":
        return [(f[1], "and", (f,)), (f[2], "and", (f,))]
    if op == "∨":
        return [(g, "or_same", (f,))] if g == f[2] else [(f[2], "ds", (f, _neg(g))), (g, "ds", (f, _neg(f[2])))]
    if op == "→":
        return [(f[2], "mp", (f, g)), (_neg(g), "mt", (f, _neg(f[2])))]
    if op == "↔":
        a, b = g, f[2]
        return [(b, "iff", (f, a)), (a, "iff", (f, b)), (_neg(b), "iff", (f, _neg(a))), (_neg(a), "iff", (f, _neg(b)))]
    if op == "¬" and g[0] == "¬":
        return [(g[1], "dneg", (f,))]
    if op == "¬" and g[0] == "∨":
        return [(_neg(g[1]), "not_or", (f,)), (_neg(g[2]), "not_or", (f,))]
    if op == "¬" and g[0] == "→":
        return [(g[1], "not_imp", (f,)), (_neg(g[2]), "not_imp", (f,))]
    if op == "¬" and g[0] == "↔":
        x, y = g[1], g[2]
        return [(_neg(y), "not_iff", (f, x)), (_neg(x), "not_iff", (f, y)), (y, "not_iff", (f, _neg(x))),
                (x, "not_iff", (f, _neg(y)))]
    return []


def derive(premises: list[tuple], max_facts: int = 40) -> dict[tuple, tuple[str, tuple, int]]:
    """Forward chaining with sound one-step rules until nothing new (or max_facts): ∧-elimination, modus ponens,
    modus tollens, disjunctive syllogism, ↔ and ¬↔ elimination, double negation, ¬∨ / ¬→ (De Morgan), (A ∨ A).
    Returns formula -> (rule, parent formulas, index); premises have rule "premise" and no parents."""
    facts: dict[tuple, tuple[str, tuple, int]] = {}
    for p in premises:
        facts.setdefault(p, ("premise", (), len(facts)))
    changed = True
    while changed and len(facts) < max_facts:
        changed = False
        for f in list(facts):
            for res, rule, parents in _one_step(f):
                if res not in facts and all(x in facts for x in parents) and len(facts) < max_facts:
                    facts[res] = (rule, parents, len(facts))
                    changed = True
    return facts


_RULE_SAY = {
    "and": ["{0} gives {r} (∧-elimination).", "From {0}, in particular {r}."],
    "or_same": ["{0} has the same thing on both sides, so {r}."],
    "ds": ["{0} and {1} leave {r} (disjunctive syllogism).", "From {0}, since {1}, the other side holds: {r}."],
    "mp": ["{0} and {1} give {r} by modus ponens.", "Since {1} and {0}, modus ponens gives {r}."],
    "mt": ["{0} and {1} give {r} by modus tollens.", "Since {1} and {0}, modus tollens gives {r}."],
    "iff": ["{0} and {1} give {r}.", "Since {1} and {0}, the two sides agree, so {r}."],
    "not_iff": ["{0} says the two sides differ, and {1}, so {r}.", "Since {1} and the sides of {0} differ, {r}."],
    "dneg": ["{0} is the same as {r} (double negation)."],
    "not_or": ["{0} means neither side holds, so {r}.", "By De Morgan, {0} gives {r}."],
    "not_imp": ["{0} means the implication fails, so {r}.", "An implication is false only when its condition holds "
                "and its result fails, so {0} gives {r}."],
}
_INFERENCES = ("mp", "mt", "ds", "iff", "not_iff")
_OPEN_PROP = ["Let me see which rules apply to the premises.", "I'll look for premises that combine.",
              "Let me check which inference rules fit.", "Look for a step that uses the premises."]
_CLOSE_PROP = ["So we can conclude {c}.", "Therefore {c} follows from the premises.", "This gives the conclusion {c}."]


def solve_propositional(entry: dict[str, Any], rng: random.Random) -> str | None:
    """Derive a non-trivial entailed formula (a modus ponens etc. result, else a conjunction) and narrate it."""
    premises = [parse_formula(t) for t in entry["metadata"]["premises"]]
    facts = derive(premises)
    first = {p: i + 1 for i, p in reversed(list(enumerate(premises)))}  # formula -> first premise number

    def proof(f: tuple) -> list[tuple]:
        """The derived (non-premise) facts f rests on, f included, in derivation order."""
        seen, todo = set(), [f]
        while todo:
            g = todo.pop()
            if g not in seen and g not in first:
                seen.add(g)
                todo += list(facts[g][1])
        return sorted(seen, key=lambda g: facts[g][2])

    def cite(f: tuple) -> str:
        return f"{show(f)} (premise {first[f]})" if f in first else show(f)

    said: list[tuple] = []

    def narrate(f: tuple) -> list[str]:
        out = []
        for g in proof(f):
            if g not in said:
                said.append(g)
                out.append(rng.choice(_RULE_SAY[facts[g][0]]).format(*map(cite, facts[g][1]), r=show(g)))
        return out

    def key(f: tuple) -> tuple:  # no (A op A) parts, a real inference (not just ∧-elimination), short proof
        real = any(facts[g][0] in _INFERENCES for g in proof(f))
        return (_degenerate(f), not real, len(proof(f)), len(show(f)), rng.random())

    facts_ok = sorted((f for f in facts if not prop_entails([], f)), key=key)  # tautologies say nothing
    derived = [f for f in facts_ok if f not in first]
    main = next((f for f in derived if f[0] != "var"), derived[0] if derived else None)
    steps = [rng.choice(_OPEN_PROP)]
    if main is not None:
        steps += narrate(main)
        answer = main
        if main[0] == "var":  # a lone variable scores as trivial: join it with another fact
            above = {x for g in proof(main) for x in facts[g][1]}  # what main came from: a poor partner
            others = [g for g in facts_ok if g != main and ("∧", main, g) not in first]
            other = min(others, key=lambda g: (g in above, _degenerate(g), len(show(g)) + 4 * len(proof(g))),
                        default=None)
            if other is None:
                return None
            answer = ("∧", main, other)
            steps += narrate(other) + [rng.choice(
                ["A single variable is too trivial, so I join {a} with {b}: {c}.",
                 "To state more than one variable, combine {a} and {b}: {c}."]).format(
                a=show(main), b=cite(other), c=show(answer))]
    else:
        usable = list(dict.fromkeys(f for f in facts_ok if f in first))  # shortest first
        pairs = [sorted(ab, key=first.get) for ab in combinations(usable, 2)]
        pairs = [ab for ab in pairs if ("∧", *ab) not in first]  # not a copy of a premise
        if pairs:  # ∧-introduction of two short premises, in premise order
            usable = pairs[0]
            answer = ("∧", *usable)
            steps.append(rng.choice(["No rule gives anything new here.", "No premise unlocks another."]))
            steps.append(rng.choice(["Premises {i} and {j} both hold, so their conjunction holds: {c}.",
                                     "Both {a} and {b} are given, so {c}."]).format(
                i=first[usable[0]], j=first[usable[1]], a=cite(usable[0]), b=cite(usable[1]), c=show(answer)))
        elif len(usable) == 1 and usable[0][0] == "var":  # a single fact, a bare variable: ∨-introduction
            other = next((v for v in entry["metadata"].get("variables", []) if v != usable[0][1]), None)
            if other is None:
                return None
            answer = ("∨", usable[0], ("var", other))
            steps.append(f"Only {cite(usable[0])} is given. If {show(usable[0])} holds then so does "
                         f"{show(answer)} (∨-introduction).")
        elif usable:
            answer = usable[0]
            steps.append(f"The only usable fact is {cite(answer)} itself, and it is a valid conclusion.")
        else:
            return None  # only tautologies: nothing non-trivial follows
    if _trivial(answer) or not prop_entails(premises, answer):
        return None
    steps.append(rng.choice(_CLOSE_PROP).format(c=show(answer)))
    return _trace(steps, show(answer))
