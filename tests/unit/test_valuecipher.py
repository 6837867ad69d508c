"""noports.at.valuecipher gives exactly what noports.at.crypto gives, faster.

ValueCipher makes the AES-CTR keystream from one kept AES-ECB context; these tests hold it to
crypto.encrypt_value / decrypt_value (cryptography's own CTR mode) byte for byte: every length
around the block size and the ECB/CTR switch-over, IVs whose 128-bit counter wraps inside the
value, and garbage that must fail the same way.  b64d_fast is held to crypto.b64d.
"""

from __future__ import annotations

import base64
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from noports.at import valuecipher
from noports.at.crypto import b64d, decrypt_value, encrypt_value, generate_aes_key_b64
from noports.at.valuecipher import ValueCipher, b64d_fast

KEY = generate_aes_key_b64()
_ivs = st.binary(min_size=16, max_size=16).map(lambda b: base64.b64encode(b).decode())
# counters that wrap past 2**128 within a value of a few blocks
_WRAPPING = [base64.b64encode(b"\xff" * 15 + bytes([x])).decode() for x in (0xF0, 0xFE, 0xFF)]
_LIMIT = valuecipher._ECB_MAX_BLOCKS * 16


@pytest.mark.parametrize("length", [0, 1, 15, 16, 17, 255, 256, 257, _LIMIT - 17, _LIMIT - 16,
                                    _LIMIT - 1, _LIMIT, _LIMIT + 1, 5000])
@pytest.mark.parametrize("iv", [None, "AAAAAAAAAAAAAAAAAAAAAA==", *_WRAPPING])
def test_lengths_and_wrapping_counters(length, iv):
    vc = ValueCipher(KEY)
    plain = "é" * (length // 2) + "x" * (length % 2)
    cipher = encrypt_value(KEY, plain, iv)
    assert vc.encrypt(plain, iv) == cipher
    assert vc.decrypt(cipher, iv) == plain


@settings(max_examples=300)
@given(key=st.binary(min_size=32, max_size=32), iv=_ivs, plain=st.text(max_size=1200))
def test_matches_crypto(key, iv, plain):
    key_b64 = base64.b64encode(key).decode()
    vc = ValueCipher(key_b64)
    cipher = encrypt_value(key_b64, plain, iv)
    assert vc.encrypt(plain, iv) == cipher
    assert vc.decrypt(cipher, iv) == decrypt_value(key_b64, cipher, iv) == plain


def _outcome(fn, *args):
    try:
        return "ok", fn(*args)
    except ValueError:                       # UnicodeDecodeError included
        return "error", None


@settings(max_examples=400)
@given(cipher=st.one_of(st.binary(max_size=80).map(lambda b: base64.b64encode(b).decode()),
                        st.text(alphabet="AB+/=é \n", max_size=12)),
       iv=st.one_of(st.none(), _ivs,
                    st.sampled_from(["", "AAAA", "!!", "AAAAAAAAAAAAAAAAAAAAAA="])))
def test_garbage_fails_like_crypto(cipher, iv):
    """Wrong padding, lengths, IVs and base64 raise ValueError exactly when crypto's does."""
    assert _outcome(ValueCipher(KEY).decrypt, cipher, iv) == _outcome(decrypt_value, KEY,
                                                                        cipher, iv)


def test_wrong_key_is_refused():
    with pytest.raises(ValueError):
        ValueCipher(base64.b64encode(b"short").decode())
    with pytest.raises(ValueError):
        ValueCipher("not base64!")
    other = ValueCipher(generate_aes_key_b64())
    cipher = encrypt_value(KEY, "hello world", "AAAAAAAAAAAAAAAAAAAAAA==")
    assert _outcome(other.decrypt, cipher, "AAAAAAAAAAAAAAAAAAAAAA==") == _outcome(
        decrypt_value, other.key_b64, cipher, "AAAAAAAAAAAAAAAAAAAAAA==")


def _b64_outcome(fn, text):
    try:
        return "ok", fn(text)
    except ValueError:
        return "error", None


@pytest.mark.parametrize("decoder", [valuecipher._b64d_canonical, b64d_fast])
def test_b64d_fast_accepts_exactly_what_b64d_accepts(decoder):
    alphabet = "AQ+/= \n-é"
    texts = ["".join(t) for n in range(7) for t in itertools.product(alphabet, repeat=n)
             if n <= 4 or t[0] in "AQ"]
    texts += ["YR==", "YQ==", "YWJj====", "A" * 400, None, 12, b"YQ=="]
    for text in texts:
        assert _b64_outcome(decoder, text) == _b64_outcome(b64d, text), text
