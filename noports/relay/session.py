"""The relay's registry of live sessions: who may open one, and how many.

Owns the refusals that happen before any port is bound: a sessionId that is already live, a
requester over its quota of pending (unpaired) sessions, requests whose sides do not
authenticate (unless ``--allow-unauthenticated``), auth modes this relay does not serve, and
new sessions while draining.  It creates each :class:`RelaySession` with a fresh random relay
nonce, tracks it until it closes, and drains them all on SIGTERM.  The refusals and the quota
bookkeeping are :class:`SessionRegistry`'s, which ``srvd --workers N``'s pool shares.

Not here: reading notifications or looking up public keys (the control plane does that and
hands the keys in), the data plane itself (``dataplane.py``).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from typing import Generic, TypeVar

from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

from noports.errors import NoPortsError
from noports.relay.dataplane import DataPlaneConfig, RelaySession, UnauthGate
from noports.relay.messages import RelayRequest, new_relay_nonce
from noports.relay.stats import RelayStats

__all__ = ["RelayRefused", "RelaySessions", "SessionRegistry"]

log = logging.getLogger("noports.relay")

#: A live session as a registry holds it: RelaySession here, RemoteSession in a WorkerPool.
S = TypeVar("S")


class RelayRefused(NoPortsError):
    """A request the relay will not serve; ``reason`` is the metrics label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class SessionRegistry(Generic[S]):
    """The bookkeeping every session registry shares: the refusals before a port is bound, the
    live sessions by id and the pending quota per requester.

    Written once because :class:`RelaySessions` (one process) and
    :class:`~noports.relay.workers.WorkerPool` (``--workers N``) must refuse exactly the same
    requests for the same reasons; only where a session then runs differs.
    """

    def __init__(self, *, allow_unauthenticated: bool, pending_quota: int,
                 stats: RelayStats | None) -> None:
        self.allow_unauthenticated = allow_unauthenticated
        self.pending_quota = pending_quota
        self.stats = stats or RelayStats()
        self.draining = False
        self._sessions: dict[str, S] = {}
        self._pending: Counter[str] = Counter()      # requester -> sessions not yet paired
        self._requester: dict[str, str] = {}         # sessionId -> requester, while pending

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._sessions

    def get(self, session_id: str) -> S | None:
        return self._sessions.get(session_id)

    def sessions(self) -> list[S]:
        return list(self._sessions.values())

    def pending_for(self, atsign: str) -> int:
        return self._pending[atsign]

    def _refuse(self, reason: str, message: str) -> RelayRefused:
        self.stats.refuse(reason)
        # DEBUG: the control plane logs refusals itself, rate-limited per reason, so that a
        # request flood cannot turn into a log flood
        log.debug("request refused (%s): %s", reason, message)
        return RelayRefused(reason, message)

    def check(self, request: RelayRequest, requester: str | None = None) -> None:
        """Raise RelayRefused if ``request`` would be refused now (binds nothing)."""
        requester = requester or request.atsign_a
        sid = request.session_id
        if self.draining:
            raise self._refuse("draining", f"session {sid}: relay is shutting down")
        if sid in self._sessions:
            raise self._refuse("duplicate_session", f"session {sid} is already live")
        if not request.fully_authenticated and not self.allow_unauthenticated:
            kind = "legacy" if request.legacy else "unauthenticated"
            raise self._refuse("unauthenticated",
                               f"session {sid}: {kind} request from {requester} "
                               "(start srvd with --allow-unauthenticated to serve it)")
        if request.relay_auth_mode != "payload" or request.only443:
            raise self._refuse("unsupported_auth_mode",
                               f"session {sid}: relay auth mode {request.relay_auth_mode!r}"
                               f"{' on 443' if request.only443 else ''} is not served here")
        if self._pending[requester] >= self.pending_quota:
            raise self._refuse("quota", f"session {sid}: {requester} already has "
                                        f"{self.pending_quota} pending sessions")

    def _admit(self, request: RelayRequest, requester: str,
               public_key_a: RSAPublicKey | None, public_key_b: RSAPublicKey | None,
               rvd_nonce: str | None) -> str | None:
        """The checks of ``open`` before a session exists; the relay nonce to use."""
        self.check(request, requester)
        for side, must, key in (("A", request.authenticate_a, public_key_a),
                                ("B", request.authenticate_b, public_key_b)):
            if must and key is None:
                raise self._refuse("no_public_key", f"session {request.session_id}: "
                                                    f"no public key for side {side}")
        if not request.legacy and rvd_nonce is None:
            rvd_nonce = new_relay_nonce()
        return rvd_nonce

    def _register(self, session_id: str, session: S, requester: str) -> None:
        # called before the first await after the checks, so a concurrent duplicate is refused
        self._sessions[session_id] = session
        self._pending[requester] += 1
        self._requester[session_id] = requester

    def _release_pending(self, session_id: str) -> None:
        requester = self._requester.pop(session_id, None)
        if requester is not None:
            self._pending[requester] -= 1
            if self._pending[requester] <= 0:
                del self._pending[requester]

    def _forget(self, session: S) -> None:
        self._release_pending(session.session_id)
        if self._sessions.get(session.session_id) is session:
            del self._sessions[session.session_id]


class RelaySessions(SessionRegistry[RelaySession]):
    """Every live session of one relay process."""

    def __init__(self, config: DataPlaneConfig | None = None, *,
                 allow_unauthenticated: bool = False, pending_quota: int = 32,
                 max_unauth_total: int = 8192, stats: RelayStats | None = None) -> None:
        super().__init__(allow_unauthenticated=allow_unauthenticated,
                         pending_quota=pending_quota, stats=stats)
        self.config = config or DataPlaneConfig()
        self.stats.live_bytes = self._live_bytes
        self.gate = UnauthGate(max_unauth_total, self.stats)

    def _live_bytes(self) -> int:
        return sum(s.bytes_relayed - s.bytes_a_to_b - s.bytes_b_to_a
                   for s in self._sessions.values())

    async def open(self, request: RelayRequest, *, public_key_a: RSAPublicKey | None = None,
                   public_key_b: RSAPublicKey | None = None, requester: str | None = None,
                   rvd_nonce: str | None = None) -> RelaySession:
        """Open a session (ports bound, accepting) or raise RelayRefused.

        ``requester`` is the notification's sender (default ``request.atsign_a``); the quota
        counts its sessions that have not paired yet.  The nonce is fresh and random unless
        given; a legacy request has none.
        """
        requester = requester or request.atsign_a
        rvd_nonce = self._admit(request, requester, public_key_a, public_key_b, rvd_nonce)
        session = RelaySession(request, rvd_nonce=rvd_nonce, public_key_a=public_key_a,
                               public_key_b=public_key_b, config=self.config, stats=self.stats,
                               gate=self.gate, on_paired=self._paired, on_closed=self._closed)
        self._register(request.session_id, session, requester)
        try:
            await session.start()
        except OSError as exc:
            self._forget(session)
            raise self._refuse("bind_failed", f"session {request.session_id}: cannot bind "
                                              f"ports: {exc}") from None
        except BaseException:
            self._forget(session)
            raise
        return session

    def _paired(self, session: RelaySession) -> None:
        self._release_pending(session.session_id)

    def _closed(self, session: RelaySession) -> None:
        self._forget(session)

    async def close(self, grace: float = 0.0) -> None:
        """SIGTERM drain: refuse new sessions; live pairs get ``grace`` seconds; then all close."""
        self.draining = True
        sessions = list(self._sessions.values())
        if sessions:
            await asyncio.gather(*(s.close(grace=grace, reason="drained") for s in sessions),
                                 return_exceptions=True)
