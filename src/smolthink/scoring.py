"""Sandboxed execution of reasoning-gym's own task scorers.

Several reasoning-gym scorers run the model's answer through Python `eval` (binary_matrix, spiral_matrix,
string_insertion, n_queens) or through `sympy.parse_expr`, which also evals (countdown, puzzle24). Under RL pressure
a model finds strings that run code (`__import__('os').system(...)`), hang (`9**9**9`) or exhaust memory.
propositional_logic and syllogism parse by hand and never eval, but go through the same sandbox.

`Scorer` therefore never runs a scorer in the caller's process. Layout:

    caller (Scorer) --pipe--> worker (a fresh `python -c` interpreter, persistent; imports paid once)
                                 `--fork--> one short-lived process per answer, sandboxed, runs score_answer

The worker is a fork server: it holds reasoning-gym imported and one dataset object per (task, config), and
never runs model text itself. For every answer it forks a child that, before calling the scorer,
  * closes every inherited descriptor except a private result pipe, /dev/null on stdin/stdout/stderr;
  * sets rlimits: RLIMIT_AS (memory_mb), RLIMIT_CPU, RLIMIT_FSIZE=0, RLIMIT_NOFILE, RLIMIT_NPROC=0, RLIMIT_CORE=0;
  * on Linux (x86_64, aarch64) installs a seccomp filter that kills the process on any system call that creates,
    modifies or removes files (open/openat with a write, create, truncate or append flag, creat, unlink, rename,
    mkdir, rmdir, link, symlink, mknod, chmod, chown, truncate, utime, xattrs), starts programs or processes
    (execve, fork, vfork, clone), opens sockets, signals other processes, traces memory, changes rlimits, or
    injects terminal input. This holds whatever Python-level trick the payload uses (ctypes, _posixsubprocess);
  * installs a `sys.addaudithook` (after every import) that raises `SandboxViolation` (a BaseException, so the
    scorers' own `except Exception` cannot swallow it) on file writes (`open` in a write/append/create mode),
    os.remove/rename/mkdir/rmdir/chmod/..., shutil, subprocess, os.system/exec*/spawn*/fork/kill, sockets, ctypes,
    mmap, rlimit changes and frame/gc introspection; any refused event is reported even if a scorer catches it.

The worker waits at most `timeout` seconds for the child, then SIGKILLs it: a hang costs one fork, not an
interpreter restart. A child that crashes (segfault, os._exit, a seccomp kill) is just a failed call. Each answer
runs in a copy of the clean worker, so a payload that monkeypatches a scorer cannot change later scores. The
child reports through a pipe with a per-call random nonce, so a payload that writes a fake result to the pipe is
not believed. The caller enforces its own backstop deadline on the worker, kills and lazily restarts a worker that
dies or stalls, and never unpickles anything a worker sends (replies are JSON).

Results are (task_score, error): error None for a normal score, else "timeout", "crashed: ...",
"error: <ExcType>: <message>" (a scorer exception or a SandboxViolation) with score 0.0.
"""
from __future__ import annotations

import hmac
import json
import math
import os
import pickle
import platform
import select
import signal
import struct
import subprocess
import sys
import threading
import time
import types
import weakref
from collections import deque
from typing import Any, Callable, Optional, Sequence

__all__ = ["Scorer", "SandboxViolation"]

Item = tuple  # (task: str, task_config: dict, answer: str | None, entry: dict)
Result = tuple  # (score: float, error: str | None)

_RESULT_FD = 3  # the child's result pipe
_NONCE_LEN = 16
_MAX_RESULT = 4096  # bytes a child may send back
_MAX_ERROR = 300  # characters of an error message
# The caller's extra patience beyond `timeout` before it declares a worker itself stuck (the worker enforces
# `timeout` on the scoring process; this covers a fresh worker's imports and building a dataset).
_BACKSTOP_S = 120.0


class SandboxViolation(BaseException):
    """Raised inside a scoring process when the answer tries something the sandbox refuses.

    A BaseException on purpose: reasoning-gym scorers wrap their eval in `except Exception`, which must not hide
    the attempt."""


# ----------------------------------------------------------------------------------------------------------------
# The audit hook (Python-level policy of a scoring process)

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_BLOCKED_PREFIXES = (
    "os.", "shutil.", "subprocess.", "socket.", "ctypes.", "_ctypes.", "pty.", "mmap.", "resource.", "fcntl.",
    "signal.", "sys.setprofile", "sys.settrace", "sys._current_frames", "sys._getframe", "sys.addaudithook",
    "sys.remote_exec", "gc.", "tempfile.", "sqlite3.", "dbm.", "urllib.", "http.", "ftplib.", "smtplib.", "poplib.",
    "imaplib.", "nntplib.", "telnetlib.", "webbrowser.", "winreg.", "_winapi.", "msvcrt.", "syslog.", "cpython.run",
    "code.__new__", "function.__new__", "marshal.dumps", "pickle.find_class",
)
_ALLOWED_OS_EVENTS = frozenset({"os.listdir", "os.scandir", "os.walk", "os.fwalk", "os.getxattr", "os.listxattr"})
_FRAME_ATTRS = frozenset({"tb_frame", "f_back", "gi_frame", "cr_frame", "ag_frame", "gi_code", "f_locals"})
# The eval guard: names that no honest answer (a number, an expression, a list literal) uses, but that let code
# evaluated from a string reach into the scorer (`setattr(np, "isclose", ...)` makes countdown's check pass).
_GUARDED_NAMES = frozenset({
    "getattr", "setattr", "delattr", "vars", "globals", "locals", "dir", "eval", "exec", "compile", "open",
    "breakpoint", "input", "help", "memoryview", "type", "object", "super", "exit", "quit", "sympify", "S",
    "parse_expr", "lambdify", "import_module", "Function", "classmethod", "staticmethod", "property",
})
_CODE_TYPE = types.CodeType


def _make_audit_hook(refused: list, eval_guard: bool) -> Callable[[str, tuple], None]:
    """The audit hook of a scoring process: refuse writes, processes, network, native code and introspection,
    and (eval_guard) code compiled from a string that uses a dunder or a name in _GUARDED_NAMES.

    Every refused event is appended to `refused` before the SandboxViolation is raised, so an attempt is reported
    even when a scorer catches the exception. Only locals and methods of builtin types are used, so a payload that
    monkeypatches builtins cannot weaken the checks."""
    write_flags, blocked, allowed_os, frame_attrs = _WRITE_FLAGS, _BLOCKED_PREFIXES, _ALLOWED_OS_EVENTS, _FRAME_ATTRS
    guarded, code_type = _GUARDED_NAMES, _CODE_TYPE
    type_, str_, bytes_, int_, len_, violation = type, str, bytes, int, len, SandboxViolation
    startswith, endswith, decode = str.startswith, str.endswith, bytes.decode

    def check_code(code: Any) -> None:
        stack = [code]
        while stack:
            c = stack.pop()
            for name in c.co_names:
                if name in guarded or "__" in name:
                    refuse(f"evaluated code using {name!r}")
            for const in c.co_consts:
                if type_(const) is code_type:
                    stack.append(const)
                elif type_(const) is str_ and "__" in const:
                    refuse("evaluated code with a dunder string")

    def refuse(what: str) -> None:
        refused.append(what)
        raise violation(what + " refused")

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args[0], args[1] if len_(args) > 1 else None, args[2] if len_(args) > 2 else None
            if type_(path) is bytes_:
                path = decode(path, "utf-8", "replace")
            shown = path if type_(path) is str_ or type_(path) is int_ else type_(path).__name__
            if type_(mode) is str_ and ("w" in mode or "a" in mode or "x" in mode or "+" in mode):
                refuse(f"open({shown!r}, {mode!r})")
            if type_(flags) is int_ and flags & write_flags:
                refuse(f"open({shown!r}, flags={flags:#o})")
            if type_(path) is str_ and startswith(path, "/proc/") and endswith(path, ("/mem", "/pagemap")):
                refuse(f"open({shown!r})")
        elif event == "object.__getattr__":
            if len_(args) > 1 and type_(args[1]) is str_ and args[1] in frame_attrs:
                refuse(f"frame access .{args[1]}")
        elif event == "compile":
            source = args[0] if len_(args) else None
            if type_(source) is bytes_:
                source = decode(source, "utf-8", "replace")
            if eval_guard and type_(source) is str_ and "__" in source:
                refuse("evaluated code with a dunder")
        elif event == "exec":
            if eval_guard and len_(args) and type_(args[0]) is code_type and args[0].co_filename == "<string>":
                check_code(args[0])
        elif startswith(event, blocked) and event not in allowed_os:
            refuse(event)

    return hook


# ----------------------------------------------------------------------------------------------------------------
# seccomp (kernel-level policy of a scoring process; Linux x86_64 and aarch64)

_SECCOMP_KILL, _SECCOMP_ALLOW = 0x80000000, 0x7FFF0000  # SECCOMP_RET_KILL_PROCESS, SECCOMP_RET_ALLOW
_TIOCSTI, _TIOCLINUX = 0x5412, 0x541C
# Per architecture: AUDIT_ARCH, {syscall: index of its open-flags argument}, ioctl, always-killed syscalls.
_SYSCALLS: dict[str, tuple[int, dict[int, int], int, tuple[int, ...]]] = {
    "x86_64": (0xC000003E, {2: 1, 257: 2}, 16, (
        437, 85,  # openat2 (flags not inspectable), creat
        59, 322, 57, 58, 56, 435,  # execve, execveat, fork, vfork, clone, clone3
        87, 263, 82, 264, 316, 83, 258, 84, 86, 265, 88, 266, 133, 259,  # unlink rename mkdir rmdir link symlink mknod
        90, 91, 268, 452, 92, 93, 94, 260, 76, 77, 285, 132, 235, 280, 261,  # chmod chown truncate fallocate utime
        188, 189, 190, 197, 198, 199,  # xattrs
        41, 53, 42, 49,  # socket, socketpair, connect, bind
        62, 200, 234, 129, 297, 424, 434, 438,  # kill, tkill, tgkill, sigqueue, pidfd_*
        101, 310, 311, 160, 302, 13,  # ptrace, process_vm_*, setrlimit, prlimit64, rt_sigaction
        165, 166, 161, 155, 303, 304, 425, 426, 427, 272, 308, 321, 323, 298, 163, 167, 168, 169, 175, 313, 176,
        246, 170, 171, 179, 300, 248, 249, 250, 428, 429, 430, 431, 432, 442,  # mounts, io_uring, namespaces, ...
    )),
    "aarch64": (0xC00000B7, {56: 2}, 29, (
        437,  # openat2
        221, 281, 220, 435,  # execve, execveat, clone, clone3
        35, 38, 276, 34, 37, 36, 33,  # unlinkat, renameat(2), mkdirat, linkat, symlinkat, mknodat
        52, 53, 452, 54, 55, 45, 46, 47, 88,  # fchmod(at), fchownat, fchown, truncate, ftruncate, fallocate, utimensat
        5, 6, 7, 14, 15, 16,  # xattrs
        198, 199, 203, 200,  # socket, socketpair, connect, bind
        129, 130, 131, 138, 240, 424, 434, 438,  # kill, tkill, tgkill, sigqueue, pidfd_*
        117, 270, 271, 164, 261, 134,  # ptrace, process_vm_*, setrlimit, prlimit64, rt_sigaction
        40, 39, 51, 41, 264, 265, 425, 426, 427, 97, 268, 280, 282, 241, 89, 224, 225, 142, 105, 273, 106, 104, 161,
        162, 60, 262, 217, 218, 219, 428, 429, 430, 431, 432, 442,  # mounts, io_uring, namespaces, ...
    )),
}


def _seccomp_program() -> Optional[bytes]:
    """The BPF program of the scoring processes' seccomp filter, or None where this platform has none."""
    machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine().lower(), platform.machine().lower())
    if not sys.platform.startswith("linux") or machine not in _SYSCALLS or struct.calcsize("P") != 8 \
            or sys.byteorder != "little":
        return None
    arch, open_calls, ioctl, killed = _SYSCALLS[machine]
    ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06  # BPF_LD|W|ABS, JMP|JEQ|K, JMP|JGE|K, JMP|JSET|K, RET|K

    def op(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
        return struct.pack("=HBBI", code, jt, jf, k)

    arg = lambda i: 16 + 8 * i  # offset of the low 32 bits of seccomp_data.args[i] (little-endian)
    prog = [op(ld, 4), op(jeq, arch, 1, 0), op(ret, _SECCOMP_KILL), op(ld, 0)]
    if machine == "x86_64":
        prog += [op(jge, 0x40000000, 0, 1), op(ret, _SECCOMP_KILL)]  # the x32 ABI
    for nr in killed:
        prog += [op(jeq, nr, 0, 1), op(ret, _SECCOMP_KILL)]
    write_mask = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    for nr, i in open_calls.items():
        prog += [op(jeq, nr, 0, 4), op(ld, arg(i)), op(jset, write_mask, 0, 1), op(ret, _SECCOMP_KILL),
                 op(ret, _SECCOMP_ALLOW)]
    prog += [op(jeq, ioctl, 0, 5), op(ld, arg(1)), op(jeq, _TIOCSTI, 2, 0), op(jeq, _TIOCLINUX, 1, 0),
             op(ret, _SECCOMP_ALLOW), op(ret, _SECCOMP_KILL)]
    prog.append(op(ret, _SECCOMP_ALLOW))
    return b"".join(prog)


class _Prctl:
    """prctl(2) through ctypes, loaded in the worker before any sandbox exists (None where unavailable)."""

    def __init__(self, program: Optional[bytes]):
        self.libc = None
        try:
            import ctypes

            self.libc = ctypes.CDLL(None, use_errno=True)
            self.libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
            if program is not None:
                class SockFprog(ctypes.Structure):
                    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

                self._buf = ctypes.create_string_buffer(program, len(program))
                self.fprog = SockFprog(len(program) // 8, ctypes.addressof(self._buf))
                self.fprog_addr = ctypes.addressof(self.fprog)
            else:
                self.fprog_addr = None
        except (OSError, AttributeError, ImportError):
            self.libc, self.fprog_addr = None, None

    def die_with_parent(self) -> None:
        """PR_SET_PDEATHSIG: SIGKILL this process when the worker that forked it goes away."""
        if self.libc is not None:
            self.libc.prctl(1, signal.SIGKILL, 0, 0, 0)

    def install_seccomp(self) -> bool:
        """PR_SET_NO_NEW_PRIVS then PR_SET_SECCOMP(SECCOMP_MODE_FILTER); True when the filter is active."""
        if self.libc is None or self.fprog_addr is None:
            return False
        if self.libc.prctl(38, 1, 0, 0, 0) != 0:
            return False
        return self.libc.prctl(22, 2, self.fprog_addr, 0, 0) == 0


# ----------------------------------------------------------------------------------------------------------------
# One scoring process (forked by the worker)

def _format_error(e: BaseException) -> str:
    """ "error: <ExcType>: <message>", bounded; the message comes from untrusted code, so guard it."""
    try:
        msg = str(e)
    except BaseException:  # noqa: BLE001
        msg = "<unprintable>"
    return f"error: {type(e).__name__}: {msg}"[:_MAX_ERROR]


class _Policy:
    """What a worker imposes on its scoring processes (fixed when the worker starts)."""

    def __init__(self, timeout: float, memory_mb: int, eval_guard: bool):
        self.timeout = timeout
        self.memory_bytes = int(memory_mb) << 20
        self.cpu_s = int(math.ceil(timeout)) + 1  # RLIMIT_CPU, a second chance should the wall-time kill fail
        self.eval_guard = eval_guard
        program = _seccomp_program()
        self.prctl = _Prctl(program)
        # where this kernel takes the filter, a scoring process that cannot install it refuses to score
        self.seccomp_required = self.prctl.fprog_addr is not None and _seccomp_works(self.prctl)


def _score_in_child(dataset: Any, answer: Any, entry: dict, nonce: bytes, wfd: int, policy: _Policy,
                    worker_pid: int) -> None:
    """Body of a scoring process: isolate, limit, sandbox, score, report on fd 3, _exit. Never returns.

    Report: the nonce, then 0x00 and a float64 score, or 0x01 and a UTF-8 error. Everything used after the scorer ran
    is a local bound beforehand (builtin functions and methods of builtin types), so a payload that monkeypatches
    modules or builtins cannot change what is reported; the nonce makes a report written by the payload itself
    worthless."""
    write, exit_, pack = os.write, os._exit, struct.pack
    isinstance_, float_, isfinite = isinstance, float, math.isfinite
    encode, result_fd, max_error = str.encode, _RESULT_FD, _MAX_ERROR
    import numbers

    real = numbers.Real

    def report_error(message: str) -> None:
        write(result_fd, nonce + b"\x01" + encode(message[:max_error], "utf-8", "replace"))

    try:
        import resource

        prctl = policy.prctl
        prctl.die_with_parent()
        if os.getppid() != worker_pid:  # the worker died before the line above
            exit_(71)
        if wfd != _RESULT_FD:
            os.dup2(wfd, _RESULT_FD)
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        _close_fds_above(_RESULT_FD)
        vsz = _address_space_bytes()
        limits = [(resource.RLIMIT_AS, max(policy.memory_bytes, vsz + (64 << 20))),
                  (resource.RLIMIT_CPU, policy.cpu_s), (resource.RLIMIT_FSIZE, 0), (resource.RLIMIT_NOFILE, 32),
                  (resource.RLIMIT_CORE, 0)]
        if hasattr(resource, "RLIMIT_NPROC"):
            limits.append((resource.RLIMIT_NPROC, 0))
        for res, value in limits:
            try:
                resource.setrlimit(res, (value, value))
            except (ValueError, OSError):
                pass
        if not prctl.install_seccomp() and policy.seccomp_required:
            raise RuntimeError("seccomp filter could not be installed")
        refused: list[str] = []
        sys.addaudithook(_make_audit_hook(refused, policy.eval_guard))
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


def _close_fds_above(keep: int) -> None:
    """Close every descriptor above `keep` (listing /proc/self/fd is fast even with a huge RLIMIT_NOFILE)."""
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except (OSError, ValueError):
        import resource

        os.closerange(keep + 1, max(keep + 2, resource.getrlimit(resource.RLIMIT_NOFILE)[0]))
        return
    for fd in fds:
        if fd > keep:
            try:
                os.close(fd)
            except OSError:
                pass


def _address_space_bytes() -> int:
    """This process's current virtual size (0 where /proc is unavailable)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


# ----------------------------------------------------------------------------------------------------------------
# The worker (a fork server in a fresh interpreter)

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


def _read_frame(fd: int) -> bytes:
    """One length-prefixed frame."""
    (n,) = struct.unpack("<I", _read_exact(fd, 4))
    return _read_exact(fd, n)


def _write_frame(fd: int, data: bytes) -> None:
    """Write one length-prefixed frame."""
    _write_all(fd, struct.pack("<I", len(data)) + data)


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


def _run_one(dataset: Any, answer: Any, entry: dict, policy: _Policy) -> Result:
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
    data = bytes(data)
    invalid = (0.0, "crashed: no valid result from the scoring process")
    if too_long or len(data) <= _NONCE_LEN or not hmac.compare_digest(data[:_NONCE_LEN], nonce):
        return invalid
    tag, body = data[_NONCE_LEN], data[_NONCE_LEN + 1:]
    if tag == 0 and len(body) == 8:
        return _valid_result(struct.unpack("<d", body)[0], None)
    if tag == 1:
        return 0.0, body.decode("utf-8", "replace")[:_MAX_ERROR]
    return invalid


def _valid_result(score: Any, error: Any) -> Result:
    """(score, error) if well-formed (a float in [0, 1] and None, or 0.0 and a string), else an error result."""
    if error is not None:
        return 0.0, str(error)[:_MAX_ERROR]
    if type(score) in (int, float) and math.isfinite(score) and 0.0 <= score <= 1.0:
        return float(score), None
    return 0.0, f"error: invalid score {score!r}"[:_MAX_ERROR]


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


def _worker_main(timeout: float, memory_mb: int, eval_guard: bool) -> None:
    """Entry point of a worker interpreter (see `_Worker`): requests on fd 0, JSON replies on a private copy of
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
        startup_error = f"error: scoring worker cannot import reasoning_gym: {type(e).__name__}: {e}"[:_MAX_ERROR]
    policy = _Policy(timeout, memory_mb, eval_guard)
    datasets: dict[str, Any] = {}
    gc.freeze()  # keep the warm heap out of the children's garbage collections (fewer copy-on-write pages)
    while True:
        try:
            request = pickle.loads(_read_frame(0))
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
                result = (0.0, f"error: {type(e).__name__}: {e}"[:_MAX_ERROR])
        try:
            _write_frame(reply_fd, json.dumps(list(result)).encode())
        except OSError:
            return


def _seccomp_available() -> bool:
    """Whether scoring processes on this machine get the seccomp filter (probed in a throw-away child)."""
    program = _seccomp_program()
    if program is None:
        return False
    prctl = _Prctl(program)
    return prctl.fprog_addr is not None and _seccomp_works(prctl)


def _seccomp_works(prctl: _Prctl) -> bool:
    """Whether this kernel accepts the filter (checked once in a throw-away child)."""
    pid = os.fork()
    if pid == 0:
        try:
            os._exit(0 if prctl.install_seccomp() else 1)
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    return os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


# ----------------------------------------------------------------------------------------------------------------
# The caller's side

class _Worker:
    """Handle on one worker interpreter (a fresh `python -c`, not a fork of the caller, which may hold torch
    threads); requests are pickles, replies JSON."""

    def __init__(self, timeout: float, memory_mb: int, eval_guard: bool):
        src = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        code = (f"import sys; sys.path[:] = [{src!r}] + [p for p in sys.path if p not in ('', '.')]; "
                f"from smolthink.scoring import _worker_main; "
                f"_worker_main({float(timeout)!r}, {int(memory_mb)!r}, {bool(eval_guard)!r})")
        env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1",
                   NUMEXPR_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
        env.pop("PYTHONSTARTUP", None)
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, env=env, close_fds=True, start_new_session=True)

    def send(self, payload: bytes) -> None:
        """Send one pickled request."""
        _write_frame(self.proc.stdin.fileno(), payload)

    def recv(self) -> Result:
        """One reply, validated (EOFError when the worker died)."""
        data = _read_frame(self.proc.stdout.fileno())
        try:
            score, error = json.loads(data.decode("utf-8"))
        except (ValueError, TypeError, UnicodeDecodeError):
            return 0.0, "crashed: unreadable reply from the scoring worker"
        return _valid_result(score, error)

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
    """Scores answers with reasoning-gym's own scorers in sandboxed processes (see the module docstring).

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

    def __init__(self, timeout: float = 2.0, workers: int = 1, memory_mb: int = 1024, eval_guard: bool = True):
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
                results[i] = (0.0, f"error: cannot send item to the scorer: {type(e).__name__}: {e}"[:_MAX_ERROR])
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
                            results[i] = (0.0, f"crashed: scoring worker unavailable: {e}"[:_MAX_ERROR])
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
