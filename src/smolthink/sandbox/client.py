"""The caller's side of the sandbox: `Scorer` and the worker interpreters it starts, feeds and kills.

    caller (Scorer) --pipe--> worker (a fresh `python -c` interpreter, persistent; imports paid once)
                                 `--fork--> one short-lived process per answer, sandboxed, runs score_answer

The caller enforces its own backstop deadline on the worker, kills and lazily restarts a worker that dies or
stalls, and never unpickles anything a worker sends (replies are JSON).
"""
from __future__ import annotations

import json
import os
import pickle
import select
import struct
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from typing import Any, Optional, Sequence

from .worker import MAX_ERROR, Result, read_frame, valid_result, write_frame

Item = tuple  # (task: str, task_config: dict, answer: str | None, entry: dict)

DEFAULT_TIMEOUT_S = 2.0  # wall-clock seconds one answer may take to score

# The caller's extra patience beyond `timeout` before it declares a worker itself stuck (the worker enforces
# `timeout` on the scoring process; this covers a fresh worker's imports and building a dataset).
_BACKSTOP_S = 120.0


class _Worker:
    """Handle on one worker interpreter (a fresh `python -c`, not a fork of the caller, which may hold torch
    threads); requests are pickles, replies JSON."""

    def __init__(self, timeout: float, memory_mb: int, eval_guard: bool):
        src = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        code = (f"import sys; sys.path[:] = [{src!r}] + [p for p in sys.path if p not in ('', '.')]; "
                f"from smolthink.sandbox.worker import worker_main; "
                f"worker_main({float(timeout)!r}, {int(memory_mb)!r}, {bool(eval_guard)!r})")
        env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1",
                   NUMEXPR_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
        env.pop("PYTHONSTARTUP", None)
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, env=env, close_fds=True, start_new_session=True)

    def send(self, payload: bytes) -> None:
        """Send one pickled request."""
        write_frame(self.proc.stdin.fileno(), payload)

    def recv(self) -> Result:
        """One reply, validated (EOFError when the worker died)."""
        data = read_frame(self.proc.stdout.fileno())
        try:
            score, error = json.loads(data.decode("utf-8"))
        except (ValueError, TypeError, UnicodeDecodeError):
            return 0.0, "crashed: unreadable reply from the scoring worker"
        return valid_result(score, error)

    def kill(self) -> None:
        """Stop the worker at once and reap it."""
        _kill_proc(self.proc)


def _kill_proc(proc: subprocess.Popen) -> None:
    """SIGKILL a worker, reap it and close our ends of its pipes."""
    try:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        pass
    for f in (proc.stdin, proc.stdout):
        try:
            f.close()
        except OSError:
            pass


def _shutdown(workers: list, owner_pid: int) -> None:
    """Finalizer: stop the workers this process started (not those inherited through a fork)."""
    if os.getpid() != owner_pid:
        return
    for i, w in enumerate(workers):
        if w is not None:
            _kill_proc(w.proc)
            workers[i] = None


class Scorer:
    """Scores answers with reasoning-gym's own scorers in sandboxed processes (see the package docstring).

    timeout: wall-clock seconds one answer may take (the scoring process is killed after it).
    workers: worker interpreters; `score_many` spreads a batch over them.
    memory_mb: address-space limit of a scoring process (at least the warm interpreter plus 64 MB).
    eval_guard: refuse code compiled from a string (the scorers' eval/parse_expr of the answer) that uses a dunder
        name or getattr/setattr/vars/eval/open/... No honest answer does; it stops in-process reward hacks such as
        `(__import__("numpy").__dict__.update(isclose=max) or 6+61+94+4)`, which makes countdown's own check pass.
        The process sandbox stays in force either way.

    Workers start lazily on first use (~1 s of imports each) and are reused until `close()`; a dead or stuck
    worker is replaced on the next call. Use as a context manager or call `close()`. Thread-safe (calls serialise).
    """

    def __init__(self, timeout: float = DEFAULT_TIMEOUT_S, workers: int = 1, memory_mb: int = 1024,
                 eval_guard: bool = True):
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0, got {timeout}")
        self.timeout = float(timeout)
        self.eval_guard = bool(eval_guard)
        self.memory_mb = int(memory_mb)
        self.n_workers = max(1, int(workers))
        self._workers: list[Optional[_Worker]] = [None] * self.n_workers
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._finalizer = weakref.finalize(self, _shutdown, self._workers, self._pid)

    def __enter__(self) -> "Scorer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Stop every worker (idempotent; the scorer starts new ones if used again)."""
        with self._lock:
            _shutdown(self._workers, self._pid)

    def score(self, task: str, task_config: dict, answer: Optional[str], entry: dict) -> Result:
        """(task score in [0, 1], error or None) for one answer; answer None -> (0.0, None) at once."""
        return self.score_many([(task, task_config, answer, entry)])[0]

    def score_many(self, items: Sequence[Item]) -> list[Result]:
        """Score (task, task_config, answer, entry) items; results in input order. Items run in parallel over
        the workers; a timeout or crash affects only its own item. Never raises because of an answer."""
        with self._lock:
            if os.getpid() != self._pid:  # forked caller: leave the parent's workers alone, start our own
                self._workers[:] = [None] * self.n_workers
                self._pid = os.getpid()
                self._finalizer.detach()
                self._finalizer = weakref.finalize(self, _shutdown, self._workers, self._pid)
            return self._score_many(items)

    def _score_many(self, items: Sequence[Item]) -> list[Result]:
        """score_many under the lock: dispatch to idle workers, poll for replies, enforce the backstop."""
        results: list[Optional[Result]] = [None] * len(items)
        todo: deque[tuple[int, bytes, int]] = deque()  # (item index, request, tries)
        for i, item in enumerate(items):
            try:
                task, config, answer, entry = item
                if answer is None:
                    results[i] = (0.0, None)
                    continue
                request = pickle.dumps((str(task), dict(config or {}), answer, entry), pickle.HIGHEST_PROTOCOL)
            except Exception as e:  # noqa: BLE001  (a malformed or unpicklable item)
                results[i] = (0.0, f"error: cannot send item to the scorer: {type(e).__name__}: {e}"[:MAX_ERROR])
                continue
            todo.append((i, request, 0))
        busy: dict[int, tuple[int, bytes, int, float]] = {}  # worker slot -> (index, request, tries, deadline)
        try:
            while todo or busy:
                for slot in range(self.n_workers):
                    if slot in busy or not todo:
                        continue
                    i, request, tries = todo.popleft()
                    try:
                        w = self._workers[slot]
                        if w is None:
                            w = self._workers[slot] = _Worker(self.timeout, self.memory_mb, self.eval_guard)
                        w.send(request)
                    except OSError as e:  # the worker cannot start or died while idle
                        self._reset(slot)
                        if tries == 0:
                            todo.appendleft((i, request, 1))
                        else:
                            results[i] = (0.0, f"crashed: scoring worker unavailable: {e}"[:MAX_ERROR])
                        continue
                    busy[slot] = (i, request, tries, time.monotonic() + self.timeout + _BACKSTOP_S)
                if not busy:
                    continue
                streams = {self._workers[slot].proc.stdout.fileno(): slot for slot in busy}
                poller = select.poll()  # not select(): the caller may hold more than FD_SETSIZE descriptors
                for fd in streams:
                    poller.register(fd, select.POLLIN)
                wait_s = max(0.0, min(d for *_, d in busy.values()) - time.monotonic())
                ready = {streams[fd] for fd, _ in poller.poll(int(wait_s * 1000) + 1)}
                now = time.monotonic()
                for slot in list(busy):
                    i, request, tries, deadline = busy[slot]
                    if slot in ready:
                        del busy[slot]
                        try:
                            results[i] = self._workers[slot].recv()
                        except (EOFError, OSError, struct.error):
                            code = self._workers[slot].proc.poll()
                            self._reset(slot)
                            if tries == 0:  # the worker (not the scoring process) died: retry once elsewhere
                                todo.appendleft((i, request, 1))
                            else:
                                results[i] = (0.0, f"crashed: scoring worker died (exit code {code})")
                    elif now >= deadline:
                        del busy[slot]
                        self._reset(slot)
                        results[i] = (0.0, "timeout")
        except BaseException:  # KeyboardInterrupt mid-batch: in-flight replies would desynchronise the pipes
            for slot in busy:
                self._reset(slot)
            raise
        return results  # type: ignore[return-value]

    def _reset(self, slot: int) -> None:
        """Kill a worker that died or stalled; the next request to this slot starts a fresh one."""
        w = self._workers[slot]
        if w is not None:
            w.kill()
        self._workers[slot] = None
