"""What a scoring process may and may not do: the policy a worker's forked child enters before it runs a scorer.

A scoring process
  * keeps only its result pipe, with /dev/null on stdin/stdout/stderr and every other inherited descriptor closed;
  * runs under rlimits: RLIMIT_AS (memory_mb), RLIMIT_CPU, RLIMIT_FSIZE=0, RLIMIT_NOFILE, RLIMIT_NPROC=0, RLIMIT_CORE=0;
  * on Linux (x86_64, aarch64) runs under a seccomp filter that kills the process on any system call that creates,
    modifies or removes files (open/openat with a write, create, truncate or append flag, creat, unlink, rename,
    mkdir, rmdir, link, symlink, mknod, chmod, chown, truncate, utime, xattrs), starts programs or processes
    (execve, fork, vfork, clone), opens sockets, signals other processes, traces memory, changes rlimits, or
    injects terminal input. This holds whatever Python-level trick the payload uses (ctypes, _posixsubprocess);
  * runs under a `sys.addaudithook` (installed after every import) that raises `SandboxViolation` (a BaseException,
    so the scorers' own `except Exception` cannot swallow it) on file writes (`open` in a write/append/create mode),
    os.remove/rename/mkdir/rmdir/chmod/..., shutil, subprocess, os.system/exec*/spawn*/fork/kill, sockets, ctypes,
    mmap, rlimit changes and frame/gc introspection; any refused event is reported even if a scorer catches it.
"""
from __future__ import annotations

import math
import os
import platform
import signal
import struct
import sys
import types
from typing import Any, Callable, Optional


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
    for nr, i in open_calls.items():
        prog += [op(jeq, nr, 0, 4), op(ld, arg(i)), op(jset, _WRITE_FLAGS, 0, 1), op(ret, _SECCOMP_KILL),
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
# The policy a worker holds for its scoring processes

class Policy:
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


def seccomp_available() -> bool:
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
# Entering the sandbox (in the freshly forked scoring process, before the scorer runs)

def enter_sandbox(policy: Policy, keep_fd: int) -> list[str]:
    """Confine this process: /dev/null on fds 0-2, every descriptor above `keep_fd` closed, rlimits, the seccomp
    filter (RuntimeError where the kernel takes it but it could not be installed), and last the audit hook (which
    would refuse the calls before it). Returns the list the audit hook appends every refused event to."""
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    _close_fds_above(keep_fd)
    _set_rlimits(policy)
    if not policy.prctl.install_seccomp() and policy.seccomp_required:
        raise RuntimeError("seccomp filter could not be installed")
    refused: list[str] = []
    sys.addaudithook(_make_audit_hook(refused, policy.eval_guard))
    return refused


def _set_rlimits(policy: Policy) -> None:
    """Memory, CPU, file size, descriptors, core dumps and processes; a limit the platform refuses is skipped."""
    import resource

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
