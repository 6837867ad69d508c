"""Loopback plumbing the suites share: ports, connections, helper processes, the echo far end.

Set-up and far ends only, all on 127.0.0.1: what is timed, and how figures are compared, stays
in the suites and in bench/harness.py.  Child processes of the suites import this module too,
so it imports nothing heavy.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import Coroutine

HOST = "127.0.0.1"

#: The ping-pong message size of every suite that measures round trips.
PING = 64


# --- ports and connections -----------------------------------------------------------------

def free_port() -> int:
    """A port nothing listens on right now, for a program that must be told where to listen."""
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def connect(port: int, first: bytes = b"", retry: float = 0.0) -> socket.socket:
    """A blocking TCP_NODELAY connection to 127.0.0.1:``port`` with ``first`` written on it.

    ``retry``: seconds to keep trying while the port refuses (socat opens its second listener
    only once the first has its connection)."""
    deadline = time.monotonic() + retry
    while True:
        try:
            sock = socket.create_connection((HOST, port), timeout=10)
            break
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.002)       # the listener is still starting: poll its port
    sock.settimeout(None)   # plain blocking calls: a timeout adds a poll() to every send/recv
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if first:
        sock.sendall(first)
    return sock


def wait_listening(port: int, timeout: float = 10.0) -> None:
    """Poll the kernel's table of IPv4 listening sockets: no connection is made, so a one-shot
    listener (socat without ``fork``, ``iperf3 -s -1``) still has its one connection to give."""
    needle = f":{port:04X} "
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open("/proc/net/tcp") as table:
            if any(needle in line and line.split()[3] == "0A" for line in table):
                return
        time.sleep(0.005)
    raise TimeoutError(f"nothing listens on {port}")


def wait_connectable(port: int, timeout: float = 15.0) -> None:
    """Poll with connections until 127.0.0.1:``port`` accepts one.  For servers that serve many
    connections and may listen on ``::`` only (``iperf3 -s``), which /proc/net/tcp does not
    list."""
    deadline = time.monotonic() + timeout
    while True:
        with socket.socket() as s:
            if s.connect_ex((HOST, port)) == 0:
                return
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listens on {port}")
        time.sleep(0.01)


# --- helper processes ------------------------------------------------------------------------

def stop(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """Wait for a helper process to exit, after closing its stdin (the cue to exit of those that
    have one); kill it if it lingers."""
    try:
        if proc.stdin is not None:
            proc.stdin.close()
        proc.wait(timeout)
    except (subprocess.TimeoutExpired, BrokenPipeError):
        proc.kill()
        proc.wait(timeout)


def cpu_seconds(ps) -> float:
    """User + system CPU seconds of one ``psutil.Process`` so far."""
    t = ps.cpu_times()
    return t.user + t.system


def run_loop(main: Coroutine, loop_kind: str = "uvloop"):
    """Run ``main`` to completion on a fresh uvloop or stock asyncio loop (a child's main)."""
    if loop_kind == "uvloop":
        import uvloop
        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(main)
    finally:
        loop.close()


# --- far ends and ping-pong ----------------------------------------------------------------

# A far end runs in a child that inherits its socket: a thread of this process would contend
# for its GIL with the near end and blur the figures of what is measured between them.
_ECHO = """
import socket, sys
sock = socket.socket(fileno=int(sys.argv[1]))
sock.setblocking(True)
size = int(sys.argv[2])
while True:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            sys.exit(0)
        data += chunk
    sock.sendall(data)
"""


def far_end(script: str, sock: socket.socket, *args) -> subprocess.Popen:
    """Run ``script`` in a child holding ``sock`` (argv: its fd, then ``args``); stdout piped."""
    proc = subprocess.Popen([sys.executable, "-c", script, str(sock.fileno()), *map(str, args)],
                            pass_fds=[sock.fileno()], stdout=subprocess.PIPE)
    sock.close()   # the child holds it now
    return proc


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            return b""
        data += chunk
    return data


def pingpong(a: socket.socket, b: socket.socket, n: int) -> list[float]:
    """``n`` round trips of a ``PING``-byte message a -> b -> a, a child echoing on ``b``: RTTs
    in µs.  Closes ``a`` (the echo ends at its EOF) and returns once the echo has exited."""
    echo = far_end(_ECHO, b, PING)
    msg = os.urandom(PING)
    rtts = []
    try:
        # the first 200 warm up caches and the loop (and, through srvd, wait out the pairing)
        for i in range(n + 200):
            t0 = time.perf_counter_ns()
            a.sendall(msg)
            assert _recv_exactly(a, PING) == msg, "the ping-pong pair closed or garbled"
            if i >= 200:
                rtts.append((time.perf_counter_ns() - t0) / 1000)
    finally:
        a.close()
        echo.wait(10)
        echo.stdout.close()
    return rtts
