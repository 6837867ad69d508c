"""atSigns, device names and atKeys (noports.at.names); rules derived from the spec
(atprotocol.md §3.1, §4.1; noports-protocol.md §2.2)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from noports.at.names import (
    MAX_CACHED_KEY_LENGTH,
    MAX_KEY_LENGTH,
    AtKey,
    bare_atsign,
    normalize_atsign,
    snakify_device,
    validate_device_name,
)
from noports.errors import InvalidAtSignError, InvalidDeviceNameError, InvalidKeyError

# --- atSigns ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("@alice", "@alice"),
    ("alice", "@alice"),
    (" Alice ", "@alice"),
    ("@ALICE_bob-7", "@alice_bob-7"),
    ("\t@Bob\n", "@bob"),
    ("@🦄unicorn", "@🦄unicorn"),
    ("🐘", "@🐘"),
    ("@" + "a" * 55, "@" + "a" * 55),
    ("ÉLAN", "@élan"),
])
def test_normalize_atsign_accepts(text, expected):
    assert normalize_atsign(text) == expected


@pytest.mark.parametrize(("text", "why"), [
    ("", "empty"),
    ("@", "empty"),
    ("   ", "empty"),
    ("@@alice", "'@'"),
    ("al@ice", "'@'"),
    ("@al:ice", "':'"),
    ("@al ice", "whitespace"),
    ("@al\tice", "whitespace"),
    ("@al\x00ice", "'\\x00'"),
    ("@al/ice", "'/'"),
    ("@al\u200bice", "U+200B"),
    ("@" + "a" * 56, "too long"),
])
def test_normalize_atsign_rejects_with_clear_message(text, why):
    with pytest.raises(InvalidAtSignError) as err:
        normalize_atsign(text)
    assert why in str(err.value)


def test_normalize_atsign_rejects_non_string():
    with pytest.raises(InvalidAtSignError):
        normalize_atsign(None)  # type: ignore[arg-type]


def test_invalid_atsign_error_is_a_value_error():
    with pytest.raises(ValueError):
        normalize_atsign("@a b")


@pytest.mark.parametrize(("text", "expected"), [("@Alice", "alice"), ("bob", "bob"),
                                                ("@🦄", "🦄")])
def test_bare_atsign(text, expected):
    assert bare_atsign(text) == expected


@given(st.text(max_size=70))
def test_normalize_atsign_is_idempotent_or_rejects(text):
    try:
        once = normalize_atsign(text)
    except InvalidAtSignError:
        return
    assert once.startswith("@") and once == once.lower()
    assert 2 <= len(once) <= 56
    assert normalize_atsign(once) == once
    assert ":" not in once and "@" not in once[1:]


# --- device names -----------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "expected"), [
    ("My Device", "my_device"),
    ("a  b\t\tc", "a_b_c"),
    ("UPPER", "upper"),
    ("plain", "plain"),
])
def test_snakify_device(name, expected):
    assert snakify_device(name) == expected


@pytest.mark.parametrize(("name", "expected"), [
    ("default", "default"),
    ("My Pi 4", "my_pi_4"),
    ("ab", "ab"),
    ("_x", "_x"),
    ("0-a", "0-a"),
    ("rpi-kitchen", "rpi-kitchen"),
    ("a" * 36, "a" * 36),
])
def test_validate_device_name_accepts(name, expected):
    assert validate_device_name(name) == expected


@pytest.mark.parametrize("name", ["", "a", "a" * 37, "-abc", "dev.ice", "dev/ice", "dévice",
                                  "dev@ice", "x:y"])
def test_validate_device_name_rejects(name):
    with pytest.raises(InvalidDeviceNameError) as err:
        validate_device_name(name)
    assert repr(name) in str(err.value)


# --- atKeys -----------------------------------------------------------------------------------

PARSE_CASES = [
    # text, entity, owner, kind, shared_with, cached, canonical
    ("public:phone.wavi@alice", "phone.wavi", "@alice", "public", None, False,
     "public:phone.wavi@alice"),
    ("@bob:phone.wavi@alice", "phone.wavi", "@alice", "shared", "@bob", False,
     "@bob:phone.wavi@alice"),
    ("phone.wavi@alice", "phone.wavi", "@alice", "self", None, False, "phone.wavi@alice"),
    ("@alice:phone.wavi@alice", "phone.wavi", "@alice", "self", None, False,
     "phone.wavi@alice"),
    ("private:x@alice", "x", "@alice", "private", None, False, "private:x@alice"),
    ("privatekey:at_pkam_publickey", "at_pkam_publickey", None, "privatekey", None, False,
     "privatekey:at_pkam_publickey"),
    ("privatekey:at_secret", "at_secret", None, "privatekey", None, False,
     "privatekey:at_secret"),
    ("privatekey:self_encryption_key@alice", "self_encryption_key", "@alice", "privatekey", None,
     False, "privatekey:self_encryption_key@alice"),
    ("local:lastsync@alice", "lastsync", "@alice", "local", None, False, "local:lastsync@alice"),
    ("cached:@bob:shared_key@alice", "shared_key", "@alice", "shared", "@bob", True,
     "cached:@bob:shared_key@alice"),
    ("cached:public:publickey@alice", "publickey", "@alice", "public", None, True,
     "cached:public:publickey@alice"),
    ("public:_hidden.ns@alice", "_hidden.ns", "@alice", "public", None, False,
     "public:_hidden.ns@alice"),
    ("_latestnotificationid.sshnp@alice", "_latestnotificationid.sshnp", "@alice", "self", None,
     False, "_latestnotificationid.sshnp@alice"),
    ("PUBLIC:Phone.WAVI@Alice", "phone.wavi", "@alice", "public", None, False,
     "public:phone.wavi@alice"),
    ("  @Bob:X@Alice \n", "x", "@alice", "shared", "@bob", False, "@bob:x@alice"),
    ("@bob:device_info.my_pi.sshnp@alice", "device_info.my_pi.sshnp", "@alice", "shared", "@bob",
     False, "@bob:device_info.my_pi.sshnp@alice"),
    ("public:🦄.emoji@🐘", "🦄.emoji", "@🐘", "public", None, False, "public:🦄.emoji@🐘"),
    ("shared_key.bob@alice", "shared_key.bob", "@alice", "self", None, False,
     "shared_key.bob@alice"),
    ("public:it's*\"q\"-1@alice", "it's*\"q\"-1", "@alice", "public", None, False,
     "public:it's*\"q\"-1@alice"),
]


@pytest.mark.parametrize(("text", "entity", "owner", "kind", "shared_with", "cached", "canonical"),
                         PARSE_CASES)
def test_atkey_parse_and_format(text, entity, owner, kind, shared_with, cached, canonical):
    key = AtKey.parse(text)
    assert (key.entity, key.owner, key.kind, key.shared_with, key.cached) == (
        entity, owner, kind, shared_with, cached)
    assert str(key) == canonical
    assert AtKey.parse(str(key)) == key


@pytest.mark.parametrize(("text", "why"), [
    ("", "empty"),
    ("   ", "empty"),
    ("phone", "no owner"),
    ("public:phone", "no owner"),
    ("local:x", "no owner"),
    ("@bob", "no ':'"),
    ("@bob phone@alice", "no ':'"),
    ("phone@", "empty atSign"),
    ("@:x@alice", "empty atSign"),
    ("@phone", "no ':'"),
    ("x@alice@bob", "more than one '@'"),
    ("public:@bob:x@alice", "more than one '@'"),
    ("@bob:@carol:x@alice", "more than one '@'"),
    ("x:y@alice", "':'"),
    ("a b@alice", "whitespace"),
    ("public:@alice", "empty"),
    ("cached:x@alice", "cached: applies only"),
    ("cached:private:x@alice", "cached: applies only"),
    ("cached:local:x@alice", "cached: applies only"),
    ("cached:privatekey:x", "cached: applies only"),
    ("x@al ice", "whitespace"),
    ("x@a/b", "'/'"),
    ("pub/lic:x@alice", "'/'"),
])
def test_atkey_parse_rejects_with_clear_message(text, why):
    with pytest.raises(InvalidKeyError) as err:
        AtKey.parse(text)
    assert why in str(err.value)


def test_atkey_parse_rejects_non_string():
    with pytest.raises(InvalidKeyError):
        AtKey.parse(b"x@alice")  # type: ignore[arg-type]


def test_atkey_length_cap_248_for_plain_keys():
    owner = "@alice"
    fits = "a" * (MAX_KEY_LENGTH - len("public:") - len(owner))
    assert len(str(AtKey.parse(f"public:{fits}{owner}"))) == MAX_KEY_LENGTH
    with pytest.raises(InvalidKeyError) as err:
        AtKey.parse(f"public:{fits}a{owner}")
    assert "too long" in str(err.value) and str(MAX_KEY_LENGTH) in str(err.value)


def test_atkey_length_cap_255_for_cached_keys():
    owner = "@alice"
    prefix = "cached:public:"
    fits = "a" * (MAX_CACHED_KEY_LENGTH - len(prefix) - len(owner))
    assert len(str(AtKey.parse(f"{prefix}{fits}{owner}"))) == MAX_CACHED_KEY_LENGTH
    with pytest.raises(InvalidKeyError, match="too long"):
        AtKey.parse(f"{prefix}{fits}a{owner}")
    # The same entity is too long without "cached:" (it would be 248 + 7 - 7 + ... > 248).
    with pytest.raises(InvalidKeyError, match="too long"):
        AtKey.parse(f"public:{fits}a{owner}")


def test_atkey_length_is_measured_on_the_canonical_form():
    # "@alice:" normalises away, so a self key written in the long form may fit.
    entity = "a" * (MAX_KEY_LENGTH - len("@alice"))
    key = AtKey.parse(f"@alice:{entity}@alice")
    assert key.kind == "self" and len(str(key)) == MAX_KEY_LENGTH


@pytest.mark.parametrize(("text", "namespace", "hidden"), [
    ("public:phone.wavi@alice", "wavi", False),
    ("@bob:device_info.pi.sshnp@alice", "sshnp", False),
    ("shared_key@alice", None, False),
    ("_x@alice", None, True),
    ("public:__x.ns@alice", "ns", True),
    ("trailing.@alice", None, False),
    ("privatekey:at_pkam_publickey", None, False),
])
def test_atkey_namespace_and_hidden(text, namespace, hidden):
    key = AtKey.parse(text)
    assert key.namespace == namespace
    assert key.hidden is hidden


def test_atkey_direct_construction_normalises():
    key = AtKey("Phone.Wavi", "Alice", "shared", "BOB")
    assert key == AtKey.parse("@bob:phone.wavi@alice")
    assert str(key) == "@bob:phone.wavi@alice"
    self_key = AtKey("x", "@alice", "shared", "@Alice")
    assert self_key.kind == "self" and self_key.shared_with is None
    assert str(self_key) == "x@alice"


@pytest.mark.parametrize(("args", "why"), [
    (("x", "@alice", "weird"), "unknown atKey kind"),
    (("x", "@alice", "shared"), "sharedWith"),
    (("x", "@alice", "public", "@bob"), "cannot have a sharedWith"),
    (("x", None, "public"), "needs an owner"),
    (("x", "@alice", "self", None, True), "cached: applies only"),
    (("", "@alice", "self"), "empty"),
    ((7, "@alice", "self"), "must be a string"),
])
def test_atkey_direct_construction_validates(args, why):
    with pytest.raises(InvalidKeyError) as err:
        AtKey(*args)
    assert why in str(err.value)


def test_atkey_is_frozen_and_hashable():
    key = AtKey.parse("public:x@alice")
    assert {key: 1}[AtKey.parse("PUBLIC:X@ALICE")] == 1
    with pytest.raises(AttributeError):
        key.entity = "y"  # type: ignore[misc]


def test_atkey_error_for_huge_input_is_short():
    with pytest.raises(InvalidKeyError) as err:
        AtKey.parse("x" * 100_000)
    assert len(str(err.value)) < 300


# --- properties -------------------------------------------------------------------------------

_atsign_chars = st.sampled_from("abcdefghijklmnopqrstuvwxyz0123456789_-🦄é")
_atsigns = st.text(_atsign_chars, min_size=1, max_size=12).map(lambda s: "@" + s)
_entities = st.text(st.sampled_from("abcxyz019_.-'*\"🐘"), min_size=1, max_size=30)


@st.composite
def _keys(draw) -> AtKey:
    kind = draw(st.sampled_from(["public", "shared", "self", "private", "privatekey", "local"]))
    owner = draw(_atsigns)
    if kind == "privatekey" and draw(st.booleans()):
        owner = None
    shared_with = draw(_atsigns.filter(lambda a: a != owner)) if kind == "shared" else None
    cached = kind in ("public", "shared") and draw(st.booleans())
    return AtKey(draw(_entities), owner, kind, shared_with, cached)


@given(_keys())
def test_atkey_format_parse_round_trip(key):
    text = str(key)
    assert AtKey.parse(text) == key
    # Keys are case-insensitive (this alphabet survives upper().lower()).
    assert AtKey.parse(text.upper()) == key


@given(st.text(max_size=300))
def test_atkey_parse_never_raises_anything_else(text):
    try:
        key = AtKey.parse(text)
    except InvalidKeyError:
        return
    assert AtKey.parse(str(key)) == key
    assert len(str(key)) <= MAX_CACHED_KEY_LENGTH
