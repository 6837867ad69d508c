"""The whole product end to end: real ``npt``, ``srvd``, ``npd`` and atServer processes (issue 6).

One atServer hosts the client, two relays and two daemons: one srvd + npd pair runs the compiled
pumps, the other the pure twins (``NOPORTS_NO_EXTENSIONS=1`` in the environment of srvd, npd and
npt), so both implementations are measured in the same run, interleaved (bench/harness.py).

(a) **Throughput** of one iperf3 stream (``-t`` seconds per sample) into one iperf3 sink through:
    - the encrypted tunnel: iperf3 -c -> npt's local port -> srvd -> npd -> iperf3 -s
      (AES-256-CTR at both ends), once per pump implementation;
    - a chain of three ``socat -b 131072`` hops, no encryption: the same three hops as the
      tunnel (client side, relay, daemon side);
    - direct: iperf3 -c straight to the sink.
    Gated: encrypted tunnel with the compiled pumps >= 0.9x the socat chain (the target of
    issue 6; harness tolerance applies).  Recorded: the pure twin's ratio, both ratios to direct,
    and CPU seconds per GB moved by the three tunnel processes (npt's background runner, srvd,
    npd) against the three socats (their forked per-connection children included).
(b) **Set-up**: wall time from starting ``npt -x`` to reading the port it prints, p50 and p90,
    per implementation.  Target <= 600 ms on this machine.  There is no baseline that npt
    could be held to as a ratio, so nothing is gated; recorded against two floors measured in
    the same rounds: the interpreter's start-up (``python -c pass``) and a process that does
    only what npt must do before any NoPorts message (start, import the atProtocol client, load
    the .atKeys, find the atServer through the root, TLS, PKAM login, close).  Also recorded:
    when npt's stdout closes (its parent has exited), which is what ``$(npt -x ...)`` waits
    for.  Each sample's tunnel is stopped (SIGTERM to the runner) before the next sample.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest

from bench import harness, plumbing

REPO = Path(__file__).resolve().parents[1]
SUITE = "e2e"
HOST = "127.0.0.1"
SECONDS = 2 if harness.quick() else 3          # iperf3 -t per sample (1 s ones were too noisy)
SETUP_RUNS = 10 if harness.quick() else 20     # npt -x start-ups per implementation
SETUP_TARGET_S = 0.600
IMPLS = ("compiled", "pure")
CLIENT = "@benchclient"
DEVICE = "bench"
ATSIGNS = [CLIENT, "@benchrelayc", "@benchrelayp", "@benchdaemonc", "@benchdaemonp"]
NPT_TIMEOUT = 60.0

pytestmark = [
    pytest.mark.skipif(shutil.which("socat") is None or shutil.which("iperf3") is None,
                       reason="needs socat and iperf3"),
    pytest.mark.timeout(300),
]

# The login-only floor of (b): everything npt pays before its first NoPorts notification.
_LOGIN_ONLY = """
import asyncio, sys
from noports.at.atkeys import AtKeys
from noports.at.client import AtClient
try:
    import uvloop
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
except ImportError:
    pass
async def main():
    client = AtClient(sys.argv[1], AtKeys.load(sys.argv[2], sys.argv[1]), root=sys.argv[3],
                      ca_file=sys.argv[4])
    await client.connect()
    await client.close()
asyncio.run(main())
print("ok", flush=True)
"""


# --- helpers ---------------------------------------------------------------------------------

def _env(impl: str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("NOPORTS_CA_FILE", None)
    env.pop("NOPORTS_NO_EXTENSIONS", None)
    if impl == "pure":
        env["NOPORTS_NO_EXTENSIONS"] = "1"
    return env


def _cpu(proc: psutil.Process, reaped_children: bool = False) -> float:
    """User + system seconds of ``proc`` and its live descendants (plus, for a forking
    server, the children it has already reaped)."""
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            t = p.cpu_times()
            total += t.user + t.system
            if reaped_children and p is proc:
                total += t.children_user + t.children_system
    return total


def _exited(pid: int, timeout: float) -> bool:
    """Wait until ``pid`` has exited: True, or False after ``timeout``.

    npt's runner is not our child (its parent exited; it was re-parented to pid 1), so we
    cannot waitpid() it; and a zombie counts as exited, because here pid 1 reaps orphans
    only every second or so, which must not be charged to the next sample."""
    try:
        fd = os.pidfd_open(pid)           # readable once the process has terminated
    except ProcessLookupError:
        return True
    except (AttributeError, OSError):     # no pidfd (old kernel, not Linux): poll the state
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                    return True
            except psutil.NoSuchProcess:
                return True
            time.sleep(0.005)
        return False
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


def _stop_pid(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM one process this suite started (directly or as npt's runner), SIGKILL if it
    lingers; returns once it has exited."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    if not _exited(pid, timeout):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        _exited(pid, timeout)


def _iperf(port: int) -> tuple[float, int]:
    """One iperf3 sample through ``port``: (bytes per second, bytes) the sink received."""
    deadline = time.monotonic() + 30
    while True:
        out = subprocess.run(["iperf3", "-c", HOST, "-p", str(port), "-t", str(SECONDS), "-J"],
                             capture_output=True, text=True, timeout=SECONDS + 60)
        try:
            report = json.loads(out.stdout)
        except ValueError:
            raise RuntimeError(f"iperf3 via {port}: rc {out.returncode}, {out.stderr!r}") from None
        error = report.get("error")
        if error is None:
            received = report["end"]["sum_received"]
            return received["bits_per_second"] / 8, received["bytes"]
        # the single sink serves one test at a time; the previous one may still be closing
        if "busy" not in error or time.monotonic() > deadline:
            raise RuntimeError(f"iperf3 via port {port}: {error}")
        time.sleep(0.05)


# --- the stack -------------------------------------------------------------------------------

class Stack:
    """atServer, iperf3 sink, and per implementation one srvd and one npd."""

    def __init__(self, base: Path) -> None:
        from tests.functional.conftest import AtServerProcess
        from tests.functional.npd_helpers import LoggedProcess, npd_command

        self.base = base
        self.procs: list = []           # LoggedProcess / Popen, stopped in reverse order
        self.sink: subprocess.Popen | None = None
        self.atserver = AtServerProcess(base, ATSIGNS, keys=True).start()
        try:
            self.sink_port = plumbing.free_port()
            self.sink = subprocess.Popen(["iperf3", "-s", "-p", str(self.sink_port)],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                         stdin=subprocess.DEVNULL)
            plumbing.wait_connectable(self.sink_port)
            self.srvd: dict[str, LoggedProcess] = {}
            self.npd: dict[str, LoggedProcess] = {}
            for impl in IMPLS:
                relay, daemon = self.relay(impl), self.daemon(impl)
                self.srvd[impl] = LoggedProcess(
                    [sys.executable, "-m", "noports.relay", "-a", relay, "-i", HOST,
                     "--bind", HOST, "-k", str(self.keys_file(relay)), "--root-domain",
                     self.root, "--ca-file", str(self.atserver.ca_file)],
                    base / f"srvd-{impl}.log", env=_env(impl))
                self.procs.append(self.srvd[impl])
                # permit exactly the sink, spelled as npt's -h will spell it
                self.npd[impl] = LoggedProcess(
                    npd_command(self.atserver, "--permit-open", f"{HOST}:{self.sink_port}",
                                atsign=daemon, managers=CLIENT, device=DEVICE,
                                storage_path=base / f"npd-storage-{impl}", metrics=False),
                    base / f"npd-{impl}.log", env=_env(impl))
                self.procs.append(self.npd[impl])
            for impl in IMPLS:
                self._check_data_plane(impl)
                self.srvd[impl].wait_line(rf"srvd {self.relay(impl)} ready", 30)
                self.npd[impl].wait_line(rf"npd {self.daemon(impl)} ready", 30)
                self._check_impl(self.srvd[impl].pid, impl, "srvd")
                self._check_impl(self.npd[impl].pid, impl, "npd")
        except BaseException:
            self.close()
            raise

    @staticmethod
    def relay(impl: str) -> str:
        return f"@benchrelay{impl[0]}"

    @staticmethod
    def daemon(impl: str) -> str:
        return f"@benchdaemon{impl[0]}"

    @property
    def root(self) -> str:
        return f"{HOST}:{self.atserver.root_port}"

    def keys_file(self, atsign: str) -> Path:
        return self.atserver.keys_dir / f"{atsign}_key.atKeys"

    @staticmethod
    def _check_data_plane(impl: str) -> None:
        """The programs, run with this environment, report the pumps we mean to measure."""
        for program, pump in (("noports.relay", "relaypump"), ("noports.client", "tunnelpump"),
                              ("noports.daemon", "tunnelpump")):
            out = subprocess.run([sys.executable, "-m", program, "--version"], env=_env(impl),
                                 cwd=str(REPO), capture_output=True, text=True, timeout=60)
            assert f"{pump}={impl}" in out.stdout, (program, impl, out.stdout, out.stderr)

    @staticmethod
    def _check_impl(pid: int, impl: str, what: str) -> None:
        env = psutil.Process(pid).environ()
        pure = env.get("NOPORTS_NO_EXTENSIONS") == "1"
        assert pure == (impl == "pure"), f"{what} for {impl} runs with pure={pure}"

    def npt_cmd(self, impl: str, *args: str) -> list[str]:
        return [sys.executable, "-m", "noports.client", "-f", CLIENT, "-t", self.daemon(impl),
                "-r", self.relay(impl), "-d", DEVICE, "-k", str(self.keys_file(CLIENT)),
                "--root-domain", self.root, "--ca-file", str(self.atserver.ca_file),
                "-h", HOST, "-p", str(self.sink_port), "-x", *args]

    def npt_x(self, impl: str, idle: str) -> tuple[float, float, int, int]:
        """Start ``npt -x``: (seconds until its port line was read, seconds until its stdout
        closed, port, runner pid)."""
        with tempfile.TemporaryFile() as err:
            t0 = time.perf_counter()
            proc = subprocess.Popen(self.npt_cmd(impl, "-T", idle), stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=err, cwd=str(REPO),
                                    env=_env(impl))
            # a bound on a hung npt: kill it, which ends the reads below
            watchdog = threading.Timer(NPT_TIMEOUT, proc.kill)
            watchdog.start()
            try:
                lines: list[bytes] = []
                t_line = 0.0
                for line in proc.stdout:          # the port is the last line
                    t_line = time.perf_counter() - t0
                    lines.append(line)
                t_eof = time.perf_counter() - t0  # the parent has exited ($(npt -x) returns)
                proc.wait(NPT_TIMEOUT)
            finally:
                watchdog.cancel()
                proc.stdout.close()
            err.seek(0)
            text_err = err.read().decode(errors="replace")
        last = lines[-1].decode().strip() if lines else ""
        assert proc.returncode == 0 and last.isdigit(), (
            f"npt -x ({impl}) failed: rc {proc.returncode}, stdout {lines!r}\n{text_err}")
        m = re.search(r"in the background as pid (\d+)", text_err)
        assert m, text_err
        pid = int(m.group(1))
        try:
            self._check_impl(pid, impl, "npt runner")
        except BaseException:
            _stop_pid(pid)
            raise
        return t_line, t_eof, int(last), pid

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        if self.sink is not None:
            _stop_pid(self.sink.pid)
            self.sink.wait(10)
        self.atserver.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    harness.require_compiled("pumps", "noports._speedups.relaypump",
                             "noports._speedups.tunnelpump")
    s = Stack(tmp_path_factory.mktemp("bench-e2e"))
    yield s
    s.close()


# --- (a) throughput ------------------------------------------------------------------------

def test_e2e_throughput_vs_socat_chain(benchmark, stack):
    socats: list[subprocess.Popen] = []
    runners: dict[str, int] = {}
    cpu: dict[str, list[list[float]]] = {}   # case -> samples -> per process
    load0 = os.getloadavg()     # other work on the machine blurs absolute figures: say so
    try:
        hop_ports = [plumbing.free_port() for _ in range(3)]
        for listen, target in zip(hop_ports, [*hop_ports[1:], stack.sink_port], strict=True):
            socats.append(subprocess.Popen(
                ["socat", "-b", "131072", f"TCP-LISTEN:{listen},bind={HOST},reuseaddr,fork",
                 f"TCP:{HOST}:{target}"], stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for port in hop_ports:
            plumbing.wait_connectable(port)
        socat_ps = [psutil.Process(p.pid) for p in socats]

        tunnel_ports: dict[str, int] = {}
        tunnel_ps: dict[str, list[psutil.Process]] = {}
        for impl in IMPLS:
            # -T long enough to outlive the interleaved rounds; stopped in `finally`
            _, _, port, pid = stack.npt_x(impl, "10m")
            runners[impl] = pid
            tunnel_ports[impl] = port
            tunnel_ps[impl] = [psutil.Process(pid), psutil.Process(stack.srvd[impl].pid),
                               psutil.Process(stack.npd[impl].pid)]

        def socat_cpu() -> list[float]:
            # each connection is a forked child; count it once the parent has reaped it
            deadline = time.monotonic() + 10
            while any(p.children() for p in socat_ps) and time.monotonic() < deadline:
                time.sleep(0.005)
            return [_cpu(p, reaped_children=True) for p in socat_ps]

        def case(name: str, port: int, cpu_of=None):
            def run() -> float:
                before = cpu_of() if cpu_of else []
                rate, nbytes = _iperf(port)
                if cpu_of:
                    per_gb = [(b - a) / (nbytes / 1e9) for a, b in zip(before, cpu_of(),
                                                                       strict=True)]
                    cpu.setdefault(name, []).append(per_gb)
                return rate / 1e6
            return run

        cases = {f"tunnel {impl}": case(f"tunnel {impl}", tunnel_ports[impl],
                                        lambda ps=tunnel_ps[impl]: [_cpu(p) for p in ps])
                 for impl in IMPLS}
        cases["socat chain"] = case("socat chain", hop_ports[0], socat_cpu)
        cases["direct"] = case("direct", stack.sink_port)
        for run in cases.values():   # warm every path once (page-in, TCP autotuning, clocks)
            run()
        cpu.clear()
        samples = benchmark.pedantic(lambda: harness.interleaved(cases), rounds=1, iterations=1)
    finally:
        for pid in runners.values():
            _stop_pid(pid)
        for proc in socats:
            _stop_pid(proc.pid)
            proc.wait(10)

    mbps = {name: harness.median(v) for name, v in samples.items()}
    # per sample: CPU s/GB of each of the three processes; the total is their sum
    cpu_gb = {name: harness.median([sum(x) for x in v]) for name, v in cpu.items()}
    roles = {name: ["npt runner", "srvd", "npd"] if name.startswith("tunnel")
             else ["socat 1 (client side)", "socat 2 (relay)", "socat 3 (daemon side)"]
             for name in cpu}
    per_process = {name: {role: round(harness.median([x[i] for x in v]), 3)
                          for i, role in enumerate(roles[name])} for name, v in cpu.items()}
    extra = {"seconds_per_sample": SECONDS, "loadavg_before_after": [load0, os.getloadavg()],
             "samples_MBps": {k: [round(x, 1) for x in v] for k, v in samples.items()},
             "cpu_s_per_GB": {k: [round(sum(x), 3) for x in v] for k, v in cpu.items()},
             "cpu_s_per_GB_by_process": per_process}
    gated = None
    for impl in IMPLS:
        vs_socat = harness.record(harness.Comparison(
            suite=SUITE, name=f"encrypted_{impl}_vs_socat_chain", ours=mbps[f"tunnel {impl}"],
            baseline=mbps["socat chain"], unit="MB/s",
            baseline_name="3 x socat -b 131072 (no encryption)", target=0.9, extra=extra),
            benchmark)
        if impl == "compiled":
            gated = vs_socat
        harness.record(harness.Comparison(
            suite=SUITE, name=f"encrypted_{impl}_vs_direct", ours=mbps[f"tunnel {impl}"],
            baseline=mbps["direct"], unit="MB/s", baseline_name="iperf3 direct"), benchmark)
        harness.record(harness.Comparison(
            suite=SUITE, name=f"cpu_per_gb_{impl}_vs_socat_chain",
            ours=cpu_gb[f"tunnel {impl}"], baseline=cpu_gb["socat chain"], unit="CPU s/GB",
            baseline_name="3 x socat -b 131072", lower_is_better=True,
            extra={"ours_processes": "npt runner + srvd + npd"}), benchmark)
    harness.record(harness.Comparison(
        suite=SUITE, name="socat_chain_vs_direct", ours=mbps["socat chain"],
        baseline=mbps["direct"], unit="MB/s", baseline_name="iperf3 direct"), benchmark)
    harness.record(harness.Comparison(
        suite=SUITE, name="encrypted_compiled_vs_pure", ours=mbps["tunnel compiled"],
        baseline=mbps["tunnel pure"], unit="MB/s", baseline_name="pure pumps"), benchmark)
    assert all(v > 0 for v in mbps.values()), mbps
    # the product ships the compiled pumps; the pure twin's ratio is recorded beside it
    harness.gate(gated)


# --- (b) set-up time ------------------------------------------------------------------------

def test_e2e_setup_time(benchmark, stack):
    live_runners: set[int] = set()      # started and not yet stopped (pids get reused)
    ports: dict[str, set[int]] = {impl: set() for impl in IMPLS}
    exit_times: dict[str, list[float]] = {impl: [] for impl in IMPLS}
    load0 = os.getloadavg()

    def npt_case(impl: str):
        def run() -> float:
            elapsed, exited, port, pid = stack.npt_x(impl, "30s")
            live_runners.add(pid)
            exit_times[impl].append(exited)
            ports[impl].add(port)
            # stop the tunnel now, so no session lingers into the next sample
            _stop_pid(pid)
            live_runners.discard(pid)
            return elapsed
        return run

    def timed(cmd: list[str]):
        def run() -> float:
            t0 = time.perf_counter()
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=60,
                                 cwd=str(REPO), env=_env(), stdin=subprocess.DEVNULL)
            elapsed = time.perf_counter() - t0
            assert out.returncode == 0, out.stderr
            return elapsed
        return run

    cases = {f"npt {impl}": npt_case(impl) for impl in IMPLS}
    cases["python -c pass"] = timed([sys.executable, "-c", "pass"])
    cases["login only"] = timed([sys.executable, "-c", _LOGIN_ONLY, CLIENT,
                                 str(stack.keys_file(CLIENT)), stack.root,
                                 str(stack.atserver.ca_file)])
    try:
        for run in cases.values():      # warm: page cache, the atServer's first logins
            run()
        for times in exit_times.values():
            times.clear()
        samples = benchmark.pedantic(
            lambda: harness.interleaved(cases, n_rounds=SETUP_RUNS), rounds=1, iterations=1)
    finally:
        for pid in live_runners:
            _stop_pid(pid)

    p50 = {k: harness.median(v) * 1000 for k, v in samples.items()}
    p90 = {k: harness.percentile(v, 0.9) * 1000 for k, v in samples.items()}
    extra = {"runs": SETUP_RUNS, "loadavg_before_after": [load0, os.getloadavg()],
             "target_ms": SETUP_TARGET_S * 1000,
             "samples_ms": {k: [round(x * 1000, 1) for x in v] for k, v in samples.items()},
             "p90_ms": {k: round(v, 1) for k, v in p90.items()},
             # when npt's stdout closed (its parent exited): what `$(npt -x ...)` waits for
             "exit_p50_ms": {k: round(harness.median(v) * 1000, 1)
                             for k, v in exit_times.items()}}
    for impl in IMPLS:
        name = f"npt {impl}"
        harness.record(harness.Comparison(
            suite=SUITE, name=f"setup_p50_{impl}_vs_login_only", ours=p50[name],
            baseline=p50["login only"], unit="ms",
            baseline_name="python start + import + .atKeys + root + TLS + PKAM login",
            lower_is_better=True, extra={**extra, "p90_ms_ours": p90[name],
                                         "within_600ms_target": p50[name] <= 600}), benchmark)
        harness.record(harness.Comparison(
            suite=SUITE, name=f"setup_p50_{impl}_vs_interpreter", ours=p50[name],
            baseline=p50["python -c pass"], unit="ms", baseline_name="python -c pass",
            lower_is_better=True), benchmark)
        harness.record(harness.Comparison(
            suite=SUITE, name=f"setup_p90_{impl}_vs_login_only", ours=p90[name],
            baseline=p90["login only"], unit="ms", baseline_name="login only, p90",
            lower_is_better=True), benchmark)
    # every run printed a real port (and each run got its own session)
    for impl in IMPLS:
        assert all(0 < port < 65536 for port in ports[impl]), ports
        assert len(samples[f"npt {impl}"]) == SETUP_RUNS
    assert all(v > 0 for v in p50.values()), p50
