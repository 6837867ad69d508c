"""srvd's control plane: ``request_ports`` notifications in, session replies out.

Owns (noports-protocol.md §2.3 rows 11-13, §3.2, §9.4): the monitor on ``\\.sshrvd@``; deciding,
for each notification, whether it opens a session; the manager rule (with ``--manager``, only
that client atSign may open sessions: the notification's sender must be the manager *and*
``atSignA`` must be the sender -- and the latter holds for every request, so no one can open a
session in another atSign's name); the pending quota per requesting atSign, counted before any
decryption or lookup so that a flood costs almost nothing; looking up both sides'
``public:publickey@<atSign>`` when the request arrives; opening the session through
:class:`~noports.relay.session.RelaySessions`; and the reply, notification key ``<sessionId>`` in
namespace ``sshrvd`` shared with the requester (``@<client>:<sessionId>.sshrvd@<relay>``, ttl
10 s, ttln 1 min, encrypted), CSV or JSON as the request asked.

Refused requests are never answered (as Atsign's relay: the client times out); each refusal is
counted in ``refusals_total{reason}`` and logged, at most once per reason per minute
(:class:`RefusalLog`), so a flood cannot flood the log.

The decisions are sans-IO (:class:`ControlPolicy`, :func:`request_kind`, :class:`RefusalLog`);
:class:`RelayControl` only does the I/O around them.  Not here: the data plane (``dataplane.py``),
the session registry's own refusals (``session.py``), flags and signals (``cli.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from noports.at.names import normalize_atsign
from noports.at.pubkeys import PublicKeys
from noports.errors import AtServerError, InvalidAtSignError, NoPortsError
from noports.relay.messages import (
    RelayMessageError,
    RelayRequest,
    encode_reply,
    parse_legacy_request,
    parse_request_ports,
)
from noports.relay.session import RelayRefused

if TYPE_CHECKING:  # pragma: no cover
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

    from noports.at.client import AtClient
    from noports.at.monitor import AtNotification, Monitor
    from noports.relay.session import RelaySessions

__all__ = [
    "LEGACY",
    "MONITOR_REGEX",
    "NAMESPACE",
    "REPLY_TTLN_MS",
    "REPLY_TTL_MS",
    "REQUEST_PORTS",
    "ControlPolicy",
    "Ignored",
    "RefusalLog",
    "RelayControl",
    "request_kind",
]

log = logging.getLogger("noports.relay")

#: What the relay subscribes to (Atsign's newer relays; the baseline used the looser ``sshrvd@``).
MONITOR_REGEX = r"\.sshrvd@"
#: The relay's namespace (still ``sshrvd`` after Atsign renamed the program srvd).
NAMESPACE = "sshrvd"
REPLY_TTL_MS = 10_000       # the reply record's ttl, as every NoPorts session key
REPLY_TTLN_MS = 60_000      # the reply notification's lifetime

REQUEST_PORTS = "request_ports"
LEGACY = "legacy"

# Entities (the key without "@to:" and "@from", lower-cased by the monitor).  A device name is
# [a-z0-9_][a-z0-9_-]{1,35} (spec §2.2), so it never holds a dot: the newer relay keys
# (nack.*, *.auth_modes.sshrvd, logging.*.sessions.sshrvd, discover_request.sshrvd) and our own
# reply keys can never be taken for a request -- Atsign's relay treats *any* other key holding
# "sshrvd" as a legacy request, which would turn them into sessions.
_DEVICE = r"[a-z0-9_][a-z0-9_\-]{1,35}"
_REQUEST_PORTS_RE = re.compile(_DEVICE + r"\.request_ports\.sshrvd")
_LEGACY_RE = re.compile(_DEVICE + r"\.sshrvd")


# Relay words that fit the device-name shape but are other messages (a device-less request, the
# newer relay discovery), never legacy requests.
_NOT_DEVICES = frozenset({"request_ports.sshrvd", "discover_request.sshrvd",
                          "discover_response.sshrvd"})


def request_kind(entity: str) -> str | None:
    """``REQUEST_PORTS`` for ``<device>.request_ports.sshrvd``, ``LEGACY`` for
    ``<device>.sshrvd``, None for any other key."""
    if _REQUEST_PORTS_RE.fullmatch(entity):
        return REQUEST_PORTS
    if _LEGACY_RE.fullmatch(entity) and entity not in _NOT_DEVICES:
        return LEGACY
    return None


@dataclass(frozen=True)
class Ignored:
    """A request the relay does not serve: ``reason`` is the metrics label."""

    reason: str
    message: str


class ControlPolicy:
    """Who may open a session, decided in two sans-IO steps.

    :meth:`screen` runs on what is known before decrypting anything (key, sender, recipient,
    operation and the sender's current load); :meth:`admit` parses the decrypted value.  The
    session registry then applies its own checks (duplicate sessionId, auth modes, drain) when
    the session is opened.
    """

    def __init__(self, relay_atsign: str, *, manager: str | None = None,
                 allow_unauthenticated: bool = False, pending_quota: int = 32,
                 max_inflight: int = 256) -> None:
        self.relay_atsign = normalize_atsign(relay_atsign)
        # None = "open": anyone may open sessions (Atsign's default)
        self.manager = normalize_atsign(manager) if manager is not None else None
        self.allow_unauthenticated = allow_unauthenticated
        if pending_quota < 1:
            raise ValueError("pending_quota must be at least 1")
        self.pending_quota = pending_quota
        self.max_inflight = max_inflight

    def screen(self, *, entity: str, sender: str, recipient: str, operation: str = "update",
               pending: int = 0, inflight: int = 0, total_inflight: int = 0,
               draining: bool = False) -> str | Ignored:
        """The request kind, or why the notification is ignored before it is even decrypted.

        ``pending``: the sender's sessions not yet paired; ``inflight``: its requests being
        handled now (both count against the quota); ``total_inflight``: everyone's.
        """
        kind = request_kind(entity)
        if kind is None or operation != "update":
            return Ignored("not_a_request", f"{operation} of {entity!r} from {sender} "
                                            "is not a relay request")
        if recipient != self.relay_atsign:
            return Ignored("not_a_request", f"{entity!r} from {sender} was sent to "
                                            f"{recipient}, not to {self.relay_atsign}")
        if self.manager is not None and sender != self.manager:
            return Ignored("not_manager", f"request from {sender}: only the manager "
                                          f"{self.manager} may open sessions on this relay")
        if draining:
            return Ignored("draining", f"request from {sender}: relay is shutting down")
        if kind == LEGACY and not self.allow_unauthenticated:
            return Ignored("unauthenticated", f"legacy request (unauthenticated sockets) from "
                                              f"{sender} (start srvd with "
                                              "--allow-unauthenticated to serve it)")
        if pending + inflight >= self.pending_quota:
            return Ignored("quota", f"request from {sender}: it already has "
                                    f"{self.pending_quota} pending sessions")
        if total_inflight >= self.max_inflight:
            return Ignored("busy", f"request from {sender}: {self.max_inflight} requests "
                                   "are being handled already")
        return kind

    def admit(self, kind: str, value: str | None, sender: str) -> RelayRequest | Ignored:
        """Parse a screened request's decrypted value; the request, or why it is refused."""
        if value is None:
            return Ignored("bad_request", f"request from {sender} carries no value")
        try:
            if kind == LEGACY:
                request = parse_legacy_request(value, sender)
            else:
                request = parse_request_ports(value)
        except RelayMessageError as exc:
            return Ignored("bad_request", f"request from {sender}: {exc}")
        if request.atsign_a != sender:
            return Ignored("sender_mismatch", f"session {request.session_id}: atSignA "
                                              f"{request.atsign_a} is not the sender {sender}")
        if not request.fully_authenticated and not self.allow_unauthenticated:
            return Ignored("unauthenticated", f"session {request.session_id}: request from "
                                              f"{sender} does not authenticate both sockets "
                                              "(start srvd with --allow-unauthenticated to "
                                              "serve it)")
        return request


class RefusalLog:
    """Log a refusal at most once per reason per ``window`` seconds (sans-IO but for logging).

    The first refusal of a reason is logged at once; later ones inside the window are only
    counted, and the next one logged after the window says how many were left out.
    """

    def __init__(self, logger: logging.Logger = log, *, window: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.window = window
        self.clock = clock
        self._last: dict[str, float] = {}
        self.suppressed: Counter[str] = Counter()

    def __call__(self, reason: str, message: str) -> bool:
        """Record one refusal; True if it was logged."""
        now = self.clock()
        last = self._last.get(reason)
        if last is not None and now - last < self.window:
            self.suppressed[reason] += 1
            return False
        self._last[reason] = now
        left_out = self.suppressed.pop(reason, 0)
        more = f" ({left_out} more refused for this reason since the last line)" if left_out \
            else ""
        self.logger.info("request refused (%s): %s%s", reason, message, more)
        return True

    def flush(self) -> None:
        """Log the counts still held back (at shutdown)."""
        for reason, count in sorted(self.suppressed.items()):
            self.logger.info("request refused (%s): %d more since the last line", reason, count)
        self.suppressed.clear()


class RelayControl:
    """The I/O around :class:`ControlPolicy`: monitor, decrypt, look up, open, reply.

    ``client`` is the relay's logged-in AtClient; ``sessions`` the registry (its ``stats``
    receive the control plane's refusals too); ``address`` is ``--ip``, sent verbatim.
    """

    def __init__(self, client: AtClient, sessions: RelaySessions, policy: ControlPolicy, *,
                 address: str, refusal_log: RefusalLog | None = None,
                 reply_ttl_ms: int = REPLY_TTL_MS, reply_ttln_ms: int = REPLY_TTLN_MS,
                 lookup_timeout: float = 10.0) -> None:
        self.client = client
        self.sessions = sessions
        self.policy = policy
        self.address = address
        self.stats = sessions.stats
        self.refusals = refusal_log or RefusalLog()
        self.reply_ttl_ms = reply_ttl_ms
        self.reply_ttln_ms = reply_ttln_ms
        self.lookup_timeout = lookup_timeout
        self.draining = False
        self.requests_total = 0       # notifications that looked like relay requests
        self.replies_total = 0
        self._inflight: Counter[str] = Counter()
        self._tasks: set[asyncio.Task] = set()
        self._monitor: Monitor | None = None
        self._reader: asyncio.Task | None = None
        # looked up on every request (so a rotated key is seen at once), parsed once per text
        self._key_cache = PublicKeys(1024)

    # ---- lifecycle --------------------------------------------------------------------------

    async def start(self, timeout: float | None = 30.0) -> None:
        """Subscribe (``monitor`` on ``\\.sshrvd@``) and start handling requests."""
        # decrypt=False: the sender and key are screened first, so refused requests cost no
        # decryption at all
        self._monitor = self.client.monitor(MONITOR_REGEX, decrypt=False)
        await self._monitor.start(timeout=timeout)
        self._reader = asyncio.get_running_loop().create_task(self._read())

    @property
    def reader(self) -> asyncio.Task | None:
        """The task reading the monitor (done only if the monitor failed for good)."""
        return self._reader

    async def close(self) -> None:
        """Stop reading requests and cancel the ones being handled."""
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        if self._monitor is not None:
            await self._monitor.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self.refusals.flush()

    async def _read(self) -> None:
        async for n in self._monitor:
            try:
                self.dispatch(n)
            except Exception:   # one odd notification must never stop the relay
                log.exception("notification %s from %s: unexpected error", n.id, n.from_atsign)
                self.stats.refuse("internal_error")

    # ---- per notification -------------------------------------------------------------------

    def refuse(self, ignored: Ignored, *, counted: bool = False) -> None:
        """Count (unless the registry already did) and log (rate-limited) one refusal."""
        if not counted:
            self.stats.refuse(ignored.reason)
        self.refusals(ignored.reason, ignored.message)

    def dispatch(self, n: AtNotification) -> asyncio.Task | None:
        """Screen one notification; start handling it if it passes.  Returns the task."""
        if n.is_stats:
            return None
        sender = n.from_atsign
        verdict = self.policy.screen(
            entity=n.entity, sender=sender, recipient=n.to_atsign, operation=n.operation,
            pending=self.sessions.pending_for(sender), inflight=self._inflight[sender],
            total_inflight=len(self._tasks), draining=self.draining or self.sessions.draining)
        if isinstance(verdict, Ignored):
            if verdict.reason != "not_a_request":
                self.requests_total += 1
            self.refuse(verdict)
            return None
        self.requests_total += 1
        self._inflight[sender] += 1
        task = asyncio.get_running_loop().create_task(self._handle(n, verdict))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _handle(self, n: AtNotification, kind: str) -> None:
        sender = n.from_atsign
        try:
            await self._serve(n, kind, sender)
        except asyncio.CancelledError:
            raise
        except Exception:   # one bad request must never stop the relay
            log.exception("request %s from %s: unexpected error", n.id, sender)
            self.stats.refuse("internal_error")
        finally:
            self._inflight[sender] -= 1
            if self._inflight[sender] <= 0:
                del self._inflight[sender]

    async def _serve(self, n: AtNotification, kind: str, sender: str) -> None:
        value = n.value
        if n.is_encrypted:
            n = await self.client.decrypt_notification(n.raw)
            if n.decrypt_error is not None:
                self.refuse(Ignored("undecryptable", f"request {n.id} from {sender}: "
                                                     f"{n.decrypt_error}"))
                return
            value = n.value
        request = self.policy.admit(kind, value, sender)
        if isinstance(request, Ignored):
            self.refuse(request)
            return
        try:
            # cheap checks (draining, duplicate, quota) before spending lookups on it
            self.sessions.check(request, sender)
        except RelayRefused as exc:
            self.refuse(Ignored(exc.reason, str(exc)), counted=True)
            return
        keys = await self._public_keys(request)
        if isinstance(keys, Ignored):
            self.refuse(keys)
            return
        try:
            session = await self.sessions.open(request, public_key_a=keys[0],
                                               public_key_b=keys[1], requester=sender)
        except RelayRefused as exc:
            self.refuse(Ignored(exc.reason, str(exc)), counted=True)
            return
        log.debug("session %s for %s: ports A=%d B=%d", request.session_id, sender,
                  session.port_a, session.port_b)
        if session.state != "open":
            return      # drained or closed before anyone was told its ports
        reply = encode_reply(request, self.address, session.port_a, session.port_b,
                             session.rvd_nonce)
        try:
            await self.client.notify(f"{sender}:{request.session_id}.{NAMESPACE}", reply,
                                     ttl=self.reply_ttl_ms, ttln=self.reply_ttln_ms)
        except (NoPortsError, OSError, asyncio.TimeoutError) as exc:
            # nobody can use ports nobody was told about: free them now
            self.refuse(Ignored("reply_failed", f"session {request.session_id}: reply to "
                                                f"{sender} failed: {exc}"))
            await session.close(reason="reply_failed")
            return
        self.replies_total += 1

    async def _public_keys(self, request: RelayRequest
                           ) -> tuple[RSAPublicKey | None, RSAPublicKey | None] | Ignored:
        """Both sides' encryption public keys, looked up now (only for sides that
        authenticate)."""
        wanted = [(request.atsign_a if request.authenticate_a else None),
                  (request.atsign_b if request.authenticate_b else None)]
        results = await asyncio.gather(*(self._public_key(a) for a in wanted),
                                       return_exceptions=True)
        keys: list[RSAPublicKey | None] = []
        for atsign, result in zip(wanted, results, strict=True):
            if isinstance(result, BaseException):
                if isinstance(result, asyncio.CancelledError):
                    raise result
                if isinstance(result, (AtServerError, InvalidAtSignError, ValueError)):
                    reason = "no_public_key"
                elif isinstance(result, (NoPortsError, OSError, asyncio.TimeoutError)):
                    reason = "lookup_failed"
                else:
                    raise result
                return Ignored(reason, f"session {request.session_id}: public key of "
                                       f"{atsign}: {result}")
            keys.append(result)
        return keys[0], keys[1]

    async def _public_key(self, atsign: str | None) -> RSAPublicKey | None:
        if atsign is None:
            return None
        return await self._key_cache.lookup(self.client, atsign, self.lookup_timeout)

    # ---- metrics ----------------------------------------------------------------------------

    def render(self, prefix: str = "noports_relay") -> str:
        """The control plane's own counters, Prometheus text (appended to RelayStats')."""
        lines = []
        for name, help_text, value in (
                ("requests_total", "Relay request notifications received.", self.requests_total),
                ("replies_total", "Relay replies sent (sessions offered).", self.replies_total)):
            lines += [f"# HELP {prefix}_{name} {help_text}", f"# TYPE {prefix}_{name} counter",
                      f"{prefix}_{name} {value}"]
        return "\n".join(lines) + "\n"
