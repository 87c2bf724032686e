"""report.md + plots from fake-but-realistic run directories (single-stage, pipeline, pipeline stopped early)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from report_runs import eval_summary, pipeline_run, single_stage_run
from smolthink.report import write_report
from smolthink.report.load import load_stage_eval
from smolthink.rundir import PipelineDir, write_json

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


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


def test_empty_and_odd_dirs(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    md = write_report(empty).read_text()
    assert "No eval summaries found" in md and "`metrics.jsonl`: missing or empty" in md
    only_base = tmp_path / "only_base"
    write_json(only_base / "base_eval" / "eval.json", eval_summary(0, 0.5, (0.43, 0.57), 0.4, 150.0))
    md = write_report(only_base).read_text()
    assert "`sft/`: missing" in md and _table_row(md, "base")[2].startswith("0.500")
    assert load_stage_eval(PipelineDir(only_base), "final_eval") is None
    with pytest.raises(FileNotFoundError):
        write_report(tmp_path / "does-not-exist")


def test_single_stage_wall_time_from_done(tmp_path):
    """DONE holds {"seconds", "steps"}: a stand-alone run's 160 optimizer steps are not 160 s of wall time."""
    run = single_stage_run(tmp_path)
    (run / "DONE").write_text(json.dumps({"seconds": 42.0, "steps": 160}))
    md = write_report(run).read_text()
    assert "Training wall time: 42s (DONE)." in md
    assert "2m40s" not in md


def test_control_verdict_passk_flips_and_budget(tmp_path):
    """The equal-time SFT control next to SFT + GRPO with a plain verdict, pass@k / mean@k with intervals, the
    questions that flipped between stages (three examples each way), and where the RL budget went."""
    run = pipeline_run(tmp_path, with_control=True)
    md = write_report(run).read_text()
    assert "Missing" not in md
    assert _table_row(md, "sft_control (equal-time SFT)")[2] == "0.550 [0.481, 0.617]"
    rl = md.split("## RL vs equal-time SFT", 1)[1].split("\n## ", 1)[0]
    assert "| sft + grpo | 0.625 [0.556, 0.689] |" in rl
    assert "**No RL gain shown:** SFT + GRPO vs equal-time SFT is +7.5 points (0.625 vs 0.550)" in rl
    assert "230 SFT steps, 57.5 epochs over the warm-up traces, a budget of 20m00s" in rl
    assert "| sft + grpo | 0.600 [0.550, 0.650] | 0.720 [0.630, 0.800] |" in rl
    assert "GRPO moved mean@4 by +10.0 points and pass@4 by +2.0 points." in rl
    flips = md.split("## What changed between stages", 1)[1].split("\n## ", 1)[0]
    assert "| base → sft | 200 | 20 | 29 | +9 |" in flips
    assert "| sft → final (grpo) | 200 | 4 | 20 | +16 |" in flips
    assert "| sft → sft_control (equal-time SFT) | 200 | 30 | 31 | +1 |" in flips
    for pair in ("base → sft", "sft → final (grpo)", "sft → sft_control (equal-time SFT)"):
        block = flips.split(f"### {pair}\n", 1)[1].split("\n### ", 1)[0]
        wrong, right = block.split("Wrong → right:", 1)
        assert wrong.count("**") == 6 and right.count("**") == 6, pair  # three examples each way
    assert "<think>step 20</think>" in flips  # both completions of a flipped question are shown
    budget = md.split("## Where the RL budget went", 1)[1].split("\n## ", 1)[0]
    assert "| 12% | 25% | 25% | 38% | 0.600 | 9% |" in budget
    assert "Dynamic sampling dropped 80 of 320 groups, at the cost of 40 extra rollout batches." in budget
    assert "`syllogism/allow_some_not` 1 → 3 (range 1–3)" in budget


def test_verdict_needs_non_overlapping_intervals():
    from smolthink.report.rl import verdict

    grpo = {"accuracy": 0.9, "accuracy_ci95": [0.87, 0.93]}
    assert verdict(grpo, {"accuracy": 0.8, "accuracy_ci95": [0.76, 0.84]}).startswith("**The RL gain is real:**")
    assert verdict(grpo, {"accuracy": 0.88, "accuracy_ci95": [0.85, 0.91]}).startswith("**No RL gain shown:**")
    assert verdict(grpo, {"accuracy": 0.97, "accuracy_ci95": [0.95, 0.99]}).startswith("**Equal-time SFT wins:**")


def test_pipeline_report_transfer_table(tmp_path):
    md = write_report(pipeline_run(tmp_path)).read_text()
    assert "## Transfer to tasks outside the training mixture" in md
    assert ("| aiw | 50 | 0.120 [0.060, 0.240] | 0.020 [0.010, 0.040] | -10.0 | lower: forgot | 0.900 | 0.900 |"
            in md)
    assert "| gcd | 50 | 0.500 [0.360, 0.640] | 0.500 [0.360, 0.640] | +0.0 | intervals overlap | 0.800 | 0.800 |" in md
    assert "| transfer | done | 30s |" in md
    assert "## Per task" not in md  # a single-task run has no per-task breakdown


def test_collapse_checks_flag_one_answer_for_everything_and_runaway_length():
    from smolthink.report.rl import collapse_checks

    sft = {"answer_distribution": {"Yes": 0.52, "No": 0.48}, "majority_baseline": 0.5, "mean_completion_len": 100.0}
    fine = {"answer_distribution": {"Yes": 0.54, "No": 0.46}, "majority_baseline": 0.5, "mean_completion_len": 149.0}
    assert [line.endswith("ok") for line in collapse_checks(sft, fine)] == [True, True]
    yes_to_all = {"answer_distribution": {"Yes": 0.56, "No": 0.44}, "majority_baseline": 0.5,
                  "mean_completion_len": 151.0}
    share, length = collapse_checks(sft, yes_to_all)
    assert "**skewed to one answer**" in share and "`Yes` in 56%" in share
    assert "**grew by more than 50%**" in length and "1.51x" in length
    # an unbalanced answer set: the bar is the most common gold answer's share, not 50%
    counts = {"answer_distribution": {"1": 0.33, "2": 0.3}, "majority_baseline": 0.29}
    assert collapse_checks({}, counts)[0].endswith("ok")
    assert collapse_checks({}, {**counts, "answer_distribution": {"1": 1.0}})[0].endswith("**skewed to one answer**")
    assert collapse_checks({}, {}) == []


def test_collapse_section_renders_for_every_trained_model(tmp_path):
    md = write_report(pipeline_run(tmp_path, with_control=True)).read_text()
    section = md.split("## Collapse checks", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("* ")]
    assert [line.split(":")[0] for line in lines] == ["* final (grpo)", "* sft_control (equal-time SFT)"]
    assert all("mean completion length 86 →" in line for line in lines)
