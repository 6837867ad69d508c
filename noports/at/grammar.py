"""The general reader of every verb's command line, after the verb (spec atprotocol.md §2.3,
§3, §4): one ``_parse_<verb>(rest)`` per verb, gathered in ``VERB_PARSERS``.  Separate from
``noports.at.commands`` (which finds the verb and encodes) and from ``noports.at.notify_fast``,
whose results are held equal to ``parse_notify_general`` here.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable

from noports.at.command_types import (
    Command,
    Cram,
    Delete,
    Exit,
    From,
    Info,
    LLookup,
    Lookup,
    Monitor,
    Noop,
    Notify,
    NotifyFetch,
    NotifyList,
    NotifyRemove,
    NotifyStatus,
    Pkam,
    PLookup,
    Pol,
    Scan,
    Stats,
    Update,
    UpdateMeta,
)
from noports.at.metadata import META_BY_WIRE, META_NAMES, Metadata, set_meta
from noports.at.syntax import (
    parse_atsign,
    parse_bool,
    parse_choice,
    parse_int,
    parse_key,
    show,
    syntax_error,
)
from noports.errors import AtProtocolError, UnsupportedVerbError

__all__ = ["VERB_PARSERS", "parse_notify_general"]

# Parsing rules (Dart at_server 3.0.52 + at_commons grammars, spec §2.3/§4):
#
# * ``noports.at.commands`` trims the line and lower-cases the verb; here option names and
#   enumerated values match case-insensitively; free text (regexes, values, signatures, ids)
#   keeps its case; keys and atSigns are normalised by ``noports.at.names``;
# * verb-level options keep the Dart order (e.g. notify ``id, update|delete, messageType,
#   priority, strategy, latestN, notifier, ttln``), but the ``<META>`` pairs may come in any
#   order (clients disagree on it), including ``hash|pubKeyHash``, ``algo|hashingAlgo`` and
#   atsdk's ``ttln`` (which sets ``Notify.ttln``; inside ``update`` it has no meaning and is
#   dropped);
# * keys must carry an owner (``name@alice``) except ``privatekey:`` keys -- the Dart grammar
#   lets the owner out of update/delete/notify, no client we know of does, and a sans-IO parser
#   cannot know whose server it runs on;
# * grammar errors raise AtProtocolError code AT0003, malformed keys code AT0016 (what the Dart
#   handlers answer), real verbs we do not serve raise UnsupportedVerbError.

_WORD_ID = re.compile(r"[A-Za-z0-9_\-]+")      # notify/notify:remove ids (Dart [\w\d\-\_], ASCII)
_STATS_IDS = re.compile(r"[1-9][0-9]*(,[0-9]+)*")
_DATE = re.compile(r"[0-9]{4}-[01]?[0-9]?-[0123]?[0-9]?")


def _opts(rest: str, verb: str) -> str:
    """The text after ``verb:`` (``rest`` includes the leading ':')."""
    if not rest.startswith(":") or len(rest) == 1:
        raise syntax_error(f"{verb} needs ':' and arguments")
    return rest[1:]


def _no_args(rest: str, verb: str) -> None:
    if rest:
        raise syntax_error(f"{verb} takes no arguments")


def _parse_from(rest: str) -> From:
    body = _opts(rest, "from")
    atsign, colon, tail = body.partition(":")
    if not atsign or any(c.isspace() for c in atsign) or "@" in atsign[1:]:
        raise syntax_error(f"bad atSign in from: {show(atsign)}")
    config = None
    if colon:
        name, colon2, text = tail.partition(":")
        if name.lower() != "clientconfig" or not colon2:
            raise syntax_error("from accepts only :clientConfig:<json object> after the atSign")
        config = _json_object(text, "clientConfig")
    return From(parse_atsign(atsign), config)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:20]} out of range")
    return value


def _json_object(text: str, what: str) -> dict:
    try:
        value = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except (ValueError, RecursionError) as exc:
        raise syntax_error(f"{what} is not valid JSON: {str(exc)[:80]}") from None
    if not isinstance(value, dict):
        raise syntax_error(f"{what} must be a JSON object")
    return value


def _parse_cram(rest: str) -> Cram:
    return Cram(_opts(rest, "cram"))


def _parse_pol(rest: str) -> Pol:
    _no_args(rest, "pol")
    return Pol()


_PKAM_OPTS = (("signingalgo", ("rsa2048", "ecc_secp256r1")), ("hashingalgo", ("sha256", "sha512")),
              ("enrollmentid", None))


def _parse_pkam(rest: str) -> Pkam:
    tokens = _opts(rest, "pkam").split(":")
    values: dict[str, str] = {}
    i = 0
    for name, allowed in _PKAM_OPTS:      # fixed order: signingAlgo, hashingAlgo, enrollmentId
        if len(tokens) - i >= 3 and tokens[i].lower() == name:
            value = tokens[i + 1]
            if allowed is not None:
                value = parse_choice(value, tokens[i], allowed)
            elif not _WORD_ID.fullmatch(value):
                raise syntax_error(f"bad enrollmentId {show(value)}")
            values[name] = value
            i += 2
    if len(tokens) - i != 1 or not tokens[i] or any(c.isspace() for c in tokens[i]):
        raise syntax_error(
            "pkam expects [signingAlgo:<a>:][hashingAlgo:<h>:][enrollmentId:<id>:]<sig>")
    return Pkam(tokens[i], values.get("signingalgo"), values.get("hashingalgo"),
                values.get("enrollmentid"))


def _parse_update(rest: str) -> Update | UpdateMeta:
    body = _opts(rest, "update")
    first = body.split(":", 1)[0].lower()
    if first == "json":
        raise UnsupportedVerbError("update:json is not supported; use update<META>:<key> <value>")
    if first == "meta" and " " not in body and body[4:5] == ":":
        return _parse_update_meta(body[5:])
    head, space, value = body.partition(" ")
    if not space or not value:
        raise syntax_error("update expects update[<META>]:<key> <value>")
    tokens = head.split(":")
    meta, seen, i = Metadata(), set(), 0
    # A metadata pair is taken only while a key token still follows it (as the Dart regex
    # backtracks), so a key named like a metadata field ("update:ttl@alice v") still parses.
    while len(tokens) - i >= 3 and tokens[i].lower() in META_NAMES:
        name = tokens[i].lower()
        if name != "ttln":           # atsdk may send ttln; it means nothing for a stored key
            set_meta(meta, seen, name, tokens[i + 1])
        else:
            parse_int(tokens[i + 1], "ttln", 0)
        i += 2
    key_tokens = tokens[i:]
    if len(key_tokens) == 2:
        scope = key_tokens[0].lower()
        if not (scope == "public" or scope.startswith("@")
                or (scope == "privatekey"
                    and key_tokens[1].lower().split("@")[0] == "at_pkam_publickey")):
            raise syntax_error(f"unknown metadata or key prefix {show(key_tokens[0])}")
    elif len(key_tokens) != 1:
        raise syntax_error(f"bad key in update: {show(':'.join(key_tokens))}")
    return Update(parse_key(":".join(key_tokens)), value, meta)


def _parse_meta_pairs(tokens: list[str], meta: Metadata, seen: set[str]) -> int | None:
    """Fill ``meta`` from ``name:value`` token pairs; returns ttln if present."""
    ttln = None
    if len(tokens) % 2:
        raise syntax_error("metadata must be name:value pairs")
    for i in range(0, len(tokens), 2):
        name = tokens[i].lower()
        if name == "ttln":
            if ttln is not None:
                raise syntax_error("ttln given twice")
            ttln = parse_int(tokens[i + 1], "ttln", 0)
        elif name in META_BY_WIRE:
            set_meta(meta, seen, name, tokens[i + 1])
        else:
            raise syntax_error(f"unknown metadata {show(tokens[i])}")
    return ttln


def _parse_update_meta(body: str) -> UpdateMeta:
    tokens = body.split(":")
    n = 2 if tokens[0].lower() == "public" or tokens[0].startswith("@") else 1
    if len(tokens) < n or "@" not in tokens[n - 1][1:]:
        raise syntax_error("update:meta expects update:meta:<key>@<owner><META>")
    meta = Metadata()
    _parse_meta_pairs(tokens[n:], meta, set())     # ttln is meaningless here: dropped
    key = parse_key(":".join(tokens[:n]))
    return UpdateMeta(key, meta)


def _parse_llookup(rest: str) -> LLookup:
    tokens = _opts(rest, "llookup").split(":")
    mode = None
    if len(tokens) > 1 and tokens[0].lower() in ("meta", "all"):
        mode = tokens.pop(0).lower()
    key = parse_key(":".join(tokens))
    if key.owner is None:
        raise syntax_error("llookup needs a key with an owner (<name>@<owner>)")
    return LLookup(key, mode)


def _lookup_prefix(body: str, verb: str) -> tuple[str, str | None, bool | None]:
    bypass = None
    head, colon, tail = body.partition(":")
    if colon and head.lower() == "bypasscache":
        value, colon, body = tail.partition(":")
        if not colon:
            raise syntax_error(f"{verb}: bypassCache needs a key after it")
        bypass = parse_bool(value, "bypassCache")
    mode = None
    head, colon, tail = body.partition(":")
    if colon and head.lower() in ("meta", "all"):
        mode, body = head.lower(), tail
    return body, mode, bypass


def _lookup_parts(body: str, verb: str) -> tuple[str, str]:
    entity, at, owner = body.rpartition("@")
    if not at or not entity or entity.startswith(":") or any(c.isspace() for c in entity):
        raise syntax_error(f"{verb} expects [<options>:]<name>@<owner>, got {show(body)}")
    if not owner or ":" in owner:
        raise syntax_error(f"{verb}: bad owner {show(owner)}")
    return entity, parse_atsign(owner)


def _parse_lookup(rest: str) -> Lookup:
    body, mode, bypass = _lookup_prefix(_opts(rest, "lookup"), "lookup")
    entity, owner = _lookup_parts(body, "lookup")
    return Lookup(entity, owner, mode, bypass)


def _parse_plookup(rest: str) -> PLookup:
    body, mode, bypass = _lookup_prefix(_opts(rest, "plookup"), "plookup")
    entity, owner = _lookup_parts(body, "plookup")
    if "@" in entity:
        raise syntax_error("plookup key may contain only one '@'")
    return PLookup(entity, owner, mode, bypass)


def _parse_delete(rest: str) -> Delete:
    tokens = _opts(rest, "delete").split(":")
    priority = None
    if len(tokens) >= 3 and tokens[0].lower() == "priority":
        priority = parse_choice(tokens[1], "priority", ("low", "medium", "high"))
        tokens = tokens[2:]
    prefix = [t.lower() for t in tokens[:-1]]
    if prefix == ["privatekey"]:
        if tokens[-1].lower().split("@")[0] != "at_secret":
            raise syntax_error("delete accepts only privatekey:at_secret among privatekey: keys")
    else:
        if prefix[:1] == ["cached"]:
            prefix = prefix[1:]
        if len(prefix) > 1 or (prefix and prefix[0] != "public" and not prefix[0].startswith("@")):
            raise syntax_error(f"bad key in delete: {show(':'.join(tokens))}")
    return Delete(parse_key(":".join(tokens)), priority)


def _parse_scan(rest: str) -> Scan:
    opts, space, regex = rest.partition(" ")
    if space and (not regex or any(c.isspace() for c in regex)):
        raise syntax_error("scan takes one regex without whitespace after a single space")
    scan = Scan(regex=regex if space else None)
    if not opts:
        return scan
    tokens = _opts(opts, "scan").split(":")
    i = 0
    if len(tokens) - i >= 2 and tokens[i].lower() == "showhidden":
        scan.show_hidden = parse_bool(tokens[i + 1], "showhidden")
        i += 2
    if i < len(tokens) and tokens[i].startswith("@"):
        scan.for_atsign = parse_atsign(tokens[i])
        i += 1
    if len(tokens) - i >= 2 and tokens[i].lower() == "page":
        scan.page = parse_int(tokens[i + 1], "page", 0)
        i += 2
    if i != len(tokens):
        raise syntax_error(f"unexpected scan option {show(tokens[i])}")
    return scan


class _Tokens:
    """Left-to-right ':' tokens of a string, keeping the untokenised remainder available."""

    def __init__(self, text: str) -> None:
        self.text, self.pos = text, 0

    def at_end(self) -> bool:
        return self.pos > len(self.text)

    def peek(self) -> str:
        end = self.text.find(":", self.pos)
        return self.text[self.pos:] if end < 0 else self.text[self.pos:end]

    def take(self, what: str) -> str:
        if self.at_end():
            raise syntax_error(f"notify: missing {what}")
        token = self.peek()
        self.pos += len(token) + 1
        return token

    def rest(self) -> str | None:
        return None if self.at_end() else self.text[self.pos:]


# Verb-level notify options in the Dart order; "operation" stands for a bare update|delete.
_NOTIFY_ORDER = ("id", "operation", "messagetype", "priority", "strategy", "latestn",
                 "notifier", "ttln")
_NOTIFY_SUB = {"status", "list", "fetch", "remove", "all"}


def parse_notify_general(rest: str):
    body = _opts(rest, "notify")
    sub = body.split(":", 1)[0].lower()
    if sub in _NOTIFY_SUB:
        return _parse_notify_sub(sub, body[len(sub):])
    toks = _Tokens(body)
    values: dict[str, str] = {}
    stage = 0
    while not toks.at_end():
        low = toks.peek().lower()
        name = "operation" if low in ("update", "delete") else low
        if name not in _NOTIFY_ORDER:
            break
        index = _NOTIFY_ORDER.index(name)
        if index < stage:
            raise syntax_error(f"notify option {toks.peek()} out of order or repeated")
        stage = index + 1
        toks.take(name)
        values[name] = low if name == "operation" else toks.take(f"{name} value")
    meta, seen, meta_ttln = Metadata(), set(), None
    while True:
        token = toks.take("recipient (@<atSign> or public)")
        low = token.lower()
        if low == "public" or token.startswith("@"):
            break
        if low not in META_NAMES:
            raise syntax_error(f"unknown notify option {show(token)}")
        value = toks.take(f"{token} value")
        if low == "ttln":    # atsdk writes ttln among the metadata
            if meta_ttln is not None or "ttln" in values:
                raise syntax_error("ttln given twice")
            meta_ttln = parse_int(value, "ttln", 0)
        else:
            set_meta(meta, seen, low, value)
    remainder = toks.rest()
    if not remainder:
        raise syntax_error("notify needs a key after the recipient")
    notify = Notify(None, None, metadata=meta)
    if "id" in values:
        if not _WORD_ID.fullmatch(values["id"]):
            raise syntax_error(f"bad notification id {show(values['id'])}")
        notify.id = values["id"]
    notify.operation = values.get("operation", "update")
    if "messagetype" in values:
        notify.message_type = parse_choice(values["messagetype"], "messageType", ("key", "text"))
    if "priority" in values:
        notify.priority = parse_choice(values["priority"], "priority", ("low", "medium", "high"))
    if "strategy" in values:
        notify.strategy = parse_choice(values["strategy"], "strategy", ("all", "latest"))
    if "latestn" in values:
        notify.latest_n = parse_int(values["latestn"], "latestN", 0)
    if "notifier" in values:
        if not values["notifier"] or any(c.isspace() for c in values["notifier"]):
            raise syntax_error("bad notifier")
        notify.notifier = values["notifier"]
    notify.ttln = parse_int(values["ttln"], "ttln", 0) if "ttln" in values else meta_ttln
    public_scope = low == "public"
    notify.to = None if public_scope else parse_atsign(token)
    if notify.message_type == "text":
        if public_scope:
            raise syntax_error("a text notification needs an @recipient")
        notify.text = remainder
        return notify
    _notify_key(notify, remainder, public_scope)
    return notify


def _notify_key(notify: Notify, remainder: str, public_scope: bool) -> None:
    """Fill key/value from ``<name>@<owner>[:<value>]`` (the value may hold ':' and '@')."""
    name, at, after = remainder.partition("@")
    if not at:
        raise syntax_error("notify key needs an owner (<name>@<owner>)")
    if not name or name.startswith(":") or "::" in name:
        raise syntax_error(f"bad notify key name {show(name)}")
    owner, colon, value = after.partition(":")
    if colon and not value:
        raise syntax_error("notify value after the key is empty")
    if public_scope:
        key = parse_key(f"public:{name}@{owner}")
    elif name.lower().startswith("public:"):
        key = parse_key(f"{name}@{owner}")            # "@bob:public:x@alice": public key for @bob
    else:
        key = parse_key(f"{notify.to}:{name}@{owner}")
    if key.cached or key.kind not in ("public", "shared", "self"):
        raise AtProtocolError(f"Invalid key: cannot notify a {key.kind} key", code="AT0016")
    notify.key = key
    notify.value = value if colon else None


def _parse_notify_sub(sub: str, rest: str):
    if sub == "all":
        raise UnsupportedVerbError("notify:all is not supported; send one notify per recipient")
    if sub == "list":
        tokens = rest[1:].split(":") if rest else []
        if (rest and rest[0] != ":") or len(tokens) > 3:
            raise syntax_error("notify:list expects [:<from date>][:<to date>][:<regex>]")
        result = NotifyList()
        if tokens and _DATE.fullmatch(tokens[0]):
            result.since = tokens.pop(0)
            if tokens and _DATE.fullmatch(tokens[0]):
                result.until = tokens.pop(0)
        if tokens:
            if len(tokens) != 1 or not tokens[0]:
                raise syntax_error("notify:list: bad date or regex")
            result.regex = tokens[0]
        return result
    ident = _opts(rest, f"notify:{sub}")
    if sub == "remove":
        if not _WORD_ID.fullmatch(ident):
            raise syntax_error(f"bad notification id {show(ident)}")
        return NotifyRemove(ident)
    if any(c.isspace() for c in ident):
        raise syntax_error(f"bad notification id {show(ident)}")
    return NotifyStatus(ident) if sub == "status" else NotifyFetch(ident)


def _parse_monitor(rest: str) -> Monitor:
    opts, space, regex = rest.partition(" ")
    if space and not regex:
        raise syntax_error("monitor: empty regex")
    monitor = Monitor(regex=regex if space else None)
    if not opts:
        return monitor
    tokens = _opts(opts, "monitor").split(":")
    i = 0
    if i < len(tokens) and tokens[i].lower() == "strict":
        monitor.strict, i = True, i + 1
    if i < len(tokens) and tokens[i].lower() == "selfnotifications":
        monitor.self_notifications, i = True, i + 1
        # newer at_commons spell it selfNotifications:enable|disable
        if i < len(tokens) and tokens[i].lower() in ("enable", "disable"):
            monitor.self_notifications, i = tokens[i].lower() == "enable", i + 1
    if i < len(tokens) and tokens[i].lower() == "multiplexed":
        monitor.multiplexed, i = True, i + 1
    if i < len(tokens) and tokens[i][:1].isdigit():
        monitor.epoch, i = parse_int(tokens[i], "monitor epoch", 0), i + 1
    if i != len(tokens):
        raise syntax_error(f"unexpected monitor option {show(tokens[i])}")
    return monitor


def _parse_noop(rest: str) -> Noop:
    return Noop(parse_int(_opts(rest, "noop"), "noop delay", 0))


def _parse_info(rest: str) -> Info:
    if rest and rest.lower() != ":brief":
        raise syntax_error("info takes only :brief")
    return Info(brief=bool(rest))


def _parse_stats(rest: str) -> Stats:
    if not rest:
        return Stats()
    ids, colon, regex = _opts(rest, "stats").partition(":")
    if not _STATS_IDS.fullmatch(ids):
        raise syntax_error(f"bad stats ids {show(ids)}")
    if colon and (not regex or ids not in ("3", "15")):
        raise syntax_error("stats takes a regex only after id 3 or 15")
    return Stats(ids, regex if colon else None)


def _parse_exit(rest: str) -> Exit:
    _no_args(rest, "@exit")
    return Exit()


# verb (lower-case, as noports.at.commands finds it) -> reader of the text after the verb
VERB_PARSERS: dict[str, Callable[[str], Command]] = {
    "from": _parse_from, "cram": _parse_cram, "pol": _parse_pol, "pkam": _parse_pkam,
    "update": _parse_update, "llookup": _parse_llookup, "lookup": _parse_lookup,
    "plookup": _parse_plookup, "delete": _parse_delete, "scan": _parse_scan,
    "notify": parse_notify_general, "monitor": _parse_monitor, "noop": _parse_noop,
    "info": _parse_info, "stats": _parse_stats, "@exit": _parse_exit,
}
