"""Part (b): rollouts at the recipe's shape, HF generate vs FastEngine (or the paged engine), and a profile of one
FastEngine step."""
from __future__ import annotations

import sys
import time
from typing import Any

from ..rss import rss_phase
from .tables import summarize


def recipe_prompts(tok, n: int, seed: int) -> tuple[list[list[int]], list[dict]]:
    """n real syllogism questions rendered with the chat protocol -> (prompt ids, reasoning-gym entries)."""
    import reasoning_gym

    from ..chat import build_messages, render_prompt

    entries = list(reasoning_gym.create_dataset("syllogism", seed=seed, size=n))
    return [render_prompt(tok, build_messages(e["question"])) for e in entries], entries


def rollout_bench(args, model, tok, n_params: int, limit_gflops: float | None) -> dict[str, Any]:
    """The `--engines` (HF generate, FastEngine, the paged engine) on the same prompts, interleaved repetitions
    after one warm-up call each."""
    from ..models import eos_ids
    from ..rollout import make_engine
    from ..types import SamplingParams

    prompts, _ = recipe_prompts(tok, args.prompts, args.seed)
    eos = eos_ids(tok, model)
    engines = {}
    for name in [e.strip() for e in args.engines.split(",") if e.strip()]:
        engines[name] = make_engine(name, model, eos, tok.pad_token_id)
    sampling = SamplingParams(args.max_new_tokens, args.temperature, args.top_p)
    for eng in engines.values():  # warm-up: allocator, oneDNN primitives, lazy imports
        eng.generate(model, prompts[:2], 2, SamplingParams(16, args.temperature, args.top_p), seed=12345)
    runs: dict[str, list[dict]] = {k: [] for k in engines}
    for rep in range(args.reps):
        for name, eng in engines.items():
            t_cpu, t0 = time.process_time(), time.perf_counter()
            with rss_phase(f"rollout/{name}") as mem:
                out = eng.generate(model, prompts, args.group, sampling, seed=args.seed + rep)
            wall = time.perf_counter() - t0
            lens = [len(r.completion_ids) for g in out for r in g]
            rows = len(lens)
            steps = max(lens)
            run = {"rep": rep, "wall_s": wall, "cpu_s": time.process_time() - t_cpu, "tokens": sum(lens),
                   "tok_s": sum(lens) / wall, "tok_per_cpu_s": sum(lens) / max(time.process_time() - t_cpu, 1e-9),
                   "rows": rows, "steps": steps,
                   "real_row_frac": sum(lens) / (rows * steps),
                   "truncated": sum(x >= args.max_new_tokens for x in lens),
                   "ms_per_step": 1e3 * wall / steps, "rss_peak_gb": mem["peak_gb"],
                   "rss_added_gb": mem["peak_gb"] - mem["start_gb"]}
            stats = getattr(eng, "last_stats", None)
            if stats:
                run["phases"] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in stats.items()}
                run["decode_ms_per_step"] = 1e3 * stats["decode_s"] / max(1, stats["steps"])
                run["rows_per_step"] = stats["row_steps"] / max(1, stats["steps"])
                # rows it computed that produced a real token (finished rows leave the batch at once)
                run["real_row_frac"] = sum(lens) / max(1, stats["row_steps"] + rows)
            runs[name].append(run)
            print(f"  rollout {name} rep {rep}: {wall:.1f}s, {sum(lens)} tokens, {sum(lens) / wall:.1f} tok/s",
                  file=sys.stderr, flush=True)
    res: dict[str, Any] = {"prompts": args.prompts, "group": args.group, "max_new_tokens": args.max_new_tokens,
                           "temperature": args.temperature, "top_p": args.top_p, "n_params": n_params,
                           "prompt_tokens": [len(p) for p in prompts], "runs": runs, "summary": {}}
    for name, rs in runs.items():
        keys = ("tok_s", "tok_per_cpu_s", "wall_s", "cpu_s", "tokens", "ms_per_step", "real_row_frac", "rss_peak_gb")
        s = {k: summarize([r[k] for r in rs if k in r]) for k in keys}
        if limit_gflops:
            s["pct_flop_limit"] = summarize([100 * r["tok_s"] * 2 * n_params / (limit_gflops * 1e9) for r in rs])
        res["summary"][name] = s
    for name in runs:
        if name != "hf" and "hf" in runs:
            res[f"ratio_{name}_over_hf"] = (res["summary"][name]["tok_s"]["median"]
                                            / res["summary"]["hf"]["tok_s"]["median"])
    return res


def profile_fast_step(model, tok, prompts: int = 8, group: int = 6, steps: int = 32, seed: int = 0) -> dict[str, float]:
    """Where a FastEngine decoding step goes with prompts x group live rows (the recipe's syllogism prompts, EOS
    disabled so every row runs all steps), from torch.profiler: ms per step in GEMMs (linear layers incl.
    lm_head), attention (bmm/softmax), sampling ops and the rest."""
    from torch.profiler import ProfilerActivity, profile

    from ..rollout.fast import FastEngine
    from ..types import SamplingParams

    ids, _ = recipe_prompts(tok, prompts, seed)
    eng = FastEngine([model.config.vocab_size + 1], tok.pad_token_id)  # an EOS id that never comes
    eng.generate(model, ids, group, SamplingParams(4, 0.7, 0.95), seed=0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        eng.generate(model, ids, group, SamplingParams(steps, 0.7, 0.95), seed=0)
    cats = {"gemm": 0.0, "attention_bmm": 0.0, "softmax": 0.0, "sampling": 0.0, "other": 0.0}
    for ev in prof.key_averages():
        name, t = ev.key, ev.self_cpu_time_total / 1e3
        if "linear_pointwise" in name or name in ("aten::addmm", "aten::mm", "aten::linear"):
            cats["gemm"] += t
        elif name in ("aten::bmm", "aten::_scaled_dot_product_flash_attention_for_cpu"):
            cats["attention_bmm"] += t
        elif name == "aten::_softmax":  # attention and sampling softmax
            cats["softmax"] += t
        elif name in ("aten::topk", "aten::cumsum", "aten::searchsorted", "aten::div", "aten::isin"):
            cats["sampling"] += t
        else:
            cats["other"] += t
    st = eng.last_stats
    n = max(1, st["steps"])
    out = {f"{k}_ms_per_step": v / n for k, v in cats.items()}  # prefill included: its share is in benchmarks/README.md
    out.update({"rows": prompts * group, "steps": n, "profiled_s": sum(cats.values()) / 1e3,
                "wall_ms_per_step": 1e3 * st["decode_wall_s"] / n,
                "decode_ms_per_step": 1e3 * st["decode_s"] / n, "sample_ms_per_step": 1e3 * st["sample_s"] / n})
    return out
