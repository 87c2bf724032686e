"""What changed between stages: the eval questions that flipped right -> wrong and wrong -> right from one stage to
the next (base -> sft -> grpo, and sft -> the equal-time SFT control), with a few examples of each. Read from the
eval completion files; a question counts as right when at least half of its samples are."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .context import EvalRow, ReportContext
from .fmt import fence, shorten
from .load import read_jsonl

N_EXAMPLES = 3  # examples shown per direction
QUESTION_CHARS = 240
COMPLETION_CHARS = 400


@dataclass
class Flips:
    """Two stages' eval answers compared question by question."""

    before: str
    after: str
    common: int  # questions both evaluated
    to_wrong: list[tuple[dict[str, Any], dict[str, Any]]]  # (before record, after record) pairs
    to_right: list[tuple[dict[str, Any], dict[str, Any]]]


def _by_question(row: EvalRow) -> dict[str, tuple[bool, dict[str, Any]]] | None:
    """question id -> (right, its first record) from an eval row's completions file; None without one."""
    if row.point is None or row.point.completions is None:
        return None
    grouped: dict[str, list[dict[str, Any]]] = {}
    for rec in read_jsonl(row.point.completions):
        grouped.setdefault(str(rec.get("id", rec.get("question"))), []).append(rec)
    return {q: (2 * sum(bool(r.get("correct")) for r in recs) >= len(recs), recs[0]) for q, recs in grouped.items()}


def compare(before: EvalRow, after: EvalRow) -> Flips | None:
    """The flips from `before` to `after`, in eval order; None when either lacks a completions file."""
    a, b = _by_question(before), _by_question(after)
    if a is None or b is None:
        return None
    common = [q for q in a if q in b]
    to_wrong = [(a[q][1], b[q][1]) for q in common if a[q][0] and not b[q][0]]
    to_right = [(a[q][1], b[q][1]) for q in common if not a[q][0] and b[q][0]]
    return Flips(before.label, after.label, len(common), to_wrong, to_right)


def _cut(text: Any) -> str:
    """A completion cut to COMPLETION_CHARS, line breaks kept."""
    text = str(text or "")
    return text if len(text) <= COMPLETION_CHARS else text[:COMPLETION_CHARS].rstrip() + " …"


def _examples(flips: Flips, pairs: list[tuple[dict[str, Any], dict[str, Any]]], title: str) -> list[str]:
    out = [f"{title}:", ""] if pairs else []
    for i, (old, new) in enumerate(pairs[:N_EXAMPLES], 1):
        out += [f"**{i}.** gold: `{old.get('gold')}` · {flips.before}: `{old.get('answer')}` · {flips.after}: "
                f"`{new.get('answer')}`", "", f"> {shorten(old.get('question'), QUESTION_CHARS)}", "",
                f"{flips.before}:", "", fence(_cut(old.get("completion"))), "",
                f"{flips.after}:", "", fence(_cut(new.get("completion"))), ""]
    return out


def flips_section(ctx: ReportContext) -> list[str]:
    """Counts and examples of flipped questions between consecutive stages (and sft -> control)."""
    pairs = list(zip(ctx.rows, ctx.rows[1:]))
    sft = next((row for row in ctx.rows if row.label == "sft"), None)
    if ctx.control is not None and sft is not None:
        pairs.append((sft, ctx.control))
    found = [f for f in (compare(a, b) for a, b in pairs) if f is not None and f.common]
    if not found:
        return []
    out = ["## What changed between stages", "", "| from → to | questions | right → wrong | wrong → right | net |",
           "|---|---:|---:|---:|---:|"]
    for f in found:
        out.append(f"| {f.before} → {f.after} | {f.common} | {len(f.to_wrong)} | {len(f.to_right)} | "
                   f"{len(f.to_right) - len(f.to_wrong):+d} |")
    out.append("")
    for f in found:
        if f.to_wrong or f.to_right:
            out += [f"### {f.before} → {f.after}", ""]
            out += _examples(f, f.to_wrong, "Right → wrong") + _examples(f, f.to_right, "Wrong → right")
    return out
