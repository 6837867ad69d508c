"""Fixtures that start real ``atserver`` processes (``python -m noports.atserver``) on 127.0.0.1.

Fixtures (reuse them; they are general):

``atserver``
    A factory: ``atserver("@alice", "@bob", keys=True, args=(...))`` starts a fresh server
    (new state dir under ``tmp_path``, root port 0) and returns an :class:`AtServerProcess`.
    ``keys=True`` passes ``--keys-dir`` so every atSign is activated with
    ``<keys_dir>/@x_key.atKeys``; ``keys=False`` leaves them on their CRAM secret
    (``proc.cram_secret("@x")``).  ``args`` are extra command-line flags (e.g.
    ``("--stats-interval", "0.5")``).  Every process is stopped at teardown (SIGKILL if SIGTERM
    is ignored), and its stderr is kept in ``<state_dir>/../atserver-N.log``.

``shared_atserver``
    One module-wide server hosting @alice, @bob and @carol, activated; for tests that do not
    change server-wide state.  Do not stop or restart it.

:class:`AtServerProcess` attributes and methods:
    ``.root_port``, ``.ports`` ({atSign: port}), ``.ca_file``, ``.keys_dir``, ``.state_dir``,
    ``.pid``, ``.info`` (the parsed ready line), ``.host``;
    ``.restart(args=None)`` (SIGTERM then start again on the same state dir and ports),
    ``.kill()`` (SIGKILL, wait), ``.stop()`` (SIGTERM, wait; returns the exit code),
    ``.start()``, ``.alive()``,
    ``.keys(atsign)`` (AtKeys), ``.cram_secret(atsign)``,
    ``.ssl_context()``, ``.connect(atsign_or_port)`` -> :class:`RawConn`,
    ``.login(atsign)`` -> a PKAM-authenticated :class:`RawConn`,
    ``.db_integrity()`` (``PRAGMA integrity_check`` on the store; server may run).

:class:`RawConn` is a blocking TLS socket speaking raw atProtocol lines, with bounded waits:
    ``.greeting`` (bytes before the first command), ``.request(line) -> str`` (the reply line
    without ``\\n``; asserts the prompt that must follow it), ``.send(line)``,
    ``.read_reply(prompt=None)``, ``.read_chunk()``, ``.read_line()``, ``.login_pkam(keys)``,
    ``.login_cram(secret)``, ``.closed_by_peer(timeout)``, ``.close()``.
Replies are parsed by hand (not through ``noports.at.responses``) so the tests see the bytes.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from noports.at import crypto
from noports.at.atkeys import AtKeys

REPO = Path(__file__).resolve().parents[2]
READY_TIMEOUT = 60.0


class RawConn:
    """A blocking TLS connection to an atServer (or root) port; every wait is bounded."""

    def __init__(self, port: int, ctx: ssl.SSLContext, host: str = "127.0.0.1",
                 timeout: float = 10.0, read_greeting: bool = True) -> None:
        raw = socket.create_connection((host, port), timeout=timeout)
        self.sock = ctx.wrap_socket(raw, server_hostname=host)
        self.sock.settimeout(timeout)
        self.timeout = timeout
        self.buf = b""
        self.prompt = "@"
        self.greeting = b""
        if read_greeting:
            self.greeting = self._read_exact_prefix(b"@")

    # -- low level --------------------------------------------------------------------------

    def _recv(self, deadline: float) -> bytes:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no data; buffered {self.buf[:200]!r}")
        self.sock.settimeout(left)
        data = self.sock.recv(1 << 20)
        if not data:
            raise ConnectionError(f"closed by the server; buffered {self.buf[:200]!r}")
        return data

    def _read_exact_prefix(self, prefix: bytes) -> bytes:
        deadline = time.monotonic() + self.timeout
        while len(self.buf) < len(prefix):
            self.buf += self._recv(deadline)
        got, self.buf = self.buf[:len(prefix)], self.buf[len(prefix):]
        assert got == prefix, f"expected {prefix!r}, got {got!r}"
        return got

    def read_chunk(self, timeout: float | None = None) -> bytes:
        """The next bytes from the socket (one TLS record's worth), ignoring the buffer."""
        assert not self.buf, f"unread bytes {self.buf[:100]!r}"
        return self._recv(time.monotonic() + (timeout or self.timeout))

    def read_line(self, timeout: float | None = None) -> str:
        deadline = time.monotonic() + (timeout or self.timeout)
        while b"\n" not in self.buf:
            self.buf += self._recv(deadline)
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode()

    def send(self, line: str | bytes) -> None:
        data = line if isinstance(line, bytes) else line.encode()
        self.sock.sendall(data + b"\n")

    def read_reply(self, prompt: str | None = None, timeout: float | None = None) -> str:
        """One reply line; then the prompt (``prompt`` or the current one; "" for none)."""
        line = self.read_line(timeout)
        expected = (self.prompt if prompt is None else prompt).encode()
        if expected:
            self._read_exact_prefix(expected)
        return line

    def request(self, line: str, prompt: str | None = None, timeout: float | None = None) -> str:
        self.send(line)
        return self.read_reply(prompt, timeout)

    def closed_by_peer(self, timeout: float = 5.0) -> bool:
        """True when the server closes the connection within ``timeout`` (data is skipped)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.sock.settimeout(max(0.01, deadline - time.monotonic()))
                data = self.sock.recv(1 << 20)
            except TimeoutError:
                return False
            except (ConnectionError, ssl.SSLError, OSError):
                return True
            if not data:
                return True
            self.buf += data
        return False

    # -- authentication ---------------------------------------------------------------------

    def challenge(self, atsign: str) -> str:
        reply = self.request(f"from:{atsign}")
        assert reply.startswith("data:"), reply
        return reply[5:]

    def login_pkam(self, keys: AtKeys) -> None:
        ch = self.challenge(keys.atsign)
        reply = self.request("pkam:" + crypto.pkam_sign(keys.pkam_private, ch),
                             prompt=f"{keys.atsign}@")
        assert reply == "data:success", reply
        self.prompt = f"{keys.atsign}@"

    def login_cram(self, atsign: str, secret: str) -> None:
        ch = self.challenge(atsign)
        reply = self.request("cram:" + crypto.cram_digest(secret, ch), prompt=f"{atsign}@")
        assert reply == "data:success", reply
        self.prompt = f"{atsign}@"

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class AtServerProcess:
    """One ``python -m noports.atserver`` process (see the module docstring)."""

    _counter = 0

    def __init__(self, base: Path, atsigns: list[str], keys: bool = True,
                 args: tuple[str, ...] = (), host: str = "127.0.0.1") -> None:
        AtServerProcess._counter += 1
        self.n = AtServerProcess._counter
        self.state_dir = base / f"state-{self.n}"
        self.keys_dir = base / f"keys-{self.n}" if keys else None
        self.atsigns = list(atsigns)
        self.args = tuple(args)
        self.host = host
        self.log_path = base / f"atserver-{self.n}.log"
        self.proc: subprocess.Popen | None = None
        self.info: dict = {}
        self.root_port = 0
        self.ports: dict[str, int] = {}
        self.ca_file: Path | None = None
        self._keys: dict[str, AtKeys] = {}
        self._secrets: dict[str, str] = {}
        self._log = None

    # -- lifecycle ----------------------------------------------------------------------------

    def command(self, args: tuple[str, ...] | None = None) -> list[str]:
        cmd = [sys.executable, "-m", "noports.atserver", "--state-dir", str(self.state_dir),
               "--host", self.host, "--root-port", str(self.root_port)]
        for a in self.atsigns:
            cmd += ["--atsign", a]
        if self.keys_dir is not None:
            cmd += ["--keys-dir", str(self.keys_dir)]
        cmd += list(self.args if args is None else args)
        return cmd

    def start(self, args: tuple[str, ...] | None = None) -> AtServerProcess:
        if args is not None:
            self.args = tuple(args)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop/kill
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        self.proc = subprocess.Popen(self.command(), stdout=subprocess.PIPE, stderr=self._log,
                                     stdin=subprocess.DEVNULL, cwd=str(REPO), env=env)
        line = self._ready_line()
        self.info = json.loads(line)
        assert self.info["event"] == "ready", self.info
        self.root_port = self.info["root_port"]
        self.ports = dict(self.info["atsigns"])
        self.ca_file = Path(self.info["ca_file"])
        # Before activation removes them: remember CRAM secrets shown in the ready line.
        for atsign, path in self.info.get("cram_secret_files", {}).items():
            self._secrets[atsign] = Path(path).read_text().strip()
        return self

    def _ready_line(self) -> str:
        box: list = []

        def reader():
            box.append(self.proc.stdout.readline())

        t = threading.Thread(target=reader, daemon=True)
        t.start()
        t.join(READY_TIMEOUT)
        if not box or not box[0]:
            self.kill()
            raise RuntimeError(f"atserver did not become ready; log:\n{self.log_text()[-3000:]}")
        return box[0].decode()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._close_files()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self._close_files()

    def _close_files(self) -> None:
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()
        if self._log is not None:
            self._log.close()
            self._log = None

    def restart(self, args: tuple[str, ...] | None = None) -> AtServerProcess:
        self.stop()
        return self.start(args)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    # -- helpers ------------------------------------------------------------------------------

    def keys(self, atsign: str) -> AtKeys:
        if atsign not in self._keys:
            self._keys[atsign] = AtKeys.load(self.keys_dir / f"{atsign}_key.atKeys", atsign)
        return self._keys[atsign]

    def cram_secret(self, atsign: str) -> str:
        return self._secrets[atsign]

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))

    def connect(self, target: str | int, **kw) -> RawConn:
        port = target if isinstance(target, int) else self.ports[target]
        return RawConn(port, self.ssl_context(), host=self.host, **kw)

    def login(self, atsign: str) -> RawConn:
        conn = self.connect(atsign)
        conn.login_pkam(self.keys(atsign))
        return conn

    def db_integrity(self) -> str:
        db = sqlite3.connect(str(self.state_dir / "atserver.db"))
        try:
            return db.execute("PRAGMA integrity_check").fetchone()[0]
        finally:
            db.close()


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.02, what: str = "condition"):
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def readable(sock, timeout: float) -> bool:
    return bool(select.select([sock], [], [], timeout)[0])


@pytest.fixture
def atserver(tmp_path):
    """Factory of fresh atserver processes; all are stopped at teardown."""
    procs: list[AtServerProcess] = []

    def factory(*atsigns: str, keys: bool = True, args: tuple[str, ...] = (),
                host: str = "127.0.0.1") -> AtServerProcess:
        proc = AtServerProcess(tmp_path, list(atsigns) or ["@alice", "@bob"], keys=keys,
                               args=args, host=host)
        procs.append(proc)
        return proc.start()

    yield factory
    for p in procs:
        p.stop()


@pytest.fixture(scope="module")
def shared_atserver(tmp_path_factory):
    """One module-wide activated server hosting @alice, @bob and @carol."""
    base = tmp_path_factory.mktemp("shared-atserver")
    proc = AtServerProcess(base, ["@alice", "@bob", "@carol"], keys=True).start()
    yield proc
    proc.stop()
