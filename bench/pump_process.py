"""A pump under test in its own process, and the two figures the pump suites measure through it.

The process (bench/pump_relay.py for the relay pump, ``python -m bench.test_bench_tunnelpump``
for the tunnel pump) runs serve_pairs(): it listens on two ephemeral ports on 127.0.0.1, prints
one JSON line ``{"port_a": .., "port_b": ..}``, then accepts one connection on each port and
splices them, pair after pair, until its stdin closes.  Pairs are served one after another, so
the process's CPU time between two moments is the pump's cost for the transfer in between.

The bench side holds such processes as PumpProcess (socat fits the same shape: ``impl``,
``connect``, ``cpu``, ``done``, ``close``) and measures, interleaved over all of them
(bench/harness.py): one stream A -> B with the CPU seconds per GB it cost (measure_stream) and
64-byte ping-pong round trips A -> B -> A (measure_pingpong).  The suites record the figures.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from bench import harness, plumbing

MiB = 1 << 20
CHUNK = MiB


# --- the pump process ------------------------------------------------------------------------

async def serve_pairs(splice: Callable[[asyncio.AbstractEventLoop, socket.socket, socket.socket],
                                       Awaitable[object]]) -> None:
    """Serve (A, B) pairs one after another with ``splice(loop, sock_a, sock_b)`` until stdin
    closes."""
    loop = asyncio.get_running_loop()
    listeners = []
    for _ in range(2):
        sock = socket.create_server((plumbing.HOST, 0), backlog=16)
        sock.setblocking(False)
        listeners.append(sock)
    print(json.dumps({"port_a": listeners[0].getsockname()[1],
                      "port_b": listeners[1].getsockname()[1]}), flush=True)
    stdin_closed = loop.create_future()
    loop.add_reader(sys.stdin.fileno(), lambda: stdin_closed.done() or
                    (sys.stdin.buffer.read1(4096) or stdin_closed.set_result(None)))

    async def pairs():
        while True:
            sock_a, _ = await loop.sock_accept(listeners[0])
            sock_b, _ = await loop.sock_accept(listeners[1])
            await splice(loop, sock_a, sock_b)

    task = asyncio.ensure_future(pairs())
    await stdin_closed
    task.cancel()


# --- the bench side --------------------------------------------------------------------------

class PumpProcess:
    """A long-lived pump process (``argv`` runs serve_pairs) serving pairs one after another."""

    def __init__(self, impl: str, argv: list[str], cwd: Path) -> None:
        import psutil  # here: the pump processes import this module and need no psutil

        self.impl = impl
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     cwd=str(cwd))
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"pump process --impl {impl} did not start")
        ports = json.loads(line)
        self.port_a, self.port_b = ports["port_a"], ports["port_b"]
        self.ps = psutil.Process(self.proc.pid)

    def connect(self) -> tuple[socket.socket, socket.socket]:
        return plumbing.connect(self.port_a), plumbing.connect(self.port_b)

    def cpu(self) -> float:
        return plumbing.cpu_seconds(self.ps)

    def done(self) -> None:
        """Between rounds: nothing to do, the process waits for the next pair."""

    def close(self) -> None:
        plumbing.stop(self.proc)
        self.proc.stdout.close()


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


def stream(pump, nbytes: int) -> tuple[float, float]:
    """Push ``nbytes`` A -> B through ``pump``, a sink child on B: (bytes per second, pump CPU
    seconds)."""
    a, b = pump.connect()
    sink = plumbing.far_end(_SINK, b, nbytes)
    block = memoryview(os.urandom(CHUNK))
    cpu0 = pump.cpu()
    start = time.perf_counter()
    left = nbytes
    while left:
        n = min(left, CHUNK)
        a.sendall(block[:n])
        left -= n
    got = int(sink.stdout.readline() or 0)      # the sink's line: every byte has arrived
    elapsed = time.perf_counter() - start
    cpu = pump.cpu() - cpu0
    a.close()
    sink.wait(10)
    sink.stdout.close()
    pump.done()
    assert got == nbytes, f"{pump.impl}: {got} of {nbytes} bytes arrived"
    return nbytes / elapsed, cpu


def pingpong(pump, n: int) -> list[float]:
    """``n`` 64-byte round trips A -> B -> A through ``pump``, B echoing: RTTs in µs."""
    a, b = pump.connect()
    rtts = plumbing.pingpong(a, b, n)
    pump.done()
    return rtts


def measure_stream(benchmark, pumps: dict) -> tuple[dict, dict, dict]:
    """One stream of 2 GiB (512 MiB quick) through each of ``pumps`` per round, after one warm
    64 MiB stream each: medians of MB/s and of CPU s per GB by name, and the samples (extra)."""
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
    return mbps, cpu_gb, extra


def measure_pingpong(benchmark, pumps: dict) -> tuple[dict, dict, dict]:
    """5000 (2000 quick) round trips through each of ``pumps`` per round: medians of the
    rounds' p50 and of their p99 (µs) by name, and the samples (extra)."""
    n = 2000 if harness.quick() else 5000
    p99: dict[str, list[float]] = {name: [] for name in pumps}

    def case(name):
        def one() -> float:
            rtts = pingpong(pumps[name], n)
            p99[name].append(harness.percentile(rtts, 0.99))
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
    return p50, p99m, extra
