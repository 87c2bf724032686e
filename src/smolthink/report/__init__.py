"""`smolthink report RUN_DIR`: report.md and PNG plots (under <run>/plots/) from a run directory.

Reads only files in the run directory (docs/CONTRACTS.md): never training code, never a model. Handles
  * a single-stage run (`smolthink train` / `smolthink sft`): metrics.jsonl, eval/step_*.json, samples/ at the top;
  * a pipeline run: base_eval/, data/, sft/, grpo/, final_eval/, sft_control/, passk/ (+ timings.json); any of
    them may be missing (a run stopped early): the report is written from what exists and says what is missing.

load.py reads the files, answers.py works out what the model answers, context.py gathers both into one
ReportContext, plots.py draws the figures, sections.py renders each general part of report.md, rl.py the RL
verdict against the equal-time SFT control and where the RL budget went, flips.py the questions that changed
between stages, and markdown.py runs the sections in order.
"""
from .markdown import write_report

__all__ = ["write_report"]
