"""The contract both data-plane pumps keep, written once and run on every twin of each.

The relay pump (``relaypump``) splices two sockets verbatim; the tunnel pump (``tunnelpump``)
splices a plain socket to a relay socket with AES-256-CTR each way.  Seen from the two outer
ends, once the bytes at the relay end are put through the reference cipher, they keep one
contract: head bytes first, FIN passed on, a reset or close on one side ends both, bounded
buffering under back-pressure, byte counts, cancellation, no FD left behind.

How a test module uses it: it defines a :class:`Twin` subclass (what differs between the pumps:
names, how to open one, what the outer ends speak), an ``impl`` fixture yielding one instance
per implementation, and ``class TestXxxContract(PumpContract)`` with ``TWIN`` set; pytest then
collects every contract test there, per twin and per event loop (``event_loop_kind``).

Each test splices real TCP connections on 127.0.0.1 (:class:`Link`): the test holds the outer
ends ``a`` and ``b``, the pump owns the accepted ends ``sa`` and ``sb``.  Side ``a`` always
speaks plaintext; side ``b`` may speak a wire form (``Link.encode`` / ``Link.decode``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import hashlib
import importlib
import inspect
import os
import random
import socket
import sys
import time
from typing import ClassVar

import pytest

from tests.functional.relay_helpers import (
    peak_of,
    read_until_closed,
    receive_all,
    recv_exactly,
    reset,
    until,
)

MiB = 1 << 20
HOST = "127.0.0.1"


def compiled_or_skip(name: str):
    """``noports._speedups.<name>``; skipped when not built, except under CI (env ``CI``)."""
    try:
        return importlib.import_module(f"noports._speedups.{name}")
    except ImportError as exc:
        msg = (f"noports._speedups.{name} is not built "
               f"(python3 setup.py build_ext --inplace): {exc}")
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)


# --- sockets and streams ------------------------------------------------------------------

def fd_count() -> int | None:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return None   # not Linux: FD accounting is skipped


def _set_buffers(sock, rcvbuf=None, sndbuf=None):
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    if sndbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)


async def tcp_conn(**sockopts) -> tuple[socket.socket, socket.socket]:
    """One TCP connection on 127.0.0.1: (connecting end, accepted end), both non-blocking;
    ``sockopts`` (rcvbuf=, sndbuf=) are fixed on both before the handshake (no autotuning)."""
    loop = asyncio.get_running_loop()
    listener = socket.create_server((HOST, 0))
    listener.setblocking(False)
    try:
        c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        c.setblocking(False)
        _set_buffers(c, **sockopts)
        await loop.sock_connect(c, listener.getsockname())
        s, _addr = await loop.sock_accept(listener)
        _set_buffers(s, **sockopts)
    finally:
        listener.close()
    s.setblocking(False)
    return c, s


class Pattern:
    """Seeded pseudo-random stream cut from a few 1 MiB blocks at varying offsets: cheap at
    100 MB, and any loss, duplication or reordering changes the sha256."""

    def __init__(self, seed: int):
        rng = random.Random(seed)
        self.blocks = [rng.randbytes(MiB) for _ in range(4)]
        self.rng = rng

    def chunks(self, total: int, size: int = MiB):
        left = total
        while left:
            block = self.blocks[self.rng.randrange(4)]
            off = self.rng.randrange(MiB // 2)
            n = min(size, left, MiB - off)
            yield memoryview(block)[off:off + n]
            left -= n


async def send_stream(sock, total: int, seed: int, *, eof: bool = True, cipher=None) -> str:
    """Send ``total`` pattern bytes (through ``cipher`` if given); sha256 of the PLAINTEXT."""
    loop = asyncio.get_running_loop()
    digest = hashlib.sha256()
    for chunk in Pattern(seed).chunks(total):
        digest.update(chunk)
        await loop.sock_sendall(sock, chunk if cipher is None else cipher.update(chunk))
    if eof:
        sock.shutdown(socket.SHUT_WR)
    return digest.hexdigest()


async def endless_flow(src, dst, got: list[int]) -> None:
    """Send from ``src`` and read at ``dst`` until the connection is taken away; ``got[0]``
    counts the bytes that arrived."""
    loop = asyncio.get_running_loop()

    async def send():
        for chunk in Pattern(3).chunks(1 << 40):
            await loop.sock_sendall(src, chunk)

    async def receive():
        buf = bytearray(MiB)
        while True:
            n = await loop.sock_recv_into(dst, buf)
            if not n:
                return
            got[0] += n

    sender = asyncio.ensure_future(send())
    try:
        with contextlib.suppress(OSError):
            await receive()
        with contextlib.suppress(OSError):
            await sender
    finally:
        sender.cancel()


async def push_until_stalled(sock, stall: float = 0.5, limit: float = 20.0) -> tuple[int, str]:
    """Send a pattern without blocking until the kernel refuses more for ``stall`` seconds;
    return (bytes accepted, sha256 of them).  A stall can only be seen as time without
    progress, so this is the one place that waits on the clock."""
    loop = asyncio.get_running_loop()
    digest = hashlib.sha256()
    pushed = 0
    chunks = Pattern(9).chunks(1 << 40, 256 * 1024)
    chunk = next(chunks)
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            n = sock.send(chunk)
        except BlockingIOError:
            writable = loop.create_future()
            loop.add_writer(sock.fileno(), lambda w=writable: w.done() or w.set_result(None))
            try:
                await asyncio.wait_for(writable, stall)
            except asyncio.TimeoutError:
                return pushed, digest.hexdigest()
            finally:
                loop.remove_writer(sock.fileno())
            continue
        digest.update(chunk[:n])
        pushed += n
        chunk = chunk[n:] if n < len(chunk) else next(chunks)
    raise AssertionError(f"no back-pressure: {pushed} bytes accepted in {limit}s")


# --- FD accounting ---------------------------------------------------------------------------

async def _warm_loop() -> None:
    """Make the loop open what it opens once per loop: libuv keeps /dev/null open as its EMFILE
    reserve from the first stream a uvloop transport wraps."""
    loop = asyncio.get_running_loop()
    lost = loop.create_future()

    class Watch(asyncio.Protocol):
        def connection_lost(self, exc):
            lost.set_result(None)

    c, s = await tcp_conn()
    transport, _proto = await loop.connect_accepted_socket(Watch, sock=s)
    transport.abort()
    await asyncio.wait_for(lost, 2)
    c.close()


def _clear_pools() -> None:
    """Close the compiled relay pump's pooled pipes (a bounded per-process cache, see its
    test_idle_splices_hold_no_carriers), so FD counts compare like with like.  The tunnel
    pump pools memory blocks only, no FDs."""
    compiled = sys.modules.get("noports._speedups.relaypump")
    if compiled is not None:
        compiled._pool_clear()


@contextlib.asynccontextmanager
async def no_fd_leak():
    """Every FD a test opens (sockets, pipes) is closed by its end."""
    await _warm_loop()
    gc.collect()      # sockets an earlier failed test dropped without closing
    _clear_pools()
    before = fd_count()
    yield
    if before is None:
        return
    _clear_pools()
    # the loop may still hold a closed transport for one iteration
    deadline = time.monotonic() + 2.0
    while fd_count() != before and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert fd_count() == before, f"FDs before {before}, after {fd_count()}"


# --- one pump twin, and one spliced link ----------------------------------------------------

@dataclasses.dataclass
class Twin:
    """One implementation (``mod``, variant ``name``) of one pump, as the contract drives it.
    Subclasses name the pump's API (class attributes) and say how to open a splice on a
    :class:`Link`; their own fields say what else differs between variants."""

    MODULE: ClassVar[str]                 # noports._pure.<MODULE> / noports._speedups.<MODULE>
    SIDES: ClassVar[tuple[str, str]]      # side a, side b: test ids and ``ended_by`` values
    FUNCTIONS: ClassVar[tuple[str, str]]  # (open one, await one to its end)
    SPLICE: ClassVar[str]                 # the splice class
    RESULT: ClassVar[str]                 # the result dataclass
    #: a->b, b->a: the suffixes of bytes_* and buffered_* (both pumps name them by their sides)
    DIRECTIONS: ClassVar[tuple[str, str]]

    name: str
    mod: object

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        a, b = cls.SIDES
        cls.DIRECTIONS = (f"{a}_to_{b}", f"{b}_to_{a}")

    def codecs(self, tag: int) -> dict:
        """{side: (tx, rx)} for the outer ends that do not speak plaintext: ``tx.update`` puts
        bytes into what that end writes, ``rx.update`` takes them out of what it reads."""
        return {}

    async def open(self, link: Link, *, head_a=b"", head_b=b"", **kw):
        """Start the pump on ``link.sa``/``link.sb`` (heads as the pump would have read them)."""
        raise NotImplementedError

    def splice(self, loop, link: Link):
        """The coroutine that runs a splice on ``link`` to its end."""
        raise NotImplementedError

    def new_splice(self, loop, max_buffer: int):
        """The splice class built directly (not started)."""
        raise NotImplementedError

    def counts(self, obj) -> tuple[int, int]:
        """(a->b, b->a) bytes of a running splice or of its result."""
        return tuple(getattr(obj, f"bytes_{d}") for d in self.DIRECTIONS)

    def buffered(self, pump) -> tuple[int, int]:
        return tuple(getattr(pump, f"buffered_{d}") for d in self.DIRECTIONS)

    def result(self, *fields):
        return getattr(self.mod, self.RESULT)(*fields)


class Link:
    """Two TCP connections for one splice: the test's ends ``a``, ``b``, the pump's ``sa``,
    ``sb``; ``tag`` picks the twin's keys (see :meth:`Twin.codecs`)."""

    def __init__(self, impl: Twin, a, sa, b, sb, tag: int = 0) -> None:
        self.impl, self.tag = impl, tag
        self.a, self.sa, self.b, self.sb = a, sa, b, sb
        self.ends = dict(zip(impl.SIDES, (a, b), strict=True))
        codecs = impl.codecs(tag)
        self.tx = {s: codecs.get(s, (None, None))[0] for s in impl.SIDES}
        self.rx = {s: codecs.get(s, (None, None))[1] for s in impl.SIDES}
        self.pump = None

    def other(self, side: str) -> str:
        first, second = self.impl.SIDES
        return second if side == first else first

    def encode(self, side: str, data) -> bytes:
        return data if self.tx[side] is None else self.tx[side].update(data)

    def decode(self, side: str, data) -> bytes:
        return data if self.rx[side] is None else self.rx[side].update(data)

    async def start(self, **kw):
        self.pump = await self.impl.open(self, **kw)
        return self.pump

    async def send(self, side: str, data) -> None:
        await asyncio.get_running_loop().sock_sendall(self.ends[side], self.encode(side, data))

    async def send_stream(self, side: str, total: int, seed: int, *, eof: bool = True) -> str:
        return await send_stream(self.ends[side], total, seed, eof=eof, cipher=self.tx[side])

    async def recv_exactly(self, side: str, n: int) -> bytes:
        return self.decode(side, await recv_exactly(self.ends[side], n))

    async def recv_all(self, side: str, **kw) -> tuple[int, str]:
        return await receive_all(self.ends[side], self.rx[side], **kw)

    def close_outer(self) -> None:
        for s in (self.a, self.b):
            s.close()


async def open_link(impl: Twin, *, tag: int = 0, start: bool = True, rcvbuf=None, sndbuf=None,
                    **kw) -> Link:
    """A fresh :class:`Link`, its pump started unless ``start`` is false (``kw`` go to it)."""
    a, sa = await tcp_conn(rcvbuf=rcvbuf, sndbuf=sndbuf)
    b, sb = await tcp_conn(rcvbuf=rcvbuf, sndbuf=sndbuf)
    link = Link(impl, a, sa, b, sb, tag)
    if start:
        await link.start(**kw)
    return link


async def exchange_and_idle(links: list[Link]) -> None:
    """1 MiB each way through every link, checked, connections left open; then wait until each
    pump has handed back its carriers (pipes, blocks) as its queues ran dry."""
    async def exchange(link):
        side_a, side_b = link.impl.SIDES
        sent_ab, sent_ba, got_b, got_a = await asyncio.gather(
            link.send_stream(side_a, MiB, 1, eof=False),
            link.send_stream(side_b, MiB, 2, eof=False),
            link.recv_exactly(side_b, MiB), link.recv_exactly(side_a, MiB))
        assert hashlib.sha256(got_b).hexdigest() == sent_ab
        assert hashlib.sha256(got_a).hexdigest() == sent_ba

    await asyncio.gather(*(exchange(link) for link in links))
    for link in links:
        assert not link.pump.done
    await until(lambda: not any(any(link.pump._carriers) for link in links),
                what="carriers returned")


async def end_with_fins(link: Link, timeout: float = 5.0):
    """Half-close both outer ends: each must see the pump's EOF, and the splice end; its
    result (outer ends closed)."""
    link.a.shutdown(socket.SHUT_WR)
    link.b.shutdown(socket.SHUT_WR)
    assert await read_until_closed(link.a) == (b"", "eof")
    assert await read_until_closed(link.b) == (b"", "eof")
    result = await asyncio.wait_for(link.pump.wait(), timeout)
    link.close_outer()
    return result


async def close_links(links: list[Link]) -> None:
    for link in links:
        link.pump.close()
        await link.pump.wait()
        link.close_outer()


# --- the contract ---------------------------------------------------------------------------

class PumpContract:
    """The tests every pump passes; subclass as ``TestXxx`` with ``TWIN`` set, next to an
    ``impl`` fixture yielding the twins.  Tests taking ``side`` run once per side."""

    TWIN: type[Twin]

    def pytest_generate_tests(self, metafunc):
        if "side" in metafunc.fixturenames:
            metafunc.parametrize("side", self.TWIN.SIDES)

    # --- the API is the same ---------------------------------------------------------------

    def test_same_public_api(self):
        spec = self.TWIN
        pure = importlib.import_module(f"noports._pure.{spec.MODULE}")
        compiled = compiled_or_skip(spec.MODULE)
        assert compiled.__all__ == pure.__all__
        assert (compiled.MAX_BUFFER, compiled.READ_SIZE) == (pure.MAX_BUFFER, pure.READ_SIZE)
        result = getattr(pure, spec.RESULT)
        assert getattr(compiled, spec.RESULT) is result
        assert [f.name for f in dataclasses.fields(result)] == \
            [f"bytes_{d}" for d in spec.DIRECTIONS] + ["how_ended", "ended_by"]
        for name in spec.FUNCTIONS:
            ours, twin = getattr(compiled, name), getattr(pure, name)
            assert inspect.iscoroutinefunction(ours) == inspect.iscoroutinefunction(twin) is True
            got = [(p.name, p.kind, p.default) for p in inspect.signature(ours).parameters.values()]
            want = [(p.name, p.kind, p.default)
                    for p in inspect.signature(twin).parameters.values()]
            assert got == want, name
        public = {n for n in dir(getattr(pure, spec.SPLICE)) if not n.startswith("_")}
        assert public == {f"{kind}_{d}" for kind in ("bytes", "buffered")
                          for d in spec.DIRECTIONS} | {"done", "wait", "close"}
        assert public <= set(dir(getattr(compiled, spec.SPLICE)))

    def test_max_buffer_below_two_reads_is_refused(self, run, impl):
        async def main():
            loop = asyncio.get_running_loop()
            for too_small in (1024, 2 * impl.mod.READ_SIZE - 1):
                with pytest.raises(ValueError):
                    impl.new_splice(loop, too_small)
            impl.new_splice(loop, 2 * impl.mod.READ_SIZE)   # the smallest allowed

        run(main())

    # --- carrying data -----------------------------------------------------------------------

    def test_many_splices_at_once(self, run, event_loop_kind, impl):
        """20 live splices on one loop, each with its own sizes, head and keys: no cross-talk,
        all counted."""
        side_a, side_b = impl.SIDES

        async def one(k):
            n_ab, n_ba = 1000 * k + 1, 3 * MiB - 777 * k
            head = b"%d" % k
            link = await open_link(impl, tag=k + 1, head_a=head)

            async def head_then_rest():
                assert await link.recv_exactly(side_b, len(head)) == head
                return await link.recv_all(side_b)

            try:
                sent_ab, sent_ba, got_b, got_a = await asyncio.gather(
                    link.send_stream(side_a, n_ab, k), link.send_stream(side_b, n_ba, 100 + k),
                    head_then_rest(), link.recv_all(side_a))
                result = await asyncio.wait_for(link.pump.wait(), 5)
            finally:
                link.close_outer()
            assert got_a == (n_ba, sent_ba)
            assert got_b == (n_ab, sent_ab)
            assert impl.counts(result) == (n_ab + len(head), n_ba)

        async def main():
            async with no_fd_leak():
                await asyncio.gather(*(one(k) for k in range(20)))

        run(main(), timeout=120)

    def test_head_bytes_go_first_and_are_counted(self, run, event_loop_kind, impl):
        """Bytes already read from a side (its head) take the stream's first positions -- the
        keystream's too, where there is one; bytes queued in the sockets follow them."""
        side_a, side_b = impl.SIDES

        async def main():
            async with no_fd_leak():
                link = await open_link(impl, start=False)
                head_a = link.encode(side_a, b"head from A|")
                head_b = link.encode(side_b, b"head from B|")
                await link.send(side_a, b"queued-in-A")
                await link.send(side_b, b"queued-in-B")
                await link.start(head_a=head_a, head_b=bytearray(head_b))
                assert await link.recv_exactly(side_b, 23) == b"head from A|queued-in-A"
                assert await link.recv_exactly(side_a, 23) == b"head from B|queued-in-B"
                await until(lambda: impl.counts(link.pump) == (23, 23),
                            what="counts with head bytes")
                assert await end_with_fins(link) == impl.result(23, 23, "eof", None)

        run(main())

    def test_head_only_then_immediate_fin(self, run, event_loop_kind, impl):
        """A head bigger than the socket buffers, and a FIN behind it: the FIN waits its turn."""
        head = os.urandom(3 * MiB)

        async def main():
            async with no_fd_leak():
                link = await open_link(impl, start=False, rcvbuf=64 * 1024, sndbuf=64 * 1024)
                link.a.shutdown(socket.SHUT_WR)
                await link.start(head_a=head)
                got = await link.recv_all(impl.SIDES[1])
                assert got == (len(head), hashlib.sha256(head).hexdigest())
                link.b.shutdown(socket.SHUT_WR)
                await read_until_closed(link.a)
                result = await asyncio.wait_for(link.pump.wait(), 5)
                link.close_outer()
                assert result == impl.result(len(head), 0, "eof", None)

        run(main())

    # --- FIN, RST, close ---------------------------------------------------------------------

    def test_half_close_passes_fin_and_the_other_way_keeps_flowing(self, run, event_loop_kind,
                                                                    impl, side):
        async def main():
            async with no_fd_leak():
                link = await open_link(impl)
                closer, other = side, link.other(side)
                await link.send(closer, b"request")
                link.ends[closer].shutdown(socket.SHUT_WR)
                assert await link.recv_all(other) == (7, hashlib.sha256(b"request").hexdigest())
                assert not link.pump.done
                # the other direction is untouched by the FIN
                sent, got = await asyncio.gather(
                    link.send_stream(other, 3 * MiB, 5, eof=False),
                    link.recv_exactly(closer, 3 * MiB))
                assert hashlib.sha256(got).hexdigest() == sent
                assert not link.pump.done
                link.ends[other].shutdown(socket.SHUT_WR)
                assert await read_until_closed(link.ends[closer]) == (b"", "eof")
                result = await asyncio.wait_for(link.pump.wait(), 5)
                link.close_outer()
                counts = (7, 3 * MiB) if side == impl.SIDES[0] else (3 * MiB, 7)
                assert result == impl.result(*counts, "eof", None)

        run(main())

    @pytest.mark.parametrize("nbytes", [1000, 3 * MiB])
    def test_bytes_then_a_reset_in_one_wakeup_still_end_the_splice(self, run, event_loop_kind,
                                                                    impl, side, nbytes):
        """The peer's last bytes and its RST reach the pump's socket before the pump runs.
        uvloop (libuv) reports POLLERR once and then stops polling that socket, so a pump that
        stops reading after a short read -- or after its rounds limit with data still queued --
        and waits for the next readiness event never learns of the reset (found by the R5
        data-cut test: the relay kept a dead pair open).  The splice must still end, as a reset
        by that side, with what arrived before it passed on or dropped, never hung."""
        async def main():
            async with no_fd_leak():
                link = await open_link(impl)
                victim, other = link.ends[side], link.ends[link.other(side)]
                victim.setblocking(True)
                victim.sendall(os.urandom(nbytes))     # all of it into the kernel, no loop turn
                reset(victim)
                result = await asyncio.wait_for(link.pump.wait(), 5)
                other.close()
                assert (result.how_ended, result.ended_by) == ("reset", side)

        run(main())

    def test_a_reset_on_one_side_closes_the_other(self, run, event_loop_kind, impl, side):
        async def main():
            async with no_fd_leak():
                link = await open_link(impl)
                victim, other = link.ends[side], link.ends[link.other(side)]
                await link.send(side, b"x" * 1000)
                assert await link.recv_exactly(link.other(side), 1000) == b"x" * 1000
                reset(victim)
                start = time.monotonic()
                await asyncio.wait_for(read_until_closed(other), 2)
                assert time.monotonic() - start < 1.0
                result = await asyncio.wait_for(link.pump.wait(), 2)
                other.close()
                assert (result.how_ended, result.ended_by) == ("reset", side)
                counts = (1000, 0) if side == impl.SIDES[0] else (0, 1000)
                assert impl.counts(result) == counts

        run(main())

    def test_a_full_close_ends_the_splice_when_data_comes_for_it(self, run, event_loop_kind,
                                                                  impl, side):
        """A side that close()s (not shutdown) first looks like a FIN; the next bytes for it
        draw its RST, and the pump then closes the other side too."""
        async def main():
            async with no_fd_leak():
                loop = asyncio.get_running_loop()
                link = await open_link(impl)
                gone, other = link.ends[side], link.ends[link.other(side)]
                gone.close()
                assert await asyncio.wait_for(receive_all(other), 2) == \
                    (0, hashlib.sha256().hexdigest())

                async def keep_sending():
                    with contextlib.suppress(OSError):
                        while True:
                            await loop.sock_sendall(other, b"y" * 65536)

                sender = asyncio.ensure_future(keep_sending())
                result = await asyncio.wait_for(link.pump.wait(), 3)
                await asyncio.wait_for(sender, 3)     # the pump closed `other`: its sends fail
                other.close()
                assert (result.how_ended, result.ended_by) == ("reset", side)

        run(main())

    @pytest.mark.parametrize("extra", [b"", b"bye"], ids=["nothing", "3-bytes"])
    def test_peer_that_closes_right_after_connecting(self, run, event_loop_kind, impl, extra):
        async def main():
            async with no_fd_leak():
                side_a, side_b = impl.SIDES
                link = await open_link(impl, start=False)
                if extra:
                    await link.send(side_b, extra)
                link.b.close()                     # gone before the pump even starts
                await link.start()
                start = time.monotonic()
                data, how = await asyncio.wait_for(read_until_closed(link.a), 2)
                assert (link.decode(side_a, data), how) == (extra, "eof")
                assert time.monotonic() - start < 1.0
                link.a.close()
                result = await asyncio.wait_for(link.pump.wait(), 2)
                assert impl.counts(result) == (0, len(extra))
                assert result.how_ended in ("eof", "reset", "closed")

        run(main())

    def test_a_socket_reset_before_the_splice_starts(self, run, event_loop_kind, impl, side):
        """The peer reset before the pump got its sockets (between its auth line and the
        pairing, on the relay): a reset by that side at once, and the other side closed
        (ownership of both sockets was taken)."""
        async def main():
            async with no_fd_leak():
                link = await open_link(impl, start=False)
                reset(link.ends[side])
                await link.start(head_a=b"head")
                result = await asyncio.wait_for(link.pump.wait(), 2)
                assert (result.how_ended, result.ended_by) == ("reset", side)
                assert link.sa.fileno() == link.sb.fileno() == -1
                survivor = link.ends[link.other(side)]
                await asyncio.wait_for(read_until_closed(survivor), 2)
                survivor.close()

        run(main())

    @pytest.mark.parametrize("how", ["close", "cancel"])
    def test_close_or_cancel_mid_stream_aborts_both(self, run, event_loop_kind, impl, how):
        async def main():
            async with no_fd_leak():
                loop = asyncio.get_running_loop()
                link = await open_link(impl, start=False)
                got_b, got_a = [0], [0]
                flows = [asyncio.ensure_future(endless_flow(link.a, link.b, got_b)),
                         asyncio.ensure_future(endless_flow(link.b, link.a, got_a))]
                if how == "close":
                    pump = await link.start()
                else:
                    task = asyncio.ensure_future(impl.splice(loop, link))
                await until(lambda: got_a[0] > 4 * MiB and got_b[0] > 4 * MiB,
                            what="traffic both ways")
                if how == "close":
                    pump.close()
                    pump.close()                       # idempotent
                    result = await asyncio.wait_for(pump.wait(), 2)
                    assert (result.how_ended, result.ended_by) == ("aborted", None)
                    a_to_b, b_to_a = impl.counts(result)
                    assert a_to_b >= got_b[0] and b_to_a >= got_a[0]
                else:
                    assert not task.done()
                    task.cancel()
                    with pytest.raises(asyncio.CancelledError):
                        await task
                # both outer ends see their connection end promptly, so both flows finish
                await asyncio.wait_for(asyncio.gather(*flows), 3)
                assert link.sa.fileno() == link.sb.fileno() == -1
                link.close_outer()

        run(main(), timeout=60)

    # --- back-pressure -------------------------------------------------------------------------

    def test_stalled_reader_stalls_the_writer_with_bounded_buffering(self, run, event_loop_kind,
                                                                     impl):
        """Side b never reads: side a must stall once the kernel buffers (fixed at 128 KiB
        each here) and the pump's own buffer (<= max_buffer) are full; the other direction
        keeps working; then side b reads everything, intact."""
        sock_buf = 128 * 1024
        side_a, side_b = impl.SIDES

        async def main():
            async with no_fd_leak():
                link = await open_link(impl, rcvbuf=sock_buf, sndbuf=sock_buf)
                pump = link.pump
                pushed, digest = await push_until_stalled(link.a)
                # Linux doubles SO_RCVBUF/SO_SNDBUF for bookkeeping: 4 sockets x 2 x 128 KiB
                # hold at most 1 MiB between them; everything else is the pump's.
                kernel = 4 * 2 * sock_buf
                buffered = impl.buffered(pump)[0]
                assert buffered <= impl.mod.MAX_BUFFER
                assert pushed <= kernel + impl.mod.MAX_BUFFER, (pushed, buffered)
                assert impl.counts(pump)[0] - impl.buffered(pump)[0] <= kernel
                # the stalled direction does not hold up the other one
                await link.send(side_b, b"pong" * 1000)
                assert await link.recv_exactly(side_a, 4000) == b"pong" * 1000
                link.a.shutdown(socket.SHUT_WR)
                assert await link.recv_all(side_b) == (pushed, digest)
                link.b.shutdown(socket.SHUT_WR)
                await read_until_closed(link.a)
                result = await asyncio.wait_for(pump.wait(), 5)
                link.close_outer()
                assert result == impl.result(pushed, 4000, "eof", None)

        run(main(), timeout=90)

    def test_slow_reader_keeps_the_pump_buffer_under_max_buffer(self, run, event_loop_kind,
                                                                impl):
        """24 MiB to a side b reading at ~25 MB/s; sampled buffering never passes the smallest
        max_buffer allowed (two reads), and the stream arrives intact."""
        total = 24 * MiB

        async def main():
            async with no_fd_leak():
                max_buffer = 2 * impl.mod.READ_SIZE
                link = await open_link(impl, max_buffer=max_buffer)
                async with peak_of(lambda: impl.buffered(link.pump)[0]) as peak:
                    sent, got = await asyncio.gather(
                        link.send_stream(impl.SIDES[0], total, 3),
                        link.recv_all(impl.SIDES[1], size=512 * 1024, pause=0.02))
                link.close_outer()
                await asyncio.wait_for(link.pump.wait(), 5)
                assert got == (total, sent)
                assert 0 < peak.value <= max_buffer, peak.value

        run(main(), timeout=90)

    # --- no leaks -------------------------------------------------------------------------------

    @pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts /proc/self/fd")
    def test_no_fd_leak_over_many_endings(self, run, event_loop_kind, impl):
        """60 splices ending every way (FIN both, RST either side, close()), some with head
        bytes, all after a small transfer: the process's FD count comes back exactly."""
        async def one(k):
            head = b"h" if k % 2 else b""
            link = await open_link(impl, head_a=head)
            await link.send(impl.SIDES[0], b"z" * (1 + k * 1000))
            await link.recv_exactly(impl.SIDES[1], 1 + k * 1000 + len(head))
            ending = k % 4
            if ending == 0:
                link.a.shutdown(socket.SHUT_WR)
                link.b.shutdown(socket.SHUT_WR)
            elif ending == 1:
                reset(link.a)
            elif ending == 2:
                reset(link.b)
            else:
                link.pump.close()
            await asyncio.wait_for(link.pump.wait(), 3)
            for s in (link.a, link.b):
                if s.fileno() >= 0:
                    await asyncio.wait_for(read_until_closed(s), 3)
                    s.close()

        async def main():
            async with no_fd_leak():
                await asyncio.gather(*(one(k) for k in range(60)))

        run(main(), timeout=60)
