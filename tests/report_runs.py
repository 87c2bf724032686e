"""Fake-but-realistic run directories for the report tests: a single-stage GRPO run and a pipeline run (whole, or
stopped after SFT), with metrics, eval summaries, completions, samples, DONE records and timings."""
from __future__ import annotations

from pathlib import Path

from smolthink.rundir import mark_done, write_json, write_jsonl

QUESTIONS = [f"Consider the premises: all A{i} are B{i}; some B{i} are C{i}. Does it follow that some A{i} are C{i}? "
             "Answer Yes or No." for i in range(8)]


def completions(n: int, yes_share: float, acc: float, offset: int = 0) -> list[dict]:
    """n balanced-gold eval records; round(n*yes_share) answers are 'Yes'; correctness follows gold == answer
    (acc is only used to set 'correct' for the non-collapsed, balanced case: records offset .. offset+round(n*acc)-1
    are the right ones)."""
    n_yes = round(n * yes_share)
    recs = []
    for i in range(n):
        gold = "Yes" if i % 2 == 0 else "No"
        answer = "Yes" if i < n_yes else "No"
        if yes_share == 0.5:  # balanced answers: make round(n*acc) of them correct
            answer = gold if offset <= i < offset + round(n * acc) else ("No" if gold == "Yes" else "Yes")
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
                     "perf/peak_rss_gb": 3.1, "rollout/fill": float(s - 1), "groups/total": 8.0,
                     "groups/dropped": 2.0, "rollout/batches": 2.0, "rollout/extra_batches": 1.0,
                     "groups/all_correct_frac": 0.375, "groups/all_wrong_frac": 0.125, "groups/low_pass_frac": 0.25,
                     "groups/high_pass_frac": 0.25, "groups/pass_rate_mean": 0.6,
                     "rollout/tokens_all_correct_frac": 0.3, "rollout/tokens_all_wrong_frac": 0.2,
                     "curriculum/syllogism/allow_some_not": float(min(3, 1 + s // 10))})
    return rows


def single_stage_run(root: Path, final_yes_share: float = 0.5) -> Path:
    run = root / "single"
    write_jsonl(run / "metrics.jsonl", grpo_metrics(10))
    (run / "config.yaml").write_text("model: null\ntask: syllogism\nmax_steps: 10\n")
    write_json(run / "eval" / "step_000000.json", eval_summary(0, 0.5, (0.431, 0.569), 0.9, 130.0))
    write_jsonl(run / "eval" / "step_000000.completions.jsonl", completions(200, 0.5, 0.5))
    write_json(run / "eval" / "step_000005.json", eval_summary(5, 0.56, (0.491, 0.627), 0.93, 118.0))
    write_json(run / "eval" / "step_000010.json", eval_summary(10, 0.625, (0.556, 0.689), 0.97, 101.25))
    write_jsonl(run / "eval" / "step_000010.completions.jsonl", completions(200, final_yes_share, 0.625))
    write_jsonl(run / "samples" / "step_000010.jsonl", [
        {"step": 10, "prompt": "p", "completion": "<think>t</think><answer>Yes</answer>", "answer": "Yes",
         "gold": "Yes", "reward": 1.1, "correct": 1.0, "format": 1.0, "advantage": 0.7}])
    return run


def pipeline_run(root: Path, stop_after_sft: bool = False, final_yes_share: float = 0.5,
                 with_control: bool = False) -> Path:
    run = root / ("stopped" if stop_after_sft else "pipeline")
    (run / "pipeline.yaml").parent.mkdir(parents=True, exist_ok=True)
    (run / "pipeline.yaml").write_text("model: null\ntask: syllogism\nseed: 0\n")
    write_json(run / "base_eval" / "eval.json", eval_summary(0, 0.5, (0.431, 0.569), 0.42, 180.0, stage="base"))
    write_jsonl(run / "base_eval" / "completions.jsonl", completions(200, 0.5, 0.5))
    mark_done(run / "base_eval", 40.0)
    write_json(run / "data" / "stats.json", {"source": "scripted", "requested": 64, "questions": 64, "kept": 60,
                                             "rejected": 4, "rejection_rate": 0.0625,
                                             "rejected_by_reason": {"wrong": 3, "format": 1}})
    mark_done(run / "data", 2.0)
    write_jsonl(run / "sft" / "metrics.jsonl",
                [{"step": s, "time": 2000.0 + 5 * s, "loss/sft": 2.0 / s, "lr": 1e-4, "grad_norm": 1.0,
                  "perf/train_tok_s": 900.0, "perf/train_s": 5.0} for s in range(1, 21)])
    (run / "sft" / "config.yaml").write_text("max_steps: 20\n")
    write_json(run / "sft" / "eval" / "step_000010.json", eval_summary(10, 0.52, (0.451, 0.588), 0.9, 90.0))
    write_json(run / "sft" / "eval" / "step_000020.json", eval_summary(20, 0.545, (0.476, 0.612), 0.95, 85.5))
    mark_done(run / "sft", 100.0)
    timings = {"base_eval": 40.0, "data": 2.0, "sft": 100.0}
    if not stop_after_sft:
        write_jsonl(run / "grpo" / "metrics.jsonl", grpo_metrics(40))
        (run / "grpo" / "config.yaml").write_text("max_steps: 40\n")
        write_json(run / "grpo" / "eval" / "step_000020.json", eval_summary(20, 0.6, (0.531, 0.665), 0.96, 80.0))
        final = eval_summary(40, 0.625, (0.556, 0.689), 0.98, 75.0, balanced=0.61, stage="final")
        write_json(run / "grpo" / "eval" / "step_000040.json", final)
        mark_done(run / "grpo", 1200.0)
        write_json(run / "final_eval" / "eval.json", final)
        write_jsonl(run / "final_eval" / "completions.jsonl", completions(200, final_yes_share, 0.625))
        mark_done(run / "final_eval", 0.1)
        for model, (a1, a2) in {"base": (0.12, 0.5), "final": (0.02, 0.5)}.items():
            write_json(run / "transfer" / f"{model}.json", {"task": "aiw,gcd", "n": 100, "per_task": {
                "aiw": {"n": 50, "accuracy": a1, "accuracy_ci95": [a1 / 2, a1 * 2], "format_rate": 0.9},
                "gcd": {"n": 50, "accuracy": a2, "accuracy_ci95": [0.36, 0.64], "format_rate": 0.8}}})
        mark_done(run / "transfer", 30.0)
        timings.update(grpo=1200.0, final_eval=0.1, transfer=30.0)
    if with_control:
        control_stages(run, timings)
    write_json(run / "timings.json", timings)
    return run


def control_stages(run: Path, timings: dict) -> None:
    """The equal-time SFT control and the pass@k stage of a finished pipeline run, and the SFT eval's completions
    (right: records 20..128, where base had 0..99, grpo 0..124, the control 50..159)."""
    (run / "pipeline.yaml").write_text("model: null\ntask: syllogism\nseed: 0\nsft_control: true\n"
                                       "passk:\n  enabled: true\n")
    write_jsonl(run / "sft" / "eval" / "step_000020.completions.jsonl", completions(200, 0.5, 0.545, offset=20))
    ctl = run / "sft_control"
    write_jsonl(ctl / "metrics.jsonl", [{"step": s, "time": 3000.0 + 5 * s, "loss/sft": 0.5 / s, "lr": 4e-4,
                                         "epoch": s / 4} for s in range(1, 231)])
    (ctl / "config.yaml").write_text("max_steps: 0\nmax_seconds: 1200.0\n")
    write_json(ctl / "eval" / "step_000230.json", eval_summary(230, 0.55, (0.481, 0.617), 0.97, 80.0))
    write_jsonl(ctl / "eval" / "step_000230.completions.jsonl", completions(200, 0.5, 0.55, offset=50))
    mark_done(ctl, 1210.0, 230)
    for name, (mean, lo, hi, passk) in {"sft": (0.5, 0.45, 0.55, 0.7), "grpo": (0.6, 0.55, 0.65, 0.72),
                                        "sft_control": (0.52, 0.47, 0.57, 0.69)}.items():
        write_json(run / "passk" / f"{name}.json", {**eval_summary(0, mean, (lo, hi), 0.99, 70.0, n=100),
                                                    "samples_per_question": 4, "pass@k": passk,
                                                    "pass@k_ci95": [passk - 0.09, passk + 0.08], "mean@k": mean})
    mark_done(run / "passk", 30.0)
    timings.update(sft_control=1210.0, passk=30.0)
