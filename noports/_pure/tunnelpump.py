"""The tunnel's encrypting pump, pure-Python twin (loaded through
``noports._speedups.load("tunnelpump")``).

Owns the splice of one *plain* socket (the user's local connection, or the daemon's connection
to its target) with one *relay* socket whose bytes are AES-256-CTR (noports-protocol.md §6):
bytes read from the plain socket are encrypted on their way to the relay, bytes read from the
relay are decrypted on their way to the plain socket; either cipher may be None (``connect:no:
encrypt``).  Same semantics as the relay's pump (``noports/_pure/relaypump.py``): FIN passed on as
FIN (half-close), a reset or a full close on one side closing the other, back-pressure with at
most ``max_buffer`` bytes buffered per direction, byte counts.  It never parses what it carries.
That lifecycle is the two pumps' shared core (``noports/_pure/pumpcore.py``); here is only how a
half reads into its pooled buffers and puts them through its cipher.

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
- Before both halves are live each parks one read (a view, which keeps its buffer out of the
  pool) and pauses; the core puts parked views through the cipher when the pair goes live.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass
from operator import attrgetter

from noports._pure.pumpcore import MAX_BUFFER, READ_SIZE, HalfCore, SpliceCore
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


class _Half(HalfCore, asyncio.BufferedProtocol):
    """One socket of the pair; what it reads is put through ``cipher`` and goes to ``peer``."""

    #: before the pair is live one read is enough: park it and wait
    park_limit = 1

    def __init__(self, pump: TunnelSplice, name: str, cipher, head: bytes) -> None:
        # parked: views (they keep their buffers out of the pool)
        super().__init__(pump, name, [memoryview(bytearray(head))] if head else [], len(head))
        self.cipher = cipher
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
            self.cur = None       # that buffer is ours until flushed: read into another
            self._park(view)      # (and the core encrypts/decrypts it on the way out)

    def connection_lost(self, exc: Exception | None) -> None:
        self.pool.clear()
        self.cur = None
        super().connection_lost(exc)


class TunnelSplice(SpliceCore[TunnelResult]):
    """A live splice of a plain socket and a relay socket.  Make it with
    :func:`open_splice_encrypted`.

    ``bytes_plain_to_relay`` / ``bytes_relay_to_plain`` count live; ``await wait()`` returns the
    TunnelResult once both sockets are closed; ``close()`` aborts both at once.
    """

    _result = TunnelResult

    def __init__(self, loop: asyncio.AbstractEventLoop, encrypt, decrypt, head_plain: bytes,
                 head_relay: bytes, max_buffer: int) -> None:
        super().__init__(loop, max_buffer)
        self.plain = _Half(self, "plain", encrypt, bytes(head_plain))
        self.relay = _Half(self, "relay", decrypt, bytes(head_relay))
        self._pair(self.plain, self.relay)

    bytes_plain_to_relay = property(attrgetter("plain.forwarded"))
    bytes_relay_to_plain = property(attrgetter("relay.forwarded"))
    buffered_plain_to_relay = property(
        SpliceCore._buffered_from_first,
        doc="Bytes read from the plain socket and not yet handed to the relay socket's kernel.")
    buffered_relay_to_plain = property(SpliceCore._buffered_from_second)


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
    await pump._connect(plain_sock, relay_sock)
    return pump


async def splice_encrypted(loop: asyncio.AbstractEventLoop, plain_sock: socket.socket,
                           relay_sock: socket.socket, *, encrypt=None, decrypt=None,
                           head_plain: bytes = b"", head_relay: bytes = b"",
                           max_buffer: int = MAX_BUFFER) -> TunnelResult:
    """Splice until both sockets are closed; cancelling aborts both."""
    pump = await open_splice_encrypted(loop, plain_sock, relay_sock, encrypt=encrypt,
                                       decrypt=decrypt, head_plain=head_plain,
                                       head_relay=head_relay, max_buffer=max_buffer)
    return await pump._wait_or_abort()
