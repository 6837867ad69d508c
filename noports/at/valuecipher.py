"""The atProtocol value cipher for one key, kept ready: what the AtClient's hot paths use.

Owns a faster, byte-identical form of ``crypto.encrypt_value`` / ``crypto.decrypt_value``
(spec atprotocol.md §5.4: PKCS#7 padding, then AES-256-CTR with the IV as the full 128-bit
big-endian counter block) for a key that is used again and again -- the key shared with a peer,
used for every notification to or from it.  Sans-IO.

Why: with OpenSSL 3 a new cipher context costs about 15-20 us (algorithm fetch, key schedule,
``cryptography``'s argument checks), several times the AES work on a 256-byte value, and a
notification needs one per value.  A :class:`ValueCipher` keeps ONE AES-ECB context for its key
and makes the CTR keystream itself: the counter blocks ``iv, iv+1, ...`` (mod 2**128, as
OpenSSL's CTR counts) encrypted in one ECB call, XORed with the data.  That is exactly CTR mode,
computed by OpenSSL's AES; only the counter bookkeeping is ours.  Values above
``_ECB_MAX_BLOCKS`` blocks go through a fresh CTR context instead (there the context cost is
small next to the data).  tests/unit/test_valuecipher.py holds both paths equal to
``noports.at.crypto``, including counters that wrap.
"""

from __future__ import annotations

import binascii
import sys

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from noports.at.crypto import (
    AES_BLOCK_BYTES,
    AES_KEY_BYTES,
    ZERO_IV,
    aes_decrypt,
    aes_encrypt,
    b64d,
    b64e,
)

__all__ = ["ValueCipher", "b64d_fast"]

_MASK = (1 << 128) - 1
# Up to 1 KiB (values of up to 1007 bytes: every NoPorts notification) the keystream is made
# from the kept ECB context; above, one CTR context per value is cheaper than the Python-side
# counter blocks.
_ECB_MAX_BLOCKS = 64
_BAD_PADDING = ("AES-CTR decryption gave bad PKCS#7 padding (wrong key or IV, or a corrupted "
                "value)")

# For k blocks, the counter blocks c, c+1, ..., c+k-1 read as one big-endian integer are
# c * _REPUNIT[k] + _STAIR[k] (as long as no block wraps): one multiplication instead of k
# conversions.  _REPUNIT[k] = sum(2**(128*j)), _STAIR[k] = sum(i * 2**(128*(k-1-i))).
_REPUNIT = [0]
_STAIR = [0]
for _k in range(1, _ECB_MAX_BLOCKS + 1):
    _REPUNIT.append((_REPUNIT[-1] << 128) | 1)
    _STAIR.append((_STAIR[-1] << 128) + (_k - 1))
del _k


def _b64d_canonical(text: str) -> bytes:
    """Python 3.10: decode leniently and accept the result only if it encodes back to exactly
    the input; anything else (bad characters, padding, stray bits) gets b64d's verdict."""
    try:
        raw = text.encode("ascii")
        out = binascii.a2b_base64(raw)
        if binascii.b2a_base64(out, newline=False) == raw:
            return out
    except (AttributeError, UnicodeEncodeError, binascii.Error):
        pass
    return b64d(text)


def _b64d_strict_mode(text: str) -> bytes:
    """Python >= 3.11: binascii's strict mode plus b64d's two length rules accepts exactly what
    b64d accepts (tests/unit/test_valuecipher.py); on refusal b64d raises its own error."""
    try:
        raw = text.encode("ascii")
        if not len(raw) % 4 and not raw.endswith(b"==="):
            return binascii.a2b_base64(raw, strict_mode=True)
    except (AttributeError, UnicodeEncodeError, binascii.Error):
        pass
    return b64d(text)


#: ``crypto.b64d`` (strict), without its regex pass over the text.
b64d_fast = _b64d_strict_mode if sys.version_info >= (3, 11) else _b64d_canonical


class ValueCipher:
    """``encrypt``/``decrypt`` = ``crypto.encrypt_value``/``decrypt_value`` with this key.

    Not thread-safe (one ECB context): use one per thread or event loop.
    """

    __slots__ = ("_ecb", "_key", "key_b64")

    def __init__(self, key_b64: str) -> None:
        key = b64d(key_b64)
        if len(key) != AES_KEY_BYTES:
            raise ValueError(f"AES-256 key must be {AES_KEY_BYTES} bytes, got {len(key)}")
        self.key_b64 = key_b64
        self._key = key
        # ECB never buffers whole blocks, so update() on block multiples is the raw AES
        # function and the context can be used forever without finalize().
        self._ecb = Cipher(algorithms.AES(key), modes.ECB()).encryptor().update

    def _ctr(self, data: bytes, iv: bytes) -> bytes:
        """AES-256-CTR of ``data`` (at most _ECB_MAX_BLOCKS blocks) from counter block ``iv``."""
        n = len(data)
        if not n:
            return b""
        blocks = (n + AES_BLOCK_BYTES - 1) // AES_BLOCK_BYTES
        start = int.from_bytes(iv, "big")
        if start + blocks - 1 <= _MASK:
            counters = (start * _REPUNIT[blocks] + _STAIR[blocks]).to_bytes(
                blocks * AES_BLOCK_BYTES, "big")
        else:   # the 128-bit counter wraps inside this value
            counters = b"".join([((start + i) & _MASK).to_bytes(AES_BLOCK_BYTES, "big")
                                 for i in range(blocks)])
        stream = self._ecb(counters)
        return (int.from_bytes(data, "big") ^ int.from_bytes(stream[:n], "big")).to_bytes(
            n, "big")

    @staticmethod
    def _iv(iv_b64: str | None) -> bytes:
        iv = ZERO_IV if iv_b64 is None else b64d_fast(iv_b64)
        if len(iv) != AES_BLOCK_BYTES:
            raise ValueError(f"AES-CTR IV must be {AES_BLOCK_BYTES} bytes, got {len(iv)}")
        return iv

    def encrypt(self, plaintext: str, iv_b64: str | None = None) -> str:
        """base64(AES-CTR(PKCS#7(utf8(plaintext)))), as ``crypto.encrypt_value``."""
        iv = self._iv(iv_b64)
        data = plaintext.encode("utf-8")
        pad = AES_BLOCK_BYTES - len(data) % AES_BLOCK_BYTES
        if len(data) + pad > _ECB_MAX_BLOCKS * AES_BLOCK_BYTES:
            return b64e(aes_encrypt(self._key, data, iv))
        return b64e(self._ctr(data + bytes((pad,)) * pad, iv))

    def decrypt(self, cipher_b64: str, iv_b64: str | None = None) -> str:
        """Inverse of :meth:`encrypt`; ValueError as ``crypto.decrypt_value``."""
        iv = self._iv(iv_b64)
        data = b64d_fast(cipher_b64)
        n = len(data)
        if n > _ECB_MAX_BLOCKS * AES_BLOCK_BYTES:
            return aes_decrypt(self._key, data, iv).decode("utf-8")
        if not n or n % AES_BLOCK_BYTES:
            raise ValueError(_BAD_PADDING)
        padded = self._ctr(data, iv)
        pad = padded[-1]
        if not 1 <= pad <= AES_BLOCK_BYTES or padded[-pad:] != bytes((pad,)) * pad:
            raise ValueError(_BAD_PADDING)
        return padded[:-pad].decode("utf-8")
