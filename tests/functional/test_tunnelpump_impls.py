"""The tunnel's encrypting pump: one contract, run on every implementation and both event loops.

Implementations (the ``impl`` fixture): the pure twin (``noports._pure.tunnelpump``) with its
CtrStream ciphers; the compiled module (``noports._speedups.tunnelpump``) with its own EVP
ciphers (the fused C path); and the compiled module handed CtrStream ciphers ("compiled-foreign":
its update_into path, what a caller that bypasses ``new_cipher`` gets).  Each test splices real
TCP connections on 127.0.0.1: the test holds the outer ends ``app`` (talks plaintext to the
plain socket) and ``wire`` (sees what the relay would: ciphertext), the pump owns the accepted
ends.  Compiled params are skipped when the module is not built, except under CI (env ``CI``
set), where a missing build fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import hashlib
import inspect
import itertools
import os
import random
import socket
import struct
import sys
import time

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

import noports._pure.tunnelpump as pure_pump
from noports.at.stream import CtrStream

MiB = 1 << 20
HOST = "127.0.0.1"
IMPLS = ["pure", "compiled", "compiled-foreign"]
KEY = bytes(range(32))
IV = bytes(range(100, 116))
KEY2 = bytes(range(50, 82))
IV2 = bytes(range(200, 216))


def _compiled():
    try:
        import noports._speedups.tunnelpump as compiled
    except ImportError as exc:
        msg = ("noports._speedups.tunnelpump is not built "
               f"(python3 setup.py build_ext --inplace): {exc}")
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return compiled


@dataclasses.dataclass
class Impl:
    name: str
    mod: object              # the pump module
    cipher: object           # (key, iv) -> the cipher object this variant hands the pump

    async def open(self, plain, relay, *, enc=None, dec=None, **kw):
        """Splice ``plain``/``relay``; ``enc``/``dec`` are (key, iv) pairs or None."""
        return await self.mod.open_splice_encrypted(
            asyncio.get_running_loop(), plain, relay,
            encrypt=None if enc is None else self.cipher(*enc),
            decrypt=None if dec is None else self.cipher(*dec), **kw)


@pytest.fixture(params=IMPLS)
def impl(request) -> Impl:
    if request.param == "pure":
        return Impl("pure", pure_pump, pure_pump.new_cipher)
    compiled = _compiled()
    if request.param == "compiled":
        return Impl("compiled", compiled, compiled.new_cipher)
    return Impl("compiled-foreign", compiled, CtrStream)


def aes_ctr(key: bytes, iv: bytes, data: bytes) -> bytes:
    """The reference: ``cryptography``'s AES-256-CTR from position 0."""
    return Cipher(algorithms.AES(key), modes.CTR(iv)).encryptor().update(data)


# --- helpers --------------------------------------------------------------------------------

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


class Rig:
    """app <-> [plain | pump | relay] <-> wire."""

    def __init__(self, app, plain, relay, wire):
        self.app, self.plain, self.relay, self.wire = app, plain, relay, wire
        self.pump = None

    def close_outer(self):
        for s in (self.app, self.wire):
            s.close()


async def rig(impl: Impl | None = None, *, enc=None, dec=None, start=True, **kw) -> Rig:
    sockopts = {k: kw.pop(k) for k in ("rcvbuf", "sndbuf") if k in kw}
    app, plain = await tcp_conn(**sockopts)
    wire, relay = await tcp_conn(**sockopts)
    r = Rig(app, plain, relay, wire)
    if start:
        r.pump = await impl.open(plain, relay, enc=enc, dec=dec, **kw)
    return r


def reset(sock):
    """Close with an RST (SO_LINGER 0)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


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


async def recv_all(sock, cipher=None) -> tuple[int, str]:
    """Read to EOF: (byte count, sha256 of what was read, after ``cipher`` if given)."""
    loop = asyncio.get_running_loop()
    digest = hashlib.sha256()
    buf = bytearray(MiB)
    view = memoryview(buf)
    total = 0
    while True:
        n = await loop.sock_recv_into(sock, buf)
        if not n:
            return total, digest.hexdigest()
        digest.update(view[:n] if cipher is None else cipher.update(view[:n]))
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
    """Everything until the pump closes: (bytes, "eof" | "reset")."""
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
    """Make the loop open what it opens once per loop (libuv keeps /dev/null open as its EMFILE
    reserve from the first stream a uvloop transport wraps)."""
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


@contextlib.asynccontextmanager
async def no_fd_leak():
    """Every FD a test opens is closed by its end."""
    await _warm_loop()
    gc.collect()      # sockets an earlier failed test dropped without closing
    before = fd_count()
    yield
    if before is None:
        return
    # the loop may still hold a closed transport for one iteration
    deadline = time.monotonic() + 2.0
    while fd_count() != before and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert fd_count() == before, f"FDs before {before}, after {fd_count()}"


# --- the API is the same ---------------------------------------------------------------------

def test_same_public_api():
    compiled = _compiled()
    assert compiled.__all__ == pure_pump.__all__
    assert (compiled.MAX_BUFFER, compiled.READ_SIZE) == (pure_pump.MAX_BUFFER,
                                                         pure_pump.READ_SIZE)
    assert compiled.TunnelResult is pure_pump.TunnelResult
    assert [f.name for f in dataclasses.fields(compiled.TunnelResult)] == \
        ["bytes_plain_to_relay", "bytes_relay_to_plain", "how_ended", "ended_by"]
    for name in ("open_splice_encrypted", "splice_encrypted"):
        ours, twin = getattr(compiled, name), getattr(pure_pump, name)
        assert inspect.iscoroutinefunction(ours) == inspect.iscoroutinefunction(twin) is True
        got = [(p.name, p.kind, p.default) for p in inspect.signature(ours).parameters.values()]
        want = [(p.name, p.kind, p.default) for p in inspect.signature(twin).parameters.values()]
        assert got == want, name
    public = {n for n in dir(pure_pump.TunnelSplice) if not n.startswith("_")}
    assert public == {"bytes_plain_to_relay", "bytes_relay_to_plain", "buffered_plain_to_relay",
                      "buffered_relay_to_plain", "done", "wait", "close"}
    assert public <= set(dir(compiled.TunnelSplice))


@pytest.mark.parametrize("which", ["pure", "compiled"])
def test_new_cipher_is_ctrstream_compatible(which):
    """Both modules' ciphers: bad lengths refused; update / update_into (in place too) /
    process_in_place / position agree with CtrStream on a stream cut at odd places."""
    mod = pure_pump if which == "pure" else _compiled()
    for key, iv in ((KEY[:31], IV), (KEY + b"x", IV), (KEY, IV[:15]), (KEY, b"")):
        with pytest.raises(ValueError):
            mod.new_cipher(key, iv)
    data = os.urandom(70_001)
    want = aes_ctr(KEY, IV, data)
    c = mod.new_cipher(KEY, IV)
    out = bytearray()
    cuts = [0, 1, 16, 33, 4095, 4096 + 17, 65_536, 70_001]
    for i, (a, b) in enumerate(itertools.pairwise(cuts)):
        if i % 3 == 0:
            out += c.update(data[a:b])
        elif i % 3 == 1:
            piece = bytearray(data[a:b])
            assert c.update_into(piece, piece) == b - a         # exactly in place
            out += piece
        else:
            piece = bytearray(data[a:b])
            c.process_in_place(piece)
            out += piece
        assert c.position == b
    assert bytes(out) == want
    with pytest.raises(ValueError):
        c.update_into(b"abc", bytearray(2))


def test_max_buffer_below_two_reads_is_refused(run, impl):
    async def main():
        loop = asyncio.get_running_loop()
        with pytest.raises(ValueError):
            impl.mod.TunnelSplice(loop, None, None, b"", b"", 1024)
        with pytest.raises(ValueError):
            impl.mod.TunnelSplice(loop, None, None, b"", b"", 2 * impl.mod.READ_SIZE - 1)
        impl.mod.TunnelSplice(loop, None, None, b"", b"", 2 * impl.mod.READ_SIZE)  # smallest

    run(main())


# --- what goes on the wire -------------------------------------------------------------------

ODD_CHUNKS = [1, 15, 16, 17, 31, 4095, 65_537, 3, 262_143, 262_145, 1_000_003, 7]


def test_known_answer_ciphertext_on_the_wire_both_ways(run, event_loop_kind, impl):
    """The relay sees cryptography's AES-256-CTR of the plaintext (plain -> relay), and
    ciphertext coming back is decrypted with the other key (relay -> plain).  Each chunk is
    sent only after the previous one arrived, so the pump's reads really are cut at these odd
    sizes: the keystream position must carry across them."""
    plain_out = os.urandom(sum(ODD_CHUNKS))
    plain_back = os.urandom(sum(ODD_CHUNKS))
    wire_out = aes_ctr(KEY, IV, plain_out)
    wire_back = aes_ctr(KEY2, IV2, plain_back)

    async def main():
        async with no_fd_leak():
            loop = asyncio.get_running_loop()
            r = await rig(impl, enc=(KEY, IV), dec=(KEY2, IV2))
            off = 0
            for n in ODD_CHUNKS:
                await loop.sock_sendall(r.app, plain_out[off:off + n])
                assert await recv_exactly(r.wire, n) == wire_out[off:off + n], (off, n)
                await loop.sock_sendall(r.wire, wire_back[off:off + n])
                assert await recv_exactly(r.app, n) == plain_back[off:off + n], (off, n)
                off += n
            assert (r.pump.bytes_plain_to_relay, r.pump.bytes_relay_to_plain) == (off, off)
            r.app.shutdown(socket.SHUT_WR)
            r.wire.shutdown(socket.SHUT_WR)
            assert await read_until_closed(r.wire) == (b"", "eof")
            assert await read_until_closed(r.app) == (b"", "eof")
            result = await asyncio.wait_for(r.pump.wait(), 5)
            r.close_outer()
            assert result == pure_pump.TunnelResult(off, off, "eof", None)

    run(main())


def _spec_ctr(key: bytes, iv: bytes, data: bytes) -> bytes:
    """AES-256-CTR written out from noports-protocol.md §6: keystream block i is AES(key, IV + i)
    with the IV read as ONE 128-bit big-endian counter (wrapping mod 2**128)."""
    ecb = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    start = int.from_bytes(iv, "big")
    nblocks = (len(data) + 15) // 16
    counters = b"".join(((start + i) % (1 << 128)).to_bytes(16, "big") for i in range(nblocks))
    stream = ecb.update(counters)
    return bytes(a ^ b for a, b in zip(data, stream[:len(data)], strict=True))


@pytest.mark.parametrize("iv_hex", ["0123456789abcdef" "fffffffffffffffd",
                                    "0123456789abcdef" "00000000fffffffe",
                                    "ffffffffffffffff" "ffffffffffffffff"],
                         ids=["carry-64", "carry-32", "wrap-128"])
def test_counter_carries_over_all_128_bits(run, event_loop_kind, impl, iv_hex):
    """Derived from the spec (§6: the 16-byte IV is the whole counter block, incremented
    big-endian over all 128 bits): IVs whose counter carries past bit 32, bit 64, and wraps,
    through the pump in odd-sized pieces, against a counter written out by hand."""
    iv = bytes.fromhex(iv_hex)
    data = os.urandom(16 * 8 + 5)
    want = _spec_ctr(KEY, iv, data)

    async def main():
        async with no_fd_leak():
            loop = asyncio.get_running_loop()
            r = await rig(impl, enc=(KEY, iv), dec=(KEY, iv))
            off = 0
            for n in (5, 16, 27, 1, len(data) - 49):
                await loop.sock_sendall(r.app, data[off:off + n])
                assert await recv_exactly(r.wire, n) == want[off:off + n], (off, n)
                off += n
            await loop.sock_sendall(r.wire, want)           # the same stream decrypts back
            assert await recv_exactly(r.app, len(data)) == data
            r.pump.close()
            await asyncio.wait_for(r.pump.wait(), 5)
            r.close_outer()

    run(main())


def test_odd_block_size_keeps_the_keystream(run, event_loop_kind):
    """Compiled, forced to 4099-byte blocks (each read ends mid AES block, and a send may be
    partial anywhere): 8 MiB both ways still equal the reference stream."""
    compiled = _compiled()
    impl = Impl("compiled", compiled, compiled.new_cipher)
    data = os.urandom(8 * MiB + 5)

    async def main():
        async with no_fd_leak():
            loop = asyncio.get_running_loop()
            r = await rig(impl, enc=(KEY, IV), dec=(KEY2, IV2))
            _s, got_wire, _s2, got_app = await asyncio.gather(
                loop.sock_sendall(r.app, data), recv_exactly(r.wire, len(data)),
                loop.sock_sendall(r.wire, aes_ctr(KEY2, IV2, data)),
                recv_exactly(r.app, len(data)))
            assert got_wire == aes_ctr(KEY, IV, data)
            assert got_app == data
            r.pump.close()
            await asyncio.wait_for(r.pump.wait(), 5)
            r.close_outer()

    previous = compiled._configure(block_size=4099)
    try:
        run(main(), timeout=60)
    finally:
        compiled._configure(*previous)


def test_encryption_off_is_a_plain_copy(run, event_loop_kind, impl):
    async def main():
        async with no_fd_leak():
            loop = asyncio.get_running_loop()
            r = await rig(impl)
            data = os.urandom(MiB + 3)
            _sent, got = await asyncio.gather(loop.sock_sendall(r.app, data),
                                              recv_exactly(r.wire, len(data)))
            assert got == data
            await loop.sock_sendall(r.wire, b"back")
            assert await recv_exactly(r.app, 4) == b"back"
            r.pump.close()
            result = await asyncio.wait_for(r.pump.wait(), 5)
            r.close_outer()
            assert (result.bytes_plain_to_relay, result.bytes_relay_to_plain) == (MiB + 3, 4)
            assert (result.how_ended, result.ended_by) == ("aborted", None)

    run(main())


# --- carrying data: an encrypt -> decrypt pair, as npt and npd run it ------------------------

async def tunnel_pair(impl_client: Impl, impl_daemon: Impl):
    """app <-> [client pump] <-> relay TCP <-> [daemon pump] <-> far, twin keys: C2D (KEY, IV),
    D2C (KEY2, IV2).  Returns (app, far, client_splice, daemon_splice)."""
    app, c_plain = await tcp_conn()
    far, d_plain = await tcp_conn()
    c_relay, d_relay = await tcp_conn()
    client = await impl_client.open(c_plain, c_relay, enc=(KEY, IV), dec=(KEY2, IV2))
    daemon = await impl_daemon.open(d_plain, d_relay, enc=(KEY2, IV2), dec=(KEY, IV))
    return app, far, client, daemon


def test_100mb_both_ways_through_an_encrypt_decrypt_pair(run, event_loop_kind, impl):
    seed = int.from_bytes(os.urandom(4), "big")
    n_up, n_down = 100 * 10**6, 100 * 10**6 + 12345

    async def main():
        async with no_fd_leak():
            app, far, client, daemon = await tunnel_pair(impl, impl)
            try:
                sent_up, sent_down, got_far, got_app = await asyncio.gather(
                    send_stream(app, n_up, seed), send_stream(far, n_down, seed + 1),
                    recv_all(far), recv_all(app))
                results = await asyncio.wait_for(asyncio.gather(client.wait(), daemon.wait()),
                                                 5)
            finally:
                app.close()
                far.close()
            assert got_far == (n_up, sent_up), f"up corrupted (seed {seed})"
            assert got_app == (n_down, sent_down), f"down corrupted (seed {seed})"
            for result in results:
                assert (result.how_ended, result.ended_by) == ("eof", None)
            assert (results[0].bytes_plain_to_relay, results[0].bytes_relay_to_plain) == \
                (n_up, n_down)
            assert (results[1].bytes_plain_to_relay, results[1].bytes_relay_to_plain) == \
                (n_down, n_up)
            assert client.buffered_plain_to_relay == client.buffered_relay_to_plain == 0

    run(main(), timeout=240)


@pytest.mark.parametrize("ends", ["compiled-pure", "pure-compiled"])
def test_either_end_may_run_either_implementation(run, event_loop_kind, ends):
    """npt and npd may run different pumps (a pure install on one end): the wire is the same.
    Also crosses the ciphers over: the pure pump driven by EvpCtr objects and back."""
    compiled = _compiled()
    c_name, d_name = ends.split("-")
    pick = {"compiled": Impl("compiled", compiled, pure_pump.new_cipher),
            "pure": Impl("pure", pure_pump, compiled.new_cipher)}
    n = 8 * MiB + 1

    async def main():
        async with no_fd_leak():
            app, far, client, daemon = await tunnel_pair(pick[c_name], pick[d_name])
            sent_up, sent_down, got_far, got_app = await asyncio.gather(
                send_stream(app, n, 1), send_stream(far, n, 2), recv_all(far), recv_all(app))
            await asyncio.wait_for(asyncio.gather(client.wait(), daemon.wait()), 5)
            app.close()
            far.close()
            assert (got_far, got_app) == ((n, sent_up), (n, sent_down))

    run(main(), timeout=60)


def test_many_splices_at_once(run, event_loop_kind, impl):
    """20 live tunnels on one loop, each with its own sizes and keys: no cross-talk."""
    async def one(k):
        key, iv = hashlib.sha256(b"%d" % k).digest(), bytes([k]) * 16
        n_up, n_down = 1000 * k + 1, 3 * MiB - 777 * k
        r = await rig(impl, enc=(key, iv), dec=(key, iv))
        try:
            sent_up, sent_down, got_wire, got_app = await asyncio.gather(
                send_stream(r.app, n_up, k),
                send_stream(r.wire, n_down, 100 + k, cipher=CtrStream(key, iv)),
                recv_all(r.wire, cipher=CtrStream(key, iv)), recv_all(r.app))
            result = await asyncio.wait_for(r.pump.wait(), 5)
        finally:
            r.close_outer()
        assert got_wire == (n_up, sent_up)
        assert got_app == (n_down, sent_down)
        assert (result.bytes_plain_to_relay, result.bytes_relay_to_plain) == (n_up, n_down)

    async def main():
        async with no_fd_leak():
            await asyncio.gather(*(one(k) for k in range(20)))

    run(main(), timeout=120)


# --- head bytes --------------------------------------------------------------------------------

def test_head_bytes_go_through_the_cipher_first(run, event_loop_kind, impl):
    """Bytes already read (plaintext from the plain socket, ciphertext from the relay) take
    the keystream's first positions; bytes queued in the sockets follow them."""
    plain = b"head from the app|queued in app"
    cipher_back = aes_ctr(KEY2, IV2, b"head from the relay|queued in relay")

    async def main():
        async with no_fd_leak():
            loop = asyncio.get_running_loop()
            r = await rig(impl, start=False)
            await loop.sock_sendall(r.app, plain[18:])
            await loop.sock_sendall(r.wire, cipher_back[20:])
            r.pump = await impl.open(r.plain, r.relay, enc=(KEY, IV), dec=(KEY2, IV2),
                                     head_plain=plain[:18], head_relay=bytearray(cipher_back[:20]))
            assert await recv_exactly(r.wire, len(plain)) == aes_ctr(KEY, IV, plain)
            assert await recv_exactly(r.app, len(cipher_back)) == \
                b"head from the relay|queued in relay"
            await until(lambda: r.pump.bytes_plain_to_relay == len(plain)
                        and r.pump.bytes_relay_to_plain == len(cipher_back),
                        what="counts with head bytes")
            r.app.shutdown(socket.SHUT_WR)
            r.wire.shutdown(socket.SHUT_WR)
            assert await read_until_closed(r.app) == (b"", "eof")
            assert await read_until_closed(r.wire) == (b"", "eof")
            result = await asyncio.wait_for(r.pump.wait(), 5)
            r.close_outer()
            assert result == pure_pump.TunnelResult(len(plain), len(cipher_back), "eof", None)

    run(main())


def test_head_only_then_immediate_fin(run, event_loop_kind, impl):
    """A head bigger than the socket buffers with a FIN behind it: the FIN waits its turn."""
    head = os.urandom(3 * MiB)

    async def main():
        async with no_fd_leak():
            r = await rig(impl, start=False, rcvbuf=64 * 1024, sndbuf=64 * 1024)
            r.app.shutdown(socket.SHUT_WR)
            r.pump = await impl.open(r.plain, r.relay, enc=(KEY, IV), head_plain=head)
            got = await recv_all(r.wire, cipher=CtrStream(KEY, IV))
            assert got == (len(head), hashlib.sha256(head).hexdigest())
            r.wire.shutdown(socket.SHUT_WR)
            await read_until_closed(r.app)
            result = await asyncio.wait_for(r.pump.wait(), 5)
            r.close_outer()
            assert result == pure_pump.TunnelResult(len(head), 0, "eof", None)

    run(main())


# --- FIN, RST, close ---------------------------------------------------------------------------

@pytest.mark.parametrize("first", ["plain", "relay"])
def test_half_close_passes_fin_and_the_other_way_keeps_flowing(run, event_loop_kind, impl,
                                                                first):
    async def main():
        async with no_fd_leak():
            loop = asyncio.get_running_loop()
            r = await rig(impl, enc=(KEY, IV), dec=(KEY, IV))
            # what each outer end writes/reads: the app speaks plaintext, the wire ciphertext
            wire_tx, wire_rx = CtrStream(KEY, IV), CtrStream(KEY, IV)
            ends = {"plain": (r.app, None, None), "relay": (r.wire, wire_tx, wire_rx)}
            closer, c_tx, c_rx = ends[first]
            other, o_tx, o_rx = ends["relay" if first == "plain" else "plain"]
            await loop.sock_sendall(closer, b"request" if c_tx is None else c_tx.update(b"request"))
            closer.shutdown(socket.SHUT_WR)
            assert await recv_all(other, o_rx) == (7, hashlib.sha256(b"request").hexdigest())
            assert not r.pump.done
            # the other direction is untouched by the FIN
            sent, got = await asyncio.gather(
                send_stream(other, 3 * MiB, 5, eof=False, cipher=o_tx),
                recv_exactly(closer, 3 * MiB))
            assert hashlib.sha256(got if c_rx is None else c_rx.update(got)).hexdigest() == sent
            assert not r.pump.done
            other.shutdown(socket.SHUT_WR)
            assert await read_until_closed(closer) == (b"", "eof")
            result = await asyncio.wait_for(r.pump.wait(), 5)
            r.close_outer()
            counts = (7, 3 * MiB) if first == "plain" else (3 * MiB, 7)
            assert result == pure_pump.TunnelResult(*counts, "eof", None)

    run(main())


@pytest.mark.parametrize("nbytes", [1000, 3 * MiB])
@pytest.mark.parametrize("side", ["plain", "relay"])
def test_bytes_then_a_reset_in_one_wakeup_still_end_the_splice(run, event_loop_kind, impl, side,
                                                                nbytes):
    """The peer's last bytes and its RST reach the pump's socket before the pump runs: the
    splice must end as a reset by that side, never hang (uvloop reports POLLERR once and then
    stops polling the socket; see the relay pump's test of the same name)."""
    async def main():
        async with no_fd_leak():
            r = await rig(impl, enc=(KEY, IV), dec=(KEY, IV))
            ends = {"plain": r.app, "relay": r.wire}
            victim, other = ends[side], ends["relay" if side == "plain" else "plain"]
            victim.setblocking(True)
            victim.sendall(os.urandom(nbytes))
            reset(victim)
            result = await asyncio.wait_for(r.pump.wait(), 5)
            other.close()
            assert (result.how_ended, result.ended_by) == ("reset", side)

    run(main())


@pytest.mark.parametrize("side", ["plain", "relay"])
def test_a_reset_on_one_side_closes_the_other(run, event_loop_kind, impl, side):
    async def main():
        async with no_fd_leak():
            loop = asyncio.get_running_loop()
            r = await rig(impl, enc=(KEY, IV), dec=(KEY, IV))
            ends = {"plain": r.app, "relay": r.wire}
            victim, other = ends[side], ends["relay" if side == "plain" else "plain"]
            await loop.sock_sendall(victim, b"x" * 1000)
            assert len(await recv_exactly(other, 1000)) == 1000
            reset(victim)
            start = time.monotonic()
            await asyncio.wait_for(read_until_closed(other), 2)
            assert time.monotonic() - start < 1.0
            result = await asyncio.wait_for(r.pump.wait(), 2)
            other.close()
            assert (result.how_ended, result.ended_by) == ("reset", side)
            counts = (1000, 0) if side == "plain" else (0, 1000)
            assert (result.bytes_plain_to_relay, result.bytes_relay_to_plain) == counts

    run(main())


@pytest.mark.parametrize("side", ["plain", "relay"])
def test_a_full_close_ends_the_splice_when_data_comes_for_it(run, event_loop_kind, impl, side):
    """A side that close()s (not shutdown) first looks like a FIN; the next bytes for it draw
    its RST, and the pump then closes the other side too."""
    async def main():
        async with no_fd_leak():
            loop = asyncio.get_running_loop()
            r = await rig(impl, enc=(KEY, IV), dec=(KEY, IV))
            ends = {"plain": r.app, "relay": r.wire}
            gone, other = ends[side], ends["relay" if side == "plain" else "plain"]
            gone.close()
            assert await asyncio.wait_for(recv_all(other), 2) == (0, hashlib.sha256().hexdigest())

            async def keep_sending():
                with contextlib.suppress(OSError):
                    while True:
                        await loop.sock_sendall(other, b"y" * 65536)

            sender = asyncio.ensure_future(keep_sending())
            result = await asyncio.wait_for(r.pump.wait(), 3)
            await asyncio.wait_for(sender, 3)     # the pump closed `other`: its sends fail
            other.close()
            assert (result.how_ended, result.ended_by) == ("reset", side)

    run(main())


@pytest.mark.parametrize("extra", [b"", b"bye"], ids=["nothing", "3-bytes"])
def test_peer_that_closes_right_after_connecting(run, event_loop_kind, impl, extra):
    async def main():
        async with no_fd_leak():
            loop = asyncio.get_running_loop()
            r = await rig(impl, start=False)
            if extra:
                await loop.sock_sendall(r.wire, aes_ctr(KEY, IV, extra))
            r.wire.close()                     # gone before the pump even starts
            r.pump = await impl.open(r.plain, r.relay, enc=(KEY, IV), dec=(KEY, IV))
            start = time.monotonic()
            data, how = await asyncio.wait_for(read_until_closed(r.app), 2)
            assert (data, how) == (extra, "eof")
            assert time.monotonic() - start < 1.0
            r.app.close()
            result = await asyncio.wait_for(r.pump.wait(), 2)
            assert (result.bytes_relay_to_plain, result.bytes_plain_to_relay) == (len(extra), 0)
            assert result.how_ended in ("eof", "reset", "closed")

    run(main())


@pytest.mark.parametrize("side", ["plain", "relay"])
def test_a_socket_reset_before_the_splice_starts(run, event_loop_kind, impl, side):
    """The peer reset before the pump got its sockets: a reset by that side at once, and the
    other side closed (ownership of both sockets was taken)."""
    async def main():
        async with no_fd_leak():
            r = await rig(impl, start=False)
            reset(r.app if side == "plain" else r.wire)
            r.pump = await impl.open(r.plain, r.relay, enc=(KEY, IV), head_plain=b"head")
            result = await asyncio.wait_for(r.pump.wait(), 2)
            assert (result.how_ended, result.ended_by) == ("reset", side)
            assert r.plain.fileno() == r.relay.fileno() == -1
            survivor = r.wire if side == "plain" else r.app
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
            r = await rig(impl, start=False)
            got_wire, got_app = [0], [0]
            flows = [asyncio.ensure_future(endless_flow(r.app, r.wire, got_wire)),
                     asyncio.ensure_future(endless_flow(r.wire, r.app, got_app))]
            enc, dec = impl.cipher(KEY, IV), impl.cipher(KEY2, IV2)
            if how == "close":
                pump = await impl.mod.open_splice_encrypted(loop, r.plain, r.relay,
                                                            encrypt=enc, decrypt=dec)
            else:
                task = asyncio.ensure_future(impl.mod.splice_encrypted(
                    loop, r.plain, r.relay, encrypt=enc, decrypt=dec))
            await until(lambda: got_app[0] > 4 * MiB and got_wire[0] > 4 * MiB,
                        what="traffic both ways")
            if how == "close":
                pump.close()
                pump.close()                       # idempotent
                result = await asyncio.wait_for(pump.wait(), 2)
                assert (result.how_ended, result.ended_by) == ("aborted", None)
                assert result.bytes_plain_to_relay >= got_wire[0]
                assert result.bytes_relay_to_plain >= got_app[0]
            else:
                assert not task.done()
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
            # both outer ends see their connection end promptly, so both flows finish
            await asyncio.wait_for(asyncio.gather(*flows), 3)
            assert r.plain.fileno() == r.relay.fileno() == -1
            r.close_outer()

    run(main(), timeout=60)


def test_a_failing_foreign_cipher_ends_the_splice(run, event_loop_kind):
    """Compiled pump, a cipher object that raises: the splice ends as a reset, both sockets
    are closed, and the error reaches the loop's exception handler (not swallowed)."""
    compiled = _compiled()

    class Broken:
        def update_into(self, data, out):
            raise RuntimeError("cipher broke")

    async def main():
        async with no_fd_leak():
            loop = asyncio.get_running_loop()
            errors = []
            loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx.get("exception")))
            r = await rig(start=False)
            pump = await compiled.open_splice_encrypted(loop, r.plain, r.relay,
                                                        encrypt=Broken())
            await loop.sock_sendall(r.app, b"data")
            result = await asyncio.wait_for(pump.wait(), 2)
            assert result.how_ended == "reset"
            assert await asyncio.wait_for(read_until_closed(r.wire), 2) == (b"", "eof")
            r.close_outer()
            await until(lambda: errors, what="the error reported")
            assert isinstance(errors[0], RuntimeError)
            with pytest.raises(TypeError):
                compiled.TunnelSplice(loop, object(), None, b"", b"", compiled.MAX_BUFFER)

    run(main())


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


def test_stalled_relay_stalls_the_app_with_bounded_buffering(run, event_loop_kind, impl):
    """The relay side never reads: the app must stall once the kernel buffers (fixed at
    128 KiB each here) and the pump's own buffer (<= max_buffer) are full; the other direction
    keeps working; then the relay side reads everything, intact after decryption."""
    sock_buf = 128 * 1024

    async def main():
        async with no_fd_leak():
            loop = asyncio.get_running_loop()
            r = await rig(impl, enc=(KEY, IV), dec=(KEY2, IV2), rcvbuf=sock_buf, sndbuf=sock_buf)
            pushed, digest = await push_until_stalled(r.app)
            # Linux doubles SO_RCVBUF/SO_SNDBUF for bookkeeping: 4 sockets x 2 x 128 KiB hold
            # at most 1 MiB between them; everything else is the pump's.
            kernel = 4 * 2 * sock_buf
            pump = r.pump
            assert pump.buffered_plain_to_relay <= impl.mod.MAX_BUFFER
            assert pushed <= kernel + impl.mod.MAX_BUFFER, (pushed, pump.buffered_plain_to_relay)
            assert pump.bytes_plain_to_relay - pump.buffered_plain_to_relay <= kernel
            # the stalled direction does not hold up the other one
            await loop.sock_sendall(r.wire, aes_ctr(KEY2, IV2, b"pong" * 1000))
            assert await recv_exactly(r.app, 4000) == b"pong" * 1000
            r.app.shutdown(socket.SHUT_WR)
            assert await recv_all(r.wire, cipher=CtrStream(KEY, IV)) == (pushed, digest)
            r.wire.shutdown(socket.SHUT_WR)
            await read_until_closed(r.app)
            result = await asyncio.wait_for(pump.wait(), 5)
            r.close_outer()
            assert result == pure_pump.TunnelResult(pushed, 4000, "eof", None)

    run(main(), timeout=90)


def test_slow_reader_keeps_the_pump_buffer_under_max_buffer(run, event_loop_kind, impl):
    """24 MiB to a relay side reading at ~25 MB/s; sampled buffering never passes the
    smallest max_buffer allowed (two reads), the stream arrives intact."""
    total = 24 * MiB

    async def main():
        async with no_fd_leak():
            loop = asyncio.get_running_loop()
            max_buffer = 2 * impl.mod.READ_SIZE
            r = await rig(impl, enc=(KEY, IV), max_buffer=max_buffer)
            peak = 0

            async def slow_reader():
                digest, got, dec = hashlib.sha256(), 0, CtrStream(KEY, IV)
                while True:
                    chunk = await loop.sock_recv(r.wire, 512 * 1024)
                    if not chunk:
                        return got, digest.hexdigest()
                    got += len(chunk)
                    digest.update(dec.update(chunk))
                    await asyncio.sleep(0.02)        # pacing the reader, not synchronising

            async def sampler():
                nonlocal peak
                while True:
                    peak = max(peak, r.pump.buffered_plain_to_relay)
                    await asyncio.sleep(0.005)

            sampling = asyncio.ensure_future(sampler())
            sent, got = await asyncio.gather(send_stream(r.app, total, 3), slow_reader())
            sampling.cancel()
            r.close_outer()
            await asyncio.wait_for(r.pump.wait(), 5)
            assert got == (total, sent)
            assert 0 < peak <= max_buffer, peak

    run(main(), timeout=90)


# --- no leaks ---------------------------------------------------------------------------------

def test_idle_splices_hold_no_blocks(run, event_loop_kind):
    """Compiled: once its bytes are through, an idle splice holds no receive block (they go
    back to a bounded per-process pool), so idle connections cost no 256 KiB each."""
    compiled = _compiled()
    impl = Impl("compiled", compiled, compiled.new_cipher)

    async def main():
        async with no_fd_leak():
            rigs = [await rig(impl, enc=(KEY, IV), dec=(KEY, IV)) for _ in range(40)]

            async def exchange(r):
                await asyncio.gather(
                    send_stream(r.app, MiB, 1, eof=False),
                    send_stream(r.wire, MiB, 2, eof=False, cipher=CtrStream(KEY, IV)),
                    recv_exactly(r.wire, MiB), recv_exactly(r.app, MiB))

            await asyncio.gather(*(exchange(r) for r in rigs))
            await until(lambda: not any(any(r.pump._carriers) for r in rigs),
                        what="blocks returned")
            assert compiled._pool_size() <= 32
            for r in rigs:
                assert not r.pump.done
                assert r.pump._cipher_kinds == ("evp", "evp")
                r.pump.close()
                await r.pump.wait()
                r.close_outer()

    run(main(), timeout=60)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts /proc/self/fd")
def test_no_fd_leak_over_many_endings(run, event_loop_kind, impl):
    """60 splices ending every way (FIN both, RST either side, close()), some with head bytes:
    the process's FD count comes back exactly."""
    async def one(k):
        loop = asyncio.get_running_loop()
        head = b"h" if k % 2 else b""
        r = await rig(impl, enc=(KEY, IV), dec=(KEY, IV), head_plain=head)
        await loop.sock_sendall(r.app, b"z" * (1 + k * 1000))
        await recv_exactly(r.wire, 1 + k * 1000 + len(head))
        ending = k % 4
        if ending == 0:
            r.app.shutdown(socket.SHUT_WR)
            r.wire.shutdown(socket.SHUT_WR)
        elif ending == 1:
            reset(r.app)
        elif ending == 2:
            reset(r.wire)
        else:
            r.pump.close()
        await asyncio.wait_for(r.pump.wait(), 3)
        for s in (r.app, r.wire):
            if s.fileno() >= 0:
                await asyncio.wait_for(read_until_closed(s), 3)
                s.close()

    async def main():
        async with no_fd_leak():
            await asyncio.gather(*(one(k) for k in range(60)))

    run(main(), timeout=60)
