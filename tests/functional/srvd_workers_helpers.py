"""Helpers for tests of ``srvd --workers N`` (and R1): srvd whose sessions live in child processes.

- :class:`WorkersSrvd`: a :class:`~tests.functional.srvd_helpers.SrvdProcess` that can be given
  extra environment variables (``NOPORTS_NO_EXTENSIONS=1`` picks the pure pump in srvd and its
  workers) and whose ``listening_ports()``, FD and RSS figures cover the whole process tree,
  because with ``--workers`` the session ports are bound by the workers, not the main process.
- :func:`tree`, :func:`worker_pids`, :func:`owner_of_port`: the process tree seen through psutil.
- :func:`paced_send`: a transfer that takes a while (so a test can act while it is live).
- R1's processes (``python -c SCRIPT``):
  ``STORM_SCRIPT``, the asyncio (uvloop) storm generator of unauthenticated connections, and a
  Python stream source (paced or full speed) and sink that share their byte counts in a
  32-byte file.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import socket

import psutil

from tests.functional.srvd_helpers import SrvdProcess


@contextlib.contextmanager
def _environ(extra: dict[str, str] | None):
    """SrvdProcess copies os.environ when it starts the process: set ``extra`` around it."""
    saved = {k: os.environ.get(k) for k in (extra or {})}
    os.environ.update(extra or {})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class WorkersSrvd(SrvdProcess):
    """SrvdProcess with ``env`` additions and process-tree-wide ports, FDs and RSS."""

    def __init__(self, atserver, log_dir, *args: str, env: dict[str, str] | None = None,
                 **kw) -> None:
        with _environ(env):
            super().__init__(atserver, log_dir, *args, **kw)

    def processes(self) -> list[psutil.Process]:
        return tree(self.pid)

    def listening_ports(self) -> set[int]:
        ports: set[int] = set()
        for proc in self.processes():
            with contextlib.suppress(psutil.Error):
                ports |= {c.laddr.port for c in proc.net_connections(kind="tcp")
                          if c.status == psutil.CONN_LISTEN}
        return ports

    def num_fds(self) -> int:
        total = 0
        for proc in self.processes():
            with contextlib.suppress(psutil.Error):
                total += proc.num_fds()
        return total

    def rss(self) -> int:
        total = 0
        for proc in self.processes():
            with contextlib.suppress(psutil.Error):
                total += proc.memory_info().rss
        return total

    def worker_pids(self) -> list[int]:
        return worker_pids(self.pid)


def tree(pid: int) -> list[psutil.Process]:
    """``pid`` and its descendants that are alive."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def worker_pids(pid: int) -> list[int]:
    """The worker processes of srvd ``pid`` (``python -m noports.relay.worker``)."""
    pids = []
    for proc in tree(pid)[1:]:
        with contextlib.suppress(psutil.Error):
            if "noports.relay.worker" in proc.cmdline():
                pids.append(proc.pid)
    return pids


def owner_of_port(pids: list[int], port: int) -> int | None:
    """Which of ``pids`` listens on ``port``."""
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            for conn in psutil.Process(pid).net_connections(kind="tcp"):
                if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port:
                    return pid
    return None


async def paced_send(sock: socket.socket, nbytes: int, seed: int, chunks: int,
                     pause: float) -> str:
    """Send ``nbytes`` in ``chunks`` pieces ``pause`` s apart; half-close; return the sha256."""
    loop = asyncio.get_running_loop()
    rng = random.Random(seed)
    digest = hashlib.sha256()
    size = nbytes // chunks
    for i in range(chunks):
        block = rng.randbytes(size if i < chunks - 1 else nbytes - size * (chunks - 1))
        digest.update(block)
        await loop.sock_sendall(sock, block)
        await asyncio.sleep(pause)
    sock.shutdown(socket.SHUT_WR)
    return digest.hexdigest()


async def drain_socket(sock: socket.socket) -> tuple[int, str]:
    """Read until EOF or reset: (bytes read, "eof" | "reset")."""
    loop = asyncio.get_running_loop()
    total = 0
    while True:
        try:
            chunk = await loop.sock_recv(sock, 1 << 18)
        except (ConnectionResetError, BrokenPipeError):
            return total, "reset"
        if not chunk:
            return total, "eof"
        total += len(chunk)


# --- R1: the storm generator and the stream, each in its own process ------------------------
#
# Run with ``python -c SCRIPT args``: the scripts import nothing of ours, so they start in a
# fraction of a second even on a loaded machine, and the test process only coordinates (its
# event loop never competes with the generator for the GIL).

STORM_KINDS = ("silent", "garbage", "slowloris")

# The storm generator.  argv[1] is JSON: ports, host, source (the address the storm comes
# from), total, seconds (the launches are spread evenly over them), max_concurrent, nice,
# hold_max.  Connection i goes to ports[i % len(ports)] and is of kind STORM_KINDS[i % 3]:
# silent (held open until the relay drops it), garbage (one non-auth line, then wait for the
# relay to close), slowloris ("{" at connect, then one more byte every second, until the relay
# drops it).  At most max_concurrent of our sockets exist at once: a launch waits for a free
# place rather than exceed it (counted as gate_waits).  A socket the relay still holds after
# hold_max seconds is aborted and counted as held_too_long.  Protocol callbacks, one shared
# 1-byte/s drip timer and no task per open socket keep the generator's own CPU small.
# stdout: JSON lines {"event": "started"}, {"event": "launched", ...}, {"event": "done", ...}.
STORM_SCRIPT = r"""
import asyncio, collections, json, os, resource, socket, sys, time
cfg = json.loads(sys.argv[1])
# lowered CPU priority: see the docstring of tests/functional/test_r1_storm.py
os.nice(cfg["nice"])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
want = cfg["max_concurrent"] + 256
if soft < want:
    cap = want if hard == resource.RLIM_INFINITY else min(hard, want)
    resource.setrlimit(resource.RLIMIT_NOFILE, (cap, hard))
if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < want:
    sys.exit(f"RLIMIT_NOFILE {resource.getrlimit(resource.RLIMIT_NOFILE)} < {want}")
KINDS = ("silent", "garbage", "slowloris")
GARBAGE = b"GET / HTTP/1.1 not-an-auth-line\n"
REFUSAL = b"Socket auth failed"
# the source port is picked at connect(), per destination, not at bind(): no ephemeral-port
# shortage however many connections come from the one source address
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


class Storm:
    def __init__(self, loop):
        self.loop = loop
        self.gate = asyncio.Semaphore(cfg["max_concurrent"])
        self.live = self.peak = self.gate_waits = 0
        self.launched_all = False
        self.idle = asyncio.Event()
        self.outcomes = collections.Counter()
        self.held = {kind: [] for kind in KINDS}
        self.drips = collections.deque()      # (due, conn) of slowloris sockets, due order
        self.timeline = []                    # (second, live) once a second

    def opened(self):
        self.live += 1
        self.peak = max(self.peak, self.live)

    def closed(self, kind, how, held):
        self.live -= 1
        self.gate.release()
        self.outcomes[kind + ":" + how] += 1
        if held is not None:
            self.held[kind].append(held)
        if self.launched_all and self.live == 0:
            self.idle.set()

    async def one(self, i):
        kind = KINDS[i % 3]
        port = cfg["ports"][i % len(cfg["ports"])]
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.opened()
        try:
            sock.setblocking(False)
            try:
                sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            except OSError:
                pass
            sock.bind((cfg["source"], 0))
            await self.loop.sock_connect(sock, (cfg["host"], port))
            await self.loop.create_connection(lambda: Conn(self, kind), sock=sock)
        except OSError as exc:
            sock.close()
            self.closed(kind, "connect_failed:" + type(exc).__name__, None)

    async def drip(self):
        # slowloris: each socket gets one byte a second, from one timer for all of them
        while True:
            await asyncio.sleep(0.05)
            now = time.monotonic()
            drips = self.drips
            while drips and drips[0][0] <= now:
                due, conn = drips.popleft()
                if conn.transport is not None and not conn.transport.is_closing():
                    conn.transport.write(b"{")
                    drips.append((due + 1.0, conn))

    async def watch(self, start):
        while True:
            await asyncio.sleep(1.0)
            self.timeline.append((round(self.loop.time() - start), self.live))

    async def run(self):
        loop = self.loop
        total, seconds = cfg["total"], cfg["seconds"]
        dripper = loop.create_task(self.drip())
        tasks = set()
        lag = 0.0
        start = loop.time()
        watcher = loop.create_task(self.watch(start))
        print(json.dumps({"event": "started"}), flush=True)
        for i in range(total):
            delay = start + i * seconds / total - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                lag = max(lag, -delay)
            if self.gate.locked():
                self.gate_waits += 1
            await self.gate.acquire()
            task = loop.create_task(self.one(i))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        launched = loop.time() - start
        self.launched_all = True
        if self.live == 0:
            self.idle.set()
        print(json.dumps({"event": "launched", "seconds": round(launched, 2)}), flush=True)
        await self.idle.wait()
        dripper.cancel()
        watcher.cancel()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        held = {}
        for kind, times in self.held.items():
            times.sort()
            if times:
                held[kind] = {"p50_s": round(times[len(times) // 2], 2),
                              "min_s": round(times[0], 2), "max_s": round(times[-1], 2)}
        print(json.dumps({"event": "done", "launched_s": round(launched, 2),
                          "total_s": round(loop.time() - start, 2), "launch_lag_max_s":
                          round(lag, 3), "peak_concurrent": self.peak,
                          "gate_waits": self.gate_waits, "outcomes": dict(self.outcomes),
                          "held": held, "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
                          "nice": os.nice(0), "timeline": self.timeline}), flush=True)


class Conn(asyncio.Protocol):
    def __init__(self, storm, kind):
        self.storm = storm
        self.kind = kind
        self.transport = None
        self.head = b""
        self.how = None
        self.guard = None

    def connection_made(self, transport):
        self.transport = transport
        self.opened = time.monotonic()
        if self.kind == "garbage":
            transport.write(GARBAGE)
        elif self.kind == "slowloris":
            transport.write(b"{")
            self.storm.drips.append((self.opened + 1.0, self))
        self.guard = self.storm.loop.call_later(cfg["hold_max"], self.too_long)

    def data_received(self, data):
        if len(self.head) < len(REFUSAL):
            self.head += data

    def eof_received(self):
        return False                  # close our side too

    def too_long(self):
        self.how = "held_too_long"
        self.transport.abort()

    def connection_lost(self, exc):
        self.guard.cancel()
        how = self.how or ("reset" if exc is not None
                           else "refused" if self.head.startswith(REFUSAL) else "eof")
        held = time.monotonic() - self.opened
        self.storm.closed(self.kind, how, held)


try:
    import uvloop
    loop = uvloop.new_event_loop()
except ImportError:
    loop = asyncio.new_event_loop()
loop.run_until_complete(Storm(loop).run())
"""

# The stream's counters live in a shared 32-byte file: [0:8] bytes the sink got, [8:16] the
# source's stop flag, [16:24] bytes the source sent, [24:32] the source's pace in bytes per
# second (0 = as fast as it can).  A paced source sends one block per tick and makes up at
# most 50 ms of lag (its own scheduling jitter on a busy machine), never more, so a relay that
# stalls for longer than that (plus what the socket buffers absorb) loses throughput for good.
SOURCE_SCRIPT = r"""
import mmap, os, socket, struct, sys, time
path, port, first = sys.argv[1], int(sys.argv[2]), bytes.fromhex(sys.argv[3])
fd = os.open(path, os.O_RDWR)
mm = mmap.mmap(fd, 32)
sock = socket.create_connection(("127.0.0.1", port))
sock.sendall(first)
BLOCK = 128 * 1024
block = memoryview(bytes(range(256)) * (BLOCK // 256))
sent = 0
due = time.monotonic()
while not struct.unpack_from("<Q", mm, 8)[0]:
    sock.sendall(block)
    sent += BLOCK
    struct.pack_into("<Q", mm, 16, sent)
    pace = struct.unpack_from("<Q", mm, 24)[0]
    if pace:
        due += BLOCK / pace
        now = time.monotonic()
        if due > now:
            time.sleep(due - now)
        else:
            due = max(due, now - 0.05)
sock.shutdown(socket.SHUT_WR)
while sock.recv(65536):
    pass
"""

SINK_SCRIPT = r"""
import mmap, os, socket, struct, sys
path, port, first = sys.argv[1], int(sys.argv[2]), bytes.fromhex(sys.argv[3])
fd = os.open(path, os.O_RDWR)
mm = mmap.mmap(fd, 32)
sock = socket.create_connection(("127.0.0.1", port))
sock.sendall(first)
buf = bytearray(256 * 1024)
got = 0
while True:
    n = sock.recv_into(buf)
    if not n:
        break
    got += n
    struct.pack_into("<Q", mm, 0, got)
"""
