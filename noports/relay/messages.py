"""Every message the relay (srvd) reads or writes, sans-IO (noports-protocol.md §3.2, §4, §5.3).

Owns: the ``request_ports`` request (JSON, and the legacy bare-sessionId form), the reply (CSV
``<address>,<portA>,<portB>,<rvdNonce>`` or JSON), the relay nonce, and the payload-mode relay
auth line (a signed envelope of exactly ``{"sessionId","clientNonce","rvdNonce"}`` + ``"\\n"``)
with its verification.  No sockets, no asyncio: the data plane (``dataplane.py``) and the control
plane feed it text and bytes.  ESCR (§5.4) is not implemented here.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey, RSAPublicKey

from noports.at.crypto import verify
from noports.at.envelope import compact_json, encode_envelope
from noports.at.names import normalize_atsign
from noports.errors import AtProtocolError, InvalidAtSignError, SignatureError

__all__ = [
    "AUTH_FAILED_LINE",
    "MAX_AUTH_LINE",
    "AuthVerifier",
    "RelayAuthError",
    "RelayMessageError",
    "RelayReply",
    "RelayRequest",
    "auth_payload",
    "encode_auth_line",
    "encode_reply",
    "encode_reply_csv",
    "encode_reply_json",
    "new_relay_nonce",
    "parse_legacy_request",
    "parse_reply",
    "parse_request_ports",
]

#: The auth line, newline included, may be at most this long (Atsign's newer relays: 4096 bytes).
MAX_AUTH_LINE = 4096
#: What a newer Atsign relay writes before closing a socket that failed authentication.
AUTH_FAILED_LINE = b"Socket auth failed\n"

# sessionIds are UUID v4 in every Atsign client; we accept any short token of the characters an
# atKey entity allows, because the reply is stored under the key "<sessionId>.sshrvd".
_SESSION_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")
_MAX_NONCE = 512          # clientNonce is an ISO-8601 timestamp in Atsign's clients; opaque here
_RELAY_AUTH_MODES = ("payload", "escr")
_ACCEPTED_HASHING = ("sha256", "sha512")   # what Atsign's relay accepts (HashingAlgoType)
_SIGNING_ALGO = "rsa2048"


class RelayMessageError(AtProtocolError):
    """A ``request_ports`` request or a relay reply that is malformed."""


class RelayAuthError(SignatureError):
    """An auth line that failed verification; ``reason`` is a short metrics label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"non-JSON constant {name}")


def _loads(text: str | bytes | bytearray | memoryview) -> Any:
    if isinstance(text, (bytes, bytearray, memoryview)):
        text = bytes(text).decode("utf-8")
    return json.loads(text, parse_constant=_refuse_constant)


def _session_id(value: Any) -> str:
    if not isinstance(value, str) or not _SESSION_ID_RE.fullmatch(value):
        raise RelayMessageError(f"sessionId must be a short token (a UUID), got {_show(value)}")
    return value


# --- the request ----------------------------------------------------------------------------

@dataclass(frozen=True)
class RelayRequest:
    """One request for a relay session, JSON (``<device>.request_ports.sshrvd``) or legacy."""

    session_id: str
    atsign_a: str                      # the client; for a legacy request, the sender
    atsign_b: str | None               # the daemon; None for a legacy request
    authenticate_a: bool
    authenticate_b: bool
    client_nonce: str | None           # None for a legacy request
    relay_auth_mode: str = "payload"
    relay_auth_aes_key: str | None = None
    only443: bool = False
    multiple_acks_ok: bool = False
    pre_fetch: tuple[str, ...] = field(default_factory=tuple)
    send_json_response: bool = False
    legacy: bool = False

    @property
    def fully_authenticated(self) -> bool:
        """True when both sides must present an auth line (the only kind served by default)."""
        return self.authenticate_a and self.authenticate_b


def _typed(name: str, value: Any, kind: type) -> Any:
    # bool is a subclass of int, and a str is never accepted where a bool is wanted
    if kind is bool and not isinstance(value, bool):
        raise RelayMessageError(f"request_ports: {name} must be true or false, got {_show(value)}")
    if not isinstance(value, kind):
        raise RelayMessageError(f"request_ports: {name} must be a {kind.__name__}, "
                                f"got {_show(value)}")
    return value


def _required(obj: dict, name: str, kind: type) -> Any:
    if name not in obj:
        raise RelayMessageError(f"request_ports: missing field {name!r}")
    return _typed(name, obj[name], kind)


def _optional(obj: dict, name: str, kind: type, default: Any) -> Any:
    value = obj.get(name)
    return default if value is None else _typed(name, value, kind)


def _atsign(obj: dict, name: str) -> str:
    try:
        return normalize_atsign(_required(obj, name, str))
    except InvalidAtSignError as exc:
        raise RelayMessageError(f"request_ports: {name}: {exc}") from None


def parse_request_ports(value: str | bytes) -> RelayRequest:
    """Parse the JSON value of a ``request_ports`` notification; RelayMessageError if malformed.

    Unknown fields are ignored (newer clients add fields); known fields of the wrong type are not.
    """
    try:
        obj = _loads(value)
    except (ValueError, RecursionError) as exc:
        raise RelayMessageError(f"request_ports: not JSON: {exc}"[:200]) from None
    if not isinstance(obj, dict):
        raise RelayMessageError("request_ports: not a JSON object")
    session_id = _session_id(_required(obj, "sessionId", str))
    atsign_a = _atsign(obj, "atSignA")
    atsign_b = _atsign(obj, "atSignB")
    auth_a = _required(obj, "authenticateSocketA", bool)
    auth_b = _required(obj, "authenticateSocketB", bool)
    client_nonce = _required(obj, "clientNonce", str)
    if not client_nonce or len(client_nonce) > _MAX_NONCE:
        raise RelayMessageError(f"request_ports: clientNonce must be 1-{_MAX_NONCE} characters")
    mode = _optional(obj, "relayAuthMode", str, "payload")
    if mode not in _RELAY_AUTH_MODES:
        raise RelayMessageError(f"request_ports: unknown relayAuthMode {_show(mode)}")
    pre_fetch = _optional(obj, "preFetch", list, [])
    if not all(isinstance(item, str) for item in pre_fetch):
        raise RelayMessageError("request_ports: preFetch must be a list of strings")
    return RelayRequest(
        session_id=session_id, atsign_a=atsign_a, atsign_b=atsign_b,
        authenticate_a=auth_a, authenticate_b=auth_b, client_nonce=client_nonce,
        relay_auth_mode=mode,
        relay_auth_aes_key=_optional(obj, "relayAuthAesKey", str, None),
        only443=_optional(obj, "only443", bool, False),
        multiple_acks_ok=_optional(obj, "multipleAcksOk", bool, False),
        pre_fetch=tuple(pre_fetch),
        send_json_response=_optional(obj, "sendJsonResponse", bool, False),
    )


def parse_legacy_request(value: str | bytes, sender: str) -> RelayRequest:
    """The legacy request (key ``<device>.sshrvd``): the value is the bare sessionId.

    Neither side authenticates and there is no nonce; the sender plays side A.
    """
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise RelayMessageError("legacy request: not UTF-8") from None
    try:
        atsign_a = normalize_atsign(sender)
    except InvalidAtSignError as exc:
        raise RelayMessageError(f"legacy request: sender: {exc}") from None
    return RelayRequest(session_id=_session_id(value.strip()), atsign_a=atsign_a, atsign_b=None,
                        authenticate_a=False, authenticate_b=False, client_nonce=None,
                        legacy=True)


# --- the reply ------------------------------------------------------------------------------

@dataclass(frozen=True)
class RelayReply:
    address: str
    port_a: int
    port_b: int
    rvd_nonce: str | None              # None: a legacy session (the CSV says "null")
    supports_event_logging: bool = False
    auto_detects_relay_auth: bool = False


def new_relay_nonce() -> str:
    """A fresh relay nonce: 144 random bits, URL-safe base64 (no ',' so the CSV stays simple)."""
    return secrets.token_urlsafe(18)


def _check_reply_fields(address: str, port_a: int, port_b: int) -> None:
    if not address or "," in address or any(ch.isspace() for ch in address):
        raise ValueError(f"relay address {_show(address)} cannot be advertised")
    for port in (port_a, port_b):
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise ValueError(f"not a TCP port: {_show(port)}")


def encode_reply_csv(address: str, port_a: int, port_b: int, rvd_nonce: str | None) -> str:
    """``<address>,<portA>,<portB>,<rvdNonce>``; a legacy session's nonce is the text ``null``."""
    _check_reply_fields(address, port_a, port_b)
    return f"{address},{port_a},{port_b},{'null' if rvd_nonce is None else rvd_nonce}"


def encode_reply_json(address: str, port_a: int, port_b: int, rvd_nonce: str) -> str:
    """The JSON reply, claiming nothing this relay does not do.

    ``supportsEventLogging`` is present but false: Atsign's Dart client reads it into a
    non-nullable bool, so leaving it out would make that client fail.  ``autoDetectsRelayAuth``
    is left out (absent means false to every client).
    """
    _check_reply_fields(address, port_a, port_b)
    return compact_json({"address": address, "portA": port_a, "portB": port_b,
                         "rvdNonce": rvd_nonce, "supportsEventLogging": False})


def encode_reply(request: RelayRequest, address: str, port_a: int, port_b: int,
                 rvd_nonce: str | None) -> str:
    """The reply in the form the request asked for (JSON only if ``sendJsonResponse``)."""
    if request.send_json_response and rvd_nonce is not None:
        return encode_reply_json(address, port_a, port_b, rvd_nonce)
    return encode_reply_csv(address, port_a, port_b, rvd_nonce)


def _port(value: Any) -> int:
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 5:
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise RelayMessageError(f"relay reply: not a TCP port: {_show(value)}")
    return value


def parse_reply(text: str) -> RelayReply:
    """Parse a relay reply (client side): JSON when it starts with ``{``, else CSV."""
    text = text.strip()
    if text.startswith("{"):
        try:
            obj = _loads(text)
        except (ValueError, RecursionError) as exc:
            raise RelayMessageError(f"relay reply: bad JSON: {exc}"[:200]) from None
        if not isinstance(obj, dict):
            raise RelayMessageError("relay reply: not a JSON object")
        address, nonce = obj.get("address"), obj.get("rvdNonce")
        if not isinstance(address, str) or not address:
            raise RelayMessageError("relay reply: address missing")
        if nonce is not None and not isinstance(nonce, str):
            raise RelayMessageError("relay reply: rvdNonce must be a string")
        return RelayReply(address, _port(obj.get("portA")), _port(obj.get("portB")), nonce,
                          obj.get("supportsEventLogging") is True,
                          obj.get("autoDetectsRelayAuth") is True)
    parts = text.split(",")
    if len(parts) != 4 or not parts[0]:
        raise RelayMessageError(f"relay reply: expected address,portA,portB,nonce; got "
                                f"{_show(text)}")
    address, port_a, port_b, nonce = parts
    return RelayReply(address, _port(port_a), _port(port_b), None if nonce == "null" else nonce)


# --- the auth line --------------------------------------------------------------------------

def _canonical_b64(text: str) -> bool:
    """True only for the one standard padded base64 spelling of some bytes (so no two lines that
    differ in unused bits of the last character both pass)."""
    try:
        return base64.b64encode(base64.b64decode(text, validate=True)).decode() == text
    except (ValueError, UnicodeEncodeError):
        return False


def auth_payload(session_id: str, client_nonce: str, rvd_nonce: str) -> dict:
    """The payload both sides sign: exactly these three keys, in this order."""
    return {"sessionId": session_id, "clientNonce": client_nonce, "rvdNonce": rvd_nonce}


def encode_auth_line(session_id: str, client_nonce: str, rvd_nonce: str,
                     priv: RSAPrivateKey) -> bytes:
    """The line a side writes first on its relay socket (signed with its *encryption* key)."""
    return encode_envelope(auth_payload(session_id, client_nonce, rvd_nonce), priv).encode() + b"\n"


class AuthVerifier:
    """Checks auth lines for one session against the relay's *own* reconstruction of the payload.

    The bytes verified are always ``{"sessionId":<ours>,"clientNonce":<the request's>,
    "rvdNonce":<ours>}`` -- never the payload the socket sent -- so a line signed for any other
    session, nonce or key order fails, whatever its payload claims.
    """

    def __init__(self, session_id: str, client_nonce: str, rvd_nonce: str) -> None:
        self.session_id = session_id
        self.rvd_nonce = rvd_nonce
        self.expected = compact_json(auth_payload(session_id, client_nonce, rvd_nonce)).encode()

    def verify(self, line: bytes | bytearray | memoryview, public_key: RSAPublicKey) -> None:
        """Return quietly for a good line (newline optional); RelayAuthError(reason) otherwise."""
        line = bytes(line)
        if line.endswith(b"\n"):
            line = line[:-1]
        if line.endswith(b"\r"):
            line = line[:-1]
        if len(line) >= MAX_AUTH_LINE:
            raise RelayAuthError("line_too_long", "auth line longer than 4096 bytes")
        try:
            env = _loads(line)
        except (ValueError, RecursionError):
            raise RelayAuthError("bad_json", "auth line is not JSON") from None
        if not isinstance(env, dict):
            raise RelayAuthError("bad_json", "auth line is not a JSON object")
        payload = env.get("payload")
        if not isinstance(payload, dict):
            raise RelayAuthError("bad_envelope", "auth line has no payload object")
        signature, hashing = env.get("signature"), env.get("hashingAlgo")
        if not isinstance(signature, str) or hashing not in _ACCEPTED_HASHING \
                or env.get("signingAlgo") != _SIGNING_ALGO:
            raise RelayAuthError("bad_envelope",
                                 "auth line lacks signature/hashingAlgo/signingAlgo")
        if payload.get("rvdNonce") != self.rvd_nonce:
            raise RelayAuthError("wrong_nonce", "auth line carries another rvdNonce")
        if payload.get("sessionId") != self.session_id:
            raise RelayAuthError("wrong_session", "auth line is for another session")
        # A genuine signer signed exactly our reconstruction, so its payload serialises to the
        # same bytes; anything else (other clientNonce, extra keys, other order) is refused even
        # though the signature check below would ignore it.
        try:
            same = compact_json(payload).encode() == self.expected
        except (ValueError, TypeError, RecursionError):
            same = False
        if not same:
            raise RelayAuthError("wrong_payload", "auth line payload is not this session's")
        if not _canonical_b64(signature):
            raise RelayAuthError("bad_signature", "auth line signature is not canonical base64")
        if not verify(public_key, self.expected, signature, hashing):
            raise RelayAuthError("bad_signature", "auth line signature did not verify")
