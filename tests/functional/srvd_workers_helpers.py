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

STORM_SCRIPT = r"""
import asyncio, json, resource, socket, sys, time
from collections import Counter
_soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
cfg = json.loads(sys.argv[1])
KINDS = ("silent", "garbage", "slowloris")
GARBAGE = b"GET / HTTP/1.1 not-an-auth-line\n"

async def until_closed(loop, sock):
    data = b""
    while True:
        try:
            chunk = await loop.sock_recv(sock, 4096)
        except (ConnectionResetError, BrokenPipeError):
            return "reset"
        if not chunk:
            return "refused" if data.startswith(b"Socket auth failed") else "eof"
        data += chunk

async def storm(ports, total, rate, max_concurrent, hold_max=30.0):
    # total unauthenticated connections, launched at `rate` per second, at most
    # `max_concurrent` open at once; kinds in turn: silent (held until the relay drops it),
    # a garbage line, slowloris (1 byte per second until dropped)
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(max_concurrent)
    outcomes = Counter()
    live = peak = 0
    held = []

    async def one(i):
        nonlocal live, peak
        kind = KINDS[i % 3]
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            try:
                await loop.sock_connect(sock, ("127.0.0.1", ports[i % len(ports)]))
            except OSError:
                outcomes["connect_failed"] += 1
                return
            live += 1
            peak = max(peak, live)
            opened = time.monotonic()
            closer = loop.create_task(until_closed(loop, sock))
            try:
                if kind == "garbage":
                    await loop.sock_sendall(sock, GARBAGE)
                elif kind == "slowloris":
                    while not closer.done():
                        await loop.sock_sendall(sock, b"{")
                        await asyncio.wait({closer}, timeout=1.0)
                how = await asyncio.wait_for(closer, hold_max)
            except (OSError, asyncio.TimeoutError) as exc:
                closer.cancel()
                how = "reset" if isinstance(exc, OSError) else "held_too_long"
            outcomes[kind + ":" + how] += 1
            if kind != "garbage":
                held.append(time.monotonic() - opened)
            live -= 1
        finally:
            sock.close()
            gate.release()

    start = loop.time()
    print(json.dumps({"event": "started"}), flush=True)
    tasks = []
    for i in range(total):
        await gate.acquire()
        delay = start + i / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(loop.create_task(one(i)))
    launched = loop.time() - start
    print(json.dumps({"event": "launched", "seconds": launched}), flush=True)
    await asyncio.gather(*tasks)
    held.sort()
    print(json.dumps({"event": "done", "launched_s": round(launched, 2),
                      "total_s": round(loop.time() - start, 2), "peak_concurrent": peak,
                      "outcomes": dict(outcomes),
                      "held_max_s": round(held[-1], 2) if held else 0.0,
                      "held_p50_s": round(held[len(held) // 2], 2) if held else 0.0}),
          flush=True)

try:
    import uvloop
    loop = uvloop.new_event_loop()
except ImportError:
    loop = asyncio.new_event_loop()
loop.run_until_complete(storm(**cfg))
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
