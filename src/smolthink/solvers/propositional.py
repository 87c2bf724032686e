"""Scripted propositional_logic traces: a short derivation by named inference rules, checked by a truth table."""
from __future__ import annotations

import random
from itertools import combinations, product
from typing import Any

from ..chat import format_trace

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
    return format_trace(steps, show(answer))
