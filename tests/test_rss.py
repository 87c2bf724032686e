"""The per-phase RSS timeline: phases nest, each reading goes to every open phase, the summary and its file, the
no-op without a timeline, the pipeline's rss.json and the report's memory section (fake RSS readings, no timing)."""
import json

import pytest
from smolthink import rss
from smolthink.report.context import ReportContext
from smolthink.report.memory import memory_section
from smolthink.rss import RSSTimeline, peak_table, rss_phase, rss_timeline


class FakeRSS:
    """rss_now_gb returning the value set last (file-backed: a tenth of it)."""

    def __init__(self, gb=1.0):
        self.gb = gb

    def __call__(self):
        return self.gb, self.gb / 10


@pytest.fixture
def mem(monkeypatch):
    fake = FakeRSS()
    monkeypatch.setattr(rss, "rss_now_gb", fake)
    return fake


def test_readings_go_to_every_open_phase_and_phases_nest(mem):
    tl = RSSTimeline(interval=3600)  # no sampler thread: readings only where we call sample()
    with tl.phase("sft"):
        with tl.phase("train") as entry:
            mem.gb = 3.0
            tl.sample()
            mem.gb = 2.0
        assert entry == {"start_gb": 1.0, "peak_gb": 3.0}
        with tl.phase("eval"):
            mem.gb = 3.5
            tl.sample()
            mem.gb = 1.5
    with tl.phase("grpo"):
        with tl.phase("train"):
            mem.gb = 2.5
    s = tl.summary()
    ph = s["phases"]
    assert list(ph) == ["sft", "sft/train", "sft/eval", "grpo", "grpo/train"]
    assert ph["sft/train"]["peak_gb"] == 3.0 and ph["sft/eval"]["peak_gb"] == 3.5
    assert ph["sft"]["peak_gb"] == 3.5  # a stage's peak includes its sub-phases
    assert (ph["sft/train"]["start_gb"], ph["sft/train"]["end_gb"]) == (1.0, 2.0)
    assert ph["grpo/train"]["end_gb"] == 2.5 and ph["grpo"]["peak_gb"] == 2.5
    assert ph["sft/eval"]["peak_file_gb"] == 0.35
    assert s["peak_gb"] == 3.5 and s["process_peak_gb"] > 0
    assert all(label in ph or label == "" for _, _, label in s["points"])


def test_a_phase_entered_again_adds_up(mem):
    tl = RSSTimeline(interval=3600)
    for gb in (2.0, 4.0, 3.0):
        mem.gb = 1.0
        with tl.phase("rollout") as entry:
            mem.gb = gb
        assert entry["peak_gb"] == gb  # each entry its own peak ...
    p = tl.summary()["phases"]["rollout"]
    assert p["n"] == 3 and p["peak_gb"] == 4.0 and p["end_gb"] == 3.0  # ... the phase the highest


def test_rss_phase_measures_only_inside_a_timeline(mem, tmp_path):
    with rss_phase("alone") as entry:
        assert entry is None
    out = tmp_path / "rss.json"
    with rss_timeline(out, interval=0.01) as tl:
        with rss_phase("stage"):
            with rss_phase("inner") as entry:
                mem.gb = 2.0
                tl.sample()
        assert entry["peak_gb"] == 2.0
    assert rss._active is None
    saved = json.loads(out.read_text())
    assert saved["phases"]["stage/inner"]["peak_gb"] == 2.0 and saved["peak_gb"] == 2.0


def test_a_timeline_without_phases_leaves_the_file_alone(mem, tmp_path):
    out = tmp_path / "rss.json"
    out.write_text("earlier")
    with rss_timeline(out):
        pass
    assert out.read_text() == "earlier"


def test_the_timeline_is_written_after_an_error_too(mem, tmp_path):
    out = tmp_path / "rss.json"
    with pytest.raises(RuntimeError):
        with rss_timeline(out):
            with rss_phase("crash"):
                raise RuntimeError("boom")
    assert "crash" in json.loads(out.read_text())["phases"]


def test_real_readings_are_positive():
    gb, file_gb = rss.rss_now_gb()
    assert 0 < file_gb < gb <= rss.process_peak_gb() * 1.01


def test_peak_table_and_report_section(mem, tmp_path):
    tl = RSSTimeline(interval=3600)
    with tl.phase("sft"):
        with tl.phase("eval"):
            mem.gb = 3.25
    s = tl.summary()
    table = "\n".join(peak_table(s))
    assert "sft/eval" in table and "3.25" in table
    ctx = ReportContext(run=tmp_path, pipeline=True, config={}, stages=[], rows=[], missing=[], wall_times={},
                        rss=s)
    md = "\n".join(memory_section(ctx))
    assert "## Memory" in md and "| &nbsp;&nbsp;eval | 3.25 | 0.33 | 1.00 → 3.25 |" in md
    ctx.rss = None
    assert memory_section(ctx) == []
