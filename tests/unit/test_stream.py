"""The AES-256-CTR relay stream (noports.at.stream).

Known answers are derived from the spec (noports-protocol.md §6: the IV is the full 128-bit
big-endian counter block, position carried across calls): once from the definition itself
(keystream block i = AES-ECB(key, (IV + i) mod 2**128)) and once against ``openssl enc``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tracemalloc

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from noports.at import stream as stream_mod
from noports.at.stream import CtrStream

OPENSSL = shutil.which("openssl")

KEY = bytes(range(0x40, 0x60))
CARRY_IVS = [
    bytes(16),
    bytes.fromhex("000102030405060708090a0b0c0d0e0f"),
    bytes.fromhex("0123456789abcdef" "fffffffffffffffe"),  # carry out of the low 64 bits
    bytes.fromhex("00ffffffffffffff" "ffffffffffffffff"),  # carry ripples through 15 bytes
    b"\xff" * 16,  # wraps to zero
]


def _keystream_by_definition(key: bytes, iv: bytes, length: int) -> bytes:
    """Spec definition: ECB-encrypt the counter blocks IV, IV+1, ... (mod 2**128)."""
    ecb = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    start = int.from_bytes(iv, "big")
    blocks = b"".join(((start + i) % (1 << 128)).to_bytes(16, "big")
                      for i in range((length + 15) // 16))
    return ecb.update(blocks)[:length]


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("iv", CARRY_IVS, ids=lambda iv: iv.hex())
def test_keystream_matches_the_definition(iv):
    data = bytes((i * 31 + 7) & 0xFF for i in range(16 * 5 + 9))
    expected = _xor(data, _keystream_by_definition(KEY, iv, len(data)))
    s = CtrStream(KEY, iv)
    assert s.update(data) == expected
    assert s.position == len(data)


@pytest.mark.skipif(OPENSSL is None, reason="openssl command line not installed")
@pytest.mark.parametrize("iv", CARRY_IVS, ids=lambda iv: iv.hex())
def test_stream_matches_openssl_enc(iv):
    data = os.urandom(4096 + 13)
    proc = subprocess.run([OPENSSL, "enc", "-aes-256-ctr", "-K", KEY.hex(), "-iv", iv.hex(),
                           "-nopad"], input=data, capture_output=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    s = CtrStream(KEY, iv)
    out = bytearray(len(data))
    # Odd chunk sizes so that block boundaries fall inside calls.
    pos = 0
    for size in (1, 15, 16, 17, 1000, 3000):
        chunk = data[pos:pos + size]
        s.update_into(chunk, memoryview(out)[pos:pos + len(chunk)])
        pos += len(chunk)
    s.update_into(data[pos:], memoryview(out)[pos:])
    assert bytes(out) == proc.stdout


_ops = st.lists(st.tuples(st.sampled_from(["update", "into", "inplace", "inplace_n"]),
                          st.integers(min_value=0, max_value=70)), max_size=30)


@given(st.binary(min_size=16, max_size=16), _ops, st.binary(max_size=600))
@settings(max_examples=150)
def test_any_chunking_equals_one_shot(iv, ops, data):
    expected = Cipher(algorithms.AES(KEY), modes.CTR(iv)).encryptor().update(data)
    s = CtrStream(KEY, iv)
    out = bytearray()
    pos = 0
    for op, size in [*ops, ("into", len(data))]:
        chunk = data[pos:pos + size]
        if op == "update":
            out += s.update(chunk)
        elif op == "into":
            buf = bytearray(len(chunk) + size % 3)  # exact or a little larger
            assert s.update_into(chunk, buf) == len(chunk)
            out += buf[:len(chunk)]
        elif op == "inplace":
            buf = bytearray(chunk)
            s.process_in_place(buf)
            out += buf
        else:
            buf = bytearray(chunk) + b"tail"
            s.process_in_place(buf, len(chunk))
            assert buf[len(chunk):] == b"tail"  # bytes past n are untouched
            out += buf[:len(chunk)]
        pos += len(chunk)
        assert s.position == pos
    assert bytes(out) == expected


def test_decrypt_is_encrypt():
    iv = os.urandom(16)
    data = os.urandom(10_000)
    sender, receiver = CtrStream(KEY, iv), CtrStream(KEY, iv)
    cipher = b"".join(sender.update(data[i:i + 777]) for i in range(0, len(data), 777))
    buf = bytearray(cipher)
    receiver.process_in_place(buf)
    assert bytes(buf) == data
    assert sender.position == receiver.position == len(data)


def test_in_place_on_memoryview_slices():
    iv = os.urandom(16)
    data = os.urandom(3000)
    expected = CtrStream(KEY, iv).update(data)
    buf = bytearray(data)
    view = memoryview(buf)
    s = CtrStream(KEY, iv)
    s.process_in_place(view[:1000])
    s.process_in_place(view[1000:], 999)
    s.process_in_place(view[1999:])
    assert bytes(buf) == expected


def test_update_into_needs_only_len_data():
    s = CtrStream(KEY, bytes(16))
    data = os.urandom(64 * 1024)
    out = bytearray(len(data))
    assert s.update_into(data, out) == len(data)
    with pytest.raises(ValueError):
        s.update_into(b"x" * 10, bytearray(9))


def test_process_in_place_rejects_n_outside_buffer():
    s = CtrStream(KEY, bytes(16))
    for n in (-1, 5):
        with pytest.raises(ValueError):
            s.process_in_place(bytearray(4), n)
    assert s.position == 0


def test_rejects_wrong_key_and_iv_sizes():
    with pytest.raises(ValueError, match="32 bytes"):
        CtrStream(bytes(16), bytes(16))
    with pytest.raises(ValueError, match="16 bytes"):
        CtrStream(KEY, bytes(12))


def test_output_slack_path_for_old_cryptography(monkeypatch):
    """cryptography < 42 wants len(data)+15 bytes of output; the stream must still accept an
    exact buffer.  The current library accepts any buffer, so the slack path can run here."""
    monkeypatch.setattr(stream_mod, "OUTPUT_SLACK", 15)
    iv = b"\xff" * 16
    data = os.urandom(2000)
    expected = Cipher(algorithms.AES(KEY), modes.CTR(iv)).encryptor().update(data)
    s = CtrStream(KEY, iv)
    assert s._update_into == s._update_into_with_slack
    out = bytearray(len(data))
    pos = 0
    for size in (0, 1, 14, 15, 16, 31, 100, 1000):
        s.update_into(data[pos:pos + size], memoryview(out)[pos:pos + size])
        pos += size
    buf = bytearray(data[pos:])
    s.process_in_place(buf)
    out[pos:] = buf
    assert bytes(out) == expected
    assert s.position == len(data)
    with pytest.raises(ValueError):
        s.update_into(b"abc", bytearray(2))


def test_update_into_does_not_allocate_per_chunk():
    """The data plane must not create a chunk-sized object per call (spec performance notes)."""
    s = CtrStream(KEY, bytes(16))
    chunk = os.urandom(64 * 1024)
    out = bytearray(len(chunk))
    s.update_into(chunk, out)  # warm up
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        for _ in range(200):
            s.update_into(chunk, out)
            s.process_in_place(out)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * 1024, peak
    assert s.position == 64 * 1024 * 401
