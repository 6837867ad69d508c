"""The ``.atKeys`` file: an atSign's PKAM and encryption key pairs and its self-encryption key.

Owns the JSON format of spec atprotocol.md §6.1 -- ``aesPkamPublicKey``, ``aesPkamPrivateKey``,
``aesEncryptPublicKey``, ``aesEncryptPrivateKey`` each
``base64(AES-256-CTR(selfEncryptionKey, zero IV, PKCS#7)(utf8(base64 DER)))``;
``selfEncryptionKey``, ``apkamSymmetricKey`` and ``enrollmentId`` plain; an ``@<atsign>``
duplicate of the self key on write -- plus generating, loading and (atomically, mode 0600)
saving such files.
Passphrase-protected files (``{"iv", "content", "hashingAlgoType"}``) are recognised and refused.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey, RSAPublicKey

from noports.at.crypto import (
    ZERO_IV,
    aes_decrypt,
    aes_encrypt,
    b64d,
    b64e,
    generate_aes_key_b64,
    generate_rsa_private_key,
    private_key_from_b64,
    private_key_to_b64,
    public_key_from_b64,
    public_key_to_b64,
)
from noports.at.names import normalize_atsign
from noports.errors import AtKeysError, InvalidAtSignError

__all__ = ["KEYS_FILE_SUFFIX", "AtKeys", "default_keys_path"]

KEYS_FILE_SUFFIX = "_key.atKeys"

PKAM_PUBLIC = "aesPkamPublicKey"
PKAM_PRIVATE = "aesPkamPrivateKey"
ENCRYPT_PUBLIC = "aesEncryptPublicKey"
ENCRYPT_PRIVATE = "aesEncryptPrivateKey"
SELF_KEY = "selfEncryptionKey"
APKAM_SYMMETRIC = "apkamSymmetricKey"
ENROLLMENT_ID = "enrollmentId"


def default_keys_path(atsign: str) -> Path:
    """``~/.atsign/keys/@alice_key.atKeys`` (the path every atSign client looks in)."""
    return Path.home() / ".atsign" / "keys" / f"{normalize_atsign(atsign)}{KEYS_FILE_SUFFIX}"


def _encrypt_field(self_key: bytes, key_b64: str) -> str:
    return b64e(aes_encrypt(self_key, key_b64.encode("utf-8"), ZERO_IV))


def _decrypt_field(self_key: bytes, name: str, value: object) -> str:
    if not isinstance(value, str):
        raise AtKeysError(f"{name} must be a string, not {type(value).__name__}")
    try:
        return aes_decrypt(self_key, b64d(value), ZERO_IV).decode("utf-8")
    except ValueError as exc:
        raise AtKeysError(f"cannot decrypt {name} with the file's selfEncryptionKey "
                          f"(wrong key or corrupted file): {exc}") from None


def _atsign_from_path(path: Path) -> str:
    name = path.name
    for suffix in (KEYS_FILE_SUFFIX, ".atKeys"):
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    raise AtKeysError(f"cannot tell the atSign from the file name {name!r} "
                      f"(expected @alice{KEYS_FILE_SUFFIX}); pass atsign=")


def _same_key(priv: RSAPrivateKey, pub: RSAPublicKey) -> bool:
    return priv.public_key().public_numbers() == pub.public_numbers()


@dataclass
class AtKeys:
    """An atSign's keys, decrypted and parsed."""

    atsign: str
    pkam_private: RSAPrivateKey | None      # None for secure-element (SIM) PKAM
    pkam_public: RSAPublicKey
    encrypt_private: RSAPrivateKey
    encrypt_public: RSAPublicKey
    # Secrets stay out of repr() so that logging an AtKeys cannot leak them.
    self_encryption_key: str = field(repr=False)    # base64 of 32 bytes
    enrollment_id: str | None = None
    apkam_symmetric_key: str | None = field(default=None, repr=False)

    @property
    def pkam_public_b64(self) -> str:
        return public_key_to_b64(self.pkam_public)

    @property
    def encrypt_public_b64(self) -> str:
        return public_key_to_b64(self.encrypt_public)

    @classmethod
    def generate(cls, atsign: str) -> AtKeys:
        """Fresh keys: RSA-2048 PKAM pair, RSA-2048 encryption pair, AES-256 self key."""
        pkam = generate_rsa_private_key()
        enc = generate_rsa_private_key()
        return cls(atsign=normalize_atsign(atsign), pkam_private=pkam,
                   pkam_public=pkam.public_key(), encrypt_private=enc,
                   encrypt_public=enc.public_key(), self_encryption_key=generate_aes_key_b64())

    @classmethod
    def loads(cls, text: str | bytes, atsign: str) -> AtKeys:
        """Parse the JSON text of an .atKeys file; AtKeysError with the reason otherwise."""
        try:
            atsign = normalize_atsign(atsign)
        except InvalidAtSignError as exc:
            raise AtKeysError(f"bad atSign for .atKeys: {exc}") from None
        try:
            doc = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise AtKeysError(f".atKeys for {atsign} is not valid JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise AtKeysError(f".atKeys for {atsign} is not a JSON object")
        if "content" in doc and "iv" in doc and PKAM_PUBLIC not in doc:
            raise AtKeysError(
                f".atKeys for {atsign} is passphrase-protected "
                f"({doc.get('hashingAlgoType', 'unknown')} key derivation); such files are not "
                "supported: export an unprotected .atKeys file")
        missing = [f for f in (PKAM_PUBLIC, ENCRYPT_PUBLIC, ENCRYPT_PRIVATE, SELF_KEY)
                   if f not in doc]
        if missing:
            raise AtKeysError(f".atKeys for {atsign} lacks {', '.join(missing)}")

        self_key_b64 = doc[SELF_KEY]
        try:
            self_key = b64d(self_key_b64)
        except ValueError as exc:
            raise AtKeysError(f"{SELF_KEY} is not base64: {exc}") from None
        if len(self_key) != 32:
            raise AtKeysError(f"{SELF_KEY} must be 32 bytes (AES-256), got {len(self_key)}")

        def private(name: str) -> RSAPrivateKey:
            try:
                return private_key_from_b64(_decrypt_field(self_key, name, doc[name]), trusted=True)
            except ValueError as exc:
                raise AtKeysError(f"{name} does not hold an RSA private key: {exc}") from None

        def public(name: str) -> RSAPublicKey:
            try:
                return public_key_from_b64(_decrypt_field(self_key, name, doc[name]))
            except ValueError as exc:
                raise AtKeysError(f"{name} does not hold an RSA public key: {exc}") from None

        pkam_public = public(PKAM_PUBLIC)
        pkam_private = private(PKAM_PRIVATE) if doc.get(PKAM_PRIVATE) else None
        encrypt_public = public(ENCRYPT_PUBLIC)
        encrypt_private = private(ENCRYPT_PRIVATE)
        # A file whose halves do not belong together would fail much later and far away
        # (PKAM refused, shared keys undecryptable): say so now.
        if pkam_private is not None and not _same_key(pkam_private, pkam_public):
            raise AtKeysError(f"{PKAM_PRIVATE} and {PKAM_PUBLIC} are not one key pair")
        if not _same_key(encrypt_private, encrypt_public):
            raise AtKeysError(f"{ENCRYPT_PRIVATE} and {ENCRYPT_PUBLIC} are not one key pair")

        optional = {}
        for wire_name, name in ((ENROLLMENT_ID, "enrollment_id"),
                                (APKAM_SYMMETRIC, "apkam_symmetric_key")):
            value = doc.get(wire_name)
            if value is not None and not isinstance(value, str):
                raise AtKeysError(f"{wire_name} must be a string, not {type(value).__name__}")
            optional[name] = value or None
        return cls(atsign=atsign, pkam_private=pkam_private, pkam_public=pkam_public,
                   encrypt_private=encrypt_private, encrypt_public=encrypt_public,
                   self_encryption_key=self_key_b64, **optional)

    @classmethod
    def load(cls, path: str | os.PathLike, atsign: str | None = None) -> AtKeys:
        """Read an .atKeys file; the atSign defaults to the file name (``@alice_key.atKeys``)."""
        path = Path(path)
        if atsign is None:
            atsign = _atsign_from_path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise AtKeysError(f"cannot read {path}: {exc}") from None
        try:
            return cls.loads(text, atsign)
        except AtKeysError as exc:
            raise AtKeysError(f"{path}: {exc}") from None

    def dumps(self) -> str:
        """JSON text in at_onboarding_cli's field order (its readers ignore order anyway)."""
        self_key = b64d(self.self_encryption_key)
        doc: dict[str, str] = {PKAM_PUBLIC: _encrypt_field(self_key, self.pkam_public_b64)}
        if self.pkam_private is not None:
            doc[PKAM_PRIVATE] = _encrypt_field(self_key, private_key_to_b64(self.pkam_private))
        doc[ENCRYPT_PUBLIC] = _encrypt_field(self_key, self.encrypt_public_b64)
        doc[ENCRYPT_PRIVATE] = _encrypt_field(self_key, private_key_to_b64(self.encrypt_private))
        doc[SELF_KEY] = self.self_encryption_key
        if self.apkam_symmetric_key is not None:
            doc[APKAM_SYMMETRIC] = self.apkam_symmetric_key
        if self.enrollment_id is not None:
            doc[ENROLLMENT_ID] = self.enrollment_id
        doc[normalize_atsign(self.atsign)] = self.self_encryption_key
        return json.dumps(doc)

    def save(self, path: str | os.PathLike) -> None:
        """Write the file with mode 0600, creating missing parent folders with mode 0700, and
        replace any existing file atomically (a crash leaves the old or the new file, whole)."""
        path = Path(path)
        text = self.dumps()
        _make_private_dirs(path.parent)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            # mkstemp already creates 0600; fchmod guards against exotic umasks/filesystems.
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        _fsync_dir(path.parent)


def _make_private_dirs(folder: Path) -> None:
    """mkdir -p where every folder *we* create gets 0700 (Path.mkdir(parents=True) would give the
    intermediate ones the default mode); existing folders are left alone."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        if folder.parent == folder:
            break
        folder = folder.parent
    for new in reversed(missing):
        with contextlib.suppress(FileExistsError):
            new.mkdir(mode=0o700)
            os.chmod(new, 0o700)  # mkdir's mode is filtered by the umask


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable; not possible on every platform, hence best effort."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
