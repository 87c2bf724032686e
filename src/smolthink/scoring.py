"""Sandboxed task scoring. Several reasoning-gym scorers feed the model's answer to Python `eval` or
`sympy.parse_expr` (countdown, puzzle24, ...): under RL pressure a model finds strings that run code or hang
(`9**9**9`). Scorers therefore run in persistent worker processes with a wall-time limit, memory and file-size
rlimits, and an audit hook that refuses file writes, process creation and network access. A scorer that
raises, hangs or crashes yields (0.0, error) and a fresh worker; the caller never dies or hangs."""
from __future__ import annotations

import os
import pickle
import select
import struct
import subprocess
import sys
import tempfile
import time
from collections import deque
from typing import Any, BinaryIO, Sequence

from .errors import SmolthinkError

Item = tuple[str, dict, "str | None", dict]  # (task, task_config, answer, entry)

_BLOCKED_EVENTS = (
    "os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.link", "os.symlink",
    "os.truncate", "os.utime", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
    "os.kill", "os.killpg", "os.putenv", "os.unsetenv", "os.chdir", "shutil.", "subprocess.Popen", "socket.",
    "ctypes.", "pty.spawn", "sys.addaudithook", "urllib.Request",
    "webbrowser.open", "winreg.",
)
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


class SandboxViolation(RuntimeError):
    """Raised inside a worker when a scorer tries something the sandbox refuses."""


def _audit(event: str, args: tuple) -> None:
    """Refuse writes, process creation, network and native-code loading inside the worker."""
    if event == "open":
        path, mode, flags = (tuple(args) + (None, None, None))[:3]
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & _WRITE_FLAGS)
        if writing:
            raise SandboxViolation(f"file write refused: {path}")
        return
    if event.startswith(_BLOCKED_EVENTS):
        raise SandboxViolation(f"refused: {event}")


def _limit_resources(memory_mb: int) -> None:
    """Address-space and file-size limits for the worker (best effort where the OS lacks one)."""
    import resource

    for res, value in ((resource.RLIMIT_AS, memory_mb * 1024 * 1024), (resource.RLIMIT_FSIZE, 0),
                       (resource.RLIMIT_CORE, 0)):
        try:
            resource.setrlimit(res, (value, value))
        except (ValueError, OSError):
            pass


def _send(f: BinaryIO, obj: Any) -> None:
    """Write one length-prefixed pickle frame."""
    data = pickle.dumps(obj)
    f.write(struct.pack("<I", len(data)) + data)
    f.flush()


def _recv(f: BinaryIO) -> Any:
    """Read one length-prefixed pickle frame (EOFError when the pipe closed)."""
    head = f.read(4)
    if len(head) < 4:
        raise EOFError
    (n,) = struct.unpack("<I", head)
    data = f.read(n)
    if len(data) < n:
        raise EOFError
    return pickle.loads(data)


class _Conn:
    """The worker's end of the parent's pipes: stdin for requests, the original stdout for replies."""

    def __init__(self, rfile: BinaryIO, wfile: BinaryIO):
        self.rfile, self.wfile = rfile, wfile

    def recv(self) -> Any:
        return _recv(self.rfile)

    def send(self, obj: Any) -> None:
        _send(self.wfile, obj)


def worker_entry(memory_mb: int) -> None:
    """Entry point of a worker process (`python -c`): replies go to a private copy of stdout, and fd 1 is
    pointed at stderr so nothing a scorer prints can corrupt the protocol."""
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    _worker_main(_Conn(sys.stdin.buffer, out), memory_mb)


def _worker_main(conn, memory_mb: int) -> None:
    """Worker loop: receive (task, config, answer, entry), reply (score, error)."""
    import reasoning_gym  # noqa: F401  (import and warm up before the sandbox closes)
    import sympy  # noqa: F401
    from reasoning_gym.factory import DATASETS  # noqa: F401

    workdir = tempfile.mkdtemp(prefix="smolthink-score-")
    os.chdir(workdir)
    datasets: dict[str, Any] = {}
    _limit_resources(memory_mb)
    sys.addaudithook(_audit)
    conn.send("ready")
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        task, config, answer, entry = msg
        try:
            key = repr((task, sorted(config.items())))
            if key not in datasets:
                import reasoning_gym as rg

                datasets[key] = rg.create_dataset(task, seed=0, size=1, **config)
            score = datasets[key].score_answer(answer, entry)
            score = float(score)
            if not 0.0 <= score <= 1.0 or score != score:
                conn.send((0.0, f"error: score out of range: {score!r}"))
            else:
                conn.send((score, None))
        except BaseException as e:  # noqa: BLE001  (anything a scorer raises is a scored error)
            try:
                conn.send((0.0, f"error: {type(e).__name__}: {str(e)[:200]}"))
            except BaseException:
                return


class _Worker:
    """One sandboxed scorer process (a fresh interpreter: no fork of a process holding torch threads)."""

    def __init__(self, memory_mb: int):
        env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
        code = f"from smolthink.scoring import worker_entry; worker_entry({int(memory_mb)})"
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, env=env, close_fds=True)

    def wait_ready(self, timeout: float) -> bool:
        """Wait for the worker's start-up (imports, sandbox) to finish."""
        r, _, _ = select.select([self.proc.stdout], [], [], timeout)
        try:
            return bool(r) and self.recv() == "ready"
        except (EOFError, OSError, pickle.UnpicklingError):
            return False

    def send(self, obj: Any) -> None:
        """Send one request."""
        _send(self.proc.stdin, obj)

    def ready(self, timeout: float) -> bool:
        """True when a reply (or EOF) can be read within timeout seconds."""
        r, _, _ = select.select([self.proc.stdout], [], [], max(0.0, timeout))
        return bool(r)

    def recv(self) -> Any:
        """Read one reply (EOFError when the worker died)."""
        return _recv(self.proc.stdout)

    def kill(self) -> None:
        """Stop the process at once."""
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass


class Scorer:
    """Runs reasoning-gym scorers in sandboxed worker processes with a per-call time limit."""

    def __init__(self, timeout: float = 2.0, workers: int = 1, memory_mb: int = 1024):
        self.timeout = timeout
        self.memory_mb = memory_mb
        self.n_workers = max(1, workers)
        self._workers: list[_Worker | None] = [None] * self.n_workers
        self.errors = 0
        self.startup_timeout = 120.0  # a worker's imports, before its first call

    def __enter__(self) -> "Scorer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop every worker."""
        for i, w in enumerate(self._workers):
            if w is not None:
                try:
                    w.send(None)
                except OSError:
                    pass
                w.kill()
                self._workers[i] = None

    def _worker(self, i: int) -> _Worker:
        """The worker in slot i, started (and waited for) when there is none."""
        if self._workers[i] is None:
            w = _Worker(self.memory_mb)
            if not w.wait_ready(self.startup_timeout):
                w.kill()
                raise SmolthinkError("the scoring worker did not start (is reasoning-gym installed in this Python?)")
            self._workers[i] = w
        return self._workers[i]

    def score(self, task: str, task_config: dict, answer: str | None, entry: dict) -> tuple[float, str | None]:
        """(task score in [0, 1], error or None) for one answer."""
        return self.score_many([(task, task_config, answer, entry)])[0]

    def score_many(self, items: Sequence[Item]) -> list[tuple[float, str | None]]:
        """Score items in order, in parallel over the workers; a timeout or crash affects only its own item."""
        results: list[tuple[float, str | None] | None] = [None] * len(items)
        todo = deque(i for i, it in enumerate(items) if it[2] is not None)
        for i, it in enumerate(items):
            if it[2] is None:
                results[i] = (0.0, None)
        busy: dict[int, tuple[int, float]] = {}  # worker slot -> (item index, deadline)
        while todo or busy:
            for slot in range(self.n_workers):
                if slot not in busy and todo:
                    idx = todo.popleft()
                    w = self._worker(slot)
                    try:
                        w.send(tuple(items[idx]))
                    except Exception as e:  # unpicklable entry, broken pipe
                        results[idx] = (0.0, f"error: cannot send to scorer: {type(e).__name__}")
                        self._reset(slot)
                        continue
                    busy[slot] = (idx, time.monotonic() + self.timeout)
            if not busy:
                continue
            streams = {self._workers[k].proc.stdout: k for k in busy}
            wait_s = max(0.0, min(d for _, d in busy.values()) - time.monotonic())
            readable, _, _ = select.select(list(streams), [], [], wait_s)
            ready = {streams[r] for r in readable}
            for slot in list(busy):
                idx, deadline = busy[slot]
                w = self._workers[slot]
                if slot in ready:
                    try:
                        results[idx] = w.recv()
                    except (EOFError, OSError, pickle.UnpicklingError):
                        code = w.proc.wait()
                        results[idx] = (0.0, f"crashed: worker exit code {code}")
                        self._reset(slot)
                    del busy[slot]
                elif time.monotonic() >= deadline:
                    results[idx] = (0.0, "timeout")
                    self._reset(slot)
                    del busy[slot]
        self.errors += sum(r[1] is not None for r in results)
        return results  # type: ignore[return-value]

    def _reset(self, slot: int) -> None:
        """Kill a worker that timed out or died; the next call starts a fresh one."""
        w = self._workers[slot]
        if w is not None:
            w.kill()
        self._workers[slot] = None
