"""Helpers for tests that run the npd *process* (``python -m noports.daemon``) on 127.0.0.1.

Reusable pieces (the npt tests use them too):

:class:`LoggedProcess`
    Any of our command-line programs as a child process whose stderr lines are kept
    (``.lines()``, ``.wait_line(regex, timeout, nth=1)``, ``.count(regex)``) and copied to a log
    file; ``.pid``, ``.signal(sig)``, ``.wait(timeout)``, ``.stop()`` (SIGTERM, then SIGKILL),
    ``.kill()`` (SIGKILL).  stdout is kept too (``.stdout_lines()``, ``.wait_stdout(regex)``)
    when ``capture_stdout=True``.

:class:`NpdProcess`
    ``NpdProcess(atserver, log_dir, "--permit-open", "localhost:22", atsign="@daemon",
    managers="@client", device="default", storage_path=None, root=None, metrics=True)``
    starts npd against an :class:`~tests.functional.conftest.AtServerProcess` (its root, CA and
    ``--keys-dir`` keys; ``root=`` another ``host:port`` such as an :class:`AtServerTap`).
    ``.ready(timeout)`` waits for the line ``npd <atsign> ready: ...`` and reads the metrics port
    from it; ``.metrics()`` scrapes ``/metrics`` into ``{name: value}``;
    ``.counter(name, **labels)``; ``.wait_counter(name, value, timeout, **labels)``;
    ``.restart()`` starts a new process with the same flags and storage path (call ``.ready()``
    again).  ``storage_path`` defaults to a fresh folder under ``log_dir``.
    :func:`run_npd` runs npd to completion (flag checks): a ``CompletedProcess``.

:class:`AtServerTap`
    A fake root and a TLS man-in-the-middle in front of chosen atSigns of an atServer, so a test
    sees every command a program sends to its own atServer (``.commands(atsign)``,
    ``.count(atsign, regex)``).  Point the program's ``--root-domain`` at ``.root``.  It serves
    with the atServer's own certificate (``server.pem``/``server.key`` in its state dir), so the
    program's ``--ca-file`` stays the atServer's CA.

:class:`FakeRelay`
    Listening ports on 127.0.0.1 that count the connections made to each and keep the first line
    (the auth line) of each: "the relay sees N sockets on side B".

:class:`NptPlayer`
    TEST CODE, not the product: an atSign that talks to npd exactly as Atsign's npt (baseline
    5.6.x) does -- ping (``ping.<device>.sshnp``, value ``ping``), relay request, signed
    ``npt_request`` with a one-time RSA key, response verified with the daemon's public key and
    the session key/IV unwrapped -- written from the spec, so that npd is tested against an
    independent client.  :func:`play_side_a` then plays relay side A by hand (control socket with
    its auth line, the AES-CTR control channel, one data socket per ``connect:`` line).

:func:`start_echo_server` -- an asyncio echo service on 127.0.0.1 (``.port``, ``.connections``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from noports.at.client import AtClient
from noports.at.crypto import (
    b64e,
    generate_rsa_private_key,
    public_key_from_b64,
    public_key_to_b64,
)
from noports.at.envelope import encode_envelope, verify_envelope
from noports.at.names import bare_atsign
from noports.at.stream import CtrStream
from noports.messages import (
    DaemonResponse,
    NptRequest,
    PingResponse,
    decrypt_session_secret,
    npt_request_key,
    ping_key,
    relay_request_key,
)
from noports.relay.messages import RelayReply, encode_auth_line, parse_reply
from tests.functional.conftest import REPO, AtServerProcess

HOST = "127.0.0.1"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("NOPORTS_CA_FILE", None)
    return env


# --- any process with its stderr kept ---------------------------------------------------------

class LoggedProcess:
    """A child process whose stderr (and optionally stdout) lines are kept; see module doc."""

    def __init__(self, cmd: list[str], log_path: Path, *, env: dict | None = None,
                 capture_stdout: bool = False) -> None:
        self.cmd = list(cmd)
        self.log_path = log_path
        self._lines: list[str] = []
        self._out: list[str] = []
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(
            self.cmd, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if capture_stdout else subprocess.DEVNULL,
            stderr=subprocess.PIPE, cwd=str(REPO), env=env or _env())
        self._readers = [threading.Thread(target=self._read_err, daemon=True)]
        if capture_stdout:
            self._readers.append(threading.Thread(target=self._read_out, daemon=True))
        for t in self._readers:
            t.start()

    def _read_err(self) -> None:
        with open(self.log_path, "a") as out:
            for raw in self.proc.stderr:
                line = raw.decode(errors="replace").rstrip("\n")
                out.write(line + "\n")
                out.flush()
                with self._cond:
                    self._lines.append(line)
                    self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def _read_out(self) -> None:
        for raw in self.proc.stdout:
            with self._cond:
                self._out.append(raw.decode(errors="replace").rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    # -- output ---------------------------------------------------------------------------------

    def lines(self) -> list[str]:
        with self._cond:
            return list(self._lines)

    def stdout_lines(self) -> list[str]:
        with self._cond:
            return list(self._out)

    def count(self, regex: str) -> int:
        pattern = re.compile(regex)
        return sum(1 for line in self.lines() if pattern.search(line))

    def _wait(self, source: list[str], regex: str, timeout: float, nth: int, what: str) -> str:
        pattern = re.compile(regex)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                hits = [line for line in source if pattern.search(line)]
                if len(hits) >= nth:
                    return hits[nth - 1]
                left = deadline - time.monotonic()
                done = self.proc.poll() is not None and not any(
                    t.is_alive() for t in self._readers)
                if left <= 0 or done:
                    tail = "\n".join(self._lines[-40:])
                    raise AssertionError(f"no {what} line matching {regex!r} within {timeout}s "
                                         f"(rc={self.proc.poll()}); stderr tail:\n{tail}")
                self._cond.wait(min(left, 0.2))

    def wait_line(self, regex: str, timeout: float = 10.0, *, nth: int = 1) -> str:
        """The ``nth`` stderr line matching ``regex``; AssertionError after ``timeout``."""
        return self._wait(self._lines, regex, timeout, nth, "stderr")

    def wait_stdout(self, regex: str, timeout: float = 10.0, *, nth: int = 1) -> str:
        return self._wait(self._out, regex, timeout, nth, "stdout")

    async def await_line(self, regex: str, timeout: float = 10.0, *, nth: int = 1) -> str:
        """``wait_line`` without blocking the event loop (runs in a thread)."""
        return await asyncio.get_running_loop().run_in_executor(
            None, lambda: self.wait_line(regex, timeout, nth=nth))

    # -- process --------------------------------------------------------------------------------

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._join()

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL if it does not exit within ``timeout``."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._join()
        return self.proc.returncode

    def _join(self) -> None:
        for t in self._readers:
            t.join(5)
        for stream in (self.proc.stderr, self.proc.stdout):
            if stream is not None:
                stream.close()


# --- npd --------------------------------------------------------------------------------------

def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {"name" or 'name{label="v"}': value} (comments skipped)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def npd_command(atserver: AtServerProcess, *args: str, atsign: str = "@daemon",
                managers: str | None = "@client", device: str | None = "default",
                storage_path: Path | None = None, root: str | None = None,
                key_file: Path | None = None, metrics: bool = True) -> list[str]:
    cmd = [sys.executable, "-m", "noports.daemon", "-a", atsign,
           "-k", str(key_file or atserver.keys_dir / f"{atsign}_key.atKeys"),
           "--root-domain", root or f"{HOST}:{atserver.root_port}",
           "--ca-file", str(atserver.ca_file)]
    if managers is not None:
        cmd += ["-m", managers]
    if device is not None:
        cmd += ["-d", device]
    if storage_path is not None:
        cmd += ["--storage-path", str(storage_path)]
    if metrics:
        cmd += ["--metrics-port", "0"]
    return cmd + list(args)


class NpdProcess(LoggedProcess):
    """One ``python -m noports.daemon`` process; see the module docstring."""

    def __init__(self, atserver: AtServerProcess, log_dir: Path, *args: str,
                 atsign: str = "@daemon", managers: str | None = "@client",
                 device: str | None = "default", storage_path: Path | None = None,
                 root: str | None = None, key_file: Path | None = None,
                 metrics: bool = True) -> None:
        self.atserver = atserver
        self.atsign = atsign
        self.device = device
        self.log_dir = log_dir
        tag = uuid.uuid4().hex[:8]
        self.storage_path = storage_path or log_dir / f"npd-storage-{tag}"
        self.metrics_port: int | None = None
        cmd = npd_command(atserver, *args, atsign=atsign, managers=managers, device=device,
                          storage_path=self.storage_path, root=root, key_file=key_file,
                          metrics=metrics)
        super().__init__(cmd, log_dir / f"npd-{tag}.log")

    def ready(self, timeout: float = 30.0) -> NpdProcess:
        line = self.wait_line(rf"npd {re.escape(self.atsign)} ready", timeout)
        m = re.search(r"metrics on [\d.]+:(\d+)", line)
        self.metrics_port = int(m.group(1)) if m else None
        return self

    async def aready(self, timeout: float = 30.0) -> NpdProcess:
        await asyncio.get_running_loop().run_in_executor(None, self.ready, timeout)
        return self

    def restart(self) -> NpdProcess:
        """Same flags, same storage path, new process (the old one must have exited)."""
        assert self.proc.poll() is not None, "stop or kill the old process first"
        tag = uuid.uuid4().hex[:8]
        LoggedProcess.__init__(self, self.cmd, self.log_dir / f"npd-{tag}.log")
        return self

    def metrics(self) -> dict[str, float]:
        url = f"http://{HOST}:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            return parse_metrics(resp.read().decode())

    def counter(self, name: str, **labels: str) -> float:
        key = f"noports_npd_{name}"
        if labels:
            key += "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"
        return self.metrics().get(key, 0.0)

    async def wait_counter(self, name: str, value: float, timeout: float = 20.0,
                           **labels: str) -> float:
        """Poll /metrics (in a thread) until the counter reaches ``value``; bounded."""
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + timeout
        while True:
            got = await loop.run_in_executor(None, lambda: self.counter(name, **labels))
            if got >= value:
                return got
            if time.monotonic() > deadline:
                raise AssertionError(f"{name}{labels} stayed at {got} < {value} for {timeout}s")
            await asyncio.sleep(0.05)


def run_npd(atserver: AtServerProcess, *args: str, timeout: float = 30.0,
            **kw) -> subprocess.CompletedProcess:
    """Run npd with these flags to completion (for flag checks that must exit)."""
    return subprocess.run(npd_command(atserver, *args, metrics=False, **kw), env=_env(),
                          cwd=str(REPO), capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


# --- a window onto what a program asks its atServer -------------------------------------------

class AtServerTap:
    """Fake root + TLS man-in-the-middle for ``tapped`` atSigns (see the module docstring)."""

    def __init__(self, atserver: AtServerProcess, tapped: list[str]) -> None:
        self.atserver = atserver
        self.tapped = list(tapped)
        self._commands: dict[str, list[str]] = {a: [] for a in self.tapped}
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._ports: dict[str, int] = {}
        self.root_port = 0
        self._servers: list[asyncio.base_events.Server] = []
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def root(self) -> str:
        return f"{HOST}:{self.root_port}"

    def start(self) -> AtServerTap:
        self._thread.start()
        assert self._started.wait(10), "tap did not start"
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def commands(self, atsign: str) -> list[str]:
        with self._lock:
            return list(self._commands[atsign])

    def count(self, atsign: str, regex: str) -> int:
        pattern = re.compile(regex)
        return sum(1 for c in self.commands(atsign) if pattern.search(c))

    # -- inside the tap's thread ----------------------------------------------------------------

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._start())
        except BaseException as exc:  # reported by start()
            self._error = exc
            self._started.set()
            return
        self._started.set()
        try:
            self._loop.run_forever()
        finally:
            for server in self._servers:
                server.close()
            self._loop.close()

    async def _start(self) -> None:
        state = self.atserver.state_dir
        self._server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._server_ctx.load_cert_chain(state / "server.pem", state / "server.key")
        self._client_ctx = self.atserver.ssl_context()
        for atsign in self.tapped:
            server = await asyncio.start_server(
                lambda r, w, a=atsign: self._proxy(a, r, w), HOST, 0, ssl=self._server_ctx)
            self._servers.append(server)
            self._ports[atsign] = server.sockets[0].getsockname()[1]
        root = await asyncio.start_server(self._root, HOST, 0, ssl=self._server_ctx)
        self._servers.append(root)
        self.root_port = root.sockets[0].getsockname()[1]

    async def _root(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"@")
        with contextlib.suppress(OSError, ssl.SSLError, asyncio.IncompleteReadError):
            while True:
                line = await reader.readline()
                if not line:
                    break
                name = "@" + line.decode().strip().lstrip("@").lower()
                if name in self._ports:
                    writer.write(f"{HOST}:{self._ports[name]}\r\n@".encode())
                elif name in self.atserver.ports:
                    writer.write(f"{HOST}:{self.atserver.ports[name]}\r\n@".encode())
                else:
                    writer.write(b"null\r\n@")
                await writer.drain()
        writer.close()

    async def _proxy(self, atsign: str, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection(
                HOST, self.atserver.ports[atsign], ssl=self._client_ctx, server_hostname=HOST)
        except OSError:
            writer.close()
            return

        async def client_to_server() -> None:
            buf = b""
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                buf += data
                *complete, buf = buf.split(b"\n")
                if complete:
                    with self._lock:
                        self._commands[atsign].extend(
                            c.decode(errors="replace") for c in complete)
                up_w.write(data)
                await up_w.drain()
            with contextlib.suppress(OSError):
                up_w.close()

        async def server_to_client() -> None:
            while True:
                data = await up_r.read(65536)
                if not data:
                    break
                writer.write(data)
                await writer.drain()
            with contextlib.suppress(OSError):
                writer.close()

        with contextlib.suppress(OSError, ssl.SSLError, ConnectionError):
            await asyncio.gather(client_to_server(), server_to_client())
        for w in (writer, up_w):
            with contextlib.suppress(OSError, RuntimeError):
                w.close()


# --- a relay stand-in that only counts -----------------------------------------------------------

class FakeRelay:
    """``ports = await FakeRelay().open(n)``: n listening ports counting connections and their
    first lines; the sockets are held open until ``close()`` (or ``drop(port)``)."""

    def __init__(self) -> None:
        self.connections: dict[int, int] = {}
        self.first_lines: dict[int, list[bytes]] = {}
        self._servers: list[asyncio.base_events.Server] = []
        self._writers: dict[int, list[asyncio.StreamWriter]] = {}
        self._changed = asyncio.Event()

    async def open(self, n: int = 1) -> list[int]:
        ports = []
        for _ in range(n):
            port_box: list[int] = []

            async def handle(reader, writer, box=port_box):
                port = box[0]
                self.connections[port] += 1
                self._writers[port].append(writer)
                with contextlib.suppress(OSError, asyncio.IncompleteReadError, ValueError):
                    line = await reader.readline()
                    self.first_lines[port].append(line)
                self._changed.set()
                with contextlib.suppress(OSError):
                    await reader.read()      # hold until the peer closes

            server = await asyncio.start_server(handle, HOST, 0)
            port = server.sockets[0].getsockname()[1]
            port_box.append(port)
            self.connections[port] = 0
            self.first_lines[port] = []
            self._writers[port] = []
            self._servers.append(server)
            ports.append(port)
        return ports

    async def wait_lines(self, port: int, n: int, timeout: float = 10.0) -> list[bytes]:
        deadline = time.monotonic() + timeout
        while len(self.first_lines[port]) < n:
            self._changed.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"port {port}: {len(self.first_lines[port])} auth lines, "
                                     f"expected {n}")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)
        return self.first_lines[port]

    def total(self) -> int:
        return sum(self.connections.values())

    async def close(self) -> None:
        for writers in self._writers.values():
            for w in writers:
                w.close()
        for server in self._servers:
            server.close()
            await server.wait_closed()


# --- an echo service -------------------------------------------------------------------------

@dataclass
class EchoServer:
    server: asyncio.base_events.Server
    port: int
    connections: int = 0

    async def close(self) -> None:
        self.server.close()
        await self.server.wait_closed()


async def start_echo_server(host: str = HOST) -> EchoServer:
    box: list[EchoServer] = []

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        box[0].connections += 1
        with contextlib.suppress(OSError):
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                writer.write(data)
                await writer.drain()
            writer.close()

    server = await asyncio.start_server(echo, host, 0)
    box.append(EchoServer(server, server.sockets[0].getsockname()[1]))
    return box[0]


# --- test code playing Atsign's npt -------------------------------------------------------------

def client_nonce() -> str:
    """As Atsign's client makes it: local time in ISO-8601."""
    from datetime import datetime
    return datetime.now().isoformat()


@dataclass
class Session:
    """One session as the test client sees it."""

    session_id: str
    relay: RelayReply | None
    client_nonce: str
    request: NptRequest | None = None
    ephemeral: object = field(default=None, repr=False)     # RSA private key
    response: DaemonResponse | None = None
    key: bytes | None = field(default=None, repr=False)
    iv: bytes | None = field(default=None, repr=False)


class NptPlayer:
    """TEST CODE: an atSign talking to npd as Atsign's npt does (see the module docstring).

    One monitor for everything this client receives from ``daemon`` (heartbeats, responses)
    and from relays; ``async with NptPlayer(atserver, "@client") as c``.
    """

    def __init__(self, atserver: AtServerProcess, atsign: str = "@client", *,
                 daemon: str = "@daemon", relay: str = "@relay", device: str = "default",
                 root: str | None = None) -> None:
        self.atserver = atserver
        self.atsign = atsign
        self.daemon = daemon
        self.relay = relay
        self.device = device
        self.keys = atserver.keys(atsign)
        self.client = AtClient(atsign, self.keys, root=root or f"{HOST}:{atserver.root_port}",
                               ca_file=str(atserver.ca_file))
        self.heartbeats: asyncio.Queue = asyncio.Queue()
        self.responses: dict[str, list[str]] = {}
        self.relay_replies: dict[str, str] = {}
        self._changed = asyncio.Event()
        self._monitor = None
        self._task: asyncio.Task | None = None
        self._daemon_pk = None

    async def __aenter__(self) -> NptPlayer:
        await self.client.connect()
        self._monitor = self.client.monitor(
            rf"\.sshnp@{re.escape(bare_atsign(self.daemon))}|\.sshrvd@")
        await self._monitor.start()
        self._task = asyncio.get_running_loop().create_task(self._collect())
        return self

    async def __aexit__(self, *exc) -> None:
        if self._task is not None:
            self._task.cancel()
        await self.client.close()

    async def _collect(self) -> None:
        # "<first>.<device>.sshnp": first is "heartbeat" or a sessionId (a UUID, no dots);
        # any device of this daemon (tests switch self.device between requests)
        async for n in self._monitor:
            entity = n.entity
            first, _, rest = entity.partition(".")
            if n.from_atsign == self.daemon and rest.endswith(".sshnp"):
                if first == "heartbeat":
                    self.heartbeats.put_nowait(n.value)
                else:
                    self.responses.setdefault(first, []).append(n.value)
            elif n.from_atsign == self.relay and entity.endswith(".sshrvd"):
                self.relay_replies[entity[: -len(".sshrvd")]] = n.value
            self._changed.set()

    async def _wait(self, predicate, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}")
            self._changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)

    # -- ping --
    async def ping(self) -> None:
        await self.client.notify(f"{self.daemon}:{ping_key(self.device)}", "ping",
                                 ttl=10_000, ttln=60_000)

    async def heartbeat(self, timeout: float = 10.0) -> PingResponse:
        try:
            value = await asyncio.wait_for(self.heartbeats.get(), timeout)
        except asyncio.TimeoutError:
            raise AssertionError(f"no ping response within {timeout}s") from None
        return PingResponse.from_json(value)

    # -- relay --
    async def request_relay(self, session_id: str | None = None) -> Session:
        sid = session_id or str(uuid.uuid4())
        nonce = client_nonce()
        body = {"sessionId": sid, "atSignA": self.atsign, "atSignB": self.daemon,
                "authenticateSocketA": True, "authenticateSocketB": True,
                "clientNonce": nonce}
        await self.client.notify(f"{self.relay}:{relay_request_key(self.device)}",
                                 json.dumps(body, separators=(",", ":")), ttl=10_000,
                                 ttln=60_000)
        value = await self._wait(lambda: self.relay_replies.get(sid), 10.0,
                                 f"relay reply for {sid}")
        return Session(sid, parse_reply(value), nonce)

    def fake_session(self, relay_port: int, rvd_nonce: str = "fake-nonce") -> Session:
        """A session whose "relay" is a test listener (no relay request made)."""
        sid = str(uuid.uuid4())
        return Session(sid, RelayReply(HOST, 1, relay_port, rvd_nonce), client_nonce())

    # -- request --
    def make_request(self, session: Session, requested_host: str, requested_port: int, *,
                     timeout_ms: int = 30_000, encrypt: bool = True) -> NptRequest:
        session.ephemeral = generate_rsa_private_key()
        session.request = NptRequest(
            session_id=session.session_id, rvd_host=session.relay.address,
            rvd_port=session.relay.port_b, requested_port=requested_port,
            requested_host=requested_host, authenticate_to_rvd=True,
            client_nonce=session.client_nonce, rvd_nonce=session.relay.rvd_nonce,
            encrypt_rvd_traffic=encrypt,
            client_ephemeral_pk=public_key_to_b64(session.ephemeral.public_key()),
            client_ephemeral_pk_type="rsa2048", timeout_ms=timeout_ms)
        return session.request

    def envelope(self, request: NptRequest, signer=None) -> str:
        return encode_envelope(request.to_payload(), signer or self.keys.encrypt_private)

    async def send_request(self, request: NptRequest, *, envelope: str | None = None,
                           notification_id: str | None = None) -> str:
        """The signed npt_request, as Atsign's npt sends it; returns the notification id."""
        return await self.client.notify(f"{self.daemon}:{npt_request_key(self.device)}",
                                        envelope or self.envelope(request), ttl=10_000,
                                        ttln=60_000, id=notification_id)

    async def response(self, session_id: str, timeout: float = 15.0) -> str:
        values = await self._wait(lambda: self.responses.get(session_id), timeout,
                                  f"daemon response for {session_id}")
        return values[0]

    async def daemon_public_key(self):
        if self._daemon_pk is None:
            text = await self.client.plookup(f"publickey{self.daemon}")
            self._daemon_pk = public_key_from_b64(text)
        return self._daemon_pk

    async def accept(self, session: Session, value: str) -> Session:
        """Check a success response as Atsign's npt does: verify the daemon's signature, read
        the payload liberally, RSA-unwrap the key and IV."""
        assert value.startswith("{"), f"daemon refused: {value!r}"
        payload = verify_envelope(value, await self.daemon_public_key())
        response = DaemonResponse.from_payload(payload)
        assert response.status == "connected" and response.session_id == session.session_id
        session.response = response
        if session.request.encrypt_rvd_traffic:
            session.key = decrypt_session_secret(session.ephemeral, response.session_aes_key)
            session.iv = decrypt_session_secret(session.ephemeral, response.session_iv)
        return session

    async def open_session(self, requested_host: str, requested_port: int,
                           **kw) -> Session:
        """Relay request, npt_request, verified response: a session ready for side A."""
        session = await self.request_relay()
        self.make_request(session, requested_host, requested_port, **kw)
        await self.send_request(session.request)
        return await self.accept(session, await self.response(session.session_id))


class SideA:
    """TEST CODE: relay side A played by hand (spec §5.5 multi mode, §6)."""

    def __init__(self, session: Session, client_keys) -> None:
        self.session = session
        self.auth_line = encode_auth_line(session.session_id, session.client_nonce,
                                          session.relay.rvd_nonce, client_keys.encrypt_private)
        self.control: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self.control_cipher: CtrStream | None = None

    async def open_control(self) -> None:
        relay = self.session.relay
        reader, writer = await asyncio.open_connection(relay.address, relay.port_a)
        writer.write(self.auth_line)
        await writer.drain()
        self.control = (reader, writer)
        if self.session.key is not None:
            self.control_cipher = CtrStream(self.session.key, self.session.iv)

    def send_control(self, line: bytes) -> None:
        data = self.control_cipher.update(line) if self.control_cipher else line
        self.control[1].write(data)

    async def open_data(self, connect_line: bytes | None = None):
        """A data socket (auth line first), then ``connect:<key>:<iv>`` on the control
        channel; returns (reader, writer, encrypt, decrypt)."""
        relay = self.session.relay
        reader, writer = await asyncio.open_connection(relay.address, relay.port_a)
        writer.write(self.auth_line)
        await writer.drain()
        key, iv = os.urandom(32), os.urandom(16)
        self.send_control(connect_line or f"connect:{b64e(key)}:{b64e(iv)}\n".encode())
        await self.control[1].drain()
        return reader, writer, CtrStream(key, iv), CtrStream(key, iv)

    def close(self) -> None:
        if self.control is not None:
            self.control[1].close()


async def echo_through(reader, writer, encrypt: CtrStream, decrypt: CtrStream,
                       payload: bytes, chunk: int = 65536) -> bytes:
    """Send ``payload`` through a data socket and read the same number of bytes back."""
    async def send() -> None:
        for i in range(0, len(payload), chunk):
            writer.write(encrypt.update(payload[i:i + chunk]))
            await writer.drain()

    async def receive() -> bytes:
        got = bytearray()
        while len(got) < len(payload):
            data = await reader.read(65536)
            if not data:
                break
            got += decrypt.update(data)
        return bytes(got)

    _, back = await asyncio.gather(send(), receive())
    return back
