"""Training runs survive NaNs, damaged checkpoints and kills: a NaN/inf loss or gradient skips the step (and too
many in a row stop the run), nothing non-finite is ever saved, resume falls back past a damaged checkpoint, and a
run killed before its first checkpoint or in the middle of one continues."""
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import smolthink
from smolthink.checkpoint import MANIFEST, newest_intact, save_checkpoint, write_manifest
from smolthink.cli import main
from smolthink.config import SFTConfig, build_config
from smolthink.configlib import config_yaml
from smolthink.errors import SmolthinkError, Stopped
from smolthink.report.load import read_jsonl
from smolthink.train_sft import train_sft

sys.path.insert(0, str(Path(__file__).parent))

# 4 steps of 2 x 2 sequences over 8 traces: warm-up, cosine lr, accumulation and an epoch boundary
SFT = {"threads": 2, "eval.n": 0, "minibatch_size": 2, "gradient_accumulation_steps": 2, "warmup_steps": 1,
       "max_length": 512, "max_steps": 4, "learning_rate": 1e-3, "save_every": 1, "keep_checkpoints": 3}


def sft_cfg(tiny_dir, traces, **kw):
    return build_config(SFTConfig, [{"model": str(tiny_dir), "data.path": str(traces), **SFT, **kw}])


def rows(out):
    """metrics.jsonl without wall-clock fields (what an exact resume must reproduce)."""
    return [{k: v for k, v in r.items() if k != "time" and not k.startswith("perf/")}
            for r in read_jsonl(out / "metrics.jsonl")]


def assert_saved_tensors_finite(out):
    """Every tensor under `out` (checkpoint weights and optimizer moments, final adapter and merged model)."""
    bad, files = [], sorted(out.rglob("*.safetensors")) + sorted(out.rglob("optimizer.pt"))
    assert files
    for f in files:
        state = load_file(str(f)) if f.suffix == ".safetensors" else {
            f"{k}.{n}": t for k, s in torch.load(f, weights_only=False)["state"].items() for n, t in s.items()}
        bad += [f"{f}:{n}" for n, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    assert not bad, bad[:3]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_dir, traces):
    """The metrics of the uninterrupted 4-step run every recovery must reproduce."""
    out = tmp_path_factory.mktemp("straight") / "run"
    assert train_sft(sft_cfg(tiny_dir, traces), out) is not None
    assert len(rows(out)) == 4
    return rows(out)


# ------------------------------------------------------------------------------------------- numerical guards


def nan_loss_during(monkeypatch, steps):
    """Make the SFT loss NaN during the given optimizer steps (1-based), as a diverged forward would -> the
    on_step hook that tracks the step."""
    import smolthink.train_sft as sft

    real, current = sft.sft_loss, {"step": 1}

    def loss(model, packing, batch, n_tokens_total):
        value, n = real(model, packing, batch, n_tokens_total)
        return (value * float("nan") if current["step"] in steps else value), n

    monkeypatch.setattr(sft, "sft_loss", loss)
    return lambda step, m: current.update(step=step + 1)


def test_nonfinite_loss_skips_the_step(tmp_path, tiny_dir, traces, straight, monkeypatch):
    """A NaN loss at step 2: no update of weights, optimizer or schedule, counted on its row; the run goes on."""
    out = tmp_path / "run"
    on_step = nan_loss_during(monkeypatch, {2})
    assert train_sft(sft_cfg(tiny_dir, traces, keep_checkpoints=4), out, on_step=on_step) is not None
    r = rows(out)
    assert [x["train/skipped_nonfinite"] for x in r] == [0.0, 1.0, 0.0, 0.0]
    assert r[0] == straight[0] and math.isnan(r[1]["loss/sft"]) and math.isfinite(r[2]["loss/sft"])
    assert r[2]["lr"] == straight[1]["lr"] != straight[2]["lr"]  # the schedule stood still
    assert r[3]["lr"] == straight[2]["lr"]
    ckpt = [out / "checkpoints" / f"step_00000{s}" for s in (1, 2, 3)]
    w = [load_file(str(c / "trainable.safetensors")) for c in ckpt]
    assert all(torch.equal(w[0][n], w[1][n]) for n in w[0])  # skipped: the weights did not move
    assert not all(torch.equal(w[1][n], w[2][n]) for n in w[0])  # step 3 trained
    adam = [torch.load(c / "optimizer.pt", weights_only=False)["state"] for c in ckpt]
    assert [float(next(iter(a.values()))["step"]) for a in adam] == [1.0, 1.0, 2.0]
    assert (out / "DONE").is_file()
    assert_saved_tensors_finite(out)


def test_nonfinite_steps_in_a_row_stop_the_grpo_run(tmp_path, tiny_dir, monkeypatch, capsys):
    """Every GRPO loss NaN: the run stops after max_nonfinite_steps skipped steps with one line, having saved
    nothing non-finite and no final model."""
    import smolthink.train_grpo as grpo

    real = grpo.policy_loss

    def nan_loss(*args, **kwargs):
        loss, stats = real(*args, **kwargs)
        return loss * float("nan"), stats

    monkeypatch.setattr(grpo, "policy_loss", nan_loss)
    out = tmp_path / "run"
    args = ["train", "--model", str(tiny_dir), "--out", str(out)]
    for s in ["prompts_per_rollout=2", "num_generations=2", "max_completion_length=8", "buffer_size=4",
              "minibatch_size=4", "gradient_accumulation_steps=1", "eval_n=0", "train_size=16", "engine=hf",
              "threads=2", "max_steps=5", "save_every=1", "max_nonfinite_steps=2"]:
        args += ["--set", s]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "max_nonfinite_steps=2" in err and "Traceback" not in err
    assert [r["train/skipped_nonfinite"] for r in rows(out)] == [1.0, 1.0]
    assert sorted(os.listdir(out / "checkpoints")) == ["step_000001"]
    assert not (out / "final").exists() and not (out / "DONE").exists()
    assert_saved_tensors_finite(out)


def test_nonfinite_weights_are_never_saved(tmp_path, tiny_dir, traces, monkeypatch):
    """An update that left a NaN weight: the checkpoint after it is refused with one clear error, and nothing
    of that step (checkpoint, temp directory, final model) is written."""
    import smolthink.train_sft as sft

    real, calls = sft.clip_and_step, []

    def overflowing(ctx, loss):
        out = real(ctx, loss)
        calls.append(1)
        if len(calls) == 2:
            with torch.no_grad():
                ctx.params[0].view(-1)[0] = float("inf")
        return out

    monkeypatch.setattr(sft, "clip_and_step", overflowing)
    out = tmp_path / "run"
    with pytest.raises(SmolthinkError, match="refusing to save the step 2 checkpoint: weight .* NaN or inf"):
        train_sft(sft_cfg(tiny_dir, traces), out)
    assert os.listdir(out / "checkpoints") == ["step_000001"]
    assert not (out / "final").exists()
    assert_saved_tensors_finite(out)


def test_nonfinite_user_rewards_score_zero_and_are_logged_once(caplog):
    from smolthink.rewards import score_user_functions
    from toy_rewards import nan_on_spaces, raises

    fns = [("nan", nan_on_spaces, 1.0), ("raises", raises, 1.0), ("inf", lambda c, e: math.inf, 1.0),
           ("text", lambda c, e: "abc", 1.0), ("ok", lambda c, e: 0.5, 1.0)]
    with caplog.at_level(logging.WARNING, logger="smolthink.rewards"):
        scores = score_user_functions(fns, ["a b", "ab", "c d"], [None] * 3)
    assert scores == [{"nan": 0.0, "raises": 0.0, "inf": 0.0, "text": 0.0, "ok": 0.5},
                      {"nan": 1.0, "raises": 0.0, "inf": 0.0, "text": 0.0, "ok": 0.5},
                      {"nan": 0.0, "raises": 0.0, "inf": 0.0, "text": 0.0, "ok": 0.5}]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4  # one per failing function, not one per completion
    assert "nan failed on 2 of 3 completions" in lines[0] and "returned nan" in lines[0]
    assert "raised RuntimeError: boom" in lines[1]


def test_nan_reward_does_not_poison_grpo(tmp_path, tiny_dir):
    """A user reward returning NaN on most completions: scored 0, rewards and advantages stay finite, no step
    is skipped, and every saved tensor is finite."""
    out = tmp_path / "run"
    args = ["train", "--model", str(tiny_dir), "--out", str(out)]
    for s in ["prompts_per_rollout=2", "num_generations=4", "max_completion_length=12", "buffer_size=8",
              "minibatch_size=8", "gradient_accumulation_steps=1", "eval_n=0", "train_size=16", "engine=hf",
              "threads=2", "max_steps=2", "save_every=1", "correct_weight=0", "format_weight=0",
              "reward_functions=[toy_rewards:spaces, toy_rewards:nan_on_spaces]"]:
        args += ["--set", s]
    assert main(args) == 0
    for r in rows(out):
        assert r["train/skipped_nonfinite"] == 0.0
        for key in ("reward/mean", "reward/std", "reward/toy_rewards:nan_on_spaces", "loss/total", "grad_norm"):
            assert math.isfinite(r[key]), (key, r)
    assert (out / "DONE").is_file()
    assert_saved_tensors_finite(out)


# ------------------------------------------------------------------------------------------- checkpoints


@pytest.fixture()
def two_checkpoints(tmp_path, tiny_lm):
    """checkpoints/step_000001 and step_000002 of a tiny model (one trainable layer, to keep them small)."""
    tiny_lm.requires_grad_(False)
    layer = tiny_lm.model.layers[0].mlp.down_proj.requires_grad_(True)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    root = tmp_path / "checkpoints"
    for step in (1, 2):
        layer.weight.grad = torch.ones_like(layer.weight)
        opt.step()
        save_checkpoint(root, step, tiny_lm, opt, sched, {"n": step}, keep=2)
    return root


def _flip_a_byte(d):
    p = d / "trainable.safetensors"
    data = bytearray(p.read_bytes())
    data[-1] ^= 0xFF
    p.write_bytes(bytes(data))


def _garbage_with_its_manifest(d):
    (d / "optimizer.pt").write_bytes(b"not a pickle")
    write_manifest(d, 2)


DAMAGE = {"truncated file": lambda d: (d / "optimizer.pt").write_bytes((d / "optimizer.pt").read_bytes()[:-9]),
          "missing state.json": lambda d: (d / "state.json").unlink(),
          "bad hash, same size": _flip_a_byte,
          "unreadable manifest": lambda d: (d / MANIFEST).write_text("{"),
          "does not load": _garbage_with_its_manifest}
WHY = {"truncated file": "optimizer.pt has", "missing state.json": "state.json is missing",
       "bad hash, same size": "sha256", "unreadable manifest": "unreadable manifest.json",
       "does not load": "does not load"}


@pytest.mark.parametrize("kind", DAMAGE)
def test_a_damaged_checkpoint_is_skipped_with_its_reason(two_checkpoints, kind):
    ckpt, skipped = newest_intact(two_checkpoints)
    assert ckpt.step == 2 and skipped == []
    DAMAGE[kind](two_checkpoints / "step_000002")
    ckpt, skipped = newest_intact(two_checkpoints)
    assert ckpt.step == 1 and ckpt.state["n"] == 1
    assert [p.name for p, _ in skipped] == ["step_000002"] and WHY[kind] in skipped[0][1]


def test_no_intact_checkpoint_is_one_line(two_checkpoints, capsys):
    for step in (1, 2):
        (two_checkpoints / f"step_00000{step}" / "state.json").unlink()
    run = two_checkpoints.parent
    assert main(["sft", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    error = [line for line in err.splitlines() if line.startswith("smolthink: error:")]
    assert len(error) == 1 and "Traceback" not in err
    assert "no intact checkpoint to resume" in error[0] and "step_000001: state.json is missing" in error[0]
    assert sorted(os.listdir(two_checkpoints)) == ["step_000001", "step_000002"]  # kept for a post-mortem


def test_saving_nonfinite_weights_is_refused(tmp_path, tiny_lm):
    opt = torch.optim.AdamW(tiny_lm.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    with torch.no_grad():
        tiny_lm.model.norm.weight[0] = float("nan")
    with pytest.raises(SmolthinkError, match="model.norm.weight holds NaN or inf"):
        save_checkpoint(tmp_path, 1, tiny_lm, opt, sched, {})
    assert os.listdir(tmp_path) == []


def test_damaged_newest_checkpoint_falls_back_and_resumes_exactly(tmp_path, tiny_dir, traces, straight, caplog):
    """SIGTERM after step 3, then the step-3 checkpoint truncated (a power cut before the data reached the disk)
    plus a half-deleted step directory and a killed write: resume says why step 3 is skipped, continues from
    step 2, cleans up, and ends with the uninterrupted run's metrics."""
    cfg, out = sft_cfg(tiny_dir, traces), tmp_path / "run"

    def sigterm_at_3(step, m):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Stopped):
        train_sft(cfg, out, on_step=sigterm_at_3)
    ckpts = out / "checkpoints"
    w = ckpts / "step_000003" / "trainable.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    (ckpts / "step_000009").mkdir()
    (ckpts / "step_000009" / "state.json").write_text('{"step": 9}')
    (ckpts / ".tmp_step_000004.x").mkdir()
    with caplog.at_level(logging.WARNING, logger="smolthink"):
        assert train_sft(cfg, out, resume=True) is not None
    assert "step_000003: trainable.safetensors has 100 bytes" in caplog.text.replace(str(ckpts) + "/", "")
    assert rows(out) == straight
    assert sorted(os.listdir(ckpts)) == ["step_000002", "step_000003", "step_000004"]


# ------------------------------------------------------------------------------------------- kills


def test_run_killed_before_its_first_checkpoint_restarts(tmp_path, tiny_dir, traces, straight, capsys):
    """A run killed at step 2 with no checkpoint yet: both `--resume DIR` (from step 0) and `--out DIR` (afresh)
    restart it and reproduce the uninterrupted run."""
    import shutil

    cfg, killed = sft_cfg(tiny_dir, traces, save_every=0), tmp_path / "killed"

    def kill_at_2(step, m):
        if step == 2:
            raise RuntimeError("killed")  # like kill -9: no checkpoint, nothing cleaned up

    with pytest.raises(RuntimeError):
        train_sft(cfg, killed, on_step=kill_at_2)
    assert len(rows(killed)) == 2 and not (killed / "checkpoints").exists()
    shutil.copytree(killed, tmp_path / "again")
    config = tmp_path / "config.yaml"
    config.write_text(config_yaml(cfg))
    assert main(["sft", "--resume", str(killed)]) == 0  # reads the run's own config.yaml
    assert main(["sft", "--config", str(config), "--out", str(tmp_path / "again")]) == 0
    err = " ".join(capsys.readouterr().err.split())  # the console wraps long lines
    assert err.count("holds no intact checkpoint yet: starting the run again from step 0") == 2
    for out in (killed, tmp_path / "again"):
        assert rows(out) == straight and (out / "DONE").is_file()
    assert main(["sft", "--config", str(config), "--out", str(killed)]) == 2  # now it holds a run
    assert main(["sft", "--resume", str(tmp_path / "nothing")]) == 2


SLOW_CHECKPOINT = """
import sys, time
import smolthink.checkpoint as checkpoint
real = checkpoint.write_manifest
def stalled(directory, step):
    if step == 2:  # the step-2 files are written, its manifest not yet: signal the test and wait to be killed
        open(sys.argv[1], "w").close()
        time.sleep(600)
    real(directory, step)
checkpoint.write_manifest = stalled
from smolthink.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_sigkill_mid_checkpoint_leaves_a_resumable_run(tmp_path, tiny_dir, traces, straight):
    """kill -9 of a real process while it writes its step-2 checkpoint: the half-written temp directory is never
    taken for a checkpoint, resume continues from step 1, cleans it up and reproduces the uninterrupted run."""
    out, flag, config = tmp_path / "run", tmp_path / "writing", tmp_path / "config.yaml"
    config.write_text(config_yaml(sft_cfg(tiny_dir, traces)))
    src = str(Path(smolthink.__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
    with open(tmp_path / "stderr", "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-c", SLOW_CHECKPOINT, str(flag), "sft", "--config", str(config),
                                 "--out", str(out)], env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    deadline = time.time() + 600
    while not flag.exists():
        assert proc.poll() is None, (tmp_path / "stderr").read_text()[-2000:]
        assert time.time() < deadline
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    ckpts = out / "checkpoints"
    left = sorted(os.listdir(ckpts))
    assert left[0].startswith(".tmp_step_000002.") and left[1:] == ["step_000001"]
    assert (ckpts / left[0] / "trainable.safetensors").is_file()  # half-written: files, no manifest
    assert main(["sft", "--resume", str(out)]) == 0
    assert rows(out) == straight
    assert sorted(os.listdir(ckpts)) == ["step_000002", "step_000003", "step_000004"]
