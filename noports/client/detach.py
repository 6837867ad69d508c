"""``npt -x``: run the session in a detached background process and hand the port back.

Owns the split between the process the user started (the *parent*, which prints the local port
alone on the last line of stdout and exits with the session's set-up status) and the *runner*,
which sets the session up, keeps the tunnel running until its idle timeout, and outlives the
parent.

How: the parent forks at once, before any event loop, thread or socket exists (so the fork is
safe, and costs a millisecond instead of a second interpreter start).  The runner starts a new
session (``setsid``: no controlling terminal, no SIGHUP or Ctrl-C from it), reads stdin from
/dev/null, and writes its progress lines into a pipe that the parent copies to its own stderr.
When the tunnel is up (or set-up failed) the runner writes one line on a second pipe --
``ready <port> <pid>`` or ``failed <code>`` -- and points its stdout/stderr at /dev/null, so the
parent (and anything reading the parent's pipes, such as a script's ``$(npt -x ...)``) sees EOF
at once.  Nothing secret crosses: no argv, no environment, nothing but those lines.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import time
from collections.abc import Callable

__all__ = ["Handoff", "run_detached"]

#: After the result line, how long the parent keeps copying the runner's last progress lines.
_DRAIN = 2.0
#: After Ctrl-C in the parent, how long it waits for the runner to report having stopped.
_INTERRUPT_WAIT = 5.0


class Handoff:
    """The runner's end: tell the parent the outcome, once, then let go of its pipes."""

    def __init__(self, result_fd: int, null_fd: int) -> None:
        self._fd: int | None = result_fd
        self._null = null_fd

    @property
    def done(self) -> bool:
        return self._fd is None

    def ready(self, port: int) -> None:
        """The tunnel is up.  BrokenPipeError if the parent is gone (nobody got the port)."""
        self._send(f"ready {port} {os.getpid()}\n")

    def failed(self, code: int) -> None:
        with contextlib.suppress(OSError):
            self._send(f"failed {int(code)}\n")

    def _send(self, line: str) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            os.write(fd, line.encode())
        finally:
            os.close(fd)
            # From now on nobody is listening: stdout/stderr go nowhere, which also closes
            # the parent's copy pipe.
            os.dup2(self._null, 1)
            os.dup2(self._null, 2)


def run_detached(runner: Callable[[Handoff], int], *, quiet: bool = False) -> int:
    """Fork; the child runs ``runner(handoff)`` in a new session; the parent waits for the
    hand-off, prints the port (stdout) and returns the exit status to use."""
    r_res, w_res = os.pipe()
    r_log, w_log = os.pipe()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    pid = os.fork()
    if pid == 0:                                       # the runner
        code = 1
        try:
            os.setsid()
            os.close(r_res)
            os.close(r_log)
            null = os.open(os.devnull, os.O_RDWR)
            os.dup2(null, 0)
            os.dup2(w_log, 1)
            os.dup2(w_log, 2)
            os.close(w_log)
            handoff = Handoff(w_res, null)
            try:
                code = runner(handoff)
            finally:
                if not handoff.done:
                    handoff.failed(code if code else 1)
        except BaseException:
            code = 1
        finally:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            os._exit(code)
    os.close(w_res)
    os.close(w_log)
    return _parent(pid, r_res, r_log, quiet)


def _parent(pid: int, r_res: int, r_log: int, quiet: bool) -> int:
    result = bytearray()
    open_fds = {r_res, r_log}
    deadline: float | None = None
    interrupted = False
    err = getattr(sys.stderr, "buffer", None)
    while open_fds:
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            readable, _, _ = select.select(list(open_fds), [], [], timeout)
        except KeyboardInterrupt:
            # the runner is in its own session: Ctrl-C reached only us; pass it on
            interrupted = True
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + _INTERRUPT_WAIT
            continue
        if not readable:
            break                                       # drain or interrupt window over
        for fd in readable:
            data = os.read(fd, 65536)
            if not data:
                open_fds.discard(fd)
                os.close(fd)
                if fd == r_res and deadline is None:
                    deadline = time.monotonic() + _DRAIN
                continue
            if fd == r_res:
                result += data
            elif err is not None:
                with contextlib.suppress(OSError):
                    err.write(data)
                    err.flush()
    for fd in open_fds:
        os.close(fd)
    words = result.decode(errors="replace").split()
    if len(words) == 3 and words[0] == "ready":
        if not quiet:
            _say(f"npt: the tunnel runs in the background as pid {words[2]}; it ends after "
                 f"the -T idle time without connections")
        try:
            sys.stdout.write(f"{words[1]}\n")
            sys.stdout.flush()
        except (OSError, ValueError):
            # nobody can learn the port: a tunnel nobody can find must not keep running
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(words[2]), signal.SIGTERM)
            return 1
        return 0
    status = _reap(pid)
    if len(words) == 2 and words[0] == "failed" and words[1].lstrip("-").isdigit():
        return int(words[1])
    if interrupted:
        return 130
    _say(f"npt: error: the background npt process ended without reporting ({status})")
    return 1


def _reap(pid: int, wait: float = 2.0) -> str:
    """Collect the runner's exit status if it ends within ``wait`` seconds."""
    deadline = time.monotonic() + wait
    while True:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return "already reaped"
        if done:
            if os.WIFSIGNALED(status):
                return f"killed by signal {os.WTERMSIG(status)}"
            return f"exit status {os.waitstatus_to_exitcode(status)}"
        if time.monotonic() > deadline:
            return "still running"
        time.sleep(0.02)


def _say(line: str) -> None:
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
