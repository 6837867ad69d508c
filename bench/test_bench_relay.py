"""One stream through the relay (pure pump) against `socat -b 131072`, same run, interleaved.

Each round moves one stream of 1 GiB (256 MiB under NOPORTS_BENCH_QUICK) from a source process
to a sink process, through:
- our relay: a RelaySession in its own process (``python -m bench.test_bench_relay serve``), on
  uvloop and on stock asyncio, a fresh session (two ports, two auth lines) per round;
- socat -b 131072 TCP-LISTEN:<p>,reuseaddr TCP:127.0.0.1:<sink port>, a fresh socat per round.
The source writes 256 KiB blocks with blocking sendall and half-closes; the sink reads into a
reused 256 KiB buffer until EOF.  Rate = bytes / (sink's EOF time - source's first send time),
both CLOCK_MONOTONIC.  Relay CPU per GB comes from psutil (ours) and wait4 rusage (socat).
No gate yet (issue 5 sets the target); the ratios are recorded.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from bench import harness

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

def serve(loop_kind: str) -> None:
    """Child process: a RelaySessions on 127.0.0.1; one JSON command per stdin line."""
    from noports.at.crypto import public_key_from_b64
    from noports.relay import DataPlaneConfig, RelaySessions
    from noports.relay.messages import parse_request_ports

    async def main() -> None:
        registry = RelaySessions(DataPlaneConfig(bind_host="127.0.0.1", pairing_timeout=120.0))
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while line := await reader.readline():
            cmd = json.loads(line)
            session = await registry.open(parse_request_ports(cmd["request"]),
                                          public_key_a=public_key_from_b64(cmd["pub_a"]),
                                          public_key_b=public_key_from_b64(cmd["pub_b"]))
            print(json.dumps({"port_a": session.port_a, "port_b": session.port_b,
                              "nonce": session.rvd_nonce}), flush=True)
        await registry.close()

    if loop_kind == "uvloop":
        import uvloop
        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    loop.run_until_complete(main())


class OurRelay:
    def __init__(self, loop_kind: str) -> None:
        from noports.at.atkeys import AtKeys
        self.keys_a, self.keys_b = AtKeys.generate("@bench_a"), AtKeys.generate("@bench_b")
        env = dict(os.environ, NOPORTS_NO_EXTENSIONS="1")     # the pure pump, always
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.test_bench_relay", "serve",
                                      loop_kind], cwd=REPO, env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        import psutil
        self.ps = psutil.Process(self.proc.pid)

    def cpu(self) -> float:
        t = self.ps.cpu_times()
        return t.user + t.system

    def round(self) -> tuple[float, int, float]:
        from noports.relay.messages import encode_auth_line
        sid, cnonce = str(uuid.uuid4()), time.strftime("%Y-%m-%dT%H:%M:%S.000000")
        request = json.dumps({"sessionId": sid, "atSignA": "@bench_a", "atSignB": "@bench_b",
                              "authenticateSocketA": True, "authenticateSocketB": True,
                              "clientNonce": cnonce})
        self.proc.stdin.write(json.dumps({"request": request,
                                          "pub_a": self.keys_a.encrypt_public_b64,
                                          "pub_b": self.keys_b.encrypt_public_b64}) + "\n")
        self.proc.stdin.flush()
        reply = json.loads(self.proc.stdout.readline())
        line_a = encode_auth_line(sid, cnonce, reply["nonce"], self.keys_a.encrypt_private)
        line_b = encode_auth_line(sid, cnonce, reply["nonce"], self.keys_b.encrypt_private)
        sink = _py(SINK, "connect", "127.0.0.1", reply["port_b"], line_b.hex())
        assert sink.stdout.readline().strip() == "connected"
        cpu0 = self.cpu()
        seconds, total = _stream(reply["port_a"], line_a, sink)
        return seconds, total, self.cpu() - cpu0

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def socat_round() -> tuple[float, int, float]:
    sink = _py(SINK, "listen", "127.0.0.1", 0, "-")
    sink_port = int(sink.stdout.readline())
    with socket.socket() as probe:       # a free port for socat to listen on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    socat = subprocess.Popen(["socat", "-b", "131072",
                              f"TCP-LISTEN:{port},reuseaddr,bind=127.0.0.1",
                              f"TCP:127.0.0.1:{sink_port}"])
    try:
        _wait_listening(port)
        seconds, total = _stream(port, b"", sink)
        _pid, _status, usage = os.wait4(socat.pid, 0)   # socat exits after its one connection
        socat.returncode = 0
    finally:
        if socat.returncode is None:
            socat.kill()
            socat.wait()
    return seconds, total, usage.ru_utime + usage.ru_stime


def _wait_listening(port: int) -> None:
    """Poll the kernel's table of listening sockets (no connection is made)."""
    needle = f":{port:04X} "
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with open("/proc/net/tcp") as table:
            if any(needle in line and line.split()[3] == "0A" for line in table):
                return
        time.sleep(0.005)
    raise TimeoutError(f"nothing listens on {port}")


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


if __name__ == "__main__" and len(sys.argv) >= 3 and sys.argv[1] == "serve":
    serve(sys.argv[2])
