"""One relay session's data plane: two listening ports, per-socket auth, FIFO pairing, the pump.

Owns (noports-protocol.md §5.1-§5.3, §5.6): binding two ephemeral ports; accepting any number of
sockets on both for the session's lifetime; checking each socket's first line (at most 4096
bytes, within the auth deadline) in its own task, never in the accept loop; writing
``Socket auth failed\\n`` and closing only that socket on failure; pairing authenticated sockets
FIFO per side and handing each pair, with the bytes already read after the auth lines, to the
pump (``noports._speedups.load("relaypump")``); closing the session when no pair came within the
pairing window, or after it when the last pair ends; and a drain for SIGTERM.

Not here: the atProtocol control plane, request quotas (``session.py``), the pump's internals.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

from noports._speedups import load as load_speedup
from noports.relay.messages import (
    AUTH_FAILED_LINE,
    MAX_AUTH_LINE,
    AuthVerifier,
    RelayAuthError,
    RelayRequest,
)
from noports.relay.stats import RelayStats

__all__ = ["DataPlaneConfig", "RelaySession", "UnauthGate"]

log = logging.getLogger("noports.relay")

# accept() errors that mean "out of some resource": back off instead of spinning
_RESOURCE_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


@dataclass
class DataPlaneConfig:
    """Knobs of the data plane; the defaults are the production values."""

    bind_host: str = "0.0.0.0"         # Atsign's srvd binds all IPv4 interfaces
    auth_timeout: float = 5.0          # per socket, from accept to a verified auth line
    pairing_timeout: float = 30.0      # no pair by then: the session closes
    max_buffer: int = 4 * 1024 * 1024  # per direction of a pair
    max_unauth_per_session: int = 256  # sockets in their auth phase, per session
    backlog: int = 1024


class UnauthGate:
    """The process-wide cap on sockets in their auth phase, so a storm cannot exhaust FDs."""

    def __init__(self, limit: int = 8192, stats: RelayStats | None = None) -> None:
        self.limit = limit
        self.count = 0
        self.stats = stats

    def try_acquire(self) -> bool:
        if self.count >= self.limit:
            return False
        self.count += 1
        if self.stats is not None:
            self.stats.unauth_sockets += 1
        return True

    def release(self) -> None:
        self.count -= 1
        if self.stats is not None:
            self.stats.unauth_sockets -= 1


class _AuthFailure(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _bind_listener(host: str, backlog: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        # as asyncio's create_server does: the port can be bound again at once after the
        # session, even while its closed connections sit in TIME_WAIT (they inherit the flag)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, 0))
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


class RelaySession:
    """The data plane of one session.  ``await start()`` binds the ports; ``close()`` ends it.

    ``public_key_a``/``public_key_b`` are the sides' ``public:publickey@<atSign>`` keys, looked up
    when the request arrived; a side whose ``authenticate_*`` flag is false needs none and its
    sockets are paired as they come (only with ``--allow-unauthenticated``).
    """

    def __init__(self, request: RelayRequest, *, rvd_nonce: str | None,
                 public_key_a: RSAPublicKey | None = None,
                 public_key_b: RSAPublicKey | None = None,
                 config: DataPlaneConfig | None = None, stats: RelayStats | None = None,
                 gate: UnauthGate | None = None,
                 on_paired: Callable[[RelaySession], None] | None = None,
                 on_closed: Callable[[RelaySession], None] | None = None) -> None:
        self.request = request
        self.session_id = request.session_id
        self.rvd_nonce = rvd_nonce
        self.config = config or DataPlaneConfig()
        self.stats = stats or RelayStats()
        self.gate = gate or UnauthGate(stats=self.stats)
        self._on_paired = on_paired
        self._on_closed = on_closed
        self._keys = {"a": public_key_a if request.authenticate_a else None,
                      "b": public_key_b if request.authenticate_b else None}
        for side, must in (("a", request.authenticate_a), ("b", request.authenticate_b)):
            if must and (self._keys[side] is None or rvd_nonce is None
                         or request.client_nonce is None):
                raise ValueError(f"side {side} authenticates but has no public key or nonce")
        self._verifier = (AuthVerifier(request.session_id, request.client_nonce, rvd_nonce)
                          if rvd_nonce is not None and request.client_nonce is not None else None)
        self._pump = load_speedup("relaypump")
        self.port_a = 0
        self.port_b = 0
        self.state = "new"                 # new -> open -> closing -> closed
        self.close_reason = ""
        self.opened_at = 0.0
        self.first_paired_at: float | None = None
        self.pairs_total = 0
        self.auth_failures = 0
        self.bytes_a_to_b = 0              # finished pairs only; see bytes_relayed
        self.bytes_b_to_a = 0
        self._listeners: list[socket.socket] = []
        self._accept_tasks: list[asyncio.Task] = []
        self._auth_tasks: set[asyncio.Task] = set()
        self._pair_tasks: set[asyncio.Task] = set()
        self._splices: set = set()
        self._queues: dict[str, deque[tuple[socket.socket, bytes]]] = {"a": deque(), "b": deque()}
        self._unauth = 0
        self._watched: dict[int, socket.socket] = {}
        self._window_over = False
        self._aborting = False
        self._timer: asyncio.TimerHandle | None = None
        self._close_task: asyncio.Task | None = None
        self._closed = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- public surface --
    @property
    def live_pairs(self) -> int:
        return len(self._pair_tasks)

    @property
    def paired(self) -> bool:
        return self.first_paired_at is not None

    @property
    def window_over(self) -> bool:
        """The pairing window has passed (from now on the session ends with its last pair)."""
        return self._window_over

    def splices(self) -> list:
        """The live pairs' Splice objects (byte counts, buffered bytes)."""
        return list(self._splices)

    @property
    def bytes_relayed(self) -> int:
        """Bytes relayed so far, both directions, live pairs included."""
        live = sum(s.bytes_a_to_b + s.bytes_b_to_a for s in self._splices)
        return self.bytes_a_to_b + self.bytes_b_to_a + live

    async def start(self) -> tuple[int, int]:
        """Bind both ports, start accepting, start the pairing window; return (portA, portB)."""
        if self.state != "new":
            raise RuntimeError("session already started")
        self._loop = loop = asyncio.get_running_loop()
        try:
            for _ in ("a", "b"):
                self._listeners.append(_bind_listener(self.config.bind_host, self.config.backlog))
        except OSError:
            for sock in self._listeners:
                sock.close()
            self.state = "closed"
            self._closed.set()
            raise
        self.port_a = self._listeners[0].getsockname()[1]
        self.port_b = self._listeners[1].getsockname()[1]
        self.state = "open"
        self.opened_at = time.monotonic()
        self.stats.sessions_open += 1
        self.stats.sessions_total += 1
        for side, listener in zip(("a", "b"), self._listeners, strict=True):
            self._accept_tasks.append(loop.create_task(self._accept_loop(listener, side)))
        self._timer = loop.call_later(self.config.pairing_timeout, self._pairing_window_over)
        log.debug("session %s: ports A=%d B=%d", self.session_id, self.port_a, self.port_b)
        return self.port_a, self.port_b

    async def wait_closed(self) -> None:
        await self._closed.wait()

    @property
    def closed(self) -> bool:
        return self.state == "closed"

    async def close(self, grace: float = 0.0, reason: str = "closed") -> None:
        """Stop accepting; let live pairs run for up to ``grace`` seconds; then close everything."""
        if self.state in ("closing", "closed"):
            await self._closed.wait()
            return
        if self.state == "new":
            self.state = "closed"
            self._closed.set()
            return
        self.state = "closing"
        self.close_reason = reason
        if self._timer is not None:
            self._timer.cancel()
        for task in self._accept_tasks:
            task.cancel()
        # the accept tasks must be off the listeners before they close (uvloop holds the fd)
        await asyncio.gather(*self._accept_tasks, return_exceptions=True)
        for sock in self._listeners:
            sock.close()
        for task in list(self._auth_tasks):
            task.cancel()
        await asyncio.gather(*self._auth_tasks, return_exceptions=True)
        for queue in self._queues.values():
            while queue:
                conn = queue.popleft()[0]
                self._unwatch(conn)
                conn.close()
        if grace > 0 and self._pair_tasks:
            await asyncio.wait(set(self._pair_tasks), timeout=grace)
        self._aborting = True
        for splice in list(self._splices):
            splice.close()
        if self._pair_tasks:
            await asyncio.gather(*self._pair_tasks, return_exceptions=True)
        self.state = "closed"
        self.stats.sessions_open -= 1
        self._log_summary()
        self._closed.set()
        if self._on_closed is not None:
            self._on_closed(self)

    # -- accepting --
    async def _accept_loop(self, listener: socket.socket, side: str) -> None:
        loop = self._loop
        while True:
            try:
                conn, _addr = await loop.sock_accept(listener)
            except OSError as exc:
                if listener.fileno() < 0:
                    return
                if exc.errno in _RESOURCE_ERRNOS:
                    self.stats.refuse("accept_" + (errno.errorcode.get(exc.errno, "error")).lower())
                    await asyncio.sleep(0.1)   # back off: the condition clears as sockets close
                continue   # ECONNABORTED and friends: that one connection is gone, go on
            self._admit(conn, side)

    def _admit(self, conn: socket.socket, side: str) -> None:
        if self.state != "open":
            conn.close()
            self.stats.refuse("session_closed")
            return
        if self._keys[side] is None:
            self._enqueue(conn, side, b"")
            return
        if self._unauth >= self.config.max_unauth_per_session or not self.gate.try_acquire():
            conn.close()
            self.stats.refuse("unauth_cap")
            return
        self._unauth += 1
        task = self._loop.create_task(self._authenticate(conn, side))
        self._auth_tasks.add(task)
        task.add_done_callback(self._auth_tasks.discard)

    # -- authenticating --
    async def _authenticate(self, conn: socket.socket, side: str) -> None:
        task = asyncio.current_task()
        expired = False

        def expire() -> None:
            nonlocal expired
            expired = True
            task.cancel()

        deadline = self._loop.call_later(self.config.auth_timeout, expire)
        try:
            try:
                line, head = await self._read_line(conn)
                self._verifier.verify(line, self._keys[side])
            except asyncio.CancelledError:
                if not expired:
                    conn.close()   # the session is closing
                    raise
                if hasattr(task, "uncancel"):
                    task.uncancel()
                raise _AuthFailure("timeout") from None
        except (_AuthFailure, RelayAuthError) as exc:
            self._refuse_socket(conn, side, exc.reason)
            return
        except OSError:
            self._refuse_socket(conn, side, "reset")
            return
        finally:
            deadline.cancel()
            self._unauth -= 1
            self.gate.release()
        self._enqueue(conn, side, head)

    async def _read_line(self, conn: socket.socket) -> tuple[bytes, bytes]:
        """The first line (newline included, at most MAX_AUTH_LINE bytes) and what followed it.

        Never reads past the cap: each recv asks only for what may still belong to the line."""
        buf = bytearray()
        while True:
            chunk = await self._loop.sock_recv(conn, MAX_AUTH_LINE - len(buf))
            if not chunk:
                raise _AuthFailure("eof")
            nl = chunk.find(b"\n")
            if nl >= 0:
                buf += chunk[:nl + 1]
                return bytes(buf), chunk[nl + 1:]
            buf += chunk
            if len(buf) >= MAX_AUTH_LINE:
                raise _AuthFailure("line_too_long")

    def _refuse_socket(self, conn: socket.socket, side: str, reason: str) -> None:
        self.auth_failures += 1
        self.stats.auth_failed(reason)
        log.debug("session %s: side %s socket refused: %s", self.session_id, side, reason)
        with contextlib.suppress(OSError):
            conn.send(AUTH_FAILED_LINE)
        conn.close()

    # -- pairing --
    def queued(self, side: str) -> int:
        """Authenticated sockets of ``side`` ("a" or "b") waiting for a partner."""
        return len(self._queues[side])

    def _enqueue(self, conn: socket.socket, side: str, head: bytes) -> None:
        if self.state != "open":
            conn.close()
            return
        self._queues[side].append((conn, head))
        queues = self._queues
        if not (queues["a"] and queues["b"]):
            self._watch(conn, side)
            return
        while queues["a"] and queues["b"]:
            sock_a, head_a = queues["a"].popleft()
            sock_b, head_b = queues["b"].popleft()
            self._unwatch(sock_a)
            self._unwatch(sock_b)
            self.pairs_total += 1
            self.stats.pairs_total += 1
            if self.first_paired_at is None:
                self.first_paired_at = time.monotonic()
                if self._on_paired is not None:
                    self._on_paired(self)
            task = self._loop.create_task(self._run_pair(sock_a, head_a, sock_b, head_b))
            self._pair_tasks.add(task)

    def _watch(self, conn: socket.socket, side: str) -> None:
        # A queued socket that is reset would otherwise hold its FD (and a place in the FIFO)
        # until the session ends: watch it until it pairs.
        fd = conn.fileno()
        self._watched[fd] = conn
        self._loop.add_reader(fd, self._check_queued, conn, side)

    def _unwatch(self, conn: socket.socket) -> None:
        fd = conn.fileno()
        if self._watched.pop(fd, None) is not None:
            self._loop.remove_reader(fd)

    def _check_queued(self, conn: socket.socket, side: str) -> None:
        try:
            conn.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            # reset: drop it from the queue so it neither leaks nor mispairs a later socket
            self._unwatch(conn)
            queue = self._queues[side]
            for i, (queued, _head) in enumerate(queue):
                if queued is conn:
                    del queue[i]
                    break
            conn.close()
            self.stats.refuse("reset_while_queued")
            return
        # data or a FIN: both belong to the pair-to-be; stop watching (the pump will see them)
        self._unwatch(conn)

    async def _run_pair(self, sock_a: socket.socket, head_a: bytes, sock_b: socket.socket,
                        head_b: bytes) -> None:
        splice = None
        try:
            splice = await self._pump.open_splice(self._loop, sock_a, sock_b, head_a=head_a,
                                                  head_b=head_b, max_buffer=self.config.max_buffer)
            self._splices.add(splice)
            if self._aborting:
                splice.close()   # close() aborted the others while this one was being set up
            result = await splice.wait()
            self.bytes_a_to_b += result.bytes_a_to_b
            self.bytes_b_to_a += result.bytes_b_to_a
            self.stats.bytes_relayed += result.bytes_a_to_b + result.bytes_b_to_a
        finally:
            if splice is not None:
                self._splices.discard(splice)
            self._pair_tasks.discard(asyncio.current_task())
            if self._window_over and not self._pair_tasks and self.state == "open":
                self._close_soon("ended")

    def _pairing_window_over(self) -> None:
        self._window_over = True
        if not self._pair_tasks:
            self._close_soon("ended" if self.paired else "unpaired")

    def _close_soon(self, reason: str) -> None:
        if self._close_task is None:
            self._close_task = self._loop.create_task(self.close(reason=reason))

    def _log_summary(self) -> None:
        now = time.monotonic()
        paired = ("never paired" if self.first_paired_at is None
                  else f"first pair after {self.first_paired_at - self.opened_at:.3f}s")
        log.info("relay session %s %s: A %s port %d, B %s port %d, %s, pairs %d, "
                 "bytes A->B %d B->A %d, auth failures %d, duration %.3fs",
                 self.session_id, self.close_reason, self.request.atsign_a, self.port_a,
                 self.request.atsign_b, self.port_b, paired, self.pairs_total,
                 self.bytes_a_to_b, self.bytes_b_to_a, self.auth_failures, now - self.opened_at)
