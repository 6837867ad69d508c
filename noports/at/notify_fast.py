"""The fast reader of the usual notify line (``notify:id:...``), on every notification's path
through the server.  Separate from the general ``noports.at.grammar`` so that the one hot shape
stays a single regex plus the shared checks; whatever it returns -- or declines, leaving the
error to the general parser -- is what the general parser gives (tests/unit/test_commands_fast.py).
"""

from __future__ import annotations

import re
from dataclasses import fields

from noports.at.command_types import Notify
from noports.at.grammar import parse_notify_general
from noports.at.metadata import META_FIELDS, Metadata, set_meta
from noports.at.syntax import parse_key
from noports.errors import AtProtocolError

__all__ = ["parse_notify"]

# The shape nearly every notify line has (ours: AtClient.notify / notify_line; atsdk's is the
# same with messageType..notifier added): options in canonical spelling, an @recipient, a plain
# ASCII key and metadata values of base64/word characters (a subset of what set_meta allows).
# One regex takes the line apart up to the value (the value itself is never scanned: after the
# key's ":" anything goes); the fields then go through the same checks and constructors as the
# general parser, and any error falls back to the general parser, so the result -- command or
# error -- is always the general parser's.  tests/unit/test_commands_fast.py holds them equal.
# canonical wire name -> (attribute, type)
_FAST_META = {wire: (attr, kind) for attr, wire, kind in META_FIELDS}
_FAST_NOTIFY = re.compile(
    r":id:([A-Za-z0-9_\-]+):(update|delete)"
    r"(?::messageType:(key))?(?::priority:(low|medium|high))?(?::strategy:(all|latest))?"
    r"(?::latestN:([0-9]{1,18}))?(?::notifier:([A-Za-z0-9_.\-]+))?(?::ttln:([0-9]{1,18}))?"
    # metadata pairs are only delimited here ([^:] is the regex engine's fastest scan); names
    # and values are checked one by one below
    r"((?::[A-Za-z]+:[^:]+)*)"
    r":(@[a-z0-9_\-]{1,55}):([a-z0-9_.\-]+@[a-z0-9_\-]{1,55})(?=:.|$)")
_FAST_META_VALUE = re.compile(r"[A-Za-z0-9+/=_.\-]+")
# Metadata values that passed _FAST_META_VALUE lately: a sender repeats its sharedKeyEnc and
# pubKeyCS (hundreds of characters) in every notification.  Bounded: cleared when full.
_fast_meta_ok: set[str] = set()


def _fast_notify(rest: str) -> Notify | None:
    """``rest`` (``":id:..."``, stripped, one line) by the fast path, or None if it does not
    apply."""
    m = _FAST_NOTIFY.match(rest)
    if m is None:
        return None
    (nid, operation, mtype, priority, strategy, latest_n, notifier, ttln, meta_text, to,
     key_text) = m.groups()
    end = m.end()
    value = rest[end + 1:] if end < len(rest) else None
    meta = Metadata()
    try:
        if meta_text:
            tokens = meta_text.split(":")
            seen: set[str] = set()
            ok = _fast_meta_ok
            for i in range(1, len(tokens), 2):
                name, text = tokens[i], tokens[i + 1]
                attr, kind = _FAST_META.get(name, _NOT_FAST)
                if kind is str and attr not in seen:
                    if text not in ok:
                        if _FAST_META_VALUE.fullmatch(text) is None:
                            return None
                        if len(ok) >= 1024:
                            ok.clear()
                        ok.add(text)
                    seen.add(attr)
                    setattr(meta, attr, text)       # = set_meta(..., checked=True)
                elif kind is bool and text in ("true", "false") and attr not in seen:
                    seen.add(attr)
                    setattr(meta, attr, text == "true")   # = set_meta
                elif kind is None:
                    return None                     # not a (canonical) metadata name
                else:
                    set_meta(meta, seen, name.lower(), text)
        key = parse_key(f"{to}:{key_text}")
    except AtProtocolError:
        return None            # the general parser raises the error, in its own order
    fields_ = {"key": key, "value": value, "id": nid, "operation": operation,
               "message_type": mtype, "priority": priority, "strategy": strategy,
               "latest_n": None if latest_n is None else int(latest_n), "notifier": notifier,
               "ttln": None if ttln is None else int(ttln), "metadata": meta, "to": to,
               "text": None}
    if not _PLAIN_NOTIFY:
        return Notify(**fields_)
    # Every field is already what Notify.__post_init__ would make it (lower-case words, a
    # normalised recipient, which also stops the to-from-key defaulting): skip __init__.
    notify = object.__new__(Notify)
    notify.__dict__ = fields_
    return notify


_NOT_FAST = (None, None)
# The shortcut above builds a Notify without __init__; it is only taken while Notify has
# exactly the fields it fills (checked once, here).
_PLAIN_NOTIFY = tuple(f.name for f in fields(Notify)) == (
    "key", "value", "id", "operation", "message_type", "priority", "strategy", "latest_n",
    "notifier", "ttln", "metadata", "to", "text")


def parse_notify(rest: str):
    """``notify`` after the verb: the fast path when it applies, else the general parser."""
    if rest.startswith(":id:"):
        fast = _fast_notify(rest)
        if fast is not None:
            return fast
    return parse_notify_general(rest)

