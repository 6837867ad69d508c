"""One ``atserver`` process: store + PKI + root directory + one TLS listener per hosted atSign.

Owns start-up (open the store, make or reuse the CA and server certificate, create new
atSigns, ``--keys-dir`` activation, bind each atSign to its recorded port), the periodic jobs
(stats notifications, expiry sweeps, idle-connection checks) and an orderly stop.  The wire
behaviour lives in :mod:`.server` and :mod:`.root`, the verbs in :mod:`.verbs`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from noports.at.names import normalize_atsign
from noports.atserver import provision
from noports.atserver.keystore import KeyStore, now_ms
from noports.atserver.notifications import NotificationHub
from noports.atserver.pki import Pki, ensure_pki, server_ssl_context
from noports.atserver.root import RootDirectory, RootProtocol
from noports.atserver.server import AtSignConnection, Batcher, ConnectionLimits
from noports.atserver.store import Store
from noports.atserver.verbs import AT_SECRET, AtServerCore, HostedAtSign, Limits

__all__ = ["AtServerApp", "ServerConfig"]

log = logging.getLogger("noports.atserver")


@dataclass
class ServerConfig:
    state_dir: Path
    host: str = "127.0.0.1"
    root_port: int = 6464
    atsigns: list[str] = field(default_factory=list)
    keys_dir: Path | None = None
    synchronous: str = "NORMAL"
    stats_interval: float = 15.0
    sweep_interval: float = 60.0
    # How long an expired notification still answers notify:status "expired".
    notification_retention_ms: int = 3600 * 1000
    handshake_timeout: float = 10.0
    connection: ConnectionLimits = field(default_factory=ConnectionLimits)
    limits: Limits = field(default_factory=Limits)
    root: RootDirectory = field(default_factory=RootDirectory)


def _bind_address(host: str) -> str:
    """One address to bind: an IP literal as given, else the first IPv4 (then any) resolution.

    Binding a host name that resolves to several addresses with port 0 would give each socket
    a different ephemeral port; the root can only advertise one.
    """
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    infos.sort(key=lambda info: info[0] != socket.AF_INET)
    return infos[0][4][0]


class AtServerApp:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.state_dir = Path(config.state_dir)
        self.store: Store | None = None
        self.pki: Pki | None = None
        self.core: AtServerCore | None = None
        self.batcher: Batcher | None = None
        self.root_port = 0
        self.ports: dict[str, int] = {}
        self.servers: list[asyncio.AbstractServer] = []
        self.connections: set[AtSignConnection] = set()
        self.new_secrets: dict[str, str] = {}
        self._tasks: list[asyncio.Task] = []

    # -- start --------------------------------------------------------------------------------

    def _open_state(self) -> list[HostedAtSign]:
        cfg = self.config
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.pki = ensure_pki(self.state_dir, cfg.host)
        db = self.state_dir / "atserver.db"
        if not db.exists():
            # Private keys and CRAM secrets live here; SQLite gives -wal/-shm the same mode.
            os.close(os.open(db, os.O_WRONLY | os.O_CREAT, 0o600))
        self.store = Store(db, synchronous=cfg.synchronous)
        self.store.start_checkpointer()
        hub = NotificationHub(self.store)
        self.core = AtServerCore(self.store, hub, cfg.limits,
                                 on_secret_deleted=provision.remove_secret)
        recorded = self.store.atsigns()
        wanted = list(recorded)
        for a in cfg.atsigns:
            a = normalize_atsign(a)
            if a not in wanted:
                wanted.append(a)
        hosted = []
        for atsign in wanted:
            ks = KeyStore(self.store, atsign)
            h = HostedAtSign(atsign=atsign, port=recorded.get(atsign, 0), ks=ks,
                             secret_file=provision.secret_file(self.state_dir, atsign))
            if atsign not in recorded:
                self.new_secrets[atsign] = provision.init_atsign(ks, self.state_dir)
                self.store.set_atsign_port(atsign, 0, now_ms())
            if cfg.keys_dir is not None:
                provision.activate_from_keys_dir(h, Path(cfg.keys_dir))
            self.core.host(h)
            hosted.append(h)
            if atsign in self.new_secrets and ks.get(AT_SECRET) is not None:
                provision.announce_secret(atsign, self.new_secrets[atsign], self.state_dir)
        self.store.commit()
        return hosted

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        cfg = self.config
        hosted = self._open_state()
        self.batcher = Batcher(loop, self.store)
        ssl_ctx = server_ssl_context(self.pki)
        bind = _bind_address(cfg.host)
        root_port = cfg.root_port
        if root_port == 0:
            root_port = int(self.store.get_setting("root_port") or 0)
        root_srv = await self._listen(lambda: RootProtocol(cfg.root), bind, root_port, ssl_ctx,
                                      "root", fallback=cfg.root_port == 0)
        self.root_port = root_srv.sockets[0].getsockname()[1]
        if cfg.root_port == 0:
            self.store.set_setting("root_port", str(self.root_port))
        for h in hosted:
            srv = await self._listen(self._factory(h), bind, h.port, ssl_ctx, h.atsign,
                                     fallback=True)
            port = srv.sockets[0].getsockname()[1]
            if port != h.port:
                if h.port:
                    log.warning("%s: recorded port %d is not free; now on %d", h.atsign,
                                h.port, port)
                h.port = port
                self.store.set_atsign_port(h.atsign, port, now_ms())
            self.ports[h.atsign] = port
            cfg.root.set(h.atsign, cfg.host, port)
        self.store.commit()
        self._tasks = [
            loop.create_task(self._every(cfg.stats_interval, self._stats)),
            loop.create_task(self._every(cfg.sweep_interval, self._sweep)),
            loop.create_task(self._every(self._idle_period(), self._idle_check)),
        ]

    def _factory(self, h: HostedAtSign):
        core, batcher, limits, registry = (self.core, self.batcher, self.config.connection,
                                           self.connections)
        return lambda: AtSignConnection(core, h, batcher, limits, registry)

    async def _listen(self, factory, host: str, port: int, ssl_ctx, what: str, *,
                      fallback: bool) -> asyncio.AbstractServer:
        loop = asyncio.get_running_loop()
        kw = dict(ssl=ssl_ctx, ssl_handshake_timeout=self.config.handshake_timeout,
                  reuse_address=True, backlog=1024)
        try:
            srv = await loop.create_server(factory, host, port, **kw)
        except OSError as exc:
            if not (fallback and port):
                raise
            log.warning("%s: cannot bind port %d (%s); using a new one", what, port, exc)
            srv = await loop.create_server(factory, host, 0, **kw)
        self.servers.append(srv)
        return srv

    # -- periodic jobs ------------------------------------------------------------------------

    async def _every(self, period: float, job) -> None:
        if period <= 0:
            return
        while True:
            await asyncio.sleep(period)
            try:
                job()
            except Exception:
                log.exception("periodic job %s failed", getattr(job, "__name__", job))
            self.batcher.schedule()

    def _stats(self) -> None:
        self.core.hub.stats_tick()

    def _sweep(self) -> None:
        """Delete expired keys (through the commit log) and long-expired notifications."""
        now = now_ms()
        for atsign, key in self.store.expired_keys(now):
            h = self.core.hosted.get(atsign)
            if h is not None:
                h.ks.delete(key)
        self.store.purge_notifications(now - self.config.notification_retention_ms)

    def _idle_period(self) -> float:
        timeouts = [t for t in (self.config.connection.unauth_idle_timeout,
                                self.config.root.idle_timeout) if t and t > 0]
        return min([1.0] + [t / 4 for t in timeouts])

    def _idle_check(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        limit = self.config.connection.unauth_idle_timeout
        if limit and limit > 0:
            for conn in list(self.connections):
                s = conn.session
                if s is not None and not s.authenticated and not conn.closing \
                        and now - conn.last_active > limit:
                    conn.idle_close()
        root = self.config.root
        if root.idle_timeout and root.idle_timeout > 0:
            for rc in list(root.connections):
                if now - rc.last_active > root.idle_timeout:
                    rc._close()

    # -- facts for the ready line -------------------------------------------------------------

    def ready_info(self) -> dict:
        cram = {}
        for atsign, h in self.core.hosted.items():
            if h.ks.get(AT_SECRET) is not None:
                cram[atsign] = str(provision.secret_file(self.state_dir, atsign))
        return {"event": "ready", "pid": os.getpid(), "host": self.config.host,
                "root_port": self.root_port,
                "atsigns": dict(self.ports), "ca_file": str(self.pki.ca_file),
                "state_dir": str(self.state_dir),
                "keys_dir": str(self.config.keys_dir) if self.config.keys_dir else None,
                "cram_secret_files": cram}

    # -- stop ---------------------------------------------------------------------------------

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for srv in self.servers:
            srv.close()
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()
        for rc in list(self.config.root.connections):
            if rc.transport is not None:
                rc.transport.abort()
        if self.batcher is not None:
            self.batcher.flush()
        await asyncio.sleep(0)
        if self.store is not None:
            self.store.close()
            self.store = None
