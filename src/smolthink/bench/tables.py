"""Summaries of repeated measurements, the training FLOP accounting, and the plain-text results table."""
from __future__ import annotations

import statistics
from typing import Any, Sequence


def summarize(values: Sequence[float]) -> dict[str, float]:
    """median / min / max / n of a list of numbers."""
    v = [float(x) for x in values]
    if not v:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    return {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v)}


def training_flops(results: dict[str, Any], args) -> dict[str, Any] | None:
    """smolthink's GRPO training throughput as GFLOP/s and % of the GEMM limit at 2048 rows (training shapes), two
    ways: per sequence token (every prompt + completion token of the step's sequences: the work TRL does; with
    shared prompts each group's prompt runs once, so this is an effective rate) and per computed token (what the
    forwards actually ran: the hardware efficiency). FLOPs per token: 4 x n_params (forward 2N + input-gradient
    backward 2N; the frozen base weights take no weight gradient). Not counted: attention scores (~+10-15% at
    these lengths) and LoRA's own rank-r GEMMs (~+3%); over-counted: the LM head (~20% of N) on prompt
    positions, which never run it. The two roughly cancel."""
    side = (results.get("grpo") or {}).get("smolthink") or {}
    tok_s = (side.get("train_tok_s_summary") or {}).get("median")
    if not tok_s:
        return None
    computed = (side.get("train_computed_tok_s_summary") or {}).get("median") or tok_s
    n_params = (results.get("model") or {}).get("n_params")
    if not n_params:
        from ..models import load_model

        model, _ = load_model(args.model)
        n_params = sum(p.numel() for p in model.parameters())
        del model
    limit = results["gemm"]["limit_gflops_2048"]
    mkl = results["gemm"].get("mkl_m2048", {}).get("median")
    out = {"flops_per_token": 4 * n_params, "limit_gflops_2048": limit}
    for name, rate in (("", tok_s), ("computed_", computed)):
        gflops = rate * 4 * n_params / 1e9
        out.update({f"{name}train_tok_s": rate, f"{name}gflops": gflops, f"{name}pct_limit": 100 * gflops / limit,
                    f"{name}pct_mkl_2048": 100 * gflops / mkl if mkl else None})
    return out


def _fmt(s: dict | None, digits: int = 1) -> str:
    if not s or not s.get("n"):
        return "n/a"
    return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}-{s['max']:.{digits}f}]"


def format_table(results: dict[str, Any]) -> str:
    """Plain-text table of a results dict: median [min-max]."""
    lines = [_machine_line(results.get("machine", {}))]
    if results.get("gemm"):
        lines += _gemm_lines(results["gemm"], results.get("model", {}))
    lines += _decode_bound_lines(results.get("bandwidth"), results.get("decode_bounds"))
    if results.get("rollout"):
        lines += _rollout_lines(results["rollout"])
    if results.get("fast_step_profile"):
        lines += _profile_lines(results["fast_step_profile"])
    if results.get("grpo"):
        lines += _grpo_lines(results["grpo"])
    if results.get("training_flops"):
        lines += _training_flops_lines(results["training_flops"])
    if results.get("contention"):
        lines += _contention_lines(results["contention"])
    if results.get("rss"):
        from ..rss import peak_table

        lines += ["RSS per phase of this process (GB; the GRPO sides' own peaks are above)"]
        lines += peak_table(results["rss"])
    return "\n".join(lines)


def _machine_line(m: dict[str, Any]) -> str:
    return (f"machine: {m.get('cpu')} | {m.get('cores')} cores, torch threads {m.get('torch_threads')} | "
            f"load avg at start {', '.join(f'{x:.1f}' for x in (m.get('load_avg_start') or []))} | "
            + ", ".join(f"{k} {v}" for k, v in (m.get("versions") or {}).items() if v))


GEMM_ROWS = {"mkl": "MKL fp32", "onednn": "oneDNN fp32 packed", "onednn_plain": "oneDNN fp32 plain",
             "bf16_plain": "oneDNN bf16 plain", "bf16_packed": "oneDNN bf16 packed"}


def _gemm_lines(g: dict[str, Any], model: dict[str, Any]) -> list[str]:
    lines = ["(a) GEMM GFLOP/s, x[M,576] @ W[576,1536]   median [min-max]"]
    row_counts = sorted({int(k.rsplit("_m", 1)[1]) for k in g if k.rsplit("_m", 1)[-1].isdigit()})
    for M in row_counts:
        for name, label in GEMM_ROWS.items():
            if f"{name}_m{M}" in g:
                lines.append(f"    {label:19s} M={M:<5d} {_fmt(g[f'{name}_m{M}'])}")
        if g.get(f"limit_bf16_gflops_{M}") and g.get(f"limit_gflops_{M}"):
            ratio = g[f"limit_bf16_gflops_{M}"] / g[f"limit_gflops_{M}"]
            lines.append(f"    best bf16 / best fp32 at M={M}: {ratio:.2f}x")
    for key in (k for k in g if k.endswith("_streamed")):
        lines.append(f"    {'oneDNN fp32 packed':19s} M={key.split('_m')[1].split('_')[0]:5s} {_fmt(g[key])}"
                     f"  (weights streamed from RAM, as in a forward)")
    lim = f"{g['limit_gflops_48']:.0f} GFLOP/s at 48 rows"
    if model.get("decode_limit_tok_s"):
        lim += f" -> decode limit {model['decode_limit_tok_s']:.0f} tok/s ({model['n_params'] / 1e6:.1f}M params)"
    lines.append(f"    fp32 limit used below: {lim}")
    return lines


def _decode_bound_lines(bw: dict[str, Any] | None, db: dict[str, Any] | None) -> list[str]:
    lines = []
    if bw:
        lines.append(f"    memory bandwidth, streaming copy of {bw['buffer_mb']:.0f} MB (read + write): "
                     f"{_fmt(bw['copy_gb_s'])} GB/s")
    if db:
        lines.append(f"    decode limit at {db['rows']} rows, {db['n_params'] / 1e6:.1f}M params (steps/s and tok/s):")
        for prec in ("fp32", "bf16"):
            b = db[prec]
            parts = []
            if "flop_steps_s" in b:
                parts.append(f"FLOP bound {b['flop_steps_s']:.1f} steps/s = {b['flop_tok_s']:.0f} tok/s")
            if "bandwidth_steps_s" in b:
                parts.append(f"bandwidth bound {b['bandwidth_steps_s']:.1f} steps/s = {b['bandwidth_tok_s']:.0f} tok/s "
                             f"({b['weight_bytes_per_step'] / 1e6:.0f} MB of weights per step)")
            if "kv_bytes_per_step" in b:
                parts.append(f"the KV cache adds {b['kv_bytes_per_step'] / 1e6:.0f} MB per step at "
                             f"{db['context']} tokens of context")
            lines.append(f"      {prec}: " + "; ".join(parts))
    return lines


def _rollout_lines(r: dict[str, Any]) -> list[str]:
    lines = [f"(b) rollouts: {r['prompts']} prompts x G={r['group']}, <= {r['max_new_tokens']} new tokens, "
             f"T={r['temperature']}, top_p={r['top_p']}; {len(next(iter(r['runs'].values())))} reps",
             f"    {'engine':6s} {'real tok/s':>22s} {'wall s':>22s} {'ms/step (wall/steps)':>22s} "
             f"{'% FLOP limit':>18s} {'real rows':>9s} {'peak RSS GB':>12s}"]
    for name, s in r["summary"].items():
        lines.append(f"    {name:6s} {_fmt(s['tok_s']):>22s} {_fmt(s['wall_s']):>22s} "
                     f"{_fmt(s['ms_per_step']):>22s} "
                     f"{_fmt(s.get('pct_flop_limit')):>18s} {s['real_row_frac']['median'] * 100:8.0f}% "
                     f"{s['rss_peak_gb']['max']:12.2f}")
    for name, label in (("fast", "FastEngine"), ("paged", "paged engine")):
        if f"ratio_{name}_over_hf" in r:
            lines.append(f"    {label} / HF real tokens/s (medians): {r[f'ratio_{name}_over_hf']:.1f}x")
    lines.append("    real tokens per CPU-second of this process (less sensitive to other load): "
                 + ", ".join(f"{name} {_fmt(s.get('tok_per_cpu_s'))}" for name, s in r["summary"].items()))
    fast = r["runs"].get("fast") or []
    if fast and "phases" in fast[0]:
        ph = [x["phases"] for x in fast]
        med = {k: statistics.median(p[k] for p in ph) for k in ("prep_s", "prefill_s", "decode_s", "sample_s")}
        lines.append("    fast phases (median s): " + ", ".join(f"{k[:-2]} {v:.2f}" for k, v in med.items())
                     + f"; rows/step {statistics.median(x['rows_per_step'] for x in fast):.1f}, "
                       f"shared prefix {ph[0]['prefix_len']} tokens")
    return lines


def _profile_lines(p: dict[str, Any]) -> list[str]:
    return [f"    fast decode step at {p['rows']} rows (profiler, ms/step): "
            + ", ".join(f"{k} {p[k + '_ms_per_step']:.1f}"
                        for k in ("gemm", "attention_bmm", "softmax", "sampling", "other")
                        if k + "_ms_per_step" in p)
            + f"; engine timers (profiler on): forward {p['decode_ms_per_step']:.1f} + sampling "
              f"{p['sample_ms_per_step']:.1f}"]


def _grpo_lines(gr: dict[str, Any]) -> list[str]:
    lines = ["(c) GRPO step, same work (s, median [min-max] over measured steps; first step excluded)"]
    for side, v in gr.items():
        if not v.get("available", True):
            lines.append(f"    {side:9s} not available: {v.get('reason')}")
            continue
        ver = f" {v['version']}" if v.get("version") else ""
        lines.append(f"    {side + ver:14s} step {_fmt(v.get('step_s_summary'))}  rollout "
                     f"{_fmt(v.get('rollout_s_summary'))}  train {_fmt(v.get('train_s_summary'))}  "
                     f"peak RSS {v.get('peak_rss_gb') or float('nan'):.2f} GB")
    sides = {k: v.get("step_s_summary", {}).get("median") for k, v in gr.items()}
    if sides.get("trl") and sides.get("smolthink"):
        lines.append(f"    smolthink / TRL seconds per step (medians): {sides['smolthink'] / sides['trl']:.2f}x")
    return lines


def _training_flops_lines(tf: dict[str, Any]) -> list[str]:
    lines = []
    for name, what in (("", "sequence tokens (all prompt + completion tokens of the step)"),
                       ("computed_", "computed tokens (what the forwards ran; prompts once per chunk)")):
        if name and tf.get("computed_train_tok_s", tf["train_tok_s"]) == tf["train_tok_s"]:
            continue
        mkl = f", {tf[name + 'pct_mkl_2048']:.0f}% of MKL's" if tf.get(name + "pct_mkl_2048") else ""
        lines.append(f"    smolthink training, {what}: {tf[name + 'train_tok_s']:.0f} tok/s x "
                     f"{tf['flops_per_token'] / 1e9:.2f} GFLOP/token = {tf[name + 'gflops']:.0f} GFLOP/s = "
                     f"{tf[name + 'pct_limit']:.0f}% of the GEMM limit at 2048 rows "
                     f"({tf['limit_gflops_2048']:.0f} GFLOP/s{mkl})")
    return lines


def _ratio(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def _contention_lines(c: dict[str, Any]) -> list[str]:
    sh = c["shape"]
    lines = [f"(d) contention: quiet vs one `{c['spinner']}` process beside it; rollout {sh['prompts']} x "
             f"{sh['group']}, <= {sh['max_new_tokens']} new tokens; training {sh['train_chunk']}",
             f"    {'policy':8s} {'threads':>7s} {'rollout tok/s quiet':>20s} {'busy':>18s} {'busy/quiet':>10s} "
             f"{'/best':>6s} {'train tok/s quiet':>18s} {'busy':>18s} {'busy/quiet':>10s} {'/best':>6s}  used (busy)"]
    for row in c["summary"]:
        cells = []
        for k in ("rollout_tok_s", "train_tok_s"):
            v = row[k]
            cells.append(f"{_fmt(v['quiet'], 0):>18s} {_fmt(v['busy'], 0):>18s} {_ratio(v['busy_over_quiet']):>10s} "
                         f"{_ratio(v['busy_over_best_quiet']):>6s}")
        name = "auto" if row["threads"] == 0 else str(row["threads"])
        used = ", ".join(f"{a}/{b}" for a, b in row["threads_used_busy"])
        lines.append(f"    {row['policy']:8s} {name:>7s}   {cells[0]} {cells[1]}  {used}")
    errors = [r for r in c["runs"] if "error" in r]
    if errors:
        lines.append(f"    {len(errors)} child run(s) failed, e.g. {errors[0]['error']}")
    return lines
