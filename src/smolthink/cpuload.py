"""How much of this process's CPUs other processes keep busy, and the torch thread count that follows from it
(`runtime.set_threads` / `runtime.between_phases` apply it). With one thread there is no OpenMP barrier to wait
at, so libgomp's default wait policy (spin, then sleep) is kept (`nativeenv`).

Why: an OpenMP team waits at every parallel region's barrier for its slowest thread. With one CPU-bound process
beside it on a 2-core machine, one of two torch threads shares its core in scheduler time slices of milliseconds,
and the whole team runs at the pace of whichever thread is descheduled (benchmarks/README.md: FastEngine rollouts
at 32% of their quiet tokens/s with 2 threads, 68% with 1). Giving the other process its core back costs less
than fighting it for one.

The probe (`CpuClock.other_load`): the time the kernel counts as busy on the CPUs this process may run on
(/proc/stat, one line per CPU of the affinity mask; `steal`, time a hypervisor gave another VM, counts as busy)
minus this process's own CPU time (all its threads), over the time since the previous reading: the cores that
other processes kept busy, averaged over the last phase. Two small file reads, no sleep: cheap enough between every
rollout, optimizer step and eval. What the probe cannot see: a process that would take a core but is starved by
ours (a niced one), which is the point, and a CPU quota (cgroup cpu.max) narrower than the affinity mask.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

MIN_WINDOW_S = 0.2  # /proc/stat counts in 10 ms ticks: shorter windows are mostly rounding

def allowed_cpus() -> list[int]:
    """The CPUs this process may run on (its affinity mask; every CPU where there is none)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def choose_threads(cores: int, other_load: float | None) -> int:
    """Torch threads for `cores` usable cores when other processes keep `other_load` cores busy (None: unknown).

    Each whole core's worth of other work, rounded (>= 0.5 counts as one: a process that holds half a core takes
    one of our threads' slices half the time, and every barrier waits for that thread), is left to it; at least
    one thread always runs. Unknown load means a quiet machine: all cores."""
    if other_load is None:
        return max(1, cores)
    return max(1, cores - int(other_load + 0.5))


def read_busy_seconds(cpus: list[int], stat_text: str) -> float | None:
    """CPU-seconds the kernel counts as busy on `cpus`, from the text of /proc/stat (None: no per-CPU lines).
    Busy = user + nice + system + irq + softirq + steal (idle and iowait are not; guest time is inside user)."""
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    wanted, ticks, seen = {f"cpu{c}" for c in cpus}, 0, False
    for line in stat_text.splitlines():
        name, _, rest = line.partition(" ")
        if name in wanted:
            f = [int(x) for x in rest.split()]
            ticks += f[0] + f[1] + f[2] + f[5] + f[6] + (f[7] if len(f) > 7 else 0)
            seen = True
    return ticks / hz if seen else None


@dataclass
class CpuReading:
    """One reading of the clocks `CpuClock` compares."""

    wall: float  # time.monotonic(), s
    busy: float | None  # busy CPU-seconds of our CPUs since boot (None where /proc/stat is missing)
    own: float  # this process's CPU-seconds (user + system, all threads)


class CpuClock:
    """Successive readings of how busy the CPUs are with other processes' work (see the module docstring)."""

    def __init__(self, cpus: list[int] | None = None):
        self.cpus = cpus if cpus is not None else allowed_cpus()
        self.last = self.read()

    def read(self) -> CpuReading:
        """The clocks now."""
        try:
            with open("/proc/stat") as f:
                busy = read_busy_seconds(self.cpus, f.read())
        except OSError:
            busy = None
        t = os.times()
        return CpuReading(time.monotonic(), busy, t.user + t.system)

    def other_load(self, wait: bool = False) -> float | None:
        """Cores other processes kept busy since the previous call (or since this clock was made), averaged over
        that window; None when it cannot tell (no /proc/stat) or the window is under MIN_WINDOW_S (with `wait`:
        sleep until it is not). The window then starts again from now."""
        now = self.read()
        if wait and now.wall - self.last.wall < MIN_WINDOW_S:
            time.sleep(MIN_WINDOW_S - (now.wall - self.last.wall))
            now = self.read()
        return self.advance(now)

    def advance(self, now: CpuReading) -> float | None:
        """Other processes' load between the previous reading and `now` (`other_load` without the file reads)."""
        prev, span = self.last, now.wall - self.last.wall
        if span < MIN_WINDOW_S:
            return None
        self.last = now
        if prev.busy is None or now.busy is None:
            return None
        return max(0.0, (now.busy - prev.busy) - (now.own - prev.own)) / span


# started when this module is first imported (the CLI imports it first thing), so the first check covers the
# start-up's imports: no sleep before choosing the threads
PROCESS_CLOCK = CpuClock()
