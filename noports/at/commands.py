"""atProtocol command lines: one dataclass per verb, the server-side parser and the client encoder.

Owns the text of every command a client sends to an atServer (spec atprotocol.md §2.3, §3, §4):
``parse_command(line)`` reads a line the way the Dart server does, ``encode_command(cmd)``
writes one the way atsdk/Dart clients do.  Sans-IO: no sockets, no verb semantics (who may run
what, what a key means to the store) -- that lives in ``noports.atserver``.

Parsing rules (Dart at_server 3.0.52 + at_commons grammars, spec §2.3/§4):

* the line is trimmed; the verb (text before the first ``:``) is lower-cased with spaces removed;
  option names and enumerated values match case-insensitively; free text (regexes, values,
  signatures, ids) keeps its case; keys and atSigns are normalised by ``noports.at.names``;
* verb-level options keep the Dart order (e.g. notify ``id, update|delete, messageType,
  priority, strategy, latestN, notifier, ttln``), but the ``<META>`` pairs may come in any order
  (clients disagree on it), including ``hash|pubKeyHash``, ``algo|hashingAlgo`` and atsdk's
  ``ttln`` (which sets ``Notify.ttln``; inside ``update`` it has no meaning and is dropped);
* keys must carry an owner (``name@alice``) except ``privatekey:`` keys -- the Dart grammar
  lets the owner out of update/delete/notify, no client we know of does, and a sans-IO parser
  cannot know whose server it runs on;
* grammar errors raise AtProtocolError code AT0003, malformed keys code AT0016 (what the Dart
  handlers answer), real verbs we do not serve raise UnsupportedVerbError.

``encode_command`` checks its own output: the line it returns parses back to an equal command,
or it raises AtProtocolError (so a client can never send a line the server reads differently).
The dataclasses normalise atSigns and enumerated words when built, so equality is meaningful.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, fields

from noports.at.names import AtKey, normalize_atsign
from noports.errors import (
    AtProtocolError,
    InvalidAtSignError,
    InvalidKeyError,
    UnsupportedVerbError,
)

__all__ = [
    "Command", "Cram", "Delete", "Exit", "From", "Info", "LLookup", "Lookup", "Metadata",
    "Monitor", "Noop", "Notify", "NotifyFetch", "NotifyList", "NotifyRemove", "NotifyStatus",
    "PLookup", "Pkam", "Pol", "Scan", "Stats", "Update", "UpdateMeta",
    "encode_command", "parse_command",
]

_INT = re.compile(r"-?[0-9]{1,19}")           # ASCII only: int() would take "_" and other digits
_INT64 = 2**63
_WORD_ID = re.compile(r"[A-Za-z0-9_\-]+")      # notify/notify:remove ids (Dart [\w\d\-\_], ASCII)
_STATS_IDS = re.compile(r"[1-9][0-9]*(,[0-9]+)*")
_DATE = re.compile(r"[0-9]{4}-[01]?[0-9]?-[0123]?[0-9]?")
_META_VALUE = re.compile(r"[^:@\s]+")           # string metadata values (at_commons fragment)


def _show(text: str) -> str:
    return repr(text) if len(text) <= 60 else repr(text[:57]) + "..."


def _syntax(why: str) -> AtProtocolError:
    return AtProtocolError(f"Invalid syntax: {why}")


def _int(text: str, what: str, minimum: int | None = None) -> int:
    if not _INT.fullmatch(text):
        raise _syntax(f"{what} must be an integer, not {_show(text)}")
    value = int(text)
    if not -_INT64 <= value < _INT64:                      # a Dart int is 64 bits
        raise _syntax(f"{what} {text} is out of range")
    if minimum is not None and value < minimum:
        raise _syntax(f"{what} must be >= {minimum}, not {value}")
    return value


def _bool(text: str, what: str) -> bool:
    low = text.lower()
    if low not in ("true", "false"):
        raise _syntax(f"{what} must be true or false, not {_show(text)}")
    return low == "true"


def _choice(text: str, what: str, allowed: tuple[str, ...]) -> str:
    low = text.lower()
    if low not in allowed:
        raise _syntax(f"{what} must be one of {'|'.join(allowed)}, not {_show(text)}")
    return low


def _atsign(text: str) -> str:
    try:
        return normalize_atsign(text)
    except InvalidAtSignError as exc:
        raise _syntax(str(exc)) from None


def _key(text: str) -> AtKey:
    try:
        return AtKey.parse(text)
    except InvalidKeyError as exc:
        raise AtProtocolError(f"Invalid key: {exc}", code="AT0016") from None


def _norm_atsign(value: str | None) -> str | None:
    # Used by __post_init__: normalise what callers pass, leave odd values for encode to reject.
    if value is None:
        return None
    try:
        return normalize_atsign(value)
    except (InvalidAtSignError, TypeError):
        return value


def _lower(value):
    return value.lower() if isinstance(value, str) else value


# ---- metadata -------------------------------------------------------------------------------

# (attribute, wire name, type) in the Dart server order; the hash pair sits after pubKeyCS like
# at_commons emits it.  We emit the newer names pubKeyHash/hashingAlgo and accept both.
_META_FIELDS = (
    ("ttl", "ttl", int), ("ttb", "ttb", int), ("ttr", "ttr", int), ("ccd", "ccd", bool),
    ("data_signature", "dataSignature", str), ("shared_key_status", "sharedKeyStatus", str),
    ("is_binary", "isBinary", bool), ("is_encrypted", "isEncrypted", bool),
    ("shared_key_enc", "sharedKeyEnc", str), ("pub_key_cs", "pubKeyCS", str),
    ("pub_key_hash", "pubKeyHash", str), ("hashing_algo", "hashingAlgo", str),
    ("encoding", "encoding", str), ("enc_key_name", "encKeyName", str),
    ("enc_algo", "encAlgo", str), ("iv_nonce", "ivNonce", str),
    ("ske_enc_key_name", "skeEncKeyName", str), ("ske_enc_algo", "skeEncAlgo", str),
)
_META_BY_WIRE = {wire.lower(): (attr, kind) for attr, wire, kind in _META_FIELDS}
_META_BY_WIRE["hash"] = ("pub_key_hash", str)      # at_commons 5.0.1 / at_c spelling
_META_BY_WIRE["algo"] = ("hashing_algo", str)
_META_NAMES = frozenset(_META_BY_WIRE) | {"ttln"}
_META_ENCODE = tuple((attr, f":{wire}:", kind is bool) for attr, wire, kind in _META_FIELDS)


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


def _set_meta(meta: Metadata, seen: set[str], name: str, value: str, *,
              checked: bool = False) -> None:
    """Set one metadata field from its wire text; ``checked``: the caller has already matched a
    string value against a subset of ``_META_VALUE`` (the notify fast path)."""
    attr, kind = _META_BY_WIRE[name]
    if attr in seen:
        raise _syntax(f"metadata {name} given twice")
    seen.add(attr)
    if kind is int:
        parsed = _int(value, name)
        if attr in ("ttl", "ttb") and parsed < 0:
            raise _syntax(f"{name} must be >= 0, not {parsed}")
        if attr == "ttr" and parsed <= -2:
            raise _syntax(f"ttr must be -1 (cache forever) or >= 0, not {parsed}")
    elif kind is bool:
        parsed = _bool(value, name)
    else:
        if not checked and not _META_VALUE.fullmatch(value):
            raise _syntax(f"metadata {name} value {_show(value)} may not be empty or contain "
                          "':', '@' or whitespace")
        parsed = value
    setattr(meta, attr, parsed)


# ---- commands -------------------------------------------------------------------------------

@dataclass
class From:
    atsign: str
    client_config: dict | None = None

    def __post_init__(self) -> None:
        self.atsign = _norm_atsign(self.atsign)


@dataclass
class Cram:
    digest: str


@dataclass
class Pol:
    pass


@dataclass
class Pkam:
    signature: str
    signing_algo: str | None = None     # "rsa2048" | "ecc_secp256r1"
    hashing_algo: str | None = None     # "sha256" | "sha512"
    enrollment_id: str | None = None

    def __post_init__(self) -> None:
        self.signing_algo = _lower(self.signing_algo)
        self.hashing_algo = _lower(self.hashing_algo)


@dataclass
class Update:
    key: AtKey
    value: str
    metadata: Metadata = field(default_factory=Metadata)


@dataclass
class UpdateMeta:
    key: AtKey
    metadata: Metadata = field(default_factory=Metadata)


@dataclass
class LLookup:
    key: AtKey
    mode: str | None = None             # None | "meta" | "all"

    def __post_init__(self) -> None:
        self.mode = _lower(self.mode)


@dataclass
class Lookup:
    entity: str
    owner: str
    mode: str | None = None
    bypass_cache: bool | None = None

    def __post_init__(self) -> None:
        self.entity = _lower(self.entity)
        self.owner = _norm_atsign(self.owner)
        self.mode = _lower(self.mode)


@dataclass
class PLookup:
    """``plookup``: same fields as Lookup, a distinct type so that handlers cannot mix them up."""

    entity: str
    owner: str
    mode: str | None = None
    bypass_cache: bool | None = None

    __post_init__ = Lookup.__post_init__


@dataclass
class Delete:
    key: AtKey
    priority: str | None = None

    def __post_init__(self) -> None:
        self.priority = _lower(self.priority)


@dataclass
class Scan:
    regex: str | None = None
    show_hidden: bool = False
    for_atsign: str | None = None
    page: int | None = None

    def __post_init__(self) -> None:
        self.for_atsign = _norm_atsign(self.for_atsign)


@dataclass
class Notify:
    """``notify:...`` (spec §4.8).

    ``to`` is the recipient (the ``@forAtSign`` before the key); it defaults to the key's
    sharedWith (or, for a self key, its owner: a self notification) and is None for the
    ``public:`` form.  ``@bob:public:x@alice`` is key ``public:x@alice`` with ``to="@bob"``.
    ``messageType:text`` notifications carry ``text`` and no key.
    """

    key: AtKey | None
    value: str | None = None
    id: str | None = None
    operation: str = "update"
    message_type: str | None = None
    priority: str | None = None
    strategy: str | None = None
    latest_n: int | None = None
    notifier: str | None = None
    ttln: int | None = None
    metadata: Metadata = field(default_factory=Metadata)
    to: str | None = None
    text: str | None = None

    def __post_init__(self) -> None:
        self.operation = _lower(self.operation)
        self.message_type = _lower(self.message_type)
        self.priority = _lower(self.priority)
        self.strategy = _lower(self.strategy)
        self.to = _norm_atsign(self.to)
        if self.to is None and isinstance(self.key, AtKey):
            if self.key.kind == "shared":
                self.to = self.key.shared_with
            elif self.key.kind == "self":
                self.to = self.key.owner

    @property
    def recipient(self) -> str | None:
        return self.to


@dataclass
class NotifyStatus:
    id: str


@dataclass
class NotifyList:
    since: str | None = None
    until: str | None = None
    regex: str | None = None


@dataclass
class NotifyRemove:
    id: str


@dataclass
class NotifyFetch:
    id: str


@dataclass
class Monitor:
    epoch: int | None = None
    regex: str | None = None
    strict: bool = False
    self_notifications: bool = False
    multiplexed: bool = False


@dataclass
class Noop:
    millis: int


@dataclass
class Info:
    brief: bool = False


@dataclass
class Stats:
    ids: str | None = None
    regex: str | None = None


@dataclass
class Exit:
    pass


Command = (From | Cram | Pol | Pkam | Update | UpdateMeta | LLookup | Lookup | PLookup | Delete
           | Scan | Notify | NotifyStatus | NotifyList | NotifyRemove | NotifyFetch | Monitor
           | Noop | Info | Stats | Exit)


# ---- parsing --------------------------------------------------------------------------------

def _opts(rest: str, verb: str) -> str:
    """The text after ``verb:`` (``rest`` includes the leading ':')."""
    if not rest.startswith(":") or len(rest) == 1:
        raise _syntax(f"{verb} needs ':' and arguments")
    return rest[1:]


def _no_args(rest: str, verb: str) -> None:
    if rest:
        raise _syntax(f"{verb} takes no arguments")


def _parse_from(rest: str) -> From:
    body = _opts(rest, "from")
    atsign, colon, tail = body.partition(":")
    if not atsign or any(c.isspace() for c in atsign) or "@" in atsign[1:]:
        raise _syntax(f"bad atSign in from: {_show(atsign)}")
    config = None
    if colon:
        name, colon2, text = tail.partition(":")
        if name.lower() != "clientconfig" or not colon2:
            raise _syntax("from accepts only :clientConfig:<json object> after the atSign")
        config = _json_object(text, "clientConfig")
    return From(_atsign(atsign), config)


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
        raise _syntax(f"{what} is not valid JSON: {str(exc)[:80]}") from None
    if not isinstance(value, dict):
        raise _syntax(f"{what} must be a JSON object")
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
                value = _choice(value, tokens[i], allowed)
            elif not _WORD_ID.fullmatch(value):
                raise _syntax(f"bad enrollmentId {_show(value)}")
            values[name] = value
            i += 2
    if len(tokens) - i != 1 or not tokens[i] or any(c.isspace() for c in tokens[i]):
        raise _syntax("pkam expects [signingAlgo:<a>:][hashingAlgo:<h>:][enrollmentId:<id>:]<sig>")
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
        raise _syntax("update expects update[<META>]:<key> <value>")
    tokens = head.split(":")
    meta, seen, i = Metadata(), set(), 0
    # A metadata pair is taken only while a key token still follows it (as the Dart regex
    # backtracks), so a key named like a metadata field ("update:ttl@alice v") still parses.
    while len(tokens) - i >= 3 and tokens[i].lower() in _META_NAMES:
        name = tokens[i].lower()
        if name != "ttln":           # atsdk may send ttln; it means nothing for a stored key
            _set_meta(meta, seen, name, tokens[i + 1])
        else:
            _int(tokens[i + 1], "ttln", 0)
        i += 2
    key_tokens = tokens[i:]
    if len(key_tokens) == 2:
        scope = key_tokens[0].lower()
        if not (scope == "public" or scope.startswith("@")
                or (scope == "privatekey"
                    and key_tokens[1].lower().split("@")[0] == "at_pkam_publickey")):
            raise _syntax(f"unknown metadata or key prefix {_show(key_tokens[0])}")
    elif len(key_tokens) != 1:
        raise _syntax(f"bad key in update: {_show(':'.join(key_tokens))}")
    return Update(_key(":".join(key_tokens)), value, meta)


def _parse_meta_pairs(tokens: list[str], meta: Metadata, seen: set[str]) -> int | None:
    """Fill ``meta`` from ``name:value`` token pairs; returns ttln if present."""
    ttln = None
    if len(tokens) % 2:
        raise _syntax("metadata must be name:value pairs")
    for i in range(0, len(tokens), 2):
        name = tokens[i].lower()
        if name == "ttln":
            if ttln is not None:
                raise _syntax("ttln given twice")
            ttln = _int(tokens[i + 1], "ttln", 0)
        elif name in _META_BY_WIRE:
            _set_meta(meta, seen, name, tokens[i + 1])
        else:
            raise _syntax(f"unknown metadata {_show(tokens[i])}")
    return ttln


def _parse_update_meta(body: str) -> UpdateMeta:
    tokens = body.split(":")
    n = 2 if tokens[0].lower() == "public" or tokens[0].startswith("@") else 1
    if len(tokens) < n or "@" not in tokens[n - 1][1:]:
        raise _syntax("update:meta expects update:meta:<key>@<owner><META>")
    meta = Metadata()
    _parse_meta_pairs(tokens[n:], meta, set())     # ttln is meaningless here: dropped
    key = _key(":".join(tokens[:n]))
    return UpdateMeta(key, meta)


def _parse_llookup(rest: str) -> LLookup:
    tokens = _opts(rest, "llookup").split(":")
    mode = None
    if len(tokens) > 1 and tokens[0].lower() in ("meta", "all"):
        mode = tokens.pop(0).lower()
    key = _key(":".join(tokens))
    if key.owner is None:
        raise _syntax("llookup needs a key with an owner (<name>@<owner>)")
    return LLookup(key, mode)


def _lookup_prefix(body: str, verb: str) -> tuple[str, str | None, bool | None]:
    bypass = None
    head, colon, tail = body.partition(":")
    if colon and head.lower() == "bypasscache":
        value, colon, body = tail.partition(":")
        if not colon:
            raise _syntax(f"{verb}: bypassCache needs a key after it")
        bypass = _bool(value, "bypassCache")
    mode = None
    head, colon, tail = body.partition(":")
    if colon and head.lower() in ("meta", "all"):
        mode, body = head.lower(), tail
    return body, mode, bypass


def _lookup_parts(body: str, verb: str) -> tuple[str, str]:
    entity, at, owner = body.rpartition("@")
    if not at or not entity or entity.startswith(":") or any(c.isspace() for c in entity):
        raise _syntax(f"{verb} expects [<options>:]<name>@<owner>, got {_show(body)}")
    if not owner or ":" in owner:
        raise _syntax(f"{verb}: bad owner {_show(owner)}")
    return entity, _atsign(owner)


def _parse_lookup(rest: str) -> Lookup:
    body, mode, bypass = _lookup_prefix(_opts(rest, "lookup"), "lookup")
    entity, owner = _lookup_parts(body, "lookup")
    return Lookup(entity, owner, mode, bypass)


def _parse_plookup(rest: str) -> PLookup:
    body, mode, bypass = _lookup_prefix(_opts(rest, "plookup"), "plookup")
    entity, owner = _lookup_parts(body, "plookup")
    if "@" in entity:
        raise _syntax("plookup key may contain only one '@'")
    return PLookup(entity, owner, mode, bypass)


def _parse_delete(rest: str) -> Delete:
    tokens = _opts(rest, "delete").split(":")
    priority = None
    if len(tokens) >= 3 and tokens[0].lower() == "priority":
        priority = _choice(tokens[1], "priority", ("low", "medium", "high"))
        tokens = tokens[2:]
    prefix = [t.lower() for t in tokens[:-1]]
    if prefix == ["privatekey"]:
        if tokens[-1].lower().split("@")[0] != "at_secret":
            raise _syntax("delete accepts only privatekey:at_secret among privatekey: keys")
    else:
        if prefix[:1] == ["cached"]:
            prefix = prefix[1:]
        if len(prefix) > 1 or (prefix and prefix[0] != "public" and not prefix[0].startswith("@")):
            raise _syntax(f"bad key in delete: {_show(':'.join(tokens))}")
    return Delete(_key(":".join(tokens)), priority)


def _parse_scan(rest: str) -> Scan:
    opts, space, regex = rest.partition(" ")
    if space and (not regex or any(c.isspace() for c in regex)):
        raise _syntax("scan takes one regex without whitespace after a single space")
    scan = Scan(regex=regex if space else None)
    if not opts:
        return scan
    tokens = _opts(opts, "scan").split(":")
    i = 0
    if len(tokens) - i >= 2 and tokens[i].lower() == "showhidden":
        scan.show_hidden = _bool(tokens[i + 1], "showhidden")
        i += 2
    if i < len(tokens) and tokens[i].startswith("@"):
        scan.for_atsign = _atsign(tokens[i])
        i += 1
    if len(tokens) - i >= 2 and tokens[i].lower() == "page":
        scan.page = _int(tokens[i + 1], "page", 0)
        i += 2
    if i != len(tokens):
        raise _syntax(f"unexpected scan option {_show(tokens[i])}")
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
            raise _syntax(f"notify: missing {what}")
        token = self.peek()
        self.pos += len(token) + 1
        return token

    def rest(self) -> str | None:
        return None if self.at_end() else self.text[self.pos:]


# Verb-level notify options in the Dart order; "operation" stands for a bare update|delete.
_NOTIFY_ORDER = ("id", "operation", "messagetype", "priority", "strategy", "latestn",
                 "notifier", "ttln")
_NOTIFY_SUB = {"status", "list", "fetch", "remove", "all"}


# The shape nearly every notify line has (ours: AtClient.notify / notify_line; atsdk's is the
# same with messageType..notifier added): options in canonical spelling, an @recipient, a plain
# ASCII key and metadata values of base64/word characters (a subset of what _META_VALUE allows).
# One regex takes the line apart up to the value (the value itself is never scanned: after the
# key's ":" anything goes); the fields then go through the same checks and constructors as the
# general parser, and any error falls back to the general parser, so the result -- command or
# error -- is always the general parser's.  tests/unit/test_commands_fast.py holds them equal.
# canonical wire name -> (attribute, type)
_FAST_META = {wire: (attr, kind) for attr, wire, kind in _META_FIELDS}
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
                    setattr(meta, attr, text)       # = _set_meta(..., checked=True)
                elif kind is bool and text in ("true", "false") and attr not in seen:
                    seen.add(attr)
                    setattr(meta, attr, text == "true")   # = _set_meta
                elif kind is None:
                    return None                     # not a (canonical) metadata name
                else:
                    _set_meta(meta, seen, name.lower(), text)
        key = _key(f"{to}:{key_text}")
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


def _parse_notify(rest: str):
    if rest.startswith(":id:"):
        fast = _fast_notify(rest)
        if fast is not None:
            return fast
    return _parse_notify_general(rest)


def _parse_notify_general(rest: str):
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
            raise _syntax(f"notify option {toks.peek()} out of order or repeated")
        stage = index + 1
        toks.take(name)
        values[name] = low if name == "operation" else toks.take(f"{name} value")
    meta, seen, meta_ttln = Metadata(), set(), None
    while True:
        token = toks.take("recipient (@<atSign> or public)")
        low = token.lower()
        if low == "public" or token.startswith("@"):
            break
        if low not in _META_NAMES:
            raise _syntax(f"unknown notify option {_show(token)}")
        value = toks.take(f"{token} value")
        if low == "ttln":    # atsdk writes ttln among the metadata
            if meta_ttln is not None or "ttln" in values:
                raise _syntax("ttln given twice")
            meta_ttln = _int(value, "ttln", 0)
        else:
            _set_meta(meta, seen, low, value)
    remainder = toks.rest()
    if not remainder:
        raise _syntax("notify needs a key after the recipient")
    notify = Notify(None, None, metadata=meta)
    if "id" in values:
        if not _WORD_ID.fullmatch(values["id"]):
            raise _syntax(f"bad notification id {_show(values['id'])}")
        notify.id = values["id"]
    notify.operation = values.get("operation", "update")
    if "messagetype" in values:
        notify.message_type = _choice(values["messagetype"], "messageType", ("key", "text"))
    if "priority" in values:
        notify.priority = _choice(values["priority"], "priority", ("low", "medium", "high"))
    if "strategy" in values:
        notify.strategy = _choice(values["strategy"], "strategy", ("all", "latest"))
    if "latestn" in values:
        notify.latest_n = _int(values["latestn"], "latestN", 0)
    if "notifier" in values:
        if not values["notifier"] or any(c.isspace() for c in values["notifier"]):
            raise _syntax("bad notifier")
        notify.notifier = values["notifier"]
    notify.ttln = _int(values["ttln"], "ttln", 0) if "ttln" in values else meta_ttln
    public_scope = low == "public"
    notify.to = None if public_scope else _atsign(token)
    if notify.message_type == "text":
        if public_scope:
            raise _syntax("a text notification needs an @recipient")
        notify.text = remainder
        return notify
    _notify_key(notify, remainder, public_scope)
    return notify


def _notify_key(notify: Notify, remainder: str, public_scope: bool) -> None:
    """Fill key/value from ``<name>@<owner>[:<value>]`` (the value may hold ':' and '@')."""
    name, at, after = remainder.partition("@")
    if not at:
        raise _syntax("notify key needs an owner (<name>@<owner>)")
    if not name or name.startswith(":") or "::" in name:
        raise _syntax(f"bad notify key name {_show(name)}")
    owner, colon, value = after.partition(":")
    if colon and not value:
        raise _syntax("notify value after the key is empty")
    if public_scope:
        key = _key(f"public:{name}@{owner}")
    elif name.lower().startswith("public:"):
        key = _key(f"{name}@{owner}")            # "@bob:public:x@alice": public key for @bob
    else:
        key = _key(f"{notify.to}:{name}@{owner}")
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
            raise _syntax("notify:list expects [:<from date>][:<to date>][:<regex>]")
        result = NotifyList()
        if tokens and _DATE.fullmatch(tokens[0]):
            result.since = tokens.pop(0)
            if tokens and _DATE.fullmatch(tokens[0]):
                result.until = tokens.pop(0)
        if tokens:
            if len(tokens) != 1 or not tokens[0]:
                raise _syntax("notify:list: bad date or regex")
            result.regex = tokens[0]
        return result
    ident = _opts(rest, f"notify:{sub}")
    if sub == "remove":
        if not _WORD_ID.fullmatch(ident):
            raise _syntax(f"bad notification id {_show(ident)}")
        return NotifyRemove(ident)
    if any(c.isspace() for c in ident):
        raise _syntax(f"bad notification id {_show(ident)}")
    return NotifyStatus(ident) if sub == "status" else NotifyFetch(ident)


def _parse_monitor(rest: str) -> Monitor:
    opts, space, regex = rest.partition(" ")
    if space and not regex:
        raise _syntax("monitor: empty regex")
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
        monitor.epoch, i = _int(tokens[i], "monitor epoch", 0), i + 1
    if i != len(tokens):
        raise _syntax(f"unexpected monitor option {_show(tokens[i])}")
    return monitor


def _parse_noop(rest: str) -> Noop:
    return Noop(_int(_opts(rest, "noop"), "noop delay", 0))


def _parse_info(rest: str) -> Info:
    if rest and rest.lower() != ":brief":
        raise _syntax("info takes only :brief")
    return Info(brief=bool(rest))


def _parse_stats(rest: str) -> Stats:
    if not rest:
        return Stats()
    ids, colon, regex = _opts(rest, "stats").partition(":")
    if not _STATS_IDS.fullmatch(ids):
        raise _syntax(f"bad stats ids {_show(ids)}")
    if colon and (not regex or ids not in ("3", "15")):
        raise _syntax("stats takes a regex only after id 3 or 15")
    return Stats(ids, regex if colon else None)


def _parse_exit(rest: str) -> Exit:
    _no_args(rest, "@exit")
    return Exit()


_PARSERS = {
    "from": _parse_from, "cram": _parse_cram, "pol": _parse_pol, "pkam": _parse_pkam,
    "update": _parse_update, "llookup": _parse_llookup, "lookup": _parse_lookup,
    "plookup": _parse_plookup, "delete": _parse_delete, "scan": _parse_scan,
    "notify": _parse_notify, "monitor": _parse_monitor, "noop": _parse_noop,
    "info": _parse_info, "stats": _parse_stats, "@exit": _parse_exit,
}
# Real atProtocol verbs (at_server 3.0.52 and later) that this implementation does not serve.
_UNSUPPORTED = frozenset({"sync", "enroll", "keys", "otp", "totp", "batch", "stream", "config"})


def parse_command(line: str) -> Command:
    """Parse one command line (without its "\\n"); AtProtocolError / UnsupportedVerbError."""
    if not isinstance(line, str):
        raise AtProtocolError("a command must be text")
    text = line.strip()
    if not text:
        raise _syntax("empty command")
    if "\n" in text:
        raise _syntax("a command is one line")
    colon = text.find(":")
    head = text if colon < 0 else text[:colon]
    first_word = head.split(" ", 1)[0]
    if colon < 0 or (" " in head and first_word.lower() in _PARSERS):
        # "scan .*", "monitor a:b": the verb is the first word; the rest keeps its case
        verb, rest = first_word.lower(), text[len(first_word):]
    else:
        verb, rest = head.replace(" ", "").lower(), text[colon:]
    parser = _PARSERS.get(verb)
    if parser is not None:
        return parser(rest)
    if verb in _UNSUPPORTED:
        raise UnsupportedVerbError(f"the {verb} verb is not supported by this server")
    raise _syntax(f"unknown verb {_show(verb)}")


# ---- encoding -------------------------------------------------------------------------------

def _enc_from(cmd: From) -> str:
    line = f"from:{cmd.atsign}"
    if cmd.client_config is not None:
        try:
            text = json.dumps(cmd.client_config, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise AtProtocolError(f"clientConfig is not JSON-serialisable: {exc}") from None
        line += f":clientConfig:{text}"
    return line


def _enc_pkam(cmd: Pkam) -> str:
    line = "pkam"
    if cmd.signing_algo is not None:
        line += f":signingAlgo:{cmd.signing_algo}"
    if cmd.hashing_algo is not None:
        line += f":hashingAlgo:{cmd.hashing_algo}"
    if cmd.enrollment_id is not None:
        line += f":enrollmentId:{cmd.enrollment_id}"
    return f"{line}:{cmd.signature}"


def _enc_lookup(cmd: Lookup | PLookup) -> str:
    line = "plookup" if isinstance(cmd, PLookup) else "lookup"
    if cmd.bypass_cache is not None:
        line += f":bypassCache:{'true' if cmd.bypass_cache else 'false'}"
    if cmd.mode is not None:
        line += f":{cmd.mode}"
    return f"{line}:{cmd.entity}{cmd.owner}"


def _enc_scan(cmd: Scan) -> str:
    line = "scan"
    if cmd.show_hidden:
        line += ":showhidden:true"
    if cmd.for_atsign is not None:
        line += f":{cmd.for_atsign}"
    if cmd.page is not None:
        line += f":page:{cmd.page}"
    return line if cmd.regex is None else f"{line} {cmd.regex}"


def _enc_notify(cmd: Notify) -> str:
    parts = ["notify"]
    if cmd.id is not None:
        parts.append(f"id:{cmd.id}")
    parts.append(cmd.operation)
    for wire, value in (("messageType", cmd.message_type), ("priority", cmd.priority),
                        ("strategy", cmd.strategy), ("latestN", cmd.latest_n),
                        ("notifier", cmd.notifier), ("ttln", cmd.ttln)):
        if value is not None:
            parts.append(f"{wire}:{value}")
    line = ":".join(parts) + cmd.metadata.encode()
    key = cmd.key
    if cmd.text is not None:
        return f"{line}:{cmd.to}:{cmd.text}"
    if key is None:
        raise AtProtocolError("notify needs a key (or text for messageType:text)")
    owner = key.owner or ""
    if key.kind == "public":
        target = f"public:{key.entity}{owner}"
        if cmd.to is not None:
            target = f"{cmd.to}:{target}"
    else:
        target = f"{cmd.to}:{key.entity}{owner}"
    line = f"{line}:{target}"
    return line if cmd.value is None else f"{line}:{cmd.value}"


def _enc_notify_list(cmd: NotifyList) -> str:
    parts = ["notify:list"] + [p for p in (cmd.since, cmd.until, cmd.regex) if p is not None]
    return ":".join(parts)


def _enc_monitor(cmd: Monitor) -> str:
    line = "monitor"
    if cmd.strict:
        line += ":strict"
    if cmd.self_notifications:
        line += ":selfNotifications"
    if cmd.multiplexed:
        line += ":multiplexed"
    if cmd.epoch is not None:
        line += f":{cmd.epoch}"
    return line if cmd.regex is None else f"{line} {cmd.regex}"


def _enc_stats(cmd: Stats) -> str:
    line = "stats" if cmd.ids is None else f"stats:{cmd.ids}"
    return line if cmd.regex is None else f"{line}:{cmd.regex}"


_ENCODERS = {
    From: _enc_from,
    Cram: lambda c: f"cram:{c.digest}",
    Pol: lambda c: "pol",
    Pkam: _enc_pkam,
    Update: lambda c: f"update{c.metadata.encode()}:{c.key} {c.value}",
    UpdateMeta: lambda c: f"update:meta:{c.key}{c.metadata.encode()}",
    LLookup: lambda c: f"llookup{'' if c.mode is None else ':' + c.mode}:{c.key}",
    Lookup: _enc_lookup,
    PLookup: _enc_lookup,
    Delete: lambda c: f"delete{'' if c.priority is None else ':priority:' + c.priority}:{c.key}",
    Scan: _enc_scan,
    Notify: _enc_notify,
    NotifyStatus: lambda c: f"notify:status:{c.id}",
    NotifyList: _enc_notify_list,
    NotifyRemove: lambda c: f"notify:remove:{c.id}",
    NotifyFetch: lambda c: f"notify:fetch:{c.id}",
    Monitor: _enc_monitor,
    Noop: lambda c: f"noop:{c.millis}",
    Info: lambda c: "info:brief" if c.brief else "info",
    Stats: _enc_stats,
    Exit: lambda c: "@exit",
}


def encode_command(cmd: Command) -> str:
    """The wire line (no "\\n") for ``cmd``; AtProtocolError if no line would parse back to it."""
    encoder = _ENCODERS.get(type(cmd))
    if encoder is None:
        raise AtProtocolError(f"not a command: {type(cmd).__name__}")
    try:
        line = encoder(cmd)
    except (AttributeError, TypeError) as exc:      # a field of the wrong type
        raise AtProtocolError(f"malformed {type(cmd).__name__}: {exc}") from None
    # The self-check is what makes "client encodes, server parses" safe for free text (values,
    # regexes, ids): anything with a newline, trailing blanks, a stray ':' or an unencodable
    # character is refused here instead of being misread by the server.
    try:
        line.encode("utf-8")
        same = parse_command(line) == cmd
    except (AtProtocolError, UnicodeEncodeError) as exc:
        raise AtProtocolError(f"cannot encode {type(cmd).__name__}: {exc}") from None
    if not same:
        raise AtProtocolError(
            f"cannot encode {type(cmd).__name__} faithfully: {_show(line)} reads back differently")
    return line
