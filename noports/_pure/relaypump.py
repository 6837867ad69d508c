"""The relay's byte pump, pure-Python twin (loaded through ``noports._speedups.load("relaypump")``).

Owns the splice of two already-authenticated TCP sockets: bytes both ways, FIN passed on as FIN
(half-close), a reset or a full close on one side closing the other, back-pressure with bounded
buffering per direction, and byte counts for metrics.  It never parses what it carries.  The
compiled twin (issue 5) keeps this API and these semantics exactly; the same tests run on both.

Design (measured reasons in shared/spec/performance-notes.md):
- ``asyncio.Protocol`` with pause_reading/resume_reading, never streams (3-4x slower).  The loop
  reads up to 256 KiB per recv on both stock asyncio and uvloop.  Not BufferedProtocol: Python
  3.12's transport keeps a *reference* to an unsent tail, so a reused receive buffer would be
  overwritten under it.
- Per direction, the destination transport's write buffer is the only buffer; its high-water mark
  is ``max_buffer`` minus one read, so a direction never holds more than ``max_buffer`` bytes.
- uvloop may deliver data or EOF before ``connect_accepted_socket`` returns, or before the other
  side's transport exists: each half parks what it gets until both halves are live.
"""

from __future__ import annotations

import asyncio
import socket
import sys
from dataclasses import dataclass

__all__ = ["MAX_BUFFER", "READ_SIZE", "Splice", "SpliceResult", "open_splice", "splice"]

#: Bytes buffered per direction at most (Atsign's socket_connector 2.6.0 uses 4 MiB too).
MAX_BUFFER = 4 * 1024 * 1024
#: Largest single read the event loops make (asyncio's and uvloop's transports: 256 KiB).
READ_SIZE = 256 * 1024


@dataclass(frozen=True)
class SpliceResult:
    bytes_a_to_b: int
    bytes_b_to_a: int
    #: "eof": both directions ended with a FIN; "reset": an error (RST, EPIPE ...) on one side;
    #: "closed": a side's socket closed without a FIN on both; "aborted": close() was called.
    how_ended: str
    #: The side whose event ended the splice ("a" / "b"), None for "eof" and "aborted".
    ended_by: str | None


class _Half(asyncio.Protocol):
    """One socket of the pair; what it reads goes to ``peer``'s transport."""

    def __init__(self, pump: Splice, name: str, head: bytes) -> None:
        self.pump = pump
        self.name = name
        self.peer: _Half | None = None
        self.transport: asyncio.Transport | None = None
        self.parked: list[bytes] = [head] if head else []   # read before the pair was live
        self.parked_len = len(head)
        self.forwarded = 0           # bytes read from this socket and written to the peer
        self.got_eof = False         # this socket sent us a FIN
        self.eof_passed = False      # ... and we passed it on to the peer
        self.lost = False
        self.peer_full = False       # peer's write buffer is over its high-water mark
        self.reading_paused = False

    # -- asyncio callbacks --
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.pump._half_ready()

    def data_received(self, data: bytes) -> None:
        if self.pump.live:
            self.forwarded += len(data)
            self.peer.transport.write(data)  # type: ignore[union-attr]
        else:
            self.parked.append(data)
            self.parked_len += len(data)
            if self.parked_len >= self.pump.max_buffer - READ_SIZE:
                self._update_reading()

    def eof_received(self) -> bool:
        self.got_eof = True
        if self.pump.live:
            self.pump._pass_eof(self)
        return True   # keep our write side open: the other direction may still be flowing

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.pump._half_lost(self, exc)

    def pause_writing(self) -> None:
        # our transport's buffer is full: stop reading the socket that feeds it
        if self.peer is not None:
            self.peer.peer_full = True
            self.peer._update_reading()

    def resume_writing(self) -> None:
        if self.peer is not None:
            self.peer.peer_full = False
            self.peer._update_reading()

    # -- helpers --
    def _update_reading(self) -> None:
        t = self.transport
        if t is None or t.is_closing() or self.got_eof:
            return
        want_pause = self.peer_full or (not self.pump.live
                                        and self.parked_len >= self.pump.max_buffer - READ_SIZE)
        if want_pause and not self.reading_paused:
            self.reading_paused = True
            t.pause_reading()
        elif not want_pause and self.reading_paused:
            self.reading_paused = False
            t.resume_reading()

    def _flush_parked(self) -> None:
        parked, self.parked, self.parked_len = self.parked, [], 0
        out = self.peer.transport  # type: ignore[union-attr]
        for chunk in parked:
            self.forwarded += len(chunk)
            out.write(chunk)


class Splice:
    """A live splice of sockets A and B.  Make it with :func:`open_splice`.

    ``bytes_a_to_b`` / ``bytes_b_to_a`` count live; ``await wait()`` returns the SpliceResult
    once both sockets are closed; ``close()`` aborts both at once (drain deadline, shutdown).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, head_a: bytes, head_b: bytes,
                 max_buffer: int) -> None:
        if max_buffer < 2 * READ_SIZE:
            raise ValueError(f"max_buffer must be at least {2 * READ_SIZE} bytes")
        self.loop = loop
        self.max_buffer = max_buffer
        self.a = _Half(self, "a", bytes(head_a))
        self.b = _Half(self, "b", bytes(head_b))
        self.a.peer, self.b.peer = self.b, self.a
        self.live = False
        self._how: str | None = None
        self._by: str | None = None
        self._done: asyncio.Future[SpliceResult] = loop.create_future()

    @property
    def bytes_a_to_b(self) -> int:
        return self.a.forwarded

    @property
    def bytes_b_to_a(self) -> int:
        return self.b.forwarded

    @property
    def buffered_a_to_b(self) -> int:
        """Bytes read from A and not yet handed to B's kernel socket."""
        return self._buffered(self.b, self.a)

    @property
    def buffered_b_to_a(self) -> int:
        return self._buffered(self.a, self.b)

    @staticmethod
    def _buffered(dest: _Half, src: _Half) -> int:
        t = dest.transport
        size = t.get_write_buffer_size() if t is not None and not dest.lost else 0
        return size + src.parked_len

    @property
    def done(self) -> bool:
        return self._done.done()

    async def wait(self) -> SpliceResult:
        return await asyncio.shield(self._done)

    def close(self) -> None:
        """Abort both sockets now (unsent buffered bytes are dropped)."""
        self._end("aborted", None)
        for half in (self.a, self.b):
            if half.transport is not None and not half.lost:
                half.transport.abort()

    # -- called by the halves --
    def _half_ready(self) -> None:
        a, b = self.a, self.b
        if a.transport is None or b.transport is None or self.live:
            return
        if a.lost or b.lost:
            # one side died while the other was still being wrapped: finish the survivor
            for half in (a, b):
                if not half.lost:
                    half.transport.abort()  # type: ignore[union-attr]
            return
        self.live = True
        high = self.max_buffer - READ_SIZE
        for half in (a, b):
            half.transport.set_write_buffer_limits(high=high, low=high // 4)  # type: ignore[union-attr]
        for half in (a, b):
            half._flush_parked()
        for half in (a, b):
            if half.got_eof:
                self._pass_eof(half)
            else:
                half._update_reading()

    def _pass_eof(self, half: _Half) -> None:
        if half.eof_passed:
            return
        half.eof_passed = True
        out = half.peer.transport  # type: ignore[union-attr]
        if not out.is_closing():
            out.write_eof()   # asyncio/uvloop send the FIN once that side's buffer has drained
        if self.a.eof_passed and self.b.eof_passed:
            self._end("eof", None)
            for h in (self.a, self.b):
                if not h.transport.is_closing():  # type: ignore[union-attr]
                    h.transport.close()  # type: ignore[union-attr]

    def _half_lost(self, half: _Half, exc: Exception | None) -> None:
        self._end("closed" if exc is None else "reset", half.name)
        peer = half.peer
        t = peer.transport  # type: ignore[union-attr]
        if t is not None and not peer.lost:
            if exc is not None or not self.live:
                t.abort()      # an error on one side: the other gets no more data, close it now
            elif not t.is_closing():
                t.close()      # flushes what is buffered for it, then closes
        self._maybe_finish()

    def _end(self, how: str, by: str | None) -> None:
        if self._how is None:
            self._how, self._by = how, by

    def _maybe_finish(self) -> None:
        if self.a.lost and self.b.lost and not self._done.done():
            self._done.set_result(SpliceResult(self.a.forwarded, self.b.forwarded,
                                               self._how or "closed", self._by))


def _tune(sock: socket.socket) -> None:
    sock.setblocking(False)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    except OSError:
        pass   # not TCP (a test's socketpair) or already dead: the transport will find out


async def open_splice(loop: asyncio.AbstractEventLoop, sock_a: socket.socket,
                      sock_b: socket.socket, *, head_a: bytes = b"", head_b: bytes = b"",
                      max_buffer: int = MAX_BUFFER) -> Splice:
    """Start splicing two connected sockets; ownership of both passes to the Splice.

    ``head_a`` (``head_b``) are bytes already read from A (B) after its auth line: they are
    written to B (A) before anything else.
    """
    pump = Splice(loop, head_a, head_b, max_buffer)
    for sock in (sock_a, sock_b):
        _tune(sock)
    for half, sock in ((pump.a, sock_a), (pump.b, sock_b)):
        try:
            await loop.connect_accepted_socket(lambda h=half: h, sock=sock)
        except BaseException:
            # a socket that could not be wrapped (already dead) or a cancellation: tear down
            # everything; the Splice reports a reset by that side and is done at once
            pump._end("reset", half.name)
            for h, s in ((pump.a, sock_a), (pump.b, sock_b)):
                if h.transport is not None and not h.lost:
                    h.transport.abort()
                elif h.transport is None:
                    s.close()
                    h.lost = True
            pump._maybe_finish()
            if not isinstance(sys.exc_info()[1], Exception):
                raise
            break
    return pump


async def splice(loop: asyncio.AbstractEventLoop, sock_a: socket.socket, sock_b: socket.socket,
                 *, head_a: bytes = b"", head_b: bytes = b"",
                 max_buffer: int = MAX_BUFFER) -> SpliceResult:
    """Splice until both sockets are closed; cancelling aborts both."""
    pump = await open_splice(loop, sock_a, sock_b, head_a=head_a, head_b=head_b,
                             max_buffer=max_buffer)
    try:
        return await pump.wait()
    except asyncio.CancelledError:
        pump.close()
        raise
