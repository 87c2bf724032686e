"""The exceptions the CLI reports as one line, and the boundary (`run_reported`) that turns every failure of a
command into one line on stderr and an exit code: a traceback reaches the terminal only with --debug; an
unexpected one goes to a log file whose path the line gives."""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Iterator


class SmolthinkError(Exception):
    """A user-facing error: bad input, a missing model, a bad config. The message says what to do."""


class Stopped(Exception):
    """A run that Ctrl-C or SIGTERM stopped before its end, its progress saved: the command exits 128 + the
    signal's number (130, 143), as a shell reports a process that signal ended, so a script sees it unfinished."""


# Exit codes: 2 for a SmolthinkError (bad input, like argparse's usage errors), 1 for the machine's refusals
# (I/O, memory) and for bugs.
EXIT_USAGE, EXIT_FAILURE, EXIT_INTERRUPTED = 2, 1, 130


@contextlib.contextmanager
def signals_seen() -> Iterator[list[int]]:
    """Collect the numbers of the signals delivered while the block runs, whichever Python handler took them
    (a training run installs its own for Ctrl-C / SIGTERM and removes them before the command learns it was
    stopped): the interpreter writes each one's number to the wakeup fd. The list fills when the block exits."""
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    os.set_blocking(write_fd, False)
    previous = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    seen: list[int] = []
    try:
        yield seen
    finally:
        signal.set_wakeup_fd(previous)
        with contextlib.suppress(BlockingIOError):
            seen += os.read(read_fd, 4096)
        os.close(read_fd)
        os.close(write_fd)


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name when empty), at most 300 characters."""
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]


def describe_os_error(e: OSError) -> str:
    """'No space left on device: /runs/x/metrics.jsonl' (errno text and file), else the message's first line."""
    if e.strerror and e.filename:
        return f"{e.strerror}: {e.filename}"
    return e.strerror or first_line(e)


def write_traceback_log(e: BaseException) -> Path:
    """Write the traceback of `e` to <cache root>/logs/error-<time>-<pid>.log -> its path."""
    from .models import cache_root

    path = cache_root() / "logs" / f"error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(traceback.format_exception(e)))
    return path


def run_reported(command: Callable[[], None], debug: bool = False) -> int:
    """Run a command -> its exit code: 0, 130 on Ctrl-C, 128 + signal for a Stopped run, else one line on stderr
    (`smolthink: error: ...`) with EXIT_USAGE or EXIT_FAILURE. With `debug` every traceback is printed too."""
    def say(line: str) -> None:
        print(f"smolthink: {line}", file=sys.stderr)

    try:
        with signals_seen() as seen:
            command()
        return 0
    except KeyboardInterrupt:
        say("interrupted")
        return EXIT_INTERRUPTED
    except Exception as e:
        if debug:
            traceback.print_exc()
        if isinstance(e, Stopped):
            stops = [s for s in seen if s in (signal.SIGINT, signal.SIGTERM)]
            say(f"stopped: {e}")
            return 128 + stops[-1] if stops else EXIT_FAILURE
        if isinstance(e, SmolthinkError):
            say(f"error: {e}")
            return EXIT_USAGE
        if isinstance(e, OSError):
            say(f"error: {describe_os_error(e)}")
            return EXIT_FAILURE
        if isinstance(e, MemoryError):
            say("error: out of memory (try smaller batches, shorter generations or fewer threads)")
            return EXIT_FAILURE
        where = "" if debug else f"; traceback in {_log_or_reason(e)}"
        say(f"internal error: {type(e).__name__}: {first_line(e)}{where} (please report it)")
        return EXIT_FAILURE


def _log_or_reason(e: BaseException) -> str:
    """The traceback log's path, or why it could not be written (a full or read-only disk) and how to see it."""
    try:
        return str(write_traceback_log(e))
    except OSError as err:
        return f"no log file ({describe_os_error(err)}): rerun with --debug to print it"
