"""A fault-injecting TCP proxy for tests (a user-space "toxic proxy" on asyncio).

``netem`` is not available on this kernel, so the reliability rows (R5 now; R7, S8, S9 later)
put this proxy between two programs on 127.0.0.1 and spoil the path on purpose.  It listens on
``127.0.0.1:0``, opens one upstream connection per accepted connection, and copies bytes both
ways through the *toxics* currently active for that connection and direction.  Toxics can be
added and removed while data flows.  With no toxic it is a transparent tap that can also record
every byte both ways (``record=True``).

API
---
::

    proxy = ToxicProxy(upstream, *, host="127.0.0.1", record=False, seed=None,
                       max_buffer=4 MiB, linger=2.0, connect_timeout=10.0)
        # upstream: a port on 127.0.0.1, or (host, port)
    port = await proxy.start()            # or: async with ToxicProxy(...) as proxy: ...
    proxy.port; proxy.conns               # every connection, in accept order (index 0, 1, ...)
    proxy.live                            # connections not closed yet
    proxy.errors                          # unexpected exceptions inside the proxy (a bug if any)
    conn = await proxy.connection(i, timeout=10.0)   # conns[i] once its upstream is connected
    h = proxy.add(toxic, direction="both", where=None)   # -> ToxicHandle; changes apply at once
    proxy.remove(h); proxy.clear()
    await proxy.close()                   # stop listening; reset (RST) every live connection

``direction``: ``"up"`` (accepted client -> upstream), ``"down"`` (upstream -> client) or
``"both"``.  ``where`` picks connections: None (every connection, live and future), an index,
a :class:`ProxyConn`, a collection of either, or a predicate ``conn -> bool`` (evaluated when
the toxic is consulted).  ``proxy.existing()`` is a ``where`` for "the connections open now";
``where_index_at_least(1)`` one for "every connection but the first" (e.g. a tunnel end's data
sockets, its control socket being connection 0).

Toxics (frozen dataclasses; one object may be added to many places)
--------------------------------------------------------------------
``Latency(ms=100, jitter_ms=50)``
    each chunk is delivered ``ms +/- jitter_ms`` (uniform) after it was read; order is kept, so
    a chunk never overtakes the one before it (as toxiproxy's latency).
``Bandwidth(rate)``
    at most ``rate`` bytes/s, paced in pieces of rate/100 bytes.
``Slicer(min_size=1, max_size=7, min_delay_ms=0, max_delay_ms=2, start=0, stop=None)``
    the bytes at stream offsets [start, stop) of that direction go out in segments of
    min_size..max_size bytes, each followed by a pause of min_delay_ms..max_delay_ms (TCP_NODELAY
    is on, so each is its own TCP segment).  The offset range lets a test slice the auth line
    and the first bytes without slicing a 16 MiB stream at 4 KB/s.
``SlowClose(delay=2.0)``
    a close in that direction (the source's FIN, or a LimitData close) reaches the destination
    ``delay`` seconds late.  An RST is never delayed.
``ResetPeer(after_bytes=0)``
    once ``after_bytes`` bytes have been delivered in that direction (counted from the start of
    the connection), both sockets are closed with an RST (SO_LINGER 0).  A live connection
    that is already past that count when the toxic is added is reset at once.
``Timeout(drop=False)``
    black hole: nothing gets through (data, FIN or RST) while it is active; both sockets stay
    open.  ``drop=False`` stops reading, so what was sent is delivered once the toxic is removed
    (a healed network partition: TCP retransmits); ``drop=True`` reads and discards (toxiproxy's
    "timeout": a broken middlebox eating data).  A FIN is held in both modes.
``LimitData(after_bytes)``
    exactly ``after_bytes`` bytes are delivered in that direction, then the connection is
    closed (FIN both ways, each delayed by its direction's SlowClose; then both sockets are
    drained until EOF or ``linger`` seconds, so the close is a FIN, not an RST).

Several toxics of one kind on one direction: the last added Latency/Bandwidth/SlowClose/
Timeout wins; the first Slicer whose range holds the offset slices it; the lowest ResetPeer/
LimitData threshold acts first.  Order within a direction: black hole, latency, then
limits, slicing and bandwidth while sending.

Measurements (``conn.up`` / ``conn.down``, each a :class:`Direction`)
---------------------------------------------------------------------
``received`` (bytes read from the source), ``forwarded`` (delivered to the destination),
``dropped``, ``sends`` (send calls = segments), ``segments`` (Counter of sliced segment
sizes), ``first_sent_at`` / ``last_sent_at`` / ``eof_sent_at`` / ``cut_at`` (time.monotonic()
of the first and last delivery, the FIN passed on, and a ResetPeer/LimitData firing),
``log`` (bytearray of what was delivered, when recording), ``await reached(n, timeout)`` (the
monotonic time at which ``forwarded`` reached n; EOFError if that direction ends first).
``conn.how`` once closed: ``"eof"`` (both FINs passed on), ``"reset"``, ``"close"``
(LimitData or ``conn.close()``), ``"abort"`` (proxy closed), ``"upstream_failed"``;
``conn.closed``, ``conn.closed_at``, ``await conn.wait_closed()``, ``conn.reset()``,
``conn.close()``.

A source that resets is passed on as an RST to the other side (after what was queued before
it); a destination that fails resets both.  Works on stock asyncio and on uvloop.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import random
import socket
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

__all__ = [
    "Bandwidth",
    "Direction",
    "Latency",
    "LimitData",
    "ProxyConn",
    "ResetPeer",
    "Slicer",
    "SlowClose",
    "Timeout",
    "ToxicHandle",
    "ToxicProxy",
    "where_index_at_least",
]

HOST = "127.0.0.1"
READ_SIZE = 256 * 1024
MAX_BUFFER = 4 * 1024 * 1024


# --- toxics ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Latency:
    ms: float = 100.0
    jitter_ms: float = 0.0

    def sample(self, rng: random.Random) -> float:
        """One chunk's delay in seconds."""
        return max(0.0, self.ms + rng.uniform(-self.jitter_ms, self.jitter_ms)) / 1000.0


@dataclass(frozen=True)
class Bandwidth:
    rate: int                       # bytes per second

    def __post_init__(self) -> None:
        if self.rate <= 0:
            raise ValueError("rate must be positive")


@dataclass(frozen=True)
class Slicer:
    min_size: int = 1
    max_size: int = 7
    min_delay_ms: float = 0.0
    max_delay_ms: float = 2.0
    start: int = 0                  # first stream offset sliced
    stop: int | None = None         # first offset no longer sliced (None: to the end)

    def __post_init__(self) -> None:
        if not 1 <= self.min_size <= self.max_size:
            raise ValueError("need 1 <= min_size <= max_size")

    def covers(self, offset: int) -> bool:
        return offset >= self.start and (self.stop is None or offset < self.stop)


@dataclass(frozen=True)
class SlowClose:
    delay: float = 2.0              # seconds


@dataclass(frozen=True)
class ResetPeer:
    after_bytes: int = 0


@dataclass(frozen=True)
class Timeout:
    drop: bool = False


@dataclass(frozen=True)
class LimitData:
    after_bytes: int


class ToxicHandle:
    """What ``ToxicProxy.add`` returns; pass it to ``remove``."""

    __slots__ = ("directions", "toxic", "where")

    def __init__(self, toxic, directions: frozenset[str], where) -> None:
        self.toxic = toxic
        self.directions = directions
        self.where = where

    def __repr__(self) -> str:
        return f"ToxicHandle({self.toxic!r}, {sorted(self.directions)}, where={self.where!r})"


# queue markers
_EOF = object()          # the source sent a FIN
_SRC_RESET = object()    # the source failed (RST)
_WAKE = object()         # toxics changed: re-check limits and black holes


def _linger_zero(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


# --- one direction of one connection ------------------------------------------------------------

class Direction:
    """One way of one proxied connection: a reader task, a queue, a writer task."""

    def __init__(self, conn: ProxyConn, name: str, src: socket.socket,
                 dst: socket.socket) -> None:
        self.conn = conn
        self.name = name
        self.src = src
        self.dst = dst
        self.received = 0
        self.forwarded = 0
        self.dropped = 0
        self.sends = 0
        self.segments: collections.Counter[int] = collections.Counter()
        self.first_sent_at: float | None = None
        self.last_sent_at: float | None = None
        self.eof_sent_at: float | None = None
        self.cut_at: float | None = None
        self.log: bytearray | None = bytearray() if conn.proxy.record else None
        self._queue: collections.deque = collections.deque()
        self._nonempty = asyncio.Event()
        self._space = asyncio.Event()
        self._queued = 0
        self._bw_next = 0.0
        self._waiters: list[tuple[int, asyncio.Future]] = []
        self._cache: tuple[int, list] = (-1, [])

    def __repr__(self) -> str:
        return (f"<Direction {self.conn.index}/{self.name} forwarded={self.forwarded} "
                f"received={self.received} dropped={self.dropped}>")

    # -- toxics in force for this direction --
    def toxics(self) -> list:
        version, found = self._cache
        proxy = self.conn.proxy
        # a predicate `where` may change its mind (it sees the connection's state): no caching
        if version != proxy._version or proxy._predicates:
            found = [h.toxic for h in proxy._handles
                     if self.name in h.directions and proxy._matches(h.where, self.conn)]
            self._cache = (proxy._version, found)
        return found

    def _last(self, kind):
        found = None
        for toxic in self.toxics():
            if isinstance(toxic, kind):
                found = toxic
        return found

    def black_hole(self) -> Timeout | None:
        return self._last(Timeout)

    def slow_close_delay(self) -> float:
        toxic = self._last(SlowClose)
        return toxic.delay if toxic is not None else 0.0

    def _limit(self) -> tuple[int, str] | None:
        """(threshold, "reset" | "close") of the lowest ResetPeer/LimitData in force."""
        best = None
        for toxic in self.toxics():
            if isinstance(toxic, ResetPeer):
                cand = (toxic.after_bytes, "reset")
            elif isinstance(toxic, LimitData):
                cand = (toxic.after_bytes, "close")
            else:
                continue
            if best is None or cand[0] < best[0]:
                best = cand
        return best

    def _slicer_for(self, offset: int) -> Slicer | None:
        for toxic in self.toxics():
            if isinstance(toxic, Slicer) and toxic.covers(offset):
                return toxic
        return None

    def _next_slice_start(self, offset: int) -> int | None:
        starts = [t.start for t in self.toxics() if isinstance(t, Slicer) and t.start > offset]
        return min(starts) if starts else None

    # -- waiting --
    async def reached(self, n: int, timeout: float | None = 10.0) -> float:
        """When ``forwarded`` reached ``n`` (time.monotonic()); EOFError if it never will."""
        if self.forwarded >= n:
            return self.last_sent_at if self.last_sent_at is not None else time.monotonic()
        if self.conn.closed or self.eof_sent_at is not None:
            raise EOFError(f"connection {self.conn.index} closed after {self.forwarded} bytes "
                           f"{self.name}, before {n}")
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append((n, fut))
        return await asyncio.wait_for(fut, timeout)

    def _wake_waiters(self) -> None:
        if not self._waiters:
            return
        keep = []
        for n, fut in self._waiters:
            if fut.done():
                continue
            if self.forwarded >= n:
                fut.set_result(self.last_sent_at)
            else:
                keep.append((n, fut))
        self._waiters = keep

    def _fail_waiters(self) -> None:
        for n, fut in self._waiters:
            if not fut.done():
                fut.set_exception(EOFError(
                    f"connection {self.conn.index} closed after {self.forwarded} bytes "
                    f"{self.name}, before {n}"))
        self._waiters = []

    # -- the queue between reader and writer --
    def _push(self, item, size: int = 0) -> None:
        self._queue.append(item)
        self._queued += size
        self._nonempty.set()

    def _release(self, size: int) -> None:
        self._queued -= size
        if self._queued < self.conn.proxy.max_buffer:
            self._space.set()

    async def _get(self):
        while not self._queue:
            self._nonempty.clear()
            await self._nonempty.wait()
        return self._queue.popleft()

    def wake(self) -> None:
        self._push(_WAKE)

    # -- reader --
    async def read_loop(self) -> None:
        loop = asyncio.get_running_loop()
        conn = self.conn
        while True:
            hole = self.black_hole()
            while hole is not None and not hole.drop:
                await conn.changed()           # hold: leave it in the kernel's buffers
                hole = self.black_hole()
            while self._queued >= conn.proxy.max_buffer:
                self._space.clear()
                await self._space.wait()
            try:
                data = await loop.sock_recv(self.src, READ_SIZE)
            except OSError:
                self._push(_SRC_RESET)
                return
            if not data:
                self._push(_EOF)
                return
            self.received += len(data)
            hole = self.black_hole()
            if hole is not None and hole.drop:
                self.dropped += len(data)
                continue
            self._push((time.monotonic(), data), len(data))

    # -- writer --
    async def write_loop(self) -> None:
        """Deliver queued chunks through the toxics; returns after the FIN, or after asking the
        connection to reset/close."""
        conn = self.conn
        rng = conn.proxy.rng
        if self._check_limit():
            return
        while True:
            item = await self._get()
            if item is _WAKE:
                if self._check_limit():
                    return
                continue
            if item is _SRC_RESET:
                while self.black_hole() is not None:     # an RST is a packet too
                    await conn.changed()
                conn.finish("reset")
                return
            if item is _EOF:
                while self.black_hole() is not None:
                    await conn.changed()
                delay = self.slow_close_delay()
                if delay > 0:
                    await asyncio.sleep(delay)
                with contextlib.suppress(OSError):
                    self.dst.shutdown(socket.SHUT_WR)
                self.eof_sent_at = time.monotonic()
                self._fail_waiters()           # nothing more will come this way
                return
            stamp, data = item
            size = len(data)
            try:
                hole = self.black_hole()
                while hole is not None:
                    if hole.drop:
                        self.dropped += size
                        data = None
                        break
                    await conn.changed()
                    hole = self.black_hole()
                if data is None:
                    continue
                latency = self._last(Latency)
                if latency is not None:
                    wait = stamp + latency.sample(rng) - time.monotonic()
                    if wait > 0:
                        await asyncio.sleep(wait)
                if await self._send(memoryview(data)):
                    return
            except OSError:
                conn.finish("reset")
                return
            finally:
                self._release(size)

    def _check_limit(self) -> bool:
        """A limit already reached (toxic added late, or 0): act now.  True = stop writing."""
        limit = self._limit()
        if limit is not None and self.forwarded >= limit[0]:
            self.cut_at = time.monotonic()
            self.conn.finish(limit[1])
            return True
        return False

    async def _send(self, data: memoryview) -> bool:
        """Send one chunk through limits, slicer and bandwidth; True if a limit fired."""
        loop = asyncio.get_running_loop()
        rng = self.conn.proxy.rng
        cut = None
        limit = self._limit()
        if limit is not None and self.forwarded + len(data) >= limit[0]:
            data = data[:max(0, limit[0] - self.forwarded)]
            cut = limit[1]
        pos = 0
        while pos < len(data):
            offset = self.forwarded
            n = len(data) - pos
            pause = 0.0
            slicer = self._slicer_for(offset)
            if slicer is not None:
                n = min(n, rng.randint(slicer.min_size, slicer.max_size))
                if slicer.stop is not None:
                    n = min(n, slicer.stop - offset)
                pause = rng.uniform(slicer.min_delay_ms, slicer.max_delay_ms) / 1000.0
            else:
                nxt = self._next_slice_start(offset)
                if nxt is not None:
                    n = min(n, nxt - offset)
            bandwidth = self._last(Bandwidth)
            if bandwidth is not None:
                n = min(n, max(1, bandwidth.rate // 100))
                now = time.monotonic()
                # catch up on a sleep that overshot by a few ms; no credit for idle time
                if self._bw_next < now - 0.005:
                    self._bw_next = now
                if self._bw_next > now:
                    await asyncio.sleep(self._bw_next - now)
                self._bw_next += n / bandwidth.rate
            piece = data[pos:pos + n]
            await loop.sock_sendall(self.dst, piece)
            now = time.monotonic()
            if self.first_sent_at is None:
                self.first_sent_at = now
            self.last_sent_at = now
            self.forwarded += n
            self.sends += 1
            if slicer is not None:
                self.segments[n] += 1
            if self.log is not None:
                self.log += piece
            pos += n
            self._wake_waiters()
            if pause > 0 or slicer is not None:
                await asyncio.sleep(pause)
        if cut is not None:
            self.cut_at = time.monotonic()
            self.conn.finish(cut)
            return True
        return False


# --- one proxied connection ---------------------------------------------------------------

class ProxyConn:
    """One accepted connection and its upstream twin."""

    def __init__(self, proxy: ToxicProxy, index: int, client: socket.socket, peer) -> None:
        self.proxy = proxy
        self.index = index
        self.peer = peer
        self.client = client
        self.upstream: socket.socket | None = None
        self.up: Direction | None = None
        self.down: Direction | None = None
        self.how: str | None = None
        self.closed = False
        self.closed_at: float | None = None
        self.accepted_at = time.monotonic()
        loop = asyncio.get_running_loop()
        self._finish = loop.create_future()
        self._ready = asyncio.Event()
        self._closed = asyncio.Event()
        self._changed = asyncio.Event()

    def __repr__(self) -> str:
        return f"<ProxyConn {self.index} how={self.how} up={self.up} down={self.down}>"

    @property
    def directions(self) -> tuple[Direction, ...]:
        return tuple(d for d in (self.up, self.down) if d is not None)

    def finish(self, kind: str) -> None:
        """End the connection: "reset" (RST both), "close" (FIN both), "abort" (RST, proxy)."""
        if not self._finish.done():
            self._finish.set_result(kind)

    def reset(self) -> None:
        self.finish("reset")

    def close(self) -> None:
        self.finish("close")

    async def changed(self) -> None:
        """Wait for the next change of the proxy's toxics."""
        await self._changed.wait()

    def _toxics_changed(self) -> None:
        event, self._changed = self._changed, asyncio.Event()
        event.set()
        for d in self.directions:
            d.wake()

    async def wait_closed(self) -> str:
        await self._closed.wait()
        return self.how  # type: ignore[return-value]

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        proxy = self.proxy
        tasks: list[asyncio.Task] = []
        kind = "abort"
        try:
            up = socket.socket(proxy.upstream_family, socket.SOCK_STREAM)
            up.setblocking(False)
            self.upstream = up
            try:
                await asyncio.wait_for(loop.sock_connect(up, proxy.upstream),
                                       proxy.connect_timeout)
            except (OSError, asyncio.TimeoutError):
                kind = "upstream_failed"
                return
            for sock in (self.client, up):
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.up = Direction(self, "up", self.client, up)
            self.down = Direction(self, "down", up, self.client)
            self._ready.set()
            for d in (self.up, self.down):
                tasks.append(loop.create_task(d.read_loop()))
            writers = [loop.create_task(d.write_loop()) for d in (self.up, self.down)]
            tasks += writers
            # until a reset/close is asked for, or both FINs have been passed on
            waiting = {self._finish, *writers}
            while not self._finish.done() and not all(w.done() for w in writers):
                _done, waiting = await asyncio.wait(waiting,
                                                    return_when=asyncio.FIRST_COMPLETED)
            if any(t.done() and not t.cancelled() and t.exception() is not None
                   for t in writers):
                self.finish("reset")           # a bug (recorded below): fail loudly
            kind = self._finish.result() if self._finish.done() else "eof"
        except asyncio.CancelledError:
            kind = "abort"
            raise
        except Exception as exc:       # a bug in the proxy: record it, reset the connection
            proxy.errors.append(exc)
            kind = "reset"
        finally:
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            for task in tasks:
                if not task.cancelled() and task.exception() is not None:
                    proxy.errors.append(task.exception())
            try:
                if kind == "close":
                    await self._close_gracefully()
            finally:
                self._close_sockets(rst=kind in ("reset", "abort"))
                self.how = kind
                self.closed = True
                self.closed_at = time.monotonic()
                for d in self.directions:
                    d._fail_waiters()
                self._ready.set()
                self._closed.set()

    async def _close_gracefully(self) -> None:
        loop = asyncio.get_running_loop()

        async def fin(d: Direction) -> None:
            if d.eof_sent_at is not None:
                return
            delay = d.slow_close_delay()
            if delay > 0:
                await asyncio.sleep(delay)
            with contextlib.suppress(OSError):
                d.dst.shutdown(socket.SHUT_WR)
            d.eof_sent_at = time.monotonic()

        async def drain(sock: socket.socket) -> None:
            # read (and discard) until the peer's FIN: closing a socket with unread bytes
            # would send an RST instead of a clean close
            with contextlib.suppress(OSError):
                while await loop.sock_recv(sock, READ_SIZE):
                    pass

        draining = [loop.create_task(drain(s)) for s in (self.client, self.upstream)]
        try:
            await asyncio.gather(*(fin(d) for d in self.directions))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.gather(*draining), self.proxy.linger)
        finally:
            for task in draining:
                task.cancel()
            await asyncio.gather(*draining, return_exceptions=True)

    def _close_sockets(self, rst: bool) -> None:
        for sock in (self.client, self.upstream):
            if sock is None:
                continue
            if rst:
                _linger_zero(sock)
            sock.close()


# --- the proxy ---------------------------------------------------------------------------------

class ToxicProxy:
    """See the module docstring."""

    def __init__(self, upstream: int | tuple[str, int], *, host: str = HOST,
                 record: bool = False, seed: int | None = None, max_buffer: int = MAX_BUFFER,
                 linger: float = 2.0, connect_timeout: float = 10.0) -> None:
        if isinstance(upstream, int):
            upstream = (HOST, upstream)
        self.upstream = upstream
        self.upstream_family = socket.AF_INET6 if ":" in upstream[0] else socket.AF_INET
        self.host = host
        self.record = record
        self.rng = random.Random(seed)
        self.max_buffer = max_buffer
        self.linger = linger
        self.connect_timeout = connect_timeout
        self.conns: list[ProxyConn] = []
        self.errors: list[BaseException] = []
        self.port = 0
        self._handles: list[ToxicHandle] = []
        self._version = 0
        self._listener: socket.socket | None = None
        self._accept_task: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        self._new_conn: asyncio.Event | None = None

    async def __aenter__(self) -> ToxicProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def start(self) -> int:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        self._listener = socket.create_server((self.host, 0), family=family, backlog=512)
        self._listener.setblocking(False)
        self.port = self._listener.getsockname()[1]
        self._new_conn = asyncio.Event()
        self._accept_task = asyncio.get_running_loop().create_task(self._accept_loop())
        return self.port

    @property
    def live(self) -> int:
        return sum(1 for c in self.conns if not c.closed)

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, peer = await loop.sock_accept(self._listener)
            except OSError:
                if self._listener is None or self._listener.fileno() < 0:
                    return
                await asyncio.sleep(0.01)      # out of FDs or similar: try again shortly
                continue
            sock.setblocking(False)
            conn = ProxyConn(self, len(self.conns), sock, peer)
            self.conns.append(conn)
            task = loop.create_task(conn.run())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            self._new_conn.set()

    async def connection(self, index: int, timeout: float = 10.0) -> ProxyConn:
        """``conns[index]`` once it is set up (upstream connected, or failed)."""
        async def wait() -> ProxyConn:
            while len(self.conns) <= index:
                self._new_conn.clear()
                await self._new_conn.wait()
            conn = self.conns[index]
            await conn._ready.wait()
            return conn
        return await asyncio.wait_for(wait(), timeout)

    # -- toxics --
    def add(self, toxic, direction: str = "both", where=None) -> ToxicHandle:
        if direction == "both":
            directions = frozenset(("up", "down"))
        elif direction in ("up", "down"):
            directions = frozenset((direction,))
        else:
            raise ValueError(f"direction must be 'up', 'down' or 'both', not {direction!r}")
        handle = ToxicHandle(toxic, directions, where)
        self._handles.append(handle)
        self._changed()
        return handle

    def remove(self, handle: ToxicHandle) -> None:
        self._handles.remove(handle)
        self._changed()

    def clear(self) -> None:
        self._handles.clear()
        self._changed()

    def existing(self) -> frozenset[int]:
        """A ``where`` for the connections accepted so far (not later ones)."""
        return frozenset(c.index for c in self.conns)

    @staticmethod
    def _matches(where, conn: ProxyConn) -> bool:
        if where is None:
            return True
        if isinstance(where, int):
            return conn.index == where
        if isinstance(where, ProxyConn):
            return conn is where
        if isinstance(where, Iterable):
            return any(conn.index == w if isinstance(w, int) else conn is w for w in where)
        return bool(where(conn))

    @property
    def _predicates(self) -> bool:
        return any(callable(h.where) and not isinstance(h.where, ProxyConn)
                   for h in self._handles)

    def _changed(self) -> None:
        self._version += 1
        for conn in self.conns:
            if not conn.closed:
                conn._toxics_changed()

    # -- shutting down --
    async def close(self) -> None:
        """Stop accepting, reset every live connection, wait until all sockets are closed."""
        if self._accept_task is not None:
            self._accept_task.cancel()
            await asyncio.gather(self._accept_task, return_exceptions=True)
            self._accept_task = None
        if self._listener is not None:
            self._listener.close()
        for conn in self.conns:
            conn.finish("abort")
        tasks = list(self._tasks)
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=5.0)
            for task in pending:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


def where_index_at_least(first: int) -> Callable[[ProxyConn], bool]:
    """A ``where`` for connections from index ``first`` on (e.g. 1: every data socket)."""
    return lambda conn: conn.index >= first
