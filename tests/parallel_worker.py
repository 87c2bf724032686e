"""Run by tests/test_parallel.py, alone or under torchrun: two optimizer steps of GRPO (each loss type) and of SFT
through the loops' own set-up and step functions, on data fixed in advance; process 0 writes what the steps gave
(loss, gradient norm, sequences, every process's rows) to OUT/result.json and the updated trainable weights to
OUT/<case>.safetensors.

usage: python parallel_worker.py MODEL_DIR TRACES OUT"""
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from smolthink import parallel, train_grpo, train_sft
from smolthink.buffer import Experience, ExperienceBuffer
from smolthink.checkpoint import trainable_state
from smolthink.config import GRPOConfig, SFTConfig, build_config
from smolthink.grpo import group_advantages
from smolthink.rundir import RunDir

P, G = 4, 2  # questions and completions per question of the fixed GRPO buffer


def fixed_experiences(vocab: int) -> list[Experience]:
    """P groups of G completions (random prompt and completion lengths and tokens, toy rewards), the same on every
    process: what a rollout batch gathered to every process holds."""
    g = torch.Generator().manual_seed(0)
    rewards = torch.rand(P, G, generator=g)  # [P, G]
    adv = group_advantages(rewards)  # [P, G]
    exps = []
    for b in range(P):
        prompt = torch.randint(3, vocab, (int(torch.randint(4, 12, (1,), generator=g)),), generator=g).tolist()
        for j in range(G):
            completion = torch.randint(3, vocab, (int(torch.randint(2, 14, (1,), generator=g)),), generator=g)
            exps.append(Experience(prompt_ids=prompt, completion_ids=completion.tolist(), old_logp=None,
                                   advantage=float(adv[b, j]), reward=float(rewards[b, j]), group=b))
    return exps


def grpo_case(model_dir: str, loss_type: str, out: Path) -> tuple[dict, dict]:
    """Two off-policy optimizer steps (old log-probs from the loop's sharded pass) on the fixed buffer."""
    cfg = build_config(GRPOConfig, [{"model": model_dir, "threads": 1, "eval.n": 0, "train_size": 8,
                                     "precision": "fp32",  # fp32: within the test's 1e-5 (bf16 rounding is not)
                                     "prompts_per_rollout": P, "num_generations": G, "buffer_size": P * G,
                                     "minibatch_size": 4, "gradient_accumulation_steps": 1, "num_iterations": 1,
                                     "max_completion_length": 16, "beta": 0.04, "learning_rate": 1e-2,
                                     "loss_type": loss_type}])
    ctx = train_grpo.setup(cfg, RunDir(out / f"run-{loss_type}"))
    buffer = ExperienceBuffer()
    buffer.extend(fixed_experiences(len(ctx.tok)))
    train_grpo.old_logprobs(ctx, buffer)
    plan = train_grpo.plan_steps(buffer, cfg, 0)  # 2 steps of 4 sequences
    steps = [train_grpo.optimizer_step(ctx, buffer, mbs) for mbs in plan]
    ctx.scorer.close()
    return steps_result(steps, plan, "loss/total"), trainable_state(ctx.model)


def sft_case(model_dir: str, traces: str, out: Path) -> tuple[dict, dict]:
    """The first two optimizer steps of SFT on the traces."""
    # fp32, 512-token chunks (one row each): both layouts then sum in the same order, within the test's 1e-5
    # (bf16 rounding, or one process's rows sharing one system-prompt forward, move the sums by ~3e-5)
    cfg = build_config(SFTConfig, [{"model": model_dir, "threads": 1, "eval.n": 0, "minibatch_size": 2,
                                    "precision": "fp32", "max_tokens_per_forward": 512,
                                    "gradient_accumulation_steps": 2, "learning_rate": 1e-2, "max_length": 512,
                                    "data.path": traces}])
    ctx = train_sft.setup(cfg, RunDir(out / "run-sft"), resume=False)
    state = train_sft.SFTState()
    plan, steps = [], []
    for _ in range(2):
        plan.append(train_sft.next_step(ctx, state))
        steps.append(train_sft.optimizer_step(ctx, plan[-1]))
        state.pos += 1
    ctx.scorer.close()
    return steps_result(steps, plan, "loss/sft"), trainable_state(ctx.model)


def steps_result(steps: list[dict], plan: list, loss_key: str) -> dict:
    """What the test compares, and every process's row count per step (the work was shared)."""
    (rows,) = parallel.gather_lists([[sum(map(len, parallel.rows(mbs))) for mbs in plan]])
    return {"loss": [m[loss_key] for m in steps], "grad_norm": [m["grad_norm"] for m in steps],
            "sequences": [m["train/sequences"] for m in steps], "rows": rows}


def main(model_dir: str, traces: str, out: str) -> None:
    """Every case in turn; process 0 writes the results."""
    out_dir = Path(out)
    results = {}
    for case in ("grpo", "dapo", "dr_grpo", "sft"):
        result, weights = sft_case(model_dir, traces, out_dir) if case == "sft" else grpo_case(model_dir, case,
                                                                                                out_dir)
        results[case] = {**result, "processes": parallel.world()}
        if parallel.is_main():
            save_file(weights, str(out_dir / f"{case}.safetensors"))
    if parallel.is_main():
        (out_dir / "result.json").write_text(json.dumps(results, indent=1))
    parallel.barrier()


if __name__ == "__main__":
    main(*sys.argv[1:])
