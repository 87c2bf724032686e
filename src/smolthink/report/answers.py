"""What the model answers: the distribution of predicted answer classes of one eval, from the best source the
run directory holds, and the warning when one class takes nearly all answers (reasoning vs always giving the
majority answer)."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from ..chat import answer_label
from .fmt import pct
from .load import EvalPoint, is_num, read_jsonl

COLLAPSE_SHARE = 0.9  # one answer class in >= this share of the answered completions -> answer collapse


@dataclass
class AnswerDist:
    """Shares of the predicted answer classes among answered completions."""

    shares: dict[str, float]  # class -> share of the answered completions, most common first
    answered: float  # share of completions with an answer
    n: int  # completions counted (0 when only shares are known)
    source: str  # where it came from (reads after "from")
    exact: bool = True  # False when estimated or from a handful of samples
    gold_shares: dict[str, float] = field(default_factory=dict)

    @property
    def top(self) -> tuple[str, float] | None:
        """The most common class and its share, or None when nothing was answered."""
        return next(iter(self.shares.items()), None)


def _shares(counter: Counter) -> dict[str, float]:
    total = sum(counter.values())
    return {k: v / total for k, v in counter.most_common()} if total else {}


def answer_distribution(point: EvalPoint | None) -> AnswerDist | None:
    """From the completions JSONL when present, else the summary's answer_distribution, else (binary tasks) an
    estimate from per-class accuracy, else the summary's few samples."""
    if point is None:
        return None
    if point.completions is not None:
        dist = _from_completions(point)
        if dist is not None:
            return dist
    s = point.summary
    gold_shares = _gold_shares(s)
    return _from_summary_counts(s, gold_shares) or _from_class_accuracy(s, gold_shares) or \
        _from_samples(s, gold_shares)


def _from_completions(point: EvalPoint) -> AnswerDist | None:
    recs = [r for r in read_jsonl(point.completions) if "answer" in r]
    if not recs:
        return None
    labels = [answer_label(r.get("answer")) for r in recs]
    answered = Counter(lb for lb in labels if lb is not None)
    gold = Counter(answer_label(r.get("gold")) for r in recs if r.get("gold") is not None)
    return AnswerDist(_shares(answered), sum(answered.values()) / len(recs), len(recs),
                      f"`{point.completions.name}`", gold_shares=_shares(gold))


def _from_summary_counts(s: dict[str, Any], gold_shares: dict[str, float]) -> AnswerDist | None:
    """The summary's answer_distribution ({label: share}, "<none>" for no answer), relabelled and merged."""
    dist = s.get("answer_distribution")
    if not isinstance(dist, dict) or not dist:
        return None
    none = sum(float(v) for k, v in dist.items() if answer_label(k if k != "<none>" else None) is None)
    merged: Counter = Counter()
    for k, v in dist.items():
        lb = answer_label(k) if k != "<none>" else None
        if lb is not None and is_num(v):
            merged[lb] += float(v)
    total = sum(merged.values())
    if total <= 0:
        return None
    return AnswerDist({k: v / total for k, v in merged.most_common()}, max(0.0, 1.0 - none), _n_completions(s),
                      "the eval summary's answer_distribution", gold_shares=gold_shares)


def _from_class_accuracy(s: dict[str, Any], gold_shares: dict[str, float]) -> AnswerDist | None:
    """Binary tasks: the answer shares implied by per-class accuracy, assuming every wrong answer is the other
    class."""
    pca = s.get("per_class_accuracy")
    if not (isinstance(pca, dict) and len(pca) == 2 and all(is_num(v) for v in pca.values())
            and len(gold_shares) == 2):
        return None
    (c1, a1), (c2, a2) = pca.items()
    g1, g2 = gold_shares.get(c1, 0.5), gold_shares.get(c2, 0.5)
    p1 = g1 * a1 + g2 * (1 - a2)
    shares = dict(sorted({answer_label(c1) or c1: p1, answer_label(c2) or c2: 1 - p1}.items(),
                         key=lambda kv: -kv[1]))
    return AnswerDist(shares, 1.0, _n_completions(s), "per-class accuracy (binary-task estimate)",
                      exact=False, gold_shares=gold_shares)


def _from_samples(s: dict[str, Any], gold_shares: dict[str, float]) -> AnswerDist | None:
    """The handful of sample completions an eval summary keeps."""
    samples = s.get("samples")
    if not isinstance(samples, list) or not samples:
        return None
    labels = [answer_label(r.get("answer")) for r in samples if isinstance(r, dict)]
    if not labels:
        return None
    answered = Counter(lb for lb in labels if lb is not None)
    return AnswerDist(_shares(answered), sum(answered.values()) / len(labels), len(labels),
                      f"only {len(labels)} sample completions", exact=False, gold_shares=gold_shares)


def _n_completions(s: dict[str, Any]) -> int:
    n, k = s.get("n"), s.get("samples_per_question") or 1
    return int(n * k) if is_num(n) and is_num(k) else 0


def _gold_shares(s: dict[str, Any]) -> dict[str, float]:
    """Gold class shares for a binary task, from majority_class/majority_baseline and per_class_accuracy keys."""
    maj, base, pca = s.get("majority_class"), s.get("majority_baseline"), s.get("per_class_accuracy")
    if maj is None or not is_num(base):
        return {}
    out = {answer_label(maj) or str(maj): float(base)}
    others = [c for c in (pca or {}) if c != maj]
    if len(others) == 1:
        out[answer_label(others[0]) or others[0]] = 1.0 - float(base)
    return out


def collapse_message(dist: AnswerDist | None, what: str) -> str | None:
    """'the model answers 'Yes' to 93% of questions: ...' when one class holds >= COLLAPSE_SHARE of the answers."""
    if dist is None or dist.top is None or dist.answered < 0.5:
        return None
    cls, share = dist.top
    if share < COLLAPSE_SHARE:
        return None
    of = "questions" if dist.answered >= 0.999 else f"answered questions ({pct(dist.answered)} answered)"
    msg = (f"{what} answers '{cls}' to {pct(share)} of {of}: accuracy reflects the class balance, "
           f"not reasoning")
    gold = dist.gold_shares.get(cls)
    if gold is not None:
        msg += f" (the gold answer is '{cls}' for {pct(gold)})"
    if not dist.exact:
        msg += f" [from {dist.source}]"
    return msg + "."
