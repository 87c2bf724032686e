"""`smolthink report RUN_DIR`: report.md and PNG plots (under <run>/plots/) from a run directory.

Reads only files in the run directory (docs/CONTRACTS.md): never training code, never a model. Handles
  * a single-stage run (`smolthink train` / `smolthink sft`): metrics.jsonl, eval/step_*.json, samples/ at the top;
  * a pipeline run: base_eval/, data/, sft/, grpo/, final_eval/ (+ timings.json); any of them may be missing
    (a run stopped early): the report is written from what exists and says what is missing.
Plots use matplotlib's object API with the Agg canvas (no pyplot, no global backend switch).
"""
from __future__ import annotations

import json
import logging
import math
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from .log import fmt_duration

log = logging.getLogger(__name__)

PIPELINE_STAGES = ("base_eval", "data", "sft", "grpo", "final_eval")
COLLAPSE_SHARE = 0.9  # one answer class in >= this share of the answered completions -> answer collapse
N_SAMPLES = 3  # sample completions shown per stage
MAX_COMPLETION_CHARS = 1500
MAX_QUESTION_CHARS = 280
_STEP_RE = re.compile(r"^step_(\d+)\.json$")
_CASE_FREE = {"yes", "no", "true", "false"}


# ----------------------------------------------------------------------------------------------- reading


def read_json(path: Path) -> Any:
    """Parsed JSON, or None when the file is missing or unreadable (a half-written file must not kill a report)."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("report: cannot read %s: %s", path, e)
        return None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file; blank and cut-off lines (a crash mid-write) are skipped."""
    try:
        text = Path(path).read_text()
    except OSError:
        return []
    rows = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict):
            rows.append(obj)
    return rows


def read_yaml(path: Path) -> dict[str, Any]:
    """A config YAML as a dict ({} when missing/unreadable)."""
    if not Path(path).is_file():
        return {}
    try:
        import yaml

        data = yaml.safe_load(Path(path).read_text())
    except Exception as e:  # noqa: BLE001 - a broken config only costs the summary a field
        log.warning("report: cannot read %s: %s", path, e)
        return {}
    return data if isinstance(data, dict) else {}


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def load_metrics(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl rows sorted by step (a later line for the same step wins)."""
    by_step: dict[int, dict[str, Any]] = {}
    for row in read_jsonl(path):
        if _num(row.get("step")):
            by_step[int(row["step"])] = row
    return [by_step[s] for s in sorted(by_step)]


def series(rows: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the rows holding a finite number under key."""
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if _num(v):
            xs.append(int(r["step"]))
            ys.append(float(v))
    return xs, ys


def has_metric(rows: Sequence[dict[str, Any]], key: str) -> bool:
    return any(_num(r.get(key)) for r in rows)


@dataclass
class EvalPoint:
    """One eval summary (eval/step_*.json or <stage>/eval.json) and its completions file when present."""

    step: int
    summary: dict[str, Any]
    path: Path
    completions: Path | None


def load_evals(eval_dir: Path) -> list[EvalPoint]:
    """eval/step_*.json sorted by step."""
    points = []
    if not eval_dir.is_dir():
        return points
    for p in eval_dir.iterdir():
        m = _STEP_RE.match(p.name)
        if not m:
            continue
        summary = read_json(p)
        if not isinstance(summary, dict):
            continue
        comp = p.with_name(f"{p.stem}.completions.jsonl")
        points.append(EvalPoint(int(m.group(1)), summary, p, comp if comp.is_file() else None))
    return sorted(points, key=lambda e: e.step)


def load_eval_file(path: Path) -> EvalPoint | None:
    """<stage>/eval.json (+ <stage>/completions.jsonl)."""
    summary = read_json(path)
    if not isinstance(summary, dict):
        return None
    comp = path.parent / "completions.jsonl"
    step = int(summary["step"]) if _num(summary.get("step")) else 0
    return EvalPoint(step, summary, path, comp if comp.is_file() else None)


@dataclass
class Stage:
    """A training-stage run directory (single-stage run, or pipeline sft/ or grpo/)."""

    name: str  # "sft", "grpo", or "run" for a single-stage run
    path: Path
    metrics: list[dict[str, Any]]
    evals: list[EvalPoint]
    samples: list[Path]
    config: dict[str, Any]
    done: bool

    @property
    def kind(self) -> str:
        """'SFT' or 'GRPO' from the metrics (or the pipeline stage name), else 'training'."""
        if has_metric(self.metrics, "loss/sft") or self.name == "sft":
            return "SFT"
        if has_metric(self.metrics, "reward/mean") or self.name == "grpo":
            return "GRPO"
        return "training"

    @property
    def last_step(self) -> int | None:
        steps = [int(r["step"]) for r in self.metrics] + [e.step for e in self.evals]
        return max(steps) if steps else None


def load_stage(name: str, path: Path) -> Stage:
    samples = sorted(p for p in (path / "samples").glob("step_*.jsonl")) if (path / "samples").is_dir() else []
    return Stage(name, path, load_metrics(path / "metrics.jsonl"), load_evals(path / "eval"), samples,
                 read_yaml(path / "config.yaml"), (path / "DONE").is_file())


def is_pipeline(run: Path) -> bool:
    """A pipeline run directory has pipeline.yaml or any of the stage subdirectories."""
    return (run / "pipeline.yaml").is_file() or any((run / s).is_dir() for s in PIPELINE_STAGES)


# ------------------------------------------------------------------------------------ answer distribution


def answer_label(answer: Any) -> str | None:
    """A predicted answer's class: whitespace-collapsed, trailing period dropped, yes/no/true/false capitalised;
    None for no answer."""
    if answer is None:
        return None
    a = " ".join(str(answer).split()).rstrip(".").strip()
    if not a:
        return None
    return a.capitalize() if a.casefold() in _CASE_FREE else a


@dataclass
class AnswerDist:
    """Shares of the predicted answer classes among answered completions."""

    shares: dict[str, float]  # class -> share of the answered completions, most common first
    answered: float  # share of completions with an answer
    n: int  # completions counted (0 when only shares are known)
    source: str  # where it came from (reads after "from")
    exact: bool = True  # False when estimated or from a handful of samples
    gold_shares: dict[str, float] = field(default_factory=dict)

    @property
    def top(self) -> tuple[str, float] | None:
        return next(iter(self.shares.items()), None)


def _shares(counter: Counter) -> dict[str, float]:
    total = sum(counter.values())
    return {k: v / total for k, v in counter.most_common()} if total else {}


def answer_distribution(point: EvalPoint | None) -> AnswerDist | None:
    """From the completions JSONL when present, else the summary's answer_distribution, else (binary tasks) an
    estimate from per-class accuracy, else the summary's few samples."""
    if point is None:
        return None
    s = point.summary
    if point.completions is not None:
        recs = [r for r in read_jsonl(point.completions) if "answer" in r]
        if recs:
            labels = [answer_label(r.get("answer")) for r in recs]
            answered = Counter(lb for lb in labels if lb is not None)
            gold = Counter(answer_label(r.get("gold")) for r in recs if r.get("gold") is not None)
            return AnswerDist(_shares(answered), sum(answered.values()) / len(recs), len(recs),
                              f"`{point.completions.name}`", gold_shares=_shares(gold))
    gold_shares = _gold_shares(s)
    dist = s.get("answer_distribution")
    if isinstance(dist, dict) and dist:
        none = sum(float(v) for k, v in dist.items() if answer_label(k if k != "<none>" else None) is None)
        merged: Counter = Counter()
        for k, v in dist.items():
            lb = answer_label(k) if k != "<none>" else None
            if lb is not None and _num(v):
                merged[lb] += float(v)
        total = sum(merged.values())
        if total > 0:
            return AnswerDist({k: v / total for k, v in merged.most_common()}, max(0.0, 1.0 - none),
                              _n_completions(s), "the eval summary's answer_distribution",
                              gold_shares=gold_shares)
    pca = s.get("per_class_accuracy")
    if isinstance(pca, dict) and len(pca) == 2 and all(_num(v) for v in pca.values()) and len(gold_shares) == 2:
        (c1, a1), (c2, a2) = pca.items()
        g1, g2 = gold_shares.get(c1, 0.5), gold_shares.get(c2, 0.5)
        p1 = g1 * a1 + g2 * (1 - a2)  # assumes every wrong answer is the other class
        shares = dict(sorted({answer_label(c1) or c1: p1, answer_label(c2) or c2: 1 - p1}.items(),
                             key=lambda kv: -kv[1]))
        return AnswerDist(shares, 1.0, _n_completions(s), "per-class accuracy (binary-task estimate)",
                          exact=False, gold_shares=gold_shares)
    samples = s.get("samples")
    if isinstance(samples, list) and samples:
        labels = [answer_label(r.get("answer")) for r in samples if isinstance(r, dict)]
        answered = Counter(lb for lb in labels if lb is not None)
        if labels:
            return AnswerDist(_shares(answered), sum(answered.values()) / len(labels), len(labels),
                              f"only {len(labels)} sample completions", exact=False, gold_shares=gold_shares)
    return None


def _n_completions(s: dict[str, Any]) -> int:
    n, k = s.get("n"), s.get("samples_per_question") or 1
    return int(n * k) if _num(n) and _num(k) else 0


def _gold_shares(s: dict[str, Any]) -> dict[str, float]:
    """Gold class shares for a binary task, from majority_class/majority_baseline and per_class_accuracy keys."""
    maj, base, pca = s.get("majority_class"), s.get("majority_baseline"), s.get("per_class_accuracy")
    if maj is None or not _num(base):
        return {}
    out = {answer_label(maj) or str(maj): float(base)}
    others = [c for c in (pca or {}) if c != maj]
    if len(others) == 1:
        out[answer_label(others[0]) or others[0]] = 1.0 - float(base)
    return out


def collapse_message(dist: AnswerDist | None, what: str) -> str | None:
    """'the model answers 'Yes' to 93% of questions: ...' when one class holds >= COLLAPSE_SHARE of the answers."""
    if dist is None or dist.top is None or dist.answered < 0.5:
        return None
    cls, share = dist.top
    if share < COLLAPSE_SHARE:
        return None
    of = "questions" if dist.answered >= 0.999 else f"answered questions ({_pct(dist.answered)} answered)"
    msg = (f"{what} answers '{cls}' to {_pct(share)} of {of}: accuracy reflects the class balance, "
           f"not reasoning")
    gold = dist.gold_shares.get(cls)
    if gold is not None:
        msg += f" (the gold answer is '{cls}' for {_pct(gold)})"
    if not dist.exact:
        msg += f" [from {dist.source}]"
    return msg + "."


# ----------------------------------------------------------------------------------------------- formatting


def _f3(v: Any) -> str:
    return f"{v:.3f}" if _num(v) else "—"


def _pct(v: float) -> str:
    return f"{100 * v:.0f}%"


def _pts(v: float) -> str:
    return f"{100 * v:+.1f}"


def _ci(s: dict[str, Any]) -> tuple[float, float] | None:
    ci = s.get("accuracy_ci95")
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(_num(v) for v in ci):
        return float(ci[0]), float(ci[1])
    return None


def _acc_cell(s: dict[str, Any]) -> str:
    ci = _ci(s)
    return _f3(s.get("accuracy")) + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def _majority_cell(s: dict[str, Any]) -> str:
    base = s.get("majority_baseline")
    if not _num(base):
        return "—"
    return f"{base:.3f}" + (f" ({s['majority_class']})" if s.get("majority_class") is not None else "")


def _shorten(text: Any, n: int) -> str:
    t = " ".join(str(text or "").split())
    return t if len(t) <= n else t[: n - 1].rstrip() + "…"


def _fence(text: str) -> str:
    """A fenced code block whose fence is longer than any backtick run inside the text."""
    runs = [len(m) for m in re.findall(r"`+", text)]
    fence = "`" * max(3, max(runs, default=0) + 1)
    return f"{fence}text\n{text.rstrip()}\n{fence}"


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


# ------------------------------------------------------------------------------------------------- plots


def _figure(nrows: int = 1, height: float = 3.0):
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(8.0, 0.6 + height * nrows), dpi=110, layout="constrained")
    axes = fig.subplots(nrows, 1, sharex=True, squeeze=False)[:, 0]
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are integers
    return fig, list(axes)


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
        std = [float(r["reward/std"]) if _num(r.get("reward/std")) else math.nan
               for r in rows if _num(r.get("reward/mean"))]
        if any(_num(v) for v in std):
            lo = [m - s if _num(s) else math.nan for m, s in zip(mean, std)]
            hi = [m + s if _num(s) else math.nan for m, s in zip(mean, std)]
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
    axes[-1].set_xlabel("optimizer step")
    fig.savefig(path)
    return True


def plot_eval(points: Sequence[EvalPoint], path: Path, title: str) -> bool:
    """Held-out accuracy (95% interval as error bars), balanced accuracy and format rate per eval step, with the
    majority-class baseline as a dashed line."""
    pts = [p for p in points if _num(p.summary.get("accuracy"))]
    if not pts:
        return False
    fig, (ax,) = _figure(1, 3.6)
    xs = [p.step for p in pts]
    acc = [float(p.summary["accuracy"]) for p in pts]
    err_lo, err_hi = [], []
    for p, a in zip(pts, acc):
        ci = _ci(p.summary) or (a, a)
        err_lo.append(max(0.0, a - ci[0]))
        err_hi.append(max(0.0, ci[1] - a))
    ax.errorbar(xs, acc, yerr=[err_lo, err_hi], marker="o", capsize=4, color="tab:blue",
                label="accuracy (95% interval)")
    bal = [(p.step, float(p.summary["balanced_accuracy"])) for p in pts if _num(p.summary.get("balanced_accuracy"))]
    if bal:
        ax.plot(*zip(*bal), marker="s", markersize=4, linestyle=":", color="tab:cyan", label="balanced accuracy")
    fmt = [(p.step, float(p.summary["format_rate"])) for p in pts if _num(p.summary.get("format_rate"))]
    if fmt:
        ax.plot(*zip(*fmt), marker="^", color="tab:orange", label="format rate")
    base = [float(p.summary["majority_baseline"]) for p in pts if _num(p.summary.get("majority_baseline"))]
    if base:
        cls = pts[-1].summary.get("majority_class")
        ax.axhline(base[-1], linestyle="--", color="gray",
                   label=f"majority baseline{f' (always {cls!r})' if cls is not None else ''}")
    ax.set_ylim(-0.02, 1.05)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("rate on held-out set")
    ax.set_title(f"{title}: held-out eval (n={pts[-1].summary.get('n', '?')})")
    ax.legend(loc="best", fontsize=8)
    if len(set(xs)) == 1:
        ax.set_xlim(xs[0] - 1, xs[0] + 1)
    fig.savefig(path)
    return True


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
    axes[-1].set_xlabel("optimizer step")
    fig.savefig(path)
    return True


def plot_zero_std(stage: Stage, path: Path, title: str) -> bool:
    """Share of groups whose completions all got the same reward (no learning signal)."""
    if not has_metric(stage.metrics, "reward/frac_zero_std_groups"):
        return False
    fig, (ax,) = _figure(1)
    xs, ys = series(stage.metrics, "reward/frac_zero_std_groups")
    _curve(ax, xs, ys, "groups with zero reward std", "tab:purple")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("fraction of groups")
    ax.set_title(f"{title}: groups with no learning signal (all rewards equal)")
    ax.legend(loc="best", fontsize=8)
    fig.savefig(path)
    return True


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
    axes[-1].set_xlabel("optimizer step")
    fig.savefig(path)
    return True


def plot_loss(stage: Stage, path: Path, title: str) -> bool:
    """SFT loss per step (learning rate on a twin axis when logged)."""
    if not has_metric(stage.metrics, "loss/sft"):
        return False
    fig, (ax,) = _figure(1, 3.4)
    xs, ys = series(stage.metrics, "loss/sft")
    _curve(ax, xs, ys, "SFT loss", "tab:blue")
    ax.set_xlabel("optimizer step")
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
    fig.savefig(path)
    return True


def plot_stages(rows: Sequence["EvalRow"], path: Path, title: str) -> bool:
    """Accuracy (95% interval) and format rate per eval row (base -> sft -> final), majority baseline dashed."""
    rows = [r for r in rows if r.point is not None and _num(r.point.summary.get("accuracy"))]
    if len(rows) < 2:
        return False
    fig, (ax,) = _figure(1, 3.6)
    xs = list(range(len(rows)))
    acc = [float(r.point.summary["accuracy"]) for r in rows]
    lo, hi = [], []
    for r, a in zip(rows, acc):
        ci = _ci(r.point.summary) or (a, a)
        lo.append(max(0.0, a - ci[0]))
        hi.append(max(0.0, ci[1] - a))
    ax.bar([x - 0.18 for x in xs], acc, width=0.36, yerr=[lo, hi], capsize=4, color="tab:blue",
           label="accuracy (95% interval)")
    fmt = [float(r.point.summary.get("format_rate")) if _num(r.point.summary.get("format_rate")) else 0.0
           for r in rows]
    ax.bar([x + 0.18 for x in xs], fmt, width=0.36, color="tab:orange", alpha=0.8, label="format rate")
    for x, a, h in zip(xs, acc, hi):
        ax.annotate(f"{a:.3f}", (x - 0.18, a + h), xytext=(0, 4), textcoords="offset points", ha="center",
                    fontsize=8)
    base = [float(r.point.summary["majority_baseline"]) for r in rows if _num(r.point.summary.get("majority_baseline"))]
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


# ------------------------------------------------------------------------------------------------- report


@dataclass
class EvalRow:
    """A row of the before/after table; point None = that stage's eval is missing."""

    label: str
    point: EvalPoint | None
    note: str = ""


@dataclass
class Report:
    run: Path
    plots_dir: Path
    lines: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    plot_errors: list[str] = field(default_factory=list)

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)

    def plot(self, fn: Callable[..., bool], name: str, *args) -> str | None:
        """Run a plot function -> the markdown image link, or None when its data is missing (or it failed)."""
        path = self.plots_dir / f"{name}.png"
        try:
            made = fn(*args[:-1], path, args[-1])
        except Exception as e:  # noqa: BLE001 - a broken plot must not cost the whole report
            log.warning("report: plot %s failed: %s", name, e)
            self.plot_errors.append(f"`{name}.png`: {type(e).__name__}: {e}")
            return None
        return f"![{name}](plots/{name}.png)" if made else None


def _rel(run: Path, p: Path) -> str:
    try:
        return str(p.relative_to(run))
    except ValueError:
        return str(p)


def _stage_timing(stage: Stage | None, timings: dict[str, Any], name: str, run: Path) -> tuple[float | None, str]:
    """Wall time of a stage: timings.json, else its DONE file, else metrics.jsonl timestamps (approximate)."""
    if _num(timings.get(name)):
        return float(timings[name]), "timings.json"
    done = run / name / "DONE"
    if done.is_file():
        try:
            return float(done.read_text().split()[0]), "DONE"
        except (ValueError, IndexError, OSError):
            pass
    if stage is not None:
        xs, ts = series(stage.metrics, "time")
        if len(ts) >= 2:
            per_step = (ts[-1] - ts[0]) / max(xs[-1] - xs[0], 1)
            return ts[-1] - ts[0] + per_step, "approx., from metrics.jsonl timestamps"
    return None, ""


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


def _steps_line(stage: Stage) -> str:
    last = stage.last_step
    if last is None:
        return "no steps logged"
    out = f"{last} steps"
    max_steps = stage.config.get("max_steps")
    if not _num(max_steps) or max_steps <= 0:  # 0: derived from num_epochs (SFT)
        return out
    if last < max_steps:
        out += f" of {int(max_steps)} configured (stopped early)"
    else:
        out += f" of {int(max_steps)} configured"
    return out


def _describe_model(model: Any) -> str:
    return f"`{model}`" if model else "embedded default (SmolLM2-135M-Instruct)"


def _table(r: Report, rows: Sequence[EvalRow], dists: dict[str, AnswerDist | None]) -> None:
    """The before/after table and the accuracy deltas vs the first row and vs the majority baseline."""
    r.add("| stage | step | accuracy [95% CI] | balanced acc. | majority baseline | format rate | "
          "mean completion len | n | Δ acc vs base (pts) | Δ acc vs majority (pts) | top answer |",
          "|---|---:|---|---:|---|---:|---:|---:|---:|---:|---|")
    base_row = next((row for row in rows if row.point is not None), None)
    base_acc = base_row.point.summary.get("accuracy") if base_row else None
    for row in rows:
        if row.point is None:
            r.add(f"| {row.label} | — | *missing* | — | — | — | — | — | — | — | {_md_cell(row.note)} |")
            continue
        s = row.point.summary
        acc = s.get("accuracy")
        k = s.get("samples_per_question") or 1
        n = f"{s.get('n', '—')}" + (f" ×{k}" if _num(k) and k > 1 else "")
        d_base = _pts(acc - base_acc) if row is not base_row and _num(acc) and _num(base_acc) else "—"
        d_maj = _pts(acc - s["majority_baseline"]) if _num(acc) and _num(s.get("majority_baseline")) else "—"
        dist = dists.get(row.label)
        top = f"{_md_cell(dist.top[0])} {_pct(dist.top[1])}" if dist and dist.top else "—"
        mean_len = f"{s['mean_completion_len']:.1f}" if _num(s.get("mean_completion_len")) else "—"
        r.add(f"| {row.label} | {row.point.step} | {_acc_cell(s)} | {_f3(s.get('balanced_accuracy'))} | "
              f"{_majority_cell(s)} | {_f3(s.get('format_rate'))} | {mean_len} | {n} | {d_base} | {d_maj} | {top} |")
    r.add("", "Sources: " + ", ".join(f"{row.label} = `{_rel(r.run, row.point.path)}`" for row in rows
                                      if row.point is not None) + ". Δ in percentage points of accuracy; "
          "\"top answer\": the most common predicted answer and its share of the answered completions.", "")
    for row in rows:
        if row.point is None:
            continue
        s = row.point.summary
        acc = s.get("accuracy")
        if not _num(acc):
            continue
        bits = []
        if row is not base_row and _num(base_acc):
            bits.append(f"accuracy {_pts(acc - base_acc)} points vs {base_row.label} ({base_acc:.3f} → {acc:.3f})")
        maj = s.get("majority_baseline")
        if _num(maj):
            bits.append(f"{_pts(acc - maj)} points vs the majority baseline ({maj:.3f})")
            ci = _ci(s)
            if ci and ci[0] <= maj <= ci[1]:
                bits.append("the 95% interval includes the majority baseline: not distinguishable from always "
                            f"answering {s.get('majority_class')!r}")
        if bits:
            r.add(f"- **{row.label}**: " + "; ".join(bits) + ".")
    r.add("")


def _notes(r: Report, rows: Sequence[EvalRow]) -> list[str]:
    """Warnings beyond collapse: scoring errors, heavy truncation, low format rate."""
    out = []
    for row in rows:
        if row.point is None:
            continue
        s = row.point.summary
        if _num(s.get("scoring_errors")) and s["scoring_errors"] > 0:
            out.append(f"{row.label}: {int(s['scoring_errors'])} scoring errors")
        if _num(s.get("truncated_frac")) and s["truncated_frac"] >= 0.2:
            out.append(f"{row.label}: {_pct(s['truncated_frac'])} of completions hit the token limit (truncated)")
        if _num(s.get("format_rate")) and s["format_rate"] < 0.5:
            out.append(f"{row.label}: format rate {s['format_rate']:.3f}: most completions have no valid "
                       "<answer> block")
    return out


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


def _sample_block(r: Report, i: int, s: dict[str, Any]) -> None:
    completion = str(s.get("completion", ""))
    if len(completion) > MAX_COMPLETION_CHARS:
        completion = completion[:MAX_COMPLETION_CHARS] + "\n… (truncated for the report)"
    r.add(f"**{i}.** gold: `{s.get('gold')}` · answer: `{s.get('answer')}` · correct: {s.get('correct')} · "
          f"format: {s.get('format')}", "",
          f"> {_shorten(s.get('question'), MAX_QUESTION_CHARS)}", "", _fence(completion), "")


def _samples_section(r: Report, rows: Sequence[EvalRow], stages: Sequence[Stage]) -> None:
    present = [row for row in rows if row.point is not None and isinstance(row.point.summary.get("samples"), list)
               and row.point.summary["samples"]]
    r.add("## Sample completions", "")
    if not present:
        r.add("*No eval samples found.*", "")
    else:
        chosen_rows = [present[0]] + ([present[-1]] if len(present) > 1 else [])
        after = chosen_rows[-1].point.summary["samples"]
        after_pick = _pick_samples(after, [])
        questions = [s.get("question") for s in after_pick]
        for n, row in enumerate(chosen_rows):
            when = "Before" if n == 0 and len(chosen_rows) > 1 else "After" if n else "Eval"
            r.add(f"### {when}: {row.label} (step {row.point.step})", "")
            picks = after_pick if row is chosen_rows[-1] and len(chosen_rows) > 1 else \
                _pick_samples(row.point.summary["samples"], questions)
            for i, s in enumerate(picks, 1):
                _sample_block(r, i, s)
    for st in stages:
        if not st.samples:
            continue
        recs = read_jsonl(st.samples[-1])
        if not recs:
            continue
        step = recs[0].get("step", st.samples[-1].stem)
        r.add(f"### Training rollouts: {st.name}, step {step} (`{_rel(r.run, st.samples[-1])}`)", "")
        for i, s in enumerate(recs[:2], 1):
            extra = " · ".join(f"{k}: {s[k]:.3f}" for k in ("reward", "advantage") if _num(s.get(k)))
            completion = str(s.get("completion", ""))[:MAX_COMPLETION_CHARS]
            r.add(f"**{i}.** gold: `{s.get('gold')}` · answer: `{s.get('answer')}` · correct: {s.get('correct')} · "
                  f"format: {s.get('format')}" + (f" · {extra}" if extra else ""), "", _fence(completion), "")


def _stage_plots(r: Report, st: Stage, prefix: str, title: str) -> list[str]:
    """All plots of one training stage -> markdown image links (plots whose data is missing are skipped)."""
    links = [r.plot(plot_loss, f"{prefix}loss", st, title),
             r.plot(plot_reward, f"{prefix}reward", st, title),
             r.plot(plot_eval, f"{prefix}eval", st.evals, title),
             r.plot(plot_length, f"{prefix}length", st, title),
             r.plot(plot_zero_std, f"{prefix}zero_std", st, title),
             r.plot(plot_policy, f"{prefix}policy", st, title)]
    return [link for link in links if link]


def write_report(run_dir: Path) -> Path:
    """Write <run>/report.md and <run>/plots/*.png from a single-stage or pipeline run directory -> report path."""
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"no such run directory: {run}")
    plots_dir = run / "plots"
    plots_dir.mkdir(parents=True, exist_ok=True)
    r = Report(run, plots_dir)
    pipeline = is_pipeline(run)
    timings = read_json(run / "timings.json")
    timings = timings if isinstance(timings, dict) else {}

    # ---- gather ----
    stages: list[Stage] = []
    status: dict[str, str] = {}
    if pipeline:
        cfg = read_yaml(run / "pipeline.yaml")
        for name in PIPELINE_STAGES:
            d = run / name
            if (d / "DONE").is_file():
                status[name] = "done"
            elif d.is_dir() and any(d.iterdir()):
                status[name] = "incomplete (no DONE marker)"
            else:
                status[name] = "missing"
        for name in ("sft", "grpo"):
            if (run / name).is_dir():
                stages.append(load_stage(name, run / name))
        by_name = {st.name: st for st in stages}
        rows = [EvalRow("base", load_eval_file(run / "base_eval" / "eval.json"), "base_eval/eval.json not found")]
        sft = by_name.get("sft")
        rows.append(EvalRow("sft", sft.evals[-1] if sft and sft.evals else None, "sft/eval/step_*.json not found"))
        final = load_eval_file(run / "final_eval" / "eval.json")
        grpo = by_name.get("grpo")
        if final is not None:
            rows.append(EvalRow("final (grpo)", final))
        elif grpo and grpo.evals:
            rows.append(EvalRow("grpo (last eval)", grpo.evals[-1], "final_eval/ missing: GRPO's last eval shown"))
        else:
            rows.append(EvalRow("final (grpo)", None, "final_eval/eval.json not found"))
        for name, st in status.items():
            if st != "done":
                r.missing.append(f"`{name}/`: {st}")
    else:
        cfg = read_yaml(run / "config.yaml")
        st = load_stage("run", run)
        stages.append(st)
        rows = []
        if st.evals:
            rows.append(EvalRow("before" if st.evals[0].step == 0 else "first eval", st.evals[0]))
        if len(st.evals) > 1:
            rows.append(EvalRow("after", st.evals[-1]))
        if not st.metrics:
            r.missing.append("`metrics.jsonl`: missing or empty")
        if not st.evals:
            r.missing.append("`eval/step_*.json`: no eval summaries")
        elif len(st.evals) == 1:
            r.missing.append("only one eval summary: no before/after comparison")
    points = [row.point for row in rows if row.point is not None]
    dists = {row.label: answer_distribution(row.point) for row in rows if row.point is not None}
    task = cfg.get("task") or next((p.summary.get("task") for p in points if p.summary.get("task")), None)
    model = cfg.get("model") if "model" in cfg else next((p.summary.get("model") for p in points), None)

    # ---- header and summary ----
    r.add(f"# smolthink report: {run.resolve().name}", "",
          f"*Generated {time.strftime('%Y-%m-%d %H:%M')} from `{run}` "
          f"({'pipeline' if pipeline else 'single-stage ' + stages[0].kind} run directory).*", "")
    final_row = next((row for row in reversed(rows) if row.point is not None), None)
    if final_row is not None:
        msg = collapse_message(dists.get(final_row.label), f"Answer collapse ({final_row.label}): the model")
        if msg:
            r.add(f"> **⚠ {msg}**", "")
    for row in rows:
        if row is not final_row and row.point is not None:
            msg = collapse_message(dists.get(row.label), f"Note ({row.label}): the model")
            if msg:
                r.add(f"> {msg}", "")
    if r.missing:
        r.add("> **Incomplete run.** Missing: " + "; ".join(r.missing) + ". The report shows what exists.", "")

    r.add("## Summary", "")
    r.add(f"- **Task:** `{task}`" if task else "- **Task:** unknown", f"- **Model:** {_describe_model(model)}")
    for st in stages:
        perf = _perf_line(st)
        r.add(f"- **{st.kind} ({st.name})** — {_steps_line(st)}" + (f"; {perf}" if perf else ""))
    stats = read_json(run / "data" / "stats.json") if pipeline else None
    if isinstance(stats, dict):
        reasons = ", ".join(f"{k} {v}" for k, v in (stats.get("rejected_by_reason") or {}).items() if v)
        r.add(f"- **Warm-up traces ({stats.get('source', '?')}):** kept {stats.get('kept', '?')} of "
              f"{stats.get('questions', stats.get('requested', '?'))} questions"
              + (f", rejection rate {_pct(stats['rejection_rate'])}" if _num(stats.get("rejection_rate")) else "")
              + (f" ({reasons})" if reasons else ""))
    r.add("")
    if pipeline:
        by_name = {st.name: st for st in stages}
        r.add("| stage | status | wall time | details |", "|---|---|---:|---|")
        for name in PIPELINE_STAGES:
            secs, src = _stage_timing(by_name.get(name), timings, name, run)
            detail = ""
            if name in by_name:
                detail = _steps_line(by_name[name])
            elif name in ("base_eval", "final_eval"):
                p = load_eval_file(run / name / "eval.json")
                detail = f"n={p.summary.get('n')}" if p else ""
            wall = fmt_duration(secs) + (" (approx.)" if "approx" in src else "") if secs is not None else "—"
            r.add(f"| {name} | {status[name]} | {wall} | {detail} |")
        if _num(timings.get("report")):
            r.add(f"| report | done | {fmt_duration(timings['report'])} | |")
        known = [v for k, v in timings.items() if _num(v)]
        if known:
            r.add("", f"Total recorded wall time: {fmt_duration(sum(known))} (timings.json).")
        r.add("")
    else:
        secs, src = _stage_timing(stages[0], timings, "", run)
        if secs is not None:
            r.add(f"Training wall time: {fmt_duration(secs)} ({src}).", "")

    # ---- before / after ----
    r.add("## Before / after", "")
    if rows:
        _table(r, rows, dists)
    else:
        r.add("*No eval summaries found: nothing to compare.*", "")
    notes = _notes(r, rows)
    if notes:
        r.add("**Notes:**", "", *[f"- {n}" for n in notes], "")

    # ---- answer distribution ----
    if any(dists.values()):
        r.add("## Answer distribution", "")
        for row in rows:
            d = dists.get(row.label) if row.point is not None else None
            if d is None or not d.shares:
                continue
            top = ", ".join(f"'{k}' {_pct(v)}" for k, v in list(d.shares.items())[:5])
            unanswered = f"; no answer in {_pct(1 - d.answered)}" if d.answered < 0.999 else ""
            r.add(f"- **{row.label}**: {top}{unanswered} (from {d.source})")
        r.add("")

    # ---- plots ----
    r.add("## Plots", "")
    any_plot = False
    if pipeline:
        link = r.plot(plot_stages, "stages_accuracy", rows, "Pipeline")
        if link:
            r.add("### Accuracy per stage", "", link, "")
            any_plot = True
    elif len(rows) >= 2:
        link = r.plot(plot_stages, "before_after", rows, stages[0].kind)
        if link:
            r.add("### Before / after", "", link, "")
            any_plot = True
    for st in stages:
        prefix = f"{st.name}_" if pipeline else ""
        title = st.kind if not pipeline else f"{st.kind} stage"
        links = _stage_plots(r, st, prefix, title)
        if links:
            any_plot = True
            r.add(f"### {st.kind} ({st.name})", "")
            for link in links:
                r.add(link, "")
    if pipeline:
        for name in ("sft", "grpo"):
            if name not in {st.name for st in stages}:
                r.add(f"*No {name}/ stage: its plots are skipped.*", "")
    if not any_plot:
        r.add("*No plottable data found.*", "")
    if r.plot_errors:
        r.add("Plots that failed: " + "; ".join(r.plot_errors), "")

    # ---- samples ----
    _samples_section(r, rows, stages)

    out = run / "report.md"
    tmp = out.with_name(".report.md.tmp")
    tmp.write_text("\n".join(r.lines).rstrip() + "\n")
    tmp.replace(out)
    return out
