"""What both ends of a relayed tunnel share: the keys, the control socket, an end's lifecycle.

Owns: decoding the session key and IV (base64 text, as the daemon's response carries them); the
control socket's Protocol skeleton (AES-256-CTR with the session key, one long-lived state per
direction); and :class:`TunnelEnd`, the life of one end: started, open, closing,
closed-with-a-reason, its counters, its idle timer and its data connections (each one a splice
by the ``tunnelpump`` that ``noports._speedups`` selects).

Not here: opening TCP connections (``connecting.py``), what the control messages say
(``control.py``), which side does what (``client_end.py``, ``daemon_end.py``), the pump itself
(``noports/_pure/tunnelpump.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Coroutine
from dataclasses import dataclass

from noports._speedups import load as load_speedup
from noports.at.crypto import b64d
from noports.at.stream import CtrStream
from noports.errors import NoPortsError
from noports.relay.messages import AUTH_FAILED_LINE
from noports.tunnel.connecting import (
    auth_line_delivered,
    bytes_acked,
    connect_any,
    connect_tcp,
    describe,
    keepalive,
    resolve,
)

__all__ = [
    "CONNECT_TIMEOUT",
    "HEARTBEAT_GRACE",
    "IDLE_GRACE",
    "TunnelEnd",
    "TunnelEnded",
    "TunnelError",
    "TunnelStats",
    "decode_session_key",
]

log = logging.getLogger("noports.tunnel")

#: Seconds to connect to the relay and write the auth line (Atsign's srv: 10 s).
CONNECT_TIMEOUT = 10.0
#: Extra idle seconds the daemon end waits beyond the request's timeout (see DaemonEnd).
IDLE_GRACE = 5.0
#: How long a closing end lets its control socket flush before aborting it.
_CONTROL_FLUSH = 2.0
#: Bytes a data socket the relay holds unpaired surely absorbs (kernel buffers) -- a socket
#: reset after we wrote more than this, with nothing back, was more likely paired and cut.
_UNPAIRED_ABSORBS = 64 * 1024
#: How long a pairing loss waits for another, more telling end reason (the control socket).
_PAIRING_GRACE = 0.2
#: What the relay writes before closing a socket whose auth line it rejected, sans newline.
_REFUSED = AUTH_FAILED_LINE.rstrip(b"\n")
#: Seconds a peer that has shown it answers heartbeats may stay silent beyond one heartbeat
#: interval before the end gives up on it (reliability-checks.md R5: "keepalive + 5 s").
HEARTBEAT_GRACE = 5.0


class TunnelError(NoPortsError):
    """An end that cannot start: relay unreachable, local port not bindable, malformed keys."""


@dataclass(frozen=True)
class TunnelEnded:
    """Why an end closed.  ``reason`` is one short code, ``message`` says it for people.

    Codes: ``idle`` (its idle timeout passed), ``closed`` (its owner called close()),
    ``control_closed`` (the peer end or the relay ended the control channel),
    ``control_reset`` (the control socket failed), ``relay_refused`` (the relay rejected the
    control socket's auth line), ``protocol_error`` (garbage on the control channel),
    ``relay_unreachable`` (daemon end: a data socket to the relay could not be opened, so the
    pairing of later connections could no longer be trusted), ``pairing_lost`` (a data socket
    failed before it was seen to be paired -- reset inside or right after its auth line -- so
    the relay's FIFO pairing may be out of step), ``start_failed``,
    ``peer_silent`` (the peer had shown it takes part in control-channel heartbeats, then
    nothing came from it for a heartbeat interval plus HEARTBEAT_GRACE: the path through the
    relay is a black hole), ``internal_error`` (a bug: logged with its traceback).
    """

    reason: str
    message: str

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}"


@dataclass
class TunnelStats:
    """Counters of one end (data connections only; the control socket is not one)."""

    connections_total: int = 0     # client: local connections accepted; daemon: connect: lines
    connections_live: int = 0
    connections_failed: int = 0    # never carried data: relay or target unreachable, refused
    bytes_to_relay: int = 0        # plaintext bytes sent towards the relay, finished connections
    bytes_from_relay: int = 0      # plaintext bytes delivered from the relay, finished connections
    control_messages: int = 0      # client: control lines sent; daemon: control lines received


def decode_session_key(key_b64: str | None, iv_b64: str | None) -> tuple[bytes, bytes] | None:
    """The session AES-256 key and IV from their base64 text; None when encryption is off."""
    if key_b64 is None and iv_b64 is None:
        return None
    if key_b64 is None or iv_b64 is None:
        raise TunnelError("session key and IV must both be given, or neither")
    try:
        key, iv = b64d(key_b64), b64d(iv_b64)
    except (ValueError, TypeError):
        raise TunnelError("session key or IV is not base64") from None
    if len(key) != 32 or len(iv) != 16:
        raise TunnelError(f"session key must be 32 bytes and IV 16 bytes, got {len(key)} "
                          f"and {len(iv)}")
    return key, iv


def _normalize_auth_line(line: bytes | str) -> bytes:
    if isinstance(line, str):
        line = line.encode("utf-8")
    line = bytes(line)
    if not line.strip():
        raise TunnelError("empty auth line")
    return line if line.endswith(b"\n") else line + b"\n"


class ControlProtocol(asyncio.Protocol):
    """The control socket: AES-256-CTR both ways when the session is encrypted.

    Subclasses handle the plaintext (``plaintext_received``).  The first bytes received are
    held back while they could still be the relay's plain-text ``Socket auth failed`` (what it
    writes before closing a socket whose auth line it rejected); the moment they differ, they
    go through the cipher like everything after them.  A ciphertext that begins with that
    18-byte text does not happen in practice.
    """

    def __init__(self, end: TunnelEnd, send_cipher: CtrStream | None,
                 recv_cipher: CtrStream | None) -> None:
        self.end = end
        self.send_cipher = send_cipher
        self.recv_cipher = recv_cipher
        self.transport: asyncio.Transport | None = None
        self.held: bytearray | None = bytearray()   # None once the refusal check is over
        self.refused = False
        self.lost = False
        self.lost_event = asyncio.Event()
        self.last_heard = time.monotonic()   # when the last bytes came from the peer end

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.last_heard = time.monotonic()

    def send(self, plaintext: bytes) -> bool:
        """Encrypt and write one message; False if the control socket is no longer writable."""
        t = self.transport
        if t is None or self.lost or t.is_closing():
            return False
        data = self.send_cipher.update(plaintext) if self.send_cipher is not None else plaintext
        t.write(data)
        return True

    def data_received(self, data: bytes) -> None:
        if self.refused:
            return
        held = self.held
        if held is not None:
            held += data
            if _REFUSED.startswith(bytes(held[:len(_REFUSED)])):
                if len(held) >= len(_REFUSED):
                    self.refused = True
                    self.end._end("relay_refused", "the relay refused the control socket "
                                                   "(it answered 'Socket auth failed')")
                return      # still a prefix of the refusal: wait for the next bytes
            self.held = None
            data = bytes(held)
        self.last_heard = time.monotonic()
        plaintext = self.recv_cipher.update(data) if self.recv_cipher is not None else data
        self.plaintext_received(plaintext)

    def plaintext_received(self, data: bytes) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def eof_received(self) -> bool:
        self.end._control_eof()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.lost_event.set()
        if exc is not None:
            self.end._end("control_reset", f"the control socket to the relay failed: "
                                           f"{describe(exc)}")
        else:
            self.end._control_eof()


class TunnelEnd:
    """The life of one end; ClientEnd and DaemonEnd fill in what the end does.

    ``await start()`` (subclass) connects; ``await wait_closed()`` returns the TunnelEnded;
    ``await close()`` ends it now.  Ending aborts the end's live data connections: the session
    is over for both ends at once (the relay closes its pairs too when the control pair ends).
    """

    #: which peer is on the other end of the control channel (for messages)
    peer_name = "peer"

    def __init__(self, relay_host: str, relay_port: int, auth_line: bytes | str, *,
                 session_key: str | None, session_iv: str | None,
                 idle_timeout: float | None, connect_timeout: float = CONNECT_TIMEOUT,
                 max_buffer: int | None = None, max_connections: int = 1024) -> None:
        if not 0 < int(relay_port) < 65536:
            raise TunnelError(f"not a relay port: {relay_port!r}")
        self.relay_host = relay_host
        self.relay_port = int(relay_port)
        self.auth_line = _normalize_auth_line(auth_line)
        self.session_keys = decode_session_key(session_key, session_iv)
        self.idle_timeout = idle_timeout if idle_timeout and idle_timeout > 0 else None
        self.connect_timeout = connect_timeout
        self.pump = load_speedup("tunnelpump")
        self.max_buffer = max_buffer or self.pump.MAX_BUFFER
        self.max_connections = max_connections
        self.stats = TunnelStats()
        self.state = "new"                  # new -> open -> closing -> closed
        self.ended: TunnelEnded | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._relay_addr: tuple | None = None
        self._last_relay: socket.socket | None = None   # the relay socket opened last
        self._last_acked: int | None = None   # its bytes_acked once its auth line is ACKed
        self._control: ControlProtocol | None = None
        self._idle_handle: asyncio.TimerHandle | None = None
        self._watch_handle: asyncio.TimerHandle | None = None
        self._peer_limit: float | None = None     # seconds of peer silence that end the session
        self._splices: set = set()
        self._tasks: set[asyncio.Task] = set()
        self._loose: set[socket.socket] = set()   # sockets whose connection task has not run
        self._close_task: asyncio.Task | None = None
        self._closed: asyncio.Event | None = None

    # -- public surface --
    @property
    def encrypted(self) -> bool:
        return self.session_keys is not None

    @property
    def closed(self) -> bool:
        return self.state == "closed"

    @property
    def close_reason(self) -> TunnelEnded | None:
        return self.ended

    @property
    def bytes_to_relay(self) -> int:
        """Plaintext bytes sent towards the relay so far, live connections included."""
        return self.stats.bytes_to_relay + sum(s.bytes_plain_to_relay for s in self._splices)

    @property
    def bytes_from_relay(self) -> int:
        return self.stats.bytes_from_relay + sum(s.bytes_relay_to_plain for s in self._splices)

    async def wait_closed(self) -> TunnelEnded:
        if self._closed is None:
            self._closed = asyncio.Event()
        await self._closed.wait()
        return self.ended  # type: ignore[return-value]

    async def close(self, reason: str = "closed", message: str = "closed by its owner") -> None:
        """End now (idempotent); returns once every socket of this end is closed."""
        if self.state == "new":
            self.ended = self.ended or TunnelEnded(reason, message)
            if self._loop is None:          # never started: nothing to close
                self.state = "closed"
                self._set_closed()
                return
            # start() is running: it ends the end as soon as it has opened it (or fails)
            await self.wait_closed()
            return
        self._end(reason, message)
        await self.wait_closed()

    # -- for subclasses --
    async def _connect_control(self, loop: asyncio.AbstractEventLoop,
                               factory) -> ControlProtocol:
        """Resolve the relay, open the control socket (auth line first), wrap it."""
        self._loop = loop
        if self._closed is None:
            self._closed = asyncio.Event()
        where = f"{self.relay_host}:{self.relay_port}"
        try:
            addrs = await resolve(loop, self.relay_host, self.relay_port)
            sock, self._relay_addr = await connect_any(loop, addrs, self.connect_timeout)
        except OSError as exc:
            raise TunnelError(f"cannot connect to the relay at {where}: {describe(exc)}") from None
        try:
            await self._send_auth_line(sock)
        except (OSError, asyncio.TimeoutError) as exc:
            sock.close()
            raise TunnelError(f"cannot send the auth line to the relay at {where}: "
                              f"{describe(exc) or 'timed out'}") from None
        except BaseException:
            sock.close()
            raise
        keepalive(sock)
        send, recv = self._control_ciphers()
        proto = factory(self, send, recv)
        try:
            await loop.connect_accepted_socket(lambda: proto, sock=sock)
        except BaseException:
            sock.close()
            raise
        self._control = proto
        return proto

    def _control_ciphers(self):  # pragma: no cover - overridden
        raise NotImplementedError

    async def open_relay_socket(self) -> socket.socket:
        """A new data socket to the relay port that the control socket reached, auth line sent.

        Callers open relay sockets one at a time; each new one is connected only once the
        previous one's auth line (not what followed it) has been acknowledged, or 2 s have
        passed (see auth_line_delivered).  The wait comes before the connect so that it never
        counts against the relay's per-socket auth deadline."""
        family, sockaddr = self._relay_addr  # type: ignore[misc]
        await auth_line_delivered(self._last_relay, self._last_acked)
        sock = await asyncio.wait_for(connect_tcp(self._loop, family, sockaddr),
                                      self.connect_timeout)
        try:
            await self._send_auth_line(sock)
        except BaseException:
            sock.close()
            raise
        return sock

    async def _send_auth_line(self, sock: socket.socket) -> None:
        """Write the auth line on a just-connected relay socket; it becomes the one the next
        relay socket waits for."""
        base = bytes_acked(sock)
        await asyncio.wait_for(self._loop.sock_sendall(sock, self.auth_line),  # type: ignore[union-attr]
                               self.connect_timeout)
        self._last_relay = sock
        # None where TCP_INFO cannot say: then the wait is skipped, as it cannot be done right
        self._last_acked = None if base is None or base < 0 else base + len(self.auth_line)
        if self._last_acked is None:
            self._last_relay = None

    def _opened(self) -> None:
        self.state = "open"
        pending, self.ended = self.ended, None
        if pending is not None:
            # the control socket ended while start() was still running
            self._end(pending.reason, pending.message)
            return
        self._arm_idle()

    def _spawn(self, coro: Coroutine) -> asyncio.Task:
        task = self._loop.create_task(coro)  # type: ignore[union-attr]
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None and not isinstance(exc, (OSError, asyncio.TimeoutError)):
            # a bug, not a network event: say so loudly and end rather than limp on
            log.error("%s: internal error in %s", type(self).__name__, task.get_coro(),
                      exc_info=exc)
            self._end("internal_error", f"internal error: {describe(exc)}")

    def _conn_started(self) -> None:
        self.stats.connections_total += 1
        self.stats.connections_live += 1
        if self._idle_handle is not None:
            self._idle_handle.cancel()
            self._idle_handle = None

    def _conn_finished(self, failed: bool = False) -> None:
        self.stats.connections_live -= 1
        if failed:
            self.stats.connections_failed += 1
        if self.stats.connections_live == 0:
            self._arm_idle()

    def _idle_limit(self) -> float | None:
        return self.idle_timeout

    def _arm_idle(self) -> None:
        limit = self._idle_limit()
        if limit is None or self.state != "open" or self.stats.connections_live:
            return
        if self._idle_handle is not None:
            self._idle_handle.cancel()
        self._idle_handle = self._loop.call_later(limit, self._idle_fired, limit)  # type: ignore[union-attr]

    def _idle_fired(self, limit: float) -> None:
        self._idle_handle = None
        if self.stats.connections_live == 0:
            self._end("idle", f"no connections for {limit:g} s")

    def _watch_peer(self, limit: float) -> None:
        """From now on, end the session once nothing has come from the peer end over the
        control channel for ``limit`` seconds (called again to change the limit).

        Only ends that have seen the peer take part in heartbeats call this: a baseline peer
        never writes on the control channel, and its silence means nothing."""
        self._peer_limit = limit
        if self._watch_handle is None and self.state == "open":
            self._arm_watch()

    def _arm_watch(self) -> None:
        remaining = self._control.last_heard + self._peer_limit - time.monotonic()  # type: ignore[union-attr,operator]
        self._watch_handle = self._loop.call_later(max(remaining, 0.05), self._watch_fired)  # type: ignore[union-attr]

    def _watch_fired(self) -> None:
        self._watch_handle = None
        if self.state != "open" or self._control is None:
            return
        silent = time.monotonic() - self._control.last_heard
        if silent < self._peer_limit:  # type: ignore[operator]
            self._arm_watch()
            return
        self._end("peer_silent", f"nothing came from the {self.peer_name} over the control "
                                 f"channel for {silent:.1f} s although it answers heartbeats: "
                                 "the path through the relay has stopped carrying data")

    def _spawn_connection(self, coro: Coroutine, socks: tuple[socket.socket, ...],
                          on_abandon=None) -> asyncio.Task:
        """Run one data connection's coroutine, which owns ``socks`` once it calls _own().

        A task cancelled before its first step never runs its ``finally``: the done callback
        then closes the sockets it never took and counts the connection as finished."""
        for sock in socks:
            self._loose.add(sock)
        task = self._spawn(coro)

        def abandoned(_task: asyncio.Task) -> None:
            if not any(sock in self._loose for sock in socks):
                return
            for sock in socks:
                if sock in self._loose:
                    self._loose.discard(sock)
                    sock.close()
            if on_abandon is not None:
                on_abandon()
            self._conn_finished(failed=True)

        task.add_done_callback(abandoned)
        return task

    def _own(self, *socks: socket.socket) -> None:
        for sock in socks:
            self._loose.discard(sock)

    def _spawn_splice(self, plain: socket.socket, relay: socket.socket, encrypt,
                      decrypt) -> asyncio.Task:
        return self._spawn_connection(self._splice(plain, relay, encrypt, decrypt),
                                      (plain, relay))

    async def _splice(self, plain: socket.socket, relay: socket.socket, encrypt,
                      decrypt) -> None:
        """Run one data connection to its end (owns both sockets from its first step)."""
        self._own(plain, relay)
        splice = None
        try:
            try:
                splice = await self.pump.open_splice_encrypted(
                    self._loop, plain, relay, encrypt=encrypt, decrypt=decrypt,
                    max_buffer=self.max_buffer)
            except OSError as exc:
                # most likely the relay socket died already, inside or right after its auth line
                self._pairing_lost(f"a data socket failed before it could carry data "
                                   f"({describe(exc)})")
                raise
            self._splices.add(splice)
            if self.state != "open":
                splice.close()    # the end began closing while this one was being set up
            result = await splice.wait()
            self.stats.bytes_to_relay += result.bytes_plain_to_relay
            self.stats.bytes_from_relay += result.bytes_relay_to_plain
            log.debug("%s: connection ended (%s%s): %d bytes to the relay, %d from it",
                      type(self).__name__, result.how_ended,
                      f" by {result.ended_by}" if result.ended_by else "",
                      result.bytes_plain_to_relay, result.bytes_relay_to_plain)
            if (result.how_ended == "reset" and result.ended_by == "relay"
                    and result.bytes_relay_to_plain == 0
                    and result.bytes_plain_to_relay <= _UNPAIRED_ABSORBS):
                self._pairing_lost("a data socket was reset on the relay side before a single "
                                   "byte came from the relay")
        finally:
            if splice is not None:
                self._splices.discard(splice)
            self._conn_finished()

    def _pairing_lost(self, what: str) -> None:
        """A data socket failed before the relay could be seen to have paired it.

        The relay pairs data sockets FIFO by auth completion (spec §5.2), with no id: if it
        never paired this one (reset or refused inside or right after its auth line), the
        peer's socket for the same connect: line waits on the other side and would be paired
        with our *next* socket -- every later connection would reach the wrong keys, silently.
        Nothing on the wire says which happened, so the session is ended.  A reset that came
        through a real pair before any byte did (a peer that resets at once) ends it too --
        the price of not mispairing; one after more than _UNPAIRED_ABSORBS bytes went out is
        taken as a cut paired connection (so an unpaired socket then goes unnoticed)."""
        if self.state != "open":
            return
        # the relay ending the whole session resets data and control sockets at once: give the
        # control socket's reason a moment to win, so the session's end is reported as it was
        self._loop.call_later(_PAIRING_GRACE, self._end_pairing_lost, what)  # type: ignore[union-attr]

    def _end_pairing_lost(self, what: str) -> None:
        if self.state != "open":
            return
        log.warning("%s: %s; the relay may not have paired it, so the pairing of later "
                    "connections can no longer be trusted: ending the session",
                    type(self).__name__, what)
        self._end("pairing_lost", f"{what}: the relay may not have paired it, so later "
                                  "connections could be paired with the wrong peer socket")

    def _control_eof(self) -> None:
        self._end("control_closed", f"the control channel was closed: the {self.peer_name} "
                                    "ended the session, or the relay did")

    def _end(self, reason: str, message: str) -> None:
        """Begin closing (callable from any callback); the first reason given is kept."""
        if self.state in ("closing", "closed") or self._close_task is not None:
            return
        if self.state == "new":
            self.ended = TunnelEnded(reason, message)
            return
        self.ended = TunnelEnded(reason, message)
        self.state = "closing"
        log.info("%s closing: %s", type(self).__name__, self.ended)
        self._close_task = self._loop.create_task(self._shutdown())  # type: ignore[union-attr]

    async def _stop_work(self) -> None:
        """Subclass hook: stop accepting / reading new work (called first when closing)."""

    async def _shutdown(self) -> None:
        if self._idle_handle is not None:
            self._idle_handle.cancel()
            self._idle_handle = None
        if self._watch_handle is not None:
            self._watch_handle.cancel()
            self._watch_handle = None
        await self._stop_work()
        control = self._control
        graceful = self.ended is not None and self.ended.reason in ("idle", "closed")
        if control is not None and control.transport is not None and not control.lost:
            if graceful:
                control.transport.close()    # what is queued (connect lines) goes first, then FIN
            else:
                control.transport.abort()
        for splice in list(self._splices):
            splice.close()
        current = asyncio.current_task()
        tasks = [t for t in self._tasks if t is not current]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for sock in list(self._loose):
            sock.close()
        self._loose.clear()
        if control is not None and not control.lost:
            try:
                await asyncio.wait_for(control.lost_event.wait(), _CONTROL_FLUSH)
            except asyncio.TimeoutError:
                control.transport.abort()  # type: ignore[union-attr]
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(control.lost_event.wait(), 1.0)
        self.state = "closed"
        self._set_closed()

    def _set_closed(self) -> None:
        if self._closed is None:
            self._closed = asyncio.Event()
        self._closed.set()

    async def _fail_start(self, exc: BaseException) -> None:
        """start() went wrong: close whatever was opened; the caller re-raises."""
        message = describe(exc)
        if self._control is None:
            self.state = "closed"
            self.ended = TunnelEnded("start_failed", message)
            self._set_closed()
            return
        self.state = "open"
        self.ended = None
        self._end("start_failed", message)
        if self._close_task is not None:
            await asyncio.shield(self._close_task)
