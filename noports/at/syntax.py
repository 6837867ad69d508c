"""Field checks shared by every atProtocol command reader: integers, booleans, enumerated
words, atSigns and keys, each turned into the error the Dart server answers (AT0003 for
grammar, AT0016 for keys).  Separate so that the metadata model, the command dataclasses and
both notify parsers use one definition of each check and of each error message.
"""

from __future__ import annotations

import re

from noports.at.names import AtKey, normalize_atsign
from noports.errors import AtProtocolError, InvalidAtSignError, InvalidKeyError

_INT = re.compile(r"-?[0-9]{1,19}")           # ASCII only: int() would take "_" and other digits
_INT64 = 2**63


def show(text: str) -> str:
    """``text`` quoted for an error message, cut to about 60 characters."""
    return repr(text) if len(text) <= 60 else repr(text[:57]) + "..."


def syntax_error(why: str) -> AtProtocolError:
    return AtProtocolError(f"Invalid syntax: {why}")


def parse_int(text: str, what: str, minimum: int | None = None) -> int:
    if not _INT.fullmatch(text):
        raise syntax_error(f"{what} must be an integer, not {show(text)}")
    value = int(text)
    if not -_INT64 <= value < _INT64:                      # a Dart int is 64 bits
        raise syntax_error(f"{what} {text} is out of range")
    if minimum is not None and value < minimum:
        raise syntax_error(f"{what} must be >= {minimum}, not {value}")
    return value


def parse_bool(text: str, what: str) -> bool:
    low = text.lower()
    if low not in ("true", "false"):
        raise syntax_error(f"{what} must be true or false, not {show(text)}")
    return low == "true"


def parse_choice(text: str, what: str, allowed: tuple[str, ...]) -> str:
    low = text.lower()
    if low not in allowed:
        raise syntax_error(f"{what} must be one of {'|'.join(allowed)}, not {show(text)}")
    return low


def parse_atsign(text: str) -> str:
    try:
        return normalize_atsign(text)
    except InvalidAtSignError as exc:
        raise syntax_error(str(exc)) from None


def parse_key(text: str) -> AtKey:
    try:
        return AtKey.parse(text)
    except InvalidKeyError as exc:
        raise AtProtocolError(f"Invalid key: {exc}", code="AT0016") from None


def norm_atsign(value: str | None) -> str | None:
    # Used by __post_init__: normalise what callers pass, leave odd values for encode to reject.
    if value is None:
        return None
    try:
        return normalize_atsign(value)
    except (InvalidAtSignError, TypeError):
        return value


def lower(value):
    """``value.lower()`` for text; anything else (None, a wrong type) unchanged."""
    return value.lower() if isinstance(value, str) else value
