"""The tunnel's encrypting pump: one contract, run on every implementation and both event loops.

Implementations (the ``impl`` fixture): the pure twin (``noports._pure.tunnelpump``) with its
CtrStream ciphers; the compiled module (``noports._speedups.tunnelpump``) with its own EVP
ciphers (the fused C path); and the compiled module handed CtrStream ciphers ("compiled-foreign":
its update_into path, what a caller that bypasses ``new_cipher`` gets).  Each test splices real
TCP connections on 127.0.0.1: the test holds the outer ends ``a`` (the app: talks plaintext to
the plain socket) and ``b`` (the wire: sees what the relay would, ciphertext), the pump owns
the accepted ends ``sa`` (plain) and ``sb`` (relay).  Compiled params are skipped when the
module is not built, except under CI (env ``CI`` set), where a missing build fails.

The contract the tunnel pump shares with the relay pump (FIN, RST, close, head bytes,
back-pressure, counts, no FD leaks) is written once in ``pump_contract.py`` and collected here
through :class:`TestTunnelPumpContract`, with the wire end read and written through
``cryptography``'s AES-256-CTR; this file adds what only the tunnel pump has: the ciphertext
on the wire, the 128-bit counter, encryption off, an encrypt -> decrypt pair of pumps.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import itertools
import os
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

import noports._pure.tunnelpump as pure_pump
from noports.at.stream import CtrStream
from tests.functional.pump_contract import (
    MiB,
    PumpContract,
    Twin,
    close_links,
    compiled_or_skip,
    end_with_fins,
    exchange_and_idle,
    no_fd_leak,
    open_link,
    read_until_closed,
    receive_all,
    recv_exactly,
    send_stream,
    tcp_conn,
    until,
)

IMPLS = ["pure", "compiled", "compiled-foreign"]
KEY = bytes(range(32))
IV = bytes(range(100, 116))
KEY2 = bytes(range(50, 82))
IV2 = bytes(range(200, 216))


def reference(key: bytes, iv: bytes):
    """``cryptography``'s AES-256-CTR from position 0, as a stream (``.update``)."""
    return Cipher(algorithms.AES(key), modes.CTR(iv)).encryptor()


def aes_ctr(key: bytes, iv: bytes, data: bytes) -> bytes:
    """The reference applied to ``data`` from position 0."""
    return reference(key, iv).update(data)


@dataclasses.dataclass
class TunnelTwin(Twin):
    """The tunnel pump: side "plain" (a) speaks plaintext, side "relay" (b) ciphertext.
    ``cipher`` makes the cipher objects this variant hands the pump from (key, iv)."""

    MODULE = "tunnelpump"
    SIDES = ("plain", "relay")
    FUNCTIONS = ("open_splice_encrypted", "splice_encrypted")
    SPLICE, RESULT = "TunnelSplice", "TunnelResult"
    cipher: Callable

    @staticmethod
    def keys(tag: int):
        """((key, iv) plain -> relay, (key, iv) relay -> plain) of a link's ``tag``."""
        if tag == 0:
            return (KEY, IV), (KEY2, IV2)
        up, down = (hashlib.sha256(b"%s %d" % (way, tag)).digest() for way in (b"up", b"down"))
        return (up, down[:16]), (down, up[:16])

    def codecs(self, tag):
        up, down = self.keys(tag)
        # the wire writes what the pump decrypts and reads what it encrypted
        return {"relay": (reference(*down), reference(*up))}

    async def open_sockets(self, plain, relay, *, enc=None, dec=None, **kw):
        """Splice ``plain``/``relay``; ``enc``/``dec`` are (key, iv) pairs or None."""
        return await self.mod.open_splice_encrypted(
            asyncio.get_running_loop(), plain, relay,
            encrypt=None if enc is None else self.cipher(*enc),
            decrypt=None if dec is None else self.cipher(*dec), **kw)

    async def open(self, link, *, head_a=b"", head_b=b"", **kw):
        enc, dec = self.keys(link.tag)
        return await self.open_sockets(link.sa, link.sb, enc=enc, dec=dec, head_plain=head_a,
                                       head_relay=head_b, **kw)

    def splice(self, loop, link):
        enc, dec = self.keys(link.tag)
        return self.mod.splice_encrypted(loop, link.sa, link.sb, encrypt=self.cipher(*enc),
                                         decrypt=self.cipher(*dec))

    def new_splice(self, loop, max_buffer):
        return self.mod.TunnelSplice(loop, None, None, b"", b"", max_buffer)


@pytest.fixture(params=IMPLS)
def impl(request) -> TunnelTwin:
    if request.param == "pure":
        return TunnelTwin("pure", pure_pump, pure_pump.new_cipher)
    compiled = compiled_or_skip("tunnelpump")
    if request.param == "compiled":
        return TunnelTwin("compiled", compiled, compiled.new_cipher)
    return TunnelTwin("compiled-foreign", compiled, CtrStream)


class TestTunnelPumpContract(PumpContract):
    TWIN = TunnelTwin


async def keyed_link(impl: TunnelTwin, *, enc=None, dec=None, **kw):
    """A link whose pump runs with exactly these keys (None: that direction in the clear)."""
    link = await open_link(impl, start=False)
    link.pump = await impl.open_sockets(link.sa, link.sb, enc=enc, dec=dec, **kw)
    return link


# --- the ciphers ---------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["pure", "compiled"])
def test_new_cipher_is_ctrstream_compatible(which):
    """Both modules' ciphers: bad lengths refused; update / update_into (in place too) /
    process_in_place / position agree with CtrStream on a stream cut at odd places."""
    mod = pure_pump if which == "pure" else compiled_or_skip("tunnelpump")
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
            link = await keyed_link(impl, enc=(KEY, IV), dec=(KEY2, IV2))
            off = 0
            for n in ODD_CHUNKS:
                await loop.sock_sendall(link.a, plain_out[off:off + n])
                assert await recv_exactly(link.b, n) == wire_out[off:off + n], (off, n)
                await loop.sock_sendall(link.b, wire_back[off:off + n])
                assert await recv_exactly(link.a, n) == plain_back[off:off + n], (off, n)
                off += n
            assert impl.counts(link.pump) == (off, off)
            assert await end_with_fins(link) == pure_pump.TunnelResult(off, off, "eof", None)

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
            link = await keyed_link(impl, enc=(KEY, iv), dec=(KEY, iv))
            off = 0
            for n in (5, 16, 27, 1, len(data) - 49):
                await loop.sock_sendall(link.a, data[off:off + n])
                assert await recv_exactly(link.b, n) == want[off:off + n], (off, n)
                off += n
            await loop.sock_sendall(link.b, want)           # the same stream decrypts back
            assert await recv_exactly(link.a, len(data)) == data
            link.pump.close()
            await asyncio.wait_for(link.pump.wait(), 5)
            link.close_outer()

    run(main())


def test_odd_block_size_keeps_the_keystream(run, event_loop_kind):
    """Compiled, forced to 4099-byte blocks (each read ends mid AES block, and a send may be
    partial anywhere): 8 MiB both ways still equal the reference stream."""
    compiled = compiled_or_skip("tunnelpump")
    impl = TunnelTwin("compiled", compiled, compiled.new_cipher)
    data = os.urandom(8 * MiB + 5)

    async def main():
        async with no_fd_leak():
            loop = asyncio.get_running_loop()
            link = await keyed_link(impl, enc=(KEY, IV), dec=(KEY2, IV2))
            _s, got_wire, _s2, got_app = await asyncio.gather(
                loop.sock_sendall(link.a, data), recv_exactly(link.b, len(data)),
                loop.sock_sendall(link.b, aes_ctr(KEY2, IV2, data)),
                recv_exactly(link.a, len(data)))
            assert got_wire == aes_ctr(KEY, IV, data)
            assert got_app == data
            link.pump.close()
            await asyncio.wait_for(link.pump.wait(), 5)
            link.close_outer()

    previous = compiled._configure(block_size=4099)
    try:
        run(main(), timeout=60)
    finally:
        compiled._configure(*previous)


def test_encryption_off_is_a_plain_copy(run, event_loop_kind, impl):
    async def main():
        async with no_fd_leak():
            loop = asyncio.get_running_loop()
            link = await keyed_link(impl)
            data = os.urandom(MiB + 3)
            _sent, got = await asyncio.gather(loop.sock_sendall(link.a, data),
                                              recv_exactly(link.b, len(data)))
            assert got == data
            await loop.sock_sendall(link.b, b"back")
            assert await recv_exactly(link.a, 4) == b"back"
            link.pump.close()
            result = await asyncio.wait_for(link.pump.wait(), 5)
            link.close_outer()
            assert impl.counts(result) == (MiB + 3, 4)
            assert (result.how_ended, result.ended_by) == ("aborted", None)

    run(main())


def test_a_failing_foreign_cipher_ends_the_splice(run, event_loop_kind):
    """Compiled pump, a cipher object that raises: the splice ends as a reset, both sockets
    are closed, and the error reaches the loop's exception handler (not swallowed)."""
    compiled = compiled_or_skip("tunnelpump")

    class Broken:
        def update_into(self, data, out):
            raise RuntimeError("cipher broke")

    async def main():
        async with no_fd_leak():
            loop = asyncio.get_running_loop()
            errors = []
            loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx.get("exception")))
            app, plain = await tcp_conn()
            wire, relay = await tcp_conn()
            pump = await compiled.open_splice_encrypted(loop, plain, relay, encrypt=Broken())
            await loop.sock_sendall(app, b"data")
            result = await asyncio.wait_for(pump.wait(), 2)
            assert result.how_ended == "reset"
            assert await asyncio.wait_for(read_until_closed(wire), 2) == (b"", "eof")
            app.close()
            wire.close()
            await until(lambda: errors, what="the error reported")
            assert isinstance(errors[0], RuntimeError)
            with pytest.raises(TypeError):
                compiled.TunnelSplice(loop, object(), None, b"", b"", compiled.MAX_BUFFER)

    run(main())


# --- carrying data: an encrypt -> decrypt pair, as npt and npd run it ------------------------

async def tunnel_pair(impl_client: TunnelTwin, impl_daemon: TunnelTwin):
    """app <-> [client pump] <-> relay TCP <-> [daemon pump] <-> far, twin keys: C2D (KEY, IV),
    D2C (KEY2, IV2).  Returns (app, far, client_splice, daemon_splice)."""
    app, c_plain = await tcp_conn()
    far, d_plain = await tcp_conn()
    c_relay, d_relay = await tcp_conn()
    client = await impl_client.open_sockets(c_plain, c_relay, enc=(KEY, IV), dec=(KEY2, IV2))
    daemon = await impl_daemon.open_sockets(d_plain, d_relay, enc=(KEY2, IV2), dec=(KEY, IV))
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
                    receive_all(far), receive_all(app))
                results = await asyncio.wait_for(asyncio.gather(client.wait(), daemon.wait()),
                                                 5)
            finally:
                app.close()
                far.close()
            assert got_far == (n_up, sent_up), f"up corrupted (seed {seed})"
            assert got_app == (n_down, sent_down), f"down corrupted (seed {seed})"
            for result in results:
                assert (result.how_ended, result.ended_by) == ("eof", None)
            assert impl.counts(results[0]) == (n_up, n_down)
            assert impl.counts(results[1]) == (n_down, n_up)
            assert impl.buffered(client) == (0, 0)

    run(main(), timeout=240)


@pytest.mark.parametrize("ends", ["compiled-pure", "pure-compiled"])
def test_either_end_may_run_either_implementation(run, event_loop_kind, ends):
    """npt and npd may run different pumps (a pure install on one end): the wire is the same.
    Also crosses the ciphers over: the pure pump driven by EvpCtr objects and back."""
    compiled = compiled_or_skip("tunnelpump")
    c_name, d_name = ends.split("-")
    pick = {"compiled": TunnelTwin("compiled", compiled, pure_pump.new_cipher),
            "pure": TunnelTwin("pure", pure_pump, compiled.new_cipher)}
    n = 8 * MiB + 1

    async def main():
        async with no_fd_leak():
            app, far, client, daemon = await tunnel_pair(pick[c_name], pick[d_name])
            sent_up, sent_down, got_far, got_app = await asyncio.gather(
                send_stream(app, n, 1), send_stream(far, n, 2), receive_all(far),
                receive_all(app))
            await asyncio.wait_for(asyncio.gather(client.wait(), daemon.wait()), 5)
            app.close()
            far.close()
            assert (got_far, got_app) == ((n, sent_up), (n, sent_down))

    run(main(), timeout=60)


# --- no leaks ---------------------------------------------------------------------------------

def test_idle_splices_hold_no_blocks(run, event_loop_kind):
    """Compiled: once its bytes are through, an idle splice holds no receive block (they go
    back to a bounded per-process pool), so idle connections cost no 256 KiB each."""
    compiled = compiled_or_skip("tunnelpump")
    impl = TunnelTwin("compiled", compiled, compiled.new_cipher)

    async def main():
        async with no_fd_leak():
            links = [await open_link(impl) for _ in range(40)]
            await exchange_and_idle(links)
            assert compiled._pool_size() <= 32
            for link in links:
                assert link.pump._cipher_kinds == ("evp", "evp")
            await close_links(links)

    run(main(), timeout=60)
