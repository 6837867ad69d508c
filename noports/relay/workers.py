"""``srvd --workers N`` (N > 1), the main process's side: a session registry spread over workers.

Owns :class:`WorkerPool`, which stands in for :class:`~noports.relay.session.RelaySessions` in
front of the control plane (same ``check``/``open``/``close``/``pending_for``/``draining``/
``stats`` surface), so the control plane, the manager rule and every refusal before a port is
bound stay in the main process, unchanged.  Each accepted session goes to one worker process
(:mod:`noports.relay.worker`): the one with the fewest live sessions, round robin on ties.  The
worker binds the two ports in its own process, verifies the auth lines with the public keys it
was handed, and pumps; so the data plane of different sessions runs on different cores, while a
session's pairs share its worker (they share its ports).

Why assign from the main process rather than let workers take sessions themselves: the requests
arrive on one atProtocol monitor connection, and the quota, duplicate and drain decisions need
one view of every session; a worker only ever sees sessions that passed them.  Why bind in the
worker rather than pass sockets over SCM_RIGHTS: a worker that dies then takes exactly its own
listeners and connections with it (the kernel closes them), and the main process holds no data
plane FD at all.

A worker that dies is restarted (back-off if it keeps dying young); the other workers' sessions
carry on; its sessions are lost: counted (``noports_relay_sessions_lost_total``), logged with
their ids, and their pending-quota places released.  Metrics: the unlabelled families are the
sums over the main process and every worker (counters keep what dead workers had counted); the
same counters per worker are in ``noports_relay_worker_*{worker="i"}`` (a separate family, so
that summing a family in Prometheus never counts twice).  SIGTERM drains every worker with the
grace; a second SIGTERM aborts their live pairs (:meth:`WorkerPool.abort`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import msgspec
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

from noports.at.crypto import public_key_to_b64
from noports.relay.dataplane import DataPlaneConfig
from noports.relay.messages import RelayRequest
from noports.relay.session import RelayRefused, SessionRegistry
from noports.relay.stats import RelayStats
from noports.relay.worker import frame, next_message, request_to_dict

__all__ = ["RemoteSession", "WorkerPool", "cpu_workers"]

log = logging.getLogger("noports.relay")

_COUNTERS = ("sessions_total", "pairs_total", "bytes_relayed", "auth_failures")
_GAUGES = ("sessions_open", "unauth_sockets")


def cpu_workers(requested: int) -> int:
    """``--workers 0`` means one per core."""
    return requested if requested > 0 else max(1, os.cpu_count() or 1)


class RemoteSession:
    """The main process's view of a session that lives in a worker (ports, state, close)."""

    def __init__(self, pool: WorkerPool, worker: _Worker, request: RelayRequest,
                 rvd_nonce: str | None) -> None:
        self._pool = pool
        self.worker = worker.index
        self._worker = worker
        self.request = request
        self.session_id = request.session_id
        self.rvd_nonce = rvd_nonce
        self.port_a = 0
        self.port_b = 0
        self.state = "new"
        self.close_reason = ""
        self.paired = False
        self._opened: asyncio.Future = asyncio.get_running_loop().create_future()
        self._closed = asyncio.Event()

    @property
    def closed(self) -> bool:
        return self.state == "closed"

    def splices(self) -> list:
        return []       # the pairs live in the worker; WorkerPool.abort() ends them

    async def close(self, grace: float = 0.0, reason: str = "closed") -> None:
        if self.state == "open":
            self.state = "closing"
            self._pool._send(self._worker, {"t": "close", "sid": self.session_id,
                                            "grace": grace, "reason": reason})
        if self.state != "new":
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._closed.wait(), grace + 5.0)

    async def wait_closed(self) -> None:
        await self._closed.wait()

    def _mark_closed(self, reason: str) -> None:
        self.state = "closed"
        self.close_reason = reason
        self._closed.set()


class _Worker:
    """One worker process as the main process sees it."""

    def __init__(self, index: int, proc: subprocess.Popen, writer: asyncio.StreamWriter) -> None:
        self.index = index
        self.proc = proc
        self.pid = proc.pid
        self.writer = writer
        self.impl = ""
        self.ready: asyncio.Future = asyncio.get_running_loop().create_future()
        self.gone = asyncio.Event()
        self.alive = True
        self.started = time.monotonic()
        self.sessions: dict[str, RemoteSession] = {}
        self.stats: dict = {}
        self.reader: asyncio.Task | None = None


class WorkerPool(SessionRegistry[RemoteSession]):
    """N worker processes behind the :class:`RelaySessions` surface; see the module docstring."""

    def __init__(self, count: int, config: DataPlaneConfig | None = None, *,
                 allow_unauthenticated: bool = False, pending_quota: int = 32,
                 max_unauth_total: int = 8192, stats: RelayStats | None = None,
                 no_uvloop: bool = False, verbose: int = 0, quiet: bool = False,
                 open_timeout: float = 10.0) -> None:
        if count < 1:
            raise ValueError("a pool needs at least one worker")
        # stats: the main process's own refusals
        super().__init__(allow_unauthenticated=allow_unauthenticated,
                         pending_quota=pending_quota, stats=stats)
        self.count = count
        self.config = config or DataPlaneConfig()
        self.max_unauth_total = max_unauth_total
        self.no_uvloop = no_uvloop
        self.verbose = verbose
        self.quiet = quiet
        self.open_timeout = open_timeout
        self.sessions_lost = 0
        self.restarts_total = 0
        self._closing = False
        self._workers: list[_Worker | None] = [None] * count
        self._retired: list[Counter] = [Counter() for _ in range(count)]
        self._refusals_retired: list[Counter] = [Counter() for _ in range(count)]
        self._backoff = [0.1] * count
        self._restarting: set[asyncio.Task] = set()
        self._rr = 0
        self._any_ready = asyncio.Event()

    # -- the RelaySessions surface (the rest is SessionRegistry's) ----------------------------
    def workers(self) -> list[dict]:
        """Per worker: index, pid, alive, live sessions (for logs and tests)."""
        return [{"index": i, "pid": w.pid if w else None, "alive": bool(w and w.alive),
                 "sessions": len(w.sessions) if w else 0} for i, w in enumerate(self._workers)]

    async def open(self, request: RelayRequest, *, public_key_a: RSAPublicKey | None = None,
                   public_key_b: RSAPublicKey | None = None, requester: str | None = None,
                   rvd_nonce: str | None = None) -> RemoteSession:
        """As RelaySessions.open, the session running in the least loaded worker."""
        requester = requester or request.atsign_a
        rvd_nonce = self._admit(request, requester, public_key_a, public_key_b, rvd_nonce)
        sid = request.session_id
        worker = self._choose()
        if worker is None:
            self._any_ready.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._any_ready.wait(), 5.0)
            worker = self._choose()
            if worker is None or sid in self._sessions or self.draining:
                raise self._refuse("no_worker", f"session {sid}: no worker is running")
        session = RemoteSession(self, worker, request, rvd_nonce)
        self._register(sid, session, requester)
        worker.sessions[sid] = session
        self._send(worker, {
            "t": "open", "sid": sid, "request": request_to_dict(request), "nonce": rvd_nonce,
            "pub_a": public_key_to_b64(public_key_a) if request.authenticate_a else None,
            "pub_b": public_key_to_b64(public_key_b) if request.authenticate_b else None})
        try:
            session.port_a, session.port_b = await asyncio.wait_for(
                asyncio.shield(session._opened), self.open_timeout)
        except RelayRefused as exc:
            self._forget(session)
            self.stats.refuse(exc.reason)
            raise
        except asyncio.TimeoutError:
            self._forget(session)
            self._send(worker, {"t": "close", "sid": sid, "grace": 0.0, "reason": "timeout"})
            raise self._refuse("worker_timeout", f"session {sid}: worker {worker.index} did "
                                                 f"not open it within {self.open_timeout} s")\
                from None
        except BaseException:
            self._forget(session)
            raise
        if session.state == "new":
            session.state = "open"
        return session

    async def close(self, grace: float = 0.0) -> None:
        """SIGTERM drain: refuse new sessions; every worker drains with ``grace``, then exits."""
        self.draining = self._closing = True
        for task in list(self._restarting):
            task.cancel()
        live = [w for w in self._workers if w is not None and w.alive]
        for worker in live:
            self._send(worker, {"t": "drain", "grace": grace})
        gone = [asyncio.ensure_future(w.gone.wait()) for w in live]
        if gone:
            _done, pending = await asyncio.wait(gone, timeout=grace + 3.0)
            if pending:
                log.warning("%d worker(s) did not finish draining; killing them", len(pending))
                await self.kill()

    def abort(self) -> None:
        """End every live pair in every worker now (the second SIGTERM)."""
        for worker in self._workers:
            if worker is not None and worker.alive:
                self._send(worker, {"t": "abort"})

    async def kill(self) -> None:
        """SIGKILL whatever worker is still running and wait until each is reaped."""
        self._closing = True
        for task in list(self._restarting):
            task.cancel()
        live = [w for w in self._workers if w is not None and not w.gone.is_set()]
        for worker in live:
            with contextlib.suppress(OSError):
                worker.proc.kill()
        if live:
            await asyncio.wait([asyncio.ensure_future(w.gone.wait()) for w in live],
                               timeout=5.0)

    # -- workers ------------------------------------------------------------------------------
    async def start(self, timeout: float = 30.0) -> None:
        """Start every worker and wait until each says it is ready (RuntimeError if not)."""
        try:
            workers = [await self._spawn(i) for i in range(self.count)]
        except BaseException:
            await self.kill()      # the ones already started must not linger
            raise
        done, pending = await asyncio.wait([w.ready for w in workers], timeout=timeout)
        failed = [w.index for w in workers if w.ready not in done or w.ready.exception()]
        if failed or pending:
            await self.kill()
            raise RuntimeError(f"worker(s) {failed} did not start within {timeout} s")

    async def _spawn(self, index: int) -> _Worker:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        cfg = dict(asdict(self.config), max_unauth=self.max_unauth_total)
        cmd = [sys.executable, "-m", "noports.relay.worker", "--fd", str(theirs.fileno()),
               "--index", str(index), "--parent", str(os.getpid()),
               "--config", msgspec.json.encode(cfg).decode()]
        if self.no_uvloop:
            cmd.append("--no-uvloop")
        if self.verbose:
            cmd.append("-" + "v" * self.verbose)
        if self.quiet:
            cmd.append("-q")
        env = dict(os.environ)
        # the worker imports the very package this process runs from
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH")
                                    else "")
        try:
            # spawned from the event loop's thread, which lives as long as the process:
            # PR_SET_PDEATHSIG fires when the *thread* that forked the worker ends
            proc = subprocess.Popen(cmd, pass_fds=(theirs.fileno(),), env=env,
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        _reader, writer = await asyncio.open_unix_connection(sock=ours)
        worker = _Worker(index, proc, writer)
        self._workers[index] = worker
        worker.reader = asyncio.get_running_loop().create_task(self._read(worker, _reader))
        return worker

    def _send(self, worker: _Worker, message: dict) -> None:
        if worker.alive and not worker.writer.is_closing():
            worker.writer.write(frame(message))

    def _choose(self) -> _Worker | None:
        ready = [w for w in self._workers if w is not None and w.alive and w.ready.done()
                 and not w.ready.exception()]
        if not ready:
            return None
        low = min(len(w.sessions) for w in ready)
        for k in range(self.count):
            worker = self._workers[(self._rr + k) % self.count]
            if worker in ready and len(worker.sessions) == low:
                self._rr = (worker.index + 1) % self.count
                return worker
        return None   # pragma: no cover - unreachable: some ready worker has the minimum

    async def _read(self, worker: _Worker, reader: asyncio.StreamReader) -> None:
        bad = f"worker {worker.index}: bad IPC message"
        try:
            while (msg := await next_message(reader, bad)) is not None:
                self._handle(worker, msg)
        finally:
            await self._gone(worker)

    def _handle(self, worker: _Worker, msg: dict) -> None:
        kind = msg["t"]
        if "stats" in msg:
            worker.stats = msg["stats"]
        session = worker.sessions.get(msg.get("sid", ""))
        if kind == "ready":
            worker.impl = msg.get("impl", "")
            if not worker.ready.done():
                worker.ready.set_result(True)
            self._any_ready.set()
            log.info("worker %d ready: pid %d, %s", worker.index, msg["pid"], worker.impl)
        elif session is None:
            return
        elif kind == "opened":
            if not session._opened.done():
                session._opened.set_result((msg["port_a"], msg["port_b"]))
        elif kind == "refused":
            if not session._opened.done():
                session._opened.set_exception(RelayRefused(msg["reason"], msg["message"]))
        elif kind == "paired":
            session.paired = True
            self._release_pending(session.session_id)
        elif kind == "closed":
            self._forget(session)
            session._mark_closed(msg.get("reason", "closed"))

    def _forget(self, session: RemoteSession) -> None:
        super()._forget(session)
        if session._worker.sessions.get(session.session_id) is session:
            del session._worker.sessions[session.session_id]

    async def _gone(self, worker: _Worker) -> None:
        """The worker's channel closed: reap it, account for its sessions, restart it."""
        worker.alive = False
        worker.writer.close()
        loop = asyncio.get_running_loop()
        try:
            rc = await loop.run_in_executor(None, worker.proc.wait, 5.0)
        except subprocess.TimeoutExpired:
            worker.proc.kill()     # it closed the channel but lingers: it is no worker now
            rc = await loop.run_in_executor(None, worker.proc.wait)
        how = (f"killed by {signal.Signals(-rc).name}" if rc < 0 and -rc in signal.valid_signals()
               else f"exit code {rc}")
        # counters must never go backwards: keep what this worker had counted
        for name in _COUNTERS:
            self._retired[worker.index][name] += worker.stats.get(name, 0)
        self._refusals_retired[worker.index].update(worker.stats.get("refusals", {}))
        worker.stats = {}
        lost = list(worker.sessions.values())
        for session in lost:
            self._forget(session)
            if not session._opened.done():
                session._opened.set_exception(RelayRefused("worker_died",
                                                           f"worker {worker.index} died"))
            session._mark_closed("worker_died")
        if not worker.ready.done():
            worker.ready.set_exception(RuntimeError(f"worker {worker.index} {how}"))
            worker.ready.exception()      # retrieved: start() reports it
        if self._closing:
            if lost:
                log.warning("worker %d (pid %d) %s while draining: %d session(s) lost",
                            worker.index, worker.pid, how, len(lost))
            self.sessions_lost += len(lost)
            worker.gone.set()
            return
        self.sessions_lost += len(lost)
        ids = ", ".join(s.session_id for s in lost[:10]) + (" ..." if len(lost) > 10 else "")
        log.warning("worker %d (pid %d) %s: %d session(s) lost%s; restarting", worker.index,
                    worker.pid, how, len(lost), f" ({ids})" if lost else "")
        young = time.monotonic() - worker.started < 2.0
        delay = self._backoff[worker.index] if young else 0.0
        self._backoff[worker.index] = min(5.0, delay * 2) if young else 0.1
        worker.gone.set()
        task = loop.create_task(self._restart(worker.index, delay))
        self._restarting.add(task)
        task.add_done_callback(self._restarting.discard)

    async def _restart(self, index: int, delay: float) -> None:
        if delay:
            await asyncio.sleep(delay)
        if self._closing:
            return
        self.restarts_total += 1
        try:
            await self._spawn(index)
        except OSError as exc:
            log.error("worker %d: cannot restart: %s", index, exc)
            task = asyncio.get_running_loop().create_task(self._restart(index, 1.0))
            self._restarting.add(task)
            task.add_done_callback(self._restarting.discard)

    # -- metrics ------------------------------------------------------------------------------
    def _worker_counts(self, index: int) -> tuple[dict, Counter]:
        worker = self._workers[index]
        current = worker.stats if worker is not None else {}
        counts = {name: self._retired[index][name] + current.get(name, 0) for name in _COUNTERS}
        for name in _GAUGES:
            counts[name] = current.get(name, 0) if worker is not None and worker.alive else 0
        refusals = Counter(self._refusals_retired[index])
        refusals.update(current.get("refusals", {}))
        return counts, refusals

    def render(self, prefix: str = "noports_relay") -> str:
        """Prometheus text: the sums (RelayStats' families), then the pool, then per worker."""
        total = RelayStats()
        total.refusals = Counter(self.stats.refusals)
        per_worker = [self._worker_counts(i) for i in range(self.count)]
        for counts, refusals in per_worker:
            for name in (*_COUNTERS, *_GAUGES):
                setattr(total, name, getattr(total, name) + counts[name])
            total.refusals.update(refusals)
        lines = [total.render(prefix).rstrip("\n")]

        def family(name: str, kind: str, help_text: str, samples) -> None:
            lines.extend((f"# HELP {prefix}_{name} {help_text}",
                          f"# TYPE {prefix}_{name} {kind}"))
            lines.extend(f"{prefix}_{name}{labels} {value}" for labels, value in samples)

        alive = sum(1 for w in self._workers if w is not None and w.alive and w.ready.done()
                    and not w.ready.exception())
        family("workers", "gauge", "Worker processes running.", [("", alive)])
        family("worker_restarts_total", "counter", "Worker processes restarted after dying.",
               [("", self.restarts_total)])
        family("sessions_lost_total", "counter", "Sessions lost with a worker that died.",
               [("", self.sessions_lost)])
        for name, stat, kind, help_text in (
                ("worker_sessions_open", "sessions_open", "gauge", "Sessions open, per worker."),
                ("worker_sessions_total", "sessions_total", "counter",
                 "Sessions opened, per worker."),
                ("worker_pairs_total", "pairs_total", "counter", "Pairs spliced, per worker."),
                ("worker_bytes_relayed_total", "bytes_relayed", "counter",
                 "Bytes relayed, per worker."),
                ("worker_auth_failures_total", "auth_failures", "counter",
                 "Bad or missing auth lines, per worker."),
                ("worker_unauthenticated_sockets", "unauth_sockets", "gauge",
                 "Sockets in their auth phase, per worker.")):
            family(name, kind, help_text,
                   [(f'{{worker="{i}"}}', counts[stat]) for i, (counts, _r) in
                    enumerate(per_worker)])
        family("worker_refusals_total", "counter", "Refused sockets, per worker and reason.",
               [(f'{{worker="{i}",reason="{reason}"}}', n) for i, (_c, refusals) in
                enumerate(per_worker) for reason, n in sorted(refusals.items())])
        return "\n".join(lines) + "\n"
