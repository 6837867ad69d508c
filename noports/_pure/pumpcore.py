"""What the two pure-Python pumps share (``relaypump`` copies, ``tunnelpump`` runs AES-CTR).

Both splice two already-connected sockets and own them until both are closed:

- bytes both ways, a FIN passed on as a FIN (half-close) while the other direction keeps
  flowing; both FINs -> both closed ("eof");
- a reset on one side aborts the other; a plain close on one side closes the other once what is
  buffered for it has been written ("closed");
- back-pressure: the destination transport's write buffer is a direction's only queue, its
  high-water mark ``max_buffer - READ_SIZE`` pauses reading from the source, so a direction
  holds at most ``max_buffer`` bytes;
- uvloop may deliver data or EOF before ``connect_accepted_socket`` returns, or before the other
  side's transport exists: each half *parks* what it gets until both halves are live;
- byte counts per direction, and a result (the pump's frozen dataclass) once both are closed.

Here is only that lifecycle.  How a half reads (``data_received`` or
``get_buffer``/``buffer_updated``) stays in each pump: it is the hot path, and a shared hook in
it would cost every chunk a call.  The one per-chunk difference the core knows about is
``cipher``: an object with ``update_into(view, view)`` (in place) applied to parked chunks when
the pair goes live, None for the relay.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Generic, TypeVar

__all__ = ["MAX_BUFFER", "READ_SIZE", "HalfCore", "SpliceCore", "tune"]

#: Bytes buffered per direction at most (Atsign's socket_connector 2.6.0 uses 4 MiB too).
MAX_BUFFER = 4 * 1024 * 1024
#: Largest single read the event loops make (asyncio's and uvloop's transports: 256 KiB).
READ_SIZE = 256 * 1024

R = TypeVar("R")


class HalfCore:
    """One socket of the pair: the state and callbacks both pumps' halves have in common.

    Mixed in *before* ``asyncio.Protocol`` or ``asyncio.BufferedProtocol`` (which decides how
    the loop hands over bytes); the subclass adds the read callbacks and sets ``park_limit``.
    """

    #: In-place transform of a parked chunk before it goes to the peer (None: as it is).
    cipher = None
    #: Parked bytes at which reading pauses until the pair is live.
    park_limit: int

    def __init__(self, pump: SpliceCore, name: str, parked: list, parked_len: int) -> None:
        self.pump = pump
        self.name = name
        self.peer: HalfCore | None = None
        self.transport: asyncio.Transport | None = None
        self.parked = parked          # read before the pair was live, in order
        self.parked_len = parked_len
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
    def _park(self, chunk) -> None:
        """Keep a chunk read before the pair is live (cold path: only until both are wrapped)."""
        self.parked.append(chunk)
        self.parked_len += len(chunk)
        if self.parked_len >= self.park_limit:
            self._update_reading()

    def _update_reading(self) -> None:
        t = self.transport
        if t is None or t.is_closing() or self.got_eof:
            return
        want_pause = self.peer_full or (not self.pump.live
                                        and self.parked_len >= self.park_limit)
        if want_pause and not self.reading_paused:
            self.reading_paused = True
            t.pause_reading()
        elif not want_pause and self.reading_paused:
            self.reading_paused = False
            t.resume_reading()

    def _flush_parked(self) -> None:
        parked, self.parked, self.parked_len = self.parked, [], 0
        out = self.peer.transport  # type: ignore[union-attr]
        cipher = self.cipher
        for chunk in parked:
            if cipher is not None:
                cipher.update_into(chunk, chunk)
            self.forwarded += len(chunk)
            out.write(chunk)


class SpliceCore(Generic[R]):
    """The pair's lifecycle: go live, pass FINs, end on a loss, report the result.

    A subclass sets ``_result`` (its frozen dataclass, fields: bytes first->second,
    second->first, how_ended, ended_by), makes its two halves after ``__init__`` and hands them
    to :meth:`_pair`; it names the public counters (``bytes_a_to_b`` ...) itself.
    """

    _result: type[R]

    def __init__(self, loop: asyncio.AbstractEventLoop, max_buffer: int) -> None:
        if max_buffer < 2 * READ_SIZE:
            raise ValueError(f"max_buffer must be at least {2 * READ_SIZE} bytes")
        self.loop = loop
        self.max_buffer = max_buffer
        self.live = False
        self._how: str | None = None
        self._by: str | None = None
        self._done: asyncio.Future[R] = loop.create_future()

    def _pair(self, first: HalfCore, second: HalfCore) -> None:
        first.peer, second.peer = second, first
        self._first, self._second = first, second

    # -- for the subclass's public properties --
    def _buffered_from_first(self) -> int:
        """Bytes read from the first socket and not yet handed to the second's kernel socket."""
        return self._buffered(self._second, self._first)

    def _buffered_from_second(self) -> int:
        return self._buffered(self._first, self._second)

    @staticmethod
    def _buffered(dest: HalfCore, src: HalfCore) -> int:
        t = dest.transport
        size = t.get_write_buffer_size() if t is not None and not dest.lost else 0
        return size + src.parked_len

    # -- public --
    @property
    def done(self) -> bool:
        return self._done.done()

    async def wait(self) -> R:
        return await asyncio.shield(self._done)

    def close(self) -> None:
        """Abort both sockets now (unsent buffered bytes are dropped)."""
        self._end("aborted", None)
        for half in (self._first, self._second):
            if half.transport is not None and not half.lost:
                half.transport.abort()

    # -- start and run (the modules' open_splice/splice wrappers) --
    async def _connect(self, sock_first: socket.socket, sock_second: socket.socket) -> None:
        """Wrap both sockets in transports; ownership of both passes to this splice.

        A socket that cannot be wrapped (already dead) leaves the splice done at once, a reset
        by that side; a cancellation does the same and is re-raised."""
        loop = self.loop
        for sock in (sock_first, sock_second):
            tune(sock)
        for half, sock in ((self._first, sock_first), (self._second, sock_second)):
            try:
                await loop.connect_accepted_socket(lambda h=half: h, sock=sock)
            except BaseException as exc:
                # tear down everything; the splice reports a reset by that side
                self._end("reset", half.name)
                for h, s in ((self._first, sock_first), (self._second, sock_second)):
                    if h.transport is not None and not h.lost:
                        h.transport.abort()
                    elif h.transport is None:
                        s.close()
                        h.lost = True
                self._maybe_finish()
                if not isinstance(exc, Exception):
                    raise
                break

    async def _wait_or_abort(self) -> R:
        """``wait()``, aborting both sockets if the waiter is cancelled."""
        try:
            return await self.wait()
        except asyncio.CancelledError:
            self.close()
            raise

    # -- called by the halves --
    def _half_ready(self) -> None:
        first, second = self._first, self._second
        if first.transport is None or second.transport is None or self.live:
            return
        if first.lost or second.lost:
            # one side died while the other was still being wrapped: finish the survivor
            for half in (first, second):
                if not half.lost:
                    half.transport.abort()  # type: ignore[union-attr]
            return
        self.live = True
        high = self.max_buffer - READ_SIZE
        for half in (first, second):
            half.transport.set_write_buffer_limits(high=high, low=high // 4)  # type: ignore[union-attr]
        for half in (first, second):
            half._flush_parked()
        for half in (first, second):
            if half.got_eof:
                self._pass_eof(half)
            else:
                half._update_reading()

    def _pass_eof(self, half: HalfCore) -> None:
        if half.eof_passed:
            return
        half.eof_passed = True
        out = half.peer.transport  # type: ignore[union-attr]
        if not out.is_closing():
            out.write_eof()   # asyncio/uvloop send the FIN once that side's buffer has drained
        if self._first.eof_passed and self._second.eof_passed:
            self._end("eof", None)
            for h in (self._first, self._second):
                if not h.transport.is_closing():  # type: ignore[union-attr]
                    h.transport.close()  # type: ignore[union-attr]

    def _half_lost(self, half: HalfCore, exc: Exception | None) -> None:
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
        first, second = self._first, self._second
        if first.lost and second.lost and not self._done.done():
            self._done.set_result(self._result(first.forwarded, second.forwarded,
                                               self._how or "closed", self._by))


def tune(sock: socket.socket) -> None:
    """Non-blocking, TCP_NODELAY (both pumps forward small writes at once), keepalive."""
    sock.setblocking(False)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    except OSError:
        pass   # not TCP (a test's socketpair) or already dead: the transport will find out
