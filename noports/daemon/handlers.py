"""npd's decisions, sans-IO: who is heard, what a request may do, and what is answered.

Owns (spec noports-protocol.md §3.1, §3.4-§3.6, §4, §8.1, §8.2):

* :class:`DaemonPolicy` -- the screen every notification passes *before* anything is decrypted
  or looked up (recipient, sender in ``--managers``, kind of key, operation), the request checks
  that follow a verified signature (permit-open, key type, relay nonce), and the ping response;
* :func:`parse_request_envelope` -- the decrypted ``npt_request`` value -> (envelope, request);
* :func:`build_response` -- the signed success response with the session key and IV wrapped for
  the client's one-time RSA key;
* :class:`SessionLedger` -- at most one tunnel per sessionId, remembered across restarts (its
  JSON form is what ``daemon.py`` persists);
* :class:`DropLog` -- the first drop per sender is logged, then rate-limited;
* :class:`DaemonStats` -- the counters (Prometheus text), among them
  ``decrypt_attempts_total{authorized="false"}``, which must stay 0.

Nothing here touches a socket, the event loop or the file system (``daemon.py`` does).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey, RSAPublicKey

from noports.at.crypto import b64e
from noports.at.envelope import encode_envelope
from noports.messages import (
    NAMESPACE,
    DaemonResponse,
    MessageError,
    NptRequest,
    PingResponse,
    encrypt_session_secret,
    not_permitted_error,
    permits,
    tunnel_error,
)

__all__ = [
    "KIND_NPT_REQUEST",
    "KIND_PING",
    "DaemonPolicy",
    "DaemonStats",
    "Drop",
    "DropLog",
    "SessionKeys",
    "SessionLedger",
    "build_response",
    "classify",
    "new_session_keys",
    "parse_request_envelope",
]

KIND_PING = "ping"
KIND_NPT_REQUEST = "npt_request"
#: The kinds this npd serves; others (ssh_request, sshpublickey, legacy sshd...) are dropped.
SERVED_KINDS = (KIND_PING, KIND_NPT_REQUEST)

#: Handled sessionIds are remembered this long: far beyond a notification's ttln (1 min), so a
#: replay after a restart, or a re-sent notification, can never start a second tunnel.
SESSION_MEMORY_MS = 3_600_000
#: The ledger never holds more than this many sessionIds (oldest forgotten first).
SESSION_MEMORY_MAX = 100_000


@dataclass(frozen=True)
class Drop:
    """A notification npd does not act on; ``reason`` is the metrics label."""

    reason: str
    message: str


def classify(entity: str, device: str) -> str | None:
    """``ping.<device>.sshnp`` -> ``"ping"``; the first label of any ``<x>.<device>.sshnp``;
    None when the key is not for this device."""
    suffix = f".{device}.{NAMESPACE}"
    if not entity.endswith(suffix):
        return None
    kind = entity[: -len(suffix)]
    return kind if kind and "." not in kind else None


# --- the policy -----------------------------------------------------------------------------

class DaemonPolicy:
    """Who npd listens to and what it lets a request do."""

    def __init__(self, atsign: str, managers: list[str] | tuple[str, ...], device: str,
                 permit_open: list[str] | tuple[str, ...], *,
                 device_group: str = "__none__") -> None:
        if not managers:
            # an empty manager list must never mean "anyone"
            raise ValueError("at least one manager atSign is required")
        if not permit_open:
            raise ValueError("the permit-open list is empty")
        self.atsign = atsign
        self.managers = frozenset(managers)
        self.device = device
        self.permit_open = tuple(permit_open)
        self.device_group = device_group
        self._ping_json = PingResponse(devicename=device, device_group_name=device_group,
                                       allowed_services=list(self.permit_open)).to_json()

    def is_manager(self, atsign: str) -> bool:
        return atsign in self.managers

    def screen(self, *, entity: str, sender: str, recipient: str,
               operation: str = "update") -> str | Drop:
        """The kind to serve, or why not -- decided on what arrives in clear, before any
        decryption or lookup: non-managers are dropped whatever they send."""
        if recipient != self.atsign:
            return Drop("not_for_me", f"{entity!r} from {sender} is for {recipient}")
        if sender not in self.managers:
            return Drop("not_manager", f"{sender} is not a manager of this device")
        kind = classify(entity, self.device)
        if kind is None:
            return Drop("not_for_device", f"{entity!r} from {sender} is not a key of device "
                                          f"{self.device}")
        if operation != "update":
            return Drop("not_update", f"{operation} of {entity!r} from {sender}")
        if kind not in SERVED_KINDS:
            return Drop("unsupported", f"{kind!r} from {sender} is not served by this npd "
                                       "(only ping and npt_request)")
        return kind

    def ping_response(self) -> str:
        """The heartbeat / device_info JSON (built once: the configuration does not change)."""
        return self._ping_json

    def check_request(self, request: NptRequest) -> str | None:
        """The error text to send back for a verified request it refuses, or None to serve it."""
        if not permits(self.permit_open, request.requested_host, request.requested_port):
            return not_permitted_error(request.requested_host, request.requested_port)
        if request.encrypt_rvd_traffic and request.client_ephemeral_pk_type != "rsa2048":
            return tunnel_error(f"unsupported clientEphemeralPKType "
                                f"{request.client_ephemeral_pk_type[:40]!r} (only rsa2048)")
        if not request.authenticate_to_rvd:
            # the auth line is what keeps others off the session's relay ports
            return tunnel_error("this daemon only uses relay sessions whose sockets "
                                "authenticate (authenticateToRvd must be true)")
        if request.rvd_nonce is None:
            return tunnel_error("the request carries no rvdNonce (a legacy, unauthenticated "
                                "relay session)")
        return None


def parse_request_envelope(value: str | None) -> tuple[dict, NptRequest]:
    """The decrypted ``npt_request`` value -> (envelope object, request); MessageError if it is
    not an envelope holding a well-formed request.  The signature is checked by the caller
    (with ``verify_envelope(envelope, client_public_key)``), which re-serialises the payload
    in the order received here."""
    if not isinstance(value, str):
        raise MessageError("npt_request carries no value")
    try:
        env = json.loads(value)
    except (ValueError, RecursionError) as exc:
        raise MessageError(f"npt_request is not JSON: {exc}"[:200]) from None
    if not isinstance(env, dict) or not isinstance(env.get("payload"), dict):
        raise MessageError("npt_request is not a signed envelope (no payload object)")
    return env, NptRequest.from_payload(env["payload"])


@dataclass(frozen=True)
class SessionKeys:
    """The session's AES-256 key and IV, raw and as base64 (what the tunnel end takes).
    Never in a repr: secrets must not reach a log line."""

    key: bytes = field(repr=False)
    iv: bytes = field(repr=False)

    @property
    def key_b64(self) -> str:
        return b64e(self.key)

    @property
    def iv_b64(self) -> str:
        return b64e(self.iv)


def new_session_keys(rand: Callable[[int], bytes] = os.urandom) -> SessionKeys:
    return SessionKeys(rand(32), rand(16))


def build_response(request: NptRequest, keys: SessionKeys | None, daemon_private: RSAPrivateKey,
                   client_public: RSAPublicKey | None) -> str:
    """The signed success response (spec §3.5): key and IV wrapped for the client's one-time
    key, or null for both in an unencrypted session."""
    if keys is not None:
        if client_public is None:
            raise ValueError("an encrypted session needs the client's ephemeral public key")
        response = DaemonResponse(request.session_id,
                                  encrypt_session_secret(client_public, keys.key),
                                  encrypt_session_secret(client_public, keys.iv))
    else:
        response = DaemonResponse(request.session_id, None, None)
    return encode_envelope(response.to_payload(), daemon_private)


# --- one tunnel per sessionId ------------------------------------------------------------------

class SessionLedger:
    """The sessionIds already served (or refused after a verified signature), with when to
    forget them.  ``claim`` is the one gate before a tunnel starts."""

    def __init__(self, memory_ms: int = SESSION_MEMORY_MS,
                 max_entries: int = SESSION_MEMORY_MAX) -> None:
        self.memory_ms = memory_ms
        self.max_entries = max_entries
        self._expiry: OrderedDict[str, int] = OrderedDict()

    def __len__(self) -> int:
        return len(self._expiry)

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._expiry

    def claim(self, session_id: str, now_ms: int) -> bool:
        """True the first time ``session_id`` is seen (it is then remembered); False after."""
        self.prune(now_ms)
        if session_id in self._expiry:
            return False
        self._expiry[session_id] = now_ms + self.memory_ms
        while len(self._expiry) > self.max_entries:
            self._expiry.popitem(last=False)
        return True

    def prune(self, now_ms: int) -> None:
        expiry = self._expiry
        # insertion order == expiry order (one fixed memory length), so stop at the first live
        while expiry:
            sid, until = next(iter(expiry.items()))
            if until > now_ms:
                break
            del expiry[sid]

    def to_dict(self) -> dict[str, int]:
        return dict(self._expiry)

    @classmethod
    def from_dict(cls, data: Any, now_ms: int, memory_ms: int = SESSION_MEMORY_MS,
                  max_entries: int = SESSION_MEMORY_MAX) -> SessionLedger:
        """Rebuild from persisted JSON; anything malformed in it is skipped, not fatal."""
        ledger = cls(memory_ms, max_entries)
        if isinstance(data, dict):
            items = [(k, v) for k, v in data.items()
                     if isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
                     and v > now_ms]
            for sid, until in sorted(items, key=lambda kv: kv[1])[-max_entries:]:
                ledger._expiry[sid] = until
        return ledger


# --- logging drops without flooding the log ---------------------------------------------------

class DropLog:
    """Log the first dropped notification of each sender, then at most once per ``window`` per
    sender, and at most ``max_lines`` lines per window in all (a flood from many atSigns
    cannot flood the log either).  Returns whether it logged."""

    def __init__(self, logger: logging.Logger, *, window: float = 60.0, max_lines: int = 50,
                 max_senders: int = 10_000, clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.window = window
        self.max_lines = max_lines
        self.max_senders = max_senders
        self.clock = clock
        self._last: OrderedDict[str, float] = OrderedDict()
        self._window_start = clock()
        self._lines = 0
        self.suppressed = 0

    def __call__(self, sender: str, drop: Drop) -> bool:
        now = self.clock()
        if now - self._window_start >= self.window:
            if self.suppressed:
                self.logger.info("dropped %d more notification(s) without logging them",
                                 self.suppressed)
            self._window_start, self._lines, self.suppressed = now, 0, 0
        last = self._last.get(sender)
        if (last is not None and now - last < self.window) or self._lines >= self.max_lines:
            self.suppressed += 1
            return False
        self._last[sender] = now
        self._last.move_to_end(sender)
        while len(self._last) > self.max_senders:
            self._last.popitem(last=False)
        self._lines += 1
        self.logger.info("dropped (%s): %s", drop.reason, drop.message)
        return True


# --- counters -----------------------------------------------------------------------------

@dataclass
class DaemonStats:
    """npd's counters; ``render()`` is Prometheus text (``--metrics-port``)."""

    notifications: Counter = field(default_factory=Counter)     # by kind (or "other")
    dropped: Counter = field(default_factory=Counter)           # by reason
    decrypt_attempts: Counter = field(default_factory=Counter)  # authorized="true"/"false"
    lookups: Counter = field(default_factory=Counter)           # authorized="true"/"false"
    responses: Counter = field(default_factory=Counter)         # by outcome
    pings_answered: int = 0
    duplicates: int = 0
    sessions_total: int = 0
    sessions_live: int = 0
    errors: int = 0

    def render(self, prefix: str = "noports_npd") -> str:
        out: list[str] = []

        def counter(name: str, help_text: str, values: dict[str, int] | int,
                    label: str | None = None, kind: str = "counter") -> None:
            out.append(f"# HELP {prefix}_{name} {help_text}")
            out.append(f"# TYPE {prefix}_{name} {kind}")
            if isinstance(values, int):
                out.append(f"{prefix}_{name} {values}")
                return
            for key in sorted(values):
                out.append(f'{prefix}_{name}{{{label}="{key}"}} {values[key]}')

        counter("notifications_total", "Notifications received, by kind.",
                dict(self.notifications), "kind")
        counter("dropped_total", "Notifications not acted on, by reason.", dict(self.dropped),
                "reason")
        counter("decrypt_attempts_total", "Notification values decrypted, by whether the "
                "sender was authorised (false must stay 0).",
                {"true": self.decrypt_attempts["true"],
                 "false": self.decrypt_attempts["false"]}, "authorized")
        counter("lookups_total", "Public-key lookups made for a sender, by whether it was "
                "authorised (false must stay 0).",
                {"true": self.lookups["true"], "false": self.lookups["false"]}, "authorized")
        counter("responses_total", "Session responses sent, by outcome.", dict(self.responses),
                "outcome")
        counter("pings_answered_total", "Ping responses sent.", self.pings_answered)
        counter("duplicates_total", "Requests dropped because their sessionId was served "
                "already.", self.duplicates)
        counter("sessions_total", "Tunnels started.", self.sessions_total)
        counter("sessions_live", "Tunnels running now.", self.sessions_live, kind="gauge")
        counter("errors_total", "Notifications that failed with an unexpected error.",
                self.errors)
        return "\n".join(out) + "\n"
