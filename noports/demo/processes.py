"""The demo's child processes: start them, watch for their ready line, log them, stop them.

Owns: spawning ``python -m noports.<program>`` (the same code as the console scripts) in its own
session, copying each child's stdout and stderr line by line into a log file while matching the
lines the demo waits for, and stopping children (a chosen signal, then SIGKILL after a grace
period).  Also :class:`Detached`, a process that is not our child (the ``npt -x`` runner), which
can only be signalled and watched.

Why a session of their own: a Ctrl-C in the terminal then reaches only the demo, which stops the
children in order (tunnel, daemon, relay, atServer) instead of all of them at once.  So that no
child outlives a demo that was killed outright, children on Linux also ask the kernel for SIGTERM
when their parent goes (``PR_SET_PDEATHSIG``).  Nothing protocol-specific lives here.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import re
import signal
import site
import sys
import time
from pathlib import Path

__all__ = ["Child", "ChildError", "Detached", "child_env", "module_command"]

#: Lines kept per child for failure messages (everything also goes to its log file).
_KEEP_LINES = 400
_PR_SET_PDEATHSIG = 1


def _load_prctl():
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        # resolved here, in the parent: the child between fork and exec must not dlopen
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):     # pragma: no cover - exotic libc
        return None


_PRCTL = _load_prctl()


def _die_with_parent() -> None:               # runs in the child between fork and exec
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)


class ChildError(Exception):
    """A child failed to start, did not become ready, or exited; ``.tail`` = its last lines."""

    def __init__(self, message: str, tail: list[str] | None = None) -> None:
        super().__init__(message)
        self.tail = list(tail or [])


def _package_root() -> Path:
    import noports

    return Path(noports.__file__).resolve().parent.parent


def child_env() -> tuple[dict[str, str], str | None]:
    """The children's environment, and the PYTHONPATH entry added to it (None if none was).

    An installed package is found by any ``python -m``; a source checkout (the demo started
    from the repository) is found only through PYTHONPATH, whatever the children's cwd.
    """
    env = dict(os.environ)
    root = str(_package_root())
    installed = {str(Path(p).resolve()) for p in site.getsitepackages()}
    with contextlib.suppress(Exception):
        installed.add(str(Path(site.getusersitepackages()).resolve()))
    if root in installed:
        return env, None
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH")
                                else "")
    return env, root


def module_command(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


class _Watch:
    def __init__(self, pattern: re.Pattern, stream: str | None) -> None:
        self.pattern = pattern
        self.stream = stream
        self.future: asyncio.Future = asyncio.get_running_loop().create_future()

    def offer(self, stream: str, line: str) -> bool:
        if self.future.done():
            return True
        if (self.stream is None or self.stream == stream) and self.pattern.search(line):
            self.future.set_result(line)
            return True
        return False


class Child:
    """One child process; see the module docstring."""

    def __init__(self, name: str, argv: list[str], log_path: Path,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = env
        self.proc: asyncio.subprocess.Process | None = None
        self.lines: collections.deque[tuple[str, str]] = collections.deque(maxlen=_KEEP_LINES)
        self._watches: list[_Watch] = []
        self._readers: list[asyncio.Task] = []
        self._done: asyncio.Task | None = None
        self._log = None

    # -- start ----------------------------------------------------------------------------------

    async def start(self) -> Child:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "a", encoding="utf-8")  # noqa: SIM115 - closed in _read
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, env=self.env, start_new_session=True,
                preexec_fn=_die_with_parent if _PRCTL is not None else None,
                limit=1 << 20)
        except OSError as exc:
            self._log.close()
            raise ChildError(f"cannot start {self.name} ({self.argv[0]}): {exc}") from exc
        self._readers = [asyncio.ensure_future(self._read("stdout", self.proc.stdout)),
                         asyncio.ensure_future(self._read("stderr", self.proc.stderr))]
        self._done = asyncio.ensure_future(self._finish())
        return self

    async def _finish(self) -> int:
        """Exit code, once the process has exited and its output was read to the end."""
        assert self.proc is not None
        await asyncio.gather(*self._readers, return_exceptions=True)
        return await self.proc.wait()

    async def _read(self, stream: str, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                try:
                    raw = await reader.readline()
                except ValueError:             # a line over the limit: take it in pieces
                    raw = await reader.read(1 << 20)
                if not raw:
                    break
                line = raw.decode(errors="replace").rstrip("\r\n")
                self.lines.append((stream, line))
                if self._log is not None and not self._log.closed:
                    self._log.write(f"{stream}: {line}\n")
                    self._log.flush()
                self._watches = [w for w in self._watches if not w.offer(stream, line)]
        finally:
            if all(t.done() or t is asyncio.current_task() for t in self._readers) \
                    and self._log is not None:
                self._log.close()

    # -- observe --------------------------------------------------------------------------------

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.returncode

    def tail(self, n: int = 12) -> list[str]:
        return [line for _, line in list(self.lines)[-n:]]

    def stdout_lines(self) -> list[str]:
        return [line for stream, line in self.lines if stream == "stdout"]

    async def wait_line(self, regex: str, *, stream: str | None = None,
                        timeout: float = 30.0, what: str = "ready line") -> str:
        """The first line (past or future) matching ``regex``; ChildError if the child exits
        or ``timeout`` passes first."""
        assert self.proc is not None
        pattern = re.compile(regex)
        for s, line in self.lines:
            if (stream is None or s == stream) and pattern.search(line):
                return line
        watch = _Watch(pattern, stream)
        self._watches.append(watch)
        exited = asyncio.ensure_future(self._closed())
        try:
            done, _ = await asyncio.wait({watch.future, exited}, timeout=timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            exited.cancel()
        if watch.future.done():
            return watch.future.result()
        watch.future.cancel()
        if exited in done:
            raise ChildError(f"{self.name} exited with code {self.proc.returncode} before its "
                             f"{what}", self.tail())
        raise ChildError(f"no {what} from {self.name} within {timeout:g} s", self.tail())

    async def _closed(self) -> int:
        assert self._done is not None
        # shielded: a caller's timeout must not cancel the readers
        return await asyncio.shield(self._done)

    async def wait(self, timeout: float | None = None) -> int:
        return await asyncio.wait_for(self._closed(), timeout)

    # -- stop -----------------------------------------------------------------------------------

    async def stop(self, sig: int = signal.SIGTERM, grace: float = 10.0) -> tuple[int, bool]:
        """Signal the child, wait up to ``grace`` seconds, then SIGKILL it.

        Returns (exit code, whether SIGKILL was needed).  A child that already exited just
        reports its code.
        """
        if self.proc is None:
            return 0, False
        killed = False
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)
            try:
                await asyncio.wait_for(self._closed(), grace)
            except asyncio.TimeoutError:
                killed = True
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
        try:
            code = await asyncio.wait_for(self._closed(), 10.0)
        except asyncio.TimeoutError:      # pragma: no cover - a pipe held open by a grandchild
            for t in self._readers:
                t.cancel()
            code = await self.proc.wait()
        return code, killed


class Detached:
    """A process that is not our child (``npt -x``'s background runner): signal and watch."""

    def __init__(self, name: str, pid: int) -> None:
        self.name = name
        self.pid = pid

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:           # pragma: no cover - the pid was reused by another user
            return False
        # a zombie waiting for its new parent to reap it counts as gone
        with contextlib.suppress(OSError, IndexError):
            stat = Path(f"/proc/{self.pid}/stat").read_text()
            return stat.rsplit(")", 1)[1].split()[0] != "Z"
        return True

    async def wait_gone(self, timeout: float) -> bool:
        """True once the process is gone; False if it is still there after ``timeout``."""
        fd = None
        with contextlib.suppress(AttributeError, OSError):
            fd = os.pidfd_open(self.pid)
        if fd is not None:
            # the kernel tells us when it exits: no polling
            loop = asyncio.get_running_loop()
            gone = loop.create_future()
            loop.add_reader(fd, lambda: gone.done() or gone.set_result(True))
            try:
                await asyncio.wait_for(gone, timeout)
                return True
            except asyncio.TimeoutError:
                return not self.alive()
            finally:
                loop.remove_reader(fd)
                os.close(fd)
        deadline = time.monotonic() + timeout
        while self.alive():                # pragma: no cover - kernels without pidfd
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    async def stop(self, sig: int = signal.SIGTERM, grace: float = 10.0) -> bool:
        """Signal it, wait up to ``grace`` s, then SIGKILL; True if SIGKILL was needed."""
        if not self.alive():
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)
        if await self.wait_gone(grace):
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        await self.wait_gone(5.0)
        return True
