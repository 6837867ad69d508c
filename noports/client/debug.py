"""npt's key log: an opt-in debugging hook, in the spirit of TLS's ``SSLKEYLOGFILE``.

Owns one thing: when the environment variable ``NOPORTS_KEYLOGFILE`` names a file, npt appends
the session's AES key and IV and every per-connection key and IV to it (one ``<label> <base64>``
per line), so that a tester or a debugger can decrypt captured relay traffic -- and so that the
security tests can look for these strings everywhere else (row S7) and find them nowhere.

Off unless set: nothing else in npt ever writes a key anywhere.  The variable holds a path,
never a secret.  Only a person who can already set npt's environment (and so read its memory)
can turn it on.
"""

from __future__ import annotations

import contextlib
import os

__all__ = ["KEYLOG_ENV", "install_connection_hook", "keylog_path", "record", "record_session_keys"]

KEYLOG_ENV = "NOPORTS_KEYLOGFILE"


def keylog_path() -> str | None:
    return os.environ.get(KEYLOG_ENV) or None


def record(label: str, value: str | None) -> None:
    path = keylog_path()
    if path is None or value is None:
        return
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, f"{label} {value}\n".encode())
        finally:
            os.close(fd)


def record_session_keys(key_b64: str | None, iv_b64: str | None) -> None:
    record("SESSION_KEY", key_b64)
    record("SESSION_IV", iv_b64)


def install_connection_hook() -> bool:
    """With the key log on, also record the per-connection keys the tunnel's client end makes.

    The client end draws each key and IV from the two generators it imports; wrapping those two
    names is the one place where every per-connection secret passes.  Returns True if installed.
    """
    if keylog_path() is None:
        return False
    from noports.tunnel import client_end

    make_key, make_iv = client_end.generate_aes_key_b64, client_end.generate_iv_b64
    if getattr(make_key, "_keylogged", False):
        return True

    def key_logged() -> str:
        value = make_key()
        record("CONNECTION_KEY", value)
        return value

    def iv_logged() -> str:
        value = make_iv()
        record("CONNECTION_IV", value)
        return value

    key_logged._keylogged = True      # type: ignore[attr-defined]
    iv_logged._keylogged = True       # type: ignore[attr-defined]
    client_end.generate_aes_key_b64 = key_logged
    client_end.generate_iv_b64 = iv_logged
    return True
