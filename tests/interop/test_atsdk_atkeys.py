"""The .atKeys file and key crypto against Atsign's own Python SDK (atsdk, PyPI ``atsdk``).

atsdk runs in its own venv (it pins a different ``cryptography``), under a temporary HOME, using
its real onboarding/key-file code: ``OnboardingUtil.generate_*`` + ``KeysUtil.save_keys`` to write
and ``KeysUtil.load_keys`` to read ``~/.atsign/keys/@x_key.atKeys``; ``EncryptionUtil`` for the
PKAM signature (``sign_sha256_rsa``, what its ``pkam`` verb sends), RSA and AES decryption.
"""

from __future__ import annotations

import json
import uuid

import pytest

from noports.at.atkeys import AtKeys, default_keys_path
from noports.at.crypto import (
    cram_digest,
    encrypt_value,
    pkam_sign,
    pkam_verify,
    private_key_to_b64,
    public_key_from_b64,
    rsa_encrypt,
    wrap_shared_key,
)
from tests.conftest import run_atsdk

pytestmark = pytest.mark.interop

ATSDK_WRITES = r"""
import json, sys
from at_client.util.onboardingutil import OnboardingUtil
from at_client.util.keysutil import KeysUtil
from at_client.util.encryptionutil import EncryptionUtil
from at_client.util.authutil import AuthUtil
atsign, challenge, secret = sys.argv[1:4]
keys = {}
OnboardingUtil.generate_pkam_keypair(keys)
OnboardingUtil.generate_encryption_keypair(keys)
OnboardingUtil.generate_self_encryption_key(keys)
KeysUtil.save_keys(atsign, keys)
out = dict(keys)
out["pkamSignature"] = EncryptionUtil.sign_sha256_rsa(challenge, keys["aesPkamPrivateKey"])
out["cramDigest"] = AuthUtil._get_cram_digest(secret, challenge)
print("RESULT " + json.dumps(out))
"""

ATSDK_VERIFIES = r"""
import base64, json, sys
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from at_client.util.encryptionutil import EncryptionUtil
pub_b64, challenge, signature = sys.argv[1:4]
pub = EncryptionUtil.public_key_from_base64(pub_b64)
try:
    pub.verify(base64.b64decode(signature), challenge.encode(), padding.PKCS1v15(), hashes.SHA256())
    print("RESULT " + json.dumps({"verified": True}))
except Exception as exc:
    print("RESULT " + json.dumps({"verified": False, "error": repr(exc)}))
"""

ATSDK_READS = r"""
import json, sys
from at_client.util.keysutil import KeysUtil
from at_client.util.encryptionutil import EncryptionUtil
atsign, challenge, rsa_cipher, wrapped, aes_cipher = sys.argv[1:6]
keys = KeysUtil.load_keys(atsign)
out = dict(keys)
out["pkamSignature"] = EncryptionUtil.sign_sha256_rsa(challenge, keys["aesPkamPrivateKey"])
out["rsaPlain"] = EncryptionUtil.rsa_decrypt_from_base64(rsa_cipher, keys["aesEncryptPrivateKey"])
out["unwrapped"] = EncryptionUtil.rsa_decrypt_from_base64(wrapped, keys["aesEncryptPrivateKey"])
out["aesPlain"] = EncryptionUtil.aes_decrypt_from_base64(aes_cipher, keys["selfEncryptionKey"])
print("RESULT " + json.dumps(out))
"""


def _result(proc) -> dict:
    assert proc.returncode == 0, f"atsdk script failed:\n{proc.stdout}\n{proc.stderr}"
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, f"no RESULT line from atsdk:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(lines[-1][len("RESULT "):])


def _challenge(atsign: str) -> str:
    return f"_{uuid.uuid4()}{atsign}:{uuid.uuid4()}"


def test_atsdk_written_keys_load_in_ours(atsdk_python, tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    atsign = "@alice🦄"
    challenge = _challenge(atsign)
    printed = _result(run_atsdk(atsdk_python, ATSDK_WRITES, atsign, challenge, "s3cret☃",
                                env={"HOME": str(home)}))

    monkeypatch.setenv("HOME", str(home))
    path = default_keys_path(atsign)
    assert path.exists(), "atsdk did not write where default_keys_path looks"
    ours = AtKeys.load(path)
    assert ours.atsign == atsign

    # Our decrypted keys are exactly what atsdk generated.
    assert ours.self_encryption_key == printed["selfEncryptionKey"]
    assert ours.pkam_public_b64 == printed["aesPkamPublicKey"]
    assert ours.encrypt_public_b64 == printed["aesEncryptPublicKey"]
    assert private_key_to_b64(ours.pkam_private) == printed["aesPkamPrivateKey"]
    assert private_key_to_b64(ours.encrypt_private) == printed["aesEncryptPrivateKey"]

    # atsdk's PKAM proof verifies with our loaded key, and ours signs identically.
    assert pkam_verify(ours.pkam_public, challenge, printed["pkamSignature"])
    assert pkam_sign(ours.pkam_private, challenge) == printed["pkamSignature"]
    assert cram_digest("s3cret☃", challenge) == printed["cramDigest"]

    # A PKAM signature by our loaded key verifies inside atsdk with atsdk's public key.
    other_challenge = _challenge(atsign)
    verdict = _result(run_atsdk(atsdk_python, ATSDK_VERIFIES, printed["aesPkamPublicKey"],
                                other_challenge, pkam_sign(ours.pkam_private, other_challenge)))
    assert verdict["verified"] is True, verdict
    verdict = _result(run_atsdk(atsdk_python, ATSDK_VERIFIES, printed["aesPkamPublicKey"],
                                other_challenge, pkam_sign(ours.pkam_private, challenge)))
    assert verdict["verified"] is False  # and it is really checking


def test_our_keys_load_in_atsdk(atsdk_python, tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    keys = AtKeys.generate("@bob")
    keys.save(default_keys_path("@bob"))

    challenge = _challenge("@bob")
    rsa_cipher = rsa_encrypt(keys.encrypt_public, "a value for bob ☃".encode())
    shared_key = "q5tOCw0ZQk6uNYD+Cie0o7MvXlxn9XzdtbEd3RBcyO0="
    wrapped = wrap_shared_key(keys.encrypt_public, shared_key)
    aes_cipher = encrypt_value(keys.self_encryption_key, "self value ✓")
    loaded = _result(run_atsdk(atsdk_python, ATSDK_READS, "@bob", challenge, rsa_cipher, wrapped,
                               aes_cipher, env={"HOME": str(home)}))

    assert loaded["selfEncryptionKey"] == keys.self_encryption_key
    assert loaded["aesPkamPublicKey"] == keys.pkam_public_b64
    assert loaded["aesEncryptPublicKey"] == keys.encrypt_public_b64
    assert loaded["aesPkamPrivateKey"] == private_key_to_b64(keys.pkam_private)
    assert loaded["aesEncryptPrivateKey"] == private_key_to_b64(keys.encrypt_private)
    assert public_key_from_b64(loaded["aesPkamPublicKey"]).public_numbers() == (
        keys.pkam_public.public_numbers())

    # atsdk's PKAM signature (what its pkam verb sends) verifies with our public key.
    assert pkam_verify(keys.pkam_public, challenge, loaded["pkamSignature"])
    assert not pkam_verify(keys.pkam_public, challenge + "x", loaded["pkamSignature"])
    # It decrypted what we RSA-encrypted to its encryption public key, and our self-key AES.
    assert loaded["rsaPlain"] == "a value for bob ☃"
    assert loaded["unwrapped"] == shared_key
    assert loaded["aesPlain"] == "self value ✓"
