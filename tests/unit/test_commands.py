"""noports.at.commands: known-answer lines for every verb, error cases, encode/parse round trip.

Known-answer lines are derived from the spec (atprotocol.md §3, §4, §7.3), i.e. from what the
Dart server accepts and what atsdk/Dart/at_c clients send as recorded there -- not captured from
a running Atsign binary.  The hypothesis strategies at the bottom are reused by
tests/fuzz/test_fuzz_parsers.py.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from noports.at.command_types import (
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
from noports.at.commands import encode_command, parse_command
from noports.at.metadata import Metadata
from noports.at.names import AtKey
from noports.errors import AtProtocolError, UnsupportedVerbError

K = AtKey.parse
UUID = "0b7e8c3e-4c1d-4a5e-9f00-1234567890ab"
SIG = "QUJDREVGR0g+/0123456789abcdefghij=="


# ---- known answers: parse -------------------------------------------------------------------

PARSE_CASES = [
    # §3.1 from (atsdk with @, at_c without, Dart with clientConfig)
    ("from:@alice", From("@alice")),
    ("from:alice", From("@alice")),
    ('from:@alice:clientConfig:{"version":"3.10.0","clientId":"c1","platform":"linux"}',
     From("@alice", {"version": "3.10.0", "clientId": "c1", "platform": "linux"})),
    # §3.2 cram, §3.4 pol
    ("cram:" + "ab" * 64, Cram("ab" * 64)),
    ("pol", Pol()),
    # §3.3 pkam: legacy (atsdk), Dart, at_c
    (f"pkam:{SIG}", Pkam(SIG)),
    (f"pkam:signingAlgo:rsa2048:hashingAlgo:sha256:enrollmentId:{UUID}:{SIG}",
     Pkam(SIG, "rsa2048", "sha256", UUID)),
    (f"pkam:signingAlgo:rsa2048:hashingAlgo:sha256:{SIG}", Pkam(SIG, "rsa2048", "sha256")),
    (f"pkam:enrollmentId:{UUID}:{SIG}", Pkam(SIG, enrollment_id=UUID)),
    (f"pkam:hashingAlgo:sha512:{SIG}", Pkam(SIG, hashing_algo="sha512")),
    # §4.2 update (spec examples and the atsdk shapes of §7.3)
    ("update:public:location@alice Paris", Update(K("public:location@alice"), "Paris")),
    ("update:ttr:86400000:@bob:shared_key@alice QUJD",
     Update(K("@bob:shared_key@alice"), "QUJD", Metadata(ttr=86400000))),
    ("update:isEncrypted:true:ivNonce:aXY=:@bob:phone.wavi@alice Y2lwaGVy",
     Update(K("@bob:phone.wavi@alice"), "Y2lwaGVy", Metadata(is_encrypted=True, iv_nonce="aXY="))),
    ("update:privatekey:at_pkam_publickey TUlJQg==",
     Update(K("privatekey:at_pkam_publickey"), "TUlJQg==")),
    ("update:dataSignature:c2ln:public:name@alice some value",
     Update(K("public:name@alice"), "some value", Metadata(data_signature="c2ln"))),
    ("update:dataSignature:c2ln:isEncrypted:true:ivNonce:aXY=:name@alice Y2lw",
     Update(K("name@alice"), "Y2lw",
            Metadata(data_signature="c2ln", is_encrypted=True, iv_nonce="aXY="))),
    ("update:isEncrypted:false:public:publickey@alice TUlJ",
     Update(K("public:publickey@alice"), "TUlJ", Metadata(is_encrypted=False))),
    ("update:shared_key.bob@alice QUJD", Update(K("shared_key.bob@alice"), "QUJD")),
    # single space before the value: everything after it is the value
    ("update:public:x@alice  two  spaces", Update(K("public:x@alice"), " two  spaces")),
    ("update:public:x@alice a:b@c d", Update(K("public:x@alice"), "a:b@c d")),
    # <META> in any order (atsdk: sharedKeyEnc/pubKeyCS before isEncrypted, ccd as True, ttln)
    ("update:sharedKeyEnc:a2V5:pubKeyCS:0f0e:isEncrypted:true:ccd:True:ttr:-1:ttln:60000"
     ":@bob:x@alice v",
     Update(K("@bob:x@alice"), "v", Metadata(shared_key_enc="a2V5", pub_key_cs="0f0e",
                                             is_encrypted=True, ccd=True, ttr=-1))),
    # hash/algo (at_commons 5.0.1) and pubKeyHash/hashingAlgo (newer grammar)
    ("update:hash:abc:algo:sha256:public:x@alice v",
     Update(K("public:x@alice"), "v", Metadata(pub_key_hash="abc", hashing_algo="sha256"))),
    ("update:pubKeyHash:abc:hashingAlgo:sha512:public:x@alice v",
     Update(K("public:x@alice"), "v", Metadata(pub_key_hash="abc", hashing_algo="sha512"))),
    ("update:ttl:0:ttb:5:isBinary:false:encoding:base64:encKeyName:k:encAlgo:AES"
     ":skeEncKeyName:s:skeEncAlgo:RSA:sharedKeyStatus:ok:x@alice v",
     Update(K("x@alice"), "v", Metadata(ttl=0, ttb=5, is_binary=False, encoding="base64",
                                       enc_key_name="k", enc_algo="AES", ske_enc_key_name="s",
                                       ske_enc_algo="RSA", shared_key_status="ok"))),
    # a key named like a metadata field is still a key
    ("update:ttl@alice v", Update(K("ttl@alice"), "v")),
    ("update:meta:@bob:phone.wavi@alice:ttl:1000:isBinary:false",
     UpdateMeta(K("@bob:phone.wavi@alice"), Metadata(ttl=1000, is_binary=False))),
    ("update:meta:public:x@alice", UpdateMeta(K("public:x@alice"))),
    ("update:meta@alice value", Update(K("meta@alice"), "value")),
    # §4.3 llookup
    ("llookup:shared_key.bob@alice", LLookup(K("shared_key.bob@alice"))),
    ("llookup:@bob:shared_key@alice", LLookup(K("@bob:shared_key@alice"))),
    ("llookup:cached:public:publickey@bob", LLookup(K("cached:public:publickey@bob"))),
    ("llookup:all:@bob:x@alice", LLookup(K("@bob:x@alice"), "all")),
    ("llookup:meta:public:x@alice", LLookup(K("public:x@alice"), "meta")),
    # §4.4 / §4.5 lookup, plookup
    ("lookup:shared_key@bob", Lookup("shared_key", "@bob")),
    ("lookup:all:device.sshnp@bob", Lookup("device.sshnp", "@bob", "all")),
    ("lookup:bypassCache:true:all:x.wavi@bob", Lookup("x.wavi", "@bob", "all", True)),
    ("lookup:_6f1c9d@alice", Lookup("_6f1c9d", "@alice")),
    ("lookup:signing_publickey@alice", Lookup("signing_publickey", "@alice")),
    ("plookup:publickey@bob", PLookup("publickey", "@bob")),
    ("plookup:bypassCache:false:meta:publickey@bob", PLookup("publickey", "@bob", "meta", False)),
    ("plookup:all:x@bob", PLookup("x", "@bob", "all")),
    # §4.6 delete
    ("delete:public:x@alice", Delete(K("public:x@alice"))),
    ("delete:@bob:x@alice", Delete(K("@bob:x@alice"))),
    ("delete:priority:high:x@alice", Delete(K("x@alice"), "high")),
    ("delete:cached:@alice:x@bob", Delete(K("cached:@alice:x@bob"))),
    ("delete:privatekey:at_secret", Delete(K("privatekey:at_secret"))),
    # §4.7 scan (atsdk sends camel case showHidden)
    ("scan", Scan()),
    ("scan .*", Scan(".*")),
    ("scan:showHidden:true", Scan(show_hidden=True)),
    ("scan:showhidden:true device_info\\.x", Scan("device_info\\.x", show_hidden=True)),
    ("scan:@bob device_info\\.re\\.sshnp", Scan("device_info\\.re\\.sshnp", for_atsign="@bob")),
    ("scan:showhidden:false:@bob:page:2 x", Scan("x", False, "@bob", 2)),
    # §4.8 notify (atsdk, Dart, C shapes; public and text forms)
    (f"notify:id:{UUID}:update:isEncrypted:true:ivNonce:aXY=:@bob:name@alice:Y2lw",
     Notify(K("@bob:name@alice"), "Y2lw", UUID,
            metadata=Metadata(is_encrypted=True, iv_nonce="aXY="))),
    (f"notify:id:{UUID}:update:messageType:key:priority:low:strategy:all:latestN:1"
     ":notifier:SYSTEM:ttln:60000:ttl:10000:isEncrypted:true:sharedKeyEnc:a2V5"
     ":pubKeyCS:0f0e:ivNonce:aXY=:@bob:s1.dev.sshnp@alice:Y2lw",
     Notify(K("@bob:s1.dev.sshnp@alice"), "Y2lw", UUID, "update", "key", "low", "all", 1,
            "SYSTEM", 60000, Metadata(ttl=10000, is_encrypted=True, shared_key_enc="a2V5",
                                      pub_key_cs="0f0e", iv_nonce="aXY="))),
    (f"notify:id:{UUID}:update:ttln:60000:ttr:-1:ccd:true:@bob:x@alice:v",
     Notify(K("@bob:x@alice"), "v", UUID, ttln=60000, metadata=Metadata(ttr=-1, ccd=True))),
    # value = everything after the ':' that follows the owner
    ("notify:@bob:x@alice:a:b@c:d", Notify(K("@bob:x@alice"), "a:b@c:d")),
    ("notify:delete:@bob:x@alice", Notify(K("@bob:x@alice"), None, operation="delete")),
    ("notify:@bob:public:x@alice", Notify(K("public:x@alice"), None, to="@bob")),
    ("notify:public:x@alice:v", Notify(K("public:x@alice"), "v")),
    ("notify:@alice:x@alice:v", Notify(K("x@alice"), "v", to="@alice")),
    ("notify:messageType:text:@bob:hello there",
     Notify(None, None, message_type="text", to="@bob", text="hello there")),
    # atsdk's ttln among the metadata
    ("notify:id:abc:update:isEncrypted:true:ttln:5:@bob:x@alice:v",
     Notify(K("@bob:x@alice"), "v", "abc", ttln=5, metadata=Metadata(is_encrypted=True))),
    # §4.9
    (f"notify:status:{UUID}", NotifyStatus(UUID)),
    ("notify:list", NotifyList()),
    ("notify:list:2024-01-01:2024-02-01:.*", NotifyList("2024-01-01", "2024-02-01", ".*")),
    ("notify:list:sshnp", NotifyList(regex="sshnp")),
    (f"notify:remove:{UUID}", NotifyRemove(UUID)),
    (f"notify:fetch:{UUID}", NotifyFetch(UUID)),
    # §4.10 monitor (atsdk, Dart, at_c, end-to-end test forms)
    ("monitor:0 .*", Monitor(0, ".*")),
    ("monitor:selfNotifications:1700000000000 dev\\.sshnp@",
     Monitor(1700000000000, "dev\\.sshnp@", self_notifications=True)),
    ("monitor:selfNotifications", Monitor(self_notifications=True)),
    ("monitor dev.sshnp@", Monitor(regex="dev.sshnp@")),
    ("monitor", Monitor()),
    ("monitor:strict:1234 a b:c", Monitor(1234, "a b:c", strict=True)),
    ("monitor:strict:selfNotifications:multiplexed:5 .*",
     Monitor(5, ".*", True, True, True)),
    ("monitor:selfNotifications:disable:7", Monitor(7)),
    # §4.11
    ("noop:0", Noop(0)),
    ("noop:5000", Noop(5000)),
    ("info", Info()),
    ("info:brief", Info(True)),
    ("stats", Stats()),
    ("stats:3", Stats("3")),
    ("stats:1,2,3", Stats("1,2,3")),
    ("stats:15:.*sshnp", Stats("15", ".*sshnp")),
    # §2.3 framing
    ("@exit", Exit()),
]


@pytest.mark.parametrize(("line", "expected"), PARSE_CASES, ids=[c[0][:50] for c in PARSE_CASES])
def test_parse_known_answers(line, expected):
    """Derived from the spec: each documented client line parses to the expected command."""
    assert parse_command(line) == expected


@pytest.mark.parametrize(("line", "expected"), PARSE_CASES, ids=[c[0][:50] for c in PARSE_CASES])
def test_known_answers_round_trip(line, expected):
    """Derived from the spec: the encoding of each parsed command parses back to it."""
    assert parse_command(encode_command(expected)) == expected


@pytest.mark.parametrize(("line", "expected"), [
    ("SCAN", Scan()),
    ("Scan:ShowHidden:TRUE .*", Scan(".*", show_hidden=True)),
    ("Update:public:X@Alice Value", Update(K("public:x@alice"), "Value")),
    ("NOTIFY:ID:abc:UPDATE:ISENCRYPTED:TRUE:@Bob:Name@Alice:CaseKept",
     Notify(K("@bob:name@alice"), "CaseKept", "abc", metadata=Metadata(is_encrypted=True))),
    ("  noop:0  \r", Noop(0)),
    ("no op:0", Noop(0)),                          # the verb part loses its spaces
    ("LOOKUP:ALL:Key@BOB", Lookup("key", "@bob", "all")),
    ("MONITOR:0 MixedCase\\S", Monitor(0, "MixedCase\\S")),
])
def test_parse_case_and_whitespace(line, expected):
    """Derived from the spec (§2.3): verb lower-cased, grammars case-insensitive, line trimmed;
    free text (values, regexes) keeps its case, keys and atSigns are normalised."""
    assert parse_command(line) == expected


# ---- known answers: exact encodings ---------------------------------------------------------

ENCODE_CASES = [
    (Notify(K("@bob:name@alice"), "Y2lw", UUID,
            metadata=Metadata(is_encrypted=True, iv_nonce="aXY=")),
     f"notify:id:{UUID}:update:isEncrypted:true:ivNonce:aXY=:@bob:name@alice:Y2lw"),
    (Notify(K("@bob:s1.dev.sshnp@alice"), "Y2lw", UUID, "update", "key", "low", "all", 1,
            "SYSTEM", 60000, Metadata(ttl=10000, is_encrypted=True, shared_key_enc="a2V5",
                                      pub_key_cs="0f0e", iv_nonce="aXY=")),
     f"notify:id:{UUID}:update:messageType:key:priority:low:strategy:all:latestN:1"
     ":notifier:SYSTEM:ttln:60000:ttl:10000:isEncrypted:true:sharedKeyEnc:a2V5"
     ":pubKeyCS:0f0e:ivNonce:aXY=:@bob:s1.dev.sshnp@alice:Y2lw"),
    (Notify(K("public:x@alice"), None, to="@bob"), "notify:update:@bob:public:x@alice"),
    (Pkam(SIG, "rsa2048", "sha256", UUID),
     f"pkam:signingAlgo:rsa2048:hashingAlgo:sha256:enrollmentId:{UUID}:{SIG}"),
    (Pkam(SIG), f"pkam:{SIG}"),
    (Pkam(SIG, enrollment_id=UUID), f"pkam:enrollmentId:{UUID}:{SIG}"),
    (Monitor(0, ".*"), "monitor:0 .*"),
    (Monitor(123, "x", self_notifications=True), "monitor:selfNotifications:123 x"),
    (Monitor(regex="dev.sshnp@"), "monitor dev.sshnp@"),
    (Scan("x", show_hidden=True), "scan:showhidden:true x"),
    (Scan(for_atsign="@bob", regex="device_info"), "scan:@bob device_info"),
    (From("@alice"), "from:@alice"),
    (From("@alice", {"version": "3.10.0"}), 'from:@alice:clientConfig:{"version":"3.10.0"}'),
    (Update(K("@bob:shared_key@alice"), "QUJD", Metadata(ttr=86400000)),
     "update:ttr:86400000:@bob:shared_key@alice QUJD"),
    # metadata in the Dart server order whatever order the fields were set in
    (Update(K("x@alice"), "v", Metadata(iv_nonce="aXY=", is_encrypted=True, data_signature="c2ln",
                                       ccd=False, ttr=-1, ttb=2, ttl=1, pub_key_hash="h",
                                       hashing_algo="sha256", pub_key_cs="cs")),
     "update:ttl:1:ttb:2:ttr:-1:ccd:false:dataSignature:c2ln:isEncrypted:true:pubKeyCS:cs"
     ":pubKeyHash:h:hashingAlgo:sha256:ivNonce:aXY=:x@alice v"),
    (Update(K("privatekey:at_pkam_publickey"), "TUlJ"), "update:privatekey:at_pkam_publickey TUlJ"),
    (UpdateMeta(K("public:x@alice"), Metadata(ttl=5)), "update:meta:public:x@alice:ttl:5"),
    (LLookup(K("cached:public:publickey@bob")), "llookup:cached:public:publickey@bob"),
    (LLookup(K("x@alice"), "all"), "llookup:all:x@alice"),
    (Lookup("x", "bob", "all", True), "lookup:bypassCache:true:all:x@bob"),
    (PLookup("publickey", "@bob"), "plookup:publickey@bob"),
    (Delete(K("public:x@alice"), "low"), "delete:priority:low:public:x@alice"),
    (NotifyStatus(UUID), f"notify:status:{UUID}"),
    (NotifyRemove(UUID), f"notify:remove:{UUID}"),
    (NotifyList("2024-01-01", None, "x"), "notify:list:2024-01-01:x"),
    (Noop(0), "noop:0"),
    (Info(), "info"),
    (Info(True), "info:brief"),
    (Stats("3"), "stats:3"),
    (Cram("ab12"), "cram:ab12"),
    (Pol(), "pol"),
    (Exit(), "@exit"),
]


@pytest.mark.parametrize(("cmd", "line"), ENCODE_CASES, ids=[c[1][:50] for c in ENCODE_CASES])
def test_encode_known_answers(cmd, line):
    """Derived from the spec: the byte shapes atsdk/Dart send (§4.8, §3.3, §4.10, §7.3)."""
    assert encode_command(cmd) == line
    assert parse_command(line) == cmd


def test_constructors_normalise():
    """Commands built by callers compare equal to parsed ones (atSigns, enum words)."""
    assert Lookup("Key", "Bob") == Lookup("key", "@bob")
    assert Notify(K("@bob:x@alice"), "v").to == "@bob"
    assert Notify(K("x@alice"), "v").to == "@alice"
    assert Notify(K("public:x@alice"), "v").to is None
    assert Delete(K("x@alice"), "HIGH").priority == "high"
    assert Pkam("s", "RSA2048", "SHA256") == Pkam("s", "rsa2048", "sha256")
    assert Notify(K("@bob:x@alice"), "v").recipient == "@bob"


# ---- errors ---------------------------------------------------------------------------------

BAD_LINES = [
    "", "   ", "foo", "foo:bar", "hello world", "@exit:now", "pol:x", "info:full", "info:",
    "noop", "noop:", "noop:x", "noop:-1", "noop:1.5", "noop:١", "noop:99999999999999999999",
    "from", "from:", "from:@a@b", "from:@alice:clientConfig:[1]", "from:@alice:clientConfig:{x}",
    "from:@alice:other:{}", 'from:@alice:clientConfig:{"a":NaN}', "from:al ice",
    "cram", "cram:", "pkam", "pkam:", "pkam:a b", "pkam:signingAlgo:dsa:sig",
    "pkam:hashingAlgo:md5:sig", "pkam:enrollmentId:a b:sig", "pkam:x:y",
    "update", "update:x@alice", "update:x@alice ", "update:ttl:-1:x@alice v",
    "update:ttb:-5:x@alice v", "update:ttr:-2:x@alice v", "update:ttl:abc:x@alice v",
    "update:ttl:1:ttl:2:x@alice v", "update:hash:a:pubKeyHash:b:x@alice v",
    "update:ccd:maybe:x@alice v", "update:isEncrypted:yes:x@alice v",
    "update:ivNonce:a@b:x@alice v", "update:bogus:1:x@alice v", "update:cached:x@alice v",
    "update:private:x@alice v", "update:local:x@alice v", "update:privatekey:other v",
    "update:a:b:x@alice v", "update:meta:x", "update:meta:x@alice:ttl",
    "update:meta:x@alice:nope:1",
    "llookup", "llookup:x", "llookup:all:", "lookup", "lookup:x", "lookup:x@", "lookup:@bob",
    "lookup:a b@bob", "lookup:bypassCache:maybe:x@bob", "plookup:a@b@bob", "plookup:x@b:c",
    "delete", "delete:priority:urgent:x@alice", "delete:a:b:x@alice",
    "delete:privatekey:other", "delete:public:@bob:x@alice",
    "scan:", "scan:showhidden:maybe", "scan:page:x", "scan:bogus", "scan  two", "scan a b",
    "notify", "notify:", "notify:x@alice", "notify:@bob", "notify:@bob:", "notify:@bob:x",
    "notify:@bob:x@alice:", "notify:id:a b:@bob:x@alice", "notify:priority:urgent:@bob:x@alice",
    "notify:ttln:-1:@bob:x@alice", "notify:strategy:some:@bob:x@alice",
    "notify:messageType:voice:@bob:x@alice", "notify:latestN:x:@bob:x@alice",
    "notify:notifier:a b:@bob:x@alice", "notify:ttl:5:id:abc:@bob:x@alice",
    "notify:update:id:abc:@bob:x@alice", "notify:id:a:id:b:@bob:x@alice",
    "notify:ttln:1:ttln:2:@bob:x@alice", "notify:bogus:1:@bob:x@alice",
    "notify:@bob:cached:x@alice", "notify:@bob:private:x@alice", "notify:@bob:x::y@alice",
    "notify:messageType:text:public:hi", "notify:status:", "notify:status:a b",
    "notify:remove:a.b", "notify:fetch:", "notify:list:a:b:c:d", "notify:list::",
    "monitor:", "monitor:x", "monitor:-1", "monitor:0:1", "monitor:strict:strict",
    "stats:", "stats:0", "stats:a", "stats:1:.*", "stats:3:", "stats:1,x",
    "update:x@alice v\nnoop:0",
]


@pytest.mark.parametrize("line", BAD_LINES)
def test_bad_lines_raise_protocol_error(line):
    """Derived from the spec: grammar violations and bad numbers are AT0003 (or AT0016 for
    malformed keys), never another exception type."""
    with pytest.raises(AtProtocolError) as info:
        parse_command(line)
    assert not isinstance(info.value, UnsupportedVerbError)
    assert info.value.code in ("AT0003", "AT0016")


@pytest.mark.parametrize("line", [
    "sync:from:-1:limit:25", "sync:5", "enroll:request:{}", "keys:get:self", "otp:get",
    "batch:[]", "stream:init@bob", "config:block:show", "notify:all:@bob,@carol:x@alice",
    "update:json:{}", "totp:get",
])
def test_real_but_unsupported_verbs(line):
    """Derived from the spec (§3.5, §4.9, §4.11): real verbs we do not serve are named."""
    with pytest.raises(UnsupportedVerbError) as info:
        parse_command(line)
    assert info.value.code == "AT0003"
    verb = line.split(":")[0]
    assert verb in str(info.value)


def test_invalid_key_is_at0016():
    with pytest.raises(AtProtocolError) as info:
        parse_command("update:public:bad!name@alice v")
    assert info.value.code == "AT0016"


@pytest.mark.parametrize("cmd", [
    Update(K("x@alice"), "trailing space "),
    Update(K("x@alice"), "two\nlines"),
    Update(K("x@alice"), ""),
    Update(K("cached:public:x@bob"), "v"),
    Update(K("private:x@alice"), "v"),
    Update(K("x@alice"), "v", Metadata(iv_nonce="has:colon")),
    Update(K("x@alice"), "v", Metadata(ttl=-1)),
    Update(K("x@alice"), "\ud800"),
    Notify(K("@bob:x@alice"), ""),
    Notify(K("@bob:x@alice"), "v", to="@carol"),
    Notify(None, None),
    Notify(K("private:x@alice"), "v"),
    Notify(K("@bob:x@alice"), "v", id="not an id"),
    Lookup("all:x", "@bob"),
    Lookup("x", "not an atsign!"),
    Scan("has space"),
    Monitor(regex="trailing "),
    NotifyList(until="2024-01-01"),
    NotifyList(regex="2024-01-01"),
    Stats("1", ".*"),
    Pkam("sig", "dsa"),
    Noop(-1),
    From("@alice", {"x": float("nan")}),
    From("@alice", {"x": object()}),
    Update("x@alice", "v"),                       # a str where an AtKey belongs
    Update(K("x@alice"), "v", None),
])
def test_encode_refuses_what_would_not_read_back(cmd):
    """encode_command never emits a line the server would read differently."""
    with pytest.raises(AtProtocolError):
        encode_command(cmd)


def test_encode_rejects_non_commands():
    with pytest.raises(AtProtocolError):
        encode_command("noop:0")


# ---- hypothesis strategies (also used by tests/fuzz/test_fuzz_parsers.py) ------------------

_LOWER = "abcdefghijklmnopqrstuvwxyz0123456789_"
atsigns = st.one_of(
    st.text(_LOWER, min_size=1, max_size=12),
    st.sampled_from(["alice🛠", "bob", "colin-x", "ünï"]),
).map(lambda s: "@" + s)
entities = st.builds(
    lambda a, b: a + b, st.text(_LOWER, min_size=1, max_size=10),
    st.sampled_from(["", ".wavi", ".sshnp", ".dev.sshnp", "-1", "'x"]))
b64 = st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/",
              min_size=1, max_size=24).map(lambda s: s + "=" * (-len(s) % 4))
ids = st.one_of(st.uuids().map(str), st.text(_LOWER + "-", min_size=1, max_size=12))
# Free text for values: anything encodable except a newline, not ending in whitespace.
free_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\n"),
                    min_size=1, max_size=40).filter(lambda s: s == s.rstrip())
no_space_text = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1,
                        max_size=20).filter(lambda s: not any(c.isspace() for c in s))
meta_values = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters=":@"),
                      min_size=1, max_size=16).filter(lambda s: not any(c.isspace() for c in s))
ints64 = st.integers(0, 2**62)


def _opt(strategy):
    return st.one_of(st.none(), strategy)


_META_STRATEGIES = {
    "ttl": ints64, "ttb": ints64, "ttr": st.integers(-1, 2**62), "ccd": st.booleans(),
    "is_binary": st.booleans(), "is_encrypted": st.booleans(), "data_signature": b64,
    "shared_key_status": meta_values, "shared_key_enc": b64, "pub_key_cs": meta_values,
    "encoding": meta_values, "enc_key_name": meta_values, "enc_algo": meta_values,
    "iv_nonce": b64, "ske_enc_key_name": meta_values, "ske_enc_algo": meta_values,
    "pub_key_hash": meta_values, "hashing_algo": meta_values,
}


@st.composite
def _metadata(draw) -> Metadata:
    # A few fields at a time: cheaper to generate than 18 optional draws, same coverage.
    names = draw(st.sets(st.sampled_from(sorted(_META_STRATEGIES)), max_size=6))
    return Metadata(**{name: draw(_META_STRATEGIES[name]) for name in names})


metadata = _metadata()

public_keys = st.builds(lambda e, o: AtKey(e, o, "public"), entities, atsigns)
shared_keys = st.builds(lambda e, o, w: AtKey(e, o, "shared", w), entities, atsigns, atsigns)
self_keys = st.builds(lambda e, o: AtKey(e, o, "self"), entities, atsigns)
cached_keys = st.builds(lambda k: AtKey(k.entity, k.owner, k.kind, k.shared_with, True),
                        st.one_of(public_keys, shared_keys).filter(lambda k: k.kind != "self"))
other_keys = st.builds(lambda e, o, kind: AtKey(e, o, kind), entities, atsigns,
                       st.sampled_from(["private", "local", "privatekey"]))
updatable_keys = st.one_of(public_keys, shared_keys, self_keys,
                           st.just(AtKey("at_pkam_publickey", None, "privatekey")))

notifies = st.one_of(
    st.builds(Notify, key=st.one_of(shared_keys, self_keys), value=_opt(free_text),
              id=_opt(ids), operation=st.sampled_from(["update", "delete"]),
              message_type=_opt(st.just("key")),
              priority=_opt(st.sampled_from(["low", "medium", "high"])),
              strategy=_opt(st.sampled_from(["all", "latest"])), latest_n=_opt(ints64),
              notifier=_opt(st.sampled_from(["SYSTEM", "noports", "@alice", "a.b-c"])),
              ttln=_opt(ints64), metadata=metadata),
    st.builds(Notify, key=public_keys, value=_opt(free_text), id=_opt(ids),
              to=_opt(atsigns), metadata=metadata),
    st.builds(lambda to, text, i: Notify(None, None, i, message_type="text", to=to, text=text),
              atsigns, free_text, _opt(ids)),
)

dates = st.dates().map(lambda d: f"{d.year:04d}-{d.month:02d}-{d.day:02d}").filter(
    lambda s: len(s) == 10)
json_values = st.one_of(st.text(max_size=10), st.integers(-10**6, 10**6), st.booleans(),
                        st.none())

commands = st.one_of(
    st.builds(From, atsigns, _opt(st.dictionaries(st.text(max_size=8), json_values,
                                                  max_size=4))),
    st.builds(Cram, no_space_text),
    st.just(Pol()),
    st.builds(Pkam, b64, _opt(st.sampled_from(["rsa2048", "ecc_secp256r1"])),
              _opt(st.sampled_from(["sha256", "sha512"])), _opt(ids)),
    st.builds(Update, updatable_keys, free_text.filter(lambda s: s[0] != "\n"), metadata),
    st.builds(UpdateMeta, st.one_of(public_keys, shared_keys, self_keys), metadata),
    st.builds(LLookup, st.one_of(public_keys, shared_keys, self_keys, cached_keys, other_keys
                                 ).filter(lambda k: k.owner is not None),
              _opt(st.sampled_from(["meta", "all"]))),
    st.builds(Lookup, entities, atsigns, _opt(st.sampled_from(["meta", "all"])),
              _opt(st.booleans())),
    st.builds(PLookup, entities, atsigns, _opt(st.sampled_from(["meta", "all"])),
              _opt(st.booleans())),
    st.builds(Delete, st.one_of(public_keys, shared_keys, self_keys, cached_keys,
                                st.just(AtKey("at_secret", None, "privatekey"))),
              _opt(st.sampled_from(["low", "medium", "high"]))),
    st.builds(Scan, _opt(no_space_text), st.booleans(), _opt(atsigns), _opt(ints64)),
    notifies,
    st.builds(NotifyStatus, ids), st.builds(NotifyRemove, ids), st.builds(NotifyFetch, ids),
    st.builds(NotifyList, dates, _opt(dates), _opt(st.text("abc.*+?^$", min_size=1))).filter(
        lambda c: c.since is not None or c.until is None),
    st.builds(NotifyList, st.none(), st.none(), _opt(st.text("abc.*+?^$", min_size=1))),
    st.builds(Monitor, _opt(ints64), _opt(free_text), st.booleans(), st.booleans(),
              st.booleans()),
    st.builds(Noop, st.integers(0, 10**6)),
    st.builds(Info, st.booleans()),
    st.one_of(st.builds(Stats, st.sampled_from(["3", "15"]), _opt(free_text)),
              st.builds(Stats, st.sampled_from([None, "1", "1,2,3", "7,0"]))),
    st.just(Exit()),
)


@settings(max_examples=300, deadline=None)
@given(commands)
def test_round_trip_property(cmd):
    """Any command encodes to one line that parses back to an equal command."""
    line = encode_command(cmd)
    assert "\n" not in line
    assert parse_command(line) == cmd
    line.encode("utf-8")


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_garbage_lines_only_raise_protocol_error(text):
    """Any text either parses (and then round-trips) or raises AtProtocolError."""
    try:
        cmd = parse_command(text)
    except AtProtocolError:
        return
    assert parse_command(encode_command(cmd)) == cmd
