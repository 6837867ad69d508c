"""npt end to end: every program a real process on 127.0.0.1.

One atserver hosts the client, daemon, relay and stranger atSigns; ``srvd`` and ``npd`` are the
real programs (``SrvdProcess``, ``NpdProcess``); ``npt`` runs as ``python -m noports.client``,
mostly with ``-x``.  The services behind the daemon live in this test process: an HTTP page and
an echo service.  Shown here: the page through the tunnel; 100 MB both ways (sha256); 50
concurrent connections correctly paired; a non-manager told the ping phase failed; a permit-open
refusal shown as the daemon's text; a relay that refuses the socket; the relay or the daemon
SIGKILLed mid-transfer (R4); no local exposure and no leaked keys (S7); bad command lines (S5).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import http.server
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import psutil
import pytest

from noports.at.client import AtClient
from noports.relay.messages import encode_reply_csv, parse_request_ports
from tests.functional.conftest import REPO, AtServerProcess
from tests.functional.npd_helpers import (
    FakeRelay,
    LoggedProcess,
    NpdProcess,
    start_echo_server,
)
from tests.functional.srvd_helpers import SrvdProcess

HOST = "127.0.0.1"
ATSIGNS = ["@client", "@daemon", "@relay", "@relayk", "@fakerelay", "@mallory"]
DEVICE = "dev"
NPT_TIMEOUT = 60.0           # bound on any one npt run
PAIRING_WINDOW = 4.0         # the shared srvd's --pairing-timeout

pytestmark = pytest.mark.timeout(240)


# --- the stack ---------------------------------------------------------------------------------

class Stack:
    def __init__(self, atserver: AtServerProcess, srvd: SrvdProcess, npd: NpdProcess,
                 log_dir: Path) -> None:
        self.atserver = atserver
        self.srvd = srvd
        self.npd = npd
        self.log_dir = log_dir
        self.background: list[int] = []        # pids of -x runners, killed at teardown

    @property
    def root(self) -> str:
        return f"{HOST}:{self.atserver.root_port}"

    def npt_cmd(self, *args: str, client: str = "@client", daemon: str = "@daemon",
                relay: str = "@relay", device: str = DEVICE) -> list[str]:
        return [sys.executable, "-m", "noports.client", "-f", client, "-t", daemon,
                "-r", relay, "-d", device,
                "-k", str(self.atserver.keys_dir / f"{client}_key.atKeys"),
                "--root-domain", self.root, "--ca-file", str(self.atserver.ca_file), *args]


def npt_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("NOPORTS_CA_FILE", None)
    env.pop("NOPORTS_KEYLOGFILE", None)
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    base = tmp_path_factory.mktemp("npt-e2e")
    atserver = AtServerProcess(base, ATSIGNS, keys=True).start()
    srvd = npd = None
    try:
        # a short pairing window: a session whose pairs have ended closes its ports soon
        # after (srvd keeps them for the whole window, as Atsign's relay does)
        srvd = SrvdProcess(atserver, base, "-v", "--pairing-timeout", str(PAIRING_WINDOW),
                           atsign="@relay").ready()
        npd = NpdProcess(atserver, base, "--permit-open", f"{HOST}:*", "-v", atsign="@daemon",
                         managers="@client", device=DEVICE).ready()
        s = Stack(atserver, srvd, npd, base)
        yield s
    finally:
        for pid in (s.background if srvd and npd else []):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for proc in (npd, srvd):
            if proc is not None:
                proc.stop()
        atserver.stop()


@pytest.fixture
def background(stack):
    """Kill any -x runner a test left behind (normally they end on their -T idle time)."""
    yield stack.background
    for pid in list(stack.background):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    stack.background.clear()


class Npt:
    """The outcome of one ``npt -x`` run."""

    def __init__(self, proc: subprocess.CompletedProcess, elapsed: float) -> None:
        self.returncode = proc.returncode
        self.stdout = proc.stdout
        self.stderr = proc.stderr
        self.elapsed = elapsed
        lines = self.stdout.splitlines()
        self.port = int(lines[-1]) if proc.returncode == 0 and lines else None
        m = re.search(r"in the background as pid (\d+)", self.stderr)
        self.pid = int(m.group(1)) if m else None
        m = re.search(r"gave \S+ ports (\d+)/(\d+)", self.stderr)
        self.relay_ports = (int(m.group(1)), int(m.group(2))) if m else None


def run_npt_x(stack: Stack, *args: str, env: dict | None = None, **who) -> Npt:
    t0 = time.monotonic()
    proc = subprocess.run(stack.npt_cmd("-x", *args, **who), capture_output=True, text=True,
                          timeout=NPT_TIMEOUT, cwd=str(REPO), env=env or npt_env(),
                          stdin=subprocess.DEVNULL)
    out = Npt(proc, time.monotonic() - t0)
    if out.pid is not None:
        stack.background.append(out.pid)
    return out


async def arun_npt_x(stack: Stack, *args: str, **kw) -> Npt:
    # in a thread: the services npd connects to run on this loop
    return await asyncio.get_running_loop().run_in_executor(
        None, lambda: run_npt_x(stack, *args, **kw))


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_until(predicate, timeout: float, what: str, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def listening(port: int) -> bool:
    return any(c.status == psutil.CONN_LISTEN and c.laddr.port == port
               for c in psutil.net_connections(kind="tcp"))


class HttpService:
    """A tiny HTTP server in a thread; its page carries a token unique to this run."""

    def __init__(self) -> None:
        self.token = uuid.uuid4().hex
        body = f"<html><body>noports e2e {self.token}</body></html>".encode()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.body = body
        self.server = http.server.ThreadingHTTPServer((HOST, 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def http_service():
    svc = HttpService()
    yield svc
    svc.close()


# --- the happy paths ---------------------------------------------------------------------------

@pytest.mark.parametrize("loop_flag", [(), ("--no-uvloop",)], ids=["uvloop", "asyncio"])
def test_http_page_through_the_tunnel(stack, background, http_service, loop_flag):
    npt = run_npt_x(stack, "-p", str(http_service.port), "-h", HOST, "-T", "3s", *loop_flag)
    assert npt.returncode == 0, npt.stderr
    assert npt.stdout.splitlines()[-1] == str(npt.port)
    # every phase reported on stderr, in the diagram's order, then the port
    phases = re.findall(r"\] (\w+): ", npt.stderr)
    order = ["session", "atserver", "relay", "ping", "request", "tunnel", "ready"]
    assert [p for p in phases if p in order] == sorted(
        [p for p in phases if p in order], key=order.index)
    assert set(order) <= set(phases)
    with urllib.request.urlopen(f"http://{HOST}:{npt.port}/", timeout=10) as resp:
        page = resp.read()
    assert page == http_service.body and http_service.token.encode() in page
    # the runner ends by itself once idle for -T
    wait_until(lambda: gone(npt.pid), 15, "the background npt to end after -T 3s")
    assert not listening(npt.port)


def test_unencrypted_session_still_carries_the_page(stack, background, http_service):
    npt = run_npt_x(stack, "-p", str(http_service.port), "-h", HOST, "-T", "2s",
                    "--no-encrypt-rvd-traffic")
    assert npt.returncode == 0, npt.stderr
    assert "NOT encrypted" in npt.stderr
    with urllib.request.urlopen(f"http://{HOST}:{npt.port}/", timeout=10) as resp:
        assert resp.read() == http_service.body


async def _pump(port: int, nbytes: int, seed: bytes) -> tuple[str, str, int]:
    """Send ``nbytes`` (a keyed pseudo-random stream) and read the echo concurrently;
    (sha256 sent, sha256 received, bytes received)."""
    reader, writer = await asyncio.open_connection(HOST, port)
    sent, got = hashlib.sha256(), hashlib.sha256()
    block = hashlib.shake_256(seed).digest(1 << 20)

    async def send() -> None:
        left = nbytes
        i = 0
        while left:
            chunk = block[i % 7:][: min(left, 256 * 1024)]   # vary the alignment
            sent.update(chunk)
            writer.write(chunk)
            await writer.drain()
            left -= len(chunk)
            i += 1
        writer.write_eof()

    async def receive() -> int:
        n = 0
        while True:
            data = await reader.read(1 << 18)
            if not data:
                return n
            got.update(data)
            n += len(data)

    _, received = await asyncio.gather(send(), receive())
    writer.close()
    return sent.hexdigest(), got.hexdigest(), received


def test_100_mb_both_ways_sha256(stack, background, run):
    async def main():
        echo = await start_echo_server()
        try:
            npt = await arun_npt_x(stack, "-p", str(echo.port), "-h", HOST, "-T", "3s")
            assert npt.returncode == 0, npt.stderr
            t0 = time.monotonic()
            sent, got, n = await _pump(npt.port, 100 * 1000 * 1000, b"100MB")
            elapsed = time.monotonic() - t0
            assert n == 100 * 1000 * 1000
            assert got == sent
            print(f"100 MB each way through npt/srvd/npd in {elapsed:.1f} s "
                  f"({2 * 100 / elapsed:.0f} MB/s both directions)")
        finally:
            await echo.close()

    run(main(), timeout=180)


def test_50_concurrent_connections_through_one_npt(stack, background, run):
    async def main():
        echo = await start_echo_server()
        try:
            npt = await arun_npt_x(stack, "-p", str(echo.port), "-h", HOST, "-T", "3s",
                                   "--no-uvloop")
            assert npt.returncode == 0, npt.stderr
            results = await asyncio.gather(*(
                _pump(npt.port, 256 * 1024 + i * 997, f"conn-{i}".encode())
                for i in range(50)))
            for i, (sent, got, n) in enumerate(results):
                assert n == 256 * 1024 + i * 997, f"connection {i}"
                assert got == sent, f"connection {i} got another connection's bytes"
            assert echo.connections == 50
        finally:
            await echo.close()

    run(main(), timeout=120)


def test_foreground_runs_until_ctrl_c_then_closes_the_session(stack, run):
    async def main():
        echo = await start_echo_server()
        npt = LoggedProcess(stack.npt_cmd("-p", str(echo.port), "-h", HOST, "-T", "1h"),
                            stack.log_dir / "npt-ctrl-c.log", capture_stdout=True,
                            env=npt_env())
        try:
            loop = asyncio.get_running_loop()
            port = int(await loop.run_in_executor(
                None, lambda: npt.wait_stdout(r"^\d+$", NPT_TIMEOUT)))
            sid = re.search(r"session: ([0-9a-f-]{36}):", npt.wait_line(r"session: ", 1))
            sent, got, _ = await _pump(port, 1_000_000, b"ctrl-c")
            assert got == sent
            npt.signal(signal.SIGINT)
            code = await loop.run_in_executor(None, npt.wait, 10)
            return code, port, sid.group(1)
        finally:
            if npt.alive():
                npt.kill()
            await echo.close()

    code, port, sid = run(main(), timeout=90)
    assert code == 0
    assert not listening(port)
    # the daemon's end saw the session close (no leftover tunnel on the device)
    stack.npd.wait_line(rf"session {sid} for @client ended", 10)


# --- refusals, each naming its phase -----------------------------------------------------------

def test_a_non_manager_is_told_the_ping_phase_failed(stack, background, http_service):
    npt = run_npt_x(stack, "-p", str(http_service.port), "-h", HOST, "--dpt", "2",
                    client="@mallory")
    assert npt.returncode == 6, npt.stderr
    assert npt.stdout == "" and npt.pid is None
    assert "npt: error: ping phase failed" in npt.stderr
    assert "no ping response from the device daemon @daemon" in npt.stderr
    # it got as far as the relay (open relay) and no further
    assert npt.relay_ports is not None
    assert "request:" not in npt.stderr


def test_a_permit_open_refusal_is_shown_as_the_daemons_text(stack, background, http_service):
    # npd permits 127.0.0.1:* -- "localhost" is another string, so it is refused
    npt = run_npt_x(stack, "-p", str(http_service.port), "-h", "localhost")
    assert npt.returncode == 7, npt.stderr
    assert npt.stdout == ""
    assert "npt: error: request phase failed" in npt.stderr
    assert (f"refused the session: Daemon does not permit connections to "
            f"localhost:{http_service.port}") in npt.stderr


def test_a_missing_device_is_a_silent_daemon(stack, background):
    npt = run_npt_x(stack, "-p", "80", "--dpt", "1.5", device="nosuchdevice")
    assert npt.returncode == 6 and "ping phase failed" in npt.stderr


class RefusingRelay:
    """A relay stand-in as the atSign @fakerelay: answers request_ports like srvd, but its
    port A writes ``Socket auth failed`` to every socket (what srvd writes for a bad auth
    line); port B holds the daemon's socket."""

    def __init__(self, atserver: AtServerProcess) -> None:
        self.client = AtClient("@fakerelay", atserver.keys("@fakerelay"),
                               root=f"{HOST}:{atserver.root_port}",
                               ca_file=str(atserver.ca_file))
        self.b = FakeRelay()
        self.refused = 0
        self._server = None
        self._task = None

    async def __aenter__(self) -> RefusingRelay:
        async def refuse(reader, writer):
            with contextlib.suppress(OSError, ValueError):
                await reader.readline()
                writer.write(b"Socket auth failed\n")
                await writer.drain()
            self.refused += 1
            writer.close()

        self._server = await asyncio.start_server(refuse, HOST, 0)
        self.port_a = self._server.sockets[0].getsockname()[1]
        (self.port_b,) = await self.b.open(1)
        await self.client.connect()
        mon = self.client.monitor(r"\.sshrvd@")
        await mon.start()

        async def serve():
            async for n in mon:
                request = parse_request_ports(n.value)
                await self.client.notify(
                    f"{n.from_atsign}:{request.session_id}.sshrvd",
                    encode_reply_csv(HOST, self.port_a, self.port_b, "nonce-x"),
                    ttl=10_000, ttln=60_000)

        self._task = asyncio.get_running_loop().create_task(serve())
        return self

    async def __aexit__(self, *exc) -> None:
        self._task.cancel()
        await self.client.close()
        self._server.close()
        await self.b.close()


def test_a_relay_that_refuses_the_socket_is_reported(stack, run, http_service):
    async def main():
        async with RefusingRelay(stack.atserver) as relay:
            proc = await asyncio.create_subprocess_exec(
                *stack.npt_cmd("-p", str(http_service.port), "-h", HOST, relay="@fakerelay"),
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                cwd=str(REPO), env=npt_env())
            out, err = await asyncio.wait_for(proc.communicate(), NPT_TIMEOUT)
            return proc.returncode, out.decode(), err.decode(), relay.refused

    code, _out, err, refused = run(main(), timeout=90)
    assert refused >= 1
    assert code == 8, err
    assert "npt: error: tunnel phase failed" in err
    assert "relay refused the client's socket" in err


def test_a_busy_local_port_fails_the_tunnel_phase_and_ends_the_daemons_side(stack,
                                                                              http_service):
    with socket.create_server((HOST, 0)) as busy:
        port = busy.getsockname()[1]
        npt = run_npt_x(stack, "-p", str(http_service.port), "-h", HOST, "-l", str(port))
    assert npt.returncode == 8, npt.stderr
    assert "npt: error: tunnel phase failed" in npt.stderr
    assert f"cannot listen on {HOST}:{port}" in npt.stderr
    sid = re.search(r"session: ([0-9a-f-]{36}):", npt.stderr).group(1)
    # the control socket npt had opened was closed again: the daemon's end of it ends too
    stack.npd.wait_line(rf"session {sid} for @client ended", 10)


# --- S5: bad command lines ---------------------------------------------------------------------

@pytest.mark.security
@pytest.mark.parametrize("argv, message", [
    (["-f", "@client", "-t", "@daemon", "-r", "@relay", "-d", "dev", "-p", "80",
      "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    ([], "the following arguments are required: -f/--from, -t/--to, -r/--srvd, "
         "-d/--device, -p/--remote-port"),
    (["-f", "@client", "-t", "@daemon", "-r", "@relay", "-d", "dev"],
     "required: -p/--remote-port"),
    (["-f", "@client", "-t", "@daemon", "-r", "@relay", "-d", "dev", "-p", "80", "-T", "x"],
     "-T/--timeout"),
])
def test_s5_bad_command_lines_exit_nonzero_with_a_clear_message(argv, message):
    proc = subprocess.run([sys.executable, "-m", "noports.client", *argv], capture_output=True,
                          text=True, timeout=30, cwd=str(REPO), env=npt_env(),
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "npt: error:" in proc.stderr
    assert message in proc.stderr or (
        # argparse names the missing mandatory flags first
        "--no-such-flag" in argv and "arguments are required" in proc.stderr)


@pytest.mark.security
def test_s5_unreadable_keys_fail_the_keys_phase_and_open_keys_are_warned(stack, tmp_path):
    missing = run_npt_x(stack, "-p", "80", "-k", str(tmp_path / "none.atKeys"))
    assert missing.returncode == 3 and "keys phase failed" in missing.stderr
    open_keys = tmp_path / "@mallory_key.atKeys"
    open_keys.write_bytes((stack.atserver.keys_dir / "@mallory_key.atKeys").read_bytes())
    open_keys.chmod(0o644)
    npt = run_npt_x(stack, "-p", "80", "--dpt", "1", "-k", str(open_keys), client="@mallory")
    assert "readable by group or others" in npt.stderr and "chmod 600" in npt.stderr
    # a warning, not a refusal: the session still goes ahead (here: to the ping, which the
    # daemon ignores because @mallory is no manager)
    assert npt.returncode == 6


# --- S7: no local exposure, no leaked secrets --------------------------------------------------

def _secrets(keylog: Path) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in keylog.read_text().splitlines():
        label, value = line.split(" ", 1)
        found.setdefault(label, []).append(value)
    return found


def _files_since(roots: list[Path], since: float, skip: set[Path]):
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            dirnames[:] = [d for d in dirnames if d not in ("proc", "sys")]
            for name in filenames:
                path = Path(dirpath) / name
                try:
                    st = path.lstat()
                except OSError:
                    continue
                if not stat.S_ISREG(st.st_mode) or st.st_mtime < since:
                    continue
                if path in skip or st.st_size > 256 * 1024 * 1024:
                    continue
                yield path


def _contains(path: Path, needles: list[bytes]) -> list[bytes]:
    hits = []
    overlap = max(len(n) for n in needles)
    try:
        with open(path, "rb") as f:
            tail = b""
            while True:
                block = f.read(1 << 20)
                if not block:
                    break
                data = tail + block
                hits += [n for n in needles if n in data and n not in hits]
                tail = data[-overlap:]
    except OSError:
        pass
    return hits


@pytest.mark.security
def test_s7_listener_is_loopback_only_and_keys_leak_nowhere(stack, background, run, tmp_path):
    t_start = time.time() - 1
    keylog = tmp_path / "npt-keylog.txt"

    async def main():
        echo = await start_echo_server()
        npt = LoggedProcess(stack.npt_cmd("-p", str(echo.port), "-h", HOST, "-T", "30s", "-vv"),
                            stack.log_dir / "npt-s7.log", capture_stdout=True,
                            env=npt_env(NOPORTS_KEYLOGFILE=str(keylog)))
        try:
            line = await asyncio.get_running_loop().run_in_executor(
                None, lambda: npt.wait_stdout(r"^\d+$", NPT_TIMEOUT))
            port = int(line)
            # the listener is bound to 127.0.0.1 only
            mine = [c for c in psutil.Process(npt.pid).net_connections(kind="tcp")
                    if c.status == psutil.CONN_LISTEN]
            assert [(c.laddr.ip, c.laddr.port) for c in mine] == [(HOST, port)]
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.2", port), timeout=5).close()
            # three connections, so per-connection keys exist
            for i in range(3):
                sent, got, n = await _pump(port, 100_000, f"s7-{i}".encode())
                assert got == sent and n == 100_000
            pids = {"npt": npt.pid, "npd": stack.npd.pid, "srvd": stack.srvd.pid,
                    "atserver": stack.atserver.pid}
            proc_files = {}
            for name, pid in pids.items():
                for what in ("environ", "cmdline"):
                    proc_files[f"{name} {what}"] = Path(f"/proc/{pid}/{what}").read_bytes()
            npt.signal(signal.SIGTERM)
            code = await asyncio.get_running_loop().run_in_executor(None, npt.wait, 15)
            return code, proc_files
        finally:
            if npt.alive():
                npt.kill()
            await echo.close()

    code, proc_files = run(main(), timeout=120)
    assert code == 0
    secrets = _secrets(keylog)
    assert len(secrets["SESSION_KEY"]) == 1 and len(secrets["SESSION_IV"]) == 1
    assert len(secrets["CONNECTION_KEY"]) == 3 and len(secrets["CONNECTION_IV"]) == 3
    needles = [v.encode() for values in secrets.values() for v in values]
    assert all(len(n) in (24, 44) for n in needles)
    # /proc/<pid>/environ and cmdline of every process of ours
    for what, data in proc_files.items():
        assert not [n for n in needles if n in data], what
    # logs: npt at -vv, npd and srvd at -v, the atserver's
    logs = [stack.log_dir / "npt-s7.log", stack.npd.log_path, stack.srvd.log_path,
            stack.atserver.log_path]
    for log in logs:
        assert log.exists(), log
        assert _contains(log, needles) == [], log
    # files under $HOME and $TMPDIR written since the session began (the key log excepted)
    roots = [Path.home(), Path(tempfile.gettempdir())]
    scanned = 0
    for path in _files_since(roots, t_start, skip={keylog}):
        scanned += 1
        assert _contains(path, needles) == [], path
    assert scanned >= len(logs)          # the scan saw at least our own fresh logs


@pytest.mark.security
def test_s7_local_host_flag_moves_the_listener(stack, background, http_service):
    """The flip side of S7's default: --local-host is honoured, and only that address
    listens."""
    npt = run_npt_x(stack, "-p", str(http_service.port), "-h", HOST, "-T", "2s",
                    "--local-host", "127.0.0.2")
    assert npt.returncode == 0, npt.stderr
    with urllib.request.urlopen(f"http://127.0.0.2:{npt.port}/", timeout=10) as resp:
        assert resp.read() == http_service.body
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((HOST, npt.port), timeout=5).close()


# --- R4: the relay or the daemon killed mid-session --------------------------------------------

def _fds(pid: int) -> int:
    return psutil.Process(pid).num_fds()


async def _transfer_and_kill(port: int, victim_pid: int, total: int = 64 * 1024 * 1024):
    """Stream ``total`` bytes to the echo service through npt; once 8 MiB have come back,
    SIGKILL ``victim_pid``.  Returns (bytes back at the kill, seconds from the kill until the
    local application saw EOF or RST, how it ended)."""
    reader, writer = await asyncio.open_connection(HOST, port)
    block = os.urandom(256 * 1024)
    received = 0
    halfway = asyncio.Event()
    ended: list = []

    async def send() -> None:
        with contextlib.suppress(OSError):
            sent = 0
            while sent < total:
                writer.write(block)
                await writer.drain()
                sent += len(block)

    async def receive() -> None:
        nonlocal received
        try:
            while True:
                data = await reader.read(1 << 18)
                if not data:
                    ended.append(("eof", time.monotonic()))
                    return
                received += len(data)
                if received >= 8 * 1024 * 1024:
                    halfway.set()
        except OSError as exc:
            ended.append((type(exc).__name__, time.monotonic()))

    sender = asyncio.ensure_future(send())
    receiver = asyncio.ensure_future(receive())
    await asyncio.wait_for(halfway.wait(), 60)
    at_kill = received
    t_kill = time.monotonic()
    os.kill(victim_pid, signal.SIGKILL)
    await asyncio.wait_for(receiver, 10)
    sender.cancel()
    await asyncio.gather(sender, return_exceptions=True)
    writer.close()
    how, t_end = ended[0]
    return at_kill, t_end - t_kill, how, t_kill


@pytest.mark.fault
@pytest.mark.parametrize("victim, detached", [
    ("srvd", False), ("srvd", False), ("srvd", True),
    ("npd", False), ("npd", False), ("npd", True),
])
def test_r4_killing_the_relay_or_the_daemon_mid_transfer(stack, background, run, victim,
                                                         detached, record_property):
    base = stack.log_dir
    # a relay or a daemon of the test's own to kill, so the shared ones live on
    if victim == "srvd":
        relay = killed = SrvdProcess(stack.atserver, base, atsign="@relayk").ready()
        device, survivor = DEVICE, stack.npd
    else:
        device = f"victim{uuid.uuid4().hex[:6]}"
        killed = NpdProcess(stack.atserver, base, "--permit-open", f"{HOST}:*",
                                     atsign="@daemon", managers="@client",
                                     device=device).ready()
        relay, survivor = stack.srvd, stack.srvd
    who = {"relay": relay.atsign, "device": device}

    async def main():
        echo = await start_echo_server()
        fds_before = _fds(survivor.pid)
        extra = ["-p", str(echo.port), "-h", HOST, "-T", "30s"]
        npt = None
        try:
            if detached:
                out = await arun_npt_x(stack, *extra, **who)
                assert out.returncode == 0, out.stderr
                port, pid, relay_ports = out.port, out.pid, out.relay_ports
            else:
                npt = LoggedProcess(stack.npt_cmd(*extra, **who),
                                    base / f"npt-r4-{uuid.uuid4().hex[:6]}.log",
                                    capture_stdout=True, env=npt_env())
                line = await asyncio.get_running_loop().run_in_executor(
                    None, lambda: npt.wait_stdout(r"^\d+$", NPT_TIMEOUT))
                port, pid = int(line), npt.pid
                ports = re.search(r"ports (\d+)/(\d+)", npt.wait_line(r"gave \S+ ports", 1))
                relay_ports = (int(ports.group(1)), int(ports.group(2)))
            # while it runs, npt has no child process (its key helper was reaped)
            assert psutil.Process(pid).children(recursive=True) == []
            at_kill, to_end, how, t_kill = await _transfer_and_kill(port, killed.pid)
            return npt, port, pid, relay_ports, fds_before, at_kill, to_end, how, t_kill
        finally:
            await echo.close()

    try:
        npt, port, pid, relay_ports, fds_before, at_kill, to_end, how, t_kill = \
            run(main(), timeout=150)
        record_property("r4", {"victim": victim, "detached": detached, "bytes_at_kill": at_kill,
                               "app_end_s": round(to_end, 3), "app_saw": how})
        assert at_kill < 64 * 1024 * 1024           # the kill came mid-transfer
        # the local application saw EOF or RST within 2 s
        assert to_end <= 2.0, (how, to_end)
        if npt is not None:
            # within 2 s npt says which phase failed (and why), and exits with its code
            left = max(0.05, t_kill + 2.0 - time.monotonic())
            line = npt.wait_line(r"npt: error: session phase failed", left)
            assert "daemon" in line and "relay" in line
            assert npt.wait(5) == 9
        # npt (or the -x runner) is gone within 2 s of the kill, its port with it
        wait_until(lambda: gone(pid), max(0.05, t_kill + 2.0 - time.monotonic()),
                   "npt to exit within 2 s of the kill")
        assert not listening(port)
        # the dead session left no listening port on the surviving relay
        if victim == "npd":
            wait_until(lambda: not (set(relay_ports) & relay.session_ports()),
                       PAIRING_WINDOW + 5, "the relay to close the dead session's ports")
        # and the survivor is alive with its file descriptors back
        wait_until(lambda: _fds(survivor.pid) <= fds_before + 2, 10,
                   f"the survivor's file descriptors back to {fds_before}")
        assert survivor.proc.poll() is None
    finally:
        killed.stop()


# --- R5 on real processes: a relay that swallows everything ------------------------------------

@pytest.mark.fault
def test_r5_a_frozen_relay_is_noticed_by_npt_and_npd_within_heartbeat_plus_5s(stack, run):
    """srvd SIGSTOPped mid-transfer: its kernel still accepts bytes (and answers TCP
    keepalive) but nothing is forwarded or closed -- a black hole.  npt (``--heartbeat 1``)
    and npd see the heartbeat echoes stop and both end the session within 1 + 5 s: npt with a
    session-phase error naming the silence (exit 9), npd with ``peer_silent`` in its log."""
    base = stack.log_dir
    relay = SrvdProcess(stack.atserver, base, atsign="@relayk").ready()
    heartbeat, grace = 1.0, 5.0
    watching = r"daemon end: the client sends heartbeats"
    watched_before = stack.npd.count(watching)

    async def main():
        echo = await start_echo_server()
        npt = LoggedProcess(stack.npt_cmd("-p", str(echo.port), "-h", HOST, "-T", "30s",
                                          "--heartbeat", str(heartbeat), relay="@relayk"),
                            base / f"npt-r5-{uuid.uuid4().hex[:6]}.log", capture_stdout=True,
                            env=npt_env())
        loop = asyncio.get_running_loop()
        try:
            port = int(await loop.run_in_executor(
                None, lambda: npt.wait_stdout(r"^\d+$", NPT_TIMEOUT)))
            sid = re.search(r"session: ([0-9a-f-]{36}):",
                            npt.wait_line(r"session: ", 1)).group(1)
            reader, writer = await asyncio.open_connection(HOST, port)
            writer.write(os.urandom(1 << 20))
            await writer.drain()
            got = 0
            while got < 1 << 20:
                data = await asyncio.wait_for(reader.read(1 << 16), 10)
                assert data, "the echo ended early"
                got += len(data)
            # npd watches a client once it has seen two heartbeats (it learns the interval)
            await loop.run_in_executor(None, lambda: stack.npd.wait_line(
                watching, heartbeat * 3 + 5, nth=watched_before + 1))
            relay.signal(signal.SIGSTOP)
            t_stop = time.monotonic()
            line = await loop.run_in_executor(
                None, lambda: npt.wait_line(r"npt: error: session phase failed",
                                            heartbeat + grace + 2))
            npt_after = time.monotonic() - t_stop
            code = await loop.run_in_executor(None, npt.wait, 5)
            npd_line = await loop.run_in_executor(
                None, lambda: stack.npd.wait_line(rf"session {sid} for @client ended",
                                                  max(0.1, t_stop + heartbeat + grace + 2
                                                      - time.monotonic())))
            npd_after = time.monotonic() - t_stop
            writer.close()
            return line, code, npt_after, npd_line, npd_after, port
        finally:
            relay.signal(signal.SIGCONT)
            if npt.alive():
                npt.kill()
            await echo.close()

    try:
        line, code, npt_after, npd_line, npd_after, port = run(main(), timeout=90)
    finally:
        relay.stop()
    assert "silent" in line and "daemon" in line, line
    assert code == 9
    assert npt_after <= heartbeat + grace + 1.5, npt_after
    assert "peer_silent" in npd_line, npd_line
    assert npd_after <= heartbeat + grace + 1.5, npd_after
    assert not listening(port)
