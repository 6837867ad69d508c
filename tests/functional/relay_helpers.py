"""Test clients that play relay side A and side B on 127.0.0.1, with real keys.

Raw non-blocking sockets driven by the loop's sock_* calls: the tests see exactly what the relay
writes (``Socket auth failed``, EOF, RST) and when.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import socket
import struct
import time
import uuid
from dataclasses import dataclass
from functools import lru_cache

from noports.at.atkeys import AtKeys
from noports.relay import DataPlaneConfig, RelaySessions
from noports.relay.messages import encode_auth_line, parse_request_ports

HOST = "127.0.0.1"
CHUNK = 1 << 20


@lru_cache(maxsize=None)
def keys(atsign: str) -> AtKeys:
    """Real RSA-2048 keys, generated once per atSign per test run."""
    return AtKeys.generate(atsign)


def request_json(atsign_a="@alice", atsign_b="@bob", *, session_id=None, auth_a=True,
                 auth_b=True, client_nonce="2024-06-18T09:48:41.331275", **extra) -> str:
    """The request_ports value as Atsign's client writes it (field order of RelayRequest)."""
    body = {"sessionId": session_id or str(uuid.uuid4()), "atSignA": atsign_a,
            "atSignB": atsign_b, "authenticateSocketA": auth_a, "authenticateSocketB": auth_b,
            "clientNonce": client_nonce}
    body.update(extra)
    return json.dumps(body)


@dataclass
class Opened:
    """A session opened on a registry, with the two sides' genuine auth lines."""

    session: object
    line_a: bytes
    line_b: bytes

    @property
    def port_a(self) -> int:
        return self.session.port_a

    @property
    def port_b(self) -> int:
        return self.session.port_b


def fast_config(**overrides) -> DataPlaneConfig:
    cfg = {"bind_host": HOST, "auth_timeout": 2.0, "pairing_timeout": 10.0}
    cfg.update(overrides)
    return DataPlaneConfig(**cfg)


async def open_session(registry: RelaySessions, atsign_a="@alice", atsign_b="@bob",
                       **request_fields) -> Opened:
    request = parse_request_ports(request_json(atsign_a, atsign_b, **request_fields))
    ka, kb = keys(atsign_a), keys(atsign_b)
    session = await registry.open(request, public_key_a=ka.encrypt_public,
                                  public_key_b=kb.encrypt_public)
    nonce = session.rvd_nonce
    line_a = line_b = b""
    if nonce is not None:
        line_a = encode_auth_line(request.session_id, request.client_nonce, nonce,
                                  ka.encrypt_private)
        line_b = encode_auth_line(request.session_id, request.client_nonce, nonce,
                                  kb.encrypt_private)
    return Opened(session, line_a, line_b)


async def connect(port: int, first: bytes = b"", host: str = HOST) -> socket.socket:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, (host, port))
        if first:
            await loop.sock_sendall(sock, first)
    except BaseException:
        sock.close()
        raise
    return sock


def reset(sock: socket.socket) -> None:
    """Close with an RST (SO_LINGER 0)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


async def read_until_closed(sock: socket.socket, limit: int = 1 << 16) -> tuple[bytes, str]:
    """Everything the relay sends until it closes: (bytes, "eof" | "reset")."""
    loop = asyncio.get_running_loop()
    data = bytearray()
    while True:
        try:
            chunk = await loop.sock_recv(sock, limit)
        except (ConnectionResetError, BrokenPipeError):
            return bytes(data), "reset"
        if not chunk:
            return bytes(data), "eof"
        data += chunk


async def refused_after(sock: socket.socket) -> tuple[bytes, float]:
    """Wait for the relay to close ``sock``; return (what it wrote, seconds it took)."""
    start = time.monotonic()
    data, _how = await read_until_closed(sock)
    return data, time.monotonic() - start


async def send_random(sock: socket.socket, nbytes: int, seed: int, *, eof: bool = True) -> str:
    """Send ``nbytes`` of seeded random data; return their sha256; half-close when done."""
    loop = asyncio.get_running_loop()
    rng = random.Random(seed)
    digest = hashlib.sha256()
    left = nbytes
    while left:
        block = rng.randbytes(min(CHUNK, left))
        digest.update(block)
        await loop.sock_sendall(sock, block)
        left -= len(block)
    if eof:
        sock.shutdown(socket.SHUT_WR)
    return digest.hexdigest()


async def receive_all(sock: socket.socket) -> tuple[int, str]:
    """Read to EOF: (byte count, sha256)."""
    loop = asyncio.get_running_loop()
    digest = hashlib.sha256()
    total = 0
    while True:
        chunk = await loop.sock_recv(sock, 1 << 18)
        if not chunk:
            return total, digest.hexdigest()
        total += len(chunk)
        digest.update(chunk)


async def recv_exactly(sock: socket.socket, n: int) -> bytes:
    loop = asyncio.get_running_loop()
    data = bytearray()
    while len(data) < n:
        chunk = await loop.sock_recv(sock, n - len(data))
        if not chunk:
            raise EOFError(f"EOF after {len(data)} of {n} bytes")
        data += chunk
    return bytes(data)


async def until(predicate, timeout: float = 5.0, what: str = "condition") -> None:
    """Poll ``predicate`` on the loop until true (bounded); for state the relay exposes."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.005)


async def genuine_pair(opened: Opened, nbytes: int = 1 << 20, seed: int = 1) -> None:
    """Pair the genuine sides of ``opened`` and check ``nbytes`` each way, sha256 intact."""
    a = await connect(opened.port_a, opened.line_a)
    b = await connect(opened.port_b, opened.line_b)
    try:
        sent_ab, sent_ba, got_b, got_a = await asyncio.gather(
            send_random(a, nbytes, seed), send_random(b, nbytes, seed + 1),
            receive_all(b), receive_all(a))
        assert got_b == (nbytes, sent_ab)
        assert got_a == (nbytes, sent_ba)
    finally:
        a.close()
        b.close()


def port_is_free(port: int) -> bool:
    """True if ``port`` on 127.0.0.1 can be bound again (the relay let it go)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # as any restarted server would: TIME_WAIT remnants of closed connections do not count
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((HOST, port))
        sock.listen(1)
        return True
    except OSError:
        return False
    finally:
        sock.close()
