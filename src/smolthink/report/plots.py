"""The report's plots: one function per figure, each `(data, path, title) -> bool` (False when the run holds no
data for it). matplotlib's object API with the Agg canvas: no pyplot, no global backend switch."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from .context import EvalRow
from .load import EvalPoint, Stage, accuracy_ci, has_metric, is_num, series


def _figure(nrows: int = 1, height: float = 3.0):
    """A figure of `nrows` stacked panels sharing the step axis -> (figure, [axes])."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(8.0, 0.6 + height * nrows), dpi=110, layout="constrained")
    axes = fig.subplots(nrows, 1, sharex=True, squeeze=False)[:, 0]
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are integers
    return fig, list(axes)


def _save(fig, axes, path: Path) -> bool:
    """Label the step axis under the bottom panel and write the PNG -> True (the plot was made)."""
    axes[-1].set_xlabel("optimizer step")
    fig.savefig(path)
    return True


def _smooth(ys: Sequence[float]) -> tuple[list[float], int]:
    """Trailing moving average (window ~ len/20, >= 5) for noisy per-step curves; window 1 when short."""
    if len(ys) < 30:
        return list(ys), 1
    w = max(5, len(ys) // 20)
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y
        if i >= w:
            acc -= ys[i - w]
        out.append(acc / min(i + 1, w))
    return out, w


def _curve(ax, xs, ys, label: str, color: str | None = None, **kw) -> None:
    """A per-step curve: raw values, plus a bold moving average when there are many steps."""
    smooth, w = _smooth(ys)
    marker = "o" if len(xs) <= 30 else None
    if w == 1:
        ax.plot(xs, ys, label=label, color=color, marker=marker, markersize=3, **kw)
    else:
        (line,) = ax.plot(xs, ys, color=color, alpha=0.3, linewidth=0.8, **kw)
        ax.plot(xs, smooth, color=line.get_color(), label=f"{label} (moving avg, {w} steps)", **kw)


def plot_reward(stage: Stage, path: Path, title: str) -> bool:
    """Reward mean ±1 std band (top) and its parts (bottom)."""
    rows = stage.metrics
    parts = [k for k in ("reward/correct", "reward/format", "reward/partial", "reward/length") if has_metric(rows, k)]
    if not has_metric(rows, "reward/mean") and not parts:
        return False
    fig, axes = _figure(2 if has_metric(rows, "reward/mean") and parts else 1)
    ax_iter = iter(axes)
    if has_metric(rows, "reward/mean"):
        ax = next(ax_iter)
        xs, mean = series(rows, "reward/mean")
        std = [float(r["reward/std"]) if is_num(r.get("reward/std")) else math.nan
               for r in rows if is_num(r.get("reward/mean"))]
        if any(is_num(v) for v in std):
            lo = [m - s if is_num(s) else math.nan for m, s in zip(mean, std)]
            hi = [m + s if is_num(s) else math.nan for m, s in zip(mean, std)]
            ax.fill_between(xs, lo, hi, color="tab:blue", alpha=0.18, linewidth=0, label="±1 std (within step)")
        _curve(ax, xs, mean, "reward mean", "tab:blue")
        ax.set_ylabel("reward")
        ax.set_title(f"{title}: reward per step")
        ax.legend(loc="best", fontsize=8)
    if parts:
        ax = next(ax_iter)
        colors = {"reward/correct": "tab:green", "reward/format": "tab:orange", "reward/partial": "tab:purple",
                  "reward/length": "tab:gray"}
        for k in parts:
            xs, ys = series(rows, k)
            _curve(ax, xs, ys, k.split("/", 1)[1], colors[k])
        ax.set_ylabel("mean over completions")
        ax.set_title(f"{title}: reward parts")
        ax.legend(loc="best", fontsize=8)
    return _save(fig, axes, path)


def plot_eval(points: Sequence[EvalPoint], path: Path, title: str) -> bool:
    """Held-out accuracy (95% interval as error bars), balanced accuracy and format rate per eval step, with the
    majority-class baseline as a dashed line."""
    pts = [p for p in points if is_num(p.summary.get("accuracy"))]
    if not pts:
        return False
    fig, (ax,) = _figure(1, 3.6)
    xs = [p.step for p in pts]
    acc = [float(p.summary["accuracy"]) for p in pts]
    err_lo, err_hi = [], []
    for p, a in zip(pts, acc):
        ci = accuracy_ci(p.summary) or (a, a)
        err_lo.append(max(0.0, a - ci[0]))
        err_hi.append(max(0.0, ci[1] - a))
    ax.errorbar(xs, acc, yerr=[err_lo, err_hi], marker="o", capsize=4, color="tab:blue",
                label="accuracy (95% interval)")
    bal = [(p.step, float(p.summary["balanced_accuracy"])) for p in pts if is_num(p.summary.get("balanced_accuracy"))]
    if bal:
        ax.plot(*zip(*bal), marker="s", markersize=4, linestyle=":", color="tab:cyan", label="balanced accuracy")
    fmt = [(p.step, float(p.summary["format_rate"])) for p in pts if is_num(p.summary.get("format_rate"))]
    if fmt:
        ax.plot(*zip(*fmt), marker="^", color="tab:orange", label="format rate")
    base = [float(p.summary["majority_baseline"]) for p in pts if is_num(p.summary.get("majority_baseline"))]
    if base:
        cls = pts[-1].summary.get("majority_class")
        ax.axhline(base[-1], linestyle="--", color="gray",
                   label=f"majority baseline{f' (always {cls!r})' if cls is not None else ''}")
    ax.set_ylim(-0.02, 1.05)
    ax.set_ylabel("rate on held-out set")
    ax.set_title(f"{title}: held-out eval (n={pts[-1].summary.get('n', '?')})")
    ax.legend(loc="best", fontsize=8)
    if len(set(xs)) == 1:
        ax.set_xlim(xs[0] - 1, xs[0] + 1)
    return _save(fig, [ax], path)


def plot_length(stage: Stage, path: Path, title: str) -> bool:
    """Completion mean length (top) and clipped fraction (bottom)."""
    rows = stage.metrics
    keys = [k for k in ("completion/mean_len", "completion/clipped_frac") if has_metric(rows, k)]
    if not keys:
        return False
    fig, axes = _figure(len(keys))
    for ax, k in zip(axes, keys):
        xs, ys = series(rows, k)
        if k == "completion/mean_len":
            _curve(ax, xs, ys, "mean completion length", "tab:blue")
            ax.set_ylabel("tokens")
            ax.set_title(f"{title}: completion length per step")
        else:
            _curve(ax, xs, ys, "clipped fraction (hit max_new_tokens)", "tab:red")
            ax.set_ylim(-0.02, 1.02)
            ax.set_ylabel("fraction")
            ax.set_title(f"{title}: truncated completions per step")
        ax.legend(loc="best", fontsize=8)
    return _save(fig, axes, path)


def plot_zero_std(stage: Stage, path: Path, title: str) -> bool:
    """Share of groups whose completions all got the same reward (no learning signal), and of groups all right /
    all wrong by strict correctness where the run logged them."""
    if not has_metric(stage.metrics, "reward/frac_zero_std_groups"):
        return False
    fig, (ax,) = _figure(1)
    xs, ys = series(stage.metrics, "reward/frac_zero_std_groups")
    _curve(ax, xs, ys, "groups with zero reward std", "tab:purple")
    for key, label, color in (("groups/all_correct_frac", "all right", "tab:green"),
                              ("groups/all_wrong_frac", "all wrong", "tab:red")):
        if has_metric(stage.metrics, key):
            _curve(ax, *series(stage.metrics, key), label, color, linestyle="--")
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("fraction of groups")
    ax.set_title(f"{title}: groups with no learning signal (all rewards equal)")
    ax.legend(loc="best", fontsize=8)
    return _save(fig, [ax], path)


def plot_policy(stage: Stage, path: Path, title: str) -> bool:
    """KL to the reference, entropy and clip fraction (GRPO diagnostics), one panel each."""
    keys = [k for k in ("loss/kl", "loss/entropy", "clip/frac") if has_metric(stage.metrics, k)]
    if not keys:
        return False
    fig, axes = _figure(len(keys), 2.4)
    names = {"loss/kl": "KL to reference", "loss/entropy": "entropy", "clip/frac": "clipped ratio fraction"}
    for ax, k in zip(axes, keys):
        xs, ys = series(stage.metrics, k)
        _curve(ax, xs, ys, names[k])
        ax.set_ylabel(k)
        ax.legend(loc="best", fontsize=8)
    axes[0].set_title(f"{title}: policy diagnostics")
    return _save(fig, axes, path)


def plot_loss(stage: Stage, path: Path, title: str) -> bool:
    """SFT loss per step (learning rate on a twin axis when logged)."""
    if not has_metric(stage.metrics, "loss/sft"):
        return False
    fig, (ax,) = _figure(1, 3.4)
    xs, ys = series(stage.metrics, "loss/sft")
    _curve(ax, xs, ys, "SFT loss", "tab:blue")
    ax.set_ylabel("loss")
    ax.set_title(f"{title}: SFT loss per step")
    handles, labels = ax.get_legend_handles_labels()
    if has_metric(stage.metrics, "lr"):
        ax2 = ax.twinx()
        lx, ly = series(stage.metrics, "lr")
        (ln,) = ax2.plot(lx, ly, color="tab:gray", linestyle="--", linewidth=1, label="learning rate")
        ax2.set_ylabel("learning rate")
        ax2.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
        handles.append(ln)
        labels.append("learning rate")
    ax.legend(handles, labels, loc="best", fontsize=8)
    return _save(fig, [ax], path)


def plot_stages(rows: Sequence[EvalRow], path: Path, title: str) -> bool:
    """Accuracy (95% interval) and format rate per eval row (base -> sft -> final), majority baseline dashed."""
    rows = [r for r in rows if r.point is not None and is_num(r.point.summary.get("accuracy"))]
    if len(rows) < 2:
        return False
    fig, (ax,) = _figure(1, 3.6)
    xs = list(range(len(rows)))
    acc = [float(r.point.summary["accuracy"]) for r in rows]
    lo, hi = [], []
    for r, a in zip(rows, acc):
        ci = accuracy_ci(r.point.summary) or (a, a)
        lo.append(max(0.0, a - ci[0]))
        hi.append(max(0.0, ci[1] - a))
    ax.bar([x - 0.18 for x in xs], acc, width=0.36, yerr=[lo, hi], capsize=4, color="tab:blue",
           label="accuracy (95% interval)")
    fmt = [float(r.point.summary.get("format_rate")) if is_num(r.point.summary.get("format_rate")) else 0.0
           for r in rows]
    ax.bar([x + 0.18 for x in xs], fmt, width=0.36, color="tab:orange", alpha=0.8, label="format rate")
    for x, a, h in zip(xs, acc, hi):
        ax.annotate(f"{a:.3f}", (x - 0.18, a + h), xytext=(0, 4), textcoords="offset points", ha="center",
                    fontsize=8)
    base = [float(r.point.summary["majority_baseline"]) for r in rows
            if is_num(r.point.summary.get("majority_baseline"))]
    if base:
        ax.axhline(base[-1], linestyle="--", color="gray", label="majority baseline")
    ax.set_xticks(xs, [r.label for r in rows])
    ax.set_ylim(0, 1.25)
    ax.set_xlabel("stage")
    ax.set_ylabel("rate on held-out set")
    ax.set_title(f"{title}: held-out accuracy per stage")
    ax.legend(loc="upper left", ncol=3, fontsize=8)
    fig.savefig(path)
    return True
