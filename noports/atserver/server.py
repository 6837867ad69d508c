"""The embedded atServer's network layer: TLS listeners, one asyncio Protocol per connection,
group commit, periodic jobs.

Owns the wire shape of replies (spec atprotocol.md §2.2, §9): ``@`` on accept, one write per
reply with its prompt (``@`` / ``@me@``, none at all on a connection that issued ``monitor`` --
§7.6: atsdk loses the line after a prompt there), ``error:`` shapes, AT0005/AT0012/AT0011 closes,
and the connection limits (line cap, per-atSign connection cap, idle timeout of unauthenticated
connections, TLS handshake timeout, bounded write buffers).

Group commit (durability without a per-command fsync): every command that arrives in one
event-loop turn runs against the open SQLite transaction and queues its reply in
:class:`Batcher`; the batcher runs on the next turn, COMMITs once, and only then writes the
replies and monitor pushes.  So no client ever sees ``data:<commitId>`` / ``data:<id>`` for
something that a SIGKILL could still lose.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import sqlite3

from noports.at.responses import LineReader, encode_data, encode_error
from noports.atserver.keystore import Reply, VerbError
from noports.atserver.store import Store
from noports.atserver.verbs import AtServerCore, HostedAtSign, Session
from noports.errors import AtProtocolError, LineTooLongError

__all__ = ["AtSignConnection", "Batcher", "ConnectionLimits"]

log = logging.getLogger("noports.atserver.server")

class _Fault:
    """Queued in place of a line when the byte stream itself was bad."""

    __slots__ = ("exc",)

    def __init__(self, exc: AtProtocolError) -> None:
        self.exc = exc


# Seconds a closing connection may take to flush its last reply and finish TLS shutdown.
CLOSE_GRACE = 1.0
# Dart writes this exact line (no prompt) and closes when the inbound pool is full (spec §2.2).
AT0012_REPLY = b"error:AT0012-Inbound connection limit exceeded\n"


class ConnectionLimits:
    """Per-connection limits (command-line flags)."""

    def __init__(self, *, max_line: int = 10_240_000, max_connections: int = 200,
                 unauth_idle_timeout: float = 600.0, write_buffer_high: int = 1 << 20,
                 monitor_buffer_max: int = 64 << 20) -> None:
        self.max_line = max_line
        self.max_connections = max_connections
        self.unauth_idle_timeout = unauth_idle_timeout
        # Above this many buffered outgoing bytes we stop reading from the client (a client
        # that does not read its replies cannot make us buffer without bound).
        self.write_buffer_high = write_buffer_high
        # A monitor connection that falls this far behind is dropped (it replays on reconnect).
        self.monitor_buffer_max = monitor_buffer_max


class Batcher:
    """Group commit: COMMIT once per event-loop turn, then write every queued reply."""

    def __init__(self, loop: asyncio.AbstractEventLoop, store: Store) -> None:
        self.loop = loop
        self.store = store
        self.pending: dict[AtSignConnection, list[bytes]] = {}
        self.scheduled = False
        self.commits = 0

    def out(self, conn: AtSignConnection, data: bytes) -> None:
        chunks = self.pending.get(conn)
        if chunks is None:
            self.pending[conn] = [data]
        else:
            chunks.append(data)
        if not self.scheduled:
            self.scheduled = True
            self.loop.call_soon(self.flush)

    def schedule(self) -> None:
        """Make sure a commit happens soon (for writes made outside any connection)."""
        if not self.scheduled:
            self.scheduled = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        self.scheduled = False
        pending, self.pending = self.pending, {}
        try:
            if self.store.in_transaction:
                self.store.commit()
                self.commits += 1
        except sqlite3.Error:
            log.exception("commit failed; answering AT0002 and closing the affected connections")
            try:
                self.store.rollback()
            except sqlite3.Error:
                log.exception("rollback failed")
            for conn in pending:
                conn.fail_storage()
            return
        for conn, chunks in pending.items():
            conn.write_out(chunks)


def close_soon(loop: asyncio.AbstractEventLoop, transport) -> None:
    """Close after the buffered writes, but never wait long for a peer that does not read or
    does not answer the TLS close_notify: abort after ``CLOSE_GRACE`` seconds."""
    transport.close()
    loop.call_later(CLOSE_GRACE, _abort, transport)


def _abort(transport) -> None:
    try:
        transport.abort()
    except (RuntimeError, AttributeError, OSError):
        pass


class AtSignConnection(asyncio.Protocol):
    """One client connection to one hosted atSign's port."""

    def __init__(self, core: AtServerCore, hosted: HostedAtSign, batcher: Batcher,
                 limits: ConnectionLimits, registry: set) -> None:
        self.core = core
        self.hosted = hosted
        self.batcher = batcher
        self.limits = limits
        self.registry = registry
        self.transport: asyncio.Transport | None = None
        self.reader = LineReader(limits.max_line)
        self.queue: collections.deque = collections.deque()
        self.session: Session | None = None
        self.busy = False            # a delayed reply (noop, login throttle) is pending
        self.closing = False         # no more commands; close after the queued writes
        self.close_after_flush = False
        self.write_paused = False
        self.reading = True
        # Reply bytes queued in the batcher and not yet handed to the transport.
        self.backlog = 0
        self.counted = False
        self.last_active = 0.0
        self._delayed: asyncio.TimerHandle | None = None
        self.loop = batcher.loop

    # -- asyncio callbacks --------------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        if self.hosted.connections >= self.limits.max_connections:
            log.warning("%s: connection limit %d reached, refusing a connection",
                        self.hosted.atsign, self.limits.max_connections)
            transport.write(AT0012_REPLY)
            self.closing = True
            close_soon(self.loop, transport)
            return
        self.hosted.connections += 1
        self.counted = True
        self.registry.add(self)
        peer = transport.get_extra_info("peername")
        self.session = Session(atsign=self.hosted.atsign,
                               peer=str(peer[0]) if isinstance(peer, tuple) else "")
        self.session.sink = self
        transport.set_write_buffer_limits(high=self.limits.write_buffer_high)
        self.last_active = self.loop.time()
        transport.write(b"@")

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        if self.closing or reader is None:
            return
        try:
            lines = reader.feed(data)
        except AtProtocolError as exc:
            lines, fault = (), exc
        else:
            fault = reader.error          # good lines first, the fault after them
        if lines:
            self.last_active = self.loop.time()
            self.queue.extend(lines)
        if fault is not None:
            # Over-long line (AT0005) or invalid UTF-8 (AT0003): answered after whatever is
            # already queued, then close; read nothing more.
            self.reader = None
            self.queue.append(_Fault(fault))
        self._process()

    def eof_received(self):
        return None      # close; TLS has no half-close

    def connection_lost(self, exc) -> None:
        self.closing = True
        self.queue.clear()
        if self._delayed is not None:
            self._delayed.cancel()
            self._delayed = None
        if self.counted:
            self.hosted.connections -= 1
            self.counted = False
        self.registry.discard(self)
        if self.session is not None:
            self.core.close_session(self.session)

    def _set_reading(self, on: bool) -> None:
        if on == self.reading or self.transport is None:
            return
        self.reading = on
        try:
            if on:
                self.transport.resume_reading()
            else:
                self.transport.pause_reading()
        except (RuntimeError, AttributeError):
            pass

    def pause_writing(self) -> None:
        self.write_paused = True
        self._set_reading(False)

    def resume_writing(self) -> None:
        self.write_paused = False
        self._process()

    # -- command processing -------------------------------------------------------------------

    def _process(self) -> None:
        """Run queued commands strictly in order until one must wait."""
        core = self.core
        session = self.session
        high = self.limits.write_buffer_high
        while (self.queue and not self.busy and not self.closing and not self.write_paused
               and self.backlog < high):
            line = self.queue.popleft()
            if line.__class__ is _Fault:
                exc = line.exc
                if isinstance(exc, LineTooLongError):
                    err = VerbError("AT0005", "Buffer limit exceeded", close=True)
                else:
                    err = VerbError(exc.code or "AT0003", str(exc), close=True)
                self._emit(Reply(error=err, close=True))
                return
            try:
                reply = core.handle(session, line)
            except sqlite3.Error:
                log.exception("%s: storage error", self.hosted.atsign)
                reply = Reply(error=VerbError("AT0002", "DataStore exception"), close=True)
            except Exception:     # a bug must cost one connection, never the server
                log.exception("%s: internal error on a command", self.hosted.atsign)
                reply = Reply(error=VerbError("AT0011", "Internal server exception"), close=True)
            if reply.delay > 0:
                self.busy = True
                self._delayed = self.loop.call_later(reply.delay, self._after_delay, reply)
                break
            self._emit(reply)
        # Back-pressure: while commands wait (delayed reply, unread replies piling up), read
        # no more from this client; at most one read's worth of lines is ever queued.
        self._set_reading(not self.queue and self.reader is not None and not self.closing
                          and not self.write_paused)

    def _after_delay(self, reply: Reply) -> None:
        self._delayed = None
        self.busy = False
        if self.transport is None or self.transport.is_closing():
            return
        self._emit(reply)
        self._process()

    def prompt(self) -> str:
        s = self.session
        if s.monitor is not None:
            return ""            # spec §7.6: no prompt on monitor connections
        return f"{s.atsign}@" if s.authenticated else "@"

    def _emit(self, reply: Reply) -> None:
        s = self.session
        err = reply.error
        if reply.silent:
            data = b""
        elif err is not None:
            data = self.error_bytes(err)
        else:
            data = encode_data(reply.data, self.prompt())
        if reply.close or (err is not None and err.close):
            self.closing = True
            self.close_after_flush = True
            self.queue.clear()
        if err is not None and err.code not in ("AT0015",):
            log.debug("%s %s: %s %s", s.atsign, s.peer, err.code, err.message)
        self.backlog += len(data)
        self.batcher.out(self, data)

    def error_bytes(self, err: VerbError) -> bytes:
        s = self.session
        prompt = self.prompt()
        if err.colon_form:
            return f"error:{err.code}:{err.message}\n{prompt}".encode()
        return encode_error(err.code, err.message, prompt, json_form=s.json_errors,
                            authenticated=s.authenticated)

    # -- output -------------------------------------------------------------------------------

    def push(self, data: bytes) -> None:
        """A monitor notification line (called by the hub inside the current batch)."""
        t = self.transport
        if self.closing or t is None or t.is_closing():
            return
        if t.get_write_buffer_size() > self.limits.monitor_buffer_max:
            log.warning("%s: monitor connection %s is too far behind; dropping it",
                        self.hosted.atsign, self.session.peer)
            self.closing = True
            t.abort()
            return
        self.backlog += len(data)
        self.batcher.out(self, data)

    def write_out(self, chunks: list[bytes]) -> None:
        t = self.transport
        self.backlog = 0
        if t is None or t.is_closing():
            return
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        if data:
            t.write(data)
        if self.close_after_flush:
            close_soon(self.loop, t)
        elif self.queue and not self.busy and not self.write_paused:
            self.loop.call_soon(self._process)     # it stopped on the backlog: go on

    def fail_storage(self) -> None:
        t = self.transport
        if t is None or t.is_closing():
            return
        self.closing = True
        t.write(encode_error("AT0002", "DataStore exception", self.prompt()))
        close_soon(self.loop, t)

    def idle_close(self) -> None:
        log.info("%s: closing idle unauthenticated connection from %s", self.hosted.atsign,
                 self.session.peer)
        self.closing = True
        if self.transport is not None:
            close_soon(self.loop, self.transport)
