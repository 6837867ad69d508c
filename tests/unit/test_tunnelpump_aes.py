"""The compiled tunnel pump's AES-256-CTR engines (VAES/AVX-512 and OpenSSL EVP) give the same
bytes as ``cryptography`` and as the spec's counter (noports-protocol.md §6), however the stream
is cut.  The pump's C loop calls the same function as these cipher objects, so the splice tests
(tests/functional/test_tunnelpump_impls.py, on whichever engine is preferred here) cover the rest.
A machine without VAES runs the EVP half only; the VAES half is skipped there.
"""

from __future__ import annotations

import os
import random

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

KEY = bytes(range(1, 33))


def _compiled():
    try:
        import noports._speedups.tunnelpump as compiled
    except ImportError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"noports._speedups.tunnelpump is not built: {exc}")
        pytest.skip(f"noports._speedups.tunnelpump is not built: {exc}")
    return compiled


@pytest.fixture(params=["vaes", "evp"])
def engine(request):
    """Ciphers made inside this fixture's scope run on the requested engine."""
    compiled = _compiled()
    if request.param not in compiled._aes_engines():
        pytest.skip(f"no {request.param} engine on this machine")
    previous = compiled._configure(aes="auto" if request.param == "vaes" else "evp")
    try:
        yield compiled, request.param
    finally:
        compiled._configure(*previous)


def _reference(key: bytes, iv: bytes, data: bytes) -> bytes:
    return Cipher(algorithms.AES(key), modes.CTR(iv)).encryptor().update(data)


def _spec(key: bytes, iv: bytes, data: bytes) -> bytes:
    """Keystream block i is AES(key, IV + i mod 2**128), the IV one big-endian counter."""
    ecb = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    start = int.from_bytes(iv, "big")
    blocks = b"".join(((start + i) % (1 << 128)).to_bytes(16, "big")
                      for i in range((len(data) + 15) // 16))
    return bytes(a ^ b for a, b in zip(data, ecb.update(blocks), strict=False))


def test_engine_is_the_one_asked_for(engine):
    compiled, name = engine
    assert compiled.new_cipher(KEY, bytes(16))._engine == name


def test_known_answer_nist_sp800_38a_f55(engine):
    """NIST SP 800-38A F.5.5, CTR-AES256.Encrypt: four blocks, one call and byte by byte."""
    compiled, _ = engine
    key = bytes.fromhex("603deb1015ca71be2b73aef0857d7781"
                        "1f352c073b6108d72d9810a30914dff4")
    iv = bytes.fromhex("f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff")
    plain = bytes.fromhex("6bc1bee22e409f96e93d7e117393172a" "ae2d8a571e03ac9c9eb76fac45af8e51"
                          "30c81c46a35ce411e5fbc1191a0a52ef" "f69f2445df4f9b17ad2b417be66c3710")
    want = bytes.fromhex("601ec313775789a5b7a7f504bbf3d228" "f443e3ca4d62b59aca84e990cacaf5c5"
                         "2b0930daa23de94ce87017ba2d84988d" "dfc9c58db67aada613c2dd08457941a6")
    assert compiled.new_cipher(key, iv).update(plain) == want
    c = compiled.new_cipher(key, iv)
    assert b"".join(c.update(plain[i:i + 1]) for i in range(len(plain))) == want


@pytest.mark.parametrize("iv_hex", [
    "000102030405060708090a0b0c0d0e0f",
    "0123456789abcdef" "fffffffffffffff0",     # the low half wraps inside a 16-block step
    "0123456789abcdef" "ffffffffffffffff",     # ... on the very first block
    "ffffffffffffffff" "fffffffffffffff7",     # all 128 bits wrap
    "ffffffffffffffff" "ffffffffffffffff",
])
def test_random_cuts_match_cryptography_and_the_spec(engine, iv_hex):
    compiled, _ = engine
    iv = bytes.fromhex(iv_hex)
    data = os.urandom(300_001)
    want = _reference(KEY, iv, data)
    assert _spec(KEY, iv, data[:4099]) == want[:4099]       # the reference follows the spec
    rng = random.Random(iv_hex)
    for trial in range(4):
        c = compiled.new_cipher(KEY, iv)
        out = bytearray(data)
        off = 0
        while off < len(data):
            # short pieces (ragged keystream blocks), whole 16-block steps, and long runs
            n = min(len(data) - off, rng.choice([1, 7, 15, 16, 17, 63, 64, 255, 256, 257,
                                                 4095, rng.randrange(1, 70_000)]))
            view = memoryview(out)[off:off + n]
            if trial % 2:
                c.process_in_place(view)
            else:
                assert c.update_into(bytes(view), view) == n
            off += n
            assert c.position == off
        assert bytes(out) == want, f"trial {trial}"


def test_partial_overlap_is_refused_and_exact_in_place_works(engine):
    """The VAES engine refuses partially overlapping buffers (it would corrupt them); OpenSSL
    3.0's CTR does not always check, so only exactly-in-place is asked of both."""
    compiled, name = engine
    buf = bytearray(os.urandom(1000))
    want = _reference(KEY, bytes(16), bytes(buf[:500]))
    if name == "vaes":
        before = bytes(buf)
        c = compiled.new_cipher(KEY, bytes(16))
        with pytest.raises(ValueError):
            c.update_into(memoryview(buf)[0:500], memoryview(buf)[1:501])
        assert bytes(buf) == before and c.position == 0      # refused before touching a byte
    c = compiled.new_cipher(KEY, bytes(16))
    view = memoryview(buf)[0:500]
    c.update_into(view, view)
    assert bytes(buf[:500]) == want


def test_both_engines_interoperate():
    """What one engine encrypts, the other decrypts (npt and npd may run on different CPUs)."""
    compiled = _compiled()
    if "vaes" not in compiled._aes_engines():
        pytest.skip("no vaes engine on this machine")
    iv = os.urandom(16)
    data = os.urandom(1 << 20)
    previous = compiled._configure(aes="evp")
    try:
        evp = compiled.new_cipher(KEY, iv)
        compiled._configure(aes="auto")
        fast = compiled.new_cipher(KEY, iv)
    finally:
        compiled._configure(*previous)
    assert (evp._engine, fast._engine) == ("evp", "vaes")
    assert fast.update(evp.update(data)) == data
