"""The sections of report.md, in the order write_report runs them. Each is a function `(ReportContext) -> lines`
that only reads the context (the plots section also writes its PNGs); a section with nothing to say returns []."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from ..data_auto import yield_lines
from ..log import fmt_duration
from .answers import AnswerDist, collapse_message
from .context import EvalRow, ReportContext
from .fmt import acc_cell, f3, fence, majority_cell, md_cell, pct, pts, shorten
from .load import RESULT_STAGES, Stage, accuracy_ci, is_num, series
from .plots import plot_eval, plot_length, plot_loss, plot_policy, plot_reward, plot_stages, plot_zero_std

log = logging.getLogger(__name__)

N_SAMPLES = 3  # sample completions shown per stage
MAX_COMPLETION_CHARS = 1500
MAX_QUESTION_CHARS = 280


def _rel(ctx: ReportContext, p: Path) -> str:
    """A path as shown in the report: relative to the run directory when inside it."""
    try:
        return str(p.relative_to(ctx.run))
    except ValueError:
        return str(p)


def _steps_line(stage: Stage) -> str:
    """"40 steps of 40 configured", "12 steps of 40 configured (stopped early)", or "no steps logged"."""
    last = stage.last_step
    if last is None:
        return "no steps logged"
    out = f"{last} steps"
    max_steps = stage.config.get("max_steps")
    if not is_num(max_steps) or max_steps <= 0:  # 0: derived from num_epochs (SFT)
        return out
    if last < max_steps:
        out += f" of {int(max_steps)} configured (stopped early)"
    else:
        out += f" of {int(max_steps)} configured"
    return out


# ----------------------------------------------------------------------------------------------- header, summary


def header_section(ctx: ReportContext) -> list[str]:
    """Title, answer-collapse warnings and what an incomplete run lacks."""
    kind = "pipeline" if ctx.pipeline else "single-stage " + ctx.stages[0].kind
    out = [f"# smolthink report: {ctx.run.resolve().name}", "",
           f"*Generated {time.strftime('%Y-%m-%d %H:%M')} from `{ctx.run}` ({kind} run directory).*", ""]
    final_row = ctx.final_row
    if final_row is not None:
        msg = collapse_message(ctx.dists.get(final_row.label), f"Answer collapse ({final_row.label}): the model")
        if msg:
            out += [f"> **⚠ {msg}**", ""]
    for row in ctx.rows:
        if row is not final_row and row.point is not None:
            msg = collapse_message(ctx.dists.get(row.label), f"Note ({row.label}): the model")
            if msg:
                out += [f"> {msg}", ""]
    if ctx.missing:
        out += ["> **Incomplete run.** Missing: " + "; ".join(ctx.missing) + ". The report shows what exists.", ""]
    return out


def _perf_line(stage: Stage) -> str:
    """Mean step time, throughput and peak memory from perf/* metrics."""
    rows = stage.metrics
    parts = []
    for key, fmt in (("perf/step_s", "{:.1f} s/step"), ("perf/rollout_s", "rollout {:.1f} s/fill"),
                     ("perf/train_s", "train {:.1f} s/step"), ("perf/rollout_tok_s", "rollout {:.0f} tok/s"),
                     ("perf/train_tok_s", "train {:.0f} tok/s")):
        _, ys = series(rows, key)
        ys = [y for y in ys if y > 0] if key == "perf/rollout_s" else ys
        if ys:
            parts.append(fmt.format(sum(ys) / len(ys)))
    _, rss = series(rows, "perf/peak_rss_gb")
    if rss:
        parts.append(f"peak RSS {max(rss):.1f} GB")
    return ", ".join(parts)


def summary_section(ctx: ReportContext) -> list[str]:
    """Task, model, one line per training stage, and the warm-up data's yield."""
    model = f"`{ctx.model}`" if ctx.model else "embedded default (SmolLM2-135M-Instruct)"
    out = ["## Summary", "", f"- **Task:** `{ctx.task}`" if ctx.task else "- **Task:** unknown",
           f"- **Model:** {model}"]
    for st in ctx.stages:
        perf = _perf_line(st)
        out.append(f"- **{st.kind} ({st.name})** — {_steps_line(st)}" + (f"; {perf}" if perf else ""))
    stats = ctx.data_stats
    if stats is not None:
        reasons = ", ".join(f"{k} {v}" for k, v in (stats.get("rejected_by_reason") or {}).items() if v)
        out.append(f"- **Warm-up traces ({stats.get('source', '?')}):** kept {stats.get('kept', '?')} of "
                   f"{stats.get('questions', stats.get('requested', '?'))} questions"
                   + (f", rejection rate {pct(stats['rejection_rate'])}" if is_num(stats.get("rejection_rate"))
                      else "")
                   + (f" ({reasons})" if reasons else ""))
        out += [f"  - {line}" for line in yield_lines(stats)]
    return out + [""]


def stages_section(ctx: ReportContext) -> list[str]:
    """Pipeline: each stage's status, wall time and size; single-stage run: its wall time."""
    if not ctx.pipeline:
        secs, src = ctx.wall_times[ctx.stages[0].name]
        return [f"Training wall time: {fmt_duration(secs)} ({src}).", ""] if secs is not None else []
    out = ["| stage | status | wall time | details |", "|---|---|---:|---|"]
    for name in RESULT_STAGES:
        secs, src = ctx.wall_times[name]
        stage, point = ctx.stage(name), ctx.stage_evals.get(name)
        detail = ""
        if stage is not None:
            detail = _steps_line(stage)
        elif point is not None:
            detail = f"n={point.summary.get('n')}"
        wall = fmt_duration(secs) + (" (approx.)" if "approx" in src else "") if secs is not None else "—"
        out.append(f"| {name} | {ctx.status[name]} | {wall} | {detail} |")
    if is_num(ctx.timings.get("report")):
        out.append(f"| report | done | {fmt_duration(ctx.timings['report'])} | |")
    known = [v for v in ctx.timings.values() if is_num(v)]
    if known:
        out += ["", f"Total recorded wall time: {fmt_duration(sum(known))} (timings.json)."]
    return out + [""]


# ----------------------------------------------------------------------------------------------- before / after


def _table_row(row: EvalRow, base_row: EvalRow | None, dist: AnswerDist | None) -> str:
    """One line of the before/after table."""
    if row.point is None:
        return f"| {row.label} | — | *missing* | — | — | — | — | — | — | — | {md_cell(row.note)} |"
    s = row.point.summary
    acc, base_acc = s.get("accuracy"), base_row.point.summary.get("accuracy") if base_row else None
    k = s.get("samples_per_question") or 1
    n = f"{s.get('n', '—')}" + (f" ×{k}" if is_num(k) and k > 1 else "")
    d_base = pts(acc - base_acc) if row is not base_row and is_num(acc) and is_num(base_acc) else "—"
    d_maj = pts(acc - s["majority_baseline"]) if is_num(acc) and is_num(s.get("majority_baseline")) else "—"
    top = f"{md_cell(dist.top[0])} {pct(dist.top[1])}" if dist and dist.top else "—"
    mean_len = f"{s['mean_completion_len']:.1f}" if is_num(s.get("mean_completion_len")) else "—"
    return (f"| {row.label} | {row.point.step} | {acc_cell(s)} | {f3(s.get('balanced_accuracy'))} | "
            f"{majority_cell(s)} | {f3(s.get('format_rate'))} | {mean_len} | {n} | {d_base} | {d_maj} | {top} |")


def _delta_line(row: EvalRow, base_row: EvalRow | None) -> str | None:
    """'- **sft**: accuracy +4.5 points vs base ...; ... vs the majority baseline' (None without an accuracy)."""
    if row.point is None or not is_num(row.point.summary.get("accuracy")):
        return None
    s = row.point.summary
    acc = s["accuracy"]
    base_acc = base_row.point.summary.get("accuracy") if base_row else None
    bits = []
    if row is not base_row and is_num(base_acc):
        bits.append(f"accuracy {pts(acc - base_acc)} points vs {base_row.label} ({base_acc:.3f} → {acc:.3f})")
    maj = s.get("majority_baseline")
    if is_num(maj):
        bits.append(f"{pts(acc - maj)} points vs the majority baseline ({maj:.3f})")
        ci = accuracy_ci(s)
        if ci and ci[0] <= maj <= ci[1]:
            bits.append("the 95% interval includes the majority baseline: not distinguishable from always "
                        f"answering {s.get('majority_class')!r}")
    return f"- **{row.label}**: " + "; ".join(bits) + "." if bits else None


def _notes(rows: Sequence[EvalRow]) -> list[str]:
    """Warnings beyond collapse: scoring errors, heavy truncation, low format rate."""
    out = []
    for row in rows:
        if row.point is None:
            continue
        s = row.point.summary
        if is_num(s.get("scoring_errors")) and s["scoring_errors"] > 0:
            out.append(f"{row.label}: {int(s['scoring_errors'])} scoring errors")
        if is_num(s.get("truncated_frac")) and s["truncated_frac"] >= 0.2:
            out.append(f"{row.label}: {pct(s['truncated_frac'])} of completions hit the token limit (truncated)")
        if is_num(s.get("format_rate")) and s["format_rate"] < 0.5:
            out.append(f"{row.label}: format rate {s['format_rate']:.3f}: most completions have no valid "
                       "<answer> block")
    return out


def before_after_section(ctx: ReportContext) -> list[str]:
    """The before/after table, the accuracy deltas vs the first row and vs the majority baseline, and notes."""
    out = ["## Before / after", ""]
    if not ctx.rows:
        out += ["*No eval summaries found: nothing to compare.*", ""]
    else:
        base_row = next((row for row in ctx.rows if row.point is not None), None)
        out += ["| stage | step | accuracy [95% CI] | balanced acc. | majority baseline | format rate | "
                "mean completion len | n | Δ acc vs base (pts) | Δ acc vs majority (pts) | top answer |",
                "|---|---:|---|---:|---|---:|---:|---:|---:|---:|---|"]
        rows = ctx.rows + ([ctx.control] if ctx.control is not None else [])
        out += [_table_row(row, base_row, ctx.dists.get(row.label)) for row in rows]
        sources = ", ".join(f"{row.label} = `{_rel(ctx, row.point.path)}`" for row in rows
                            if row.point is not None)
        out += ["", f"Sources: {sources}. Δ in percentage points of accuracy; \"top answer\": the most common "
                "predicted answer and its share of the answered completions.", ""]
        out += [line for line in (_delta_line(row, base_row) for row in rows) if line]
        out.append("")
    notes = _notes(ctx.rows)
    if notes:
        out += ["**Notes:**", "", *[f"- {n}" for n in notes], ""]
    return out


def answers_section(ctx: ReportContext) -> list[str]:
    """The most common predicted answers per eval row."""
    if not any(ctx.dists.values()):
        return []
    out = ["## Answer distribution", ""]
    for row in ctx.rows:
        d = ctx.dists.get(row.label) if row.point is not None else None
        if d is None or not d.shares:
            continue
        top = ", ".join(f"'{k}' {pct(v)}" for k, v in list(d.shares.items())[:5])
        unanswered = f"; no answer in {pct(1 - d.answered)}" if d.answered < 0.999 else ""
        out.append(f"- **{row.label}**: {top}{unanswered} (from {d.source})")
    return out + [""]


# ----------------------------------------------------------------------------------------------- plots


def _plot(ctx: ReportContext, errors: list[str], fn: Callable[..., bool], name: str, data: Any,
          title: str) -> str | None:
    """Run a plot function -> the markdown image link, or None when its data is missing (or it failed: the
    failure goes to `errors`)."""
    path = ctx.plots_dir / f"{name}.png"
    try:
        made = fn(data, path, title)
    except Exception as e:  # noqa: BLE001 - a broken plot must not cost the whole report
        log.warning("report: plot %s failed: %s", name, e)
        errors.append(f"`{name}.png`: {type(e).__name__}: {e}")
        return None
    return f"![{name}](plots/{name}.png)" if made else None


def _stage_plots(ctx: ReportContext, errors: list[str], st: Stage) -> list[str]:
    """All plots of one training stage -> markdown image links (plots whose data is missing are skipped)."""
    prefix = f"{st.name}_" if ctx.pipeline else ""
    title = f"{st.kind} stage" if ctx.pipeline else st.kind
    plots = ((plot_loss, "loss", st), (plot_reward, "reward", st), (plot_eval, "eval", st.evals),
             (plot_length, "length", st), (plot_zero_std, "zero_std", st), (plot_policy, "policy", st))
    links = [_plot(ctx, errors, fn, prefix + name, data, title) for fn, name, data in plots]
    return [link for link in links if link]


def plots_section(ctx: ReportContext) -> list[str]:
    """Accuracy per stage, then each training stage's curves; writes the PNGs under plots/."""
    ctx.plots_dir.mkdir(parents=True, exist_ok=True)
    out, errors = ["## Plots", ""], []
    any_plot = False
    if ctx.pipeline or len(ctx.rows) >= 2:
        name, heading = ("stages_accuracy", "Accuracy per stage") if ctx.pipeline else ("before_after",
                                                                                        "Before / after")
        link = _plot(ctx, errors, plot_stages, name, ctx.rows, "Pipeline" if ctx.pipeline else ctx.stages[0].kind)
        if link:
            out += [f"### {heading}", "", link, ""]
            any_plot = True
    for st in ctx.stages:
        links = _stage_plots(ctx, errors, st)
        if links:
            any_plot = True
            out += [f"### {st.kind} ({st.name})", ""]
            for link in links:
                out += [link, ""]
    for name in ("sft", "grpo") if ctx.pipeline else ():
        if ctx.stage(name) is None:
            out += [f"*No {name}/ stage: its plots are skipped.*", ""]
    if not any_plot:
        out += ["*No plottable data found.*", ""]
    if errors:
        out += ["Plots that failed: " + "; ".join(errors), ""]
    return out


# ----------------------------------------------------------------------------------------------- samples


def _pick_samples(samples: list[dict[str, Any]], prefer: Sequence[str]) -> list[dict[str, Any]]:
    """Up to N_SAMPLES samples: questions also shown for the other stage first, then a mix of right and wrong."""
    samples = [s for s in samples if isinstance(s, dict)]
    by_q = {s.get("question"): s for s in samples}
    chosen = [by_q[q] for q in prefer if q in by_q][:N_SAMPLES]
    rest = [s for s in samples if s not in chosen]
    right = [s for s in rest if s.get("correct")]
    wrong = [s for s in rest if not s.get("correct")]
    while len(chosen) < N_SAMPLES and (right or wrong):
        src = wrong if (wrong and (len(chosen) % 2 == 0 or not right)) else right
        chosen.append(src.pop(0))
    return chosen


def _sample_block(i: int, s: dict[str, Any]) -> list[str]:
    completion = str(s.get("completion", ""))
    if len(completion) > MAX_COMPLETION_CHARS:
        completion = completion[:MAX_COMPLETION_CHARS] + "\n… (truncated for the report)"
    return [f"**{i}.** gold: `{s.get('gold')}` · answer: `{s.get('answer')}` · correct: {s.get('correct')} · "
            f"format: {s.get('format')}", "",
            f"> {shorten(s.get('question'), MAX_QUESTION_CHARS)}", "", fence(completion), ""]


def _eval_samples(rows: Sequence[EvalRow]) -> list[str]:
    """The first and the last eval's sample completions, the same questions where both have them."""
    present = [row for row in rows if row.point is not None and isinstance(row.point.summary.get("samples"), list)
               and row.point.summary["samples"]]
    if not present:
        return ["*No eval samples found.*", ""]
    out = []
    chosen_rows = [present[0]] + ([present[-1]] if len(present) > 1 else [])
    after_pick = _pick_samples(chosen_rows[-1].point.summary["samples"], [])
    questions = [s.get("question") for s in after_pick]
    for n, row in enumerate(chosen_rows):
        when = "Before" if n == 0 and len(chosen_rows) > 1 else "After" if n else "Eval"
        out += [f"### {when}: {row.label} (step {row.point.step})", ""]
        picks = after_pick if row is chosen_rows[-1] and len(chosen_rows) > 1 else \
            _pick_samples(row.point.summary["samples"], questions)
        for i, s in enumerate(picks, 1):
            out += _sample_block(i, s)
    return out


def _training_samples(ctx: ReportContext, st: Stage) -> list[str]:
    """Two decoded rollouts from a training stage's latest samples file."""
    if not st.samples:
        return []
    step = st.samples[0].get("step", st.samples_file.stem)
    out = [f"### Training rollouts: {st.name}, step {step} (`{_rel(ctx, st.samples_file)}`)", ""]
    for i, s in enumerate(st.samples[:2], 1):
        extra = " · ".join(f"{k}: {s[k]:.3f}" for k in ("reward", "advantage") if is_num(s.get(k)))
        completion = str(s.get("completion", ""))[:MAX_COMPLETION_CHARS]
        out += [f"**{i}.** gold: `{s.get('gold')}` · answer: `{s.get('answer')}` · correct: {s.get('correct')} · "
                f"format: {s.get('format')}" + (f" · {extra}" if extra else ""), "", fence(completion), ""]
    return out


def samples_section(ctx: ReportContext) -> list[str]:
    """Eval completions before and after, then training rollouts per stage."""
    out = ["## Sample completions", ""] + _eval_samples(ctx.rows)
    for st in ctx.stages:
        out += _training_samples(ctx, st)
    return out
