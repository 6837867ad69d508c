"""The tunnel's encrypting pump: compiled (fused recv / EVP AES-CTR in place / send) vs its pure
twin (BufferedProtocol + ``cryptography`` update_into in place).

One stream through a pump process (this module run as ``python -m bench.test_bench_tunnelpump
--impl ...``: one splice at a time on uvloop, plain socket on one port, relay socket on the other,
AES-256-CTR on both directions), the source in this process and the sink in a child, on
127.0.0.1; rounds interleaved and medians compared in the same run:

- throughput (MB/s) of one stream plain -> relay (encrypting), and the pump process's CPU seconds
  per GB (psutil user + system time over the data phase);
- the same with the compiled pump's encryption off (``compiled-noenc``: what AES costs us), and
  with its AES on OpenSSL EVP instead of the VAES engine (``compiled-evp``; the same as
  ``compiled`` on a CPU without VAES);
- 64-byte ping-pong round trips through the pump, p50 and p99 (µs).

Gated: compiled encrypting throughput >= 1.0x the pure pump's.  Everything else is recorded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from bench import harness

SUITE = "tunnelpump"
REPO = Path(__file__).resolve().parents[1]
MiB = 1 << 20
CHUNK = MiB
PING = 64
KEY = bytes(range(32))
IV = bytes(range(16))
IMPLS = ("compiled", "pure", "compiled-noenc", "compiled-evp")


# --- the pump process (python -m bench.test_bench_tunnelpump --impl ...) -------------------

def _pump_module(impl: str):
    if impl == "pure":
        import noports._pure.tunnelpump as pump
    else:
        import noports._speedups.tunnelpump as pump  # the bench compares implementations
    return pump


async def _serve(impl: str) -> None:
    pump = _pump_module(impl)
    if impl == "compiled-evp":
        pump._configure(aes="evp")
    loop = asyncio.get_running_loop()
    listeners = []
    for _ in range(2):
        sock = socket.create_server(("127.0.0.1", 0), backlog=16)
        sock.setblocking(False)
        listeners.append(sock)
    print(json.dumps({"port_plain": listeners[0].getsockname()[1],
                      "port_relay": listeners[1].getsockname()[1]}), flush=True)
    stdin_closed = loop.create_future()
    loop.add_reader(sys.stdin.fileno(), lambda: stdin_closed.done() or
                    (sys.stdin.buffer.read1(4096) or stdin_closed.set_result(None)))

    async def pairs():
        while True:
            plain, _ = await loop.sock_accept(listeners[0])
            relay, _ = await loop.sock_accept(listeners[1])
            enc = dec = None
            if impl != "compiled-noenc":
                enc, dec = pump.new_cipher(KEY, IV), pump.new_cipher(KEY, IV)
            await pump.splice_encrypted(loop, plain, relay, encrypt=enc, decrypt=dec)

    task = asyncio.ensure_future(pairs())
    await stdin_closed
    task.cancel()


def _main() -> None:
    parser = argparse.ArgumentParser(description="one tunnel pump for the bench")
    parser.add_argument("--impl", choices=IMPLS, required=True)
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    args = parser.parse_args()
    if args.loop == "uvloop":
        import uvloop
        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(_serve(args.impl))
    finally:
        loop.close()


# --- the bench side ---------------------------------------------------------------------------

class PumpProcess:
    """A long-lived pump process serving (plain, relay) pairs one after another."""

    def __init__(self, impl: str) -> None:
        self.impl = impl
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.test_bench_tunnelpump", "--impl", impl],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=str(REPO))
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"pump process --impl {impl} did not start")
        ports = json.loads(line)
        self.port_plain, self.port_relay = ports["port_plain"], ports["port_relay"]
        self.ps = psutil.Process(self.proc.pid)

    def connect(self) -> tuple[socket.socket, socket.socket]:
        return _connect(self.port_plain), _connect(self.port_relay)

    def cpu(self) -> float:
        t = self.ps.cpu_times()
        return t.user + t.system

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.proc.stdout.close()


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.settimeout(None)   # plain blocking calls: a timeout adds a poll() to every send/recv
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


# The far (relay) end runs in a child that inherits its socket: source and sink threads in one
# Python process would contend for its GIL and blur the pump's own figures.
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

# Echoes what it gets; ciphertext comes back as ciphertext, so the pump decrypts the reply with
# the same key/IV it encrypted the request with (a second keystream state): app gets plaintext.
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
    sock.close()   # the child holds the relay end now
    return proc


def stream(pump: PumpProcess, nbytes: int) -> tuple[float, float]:
    """Push ``nbytes`` plain -> relay through ``pump``: (bytes per second, pump CPU seconds)."""
    app, wire = pump.connect()
    sink = _far_end(_SINK, wire, nbytes)
    block = memoryview(os.urandom(CHUNK))
    cpu0 = pump.cpu()
    start = time.perf_counter()
    left = nbytes
    while left:
        n = min(left, CHUNK)
        app.sendall(block[:n])
        left -= n
    got = int(sink.stdout.readline() or 0)      # the sink's line: every byte has arrived
    elapsed = time.perf_counter() - start
    cpu = pump.cpu() - cpu0
    app.close()
    sink.wait(10)
    sink.stdout.close()
    assert got == nbytes, f"{pump.impl}: {got} of {nbytes} bytes arrived"
    return nbytes / elapsed, cpu


def pingpong(pump: PumpProcess, n: int) -> list[float]:
    """``n`` round trips of a 64-byte message app -> wire -> app: RTTs in µs."""
    app, wire = pump.connect()
    echo = _far_end(_ECHO, wire, PING)
    msg = os.urandom(PING)
    rtts = []
    for i in range(n + 200):          # the first 200 warm up caches and the loop
        t0 = time.perf_counter_ns()
        app.sendall(msg)
        assert _recv_exactly(app, PING) == msg
        if i >= 200:
            rtts.append((time.perf_counter_ns() - t0) / 1000)
    app.shutdown(socket.SHUT_WR)
    echo.wait(10)
    echo.stdout.close()
    app.close()
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
def pumps():
    try:
        import noports._speedups.tunnelpump  # noqa: F401
    except ImportError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"compiled tunnel pump not built: {exc}")
        pytest.skip(f"compiled tunnel pump not built: {exc}")
    made = {impl: PumpProcess(impl) for impl in IMPLS}
    yield made
    for pump in made.values():
        pump.close()


def test_one_stream_throughput_and_cpu(benchmark, pumps):
    nbytes = (512 if harness.quick() else 2048) * MiB
    cpu: dict[str, list[float]] = {name: [] for name in pumps}

    def case(name):
        def one() -> float:
            rate, seconds = stream(pumps[name], nbytes)
            cpu[name].append(seconds / (nbytes / 1e9))
            return rate
        return one

    def run():
        for name in pumps:                  # warm: page-in, TCP autotuning, CPU clocks
            stream(pumps[name], 64 * MiB)
        return harness.interleaved({name: case(name) for name in pumps})

    samples = benchmark.pedantic(run, rounds=1, iterations=1)
    mbps = {name: harness.median(v) / 1e6 for name, v in samples.items()}
    cpu_gb = {name: harness.median(v) for name, v in cpu.items()}
    extra = {"bytes_per_sample": nbytes,
             "samples_MBps": {k: [round(x / 1e6, 1) for x in v] for k, v in samples.items()},
             "cpu_s_per_GB": {k: [round(x, 3) for x in v] for k, v in cpu.items()}}
    vs_pure = harness.record(harness.Comparison(
        suite=SUITE, name="stream_compiled_vs_pure", ours=mbps["compiled"],
        baseline=mbps["pure"], unit="MB/s", baseline_name="pure encrypting pump", target=1.0,
        extra=extra), benchmark)
    # the compiled pump against each other variant: throughput, then CPU per GB
    for key, tag, label in (("pure", "pure", "pure encrypting pump"),
                            ("compiled-noenc", "compiled_noenc", "compiled pump, encryption off"),
                            ("compiled-evp", "compiled_evp", "compiled pump, AES on OpenSSL EVP")):
        if key != "pure":    # compiled vs pure throughput is the gated figure above
            harness.record(harness.Comparison(
                suite=SUITE, name=f"stream_compiled_vs_{tag}", ours=mbps["compiled"],
                baseline=mbps[key], unit="MB/s", baseline_name=label), benchmark)
        harness.record(harness.Comparison(
            suite=SUITE, name=f"cpu_per_gb_compiled_vs_{tag}", ours=cpu_gb["compiled"],
            baseline=cpu_gb[key], unit="CPU s/GB", baseline_name=label,
            lower_is_better=True), benchmark)
    harness.gate(vs_pure)


def test_pingpong_64_bytes(benchmark, pumps):
    n = 2000 if harness.quick() else 5000
    p99: dict[str, list[float]] = {name: [] for name in pumps}

    def case(name):
        def one() -> float:
            rtts = pingpong(pumps[name], n)
            p99[name].append(_percentile(rtts, 0.99))
            return statistics.median(rtts)
        return one

    samples = benchmark.pedantic(
        lambda: harness.interleaved({name: case(name) for name in pumps}),
        rounds=1, iterations=1)
    p50 = {name: harness.median(v) for name, v in samples.items()}
    p99m = {name: harness.median(v) for name, v in p99.items()}
    extra = {"round_trips_per_sample": n,
             "samples_p50_us": {k: [round(x, 1) for x in v] for k, v in samples.items()},
             "samples_p99_us": {k: [round(x, 1) for x in v] for k, v in p99.items()}}
    harness.record(harness.Comparison(
        suite=SUITE, name="pingpong_p50_compiled_vs_pure", ours=p50["compiled"],
        baseline=p50["pure"], unit="µs", baseline_name="pure encrypting pump",
        lower_is_better=True, extra=extra), benchmark)
    harness.record(harness.Comparison(
        suite=SUITE, name="pingpong_p99_compiled_vs_pure", ours=p99m["compiled"],
        baseline=p99m["pure"], unit="µs", baseline_name="pure encrypting pump",
        lower_is_better=True), benchmark)
    assert all(v > 0 for v in p50.values())


if __name__ == "__main__":
    _main()
