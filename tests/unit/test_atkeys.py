"""The .atKeys file (noports.at.atkeys); format derived from the spec (atprotocol.md §6.1)."""

from __future__ import annotations

import base64
import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from noports.at.atkeys import AtKeys, default_keys_path
from noports.at.crypto import (
    generate_aes_key_b64,
    generate_rsa_private_key,
    pkam_sign,
    pkam_verify,
    private_key_to_b64,
    public_key_to_b64,
)
from noports.errors import AtKeysError

OPENSSL = shutil.which("openssl")
FIELDS = ("aesPkamPublicKey", "aesPkamPrivateKey", "aesEncryptPublicKey", "aesEncryptPrivateKey")


@pytest.fixture(scope="module")
def keys() -> AtKeys:
    return AtKeys.generate("@Alice")


@pytest.fixture(scope="module")
def other() -> AtKeys:
    return AtKeys.generate("@bob")


def _spec_decrypt(self_key_b64: str, field_b64: str) -> str:
    """The spec's definition, written out: AES-256-CTR, zero IV, then strip PKCS#7."""
    dec = Cipher(algorithms.AES(base64.b64decode(self_key_b64)), modes.CTR(bytes(16))).decryptor()
    padded = dec.update(base64.b64decode(field_b64))
    assert len(padded) % 16 == 0
    n = padded[-1]
    assert 1 <= n <= 16 and padded[-n:] == bytes([n]) * n
    return padded[:-n].decode("utf-8")


def _spec_encrypt(self_key_b64: str, text: str) -> str:
    padder = padding.PKCS7(128).padder()
    padded = padder.update(text.encode()) + padder.finalize()
    enc = Cipher(algorithms.AES(base64.b64decode(self_key_b64)), modes.CTR(bytes(16))).encryptor()
    return base64.b64encode(enc.update(padded)).decode()


def _same(a, b) -> bool:
    return a.public_numbers() == b.public_numbers()


def test_generate(keys):
    assert keys.atsign == "@alice"
    assert keys.pkam_private.key_size == 2048 and keys.encrypt_private.key_size == 2048
    assert _same(keys.pkam_private.public_key(), keys.pkam_public)
    assert _same(keys.encrypt_private.public_key(), keys.encrypt_public)
    assert not _same(keys.pkam_public, keys.encrypt_public)
    assert len(base64.b64decode(keys.self_encryption_key)) == 32
    assert keys.enrollment_id is None and keys.apkam_symmetric_key is None
    assert keys.pkam_public_b64 == public_key_to_b64(keys.pkam_public)
    assert keys.encrypt_public_b64 == public_key_to_b64(keys.encrypt_public)


def test_repr_does_not_show_secrets(keys):
    text = repr(keys)
    assert "@alice" in text
    assert keys.self_encryption_key not in text
    assert private_key_to_b64(keys.pkam_private)[:40] not in text


def test_dumps_follows_the_spec_format(keys):
    """Derived from the spec: each key field is base64(AES-CTR(self key, zero IV, PKCS#7)(utf8(
    base64 DER))), selfEncryptionKey plain, plus an "@alice" copy of the self key."""
    doc = json.loads(keys.dumps())
    assert doc["selfEncryptionKey"] == keys.self_encryption_key
    assert doc["@alice"] == keys.self_encryption_key
    sk = keys.self_encryption_key
    assert _spec_decrypt(sk, doc["aesPkamPublicKey"]) == keys.pkam_public_b64
    assert _spec_decrypt(sk, doc["aesPkamPrivateKey"]) == private_key_to_b64(keys.pkam_private)
    assert _spec_decrypt(sk, doc["aesEncryptPublicKey"]) == keys.encrypt_public_b64
    assert _spec_decrypt(sk, doc["aesEncryptPrivateKey"]) == private_key_to_b64(
        keys.encrypt_private)
    assert "enrollmentId" not in doc and "apkamSymmetricKey" not in doc
    assert all(isinstance(v, str) for v in doc.values())


def test_round_trip(keys):
    back = AtKeys.loads(keys.dumps(), "alice")
    assert back.atsign == "@alice"
    assert back.self_encryption_key == keys.self_encryption_key
    assert back.pkam_private.private_numbers() == keys.pkam_private.private_numbers()
    assert back.encrypt_private.private_numbers() == keys.encrypt_private.private_numbers()
    assert _same(back.pkam_public, keys.pkam_public)
    assert _same(back.encrypt_public, keys.encrypt_public)
    challenge = "_1@alice:2"
    assert pkam_verify(keys.pkam_public, challenge, pkam_sign(back.pkam_private, challenge))


def test_round_trip_with_apkam_fields(keys):
    enrolled = AtKeys(keys.atsign, keys.pkam_private, keys.pkam_public, keys.encrypt_private,
                      keys.encrypt_public, keys.self_encryption_key,
                      enrollment_id="352b78c8-4b6f-4d07-a9cf-5466512ffa44",
                      apkam_symmetric_key=generate_aes_key_b64())
    doc = json.loads(enrolled.dumps())
    assert doc["enrollmentId"] == enrolled.enrollment_id  # stored plain
    assert doc["apkamSymmetricKey"] == enrolled.apkam_symmetric_key
    back = AtKeys.loads(enrolled.dumps(), "@alice")
    assert back.enrollment_id == enrolled.enrollment_id
    assert back.apkam_symmetric_key == enrolled.apkam_symmetric_key


def test_secure_element_file_without_pkam_private_key(keys):
    se = AtKeys(keys.atsign, None, keys.pkam_public, keys.encrypt_private, keys.encrypt_public,
                keys.self_encryption_key)
    doc = json.loads(se.dumps())
    assert "aesPkamPrivateKey" not in doc
    back = AtKeys.loads(se.dumps(), "@alice")
    assert back.pkam_private is None and _same(back.pkam_public, keys.pkam_public)


def test_loads_a_file_built_by_hand_from_the_spec(keys):
    """Derived from the spec: a file assembled field by field (as atsdk/at_c write it, with
    indentation and other field order) loads; extra fields are ignored."""
    sk = generate_aes_key_b64()
    doc = {
        "selfEncryptionKey": sk,
        "aesEncryptPrivateKey": _spec_encrypt(sk, private_key_to_b64(keys.encrypt_private)),
        "aesEncryptPublicKey": _spec_encrypt(sk, keys.encrypt_public_b64),
        "aesPkamPrivateKey": _spec_encrypt(sk, private_key_to_b64(keys.pkam_private)),
        "aesPkamPublicKey": _spec_encrypt(sk, keys.pkam_public_b64),
        "somethingNew": {"nested": True},
    }
    back = AtKeys.loads(json.dumps(doc, indent=4), "@alice")
    assert back.self_encryption_key == sk
    assert _same(back.pkam_public, keys.pkam_public)
    assert back.encrypt_private.private_numbers() == keys.encrypt_private.private_numbers()


@pytest.mark.skipif(OPENSSL is None, reason="openssl command line not installed")
def test_loads_fields_encrypted_by_openssl(keys):
    """Derived from the spec; the AES-CTR fields come from `openssl enc`, not from our code."""
    sk = generate_aes_key_b64()

    def enc(text: str) -> str:
        data = text.encode()
        n = 16 - len(data) % 16
        proc = subprocess.run([OPENSSL, "enc", "-aes-256-ctr", "-K", base64.b64decode(sk).hex(),
                               "-iv", "00" * 16, "-nopad"], input=data + bytes([n]) * n,
                              capture_output=True, timeout=30, check=True)
        return base64.b64encode(proc.stdout).decode()

    doc = {"aesPkamPublicKey": enc(keys.pkam_public_b64),
           "aesPkamPrivateKey": enc(private_key_to_b64(keys.pkam_private)),
           "aesEncryptPublicKey": enc(keys.encrypt_public_b64),
           "aesEncryptPrivateKey": enc(private_key_to_b64(keys.encrypt_private)),
           "selfEncryptionKey": sk}
    back = AtKeys.loads(json.dumps(doc), "@alice")
    assert back.pkam_private.private_numbers() == keys.pkam_private.private_numbers()
    assert _same(back.encrypt_public, keys.encrypt_public)


# --- files ------------------------------------------------------------------------------------


def test_save_creates_private_dirs_and_file(keys, tmp_path):
    path = tmp_path / "home" / ".atsign" / "keys" / "@alice_key.atKeys"
    tmp_mode = stat.S_IMODE(tmp_path.stat().st_mode)
    old_umask = os.umask(0o022)
    try:
        keys.save(path)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for folder in (path.parent, path.parent.parent, path.parent.parent.parent):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    assert stat.S_IMODE(tmp_path.stat().st_mode) == tmp_mode  # pre-existing: untouched
    assert AtKeys.load(path).pkam_public_b64 == keys.pkam_public_b64


def test_save_leaves_existing_folders_alone(keys, tmp_path):
    tmp_path.chmod(0o755)
    keys.save(tmp_path / "@alice_key.atKeys")
    assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o755


def test_save_replaces_atomically(keys, other, tmp_path):
    path = tmp_path / "@alice_key.atKeys"
    keys.save(path)
    before = path.stat().st_ino
    with open(path) as reader:  # a reader holding the old file keeps seeing it whole
        other.save(path)
        assert json.loads(reader.read())["selfEncryptionKey"] == keys.self_encryption_key
    assert path.stat().st_ino != before  # replaced by rename, not rewritten in place
    assert AtKeys.load(path, "@bob").self_encryption_key == other.self_encryption_key
    assert sorted(p.name for p in tmp_path.iterdir()) == ["@alice_key.atKeys"]  # no temp left
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_save_failure_leaves_no_temp_file(keys, tmp_path):
    target = tmp_path / "adir"
    target.mkdir()
    with pytest.raises(OSError):
        keys.save(target)  # a folder cannot be replaced by a file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir"]


@pytest.mark.parametrize(("name", "atsign"), [("@alice_key.atKeys", "@alice"),
                                              ("alice_key.atKeys", "@alice"),
                                              ("@Alice.atKeys", "@alice")])
def test_load_takes_the_atsign_from_the_file_name(keys, tmp_path, name, atsign):
    (tmp_path / name).write_text(keys.dumps())
    assert AtKeys.load(tmp_path / name).atsign == atsign
    assert AtKeys.load(str(tmp_path / name), "@carol").atsign == "@carol"


def test_load_needs_atsign_when_the_name_does_not_tell(keys, tmp_path):
    path = tmp_path / "keys.json"
    path.write_text(keys.dumps())
    with pytest.raises(AtKeysError, match="atsign="):
        AtKeys.load(path)
    assert AtKeys.load(path, "@alice").atsign == "@alice"


def test_load_missing_file_is_atkeys_error(tmp_path):
    with pytest.raises(AtKeysError, match="cannot read"):
        AtKeys.load(tmp_path / "@nobody_key.atKeys")


def test_default_keys_path(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_keys_path("Alice") == tmp_path / ".atsign" / "keys" / "@alice_key.atKeys"
    assert isinstance(default_keys_path("@bob"), Path)


# --- errors -----------------------------------------------------------------------------------


def _doc(keys: AtKeys) -> dict:
    return json.loads(keys.dumps())


@pytest.mark.parametrize(("mutate", "why"), [
    (lambda d: "not json {", "not valid JSON"),
    (lambda d: "[1, 2]", "not a JSON object"),
    (lambda d: "", "not valid JSON"),
    (lambda d: {k: v for k, v in d.items() if k != "aesPkamPublicKey"}, "aesPkamPublicKey"),
    (lambda d: {k: v for k, v in d.items() if k != "selfEncryptionKey"}, "selfEncryptionKey"),
    (lambda d: {k: v for k, v in d.items() if not k.startswith("aesEncrypt")},
     "aesEncryptPublicKey, aesEncryptPrivateKey"),
    (lambda d: {**d, "selfEncryptionKey": "not base64"}, "selfEncryptionKey is not base64"),
    (lambda d: {**d, "selfEncryptionKey": base64.b64encode(b"short").decode()}, "32 bytes"),
    (lambda d: {**d, "selfEncryptionKey": generate_aes_key_b64()}, "cannot decrypt"),
    (lambda d: {**d, "aesPkamPublicKey": 42}, "must be a string"),
    (lambda d: {**d, "aesPkamPublicKey": "%%%"}, "cannot decrypt"),
    (lambda d: {**d, "aesPkamPublicKey": d["aesEncryptPrivateKey"]}, "RSA public key"),
    (lambda d: {**d, "aesEncryptPrivateKey": d["aesEncryptPublicKey"]}, "RSA private key"),
    (lambda d: {**d, "aesPkamPrivateKey": d["aesEncryptPrivateKey"]}, "not one key pair"),
    (lambda d: {**d, "aesEncryptPublicKey": d["aesPkamPublicKey"]}, "not one key pair"),
    (lambda d: {**d, "enrollmentId": 7}, "enrollmentId must be a string"),
    (lambda d: {"iv": "AAAA", "content": "BBBB", "hashingAlgoType": "argon2id"},
     "passphrase-protected"),
])
def test_malformed_files_raise_atkeys_error(keys, mutate, why):
    changed = mutate(_doc(keys))
    text = changed if isinstance(changed, str) else json.dumps(changed)
    with pytest.raises(AtKeysError) as err:
        AtKeys.loads(text, "@alice")
    assert why in str(err.value)


def test_wrong_key_field_encrypted_with_another_self_key(keys, other):
    doc = _doc(keys)
    doc["aesEncryptPrivateKey"] = _doc(other)["aesEncryptPrivateKey"]
    with pytest.raises(AtKeysError):
        AtKeys.loads(json.dumps(doc), "@alice")


def test_load_error_names_the_file(tmp_path):
    path = tmp_path / "@alice_key.atKeys"
    path.write_text("{}")
    with pytest.raises(AtKeysError) as err:
        AtKeys.load(path)
    assert str(path) in str(err.value) and "lacks" in str(err.value)


def test_bad_atsign_is_atkeys_error(keys):
    with pytest.raises(AtKeysError, match="atSign"):
        AtKeys.loads(keys.dumps(), "@al ice")


def test_another_keys_file_is_not_ours(keys):
    # A different RSA key in place of ours is caught by the pair check, so signatures made with
    # the loaded key always verify with the loaded public key.
    doc = _doc(keys)
    stranger = generate_rsa_private_key()
    doc["aesPkamPrivateKey"] = _spec_encrypt(keys.self_encryption_key,
                                             private_key_to_b64(stranger))
    with pytest.raises(AtKeysError, match="not one key pair"):
        AtKeys.loads(json.dumps(doc), "@alice")
