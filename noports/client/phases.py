"""The decisions of an npt session, sans-IO: what each phase sends, accepts and reports.

Owns (noports-protocol.md §3.1-§3.6, §7.1, §9.1, §10): the names, exit codes and wording of
npt's phases (:class:`PhaseError`), the ``request_ports`` body, the features a request needs
from the daemon's ping response, the ``npt_request`` it builds, and reading the daemon's reply
(an error text, or a signed envelope whose session key and IV are unwrapped with the ephemeral
RSA key).  It is liberal in what it reads -- both relay reply forms, twin-key response fields,
unknown fields -- and strict about who said it: the envelope must verify with the daemon's key
and name this session.

No sockets, no asyncio: ``session.py`` does the I/O and calls these.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey, RSAPublicKey

from noports.at.crypto import b64e
from noports.at.envelope import compact_json, verify_envelope
from noports.errors import NoPortsError, SignatureError
from noports.messages import (
    FEATURE_DESCRIPTIONS,
    DaemonResponse,
    MessageError,
    NptRequest,
    PingResponse,
    decrypt_session_secret,
    is_error_reply,
)

if TYPE_CHECKING:  # pragma: no cover - annotations only: keep `npt --help` imports light
    from noports.relay.messages import RelayReply
    from noports.tunnel import TunnelEnded

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "EXIT_CODES",
    "PHASES",
    "PhaseError",
    "SessionKeys",
    "build_npt_request",
    "check_features",
    "ended_error",
    "new_client_nonce",
    "parse_relay_reply",
    "read_ping_response",
    "read_response",
    "relay_request_body",
    "required_features",
]

#: npt's default -T (seconds); a different one needs the daemon's adjustableTimeout.
DEFAULT_TIMEOUT_S = 30

#: phase -> (exit code, what it does, for messages).  Codes are documented in ``npt --help``.
PHASES: dict[str, tuple[int, str]] = {
    "keys": (3, "reading the client's .atKeys"),
    "atserver": (4, "logging in to the client's atServer"),
    "relay": (5, "asking the relay for a session"),
    "ping": (6, "pinging the device daemon"),
    "request": (7, "requesting the session from the device daemon"),
    "tunnel": (8, "opening the tunnel through the relay"),
    "session": (9, "the running session"),
}

#: Every exit code npt uses, for ``--help``.
EXIT_CODES: tuple[tuple[int, str], ...] = (
    (0, "success (-x: the tunnel is up; otherwise: stopped by Ctrl-C/SIGTERM or idle timeout)"),
    (1, "unexpected internal error"),
    (2, "bad command line"),
    *((code, f"{name} phase failed ({what})") for name, (code, what) in PHASES.items()),
    (130, "interrupted (Ctrl-C or SIGTERM) before the tunnel was up"),
)


class PhaseError(NoPortsError):
    """A phase that failed; ``str()`` names the phase, ``exit_code`` is npt's exit status."""

    def __init__(self, phase: str, message: str) -> None:
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}")
        self.phase = phase
        self.message = message
        self.exit_code = PHASES[phase][0]
        super().__init__(f"{phase} phase failed ({PHASES[phase][1]}): {message}")


def new_client_nonce() -> str:
    """The clientNonce: opaque to every peer (Atsign's client uses a timestamp), so random."""
    return secrets.token_urlsafe(18)


def relay_request_body(session_id: str, client: str, daemon: str, client_nonce: str) -> str:
    """The ``request_ports`` value: the baseline fields in Atsign's order (spec §3.2).

    No ``sendJsonResponse``: baseline relays answer CSV whatever we ask, and we read both forms.
    Both sides authenticate (npt never offers the legacy unauthenticated request).
    """
    return compact_json({
        "sessionId": session_id,
        "atSignA": client,
        "atSignB": daemon,
        "authenticateSocketA": True,
        "authenticateSocketB": True,
        "clientNonce": client_nonce,
    })


def parse_relay_reply(value: str | None, relay: str) -> RelayReply:
    """The relay's reply (CSV or JSON); PhaseError("relay") if unusable."""
    from noports.relay.messages import RelayMessageError, parse_reply

    if value is None:
        raise PhaseError("relay", f"the reply from {relay} could not be read (no value)")
    try:
        reply = parse_reply(value)
    except RelayMessageError as exc:
        raise PhaseError("relay", f"the reply from {relay} is malformed: {exc}") from None
    if reply.rvd_nonce is None:
        # "null": the relay took our request for a legacy, unauthenticated one -- we would have
        # nothing to sign, and an unauthenticated session is not what we asked for.
        raise PhaseError("relay", f"{relay} answered without a relay nonce (an old relay that "
                                  "does not authenticate sockets?)")
    return reply


def required_features(timeout_s: float) -> list[str]:
    """What npt needs from the daemon (spec §3.1): srAuth, srE2ee, supportsPortChoice, and
    adjustableTimeout when -T is not the default 30 s."""
    needed = ["srAuth", "srE2ee", "supportsPortChoice"]
    if timeout_s != DEFAULT_TIMEOUT_S:
        needed.append("adjustableTimeout")
    return needed


def read_ping_response(value: str | None, daemon: str) -> PingResponse:
    if value is None:
        raise PhaseError("ping", f"the ping response from {daemon} could not be read")
    try:
        return PingResponse.from_json(value)
    except MessageError as exc:
        raise PhaseError("ping", f"the ping response from {daemon} is malformed: {exc}") from None


def check_features(ping: PingResponse, timeout_s: float, daemon: str, device: str) -> None:
    """PhaseError("ping") naming the first missing feature, as Atsign's client words it."""
    missing = ping.missing_features(required_features(timeout_s))
    if not missing:
        return
    what = "; ".join(f"does not {FEATURE_DESCRIPTIONS.get(name, 'support ' + name)}"
                     f" ({name})" for name in missing)
    hint = ""
    if missing == ["adjustableTimeout"]:
        hint = f" -- use the default -T {DEFAULT_TIMEOUT_S}s with this daemon"
    raise PhaseError("ping", f"This device daemon ({device}{daemon}, version "
                             f"{ping.version or 'unknown'}) {what}{hint}")


def build_npt_request(*, session_id: str, reply: RelayReply, remote_host: str,
                      remote_port: int, client_nonce: str, encrypt: bool,
                      ephemeral_public_b64: str, timeout_s: float) -> NptRequest:
    """The session request: relay host and port B, both nonces, the target, the one-time key,
    the idle timeout in ms (spec §3.4)."""
    return NptRequest(
        session_id=session_id,
        rvd_host=reply.address,
        rvd_port=reply.port_b,
        requested_port=remote_port,
        requested_host=remote_host,
        authenticate_to_rvd=True,
        client_nonce=client_nonce,
        rvd_nonce=reply.rvd_nonce,
        encrypt_rvd_traffic=encrypt,
        client_ephemeral_pk=ephemeral_public_b64,
        client_ephemeral_pk_type="rsa2048",
        timeout_ms=round(timeout_s * 1000),
    )


@dataclass(frozen=True)
class SessionKeys:
    """The session key and IV as base64 text (what the tunnel's client end takes); both None
    when the session is not encrypted."""

    key_b64: str | None
    iv_b64: str | None


def _error_text(value: str) -> str:
    text = " ".join(value.split())       # one line, whatever the daemon sent
    return text if len(text) <= 500 else text[:497] + "..."


def read_response(value: str | None, *, daemon: str, daemon_key: RSAPublicKey,
                  session_id: str, ephemeral_key: RSAPrivateKey,
                  encrypt: bool) -> SessionKeys:
    """The daemon's reply -> the session key and IV; PhaseError("request") otherwise.

    A value that is not JSON is the daemon's own error text (spec §3.6), shown as it is.  An
    envelope must verify with ``daemon_key`` and name ``session_id``; ``sessionAESKey`` (or the
    newer ``aesKeyC2D``) and the IV are RSA-unwrapped with the ephemeral key.
    """
    if value is None:
        raise PhaseError("request", f"the response from {daemon} could not be read")
    if is_error_reply(value.lstrip()):
        raise PhaseError("request", f"the device daemon {daemon} refused the session: "
                                    f"{_error_text(value)}")
    try:
        payload = verify_envelope(value.strip(), daemon_key)
    except SignatureError as exc:
        raise PhaseError("request", f"the response claiming to be from {daemon} failed "
                                    f"signature verification: {exc}") from None
    try:
        resp = DaemonResponse.from_payload(payload)
    except MessageError as exc:
        raise PhaseError("request", f"the response from {daemon} is malformed: {exc}") from None
    if resp.session_id != session_id:
        raise PhaseError("request", f"the response from {daemon} is for another session "
                                    f"({resp.session_id}), not {session_id}")
    if resp.status != "connected":
        raise PhaseError("request", f"the device daemon {daemon} answered status "
                                    f"{json.dumps(resp.status)} instead of \"connected\"")
    if not encrypt:
        return SessionKeys(None, None)
    if resp.session_aes_key is None or resp.session_iv is None:
        raise PhaseError("request", f"the response from {daemon} carries no session key/IV "
                                    "although encryption was requested")
    try:
        key = decrypt_session_secret(ephemeral_key, resp.session_aes_key)
        iv = decrypt_session_secret(ephemeral_key, resp.session_iv)
    except MessageError as exc:
        raise PhaseError("request", f"the session key from {daemon} does not decrypt with "
                                    f"this session's key: {exc}") from None
    if len(key) != 32 or len(iv) != 16:
        raise PhaseError("request", f"the session key/IV from {daemon} have the wrong size "
                                    f"({len(key)} and {len(iv)} bytes; want 32 and 16)")
    return SessionKeys(b64e(key), b64e(iv))


def ended_error(ended: TunnelEnded | None, *, started: bool = True) -> PhaseError | None:
    """Why a tunnel's end is a failure, as the phase to blame; None for a normal end (its idle
    timeout, or closed by npt itself).  ``started=False``: it ended before the port was
    reported, so the tunnel phase failed."""
    if ended is None or ended.reason in ("idle", "closed"):
        return None
    if ended.reason == "relay_refused":
        return PhaseError("tunnel", "the relay refused the client's socket (it answered "
                                    "'Socket auth failed'): the relay session is gone or does "
                                    "not accept this client's auth line")
    if ended.reason == "control_closed":
        msg = ("the tunnel's control connection was closed by the other side: the device "
               "daemon or the relay has stopped or ended the session")
    elif ended.reason == "control_reset":
        msg = (f"the tunnel's control connection to the relay failed ({ended.message}): the "
               "relay or the device daemon has gone")
    elif ended.reason == "peer_silent":
        msg = (f"the device daemon went silent ({ended.message}): the relay or the network "
               "in between is swallowing the traffic without closing the connection")
    elif ended.reason == "protocol_error":
        msg = f"the tunnel's control channel carried garbage: {ended.message}"
    else:
        msg = f"the tunnel ended: {ended}"
    return PhaseError("session" if started else "tunnel", msg)
