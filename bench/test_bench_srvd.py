"""srvd (issue 5): iperf3 through srvd vs through ``socat -b 131072`` vs direct, same run.

Every srvd is a real ``python -m noports.relay`` process logged in to an embedded atServer; its
sessions are requested through the control plane exactly as npt does.  Four of them run side by
side: the compiled pump and the pure twin (``NOPORTS_NO_EXTENSIONS=1``), each with
``--workers 1`` and ``--workers 2``.  Paths (iperf3's client sends, its server receives):

- srvd:   iperf3 -c -> srvd side A -> srvd side B -> forwarder -> iperf3 -s
- socat:  iperf3 -c -> socat -b 131072 (fork) -> forwarder -> iperf3 -s
- direct: iperf3 -c -> iperf3 -s (and, for reference, iperf3 -c -> forwarder -> iperf3 -s)

srvd never connects out, so a forwarder (bench/srvd_forwarder.py, the compiled splice pump) plays
npd: it connects to side B and on to iperf3's server.  socat gets the *same* forwarder behind it,
so both relays are measured with the same extra hop; the sessions let side A connect without an
auth line (``authenticateSocketA: false``, srvd ``--allow-unauthenticated``) so iperf3's client
connects to srvd directly -- set-up differs, the data path does not.  Each iperf3 connection
(control and every data stream) is a pair of the session; one session per iperf3 run.

Figures, medians of 5 interleaved rounds (3 under NOPORTS_BENCH_QUICK), all in one run:
throughput of one stream and of eight (``-P 8``) for every path; the relay's CPU seconds per GB
(psutil, srvd's whole process tree; socat's parent plus its forked children); 64-byte
ping-pong p50 through srvd (both sides authenticated, no forwarder) vs socat with two listeners;
``--workers 1`` vs ``2`` with eight streams spread over two sessions (2 x ``-P 4``: a session's
pairs share its worker); sessions opened per second through the control plane, and through
``RelaySessions.open`` in-process (the atServer dominates the former); memory per idle session
(RSS growth of srvd's process tree over 3 x 100 open, unpaired sessions).  Gated: one stream through
srvd (compiled) >= 1.0x socat's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from bench import harness, plumbing
from noports.relay.messages import encode_auth_line
from tests.functional.conftest import AtServerProcess
from tests.functional.srvd_helpers import RelayUser
from tests.functional.srvd_workers_helpers import WorkersSrvd

SUITE = "srvd"
HERE = Path(__file__).resolve().parent
SECONDS = 2 if harness.quick() else 5
FLAGS = ("--allow-unauthenticated", "--pairing-timeout", "30", "--pending-quota", "10000",
         "--drain-grace", "0")
#: name -> (relay atSign, environment, workers)
RELAYS = {"compiled": ("@srvdc1", {}, 1), "pure": ("@srvdp1", {"NOPORTS_NO_EXTENSIONS": "1"}, 1),
          "compiled-w2": ("@srvdc2", {}, 2),
          "pure-w2": ("@srvdp2", {"NOPORTS_NO_EXTENSIONS": "1"}, 2)}


# --- plumbing ---------------------------------------------------------------------------------

class _Loop:
    """An asyncio loop in a thread: the RelayUsers live there; the bench itself is blocking."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 60.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class _Forwarder:
    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, str(HERE / "srvd_forwarder.py")],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.cmd(op="ping") == {"ok": 1}

    def cmd(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the forwarder died")
        return json.loads(line)

    def close(self) -> None:
        plumbing.stop(self.proc)


def _cpu(procs: list[psutil.Process]) -> float:
    total = 0.0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            t = proc.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
    return total


class _Iperf:
    """One iperf3 server (``-1``) and the client runs against it."""

    def __init__(self) -> None:
        self.port = plumbing.free_port()
        self.server = subprocess.Popen(["iperf3", "-s", "-1", "-B", "127.0.0.1", "-p",
                                        str(self.port)], stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL)
        plumbing.wait_listening(self.port)

    @staticmethod
    def client(port: int, streams: int) -> subprocess.Popen:
        return subprocess.Popen(["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t",
                                 str(SECONDS), "-P", str(streams), "-J"],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

    @staticmethod
    def received(client: subprocess.Popen) -> tuple[int, float]:
        out, _ = client.communicate(timeout=SECONDS + 60)
        end = json.loads(out)
        if "error" in end:
            raise RuntimeError(f"iperf3: {end['error']}")
        total = end["end"]["sum_received"]
        return int(total["bytes"]), float(total["seconds"])

    def close(self) -> None:
        if self.server.poll() is None:
            self.server.kill()
        self.server.wait(10)


class Bench:
    """Everything the suite runs against (module fixture)."""

    def __init__(self, tmp: Path) -> None:
        atsigns = ["@client", "@daemon", *(a for a, _e, _w in RELAYS.values())]
        self.atserver = AtServerProcess(tmp, atsigns, keys=True).start()
        self.loop = _Loop()
        self.relays: dict[str, WorkersSrvd] = {}
        self.users: dict[str, RelayUser] = {}
        self.fwd: _Forwarder | None = None
        self.daemon_keys = self.atserver.keys("@daemon")
        self.client_keys = self.atserver.keys("@client")
        for name, (atsign, env, workers) in RELAYS.items():
            self.relays[name] = WorkersSrvd(self.atserver, tmp, *FLAGS, "--workers",
                                            str(workers), atsign=atsign, env=env)
        for name, relay in self.relays.items():
            relay.ready(60)
            user = RelayUser(self.atserver, "@client", relay=relay.atsign)
            self.users[name] = self.loop.run(user.__aenter__())
        self.fwd = _Forwarder()

    def close(self) -> None:
        if self.fwd is not None:
            self.fwd.close()
        for user in self.users.values():
            with contextlib.suppress(Exception):
                self.loop.run(user.__aexit__(None, None, None), 10)
        self.loop.close()
        for relay in self.relays.values():
            relay.stop()
        self.atserver.stop()

    def session(self, name: str, auth_a: bool = False):
        """A fresh session on relay ``name``: (body, reply)."""
        user = self.users[name]

        async def ask():
            body = user.body(authenticateSocketA=auth_a)
            return body, await user.parsed_reply(await user.request(body))
        return self.loop.run(ask())

    def line(self, body, reply, keys) -> bytes:
        return encode_auth_line(body["sessionId"], body["clientNonce"], reply.rvd_nonce,
                                keys.encrypt_private)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    for tool in ("iperf3", "socat"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (apt-get install {tool})")
    made = Bench(tmp_path_factory.mktemp("bench-srvd"))
    try:
        yield made
    finally:
        made.close()


# --- the paths --------------------------------------------------------------------------------

def srvd_run(bench: Bench, name: str, streams: int, sessions: int = 1) -> tuple[float, float]:
    """iperf3 through relay ``name``: (bytes per second, relay CPU seconds)."""
    relay = bench.relays[name]
    per = streams // sessions
    servers, entries = [], []
    try:
        for _ in range(sessions):
            body, reply = bench.session(name)
            server = _Iperf()
            servers.append(server)
            bench.fwd.cmd(op="relay", port_b=reply.port_b, target=server.port, spares=per + 2,
                          line_b=bench.line(body, reply, bench.daemon_keys).hex())
            entries.append(reply.port_a)
        procs = relay.processes()
        cpu0 = _cpu(procs)
        clients = [_Iperf.client(port, per) for port in entries]
        results = [_Iperf.received(c) for c in clients]
        cpu = _cpu(procs) - cpu0
    finally:
        for server in servers:
            server.close()
        bench.fwd.cmd(op="reset")
    return sum(b / s for b, s in results), cpu


def socat_run(bench: Bench, streams: int) -> tuple[float, float]:
    server = _Iperf()
    socat = None
    try:
        fport = bench.fwd.cmd(op="listen", target=server.port)["port"]
        port = plumbing.free_port()
        socat = subprocess.Popen(["socat", "-b", "131072",
                                  f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork",
                                  f"TCP:127.0.0.1:{fport}"], stderr=subprocess.DEVNULL)
        plumbing.wait_listening(port)
        parent = psutil.Process(socat.pid)
        cpu0 = _cpu([parent])
        client = _Iperf.client(port, streams)
        nbytes, seconds = _Iperf.received(client)
        # every forked child has exited and been reaped: the parent's children times hold them
        deadline = time.monotonic() + 10
        while parent.children() and time.monotonic() < deadline:
            time.sleep(0.01)
        cpu = _cpu([parent]) - cpu0
    finally:
        if socat is not None:
            socat.kill()
            socat.wait(10)
        server.close()
        bench.fwd.cmd(op="reset")
    return nbytes / seconds, cpu


def direct_run(bench: Bench, streams: int, via_forwarder: bool = False) -> tuple[float, float]:
    server = _Iperf()
    try:
        port = server.port
        if via_forwarder:
            port = bench.fwd.cmd(op="listen", target=server.port)["port"]
        nbytes, seconds = _Iperf.received(_Iperf.client(port, streams))
    finally:
        server.close()
        bench.fwd.cmd(op="reset")
    return nbytes / seconds, 0.0


# --- the suite --------------------------------------------------------------------------------

@pytest.mark.timeout(1800)      # 13 cases x 5 rounds of iperf3 runs: longer than the default
def test_throughput_cpu_and_workers(benchmark, bench):
    cases = {
        "1: srvd compiled": lambda: srvd_run(bench, "compiled", 1),
        "1: srvd pure": lambda: srvd_run(bench, "pure", 1),
        "1: socat": lambda: socat_run(bench, 1),
        "1: direct": lambda: direct_run(bench, 1),
        "1: direct via forwarder": lambda: direct_run(bench, 1, via_forwarder=True),
        "8: srvd compiled": lambda: srvd_run(bench, "compiled", 8),
        "8: srvd pure": lambda: srvd_run(bench, "pure", 8),
        "8: socat": lambda: socat_run(bench, 8),
        "8: direct": lambda: direct_run(bench, 8),
        "2x4: srvd compiled w1": lambda: srvd_run(bench, "compiled", 8, sessions=2),
        "2x4: srvd compiled w2": lambda: srvd_run(bench, "compiled-w2", 8, sessions=2),
        "2x4: srvd pure w1": lambda: srvd_run(bench, "pure", 8, sessions=2),
        "2x4: srvd pure w2": lambda: srvd_run(bench, "pure-w2", 8, sessions=2),
    }
    cpu: dict[str, list[float]] = {name: [] for name in cases}

    def measured(name, fn):
        def one() -> float:
            rate, seconds = fn()
            cpu[name].append(seconds / (rate * SECONDS / 1e9))   # CPU s per GB moved
            return rate / 1e6
        return one

    def run():
        direct_run(bench, 1)                    # warm: page-in, TCP autotuning, CPU clocks
        srvd_run(bench, "compiled", 1)
        return harness.interleaved({n: measured(n, f) for n, f in cases.items()})

    samples = benchmark.pedantic(run, rounds=1, iterations=1)
    mbps = {name: harness.median(v) for name, v in samples.items()}
    cpu_gb = {name: harness.median(v) for name, v in cpu.items()}
    extra = {"seconds_per_sample": SECONDS,
             "samples_MBps": {k: [round(x, 1) for x in v] for k, v in samples.items()},
             "cpu_s_per_GB": {k: [round(x, 3) for x in v] for k, v in cpu.items()},
             "load_avg": os.getloadavg()}

    def compare(name, ours, base, target=None, unit="MB/s", lower=False, extra_info=None):
        return harness.record(harness.Comparison(
            suite=SUITE, name=name, ours=(cpu_gb if unit.startswith("CPU") else mbps)[ours],
            baseline=(cpu_gb if unit.startswith("CPU") else mbps)[base], unit=unit,
            baseline_name=base, target=target, lower_is_better=lower,
            extra=extra_info or {"ours_case": ours}), benchmark)

    gated = compare("one_stream_compiled_vs_socat", "1: srvd compiled", "1: socat", 1.0,
                    extra_info=extra)
    compare("one_stream_pure_vs_socat", "1: srvd pure", "1: socat", 1.0)
    for impl in ("compiled", "pure"):
        compare(f"one_stream_{impl}_vs_direct", f"1: srvd {impl}", "1: direct", 0.8)
        compare(f"eight_streams_{impl}_vs_socat", f"8: srvd {impl}", "8: socat")
        compare(f"eight_streams_{impl}_vs_direct", f"8: srvd {impl}", "8: direct")
        compare(f"cpu_per_gb_{impl}_vs_socat", f"1: srvd {impl}", "1: socat", 1.0,
                unit="CPU s/GB", lower=True)
        compare(f"workers2_vs_1_eight_streams_{impl}", f"2x4: srvd {impl} w2",
                f"2x4: srvd {impl} w1")
    compare("one_stream_forwarder_vs_direct", "1: direct via forwarder", "1: direct")
    for impl in ("compiled", "pure"):     # the same hop count minus srvd: what srvd itself costs
        compare(f"one_stream_{impl}_vs_direct_via_forwarder", f"1: srvd {impl}",
                "1: direct via forwarder")
    harness.gate(gated)


def test_pingpong_64_bytes(benchmark, bench):
    n = 2000 if harness.quick() else 5000

    def srvd(name):
        def one() -> float:
            body, reply = bench.session(name, auth_a=True)
            a = plumbing.connect(reply.port_a, bench.line(body, reply, bench.client_keys))
            b = plumbing.connect(reply.port_b, bench.line(body, reply, bench.daemon_keys))
            return statistics.median(plumbing.pingpong(a, b, n))
        return one

    def socat() -> float:
        pa, pb = plumbing.free_port(), plumbing.free_port()
        proc = subprocess.Popen(["socat", "-b", "131072",
                                 f"TCP-LISTEN:{pa},bind=127.0.0.1,reuseaddr,nodelay",
                                 f"TCP-LISTEN:{pb},bind=127.0.0.1,reuseaddr,nodelay"],
                                stderr=subprocess.DEVNULL)
        try:
            a = plumbing.connect(pa, retry=10)
            b = plumbing.connect(pb, retry=10)
            return statistics.median(plumbing.pingpong(a, b, n))
        finally:
            proc.kill()
            proc.wait(10)

    cases = {"srvd compiled": srvd("compiled"), "srvd pure": srvd("pure"), "socat": socat}
    samples = benchmark.pedantic(lambda: harness.interleaved(cases), rounds=1, iterations=1)
    p50 = {name: harness.median(v) for name, v in samples.items()}
    for impl in ("compiled", "pure"):
        harness.record(harness.Comparison(
            suite=SUITE, name=f"pingpong_p50_{impl}_vs_socat", ours=p50[f"srvd {impl}"],
            baseline=p50["socat"], unit="µs", baseline_name="socat -b 131072 (nodelay)",
            target=1.1, lower_is_better=True,
            extra={"samples_p50_us": {k: [round(x, 1) for x in v]
                                      for k, v in samples.items()}}), benchmark)
    assert all(v > 0 for v in p50.values())


def test_sessions_per_second_and_memory_per_idle_session(benchmark, bench):
    """Sessions opened through the control plane (request -> reply, the atServer and its
    notifications included) and through RelaySessions.open in-process; srvd's RSS growth per
    open, unpaired session."""
    count = 50 if harness.quick() else 100

    def through_control(name: str) -> tuple[float, float]:
        """Median sessions/s of 3 bursts of ``count`` concurrent requests (after a warm-up
        burst), and the RSS growth per session over those bursts."""
        user, relay = bench.users[name], bench.relays[name]

        async def burst(n: int) -> float:
            bodies = [user.body() for _ in range(n)]
            start = time.perf_counter()
            sids = await asyncio.gather(*(user.request(b) for b in bodies))
            await asyncio.gather(*(user.reply(s, timeout=60) for s in sids))
            return n / (time.perf_counter() - start)

        bench.loop.run(burst(10), timeout=120)
        rss0 = relay.rss()
        rates = [bench.loop.run(burst(count), timeout=120) for _ in range(3)]
        return statistics.median(rates), (relay.rss() - rss0) / (3 * count)

    def in_process() -> float:
        from noports.at.atkeys import AtKeys
        from noports.relay import DataPlaneConfig, RelaySessions
        from noports.relay.messages import parse_request_ports

        keys = {a: AtKeys.generate(a) for a in ("@a", "@b")}

        async def opens():
            registry = RelaySessions(DataPlaneConfig(bind_host="127.0.0.1"),
                                     pending_quota=10_000)
            start = time.perf_counter()
            for i in range(count * 5):
                request = parse_request_ports(json.dumps({
                    "sessionId": f"00000000-0000-4000-8000-{i:012d}", "atSignA": "@a",
                    "atSignB": "@b", "authenticateSocketA": True, "authenticateSocketB": True,
                    "clientNonce": "n"}))
                await registry.open(request, public_key_a=keys["@a"].encrypt_public,
                                    public_key_b=keys["@b"].encrypt_public)
            elapsed = time.perf_counter() - start
            await registry.close()
            return count * 5 / elapsed
        return asyncio.run(opens())

    def run():
        return {"control compiled w1": through_control("compiled"),
                "control compiled w2": through_control("compiled-w2"),
                "in-process": in_process()}

    got = benchmark.pedantic(run, rounds=1, iterations=1)
    for name in ("compiled w1", "compiled w2"):
        rate, memory = got[f"control {name}"]
        harness.record(harness.Comparison(
            suite=SUITE, name=f"sessions_per_s_control_plane_{name.replace(' ', '_')}",
            ours=rate, baseline=got["in-process"], unit="sessions/s",
            baseline_name="RelaySessions.open in-process (no atServer)",
            extra={"sessions": count, "memory_per_idle_session_bytes": memory}), benchmark)
    harness.record(harness.Comparison(
        suite=SUITE, name="memory_per_idle_session_w2_vs_w1",
        ours=got["control compiled w2"][1] / 1024, baseline=got["control compiled w1"][1] / 1024,
        unit="KiB", baseline_name="--workers 1", lower_is_better=True), benchmark)
    assert all(rate > 0 for rate, _m in (got["control compiled w1"], got["control compiled w2"]))
