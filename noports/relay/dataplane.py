"""One relay session's data plane: two listening ports, per-socket auth, FIFO pairing, the pump.

Owns (noports-protocol.md §5.1-§5.3, §5.6): binding two ephemeral ports; accepting any number of
sockets on both for the session's lifetime; checking each socket's first line (at most 4096
bytes, within the auth deadline) from its own readiness callback, never blocking the accept
path; writing
``Socket auth failed\\n`` and closing only that socket on failure; pairing authenticated sockets
FIFO per side and handing each pair, with the bytes already read after the auth lines, to the
pump (``noports._speedups.load("relaypump")``); closing the session when no pair came within the
pairing window, or after it when the last pair ends; and a drain for SIGTERM.

Not here: the atProtocol control plane, request quotas (``session.py``), the pump's internals.

Why callbacks and one deadline queue, not a task and a timer per socket: a storm of
unauthenticated sockets (R1 of reliability-checks.md: 10,000 in 60 s, thousands held open at
once) shares srvd's event loop with every live pair.  A task per socket costs a coroutine, a
future and a reader registered and removed again for every ``sock_recv`` (each slowloris byte),
a timer handle, and a raised CancelledError at its deadline; measured here, about 0.45 ms of
srvd CPU per storm socket.  Instead each listener keeps one reader registration and accepts in
batches, each socket in its auth phase keeps one reader registration until it is done, and its
deadline goes into a queue that is in deadline order by construction (every socket of a session
gets the same auth_timeout from its accept), served by one timer for the queue's head.
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
# at most this many accepts per readiness callback, so one busy port cannot starve the loop
_ACCEPT_BATCH = 64
# expired auth deadlines are served together when they fall within this many seconds of each
# other: a storm's deadlines wake the loop at most 1/_DEADLINE_SLACK times a second, and no
# socket is dropped early or more than this late
_DEADLINE_SLACK = 0.02


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


class _Unauth:
    """One socket in its auth phase: what it has sent of its first line, and its deadline."""

    __slots__ = ("buf", "conn", "deadline", "done", "fd", "side")

    def __init__(self, conn: socket.socket, side: str, deadline: float) -> None:
        self.conn = conn
        self.fd = conn.fileno()
        self.side = side
        self.buf = b""
        self.deadline = deadline
        self.done = False


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
        self._listening: dict[int, socket.socket] = {}     # fd -> listener with a reader
        self._backoffs: dict[int, asyncio.TimerHandle] = {}     # fd -> resume after EMFILE
        self._unauth_socks: dict[int, _Unauth] = {}       # fd -> socket in its auth phase
        self._deadlines: deque[_Unauth] = deque()         # deadline order; done ones skipped
        self._deadline_timer: asyncio.TimerHandle | None = None
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
            self._listen(listener, side)
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
        for handle in self._backoffs.values():
            handle.cancel()
        self._backoffs.clear()
        # the readers must be off the listeners before they close (uvloop holds the fd)
        for fd in list(self._listening):
            self._loop.remove_reader(fd)
        self._listening.clear()
        for sock in self._listeners:
            sock.close()
        # sockets still in their auth phase: closed without a refusal line (session closing)
        for pending in list(self._unauth_socks.values()):
            self._auth_over(pending)
            pending.conn.close()
        self._deadlines.clear()
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
            self._deadline_timer = None
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
    def _listen(self, listener: socket.socket, side: str) -> None:
        self._listening[listener.fileno()] = listener
        self._loop.add_reader(listener.fileno(), self._on_acceptable, listener, side)

    def _on_acceptable(self, listener: socket.socket, side: str) -> None:
        for _ in range(_ACCEPT_BATCH):
            try:
                conn, _addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if listener.fileno() < 0 or self.state != "open":
                    return
                if exc.errno in _RESOURCE_ERRNOS:
                    self.stats.refuse("accept_" + (errno.errorcode.get(exc.errno, "error")).lower())
                    # back off: the condition clears as sockets close
                    fd = listener.fileno()
                    self._loop.remove_reader(fd)
                    del self._listening[fd]
                    self._backoffs[fd] = self._loop.call_later(0.1, self._resume_listening,
                                                               listener, side)
                    return
                continue   # ECONNABORTED and friends: that one connection is gone, go on
            conn.setblocking(False)
            self._admit(conn, side)

    def _resume_listening(self, listener: socket.socket, side: str) -> None:
        self._backoffs.pop(listener.fileno(), None)
        if self.state == "open" and listener.fileno() >= 0:
            self._listen(listener, side)

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
        pending = _Unauth(conn, side, self._loop.time() + self.config.auth_timeout)
        self._unauth_socks[pending.fd] = pending
        self._deadlines.append(pending)
        if self._deadline_timer is None:
            self._arm_deadline()
        # the line often arrived with the handshake: read it now, watch the socket only if not
        if not self._auth_read(pending):
            self._loop.add_reader(pending.fd, self._auth_read, pending)

    # -- authenticating --
    def _auth_read(self, pending: _Unauth) -> bool:
        """Read what the socket has of its first line; True once its auth phase is over.

        Never reads past the cap: each recv asks only for what may still belong to the line."""
        try:
            chunk = pending.conn.recv(MAX_AUTH_LINE - len(pending.buf))
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            self._auth_failed(pending, "reset")
            return True
        if not chunk:
            self._auth_failed(pending, "eof")
            return True
        nl = chunk.find(b"\n")
        if nl < 0:
            pending.buf += chunk
            if len(pending.buf) >= MAX_AUTH_LINE:
                self._auth_failed(pending, "line_too_long")
                return True
            return False
        line, head = pending.buf + chunk[:nl + 1], chunk[nl + 1:]
        self._auth_over(pending)
        try:
            self._verifier.verify(line, self._keys[pending.side])
        except RelayAuthError as exc:
            self._refuse_socket(pending.conn, pending.side, exc.reason)
            return True
        self._enqueue(pending.conn, pending.side, head)
        return True

    def _auth_failed(self, pending: _Unauth, reason: str) -> None:
        self._auth_over(pending)
        self._refuse_socket(pending.conn, pending.side, reason)

    def _auth_over(self, pending: _Unauth) -> None:
        """The socket leaves its auth phase (its deadline entry is skipped when reached)."""
        if pending.done:
            return
        pending.done = True
        if self._unauth_socks.pop(pending.fd, None) is not None:
            self._loop.remove_reader(pending.fd)
        self._unauth -= 1
        self.gate.release()

    def _arm_deadline(self) -> None:
        deadlines = self._deadlines
        while deadlines and deadlines[0].done:
            deadlines.popleft()
        self._deadline_timer = (self._loop.call_at(deadlines[0].deadline + _DEADLINE_SLACK,
                                                   self._deadlines_due)
                                if deadlines else None)

    def _deadlines_due(self) -> None:
        self._deadline_timer = None
        deadlines = self._deadlines
        now = self._loop.time()
        while deadlines and (deadlines[0].done or deadlines[0].deadline <= now):
            pending = deadlines.popleft()
            if not pending.done:
                self._auth_failed(pending, "timeout")
        self._arm_deadline()

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
