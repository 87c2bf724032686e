"""What the report knows about a run: `gather(run_dir)` reads a single-stage or pipeline run directory once into a
ReportContext, and every section of the report reads only that."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..rundir import PipelineDir, RunDir
from .answers import AnswerDist, answer_distribution
from .load import (RESULT_STAGES, EvalPoint, Stage, load_stage, load_stage_eval, load_transfer, read_json, read_yaml,
                   rl_on, stage_status, stage_timing)


CONTROL_LABEL = "sft_control (equal-time SFT)"


@dataclass
class EvalRow:
    """A row of the before/after table; point None = that stage's eval is missing."""

    label: str
    point: EvalPoint | None
    note: str = ""


@dataclass
class ReportContext:
    """A run directory as the report sees it. The fields from `status` to `transfer` are pipeline-only; the last
    three are derived from the rows and the config."""

    run: Path  # as given on the command line
    pipeline: bool
    config: dict[str, Any]  # pipeline.yaml, or a single-stage run's config.yaml
    stages: list[Stage]  # training stages present: sft and grpo, or the single run
    rows: list[EvalRow]  # the before/after table, first (base) to last (final)
    missing: list[str]  # what an incomplete run lacks, as markdown
    wall_times: dict[str, tuple[float | None, str]]  # stage name -> (seconds, source) from stage_timing
    status: dict[str, str] = field(default_factory=dict)  # pipeline stage -> done / incomplete / missing
    stage_evals: dict[str, EvalPoint | None] = field(default_factory=dict)  # base_eval, final_eval
    timings: dict[str, Any] = field(default_factory=dict)  # timings.json
    data_stats: dict[str, Any] | None = None  # data/stats.json
    control: EvalRow | None = None  # the equal-time SFT-only control's last eval (sft_control/)
    passk: dict[str, dict[str, Any]] = field(default_factory=dict)  # passk/<stage>.json by stage (sft, grpo, ...)
    transfer: dict[str, EvalPoint] = field(default_factory=dict)  # "base" / "final" on the transfer tasks
    rss: dict[str, Any] | None = None  # rss.json: the pipeline process's per-phase RSS timeline
    dists: dict[str, AnswerDist | None] = field(init=False)  # row label -> predicted answer distribution
    task: str | None = field(init=False)
    model: Any = field(init=False)  # None: the embedded default model

    def __post_init__(self) -> None:
        points = [row.point for row in self.rows if row.point is not None]
        rows = self.rows + ([self.control] if self.control is not None else [])
        self.dists = {row.label: answer_distribution(row.point) for row in rows if row.point is not None}
        self.task = self.config.get("task") or next((p.summary.get("task") for p in points
                                                     if p.summary.get("task")), None)
        self.model = self.config.get("model") if "model" in self.config else \
            next((p.summary.get("model") for p in points), None)

    @property
    def plots_dir(self) -> Path:
        """Where the PNGs go; a single-stage run directory keeps them at the same place as a pipeline's."""
        return PipelineDir(self.run).plots

    @property
    def final_row(self) -> EvalRow | None:
        """The last row that has an eval."""
        return next((row for row in reversed(self.rows) if row.point is not None), None)

    def stage(self, name: str) -> Stage | None:
        """A training stage by name, or None when its directory is absent."""
        return next((st for st in self.stages if st.name == name), None)


def gather(run: Path) -> ReportContext:
    """Read everything the report shows from a run directory."""
    pipe = PipelineDir(run)
    return _gather_pipeline(pipe) if pipe.is_pipeline() else _gather_single(RunDir(run))


def _gather_pipeline(pipe: PipelineDir) -> ReportContext:
    """base_eval -> sft -> final (or GRPO's last eval when final_eval is missing; without RL the SFT model is the
    final model, so no third row); any stage may be missing."""
    config = read_yaml(pipe.config)
    status = {name: stage_status(pipe, name, config) for name in RESULT_STAGES}
    stages = [load_stage(name, pipe.run(name)) for name in ("sft", "grpo", "sft_control") if pipe.stage(name).is_dir()]
    by_name = {st.name: st for st in stages}
    stage_evals = {name: load_stage_eval(pipe, name) for name in ("base_eval", "final_eval")}
    sft, grpo, final = by_name.get("sft"), by_name.get("grpo"), stage_evals["final_eval"]
    rows = [EvalRow("base", stage_evals["base_eval"], "base_eval/eval.json not found"),
            EvalRow("sft", sft.evals[-1] if sft and sft.evals else None, "sft/eval/step_*.json not found")]
    if rl_on(config):
        if final is not None:
            rows.append(EvalRow("final (grpo)", final))
        elif grpo and grpo.evals:
            rows.append(EvalRow("grpo (last eval)", grpo.evals[-1], "final_eval/ missing: GRPO's last eval shown"))
        else:
            rows.append(EvalRow("final (grpo)", None, "final_eval/eval.json not found"))
    timings = pipe.read_timings()
    wall_times = {name: stage_timing(pipe.stage(name), by_name.get(name), timings.get(name))
                  for name in RESULT_STAGES}
    stats = read_json(pipe.data_stats)
    control = by_name.get("sft_control")
    passk = {name: read_json(pipe.passk(name)) for name in ("sft", "grpo", "sft_control")}
    rss = read_json(pipe.rss)
    return ReportContext(run=pipe.root, pipeline=True, config=config, stages=stages, rows=rows,
                         missing=[f"`{name}/`: {st}" for name, st in status.items() if st not in ("done", "off")],
                         wall_times=wall_times, status=status, stage_evals=stage_evals, timings=timings,
                         data_stats=stats if isinstance(stats, dict) else None,
                         control=EvalRow(CONTROL_LABEL, control.evals[-1]) if control and control.evals else None,
                         passk={k: v for k, v in passk.items() if isinstance(v, dict)}, transfer=load_transfer(pipe),
                         rss=rss if isinstance(rss, dict) else None)


def _gather_single(run: RunDir) -> ReportContext:
    """A `smolthink sft` / `smolthink train` run directory: its first eval against its last."""
    st = load_stage("run", run)
    rows = []
    if st.evals:
        rows.append(EvalRow("before" if st.evals[0].step == 0 else "first eval", st.evals[0]))
    if len(st.evals) > 1:
        rows.append(EvalRow("after", st.evals[-1]))
    missing = []
    if not st.metrics:
        missing.append(f"`{run.metrics.name}`: missing or empty")
    if not st.evals:
        missing.append("`eval/step_*.json`: no eval summaries")
    elif len(st.evals) == 1:
        missing.append("only one eval summary: no before/after comparison")
    return ReportContext(run=run.root, pipeline=False, config=read_yaml(run.config), stages=[st], rows=rows,
                         missing=missing, wall_times={st.name: stage_timing(run.root, st)})
