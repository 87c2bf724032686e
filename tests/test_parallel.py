"""Data parallelism on CPU: `torchrun --nproc_per_node 2` (gloo) with the tiny model against one process.

(`accelerate launch --cpu --num_processes 2` would silently run one process, so the tests call torchrun.)"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import smolthink
from smolthink.cli import main

HERE = Path(__file__).parent
WORKER = HERE / "parallel_worker.py"
TOL = 1e-5  # losses and gradient norms
# Weights after the two AdamW steps at lr 1e-2: Adam divides each gradient element by its own running scale, so a
# weight whose gradient is tiny carries that gradient's fp32 rounding (which differs with the CPU's GEMM kernels,
# AVX2 against AVX-512) amplified towards lr: up to 1.01e-5 on an AVX2 machine (dapo; grpo 2.5e-6, sft 1.2e-6). The
# losses and gradient norms above still agree within 1e-5, and they are what a missing gradient sum or a
# per-process normaliser would move.
WEIGHT_TOL = 5e-5


def launch(n: int | None, *args) -> subprocess.Popen:
    """`python ARGS` (n None) or `torchrun --standalone --nproc_per_node n ARGS` (a free port, so concurrent test
    runs do not collide), with smolthink's sources and tests/ importable."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(smolthink.__file__).parents[1]), str(HERE),
                                                         os.environ.get("PYTHONPATH", "")]),
           "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": "1"}
    head = [sys.executable] if n is None else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                               "--nproc_per_node", str(n)]
    return subprocess.Popen(head + [str(a) for a in args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def finish(proc: subprocess.Popen) -> None:
    """Wait for a launched run; fail with its output when it failed."""
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]


def test_two_processes_equal_one_process_with_the_whole_batch(tmp_path, tiny_dir, traces):
    """Two processes with half of each optimizer step's rows give the loss, gradient norm and updated weights of
    one process with all of them, for each GRPO loss type (grpo, dapo, dr_grpo) and for SFT, within 1e-5 (weights:
    WEIGHT_TOL).

    Design: the rollouts must be the same in both runs, but each process samples its own questions with its own
    seed (`parallel.process_seed`), so a two-process run's completions differ from a one-process run's. The
    comparison therefore starts after the rollouts: `parallel_worker.py` builds each loop's real context
    (`train_grpo.setup`, `train_sft.setup`: accelerate, LoRA, optimizer), fills the GRPO buffer with a fixed set of
    groups (what a rollout batch gathered to every process holds: random prompts and completions of mixed lengths,
    toy rewards, group advantages), and runs two optimizer steps through the loops' own functions: the sharded
    old log-prob pass (`train_grpo.old_logprobs`: each process its slice, gathered), `plan_steps`, and
    `optimizer_step` (each process its rows, losses over the whole step's counts, gradients summed over the
    processes, stats merged), with the KL term on. SFT takes its first two steps of the traces. Two steps, because
    the LoRA A matrices get no gradient while B is still zero, and the second GRPO step runs off the sampling
    policy (ratio away from 1). A
    process that trained on every row, a missing gradient sum or a per-process normaliser would each move the
    numbers far more than 1e-5; the rows each process ran show the work was shared."""
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    procs = [launch(None, WORKER, tiny_dir, traces, one), launch(2, WORKER, tiny_dir, traces, two)]
    for p in procs:
        finish(p)
    a, b = (json.loads((d / "result.json").read_text()) for d in (one, two))
    for case in ("grpo", "dapo", "dr_grpo", "sft"):
        ra, rb = a[case], b[case]
        assert (ra["processes"], rb["processes"]) == (1, 2)
        assert ra["rows"] == [[4, 4]] and rb["rows"] == [[2, 2], [2, 2]], case  # every process ran half the rows
        assert ra["sequences"] == rb["sequences"] == [4.0, 4.0]
        assert min(ra["grad_norm"]) > 1e-3, case  # a real gradient
        for key in ("loss", "grad_norm"):
            assert ra[key] == pytest.approx(rb[key], abs=TOL, rel=0), (case, key, ra[key], rb[key])
        wa, wb = (load_file(str(d / f"{case}.safetensors")) for d in (one, two))
        assert set(wa) == set(wb) and wa
        worst = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
        print(f"{case}: worst weight difference {worst:.2e}")
        assert worst < WEIGHT_TOL, (case, worst)
    assert a["grpo"]["loss"] != pytest.approx(a["dapo"]["loss"], abs=TOL)  # the loss types really differ


GRPO = ["prompts_per_rollout=2", "num_generations=4", "max_completion_length=12", "buffer_size=8",
        "minibatch_size=4", "gradient_accumulation_steps=2", "eval_n=2", "eval_max_new_tokens=8", "train_size=64",
        "engine=hf", "threads=1", "sample_every=1", "max_steps=2", "correct_weight=0", "format_weight=0",
        "reward_functions=[toy_rewards:spaces]"]
SFT = ["threads=1", "eval.n=0", "minibatch_size=4", "gradient_accumulation_steps=2", "max_length=512", "max_steps=2", "data.num_traces=8"]


def cli(command: str, out: Path, tiny_dir, sets: list[str]) -> list:
    """`smolthink COMMAND` arguments (`python -m smolthink.cli` under torchrun)."""
    args = ["-m", "smolthink.cli", command, "--model", tiny_dir, "--out", out]
    for s in sets:
        args += ["--set", s]
    return args


def test_train_and_sft_run_under_torchrun(tmp_path, tiny_dir):
    """`smolthink train` and `smolthink sft` unchanged under torchrun with 2 processes: one run directory written
    by process 0 alone (one metrics row per step, process 0's eval before the first step, traces generated once),
    global metrics (both processes' sequences and groups), every question of a rollout batch drawn as one process
    would draw it, a checkpoint holding both processes' RNG states, the final model and DONE; a one-process resume
    of that checkpoint is refused."""
    from smolthink.config import GRPOConfig, build_config
    from smolthink.configlib import parse_overrides
    from smolthink.questions import make_source
    from smolthink.tasks import parse_tasks, train_eval_split

    grpo, sft = tmp_path / "grpo", tmp_path / "sft"
    procs = [launch(2, *cli("train", grpo, tiny_dir, GRPO)), launch(2, *cli("sft", sft, tiny_dir, SFT))]
    for p in procs:
        finish(p)
    for out in (grpo, sft):
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2], out
        assert (out / "DONE").is_file() and (out / "final" / "adapter").is_dir()
        trainer = torch.load(out / "checkpoints" / "step_000002" / "trainer.pt", weights_only=False)
        assert len(trainer["rng"]) == 2
    assert rows[0]["train/sequences"] == 8  # SFT: both processes' rows (4 x 2 accumulation)
    g_rows = [json.loads(line) for line in (grpo / "metrics.jsonl").read_text().splitlines()]
    assert g_rows[0]["train/sequences"] == 8 and g_rows[0]["groups/total"] == 2
    assert json.loads((grpo / "eval" / "step_000000.json").read_text())["n"] == 2
    cfg = build_config(GRPOConfig, [{"model": str(tiny_dir)}, parse_overrides(GRPO)])
    specs = parse_tasks(cfg.task)
    train, eval_set = train_eval_split(specs, cfg.train_size, cfg.eval.n, cfg.seed, balanced_eval=cfg.eval.balanced,
                                       balanced_train=cfg.balanced_train)
    drawn = make_source(cfg, specs, train, (e.question for e in eval_set)).next_batch(2, 0)
    groups = [json.loads(line) for line in (grpo / "groups" / "step_000001.jsonl").read_text().splitlines()]
    assert [g["question"] for g in groups] == [d.example.question for d in drawn]
    assert (sft / "traces.jsonl").is_file() and len((sft / "traces.jsonl").read_text().splitlines()) == 8
    assert main(["train", "--resume", str(grpo), "--set", "max_steps=3"]) == 2  # written by 2 processes
