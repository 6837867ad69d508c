"""One stream through the relay (pure pump) against `socat -b 131072`, same run, interleaved.

Each round moves one stream of 1 GiB (256 MiB under NOPORTS_BENCH_QUICK) from a source process
to a sink process, through:
- our relay: a RelaySession in its own process (``python -m bench.session_server``), on uvloop
  and on stock asyncio, a fresh session (two ports, two auth lines) per round;
- socat -b 131072 TCP-LISTEN:<p>,reuseaddr TCP:127.0.0.1:<sink port>, a fresh socat per round.
The source writes 256 KiB blocks with blocking sendall and half-closes; the sink reads into a
reused 256 KiB buffer until EOF.  Rate = bytes / (sink's EOF time - source's first send time),
both CLOCK_MONOTONIC.  Relay CPU per GB comes from psutil (ours) and wait4 rusage (socat).
No gate yet (issue 5 sets the target); the ratios are recorded.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import harness, plumbing
from bench.session_server import open_session

REPO = Path(__file__).resolve().parents[1]
STREAM = (256 if harness.quick() else 1024) * 1024 * 1024
BLOCK = 256 * 1024

# --- source and sink: tiny programs in their own processes -----------------------------------

SOURCE = r"""
import socket, sys, time
host, port, nbytes, first = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
s = socket.create_connection((host, port))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
if first != "-":
    s.sendall(bytes.fromhex(first))
block = memoryview(bytes(range(256)) * 1024)
start = time.monotonic()
left = nbytes
while left:
    n = min(left, len(block))
    s.sendall(block[:n])
    left -= n
s.shutdown(socket.SHUT_WR)
while s.recv(65536):
    pass
print(start, flush=True)
"""

SINK = r"""
import socket, sys, time
mode, host, port, first = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
if mode == "listen":
    lsock = socket.create_server((host, 0))
    print(lsock.getsockname()[1], flush=True)
    s, _ = lsock.accept()
else:
    s = socket.create_connection((host, port))
    if first != "-":
        s.sendall(bytes.fromhex(first))
    print("connected", flush=True)
buf = bytearray(256 * 1024)
total = 0
while True:
    n = s.recv_into(buf)
    if not n:
        break
    total += n
end = time.monotonic()
s.close()
print(total, end, flush=True)
"""


def _py(script: str, *args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", script, *map(str, args)], text=True,
                            stdout=subprocess.PIPE, **kw)


def _stream(src_port: int, src_first: bytes, sink: subprocess.Popen) -> tuple[float, int]:
    """Run one source into ``src_port``; return (seconds, bytes the sink counted)."""
    source = _py(SOURCE, "127.0.0.1", src_port, STREAM, src_first.hex() or "-")
    out, _ = source.communicate(timeout=300)
    start = float(out.split()[0])
    sink_out, _ = sink.communicate(timeout=60)
    total, end = sink_out.split()[-2:]
    return float(end) - start, int(total)


# --- our relay, in its own process ----------------------------------------------------------

class OurRelay:
    """bench/session_server.py with the pure pump, on ``loop_kind``: one session per round."""

    def __init__(self, loop_kind: str) -> None:
        from noports.at.atkeys import AtKeys
        self.keys_a, self.keys_b = AtKeys.generate("@bench_a"), AtKeys.generate("@bench_b")
        env = dict(os.environ, NOPORTS_NO_EXTENSIONS="1")     # the pure pump, always
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.session_server", "--loop",
                                      loop_kind, "--pairing-timeout", "120"], cwd=REPO, env=env,
                                     text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        import psutil
        self.ps = psutil.Process(self.proc.pid)

    def round(self) -> tuple[float, int, float]:
        reply, line_a, line_b = open_session(self.proc, self.keys_a, self.keys_b,
                                             time.strftime("%Y-%m-%dT%H:%M:%S.000000"))
        sink = _py(SINK, "connect", "127.0.0.1", reply["port_b"], line_b.hex())
        assert sink.stdout.readline().strip() == "connected"
        cpu0 = plumbing.cpu_seconds(self.ps)
        seconds, total = _stream(reply["port_a"], line_a, sink)
        return seconds, total, plumbing.cpu_seconds(self.ps) - cpu0

    def close(self) -> None:
        plumbing.stop(self.proc)


def socat_round() -> tuple[float, int, float]:
    sink = _py(SINK, "listen", "127.0.0.1", 0, "-")
    sink_port = int(sink.stdout.readline())
    port = plumbing.free_port()
    socat = subprocess.Popen(["socat", "-b", "131072",
                              f"TCP-LISTEN:{port},reuseaddr,bind=127.0.0.1",
                              f"TCP:127.0.0.1:{sink_port}"])
    try:
        plumbing.wait_listening(port)
        seconds, total = _stream(port, b"", sink)
        _pid, _status, usage = os.wait4(socat.pid, 0)   # socat exits after its one connection
        socat.returncode = 0
    finally:
        if socat.returncode is None:
            socat.kill()
            socat.wait()
    return seconds, total, usage.ru_utime + usage.ru_stime


@pytest.mark.skipif(shutil.which("socat") is None, reason="socat not installed (apt socat)")
def test_one_stream_pure_relay_vs_socat(benchmark):
    relays = {"uvloop": OurRelay("uvloop"), "asyncio": OurRelay("asyncio")}
    cpu: dict[str, list[float]] = {}

    def case(name, fn):
        def run() -> float:
            seconds, total, cpu_s = fn()
            assert total == STREAM, f"{name}: {total} of {STREAM} bytes arrived"
            cpu.setdefault(name, []).append(cpu_s / (total / 1e9))
            return total / seconds / 1e6
        return run

    cases = {"pure relay (uvloop)": case("pure relay (uvloop)", relays["uvloop"].round),
             "pure relay (asyncio)": case("pure relay (asyncio)", relays["asyncio"].round),
             "socat -b 131072": case("socat -b 131072", socat_round)}
    try:
        samples = benchmark.pedantic(lambda: harness.interleaved(cases), rounds=1, iterations=1)
    finally:
        for relay in relays.values():
            relay.close()
    socat = harness.median(samples["socat -b 131072"])
    for loop_kind in ("uvloop", "asyncio"):
        name = f"pure relay ({loop_kind})"
        harness.record(harness.Comparison(
            suite="relay", name=f"one_stream_pure_{loop_kind}",
            ours=harness.median(samples[name]), baseline=socat, unit="MB/s",
            baseline_name="socat -b 131072",
            extra={"stream_bytes": STREAM, "samples_ours": samples[name],
                   "samples_baseline": samples["socat -b 131072"],
                   "relay_cpu_s_per_GB": harness.median(cpu[name]),
                   "socat_cpu_s_per_GB": harness.median(cpu["socat -b 131072"])}), benchmark)
