"""npt operator features end to end: ``-K`` (keep-alive) and ``--list-devices``.

Real processes on 127.0.0.1: one atserver hosts @client, @daemon and @relay; srvd and npd are
the real programs; npt runs as ``python -m noports.client``.

* -K: the relay (or the daemon) is SIGKILLed mid-session and restarted; npt logs the drop with
  its reason, re-establishes within its back-off (first retry 5 s), on the same local port
  (given with -l, or the one it got first), and a new local connection carries data;
* --list-devices: a daemon that is up is listed active with its version and permit-open list;
  a device whose daemon was started (so its device_info record exists) and then stopped is
  listed inactive; --json parses; no devices is exit 0 with a table that says so; without -t
  the devices of every daemon atSign that shared its device_info with us are listed (two
  daemon atSigns here).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from noports import __version__
from tests.functional.conftest import REPO, AtServerProcess
from tests.functional.npd_helpers import LoggedProcess, NpdProcess, start_echo_server
from tests.functional.srvd_helpers import SrvdProcess

HOST = "127.0.0.1"
ATSIGNS = ["@client", "@daemon", "@relay", "@relayka", "@daemon2"]
DEVICE = "dev"
NPT_TIMEOUT = 60.0
#: first retry 5 s, then the session's set-up: a generous bound for "within the back-off"
REESTABLISH_BOUND = 30.0

pytestmark = pytest.mark.timeout(180)


class Stack:
    def __init__(self, atserver: AtServerProcess, npd: NpdProcess, base: Path) -> None:
        self.atserver = atserver
        self.npd = npd
        self.base = base

    def npt_cmd(self, *args: str, daemon: str | None = "@daemon") -> list[str]:
        cmd = [sys.executable, "-m", "noports.client", "-f", "@client",
               "-k", str(self.atserver.keys_dir / "@client_key.atKeys"),
               "--root-domain", f"{HOST}:{self.atserver.root_port}",
               "--ca-file", str(self.atserver.ca_file)]
        if daemon is not None:
            cmd += ["-t", daemon]
        return cmd + list(args)


def npt_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("NOPORTS_CA_FILE", None)
    env.pop("NOPORTS_KEYLOGFILE", None)
    return env


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    base = tmp_path_factory.mktemp("npt-ka")
    atserver = AtServerProcess(base, ATSIGNS, keys=True).start()
    npd = None
    try:
        npd = NpdProcess(atserver, base, "--permit-open", f"{HOST}:*", atsign="@daemon",
                         managers="@client", device=DEVICE).ready()
        yield Stack(atserver, npd, base)
    finally:
        if npd is not None:
            npd.stop()
        atserver.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


async def echo_roundtrip(port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), 10)
    try:
        writer.write(payload)
        await writer.drain()
        got = await asyncio.wait_for(reader.readexactly(len(payload)), 20)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return got


# --- -K ----------------------------------------------------------------------------------------

@pytest.mark.fault
@pytest.mark.parametrize("victim, fixed_port", [("srvd", True), ("npd", False)])
def test_keep_alive_reestablishes_after_the_relay_or_daemon_is_killed(stack, run, victim,
                                                                      fixed_port):
    base = stack.base
    relay_atsign = "@relayka"
    srvd = SrvdProcess(stack.atserver, base, atsign=relay_atsign).ready()
    npd = stack.npd
    device = DEVICE
    if victim == "npd":
        device = f"ka{uuid.uuid4().hex[:6]}"
        npd = NpdProcess(stack.atserver, base, "--permit-open", f"{HOST}:*", atsign="@daemon",
                         managers="@client", device=device).ready()
    wanted = free_port() if fixed_port else None
    npt = None

    async def main():
        nonlocal npt, srvd, npd
        echo = await start_echo_server()
        args = ["-r", relay_atsign, "-d", device, "-p", str(echo.port), "-h", HOST, "-K",
                "--dpt", "5"]
        if wanted is not None:
            args += ["-l", str(wanted)]
        npt = LoggedProcess(stack.npt_cmd(*args), base / f"npt-ka-{victim}.log",
                            capture_stdout=True, env=npt_env())
        try:
            loop = asyncio.get_running_loop()
            port = int(await loop.run_in_executor(
                None, lambda: npt.wait_stdout(r"^\d+$", NPT_TIMEOUT)))
            if wanted is not None:
                assert port == wanted
            assert await echo_roundtrip(port, b"before" * 1000) == b"before" * 1000
            # -K without -T asked the daemon for a 24 h idle timeout
            await loop.run_in_executor(None, lambda: npd.wait_line(r"idle timeout 86400 s", 5))

            killed = srvd if victim == "srvd" else npd
            killed.signal(signal.SIGKILL)
            await loop.run_in_executor(None, killed.wait, 10)
            drop = await npt.await_line(r"keep-alive: .*re-establishing in 5 s \(attempt 2\)",
                                        15)
            assert "session phase failed" in drop or "ended" in drop
            if victim == "srvd":
                srvd.stop()
                srvd = SrvdProcess(stack.atserver, base, atsign=relay_atsign)
                await loop.run_in_executor(None, srvd.ready)
            else:
                npd.stop()
                npd = npd.restart()
                await npd.aready()
            up = await npt.await_line(r"ready: tunnel up \(attempt (?:[2-9]|\d\d+)\)",
                                      REESTABLISH_BOUND)
            assert f"{HOST}:{port}" in up           # the same local port
            payload = os.urandom(200_000)
            assert await echo_roundtrip(port, payload) == payload
            # the port is printed once: it did not change
            assert npt.stdout_lines() == [str(port)]
            npt.signal(signal.SIGINT)
            return await loop.run_in_executor(None, npt.wait, 15)
        finally:
            if npt is not None and npt.alive():
                npt.kill()
            await echo.close()

    try:
        code = run(main(), timeout=150)
        assert code == 0
    finally:
        srvd.stop()
        if npd is not stack.npd:
            npd.stop()


def test_keep_alive_with_x_is_refused():
    proc = subprocess.run([sys.executable, "-m", "noports.client", "-f", "@c", "-t", "@d",
                           "-r", "@r", "-d", "dev", "-p", "80", "-K", "-x"],
                          capture_output=True, text=True, timeout=30, cwd=str(REPO),
                          env=npt_env())
    assert proc.returncode == 2
    assert "-K/--keep-alive and -x/--exit-when-connected cannot be used together" in proc.stderr


# --- --list-devices -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stopped_device(stack):
    """A device whose daemon shared its device_info and then stopped."""
    name = f"gone{uuid.uuid4().hex[:6]}"
    npd = NpdProcess(stack.atserver, stack.base, "--permit-open", "localhost:22",
                     atsign="@daemon", managers="@client", device=name).ready()
    assert npd.stop() == 0
    return name


def run_list(stack, *args: str, daemon: str | None = "@daemon") -> subprocess.CompletedProcess:
    return subprocess.run(stack.npt_cmd("--list-devices", "--list-timeout", "3", *args,
                                        daemon=daemon),
                          capture_output=True, text=True, timeout=NPT_TIMEOUT, cwd=str(REPO),
                          env=npt_env(), stdin=subprocess.DEVNULL)


def test_list_devices_table_shows_active_and_inactive(stack, stopped_device):
    proc = run_list(stack)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert re.split(r"\s{2,}", lines[0]) == ["DEVICE", "ATSIGN", "STATUS", "VERSION",
                                             "PERMIT-OPEN"]
    rows = {cols[0]: cols for cols in (re.split(r"\s{2,}", line) for line in lines[1:] if line)
            if len(cols) == 5}
    assert rows[DEVICE] == [DEVICE, "@daemon", "active", __version__, f"{HOST}:*"]
    assert rows[stopped_device][:3] == [stopped_device, "@daemon", "inactive"]
    assert rows[stopped_device][4] == "localhost:22"
    # the columns are aligned: every row's STATUS starts where the header's does
    col = lines[0].index("STATUS")
    for line in lines[1:1 + len(rows)]:
        assert line[col:].split()[0] in ("active", "inactive")
    assert re.search(rf"\d+ of {len(rows)} device\(s\) active", proc.stdout)


def test_list_devices_json(stack, stopped_device):
    proc = run_list(stack, "--json", "-q")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    by_name = {d["device"]: d for d in doc["devices"]}
    assert by_name[DEVICE]["status"] == "active"
    assert by_name[DEVICE]["version"] == __version__
    assert by_name[DEVICE]["permitOpen"] == [f"{HOST}:*"]
    assert by_name[DEVICE]["atsign"] == "@daemon"
    assert by_name[stopped_device]["status"] == "inactive"
    assert by_name[stopped_device]["permitOpen"] == ["localhost:22"]


@pytest.fixture(scope="module")
def second_daemon(stack):
    """A device under another daemon atSign, up for the tests that use it."""
    name = f"two{uuid.uuid4().hex[:6]}"
    npd = NpdProcess(stack.atserver, stack.base, "--permit-open", "localhost:8080",
                     atsign="@daemon2", managers="@client", device=name).ready()
    try:
        yield name
    finally:
        npd.stop()


def test_list_devices_without_t_lists_every_daemon_atsign(stack, stopped_device,
                                                          second_daemon):
    proc = run_list(stack, "--json", daemon=None)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    by_key = {(d["device"], d["atsign"]): d for d in doc["devices"]}
    assert by_key[(DEVICE, "@daemon")]["status"] == "active"
    assert by_key[(DEVICE, "@daemon")]["permitOpen"] == [f"{HOST}:*"]
    assert by_key[(stopped_device, "@daemon")]["status"] == "inactive"
    assert by_key[(second_daemon, "@daemon2")]["status"] == "active"
    assert by_key[(second_daemon, "@daemon2")]["permitOpen"] == ["localhost:8080"]
    assert by_key[(second_daemon, "@daemon2")]["version"] == __version__
    # nothing that is not a daemon's device_info shows up (our own atSign, the relays)
    assert {atsign for _, atsign in by_key} <= {"@daemon", "@daemon2"}
    # the table form lists the same rows, with no "try -t" hint
    table = run_list(stack, daemon=None)
    assert table.returncode == 0, table.stderr
    assert "try -t" not in table.stdout
    for device, atsign in ((DEVICE, "@daemon"), (second_daemon, "@daemon2")):
        assert re.search(rf"^{device}\s+{atsign}\s+active\s", table.stdout, re.M), table.stdout
    assert re.search(rf"^{stopped_device}\s+@daemon\s+inactive\s", table.stdout, re.M)


def test_list_devices_without_t_and_nothing_shared_says_so(stack):
    """An atSign no daemon manages: an empty listing, exit 0, no error."""
    cmd = [a if a != "@client" else "@relayka" for a in stack.npt_cmd(daemon=None)]
    cmd[cmd.index("-k") + 1] = str(stack.atserver.keys_dir / "@relayka_key.atKeys")
    proc = subprocess.run([*cmd, "--list-devices", "--list-timeout", "1"], capture_output=True,
                          text=True, timeout=NPT_TIMEOUT, cwd=str(REPO), env=npt_env(),
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("no devices found (no daemon atSign has shared"), proc.stdout


def test_list_devices_with_none_shared_is_exit_0_and_says_so(stack):
    proc = run_list(stack, daemon="@relay")
    assert proc.returncode == 0, proc.stderr
    assert "no devices found shared by @relay" in proc.stdout


def test_list_devices_bad_keys_fail_the_keys_phase(stack, tmp_path):
    proc = run_list(stack, "-k", str(tmp_path / "missing.atKeys"))
    assert proc.returncode == 3
    assert "keys phase failed" in proc.stderr
