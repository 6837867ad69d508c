"""R7(i) of reliability-checks.md, CI size: back-pressure through npt -> srvd -> npd.

A sender in this process writes as fast as the tunnel lets it into npt's local port; the service
behind npd (also in this process) reads at about 1 MB/s.  Every program on the path must push
back instead of buffering: sampled every second with psutil, the RSS growth of srvd, npt and
npd (each with its children) stays within 2 x 4 MiB per pair (the bounded per-direction buffer
of spec §10) + 10 MB.  Afterwards the receiver drains at full speed and the bytes must be
intact (sha256 of everything sent == of everything received).

The row asks for 60 s; CI runs 20 s (``NOPORTS_R7_SECONDS`` to change it): at 1 MB/s a buffer
that grows without bound has passed the limit well before that.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import signal
import sys
import time

import psutil
import pytest

from tests.functional.conftest import REPO, AtServerProcess
from tests.functional.npd_helpers import LoggedProcess, NpdProcess
from tests.functional.srvd_helpers import SrvdProcess

HOST = "127.0.0.1"
SECONDS = float(os.environ.get("NOPORTS_R7_SECONDS", "20"))
RATE = 1_000_000                       # receiver: bytes per second
CHUNK = 64 * 1024
MIB = 1024 * 1024
LIMIT = 2 * 4 * MIB + 10_000_000       # per program, one pair
SAMPLE_EVERY = 1.0

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def rss(pid: int) -> int:
    """RSS of a process and its children (a worker-based srvd counts whole)."""
    proc = psutil.Process(pid)
    total = proc.memory_info().rss
    for child in proc.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            total += child.memory_info().rss
    return total


class SlowSink:
    """The service behind npd: reads at RATE until told to drain, then at full speed."""

    def __init__(self) -> None:
        self.digest = hashlib.sha256()
        self.received = 0
        self.first_byte = asyncio.Event()
        self.done = asyncio.Event()
        self.full_speed = asyncio.Event()
        self.server: asyncio.base_events.Server | None = None
        self.port = 0

    async def start(self) -> SlowSink:
        self.server = await asyncio.start_server(self._serve, HOST, 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        t0 = time.monotonic()
        try:
            while True:
                data = await reader.read(CHUNK)
                if not data:
                    break
                self.digest.update(data)
                self.received += len(data)
                self.first_byte.set()
                if not self.full_speed.is_set():
                    # pacing, not synchronisation: this reader is slow on purpose
                    ahead = t0 + self.received / RATE - time.monotonic()
                    if ahead > 0:
                        with contextlib.suppress(asyncio.TimeoutError):
                            await asyncio.wait_for(self.full_speed.wait(), ahead)
        finally:
            self.done.set()
            writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tmp_path_factory.mktemp("r7")


def test_r7_backpressure_npt_srvd_npd(base, run, record_property):
    atserver = AtServerProcess(base, ["@client", "@daemon", "@relay"], keys=True).start()
    srvd = npd = npt = None
    try:
        srvd = SrvdProcess(atserver, base, atsign="@relay").ready()
        npd = NpdProcess(atserver, base, "--permit-open", f"{HOST}:*", atsign="@daemon",
                         managers="@client", device="r7").ready()
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        env.pop("NOPORTS_CA_FILE", None)
        env.pop("NOPORTS_KEYLOGFILE", None)

        async def main():
            nonlocal npt
            sink = await SlowSink().start()
            npt = LoggedProcess(
                [sys.executable, "-m", "noports.client", "-f", "@client", "-t", "@daemon",
                 "-r", "@relay", "-d", "r7", "-p", str(sink.port), "-h", HOST, "-T", "1h",
                 "-k", str(atserver.keys_dir / "@client_key.atKeys"),
                 "--root-domain", f"{HOST}:{atserver.root_port}",
                 "--ca-file", str(atserver.ca_file)],
                base / "npt-r7.log", capture_stdout=True, env=env)
            loop = asyncio.get_running_loop()
            try:
                port = int(await loop.run_in_executor(
                    None, lambda: npt.wait_stdout(r"^\d+$", 60)))
                procs = {"srvd": srvd.pid, "npt": npt.pid, "npd": npd.pid}
                _reader, writer = await asyncio.open_connection(HOST, port)
                sent = hashlib.sha256()
                sent_bytes = 0
                stop_sending = asyncio.Event()

                async def send() -> None:
                    nonlocal sent_bytes
                    while not stop_sending.is_set():
                        block = os.urandom(CHUNK)
                        sent.update(block)
                        sent_bytes += len(block)
                        writer.write(block)
                        await writer.drain()      # blocks while the path pushes back
                    writer.write_eof()

                # before the first byte: the path's buffers filling up counts as growth
                baseline = {name: rss(pid) for name, pid in procs.items()}
                peak = dict(baseline)
                sender = asyncio.ensure_future(send())
                await asyncio.wait_for(sink.first_byte.wait(), 30)
                t_end = time.monotonic() + SECONDS
                while time.monotonic() < t_end:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(asyncio.shield(sender), SAMPLE_EVERY)
                    assert not sender.done(), sender.exception()
                    for name, pid in procs.items():
                        peak[name] = max(peak[name], rss(pid))
                at_stop = sink.received
                stop_sending.set()
                sink.full_speed.set()
                await asyncio.wait_for(sender, 30)
                await asyncio.wait_for(sink.done.wait(), 60)
                writer.close()
                return baseline, peak, at_stop, sent_bytes, sent.hexdigest(), \
                    sink.received, sink.digest.hexdigest()
            finally:
                await sink.close()

        baseline, peak, at_stop, sent_bytes, sent_hash, got_bytes, got_hash = \
            run(main(), timeout=SECONDS + 150)
        growth = {name: peak[name] - baseline[name] for name in peak}
        record_property("r7", {"seconds": SECONDS, "growth_bytes": growth,
                               "received_at_stop": at_stop, "sent": sent_bytes})
        # the receiver really was the bottleneck: about RATE x SECONDS (not far more)
        assert at_stop <= RATE * (SECONDS + 2)
        assert at_stop >= RATE * SECONDS * 0.5
        for name, grew in growth.items():
            assert grew <= LIMIT, f"{name} RSS grew {grew / MIB:.1f} MiB (limit " \
                                  f"{LIMIT / MIB:.1f} MiB): {growth}"
        assert got_bytes == sent_bytes
        assert got_hash == sent_hash
        npt.signal(signal.SIGINT)
        assert npt.wait(15) == 0
        assert re.search(r"stopping on request", "\n".join(npt.lines()))
    finally:
        if npt is not None and npt.alive():
            npt.kill()
        for proc in (npd, srvd):
            if proc is not None:
                proc.stop()
        atserver.stop()
