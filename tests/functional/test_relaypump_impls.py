"""The relay pump's contract, run on every implementation and both event loops.

Implementations: the pure twin (``noports._pure.relaypump``), the compiled module
(``noports._speedups.relaypump``) on its kernel-splice path, and the compiled module forced onto
its portable recv/send path (what macOS wheels run).  Each test splices two real TCP
connections on 127.0.0.1: the test holds the outer ends ``a`` and ``b``, the pump owns the
accepted ends.  Compiled params are skipped when the module is not built, except under CI
(env ``CI`` set), where a missing build fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import hashlib
import inspect
import os
import random
import socket
import struct
import sys
import time

import pytest

import noports._pure.relaypump as pure_pump

MiB = 1 << 20
HOST = "127.0.0.1"
IMPLS = ["pure", "compiled", "compiled-copy"]


def _compiled():
    try:
        import noports._speedups.relaypump as compiled
    except ImportError as exc:
        msg = ("noports._speedups.relaypump is not built "
               f"(python3 setup.py build_ext --inplace): {exc}")
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return compiled


@pytest.fixture(params=IMPLS)
def impl(request):
    """The pump module under test; ``impl.name`` says which variant."""
    if request.param == "pure":
        yield pure_pump
        return
    compiled = _compiled()
    if request.param == "compiled":
        if not compiled._splice_supported():
            pytest.skip("no splice(2) on this platform: the compiled module copies "
                        "(covered by compiled-copy)")
        previous = compiled._configure(use_splice=True)
    else:
        previous = compiled._configure(use_splice=False)
    try:
        yield compiled
    finally:
        compiled._configure(*previous)


@pytest.fixture
def expect_path(request):
    """The data path each direction of a compiled splice must take, None for the pure twin."""
    return {"pure": None, "compiled": "splice", "compiled-copy": "copy"}[
        request.node.callspec.params["impl"]]


# --- helpers --------------------------------------------------------------------------------

def fd_count() -> int | None:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return None   # not Linux: FD accounting is skipped


class Pair:
    """Two TCP connections through one listener: the test's ends a, b and the pump's sa, sb."""

    def __init__(self, a, b, sa, sb):
        self.a, self.b, self.sa, self.sb = a, b, sa, sb

    def close_outer(self):
        for s in (self.a, self.b):
            s.close()


async def tcp_pair(**sockopts) -> Pair:
    """Connect twice to a fresh listener on 127.0.0.1; ``sockopts`` (e.g. rcvbuf=...) are set
    on all four sockets before the handshake (fixed buffers: no autotuning)."""
    loop = asyncio.get_running_loop()
    listener = socket.create_server((HOST, 0))
    listener.setblocking(False)
    try:
        ends = []
        for _ in range(2):
            c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            c.setblocking(False)
            _set_buffers(c, **sockopts)
            await loop.sock_connect(c, listener.getsockname())
            s, _addr = await loop.sock_accept(listener)
            _set_buffers(s, **sockopts)
            ends.append((c, s))
    finally:
        listener.close()
    (a, sa), (b, sb) = ends
    return Pair(a, b, sa, sb)


def _set_buffers(sock, rcvbuf=None, sndbuf=None):
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    if sndbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)


def reset(sock):
    """Close with an RST (SO_LINGER 0)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class Pattern:
    """Seeded pseudo-random stream made from a few 1 MiB blocks at varying offsets: cheap to
    generate at 100 MB, and any loss, duplication or reordering changes the sha256."""

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


async def send_stream(sock, total: int, seed: int, *, eof: bool = True) -> str:
    loop = asyncio.get_running_loop()
    digest = hashlib.sha256()
    for chunk in Pattern(seed).chunks(total):
        digest.update(chunk)
        await loop.sock_sendall(sock, chunk)
    if eof:
        sock.shutdown(socket.SHUT_WR)
    return digest.hexdigest()


async def recv_all(sock) -> tuple[int, str]:
    """Read to EOF: (byte count, sha256)."""
    loop = asyncio.get_running_loop()
    digest = hashlib.sha256()
    buf = bytearray(MiB)
    view = memoryview(buf)
    total = 0
    while True:
        n = await loop.sock_recv_into(sock, buf)
        if not n:
            return total, digest.hexdigest()
        digest.update(view[:n])
        total += n


async def recv_exactly(sock, n: int) -> bytes:
    loop = asyncio.get_running_loop()
    data = bytearray()
    while len(data) < n:
        chunk = await loop.sock_recv(sock, n - len(data))
        if not chunk:
            raise EOFError(f"EOF after {len(data)} of {n} bytes")
        data += chunk
    return bytes(data)


async def read_until_closed(sock, limit: int = 1 << 16) -> tuple[bytes, str]:
    """Everything until the relay closes: (bytes, "eof" | "reset")."""
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


async def until(predicate, timeout: float = 5.0, what: str = "condition") -> None:
    """Poll state the pump exposes until true (bounded)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.005)


async def _warm_loop() -> None:
    """Make the loop open what it opens once per loop: libuv keeps /dev/null open as its EMFILE
    reserve from the first stream a uvloop transport wraps."""
    loop = asyncio.get_running_loop()
    lost = loop.create_future()

    class Watch(asyncio.Protocol):
        def connection_lost(self, exc):
            lost.set_result(None)

    pair = await tcp_pair()
    transport, _proto = await loop.connect_accepted_socket(Watch, sock=pair.sa)
    transport.abort()
    await asyncio.wait_for(lost, 2)
    for s in (pair.a, pair.b, pair.sb):
        s.close()


def _clear_pools() -> None:
    """Close the compiled pump's pooled pipes (a bounded per-process cache, see
    test_idle_splices_hold_no_carriers), so FD counts compare like with like."""
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


async def spliced(impl, *, head_a=b"", head_b=b"", max_buffer=None, **sockopts):
    pair = await tcp_pair(**sockopts)
    kw = {} if max_buffer is None else {"max_buffer": max_buffer}
    pump = await impl.open_splice(asyncio.get_running_loop(), pair.sa, pair.sb,
                                  head_a=head_a, head_b=head_b, **kw)
    return pair, pump


# --- the API is the same ---------------------------------------------------------------------

def test_same_public_api():
    compiled = _compiled()
    assert compiled.__all__ == pure_pump.__all__
    assert (compiled.MAX_BUFFER, compiled.READ_SIZE) == (pure_pump.MAX_BUFFER,
                                                         pure_pump.READ_SIZE)
    assert compiled.SpliceResult is pure_pump.SpliceResult
    assert [f.name for f in dataclasses.fields(compiled.SpliceResult)] == \
        ["bytes_a_to_b", "bytes_b_to_a", "how_ended", "ended_by"]
    for name in ("open_splice", "splice"):
        ours, twin = getattr(compiled, name), getattr(pure_pump, name)
        assert inspect.iscoroutinefunction(ours) == inspect.iscoroutinefunction(twin) is True
        got = [(p.name, p.kind, p.default) for p in inspect.signature(ours).parameters.values()]
        want = [(p.name, p.kind, p.default) for p in inspect.signature(twin).parameters.values()]
        assert got == want, name
    public = {n for n in dir(pure_pump.Splice) if not n.startswith("_")}
    assert public == {"bytes_a_to_b", "bytes_b_to_a", "buffered_a_to_b", "buffered_b_to_a",
                      "done", "wait", "close"}
    assert public <= set(dir(compiled.Splice))


def test_max_buffer_below_two_reads_is_refused(run, impl):
    async def main():
        loop = asyncio.get_running_loop()
        with pytest.raises(ValueError):
            impl.Splice(loop, b"", b"", 1024)
        with pytest.raises(ValueError):
            impl.Splice(loop, b"", b"", 2 * impl.READ_SIZE - 1)
        impl.Splice(loop, b"", b"", 2 * impl.READ_SIZE)   # the smallest allowed

    run(main())


# --- carrying data ---------------------------------------------------------------------------

def test_100mb_one_way_and_30mb_the_other_intact(run, event_loop_kind, impl, expect_path):
    seed = int.from_bytes(os.urandom(4), "big")
    n_ab, n_ba = 100 * 10**6, 30 * 10**6 + 12345

    async def main():
        async with no_fd_leak():
            pair, pump = await spliced(impl)
            try:
                sent_ab, sent_ba, got_b, got_a = await asyncio.gather(
                    send_stream(pair.a, n_ab, seed), send_stream(pair.b, n_ba, seed + 1),
                    recv_all(pair.b), recv_all(pair.a))
                if expect_path:
                    assert pump._paths == (expect_path, expect_path)
                result = await asyncio.wait_for(pump.wait(), 5)
            finally:
                pair.close_outer()
            assert got_b == (n_ab, sent_ab), f"A->B corrupted (seed {seed})"
            assert got_a == (n_ba, sent_ba), f"B->A corrupted (seed {seed})"
            assert (result.bytes_a_to_b, result.bytes_b_to_a) == (n_ab, n_ba)
            assert (pump.bytes_a_to_b, pump.bytes_b_to_a) == (n_ab, n_ba)
            assert (result.how_ended, result.ended_by) == ("eof", None)
            assert pump.done and pump.buffered_a_to_b == pump.buffered_b_to_a == 0

    run(main(), timeout=180)


def test_many_splices_at_once(run, event_loop_kind, impl):
    """20 live pairs on one loop, each with its own sizes: no cross-talk, all counted."""
    async def one(k):
        n_ab, n_ba = 1000 * k + 1, 3 * MiB - 777 * k
        head = b"%d" % k
        pair, pump = await spliced(impl, head_a=head)

        async def head_then_rest():
            assert await recv_exactly(pair.b, len(head)) == head
            return await recv_all(pair.b)

        try:
            sent_ab, sent_ba, got_b, got_a = await asyncio.gather(
                send_stream(pair.a, n_ab, k), send_stream(pair.b, n_ba, 100 + k),
                head_then_rest(), recv_all(pair.a))
            result = await asyncio.wait_for(pump.wait(), 5)
        finally:
            pair.close_outer()
        assert got_a == (n_ba, sent_ba)
        assert got_b == (n_ab, sent_ab)
        assert (result.bytes_a_to_b, result.bytes_b_to_a) == (n_ab + len(head), n_ba)

    async def main():
        async with no_fd_leak():
            await asyncio.gather(*(one(k) for k in range(20)))

    run(main(), timeout=120)


def test_head_bytes_go_first_and_are_counted(run, event_loop_kind, impl):
    async def main():
        async with no_fd_leak():
            loop = asyncio.get_running_loop()
            pair = await tcp_pair()
            # bytes already waiting in the sockets must follow the head bytes, not pass them
            await loop.sock_sendall(pair.a, b"queued-in-A")
            await loop.sock_sendall(pair.b, b"queued-in-B")
            pump = await impl.open_splice(loop, pair.sa, pair.sb, head_a=b"head from A|",
                                          head_b=bytearray(b"head from B|"))
            assert await recv_exactly(pair.b, 23) == b"head from A|queued-in-A"
            assert await recv_exactly(pair.a, 23) == b"head from B|queued-in-B"
            await until(lambda: pump.bytes_a_to_b == 23 and pump.bytes_b_to_a == 23,
                        what="counts with head bytes")
            pair.a.shutdown(socket.SHUT_WR)
            pair.b.shutdown(socket.SHUT_WR)
            assert await read_until_closed(pair.a) == (b"", "eof")
            assert await read_until_closed(pair.b) == (b"", "eof")
            result = await asyncio.wait_for(pump.wait(), 5)
            pair.close_outer()
            assert result == impl.SpliceResult(23, 23, "eof", None)

    run(main())


def test_head_only_then_immediate_fin(run, event_loop_kind, impl):
    """A head bigger than the socket buffers, and a FIN behind it: the FIN waits its turn."""
    head = os.urandom(3 * MiB)

    async def main():
        async with no_fd_leak():
            pair = await tcp_pair(rcvbuf=64 * 1024, sndbuf=64 * 1024)
            pair.a.shutdown(socket.SHUT_WR)
            pump = await impl.open_splice(asyncio.get_running_loop(), pair.sa, pair.sb,
                                          head_a=head)
            got = await recv_all(pair.b)
            assert got == (len(head), hashlib.sha256(head).hexdigest())
            pair.b.shutdown(socket.SHUT_WR)
            await read_until_closed(pair.a)
            result = await asyncio.wait_for(pump.wait(), 5)
            pair.close_outer()
            assert result == impl.SpliceResult(len(head), 0, "eof", None)

    run(main())


# --- FIN, RST, close ---------------------------------------------------------------------------

@pytest.mark.parametrize("first", ["a", "b"])
def test_half_close_passes_fin_and_the_other_way_keeps_flowing(run, event_loop_kind, impl,
                                                                first):
    async def main():
        async with no_fd_leak():
            loop = asyncio.get_running_loop()
            pair, pump = await spliced(impl)
            ends = {"a": pair.a, "b": pair.b}
            closer, other = ends[first], ends["b" if first == "a" else "a"]
            await loop.sock_sendall(closer, b"request")
            closer.shutdown(socket.SHUT_WR)
            assert await recv_all(other) == (7, hashlib.sha256(b"request").hexdigest())
            assert not pump.done
            # the other direction is untouched by the FIN
            sent, got = await asyncio.gather(send_stream(other, 3 * MiB, 5, eof=False),
                                             recv_exactly(closer, 3 * MiB))
            assert hashlib.sha256(got).hexdigest() == sent
            assert not pump.done
            other.shutdown(socket.SHUT_WR)
            assert await read_until_closed(closer) == (b"", "eof")
            result = await asyncio.wait_for(pump.wait(), 5)
            pair.close_outer()
            counts = {"a": 7, "b": 3 * MiB} if first == "a" else {"a": 3 * MiB, "b": 7}
            assert result == impl.SpliceResult(counts["a"], counts["b"], "eof", None)

    run(main())


@pytest.mark.parametrize("nbytes", [1000, 3 * MiB])
@pytest.mark.parametrize("side", ["a", "b"])
def test_bytes_then_a_reset_in_one_wakeup_still_end_the_splice(run, event_loop_kind, impl, side,
                                                                nbytes):
    """The peer's last bytes and its RST reach the pump's socket before the pump runs.  uvloop
    (libuv) reports POLLERR once and then stops polling that socket, so a pump that stops
    reading after a short read -- or after its rounds limit with data still queued -- and
    waits for the next readiness event never learns of the reset (found by the R5 data-cut
    test: the relay kept a dead pair open).  The splice must still end, as a reset by that
    side, with what arrived before it passed on or dropped, never hung."""
    async def main():
        async with no_fd_leak():
            pair, pump = await spliced(impl)
            ends = {"a": pair.a, "b": pair.b}
            victim, other = ends[side], ends["b" if side == "a" else "a"]
            victim.setblocking(True)
            victim.sendall(os.urandom(nbytes))     # all of it into the kernel, no loop turn
            reset(victim)
            result = await asyncio.wait_for(pump.wait(), 5)
            other.close()
            assert (result.how_ended, result.ended_by) == ("reset", side)

    run(main())


@pytest.mark.parametrize("side", ["a", "b"])
def test_a_reset_on_one_side_closes_the_other(run, event_loop_kind, impl, side):
    async def main():
        async with no_fd_leak():
            loop = asyncio.get_running_loop()
            pair, pump = await spliced(impl)
            ends = {"a": pair.a, "b": pair.b}
            victim, other = ends[side], ends["b" if side == "a" else "a"]
            await loop.sock_sendall(victim, b"x" * 1000)
            assert await recv_exactly(other, 1000) == b"x" * 1000
            reset(victim)
            start = time.monotonic()
            _data, _how = await asyncio.wait_for(read_until_closed(other), 2)
            assert time.monotonic() - start < 1.0
            result = await asyncio.wait_for(pump.wait(), 2)
            other.close()
            assert result.how_ended == "reset" and result.ended_by == side
            counts = (1000, 0) if side == "a" else (0, 1000)
            assert (result.bytes_a_to_b, result.bytes_b_to_a) == counts

    run(main())


@pytest.mark.parametrize("side", ["a", "b"])
def test_a_full_close_ends_the_splice_when_data_comes_for_it(run, event_loop_kind, impl, side):
    """A side that close()s (not shutdown) first looks like a FIN; the next bytes for it draw
    its RST, and the pump then closes the other side too."""
    async def main():
        async with no_fd_leak():
            loop = asyncio.get_running_loop()
            pair, pump = await spliced(impl)
            ends = {"a": pair.a, "b": pair.b}
            gone, other = ends[side], ends["b" if side == "a" else "a"]
            gone.close()
            assert await asyncio.wait_for(recv_all(other), 2) == (0, hashlib.sha256().hexdigest())

            async def keep_sending():
                with contextlib.suppress(OSError):
                    while True:
                        await loop.sock_sendall(other, b"y" * 65536)

            sender = asyncio.ensure_future(keep_sending())
            result = await asyncio.wait_for(pump.wait(), 3)
            await asyncio.wait_for(sender, 3)     # the pump closed `other`: its sends fail
            other.close()
            assert result.how_ended == "reset" and result.ended_by == side

    run(main())


@pytest.mark.parametrize("extra", [b"", b"bye"], ids=["nothing", "3-bytes"])
def test_peer_that_closes_right_after_connecting(run, event_loop_kind, impl, extra):
    async def main():
        async with no_fd_leak():
            loop = asyncio.get_running_loop()
            pair = await tcp_pair()
            if extra:
                await loop.sock_sendall(pair.b, extra)
            pair.b.close()                     # gone before the pump even starts
            pump = await impl.open_splice(loop, pair.sa, pair.sb)
            start = time.monotonic()
            data, how = await asyncio.wait_for(read_until_closed(pair.a), 2)
            assert (data, how) == (extra, "eof")
            assert time.monotonic() - start < 1.0
            pair.a.close()
            result = await asyncio.wait_for(pump.wait(), 2)
            assert result.bytes_b_to_a == len(extra) and result.bytes_a_to_b == 0
            assert result.how_ended in ("eof", "reset", "closed")

    run(main())


@pytest.mark.parametrize("side", ["a", "b"])
def test_a_socket_reset_before_the_splice_starts(run, event_loop_kind, impl, side):
    """The peer reset between its auth line and the pairing: a reset by that side at once,
    and the other side closed (ownership of both sockets was taken)."""
    async def main():
        async with no_fd_leak():
            pair = await tcp_pair()
            reset(pair.a if side == "a" else pair.b)
            pump = await impl.open_splice(asyncio.get_running_loop(), pair.sa, pair.sb,
                                          head_a=b"head")
            result = await asyncio.wait_for(pump.wait(), 2)
            assert (result.how_ended, result.ended_by) == ("reset", side)
            assert pair.sa.fileno() == pair.sb.fileno() == -1
            survivor = pair.b if side == "a" else pair.a
            await asyncio.wait_for(read_until_closed(survivor), 2)
            survivor.close()

    run(main())


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


@pytest.mark.parametrize("how", ["close", "cancel"])
def test_close_or_cancel_mid_stream_aborts_both(run, event_loop_kind, impl, how):
    async def main():
        async with no_fd_leak():
            loop = asyncio.get_running_loop()
            pair = await tcp_pair()
            got_b, got_a = [0], [0]
            flows = [asyncio.ensure_future(endless_flow(pair.a, pair.b, got_b)),
                     asyncio.ensure_future(endless_flow(pair.b, pair.a, got_a))]
            if how == "close":
                pump = await impl.open_splice(loop, pair.sa, pair.sb)
            else:
                task = asyncio.ensure_future(impl.splice(loop, pair.sa, pair.sb))
            await until(lambda: got_a[0] > 4 * MiB and got_b[0] > 4 * MiB,
                        what="traffic both ways")
            if how == "close":
                pump.close()
                pump.close()                       # idempotent
                result = await asyncio.wait_for(pump.wait(), 2)
                assert (result.how_ended, result.ended_by) == ("aborted", None)
                assert result.bytes_a_to_b >= got_b[0] and result.bytes_b_to_a >= got_a[0]
            else:
                assert not task.done()
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
            # both outer ends see their connection end promptly, so both flows finish
            await asyncio.wait_for(asyncio.gather(*flows), 3)
            assert pair.sa.fileno() == pair.sb.fileno() == -1
            pair.close_outer()

    run(main(), timeout=60)


# --- back-pressure -----------------------------------------------------------------------------

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
            loop.add_writer(sock.fileno(),
                            lambda w=writable: w.done() or w.set_result(None))
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


def test_stalled_reader_stalls_the_writer_with_bounded_buffering(run, event_loop_kind, impl):
    """B never reads: A must stall once the kernel buffers (fixed at 128 KiB each here) and
    the pump's own buffer (<= max_buffer) are full; the other direction keeps working; then
    B reads everything, intact."""
    sock_buf = 128 * 1024

    async def main():
        async with no_fd_leak():
            loop = asyncio.get_running_loop()
            pair, pump = await spliced(impl, rcvbuf=sock_buf, sndbuf=sock_buf)
            pushed, digest = await push_until_stalled(pair.a)
            # Linux doubles SO_RCVBUF/SO_SNDBUF for bookkeeping: 4 sockets x 2 x 128 KiB hold
            # at most 1 MiB between them; everything else is the pump's.
            kernel = 4 * 2 * sock_buf
            assert pump.buffered_a_to_b <= impl.MAX_BUFFER
            assert pushed <= kernel + impl.MAX_BUFFER, (pushed, pump.buffered_a_to_b)
            assert pump.bytes_a_to_b - pump.buffered_a_to_b <= kernel
            # the stalled direction does not hold up the other one
            await loop.sock_sendall(pair.b, b"pong" * 1000)
            assert await recv_exactly(pair.a, 4000) == b"pong" * 1000
            pair.a.shutdown(socket.SHUT_WR)
            assert await recv_all(pair.b) == (pushed, digest)
            pair.b.shutdown(socket.SHUT_WR)
            await read_until_closed(pair.a)
            result = await asyncio.wait_for(pump.wait(), 5)
            pair.close_outer()
            assert result == impl.SpliceResult(pushed, 4000, "eof", None)

    run(main(), timeout=90)


def test_slow_reader_keeps_the_pump_buffer_under_max_buffer(run, event_loop_kind, impl):
    """24 MiB to a reader pacing itself at ~25 MB/s; sampled buffering never passes 4 MiB."""
    total = 24 * MiB

    async def main():
        async with no_fd_leak():
            loop = asyncio.get_running_loop()
            pair, pump = await spliced(impl)
            peak = 0

            async def slow_reader():
                digest, got = hashlib.sha256(), 0
                while True:
                    chunk = await loop.sock_recv(pair.b, 512 * 1024)
                    if not chunk:
                        return got, digest.hexdigest()
                    got += len(chunk)
                    digest.update(chunk)
                    await asyncio.sleep(0.02)        # pacing the reader, not synchronising

            async def sampler():
                nonlocal peak
                while True:
                    peak = max(peak, pump.buffered_a_to_b)
                    await asyncio.sleep(0.005)

            sampling = asyncio.ensure_future(sampler())
            sent, got = await asyncio.gather(send_stream(pair.a, total, 3), slow_reader())
            sampling.cancel()
            pair.close_outer()
            await asyncio.wait_for(pump.wait(), 5)
            assert got == (total, sent)
            assert 0 < peak <= impl.MAX_BUFFER, peak

    run(main(), timeout=90)


# --- no leaks ---------------------------------------------------------------------------------

def test_idle_splices_hold_no_carriers(run, event_loop_kind, impl, expect_path):
    """Once its bytes are through, an idle splice holds no pipe and no copy block: 40 splices
    that carried 1 MiB each way leave at most the pool's bound of pipes open."""
    if expect_path is None:
        pytest.skip("the pure twin has no carriers of its own (the transports' buffers)")

    async def main():
        async with no_fd_leak():
            pairs = [await spliced(impl) for _ in range(40)]
            before, pooled_before = fd_count(), impl._pool_size()[0]

            async def exchange(pair):
                sent_ab, sent_ba = await asyncio.gather(
                    send_stream(pair.a, MiB, 1, eof=False), send_stream(pair.b, MiB, 2, eof=False))
                got_b, got_a = await asyncio.gather(recv_exactly(pair.b, MiB),
                                                    recv_exactly(pair.a, MiB))
                assert hashlib.sha256(got_b).hexdigest() == sent_ab
                assert hashlib.sha256(got_a).hexdigest() == sent_ba

            await asyncio.gather(*(exchange(pair) for pair, _pump in pairs))
            for _pair, pump in pairs:
                assert pump._paths == (expect_path, expect_path)
                assert not pump.done
            # the last callbacks hand their carriers back as the queues run dry
            await until(lambda: not any(any(p._carriers) for _pair, p in pairs),
                        what="carriers returned")
            pipes, blocks = impl._pool_size()
            assert pipes <= 32 and blocks <= 32
            if before is not None and expect_path == "splice":
                assert fd_count() - before == 2 * (pipes - pooled_before)
            for pair, pump in pairs:
                pump.close()
                await pump.wait()
                pair.close_outer()

    run(main(), timeout=60)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts /proc/self/fd")
def test_no_fd_leak_over_many_endings(run, event_loop_kind, impl):
    """60 splices ending every way (FIN both, RST either side, close(), dead socket, a small
    transfer on the splice path first): the process's FD count comes back exactly."""
    async def one(k):
        loop = asyncio.get_running_loop()
        pair, pump = await spliced(impl, head_a=b"h" if k % 2 else b"")
        await loop.sock_sendall(pair.a, b"z" * (1 + k * 1000))
        await recv_exactly(pair.b, 1 + k * 1000 + (k % 2))
        ending = k % 4
        if ending == 0:
            pair.a.shutdown(socket.SHUT_WR)
            pair.b.shutdown(socket.SHUT_WR)
        elif ending == 1:
            reset(pair.a)
        elif ending == 2:
            reset(pair.b)
        else:
            pump.close()
        await asyncio.wait_for(pump.wait(), 3)
        for s in (pair.a, pair.b):
            if s.fileno() >= 0:
                await asyncio.wait_for(read_until_closed(s), 3)
                s.close()

    async def main():
        async with no_fd_leak():
            await asyncio.gather(*(one(k) for k in range(60)))

    run(main(), timeout=60)
