"""The relay's byte pump, pure-Python twin (loaded through ``noports._speedups.load("relaypump")``).

Owns the splice of two already-authenticated TCP sockets: bytes both ways, FIN passed on as FIN
(half-close), a reset or a full close on one side closing the other, back-pressure with bounded
buffering per direction, and byte counts for metrics.  It never parses what it carries.  The
compiled twin (issue 5) keeps this API and these semantics exactly; the same tests run on both.

That lifecycle is shared with the encrypting pump (``noports/_pure/pumpcore.py``); here is only
how a half reads and what the API calls things.  Design (measured reasons in
shared/spec/performance-notes.md):
- ``asyncio.Protocol`` with pause_reading/resume_reading, never streams (3-4x slower).  The loop
  reads up to 256 KiB per recv on both stock asyncio and uvloop.  Not BufferedProtocol: Python
  3.12's transport keeps a *reference* to an unsent tail, so a reused receive buffer would be
  overwritten under it.
- Before both halves are live each parks what it reads (the bytes objects themselves), pausing
  at ``max_buffer`` minus one read.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass
from operator import attrgetter

from noports._pure.pumpcore import MAX_BUFFER, READ_SIZE, HalfCore, SpliceCore

__all__ = ["MAX_BUFFER", "READ_SIZE", "Splice", "SpliceResult", "open_splice", "splice"]


@dataclass(frozen=True)
class SpliceResult:
    bytes_a_to_b: int
    bytes_b_to_a: int
    #: "eof": both directions ended with a FIN; "reset": an error (RST, EPIPE ...) on one side;
    #: "closed": a side's socket closed without a FIN on both; "aborted": close() was called.
    how_ended: str
    #: The side whose event ended the splice ("a" / "b"), None for "eof" and "aborted".
    ended_by: str | None


class _Half(HalfCore, asyncio.Protocol):
    """One socket of the pair; what it reads goes to ``peer``'s transport as it is."""

    def __init__(self, pump: Splice, name: str, head: bytes) -> None:
        super().__init__(pump, name, [head] if head else [], len(head))
        self.park_limit = pump.max_buffer - READ_SIZE

    def data_received(self, data: bytes) -> None:
        if self.pump.live:
            self.forwarded += len(data)
            self.peer.transport.write(data)  # type: ignore[union-attr]
        else:
            self._park(data)


class Splice(SpliceCore[SpliceResult]):
    """A live splice of sockets A and B.  Make it with :func:`open_splice`.

    ``bytes_a_to_b`` / ``bytes_b_to_a`` count live; ``await wait()`` returns the SpliceResult
    once both sockets are closed; ``close()`` aborts both at once (drain deadline, shutdown).
    """

    _result = SpliceResult

    def __init__(self, loop: asyncio.AbstractEventLoop, head_a: bytes, head_b: bytes,
                 max_buffer: int) -> None:
        super().__init__(loop, max_buffer)
        self.a = _Half(self, "a", bytes(head_a))
        self.b = _Half(self, "b", bytes(head_b))
        self._pair(self.a, self.b)

    bytes_a_to_b = property(attrgetter("a.forwarded"))
    bytes_b_to_a = property(attrgetter("b.forwarded"))
    buffered_a_to_b = property(SpliceCore._buffered_from_first,
                               doc="Bytes read from A and not yet handed to B's kernel socket.")
    buffered_b_to_a = property(SpliceCore._buffered_from_second)


async def open_splice(loop: asyncio.AbstractEventLoop, sock_a: socket.socket,
                      sock_b: socket.socket, *, head_a: bytes = b"", head_b: bytes = b"",
                      max_buffer: int = MAX_BUFFER) -> Splice:
    """Start splicing two connected sockets; ownership of both passes to the Splice.

    ``head_a`` (``head_b``) are bytes already read from A (B) after its auth line: they are
    written to B (A) before anything else.
    """
    pump = Splice(loop, head_a, head_b, max_buffer)
    await pump._connect(sock_a, sock_b)
    return pump


async def splice(loop: asyncio.AbstractEventLoop, sock_a: socket.socket, sock_b: socket.socket,
                 *, head_a: bytes = b"", head_b: bytes = b"",
                 max_buffer: int = MAX_BUFFER) -> SpliceResult:
    """Splice until both sockets are closed; cancelling aborts both."""
    pump = await open_splice(loop, sock_a, sock_b, head_a=head_a, head_b=head_b,
                             max_buffer=max_buffer)
    return await pump._wait_or_abort()
