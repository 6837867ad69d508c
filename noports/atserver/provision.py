"""Creating and activating hosted atSigns: CRAM secrets, server signing keys, ``--keys-dir``.

Owns the state an atSign gets when it first appears (spec atprotocol.md §3.2, §3.4, §6.2):
a random CRAM secret at ``privatekey:at_secret`` and in ``<state>/secrets/@x.cram`` (0600), the
server's RSA signing key pair (``public:signing_publickey@x`` / ``@x:signing_privatekey@x``,
used by server-to-server ``pol``), and in-process activation for ``--keys-dir``: the same end
state as ``at_activate`` (PKAM public key at ``privatekey:at_pkam_publickey``, encryption
public key at ``public:publickey@x``, CRAM secret removed, ``@x_key.atKeys`` written).
Runs before the listeners open; the caller commits.
"""

from __future__ import annotations

import logging
import os
import secrets
import sys
from pathlib import Path

from noports.at import crypto
from noports.at.atkeys import AtKeys
from noports.atserver.keystore import KeyStore
from noports.atserver.verbs import AT_SECRET, AT_SECRET_DELETED, PKAM_KEY, HostedAtSign

__all__ = ["activate_from_keys_dir", "announce_secret", "init_atsign", "keys_file",
           "remove_secret", "secret_file"]

log = logging.getLogger("noports.atserver.provision")


def secret_file(state_dir: Path, atsign: str) -> Path:
    return state_dir / "secrets" / f"{atsign}.cram"


def keys_file(keys_dir: Path, atsign: str) -> Path:
    return keys_dir / f"{atsign}_key.atKeys"


def _write_secret(path: Path, secret: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, (secret + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def init_atsign(ks: KeyStore, state_dir: Path) -> str:
    """First start of an atSign: CRAM secret + signing key pair.  Returns the secret."""
    atsign = ks.atsign
    secret = secrets.token_hex(64)
    ks.put(AT_SECRET, secret, {}, by=atsign)
    _write_secret(secret_file(state_dir, atsign), secret)
    signing = crypto.generate_rsa_private_key()
    ks.put(f"public:signing_publickey{atsign}", crypto.public_key_to_b64(signing), {}, by=atsign)
    ks.put(f"signing_privatekey{atsign}", crypto.private_key_to_b64(signing), {}, by=atsign)
    return secret


def announce_secret(atsign: str, secret: str, state_dir: Path) -> None:
    print(f"atserver: new atSign {atsign}: CRAM secret {secret} "
          f"(kept in {secret_file(state_dir, atsign)})", file=sys.stderr, flush=True)


def remove_secret(hosted: HostedAtSign) -> None:
    """The atSign is activated: forget its CRAM secret (store and file)."""
    ks = hosted.ks
    if ks.get(AT_SECRET) is not None:
        ks.delete(AT_SECRET)
    if ks.get(AT_SECRET_DELETED) is None:
        ks.put(AT_SECRET_DELETED, "true", {}, by=ks.atsign)
    if hosted.secret_file is not None:
        try:
            hosted.secret_file.unlink()
        except FileNotFoundError:
            pass


def _install(hosted: HostedAtSign, keys: AtKeys) -> None:
    ks = hosted.ks
    ks.put(PKAM_KEY, keys.pkam_public_b64, {}, by=ks.atsign)
    ks.put(f"public:publickey{ks.atsign}", keys.encrypt_public_b64, {"isEncrypted": False},
           by=ks.atsign)
    hosted.forget_pkam_key()
    remove_secret(hosted)


def activate_from_keys_dir(hosted: HostedAtSign, keys_dir: Path) -> str:
    """``--keys-dir``: make ``keys_dir/@x_key.atKeys`` and the store agree.

    * no file, atSign not activated: generate keys, install their public halves, write the file;
    * file present, atSign not activated (a fresh state dir): install the file's public keys;
    * file present and activated: nothing (the store is the truth; a mismatch shows as a PKAM
      failure, which is what a real atServer would do too);
    * no file but already activated: warn and leave it (the private keys cannot be recreated).
    Returns what was done: "generated", "installed", "kept" or "missing".
    """
    path = keys_file(keys_dir, hosted.atsign)
    activated = hosted.ks.get(PKAM_KEY) is not None
    if path.exists():
        if activated:
            return "kept"
        keys = AtKeys.load(path, hosted.atsign)
        _install(hosted, keys)
        log.info("%s: installed the public keys of %s", hosted.atsign, path)
        return "installed"
    if activated:
        log.warning("%s is already activated but %s does not exist; not creating new keys",
                    hosted.atsign, path)
        return "missing"
    keys = AtKeys.generate(hosted.atsign)
    _install(hosted, keys)
    keys.save(path)
    log.info("%s: activated; keys written to %s", hosted.atsign, path)
    return "generated"
