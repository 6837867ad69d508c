"""The NoPorts messages between the client (npt) and the daemon (npd), sans-IO.

Owns (spec noports-protocol.md §2, §3.1, §3.4-§3.6, §4, §8.2, §9.1): the key names of the
session's notifications, the ping response ("heartbeat") JSON, the ``npt_request`` payload, the
daemon's success payload and its documented error strings, the RSA wrapping of the session key
and IV, the permit-open list and its match rule, and npt's ``-T`` duration syntax.

What we *emit* keeps the baseline Dart field order byte for byte (Atsign's programs read it, and
the envelope signature covers the compact JSON in that order); what we *read* is liberal: unknown
fields are ignored, the newer twin-key names are accepted, a request without ``timeout`` means
60 s.  Anything malformed raises :class:`MessageError` and nothing else, so the daemon can drop a
bad request with one ``except``.  No sockets, no asyncio.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey, RSAPublicKey

from noports import __version__
from noports.at.crypto import b64d, b64e, rsa_encrypt, unwrap_shared_key
from noports.at.envelope import compact_json
from noports.at.names import bare_atsign, normalize_atsign
from noports.errors import AtProtocolError, InvalidAtSignError

__all__ = [
    "DEFAULT_DEVICE_GROUP",
    "DEFAULT_PERMIT_OPEN",
    "DEFAULT_TIMEOUT_MS",
    "ERROR_NOT_PERMITTED",
    "ERROR_SIGNATURE",
    "ERROR_TUNNEL",
    "FEATURES",
    "FEATURE_DESCRIPTIONS",
    "FOREVER_SECONDS",
    "NAMESPACE",
    "DaemonResponse",
    "MessageError",
    "NptRequest",
    "PingResponse",
    "client_monitor_regex",
    "daemon_monitor_regex",
    "decrypt_session_secret",
    "device_info_key",
    "encrypt_session_secret",
    "heartbeat_key",
    "is_error_reply",
    "missing_features",
    "not_permitted_error",
    "npt_request_key",
    "parse_atsign_list",
    "parse_duration",
    "parse_permit_open",
    "permits",
    "ping_key",
    "relay_request_key",
    "response_key",
    "signature_error",
    "tunnel_error",
    "username_key",
]

NAMESPACE = "sshnp"
DEFAULT_DEVICE_GROUP = "__none__"
DEFAULT_PERMIT_OPEN = "localhost:22,localhost:3389"
#: A request without ``timeout`` (older clients) means this many milliseconds (spec §3.4).
DEFAULT_TIMEOUT_MS = 60_000
#: The value of a ping notification.
PING_VALUE = "ping"

#: The supportedFeatures we really implement and advertise as true.  Not acceptsPublicKeys
#: (no ssh key pushes), not twinKeys / supportsRamEscr: a newer Atsign client then downgrades
#: to what both ends speak (spec §13).  controlChannelHeartbeats: the daemon end parses
#: ``heartbeat:<n>`` lines (and echoes them, which Atsign's clients only log).
FEATURES: tuple[str, ...] = ("srAuth", "srE2ee", "supportsPortChoice", "adjustableTimeout",
                             "controlChannelHeartbeats")

#: The client's wording for a missing feature: "This device daemon does not <description>".
FEATURE_DESCRIPTIONS: dict[str, str] = {
    "acceptsPublicKeys": "accept public keys from the client",
    "srAuth": "support relay authentication",
    "srE2ee": "support end-to-end encryption of relayed traffic",
    "supportsPortChoice": "support requests for specific ports",
    "adjustableTimeout": "support adjustable timeouts",
    "controlChannelHeartbeats": "support control-channel heartbeats",
}

# The Dart daemon's supportedFeatures object, in its order.  acceptsPublicKeys is present and
# false, as a Dart daemon started without -s sends it.
_DEFAULT_FEATURES: tuple[tuple[str, bool], ...] = (
    ("srAuth", True),
    ("srE2ee", True),
    ("acceptsPublicKeys", False),
    ("supportsPortChoice", True),
    ("adjustableTimeout", True),
    ("controlChannelHeartbeats", True),
)

# Documented error replies (§3.6); the client shows them to the user as they are.
ERROR_NOT_PERMITTED = "Daemon does not permit connections to "
ERROR_SIGNATURE = "Signature not verified: "
ERROR_TUNNEL = "Failed to start up the daemon side of the srv socket tunnel : "

_MAX_TEXT = 4096            # any single string field we accept (hosts, nonces, keys)
_MAX_PK = 8192              # a base64 SPKI of RSA-2048 is ~392 chars; RSA-8192 still fits
_SESSION_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")


class MessageError(AtProtocolError):
    """A NoPorts client<->daemon message (or a permit-open / duration text) that is malformed."""


# --- key names ----------------------------------------------------------------------------

def ping_key(device: str) -> str:
    """C -> D, value ``ping``."""
    return f"ping.{device}.{NAMESPACE}"


def heartbeat_key(device: str) -> str:
    """D -> C, the ping response JSON."""
    return f"heartbeat.{device}.{NAMESPACE}"


def npt_request_key(device: str) -> str:
    """C -> D, the signed envelope of an :class:`NptRequest`."""
    return f"npt_request.{device}.{NAMESPACE}"


def response_key(session_id: str, device: str) -> str:
    """D -> C, the signed envelope of a :class:`DaemonResponse` or an error string."""
    return f"{session_id}.{device}.{NAMESPACE}"


def device_info_key(device: str) -> str:
    """A shared record D keeps for each manager: the ping response JSON."""
    return f"device_info.{device}.{NAMESPACE}"


def username_key(device: str) -> str:
    """A shared record D keeps for each manager: the daemon's login name."""
    return f"username.{device}.{NAMESPACE}"


def relay_request_key(device: str) -> str:
    """C -> R (namespaceAware false); the value is built by noports.relay.messages."""
    return f"{device}.request_ports.sshrvd"


def daemon_monitor_regex(device: str) -> str:
    """What the daemon subscribes to (baseline): ``<device>\\.sshnp@``."""
    return rf"{re.escape(device)}\.{NAMESPACE}@"


def client_monitor_regex(session_id: str, device: str, daemon: str) -> str:
    """One regex for everything a client session waits for.

    The daemon's response ``<sessionId>.<device>.sshnp@<daemon>``, its ping response
    ``heartbeat.<device>.sshnp@<daemon>`` and the relay's reply ``<sessionId>.sshrvd@`` (which
    also matches the newer ``nack.<sessionId>.sshrvd@``).  Callers still check each
    notification's sender: a regex is a filter, not an authorisation.
    """
    sid = re.escape(session_id)
    dev = re.escape(device)
    d = re.escape(bare_atsign(daemon))
    return (rf"{sid}\.{dev}\.{NAMESPACE}@{d}|heartbeat\.{dev}\.{NAMESPACE}@{d}"
            rf"|{sid}\.sshrvd@")


# --- small checked readers ---------------------------------------------------------------

def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"non-JSON constant {name}")


def _loads_object(text: Any, what: str) -> dict:
    try:
        if isinstance(text, (bytes, bytearray, memoryview)):
            text = bytes(text).decode("utf-8")
        if not isinstance(text, str):
            raise ValueError(f"not text but {type(text).__name__}")
        obj = json.loads(text, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as exc:
        raise MessageError(f"{what}: not JSON: {exc}"[:200]) from None
    if not isinstance(obj, dict):
        raise MessageError(f"{what}: not a JSON object")
    return obj


def _check_dict(obj: Any, what: str) -> dict:
    if not isinstance(obj, dict):
        raise MessageError(f"{what}: payload is not a JSON object but {type(obj).__name__}")
    return obj


def _str(obj: dict, name: str, what: str, *, default: Any = ..., limit: int = _MAX_TEXT) -> Any:
    value = obj.get(name)
    if value is None:
        if default is ...:
            raise MessageError(f"{what}: missing field {name!r}")
        return default
    if not isinstance(value, str):
        raise MessageError(f"{what}: {name} must be a string, got {_show(value)}")
    if len(value) > limit:
        raise MessageError(f"{what}: {name} is longer than {limit} characters")
    return value


def _bool(obj: dict, name: str, what: str, default: bool) -> bool:
    value = obj.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise MessageError(f"{what}: {name} must be true or false, got {_show(value)}")
    return value


def _int(obj: dict, name: str, what: str, *, default: Any = ..., low: int, high: int) -> Any:
    value = obj.get(name)
    if value is None:
        if default is ...:
            raise MessageError(f"{what}: missing field {name!r}")
        return default
    # bool is an int in Python, never in JSON's sense of a number here
    if isinstance(value, bool) or not isinstance(value, int):
        raise MessageError(f"{what}: {name} must be an integer, got {_show(value)}")
    if not low <= value <= high:
        raise MessageError(f"{what}: {name} {value} is outside {low}..{high}")
    return value


def _session_id(value: Any, what: str) -> str:
    if not isinstance(value, str) or not _SESSION_ID_RE.fullmatch(value):
        raise MessageError(f"{what}: sessionId must be a short token (a UUID), got {_show(value)}")
    return value


# --- ping response / device info ------------------------------------------------------------

@dataclass
class PingResponse:
    """The ping response, device_info record and policy heartbeat (one JSON, spec §3.1)."""

    devicename: str
    device_group_name: str = DEFAULT_DEVICE_GROUP
    version: str = __version__
    core_package_version: str = f"py{__version__}"
    supported_features: dict[str, bool] = field(default_factory=lambda: dict(_DEFAULT_FEATURES))
    allowed_services: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        """Compact JSON in the Dart daemon's field order."""
        return compact_json({
            "devicename": self.devicename,
            "deviceGroupName": self.device_group_name,
            "version": self.version,
            "corePackageVersion": self.core_package_version,
            "supportedFeatures": dict(self.supported_features),
            "allowedServices": list(self.allowed_services),
        })

    @classmethod
    def from_json(cls, text: str | bytes) -> PingResponse:
        """Liberal parse: unknown fields ignored; a v4 daemon's missing supportedFeatures means
        ``{"acceptsPublicKeys": true}`` (what Atsign's client assumes)."""
        what = "ping response"
        obj = _loads_object(text, what)
        features_obj = obj.get("supportedFeatures")
        if features_obj is None:
            features = {"acceptsPublicKeys": True}
        elif isinstance(features_obj, dict):
            # a non-boolean feature value is "not supported", never an error: newer daemons may
            # add structured entries and the client only asks "is it exactly true?"
            features = {str(k): v is True for k, v in features_obj.items()}
        else:
            raise MessageError(f"{what}: supportedFeatures must be an object")
        services_obj = obj.get("allowedServices")
        if services_obj is None:
            services: list[str] = []
        elif isinstance(services_obj, list) and all(isinstance(s, str) for s in services_obj):
            services = list(services_obj)
        else:
            raise MessageError(f"{what}: allowedServices must be a list of strings")
        return cls(
            devicename=_str(obj, "devicename", what, default=""),
            device_group_name=_str(obj, "deviceGroupName", what, default=DEFAULT_DEVICE_GROUP),
            version=_str(obj, "version", what, default=""),
            core_package_version=_str(obj, "corePackageVersion", what, default=""),
            supported_features=features,
            allowed_services=services,
        )

    def missing_features(self, required: list[str] | tuple[str, ...]) -> list[str]:
        """The required features this daemon does not advertise as exactly ``true``."""
        return missing_features(self.supported_features, required)


def missing_features(features: dict, required: list[str] | tuple[str, ...]) -> list[str]:
    return [name for name in required if features.get(name) is not True]


# --- npt_request ------------------------------------------------------------------------------

@dataclass
class NptRequest:
    """The payload of an ``npt_request`` (spec §3.4).

    ``rvd_port`` is the relay's port B (the daemon's side).  ``rvd_nonce`` is None only for a
    legacy (unauthenticated) relay reply.  ``client_ephemeral_pk`` is the base64 SPKI of the
    client's one-time RSA-2048 key; the session key and IV come back wrapped with it.
    """

    session_id: str
    rvd_host: str
    rvd_port: int
    requested_port: int
    requested_host: str = "localhost"
    authenticate_to_rvd: bool = True
    client_nonce: str = ""
    rvd_nonce: str | None = None
    encrypt_rvd_traffic: bool = True
    client_ephemeral_pk: str = ""
    client_ephemeral_pk_type: str = "rsa2048"
    timeout_ms: int = DEFAULT_TIMEOUT_MS

    @property
    def timeout(self) -> float:
        """The request's idle timeout in seconds (what the daemon's tunnel end uses)."""
        return self.timeout_ms / 1000.0

    def to_payload(self) -> dict:
        """The payload in the baseline Dart order (the envelope signs exactly this order)."""
        return {
            "sessionId": self.session_id,
            "rvdHost": self.rvd_host,
            "rvdPort": self.rvd_port,
            "requestedPort": self.requested_port,
            "requestedHost": self.requested_host,
            "authenticateToRvd": self.authenticate_to_rvd,
            "clientNonce": self.client_nonce,
            "rvdNonce": self.rvd_nonce,
            "encryptRvdTraffic": self.encrypt_rvd_traffic,
            "clientEphemeralPK": self.client_ephemeral_pk,
            "clientEphemeralPKType": self.client_ephemeral_pk_type,
            "timeout": self.timeout_ms,
        }

    @classmethod
    def from_payload(cls, payload: Any) -> NptRequest:
        """Liberal parse of a verified envelope's payload; MessageError if malformed.

        Unknown fields (``relayAuthMode``, ``twinKeys``, ``relayAtsign`` ...) are ignored; a
        missing ``timeout`` means 60 000 ms; known fields of the wrong type are refused.
        """
        what = "npt_request"
        obj = _check_dict(payload, what)
        if "sessionId" not in obj:
            raise MessageError(f"{what}: missing field 'sessionId'")
        session_id = _session_id(obj["sessionId"], what)
        rvd_host = _str(obj, "rvdHost", what, limit=255)
        if not rvd_host:
            raise MessageError(f"{what}: rvdHost is empty")
        requested_host = _str(obj, "requestedHost", what, default="localhost", limit=255)
        if not requested_host:
            raise MessageError(f"{what}: requestedHost is empty")
        encrypt = _bool(obj, "encryptRvdTraffic", what, True)
        pk = _str(obj, "clientEphemeralPK", what, default="", limit=_MAX_PK)
        if encrypt and not pk:
            # the session key is wrapped with it: an encrypted session cannot do without
            raise MessageError(f"{what}: encryptRvdTraffic needs clientEphemeralPK")
        return cls(
            session_id=session_id,
            rvd_host=rvd_host,
            rvd_port=_int(obj, "rvdPort", what, low=1, high=65535),
            requested_port=_int(obj, "requestedPort", what, low=1, high=65535),
            requested_host=requested_host,
            authenticate_to_rvd=_bool(obj, "authenticateToRvd", what, True),
            client_nonce=_str(obj, "clientNonce", what, default=""),
            rvd_nonce=_str(obj, "rvdNonce", what, default=None),
            encrypt_rvd_traffic=encrypt,
            client_ephemeral_pk=pk,
            client_ephemeral_pk_type=_str(obj, "clientEphemeralPKType", what,
                                          default="rsa2048", limit=64),
            # 0 would be "no timeout" to nobody; a year is npt's own "-T 0" ceiling
            timeout_ms=_int(obj, "timeout", what, default=DEFAULT_TIMEOUT_MS,
                            low=1, high=366 * 86_400_000),
        )


# --- the daemon's response --------------------------------------------------------------------

@dataclass
class DaemonResponse:
    """The daemon's success payload (spec §3.5), inside a signed envelope.

    ``session_aes_key``/``session_iv`` are RSA-wrapped texts (see
    :func:`encrypt_session_secret`), or None when the session is not encrypted.
    ``aes_key_d2c``/``iv_d2c`` are read from newer (twin-key) daemons and never emitted by us.
    """

    session_id: str
    session_aes_key: str | None
    session_iv: str | None
    status: str = "connected"
    aes_key_d2c: str | None = None
    iv_d2c: str | None = None

    def to_payload(self) -> dict:
        """``status, sessionId, sessionAESKey, sessionIV`` (baseline npt order)."""
        return {
            "status": self.status,
            "sessionId": self.session_id,
            "sessionAESKey": self.session_aes_key,
            "sessionIV": self.session_iv,
        }

    @classmethod
    def from_payload(cls, payload: Any) -> DaemonResponse:
        """Liberal: ``sessionAESKey ?? aesKeyC2D`` and ``sessionIV ?? ivC2D``; unknown fields
        (``eventLoggingConfig``...) ignored."""
        what = "daemon response"
        obj = _check_dict(payload, what)
        if "sessionId" not in obj:
            raise MessageError(f"{what}: missing field 'sessionId'")
        session_id = _session_id(obj["sessionId"], what)
        key = _str(obj, "sessionAESKey", what, default=None)
        if key is None:
            key = _str(obj, "aesKeyC2D", what, default=None)
        iv = _str(obj, "sessionIV", what, default=None)
        if iv is None:
            iv = _str(obj, "ivC2D", what, default=None)
        return cls(
            session_id=session_id,
            session_aes_key=key,
            session_iv=iv,
            status=_str(obj, "status", what, default="connected", limit=64),
            aes_key_d2c=_str(obj, "aesKeyD2C", what, default=None),
            iv_d2c=_str(obj, "ivD2C", what, default=None),
        )


def is_error_reply(value: str | None) -> bool:
    """Atsign's client treats any response value not starting with ``{`` as an error text."""
    return value is None or not value.startswith("{")


# --- session key wrapping ---------------------------------------------------------------------

def encrypt_session_secret(public_key: RSAPublicKey, raw: bytes) -> str:
    """``b64(RSA-PKCS1v15(utf8(b64(raw))))``: the base64 *text* is encrypted (spec §3.5)."""
    return rsa_encrypt(public_key, b64e(bytes(raw)).encode("ascii"))


def decrypt_session_secret(private_key: RSAPrivateKey, text: str) -> bytes:
    """Inverse of :func:`encrypt_session_secret`; MessageError if it does not unwrap."""
    if not isinstance(text, str):
        raise MessageError(f"session secret must be text, got {type(text).__name__}")
    try:
        return b64d(unwrap_shared_key(private_key, text))
    except (ValueError, TypeError) as exc:
        raise MessageError(f"session secret does not decrypt: {exc}") from None


# --- permit-open (spec §8.2) ------------------------------------------------------------------

def _check_port_text(port: str, entry: str) -> None:
    if port == "*":
        return
    if not port.isdigit() or not port.isascii() or not 1 <= int(port) <= 65535:
        raise MessageError(f"permit-open entry {entry!r}: port must be 1..65535 or '*'")


def parse_permit_open(text: str) -> list[str]:
    """``"localhost:22,*:80"`` -> ``["localhost:22", "*:80"]``; MessageError if malformed.

    An empty list (``""``) is refused: a daemon that permits nothing is a configuration mistake,
    and a silently-empty list must never be read as "everything".  Entries are kept as exact
    strings (matching is string comparison, as in Atsign's daemon).
    """
    if not isinstance(text, str) or not text.strip():
        raise MessageError("permit-open list is empty (give host:port entries, e.g. localhost:22)")
    entries: list[str] = []
    for raw in text.split(","):
        entry = raw.strip()
        if not entry:
            raise MessageError(f"permit-open list {text!r} has an empty entry")
        host, sep, port = entry.rpartition(":")
        if not sep or not host:
            raise MessageError(f"permit-open entry {entry!r} is not host:port")
        if any(ch.isspace() for ch in entry):
            raise MessageError(f"permit-open entry {entry!r} contains whitespace")
        _check_port_text(port, entry)
        if entry not in entries:
            entries.append(entry)
    return entries


def permits(entries: list[str] | tuple[str, ...], host: str, port: int | str) -> bool:
    """True iff ``host:port``, ``*:port``, ``host:*`` or ``*:*`` is in ``entries`` (exact)."""
    p = str(port)
    return (f"{host}:{p}" in entries or f"*:{p}" in entries
            or f"{host}:*" in entries or "*:*" in entries)


# --- error replies (spec §3.6) ----------------------------------------------------------------

def not_permitted_error(host: str, port: int | str) -> str:
    return f"{ERROR_NOT_PERMITTED}{host}:{port}"


def signature_error(exc: BaseException | str) -> str:
    return f"{ERROR_SIGNATURE}{exc}"


def tunnel_error(exc: BaseException | str) -> str:
    return f"{ERROR_TUNNEL}{exc}"


# --- npt -T -----------------------------------------------------------------------------------

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400}
_DURATION_PART = re.compile(r"([0-9]{1,9})([smhd]?)")
#: ``-T 0`` means "as good as forever": 365 days, as Atsign's npt does.
FOREVER_SECONDS = 365 * 86_400


def parse_duration(text: str) -> int:
    """npt ``-T``: ``"30s"``, ``"1h"``, ``"1h,14m,30s"``, ``"7d"``; bare digits are seconds;
    ``"0"`` means 365 days.  Returns seconds; MessageError if malformed."""
    if not isinstance(text, str) or not text.strip():
        raise MessageError("duration is empty (e.g. 30s, 1h, 1h,14m,30s, 7d)")
    total = 0
    for part in text.strip().lower().split(","):
        m = _DURATION_PART.fullmatch(part.strip())
        if m is None:
            raise MessageError(f"bad duration {text!r} (e.g. 30s, 1h, 1h,14m,30s, 7d)")
        total += int(m.group(1)) * _UNITS[m.group(2) or "s"]
    return FOREVER_SECONDS if total == 0 else total


# --- atSign helper shared by both ends ----------------------------------------------------------

def parse_atsign_list(text: str) -> list[str]:
    """``"@a, b,@C"`` -> ``["@a", "@b", "@c"]`` (npd ``-m``); MessageError if empty or bad."""
    if not isinstance(text, str) or not text.strip():
        raise MessageError("atSign list is empty")
    out: list[str] = []
    for raw in text.split(","):
        if not raw.strip():
            raise MessageError(f"atSign list {text!r} has an empty entry")
        try:
            atsign = normalize_atsign(raw)
        except InvalidAtSignError as exc:
            raise MessageError(f"bad atSign {raw.strip()!r}: {exc}") from None
        if atsign not in out:
            out.append(atsign)
    return out
