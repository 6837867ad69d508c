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

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from bench import harness, plumbing, pump_process

SUITE = "pump"
HERE = Path(__file__).resolve().parent


# --- relays ---------------------------------------------------------------------------------

def _relay(impl: str) -> pump_process.PumpProcess:
    """A long-lived bench/pump_relay.py process serving pairs one after another."""
    return pump_process.PumpProcess(
        impl, [sys.executable, str(HERE / "pump_relay.py"), "--impl", impl, "--loop", "uvloop"],
        cwd=HERE.parent)


class Socat:
    """One ``socat -b 131072`` per pair: it listens on A, then (after A's connection) on B."""

    impl = "socat"

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.ps: psutil.Process | None = None

    def connect(self) -> tuple[socket.socket, socket.socket]:
        port_a, port_b = plumbing.free_port(), plumbing.free_port()
        self.proc = subprocess.Popen(
            ["socat", "-b", "131072",
             f"TCP-LISTEN:{port_a},bind=127.0.0.1,reuseaddr,nodelay",
             f"TCP-LISTEN:{port_b},bind=127.0.0.1,reuseaddr,nodelay"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.ps = psutil.Process(self.proc.pid)
        # socat opens its second listener only once the first has its connection
        return plumbing.connect(port_a, retry=10), plumbing.connect(port_b, retry=10)

    def cpu(self) -> float:
        return plumbing.cpu_seconds(self.ps)

    def done(self) -> None:
        """socat exits once the pair has closed."""
        plumbing.stop(self.proc)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


# --- the suite ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def relays():
    if shutil.which("socat") is None:
        pytest.skip("socat is not installed (apt-get install socat)")
    harness.require_compiled("relay pump", "noports._speedups.relaypump")
    made = {"compiled": _relay("compiled"), "pure": _relay("pure"), "socat": Socat()}
    yield made
    for relay in made.values():
        relay.close()


def test_one_stream_throughput_and_cpu(benchmark, relays):
    mbps, cpu_gb, extra = pump_process.measure_stream(benchmark, relays)
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
    p50, p99m, extra = pump_process.measure_pingpong(benchmark, relays)
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
