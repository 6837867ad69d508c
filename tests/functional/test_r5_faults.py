"""R5 (reliability-checks.md): the fault matrix on every hop, through the toxic proxy.

Hops:

- **client end <-> relay**: a ``ToxicProxy`` in front of the relay's port A; the ClientEnd (what
  npt runs) connects to the proxy, so its control socket (proxy connection 0) and every data
  socket (1, 2, ...) go through it.  The DaemonEnd connects to port B directly.
- **daemon end <-> relay**: the same in front of port B, for the DaemonEnd (what npd runs).
- **AtClient <-> atServer**: proxies in front of an embedded atServer's ports (TLS passes
  through untouched), for the monitor and for notify.

The relay is the in-process ``RelaySession`` with real RSA keys; the ends are
``noports.tunnel`` in-process (npt/npd are not needed to test the hops).

Toxics and what is asserted:

- benign (latency 100 +/- 50 ms, bandwidth 1 MB/s, slicer 1-7 bytes / 0-2 ms, slow_close
  2 s): 16 MiB each way through the encrypted tunnel (2 MiB under the bandwidth toxic), sha256
  equal both ways, and evidence that the toxic really acted.  These heavy rows run once per
  hop (client hop on stock asyncio, daemon hop on uvloop), not once per event loop.
- destructive (reset_peer after N bytes, limit_data, timeout black hole): on the control
  connection both ends end with a clear reason (``control_reset`` / ``control_closed``) within
  5 s (nothing here waits for a keepalive: the RST or FIN arrives), the local application sees
  its connection end, and no socket leaks.  On a data connection only that connection ends and
  the session keeps working.  A black hole followed by recovery loses nothing.

Limitations found (documented here, and shown where a test can show them):

1. **The control socket's auth line must complete at the relay before any data socket's.**
   The relay pairs sockets in the order their auth lines *complete* (spec §5.2), and the ends'
   guard against overtaking (wait until the previous socket's bytes are ACKed, SIOCOUTQ) only
   sees the first TCP hop: a middlebox (this proxy, any user-space proxy) ACKs at once and then
   delivers slowly.  So with the control socket's auth line sliced on the client hop, a local
   connection made before the relay has paired the control sockets can overtake it and be
   mispaired.  The same holds between two data sockets whose auth lines crawl concurrently.
   Achievable, and tested: slicing every data socket's auth line with connections made one
   after another, slicing the whole control channel after its auth line, and slicing the
   control auth line itself when the first local connection comes after the relay paired the
   control sockets (the tests wait for that; npt prints its port before it knows).  On the
   daemon hop the order is safe by construction (data sockets follow connect: lines that
   only arrive once the control pair exists).
2. **TCP keepalive cannot see a black hole**: it is answered by the first middlebox's kernel,
   and the relay is itself such a middlebox.  So the ends watch each other on the control
   channel: the client end sends ``heartbeat:<n>`` (npt: every 15 s, to daemons whose ping
   offers controlChannelHeartbeats), our daemon end echoes it, and each end gives up on a
   peer that has gone silent for one interval + 5 s (``peer_silent``).  Against Atsign's
   daemons, which never write on the control channel, the client end keeps no such watch and
   a black hole stays undetected.
3. **A data socket that the relay never pairs shifts the pairing of every later one.**  If a
   data socket is reset (or refused: auth deadline) before its auth line completes, its
   ``connect:`` line has still reached the daemon, whose socket for it then waits on side B
   and is paired with the *next* client socket.  Neither end notices; an echo service even
   looks right (one key both ways: the wrong keystream goes in and comes out again), only the
   target would see garbage.  So an end whose data socket is reset on the relay side before
   any byte came from the relay ends the whole session (``pairing_lost``), tested below.  A
   refusal that closes with a FIN after ``Socket auth failed`` is not told apart from a
   paired peer's data, so it is not caught.  (The ends once waited up to 2 s, on the relay's
   auth clock, for an earlier data socket's bulk bytes to be ACKed; now only its auth line
   counts, before the connect: test_tunnel_regressions.py.)
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib.util
import os
import random
import socket
import time
from dataclasses import dataclass, field

import pytest

from noports.at.client import AtClient
from noports.at.crypto import generate_aes_key_b64, generate_iv_b64
from noports.relay import RelaySessions
from noports.tunnel import ClientEnd, DaemonEnd
from noports.tunnel.endpoint import _CONTROL_FLUSH
from tests.functional.relay_helpers import (
    Opened,
    fast_config,
    open_session,
    receive_all,
    send_random,
)
from tests.functional.toxic import (
    Bandwidth,
    Latency,
    LimitData,
    ResetPeer,
    Slicer,
    SlowClose,
    Timeout,
    ToxicProxy,
    where_index_at_least,
)

pytestmark = pytest.mark.fault

HOST = "127.0.0.1"
MiB = 1 << 20
CLIENT, DAEMON = "@r5client", "@r5daemon"
CONNECT_LINE = 78                  # b"connect:<44>:<24>\n", encrypted 1:1 on the control channel
DETECT = 5.0                       # "within keepalive + 5 s": no keepalive is needed for RST/FIN

# The heavy rows run once per hop; the hops take different loops so both loops are covered.
SECOND_LOOP = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
HOP_LOOPS = [pytest.param("client", "asyncio", id="client-hop"),
             pytest.param("daemon", SECOND_LOOP, id="daemon-hop")]


def socket_count() -> int:
    """Open sockets of this process (only sockets: the compiled pumps keep a pipe pool)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
        except OSError:
            pass
    return count


async def until(predicate, timeout: float = 10.0, what: str = "condition") -> float:
    """Wait (bounded) for state with no event of its own; returns when it became true."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.005)
    return time.monotonic()


# --- the relay, the proxy on one hop, the two ends ------------------------------------------------

@dataclass
class Rig:
    hop: str                                # "client" or "daemon": where the proxy sits
    registry: RelaySessions
    relay: Opened
    proxy: ToxicProxy

    @property
    def session(self):
        return self.relay.session

    @property
    def auth_line(self) -> bytes:
        """The auth line of the proxied end."""
        return self.relay.line_a if self.hop == "client" else self.relay.line_b

    @property
    def connect_dir(self) -> str:
        """The proxy direction that carries connect: lines on connection 0."""
        return "up" if self.hop == "client" else "down"

    @property
    def connect_offset(self) -> int:
        """Where the first connect: line starts in that direction of connection 0."""
        return len(self.relay.line_a) if self.hop == "client" else 0

    def proxied(self, client: ClientEnd, daemon: DaemonEnd):
        """(the end behind the proxy, the other end)."""
        return (client, daemon) if self.hop == "client" else (daemon, client)


@contextlib.asynccontextmanager
async def relay_and_proxy(hop: str, **config):
    registry = RelaySessions(fast_config(**{"auth_timeout": 5.0, "pairing_timeout": 20.0,
                                            **config}))
    relay = await open_session(registry, CLIENT, DAEMON)
    port = relay.port_a if hop == "client" else relay.port_b
    proxy = ToxicProxy(port, seed=random.randrange(1 << 30))
    await proxy.start()
    try:
        yield Rig(hop, registry, relay, proxy)
    finally:
        await proxy.close()
        await registry.close()


@contextlib.asynccontextmanager
async def tunnel(rig: Rig, target_port: int, *, wait_pair: bool = True, client_kw=None,
                 daemon_kw=None):
    """A DaemonEnd then a ClientEnd, the proxied one through the proxy; both closed at the end.

    ``wait_pair``: return only once the relay has paired the control sockets (limitation 1 in
    the module docstring)."""
    key, iv = generate_aes_key_b64(), generate_iv_b64()
    relay = rig.relay
    port_a = rig.proxy.port if rig.hop == "client" else relay.port_a
    port_b = rig.proxy.port if rig.hop == "daemon" else relay.port_b
    daemon = DaemonEnd(HOST, port_b, relay.line_b, session_key=key, session_iv=iv,
                       target_host=HOST, target_port=target_port, **(daemon_kw or {}))
    client = ClientEnd(HOST, port_a, relay.line_a, session_key=key, session_iv=iv,
                       **{"idle_timeout": 60, **(client_kw or {})})
    try:
        await daemon.start()
        await client.start()
        if wait_pair:
            await until(lambda: rig.session.pairs_total >= 1, 15, "the control pair")
        yield client, daemon
    finally:
        await asyncio.wait_for(client.close(), 15)
        await asyncio.wait_for(daemon.close(), 15)


async def no_leaks(rig: Rig, baseline: int, timeout: float = 15.0) -> None:
    """After both ends closed: every proxied connection closes and this process's sockets go
    back to ``baseline`` (taken once the relay session, the proxy and the target were up).

    The relay session is ended first: it keeps authenticated sockets that never got a partner
    until then, and such a socket keeps its proxied connection open.  A socket an end leaked
    stays open whatever the relay does, so this hides nothing of theirs; the session's two
    listening sockets, counted in ``baseline``, are gone after it."""
    await rig.session.close()
    await until(lambda: rig.proxy.live == 0, timeout, "proxied connections to close")
    expected = baseline - 2
    await until(lambda: socket_count() <= expected, timeout, f"sockets back to {expected}")
    assert rig.proxy.errors == []


# --- targets and local applications ---------------------------------------------------------------

@dataclass
class Target:
    """A TCP server on 127.0.0.1: echo, or (``nbytes``) send a seeded stream while reading.

    The echo also keeps (length, sha256) of what each connection received (``got``): an echo
    alone cannot reveal a mispaired connection, because with the baseline's one key and IV for
    both directions the wrong keystream is XORed in on the way to the target and out again on
    the way back."""

    nbytes: int = 0
    seed: int = 0
    listener: socket.socket | None = None
    port: int = 0
    live: int = 0
    accepted: int = 0
    results: list = field(default_factory=list)   # bulk: (sent_digest, (got_n, got_digest))
    got: list = field(default_factory=list)       # echo: (n, sha256 hex) per finished conn
    fin_sent_at: list = field(default_factory=list)
    tasks: set = field(default_factory=set)
    accept_task: asyncio.Task | None = None

    async def start(self) -> Target:
        self.listener = socket.create_server((HOST, 0))
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]
        self.accept_task = asyncio.get_running_loop().create_task(self._accept())
        return self

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(self.listener)
            conn.setblocking(False)
            self.accepted += 1
            self.live += 1
            task = loop.create_task(self._serve(conn))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _serve(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            if self.nbytes:
                async def send() -> str:
                    digest = await send_random(conn, self.nbytes, self.seed)
                    self.fin_sent_at.append(time.monotonic())
                    return digest
                self.results.append(await asyncio.gather(send(), receive_all(conn)))
            else:
                digest, total = hashlib.sha256(), 0
                while data := await loop.sock_recv(conn, 1 << 18):
                    digest.update(data)
                    total += len(data)
                    await loop.sock_sendall(conn, data)
                self.got.append((total, digest.hexdigest()))
                conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        finally:
            conn.close()
            self.live -= 1

    async def __aenter__(self) -> Target:
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        tasks = [t for t in (self.accept_task, *self.tasks) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.listener.close()


async def local_connect(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, (HOST, port))
    except BaseException:
        sock.close()
        raise
    return sock


async def read_to_end(sock: socket.socket) -> tuple[int, str]:
    """Bytes until the connection ends, and how: "eof" or "reset"."""
    loop = asyncio.get_running_loop()
    total = 0
    while True:
        try:
            chunk = await loop.sock_recv(sock, 1 << 18)
        except (ConnectionResetError, BrokenPipeError):
            return total, "reset"
        if not chunk:
            return total, "eof"
        total += len(chunk)


async def echo(target: Target, port: int, payload: bytes) -> bool:
    """Send ``payload`` through the tunnel to the echo target, half-close, read the echo to
    EOF: True if the echo is intact AND the target received exactly ``payload``."""
    sock = await local_connect(port)
    loop = asyncio.get_running_loop()
    expected = (len(payload), hashlib.sha256(payload).hexdigest())
    finished = len(target.got)
    try:
        async def send() -> None:
            await loop.sock_sendall(sock, payload)
            sock.shutdown(socket.SHUT_WR)
        sender = loop.create_task(send())
        data = bytearray()
        while chunk := await loop.sock_recv(sock, 1 << 18):
            data += chunk
        await sender
    finally:
        sock.close()
    await until(lambda: len(target.got) > finished, DETECT, "the target to finish")
    return bytes(data) == payload and expected in target.got[finished:]


class Streamer:
    """A local application streaming into an echo target: a 1 MiB random block over and over,
    ``nbytes`` in all (default: until cut off), checking the echo against the pattern."""

    BLOCK = 1 << 20

    def __init__(self, sock: socket.socket, nbytes: int = 1 << 40) -> None:
        self.sock = sock
        self.nbytes = nbytes
        self.block = os.urandom(self.BLOCK)
        self.received = 0
        self.intact = True
        loop = asyncio.get_running_loop()
        self.sender = loop.create_task(self._send())
        self.reader = loop.create_task(self._read())

    async def _send(self) -> None:
        loop = asyncio.get_running_loop()
        view = memoryview(self.block)
        sent = 0
        with contextlib.suppress(OSError):
            while sent < self.nbytes:
                n = min(self.BLOCK, self.nbytes - sent)
                await loop.sock_sendall(self.sock, view[:n])
                sent += n

    async def _read(self) -> str:
        loop = asyncio.get_running_loop()
        while True:
            try:
                chunk = await loop.sock_recv(self.sock, 1 << 18)
            except OSError:
                return "reset"
            if not chunk:
                return "eof"
            start = self.received % self.BLOCK
            expected = (self.block[start:] + self.block)[:len(chunk)]
            self.intact = self.intact and chunk == expected
            self.received += len(chunk)
            if self.received >= self.nbytes:
                return "complete"

    async def ended(self, timeout: float) -> str:
        how = await asyncio.wait_for(self.reader, timeout)
        self.sender.cancel()
        await asyncio.gather(self.sender, return_exceptions=True)
        return how

    def close(self) -> None:
        for task in (self.sender, self.reader):
            task.cancel()
        self.sock.close()


# === benign toxics: 16 MiB each way, sha256 equal =================================================

def add_benign(rig: Rig, toxic: str) -> None:
    proxy = rig.proxy
    if toxic == "latency":
        proxy.add(Latency(100, 50))
    elif toxic == "bandwidth":
        proxy.add(Bandwidth(1_000_000))
    elif toxic == "slicer":
        # the whole control channel (auth line and every connect: line), both ways; on data
        # sockets the auth line and the first bytes -- 16 MiB sliced would take over an hour
        proxy.add(Slicer(1, 7, 0, 2), where=0)
        proxy.add(Slicer(1, 7, 0, 2, stop=len(rig.auth_line) + 2048),
                  where=where_index_at_least(1))
    elif toxic == "slow_close":
        proxy.add(SlowClose(2.0))
    else:  # pragma: no cover
        raise AssertionError(toxic)


BENIGN_BYTES = {"latency": 16 * MiB, "bandwidth": 2 * MiB, "slicer": 16 * MiB,
                "slow_close": 16 * MiB}


@pytest.mark.parametrize("toxic", list(BENIGN_BYTES))
@pytest.mark.parametrize(("hop", "event_loop_kind"), HOP_LOOPS)
def test_benign_toxic_carries_each_way_intact(run, hop, event_loop_kind, toxic):
    nbytes = BENIGN_BYTES[toxic]
    seed = random.randrange(1 << 30)

    async def main():
        async with relay_and_proxy(hop) as rig, \
                Target(nbytes=nbytes, seed=seed + 1) as target:
            baseline = socket_count()
            add_benign(rig, toxic)
            async with tunnel(rig, target.port) as (client, daemon):
                started = time.monotonic()
                sock = await local_connect(client.local_port)
                loop = asyncio.get_running_loop()
                first_byte = loop.create_future()

                async def receive() -> tuple[int, str]:
                    digest = hashlib.sha256()
                    total = 0
                    while chunk := await loop.sock_recv(sock, 1 << 18):
                        if not first_byte.done():
                            first_byte.set_result(time.monotonic())
                        total += len(chunk)
                        digest.update(chunk)
                    return total, digest.hexdigest()

                try:
                    sent, got = await asyncio.gather(send_random(sock, nbytes, seed), receive())
                finally:
                    sock.close()
                app_eof_at = time.monotonic()
                elapsed = app_eof_at - started
                await until(lambda: len(target.results) == 1, 10, "the target to finish")
                target_sent, target_got = target.results[0]
                assert target_got == (nbytes, sent), f"app->target corrupt (seed {seed})"
                assert got == (nbytes, target_sent), f"target->app corrupt (seed {seed})"
                await until(lambda: client.stats.connections_live == 0
                            and daemon.stats.connections_live == 0, 15, "connections to end")
                for end in (client, daemon):
                    assert end.stats.connections_failed == 0
                    assert end.stats.bytes_to_relay == end.stats.bytes_from_relay == nbytes
                data_conn = rig.proxy.conns[1]
                assert data_conn.up.forwarded == len(rig.auth_line) + nbytes
                assert data_conn.down.forwarded == nbytes

                # evidence that the toxic acted
                if toxic == "latency":
                    assert first_byte.result() - started >= 0.05
                elif toxic == "bandwidth":
                    assert elapsed >= nbytes / 1_000_000 * 0.9, elapsed
                elif toxic == "slicer":
                    control = rig.proxy.conns[0]
                    assert sum(k * n for k, n in control.up.segments.items()) == \
                        control.up.forwarded >= len(rig.auth_line)
                    connects = getattr(control, rig.connect_dir)
                    assert connects.forwarded - rig.connect_offset == CONNECT_LINE
                    assert sum(k * n for k, n in connects.segments.items()) == \
                        connects.forwarded and set(connects.segments) <= set(range(1, 8))
                    sliced_up = sum(k * n for k, n in data_conn.up.segments.items())
                    assert sliced_up == len(rig.auth_line) + 2048
                elif toxic == "slow_close":
                    # the target's FIN crossed the proxy 2 s late
                    assert app_eof_at - target.fin_sent_at[0] >= 1.9
                    assert app_eof_at - target.fin_sent_at[0] < 2.0 + DETECT

                # closing the proxied end ends the other one too, through the proxy
                proxied, other = rig.proxied(client, daemon)
                closing = time.monotonic()
                await asyncio.wait_for(proxied.close(), _CONTROL_FLUSH + 2)
                ended = await asyncio.wait_for(other.wait_closed(), 2.0 + DETECT)
                took = time.monotonic() - closing
                assert ended.reason == "control_closed", ended
                assert took < (2.0 if toxic == "slow_close" else 0.0) + DETECT
                if toxic == "slow_close":
                    assert took >= 1.9, took
            await no_leaks(rig, baseline)

    run(main(), timeout=120)


# === auth lines sliced ============================================================================

@pytest.mark.parametrize(("hop", "event_loop_kind"), HOP_LOOPS)
def test_auth_line_in_one_byte_segments_within_5s_still_authenticates(run, hop,
                                                                       event_loop_kind):
    """Client hop: the control socket's auth line; daemon hop: every data socket's auth line.
    One byte per TCP segment, 2-3 ms apart: about 2 s for the ~700-byte line, inside the
    relay's production 5 s auth deadline."""
    async def main():
        async with relay_and_proxy(hop, auth_timeout=5.0) as rig, Target() as target:
            stop = len(rig.auth_line)
            crawl = Slicer(1, 1, 2, 3, stop=stop)
            if hop == "client":
                rig.proxy.add(crawl, direction="up", where=0)
            else:
                rig.proxy.add(crawl, direction="up", where=where_index_at_least(1))
            async with tunnel(rig, target.port) as (client, _daemon):
                for _ in range(2):            # one after the other (limitation 1)
                    payload = os.urandom(256 * 1024)
                    assert await echo(target, client.local_port, payload)
                sliced = [rig.proxy.conns[0]] if hop == "client" else rig.proxy.conns[1:3]
                for conn in sliced:
                    arrived = await conn.up.reached(stop, timeout=1)
                    took = arrived - conn.up.first_sent_at
                    assert conn.up.segments == {1: stop}
                    assert 1.0 <= took < 5.0, f"auth line took {took:.2f}s"
                assert rig.session.auth_failures == 0
                assert rig.session.pairs_total == 3

    run(main(), timeout=60)


def test_auth_line_slower_than_the_deadline_is_refused_with_a_clear_error(run):
    """The same crawl against a 1 s auth deadline: the relay refuses the control socket and
    the client end says so (relay_refused), well within 5 s of the deadline."""
    async def main():
        async with relay_and_proxy("client", auth_timeout=1.0) as rig, Target() as target:
            rig.proxy.add(Slicer(1, 1, 2, 3, stop=len(rig.auth_line)), direction="up")
            async with tunnel(rig, target.port, wait_pair=False) as (client, daemon):
                start = time.monotonic()
                ended = await asyncio.wait_for(client.wait_closed(), 1.0 + DETECT)
                assert ended.reason == "relay_refused", ended
                assert "Socket auth failed" in ended.message
                assert time.monotonic() - start < 1.0 + DETECT
                assert rig.session.auth_failures == 1
                assert daemon.state == "open"         # its side never paired: idle will end it

    run(main(), timeout=30)


# === destructive toxics on the control connection ================================================

@pytest.mark.parametrize("toxic", ["reset_peer", "limit_data"])
@pytest.mark.parametrize("hop", ["client", "daemon"])
def test_control_connection_cut_ends_both_ends_clearly(run, event_loop_kind, hop, toxic):
    """The second connect: line is cut 40 bytes in (RST or FIN) while connection 1 streams:
    both ends end with a control_* reason within 5 s, the local applications see their
    connections end, the target's connections close, no socket leaks."""
    async def main():
        async with relay_and_proxy(hop) as rig, Target() as target:
            baseline = socket_count()
            cut_at_byte = rig.connect_offset + CONNECT_LINE + 40
            kind = ResetPeer(cut_at_byte) if toxic == "reset_peer" else LimitData(cut_at_byte)
            rig.proxy.add(kind, direction=rig.connect_dir, where=0)
            async with tunnel(rig, target.port) as (client, daemon):
                streamer = Streamer(await local_connect(client.local_port))
                await until(lambda: streamer.received > 2 * MiB, 20, "streaming")
                second = await local_connect(client.local_port)   # its connect: is cut
                control = rig.proxy.conns[0]
                await asyncio.wait_for(control.wait_closed(), 10)
                ended = await asyncio.wait_for(
                    asyncio.gather(client.wait_closed(), daemon.wait_closed()), DETECT)
                detected = time.monotonic() - getattr(control, rig.connect_dir).cut_at
                assert detected < DETECT
                expected = "reset" if toxic == "reset_peer" else "close"
                assert control.how == expected
                proxied, _other = rig.proxied(client, daemon)
                for end in ended:
                    assert end.reason in ("control_reset", "control_closed"), end
                    assert "control" in end.message
                if toxic == "reset_peer":
                    assert proxied.ended.reason == "control_reset"
                    assert "reset" in proxied.ended.message.lower()
                else:
                    assert proxied.ended.reason == "control_closed"
                # the applications see the end (EOF or RST), and nothing wrong was delivered
                assert await streamer.ended(DETECT) in ("eof", "reset")
                assert streamer.intact
                assert (await asyncio.wait_for(read_to_end(second), DETECT))[0] == 0
                second.close()
                streamer.close()
                await until(lambda: target.live == 0, DETECT, "target connections to close")
            await no_leaks(rig, baseline)

    run(main(), timeout=60)


# === destructive toxics on a data connection: only that connection ends ==========================

# This test once failed about 1 run in 30 ([uvloop-daemon-reset_peer]): the proxy's last bytes
# and its RST reached the relay's socket in one wake-up; uvloop reports POLLERR once and then
# stops polling the fd, and the compiled pumps, which skipped "the read that would only say
# EAGAIN" after a short read, never read the reset, so the cut pair hung.  Fixed in both pumps;
# the pump contract tests "bytes then a reset in one wake-up" pin it down deterministically.
# pairing_lost cannot fire here: the cut comes after the auth line + 1 MiB, so the ClientEnd has
# sent more than _UNPAIRED_ABSORBS, or the DaemonEnd has received and echoed bytes.
@pytest.mark.parametrize("toxic", ["reset_peer", "limit_data"])
@pytest.mark.parametrize("hop", ["client", "daemon"])
def test_data_connection_cut_ends_only_that_connection(run, event_loop_kind, hop, toxic):
    async def main():
        async with relay_and_proxy(hop) as rig, Target() as target:
            baseline = socket_count()
            after = len(rig.auth_line) + 1 * MiB
            kind = ResetPeer(after) if toxic == "reset_peer" else LimitData(after)
            handle = rig.proxy.add(kind, direction="up", where=1)
            async with tunnel(rig, target.port) as (client, daemon):
                streamer = Streamer(await local_connect(client.local_port), 16 * MiB)
                how = await streamer.ended(DETECT + 5)
                data_conn = rig.proxy.conns[1]
                await asyncio.wait_for(data_conn.wait_closed(), DETECT)
                assert data_conn.how == ("reset" if toxic == "reset_peer" else "close")
                assert data_conn.up.forwarded == after
                assert how in ("eof", "reset")
                # truncated, never corrupted (and no integrity check can tell: spec §6)
                assert streamer.received < streamer.nbytes
                assert streamer.intact
                streamer.close()
                await until(lambda: target.live == 0, DETECT, "target connection to close")
                await until(lambda: client.stats.connections_live == 0
                            and daemon.stats.connections_live == 0, DETECT, "connections end")
                # the session itself is unharmed: both ends open, a new connection works
                assert client.state == daemon.state == "open"
                rig.proxy.remove(handle)
                payload = os.urandom(1 * MiB)
                assert await echo(target, client.local_port, payload)
                assert client.stats.connections_failed == daemon.stats.connections_failed == 0
            await no_leaks(rig, baseline)

    run(main(), timeout=60)


def test_data_socket_reset_inside_its_auth_line_ends_the_session_clearly(run):
    """reset_peer 100 bytes into the first data socket's auth line (client hop).  The relay
    refuses that socket, but its connect: line has reached the daemon, whose socket for it
    waits on side B for a partner, so FIFO pairing is out of step (limitation 3).  The client
    end ends the session with ``pairing_lost``, the daemon end follows, and no byte reaches
    the target through a mispaired connection."""
    async def main():
        async with relay_and_proxy("client") as rig, Target() as target:
            cut = rig.proxy.add(ResetPeer(100), direction="up", where=1)
            async with tunnel(rig, target.port) as (client, daemon):
                sock = await local_connect(client.local_port)
                assert (await asyncio.wait_for(read_to_end(sock), DETECT))[0] == 0
                sock.close()
                assert rig.proxy.conns[1].how == "reset"
                await until(lambda: rig.session.auth_failures == 1, DETECT, "the refusal")
                ended = await asyncio.wait_for(client.wait_closed(), DETECT)
                assert ended.reason == "pairing_lost", ended
                ended = await asyncio.wait_for(daemon.wait_closed(), DETECT)
                assert ended.reason in ("control_closed", "control_reset"), ended
                rig.proxy.remove(cut)
                # a later connection cannot be made, let alone mispaired
                try:
                    later = await local_connect(client.local_port)
                except OSError:
                    pass
                else:
                    await loop_send(later, os.urandom(10_000))
                    assert (await asyncio.wait_for(read_to_end(later), DETECT))[0] == 0
                    later.close()
                await until(lambda: target.live == 0, DETECT, "target connections to end")
                assert all(n == 0 for n, _digest in target.got), \
                    f"bytes reached the target through a mispaired connection: {target.got}"

    run(main(), timeout=30)


async def loop_send(sock: socket.socket, data: bytes) -> None:
    with contextlib.suppress(OSError):
        await asyncio.get_running_loop().sock_sendall(sock, data)


# === timeout black hole ===========================================================================

@pytest.mark.parametrize("hop", ["client", "daemon"])
def test_black_hole_then_recovery_loses_nothing(run, event_loop_kind, hop):
    """Every connection of the hop black-holed (held) mid-transfer: the transfer stops, no end
    reports an error, and once the hole heals everything arrives intact."""
    async def main():
        async with relay_and_proxy(hop) as rig, Target() as target:
            baseline = socket_count()
            async with tunnel(rig, target.port) as (client, daemon):
                # more than every buffer on the way can hold (pumps, proxy, kernels)
                streamer = Streamer(await local_connect(client.local_port), 64 * MiB)
                await until(lambda: streamer.received > 1 * MiB, 20, "streaming")
                hole = rig.proxy.add(Timeout())
                # let what was past the proxy drain, then nothing may move for a while
                settled = -1
                while settled != streamer.received:
                    settled = streamer.received
                    await asyncio.sleep(0.2)      # sampling a byte count, bounded by the loop
                await asyncio.sleep(0.5)
                assert streamer.received == settled < streamer.nbytes
                assert client.state == daemon.state == "open"
                rig.proxy.remove(hole)
                assert await streamer.ended(30) == "complete"
                assert streamer.intact and streamer.received == streamer.nbytes
                streamer.close()
                await until(lambda: client.stats.connections_live == 0, DETECT, "conn end")
                assert client.state == daemon.state == "open"
                assert client.stats.connections_failed == daemon.stats.connections_failed == 0
            await no_leaks(rig, baseline)

    run(main(), timeout=60)


@pytest.mark.parametrize("hop", ["client", "daemon"])
def test_closing_an_end_inside_a_black_hole_does_not_hang(run, event_loop_kind, hop):
    """The proxied end is closed while its hop eats everything (drop mode): close() returns
    within its flush limit; the other end learns once the hole heals (within 5 s of it); no
    socket leaks."""
    async def main():
        async with relay_and_proxy(hop) as rig, Target() as target:
            baseline = socket_count()
            async with tunnel(rig, target.port) as (client, daemon):
                streamer = Streamer(await local_connect(client.local_port))
                await until(lambda: streamer.received > 1 * MiB, 20, "streaming")
                hole = rig.proxy.add(Timeout(drop=True))
                proxied, other = rig.proxied(client, daemon)
                start = time.monotonic()
                await asyncio.wait_for(proxied.close(), _CONTROL_FLUSH + 3)
                assert time.monotonic() - start < _CONTROL_FLUSH + 1.5
                assert proxied.ended.reason == "closed"
                rig.proxy.remove(hole)
                healed = time.monotonic()
                ended = await asyncio.wait_for(other.wait_closed(), DETECT)
                assert ended.reason in ("control_closed", "control_reset"), ended
                assert time.monotonic() - healed < DETECT
                assert await streamer.ended(DETECT) in ("eof", "reset")
                assert streamer.intact
                streamer.close()
                await until(lambda: target.live == 0, DETECT, "target connection to close")
            await no_leaks(rig, baseline)

    run(main(), timeout=60)


HEARTBEAT = 0.5          # the "keepalive" of this row: the client end's heartbeat interval


@pytest.mark.parametrize("hop", ["client", "daemon"])
def test_black_hole_is_detected_within_keepalive_plus_5s(run, event_loop_kind, hop):
    """R5, timeout black hole for good, mid-transfer: every connection of the hop swallows
    bytes both ways and never closes.  The client end sends a heartbeat every HEARTBEAT s on
    the control channel; the daemon end echoes each.  Once the hole opens neither sees the
    other, and both end with ``peer_silent`` within keepalive + 5 s (TCP keepalive could not:
    the proxy's kernel answers it, as the relay's would); the local application sees its
    connection end, and nothing leaks."""
    async def main():
        async with relay_and_proxy(hop) as rig, Target() as target:
            baseline = socket_count()
            async with tunnel(rig, target.port,
                              client_kw={"heartbeat_interval": HEARTBEAT}) as (client, daemon):
                await until(lambda: client.heartbeat_echoes >= 2, DETECT, "heartbeat echoes")
                streamer = Streamer(await local_connect(client.local_port))
                await until(lambda: streamer.received > 1 * MiB, 20, "streaming")
                hole = rig.proxy.add(Timeout(drop=True))
                holed = time.monotonic()
                try:
                    ended = await asyncio.wait_for(
                        asyncio.gather(client.wait_closed(), daemon.wait_closed()),
                        HEARTBEAT + DETECT + 1.0)
                except asyncio.TimeoutError:
                    raise AssertionError(
                        f"black hole undetected after {HEARTBEAT + DETECT + 1:g}s: client end "
                        f"{client.state}, daemon end {daemon.state}") from None
                took = time.monotonic() - holed
                assert [e.reason for e in ended] == ["peer_silent", "peer_silent"], ended
                assert "daemon" in ended[0].message
                assert "client" in ended[1].message
                # "within keepalive + 5 s" (plus the scheduling slack of a loaded 2-core box)
                assert took < HEARTBEAT + DETECT + 1.0, took
                assert await streamer.ended(DETECT) in ("eof", "reset")
                assert streamer.intact
                streamer.close()
                await until(lambda: target.live == 0, DETECT, "target connection to close")
                # the proxy in drop mode holds its side open (as a dead path may): heal it so
                # that what is left to check is our sockets, not the proxy's
                rig.proxy.remove(hole)
            await no_leaks(rig, baseline)

    run(main(), timeout=60)


def test_a_short_black_hole_within_the_grace_does_not_end_the_session(run):
    """A hole shorter than heartbeat + grace (a stall, not a dead path) ends nothing: the
    echoes resume, the transfer completes intact."""
    async def main():
        async with relay_and_proxy("client") as rig, Target() as target, \
                tunnel(rig, target.port,
                       client_kw={"heartbeat_interval": HEARTBEAT}) as (client, daemon):
                await until(lambda: client.heartbeat_echoes >= 2, DETECT, "heartbeat echoes")
                streamer = Streamer(await local_connect(client.local_port), 32 * MiB)
                await until(lambda: streamer.received > 1 * MiB, 20, "streaming")
                hole = rig.proxy.add(Timeout())
                echoes = client.heartbeat_echoes
                await asyncio.sleep(2.0)      # the length of the stall under test, not a sync
                assert client.heartbeat_echoes == echoes, "echoes crossed the hole"
                rig.proxy.remove(hole)
                await until(lambda: client.heartbeat_echoes > echoes, DETECT, "echoes resume")
                assert await streamer.ended(30) == "complete"
                assert streamer.intact
                streamer.close()
                assert client.state == daemon.state == "open"

    run(main(), timeout=60)


def test_a_daemon_that_never_echoes_is_not_watched(run):
    """Atsign's daemons log heartbeats and write nothing back: the client end must not take
    that silence for a dead path.  (A daemon end whose echo is switched off stands in for
    them; the session stays up well past heartbeat + grace with no traffic at all.)"""
    async def main():
        async with relay_and_proxy("client") as rig, Target() as target, \
                tunnel(rig, target.port,
                       client_kw={"heartbeat_interval": 0.2, "heartbeat_grace": 0.3},
                       daemon_kw={"echo_heartbeats": False}) as (client, daemon):
                await until(lambda: daemon.stats.control_messages >= 8, DETECT, "heartbeats")
                assert client.heartbeat_echoes == 0
                assert client.state == daemon.state == "open"
                assert await echo(target, client.local_port, os.urandom(100_000))
                assert client.state == daemon.state == "open"

    run(main(), timeout=30)


# === AtClient <-> atServer ========================================================================

def at_client(proc, atsign: str, port: int | None = None, **kw) -> AtClient:
    """An AtClient for ``atsign`` on the shared atServer, through ``port`` (a proxy) if given."""
    return AtClient(atsign, proc.keys(atsign),
                    server=f"{HOST}:{port if port is not None else proc.ports[atsign]}",
                    ca_file=str(proc.ca_file), **kw)


async def collect(mon, n: int, timeout: float = 20.0) -> list:
    return [await mon.get(timeout) for _ in range(n)]


async def nothing_more(mon, within: float = 1.0) -> list:
    """Anything delivered beyond what was expected (a must-NOT check, bounded)."""
    try:
        return [await mon.get(within)]
    except asyncio.TimeoutError:
        return []


_tag_counter = iter(range(1_000_000))


def unique_tag() -> str:
    return f"r5x{os.getpid()}x{next(_tag_counter)}"


@pytest.mark.parametrize("toxic", ["reset_peer", "limit_data", "slow_close"])
def test_monitor_exactly_once_across_a_cut_mid_notification(shared_atserver, run,
                                                            event_loop_kind, toxic):
    """The monitor's connection is cut 200 bytes into a notification (RST; FIN; FIN held 2 s
    by slow_close): the monitor reconnects, replays, and every notification arrives exactly
    once, in order; the cut one included."""
    proc = shared_atserver
    tag = unique_tag()

    async def main():
        async with ToxicProxy(proc.ports["@bob"]) as proxy:
            async with at_client(proc, "@alice") as alice, \
                    at_client(proc, "@bob", proxy.port) as bob:
                mon = bob.monitor(rf"\.{tag}@alice", backoff_base=0.05, backoff_cap=0.2)
                await mon.start()
                sent = [await alice.notify(f"@bob:n{i}.{tag}", f"value {i}") for i in range(3)]
                got = await collect(mon, 3)
                assert len(proxy.conns) == 2            # bob's main connection, then the monitor's
                conn = proxy.conns[1]
                after = conn.down.forwarded + 200
                cut = ResetPeer(after) if toxic == "reset_peer" else LimitData(after)
                proxy.add(cut, direction="down", where=conn)
                if toxic == "slow_close":
                    proxy.add(SlowClose(2.0), direction="down", where=conn)
                sent.append(await alice.notify(f"@bob:n3.{tag}", "value 3"))   # cut mid-way
                await until(lambda: conn.down.cut_at is not None, 10, "the cut")
                cut_at = conn.down.cut_at
                # the proxy held more of that notification than it let through: cut mid-record
                assert conn.down.forwarded == after < conn.down.received
                dropped_at = await until(lambda: mon.drops >= 1, 2.0 + DETECT + 1,
                                         "the monitor to see the cut")
                if toxic == "slow_close":
                    assert 1.9 <= dropped_at - cut_at < 2.0 + DETECT, dropped_at - cut_at
                else:
                    assert dropped_at - cut_at < DETECT
                sent += [await alice.notify(f"@bob:n{i}.{tag}", f"value {i}") for i in range(4, 7)]
                got += await collect(mon, 4)
                extra = await nothing_more(mon)
                await asyncio.wait_for(conn.wait_closed(), 10)
                assert conn.how == ("reset" if toxic == "reset_peer" else "close")
                assert extra == []
                assert [n.id for n in got] == sent
                assert [n.value for n in got] == [f"value {i}" for i in range(7)]
                assert mon.drops >= 1 and mon.connects >= 2
                await mon.close()
            # every connection bob opened through the proxy (main, monitor, failed
            # tries) is closed again
            await until(lambda: proxy.live == 0, 10, "bob's connections to close")
        assert proxy.errors == []

    run(main(), timeout=60)


def test_monitor_recovers_from_a_black_hole_exactly_once(shared_atserver, run,
                                                         event_loop_kind):
    """Every connection to bob's atServer black-holed: the noop heartbeat notices within
    heartbeat interval + timeout (+5 s), reconnects keep failing while the hole lasts, and once
    it heals the notifications sent meanwhile arrive exactly once, then live ones again."""
    proc = shared_atserver
    tag = unique_tag()
    interval, timeout = 0.3, 0.5

    async def main():
        async with ToxicProxy(proc.ports["@bob"]) as proxy:
            async with at_client(proc, "@alice") as alice, \
                    at_client(proc, "@bob", proxy.port, connect_timeout=1.0,
                              request_timeout=2.0) as bob:
                mon = bob.monitor(rf"\.{tag}@alice", heartbeat_interval=interval,
                                  heartbeat_timeout=timeout, backoff_base=0.1, backoff_cap=0.3)
                await mon.start()
                sent = [await alice.notify(f"@bob:b{i}.{tag}", f"before {i}") for i in range(2)]
                got = await collect(mon, 2)
                hole = proxy.add(Timeout())
                holed_at = time.monotonic()
                sent += [await alice.notify(f"@bob:h{i}.{tag}", f"in hole {i}") for i in range(3)]
                lost_at = await until(lambda: not mon.ready, interval + timeout + DETECT,
                                      "the heartbeat to notice")
                assert lost_at - holed_at < interval + timeout + DETECT
                # it keeps trying while the hole lasts (each try times out inside it)
                await until(lambda: mon.drops >= 2, 10, "a failed reconnect")
                assert not mon.ready
                proxy.remove(hole)
                got += await collect(mon, 3)
                sent += [await alice.notify(f"@bob:a{i}.{tag}", f"after {i}") for i in range(2)]
                got += await collect(mon, 2)
                assert await nothing_more(mon) == []
                assert [n.id for n in got] == sent
                assert [n.value for n in got] == ["before 0", "before 1", "in hole 0", "in hole 1",
                                                  "in hole 2", "after 0", "after 1"]
                await mon.close()
            # every connection bob opened through the proxy (main, monitor, failed
            # tries) is closed again
            await until(lambda: proxy.live == 0, 10, "bob's connections to close")
        assert proxy.errors == []

    run(main(), timeout=60)


@pytest.mark.parametrize("toxic", ["latency", "slicer", "bandwidth"])
def test_notify_and_monitor_through_benign_toxics(shared_atserver, run, toxic):
    """The notifier and the monitor each through their own proxy with the toxic both ways
    (TLS handshake, PKAM login, shared-key set-up and all): every notification arrives once,
    decrypted, and the toxic is measurably there."""
    proc = shared_atserver
    tag = unique_tag()
    size = 300_000 if toxic == "bandwidth" else 40

    def toxify(proxy: ToxicProxy) -> None:
        if toxic == "latency":
            proxy.add(Latency(100, 50))
        elif toxic == "slicer":
            proxy.add(Slicer(1, 7, 0, 2))
        else:
            proxy.add(Bandwidth(1_000_000))

    async def main():
        async with ToxicProxy(proc.ports["@alice"]) as pa, \
                ToxicProxy(proc.ports["@bob"]) as pb:
            toxify(pa)
            toxify(pb)
            async with at_client(proc, "@alice", pa.port, request_timeout=20) as alice, \
                    at_client(proc, "@bob", pb.port, request_timeout=20) as bob:
                mon = bob.monitor(rf"\.{tag}@alice")
                await mon.start(timeout=30)
                start = time.monotonic()
                await alice.execute("noop:0")
                round_trip = time.monotonic() - start
                values = [random.randbytes(size // 2).hex() for _ in range(3)]
                sent = []
                took = []
                for i, value in enumerate(values):
                    start = time.monotonic()
                    sent.append(await alice.notify(f"@bob:v{i}.{tag}", value))
                    took.append(time.monotonic() - start)
                got = await collect(mon, 3, timeout=30)
                assert await nothing_more(mon, 0.5) == []
                assert [n.id for n in got] == sent
                assert [n.value for n in got] == values
                if toxic == "latency":
                    assert round_trip >= 0.1          # 50..150 ms each way
                    assert min(took) >= 0.1
                elif toxic == "slicer":
                    for proxy in (pa, pb):
                        assert all(set(c.up.segments) | set(c.down.segments) <= set(range(1, 8))
                                   for c in proxy.conns)
                        assert sum(c.up.sends for c in proxy.conns) > 200
                else:
                    # each value (hex, then encrypted and base64'd) is > 300 kB on the wire
                    assert min(took) >= 0.3, took
                await mon.close()
            for proxy in (pa, pb):
                await until(lambda p=proxy: p.live == 0, 10, "the clients' connections to close")
        for proxy in (pa, pb):
            assert proxy.errors == []

    run(main(), timeout=90)
