"""The session's one-time RSA-2048 key, generated in parallel with the network phases.

Owns: making npt's ephemeral keypair (spec §7.1 step 1) without stalling the event loop.  RSA
key generation costs 100-200 ms of CPU here and holds the GIL, so a thread would freeze the
loop's login, monitor and ping traffic for that long.  Instead a helper process is forked at
start -- while the process is still single-threaded, before any event loop or thread exists --
which generates the key on the other core and writes its DER through a pipe (never argv, the
environment or a file) and exits.  Where fork is unavailable or fails, a thread does it.

The helper is always reaped (and killed if the session gives up first): no orphan survives.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey

from noports.at.crypto import generate_rsa_private_key

__all__ = ["EphemeralKey"]

_MAX_DER = 16_384          # a PKCS#8 RSA-2048 key is ~1.2 KB


def _helper_main(fd: int) -> None:
    """In the forked helper: generate, write, leave without running any of the parent's
    cleanup (os._exit: no atexit handlers, no flushing of inherited stdio buffers)."""
    code = 1
    try:
        key = generate_rsa_private_key()
        der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        view = memoryview(der)
        while view:
            view = view[os.write(fd, view):]
        code = 0
    except BaseException:
        code = 1
    finally:
        os._exit(code)


class EphemeralKey:
    """``EphemeralKey.start()`` before the event loop exists; ``await key.get()`` later."""

    def __init__(self) -> None:
        self.pid: int | None = None
        self._fd: int | None = None
        self._key: RSAPrivateKey | None = None
        self._task: asyncio.Future | None = None
        self.forked = False

    @classmethod
    def start(cls, *, fork: bool = True) -> EphemeralKey:
        self = cls()
        if fork and hasattr(os, "fork"):
            self._fork()
        return self

    def _fork(self) -> None:
        try:
            r, w = os.pipe()
        except OSError:
            return
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        try:
            pid = os.fork()
        except OSError:
            os.close(r)
            os.close(w)
            return
        if pid == 0:
            # Hold nothing of the parent's but the pipe (an inherited pipe or socket would keep
            # its reader waiting for EOF); Ctrl-C in a terminal reaches the whole foreground
            # group, and the parent handles it.
            with contextlib.suppress(OSError):
                os.closerange(3, w)
                os.closerange(w + 1, 65536)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            _helper_main(w)
        os.close(w)
        self.pid, self._fd, self.forked = pid, r, True

    def _read_helper(self) -> RSAPrivateKey:
        """Blocking: the helper's DER to EOF, then reap it (runs in a worker thread)."""
        fd = self._fd
        chunks = []
        size = 0
        try:
            while size <= _MAX_DER:
                data = os.read(fd, 4096)
                if not data:
                    break
                chunks.append(data)
                size += len(data)
        finally:
            self._fd = None
            os.close(fd)
            self._reap(block=True)
        # Our own forked copy made this key a moment ago, so OpenSSL's consistency check
        # (~50 ms of CPU for RSA-2048, on the critical path of the session request) can be
        # skipped: nobody else could have supplied it.
        key = serialization.load_der_private_key(b"".join(chunks), password=None,
                                                 unsafe_skip_rsa_key_validation=True)
        if not isinstance(key, RSAPrivateKey) or key.key_size != 2048:
            raise ValueError("the key helper returned something other than an RSA-2048 key")
        return key

    def _reap(self, block: bool) -> None:
        pid = self.pid
        if pid is None:
            return
        try:
            done, _ = os.waitpid(pid, 0 if block else os.WNOHANG)
        except ChildProcessError:
            done = pid
        if done:
            self.pid = None

    async def get(self) -> RSAPrivateKey:
        """The private key (generated once); a helper failure falls back to a thread."""
        if self._key is not None:
            return self._key
        if self._task is None:
            loop = asyncio.get_running_loop()
            self._task = loop.run_in_executor(None, self._produce)
        self._key = await asyncio.shield(self._task)
        return self._key

    def _produce(self) -> RSAPrivateKey:
        if self._fd is not None:
            try:
                return self._read_helper()
            except (OSError, ValueError):
                pass            # the helper died or wrote garbage: make the key here instead
        return generate_rsa_private_key()

    def close(self) -> None:
        """Kill and reap the helper if it is still running (the session ended early)."""
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            self._reap(block=True)
        if self._fd is not None and self._task is None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
