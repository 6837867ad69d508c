"""The notify fast path, Metadata.encode and the name caches give what the general code gives.

The fast paths in noports.at.notify_fast / metadata / names (performance work for issue 3) must
be invisible: for every line, the fast notify parser either declines (None) or returns exactly the
general parser's command, and parse_command's answer -- command or error, with its code and
message -- is the general parser's.  Lines are generated around the shape AtClient.notify
writes, with mutations that leave the fast shape in every direction.
"""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from noports.at import metadata, names, notify_fast
from noports.at.command_types import Notify
from noports.at.commands import encode_command, parse_command
from noports.at.grammar import parse_notify_general
from noports.at.metadata import Metadata
from noports.at.names import AtKey, normalize_atsign
from noports.errors import AtProtocolError, InvalidAtSignError, InvalidKeyError

_SKE = "Qk9C" * 85 + "QQ=="          # base64, like a real sharedKeyEnc (344 characters)


def _general(line: str):
    """parse_command with the notify fast path switched off: (command, None) or (None, err)."""
    saved = notify_fast._fast_notify
    notify_fast._fast_notify = lambda rest: None
    try:
        return parse_command(line), None
    except AtProtocolError as exc:
        return None, (type(exc), exc.code, str(exc))
    finally:
        notify_fast._fast_notify = saved


def _actual(line: str):
    try:
        return parse_command(line), None
    except AtProtocolError as exc:
        return None, (type(exc), exc.code, str(exc))


def _same(line: str) -> None:
    got, want = _actual(line), _general(line)
    assert got == want, line
    if got[0] is not None:
        assert got[0].metadata == want[0].metadata
        fast = notify_fast._fast_notify(line.strip()[6:]) if line.strip().startswith(
            "notify:id:") else None
        if fast is not None:
            assert fast == want[0]


# ---- the shape our client writes -------------------------------------------------------------

_meta_pairs = st.lists(st.sampled_from([
    ("isEncrypted", "true"), ("isEncrypted", "false"), ("isEncrypted", "TRUE"),
    ("isEncrypted", "maybe"), ("sharedKeyEnc", _SKE), ("pubKeyCS", "0123456789abcdef" * 2),
    ("ivNonce", "AAAAAAAAAAAAAAAAAAAAAA=="), ("ttr", "-1"), ("ttr", "-2"), ("ttl", "5000"),
    ("ttl", "x"), ("ccd", "true"), ("encoding", "base64"), ("encKeyName", "k.n-1_2"),
    ("dataSignature", "a+b/c="), ("ivNonce", "a@b"), ("ivNonce", "a b"), ("ivNonce", "é"),
    ("ivNonce", "null"), ("ISENCRYPTED", "true"), ("ttln", "10"), ("hash", "x"),
    ("unknown", "1"), ("pubKeyHash", "abc"), ("hashingAlgo", "sha256"),
]), max_size=6)

_recipients = st.sampled_from(["@bob", "@alice", "@BOB", "@b0b_x-1", "public", "@", "@bo b",
                               "@" + "a" * 55, "@" + "a" * 56, "@émile", "bob"])
_names = st.sampled_from(["rate.bench", "ping.dev.sshnp", "x", "a:b", "A.B", "_hidden.x",
                          "public:x", "cached:x", "shared_key", "'quo\"te*", "é.x", "a b", "",
                          "n" * 240])
_owners = st.sampled_from(["@alice", "@bob", "@ALICE", "@al@ice", "@", "", "@" + "o" * 56])
_values = st.one_of(st.none(), st.sampled_from(["", "v", "a:b@c d", "  padded  ", "x" * 300]),
                    st.text(max_size=40))
_opts = st.lists(st.sampled_from([
    "messageType:key", "messageType:text", "priority:low", "priority:HIGH", "strategy:all",
    "strategy:latest", "latestN:3", "latestN:x", "notifier:SYSTEM", "notifier:a@b",
    "ttln:60000", "ttln:-1", "ttln:0", "ttln:1" + "0" * 20, "id:again"]), max_size=3)


@settings(max_examples=1500, deadline=None)
@given(nid=st.sampled_from([str(uuid.UUID(int=7)), "abc_DEF-1", "a b", "", "update"]),
       op=st.sampled_from(["update", "delete", "UPDATE", "remove", ""]), opts=_opts,
       meta=_meta_pairs, to=_recipients, name=_names, owner=_owners, value=_values,
       pad=st.sampled_from(["", " ", "\t"]))
def test_notify_lines_parse_as_the_general_parser_does(nid, op, opts, meta, to, name, owner,
                                                       value, pad):
    parts = ["notify", f"id:{nid}"] + ([op] if op else []) + opts
    parts += [f"{k}:{v}" for k, v in meta]
    line = ":".join(parts) + f":{to}:{name}{owner}" + ("" if value is None else f":{value}")
    _same(pad + line + pad)


@settings(max_examples=300, deadline=None)
@given(ttln=st.none() | st.integers(0, 10**12), ttl=st.none() | st.integers(0, 10**9),
       ttr=st.none() | st.integers(-1, 10**9), ccd=st.none() | st.booleans(),
       entity=st.from_regex(r"[a-z0-9_][a-z0-9_.\-]{0,40}", fullmatch=True),
       to=st.sampled_from(["@bob", "@alice"]), op=st.sampled_from(["update", "delete"]),
       value=st.none() | st.text(min_size=1, max_size=60).filter(lambda v: "\n" not in v))
def test_client_lines_take_the_fast_path(ttln, ttl, ttr, ccd, entity, to, op, value):
    """Everything AtClient.notify's hot path writes is parsed by the fast path."""
    key = AtKey(entity=entity, owner="@alice", kind="shared", shared_with=to)
    md = Metadata(ttl=ttl, ttr=ttr, ccd=ccd, is_encrypted=True, iv_nonce="AAAAAAAAAAAAAAAAAAAAAA==",
                  shared_key_enc=_SKE, pub_key_cs="0123456789abcdef" * 2)
    if value is not None and value != value.strip():
        value = "x" + value.strip() + "x"           # the line is stripped as a whole
    cmd = Notify(key, value, id=str(uuid.uuid4()), operation=op, ttln=ttln, metadata=md)
    line = encode_command(cmd)
    fast = notify_fast._fast_notify(line[6:])
    assert fast is not None, line
    assert fast == cmd == parse_notify_general(line[6:])
    _same(line)


@pytest.mark.parametrize("line", [
    "notify:id:1:update:@bob:x@alice:v",
    "notify:id:1:update:isEncrypted:true:isEncrypted:true:@bob:x@alice:v",   # twice: error
    "notify:id:1:update:isEncrypted:true:isEncrypted:false:@bob:x@alice:v",
    "notify:id:1:update:ttr:5:ttr:6:@bob:x@alice:v",
    "notify:id:1:update:ivNonce:AA==:ivNonce:AA==:@bob:x@alice:v",
    "notify:id:1:update:@bob:x@alice:",                 # empty value: error
    "notify:id:1:update:@bob:x@alice",                  # no value
    "notify:id:1:update:@alice:x@alice:v",              # self notification
    "notify:id:1:update:@bob:x@bob:v",                  # recipient's own key: AT0016?
    "notify:id:1:update:@bob:" + "n" * 300 + "@alice:v",  # key too long: AT0016
    "notify:id:1:update:ttln:60000:@bob:x@alice:v:w@x y",
    "notify:id:1:delete:@bob:x@alice",
    "notify:id:1:update:messageType:key:priority:low:strategy:latest:latestN:2:notifier:S"
    ":ttln:5:isEncrypted:false:@bob:x@alice:v",
])
def test_edge_lines(line):
    _same(line)


def test_fast_path_errors_come_from_the_general_parser():
    with pytest.raises(AtProtocolError) as fast:
        parse_command("notify:id:1:update:isEncrypted:true:isEncrypted:true:@bob:x@alice:v")
    with pytest.raises(AtProtocolError) as general:
        parse_notify_general(
            ":id:1:update:isEncrypted:true:isEncrypted:true:@bob:x@alice:v")
    assert str(fast.value) == str(general.value) and "twice" in str(fast.value)


# ---- Metadata.encode -----------------------------------------------------------------------

def _reference_encode(md: Metadata) -> str:
    parts = []
    for attr, wire, kind in metadata.META_FIELDS:
        value = getattr(md, attr)
        if value is None:
            continue
        if kind is bool:
            value = "true" if value else "false"
        parts.append(f":{wire}:{value}")
    return "".join(parts)


@given(st.builds(Metadata, ttl=st.none() | st.integers(0, 10**9),
                 ttr=st.none() | st.integers(-1, 10), ccd=st.none() | st.booleans(),
                 is_binary=st.none() | st.booleans(), is_encrypted=st.none() | st.booleans(),
                 data_signature=st.none() | st.text("ab+/=", min_size=1, max_size=8),
                 iv_nonce=st.none() | st.text("AB=", min_size=1, max_size=8),
                 pub_key_hash=st.none() | st.just("h"), hashing_algo=st.none() | st.just("a"),
                 ske_enc_algo=st.none() | st.just("rsa")))
def test_metadata_encode_matches_reference(md):
    assert md.encode() == _reference_encode(md)


def test_metadata_encode_on_a_subclass_uses_its_attributes():
    class Tweaked(Metadata):
        @property
        def ttl(self):
            return 7

        @ttl.setter
        def ttl(self, value):
            pass

    md = Tweaked(is_encrypted=True)
    assert md.encode() == ":ttl:7:isEncrypted:true" == _reference_encode(md)


# ---- names: fast ASCII checks and caches ---------------------------------------------------

def _reference_atsign(text: str) -> str:
    body = text.strip().lower()
    body = body[1:] if body.startswith("@") else body
    if not body or len(body) > names.MAX_ATSIGN_LENGTH:
        raise InvalidAtSignError("length")
    for ch in body:
        if names._char_problem(ch, names._ATSIGN_ASCII_EXTRA) is not None:
            raise InvalidAtSignError(ch)
    return "@" + body


@settings(max_examples=800)
@given(st.text(alphabet=st.sampled_from("aZ09_-.:@ \t'*\"é🦄\u200b\x00K"), max_size=12))
def test_normalize_atsign_matches_per_character_rules(text):
    try:
        want = _reference_atsign(text)
    except InvalidAtSignError:
        want = None
    for _ in range(2):                      # second round: from the cache
        try:
            got = normalize_atsign(text)
        except InvalidAtSignError:
            got = None
        assert got == want


def _reference_entity_problem(entity: str) -> str | None:
    for ch in entity:
        problem = names._char_problem(ch, names._ENTITY_ASCII_EXTRA)
        if problem is not None:
            return problem
    return None


@settings(max_examples=800)
@given(st.text(alphabet=st.sampled_from("ab.-_'*\"@:Zé🦄\u200b \x00/K"), min_size=1, max_size=10))
def test_atkey_entity_fast_check_matches_per_character_rules(entity):
    want = _reference_entity_problem(entity)
    if want is None:
        names._check_entity(entity)
    else:
        with pytest.raises(InvalidKeyError) as err:
            names._check_entity(entity)
        assert want in str(err.value)
    text = f"@bob:{entity}@alice"
    try:
        uncached = AtKey._parse(text)
    except InvalidKeyError as exc:
        uncached = str(exc)
    for _ in range(2):                      # second round: from the cache
        try:
            got = AtKey.parse(text)
        except InvalidKeyError as exc:
            got = str(exc)
        assert got == uncached


def test_caches_are_bounded():
    for i in range(names._CACHE_MAX + 10):
        normalize_atsign(f"@user{i}")
        AtKey.parse(f"k{i}.ns@alice")
    assert len(names._atsign_cache) <= names._CACHE_MAX
    assert len(names._key_cache) <= names._CACHE_MAX
    long_text = " " * 400 + "@alice"
    assert normalize_atsign(long_text) == "@alice"
    assert long_text not in names._atsign_cache       # long texts are not kept


def test_cached_key_is_an_equal_immutable_value():
    a = AtKey.parse("@bob:ping.dev.sshnp@alice")
    b = AtKey.parse("@bob:ping.dev.sshnp@alice")
    assert a == b and hash(a) == hash(b)
    with pytest.raises(AttributeError):
        a.entity = "changed"                         # frozen: sharing it is safe
