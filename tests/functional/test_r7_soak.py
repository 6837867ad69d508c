"""R7(ii) of reliability-checks.md: the soak -- churn + one long stream + benign toxics.

Every program is a real process on 127.0.0.1: an atserver, ``srvd`` (``SrvdProcess``), ``npd``
(``NpdProcess``) and ``npt``.  For ``NOPORTS_SOAK_SECONDS`` (default 180 = the CI form; the
nightly job sets 1800) this test runs at once:

- **one long stream**: one ``npt -x`` session whose single connection carries a paced,
  pseudo-random stream to an echo service behind npd for the whole run; sha256 of everything
  sent == of everything echoed, checked at the end.
- **relay churn at 5 sessions/s**: a full session set-up per tick (``request_ports``
  notification, the relay's reply, both sides' auth lines with real keys, a small transfer both
  ways, sha256 checked) as ``srvd_helpers.RelayUser`` does.  About a third of them go through
  a ``ToxicProxy`` in front of srvd's port A with one random benign toxic (latency, slicer over
  the auth line, bandwidth, slow close).
- **full npt churn at a lower rate**: a whole ``npt -x`` run (process start, atserver auth,
  relay, ping, request, tunnel) plus a small echo through it, one after another with at least
  ``NOPORTS_SOAK_NPT_INTERVAL`` s (default 2) between starts: on a 2-core machine an npt process
  start costs about 0.3-0.6 s of CPU, so 5 of them per second cannot be sustained next to
  everything else.  The achieved rates are printed and recorded.

psutil samples RSS and FD counts of atserver, srvd, npd and the long stream's npt background
process (each with its children) every 5 s.  Pass criteria, the row's, scaled to the run:
warm-up = the first 20 % but at least 150 s (measured: srvd's and the atServer's RSS still
rise for 3-5 minutes while the allocator arenas, SQLite's page cache and the bounded AtKey parse
caches fill, then level off; a leak hunt with tracemalloc found no accumulating objects);
RSS slope after warm-up (least squares) <= 5 MB per 10 min for every
process; FDs within +/- 10 of the post-warm-up baseline; 0 errors; set-up p99 of the last fifth
<= 1.5 x the first fifth's.

FDs are compared quiescent to quiescent: at the end of warm-up and at the end of the run the
churn pauses, the test waits (bounded) until srvd holds no session ports but the long stream's
and every churned npt has ended, then counts.  Counting in the middle of churn would measure
the number of sessions in flight, not a leak.

Set-up time of a relay session = from sending ``request_ports`` to the first byte arriving
through the paired sockets; the drift criterion uses the sessions without a toxic (the toxics
add their own, random, delay; the toxic sessions' p99 is reported too).  npt set-up = the
``npt -x`` run until it printed its port (its p99 drift is reported, and asserted only when
each fifth has at least 5 runs).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

import psutil
import pytest

from noports.relay.messages import encode_auth_line
from tests.functional.conftest import REPO, AtServerProcess
from tests.functional.npd_helpers import NpdProcess, start_echo_server
from tests.functional.relay_helpers import connect, send_random
from tests.functional.srvd_helpers import RelayUser, SrvdProcess
from tests.functional.toxic import Bandwidth, Latency, Slicer, SlowClose, ToxicProxy

HOST = "127.0.0.1"
SECONDS = float(os.environ.get("NOPORTS_SOAK_SECONDS", "180"))
NPT_INTERVAL = float(os.environ.get("NOPORTS_SOAK_NPT_INTERVAL", "2"))
RELAY_RATE = 5.0                    # relay sessions started per second
MAX_IN_FLIGHT = 40                  # a tick that finds this many still running is a shortfall
TOXIC_SHARE = 1 / 3                 # of the relay sessions, through a toxic proxy
SESSION_BYTES = 32 * 1024           # each way, per relay session
NPT_BYTES = 64 * 1024               # echoed, per churned npt session
STREAM_RATE = 256 * 1024            # bytes/s of the long stream
STREAM_CHUNK = 16 * 1024
SAMPLE_EVERY = 5.0
WARMUP = 0.2                        # share of the run
MIN_WARMUP = 150.0                  # seconds: below this the allocators are still warming up
SESSION_TIMEOUT = 30.0
NPT_TIMEOUT = 60.0
PAIRING_WINDOW = 3.0                # srvd --pairing-timeout: unpaired/ended sessions go soon
MB = 1_000_000
RSS_SLOPE_LIMIT = 5.0               # MB per 10 min
FD_TOLERANCE = 10
P99_DRIFT = 1.5
CLIENT, DAEMON, RELAY, CHURN = "@client", "@daemon", "@relay", "@churn"
DEVICE = "soak"

pytestmark = [pytest.mark.soak, pytest.mark.slow,
              pytest.mark.timeout(int(SECONDS * 1.5) + 300)]


# --- measurements ------------------------------------------------------------------------------

def tree(pid: int) -> list[psutil.Process]:
    proc = psutil.Process(pid)
    return [proc, *proc.children(recursive=True)]


def rss_and_fds(pid: int) -> tuple[int, int]:
    """RSS (bytes) and open FDs of a process with its children."""
    rss = fds = 0
    for p in tree(pid):
        with contextlib.suppress(psutil.NoSuchProcess, psutil.ZombieProcess):
            rss += p.memory_info().rss
            fds += p.num_fds()
    return rss, fds


def slope_mb_per_10min(points: list[tuple[float, int]]) -> float:
    """Least-squares slope of (seconds, bytes) in MB per 10 minutes."""
    n = len(points)
    if n < 2:
        return 0.0
    mt = sum(t for t, _ in points) / n
    mv = sum(v for _, v in points) / n
    var = sum((t - mt) ** 2 for t, _ in points)
    if var == 0:
        return 0.0
    cov = sum((t - mt) * (v - mv) for t, v in points)
    return cov / var * 600 / MB


def p99(values: list[float]) -> float:
    """99th percentile, linear interpolation between order statistics."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * 0.99
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def fifths(records: list[tuple[float, float]], t0: float, t1: float) -> tuple[list, list]:
    """(values started in the first fifth of [t0, t1], values started in the last fifth)."""
    span = (t1 - t0) / 5
    first = [v for t, v in records if t < t0 + span]
    last = [v for t, v in records if t >= t1 - span]
    return first, last


@dataclass
class Soak:
    """What the churners and the sampler collect."""

    errors: list[str] = field(default_factory=list)
    relay_setups: list[tuple[float, float, bool]] = field(default_factory=list)  # t, s, toxic
    npt_setups: list[tuple[float, float]] = field(default_factory=list)
    samples: dict[str, list[tuple[float, int, int]]] = field(default_factory=dict)
    relay_started: int = 0
    relay_done: int = 0
    relay_shortfall: int = 0
    npt_done: int = 0
    toxics: dict[str, int] = field(default_factory=dict)
    npt_pids: list[int] = field(default_factory=list)
    in_flight: set = field(default_factory=set)


# --- the programs ------------------------------------------------------------------------------

def npt_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("NOPORTS_CA_FILE", None)
    env.pop("NOPORTS_KEYLOGFILE", None)
    return env


@dataclass
class NptRun:
    returncode: int
    stderr: str
    port: int | None
    pid: int | None
    relay_ports: tuple[int, int] | None
    elapsed: float


def run_npt_x(atserver: AtServerProcess, target_port: int, idle: str) -> NptRun:
    """One ``npt -x`` (blocking; call from a thread): its port, background pid, relay ports."""
    cmd = [sys.executable, "-m", "noports.client", "-f", CLIENT, "-t", DAEMON, "-r", RELAY,
           "-d", DEVICE, "-k", str(atserver.keys_dir / f"{CLIENT}_key.atKeys"),
           "--root-domain", f"{HOST}:{atserver.root_port}", "--ca-file", str(atserver.ca_file),
           "-p", str(target_port), "-h", HOST, "-T", idle, "-x"]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=NPT_TIMEOUT,
                          cwd=str(REPO), env=npt_env(), stdin=subprocess.DEVNULL)
    elapsed = time.monotonic() - t0
    lines = proc.stdout.splitlines()
    port = int(lines[-1]) if proc.returncode == 0 and lines and lines[-1].isdigit() else None
    m = re.search(r"in the background as pid (\d+)", proc.stderr)
    pid = int(m.group(1)) if m else None
    m = re.search(r"gave \S+ ports (\d+)/(\d+)", proc.stderr)
    ports = (int(m.group(1)), int(m.group(2))) if m else None
    return NptRun(proc.returncode, proc.stderr, port, pid, ports, elapsed)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def kill_pid(pid: int) -> None:
    """Teardown of an npt background process (not our child): SIGTERM, then SIGKILL."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 5
    while not gone(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if not gone(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


async def until(predicate, timeout: float, what: str) -> None:
    """Wait (bounded) for state that has no event of its own."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.1)


# --- the long stream -----------------------------------------------------------------------------

class LongStream:
    """One connection through the long npt session to the echo service, paced at STREAM_RATE;
    both directions hashed as they go."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sent = hashlib.sha256()
        self.got = hashlib.sha256()
        self.sent_bytes = 0
        self.got_bytes = 0
        self.stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> LongStream:
        self.reader, self.writer = await asyncio.open_connection(HOST, self.port)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._send()), loop.create_task(self._receive())]
        return self

    async def _send(self) -> None:
        rng = random.Random(7)
        t0 = time.monotonic()
        while not self.stop.is_set():
            block = rng.randbytes(STREAM_CHUNK)
            self.sent.update(block)
            self.sent_bytes += len(block)
            self.writer.write(block)
            await self.writer.drain()
            # pacing, not synchronisation: the stream is meant to run at STREAM_RATE
            ahead = t0 + self.sent_bytes / STREAM_RATE - time.monotonic()
            if ahead > 0:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), ahead)
        self.writer.write_eof()

    async def _receive(self) -> None:
        while True:
            data = await self.reader.read(1 << 18)
            if not data:
                return
            self.got.update(data)
            self.got_bytes += len(data)

    def check_alive(self) -> None:
        for task in self._tasks:
            if task.done() and task.exception() is not None:
                raise AssertionError(f"long stream failed: {task.exception()!r}")
        assert not self._tasks[1].done(), "long stream ended early (EOF from the tunnel)"

    async def finish(self, timeout: float = 60.0) -> None:
        self.stop.set()
        await asyncio.wait_for(asyncio.gather(*self._tasks), timeout)
        self.writer.close()

    async def abort(self) -> None:
        for task in self._tasks:
            task.cancel()
        with contextlib.suppress(Exception):
            self.writer.close()


# --- relay churn: one session -----------------------------------------------------------------

BENIGN = [
    ("latency", lambda: Latency(ms=50, jitter_ms=25)),
    ("slicer", lambda: Slicer(min_size=1, max_size=7, min_delay_ms=0, max_delay_ms=2,
                              start=0, stop=700)),        # the auth line and the first bytes
    ("bandwidth", lambda: Bandwidth(256 * 1024)),
    ("slow_close", lambda: SlowClose(delay=0.5)),
]


async def relay_session(user: RelayUser, atserver: AtServerProcess, soak: Soak, seq: int,
                        rng: random.Random, keys_a, keys_b) -> None:
    loop = asyncio.get_running_loop()
    toxic = None
    if rng.random() < TOXIC_SHARE:
        toxic = rng.choice(BENIGN)
    proxy = None
    a = b = None
    t0 = time.monotonic()
    try:
        body = user.body(DAEMON)
        sid = await user.request(body, device=DEVICE)
        reply = await user.parsed_reply(sid, SESSION_TIMEOUT)
        port_a = reply.port_a
        if toxic is not None:
            proxy = ToxicProxy(reply.port_a, seed=rng.randrange(1 << 30))
            await proxy.start()
            proxy.add(toxic[1]())
            port_a = proxy.port
            soak.toxics[toxic[0]] = soak.toxics.get(toxic[0], 0) + 1
        line_a = encode_auth_line(sid, body["clientNonce"], reply.rvd_nonce,
                                  keys_a.encrypt_private)
        line_b = encode_auth_line(sid, body["clientNonce"], reply.rvd_nonce,
                                  keys_b.encrypt_private)
        a = await connect(port_a, line_a, host=HOST)
        b = await connect(reply.port_b, line_b, host=HOST)
        first: list[float] = []

        async def receive(sock: socket.socket) -> tuple[int, str]:
            digest = hashlib.sha256()
            total = 0
            while True:
                chunk = await loop.sock_recv(sock, 1 << 18)
                if not chunk:
                    return total, digest.hexdigest()
                if not first:
                    first.append(time.monotonic())
                total += len(chunk)
                digest.update(chunk)

        sent_ab, sent_ba, got_b, got_a = await asyncio.wait_for(asyncio.gather(
            send_random(a, SESSION_BYTES, seq * 2), send_random(b, SESSION_BYTES, seq * 2 + 1),
            receive(b), receive(a)), SESSION_TIMEOUT)
        if got_b != (SESSION_BYTES, sent_ab) or got_a != (SESSION_BYTES, sent_ba):
            raise AssertionError(f"data mismatch: A->B {got_b[0]} B, B->A {got_a[0]} B")
        soak.relay_setups.append((t0, first[0] - t0, toxic is not None))
        soak.relay_done += 1
    except Exception as exc:
        name = toxic[0] if toxic else "none"
        soak.errors.append(f"relay session {seq} (toxic {name}): {exc!r}")
    finally:
        for sock in (a, b):
            if sock is not None:
                sock.close()
        if proxy is not None:
            if proxy.errors:
                soak.errors.append(f"proxy of relay session {seq}: {proxy.errors!r}")
            await proxy.close()


async def relay_churn(user: RelayUser, atserver: AtServerProcess, soak: Soak, seconds: float,
                      rng: random.Random) -> None:
    """Start a relay session every 1/RELAY_RATE s for ``seconds``; await them all."""
    loop = asyncio.get_running_loop()
    keys_a, keys_b = atserver.keys(CHURN), atserver.keys(DAEMON)
    t0 = time.monotonic()
    ticks = int(seconds * RELAY_RATE)
    for i in range(ticks):
        # pacing, not synchronisation: the churn rate is the subject of the test
        delay = t0 + i / RELAY_RATE - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        if len(soak.in_flight) >= MAX_IN_FLIGHT:
            soak.relay_shortfall += 1
            continue
        soak.relay_started += 1
        task = loop.create_task(relay_session(user, atserver, soak, soak.relay_started, rng,
                                              keys_a, keys_b))
        soak.in_flight.add(task)
        task.add_done_callback(soak.in_flight.discard)
    if soak.in_flight:
        await asyncio.wait(list(soak.in_flight), timeout=SESSION_TIMEOUT + 10)


async def npt_churn(atserver: AtServerProcess, echo_port: int, soak: Soak,
                    seconds: float) -> None:
    """Whole npt sessions one after another (>= NPT_INTERVAL s apart) for ``seconds``."""
    loop = asyncio.get_running_loop()
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        started = time.monotonic()
        n += 1
        try:
            run = await loop.run_in_executor(None, run_npt_x, atserver, echo_port, "2s")
            if run.pid is not None:
                soak.npt_pids.append(run.pid)
            if run.returncode != 0 or run.port is None:
                raise AssertionError(f"npt -x exit {run.returncode}: {run.stderr[-800:]}")
            payload = random.Random(n).randbytes(NPT_BYTES)
            reader, writer = await asyncio.open_connection(HOST, run.port)
            try:
                writer.write(payload)
                writer.write_eof()
                echoed = await asyncio.wait_for(reader.read(-1), SESSION_TIMEOUT)
            finally:
                writer.close()
            if echoed != payload:
                raise AssertionError(f"echo through npt: {len(echoed)} of {NPT_BYTES} B, "
                                     f"equal={echoed == payload}")
            soak.npt_setups.append((started, run.elapsed))
            soak.npt_done += 1
        except Exception as exc:
            soak.errors.append(f"npt session {n}: {exc!r}")
        # pacing, not synchronisation: the npt churn rate
        rest = started + NPT_INTERVAL - time.monotonic()
        if rest > 0:
            await asyncio.sleep(min(rest, max(0.0, end - time.monotonic())))


# --- sampling and quiescence -----------------------------------------------------------------

async def sampler(procs: dict[str, int], soak: Soak, stop: asyncio.Event) -> None:
    for name in procs:
        soak.samples[name] = []
    while True:
        now = time.monotonic()
        for name, pid in procs.items():
            try:
                rss, fds = rss_and_fds(pid)
            except psutil.NoSuchProcess:
                soak.errors.append(f"{name} (pid {pid}) is gone")
                return
            soak.samples[name].append((now, rss, fds))
        # the sampling period is the subject (psutil every 5 s), not a wait for an event
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), SAMPLE_EVERY)
        if stop.is_set():
            return


async def quiescent_fds(procs: dict[str, int], srvd: SrvdProcess, long_ports: set[int],
                        soak: Soak) -> dict[str, int]:
    """Once churn has stopped: wait until srvd holds only the long session's ports and every
    churned npt ended; then FD counts that held still for two readings 0.5 s apart."""
    await until(lambda: not (srvd.session_ports() - long_ports), PAIRING_WINDOW + 20,
                "srvd to close the churned sessions' ports")
    await until(lambda: all(gone(pid) for pid in soak.npt_pids), 30,
                "the churned npt background processes to end")
    previous = None
    deadline = time.monotonic() + 20
    while True:
        counts = {name: rss_and_fds(pid)[1] for name, pid in procs.items()}
        if counts == previous or time.monotonic() > deadline:
            return counts
        previous = counts
        await asyncio.sleep(0.5)       # two readings apart in time: a settled count


# --- the test ----------------------------------------------------------------------------------

def test_r7_soak_churn_long_stream_benign_toxics(tmp_path, run, record_property):
    base = tmp_path
    atserver = AtServerProcess(base, [CLIENT, DAEMON, RELAY, CHURN], keys=True).start()
    srvd = npd = None
    long_pid: int | None = None
    soak = Soak()
    rng = random.Random(int(os.environ.get("NOPORTS_SOAK_SEED", str(random.randrange(1 << 30)))))
    warmup = min(max(SECONDS * WARMUP, MIN_WARMUP), SECONDS * 0.8)
    try:
        srvd = SrvdProcess(atserver, base, "--pairing-timeout", str(PAIRING_WINDOW),
                           atsign=RELAY).ready()
        npd = NpdProcess(atserver, base, "--permit-open", f"{HOST}:*", atsign=DAEMON,
                         managers=CLIENT, device=DEVICE).ready()

        async def main():
            nonlocal long_pid
            loop = asyncio.get_running_loop()
            echo = await start_echo_server()
            stream = None
            stop_sampling = asyncio.Event()
            sampler_task = None
            try:
                long_run = await loop.run_in_executor(None, run_npt_x, atserver, echo.port,
                                                      "1h")
                long_pid = long_run.pid
                assert long_run.returncode == 0 and long_run.port, long_run.stderr
                assert long_pid is not None and long_run.relay_ports is not None
                long_ports = set(long_run.relay_ports)
                stream = await LongStream(long_run.port).start()
                procs = {"atserver": atserver.proc.pid, "srvd": srvd.pid, "npd": npd.pid,
                         "npt": long_pid}
                sampler_task = loop.create_task(sampler(procs, soak, stop_sampling))
                t_start = time.monotonic()
                async with RelayUser(atserver, CHURN, RELAY) as user:
                    async def churn(seconds: float) -> None:
                        await asyncio.gather(relay_churn(user, atserver, soak, seconds, rng),
                                             npt_churn(atserver, echo.port, soak, seconds))
                        stream.check_alive()

                    await churn(warmup)
                    t_warm = time.monotonic()
                    fds_base = await quiescent_fds(procs, srvd, long_ports, soak)
                    await churn(SECONDS - warmup)
                    t_end = time.monotonic()
                    fds_end = await quiescent_fds(procs, srvd, long_ports, soak)
                stream.check_alive()
                await stream.finish()
                stop_sampling.set()
                await sampler_task
                return t_start, t_warm, t_end, fds_base, fds_end, stream
            finally:
                stop_sampling.set()
                if sampler_task is not None and not sampler_task.done():
                    sampler_task.cancel()
                if stream is not None and not stream.stop.is_set():
                    await stream.abort()
                await echo.close()

        wall0 = time.monotonic()
        t_start, t_warm, t_end, fds_base, fds_end, stream = run(main(), timeout=SECONDS * 1.4
                                                                 + 240)
        wall = time.monotonic() - wall0

        # --- figures
        churn_seconds = SECONDS       # the pause for the quiescent FD count is not churn time
        rss_slope = {}
        rss_mb = {}
        for name, rows in soak.samples.items():
            after = [(t, rss) for t, rss, _ in rows if t >= t_warm]
            rss_slope[name] = round(slope_mb_per_10min(after), 2)
            rss_mb[name] = (round(rows[0][1] / MB, 1), round(rows[-1][1] / MB, 1))
        clean = [(t, s) for t, s, toxic in soak.relay_setups if not toxic]
        toxic = [(t, s) for t, s, toxic in soak.relay_setups if toxic]
        c_first, c_last = fifths(clean, t_start, t_end)
        x_first, x_last = fifths(toxic, t_start, t_end)
        n_first, n_last = fifths(soak.npt_setups, t_start, t_end)
        figures = {
            "seconds": SECONDS, "wall_seconds": round(wall, 1),
            "relay_sessions": soak.relay_done, "relay_started": soak.relay_started,
            "relay_rate_per_s": round(soak.relay_done / churn_seconds, 2),
            "relay_shortfall_ticks": soak.relay_shortfall,
            "toxic_sessions": dict(soak.toxics),
            "npt_sessions": soak.npt_done,
            "npt_rate_per_s": round(soak.npt_done / churn_seconds, 3),
            "long_stream_bytes": stream.sent_bytes,
            "errors": len(soak.errors),
            "rss_mb_first_last": rss_mb,
            "rss_slope_mb_per_10min": rss_slope,
            "fds_baseline": fds_base, "fds_end": fds_end,
            "relay_setup_p99_ms": {"first": round(p99(c_first) * 1e3, 1),
                                   "last": round(p99(c_last) * 1e3, 1),
                                   "n": (len(c_first), len(c_last))},
            "toxic_setup_p99_ms": {"first": round(p99(x_first) * 1e3, 1),
                                   "last": round(p99(x_last) * 1e3, 1),
                                   "n": (len(x_first), len(x_last))},
            "npt_setup_p99_ms": {"first": round(p99(n_first) * 1e3, 1),
                                 "last": round(p99(n_last) * 1e3, 1),
                                 "n": (len(n_first), len(n_last))},
            "samples": len(next(iter(soak.samples.values()), [])),
        }
        record_property("r7_soak", figures)
        print("\nR7(ii) soak:")
        for key, value in figures.items():
            print(f"  {key}: {value}")
        for name, rows in soak.samples.items():
            series = " ".join(f"{rss / MB:.1f}" for _, rss, _ in rows)
            print(f"  rss_mb[{name}] every {SAMPLE_EVERY:.0f} s: {series}")
        for err in soak.errors[:20]:
            print(f"  ERROR {err}")

        # --- criteria
        assert not soak.errors, f"{len(soak.errors)} errors, first: {soak.errors[:5]}"
        assert stream.got_bytes == stream.sent_bytes
        assert stream.got.hexdigest() == stream.sent.hexdigest()
        assert soak.relay_done >= 0.9 * RELAY_RATE * SECONDS, \
            f"relay churn fell short of {RELAY_RATE}/s: {figures['relay_rate_per_s']}/s"
        assert soak.npt_done >= 1
        for name, slope in rss_slope.items():
            assert slope <= RSS_SLOPE_LIMIT, \
                f"{name} RSS grows {slope} MB/10 min after warm-up: {rss_slope}"
        for name in fds_base:
            assert abs(fds_end[name] - fds_base[name]) <= FD_TOLERANCE, \
                f"{name} FDs {fds_base[name]} -> {fds_end[name]}"
        assert len(c_first) >= 10 and len(c_last) >= 10
        assert p99(c_last) <= P99_DRIFT * p99(c_first), figures["relay_setup_p99_ms"]
        if len(n_first) >= 5 and len(n_last) >= 5:
            assert p99(n_last) <= P99_DRIFT * p99(n_first), figures["npt_setup_p99_ms"]
        # the servers did not log a crash while churning
        assert srvd.count("Traceback") == 0
        assert npd.count("Traceback") == 0
    finally:
        if long_pid is not None:
            kill_pid(long_pid)
        for pid in soak.npt_pids:
            if not gone(pid):
                kill_pid(pid)
        for proc in (npd, srvd):
            if proc is not None:
                proc.stop()
        atserver.stop()
