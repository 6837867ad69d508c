"""Both ends of a relayed tunnel (noports.tunnel) through a real in-process relay session.

Everything on 127.0.0.1: a RelaySession from noports.relay with real RSA keys (@client is side
A, @daemon side B, auth lines built by the relay's own ``encode_auth_line``), a ClientEnd, a
DaemonEnd, and a target server.  Some tests put a tapping (or slicing) TCP proxy between the
client end and the relay, or play the client end by hand to send exact control bytes.  Every
test runs on stock asyncio and on uvloop; the pump under test is the one
``noports._speedups.load("tunnelpump")`` selects.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import random
import shutil
import socket
import struct
import subprocess
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from functools import cache

import pytest

from noports._speedups import load as load_speedup
from noports.at.atkeys import AtKeys
from noports.at.crypto import b64d, b64e, generate_aes_key_b64, generate_iv_b64
from noports.at.stream import CtrStream
from noports.relay import DataPlaneConfig, RelaySessions
from noports.relay.messages import encode_auth_line, parse_request_ports
from noports.tunnel import ClientEnd, DaemonEnd, TunnelError
from noports.tunnel.control import (
    ControlParser,
    encode_connect,
    encode_connect_twin,
    encode_heartbeat,
)

HOST = "127.0.0.1"
MiB = 1 << 20
CLIENT, DAEMON = "@client", "@daemon"


@cache
def keys(atsign: str) -> AtKeys:
    return AtKeys.generate(atsign)


def fd_count() -> int:
    """Open sockets of this process.  Only sockets: the compiled relay pump keeps a
    process-wide pool of kernel pipes across sessions, which is not a leak."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
        except OSError:
            pass   # the listing's own descriptor, gone already
    return count


async def until(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    """Wait (bounded) for state that has no event of its own, such as a closed FD."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


# --- the relay --------------------------------------------------------------------------------

@dataclass
class Relay:
    registry: RelaySessions
    session: object
    line_a: bytes
    line_b: bytes

    @property
    def port_a(self) -> int:
        return self.session.port_a

    @property
    def port_b(self) -> int:
        return self.session.port_b


@contextlib.asynccontextmanager
async def relay_session(**cfg):
    config = DataPlaneConfig(**{"bind_host": HOST, "auth_timeout": 5.0,
                                "pairing_timeout": 20.0, **cfg})
    registry = RelaySessions(config)
    body = {"sessionId": str(uuid.uuid4()), "atSignA": CLIENT, "atSignB": DAEMON,
            "authenticateSocketA": True, "authenticateSocketB": True,
            "clientNonce": "2024-06-18T09:48:41.331275"}
    request = parse_request_ports(json.dumps(body))
    session = await registry.open(request, public_key_a=keys(CLIENT).encrypt_public,
                                  public_key_b=keys(DAEMON).encrypt_public)
    line_a = encode_auth_line(request.session_id, request.client_nonce, session.rvd_nonce,
                              keys(CLIENT).encrypt_private)
    line_b = encode_auth_line(request.session_id, request.client_nonce, session.rvd_nonce,
                              keys(DAEMON).encrypt_private)
    try:
        yield Relay(registry, session, line_a, line_b)
    finally:
        await registry.close()


# --- targets ------------------------------------------------------------------------------------

class _Echo(asyncio.Protocol):
    def __init__(self, server: TargetServer) -> None:
        self.server = server

    def connection_made(self, transport):
        self.transport = transport
        self.server.accepted += 1
        self.server.live += 1

    def data_received(self, data):
        self.server.received += data if self.server.record else b""
        self.transport.write(data)
        if self.transport.get_write_buffer_size() > 4 * MiB:
            self.transport.pause_reading()

    def pause_writing(self):
        self.transport.pause_reading()

    def resume_writing(self):
        self.transport.resume_reading()

    def eof_received(self):
        return False     # close once the echo is flushed

    def connection_lost(self, exc):
        self.server.live -= 1


@dataclass
class TargetServer:
    server: object = None
    port: int = 0
    accepted: int = 0
    live: int = 0
    record: bool = False
    received: bytearray = field(default_factory=bytearray)

    def close(self) -> None:
        self.server.close()


async def echo_server(port: int = 0, record: bool = False) -> TargetServer:
    target = TargetServer(record=record)
    loop = asyncio.get_running_loop()
    target.server = await loop.create_server(lambda: _Echo(target), HOST, port,
                                             reuse_address=True)
    target.port = target.server.sockets[0].getsockname()[1]
    return target


@contextlib.asynccontextmanager
async def tunnel(relay: Relay, target_port: int, *, encrypted: bool = True, client_port=None,
                 keys_b64: tuple[str, str] | None = None, client_kw=None, daemon_kw=None):
    """A DaemonEnd and a ClientEnd on ``relay``; both closed (and awaited) at the end."""
    if keys_b64 is not None:
        key, iv = keys_b64
    else:
        key, iv = (generate_aes_key_b64(), generate_iv_b64()) if encrypted else (None, None)
    daemon = DaemonEnd(HOST, relay.port_b, relay.line_b, session_key=key, session_iv=iv,
                       target_host=HOST, target_port=target_port, **(daemon_kw or {}))
    await daemon.start()
    client = ClientEnd(HOST, client_port or relay.port_a, relay.line_a, session_key=key,
                       session_iv=iv, **{"idle_timeout": 60, **(client_kw or {})})
    try:
        await client.start()
        yield client, daemon
    finally:
        await client.close()
        await daemon.close()


async def local_connect(port: int) -> socket.socket:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    await loop.sock_connect(sock, (HOST, port))
    return sock


async def recv_all(sock: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    data = bytearray()
    while True:
        try:
            chunk = await loop.sock_recv(sock, 1 << 18)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    return bytes(data)


async def echo_roundtrip(port: int, payload: bytes) -> bytes:
    sock = await local_connect(port)
    loop = asyncio.get_running_loop()
    try:
        send = loop.create_task(loop.sock_sendall(sock, payload))
        data = bytearray()
        while len(data) < len(payload):
            chunk = await loop.sock_recv(sock, 1 << 18)
            if not chunk:
                break
            data += chunk
        await send
        return bytes(data)
    finally:
        sock.close()


async def send_seeded(sock: socket.socket, nbytes: int, seed: int) -> str:
    loop = asyncio.get_running_loop()
    rng = random.Random(seed)
    digest = hashlib.sha256()
    left = nbytes
    while left:
        block = rng.randbytes(min(MiB, left))
        digest.update(block)
        await loop.sock_sendall(sock, block)
        left -= len(block)
    sock.shutdown(socket.SHUT_WR)
    return digest.hexdigest()


async def recv_digest(sock: socket.socket) -> tuple[int, str]:
    loop = asyncio.get_running_loop()
    digest = hashlib.sha256()
    total = 0
    while True:
        chunk = await loop.sock_recv(sock, 1 << 18)
        if not chunk:
            return total, digest.hexdigest()
        total += len(chunk)
        digest.update(chunk)


# --- a tapping / slicing proxy between the client end and the relay ----------------------------

@dataclass
class TapConn:
    up: bytearray = field(default_factory=bytearray)     # client end -> relay
    down: bytearray = field(default_factory=bytearray)   # relay -> client end


class Tap:
    """Accepts on its own port, forwards to ``upstream``, records every byte both ways.

    ``slice_after``: the first connection's client->relay bytes beyond that many (the control
    socket's auth line) go one byte per send, a millisecond apart, so the daemon end reads the
    encrypted control channel in 1-byte segments.  (The auth line itself is not sliced: the
    relay pairs sockets in the order their auth lines complete, so a control socket whose auth
    line crawled would be overtaken by the first data socket -- a property of the protocol.)"""

    def __init__(self, upstream: int, slice_after: int | None = None) -> None:
        self.upstream = upstream
        self.slice_after = slice_after
        self.conns: list[TapConn] = []
        self.tasks: set[asyncio.Task] = set()
        self.listener = socket.create_server((HOST, 0))
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]
        self.accept_task: asyncio.Task | None = None

    async def __aenter__(self) -> Tap:
        self.accept_task = asyncio.get_running_loop().create_task(self._accept())
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(self.listener)
            record = TapConn()
            sliced = self.slice_after if not self.conns else None
            self.conns.append(record)
            task = loop.create_task(self._serve(conn, record, sliced))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _serve(self, conn, record: TapConn, slice_after: int | None) -> None:
        loop = asyncio.get_running_loop()
        up = socket.socket()
        up.setblocking(False)
        conn.setblocking(False)
        try:
            await loop.sock_connect(up, (HOST, self.upstream))
            await asyncio.gather(self._copy(conn, up, record.up, slice_after),
                                 self._copy(up, conn, record.down, None),
                                 return_exceptions=True)
        finally:
            conn.close()
            up.close()

    async def _copy(self, src, dst, log: bytearray, slice_after: int | None) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                data = await loop.sock_recv(src, 1 << 16)
                if not data:
                    dst.shutdown(socket.SHUT_WR)
                    return
                start = len(log)
                log += data
                if slice_after is None:
                    await loop.sock_sendall(dst, data)
                    continue
                whole = max(0, min(len(data), slice_after - start))
                if whole:
                    await loop.sock_sendall(dst, data[:whole])
                for i in range(whole, len(data)):
                    await loop.sock_sendall(dst, data[i:i + 1])
                    await asyncio.sleep(0.001)   # pacing, so each byte is its own segment
        except OSError:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    async def close(self) -> None:
        tasks = [t for t in (self.accept_task, *self.tasks) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.listener.close()


# === end to end ==================================================================================

def test_http_page_through_the_encrypted_tunnel(run, event_loop_kind):
    body = os.urandom(32 * 1024).hex().encode()

    async def handler(reader, writer):
        request = await reader.readuntil(b"\r\n\r\n")
        assert request.startswith(b"GET /page HTTP/1.")
        writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n"
                     % len(body) + body)
        await writer.drain()
        writer.close()

    async def main():
        server = await asyncio.start_server(handler, HOST, 0)
        port = server.sockets[0].getsockname()[1]
        async with relay_session() as relay, tunnel(relay, port) as (client, daemon):
            assert client.local_address == (HOST, client.local_port)
            url = f"http://{HOST}:{client.local_port}/page"
            loop = asyncio.get_running_loop()

            def fetch():
                with urllib.request.urlopen(url, timeout=10) as response:
                    return response.status, response.read()

            status, got = await loop.run_in_executor(None, fetch)
            assert (status, got) == (200, body)
            await until(lambda: client.stats.connections_live == 0, what="connection end")
            assert client.stats.connections_total == daemon.stats.connections_total == 1
            assert client.bytes_from_relay > len(body)
        server.close()

    run(main())


def test_100_mb_both_ways_sha256(run, event_loop_kind):
    nbytes = 100 * 10**6
    seed = int.from_bytes(os.urandom(4), "big")
    results: dict[str, object] = {}

    async def main():
        loop = asyncio.get_running_loop()
        done = asyncio.Event()

        async def serve(conn):
            # the target sends its own 100 MB while it receives the client's
            conn.setblocking(False)
            try:
                sent, got = await asyncio.gather(send_seeded(conn, nbytes, seed + 1),
                                                 recv_digest(conn))
                results["target_sent"], results["target_got"] = sent, got
            finally:
                conn.close()
                done.set()

        listener = socket.create_server((HOST, 0))
        listener.setblocking(False)

        async def accept_one():
            conn, _ = await loop.sock_accept(listener)
            await serve(conn)

        server_task = loop.create_task(accept_one())
        async with relay_session() as relay, \
                tunnel(relay, listener.getsockname()[1]) as (client, daemon):
            sock = await local_connect(client.local_port)
            try:
                sent, got = await asyncio.gather(send_seeded(sock, nbytes, seed),
                                                 recv_digest(sock))
            finally:
                sock.close()
            await asyncio.wait_for(done.wait(), 60)
            await server_task
            assert results["target_got"] == (nbytes, sent), f"client->target corrupt (seed {seed})"
            assert got == (nbytes, results["target_sent"]), f"target->client corrupt (seed {seed})"
            await until(lambda: client.stats.connections_live == 0
                        and daemon.stats.connections_live == 0, what="connections to end")
            for end in (client, daemon):
                assert end.stats.bytes_to_relay == end.stats.bytes_from_relay == nbytes
        listener.close()

    run(main(), timeout=180)


def test_50_concurrent_connections_are_paired_correctly(run, event_loop_kind):
    async def main():
        target = await echo_server()
        async with relay_session() as relay, tunnel(relay, target.port) as (client, daemon):
            payloads = [os.urandom(random.randint(1, 200_000)) for _ in range(50)]
            echoes = await asyncio.gather(*(echo_roundtrip(client.local_port, p)
                                            for p in payloads))
            # a mispaired connection would decrypt with another connection's key: garbage
            for i, (payload, echo) in enumerate(zip(payloads, echoes, strict=True)):
                assert echo == payload, f"connection {i} got someone else's bytes"
            await until(lambda: daemon.stats.connections_live == 0, what="connections to end")
            assert client.stats.connections_total == daemon.stats.connections_total == 50
            assert daemon.stats.connections_failed == 0
            assert relay.session.pairs_total == 51            # the control pair + 50
            assert target.accepted == 50
        target.close()

    run(main(), timeout=120)


def test_no_encrypt_mode_carries_plaintext(run, event_loop_kind):
    async def main():
        target = await echo_server()
        async with relay_session() as relay, Tap(relay.port_a) as tap:
            async with tunnel(relay, target.port, encrypted=False,
                              client_port=tap.port) as (client, daemon):
                assert not client.encrypted and not daemon.encrypted
                payload = b"plain as day " * 1000
                assert await echo_roundtrip(client.local_port, payload) == payload
                await until(lambda: len(tap.conns) == 2
                            and len(tap.conns[1].down) == len(payload), what="tap to see echo")
            control, data = tap.conns[0], tap.conns[1]
            assert bytes(control.up) == relay.line_a + b"connect:no:encrypt\n"
            assert bytes(data.up) == relay.line_a + payload
            assert bytes(data.down) == payload
        target.close()

    run(main())


def test_relay_sees_only_ciphertext(run, event_loop_kind):
    """A tap on the relay's port A: ciphertext differs from the plaintext and decrypts with the
    key and IV of the connect: line, itself read by decrypting the control channel."""
    async def main():
        target = await echo_server(record=True)
        async with relay_session() as relay, Tap(relay.port_a) as tap:
            session_key, session_iv = generate_aes_key_b64(), generate_iv_b64()
            async with tunnel(relay, target.port, client_port=tap.port,
                              keys_b64=(session_key, session_iv)) as (client, _daemon):
                payloads = [b"attack at dawn " * 4000, os.urandom(70_000)]
                for payload in payloads:
                    assert await echo_roundtrip(client.local_port, payload) == payload
                expected = sum(len(p) for p in payloads)
                await until(lambda: sum(len(c.down) for c in tap.conns[1:]) == expected,
                            what="tap to see both echoes")
            control = bytes(tap.conns[0].up)
            assert control.startswith(relay.line_a)
            encrypted_control = control[len(relay.line_a):]
            assert b"connect" not in encrypted_control
            plain_control = CtrStream(b64d(session_key), b64d(session_iv)).update(
                encrypted_control)
            events = ControlParser().feed(plain_control)
            assert len(events) == 2 and all(e.encrypted for e in events)
            for conn, event, payload in zip(tap.conns[1:], events, payloads, strict=True):
                up = bytes(conn.up)
                assert up.startswith(relay.line_a)       # the auth line goes in clear
                cipher_up = up[len(relay.line_a):]
                cipher_down = bytes(conn.down)
                assert len(cipher_up) == len(cipher_down) == len(payload)
                assert cipher_up != payload and payload[:64] not in cipher_up
                assert cipher_down != payload
                # baseline: the same key and IV each way, each direction from the IV's start
                assert CtrStream(event.key_c2d, event.iv_c2d).update(cipher_up) == payload
                assert CtrStream(event.key_d2c, event.iv_d2c).update(cipher_down) == payload
            assert events[0].key_c2d != events[1].key_c2d      # a fresh key per connection
            assert bytes(target.received) == b"".join(payloads)
        target.close()

    run(main())


def test_control_channel_sliced_into_single_bytes(run, event_loop_kind):
    async def main():
        target = await echo_server()
        async with relay_session() as relay, \
                Tap(relay.port_a, slice_after=len(relay.line_a)) as tap:
            async with tunnel(relay, target.port, client_port=tap.port) as (client, daemon):
                for i in range(3):
                    payload = os.urandom(1000 + i)
                    assert await echo_roundtrip(client.local_port, payload) == payload
                assert daemon.stats.control_messages == 3
                assert daemon.stats.connections_failed == 0
            # each connect: line (78 bytes) crossed the tap as 78 one-byte sends
            assert len(tap.conns[0].up) == len(relay.line_a) + 3 * 78
        target.close()

    run(main(), timeout=90)


# --- the daemon end, driven by hand ---------------------------------------------------------

@contextlib.asynccontextmanager
async def daemon_only(relay: Relay, target_port: int, key=None, iv=None, **kw):
    daemon = DaemonEnd(HOST, relay.port_b, relay.line_b, session_key=key, session_iv=iv,
                       target_host=HOST, target_port=target_port, **kw)
    await daemon.start()
    try:
        yield daemon
    finally:
        await daemon.close()


class HandClient:
    """Plays the client end over raw sockets, so a test chooses every control byte."""

    def __init__(self, relay: Relay, key: bytes | None, iv: bytes | None) -> None:
        self.relay = relay
        self.send_cipher = CtrStream(key, iv) if key is not None else None
        self.control: socket.socket | None = None

    async def open(self) -> None:
        self.control = await self.data_socket()

    async def data_socket(self) -> socket.socket:
        sock = await local_connect(self.relay.port_a)
        await asyncio.get_running_loop().sock_sendall(sock, self.relay.line_a)
        return sock

    async def send_control(self, plaintext: bytes, *, one_byte_at_a_time=False) -> None:
        data = self.send_cipher.update(plaintext) if self.send_cipher else plaintext
        loop = asyncio.get_running_loop()
        if one_byte_at_a_time:
            for i in range(len(data)):
                await loop.sock_sendall(self.control, data[i:i + 1])
        else:
            await loop.sock_sendall(self.control, data)

    def close(self) -> None:
        if self.control is not None:
            self.control.close()


async def encrypted_echo(sock: socket.socket, key_up: bytes, iv_up: bytes, key_down: bytes,
                         iv_down: bytes, payload: bytes) -> bytes:
    """Send ``payload`` encrypted on a hand-made data socket; return the decrypted echo."""
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(sock, CtrStream(key_up, iv_up).update(payload))
    down = CtrStream(key_down, iv_down)
    got = bytearray()
    while len(got) < len(payload):
        chunk = await loop.sock_recv(sock, 1 << 16)
        if not chunk:
            break
        got += down.update(chunk)
    return bytes(got)


def test_daemon_takes_newline_less_legacy_connects(run, event_loop_kind):
    """Clients before 5.6.1: 77-byte connect messages back to back, no newline."""
    session_key, session_iv = os.urandom(32), os.urandom(16)

    async def main():
        target = await echo_server()
        async with relay_session() as relay, \
                daemon_only(relay, target.port, b64e(session_key), b64e(session_iv)) as daemon:
            hand = HandClient(relay, session_key, session_iv)
            await hand.open()
            conn_keys = [(os.urandom(32), os.urandom(16)) for _ in range(3)]
            socks = [await hand.data_socket() for _ in conn_keys]
            lines = [encode_connect(b64e(k), b64e(v))[:-1] for k, v in conn_keys]
            # two in one burst; the second waits for LEGACY_FLUSH_DELAY of silence
            await hand.send_control(lines[0] + lines[1])
            await until(lambda: daemon.stats.connections_total == 2, what="two legacy connects")
            await hand.send_control(lines[2], one_byte_at_a_time=True)
            for sock, (k, v) in zip(socks, conn_keys, strict=True):
                payload = os.urandom(5000)
                assert await encrypted_echo(sock, k, v, k, v, payload) == payload
                sock.close()
            assert daemon.stats.connections_total == 3
            hand.close()
            assert (await daemon.wait_closed()).reason == "control_closed"
        target.close()

    run(main())


def test_daemon_twin_keys_and_heartbeat(run, event_loop_kind):
    session_key, session_iv = os.urandom(32), os.urandom(16)

    async def main():
        target = await echo_server()
        async with relay_session() as relay, \
                daemon_only(relay, target.port, b64e(session_key), b64e(session_iv)) as daemon:
            hand = HandClient(relay, session_key, session_iv)
            await hand.open()
            sock = await hand.data_socket()
            kc, ic, kd, idd = os.urandom(32), os.urandom(16), os.urandom(32), os.urandom(16)
            await hand.send_control(encode_heartbeat(1) + b"future:verb\n" +
                                    encode_connect_twin(b64e(kc), b64e(ic), b64e(kd), b64e(idd)))
            payload = os.urandom(20000)
            assert await encrypted_echo(sock, kc, ic, kd, idd, payload) == payload
            assert daemon.stats.control_messages == 3
            sock.close()
            hand.close()
        target.close()

    run(main())


def test_connect_line_cannot_change_the_target(run, event_loop_kind):
    """S6, last clause: a connect: line that names anything other than keys ends the session;
    the daemon end never connects anywhere but its one target."""
    session_key, session_iv = os.urandom(32), os.urandom(16)

    async def main():
        target = await echo_server()
        other = await echo_server()
        async with relay_session() as relay, \
                daemon_only(relay, target.port, b64e(session_key), b64e(session_iv)) as daemon:
            hand = HandClient(relay, session_key, session_iv)
            await hand.open()
            await hand.send_control(f"connect:{HOST}:{other.port}\n".encode())
            ended = await asyncio.wait_for(daemon.wait_closed(), 10)
            assert ended.reason == "protocol_error"
            assert ended.message.startswith("control channel")
            assert other.accepted == 0 and target.accepted == 0
            assert daemon.target == (HOST, target.port)
            hand.close()
        target.close()
        other.close()

    run(main())


def test_no_encrypt_connect_refused_in_an_encrypted_session(run, event_loop_kind):
    session_key, session_iv = os.urandom(32), os.urandom(16)

    async def main():
        target = await echo_server()
        async with relay_session() as relay, \
                daemon_only(relay, target.port, b64e(session_key), b64e(session_iv)) as daemon:
            hand = HandClient(relay, session_key, session_iv)
            await hand.open()
            refused = await hand.data_socket()
            good = await hand.data_socket()
            k, v = os.urandom(32), os.urandom(16)
            await hand.send_control(b"connect:no:encrypt\n" + encode_connect(b64e(k), b64e(v)))
            assert await recv_all(refused) == b""               # closed: paired, then EOF
            payload = os.urandom(3000)
            assert await encrypted_echo(good, k, v, k, v, payload) == payload
            assert daemon.connections_refused == 1 and target.accepted == 1
            for s in (refused, good):
                s.close()
            hand.close()
        target.close()

    run(main())


# --- failures ------------------------------------------------------------------------------

def test_refusing_target_keeps_later_connections_paired(run, event_loop_kind):
    async def main():
        target = await echo_server()
        port = target.port
        async with relay_session() as relay, tunnel(relay, port) as (client, daemon):
            first = os.urandom(4000)
            assert await echo_roundtrip(client.local_port, first) == first
            target.close()
            await target.server.wait_closed()
            # the target refuses now: the local connection is accepted, then sees EOF
            sock = await local_connect(client.local_port)
            assert await recv_all(sock) == b""
            sock.close()
            await until(lambda: daemon.stats.connections_failed == 1, what="the refusal")
            target = await echo_server(port=port)
            payloads = [os.urandom(10_000 + i) for i in range(5)]
            echoes = await asyncio.gather(*(echo_roundtrip(client.local_port, p)
                                            for p in payloads))
            assert echoes == payloads
            assert daemon.stats.connections_total == 7
        target.close()

    run(main())


def test_relay_session_closed_mid_transfer(run, event_loop_kind):
    async def main():
        target = await echo_server()
        async with relay_session() as relay:
            baseline = fd_count()
            key, iv = generate_aes_key_b64(), generate_iv_b64()
            daemon = DaemonEnd(HOST, relay.port_b, relay.line_b, session_key=key,
                               session_iv=iv, target_host=HOST, target_port=target.port)
            await daemon.start()
            client = ClientEnd(HOST, relay.port_a, relay.line_a, session_key=key,
                               session_iv=iv, idle_timeout=60)
            await client.start()
            sock = await local_connect(client.local_port)
            loop = asyncio.get_running_loop()
            sender = loop.create_task(loop.sock_sendall(sock, os.urandom(64 * MiB)))
            await until(lambda: client.bytes_to_relay > 4 * MiB, what="transfer to start")
            await relay.session.close(reason="killed")
            ended = await asyncio.wait_for(
                asyncio.gather(client.wait_closed(), daemon.wait_closed()), 5)
            for end in ended:
                assert end.reason in ("control_closed", "control_reset"), end
                assert "control" in end.message
            # the local application sees the end too (EOF or RST), within a bounded time
            with contextlib.suppress(OSError):
                await asyncio.wait_for(sender, 5)
            await asyncio.wait_for(recv_all(sock), 5)
            sock.close()
            await until(lambda: target.live == 0, what="target connection to close")
            await until(lambda: fd_count() <= baseline, what=f"sockets back to {baseline}")
        target.close()

    run(main())


def test_owner_close_during_a_connection_storm_leaks_nothing(run, event_loop_kind):
    """close() while local connections are at every stage (accepted, relay socket opening,
    connect: sent, splicing): every socket of both ends is closed afterwards, and every
    socket at all once the relay session is gone."""
    async def main():
        target = await echo_server()
        before = fd_count()
        async with relay_session() as relay:
            baseline = fd_count()
            key, iv = generate_aes_key_b64(), generate_iv_b64()
            daemon = DaemonEnd(HOST, relay.port_b, relay.line_b, session_key=key,
                               session_iv=iv, target_host=HOST, target_port=target.port)
            await daemon.start()
            client = ClientEnd(HOST, relay.port_a, relay.line_a, session_key=key,
                               session_iv=iv, idle_timeout=60)
            await client.start()
            payload = os.urandom(50_000)
            assert await echo_roundtrip(client.local_port, payload) == payload
            socks = await asyncio.gather(*(local_connect(client.local_port) for _ in range(30)))
            loop = asyncio.get_running_loop()
            senders = [loop.create_task(loop.sock_sendall(sock, payload)) for sock in socks]
            await until(lambda: client.stats.connections_total >= 5, what="some connections")
            await client.close()
            assert client.ended.reason == "closed"
            assert (await asyncio.wait_for(daemon.wait_closed(), 10)).reason == "control_closed"
            # every local connection ends: accepted ones are aborted, the rest refused or EOF
            await asyncio.gather(*(asyncio.wait_for(recv_all(s), 10) for s in socks))
            await asyncio.gather(*senders, return_exceptions=True)
            for sock in socks:
                sock.close()
            assert client.stats.connections_live == daemon.stats.connections_live == 0
            await until(lambda: target.live == 0, what="target connections to close")
            # the relay may still hold authenticated sockets of ours that never got a partner
            # (opened just before the end closed); they are the relay's until its session ends
            await until(lambda: fd_count() <= baseline + relay.session.queued("a")
                        + relay.session.queued("b"), what="the ends' sockets to close")
        await until(lambda: fd_count() <= before, what=f"sockets back to {before}")
        target.close()

    run(main())


def test_unacked_bytes_reports_what_the_peer_has_not_acknowledged(run, event_loop_kind):
    from noports.tunnel.connecting import auth_line_delivered, unacked_bytes

    async def main():
        a, b = await tcp_pair()
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(a, b"x" * 1000)
        await auth_line_delivered(a, limit=5)
        assert unacked_bytes(a) == 0             # loopback ACKs at once, read or not
        assert await loop.sock_recv(b, 2000) == b"x" * 1000
        a.close()
        b.close()
        assert unacked_bytes(a) is None          # gone: the check is skipped, never fails

    run(main())


def test_client_heartbeats_reach_the_daemon_and_are_ignored(run, event_loop_kind):
    async def main():
        target = await echo_server()
        async with relay_session() as relay, \
                tunnel(relay, target.port,
                       client_kw={"heartbeat_interval": 0.02}) as (client, daemon):
            await until(lambda: daemon.stats.control_messages >= 3, what="three heartbeats")
            payload = os.urandom(10_000)
            assert await echo_roundtrip(client.local_port, payload) == payload
            assert client.heartbeats_sent >= 3
            assert daemon.stats.connections_total == 1 and daemon.state == "open"
        target.close()

    run(main())


def test_client_max_connections_queues_the_rest(run, event_loop_kind):
    async def main():
        target = await echo_server()
        async with relay_session() as relay, \
                tunnel(relay, target.port, client_kw={"max_connections": 2}) as (client, daemon):
            first = [await local_connect(client.local_port) for _ in range(2)]
            await until(lambda: daemon.stats.connections_live == 2, what="two connections")
            third = asyncio.get_running_loop().create_task(
                echo_roundtrip(client.local_port, b"third"))
            # the third waits in the kernel's backlog: nothing reaches the daemon for it
            assert not await _becomes_true(lambda: daemon.stats.connections_total > 2, 0.3)
            first[0].close()
            assert await asyncio.wait_for(third, 10) == b"third"
            assert daemon.stats.connections_total == 3
            first[1].close()
        target.close()

    run(main())


async def _becomes_true(predicate, within: float) -> bool:
    """Whether ``predicate`` turns true within ``within`` seconds (for things that must NOT)."""
    try:
        await until(predicate, timeout=within)
    except AssertionError:
        return False
    return True


def test_close_while_starting_ends_cleanly(run, event_loop_kind):
    async def main():
        async with relay_session() as relay:
            baseline = fd_count()
            client = ClientEnd(HOST, relay.port_a, relay.line_a, session_key=None,
                               session_iv=None)
            loop = asyncio.get_running_loop()
            starting = loop.create_task(client.start())
            await asyncio.sleep(0)                    # let start() begin connecting
            closing = loop.create_task(client.close())
            port = await starting
            await asyncio.wait_for(closing, 10)
            assert client.closed and client.ended.reason == "closed"
            with pytest.raises(OSError):
                await local_connect(port)
            await until(lambda: fd_count() <= baseline + relay.session.queued("a"),
                        what="the end's sockets to close")

    run(main())


def test_idle_timeout_ends_both_ends(run, event_loop_kind):
    async def main():
        target = await echo_server()
        async with relay_session() as relay, \
                tunnel(relay, target.port, client_kw={"idle_timeout": 0.3}) as (client, daemon):
            payload = b"x" * 100
            assert await echo_roundtrip(client.local_port, payload) == payload
            started = time.monotonic()
            ended = await asyncio.wait_for(client.wait_closed(), 10)
            assert ended.reason == "idle" and "0.3" in ended.message
            assert time.monotonic() - started >= 0.25
            assert (await asyncio.wait_for(daemon.wait_closed(), 10)).reason == "control_closed"
            # the listener is gone
            with pytest.raises(OSError):
                await local_connect(client.local_port)
        target.close()

    run(main())


def test_daemon_end_idle_timeout_includes_grace(run, event_loop_kind):
    async def main():
        target = await echo_server()
        async with relay_session() as relay, \
                daemon_only(relay, target.port, idle_timeout=0.2, idle_grace=0.2) as daemon:
            started = time.monotonic()
            ended = await asyncio.wait_for(daemon.wait_closed(), 10)
            assert ended.reason == "idle" and "0.4" in ended.message
            assert time.monotonic() - started >= 0.35
        target.close()

    run(main())


def test_relay_refusing_the_auth_line_is_reported(run, event_loop_kind):
    async def main():
        async with relay_session() as relay:
            stranger = AtKeys.generate("@mallory")
            bad_line = encode_auth_line("not-this-session", "nonce", relay.session.rvd_nonce,
                                        stranger.encrypt_private)
            client = ClientEnd(HOST, relay.port_a, bad_line, session_key=None, session_iv=None)
            await client.start()
            ended = await asyncio.wait_for(client.wait_closed(), 10)
            assert ended.reason == "relay_refused", ended
            assert "Socket auth failed" in ended.message

    run(main())


def test_unreachable_relay_fails_start_without_leaks(run, event_loop_kind):
    async def main():
        probe = socket.create_server((HOST, 0))
        dead_port = probe.getsockname()[1]
        probe.close()
        baseline = fd_count()
        for end in (ClientEnd(HOST, dead_port, b"{}\n", session_key=None, session_iv=None),
                    DaemonEnd(HOST, dead_port, b"{}\n", session_key=None, session_iv=None,
                              target_host=HOST, target_port=1)):
            with pytest.raises(TunnelError, match="cannot connect to the relay"):
                await end.start()
            assert (await end.wait_closed()).reason == "start_failed"
        assert fd_count() == baseline

    run(main())


def test_listener_is_loopback_only_by_default(run, event_loop_kind):
    async def main():
        target = await echo_server()
        async with relay_session() as relay, tunnel(relay, target.port) as (client, _daemon):
            # the listener's own address (getsockname): 127.0.0.1, not a wildcard
            assert client.local_address == (HOST, client.local_port)
            assert client.local_port > 0
        target.close()

    run(main())


# === the pump on its own ========================================================================

KAT_KEY = bytes(range(32))
KAT_IV = bytes.fromhex("fffffffffffffffffffffffffffffffe")
KAT_PLAIN = b"NoPorts tunnel known-answer test: AES-256-CTR across a 128-bit counter wrap."
# Derived from the spec (§6: AES-256-CTR, the 16-byte IV is the whole big-endian counter block,
# incremented over all 128 bits): `openssl enc -aes-256-ctr -K 0001..1f -iv ff..fe` of KAT_PLAIN.
KAT_CIPHER = bytes.fromhex(
    "2d8ae46dc76a3bfd8e9897b0fca0072f87f6937361c61ea924e2635b29ea249ac8b041f37964ade59fded93e8f"
    "0e16e3823205dd6ad8bfd494ceb65321b6165e61c9dbaad05ea3ca7ac9d91b")


async def tcp_pair() -> tuple[socket.socket, socket.socket]:
    loop = asyncio.get_running_loop()
    listener = socket.create_server((HOST, 0))
    listener.setblocking(False)
    client = socket.socket()
    client.setblocking(False)
    accept = loop.create_task(loop.sock_accept(listener))
    await loop.sock_connect(client, listener.getsockname())
    server, _ = await accept
    listener.close()
    server.setblocking(False)
    return client, server


async def pump_rig(encrypt=None, decrypt=None, **kw):
    """app <-> [plain | pump | relay] <-> far; returns (app, far, splice)."""
    pump = load_speedup("tunnelpump")
    app, plain = await tcp_pair()
    relay, far = await tcp_pair()
    splice = await pump.open_splice_encrypted(asyncio.get_running_loop(), plain, relay,
                                              encrypt=encrypt, decrypt=decrypt, **kw)
    return app, far, splice


def test_encrypted_stream_known_answer(run, event_loop_kind):
    """Derived from the spec: fixed key/IV -> pinned ciphertext, whatever the chunking, and
    the keystream carried across writes in both directions."""
    async def main():
        pump = load_speedup("tunnelpump")
        app, far, splice = await pump_rig(pump.new_cipher(KAT_KEY, KAT_IV),
                                          pump.new_cipher(KAT_KEY, KAT_IV))
        loop = asyncio.get_running_loop()
        for a, b in ((0, 5), (5, 40), (40, len(KAT_PLAIN))):
            await loop.sock_sendall(app, KAT_PLAIN[a:b])
        app.shutdown(socket.SHUT_WR)
        assert await recv_all(far) == KAT_CIPHER
        await loop.sock_sendall(far, KAT_CIPHER)          # the other direction decrypts
        far.shutdown(socket.SHUT_WR)
        assert await recv_all(app) == KAT_PLAIN
        result = await asyncio.wait_for(splice.wait(), 5)
        assert (result.bytes_plain_to_relay, result.bytes_relay_to_plain, result.how_ended) == \
            (len(KAT_PLAIN), len(KAT_PLAIN), "eof")
        app.close()
        far.close()

    run(main())


@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl binary")
def test_known_answer_matches_openssl():
    """Cross-check of the pinned vector with `openssl enc -aes-256-ctr` on this machine."""
    out = subprocess.run(["openssl", "enc", "-aes-256-ctr", "-K", KAT_KEY.hex(), "-iv",
                          KAT_IV.hex()], input=KAT_PLAIN, capture_output=True, timeout=30,
                         check=True).stdout
    assert out == KAT_CIPHER
    assert CtrStream(KAT_KEY, KAT_IV).update(KAT_PLAIN) == KAT_CIPHER


def test_pump_head_bytes_go_through_the_cipher_first(run, event_loop_kind):
    async def main():
        pump = load_speedup("tunnelpump")
        app, far, splice = await pump_rig(
            pump.new_cipher(KAT_KEY, KAT_IV), pump.new_cipher(KAT_KEY, KAT_IV),
            head_plain=KAT_PLAIN[:10], head_relay=KAT_CIPHER[:7])
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(app, KAT_PLAIN[10:])
        await loop.sock_sendall(far, KAT_CIPHER[7:])
        app.shutdown(socket.SHUT_WR)
        far.shutdown(socket.SHUT_WR)
        assert await recv_all(far) == KAT_CIPHER
        assert await recv_all(app) == KAT_PLAIN
        await asyncio.wait_for(splice.wait(), 5)
        app.close()
        far.close()

    run(main())


def test_pump_half_close_passes_fin_and_the_other_way_keeps_flowing(run, event_loop_kind):
    async def main():
        app, far, splice = await pump_rig()
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(app, b"request")
        app.shutdown(socket.SHUT_WR)
        assert await recv_all(far) == b"request"           # data, then the FIN
        answer = os.urandom(3 * MiB)
        await loop.sock_sendall(far, answer)
        far.shutdown(socket.SHUT_WR)
        assert await recv_all(app) == answer
        result = await asyncio.wait_for(splice.wait(), 5)
        assert result.how_ended == "eof" and result.ended_by is None
        app.close()
        far.close()

    run(main())


def test_pump_reset_closes_both(run, event_loop_kind):
    async def main():
        app, far, splice = await pump_rig()
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(app, b"hello")
        got = await loop.sock_recv(far, 100)
        assert got == b"hello"
        far.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        far.close()                                          # RST
        result = await asyncio.wait_for(splice.wait(), 5)
        assert result.how_ended == "reset" and result.ended_by == "relay"
        assert await asyncio.wait_for(recv_all(app), 5) == b""
        app.close()

    run(main())


def test_pump_back_pressure_bounds_buffering(run, event_loop_kind):
    """A relay side that does not read: the pump buffers at most max_buffer, then stops reading
    the plain socket; everything arrives intact once the reader drains."""
    async def main():
        pump = load_speedup("tunnelpump")
        max_buffer = 1 * MiB
        app, far, splice = await pump_rig(pump.new_cipher(KAT_KEY, KAT_IV), None,
                                          max_buffer=max_buffer)
        loop = asyncio.get_running_loop()
        data = os.urandom(40 * MiB)
        sender = loop.create_task(loop.sock_sendall(app, data))
        # let the sender fill every buffer on the way, then check the pump's share
        await until(lambda: splice.bytes_plain_to_relay > 2 * MiB, what="some progress")
        previous = -1
        while splice.bytes_plain_to_relay != previous:
            previous = splice.bytes_plain_to_relay
            await asyncio.sleep(0.05)                     # settle: nothing reads `far`
        assert splice.buffered_plain_to_relay <= max_buffer
        assert not sender.done()                          # the sender is held back
        digest = hashlib.sha256()
        total = 0
        decrypt = CtrStream(KAT_KEY, KAT_IV)
        while total < len(data):
            chunk = await loop.sock_recv(far, 7000)           # small reads: partial writes
            assert chunk
            digest.update(decrypt.update(chunk))
            total += len(chunk)
        await sender
        assert digest.digest() == hashlib.sha256(data).digest()
        app.close()
        far.close()
        await asyncio.wait_for(splice.wait(), 5)

    run(main(), timeout=120)


def test_pump_close_aborts_both(run, event_loop_kind):
    async def main():
        app, far, splice = await pump_rig()
        splice.close()
        result = await asyncio.wait_for(splice.wait(), 5)
        assert result.how_ended == "aborted"
        assert await asyncio.wait_for(recv_all(app), 5) == b""
        assert await asyncio.wait_for(recv_all(far), 5) == b""
        app.close()
        far.close()

    run(main())


def test_control_protocol_holds_back_a_possible_refusal_only_while_it_could_be_one():
    """The relay's plain 'Socket auth failed' is recognised however it is split; ciphertext
    that merely starts like it is decrypted from its very first byte."""
    from noports.tunnel.endpoint import ControlProtocol

    class End:
        def __init__(self):
            self.ended = None

        def _end(self, reason, message):
            self.ended = reason

        def _control_eof(self):
            self.ended = "control_closed"

    class Recorder(ControlProtocol):
        def __init__(self, end, send, recv):
            super().__init__(end, send, recv)
            self.plain = bytearray()

        def plaintext_received(self, data):
            self.plain += data

    end = End()
    proto = Recorder(end, None, None)
    for i in range(len(b"Socket auth failed\n")):
        proto.data_received(b"Socket auth failed\n"[i:i + 1])
    assert end.ended == "relay_refused" and proto.plain == b""

    end = End()
    proto = Recorder(end, None, None)
    for piece in (b"Sock", b"et", b" auth fine\n"):
        proto.data_received(piece)
    assert proto.plain == b"Socket auth fine\n" and end.ended is None

    # a ciphertext that happens to begin with "Socket": held, then decrypted from byte 0
    key, iv = os.urandom(32), os.urandom(16)
    keystream = CtrStream(key, iv).update(bytes(40))
    cipher = b"Socket" + os.urandom(34)
    plain = bytes(a ^ b for a, b in zip(cipher, keystream, strict=True))
    end = End()
    proto = Recorder(end, None, CtrStream(key, iv))
    for i in range(len(cipher)):
        proto.data_received(cipher[i:i + 1])
    assert proto.plain == plain and end.ended is None
