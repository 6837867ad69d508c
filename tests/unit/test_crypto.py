"""Cryptographic primitives (noports.at.crypto).

Known-answer tests here are derived from the spec (atprotocol.md §3.2, §3.3, §5.4) and checked
against the ``openssl`` command line, an implementation independent of ours.
"""

from __future__ import annotations

import base64
import hashlib
import shutil
import subprocess

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from noports.at import crypto
from noports.at.crypto import (
    ZERO_IV,
    aes_decrypt,
    aes_encrypt,
    b64d,
    b64e,
    cram_digest,
    decrypt_value,
    encrypt_value,
    generate_aes_key_b64,
    generate_iv_b64,
    generate_rsa_private_key,
    pkam_sign,
    pkam_verify,
    private_key_from_b64,
    private_key_to_b64,
    public_key_from_b64,
    public_key_md5,
    public_key_to_b64,
    rsa_decrypt,
    rsa_encrypt,
    sign,
    unwrap_shared_key,
    verify,
    wrap_shared_key,
)

OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="openssl command line not installed")

CHALLENGE = "_4af2f0f6-b55b-4d34-8bb4-0bba4b1a2d27@alice:d6ca1d2c-0f0c-4a61-9a3e-6d1b2b7128b9"


@pytest.fixture(scope="module")
def key():
    return generate_rsa_private_key()


@pytest.fixture(scope="module")
def other_key():
    return generate_rsa_private_key()


@pytest.fixture(scope="module")
def pem_files(key, tmp_path_factory):
    folder = tmp_path_factory.mktemp("pem")
    priv = folder / "priv.pem"
    pub = folder / "pub.pem"
    priv.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    return priv, pub


def _openssl(*args: str, data: bytes = b"") -> bytes:
    proc = subprocess.run([OPENSSL, *args], input=data, capture_output=True, timeout=30)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return proc.stdout


def _pkcs7(data: bytes) -> bytes:
    """PKCS#7 to 16 bytes, written out from its definition."""
    n = 16 - len(data) % 16
    return data + bytes([n]) * n


# --- base64 -----------------------------------------------------------------------------------


@given(st.binary(max_size=200))
def test_b64_round_trip(data):
    text = b64e(data)
    assert text == base64.b64encode(data).decode()
    assert b64d(text) == data


@pytest.mark.parametrize("text", ["abc", "ab=c", "a b=", "YW Jj", "YWJj\n", "YWJj====", "Y-_A",
                                  "YWJjé", "=YWJj"])
def test_b64d_is_strict(text):
    with pytest.raises(ValueError):
        b64d(text)


def test_b64d_rejects_non_text():
    with pytest.raises(ValueError):
        b64d(None)  # type: ignore[arg-type]


# --- RSA keys ---------------------------------------------------------------------------------


def test_generated_key_is_rsa_2048_e65537(key):
    assert key.key_size == 2048
    assert key.public_key().public_numbers().e == 65537


def test_key_b64_round_trip_is_der(key):
    pub_b64 = public_key_to_b64(key.public_key())
    der = b64d(pub_b64)
    assert der[0] == 0x30  # a DER SEQUENCE
    assert public_key_from_b64(pub_b64).public_numbers() == key.public_key().public_numbers()
    assert public_key_to_b64(key) == pub_b64  # a private key gives its public half
    priv_b64 = private_key_to_b64(key)
    assert private_key_from_b64(priv_b64).private_numbers() == key.private_numbers()


@needs_openssl
def test_key_b64_matches_openssl_der(key, pem_files):
    priv_pem, pub_pem = pem_files
    spki = _openssl("pkey", "-pubin", "-in", str(pub_pem), "-outform", "DER")
    assert public_key_to_b64(key.public_key()) == base64.b64encode(spki).decode()
    pkcs8 = _openssl("pkcs8", "-topk8", "-nocrypt", "-in", str(priv_pem), "-outform", "DER")
    assert private_key_to_b64(key) == base64.b64encode(pkcs8).decode()


def test_key_from_b64_rejects_non_rsa_and_garbage(key):
    ec_key = ec.generate_private_key(ec.SECP256R1())
    ec_pub = b64e(ec_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))
    ec_priv = b64e(ec_key.private_bytes(serialization.Encoding.DER,
                                        serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption()))
    for bad in (ec_pub, b64e(b"\x30\x03\x02\x01\x01"), "not base64!", ""):
        with pytest.raises(ValueError):
            public_key_from_b64(bad)
    encrypted = b64e(key.private_bytes(serialization.Encoding.DER,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.BestAvailableEncryption(b"pw")))
    for bad in (ec_priv, encrypted, public_key_to_b64(key), "%%%"):
        with pytest.raises(ValueError):
            private_key_from_b64(bad)


# --- signatures -------------------------------------------------------------------------------


@pytest.mark.parametrize("hashing", ["sha256", "sha512"])
def test_sign_verify(key, other_key, hashing):
    data = b"payload \x00\xff"
    sig = sign(key, data, hashing)
    assert len(b64d(sig)) == 256 and len(sig) == 344
    assert sign(key, data, hashing) == sig  # PKCS#1 v1.5 is deterministic
    assert verify(key.public_key(), data, sig, hashing)
    assert not verify(key.public_key(), data + b"!", sig, hashing)
    assert not verify(other_key.public_key(), data, sig, hashing)
    other_hash = "sha512" if hashing == "sha256" else "sha256"
    assert not verify(key.public_key(), data, sig, other_hash)


def test_sign_rejects_unknown_hashing(key):
    with pytest.raises(ValueError, match="unsupported hashing"):
        sign(key, b"x", "md5")


@pytest.mark.parametrize("bad", ["", "!!!", "AAAA", "A" * 343 + "=", None, 12, b64e(bytes(256)),
                                 b64e(bytes(512))])
def test_verify_returns_false_on_malformed_signature(key, bad):
    assert verify(key.public_key(), b"data", bad) is False


def test_verify_returns_false_for_unknown_hashing_and_odd_keys(key):
    sig = sign(key, b"data")
    assert verify(key.public_key(), b"data", sig, "md5") is False
    assert verify(key.public_key(), b"data", sig, None) is False  # type: ignore[arg-type]
    ec_pub = ec.generate_private_key(ec.SECP256R1()).public_key()
    assert verify(ec_pub, b"data", sig) is False  # type: ignore[arg-type]


_HYPOTHESIS_KEY = generate_rsa_private_key()


@given(st.text(max_size=400))
@settings(max_examples=60)
def test_verify_never_raises(text):
    assert verify(_HYPOTHESIS_KEY.public_key(), b"data", text) is False


@needs_openssl
@pytest.mark.parametrize("hashing", ["sha256", "sha512"])
def test_signatures_interoperate_with_openssl(key, pem_files, tmp_path, hashing):
    """Derived from the spec: PKCS#1 v1.5 with SHA-256/512 over the UTF-8 challenge."""
    priv_pem, pub_pem = pem_files
    data = CHALLENGE.encode()
    theirs = _openssl("dgst", f"-{hashing}", "-sign", str(priv_pem), data=data)
    assert pkam_sign(key, CHALLENGE, hashing) == base64.b64encode(theirs).decode()
    assert pkam_verify(key.public_key(), CHALLENGE, base64.b64encode(theirs).decode(), hashing)
    sig_file = tmp_path / "sig.bin"
    sig_file.write_bytes(b64d(sign(key, data, hashing)))
    out = _openssl("dgst", f"-{hashing}", "-verify", str(pub_pem), "-signature", str(sig_file),
                   data=data)
    assert b"Verified OK" in out


def test_pkam_sign_signs_the_utf8_challenge(key):
    assert pkam_sign(key, CHALLENGE) == sign(key, CHALLENGE.encode("utf-8"))
    assert pkam_verify(key.public_key(), CHALLENGE, pkam_sign(key, CHALLENGE))
    assert not pkam_verify(key.public_key(), CHALLENGE + "x", pkam_sign(key, CHALLENGE))
    assert not pkam_verify(key.public_key(), "\ud800", pkam_sign(key, CHALLENGE))


# --- CRAM -------------------------------------------------------------------------------------


def test_cram_digest_by_definition():
    """Derived from the spec: lower-case hex SHA-512 of UTF-8(secret + challenge)."""
    secret = "secret☃"
    expected = hashlib.sha512((secret + CHALLENGE).encode("utf-8")).hexdigest()
    assert cram_digest(secret, CHALLENGE) == expected


@pytest.mark.parametrize(("secret", "digest"), [
    # Computed once with `printf '%s' "$secret$challenge" | openssl dgst -sha512`.
    ("mysecret_1234_5", "9b34b08c125ce612a3520880162b921ed32f375eb68c95c3e78f12acf332663f"
                        "3a2306895d7f047e6cfde0b190498d735c398958f94755fd5a9bab031a8290fe"),
    ("secret☃", "0b10aa25ce24d34e8ed1639d31c13c1cbf3872bd375fced518a36ab9500d365e"
               "6a9bbed3f9c50a11a46c21684274d47ac2489da7b1c400f0d574b87cad40590d"),
])
def test_cram_digest_fixed_vectors(secret, digest):
    """Derived from the spec; the literal comes from openssl dgst -sha512."""
    assert cram_digest(secret, CHALLENGE) == digest


# --- AES values -------------------------------------------------------------------------------


def test_generated_aes_material_sizes():
    assert len(b64d(generate_aes_key_b64())) == 32
    assert len(b64d(generate_iv_b64())) == 16
    assert generate_aes_key_b64() != generate_aes_key_b64()
    assert bytes(16) == ZERO_IV


@needs_openssl
@pytest.mark.parametrize("length", [0, 1, 15, 16, 17, 100])
@pytest.mark.parametrize("iv", [ZERO_IV, bytes.fromhex("0123456789abcdef" "ffffffffffffffff"),
                                b"\xff" * 16])
def test_aes_encrypt_is_pkcs7_then_ctr_like_openssl(length, iv):
    """Derived from the spec: PKCS#7 applied before CTR; IV = full 128-bit counter block."""
    key = bytes(range(32))
    plaintext = bytes((7 * i + 3) & 0xFF for i in range(length))
    theirs = _openssl("enc", "-aes-256-ctr", "-K", key.hex(), "-iv", iv.hex(), "-nopad",
                      data=_pkcs7(plaintext))
    ours = aes_encrypt(key, plaintext, iv)
    assert ours == theirs
    assert len(ours) % 16 == 0 and len(ours) > len(plaintext)
    assert aes_decrypt(key, ours, iv) == plaintext


@given(st.binary(max_size=300), st.binary(min_size=32, max_size=32),
       st.binary(min_size=16, max_size=16))
def test_aes_round_trip(plaintext, key, iv):
    assert aes_decrypt(key, aes_encrypt(key, plaintext, iv), iv) == plaintext


def test_aes_decrypt_bad_padding_raises_value_error():
    key = bytes(range(32))
    # 15 bytes pad to one block, "\x10"*15 + "\x01"; XOR recovers the first keystream block,
    # which as a ciphertext decrypts to sixteen zero bytes: padding byte 0 is never valid.
    cipher = aes_encrypt(key, b"\x10" * 15)
    keystream = bytes(a ^ b for a, b in zip(cipher, b"\x10" * 15 + b"\x01", strict=True))
    with pytest.raises(ValueError, match="padding"):
        aes_decrypt(key, keystream)
    with pytest.raises(ValueError):
        aes_decrypt(key, b"")  # no padding block at all
    with pytest.raises(ValueError):
        aes_decrypt(key, aes_encrypt(key, b"abc")[:-1])  # not a whole block


def test_aes_rejects_wrong_key_and_iv_sizes():
    with pytest.raises(ValueError, match="32 bytes"):
        aes_encrypt(bytes(16), b"x")
    with pytest.raises(ValueError, match="16 bytes"):
        aes_encrypt(bytes(32), b"x", bytes(8))


def test_encrypt_value_defaults_to_zero_iv_and_round_trips():
    key_b64 = generate_aes_key_b64()
    iv_b64 = generate_iv_b64()
    text = "héllo ☃ 🚀"
    legacy = encrypt_value(key_b64, text)
    assert legacy == b64e(aes_encrypt(b64d(key_b64), text.encode("utf-8"), ZERO_IV))
    assert decrypt_value(key_b64, legacy) == text
    modern = encrypt_value(key_b64, text, iv_b64)
    assert modern != legacy
    assert decrypt_value(key_b64, modern, iv_b64) == text
    with pytest.raises(ValueError):
        decrypt_value(key_b64, modern, generate_iv_b64())
    with pytest.raises(ValueError):
        decrypt_value(key_b64, "not base64")


# --- RSA encryption ---------------------------------------------------------------------------


def test_rsa_encrypt_round_trip_and_randomised(key):
    c1 = rsa_encrypt(key.public_key(), b"secret")
    c2 = rsa_encrypt(key.public_key(), b"secret")
    assert c1 != c2  # PKCS#1 v1.5 encryption padding is random
    assert rsa_decrypt(key, c1) == rsa_decrypt(key, c2) == b"secret"
    with pytest.raises(ValueError):
        rsa_decrypt(key, "AAAA")
    with pytest.raises(ValueError):
        rsa_decrypt(key, "%%")


@needs_openssl
def test_rsa_encryption_interoperates_with_openssl(key, pem_files):
    """Derived from the spec: RSAES-PKCS1-v1_5, base64 ciphertext."""
    priv_pem, pub_pem = pem_files
    ours = rsa_encrypt(key.public_key(), b"session key text")
    plain = _openssl("pkeyutl", "-decrypt", "-inkey", str(priv_pem),
                     "-pkeyopt", "rsa_padding_mode:pkcs1", data=b64d(ours))
    assert plain == b"session key text"
    theirs = _openssl("pkeyutl", "-encrypt", "-pubin", "-inkey", str(pub_pem),
                      "-pkeyopt", "rsa_padding_mode:pkcs1", data=b"from openssl")
    assert rsa_decrypt(key, base64.b64encode(theirs).decode()) == b"from openssl"


def test_wrap_shared_key_encrypts_the_base64_text(key, other_key):
    """Derived from the spec (§5.4): the RSA plaintext is the UTF-8 of the key's base64."""
    aes_b64 = generate_aes_key_b64()
    wrapped = wrap_shared_key(key.public_key(), aes_b64)
    assert rsa_decrypt(key, wrapped) == aes_b64.encode("ascii")
    assert unwrap_shared_key(key, wrapped) == aes_b64
    iv_b64 = generate_iv_b64()
    assert unwrap_shared_key(key, wrap_shared_key(key.public_key(), iv_b64)) == iv_b64
    with pytest.raises(ValueError):
        unwrap_shared_key(other_key, wrapped)
    with pytest.raises(ValueError):
        unwrap_shared_key(key, rsa_encrypt(key.public_key(), b"\xff\xfe not base64"))


def test_public_key_md5_is_md5_of_the_base64_text(key):
    pub_b64 = public_key_to_b64(key.public_key())
    assert public_key_md5(pub_b64) == hashlib.md5(pub_b64.encode()).hexdigest()
    assert public_key_md5("abc") == "900150983cd24fb0d6963f7d28e17f72"  # RFC 1321 test suite


def test_module_exports_exist():
    for name in crypto.__all__:
        assert callable(getattr(crypto, name)) or name == "ZERO_IV", name
