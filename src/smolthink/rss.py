"""A per-phase timeline of this process's resident memory (RSS), to see which phase holds the memory.

`with rss_timeline(path):` starts a sampler thread that reads the process's RSS every 50 ms and attributes each
reading to the phases open at the time; `with rss_phase("grpo"):` (nested: "grpo/train") opens a phase of the
running timeline and is a no-op when none runs, so library code can label its phases unconditionally. On exit the
timeline writes its summary (`RSSTimeline.summary`) to `path`: per phase the time spent, the RSS at its first entry
and last exit and its peak (sub-phases included), plus a coarse timeline of (seconds, GB, phase) points.

The sampler reads /proc/self/statm (resident and file-backed pages: a memory-mapped safetensors file counts
towards RSS too, so the file-backed share tells mapped weights from heap); a phase's entry and exit are read at
once, so a peak shorter than 50 ms inside a phase can be missed, which `process_peak_gb` (the kernel's high-water
mark at the end) shows.
"""
from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from pathlib import Path
from typing import Any, Iterator

_active: "RSSTimeline | None" = None


def rss_now_gb() -> tuple[float, float]:
    """(resident, file-backed resident) memory of this process now, GB. Outside Linux: (peak RSS, 0)."""
    try:
        with open("/proc/self/statm") as f:
            fields = f.read().split()
        page = os.sysconf("SC_PAGE_SIZE")
        return int(fields[1]) * page / 1e9, int(fields[2]) * page / 1e9
    except OSError:
        return process_peak_gb(), 0.0


def process_peak_gb() -> float:
    """Peak resident memory of this process since it started (the kernel's high-water mark), GB."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux counts KiB


class RSSTimeline:
    """Samples RSS on a daemon thread and keeps, per phase label, its time, entry / exit / peak RSS."""

    def __init__(self, interval: float = 0.05, point_every: float = 0.5):
        self.interval, self.point_every = interval, point_every
        self.t0 = time.perf_counter()
        self.stack: list[tuple[str, dict]] = []  # open phases, outermost first: (label "sft/eval", its entry)
        self.phases: dict[str, dict[str, Any]] = {}  # label -> n, seconds, start_gb, end_gb, peak_gb, ...
        self.points: list[list] = []  # [seconds, GB, label]: the highest reading of each point_every window
        self.peak_gb = 0.0
        self._pending: list | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def start(self) -> "RSSTimeline":
        """Take the first reading and start sampling."""
        self.sample()
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop sampling (one last reading first)."""
        self._stop.set()
        self._thread.join()
        self.sample()
        self._flush_point()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> float:
        """Read RSS now and fold it into every open phase -> the reading, GB."""
        gb, file_gb = rss_now_gb()
        now = time.perf_counter() - self.t0
        with self._lock:
            self.peak_gb = max(self.peak_gb, gb)
            for label, entry in self.stack:
                entry["peak_gb"] = max(entry["peak_gb"], gb)
                p = self.phases[label]
                if gb > p["peak_gb"]:
                    p["peak_gb"], p["peak_file_gb"], p["peak_at_s"] = gb, file_gb, round(now, 2)
            label = self.stack[-1][0] if self.stack else ""
            if self._pending and (self._pending[2] != label or now - self._pending[0] >= self.point_every):
                self._flush_point()
            if self._pending is None or gb > self._pending[1]:
                t = self._pending[0] if self._pending else now
                self._pending = [t, gb, label]
        return gb

    def _flush_point(self) -> None:
        if self._pending:
            self.points.append([round(self._pending[0], 2), round(self._pending[1], 3), self._pending[2]])
            self._pending = None

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[dict[str, float]]:
        """A phase named `name` inside the innermost open one (label "outer/name") for the block; yields this
        entry's own {"start_gb", "peak_gb"} (kept up to date while it runs; the phase's row sums every entry)."""
        gb = self.sample()
        entry = {"start_gb": gb, "peak_gb": gb}
        with self._lock:
            label = f"{self.stack[-1][0]}/{name}" if self.stack else name
            p = self.phases.setdefault(label, {"n": 0, "seconds": 0.0, "start_gb": gb, "end_gb": gb,
                                               "peak_gb": gb, "peak_file_gb": 0.0, "peak_at_s": 0.0})
            p["n"] += 1
            self.stack.append((label, entry))
        t = time.perf_counter()
        try:
            yield entry
        finally:
            gb = self.sample()
            with self._lock:
                self.stack.pop()  # phases nest (context managers): the innermost one ends first
                p["seconds"] += time.perf_counter() - t
                p["end_gb"] = gb

    def summary(self) -> dict[str, Any]:
        """{"peak_gb": highest reading, "process_peak_gb": the kernel's high-water mark, "phases": {label: {n,
        seconds, start_gb, end_gb, peak_gb, peak_file_gb, peak_at_s}} in first-entry order, "points": [[s, GB,
        label], ...]}."""
        with self._lock:
            phases = {k: {kk: round(vv, 3) if isinstance(vv, float) else vv for kk, vv in v.items()}
                      for k, v in self.phases.items()}
            return {"peak_gb": round(self.peak_gb, 3), "process_peak_gb": round(process_peak_gb(), 3),
                    "interval_s": self.interval, "phases": phases, "points": list(self.points)}

    def write(self, path: Path) -> None:
        """Write the summary so far as JSON (atomically) to `path`."""
        from .rundir import atomic_write

        atomic_write(Path(path), json.dumps(self.summary(), indent=1))


@contextlib.contextmanager
def rss_timeline(path: Path | None = None, interval: float = 0.05) -> Iterator[RSSTimeline]:
    """Sample this process's RSS for the block as the active timeline (the one `rss_phase` labels); write its
    summary as JSON to `path` on the way out when any phase ran (also after an error: the memory before a crash is
    the point; a block that ran no phase leaves an earlier file as it was)."""
    global _active
    previous, timeline = _active, RSSTimeline(interval).start()
    _active = timeline
    try:
        yield timeline
    finally:
        _active = previous
        timeline.stop()
        if path is not None and timeline.phases:
            timeline.write(path)


@contextlib.contextmanager
def rss_phase(name: str) -> Iterator[dict[str, float] | None]:
    """Label the block as phase `name` of the running timeline (nested in any open phase) and yield the entry's
    {"start_gb", "peak_gb"}; without a running timeline, nothing is measured and it yields None."""
    if _active is None:
        yield None
        return
    with _active.phase(name) as entry:
        yield entry


def peak_table(summary: dict[str, Any]) -> list[str]:
    """Plain-text lines of a timeline summary: per phase the peak RSS, entry -> exit RSS and time."""
    lines = [f"    {'phase':28s} {'peak GB':>8s} {'(file)':>7s} {'start -> end GB':>16s} {'seconds':>8s} {'n':>4s}"]
    for label, p in summary.get("phases", {}).items():
        lines.append(f"    {label:28s} {p['peak_gb']:8.2f} {p['peak_file_gb']:7.2f} "
                     f"{p['start_gb']:7.2f} -> {p['end_gb']:5.2f} {p['seconds']:8.1f} {p['n']:4d}")
    lines.append(f"    process peak {summary.get('process_peak_gb', float('nan')):.2f} GB "
                 f"(sampled peak {summary.get('peak_gb', float('nan')):.2f} GB)")
    return lines
