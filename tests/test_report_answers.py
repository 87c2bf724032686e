"""What the model answers, as the report counts it: answer distributions from eval summaries and completions, the
collapse warning, and agreement with the reward's answer matching."""
from __future__ import annotations

import json
import math
from pathlib import Path

from report_runs import eval_summary
from smolthink.report.answers import answer_distribution, collapse_message
from smolthink.report.load import EvalPoint
from smolthink.tasks import strict_match


def test_collapse_from_summary_without_completions():
    """No completions file: the summary's per-class accuracy still exposes always-Yes (binary estimate)."""
    s = eval_summary(40, 0.5, (0.43, 0.57), 1.0, 50.0, samples=[])
    s["per_class_accuracy"] = {"No": 0.0, "Yes": 1.0}
    dist = answer_distribution(EvalPoint(40, s, Path("x.json"), None))
    assert dist is not None and dist.top == ("Yes", 1.0)
    assert "answers 'Yes' to 100% of questions" in collapse_message(dist, "the model")
    s["answer_distribution"] = {"Yes": 0.6, "No": 0.35, "<none>": 0.05}
    dist = answer_distribution(EvalPoint(40, s, Path("x.json"), None))
    assert dist.top[0] == "Yes" and math.isclose(dist.top[1], 0.6 / 0.95) and math.isclose(dist.answered, 0.95)
    assert collapse_message(dist, "the model") is None


def test_report_classes_agree_with_the_reward(tmp_path):
    """Two answers fall in one class of the report's distribution exactly when the reward counts them as the same
    answer: "valid." and "Valid" are one class (case-free, one trailing dot dropped), "Yes.." is not "Yes"."""
    answers = ["valid.", "Valid", "VALID", "Yes..", "Yes", "yes.", "Invalid"]
    golds = ["Valid", "Valid", "Valid", "Yes", "Yes", "Yes", "Valid"]
    path = tmp_path / "completions.jsonl"
    path.write_text("".join(json.dumps({"answer": a, "gold": g}) + "\n" for a, g in zip(answers, golds)))
    dist = answer_distribution(EvalPoint(0, {}, tmp_path / "eval.json", path))
    assert dist.shares == {"Valid": 3 / 7, "Yes": 2 / 7, "Yes..": 1 / 7, "Invalid": 1 / 7}
    assert [strict_match(a, g) for a, g in zip(answers, golds)] == [True, True, True, False, True, True, False]
