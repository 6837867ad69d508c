"""The daemon-side forwarder of bench/test_bench_srvd.py: it plays npd's socket work for iperf3.

srvd never connects out: both sides of a session connect *to* it.  iperf3's client can connect
to side A itself (the bench's sessions do not authenticate side A), but iperf3's server only
accepts, so something must connect to side B and on to the server, as npd does in production.
This process does that, and the same splice serves the socat path, so both paths pay the same
forwarder cost:

- ``{"op": "relay", "port_b": P, "line_b": HEX, "target": T, "spares": K}``: open K sockets to
  srvd's side B, each writing the auth line; each one that receives data (it was paired with an
  iperf3 connection on side A) is connected to 127.0.0.1:T and spliced.  Replies ``{"ok": 1}``
  once the K sockets are connected and their lines written.
- ``{"op": "listen", "target": T}``: a listener on 127.0.0.1 whose connections are each
  connected to 127.0.0.1:T and spliced (for socat's ``TCP:`` side).  Replies ``{"port": P}``.
- ``{"op": "reset"}``: close idle spares and listeners.  ``{"op": "ping"}`` -> ``{"ok": 1}``.

The splice is always the compiled pump (kernel ``splice(2)``) when it is built, whatever srvd
runs, so the forwarder's cost is the same in every case compared.  Exits when stdin closes.

    python bench/srvd_forwarder.py
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _pump():
    try:    # pinned on purpose (not the selector): the same forwarder for every case
        import noports._speedups.relaypump as pump
    except ImportError:
        import noports._pure.relaypump as pump
    return pump


class Forwarder:
    def __init__(self) -> None:
        self.pump = _pump()
        self.loop = asyncio.get_running_loop()
        self.spares: set[socket.socket] = set()
        self.listeners: list[socket.socket] = []
        self.tasks: set[asyncio.Task] = set()

    def _spawn(self, coro) -> None:
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _connect(self, port: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await self.loop.sock_connect(sock, ("127.0.0.1", port))
        return sock

    async def _carry(self, near: socket.socket, target: int, head: bytes = b"") -> None:
        try:
            far = await self._connect(target)
        except OSError:
            near.close()
            return
        await self.pump.splice(self.loop, near, far, head_a=head)

    async def _spare(self, sock: socket.socket, target: int) -> None:
        try:
            head = await self.loop.sock_recv(sock, 256 * 1024)    # paired: the first bytes
        except OSError:
            head = b""
        self.spares.discard(sock)
        if not head:
            sock.close()
            return
        await self._carry(sock, target, head)

    async def relay(self, port_b: int, line_b: bytes, target: int, spares: int) -> dict:
        for _ in range(spares):
            sock = await self._connect(port_b)
            await self.loop.sock_sendall(sock, line_b)
            self.spares.add(sock)
            self._spawn(self._spare(sock, target))
        return {"ok": 1}

    async def _accept(self, listener: socket.socket, target: int) -> None:
        while True:
            try:
                conn, _ = await self.loop.sock_accept(listener)
            except OSError:
                return
            conn.setblocking(False)
            self._spawn(self._carry(conn, target))

    async def listen(self, target: int) -> dict:
        listener = socket.create_server(("127.0.0.1", 0), backlog=64)
        listener.setblocking(False)
        self.listeners.append(listener)
        self._spawn(self._accept(listener, target))
        return {"port": listener.getsockname()[1]}

    def reset(self) -> dict:
        for sock in list(self.spares):
            sock.close()       # its _spare task sees the error and ends
        self.spares.clear()
        for listener in self.listeners:
            listener.close()
        self.listeners.clear()
        return {"ok": 1}


async def main() -> None:
    fwd = Forwarder()
    reader = asyncio.StreamReader()
    await fwd.loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        cmd = json.loads(line)
        op = cmd.pop("op")
        if op == "relay":
            reply = await fwd.relay(cmd["port_b"], bytes.fromhex(cmd["line_b"]), cmd["target"],
                                    cmd["spares"])
        elif op == "listen":
            reply = await fwd.listen(cmd["target"])
        elif op == "reset":
            reply = fwd.reset()
        else:
            reply = {"ok": 1}
        print(json.dumps(reply), flush=True)
    fwd.reset()
    for task in list(fwd.tasks):
        task.cancel()
    with contextlib.suppress(Exception):
        await asyncio.gather(*fwd.tasks, return_exceptions=True)


if __name__ == "__main__":
    import uvloop
    _loop = uvloop.new_event_loop()
    _loop.run_until_complete(main())
    _loop.close()
