"""The report's RL sections: whether SFT + GRPO beats the equal-time SFT-only control (accuracy and pass@k /
mean@k with intervals, and a plain verdict), whether a trained model collapsed (one answer for everything, runaway
length), and where the GRPO stage's rollouts went (zero-signal groups, tokens
spent on questions already solved, dynamic sampling, curriculum levels, replay)."""
from __future__ import annotations

from typing import Any, Sequence

from ..log import fmt_duration
from .context import ReportContext
from .fmt import acc_cell, f3, pct, pts
from .load import Stage, accuracy_ci, is_num, rl_on, series


# ----------------------------------------------------------------------------------------------- RL vs control


def verdict(grpo: dict[str, Any], control: dict[str, Any]) -> str:
    """One plain sentence: is SFT + GRPO better than equal-time SFT, by non-overlapping 95% intervals?"""
    a, b = grpo.get("accuracy"), control.get("accuracy")
    ci_a, ci_b = accuracy_ci(grpo), accuracy_ci(control)
    if not (is_num(a) and is_num(b) and ci_a and ci_b):
        return "No verdict: an accuracy or its interval is missing."
    diff = f"{pts(a - b)} points ({a:.3f} vs {b:.3f})"
    if ci_a[0] > ci_b[1]:
        return f"**The RL gain is real:** SFT + GRPO beats equal-time SFT by {diff}; the 95% intervals do not overlap."
    if ci_b[0] > ci_a[1]:
        return (f"**Equal-time SFT wins:** SFT + GRPO is {diff} behind it and the 95% intervals do not overlap; the "
                "GRPO stage's time is better spent on more SFT.")
    return (f"**No RL gain shown:** SFT + GRPO vs equal-time SFT is {diff}, and the 95% intervals overlap: the "
            "difference is within the noise.")


def _control_line(st: Stage | None, budget: Any) -> str:
    """How the control trained: steps, epochs over the traces, wall time vs its budget."""
    if st is None or st.last_step is None:
        return ""
    _, epochs = series(st.metrics, "epoch")
    bits = [f"{st.last_step} SFT steps"]
    if epochs:
        bits.append(f"{epochs[-1]:.1f} epochs over the warm-up traces")
    if is_num(budget):
        bits.append(f"a budget of {fmt_duration(budget)} (the grpo stage's wall time)")
    return "The control trained " + ", ".join(bits) + "."


def _passk_rows(ctx: ReportContext) -> list[str]:
    """The pass@k / mean@k table with intervals, and what GRPO did to each."""
    if not ctx.passk:
        return []
    k = next((s.get("samples_per_question") for s in ctx.passk.values()), "k")
    out = [f"pass@{k} / mean@{k} on {next(iter(ctx.passk.values())).get('n', '?')} held-out questions, {k} samples "
           "each (`passk/`):", "", f"| model | mean@{k} [95% CI] | pass@{k} [95% CI] |", "|---|---|---|"]
    names = {"sft": "sft (before GRPO)", "grpo": "sft + grpo", "sft_control": "sft_control (equal-time SFT)"}
    for name, s in ctx.passk.items():
        ci = s.get("pass@k_ci95")
        passk = f3(s.get("pass@k")) + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if isinstance(ci, list) and len(ci) == 2
                                       else "")
        out.append(f"| {names.get(name, name)} | {acc_cell(s)} | {passk} |")
    before, after = ctx.passk.get("sft"), ctx.passk.get("grpo")
    if before and after and all(is_num(x.get(m)) for x in (before, after) for m in ("pass@k", "mean@k")):
        out += ["", f"GRPO moved mean@{k} by {pts(after['mean@k'] - before['mean@k'])} points and pass@{k} by "
                f"{pts(after['pass@k'] - before['pass@k'])} points" + (
                    f" (pass@{k} flat while mean@{k} rose: RL sharpened the answers it could already reach)"
                    if abs(after["pass@k"] - before["pass@k"]) < 0.01 <= after["mean@k"] - before["mean@k"] else "")
                + "."]
    return out + [""]


def control_section(ctx: ReportContext) -> list[str]:
    """SFT + GRPO next to the equal-time SFT-only control, the verdict, and pass@k / mean@k."""
    final = ctx.rows[-1] if ctx.pipeline and ctx.rows and ctx.rows[-1].point is not None else None  # sft + grpo
    if ctx.control is None and not ctx.passk:
        return []
    out = ["## RL vs equal-time SFT", ""]
    if ctx.pipeline and not rl_on(ctx.config):
        out += ["*No GRPO stage in this run (`rl: false`, the default): the SFT model is the final model. "
                "`--set rl=true --set sft_control=true` adds GRPO and its equal-time SFT control.*", ""]
    elif final is not None and ctx.control is not None:
        st = ctx.stage("sft_control")
        budget = st.config.get("max_seconds") if st is not None else None
        out += ["| run | accuracy [95% CI] |", "|---|---|", f"| sft + grpo | {acc_cell(final.point.summary)} |",
                f"| {ctx.control.label} | {acc_cell(ctx.control.point.summary)} |", "",
                verdict(final.point.summary, ctx.control.point.summary), ""]
        line = _control_line(st, budget)
        out += [line, ""] if line else []
    elif ctx.control is None:
        out += ["*No equal-time SFT control in this run (`sft_control: false` or not run yet): no RL verdict.*", ""]
    return out + _passk_rows(ctx)


# ----------------------------------------------------------------------------------------------- collapse checks

SHARE_SLACK = 0.05  # an answer may be given this much more often than the most common gold answer
MAX_LENGTH_GROWTH = 1.5  # mean completion length may grow by at most half over the model it started from


def collapse_checks(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """The no-collapse checks of a trained model's eval summary `after` against the one it started from (`before`)
    -> one line per check, each ending in "ok" or a bold warning:
    * answer shares: no answer given more often than the most common gold answer (the majority baseline; 0.5 on
      a balanced two-class set) plus SHARE_SLACK, since RL that learns the prior ("Yes" to everything, "1" to every
      count) scores near that baseline and looks like progress in the reward;
    * length: the mean completion length grows by at most MAX_LENGTH_GROWTH x."""
    out = []
    dist, maj = after.get("answer_distribution") or {}, after.get("majority_baseline")
    if dist and is_num(maj):
        top, share = max(dist.items(), key=lambda kv: kv[1])
        ok = share <= maj + SHARE_SLACK
        out.append(f"most frequent answer `{top}` in {pct(share)} of completions (most common gold answer "
                   f"{pct(maj)}): " + ("ok" if ok else "**skewed to one answer**"))
    a, b = after.get("mean_completion_len"), before.get("mean_completion_len")
    if is_num(a) and is_num(b) and b > 0:
        ok = a <= MAX_LENGTH_GROWTH * b
        out.append(f"mean completion length {b:.0f} → {a:.0f} tokens ({a / b:.2f}x): "
                   + ("ok" if ok else f"**grew by more than {MAX_LENGTH_GROWTH - 1:.0%}**"))
    return out


def collapse_section(ctx: ReportContext) -> list[str]:
    """The collapse checks of the SFT model (against base it cannot be compared: base rarely answers) and of the
    models trained from it (GRPO, the control)."""
    if not ctx.pipeline:
        return []
    sft = next((r for r in ctx.rows if r.label == "sft" and r.point is not None), None)
    trained = [r for r in ctx.rows[2:] + ([ctx.control] if ctx.control else []) if r.point is not None]
    if sft is None:
        return []
    out = ["## Collapse checks", ""]
    for row in [sft] + trained:
        lines = collapse_checks(sft.point.summary if row is not sft else {}, row.point.summary)
        out += [f"* {row.label}: " + "; ".join(lines)] if lines else []
    return out + [""]


# ----------------------------------------------------------------------------------------------- the RL budget


def _mean(rows: Sequence[dict[str, Any]], key: str) -> float | None:
    _, ys = series(rows, key)
    return sum(ys) / len(ys) if ys else None


def _per_fill(rows: Sequence[dict[str, Any]], key: str) -> float | None:
    """A per-fill count summed over the fills (each fill's metrics repeat on every step it trains)."""
    seen = {}
    for r in rows:
        if is_num(r.get(key)) and is_num(r.get("rollout/fill")):
            seen[int(r["rollout/fill"])] = float(r[key])
    return sum(seen.values()) if seen else None


def _levels(rows: Sequence[dict[str, Any]]) -> list[str]:
    """curriculum/<task>/<attr>: first -> last level, and the range visited."""
    keys = sorted({k for r in rows for k in r if k.startswith("curriculum/") and not k.endswith("/window_acc")})
    out = []
    for key in keys:
        _, ys = series(rows, key)
        if ys:
            out.append(f"`{key.removeprefix('curriculum/')}` {ys[0]:.0f} → {ys[-1]:.0f} (range {min(ys):.0f}–"
                       f"{max(ys):.0f})")
    return out


def budget_section(ctx: ReportContext) -> list[str]:
    """Where the GRPO stage's rollouts went, from its groups/* and rollout/* metrics (means over steps)."""
    st = next((s for s in ctx.stages if s.kind == "GRPO"), None)
    rows = st.metrics if st is not None else []
    if _mean(rows, "groups/all_correct_frac") is None:
        return []
    m = {k: _mean(rows, k) for k in ("groups/all_correct_frac", "groups/all_wrong_frac", "groups/low_pass_frac",
                                       "groups/high_pass_frac", "groups/pass_rate_mean",
                                       "reward/frac_zero_std_groups", "rollout/tokens_all_correct_frac",
                                       "rollout/tokens_all_wrong_frac")}
    out = ["## Where the RL budget went", "",
           f"Per group of G completions (strict correctness), mean over {len(rows)} steps:", "",
           "| all wrong | some right (< half) | mostly right (≥ half, not all) | all right | mean pass rate | "
           "zero reward std |", "|---:|---:|---:|---:|---:|---:|",
           "| " + " | ".join(pct(v) if is_num(v) else "—" for v in (
               m["groups/all_wrong_frac"], m["groups/low_pass_frac"], m["groups/high_pass_frac"],
               m["groups/all_correct_frac"])) + f" | {f3(m['groups/pass_rate_mean'])} | "
           + (pct(m["reward/frac_zero_std_groups"]) if is_num(m["reward/frac_zero_std_groups"]) else "—") + " |", ""]
    if is_num(m["rollout/tokens_all_correct_frac"]):
        out.append(f"- Rollout tokens spent on questions solved every time: {pct(m['rollout/tokens_all_correct_frac'])}"
                   f"; on questions never solved: {pct(m['rollout/tokens_all_wrong_frac'] or 0)}.")
    dropped, total = _per_fill(rows, "groups/dropped"), _per_fill(rows, "groups/total")
    extra = _per_fill(rows, "rollout/extra_batches")
    if dropped and total:
        out.append(f"- Dynamic sampling dropped {dropped:.0f} of {total:.0f} groups, at the cost of {extra or 0:.0f} "
                   "extra rollout batches.")
    levels = _levels(rows)
    if levels:
        out.append("- Curriculum levels (first → last): " + "; ".join(levels) + ".")
    share = _mean(rows, "replay/groups_frac")
    if is_num(share):
        _, pool = series(rows, "replay/pool_size")
        out.append(f"- Replay: {pct(share)} of groups were replayed questions (mean pass rate "
                   f"{f3(_mean(rows, 'replay/pass_rate_mean'))}); pool size at the end {pool[-1]:.0f}.")
    return out + ["", "Every group of every fill: `groups/step_*.jsonl` (question, origin, level, pass rate).", ""]
