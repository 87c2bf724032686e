"""The scoring worker: a fork server in a fresh interpreter that runs every answer in a sandboxed child.

The worker holds reasoning-gym imported and one dataset object per (task, config), and never runs model text
itself. For every answer it forks a child that enters the sandbox (`policy.enter_sandbox`), calls the scorer and
reports on a private pipe. The worker waits at most `timeout` seconds for the child, then SIGKILLs it: a hang costs
one fork, not an interpreter restart. A child that crashes (segfault, os._exit, a seccomp kill) is just a failed
call. Each answer runs in a copy of the clean worker, so a payload that monkeypatches a scorer cannot change later
scores. The child's report starts with a per-call random nonce, so a payload that writes a fake result to the pipe
is not believed.

Protocol with the caller (`client._Worker`): length-prefixed frames; requests are pickles on fd 0, replies are JSON
`[score, error]` on a private copy of fd 1.
"""
from __future__ import annotations

import hmac
import json
import math
import os
import pickle
import select
import signal
import struct
import sys
import time
from typing import Any

from .policy import Policy, enter_sandbox

Result = tuple  # (score: float, error: str | None)

_RESULT_FD = 3  # the child's result pipe
_NONCE_LEN = 16
_MAX_RESULT = 4096  # bytes a child may send back
MAX_ERROR = 300  # characters of an error message


# ----------------------------------------------------------------------------------------------------------------
# Framing: length-prefixed frames over pipes

def _read_exact(fd: int, n: int) -> bytes:
    """Exactly n bytes from fd (EOFError when it closes first)."""
    chunks, got = [], 0
    while got < n:
        b = os.read(fd, n - got)
        if not b:
            raise EOFError
        chunks.append(b)
        got += len(b)
    return b"".join(chunks)


def _write_all(fd: int, data: bytes) -> None:
    """Write all of data to fd."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def read_frame(fd: int) -> bytes:
    """One length-prefixed frame."""
    (n,) = struct.unpack("<I", _read_exact(fd, 4))
    return _read_exact(fd, n)


def write_frame(fd: int, data: bytes) -> None:
    """Write one length-prefixed frame."""
    _write_all(fd, struct.pack("<I", len(data)) + data)


# ----------------------------------------------------------------------------------------------------------------
# One scoring process (forked by the worker)

def _format_error(e: BaseException) -> str:
    """ "error: <ExcType>: <message>", bounded; the message comes from untrusted code, so guard it."""
    try:
        msg = str(e)
    except BaseException:  # noqa: BLE001
        msg = "<unprintable>"
    return f"error: {type(e).__name__}: {msg}"[:MAX_ERROR]


def _score_in_child(dataset: Any, answer: Any, entry: dict, nonce: bytes, wfd: int, policy: Policy,
                    worker_pid: int) -> None:
    """Body of a scoring process: isolate, limit, sandbox, score, report on fd 3, _exit. Never returns.

    Report: the nonce, then 0x00 and a float64 score, or 0x01 and a UTF-8 error. Everything used after the scorer ran
    is a local bound beforehand (builtin functions and methods of builtin types), so a payload that monkeypatches
    modules or builtins cannot change what is reported; the nonce makes a report written by the payload itself
    worthless."""
    write, exit_, pack = os.write, os._exit, struct.pack
    isinstance_, float_, isfinite = isinstance, float, math.isfinite
    encode, result_fd, max_error = str.encode, _RESULT_FD, MAX_ERROR
    import numbers

    real = numbers.Real

    def report_error(message: str) -> None:
        write(result_fd, nonce + b"\x01" + encode(message[:max_error], "utf-8", "replace"))

    try:
        policy.prctl.die_with_parent()
        if os.getppid() != worker_pid:  # the worker died before the line above
            exit_(71)
        if wfd != _RESULT_FD:
            os.dup2(wfd, _RESULT_FD)
        refused = enter_sandbox(policy, _RESULT_FD)
    except BaseException as e:  # noqa: BLE001  (never run a scorer outside the sandbox)
        report_error("crashed: sandbox set-up failed: " + _format_error(e))
        exit_(0)
    error = None
    value = 0.0
    try:
        score = dataset.score_answer(answer, entry)
        if isinstance_(score, real):
            value = float_(score)
            if not (isfinite(value) and 0.0 <= value <= 1.0):
                error = f"error: score out of [0, 1]: {value!r}"
        else:
            error = f"error: score is not a number: {type(score).__name__}"
    except BaseException as e:  # noqa: BLE001  (a scorer exception or a SandboxViolation is a scored error)
        error = _format_error(e)
    if refused:
        error = f"error: SandboxViolation: {refused[0]} refused"
    try:
        if error is None:
            write(result_fd, nonce + b"\x00" + pack("<d", value))
        else:
            report_error(error)
    finally:
        exit_(0)


def _describe_exit(status: int) -> str:
    """The error for a scoring process that ended without a result (a waitpid status)."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig == signal.SIGSYS:
            return "crashed: blocked system call (SIGSYS)"
        if sig == getattr(signal, "SIGXCPU", None):
            return "timeout"
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        return f"crashed: killed by signal {name}"
    return f"crashed: exit code {os.WEXITSTATUS(status)}"


def _run_one(dataset: Any, answer: Any, entry: dict, policy: Policy) -> Result:
    """Fork a sandboxed process that scores one answer; wait at most `policy.timeout` seconds for it."""
    nonce = os.urandom(_NONCE_LEN)
    rfd, wfd = os.pipe()
    worker_pid = os.getpid()
    pid = os.fork()
    if pid == 0:  # the scoring process
        try:
            os.close(rfd)
            _score_in_child(dataset, answer, entry, nonce, wfd, policy, worker_pid)
        finally:
            os._exit(70)
    os.close(wfd)
    deadline = time.monotonic() + policy.timeout
    data, too_long, timed_out = bytearray(), False, False
    poller = select.poll()
    poller.register(rfd, select.POLLIN)
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                break
            if not poller.poll(max(1, int(remaining * 1000 + 1))):
                continue
            chunk = os.read(rfd, 65536)
            if not chunk:
                break
            if len(data) + len(chunk) > _MAX_RESULT:
                too_long = True
            else:
                data += chunk
        status = None
        if not timed_out:  # the result pipe closed: the process is exiting (or closed fd 3 and carries on)
            delay = 0.0002
            while status is None and time.monotonic() < deadline:
                done, st = os.waitpid(pid, os.WNOHANG)
                if done:
                    status = st
                else:
                    time.sleep(delay)
                    delay = min(delay * 2, 0.01)
            timed_out = status is None
        if timed_out:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return 0.0, "timeout"
    finally:
        os.close(rfd)
    if not (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0):
        return 0.0, _describe_exit(status)
    return _read_report(bytes(data), too_long, nonce)


def _read_report(data: bytes, too_long: bool, nonce: bytes) -> Result:
    """The result a scoring process reported (see `_score_in_child`), or an error when the report is not its own."""
    invalid = (0.0, "crashed: no valid result from the scoring process")
    if too_long or len(data) <= _NONCE_LEN or not hmac.compare_digest(data[:_NONCE_LEN], nonce):
        return invalid
    tag, body = data[_NONCE_LEN], data[_NONCE_LEN + 1:]
    if tag == 0 and len(body) == 8:
        return valid_result(struct.unpack("<d", body)[0], None)
    if tag == 1:
        return 0.0, body.decode("utf-8", "replace")[:MAX_ERROR]
    return invalid


def valid_result(score: Any, error: Any) -> Result:
    """(score, error) if well-formed (a float in [0, 1] and None, or 0.0 and a string), else an error result."""
    if error is not None:
        return 0.0, str(error)[:MAX_ERROR]
    if type(score) in (int, float) and math.isfinite(score) and 0.0 <= score <= 1.0:
        return float(score), None
    return 0.0, f"error: invalid score {score!r}"[:MAX_ERROR]


# ----------------------------------------------------------------------------------------------------------------
# The worker's main loop

def _build_dataset(task: str, config: dict) -> Any:
    """The reasoning-gym dataset object whose score_answer scores `task` under `config` (one tiny item)."""
    from reasoning_gym.factory import DATASETS

    if task not in DATASETS:
        raise ValueError(f"unknown reasoning-gym task {task!r}")
    dataset_cls, config_cls = DATASETS[task]
    kwargs = {"seed": 0, **config, "size": 1}
    cfg = config_cls(**kwargs)
    if hasattr(cfg, "validate"):
        cfg.validate()
    return dataset_cls(config=cfg)


def worker_main(timeout: float, memory_mb: int, eval_guard: bool) -> None:
    """Entry point of a worker interpreter (see `client._Worker`): requests on fd 0, JSON replies on a private copy of
    fd 1 (fd 1 itself then points at stderr, so nothing a scorer prints can corrupt the protocol)."""
    import gc

    reply_fd = os.dup(1)
    os.dup2(2, 1)
    sys.dont_write_bytecode = True
    startup_error = None
    try:
        import reasoning_gym  # noqa: F401  (registers every dataset; the heavy imports, paid once)
        import sympy.parsing.sympy_parser  # noqa: F401
        import numpy  # noqa: F401
        import enum, logging, numbers, resource, warnings  # noqa: F401,E401  (imported by scoring processes)
    except BaseException as e:  # noqa: BLE001
        startup_error = f"error: scoring worker cannot import reasoning_gym: {type(e).__name__}: {e}"[:MAX_ERROR]
    policy = Policy(timeout, memory_mb, eval_guard)
    datasets: dict[str, Any] = {}
    gc.freeze()  # keep the warm heap out of the children's garbage collections (fewer copy-on-write pages)
    while True:
        try:
            request = pickle.loads(read_frame(0))
        except (EOFError, OSError):
            return
        if request is None:
            return
        task, config, answer, entry = request
        if startup_error is not None:
            result: Result = (0.0, startup_error)
        else:
            key = json.dumps([task, config], sort_keys=True, default=repr)
            try:
                if key not in datasets:
                    datasets[key] = _build_dataset(task, config)
                    gc.freeze()
                result = _run_one(datasets[key], answer, entry, policy)
            except Exception as e:  # noqa: BLE001  (a bad task/config, or fork failing)
                result = (0.0, f"error: {type(e).__name__}: {e}"[:MAX_ERROR])
        try:
            write_frame(reply_fd, json.dumps(list(result)).encode())
        except OSError:
            return

