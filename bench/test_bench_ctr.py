"""AES-256-CTR data-plane cipher: CtrStream against raw ``cryptography`` and ``openssl speed``.

Gated: ``CtrStream.update_into`` on 64 KiB chunks must keep >= 0.97x the rate of cryptography's
own long-lived encryptor doing ``update_into`` on the same chunks into a reused buffer (the wrapper
may cost at most a Python call and an addition per chunk).  Recorded only: the ratio to
``openssl speed -evp aes-256-ctr`` (the machine's ceiling for one core).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from bench import harness
from noports.at.stream import CtrStream

CHUNK = 64 * 1024
SUITE = "ctr"


def _total_bytes() -> int:
    return (64 if harness.quick() else 256) * 1024 * 1024


def _rate_loop(update_into, data, out, n_chunks: int) -> float:
    """Bytes per second for n_chunks calls of ``update_into(data, out)``."""
    start = time.perf_counter()
    for _ in range(n_chunks):
        update_into(data, out)
    return n_chunks * len(data) / (time.perf_counter() - start)


def parse_openssl_speed(text: str, size: int = CHUNK) -> float | None:
    """Bytes/s for ``size``-byte blocks from ``openssl speed`` output, or None.

    The table is in 1000s of bytes per second; OpenSSL prints those with a ``k`` suffix
    (``AES-256-CTR 4509859.84k``); some builds print the bare number.  Column chosen by the
    ``type ... <size> bytes`` header when there are several sizes.
    """
    # "The 'numbers' are in 1000s of bytes per second processed." heads the table.
    thousands = "1000s of bytes" in text
    column = None
    for line in text.splitlines():
        if line.strip().startswith("type"):
            sizes = [int(s) for s in re.findall(r"(\d+) bytes", line)]
            if size in sizes:
                column = sizes.index(size)
        match = re.match(r"\s*aes-256-ctr\s+(.*)$", line, re.IGNORECASE)
        if match and column is not None:
            values = re.findall(r"([\d.]+)(k?)", match.group(1))
            if len(values) > column:
                number, k = values[column]
                return float(number) * (1000.0 if k or thousands else 1.0)
    return None


def _openssl_rate() -> float | None:
    openssl = shutil.which("openssl")
    if openssl is None:
        return None
    proc = subprocess.run([openssl, "speed", "-evp", "aes-256-ctr", "-bytes", str(CHUNK),
                           "-seconds", "1"], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        return None
    return parse_openssl_speed(proc.stdout + "\n" + proc.stderr)


def test_parse_openssl_speed_units(benchmark):
    one_size = "type          65536 bytes\nAES-256-CTR    4509859.84k\n"
    got = benchmark.pedantic(parse_openssl_speed, args=(one_size,), rounds=1, iterations=1)
    assert got == 4509859.84e3
    several = ("type             16 bytes     64 bytes  65536 bytes\n"
               "aes-256-ctr    600000.00k  1200000.50k  8260000.00k\n")
    assert parse_openssl_speed(several) == 8260000.00e3
    assert parse_openssl_speed("type 65536 bytes\naes-256-ctr 1234.5\n") == 1234.5
    assert parse_openssl_speed("nothing here") is None


def test_ctr_stream_throughput(benchmark):
    key, iv = os.urandom(32), os.urandom(16)
    data = os.urandom(CHUNK)
    n_chunks = _total_bytes() // CHUNK
    stream = CtrStream(key, iv)
    stream_out = bytearray(CHUNK)
    raw = Cipher(algorithms.AES(key), modes.CTR(iv)).encryptor()
    raw_out = bytearray(CHUNK)

    def ours() -> float:
        return _rate_loop(stream.update_into, data, stream_out, n_chunks)

    def baseline() -> float:
        return _rate_loop(raw.update_into, data, raw_out, n_chunks)

    def run():
        ours()  # warm both (page-in, CPU clocks) before any sample counts
        baseline()
        return harness.interleaved({"CtrStream.update_into": ours,
                                    "cryptography.update_into": baseline},
                                   n_rounds=n_rounds)

    n_rounds = harness.rounds(7)
    samples = benchmark.pedantic(run, rounds=1, iterations=1)
    # Same key, IV and byte count: both must stand at the same keystream point.
    assert stream.position == (n_rounds + 1) * n_chunks * CHUNK
    assert stream.update(b"\0" * 64) == raw.update(b"\0" * 64)
    ours_rate = harness.median(samples["CtrStream.update_into"]) / 1e6
    base_rate = harness.median(samples["cryptography.update_into"]) / 1e6
    vs_crypto = harness.record(harness.Comparison(
        suite=SUITE, name="ctr_update_into_64k", ours=ours_rate, baseline=base_rate,
        unit="MB/s", baseline_name="cryptography encryptor.update_into", target=0.97,
        extra={"chunk": CHUNK, "bytes_per_sample": n_chunks * CHUNK,
               "samples_ours": samples["CtrStream.update_into"],
               "samples_baseline": samples["cryptography.update_into"]}), benchmark)

    openssl = _openssl_rate()
    if openssl is not None:
        harness.record(harness.Comparison(
            suite=SUITE, name="ctr_vs_openssl_speed_64k", ours=ours_rate, baseline=openssl / 1e6,
            unit="MB/s", baseline_name="openssl speed -evp aes-256-ctr"), benchmark)
    harness.gate(vs_crypto)
