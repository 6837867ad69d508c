"""One srvd worker process (``srvd --workers N``): the data plane of the sessions it is given.

Owns the worker side of the pool: the IPC framing both sides use (a 4-byte big-endian length,
then one msgspec-JSON object; :func:`frame`, :func:`read_message`), and the worker's own loop:
it receives ``open`` (a request already screened by the main process, the sides' public keys as
base64 DER and the relay nonce), runs the :class:`~noports.relay.dataplane.RelaySession` (binds
the two ports in *this* process, verifies auth lines, pumps), answers with the ports, and reports
``paired``/``closed`` per session and its :class:`~noports.relay.stats.RelayStats` (pushed when
they change, at most every ``STATS_INTERVAL`` s, and with every session event).

Lifetime: a worker never outlives the main process.  On Linux it asks the kernel for SIGKILL
when its parent dies (``PR_SET_PDEATHSIG``); everywhere, EOF on its IPC socket ends it.  It
ignores SIGTERM and SIGINT because the main process coordinates the drain: a service manager
that signals the whole process group (systemd's default) must not kill live sessions before the
main process has let them drain.  ``drain`` closes every session with its grace, ``abort`` ends
the live pairs now; either way the worker exits once its sessions are closed.

Messages, main -> worker: ``open {sid, request, pub_a, pub_b, nonce}``, ``close {sid, grace,
reason}``, ``drain {grace}``, ``abort {}``.  Worker -> main: ``ready {pid, impl}``, ``opened
{sid, port_a, port_b, stats}``, ``refused {sid, reason, message}``, ``paired {sid}``, ``closed
{sid, reason, stats}``, ``stats {stats}``, ``drained {stats}``.

Run by :mod:`noports.relay.workers`; not a public command: ``python -m noports.relay.worker
--fd FD --index I --parent PID --config JSON [--no-uvloop] [-v]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import struct
import sys

import msgspec

from noports._speedups import describe
from noports.at.pubkeys import PublicKeys
from noports.logsetup import add_flags as add_log_flags
from noports.logsetup import setup_logging
from noports.relay.dataplane import DataPlaneConfig, RelaySession, UnauthGate
from noports.relay.messages import RelayRequest
from noports.relay.stats import RelayStats
from noports.runner import run

__all__ = ["MAX_MESSAGE", "STATS_INTERVAL", "frame", "main", "next_message", "read_message",
           "request_from_dict", "request_to_dict", "snapshot"]

log = logging.getLogger("noports.relay")

#: A message bigger than this is a bug (or not our peer): the channel is dropped.
MAX_MESSAGE = 1 << 20
#: How often a worker pushes changed counters (metrics are at most this stale).
STATS_INTERVAL = 0.25
_HEADER = struct.Struct(">I")
_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder()
PR_SET_PDEATHSIG = 1


# --- the IPC framing (both sides) ------------------------------------------------------------

def frame(message: dict) -> bytes:
    payload = _encoder.encode(message)
    return _HEADER.pack(len(payload)) + payload


async def read_message(reader: asyncio.StreamReader) -> dict | None:
    """The next message, or None at EOF (the peer is gone).  ValueError on a bad frame."""
    try:
        header = await reader.readexactly(_HEADER.size)
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    (size,) = _HEADER.unpack(header)
    if size > MAX_MESSAGE:
        raise ValueError(f"IPC message of {size} bytes")
    try:
        payload = await reader.readexactly(size)
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    message = _decoder.decode(payload)
    if not isinstance(message, dict) or "t" not in message:
        raise ValueError("IPC message without a type")
    return message


async def next_message(reader: asyncio.StreamReader, bad: str) -> dict | None:
    """:func:`read_message`, but a bad frame is logged (``bad``: what to call it) and ends the
    channel like EOF: after one, the stream cannot be trusted to be in step any more."""
    try:
        return await read_message(reader)
    except ValueError as exc:
        log.error("%s: %s", bad, exc)
        return None


def request_to_dict(request: RelayRequest) -> dict:
    return dataclasses.asdict(request)


def request_from_dict(data: dict) -> RelayRequest:
    data = dict(data)
    data["pre_fetch"] = tuple(data.get("pre_fetch") or ())
    return RelayRequest(**data)


def snapshot(stats: RelayStats) -> dict:
    """The counters a worker reports (bytes include live pairs)."""
    return {"sessions_open": stats.sessions_open, "sessions_total": stats.sessions_total,
            "pairs_total": stats.pairs_total, "bytes_relayed": stats.total_bytes(),
            "auth_failures": stats.auth_failures, "unauth_sockets": stats.unauth_sockets,
            "refusals": dict(stats.refusals)}


# --- the worker ------------------------------------------------------------------------------

def _die_with_parent(parent: int) -> None:
    """Linux: SIGKILL this process when the main process dies (whatever kills it)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            import ctypes
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:      # it died before the prctl took effect
        os._exit(0)


class Worker:
    """The sessions of one worker process and its half of the IPC channel."""

    def __init__(self, index: int, config: DataPlaneConfig, max_unauth: int) -> None:
        self.index = index
        self.config = config
        self.stats = RelayStats()
        self.stats.live_bytes = self._live_bytes
        # each process has its own RLIMIT_NOFILE, so each worker gets the whole cap
        self.gate = UnauthGate(max_unauth, self.stats)
        self.sessions: dict[str, RelaySession] = {}
        self._keys = PublicKeys(1024)
        self._writer: asyncio.StreamWriter | None = None
        self._tasks: set[asyncio.Task] = set()
        self._last_sent: dict | None = None
        self._draining = False
        self._done: asyncio.Event | None = None

    def _live_bytes(self) -> int:
        return sum(s.bytes_relayed - s.bytes_a_to_b - s.bytes_b_to_a
                   for s in self.sessions.values())

    def send(self, message: dict) -> None:
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(frame(message))

    def _send_with_stats(self, message: dict) -> None:
        message["stats"] = self._last_sent = snapshot(self.stats)
        self.send(message)

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _key(self, text: str | None):
        return self._keys.parse(text) if text else None

    # -- session events --
    def _paired(self, session: RelaySession) -> None:
        self.send({"t": "paired", "sid": session.session_id})

    def _closed(self, session: RelaySession) -> None:
        if self.sessions.get(session.session_id) is session:
            del self.sessions[session.session_id]
        self._send_with_stats({"t": "closed", "sid": session.session_id,
                               "reason": session.close_reason})

    # -- commands --
    async def _open(self, msg: dict) -> None:
        sid = msg["sid"]
        try:
            request = request_from_dict(msg["request"])
            session = RelaySession(request, rvd_nonce=msg.get("nonce"),
                                   public_key_a=self._key(msg.get("pub_a")),
                                   public_key_b=self._key(msg.get("pub_b")),
                                   config=self.config, stats=self.stats, gate=self.gate,
                                   on_paired=self._paired, on_closed=self._closed)
        except (TypeError, ValueError) as exc:
            self.send({"t": "refused", "sid": sid, "reason": "bad_request",
                       "message": f"session {sid}: {exc}"})
            return
        if self._draining or sid in self.sessions:
            self.send({"t": "refused", "sid": sid, "reason": "draining" if self._draining
                       else "duplicate_session", "message": f"session {sid}: refused by worker"})
            return
        self.sessions[sid] = session
        try:
            port_a, port_b = await session.start()
        except OSError as exc:
            self.sessions.pop(sid, None)     # the main process counts the refusal
            self.send({"t": "refused", "sid": sid, "reason": "bind_failed",
                       "message": f"session {sid}: cannot bind ports: {exc}"})
            return
        self._send_with_stats({"t": "opened", "sid": sid, "port_a": port_a, "port_b": port_b})

    async def _close_one(self, msg: dict) -> None:
        session = self.sessions.get(msg["sid"])
        if session is not None:
            await session.close(grace=float(msg.get("grace", 0.0)),
                                reason=str(msg.get("reason", "closed")))

    async def drain(self, grace: float) -> None:
        self._draining = True
        sessions = list(self.sessions.values())
        if sessions:
            await asyncio.gather(*(s.close(grace=grace, reason="drained") for s in sessions),
                                 return_exceptions=True)

    def abort(self) -> None:
        """End every live pair now (a second SIGTERM, or the main process is gone)."""
        for session in list(self.sessions.values()):
            for splice in session.splices():
                splice.close()

    # -- loops --
    def push_stats(self) -> None:
        """Send the counters now if they changed since the last report."""
        current = snapshot(self.stats)
        if current != self._last_sent:
            self._last_sent = current
            self.send({"t": "stats", "stats": current})

    def filter(self, record: logging.LogRecord) -> bool:
        """A filter on the relay's logger: before a line about a session reaches stderr, the
        counters it implies are on their way to the main process (so whoever reads the line
        and then the metrics sees them agree, as with one process)."""
        self.push_stats()
        return True

    async def _push_stats(self) -> None:
        while True:
            await asyncio.sleep(STATS_INTERVAL)
            self.push_stats()

    async def _read_loop(self, reader: asyncio.StreamReader) -> None:
        drain: asyncio.Task | None = None
        bad = f"worker {self.index}: bad message from the main process"
        while True:
            msg = await next_message(reader, bad)
            if msg is None:
                # the main process is gone: nobody can drain us or read our reports
                self.abort()
                await self.drain(0.0)
                return
            kind = msg["t"]
            if kind == "open":
                self._spawn(self._open(msg))
            elif kind == "close":
                self._spawn(self._close_one(msg))
            elif kind == "drain" and drain is None:
                drain = asyncio.get_running_loop().create_task(
                    self.drain(float(msg.get("grace", 0.0))))
                drain.add_done_callback(self._drained)
            elif kind == "abort":
                self.abort()

    def _drained(self, _task: asyncio.Task) -> None:
        self._send_with_stats({"t": "drained"})
        self._done.set()

    async def run(self, sock: socket.socket) -> int:
        """Serve until drained or until the main process goes away."""
        loop = asyncio.get_running_loop()
        self._done = asyncio.Event()
        reader, self._writer = await asyncio.open_unix_connection(sock=sock)
        self.send({"t": "ready", "pid": os.getpid(), "impl": describe()})
        tasks = {loop.create_task(self._push_stats()), loop.create_task(self._read_loop(reader)),
                 loop.create_task(self._done.wait())}
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            with contextlib.suppress(Exception):
                await self._writer.drain()
            self._writer.close()
        return 0


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m noports.relay.worker")
    p.add_argument("--fd", type=int, required=True)
    p.add_argument("--index", type=int, required=True)
    p.add_argument("--parent", type=int, required=True)
    p.add_argument("--config", required=True, help="DataPlaneConfig fields + max_unauth, JSON")
    p.add_argument("--no-uvloop", action="store_true")
    add_log_flags(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    _die_with_parent(args.parent)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    # srvd's line format, the worker named by its index: srvd/w1[pid] noports.relay: ...
    setup_logging(f"srvd/w{args.index}", args.verbose, args.quiet, own=("noports.relay",))
    fields = msgspec.json.decode(args.config.encode())
    max_unauth = int(fields.pop("max_unauth", 8192))
    config = DataPlaneConfig(**fields)
    sock = socket.socket(fileno=args.fd)
    worker = Worker(args.index, config, max_unauth)
    log.addFilter(worker)
    return run(worker.run(sock), no_uvloop=args.no_uvloop)


if __name__ == "__main__":
    raise SystemExit(main())
