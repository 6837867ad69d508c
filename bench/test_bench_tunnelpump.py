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
import socket
import sys
from pathlib import Path

import pytest

from bench import harness, plumbing, pump_process

SUITE = "tunnelpump"
REPO = Path(__file__).resolve().parents[1]
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

    async def splice(loop, plain: socket.socket, relay: socket.socket) -> None:
        enc = dec = None
        # the same key/IV both ways: the echo far end of the ping-pong sends the ciphertext
        # back, and ``dec`` (a second keystream state) turns it into what the app sent
        if impl != "compiled-noenc":
            enc, dec = pump.new_cipher(KEY, IV), pump.new_cipher(KEY, IV)
        await pump.splice_encrypted(loop, plain, relay, encrypt=enc, decrypt=dec)

    await pump_process.serve_pairs(splice)


def _main() -> None:
    parser = argparse.ArgumentParser(description="one tunnel pump for the bench")
    parser.add_argument("--impl", choices=IMPLS, required=True)
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    args = parser.parse_args()
    plumbing.run_loop(_serve(args.impl), args.loop)


# --- the suite ------------------------------------------------------------------------------

def _pump_process(impl: str) -> pump_process.PumpProcess:
    """A long-lived pump process: A is the plain (app) side, B the encrypted (relay) side."""
    return pump_process.PumpProcess(
        impl, [sys.executable, "-m", "bench.test_bench_tunnelpump", "--impl", impl], cwd=REPO)


@pytest.fixture(scope="module")
def pumps():
    harness.require_compiled("tunnel pump", "noports._speedups.tunnelpump")
    made = {impl: _pump_process(impl) for impl in IMPLS}
    yield made
    for pump in made.values():
        pump.close()


def test_one_stream_throughput_and_cpu(benchmark, pumps):
    mbps, cpu_gb, extra = pump_process.measure_stream(benchmark, pumps)
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
    p50, p99m, extra = pump_process.measure_pingpong(benchmark, pumps)
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
