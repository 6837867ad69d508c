"""The atProtocol's cryptographic primitives, with its exact encodings.

Owns: base64 helpers, RSA-2048 key generation and base64-DER (SPKI / PKCS#8) encodings, RSA
PKCS#1 v1.5 signatures (PKAM, envelopes, dataSignature) and encryption (shared-key wrapping), the
CRAM digest, and the value cipher "AES-256-CTR with PKCS#7 padding applied before CTR" (spec
atprotocol.md §3.2, §3.3, §5.4).  Sans-IO; everything is built on ``cryptography``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, padding, serialization
from cryptography.hazmat.primitives.asymmetric import padding as asym_padding
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey, RSAPublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

__all__ = [
    "ZERO_IV",
    "aes_decrypt",
    "aes_encrypt",
    "b64d",
    "b64e",
    "cram_digest",
    "decrypt_value",
    "encrypt_value",
    "generate_aes_key_b64",
    "generate_iv_b64",
    "generate_rsa_private_key",
    "pkam_sign",
    "pkam_verify",
    "private_key_from_b64",
    "private_key_to_b64",
    "public_key_from_b64",
    "public_key_md5",
    "public_key_to_b64",
    "rsa_decrypt",
    "rsa_encrypt",
    "sign",
    "unwrap_shared_key",
    "verify",
    "wrap_shared_key",
]

#: The legacy IV: used for .atKeys fields and for values stored without an ``ivNonce``.
ZERO_IV = bytes(16)

AES_KEY_BYTES = 32
AES_BLOCK_BYTES = 16
RSA_BITS = 2048

_HASHES = {"sha256": hashes.SHA256, "sha512": hashes.SHA512}


# --- base64 -----------------------------------------------------------------------------------

def b64e(data: bytes) -> str:
    """Standard-alphabet, padded base64 text."""
    return base64.b64encode(data).decode("ascii")


def b64d(text: str) -> bytes:
    """Strict decode: standard alphabet, correct padding, no whitespace; else ValueError."""
    if isinstance(text, str):
        try:
            raw = text.encode("ascii")
        except UnicodeEncodeError:
            raise ValueError("base64 text contains non-ASCII characters") from None
    elif isinstance(text, (bytes, bytearray, memoryview)):
        raw = bytes(text)
    else:
        raise ValueError(f"base64 text must be str, not {type(text).__name__}")
    # validate=True refuses foreign characters and bad padding but not surplus "=" ("YWJj====").
    if len(raw) % 4 or raw.endswith(b"==="):
        raise ValueError("invalid base64: length is not a multiple of 4 or surplus padding")
    try:
        return base64.b64decode(raw, validate=True)
    except binascii.Error as exc:
        raise ValueError(f"invalid base64: {exc}") from None


# --- RSA keys ---------------------------------------------------------------------------------

def generate_rsa_private_key() -> RSAPrivateKey:
    """A fresh RSA-2048 key with e = 65537 (what every atProtocol client generates)."""
    return rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)


def public_key_to_b64(key: RSAPublicKey | RSAPrivateKey) -> str:
    """base64 of DER SubjectPublicKeyInfo (a private key gives its public half)."""
    if isinstance(key, RSAPrivateKey):
        key = key.public_key()
    return b64e(key.public_bytes(serialization.Encoding.DER,
                                 serialization.PublicFormat.SubjectPublicKeyInfo))


def public_key_from_b64(text: str) -> RSAPublicKey:
    """Inverse of :func:`public_key_to_b64`; ValueError for anything but an RSA public key."""
    der = b64d(text)
    try:
        key = serialization.load_der_public_key(der)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ValueError(f"not a DER SubjectPublicKeyInfo: {exc}") from None
    if not isinstance(key, RSAPublicKey):
        raise ValueError(f"expected an RSA public key, got {type(key).__name__}")
    return key


def private_key_to_b64(key: RSAPrivateKey) -> str:
    """base64 of unencrypted DER PKCS#8 PrivateKeyInfo."""
    return b64e(key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))


def private_key_from_b64(text: str, *, trusted: bool = False) -> RSAPrivateKey:
    """Inverse of :func:`private_key_to_b64`; ValueError for anything but an RSA private key.

    ``trusted=True`` skips OpenSSL's RSA consistency check (about 50 ms of CPU per 2048-bit key,
    most of npt's start-up): only for keys from the user's own .atKeys file, whose loader checks
    that each private key matches its public half instead."""
    der = b64d(text)
    try:
        key = serialization.load_der_private_key(
            der, password=None, unsafe_skip_rsa_key_validation=trusted)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        # TypeError: the DER is a password-encrypted PKCS#8 structure.
        raise ValueError(f"not an unencrypted DER PKCS#8 private key: {exc}") from None
    if not isinstance(key, RSAPrivateKey):
        raise ValueError(f"expected an RSA private key, got {type(key).__name__}")
    return key


# --- RSA signatures ---------------------------------------------------------------------------

def _hash(hashing: str) -> hashes.HashAlgorithm:
    try:
        return _HASHES[hashing.lower()]()
    except (KeyError, AttributeError):
        raise ValueError(f"unsupported hashing algorithm {hashing!r} (sha256 or sha512)") from None


def sign(priv: RSAPrivateKey, data: bytes, hashing: str = "sha256") -> str:
    """RSASSA-PKCS1-v1_5 over ``data`` with SHA-256/512; base64 signature (344 chars for 2048)."""
    return b64e(priv.sign(bytes(data), asym_padding.PKCS1v15(), _hash(hashing)))


def verify(pub: RSAPublicKey, data: bytes, signature_b64: str, hashing: str = "sha256") -> bool:
    """True only for a good signature.  Bad base64, wrong length, unknown hashing, a non-RSA key:
    all False, never an exception, because every caller feeds it untrusted wire text."""
    try:
        sig = b64d(signature_b64)
        algorithm = _hash(hashing)
        pub.verify(sig, bytes(data), asym_padding.PKCS1v15(), algorithm)
    except (InvalidSignature, ValueError, TypeError, AttributeError):
        return False
    return True


def pkam_sign(priv: RSAPrivateKey, challenge: str, hashing: str = "sha256") -> str:
    """PKAM proof: the signature over the UTF-8 of the whole ``from`` challenge."""
    return sign(priv, challenge.encode("utf-8"), hashing)


def pkam_verify(pub: RSAPublicKey, challenge: str, signature_b64: str,
                hashing: str = "sha256") -> bool:
    try:
        data = challenge.encode("utf-8")
    except (UnicodeEncodeError, AttributeError):
        return False
    return verify(pub, data, signature_b64, hashing)


def cram_digest(secret: str, challenge: str) -> str:
    """CRAM: lower-case hex SHA-512 of UTF-8(secret immediately followed by challenge)."""
    return hashlib.sha512((secret + challenge).encode("utf-8")).hexdigest()


# --- AES values -------------------------------------------------------------------------------

def generate_aes_key_b64() -> str:
    return b64e(os.urandom(AES_KEY_BYTES))


def generate_iv_b64() -> str:
    return b64e(os.urandom(AES_BLOCK_BYTES))


def _ctr(key: bytes, iv: bytes) -> Cipher:
    if len(key) != AES_KEY_BYTES:
        raise ValueError(f"AES-256 key must be {AES_KEY_BYTES} bytes, got {len(key)}")
    if len(iv) != AES_BLOCK_BYTES:
        raise ValueError(f"AES-CTR IV must be {AES_BLOCK_BYTES} bytes, got {len(iv)}")
    # modes.CTR treats the IV as the full 128-bit big-endian counter block, as Dart's
    # SIC/CTR and mbedtls do.
    return Cipher(algorithms.AES(bytes(key)), modes.CTR(bytes(iv)))


def aes_encrypt(key: bytes, plaintext: bytes, iv: bytes = ZERO_IV) -> bytes:
    """PKCS#7-pad to 16 bytes, then AES-256-CTR (Dart ``encrypt`` package default)."""
    padder = padding.PKCS7(128).padder()
    padded = padder.update(bytes(plaintext)) + padder.finalize()
    enc = _ctr(key, iv).encryptor()
    return enc.update(padded) + enc.finalize()


def aes_decrypt(key: bytes, ciphertext: bytes, iv: bytes = ZERO_IV) -> bytes:
    """Inverse of :func:`aes_encrypt`; ValueError on bad padding (often: wrong key or IV)."""
    dec = _ctr(key, iv).decryptor()
    padded = dec.update(bytes(ciphertext)) + dec.finalize()
    unpadder = padding.PKCS7(128).unpadder()
    try:
        return unpadder.update(padded) + unpadder.finalize()
    except ValueError:
        raise ValueError("AES-CTR decryption gave bad PKCS#7 padding "
                         "(wrong key or IV, or a corrupted value)") from None


def encrypt_value(key_b64: str, plaintext: str, iv_b64: str | None = None) -> str:
    """Encrypt a stored/notified value: base64(AES-CTR-PKCS7(key, utf8(plaintext)))."""
    iv = ZERO_IV if iv_b64 is None else b64d(iv_b64)
    return b64e(aes_encrypt(b64d(key_b64), plaintext.encode("utf-8"), iv))


def decrypt_value(key_b64: str, cipher_b64: str, iv_b64: str | None = None) -> str:
    """Inverse of :func:`encrypt_value`; ``None`` IV means the legacy all-zero IV."""
    iv = ZERO_IV if iv_b64 is None else b64d(iv_b64)
    return aes_decrypt(b64d(key_b64), b64d(cipher_b64), iv).decode("utf-8")


# --- RSA encryption (shared keys, session keys) -----------------------------------------------

def rsa_encrypt(pub: RSAPublicKey, data: bytes) -> str:
    """RSAES-PKCS1-v1_5; base64 ciphertext."""
    return b64e(pub.encrypt(bytes(data), asym_padding.PKCS1v15()))


def rsa_decrypt(priv: RSAPrivateKey, cipher_b64: str) -> bytes:
    """Inverse of :func:`rsa_encrypt`; ValueError when it does not decrypt.

    With OpenSSL >= 3.2 ("implicit rejection", a Bleichenbacher defence) a ciphertext made for
    another key usually decrypts to random bytes instead of failing: callers must check what
    they get (see :func:`unwrap_shared_key`).
    """
    cipher = b64d(cipher_b64)
    try:
        return priv.decrypt(cipher, asym_padding.PKCS1v15())
    except ValueError:
        raise ValueError("RSA decryption failed (wrong key or corrupted ciphertext)") from None


def wrap_shared_key(pub: RSAPublicKey, aes_key_b64: str) -> str:
    """The atProtocol RSA-encrypts the key's base64 *text*, not its raw bytes (spec §5.4)."""
    return rsa_encrypt(pub, aes_key_b64.encode("ascii"))


def unwrap_shared_key(priv: RSAPrivateKey, wrapped_b64: str) -> str:
    """Returns the AES key's (or a wrapped IV's) base64 text; ValueError if it is not base64,
    which is how a wrong private key shows up under implicit rejection."""
    raw = rsa_decrypt(priv, wrapped_b64)
    try:
        text = raw.decode("ascii")
        if b64d(text):
            return text
    except ValueError:
        pass
    raise ValueError("unwrapped key is not base64 text (wrong private key?)")


def public_key_md5(pub_b64: str) -> str:
    """``pubKeyCS``: lower-case hex MD5 of the public key's base64 text (a checksum only)."""
    return hashlib.md5(pub_b64.encode("utf-8"), usedforsecurity=False).hexdigest()
