"""The atProtocol ``<META>`` fragment (spec atprotocol.md §4.2) shared by update, update:meta
and notify: the ``Metadata`` dataclass, its wire names and order, its encoder and the one-field
setter every parser uses.  Separate because the key store and the shared-key code use Metadata
without any command, and both notify parsers must set fields exactly alike.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields

from noports.at.syntax import parse_bool, parse_int, show, syntax_error

__all__ = ["META_BY_WIRE", "META_FIELDS", "META_NAMES", "Metadata", "set_meta"]

_META_VALUE = re.compile(r"[^:@\s]+")           # string metadata values (at_commons fragment)

# (attribute, wire name, type) in the Dart server order; the hash pair sits after pubKeyCS like
# at_commons emits it.  We emit the newer names pubKeyHash/hashingAlgo and accept both.
META_FIELDS = (
    ("ttl", "ttl", int), ("ttb", "ttb", int), ("ttr", "ttr", int), ("ccd", "ccd", bool),
    ("data_signature", "dataSignature", str), ("shared_key_status", "sharedKeyStatus", str),
    ("is_binary", "isBinary", bool), ("is_encrypted", "isEncrypted", bool),
    ("shared_key_enc", "sharedKeyEnc", str), ("pub_key_cs", "pubKeyCS", str),
    ("pub_key_hash", "pubKeyHash", str), ("hashing_algo", "hashingAlgo", str),
    ("encoding", "encoding", str), ("enc_key_name", "encKeyName", str),
    ("enc_algo", "encAlgo", str), ("iv_nonce", "ivNonce", str),
    ("ske_enc_key_name", "skeEncKeyName", str), ("ske_enc_algo", "skeEncAlgo", str),
)
# lower-case wire name -> (attribute, type)
META_BY_WIRE = {wire.lower(): (attr, kind) for attr, wire, kind in META_FIELDS}
META_BY_WIRE["hash"] = ("pub_key_hash", str)      # at_commons 5.0.1 / at_c spelling
META_BY_WIRE["algo"] = ("hashing_algo", str)
# Names a parser may meet among the metadata pairs (atsdk writes notify's ttln there too).
META_NAMES = frozenset(META_BY_WIRE) | {"ttln"}
_META_ENCODE = tuple((attr, f":{wire}:", kind is bool) for attr, wire, kind in META_FIELDS)


class _AttrView:
    """``view.get(name)`` = ``getattr(obj, name)`` (Metadata.encode on subclasses)."""

    __slots__ = ("obj",)

    def __init__(self, obj) -> None:
        self.obj = obj

    def get(self, name: str):
        return getattr(self.obj, name)


@dataclass
class Metadata:
    """The ``<META>`` fragment shared by update, update:meta and notify (spec §4.2)."""

    ttl: int | None = None
    ttb: int | None = None
    ttr: int | None = None
    ccd: bool | None = None
    is_binary: bool | None = None
    is_encrypted: bool | None = None
    data_signature: str | None = None
    shared_key_status: str | None = None
    shared_key_enc: str | None = None
    pub_key_cs: str | None = None
    encoding: str | None = None
    enc_key_name: str | None = None
    enc_algo: str | None = None
    iv_nonce: str | None = None
    ske_enc_key_name: str | None = None
    ske_enc_algo: str | None = None
    pub_key_hash: str | None = None
    hashing_algo: str | None = None

    def encode(self) -> str:
        """``":ttl:5:isEncrypted:true:..."`` in the Dart server order ("" when empty)."""
        # (on every notify: fields read straight from __dict__, wire prefixes made once)
        fields = self.__dict__ if type(self) is Metadata else _AttrView(self)
        parts = []
        for attr, prefix, is_bool in _META_ENCODE:
            value = fields.get(attr)
            if value is not None:
                parts.append(prefix + ("true" if value else "false") if is_bool
                             else f"{prefix}{value}")
        return "".join(parts)

    def is_empty(self) -> bool:
        return all(getattr(self, f.name) is None for f in fields(self))


def set_meta(meta: Metadata, seen: set[str], name: str, value: str, *,
             checked: bool = False) -> None:
    """Set one metadata field from its wire text (``name`` lower-case, a key of
    ``META_BY_WIRE``); ``checked``: the caller has already matched a string value against a
    subset of ``_META_VALUE`` (the notify fast path)."""
    attr, kind = META_BY_WIRE[name]
    if attr in seen:
        raise syntax_error(f"metadata {name} given twice")
    seen.add(attr)
    if kind is int:
        parsed = parse_int(value, name)
        if attr in ("ttl", "ttb") and parsed < 0:
            raise syntax_error(f"{name} must be >= 0, not {parsed}")
        if attr == "ttr" and parsed <= -2:
            raise syntax_error(f"ttr must be -1 (cache forever) or >= 0, not {parsed}")
    elif kind is bool:
        parsed = parse_bool(value, name)
    else:
        if not checked and not _META_VALUE.fullmatch(value):
            raise syntax_error(f"metadata {name} value {show(value)} may not be empty or contain "
                               "':', '@' or whitespace")
        parsed = value
    setattr(meta, attr, parsed)
