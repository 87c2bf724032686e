"""report.md + plots from fake-but-realistic run directories (single-stage, pipeline, pipeline stopped early)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from smolthink.report import answer_distribution, answer_label, load_eval_file, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
QUESTIONS = [f"Consider the premises: all A{i} are B{i}; some B{i} are C{i}. Does it follow that some A{i} are C{i}? "
             "Answer Yes or No." for i in range(8)]


# ------------------------------------------------------------------------------------------ fake run builders


def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _write_jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def completions(n: int, yes_share: float, acc: float) -> list[dict]:
    """n balanced-gold eval records; round(n*yes_share) answers are 'Yes'; correctness follows gold == answer
    (acc is only used to set 'correct' for the non-collapsed, balanced case)."""
    n_yes = round(n * yes_share)
    recs = []
    for i in range(n):
        gold = "Yes" if i % 2 == 0 else "No"
        answer = "Yes" if i < n_yes else "No"
        if yes_share == 0.5:  # balanced answers: make round(n*acc) of them correct
            answer = gold if i < round(n * acc) else ("No" if gold == "Yes" else "Yes")
        recs.append({"id": i, "question": QUESTIONS[i % 8], "completion": f"<think>step {i}</think>\n"
                     f"<answer>{answer}</answer>", "answer": answer, "gold": gold, "correct": float(answer == gold),
                     "format": 1.0, "length": 40 + i % 7, "truncated": False})
    return recs


def eval_summary(step: int, acc: float, ci: tuple[float, float], fmt: float, mean_len: float, n: int = 200,
                 balanced: float | None = None, samples: list[dict] | None = None, **extra) -> dict:
    return {"step": step, "model": "HuggingFaceTB/SmolLM2-135M-Instruct", "task": "syllogism", "n": n,
            "samples_per_question": 1, "accuracy": acc, "accuracy_ci95": list(ci),
            "balanced_accuracy": acc if balanced is None else balanced,
            "per_class_accuracy": {"No": acc, "Yes": acc}, "majority_baseline": 0.5, "majority_class": "No",
            "format_rate": fmt, "partial_credit": 0.0, "mean_completion_len": mean_len, "truncated_frac": 0.01,
            "scoring_errors": 0, "pass@k": None, "mean@k": None, "seconds": 12.5,
            "samples": samples if samples is not None else [
                {"question": QUESTIONS[i], "completion": f"<think>reasoning {i} with ```code```</think>"
                 f"<answer>{'Yes' if i % 2 == 0 else 'No'}</answer>", "answer": "Yes" if i % 2 == 0 else "No",
                 "gold": "Yes" if i % 3 else "No", "correct": (i % 2 == 0) == bool(i % 3), "format": True}
                for i in range(8)],
            **extra}


def grpo_metrics(steps: int) -> list[dict]:
    rows = []
    for s in range(1, steps + 1):
        rows.append({"step": s, "time": 1000.0 + 30 * s, "reward/mean": 0.3 + 0.02 * s, "reward/std": 0.25,
                     "reward/correct": 0.4 + 0.02 * s, "reward/format": 0.8 + 0.01 * s, "reward/partial": 0.0,
                     "reward/frac_zero_std_groups": 0.5 - 0.02 * s, "completion/mean_len": 120 - s,
                     "completion/clipped_frac": 0.1, "loss/policy": 0.01, "loss/kl": 0.001 * s,
                     "loss/entropy": 1.2, "clip/frac": 0.02, "lr": 1e-5, "perf/rollout_s": 20.0,
                     "perf/train_s": 8.0, "perf/step_s": 30.0, "perf/rollout_tok_s": 150.0,
                     "perf/peak_rss_gb": 3.1})
    return rows


def single_stage_run(root: Path, final_yes_share: float = 0.5) -> Path:
    run = root / "single"
    _write_jsonl(run / "metrics.jsonl", grpo_metrics(10))
    (run / "config.yaml").write_text("model: null\ntask: syllogism\nmax_steps: 10\n")
    _write(run / "eval" / "step_000000.json", eval_summary(0, 0.5, (0.431, 0.569), 0.9, 130.0))
    _write_jsonl(run / "eval" / "step_000000.completions.jsonl", completions(200, 0.5, 0.5))
    _write(run / "eval" / "step_000005.json", eval_summary(5, 0.56, (0.491, 0.627), 0.93, 118.0))
    _write(run / "eval" / "step_000010.json", eval_summary(10, 0.625, (0.556, 0.689), 0.97, 101.25))
    _write_jsonl(run / "eval" / "step_000010.completions.jsonl", completions(200, final_yes_share, 0.625))
    _write_jsonl(run / "samples" / "step_000010.jsonl", [
        {"step": 10, "prompt": "p", "completion": "<think>t</think><answer>Yes</answer>", "answer": "Yes",
         "gold": "Yes", "reward": 1.1, "correct": 1.0, "format": 1.0, "advantage": 0.7}])
    return run


def pipeline_run(root: Path, stop_after_sft: bool = False, final_yes_share: float = 0.5) -> Path:
    run = root / ("stopped" if stop_after_sft else "pipeline")
    (run / "pipeline.yaml").parent.mkdir(parents=True, exist_ok=True)
    (run / "pipeline.yaml").write_text("model: null\ntask: syllogism\nseed: 0\n")
    _write(run / "base_eval" / "eval.json", eval_summary(0, 0.5, (0.431, 0.569), 0.42, 180.0, stage="base"))
    _write_jsonl(run / "base_eval" / "completions.jsonl", completions(200, 0.5, 0.5))
    (run / "base_eval" / "DONE").write_text("40.0\n")
    _write(run / "data" / "stats.json", {"source": "scripted", "requested": 64, "questions": 64, "kept": 60,
                                         "rejected": 4, "rejection_rate": 0.0625,
                                         "rejected_by_reason": {"wrong": 3, "format": 1}})
    (run / "data" / "DONE").write_text("2.0\n")
    _write_jsonl(run / "sft" / "metrics.jsonl",
                 [{"step": s, "time": 2000.0 + 5 * s, "loss/sft": 2.0 / s, "lr": 1e-4, "grad_norm": 1.0,
                   "perf/train_tok_s": 900.0, "perf/train_s": 5.0} for s in range(1, 21)])
    (run / "sft" / "config.yaml").write_text("max_steps: 20\n")
    _write(run / "sft" / "eval" / "step_000010.json", eval_summary(10, 0.52, (0.451, 0.588), 0.9, 90.0))
    _write(run / "sft" / "eval" / "step_000020.json", eval_summary(20, 0.545, (0.476, 0.612), 0.95, 85.5))
    (run / "sft" / "DONE").write_text("100.0\n")
    timings = {"base_eval": 40.0, "data": 2.0, "sft": 100.0}
    if not stop_after_sft:
        _write_jsonl(run / "grpo" / "metrics.jsonl", grpo_metrics(40))
        (run / "grpo" / "config.yaml").write_text("max_steps: 40\n")
        _write(run / "grpo" / "eval" / "step_000020.json", eval_summary(20, 0.6, (0.531, 0.665), 0.96, 80.0))
        final = eval_summary(40, 0.625, (0.556, 0.689), 0.98, 75.0, balanced=0.61, stage="final")
        _write(run / "grpo" / "eval" / "step_000040.json", final)
        (run / "grpo" / "DONE").write_text("1200.0\n")
        _write(run / "final_eval" / "eval.json", final)
        _write_jsonl(run / "final_eval" / "completions.jsonl", completions(200, final_yes_share, 0.625))
        (run / "final_eval" / "DONE").write_text("0.1\n")
        timings.update(grpo=1200.0, final_eval=0.1)
    _write(run / "timings.json", timings)
    return run


def _assert_png(path: Path) -> None:
    assert path.is_file(), f"{path} missing"
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5000, path


def _table_row(md: str, label: str) -> list[str]:
    table = md.split("## Before / after", 1)[1]
    line = next(ln for ln in table.splitlines() if ln.startswith(f"| {label} |"))
    return [c.strip() for c in line.strip("|").split("|")]


# ------------------------------------------------------------------------------------------------------ tests


def test_single_stage_report(tmp_path):
    run = single_stage_run(tmp_path)
    path = write_report(run)
    md = path.read_text()
    assert path == run / "report.md"
    for section in ("# smolthink report: single", "## Summary", "## Before / after", "## Plots",
                    "## Sample completions", "### Before: before (step 0)", "### After: after (step 10)"):
        assert section in md, section
    assert "single-stage GRPO" in md and "`syllogism`" in md and "10 steps of 10 configured" in md
    before, after = _table_row(md, "before"), _table_row(md, "after")
    assert before[1] == "0" and before[2] == "0.500 [0.431, 0.569]" and before[4] == "0.500 (No)"
    assert after[1] == "10" and after[2] == "0.625 [0.556, 0.689]" and after[3] == "0.625"
    assert after[5] == "0.970" and after[6] == "101.2" and after[7] == "200"
    assert after[8] == "+12.5" and after[9] == "+12.5"  # vs first eval and vs the 0.5 majority baseline
    assert "accuracy +12.5 points vs before (0.500 → 0.625)" in md
    assert "not distinguishable from always answering 'No'" in md  # step 0: CI [0.431, 0.569] holds 0.5
    assert "Answer collapse" not in md
    for name in ("reward", "eval", "length", "zero_std", "policy", "before_after"):
        _assert_png(run / "plots" / f"{name}.png")
        assert f"](plots/{name}.png)" in md
    assert not (run / "plots" / "loss.png").exists()  # no loss/sft in a GRPO run: skipped, not crashed
    assert "gold: `Yes`" in md and "````text" in md  # completions with ``` get a longer fence
    assert "### Training rollouts: run, step 10" in md and "advantage: 0.700" in md
    assert "Training wall time: 5m00s" in md


def test_pipeline_report(tmp_path):
    run = pipeline_run(tmp_path)
    md = write_report(run).read_text()
    base, sft, final = _table_row(md, "base"), _table_row(md, "sft"), _table_row(md, "final (grpo)")
    assert base[2] == "0.500 [0.431, 0.569]" and base[5] == "0.420" and base[8] == "—"
    assert sft[1] == "20" and sft[2].startswith("0.545") and sft[8] == "+4.5" and sft[9] == "+4.5"
    assert final[1] == "40" and final[2] == "0.625 [0.556, 0.689]" and final[3] == "0.610"
    assert final[8] == "+12.5" and final[9] == "+12.5" and final[10].endswith(" 50%")
    assert "Missing" not in md and "Incomplete run" not in md
    assert "| grpo | done | 20m00s | 40 steps of 40 configured |" in md
    assert "| sft | done | 1m40s |" in md
    assert "kept 60 of 64 questions, rejection rate 6% (wrong 3, format 1)" in md
    assert "embedded default" in md
    for name in ("stages_accuracy", "sft_loss", "sft_eval", "grpo_reward", "grpo_eval", "grpo_length",
                 "grpo_zero_std", "grpo_policy"):
        _assert_png(run / "plots" / f"{name}.png")
        assert f"](plots/{name}.png)" in md
    assert "### Before: base (step 0)" in md and "### After: final (grpo) (step 40)" in md
    assert "Answer collapse" not in md


def test_pipeline_stopped_early(tmp_path):
    run = pipeline_run(tmp_path, stop_after_sft=True)
    md = write_report(run).read_text()
    assert "Incomplete run" in md and "`grpo/`: missing" in md and "`final_eval/`: missing" in md
    final = _table_row(md, "final (grpo)")
    assert final[2] == "*missing*"
    assert _table_row(md, "sft")[8] == "+4.5"
    _assert_png(run / "plots" / "sft_loss.png")
    _assert_png(run / "plots" / "stages_accuracy.png")
    assert not (run / "plots" / "grpo_reward.png").exists()
    assert "*No grpo/ stage: its plots are skipped.*" in md
    assert "### After: sft (step 20)" in md


def test_interrupted_grpo_without_final_eval(tmp_path):
    """GRPO started (no DONE, a cut-off metrics line) but final_eval never ran: GRPO's last eval stands in."""
    run = pipeline_run(tmp_path)
    for p in ("final_eval/eval.json", "final_eval/completions.jsonl", "final_eval/DONE", "grpo/DONE"):
        (run / p).unlink()
    (run / "final_eval").rmdir()
    with open(run / "grpo" / "metrics.jsonl", "a") as f:
        f.write('{"step": 41, "reward/me')
    md = write_report(run).read_text()
    assert "`grpo/`: incomplete (no DONE marker)" in md and "`final_eval/`: missing" in md
    assert _table_row(md, "grpo (last eval)")[1] == "40"
    _assert_png(run / "plots" / "grpo_reward.png")


def test_collapse_warning(tmp_path):
    run = pipeline_run(tmp_path, final_yes_share=0.95)
    md = write_report(run).read_text()
    assert "the model answers 'Yes' to 95% of questions: accuracy reflects the class balance, not reasoning" in md
    assert "(the gold answer is 'Yes' for 50%)" in md
    assert _table_row(md, "final (grpo)")[10] == "Yes 95%"
    single = write_report(single_stage_run(tmp_path, final_yes_share=0.95)).read_text()
    assert "Answer collapse (after): the model answers 'Yes' to 95%" in single


def test_collapse_from_summary_without_completions():
    """No completions file: the summary's per-class accuracy still exposes always-Yes (binary estimate)."""
    from smolthink.report import EvalPoint, collapse_message

    s = eval_summary(40, 0.5, (0.43, 0.57), 1.0, 50.0, samples=[])
    s["per_class_accuracy"] = {"No": 0.0, "Yes": 1.0}
    dist = answer_distribution(EvalPoint(40, s, Path("x.json"), None))
    assert dist is not None and dist.top == ("Yes", 1.0)
    assert "answers 'Yes' to 100% of questions" in collapse_message(dist, "the model")
    s["answer_distribution"] = {"Yes": 0.6, "No": 0.35, "<none>": 0.05}
    dist = answer_distribution(EvalPoint(40, s, Path("x.json"), None))
    assert dist.top[0] == "Yes" and math.isclose(dist.top[1], 0.6 / 0.95) and math.isclose(dist.answered, 0.95)
    assert collapse_message(dist, "the model") is None


def test_empty_and_odd_dirs(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    md = write_report(empty).read_text()
    assert "No eval summaries found" in md and "`metrics.jsonl`: missing or empty" in md
    only_base = tmp_path / "only_base"
    _write(only_base / "base_eval" / "eval.json", eval_summary(0, 0.5, (0.43, 0.57), 0.4, 150.0))
    md = write_report(only_base).read_text()
    assert "`sft/`: missing" in md and _table_row(md, "base")[2].startswith("0.500")
    assert load_eval_file(only_base / "nope" / "eval.json") is None
    with pytest.raises(FileNotFoundError):
        write_report(tmp_path / "does-not-exist")


def test_answer_label():
    assert answer_label(" yes. ") == "Yes" and answer_label("NO") == "No" and answer_label("") is None
    assert answer_label(None) is None and answer_label("42") == "42"
