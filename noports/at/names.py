"""atSigns, NoPorts device names and atKeys: validation, normalisation, parse and format.

Owns the textual identity rules of the atProtocol (spec atprotocol.md §3.1, §4.1) and the NoPorts
device-name rules (noports-protocol.md §2.2).  Sans-IO: pure string handling, no I/O.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from noports.errors import InvalidAtSignError, InvalidDeviceNameError, InvalidKeyError

__all__ = [
    "MAX_ATSIGN_LENGTH",
    "MAX_CACHED_KEY_LENGTH",
    "MAX_KEY_LENGTH",
    "AtKey",
    "bare_atsign",
    "normalize_atsign",
    "snakify_device",
    "validate_device_name",
]

#: Characters of an atSign after its leading "@" (at_commons allows 1-55).
MAX_ATSIGN_LENGTH = 55
#: Longest stored key (AT0016 otherwise); ``cached:`` keys get 7 more for the prefix.
MAX_KEY_LENGTH = 248
MAX_CACHED_KEY_LENGTH = 255

KINDS = ("public", "shared", "self", "private", "privatekey", "local")

# Prefixes in the order they may appear after an optional "cached:".
_PREFIX_KINDS = (("public:", "public"), ("private:", "private"),
                 ("privatekey:", "privatekey"), ("local:", "local"))

# ASCII punctuation allowed in entities besides word characters (at_commons key regex).
_ENTITY_ASCII_EXTRA = frozenset(".-_'*\"")
_ATSIGN_ASCII_EXTRA = frozenset("-_")

# Fast paths: the plain-ASCII names nearly every atSign and key uses, checked by one regex
# instead of a Python call per character.  They accept exactly what the per-character rules
# accept for such strings (ASCII letters/digits plus the extras above); anything else -- non-ASCII,
# or a character that may be refused -- goes through _char_problem, which also words the error.
_ATSIGN_FAST = re.compile(r"[A-Za-z0-9_\-]+")
_ENTITY_FAST = re.compile(r"[A-Za-z0-9_.\-'*\"]+")
# Results of normalize_atsign / AtKey.parse for recently seen texts (both are pure functions of
# their input, and AtKey is frozen, so a hit can be shared).  Servers and clients see the same
# few atSigns and key names over and over; bounded: cleared when full, short texts only.
_CACHE_MAX = 4096
_CACHEABLE_LEN = 320
_atsign_cache: dict[str, str] = {}
_key_cache: dict[str, AtKey] = {}

_DEVICE_RE = re.compile(r"[a-z0-9_][a-z0-9_\-]{1,35}")
_WHITESPACE_RUN = re.compile(r"\s+")


def _show(text: str) -> str:
    """repr of user text, cut short so that a huge bad input gives a readable message."""
    return repr(text) if len(text) <= 80 else repr(text[:77]) + "..."


def _char_problem(ch: str, ascii_extra: frozenset[str]) -> str | None:
    """Why ``ch`` may not appear in an atSign/entity, or None when it may.

    ASCII is held to word characters plus a few marks; any other printable character is
    allowed so that emoji atSigns and keys (which at_commons accepts by range) work.
    """
    if ch == ":":
        return "':'"
    if ch == "@":
        return "'@'"
    if ch.isspace():
        return "whitespace"
    if ch.isascii():
        if ch.isalnum() or ch in ascii_extra:
            return None
        return repr(ch)
    # Control, format, surrogate, unassigned and separator characters would break wire lines
    # or make two different-looking names equal.
    if unicodedata.category(ch)[0] in "CZ":
        return f"U+{ord(ch):04X}"
    return None


def normalize_atsign(text: str) -> str:
    """``" Alice "`` -> ``"@alice"``: strip, lower-case, one leading ``@``; validate."""
    if text.__class__ is str:
        hit = _atsign_cache.get(text)
        if hit is not None:
            return hit
    elif not isinstance(text, str):
        raise InvalidAtSignError(f"atSign must be a string, not {type(text).__name__}")
    body = text.strip().lower()
    if body.startswith("@"):
        body = body[1:]
    if not body:
        raise InvalidAtSignError(f"empty atSign: {_show(text)}")
    if len(body) > MAX_ATSIGN_LENGTH:
        raise InvalidAtSignError(
            f"atSign {_show(text)} is too long: {len(body)} characters, "
            f"at most {MAX_ATSIGN_LENGTH}")
    if _ATSIGN_FAST.fullmatch(body) is None:
        for ch in body:
            problem = _char_problem(ch, _ATSIGN_ASCII_EXTRA)
            if problem is not None:
                raise InvalidAtSignError(f"atSign {_show(text)} may not contain {problem}")
    result = "@" + body
    if text.__class__ is str and len(text) <= _CACHEABLE_LEN:
        if len(_atsign_cache) >= _CACHE_MAX:
            _atsign_cache.clear()
        _atsign_cache[text] = result
    return result


def bare_atsign(text: str) -> str:
    """``"@Alice"`` -> ``"alice"`` (normalised, without the ``@``)."""
    return normalize_atsign(text)[1:]


def snakify_device(name: str) -> str:
    """Lower-case; every run of whitespace becomes one ``_`` (Dart ``snakifyDeviceName``)."""
    return _WHITESPACE_RUN.sub("_", name.lower())


def validate_device_name(name: str) -> str:
    """Snakify ``name`` and check it against ``[a-z0-9_][a-z0-9_\\-]{1,35}``; return it."""
    if not isinstance(name, str):
        raise InvalidDeviceNameError(f"device name must be a string, not {type(name).__name__}")
    snake = snakify_device(name)
    if not _DEVICE_RE.fullmatch(snake):
        raise InvalidDeviceNameError(
            f"invalid device name {name!r}: after lower-casing and replacing whitespace with '_' "
            "it must be 2-36 characters of a-z, 0-9, '_' or '-', not starting with '-'")
    return snake


def _check_entity(entity: str) -> None:
    if not entity:
        raise InvalidKeyError("the atKey's name is empty")
    if _ENTITY_FAST.fullmatch(entity) is not None:
        return
    for ch in entity:
        problem = _char_problem(ch, _ENTITY_ASCII_EXTRA)
        if problem is not None:
            raise InvalidKeyError(f"the atKey's name {entity!r} may not contain {problem}")


def _owner(atsign: str, role: str) -> str:
    try:
        return normalize_atsign(atsign)
    except InvalidAtSignError as exc:
        raise InvalidKeyError(f"bad {role}: {exc}") from None


@dataclass(frozen=True)
class AtKey:
    """One atKey in any of its stored/wire forms (spec atprotocol.md §4.1).

    Constructing directly normalises like :meth:`parse`: names lower-cased, atSigns given an
    ``@``, and a "shared" key whose sharedWith is its owner becomes a "self" key.
    """

    entity: str
    owner: str | None
    kind: str
    shared_with: str | None = None
    cached: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.entity, str):
            raise InvalidKeyError(f"atKey name must be a string, not {type(self.entity).__name__}")
        if self.kind not in KINDS:
            raise InvalidKeyError(f"unknown atKey kind {self.kind!r} (one of {', '.join(KINDS)})")
        entity = self.entity.lower()
        _check_entity(entity)
        owner = None if self.owner is None else _owner(self.owner, "owner")
        shared_with = (None if self.shared_with is None
                       else _owner(self.shared_with, "sharedWith atSign"))
        kind = self.kind
        if kind == "shared":
            if shared_with is None:
                raise InvalidKeyError("a shared atKey needs a sharedWith atSign (@bob:name@alice)")
            if shared_with == owner:
                # "@alice:x@alice" is alice's own self key.
                kind, shared_with = "self", None
        elif shared_with is not None:
            raise InvalidKeyError(f"a {kind} atKey cannot have a sharedWith atSign ({shared_with})")
        if owner is None and kind != "privatekey":
            raise InvalidKeyError(f"a {kind} atKey needs an owner atSign (name@owner)")
        if self.cached and kind not in ("public", "shared"):
            raise InvalidKeyError(f"cached: applies only to public and shared atKeys, not {kind}")
        object.__setattr__(self, "entity", entity)
        object.__setattr__(self, "owner", owner)
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "shared_with", shared_with)
        object.__setattr__(self, "cached", bool(self.cached))
        limit = MAX_CACHED_KEY_LENGTH if self.cached else MAX_KEY_LENGTH
        form = str(self)
        if len(form) > limit:
            raise InvalidKeyError(
                f"atKey too long: {len(form)} characters, at most {limit}: {form[:40]}...")

    @property
    def namespace(self) -> str | None:
        """Last dot-segment of the entity (``"phone.wavi"`` -> ``"wavi"``), if any."""
        _, dot, ns = self.entity.rpartition(".")
        return ns if dot and ns else None

    @property
    def hidden(self) -> bool:
        return self.entity.startswith("_")

    @classmethod
    def parse(cls, text: str) -> AtKey:
        """Parse any stored/wire form of an atKey; raises InvalidKeyError."""
        if text.__class__ is str and cls is AtKey:
            hit = _key_cache.get(text)
            if hit is not None:
                return hit
            key = cls._parse(text)
            if len(text) <= _CACHEABLE_LEN:
                if len(_key_cache) >= _CACHE_MAX:
                    _key_cache.clear()
                _key_cache[text] = key
            return key
        return cls._parse(text)

    @classmethod
    def _parse(cls, text: str) -> AtKey:
        if not isinstance(text, str):
            raise InvalidKeyError(f"atKey must be a string, not {type(text).__name__}")
        rest = text.strip().lower()
        if not rest:
            raise InvalidKeyError("empty atKey")
        cached = rest.startswith("cached:")
        if cached:
            rest = rest[len("cached:"):]
        kind = "self"
        shared_with = None
        for prefix, prefix_kind in _PREFIX_KINDS:
            if rest.startswith(prefix):
                kind, rest = prefix_kind, rest[len(prefix):]
                break
        else:
            if rest.startswith("@"):
                shared_with, colon, rest = rest.partition(":")
                if not colon:
                    raise InvalidKeyError(f"atKey {_show(text)} starts with an atSign but has "
                                          "no ':' (expected @bob:name@alice)")
                kind = "shared"
        entity, at, owner = rest.partition("@")
        if not at:
            if kind != "privatekey":
                raise InvalidKeyError(f"atKey {_show(text)} has no owner (expected name@owner)")
            owner = None
        elif "@" in owner:
            raise InvalidKeyError(f"atKey {_show(text)} has more than one '@' after its name")
        try:
            return cls(entity=entity, owner=owner, kind=kind, shared_with=shared_with,
                       cached=cached)
        except InvalidKeyError as exc:
            raise InvalidKeyError(f"invalid atKey {_show(text)}: {exc}") from None

    def __str__(self) -> str:
        cached = "cached:" if self.cached else ""
        owner = self.owner or ""
        if self.kind == "self":
            return f"{self.entity}{owner}"
        if self.kind == "shared":
            return f"{cached}{self.shared_with}:{self.entity}{owner}"
        return f"{cached}{self.kind}:{self.entity}{owner}"
