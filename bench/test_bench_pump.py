"""The relay pump: compiled (kernel splice) vs its pure twin vs ``socat -b 131072``.

One stream through a relay process (bench/pump_relay.py running one pump on uvloop, or a socat
between two listening ports), source and sink in this process on 127.0.0.1, rounds interleaved
and medians compared in the same run:

- throughput (MB/s) of one stream, and the relay process's CPU seconds per GB moved
  (psutil user + system time over the data phase);
- 64-byte ping-pong round trips through the relay, p50 and p99 (µs).

Gated: compiled throughput >= 1.0x the pure pump's.  Everything else is recorded.  socat gets
``nodelay`` on both sides, as both pumps set TCP_NODELAY, so the latency baseline is fair.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from bench import harness

SUITE = "pump"
HERE = Path(__file__).resolve().parent
MiB = 1 << 20
CHUNK = MiB
PING = 64


# --- relays ---------------------------------------------------------------------------------

class Relay:
    """A long-lived bench/pump_relay.py process serving pairs one after another."""

    def __init__(self, impl: str) -> None:
        self.impl = impl
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "pump_relay.py"), "--impl", impl, "--loop", "uvloop"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=str(HERE.parent))
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"pump_relay.py --impl {impl} did not start")
        ports = json.loads(line)
        self.port_a, self.port_b = ports["port_a"], ports["port_b"]
        self.ps = psutil.Process(self.proc.pid)

    def connect(self) -> tuple[socket.socket, socket.socket]:
        return _connect(self.port_a), _connect(self.port_b)

    def cpu(self) -> float:
        t = self.ps.cpu_times()
        return t.user + t.system

    def done(self) -> None:
        """Between rounds: nothing to do, the relay waits for the next pair."""

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.proc.stdout.close()


class Socat:
    """One ``socat -b 131072`` per pair: it listens on A, then (after A's connection) on B."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.ps: psutil.Process | None = None

    def connect(self) -> tuple[socket.socket, socket.socket]:
        port_a, port_b = _free_port(), _free_port()
        self.proc = subprocess.Popen(
            ["socat", "-b", "131072",
             f"TCP-LISTEN:{port_a},bind=127.0.0.1,reuseaddr,nodelay",
             f"TCP-LISTEN:{port_b},bind=127.0.0.1,reuseaddr,nodelay"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.ps = psutil.Process(self.proc.pid)
        # socat opens its second listener only once the first has its connection
        return _connect_retry(port_a), _connect_retry(port_b)

    def cpu(self) -> float:
        t = self.ps.cpu_times()
        return t.user + t.system

    def done(self) -> None:
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.settimeout(None)   # plain blocking calls: a timeout adds a poll() to every send/recv
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _connect_retry(port: int, timeout: float = 10.0) -> socket.socket:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return _connect(port)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.002)   # socat is still starting: poll its port


# --- measurements ---------------------------------------------------------------------------

# The far end (B) runs in a child process that inherits B's socket: the source/sink threads of
# one Python process would contend for its GIL and blur the relay's own figures.
_SINK = """
import socket, sys
sock = socket.socket(fileno=int(sys.argv[1]))
sock.setblocking(True)
nbytes, buf, got = int(sys.argv[2]), bytearray(1 << 20), 0
while got < nbytes:
    n = sock.recv_into(buf)
    if not n:
        break
    got += n
print(got, flush=True)
"""

_ECHO = """
import socket, sys
sock = socket.socket(fileno=int(sys.argv[1]))
sock.setblocking(True)
size = int(sys.argv[2])
while True:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            sys.exit(0)
        data += chunk
    sock.sendall(data)
"""


def _far_end(script: str, sock: socket.socket, *args) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", script, str(sock.fileno()), *map(str, args)],
                            pass_fds=[sock.fileno()], stdout=subprocess.PIPE)
    sock.close()   # the child holds B now
    return proc


def stream(relay, nbytes: int) -> tuple[float, float]:
    """Push ``nbytes`` A -> B through ``relay``: (bytes per second, relay CPU seconds)."""
    a, b = relay.connect()
    sink = _far_end(_SINK, b, nbytes)
    block = memoryview(os.urandom(CHUNK))
    cpu0 = relay.cpu()
    start = time.perf_counter()
    left = nbytes
    while left:
        n = min(left, CHUNK)
        a.sendall(block[:n])
        left -= n
    got = int(sink.stdout.readline() or 0)      # the sink's line: every byte has arrived
    elapsed = time.perf_counter() - start
    cpu = relay.cpu() - cpu0
    a.close()
    sink.wait(10)
    sink.stdout.close()
    relay.done()
    assert got == nbytes, f"{relay}: {got} of {nbytes} bytes arrived"
    return nbytes / elapsed, cpu


def pingpong(relay, n: int) -> list[float]:
    """``n`` round trips of a 64-byte message A -> B -> A, B echoing: RTTs in µs."""
    a, b = relay.connect()
    echo = _far_end(_ECHO, b, PING)
    msg = b"p" * PING
    rtts = []
    for i in range(n + 200):          # the first 200 warm up caches and the loop
        t0 = time.perf_counter_ns()
        a.sendall(msg)
        assert _recv_exactly(a, PING) == msg
        if i >= 200:
            rtts.append((time.perf_counter_ns() - t0) / 1000)
    a.shutdown(socket.SHUT_WR)
    echo.wait(10)
    echo.stdout.close()
    a.close()
    relay.done()
    return rtts


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            return b""
        data += chunk
    return data


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# --- the suite ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def relays():
    if shutil.which("socat") is None:
        pytest.skip("socat is not installed (apt-get install socat)")
    try:
        import noports._speedups.relaypump  # noqa: F401
    except ImportError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"compiled relay pump not built: {exc}")
        pytest.skip(f"compiled relay pump not built: {exc}")
    made = {"compiled": Relay("compiled"), "pure": Relay("pure"), "socat": Socat()}
    yield made
    for relay in made.values():
        relay.close()


def test_one_stream_throughput_and_cpu(benchmark, relays):
    nbytes = (512 if harness.quick() else 2048) * MiB
    cpu: dict[str, list[float]] = {name: [] for name in relays}

    def case(name):
        def one() -> float:
            rate, seconds = stream(relays[name], nbytes)
            cpu[name].append(seconds / (nbytes / 1e9))
            return rate
        return one

    def run():
        for name in relays:                 # warm: page-in, TCP autotuning, CPU clocks
            stream(relays[name], 64 * MiB)
        return harness.interleaved({name: case(name) for name in relays})

    samples = benchmark.pedantic(run, rounds=1, iterations=1)
    mbps = {name: harness.median(v) / 1e6 for name, v in samples.items()}
    cpu_gb = {name: harness.median(v) for name, v in cpu.items()}
    extra = {"bytes_per_sample": nbytes,
             "samples_MBps": {k: [round(x / 1e6, 1) for x in v] for k, v in samples.items()},
             "cpu_s_per_GB": {k: [round(x, 3) for x in v] for k, v in cpu.items()}}
    vs_pure = harness.record(harness.Comparison(
        suite=SUITE, name="stream_compiled_vs_pure", ours=mbps["compiled"], baseline=mbps["pure"],
        unit="MB/s", baseline_name="pure pump (uvloop Protocol)", target=1.0, extra=extra),
        benchmark)
    harness.record(harness.Comparison(
        suite=SUITE, name="stream_compiled_vs_socat", ours=mbps["compiled"],
        baseline=mbps["socat"], unit="MB/s", baseline_name="socat -b 131072"), benchmark)
    harness.record(harness.Comparison(
        suite=SUITE, name="stream_pure_vs_socat", ours=mbps["pure"], baseline=mbps["socat"],
        unit="MB/s", baseline_name="socat -b 131072"), benchmark)
    harness.record(harness.Comparison(
        suite=SUITE, name="cpu_per_gb_compiled_vs_socat", ours=cpu_gb["compiled"],
        baseline=cpu_gb["socat"], unit="CPU s/GB", baseline_name="socat -b 131072",
        lower_is_better=True), benchmark)
    harness.record(harness.Comparison(
        suite=SUITE, name="cpu_per_gb_compiled_vs_pure", ours=cpu_gb["compiled"],
        baseline=cpu_gb["pure"], unit="CPU s/GB", baseline_name="pure pump",
        lower_is_better=True), benchmark)
    harness.record(harness.Comparison(
        suite=SUITE, name="cpu_per_gb_pure_vs_socat", ours=cpu_gb["pure"],
        baseline=cpu_gb["socat"], unit="CPU s/GB", baseline_name="socat -b 131072",
        lower_is_better=True), benchmark)
    harness.gate(vs_pure)


def test_pingpong_64_bytes(benchmark, relays):
    n = 2000 if harness.quick() else 5000
    p99: dict[str, list[float]] = {name: [] for name in relays}

    def case(name):
        def one() -> float:
            rtts = pingpong(relays[name], n)
            p99[name].append(_percentile(rtts, 0.99))
            return statistics.median(rtts)
        return one

    samples = benchmark.pedantic(
        lambda: harness.interleaved({name: case(name) for name in relays}),
        rounds=1, iterations=1)
    p50 = {name: harness.median(v) for name, v in samples.items()}
    p99m = {name: harness.median(v) for name, v in p99.items()}
    extra = {"round_trips_per_sample": n,
             "samples_p50_us": {k: [round(x, 1) for x in v] for k, v in samples.items()},
             "samples_p99_us": {k: [round(x, 1) for x in v] for k, v in p99.items()}}
    for impl in ("compiled", "pure"):
        harness.record(harness.Comparison(
            suite=SUITE, name=f"pingpong_p50_{impl}_vs_socat", ours=p50[impl],
            baseline=p50["socat"], unit="µs", baseline_name="socat -b 131072",
            lower_is_better=True, extra=extra), benchmark)
        harness.record(harness.Comparison(
            suite=SUITE, name=f"pingpong_p99_{impl}_vs_socat", ours=p99m[impl],
            baseline=p99m["socat"], unit="µs", baseline_name="socat -b 131072",
            lower_is_better=True), benchmark)
    assert all(v > 0 for v in p50.values())
