"""``noports demo`` (``python -m noports.demo``), run as a user runs it: every program a real
process on 127.0.0.1.

Shown here: every phase passes and prints its line (page checked, sha256 compared both ways,
throughput measured), exit 0, state directory removed; Ctrl-C (SIGINT) at an early phase, while
npt -x sets up, and mid-transfer stops every process the demo started (its children, and npt's
detached runner), removes the state directory and exits 130; ``--keep`` prints commands that
are exactly the running programs' and an npt command that works against the running stack; and
the demo's own checks fail on a corrupted page or body (a corrupting proxy stands in for the
tunnel).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from tests.functional.conftest import REPO

PHASES = ["atserver", "web", "srvd", "npd", "npt", "page", "download", "upload", "stop"]
PHASE_LINE = re.compile(r"^\s+(\d+\.\d\d) s  (\w+)\s+(.*)$")

pytestmark = pytest.mark.timeout(300)


def demo_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def phase_lines(stdout: str) -> dict[str, str]:
    out = {}
    for line in stdout.splitlines():
        m = PHASE_LINE.match(line)
        if m and m.group(2) in PHASES:
            out[m.group(2)] = m.group(3)
    return out


def state_dir_of(stdout: str) -> Path:
    m = re.search(r"^state directory (\S+) ", stdout, re.M)
    assert m, stdout
    return Path(m.group(1))


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def processes_mentioning(text: str) -> list[psutil.Process]:
    """Live processes whose command line mentions ``text`` (every program of one demo run has
    its state directory in its flags, and npt's forked runner keeps npt's command line)."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        with contextlib.suppress(psutil.Error):
            if p.info["status"] != psutil.STATUS_ZOMBIE and \
                    any(text in arg for arg in p.info["cmdline"] or []):
                found.append(p)
    return found


class DemoProcess:
    """``python -m noports.demo`` with its stdout read line by line in a thread."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "noports.demo", *args], cwd=str(REPO), env=demo_env(),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True)
        self.lines: list[str] = []
        self.cond = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self.cond:
                self.lines.append(line.rstrip("\n"))
                self.cond.notify_all()
        with self.cond:
            self.cond.notify_all()

    def wait_line(self, regex: str, timeout: float = 120.0) -> re.Match:
        pattern = re.compile(regex)
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for line in self.lines:
                    m = pattern.search(line)
                    if m:
                        return m
                left = deadline - time.monotonic()
                if left <= 0 or not self.reader.is_alive():
                    raise AssertionError(f"no line matching {regex!r} (rc={self.proc.poll()}):"
                                         "\n" + self.text())
                self.cond.wait(min(left, 0.5))

    def text(self) -> str:
        with self.cond:
            return "\n".join(self.lines)

    def descendants(self) -> list[psutil.Process]:
        return psutil.Process(self.proc.pid).children(recursive=True)

    def finish(self, timeout: float = 90.0) -> int:
        code = self.proc.wait(timeout)
        self.reader.join(10)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def demos():
    started: list[DemoProcess] = []
    yield lambda *args: started.append(DemoProcess(*args)) or started[-1]
    for d in started:
        d.kill()
        with contextlib.suppress(Exception):
            state = state_dir_of(d.text())
            for p in processes_mentioning(str(state)):
                p.kill()


def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


# --- the whole run -------------------------------------------------------------------------------

def test_demo_runs_every_phase_checks_the_page_and_the_sha256_and_exits_0():
    proc = subprocess.run([sys.executable, "-m", "noports.demo", "--size", "32"],
                          cwd=str(REPO), env=demo_env(), capture_output=True, text=True,
                          timeout=240, stdin=subprocess.DEVNULL)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    phases = phase_lines(out)
    assert list(phases) == PHASES, out                        # each phase once, in order
    assert re.search(r"root 127\.0\.0\.1:\d+ and atServer up; @client, @daemon, @relay hosted "
                     r"and activated", phases["atserver"]), out
    tunnel = re.search(r"tunnel 127\.0\.0\.1:(\d+) -> @relay -> @daemon -> 127\.0\.0\.1:(\d+)",
                       phases["npt"])
    web_port = re.search(r"web service on 127\.0\.0\.1:(\d+)", phases["web"]).group(1)
    assert tunnel and tunnel.group(2) == web_port, out
    assert "permit-open 127.0.0.1:" + web_port in phases["npd"], out
    assert re.search(r"GET / -> 200 OK, \d+ bytes: the web service's page", phases["page"]), out
    for name, verb in (("download", "GET"), ("upload", "PUT")):
        m = re.search(rf"{verb} 32 MiB: +(\d+\.\d) MiB/s, sha256 [0-9a-f]{{16}}… same at both "
                      rf"ends", phases[name])
        assert m and float(m.group(1)) > 0, out
    assert "npt runner, npd, srvd, atserver, web service stopped; state directory removed" \
        in phases["stop"], out
    assert out.splitlines()[-1].startswith("OK: page + 2 x 32 MiB through an end-to-end "
                                           "encrypted NoPorts tunnel"), out
    state = state_dir_of(out)
    assert not state.exists()
    assert processes_mentioning(str(state)) == []


# --- Ctrl-C ---------------------------------------------------------------------------------------

def _npt_started(demo: DemoProcess):
    return next((p for p in demo.descendants()
                 if any("noports.client" in a for a in p.cmdline())), None)


def _web_has_a_transfer(demo: DemoProcess, web_port: int) -> bool:
    for p in demo.descendants():
        with contextlib.suppress(psutil.Error):
            if any("noports.demo.webservice" in a for a in p.cmdline()):
                return any(c.status == psutil.CONN_ESTABLISHED and c.laddr.port == web_port
                           for c in p.net_connections(kind="tcp"))
    return False


@pytest.mark.parametrize("when, sig", [("atserver", signal.SIGINT), ("npt", signal.SIGINT),
                                       ("transfer", signal.SIGINT), ("npd", signal.SIGTERM)])
def test_ctrl_c_or_sigterm_stops_everything_and_removes_the_state(demos, when, sig):
    """SIGINT: exit 130; SIGTERM: exit 143."""
    demo = demos("--size", "100000")       # the transfer cannot finish before the SIGINT
    state = Path(demo.wait_line(r"^state directory (\S+) ").group(1))
    if when in ("atserver", "npd"):
        demo.wait_line(rf"^\s+\d+\.\d\d s  {when} ")
    elif when == "npt":
        # npt -x is running (its background runner may or may not exist yet)
        wait_until(lambda: _npt_started(demo), 120, "npt -x to start")
    else:
        web_port = int(demo.wait_line(r"web service on 127\.0\.0\.1:(\d+)").group(1))
        demo.wait_line(r"^\s+\d+\.\d\d s  page ")
        wait_until(lambda: _web_has_a_transfer(demo, web_port), 30,
                   "the download to be under way")
    seen = {p.pid for p in demo.descendants()}
    seen |= {p.pid for p in processes_mentioning(str(state))}
    runner = re.search(r"runner pid (\d+)", demo.text())
    if runner:
        seen.add(int(runner.group(1)))
    assert seen, "nothing was running"
    demo.proc.send_signal(sig)
    code = demo.finish(90)
    out = demo.text()
    assert code == 128 + sig, out
    assert f"interrupted ({signal.Signals(sig).name}); stopping" in out, out
    assert re.search(r"^\s+\d+\.\d\d s  stop .*state directory removed$", out, re.M), out
    assert not state.exists(), out
    assert [pid for pid in seen if not gone(pid)] == [], out
    assert processes_mentioning(str(state)) == [], out
    if when == "transfer":
        assert "download" not in phase_lines(out), out


# --- --keep ---------------------------------------------------------------------------------------

def test_keep_prints_the_running_commands_and_an_npt_command_that_works(demos):
    demo = demos("--keep", "--size", "1")
    demo.wait_line(r"^Ctrl-C stops everything and removes the state directory\.$", 180)
    out = demo.text()
    state = state_dir_of(out)
    assert demo.proc.poll() is None
    # each "# ... (pid N)" comment is followed by the command that started process N
    lines = out.splitlines()
    shown = 0
    for i, line in enumerate(lines):
        m = re.match(r"^  # .* \(pid (\d+)\)$", line)
        if not m:
            continue
        typed = shlex.split(lines[i + 1])
        while typed and "=" in typed[0]:        # leading VAR=value assignments
            typed.pop(0)
        # "python -m noports.x ARGS" (not installed) or "npd ARGS" (console script); note
        # that "-m" can also be an argument (npd's manager flag)
        args = typed[3:] if len(typed) > 2 and typed[1] == "-m" else typed[1:]
        running = psutil.Process(int(m.group(1))).cmdline()
        module = running[running.index("-m") + 1]
        if module == "noports.atserver":
            # the demo asked for --root-port 0; the typed form names the port it got
            i_port = running.index("--root-port")
            assert running[i_port + 1] == "0"
            assert args[i_port - 3] == "--root-port" and args[i_port - 2].isdigit()
            running[i_port + 1] = args[i_port - 2]
        elif module == "noports.demo.webservice":
            running[running.index("--port") + 1] = args[args.index("--port") + 1]
        assert running[3:] == args, (running, typed)
        shown += 1
    assert shown == 4, out

    m = re.search(r"^  port=\$\((.*)\) && curl -s \"http://127\.0\.0\.1:\$port/\"$", out, re.M)
    assert m, out
    npt = subprocess.run(["bash", "-c", m.group(1)], capture_output=True, text=True,
                         timeout=90, cwd="/", stdin=subprocess.DEVNULL)
    runner = re.search(r"in the background as pid (\d+)", npt.stderr)
    try:
        assert npt.returncode == 0, npt.stderr
        port = int(npt.stdout.splitlines()[-1])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=20) as resp:
            body = resp.read().decode()
        assert "Hello through NoPorts" in body
        token = re.search(r"token ([0-9a-f]{24})", body).group(1)
        assert f"this run's token {token[:8]}…" in out
    finally:
        if runner:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(runner.group(1)), signal.SIGTERM)

    demo.proc.send_signal(signal.SIGINT)
    assert demo.finish(90) == 0, demo.text()
    assert demo.text().splitlines()[-1].startswith("OK: stopped after")
    assert not state.exists()
    wait_until(lambda: processes_mentioning(str(state)) == [], 15,
               "every process of the run to end")


# --- the demo's own checks can fail ---------------------------------------------------------------

async def _corrupting_proxy(target_port: int, offset: int):
    """A stand-in for the tunnel that flips one byte, at ``offset`` of what the service sends."""

    async def handle(reader, writer):
        up_r, up_w = await asyncio.open_connection("127.0.0.1", target_port)

        async def pipe(src, dst, flip):
            seen = 0
            try:
                while data := await src.read(65536):
                    if flip and seen <= offset < seen + len(data):
                        data = bytearray(data)
                        data[offset - seen] ^= 0x01
                    seen += len(data)
                    dst.write(bytes(data))
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                with contextlib.suppress(OSError, RuntimeError):
                    dst.write_eof()

        await asyncio.gather(pipe(reader, up_w, False), pipe(up_r, writer, True))
        writer.close()
        up_w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


@pytest.mark.parametrize("offset", [350, 5_000_000])
def test_the_demo_detects_a_corrupted_page_or_body(tmp_path, offset):
    """One flipped byte in the page (offset 350: past the ~170-byte response head, inside the
    305-byte page) or in an 8 MiB body fails the phase, named."""
    from noports.demo.stack import Demo, DemoOptions, PhaseFailed, Phases

    async def main():
        demo = Demo(DemoOptions(size_mib=8), tmp_path, Phases(out=io.StringIO()))
        try:
            await demo._web()
            server, demo.tunnel_port = await _corrupting_proxy(demo.web_port, offset)
            async with server:
                name, step = ("page", demo._page) if offset < 1000 else \
                    ("download", demo._download)
                with pytest.raises(PhaseFailed) as info, demo.phases.run(name) as ph:
                    ph.text = await step()
                return info.value, await demo.stop()
        except BaseException:
            await demo.stop()
            raise

    failure, problems = asyncio.run(main())
    assert problems == []
    if offset < 1000:
        assert failure.phase == "page"
        assert "not the web service's page" in failure.message
    else:
        assert failure.phase == "download"
        assert "sha256 differs" in failure.message
