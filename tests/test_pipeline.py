"""A tiny-model pipeline run produces every artifact (the equal-time SFT control and pass@k included), a report with
its sections and plots, and skips finished stages on rerun."""
import json
import signal

import pytest
import yaml

from smolthink.cli import main


SETS = ["eval_n=4", "eval_max_new_tokens=8", "num_traces=8", "threads=2",
        "sft.max_steps=2", "sft.minibatch_size=4", "sft.warmup_steps=0",
        "grpo.max_steps=2", "grpo.max_completion_length=8", "grpo.prompts_per_rollout=2", "grpo.num_generations=2",
        "grpo.buffer_size=4", "grpo.minibatch_size=4", "grpo.gradient_accumulation_steps=1", "grpo.train_size=32",
        "grpo.engine=hf", "rl=true", "sft_control=true", "control.max_steps=3", "passk.n=2", "passk.k=2",
        "transfer.n=2"]


def test_pipeline_smoke_and_stage_skipping(tmp_path, tiny_dir):
    run = tmp_path / "run"
    args = ["pipeline", "--model", str(tiny_dir), "--out", str(run)]
    for s in SETS:
        args += ["--set", s]
    assert main(args) == 0
    for stage in ("base_eval", "data", "sft", "grpo", "final_eval", "transfer", "report"):
        assert (run / stage / "DONE").is_file(), stage
    assert json.loads((run / "base_eval" / "eval.json").read_text())["n"] == 4
    assert (run / "data" / "traces.jsonl").stat().st_size > 0
    assert (run / "sft" / "final" / "merged" / "config.json").is_file()
    assert (run / "grpo" / "final" / "adapter" / "adapter_config.json").is_file()
    final = json.loads((run / "final_eval" / "eval.json").read_text())
    assert final["stage"] == "final" and final["n"] == 4
    timings = json.loads((run / "timings.json").read_text())
    assert set(timings) == {"base_eval", "data", "sft", "grpo", "final_eval", "transfer", "sft_control", "passk",
                            "report"}
    # the control: SFT from the SFT stage's model for the grpo stage's wall time (or its 3-step cap here)
    control = yaml.safe_load((run / "sft_control" / "config.yaml").read_text())
    assert control["max_seconds"] == json.loads((run / "grpo" / "DONE").read_text())["seconds"]
    assert control["model"] == str(run / "sft" / "final" / "merged") and control["lr_scheduler_type"] == "constant"
    steps = json.loads((run / "sft_control" / "DONE").read_text())["steps"]
    assert 1 <= steps <= 3
    assert json.loads((run / "sft_control" / "eval" / f"step_{steps:06d}.json").read_text())["n"] == 4
    for name in ("sft", "grpo", "sft_control"):
        passk = json.loads((run / "passk" / f"{name}.json").read_text())
        assert passk["n"] == 2 and passk["samples_per_question"] == 2 and len(passk["pass@k_ci95"]) == 2
    report = (run / "report.md").read_text()
    for section in ("base", "sft", "final", "majority", "## rl vs equal-time sft", "sft_control (equal-time sft)",
                    "## what changed between stages", "| sft → sft_control (equal-time sft) | 4 |",
                    "## where the rl budget went", "pass@2 / mean@2 on 2 held-out questions"):
        assert section in report.lower(), section
    rss = json.loads((run / "rss.json").read_text())  # the RSS timeline: every stage that ran, and its phases
    assert {"base_eval", "sft", "sft/train", "sft/eval", "grpo/rollout", "grpo/train", "report"} <= set(rss["phases"])
    assert rss["phases"]["sft"]["peak_gb"] >= rss["phases"]["sft/train"]["peak_gb"] > 0
    assert "## memory" in report.lower()
    pngs = list((run / "plots").glob("*.png"))
    assert pngs and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    # a rerun skips every finished stage: nothing is rewritten
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.name != "pipeline.yaml"}
    assert main(["pipeline", "--out", str(run)]) == 0
    after = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.name != "pipeline.yaml"}
    assert after == before


def test_default_pipeline_without_rl_makes_the_sft_model_final(tmp_path, tiny_dir, capsys):
    """`rl: false` (the default): no grpo/ or sft_control/, the final eval is SFT's last eval, transfer and pass@k
    use the SFT model, and the report says there was no GRPO stage; sft_control without rl is a one-line error."""
    run = tmp_path / "run"
    args = ["pipeline", "--model", str(tiny_dir), "--out", str(run)]
    for s in SETS:
        if not s.startswith(("grpo.", "rl=", "sft_control=", "control.")):
            args += ["--set", s]
    assert main(args) == 0
    assert not (run / "grpo").exists() and not (run / "sft_control").exists()
    sft_evals = sorted((run / "sft" / "eval").glob("step_*.json"))
    final = json.loads((run / "final_eval" / "eval.json").read_text())
    last = json.loads(sft_evals[-1].read_text())
    assert final.pop("stage") == "final" and last.pop("stage", None) != "final"
    assert final == last
    transfer = json.loads((run / "transfer" / "final.json").read_text())
    assert transfer["model"] == str(run / "sft" / "final" / "merged")
    assert sorted(p.name for p in (run / "passk").glob("*.json")) == ["sft.json"]
    timings = json.loads((run / "timings.json").read_text())
    assert "grpo" not in timings and "sft_control" not in timings
    report = (run / "report.md").read_text()
    assert "No GRPO stage in this run" in report and "| grpo | off |" in report and "final (grpo)" not in report
    capsys.readouterr()
    assert main(args + ["--set", "sft_control=true"]) == 2
    assert capsys.readouterr().err.strip() == ("smolthink: error: sft_control: true needs rl: true (the control trains "
                                               "for the GRPO stage's wall time)")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stopped_stage_is_not_done_and_later_stages_wait(tmp_path, tiny_dir, monkeypatch, sig, capsys):
    """A training stage stopped by Ctrl-C/SIGTERM (train_sft raises Stopped after its checkpoint) must not be
    marked DONE, GRPO must not start on a missing SFT model, and the pipeline exits 128 + the signal (130, 143)."""
    import smolthink.train_sft
    from smolthink.errors import Stopped

    def stopped_by_signal(*a, **k):  # what the harness's finish does once its handler took the signal
        raise Stopped("stopped at step 1, checkpoint saved", int(sig))

    monkeypatch.setattr(smolthink.train_sft, "train_sft", stopped_by_signal)
    run = tmp_path / "run"
    args = ["pipeline", "--model", str(tiny_dir), "--out", str(run)]
    for s in SETS:
        args += ["--set", s]
    assert main(args) == 128 + sig
    assert "the sft stage stopped before its end" in capsys.readouterr().err
    assert (run / "data" / "DONE").is_file()
    assert not (run / "sft" / "DONE").exists() and not (run / "grpo").exists()


def test_a_signal_during_a_finished_stages_last_eval_stops_before_the_next_stage(tmp_path, tiny_dir, monkeypatch,
                                                                                 capsys):
    """train_sft finished its run (DONE written) and then raised Stopped because SIGTERM came during its final
    eval: the pipeline exits 143 before GRPO starts, and says the stage finished."""
    import smolthink.train_sft
    from smolthink.errors import Stopped
    from smolthink.rundir import mark_done

    def finished_then_stopped(cfg, out, **k):
        mark_done(out, 1.0, steps=2)
        raise Stopped("SIGTERM arrived after the last step", int(signal.SIGTERM))

    monkeypatch.setattr(smolthink.train_sft, "train_sft", finished_then_stopped)
    run = tmp_path / "run"
    args = ["pipeline", "--model", str(tiny_dir), "--out", str(run)]
    for s in SETS:
        args += ["--set", s]
    assert main(args) == 128 + signal.SIGTERM
    assert "the sft stage finished, then a signal stopped the pipeline" in capsys.readouterr().err
    assert (run / "sft" / "DONE").is_file() and not (run / "grpo").exists()
