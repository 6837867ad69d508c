"""The tunnel's encrypting pump, pure-Python twin (loaded through
``noports._speedups.load("tunnelpump")``).

Owns the splice of one *plain* socket (the user's local connection, or the daemon's connection
to its target) with one *relay* socket whose bytes are AES-256-CTR (noports-protocol.md §6):
bytes read from the plain socket are encrypted on their way to the relay, bytes read from the
relay are decrypted on their way to the plain socket; either cipher may be None (``connect:no:
encrypt``).  Same semantics as the relay's pump (``noports/_pure/relaypump.py``): FIN passed on as
FIN (half-close), a reset or a full close on one side closing the other, back-pressure with at
most ``max_buffer`` bytes buffered per direction, byte counts.  It never parses what it carries.

API kept by the compiled twin (``_speedups/tunnelpump.pyx``, AES-CTR on its own buffers, with
VAES or OpenSSL EVP):
``new_cipher(key, iv)`` makes the cipher object *this* implementation wants (here a
:class:`~noports.at.stream.CtrStream`); ``open_splice_encrypted(...) -> TunnelSplice`` and
``splice_encrypted(...) -> TunnelResult``.  Callers make ciphers only through ``new_cipher`` of
the module they loaded, fresh per connection (keystream position 0).

Design (measured reasons in shared/spec/performance-notes.md):
- ``asyncio.BufferedProtocol``: the loop ``recv_into``s a buffer we own, we encrypt/decrypt it
  in place (``update_into(view, view)``) and hand a *view* of it to the peer transport.  No
  fresh ``bytes`` per read and no second buffer for the cipher output: two live >= 128 KiB
  fresh buffers per chunk is the glibc mmap/munmap trap that halved an encrypting relay chain.
- A transport may keep a reference to the unsent tail of what it was given (Python >= 3.12's
  selector transport, uvloop's queued writes) -- always through a memoryview of our buffer, so
  the buffer is *exported* exactly as long as someone still needs its bytes.  Each direction
  keeps a small pool and reuses a buffer only when no export is left (:func:`_viewed`).
- Read size adapts: 16 KiB to start (an idle interactive connection holds little memory), x4
  after a read that filled the buffer, up to 256 KiB (what both loops read per recv); back to
  16 KiB after 64 small reads in a row.
- Per direction, the destination transport's write buffer is the only queue; its high-water mark
  is ``max_buffer`` minus one read, so a direction never holds more than ``max_buffer`` bytes.
- uvloop starts reading before ``connect_accepted_socket`` returns and before the other side's
  transport exists: each half parks what it reads (as views, in order) until both are live.
"""

from __future__ import annotations

import asyncio
import socket
import sys
from dataclasses import dataclass

from noports.at.stream import CtrStream

__all__ = [
    "MAX_BUFFER",
    "READ_SIZE",
    "TunnelResult",
    "TunnelSplice",
    "new_cipher",
    "open_splice_encrypted",
    "splice_encrypted",
]

#: Bytes buffered per direction at most (Atsign's socket_connector 2.6.0 uses 4 MiB too).
MAX_BUFFER = 4 * 1024 * 1024
#: Largest single read (asyncio's and uvloop's own transports read 256 KiB).
READ_SIZE = 256 * 1024
#: First read size of a direction; an idle connection costs two of these.
MIN_READ_SIZE = 16 * 1024
_GROW = 4
_SMALL_READS_BEFORE_SHRINK = 64


def new_cipher(key: bytes, iv: bytes) -> CtrStream:
    """One direction's AES-256-CTR state, in the form this pump implementation takes."""
    return CtrStream(key, iv)


@dataclass(frozen=True)
class TunnelResult:
    #: plaintext bytes read from the plain socket and sent (encrypted) to the relay socket
    bytes_plain_to_relay: int
    #: bytes read from the relay socket and sent (decrypted) to the plain socket
    bytes_relay_to_plain: int
    #: "eof": both directions ended with a FIN; "reset": an error (RST, EPIPE ...) on one side;
    #: "closed": a side's socket closed without a FIN on both; "aborted": close() was called.
    how_ended: str
    #: The side whose event ended the splice ("plain" / "relay"), None for "eof" and "aborted".
    ended_by: str | None


def _new_buffer(size: int) -> bytearray:
    # one spare byte of capacity, so that _viewed() can probe with append/del without ever
    # reallocating (CPython keeps the allocation on a small shrink)
    buf = bytearray(size + 1)
    del buf[-1]
    return buf


def _viewed(buf: bytearray) -> bool:
    """True while some memoryview of ``buf`` is alive (a transport still holds unsent bytes).

    A bytearray with exports cannot be resized: appending one byte fails with BufferError.  The
    spare byte of _new_buffer makes the probe O(1) (~0.2 us)."""
    try:
        buf.append(0)
    except BufferError:
        return True
    del buf[-1]
    return False


class _Half(asyncio.BufferedProtocol):
    """One socket of the pair; what it reads is put through ``cipher`` and goes to ``peer``."""

    def __init__(self, pump: TunnelSplice, name: str, cipher, head: bytes) -> None:
        self.pump = pump
        self.name = name
        self.cipher = cipher
        self.peer: _Half | None = None
        self.transport: asyncio.Transport | None = None
        # read before the pair was live: views (they keep their buffers out of the pool)
        self.parked: list[memoryview] = [memoryview(bytearray(head))] if head else []
        self.parked_len = len(head)
        self.forwarded = 0
        self.got_eof = False
        self.eof_passed = False
        self.lost = False
        self.peer_full = False
        self.reading_paused = False
        self.size = MIN_READ_SIZE
        self.small_reads = 0
        self.pool: list[bytearray] = []
        self.pool_limit = pump.max_buffer // READ_SIZE + 2
        self.cur: bytearray | None = None

    # -- buffers --
    def _free_buffer(self) -> bytearray:
        size = self.size
        for i, buf in enumerate(self.pool):
            if not _viewed(buf):
                if len(buf) == size:
                    return buf
                del self.pool[i]          # the read size changed: let it go
                break
        buf = _new_buffer(size)
        if len(self.pool) < self.pool_limit:
            self.pool.append(buf)
        return buf   # over the limit: a one-off (only when a transport holds many of ours)

    # -- asyncio callbacks --
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.pump._half_ready()

    def get_buffer(self, sizehint: int) -> bytearray:
        buf = self.cur
        if buf is None or len(buf) != self.size or _viewed(buf):
            buf = self.cur = self._free_buffer()
        return buf

    def buffer_updated(self, nbytes: int) -> None:
        buf = self.cur
        size = len(buf)
        if nbytes == size:
            self.small_reads = 0
            if size < READ_SIZE:
                self.size = min(READ_SIZE, size * _GROW)
        elif size > MIN_READ_SIZE and nbytes < MIN_READ_SIZE:
            self.small_reads += 1
            if self.small_reads >= _SMALL_READS_BEFORE_SHRINK:
                self.small_reads = 0
                self.size = MIN_READ_SIZE
                self.pool.clear()   # buffers still viewed are freed when their views go
        view = memoryview(buf)[:nbytes] if nbytes != size else memoryview(buf)
        if self.pump.live:
            cipher = self.cipher
            if cipher is not None:
                cipher.update_into(view, view)
            self.forwarded += nbytes
            self.peer.transport.write(view)  # type: ignore[union-attr]
        else:
            self.parked.append(view)
            self.parked_len += nbytes
            self.cur = None       # that buffer is ours until flushed: read into another
            self._update_reading()

    def eof_received(self) -> bool:
        self.got_eof = True
        if self.pump.live:
            self.pump._pass_eof(self)
        return True   # keep our write side open: the other direction may still be flowing

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.pool.clear()
        self.cur = None
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
        # before the pair is live one read is enough: park it and wait
        want_pause = self.peer_full or (not self.pump.live and self.parked_len > 0)
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
        for view in parked:
            if cipher is not None:
                cipher.update_into(view, view)
            self.forwarded += len(view)
            out.write(view)


class TunnelSplice:
    """A live splice of a plain socket and a relay socket.  Make it with
    :func:`open_splice_encrypted`.

    ``bytes_plain_to_relay`` / ``bytes_relay_to_plain`` count live; ``await wait()`` returns the
    TunnelResult once both sockets are closed; ``close()`` aborts both at once.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, encrypt, decrypt, head_plain: bytes,
                 head_relay: bytes, max_buffer: int) -> None:
        if max_buffer < 2 * READ_SIZE:
            raise ValueError(f"max_buffer must be at least {2 * READ_SIZE} bytes")
        self.loop = loop
        self.max_buffer = max_buffer
        self.plain = _Half(self, "plain", encrypt, bytes(head_plain))
        self.relay = _Half(self, "relay", decrypt, bytes(head_relay))
        self.plain.peer, self.relay.peer = self.relay, self.plain
        self.live = False
        self._how: str | None = None
        self._by: str | None = None
        self._done: asyncio.Future[TunnelResult] = loop.create_future()

    @property
    def bytes_plain_to_relay(self) -> int:
        return self.plain.forwarded

    @property
    def bytes_relay_to_plain(self) -> int:
        return self.relay.forwarded

    @property
    def buffered_plain_to_relay(self) -> int:
        """Bytes read from the plain socket and not yet handed to the relay socket's kernel."""
        return self._buffered(self.relay, self.plain)

    @property
    def buffered_relay_to_plain(self) -> int:
        return self._buffered(self.plain, self.relay)

    @staticmethod
    def _buffered(dest: _Half, src: _Half) -> int:
        t = dest.transport
        size = t.get_write_buffer_size() if t is not None and not dest.lost else 0
        return size + src.parked_len

    @property
    def done(self) -> bool:
        return self._done.done()

    async def wait(self) -> TunnelResult:
        return await asyncio.shield(self._done)

    def close(self) -> None:
        """Abort both sockets now (unsent buffered bytes are dropped)."""
        self._end("aborted", None)
        for half in (self.plain, self.relay):
            if half.transport is not None and not half.lost:
                half.transport.abort()

    # -- called by the halves --
    def _half_ready(self) -> None:
        plain, relay = self.plain, self.relay
        if plain.transport is None or relay.transport is None or self.live:
            return
        if plain.lost or relay.lost:
            for half in (plain, relay):
                if not half.lost:
                    half.transport.abort()  # type: ignore[union-attr]
            return
        self.live = True
        high = self.max_buffer - READ_SIZE
        for half in (plain, relay):
            half.transport.set_write_buffer_limits(high=high, low=high // 4)  # type: ignore[union-attr]
        for half in (plain, relay):
            half._flush_parked()
        for half in (plain, relay):
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
        if self.plain.eof_passed and self.relay.eof_passed:
            self._end("eof", None)
            for h in (self.plain, self.relay):
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
        if self.plain.lost and self.relay.lost and not self._done.done():
            self._done.set_result(TunnelResult(self.plain.forwarded, self.relay.forwarded,
                                               self._how or "closed", self._by))


def _tune(sock: socket.socket) -> None:
    sock.setblocking(False)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    except OSError:
        pass   # not TCP (a test's socketpair) or already dead: the transport will find out


async def open_splice_encrypted(loop: asyncio.AbstractEventLoop, plain_sock: socket.socket,
                                relay_sock: socket.socket, *, encrypt=None, decrypt=None,
                                head_plain: bytes = b"", head_relay: bytes = b"",
                                max_buffer: int = MAX_BUFFER) -> TunnelSplice:
    """Start splicing; ownership of both sockets passes to the TunnelSplice.

    ``encrypt`` (from :func:`new_cipher`, or None) is applied to plain -> relay bytes,
    ``decrypt`` to relay -> plain bytes.  ``head_plain`` / ``head_relay`` are bytes already read
    from that socket (ciphertext for the relay's): they go through the cipher first.
    """
    pump = TunnelSplice(loop, encrypt, decrypt, head_plain, head_relay, max_buffer)
    for sock in (plain_sock, relay_sock):
        _tune(sock)
    for half, sock in ((pump.plain, plain_sock), (pump.relay, relay_sock)):
        try:
            await loop.connect_accepted_socket(lambda h=half: h, sock=sock)
        except BaseException:
            # a socket that could not be wrapped (already dead) or a cancellation: tear down
            # everything; the splice reports a reset by that side and is done at once
            pump._end("reset", half.name)
            for h, s in ((pump.plain, plain_sock), (pump.relay, relay_sock)):
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


async def splice_encrypted(loop: asyncio.AbstractEventLoop, plain_sock: socket.socket,
                           relay_sock: socket.socket, *, encrypt=None, decrypt=None,
                           head_plain: bytes = b"", head_relay: bytes = b"",
                           max_buffer: int = MAX_BUFFER) -> TunnelResult:
    """Splice until both sockets are closed; cancelling aborts both."""
    pump = await open_splice_encrypted(loop, plain_sock, relay_sock, encrypt=encrypt,
                                       decrypt=decrypt, head_plain=head_plain,
                                       head_relay=head_relay, max_buffer=max_buffer)
    try:
        return await pump.wait()
    except asyncio.CancelledError:
        pump.close()
        raise
