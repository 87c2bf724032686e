"""End-to-end behaviour of the GRPO loop on a tiny random model (real tokenizer, real reasoning-gym prompts)."""
import json
import sys
from pathlib import Path

import torch

from smolthink import tasks
from smolthink.cli import main

sys.path.insert(0, str(Path(__file__).parent))

FAST = ["prompts_per_rollout=2", "num_generations=4", "max_completion_length=12", "buffer_size=8",
        "minibatch_size=4", "gradient_accumulation_steps=2", "eval_n=4", "eval_max_new_tokens=8", "train_size=64",
        "engine=hf", "threads=2", "sample_every=1"]


# a dense toy reward, so that advantages (and gradients) are non-zero on a random tiny model
# fp32 training: these tests compare runs for exact equalities that bf16 GEMM rounding would blur
# (test_onednn_bf16 runs the bf16 path against them)
TOY = ["correct_weight=0", "format_weight=0", "reward_functions=[toy_rewards:spaces]", "precision=fp32"]


def run(out, tiny_dir, *sets, resume=False):
    args = ["train", "--model", str(tiny_dir)]
    args += ["--resume", str(out)] if resume else ["--out", str(out)]
    for s in FAST + list(sets):
        args += ["--set", s]
    assert main(args) == 0


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_cli_smoke_writes_every_artifact(tmp_path, tiny_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    run(out, tiny_dir, "max_steps=2")
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("reward/mean", "reward/std", "reward/correct", "reward/format", "reward/frac_zero_std_groups",
                "completion/mean_len", "completion/clipped_frac", "loss/policy", "clip/frac", "ratio/mean",
                "grad_norm", "lr", "perf/rollout_s", "perf/train_s", "perf/peak_rss_gb"):
        assert key in rows[0], key
    assert (out / "config.yaml").is_file()
    assert json.loads((out / "eval" / "step_000000.json").read_text())["n"] == 4
    assert (out / "eval" / "step_000002.json").is_file()
    sample = json.loads((out / "samples" / "step_000001.jsonl").read_text().splitlines()[0])
    assert {"prompt", "completion", "reward", "advantage", "correct", "format"} <= set(sample)
    assert (out / "checkpoints" / "step_000002" / "state.json").is_file()
    AutoModelForCausalLM.from_pretrained(out / "final" / "merged")
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), out / "final" / "adapter")
    # an existing run is not overwritten by accident
    assert main(["train", "--model", str(tiny_dir), "--out", str(out)]) == 2


def test_ratio_is_exactly_one_on_policy(tmp_path, tiny_dir):
    out = tmp_path / "run"
    run(out, tiny_dir, "max_steps=1", "eval_n=0")
    row = metrics(out)[0]
    assert row["ratio/mean"] == 1.0 and row["clip/frac"] == 0.0
    assert "rollout/logp_mismatch" not in row  # the hf engine gives no log-probs


def test_paged_engine_rolls_out_and_evaluates_the_lora_policy(tmp_path, tiny_dir):
    """engine=paged (transformers' continuous batching) through the whole loop: rollouts of the LoRA policy, the
    evals before and after the step, the on-policy ratio."""
    out = tmp_path / "run"
    run(out, tiny_dir, "max_steps=1", "engine=paged", *TOY)
    row = metrics(out)[0]
    assert row["ratio/mean"] == 1.0 and row["completion/mean_len"] > 0 and row["grad_norm"] > 0
    assert "rollout/logp_mismatch" not in row  # the paged engine gives no log-probs
    for step in (0, 1):
        assert json.loads((out / "eval" / f"step_{step:06d}.json").read_text())["n"] == 4


def test_engine_trainer_logp_mismatch_is_logged_per_step(tmp_path, tiny_dir):
    """The fp32 fast engine's log-probs equal the trainer's up to summation order, at every step of a fill (two
    optimizer steps per buffer: the second compares against old_logp, the sampling weights' log-probs, not the
    updated policy's); bf16 weights move them by bf16 rounding (see test_engine_precision)."""
    fp32, bf16 = tmp_path / "fp32", tmp_path / "bf16"
    run(fp32, tiny_dir, "max_steps=2", "eval_n=0", "gradient_accumulation_steps=1", "engine=fast",
        "eval.engine_precision=fp32", *TOY)
    rows = metrics(fp32)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert 0 <= r["rollout/logp_mismatch"] <= r["rollout/logp_mismatch/max"] < 1e-4
    run(bf16, tiny_dir, "max_steps=1", "eval_n=0", "engine=fast", "eval.engine_precision=bf16", *TOY)
    row = metrics(bf16)[0]
    assert 0 <= row["rollout/logp_mismatch"] <= row["rollout/logp_mismatch/max"] < 1.0


def test_off_policy_old_logprobs_match_training_numerics(tmp_path, tiny_dir):
    """Two optimizer steps per buffer: old log-probs come from a separate no-grad pass; at the first step of
    the fill the policy has not moved, so the ratio must still be 1 (to float rounding)."""
    out = tmp_path / "run"
    run(out, tiny_dir, "max_steps=1", "eval_n=0", "gradient_accumulation_steps=1")
    row = metrics(out)[0]
    assert abs(row["ratio/mean"] - 1.0) < 1e-5 and row["clip/frac"] == 0.0


def test_a_buffer_overfilled_by_dynamic_sampling_trains_its_extra_step_off_policy(tmp_path, tiny_dir):
    """One optimizer step per fill as configured (8 completions = 2 minibatches x 2 accumulation), but dynamic
    sampling keeps whole groups until the buffer holds at least 8, so a fill can hold 12 and give a second step.
    That step runs after an update: its old log-probs must be the sampling policy's (ratio away from 1), not the
    current ones (ratio exactly 1)."""
    out = tmp_path / "run"
    run(out, tiny_dir, "max_steps=6", "eval_n=0", "learning_rate=1e-2", "drop_zero_std_groups=true",
        "max_resample_attempts=3", "correct_weight=0", "format_weight=0",
        "reward_functions=[toy_rewards:spaces_on_yes]", "precision=fp32")
    rows = metrics(out)
    fills = [r["rollout/fill"] for r in rows]
    second = [r for prev, r in zip(rows, rows[1:]) if r["rollout/fill"] == prev["rollout/fill"]]
    assert second, fills  # some fill was overfilled (seeded: the same fills every run)
    for r in second:
        assert r["ratio/mean"] != 1.0, r
    for prev, r in zip([None] + rows, rows):
        if prev is None or r["rollout/fill"] != prev["rollout/fill"]:
            assert abs(r["ratio/mean"] - 1.0) < 1e-5  # a fill's first step: the policy has not moved yet


def test_every_trainable_tensor_changes(tmp_path, tiny_dir):
    from safetensors.torch import load_file

    from smolthink.config import GRPOConfig, build_config
    from smolthink.runtime import load_policy

    out = tmp_path / "run"
    # LoRA B starts at zero, so A gets no gradient on step 1: check after 2 steps
    run(out, tiny_dir, "max_steps=2", "eval_n=0", "learning_rate=1e-3", "save_every=1", *TOY)
    before = {n: p.detach().clone() for n, p in load_policy(build_config(GRPOConfig, [{"model": str(tiny_dir)}]))[0]
              .named_parameters() if p.requires_grad}
    after = load_file(str(out / "checkpoints" / "step_000002" / "trainable.safetensors"))
    assert set(after) == set(before) and len(after) > 0
    unchanged = [n for n in after if torch.equal(after[n], before[n])]
    assert not unchanged, unchanged[:3]


def straight_and_resumed(tmp_path, tiny_dir, *sets) -> list[dict]:
    """4 steps straight and 3 steps then a resume for 1 (mid-buffer: 2 optimizer steps per fill) -> the metrics
    rows of the straight run, after checking that both runs logged the same (times and perf/* aside)."""
    common = ["eval_n=0", "gradient_accumulation_steps=1", "learning_rate=1e-3", *TOY, *sets]
    straight, split = tmp_path / "a", tmp_path / "b"
    run(straight, tiny_dir, "max_steps=4", *common)
    run(split, tiny_dir, "max_steps=3", *common)
    run(split, tiny_dir, "max_steps=4", *common, resume=True)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "time" and not k.startswith("perf/")} for r in rows]
    a, b = strip(metrics(straight)), strip(metrics(split))
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert a == b
    assert (straight / "groups" / "step_000003.jsonl").read_text() == (split / "groups" / "step_000003.jsonl").read_text()
    return a


def test_resume_is_exact(tmp_path, tiny_dir):
    straight_and_resumed(tmp_path, tiny_dir)


def test_resume_is_exact_with_curriculum_and_replay(tmp_path, tiny_dir):
    """The curriculum's levels and window and the replay pool are restored exactly; the random tiny model solves
    nothing, so levels fall and every group enters the pool."""
    a = straight_and_resumed(tmp_path, tiny_dir, "curriculum.enabled=true", "curriculum.window=1",
                             "replay.fraction=0.5")
    levels = [r["curriculum/syllogism/allow_some_not"] for r in a]
    assert levels[0] == 2 and levels[-1] < levels[0]  # starts at 3 (the configured difficulty), falls
    assert a[-1]["replay/groups_frac"] == 0.5 and a[-1]["replay/pool_size"] > 0


def test_budget_metrics_and_groups_never_hold_an_eval_question(tmp_path, tiny_dir):
    """groups/* metrics add up; groups/step_*.jsonl lists every group, none of them an eval question, with
    curriculum and replay on; dynamic sampling says what it dropped and what it cost."""
    out = tmp_path / "run"
    # the default rewards: a random tiny model scores 0 everywhere, so every group has zero std and is dropped
    # until the one extra batch allowed is spent
    run(out, tiny_dir, "max_steps=2", "eval_n=16", "curriculum.enabled=true", "replay.fraction=0.5",
        "drop_zero_std_groups=true", "max_resample_attempts=1")
    rows = metrics(out)
    for r in rows:
        shares = ("groups/all_wrong_frac", "groups/low_pass_frac", "groups/high_pass_frac", "groups/all_correct_frac")
        assert abs(sum(r[k] for k in shares) - 1) < 1e-9
        assert r["groups/all_wrong_frac"] == 1.0 and r["rollout/tokens_all_wrong_frac"] == 1.0  # nothing solved
        assert r["rollout/tokens_all_correct_frac"] == 0.0 and r["groups/pass_rate_mean"] == 0.0
        assert (r["rollout/batches"], r["rollout/extra_batches"], r["groups/total"], r["groups/dropped"]) == (2, 1, 4, 2)
    groups = [json.loads(line) for p in sorted((out / "groups").glob("step_*.jsonl"))
              for line in p.read_text().splitlines()]
    assert len(groups) == sum(r["groups/total"] for r in rows if r["perf/rollout_s"] > 0)
    assert sum(g["dropped"] for g in groups) == sum(r["groups/dropped"] for r in rows if r["perf/rollout_s"] > 0)
    assert {g["origin"] for g in groups} == {"curriculum", "replay"}
    eval_questions = {json.loads(line)["question"]
                      for line in (out / "eval" / "step_000000.completions.jsonl").read_text().splitlines()}
    assert len(eval_questions) == 16 and not eval_questions & {g["question"] for g in groups}


def test_toy_reward_rises(tmp_path, tiny_dir):
    """A dense toy reward (share of spaces) must rise within a few GRPO steps of a tiny model."""
    out = tmp_path / "run"
    # top_k keeps a random tiny model's samples among a few candidates, so the signal is not spread over 49k tokens
    run(out, tiny_dir, "max_steps=12", "eval_n=0", "use_lora=false", "learning_rate=3e-2", "num_generations=8",
        "top_k=20", "temperature=1.0",
        "prompts_per_rollout=4", "buffer_size=32", "minibatch_size=16", "correct_weight=0", "format_weight=0",
        "reward_functions=[toy_rewards:spaces, toy_rewards:raises=0.0]", "max_completion_length=16")
    assert metrics(out)[0]["reward/toy_rewards:raises"] == 0.0  # a raising reward function scores 0
    rewards = [r["reward/mean"] for r in metrics(out)]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > first + 0.1, rewards


def test_bad_config_is_one_line(tmp_path, tiny_dir, capsys):
    assert main(["train", "--model", str(tiny_dir), "--out", str(tmp_path / "x"), "--set", "num_generations=1"]) == 2
    err = capsys.readouterr().err
    assert "bad value for num_generations: 1 (expected value >= 2)" in err and "Traceback" not in err
    assert main(["train", "--out", str(tmp_path / "y"), "--set", "task=nosuchtask"]) == 2
    assert "unknown task" in capsys.readouterr().err


def test_token_budget_split_keeps_the_step(tmp_path, tiny_dir):
    """max_tokens_per_forward cuts micro-batches into smaller forwards: the same optimizer steps (allclose),
    because the loss normalisers are the whole step's."""
    common = ["max_steps=2", "eval_n=0", "learning_rate=1e-3", *TOY]
    whole, split = tmp_path / "a", tmp_path / "b"
    run(whole, tiny_dir, *common)
    run(split, tiny_dir, *common, "max_tokens_per_forward=1")  # 1: one sequence per forward
    keys = ["loss/total", "grad_norm", "reward/mean"]
    for a, b in zip(metrics(whole), metrics(split)):
        assert all(abs(a[k] - b[k]) <= 1e-4 * max(1.0, abs(a[k])) for k in keys), (a, b)


def test_shared_prompts_keep_the_step(tmp_path, tiny_dir):
    """Running each group's prompt once (share_prompts) gives the same optimizer steps as full sequences, also
    off-policy (old log-probs and the clipped ratio), whole groups per forward or one row per forward."""
    common = ["max_steps=4", "eval_n=0", "learning_rate=1e-3", "num_iterations=2", *TOY]
    whole, single, full = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    run(whole, tiny_dir, *common, "max_tokens_per_forward=0")
    run(single, tiny_dir, *common, "max_tokens_per_forward=1")
    run(full, tiny_dir, *common, "share_prompts=false")
    keys = ["loss/total", "grad_norm", "reward/mean", "ratio/mean"]
    rows = list(zip(metrics(whole), metrics(single), metrics(full)))
    assert len(rows) == 4
    for a, b, c in rows:
        for x in (a, b):
            assert all(abs(x[k] - c[k]) <= 1e-4 * max(1.0, abs(c[k])) for k in keys), (x, c)
        assert a["perf/train_computed_tok_s"] < 0.6 * a["perf/train_tok_s"]  # 4 completions share each prompt
        assert c["perf/train_computed_tok_s"] == c["perf/train_tok_s"]


def test_train_questions_are_balanced_like_the_eval(tmp_path, tiny_dir, monkeypatch):
    """reasoning-gym's syllogisms are ~2/3 'Yes': GRPO trained on them as generated learns the prior, so its train
    questions are balanced by default (balanced_train), and only then."""
    from collections import Counter

    from smolthink import train_grpo

    seen = []

    def split(*args, **kw):
        train, ev = tasks.train_eval_split(*args, **kw)
        seen.append(Counter(e.answer for e in train))
        return train, ev

    monkeypatch.setattr(train_grpo, "train_eval_split", split)
    run(tmp_path / "a", tiny_dir, "max_steps=1", "eval_n=4", "train_size=600")
    run(tmp_path / "b", tiny_dir, "max_steps=1", "eval_n=4", "train_size=600", "balanced_train=false")
    assert seen[0] == {"Yes": 300, "No": 300}
    assert seen[1]["Yes"] > 1.5 * seen[1]["No"]
