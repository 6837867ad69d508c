"""The toxic proxy (tests/functional/toxic.py): each toxic does what it says, measurably.

A client socket -> the proxy -> a server socket, all on 127.0.0.1; every test runs on stock
asyncio and on uvloop.  Timings are asserted with margins wide enough for a loaded 2-core CI
machine but narrow enough that a toxic that did nothing (or the wrong thing) fails.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import time

import pytest

from tests.functional.toxic import (
    Bandwidth,
    Latency,
    LimitData,
    ResetPeer,
    Slicer,
    SlowClose,
    Timeout,
    ToxicProxy,
)

pytestmark = pytest.mark.fault

HOST = "127.0.0.1"


def socket_count() -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
        except OSError:
            pass
    return count


async def until(predicate, timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.005)


class Rig:
    """An upstream listener, a proxy in front of it, and helpers to open client/server pairs."""

    def __init__(self, **proxy_kw) -> None:
        self.listener = socket.create_server((HOST, 0))
        self.listener.setblocking(False)
        self.proxy = ToxicProxy(self.listener.getsockname()[1], **proxy_kw)
        self.socks: list[socket.socket] = []

    async def __aenter__(self) -> Rig:
        await self.proxy.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.proxy.close()
        for sock in self.socks:
            sock.close()
        self.listener.close()

    async def pair(self) -> tuple[socket.socket, socket.socket]:
        loop = asyncio.get_running_loop()
        client = socket.socket()
        client.setblocking(False)
        self.socks.append(client)
        accept = loop.create_task(loop.sock_accept(self.listener))
        await loop.sock_connect(client, (HOST, self.proxy.port))
        server, _ = await asyncio.wait_for(accept, 5)
        server.setblocking(False)
        self.socks.append(server)
        return client, server


async def recv_n(sock: socket.socket, n: int, sizes: list | None = None) -> bytes:
    loop = asyncio.get_running_loop()
    data = bytearray()
    while len(data) < n:
        chunk = await loop.sock_recv(sock, 1 << 16)
        if not chunk:
            raise EOFError(f"EOF after {len(data)} of {n} bytes")
        if sizes is not None:
            sizes.append(len(chunk))
        data += chunk
    return bytes(data)


async def recv_to_end(sock: socket.socket) -> tuple[bytes, str]:
    """Everything until the peer ends: (bytes, "eof" | "reset")."""
    loop = asyncio.get_running_loop()
    data = bytearray()
    while True:
        try:
            chunk = await loop.sock_recv(sock, 1 << 16)
        except ConnectionResetError:
            return bytes(data), "reset"
        if not chunk:
            return bytes(data), "eof"
        data += chunk


async def nothing_arrives(sock: socket.socket, within: float) -> bool:
    """True if neither data nor EOF arrives within ``within`` s (a must-NOT check)."""
    loop = asyncio.get_running_loop()
    try:
        await asyncio.wait_for(loop.sock_recv(sock, 1), within)
    except asyncio.TimeoutError:
        return True
    return False


async def rtt(client: socket.socket, server: socket.socket) -> float:
    """One 1-byte ping-pong through the proxy, in seconds."""
    loop = asyncio.get_running_loop()
    start = time.monotonic()
    await loop.sock_sendall(client, b"p")
    assert await recv_n(server, 1) == b"p"
    await loop.sock_sendall(server, b"q")
    assert await recv_n(client, 1) == b"q"
    return time.monotonic() - start


# --- pass-through ------------------------------------------------------------------------------

def test_pass_through_tap_records_both_ways_and_half_close(run, event_loop_kind):
    async def main():
        before = socket_count()
        async with Rig(record=True) as rig:
            client, server = await rig.pair()
            conn = await rig.proxy.connection(0)
            loop = asyncio.get_running_loop()
            up, down = os.urandom(3 << 20), os.urandom(2 << 20)

            async def client_side():
                await loop.sock_sendall(client, up)
                client.shutdown(socket.SHUT_WR)        # half-close: down keeps flowing
                return await recv_to_end(client)

            async def server_side():
                got = await recv_to_end(server)
                await loop.sock_sendall(server, down)
                server.shutdown(socket.SHUT_WR)
                return got

            (got_down, how_c), (got_up, how_s) = await asyncio.gather(client_side(),
                                                                      server_side())
            assert (how_c, how_s) == ("eof", "eof")
            assert hashlib.sha256(got_up).digest() == hashlib.sha256(up).digest()
            assert hashlib.sha256(got_down).digest() == hashlib.sha256(down).digest()
            assert bytes(conn.up.log) == up and bytes(conn.down.log) == down
            assert (conn.up.forwarded, conn.down.forwarded) == (len(up), len(down))
            assert await asyncio.wait_for(conn.wait_closed(), 5) == "eof"
            assert rig.proxy.live == 0 and rig.proxy.errors == []
        await until(lambda: socket_count() <= before, what="sockets to close")

    run(main())


def test_upstream_refusing_closes_the_client(run, event_loop_kind):
    async def main():
        probe = socket.create_server((HOST, 0))
        dead = probe.getsockname()[1]
        probe.close()
        async with ToxicProxy(dead) as proxy:
            loop = asyncio.get_running_loop()
            client = socket.socket()
            client.setblocking(False)
            await loop.sock_connect(client, (HOST, proxy.port))
            data, _how = await asyncio.wait_for(recv_to_end(client), 5)
            assert data == b""
            assert (await proxy.connection(0)).how == "upstream_failed"
            client.close()

    run(main())


# --- latency, bandwidth, slicer ---------------------------------------------------------------

def test_latency_with_jitter_delays_each_way_and_keeps_order(run, event_loop_kind):
    async def main():
        async with Rig(seed=7) as rig:
            client, server = await rig.pair()
            base = await rtt(client, server)
            rig.proxy.add(Latency(100, 50))
            samples = [await rtt(client, server) for _ in range(6)]
            # each way 50..150 ms: a round trip 100..300 ms (plus the loop's own overhead)
            assert all(0.1 <= s <= 0.3 + base + 0.25 for s in samples), samples
            assert max(samples) - min(samples) > 0.01, f"no jitter: {samples}"
            # jitter never reorders: 200 small writes arrive as one ordered stream
            loop = asyncio.get_running_loop()
            payload = b"".join(i.to_bytes(2, "big") for i in range(200))
            for i in range(0, len(payload), 2):
                await loop.sock_sendall(client, payload[i:i + 2])
            assert await recv_n(server, len(payload)) == payload

    run(main())


def test_latency_can_be_added_and_removed_per_connection_at_run_time(run, event_loop_kind):
    async def main():
        async with Rig() as rig:
            c0, s0 = await rig.pair()
            c1, s1 = await rig.pair()
            conn0 = await rig.proxy.connection(0)
            handle = rig.proxy.add(Latency(80), where=conn0)
            assert await rtt(c0, s0) >= 0.16           # 80 ms each way, conn 0 only
            assert await rtt(c1, s1) < 0.08
            rig.proxy.remove(handle)
            assert await rtt(c0, s0) < 0.08
            up = rig.proxy.add(Latency(80), direction="up", where=rig.proxy.existing())
            assert 0.08 <= await rtt(c1, s1) < 0.16   # one way only
            c2, s2 = await rig.pair()                  # a later connection: not in `existing`
            assert await rtt(c2, s2) < 0.08
            rig.proxy.remove(up)

    run(main())


def test_bandwidth_limits_the_rate(run, event_loop_kind):
    async def main():
        async with Rig() as rig:
            client, server = await rig.pair()
            rig.proxy.add(Bandwidth(1_000_000), direction="up")
            loop = asyncio.get_running_loop()
            payload = os.urandom(400_000)
            start = time.monotonic()
            sender = loop.create_task(loop.sock_sendall(client, payload))
            assert await recv_n(server, len(payload)) == payload
            elapsed = time.monotonic() - start
            await sender
            assert 0.36 <= elapsed <= 1.0, f"400 kB at 1 MB/s took {elapsed:.3f}s"
            # the other direction is not limited
            start = time.monotonic()
            await loop.sock_sendall(server, payload)
            assert await recv_n(client, len(payload)) == payload
            assert time.monotonic() - start < elapsed / 2

    run(main())


def test_slicer_cuts_into_small_delayed_segments(run, event_loop_kind):
    async def main():
        async with Rig() as rig:
            client, server = await rig.pair()
            conn = await rig.proxy.connection(0)
            rig.proxy.add(Slicer(1, 7, 1, 2), direction="up")
            loop = asyncio.get_running_loop()
            payload = os.urandom(700)
            sizes: list[int] = []
            start = time.monotonic()
            await loop.sock_sendall(client, payload)
            assert await recv_n(server, len(payload), sizes) == payload
            elapsed = time.monotonic() - start
            segs = conn.up.segments
            assert sum(n * k for n, k in segs.items()) == 700
            assert set(segs) <= set(range(1, 8)) and len(set(segs)) >= 5
            assert conn.up.sends == sum(segs.values()) >= 100
            # a pause of at least 1 ms after each segment
            assert elapsed >= conn.up.sends * 0.001
            # the receiver really saw small pieces, not the 700 bytes at once
            assert len(sizes) >= conn.up.sends // 2, (len(sizes), conn.up.sends)
            assert sorted(sizes)[len(sizes) // 2] <= 7

    run(main())


def test_slicer_range_slices_only_those_offsets(run, event_loop_kind):
    async def main():
        async with Rig() as rig:
            client, server = await rig.pair()
            conn = await rig.proxy.connection(0)
            rig.proxy.add(Slicer(1, 1, 0, 0, start=100, stop=150), direction="up")
            loop = asyncio.get_running_loop()
            payload = os.urandom(100_000)
            await loop.sock_sendall(client, payload)
            assert await recv_n(server, len(payload)) == payload
            assert conn.up.segments == {1: 50}
            assert conn.up.sends < 50 + 10               # the rest went in a few big pieces

    run(main())


# --- closes, resets, black holes ---------------------------------------------------------------

def test_slow_close_delays_the_fin_not_the_data(run, event_loop_kind):
    async def main():
        async with Rig() as rig:
            client, server = await rig.pair()
            conn = await rig.proxy.connection(0)
            rig.proxy.add(SlowClose(0.5), direction="up")
            loop = asyncio.get_running_loop()
            start = time.monotonic()
            await loop.sock_sendall(client, b"last words")
            client.shutdown(socket.SHUT_WR)
            assert await recv_n(server, 10) == b"last words"
            assert time.monotonic() - start < 0.45              # data: not delayed
            data, how = await asyncio.wait_for(recv_to_end(server), 5)
            waited = time.monotonic() - start
            assert (data, how) == (b"", "eof")
            assert 0.5 <= waited < 1.5, waited
            assert conn.up.eof_sent_at - start >= 0.5
            # the other direction still works (half-close), and its close is not delayed
            await loop.sock_sendall(server, b"reply")
            server.shutdown(socket.SHUT_WR)
            start = time.monotonic()
            assert await asyncio.wait_for(recv_to_end(client), 5) == (b"reply", "eof")
            assert time.monotonic() - start < 0.45
            assert await asyncio.wait_for(conn.wait_closed(), 5) == "eof"

    run(main())


def test_reset_peer_after_n_bytes(run, event_loop_kind):
    async def main():
        async with Rig() as rig:
            client, server = await rig.pair()
            conn = await rig.proxy.connection(0)
            rig.proxy.add(ResetPeer(after_bytes=1000), direction="up")
            loop = asyncio.get_running_loop()
            payload = os.urandom(5000)
            await loop.sock_sendall(client, payload)
            data, how = await asyncio.wait_for(recv_to_end(server), 5)
            assert (data, how) == (payload[:1000], "reset")
            assert await asyncio.wait_for(conn.wait_closed(), 5) == "reset"
            assert conn.up.forwarded == 1000 and conn.up.cut_at is not None
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(recv_to_end_strict(client), 5)

    run(main())


async def recv_to_end_strict(sock: socket.socket) -> bytes:
    """Like recv_to_end, but a reset raises (for asserting that it IS a reset)."""
    loop = asyncio.get_running_loop()
    data = bytearray()
    while chunk := await loop.sock_recv(sock, 1 << 16):
        data += chunk
    return bytes(data)


def test_reset_peer_added_to_a_live_connection_past_its_count_resets_at_once(
        run, event_loop_kind):
    async def main():
        async with Rig() as rig:
            client, server = await rig.pair()
            conn = await rig.proxy.connection(0)
            loop = asyncio.get_running_loop()
            await loop.sock_sendall(client, b"x" * 100)
            assert await recv_n(server, 100) == b"x" * 100
            start = time.monotonic()
            rig.proxy.add(ResetPeer(after_bytes=50), direction="up")   # already past 50
            assert await asyncio.wait_for(conn.wait_closed(), 5) == "reset"
            assert time.monotonic() - start < 0.5
            assert await asyncio.wait_for(recv_to_end(server), 5) == (b"", "reset")
            # new connections are reset at byte 50 too
            c2, s2 = await rig.pair()
            await loop.sock_sendall(c2, b"y" * 100)
            assert await asyncio.wait_for(recv_to_end(s2), 5) == (b"y" * 50, "reset")

    run(main())


def test_limit_data_closes_cleanly_after_n_bytes(run, event_loop_kind):
    async def main():
        async with Rig() as rig:
            client, server = await rig.pair()
            conn = await rig.proxy.connection(0)
            rig.proxy.add(LimitData(1000), direction="down")
            rig.proxy.add(SlowClose(0.4), direction="down")
            loop = asyncio.get_running_loop()
            payload = os.urandom(50_000)
            sender = loop.create_task(loop.sock_sendall(server, payload))
            data, how = await asyncio.wait_for(recv_to_end(client), 5)
            closed_at = time.monotonic()
            assert (data, how) == (payload[:1000], "eof")   # a FIN, not an RST
            assert closed_at - conn.down.cut_at >= 0.4        # the slow close applies
            client.close()
            # the server is closed on too (FIN; its unsent rest is refused)
            assert (await asyncio.wait_for(recv_to_end(server), 5))[0] == b""
            await asyncio.gather(sender, return_exceptions=True)
            server.close()
            assert await asyncio.wait_for(conn.wait_closed(), 5) == "close"
            assert time.monotonic() - closed_at < 1.0         # not the 2 s linger

    run(main())


@pytest.mark.parametrize("drop", [False, True], ids=["hold", "drop"])
def test_timeout_black_hole_then_recovery(run, event_loop_kind, drop):
    async def main():
        async with Rig() as rig:
            client, server = await rig.pair()
            conn = await rig.proxy.connection(0)
            loop = asyncio.get_running_loop()
            hole = rig.proxy.add(Timeout(drop=drop))
            await loop.sock_sendall(client, b"into the void")
            await loop.sock_sendall(server, b"and back")
            # nothing gets through either way, and nothing is closed
            assert await nothing_arrives(server, 0.3)
            assert await nothing_arrives(client, 0.05)
            assert not conn.closed
            rig.proxy.remove(hole)
            await loop.sock_sendall(client, b"!")
            if drop:
                assert await recv_n(server, 1) == b"!"
                assert await recv_n(client, 0) == b""
                assert conn.up.dropped == len(b"into the void")
                assert conn.down.dropped == len(b"and back")
            else:
                assert await recv_n(server, 14) == b"into the void!"
                assert await recv_n(client, 8) == b"and back"
                assert conn.up.dropped == conn.down.dropped == 0

    run(main())


def test_timeout_holds_the_fin_until_removed(run, event_loop_kind):
    async def main():
        async with Rig() as rig:
            client, server = await rig.pair()
            conn = await rig.proxy.connection(0)
            hole = rig.proxy.add(Timeout(drop=True))
            client.shutdown(socket.SHUT_WR)
            assert await nothing_arrives(server, 0.3)
            rig.proxy.remove(hole)
            assert await asyncio.wait_for(recv_to_end(server), 5) == (b"", "eof")
            server.shutdown(socket.SHUT_WR)
            assert await asyncio.wait_for(conn.wait_closed(), 5) == "eof"

    run(main())


def test_reached_reports_when_bytes_were_delivered(run, event_loop_kind):
    async def main():
        async with Rig() as rig:
            client, server = await rig.pair()
            conn = await rig.proxy.connection(0)
            rig.proxy.add(Latency(50), direction="up")
            loop = asyncio.get_running_loop()
            start = time.monotonic()
            await loop.sock_sendall(client, b"z" * 64)
            when = await conn.up.reached(64, timeout=5)
            assert when - start >= 0.05
            assert await recv_n(server, 64) == b"z" * 64
            client.close()
            with pytest.raises(EOFError):
                await conn.up.reached(10_000, timeout=5)

    run(main())


def test_close_resets_live_connections_and_frees_every_socket(run, event_loop_kind):
    async def main():
        before = socket_count()
        rig = Rig()
        await rig.__aenter__()
        pairs = [await rig.pair() for _ in range(3)]
        rig.proxy.add(Timeout())                        # even held connections are closed
        await rig.proxy.close()
        for client, server in pairs:
            assert (await asyncio.wait_for(recv_to_end(client), 5))[0] == b""
            assert (await asyncio.wait_for(recv_to_end(server), 5))[0] == b""
        assert [c.how for c in rig.proxy.conns] == ["abort"] * 3
        assert rig.proxy.live == 0
        await rig.__aexit__(None, None, None)
        await until(lambda: socket_count() <= before, what="sockets to close")

    run(main())
