"""npd's service: the asyncio side of the daemon, on one logged-in AtClient.

Owns (spec noports-protocol.md §2.3 rows 1-4, 7, 8; §3.1; §3.4-§3.6; §7.1 step 7; §8.1):

* the monitor on ``<device>\\.sshnp@`` with decryption OFF: every notification is screened by
  :class:`~noports.daemon.handlers.DaemonPolicy` on its sender and key first, so a non-manager
  costs a JSON parse and a counter, never a decryption, a lookup or a reply;
* pings from managers -> the ping response (``heartbeat.<device>.sshnp``, ttl 10 s, ttln 1 min);
* ``npt_request`` from managers -> decrypt, parse, verify the envelope with
  ``public:publickey@<client>``, one tunnel per sessionId (:class:`SessionLedger`, persisted
  *before* the tunnel starts, so a replay after a crash is still a duplicate), permit-open, the
  tunnel's daemon end, then the signed response (or the documented error text);
* the ``device_info`` and ``username`` records shared with each manager (refreshed hourly; with
  ``hide`` they are deleted instead);
* the small state under ``--storage-path`` (:class:`StateStore`): the monitor's last epoch and
  the handled sessionIds, so that a restart replays what it may have missed and nothing twice.

One notification's failure is logged and counted; it never stops the daemon.  Flags, logging
and signals are in ``cli.py``; the decisions themselves in ``handlers.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from noports.at.crypto import public_key_from_b64
from noports.at.envelope import verify_envelope
from noports.at.pubkeys import PublicKeys
from noports.daemon.handlers import (
    KIND_PING,
    DaemonPolicy,
    DaemonStats,
    Drop,
    DropLog,
    SessionLedger,
    build_response,
    classify,
    new_session_keys,
    parse_request_envelope,
)
from noports.errors import AtServerError, NoPortsError, SignatureError
from noports.messages import (
    DEFAULT_DEVICE_GROUP,
    MessageError,
    NptRequest,
    daemon_monitor_regex,
    device_info_key,
    heartbeat_key,
    response_key,
    signature_error,
    tunnel_error,
    username_key,
)
from noports.relay.messages import encode_auth_line
from noports.tunnel import DaemonEnd, TunnelError

if TYPE_CHECKING:  # pragma: no cover
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

    from noports.at.client import AtClient
    from noports.at.monitor import AtNotification, Monitor

__all__ = ["DaemonConfig", "Npd", "StateStore", "default_storage_path", "login_name"]

log = logging.getLogger("noports.daemon")

RESPONSE_TTL_MS = 10_000          # every NoPorts session key: ttl 10 s
RESPONSE_TTLN_MS = 60_000         # notifications: ttln 1 min
DEVICE_INFO_TTL_MS = 30 * 86_400_000
REFRESH_INTERVAL = 3600.0         # device_info refreshed hourly
#: After a restart, replay at most this far back (a notification lives ttln = 1 min at most).
REPLAY_WINDOW_MS = 60_000
#: How often a changed monitor epoch is written to the state file.
STATE_FLUSH_INTERVAL = 2.0
#: Notifications being handled at once; beyond it a manager's flood is dropped ("busy").
MAX_INFLIGHT = 256
#: Drops that strangers can cause at will: logged through the rate-limited DropLog.
_QUIET_REASONS = frozenset({"not_for_me", "not_manager", "not_for_device", "not_update",
                            "unsupported", "busy"})


def login_name() -> str:
    """The daemon's user name (the ``username`` record): what sshnp logs in as."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return os.environ.get("USER") or "unknown"


def default_storage_path(atsign: str, device: str) -> Path:
    """``~/.atsign/storage/<atsign>/.npd/<device>`` (Atsign's daemon keeps its atClient storage
    under ``~/.atsign/storage/<atsign>/..sshnpd/<device>``)."""
    return Path.home() / ".atsign" / "storage" / atsign / ".npd" / device


@dataclass
class DaemonConfig:
    """What npd runs with (cli.py fills it from the flags)."""

    atsign: str
    managers: tuple[str, ...]
    device: str = "default"
    permit_open: tuple[str, ...] = ("localhost:22", "localhost:3389")
    device_group: str = DEFAULT_DEVICE_GROUP
    hide: bool = False
    username: str = field(default_factory=login_name)
    response_ttl_ms: int = RESPONSE_TTL_MS
    response_ttln_ms: int = RESPONSE_TTLN_MS
    device_info_ttl_ms: int = DEVICE_INFO_TTL_MS
    refresh_interval: float = REFRESH_INTERVAL
    lookup_timeout: float = 10.0
    max_inflight: int = MAX_INFLIGHT
    #: extra keyword arguments for each DaemonEnd (tests shorten its timeouts)
    tunnel_options: dict[str, Any] = field(default_factory=dict)


class StateStore:
    """``<storage>/npd-state.json``: ``{"lastEpoch": ms, "sessions": {sessionId: expiry ms}}``.

    Written atomically (temporary file + rename, mode 0600), so a crash leaves the old or the new
    state whole.  No fsync: the file guards against process restarts and crashes, and the
    page cache survives those; after a power loss every notification has expired anyway.
    ``directory`` None keeps the state in memory only.
    """

    FILE_NAME = "npd-state.json"

    def __init__(self, directory: Path | None) -> None:
        self.directory = Path(directory) if directory is not None else None

    @property
    def path(self) -> Path | None:
        return None if self.directory is None else self.directory / self.FILE_NAME

    def prepare(self) -> None:
        """Create the folder (0700); OSError if it cannot be made or written."""
        if self.directory is None:
            return
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        with tempfile.NamedTemporaryFile(dir=self.directory, prefix=".probe."):
            pass    # writable: state saves will not fail later for that reason

    def load(self, now_ms: int) -> tuple[int | None, SessionLedger]:
        path = self.path
        if path is None:
            return None, SessionLedger()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None, SessionLedger()
        except (OSError, ValueError) as exc:
            # a damaged state file must not stop the daemon; say so and start afresh
            log.warning("ignoring unreadable state file %s: %s", path, exc)
            return None, SessionLedger()
        if not isinstance(data, dict):
            return None, SessionLedger()
        epoch = data.get("lastEpoch")
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch <= 0:
            epoch = None
        return epoch, SessionLedger.from_dict(data.get("sessions"), now_ms)

    def save(self, last_epoch: int | None, ledger: SessionLedger) -> None:
        path = self.path
        if path is None:
            return
        text = json.dumps({"lastEpoch": last_epoch, "sessions": ledger.to_dict()},
                          separators=(",", ":"))
        fd, tmp = tempfile.mkstemp(prefix=".npd-state.", suffix=".tmp", dir=self.directory)
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


def _now_ms() -> int:
    return int(time.time() * 1000)


class Npd:
    """The daemon for one (atSign, device).  ``await start()``; ``await close()``.

    ``client`` is logged in (or logs in on first use) as ``config.atsign`` with its keys;
    ``tunnel_factory`` makes the daemon end of each tunnel (default
    :class:`noports.tunnel.DaemonEnd`).
    """

    def __init__(self, client: AtClient, config: DaemonConfig, *,
                 state: StateStore | None = None,
                 tunnel_factory: Callable[..., DaemonEnd] = DaemonEnd,
                 clock_ms: Callable[[], int] = _now_ms) -> None:
        self.client = client
        self.config = config
        self.policy = DaemonPolicy(config.atsign, config.managers, config.device,
                                   config.permit_open, device_group=config.device_group)
        self.state = state or StateStore(None)
        self.tunnel_factory = tunnel_factory
        self.clock_ms = clock_ms
        self.stats = DaemonStats()
        self.drop_log = DropLog(log)
        self.ledger = SessionLedger()
        self.tunnels: dict[str, DaemonEnd] = {}
        self._monitor: Monitor | None = None
        self._reader: asyncio.Task | None = None
        self._periodic: list[asyncio.Task] = []
        self._watchers: set[asyncio.Task] = set()
        self._tasks: set[asyncio.Task] = set()
        self._saved_epoch: int | None = None
        self._key_cache = PublicKeys(256)
        self._closing = False

    # ---- lifecycle --------------------------------------------------------------------------

    async def start(self, timeout: float | None = 30.0) -> None:
        """Load the state, share (or delete) the manager records, subscribe."""
        now = self.clock_ms()
        self.state.prepare()
        last_epoch, self.ledger = self.state.load(now)
        since = None
        if last_epoch is not None:
            # "- 1": the server replays strictly newer epochs, and several notifications can
            # share a millisecond; what was handled already is dropped by the ledger.
            since = max(min(last_epoch, now) - 1, now - REPLAY_WINDOW_MS)
            log.info("resuming from epoch %d (%d handled session(s) remembered)", since,
                     len(self.ledger))
        await self.share_records()
        self._monitor = self.client.monitor(daemon_monitor_regex(self.config.device),
                                            decrypt=False, since=since)
        await self._monitor.start(timeout=timeout)
        self._saved_epoch = self._monitor.last_epoch
        loop = asyncio.get_running_loop()
        self._reader = loop.create_task(self._read())
        self._periodic = [loop.create_task(self._flush_state_periodically())]
        if not self.config.hide and self.config.refresh_interval > 0:
            self._periodic.append(loop.create_task(self._refresh_records()))

    @property
    def reader(self) -> asyncio.Task | None:
        """The task reading the monitor (done only if the monitor failed for good)."""
        return self._reader

    async def close(self) -> None:
        """Stop listening, cancel the requests being handled, close every tunnel, save."""
        self._closing = True
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        for task in self._periodic:
            task.cancel()
        if self._monitor is not None:
            await self._monitor.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        ends = list(self.tunnels.values())
        if ends:
            log.info("closing %d tunnel(s)", len(ends))
            await asyncio.gather(*(end.close("closed", "npd is stopping") for end in ends),
                                 return_exceptions=True)
        if self._watchers:
            # they log each session's end; bounded, a stuck one must not hold the exit
            await asyncio.wait(set(self._watchers), timeout=1.0)
        self._save_state()

    # ---- the records managers read ----------------------------------------------------------

    async def share_records(self) -> None:
        """``device_info`` and ``username`` for each manager; with ``hide``, delete them."""
        cfg = self.config
        for manager in sorted(self.policy.managers):
            info = f"{manager}:{device_info_key(cfg.device)}"
            user = f"{manager}:{username_key(cfg.device)}"
            try:
                if cfg.hide:
                    for key in (info, user):
                        with contextlib.suppress(AtServerError):
                            await self.client.delete(key)
                else:
                    await self.client.put(info, self.policy.ping_response(),
                                          ttl=cfg.device_info_ttl_ms, ttr=-1, ccd=True)
                    await self.client.put(user, cfg.username, ttr=-1, ccd=True)
            except (NoPortsError, OSError, asyncio.TimeoutError) as exc:
                log.warning("cannot %s the device records for %s: %s",
                            "delete" if cfg.hide else "share", manager, exc)

    async def _refresh_records(self) -> None:
        while True:
            await asyncio.sleep(self.config.refresh_interval)
            await self.share_records()

    # ---- state ------------------------------------------------------------------------------

    def _save_state(self) -> None:
        epoch = self._monitor.last_epoch if self._monitor is not None else None
        try:
            self.state.save(epoch, self.ledger)
            self._saved_epoch = epoch
        except OSError as exc:
            log.error("cannot save the state to %s: %s", self.state.path, exc)

    async def _flush_state_periodically(self) -> None:
        while True:
            await asyncio.sleep(STATE_FLUSH_INTERVAL)
            if self._monitor is not None and self._monitor.last_epoch != self._saved_epoch:
                self.ledger.prune(self.clock_ms())
                self._save_state()

    # ---- per notification -------------------------------------------------------------------

    async def _read(self) -> None:
        async for n in self._monitor:
            try:
                self.dispatch(n)
            except Exception:   # one odd notification must never stop the daemon
                self.stats.errors += 1
                log.exception("notification %s from %s: unexpected error", n.id, n.from_atsign)

    def dispatch(self, n: AtNotification) -> asyncio.Task | None:
        """Screen one notification on what arrives in clear; start handling it if it passes."""
        if n.is_stats or self._closing:
            return None
        entity = n.entity
        self.stats.notifications[classify(entity, self.config.device) or "other"] += 1
        verdict = self.policy.screen(entity=entity, sender=n.from_atsign,
                                     recipient=n.to_atsign, operation=n.operation)
        if isinstance(verdict, Drop):
            self._drop(n.from_atsign, verdict)
            return None
        if len(self._tasks) >= self.config.max_inflight:
            self._drop(n.from_atsign, Drop("busy", f"{len(self._tasks)} notifications are "
                                                   "being handled already"))
            return None
        handler = self._answer_ping if verdict == KIND_PING else self._serve_request
        task = asyncio.get_running_loop().create_task(self._guard(handler, n))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _drop(self, sender: str, drop: Drop) -> None:
        self.stats.dropped[drop.reason] += 1
        if drop.reason in _QUIET_REASONS:
            # anyone can send these, at any rate: the first per sender is logged, then few
            self.drop_log(sender, drop)
        else:
            # a manager's request that went wrong: rare, and worth a line each time
            log.warning("dropped (%s): %s", drop.reason, drop.message)

    async def _guard(self, handler, n: AtNotification) -> None:
        try:
            await handler(n)
        except asyncio.CancelledError:
            raise
        except Exception:   # one bad request must never stop the daemon
            self.stats.errors += 1
            log.exception("%s from %s: unexpected error", n.entity, n.from_atsign)

    async def _answer_ping(self, n: AtNotification) -> None:
        # a ping's value is the literal "ping": nothing in it is worth decrypting
        cfg = self.config
        await self.client.notify(f"{n.from_atsign}:{heartbeat_key(cfg.device)}",
                                 self.policy.ping_response(), ttl=cfg.response_ttl_ms,
                                 ttln=cfg.response_ttln_ms)
        self.stats.pings_answered += 1
        log.debug("ping from %s answered", n.from_atsign)

    async def _decrypt(self, n: AtNotification) -> AtNotification:
        # counted by what the policy says of the sender *now*, independently of the screen
        # that let it through: a non-zero authorized="false" count would expose a bypass
        authorized = self.policy.is_manager(n.from_atsign)
        self.stats.decrypt_attempts["true" if authorized else "false"] += 1
        return await self.client.decrypt_notification(n.raw)

    async def _public_key(self, atsign: str) -> RSAPublicKey:
        """``public:publickey@<atsign>``, looked up every time (Atsign dropped its cache of
        these because stale keys broke sessions); parsed keys are cached by their text."""
        self.stats.lookups["true" if self.policy.is_manager(atsign) else "false"] += 1
        return await self._key_cache.lookup(self.client, atsign, self.config.lookup_timeout)

    async def _reply(self, sender: str, session_id: str, value: str, outcome: str) -> None:
        cfg = self.config
        await self.client.notify(f"{sender}:{response_key(session_id, cfg.device)}", value,
                                 ttl=cfg.response_ttl_ms, ttln=cfg.response_ttln_ms)
        self.stats.responses[outcome] += 1

    async def _serve_request(self, n: AtNotification) -> None:
        sender = n.from_atsign
        n = await self._decrypt(n)
        if n.decrypt_error is not None:
            self._drop(sender, Drop("undecryptable", f"npt_request {n.id} from {sender}: "
                                                     f"{n.decrypt_error}"))
            return
        try:
            envelope, request = parse_request_envelope(n.value)
        except MessageError as exc:
            # malformed requests get no reply (spec §3.6)
            self._drop(sender, Drop("bad_request", f"npt_request {n.id} from {sender}: {exc}"))
            return
        sid = request.session_id
        try:
            client_key = await self._public_key(sender)
            verify_envelope(envelope, client_key)
        except (SignatureError, NoPortsError, ValueError, OSError, asyncio.TimeoutError) as exc:
            log.warning("session %s from %s: signature not verified: %s", sid, sender, exc)
            await self._reply(sender, sid, signature_error(exc), "signature")
            return
        if not self.ledger.claim(sid, self.clock_ms()):
            self.stats.duplicates += 1
            log.info("duplicate npt_request for session %s from %s (notification %s) dropped",
                     sid, sender, n.id)
            return
        # written before the tunnel starts: a crash after this point cannot lead to a second
        # tunnel for the same sessionId when the monitor replays the request
        self._save_state()
        refusal = self.policy.check_request(request)
        if refusal is not None:
            log.info("session %s from %s refused: %s", sid, sender, refusal)
            await self._reply(sender, sid, refusal, "refused")
            return
        await self._start_session(sender, request)

    async def _start_session(self, sender: str, request: NptRequest) -> None:
        sid = request.session_id
        keys = client_pk = None
        if request.encrypt_rvd_traffic:
            try:
                client_pk = public_key_from_b64(request.client_ephemeral_pk)
            except (ValueError, NoPortsError) as exc:
                await self._reply(sender, sid, tunnel_error(f"clientEphemeralPK is not a "
                                                            f"base64 RSA public key: {exc}"),
                                  "tunnel_error")
                return
            keys = new_session_keys()
        auth_line = encode_auth_line(sid, request.client_nonce, request.rvd_nonce,
                                     self.client.require_keys().encrypt_private)
        end = self.tunnel_factory(
            request.rvd_host, request.rvd_port, auth_line,
            session_key=keys.key_b64 if keys else None, session_iv=keys.iv_b64 if keys else None,
            target_host=request.requested_host, target_port=request.requested_port,
            idle_timeout=request.timeout, **self.config.tunnel_options)
        try:
            await end.start()
        except (TunnelError, NoPortsError, OSError, asyncio.TimeoutError) as exc:
            log.warning("session %s from %s: tunnel did not start: %s", sid, sender, exc)
            await self._reply(sender, sid, tunnel_error(exc), "tunnel_error")
            return
        self.tunnels[sid] = end
        self.stats.sessions_total += 1
        self.stats.sessions_live += 1
        watcher = asyncio.get_running_loop().create_task(self._watch(sid, sender, end))
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)
        response = build_response(request, keys,
                                  self.client.require_keys().encrypt_private, client_pk)
        try:
            await self._reply(sender, sid, response, "connected")
        except (NoPortsError, OSError, asyncio.TimeoutError) as exc:
            # nobody can use a tunnel whose keys never reached the client
            log.warning("session %s: response to %s failed (%s); closing its tunnel", sid,
                        sender, exc)
            await end.close("closed", "the response could not be sent")
            return
        log.info("session %s for %s: tunnel to %s:%d via relay %s:%d (%s, idle timeout %.0f s)",
                 sid, sender, request.requested_host, request.requested_port, request.rvd_host,
                 request.rvd_port, "encrypted" if keys else "NOT encrypted", request.timeout)

    async def _watch(self, sid: str, sender: str, end: DaemonEnd) -> None:
        try:
            ended = await end.wait_closed()
            log.info("session %s for %s ended (%s); %d connection(s), %d byte(s) in, %d out",
                     sid, sender, ended, end.stats.connections_total, end.bytes_from_relay,
                     end.bytes_to_relay)
        finally:
            self.stats.sessions_live -= 1
            if self.tunnels.get(sid) is end:
                del self.tunnels[sid]

    # ---- metrics ----------------------------------------------------------------------------

    def render(self) -> str:
        return self.stats.render()
