"""One direction of the AES-256-CTR stream that NoPorts wraps relayed traffic in.

Owns the data-plane cipher of noports-protocol.md §6: AES-256 in CTR mode, no framing, no MAC, the
16-byte IV being the full 128-bit big-endian initial counter block, the keystream position carried
across reads and writes.  Encryption and decryption are the same operation.

Speed matters here (it runs on every relayed byte), so each stream keeps ONE long-lived
``cryptography`` encryptor -- a new context per chunk costs ~35 % -- and writes into buffers the
caller owns (``update_into`` / in place), because fresh 64-256 KiB ``bytes`` per chunk push
glibc into mmap/munmap churn (spec performance-notes.md).  Sans-IO.
"""

from __future__ import annotations

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

__all__ = ["OUTPUT_SLACK", "CtrStream"]

_KEY_BYTES = 32
_IV_BYTES = 16


def _probe_output_slack() -> int:
    """Extra output room ``update_into`` demands beyond ``len(data)`` in this cryptography.

    cryptography < 42 asks for ``len(data) + 15`` even for CTR (it counts the AES block size,
    not the mode's); the Rust-backed releases ask for ``len(data)`` only.  Measured once, so the
    hot path never pays for old versions.
    """
    enc = Cipher(algorithms.AES(bytes(_KEY_BYTES)), modes.CTR(bytes(_IV_BYTES))).encryptor()
    for slack in range(_IV_BYTES):
        try:
            enc.update_into(b"\0", bytearray(1 + slack))
        except ValueError:
            continue
        return slack
    return _IV_BYTES - 1  # pragma: no cover - no known version needs more


#: 0 with the cryptography in use today; 15 with cryptography < 42 (handled internally).
OUTPUT_SLACK = _probe_output_slack()


class CtrStream:
    """AES-256-CTR keystream for one direction; ``position`` counts bytes processed so far.

    ``update_into(data, out)`` needs ``len(out) >= len(data)`` only: on cryptography versions
    that want 15 bytes of slack the last bytes go through a 30-byte scratch buffer made once per
    stream, so no call allocates a data-sized buffer.  ``data`` and ``out`` may be the very same
    memory (OpenSSL allows exact in-place CTR), which is what :meth:`process_in_place` does;
    partially overlapping buffers are not allowed.
    """

    __slots__ = ("_enc", "_scratch", "_update_into", "position")

    def __init__(self, key: bytes, iv: bytes) -> None:
        if len(key) != _KEY_BYTES:
            raise ValueError(f"AES-256 key must be {_KEY_BYTES} bytes, got {len(key)}")
        if len(iv) != _IV_BYTES:
            raise ValueError(f"AES-CTR IV must be {_IV_BYTES} bytes, got {len(iv)}")
        self._enc = Cipher(algorithms.AES(bytes(key)), modes.CTR(bytes(iv))).encryptor()
        self.position = 0
        if OUTPUT_SLACK:
            self._scratch = bytearray(2 * OUTPUT_SLACK)
            self._update_into = self._update_into_with_slack
        else:
            self._scratch = None
            # The bound C method itself: no Python frame between us and OpenSSL.
            self._update_into = self._enc.update_into

    def update(self, data) -> bytes:
        """Encrypt/decrypt ``data`` into a new ``bytes`` (convenient; not for the data plane)."""
        out = self._enc.update(data)
        self.position += len(out)
        return out

    def update_into(self, data, out) -> int:
        """Encrypt/decrypt ``data`` into the writable buffer ``out``; returns ``len(data)``."""
        n = self._update_into(data, out)
        self.position += n
        return n

    def process_in_place(self, buf, n: int | None = None) -> None:
        """Encrypt/decrypt the first ``n`` bytes (default: all) of a bytearray/memoryview."""
        if n is None:
            self.position += self._update_into(buf, buf)
            return
        if n < 0 or n > len(buf):
            raise ValueError(f"n={n} is outside the buffer (length {len(buf)})")
        view = memoryview(buf)[:n]
        self.position += self._update_into(view, view)

    def _update_into_with_slack(self, data, out) -> int:
        """cryptography < 42: all but the last OUTPUT_SLACK bytes straight into ``out`` (which then
        has the slack it wants), the rest through the scratch buffer."""
        data = memoryview(data)
        n = len(data)
        if len(out) < n:
            raise ValueError(f"output buffer too small: {len(out)} < {n}")
        head = max(0, n - OUTPUT_SLACK)
        if head:
            self._enc.update_into(data[:head], out)
        tail = n - head
        if tail:
            self._enc.update_into(data[head:], self._scratch)
            memoryview(out)[head:n] = memoryview(self._scratch)[:tail]
        return n
