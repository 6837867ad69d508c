"""Test clients that play relay side A and side B on 127.0.0.1, with real keys.

Raw non-blocking sockets driven by the loop's sock_* calls: the tests see exactly what the relay
writes (``Socket auth failed``, EOF, RST) and when.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import random
import socket
import struct
import time
import types
import uuid
from dataclasses import dataclass
from functools import cache

from noports.at.atkeys import AtKeys
from noports.relay import DataPlaneConfig, RelaySessions
from noports.relay.messages import encode_auth_line, parse_request_ports

HOST = "127.0.0.1"
CHUNK = 1 << 20


@cache
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


async def receive_all(sock: socket.socket, cipher=None, *, size: int = 1 << 18,
                      pause: float = 0.0) -> tuple[int, str]:
    """Read to EOF, ``size`` bytes at a time: (byte count, sha256 of what was read, put through
    ``cipher.update`` first if given).  ``pause`` > 0 paces a slow reader (~size/pause bytes a
    second): it sleeps after each read, which is pacing, not synchronisation."""
    loop = asyncio.get_running_loop()
    digest = hashlib.sha256()
    total = 0
    while True:
        chunk = await loop.sock_recv(sock, size)
        if not chunk:
            return total, digest.hexdigest()
        total += len(chunk)
        digest.update(chunk if cipher is None else cipher.update(chunk))
        if pause:
            await asyncio.sleep(pause)


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


@contextlib.asynccontextmanager
async def peak_of(measure, every: float = 0.005):
    """Sample ``measure()`` every ``every`` seconds while the block runs (a pump's buffered
    bytes, say); yields a namespace whose ``value`` is the highest sample so far."""
    peak = types.SimpleNamespace(value=0)

    async def sample():
        while True:
            peak.value = max(peak.value, measure())
            await asyncio.sleep(every)

    sampling = asyncio.ensure_future(sample())
    try:
        yield peak
    finally:
        sampling.cancel()


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


# --- a relay in its own process (so its FDs, RSS and timing are its own) --------------------

REPO = __import__("pathlib").Path(__file__).resolve().parents[2]


class RelayProcess:
    """``python -m tests.functional.relay_helpers``: a RelaySessions in a child process, driven
    by one JSON command per line on stdin (open a session, read its counters, quit)."""

    def __init__(self, loop_kind: str = "asyncio", **config) -> None:
        import subprocess
        import sys
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.functional.relay_helpers", loop_kind, json.dumps(config)],
            cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self.pid = self.proc.pid
        assert self.command({"op": "ping"}) == {"ok": True}

    def command(self, cmd: dict) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"relay process exited with {self.proc.wait(5)}")
        return json.loads(line)

    def open(self, atsign_a="@alice", atsign_b="@bob", **request_fields) -> Opened:
        request_text = request_json(atsign_a, atsign_b, **request_fields)
        ka, kb = keys(atsign_a), keys(atsign_b)
        reply = self.command({"op": "open", "request": request_text,
                              "pub_a": ka.encrypt_public_b64, "pub_b": kb.encrypt_public_b64})
        request = parse_request_ports(request_text)
        view = _RemoteSession(request, reply["port_a"], reply["port_b"], reply["nonce"])
        line_a = encode_auth_line(request.session_id, request.client_nonce, reply["nonce"],
                                  ka.encrypt_private)
        line_b = encode_auth_line(request.session_id, request.client_nonce, reply["nonce"],
                                  kb.encrypt_private)
        return Opened(view, line_a, line_b)

    def stats(self) -> dict:
        return self.command({"op": "stats"})

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.command({"op": "quit"})
                self.proc.wait(10)
            except (OSError, RuntimeError, ValueError):
                self.proc.kill()
                self.proc.wait(5)


@dataclass
class _RemoteSession:
    request: object
    port_a: int
    port_b: int
    rvd_nonce: str

    @property
    def session_id(self) -> str:
        return self.request.session_id


async def _serve(config: dict) -> None:
    import sys

    from noports.at.crypto import public_key_from_b64
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    registry = RelaySessions(fast_config(**config))
    while True:
        line = await reader.readline()
        if not line:
            break
        cmd = json.loads(line)
        if cmd["op"] == "open":
            session = await registry.open(parse_request_ports(cmd["request"]),
                                          public_key_a=public_key_from_b64(cmd["pub_a"]),
                                          public_key_b=public_key_from_b64(cmd["pub_b"]))
            reply = {"port_a": session.port_a, "port_b": session.port_b,
                     "nonce": session.rvd_nonce}
        elif cmd["op"] == "stats":
            st = registry.stats
            reply = {"refusals": dict(st.refusals), "auth_failures": st.auth_failures,
                     "unauth_sockets": st.unauth_sockets, "sessions_open": st.sessions_open,
                     "queued": sum(s.queued("a") + s.queued("b") for s in registry.sessions()),
                     "live_pairs": sum(s.live_pairs for s in registry.sessions())}
        elif cmd["op"] == "quit":
            await registry.close()
            reply = {"ok": True}
        else:
            reply = {"ok": True}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
        if cmd["op"] == "quit":
            break


def main(argv: list[str]) -> None:
    loop_kind, config = argv[0], json.loads(argv[1])
    if loop_kind == "uvloop":
        import uvloop
        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(_serve(config))
    finally:
        loop.close()


if __name__ == "__main__":
    import sys
    main(sys.argv[1:])
