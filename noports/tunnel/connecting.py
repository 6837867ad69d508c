"""How a tunnel end opens its TCP connections (to the relay, to the daemon's target).

Owns: resolving a host, connecting within a deadline with the first bytes (the auth line, in
clear: noports-protocol.md §5.3, §6) written at once, trying each address in turn, waiting until
the previous relay socket's auth line (only its auth line: not the data that followed it) has
been acknowledged, and TCP keep-alive on the long-lived control socket.  Every socket is closed
again on any failure or cancellation.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import sys
import time

if sys.platform.startswith("linux"):
    import fcntl
    import termios

    # on a TCP socket, Linux's TIOCOUTQ (= SIOCOUTQ) counts bytes not yet acknowledged
    _OUTQ: int | None = termios.TIOCOUTQ
    # struct tcp_info (linux/tcp.h): u8 tcpi_state at 0; u64 tcpi_bytes_acked at 120 (Linux
    # >= 4.1: bytes of data the peer has acknowledged, SYN excluded)
    _TCP_INFO: int | None = getattr(socket, "TCP_INFO", 11)
else:  # pragma: no cover - elsewhere the check is skipped
    _OUTQ = None
    _TCP_INFO = None
_TCPI_BYTES_ACKED = 120
_TCPI_LEN = _TCPI_BYTES_ACKED + 8
_TCP_CLOSE = 7             # tcpi_state of a socket that was reset or has finished closing

__all__ = [
    "auth_line_delivered",
    "bytes_acked",
    "connect_any",
    "connect_tcp",
    "describe",
    "keepalive",
    "resolve",
    "unacked_bytes",
]

#: How long a new relay socket waits for the previous one's auth line to be acknowledged.
DELIVERY_WAIT = 2.0


def describe(exc: BaseException) -> str:
    """An exception as a short phrase for logs and TunnelEnded messages."""
    return str(exc) or type(exc).__name__


async def resolve(loop: asyncio.AbstractEventLoop, host: str, port: int) -> list[tuple]:
    """``(family, sockaddr)`` for each TCP address of host:port, in resolver order."""
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    seen: list[tuple] = []
    for family, _type, _proto, _canon, sockaddr in infos:
        if (family, sockaddr) not in seen:
            seen.append((family, sockaddr))
    if not seen:
        raise OSError(f"no address for {host}")
    return seen


async def connect_tcp(loop: asyncio.AbstractEventLoop, family: int, sockaddr: tuple,
                      first: bytes = b"") -> socket.socket:
    """A connected non-blocking socket with ``first`` written; closed again on any failure."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        await loop.sock_connect(sock, sockaddr)
        if first:
            await loop.sock_sendall(sock, first)
    except BaseException:
        sock.close()
        raise
    return sock


def unacked_bytes(sock: socket.socket) -> int | None:
    """Bytes written to a TCP socket that the peer has not acknowledged yet (Linux SIOCOUTQ:
    unsent + unacked); None where the platform cannot say or the socket is gone."""
    if _OUTQ is None or sock.fileno() < 0:
        return None
    try:
        raw = fcntl.ioctl(sock.fileno(), _OUTQ, b"\0\0\0\0")
    except OSError:
        return None
    return struct.unpack("i", raw)[0]


def bytes_acked(sock: socket.socket) -> int | None:
    """Bytes of data written to a TCP socket that the peer has acknowledged (Linux TCP_INFO
    tcpi_bytes_acked); None where the platform cannot say or the socket is gone; -1 when the
    connection is already dead (reset or closed), so nothing it sends will be acknowledged."""
    if _TCP_INFO is None or sock.fileno() < 0:
        return None
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _TCPI_LEN)
    except OSError:
        return None
    if len(raw) < _TCPI_LEN:
        return None         # a kernel older than 4.1: no byte count
    if raw[0] == _TCP_CLOSE:
        return -1
    return struct.unpack_from("=Q", raw, _TCPI_BYTES_ACKED)[0]


async def auth_line_delivered(sock: socket.socket | None, acked: int | None = None,
                              limit: float = DELIVERY_WAIT) -> None:
    """Wait (at most ``limit`` s) until the relay's TCP has acknowledged ``sock``'s auth line:
    until ``bytes_acked(sock) >= acked`` (the count taken just before the line was written,
    plus its length); ``acked=None``: until everything written so far is acknowledged.

    Why: the relay pairs sockets in the order their auth lines *complete*.  Opening socket k+1
    only once socket k's auth line has reached the relay keeps a lost-and-retransmitted auth
    line from letting k+1 overtake k.  Only the auth line counts: the data socket k carries
    afterwards (a bulk transfer) must not hold up k+1.  On a healthy path the ACK came back
    long ago, so this costs nothing; where the kernel cannot tell us, it is skipped, and a
    socket that is already dead is not waited for (its auth line will never be acknowledged).
    """
    if sock is None:
        return
    deadline = time.monotonic() + limit
    delay = 0.0005
    while True:
        if acked is None:
            done = not unacked_bytes(sock)
        else:
            now = bytes_acked(sock)
            done = now is None or now < 0 or now >= acked
        if done or time.monotonic() >= deadline:
            return
        await asyncio.sleep(delay)     # no event exists for "ACKed": poll, backing off
        delay = min(delay * 2, 0.02)


async def connect_any(loop: asyncio.AbstractEventLoop, addrs: list[tuple], timeout: float,
                      first: bytes = b"") -> tuple[socket.socket, tuple]:
    """Try each address in turn (each within ``timeout``); the socket and the address used."""
    last: BaseException | None = None
    for family, sockaddr in addrs:
        try:
            sock = await asyncio.wait_for(connect_tcp(loop, family, sockaddr, first), timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            last = exc
            continue
        return sock, (family, sockaddr)
    if isinstance(last, asyncio.TimeoutError):
        raise OSError(f"timed out after {timeout:g} s")
    raise last if last is not None else OSError("no address")


def keepalive(sock: socket.socket) -> None:
    """TCP keep-alive on the long-lived control socket, so a vanished peer is noticed."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for name, value in (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3)):
            if hasattr(socket, name):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
    except OSError:
        pass
