"""Helpers for tests of the srvd *process* (``python -m noports.relay``) on 127.0.0.1.

- :class:`SrvdProcess`: starts srvd against an :class:`~tests.functional.conftest.AtServerProcess`
  (its root, CA and ``--keys-dir`` keys), waits for its ``ready`` log line, keeps its stderr
  lines (``.lines()``, ``.wait_line(regex)``, ``.count(regex)``), counts its listening sockets
  with psutil, scrapes its ``--metrics-port`` and sends signals.
- :class:`RelayUser`: an atSign that asks the relay for sessions exactly as Atsign's npt does
  (spec noports-protocol.md §3.2: key ``<device>.request_ports.sshrvd``, the JSON fields in
  Atsign's order, ttl 10 s) through a real AtClient, and collects the relay's replies
  (``@<me>:<sessionId>.sshrvd@<relay>``) from its own monitor.
- :func:`play_pair`: plays side A and side B of a replied session with real keys and auth lines
  (``encode_auth_line``) and checks data both ways by sha256.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import psutil

from noports.at.client import AtClient
from noports.at.monitor import AtNotification
from noports.relay.messages import RelayReply, encode_auth_line, parse_reply
from tests.functional.conftest import REPO, AtServerProcess
from tests.functional.relay_helpers import connect, receive_all, send_random

HOST = "127.0.0.1"


class SrvdProcess:
    """One ``python -m noports.relay`` process; see the module docstring."""

    def __init__(self, atserver: AtServerProcess, log_dir: Path, *args: str,
                 atsign: str = "@relay", metrics: bool = True) -> None:
        self.atserver = atserver
        self.atsign = atsign
        self.log_path = log_dir / f"srvd-{uuid.uuid4().hex[:8]}.log"
        self.cmd = [sys.executable, "-m", "noports.relay", "-a", atsign, "-i", HOST,
                    "-k", str(atserver.keys_dir / f"{atsign}_key.atKeys"),
                    "--root-domain", f"{HOST}:{atserver.root_port}",
                    "--ca-file", str(atserver.ca_file), "--bind", HOST]
        if metrics:
            self.cmd += ["--metrics-port", "0"]
        self.cmd += list(args)
        self._lines: list[str] = []
        self._cond = threading.Condition()
        self.metrics_port: int | None = None
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        env.pop("NOPORTS_CA_FILE", None)
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     cwd=str(REPO), env=env)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        with open(self.log_path, "w") as out:
            for raw in self.proc.stderr:
                line = raw.decode(errors="replace").rstrip("\n")
                out.write(line + "\n")
                out.flush()
                with self._cond:
                    self._lines.append(line)
                    self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def ready(self, timeout: float = 30.0) -> SrvdProcess:
        line = self.wait_line(rf"srvd {re.escape(self.atsign)} ready", timeout)
        m = re.search(r"metrics on [\d.]+:(\d+)", line)
        self.metrics_port = int(m.group(1)) if m else None
        return self

    # -- stderr ---------------------------------------------------------------------------------

    def lines(self) -> list[str]:
        with self._cond:
            return list(self._lines)

    def count(self, regex: str) -> int:
        pattern = re.compile(regex)
        return sum(1 for line in self.lines() if pattern.search(line))

    def wait_line(self, regex: str, timeout: float = 10.0, *, nth: int = 1) -> str:
        """The ``nth`` stderr line matching ``regex``; AssertionError after ``timeout``."""
        pattern = re.compile(regex)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                hits = [line for line in self._lines if pattern.search(line)]
                if len(hits) >= nth:
                    return hits[nth - 1]
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    tail = "\n".join(self._lines[-30:])
                    raise AssertionError(f"no srvd line matching {regex!r} within {timeout}s "
                                         f"(rc={self.proc.poll()}); stderr tail:\n{tail}")
                self._cond.wait(min(left, 0.2))

    # -- process ------------------------------------------------------------------------------

    @property
    def pid(self) -> int:
        return self.proc.pid

    def listening_ports(self) -> set[int]:
        """TCP ports srvd listens on (the session ports and the metrics port)."""
        conns = psutil.Process(self.pid).net_connections(kind="tcp")
        return {c.laddr.port for c in conns if c.status == psutil.CONN_LISTEN}

    def session_ports(self) -> set[int]:
        return self.listening_ports() - {self.metrics_port}

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        """Teardown: SIGTERM, then SIGKILL if it does not exit."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._reader.join(5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()

    # -- metrics ------------------------------------------------------------------------------

    def metrics_text(self, path: str = "/metrics") -> str:
        url = f"http://{HOST}:{self.metrics_port}{path}"
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.read().decode()

    def metrics(self) -> dict[str, float]:
        return parse_metrics(self.metrics_text())

    def refusals(self, reason: str) -> float:
        return self.metrics().get(f'noports_relay_refusals_total{{reason="{reason}"}}', 0)


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {"name" or 'name{label="v"}': value} (comments skipped)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        out[name] = float(value)
    return out


async def wait_until(predicate, timeout: float = 10.0, what: str = "condition",
                     interval: float = 0.05):
    """Poll a (blocking, cheap) predicate from the loop until truthy; bounded."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


def client_nonce() -> str:
    """As Atsign's client makes it: local time in ISO-8601 (opaque to the relay)."""
    from datetime import datetime
    return datetime.now().isoformat()


class RelayUser:
    """An atSign asking ``relay`` for sessions (see the module docstring).  ``async with``."""

    def __init__(self, atserver: AtServerProcess, atsign: str, relay: str = "@relay") -> None:
        self.atserver = atserver
        self.atsign = atsign
        self.relay = relay
        self.keys = atserver.keys(atsign)
        self.client = AtClient(atsign, self.keys, root=f"{HOST}:{atserver.root_port}",
                               ca_file=str(atserver.ca_file))
        self.replies: dict[str, AtNotification] = {}
        self.reply_times: dict[str, float] = {}
        self._events: dict[str, asyncio.Event] = {}
        self._monitor = None
        self._task: asyncio.Task | None = None

    async def __aenter__(self) -> RelayUser:
        await self.client.connect()
        # the relay's replies arrive as @me:<sessionId>.sshrvd@relay
        self._monitor = self.client.monitor(r"\.sshrvd" + re.escape(self.relay))
        await self._monitor.start()
        self._task = asyncio.get_running_loop().create_task(self._collect())
        return self

    async def __aexit__(self, *exc) -> None:
        if self._task is not None:
            self._task.cancel()
        await self.client.close()

    async def _collect(self) -> None:
        async for n in self._monitor:
            sid = n.entity[: -len(".sshrvd")] if n.entity.endswith(".sshrvd") else n.entity
            self.replies[sid] = n
            self.reply_times[sid] = time.monotonic()
            self._events.setdefault(sid, asyncio.Event()).set()

    def body(self, daemon: str = "@daemon", **fields) -> dict:
        """The request_ports JSON, fields in the order Atsign's client writes them."""
        body = {"sessionId": str(uuid.uuid4()), "atSignA": self.atsign, "atSignB": daemon,
                "authenticateSocketA": True, "authenticateSocketB": True,
                "clientNonce": client_nonce()}
        body.update(fields)
        return body

    async def request(self, body: dict, device: str = "dev") -> str:
        """Send ``body`` as Atsign's npt does; returns the sessionId."""
        await self.client.notify(f"{self.relay}:{device}.request_ports.sshrvd",
                                 json.dumps(body, separators=(",", ":")), ttl=10_000,
                                 ttln=60_000)
        return body["sessionId"]

    async def legacy_request(self, session_id: str, device: str = "dev") -> str:
        """The legacy request: key ``<device>.sshrvd``, value the bare sessionId."""
        await self.client.notify(f"{self.relay}:{device}.sshrvd", session_id, ttl=10_000,
                                 ttln=60_000)
        return session_id

    async def reply(self, session_id: str, timeout: float = 10.0) -> AtNotification:
        event = self._events.setdefault(session_id, asyncio.Event())
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except asyncio.TimeoutError:
            raise AssertionError(f"no relay reply for {session_id} within {timeout}s") \
                from None
        return self.replies[session_id]

    async def parsed_reply(self, session_id: str, timeout: float = 10.0) -> RelayReply:
        return parse_reply((await self.reply(session_id, timeout)).value)


async def open_pair(reply: RelayReply, body: dict, client_keys, daemon_keys):
    """Connect side A (client keys) and side B (daemon keys) with their auth lines."""
    sid, cnonce = body["sessionId"], body["clientNonce"]
    line_a = encode_auth_line(sid, cnonce, reply.rvd_nonce, client_keys.encrypt_private)
    line_b = encode_auth_line(sid, cnonce, reply.rvd_nonce, daemon_keys.encrypt_private)
    a = await connect(reply.port_a, line_a, host=reply.address)
    b = await connect(reply.port_b, line_b, host=reply.address)
    return a, b


async def play_pair(reply: RelayReply, body: dict, client_keys, daemon_keys,
                    nbytes: int, seed: int = 1) -> None:
    """Pair A and B and check ``nbytes`` each way through the relay, sha256 intact."""
    a, b = await open_pair(reply, body, client_keys, daemon_keys)
    try:
        sent_ab, sent_ba, got_b, got_a = await asyncio.gather(
            send_random(a, nbytes, seed), send_random(b, nbytes, seed + 1),
            receive_all(b), receive_all(a))
        assert got_b == (nbytes, sent_ab)
        assert got_a == (nbytes, sent_ba)
    finally:
        a.close()
        b.close()
