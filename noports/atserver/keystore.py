"""One atSign's keys as the atProtocol sees them: metadata rules, visibility, commit rules.

Owns the semantics layered on :mod:`noports.atserver.store` (spec atprotocol.md §4.1-§4.7):
metadata merging on update (absent fields keep their value, ``"null"`` resets one), the derived
fields (createdAt/updatedAt/version/expiresAt/availableAt/refreshAt), which keys get a commit id
(``-1`` for private/privatekey/local/``public:_`` keys), which keys a scan shows to whom, and the
JSON shapes of ``llookup:meta`` / ``llookup:all``.  No sockets, no verbs, no sessions.

Keys are handled as their canonical stored text (``str(AtKey)``, lower case).
"""

from __future__ import annotations

import datetime as _dt
import json
import time
from dataclasses import dataclass

from noports.at.metadata import Metadata as _Metadata
from noports.atserver.store import KeyRecord, Store

__all__ = [
    "META_FIELDS",
    "KeyStore",
    "Reply",
    "VerbError",
    "commit_required",
    "format_time",
    "metadata_changes",
    "now_ms",
    "scan_visible",
]


class VerbError(Exception):
    """A failure a verb answers with ``error:<code>``; ``close`` closes the connection after."""

    def __init__(self, code: str, message: str, *, close: bool = False, colon_form: bool = False):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.close = close
        # Handler-reported shape "error:<code>:<message>" (APKAM/enrollment errors, spec §2.4).
        self.colon_form = colon_form


@dataclass(eq=False)
class Reply:
    """What a command produced.  Exactly one of data/error, or neither when ``silent``."""

    data: str | None = None
    error: VerbError | None = None
    close: bool = False
    delay: float = 0.0
    silent: bool = False


# (attribute on noports.at.metadata.Metadata, wire/JSON name), in the Dart grammar order.
META_FIELDS: tuple[tuple[str, str], ...] = (
    ("ttl", "ttl"), ("ttb", "ttb"), ("ttr", "ttr"), ("ccd", "ccd"),
    ("data_signature", "dataSignature"), ("shared_key_status", "sharedKeyStatus"),
    ("is_binary", "isBinary"), ("is_encrypted", "isEncrypted"),
    ("shared_key_enc", "sharedKeyEnc"), ("pub_key_cs", "pubKeyCS"),
    ("encoding", "encoding"), ("enc_key_name", "encKeyName"), ("enc_algo", "encAlgo"),
    ("iv_nonce", "ivNonce"), ("ske_enc_key_name", "skeEncKeyName"),
    ("ske_enc_algo", "skeEncAlgo"), ("pub_key_hash", "pubKeyHash"),
    ("hashing_algo", "hashingAlgo"),
)
_INT_FIELDS = ("ttl", "ttb", "ttr")
_BOOL_FIELDS = ("ccd", "isBinary", "isEncrypted")

# Order of the metadata JSON (llookup:meta), null-valued fields omitted.
_META_JSON_ORDER = ("createdBy", "updatedBy", "createdAt", "updatedAt", "availableAt",
                    "expiresAt", "refreshAt", "status", "version", "ttl", "ttb", "ttr", "ccd",
                    "isBinary", "isEncrypted", "dataSignature", "sharedKeyStatus",
                    "sharedKeyEnc", "pubKeyCS", "encoding", "encKeyName", "encAlgo", "ivNonce",
                    "skeEncKeyName", "skeEncAlgo", "pubKeyHash", "hashingAlgo")
_TIME_FIELDS = ("createdAt", "updatedAt", "availableAt", "expiresAt", "refreshAt")

RESET = object()   # a metadata field given as the literal "null": clear it


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def format_time(ms: int) -> str:
    """Dart ``DateTime.toString()`` of a UTC instant: ``2024-10-21 09:46:48.982Z``."""
    dt = _dt.datetime.fromtimestamp(ms // 1000, _dt.timezone.utc)
    return dt.strftime("%Y-%m-%d %H:%M:%S") + f".{ms % 1000:03d}Z"


def _coerce(name: str, value):
    """Normalise one parsed metadata value; ``"null"`` means reset (spec §4.2)."""
    if isinstance(value, str):
        # (length first: sharedKeyEnc and friends are hundreds of characters)
        if len(value) == 4 and value.lower() == "null":
            return RESET
        if value.__class__ is str and name not in _INT_FIELDS and name not in _BOOL_FIELDS:
            return value                      # what str(value) below would give
    if name in _INT_FIELDS:
        try:
            ivalue = int(value)
        except (TypeError, ValueError):
            raise VerbError("AT0003", f"{name} must be an integer, not {value!r}") from None
        if name in ("ttl", "ttb") and ivalue < 0:
            raise VerbError("AT0003", f"{name} must be >= 0, not {ivalue}")
        if name == "ttr" and ivalue < -1:
            raise VerbError("AT0003", f"ttr must be -1 or >= 0, not {ivalue}")
        return ivalue
    if name in _BOOL_FIELDS:
        if isinstance(value, bool):
            return value
        text = str(value).lower()
        if text not in ("true", "false"):
            raise VerbError("AT0003", f"{name} must be true or false, not {value!r}")
        return text == "true"
    return str(value)


def metadata_changes(metadata) -> dict:
    """Fields that a parsed ``Metadata`` sets, by wire name (``RESET`` for "null")."""
    out: dict = {}
    if metadata is None:
        return out
    # A parsed Metadata keeps every field in its __dict__: one dict lookup per field instead
    # of getattr (this runs for every update and notify).
    fields = metadata.__dict__ if type(metadata) is _Metadata else None
    for attr, wire in META_FIELDS:
        value = fields.get(attr) if fields is not None else getattr(metadata, attr, None)
        if value is not None:
            out[wire] = _coerce(wire, value)
    return out


def commit_required(key: str) -> bool:
    """Dart gives -1 (no commit) to private/privatekey/local keys and ``public:_`` keys."""
    if key.startswith(("private:", "privatekey:", "local:")):
        return False
    return not (key.startswith("public:_") and not key.startswith("public:__"))


def _body_entity(key: str) -> tuple[str, str]:
    """(prefix kind, entity-with-owner) of a stored key, ignoring a ``cached:`` prefix."""
    body = key[7:] if key.startswith("cached:") else key
    for prefix in ("public:", "private:", "privatekey:", "local:"):
        if body.startswith(prefix):
            return prefix[:-1], body[len(prefix):]
    if body.startswith("@"):
        return "shared", body.partition(":")[2]
    return "self", body


def scan_visible(key: str, show_hidden: bool) -> bool:
    """What an owner's ``scan`` lists (spec §4.7): never private/privatekey/local keys;
    ``public:_x`` never, ``public:__x`` and other ``_x`` keys only with showhidden."""
    kind, entity = _body_entity(key)
    if kind in ("private", "privatekey", "local"):
        return False
    if kind == "public":
        if entity.startswith("__"):
            return show_hidden
        return not entity.startswith("_")
    return show_hidden or not entity.startswith("_")


def metadata_json(rec: KeyRecord) -> dict:
    meta = rec.meta
    out: dict = {}
    for name in _META_JSON_ORDER:
        value = meta.get(name)
        if value is None:
            if name in ("isBinary", "isEncrypted"):
                out[name] = False
            continue
        out[name] = format_time(value) if name in _TIME_FIELDS else value
    return out


def render(key: str, rec: KeyRecord, mode: str | None, shown_key: str | None = None) -> str:
    """The ``data:`` payload of a lookup: plain value, ``meta`` JSON or ``all`` JSON."""
    if mode == "meta":
        return json.dumps(metadata_json(rec), separators=(",", ":"), ensure_ascii=False)
    if mode == "all":
        obj = {"key": shown_key or key, "data": rec.value, "metaData": metadata_json(rec)}
        if rec.value is None:
            del obj["data"]
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    return "null" if rec.value is None else rec.value


class KeyStore:
    """The keys of one hosted atSign."""

    def __init__(self, store: Store, atsign: str) -> None:
        self.store = store
        self.atsign = atsign

    def get(self, key: str) -> KeyRecord | None:
        return self.store.get_key(self.atsign, key)

    def get_active(self, key: str, now: int | None = None) -> KeyRecord | None:
        rec = self.store.get_key(self.atsign, key)
        if rec is None or not rec.active(now_ms() if now is None else now):
            return None
        return rec

    def put(self, key: str, value: str | None, changes: dict, by: str,
            now: int | None = None) -> int:
        """Create or update ``key``; merge metadata as Dart does; return the commit id."""
        now = now_ms() if now is None else now
        old = self.store.get_key(self.atsign, key)
        rec = self._merged(old, changes, by, now)
        rec.value = value
        return self.store.put_key(self.atsign, key, rec, commit=commit_required(key))

    def put_meta(self, key: str, changes: dict, by: str, now: int | None = None) -> int:
        now = now_ms() if now is None else now
        old = self.store.get_key(self.atsign, key)
        if old is None:
            raise VerbError("AT0015", f"{key} does not exist in keystore")
        rec = self._merged(old, changes, by, now)
        rec.value = old.value
        return self.store.put_key(self.atsign, key, rec, commit=commit_required(key))

    def delete(self, key: str) -> int:
        return self.store.delete_key(self.atsign, key, commit=commit_required(key))

    def names(self, now: int | None = None) -> list[str]:
        return self.store.key_names(self.atsign, now_ms() if now is None else now)

    @staticmethod
    def _merged(old: KeyRecord | None, changes: dict, by: str, now: int) -> KeyRecord:
        meta = dict(old.meta) if old is not None else {}
        for name, value in changes.items():
            if value is RESET:
                meta.pop(name, None)
            else:
                meta[name] = value
        if old is None:
            meta["createdAt"] = now
            meta["createdBy"] = by
            meta["version"] = 0
            # ccd means nothing without ttr on a new key (Dart nulls it).
            if meta.get("ttr") in (None, 0):
                meta.pop("ccd", None)
        else:
            meta["version"] = int(meta.get("version", 0)) + 1
        meta["updatedAt"] = now
        meta["updatedBy"] = by
        meta["status"] = "active"
        if meta.get("ttr") == 0:
            meta.pop("ttr", None)       # ttr 0 = not cacheable, stored as null
        ttl, ttb, ttr = meta.get("ttl"), meta.get("ttb"), meta.get("ttr")
        expires = now + ttl if ttl else None
        available = now + ttb if ttb else None
        for name, at in (("expiresAt", expires), ("availableAt", available),
                         ("refreshAt", now + ttr if ttr and ttr > 0 else None)):
            if at is None:
                meta.pop(name, None)
            else:
                meta[name] = at
        return KeyRecord(value=None, meta=meta, expires_at=expires, available_at=available)
