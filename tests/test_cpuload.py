"""The thread policy on synthetic load readings: how other processes' load is read from /proc/stat and this
process's CPU time, how many threads follow from it, and when `runtime.between_phases` changes them (no timing)."""
import os

import pytest
import torch
from smolthink import cpuload, runtime
from smolthink.cpuload import CpuClock, CpuReading, choose_threads, read_busy_seconds

HZ = os.sysconf("SC_CLK_TCK")


@pytest.mark.parametrize("cores, load, want", [
    (2, None, 2),    # unknown: all cores
    (2, 0.0, 2),     # quiet
    (2, 0.3, 2),     # a light process (a browser tab) keeps both threads
    (2, 0.67, 1),    # one spinner beside 2 of our threads: it gets ~2/3 of a core
    (2, 1.0, 1),     # the spinner beside 1 thread: a whole core
    (2, 2.4, 1),     # everything busy: still one thread
    (16, 1.0, 15),   # a big machine leaves one core to the other process
    (16, 3.6, 12),
    (1, 0.9, 1),
])
def test_threads_leave_each_rounded_core_of_other_load_to_it(cores, load, want):
    assert choose_threads(cores, load) == want


def stat(ticks_per_cpu: dict[int, tuple[int, ...]]) -> str:
    """A /proc/stat text with these per-CPU tick fields (user nice system idle iowait irq softirq steal)."""
    total = [sum(f[i] for f in ticks_per_cpu.values()) for i in range(8)]
    lines = ["cpu  " + " ".join(map(str, total))]
    lines += [f"cpu{c} " + " ".join(map(str, f)) + " 0 0" for c, f in ticks_per_cpu.items()]
    return "\n".join(lines + ["intr 1 2 3", "ctxt 99", "procs_running 3"]) + "\n"


def test_busy_seconds_count_only_our_cpus_and_leave_idle_and_iowait_out():
    text = stat({0: (100, 10, 20, 5000, 700, 1, 2, 3), 1: (50, 0, 0, 9000, 0, 0, 0, 0), 2: (999, 0, 0, 0, 0, 0, 0, 0)})
    assert read_busy_seconds([0, 1], text) == pytest.approx((100 + 10 + 20 + 1 + 2 + 3 + 50) / HZ)
    assert read_busy_seconds([2], text) == pytest.approx(999 / HZ)
    assert read_busy_seconds([7], text) is None  # no such CPU line


def clock_at(reading: CpuReading) -> CpuClock:
    clock = CpuClock.__new__(CpuClock)
    clock.cpus, clock.last = [0, 1], reading
    return clock


def test_other_load_is_busy_time_minus_our_own_over_the_window():
    clock = clock_at(CpuReading(wall=100.0, busy=50.0, own=10.0))
    # 10 s: the CPUs were busy 18 CPU-s, 8 of them ours -> other processes kept 1.0 core busy
    assert clock.advance(CpuReading(wall=110.0, busy=68.0, own=18.0)) == pytest.approx(1.0)
    # next window starts there: 5 s, 10 CPU-s busy, all ours -> 0
    assert clock.advance(CpuReading(wall=115.0, busy=78.0, own=28.0)) == pytest.approx(0.0)
    # tick rounding can make ours exceed the machine's: never below 0
    assert clock.advance(CpuReading(wall=116.0, busy=78.5, own=29.0)) == 0.0


def test_a_window_too_short_gives_no_reading_and_keeps_accumulating():
    clock = clock_at(CpuReading(wall=0.0, busy=0.0, own=0.0))
    assert clock.advance(CpuReading(wall=0.05, busy=0.1, own=0.0)) is None
    assert clock.last.wall == 0.0  # the window still starts at 0
    assert clock.advance(CpuReading(wall=1.0, busy=1.5, own=0.5)) == pytest.approx(1.0)


def test_no_proc_stat_means_unknown():
    clock = clock_at(CpuReading(wall=0.0, busy=None, own=0.0))
    assert clock.advance(CpuReading(wall=5.0, busy=None, own=1.0)) is None


def test_the_real_clock_reads_this_machine():
    clock = CpuClock()
    load = clock.other_load(wait=True)  # sleeps the minimal window
    assert clock.cpus == cpuload.allowed_cpus() and (load is None or load >= 0.0)


class FakeClock:
    """Stands in for cpuload.PROCESS_CLOCK: hands out the given loads."""

    def __init__(self, loads, cpus=(0, 1)):
        self.loads, self.cpus = list(loads), list(cpus)

    def other_load(self, wait=False):
        return self.loads.pop(0)


@pytest.fixture
def threads_restored(monkeypatch):
    n = torch.get_num_threads()
    monkeypatch.setattr(runtime, "allowed_cpus", lambda: [0, 1])
    yield
    runtime.set_threads(n)


def test_auto_threads_follow_the_load_between_phases(monkeypatch, threads_restored):
    monkeypatch.setattr(runtime, "PROCESS_CLOCK", FakeClock([1.0, 1.1, 0.1, None, 0.2]))
    assert runtime.set_threads(0) == 1 and torch.get_num_threads() == 1  # busy at start
    runtime.between_phases()  # still busy
    assert torch.get_num_threads() == 1
    runtime.between_phases()  # the other process ended
    assert torch.get_num_threads() == 2
    runtime.between_phases()  # no reading (window too short): unchanged
    assert torch.get_num_threads() == 2


def test_fixed_threads_stay_fixed_whatever_the_load(monkeypatch, threads_restored):
    clock = FakeClock([2.0, 2.0])
    monkeypatch.setattr(runtime, "PROCESS_CLOCK", clock)
    assert runtime.set_threads(2) == 2
    runtime.between_phases()
    assert torch.get_num_threads() == 2 and len(clock.loads) == 2  # never even probed
