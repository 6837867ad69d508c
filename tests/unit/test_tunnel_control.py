"""The multi-mode control channel codec (noports.tunnel.control), sans-IO.

Known-answer vectors here are derived from the spec (noports-protocol.md §5.5/§6), not captured
from an Atsign binary: the key is the bytes 00..1f, the IV f0..ff, written out by hand.
"""

from __future__ import annotations

import base64

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from noports.errors import AtProtocolError
from noports.tunnel.control import (
    IV_B64_LEN,
    KEY_B64_LEN,
    LEGACY_CONNECT_LEN,
    MAX_CONTROL_LINE,
    Connect,
    ControlMessageError,
    ControlParser,
    Heartbeat,
    Unknown,
    encode_connect,
    encode_connect_twin,
    encode_heartbeat,
    encode_no_encrypt,
)

KEY = bytes(range(32))
IV = bytes(range(0xF0, 0x100))
KEY_B64 = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
IV_B64 = "8PHy8/T19vf4+fr7/P3+/w=="
KEY2 = bytes(range(0x40, 0x60))
IV2 = bytes(range(0x60, 0x70))


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def feed_bytewise(parser: ControlParser, data: bytes) -> list:
    events = []
    for i in range(len(data)):
        events += parser.feed(data[i:i + 1])
    return events


# --- known answers (derived from the spec) -------------------------------------------------

def test_connect_line_known_answer():
    """Derived from the spec: connect:<base64 key 44>:<base64 IV 24>\\n, 78 bytes."""
    line = encode_connect(KEY_B64, IV_B64)
    assert line == (b"connect:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=:"
                    b"8PHy8/T19vf4+fr7/P3+/w==\n")
    assert len(line) == 8 + KEY_B64_LEN + 1 + IV_B64_LEN + 1 == LEGACY_CONNECT_LEN + 1
    assert ControlParser().feed(line) == [Connect(KEY, IV, KEY, IV)]


def test_no_encrypt_line_known_answer():
    """Derived from the spec: unencrypted sessions send connect:no:encrypt\\n."""
    assert encode_no_encrypt() == b"connect:no:encrypt\n"
    (event,) = ControlParser().feed(b"connect:no:encrypt\n")
    assert event == Connect(None, None, None, None)
    assert not event.encrypted


def test_twin_key_line_parsed():
    """Derived from the spec: connect:<kC2D>:<ivC2D>:<kD2C>:<ivD2C>\\n."""
    line = f"connect:{KEY_B64}:{IV_B64}:{b64(KEY2)}:{b64(IV2)}\n".encode()
    assert encode_connect_twin(KEY_B64, IV_B64, b64(KEY2), b64(IV2)) == line
    (event,) = ControlParser().feed(line)
    assert event == Connect(KEY, IV, KEY2, IV2, twin=True)
    assert event.encrypted


def test_heartbeat_parsed_and_encoded():
    """Derived from the spec: heartbeat:<n>\\n is a keep-alive the daemon ignores."""
    assert encode_heartbeat(7) == b"heartbeat:7\n"
    assert ControlParser().feed(b"heartbeat:7\nheartbeat:8\n") == [Heartbeat("7"), Heartbeat("8")]
    with pytest.raises(ValueError):
        encode_heartbeat(-1)


def test_legacy_back_to_back_without_newlines():
    """Derived from the spec: clients before 5.6.1 wrote 77-byte messages with no newline."""
    one = encode_connect(KEY_B64, IV_B64)[:-1]
    two = encode_connect(b64(KEY2), b64(IV2))[:-1]
    assert len(one) == LEGACY_CONNECT_LEN == 77
    parser = ControlParser()
    events = parser.feed(one + two + one)
    # the last one has no "next byte" yet: it waits for take_legacy()
    assert events == [Connect(KEY, IV, KEY, IV), Connect(KEY2, IV2, KEY2, IV2)]
    assert parser.legacy_pending
    assert parser.take_legacy() == Connect(KEY, IV, KEY, IV)
    assert not parser.legacy_pending and parser.buffered == 0
    assert parser.take_legacy() is None


def test_legacy_then_newline_form_mixed():
    old = encode_connect(KEY_B64, IV_B64)[:-1]
    new = encode_connect(b64(KEY2), b64(IV2))
    expected = [Connect(KEY, IV, KEY, IV), Connect(KEY2, IV2, KEY2, IV2)]
    assert ControlParser().feed(old + new) == expected
    assert feed_bytewise(ControlParser(), old + new) == expected


def test_newline_form_never_taken_for_legacy():
    """A 78-byte line split after byte 77 must not be cut: the twin form continues with ':'."""
    twin = encode_connect_twin(KEY_B64, IV_B64, b64(KEY2), b64(IV2))
    parser = ControlParser()
    assert parser.feed(twin[:LEGACY_CONNECT_LEN]) == []
    assert parser.legacy_pending           # the I/O layer would wait LEGACY_FLUSH_DELAY here
    assert parser.feed(twin[LEGACY_CONNECT_LEN:]) == [Connect(KEY, IV, KEY2, IV2, twin=True)]


def test_crlf_and_blank_lines_tolerated():
    line = encode_connect(KEY_B64, IV_B64)
    data = b"\n\r\n" + line[:-1] + b"\r\n" + b"\n"
    assert ControlParser().feed(data) == [Connect(KEY, IV, KEY, IV)]
    assert feed_bytewise(ControlParser(), data) == [Connect(KEY, IV, KEY, IV)]


def test_unknown_verb_is_an_event_not_an_error():
    assert ControlParser().feed(b"status:whatever 1 2\n") == [Unknown("status:whatever 1 2")]


@pytest.mark.parametrize("line", [
    b"connect:\n",
    b"connect\n",
    b"connect:no\n",
    b"connect:no:encrypt:extra\n",
    b"connect:127.0.0.1:22\n",                         # S6: a line can never name a target
    f"connect:{KEY_B64}\n".encode(),
    f"connect:{KEY_B64}:{b64(bytes(15))}\n".encode(),  # IV of the wrong size
    f"connect:{b64(bytes(31))}:{IV_B64}\n".encode(),   # key of the wrong size
    f"connect:{KEY_B64[:-1]}!:{IV_B64}\n".encode(),    # not base64
    f"connect:{KEY_B64}:{IV_B64}:{KEY_B64}\n".encode(),
    b"\x00\x01garbage\n",
    b"Connect:no:encrypt\n",
    b":no:encrypt\n",
    b"connect:no:encrypt\rx\n",
    b"\rx",
    "caf\u00e9:1\n".encode(),
])
def test_garbage_raises_control_message_error(line):
    with pytest.raises(ControlMessageError) as info:
        ControlParser().feed(line)
    assert isinstance(info.value, AtProtocolError)
    assert str(info.value).startswith("control channel")


def test_line_cap():
    parser = ControlParser()
    with pytest.raises(ControlMessageError, match="longer than"):
        parser.feed(b"x" * (MAX_CONTROL_LINE + 2))
    # exactly at the cap is fine (an unknown verb line, ignored by the daemon end)
    ok = b"a:" + b"b" * (MAX_CONTROL_LINE - 2)
    assert ControlParser().feed(ok + b"\n") == [Unknown(ok.decode())]
    with pytest.raises(ControlMessageError):
        ControlParser().feed(ok + b"b\n")


def test_events_before_garbage_are_kept_on_the_error():
    line = encode_connect(KEY_B64, IV_B64)
    with pytest.raises(ControlMessageError) as info:
        ControlParser().feed(line + b"\xff\xfe\n")
    assert info.value.events == [Connect(KEY, IV, KEY, IV)]


def test_encoders_refuse_bad_keys():
    with pytest.raises(ControlMessageError):
        encode_connect(KEY_B64, KEY_B64)
    with pytest.raises(ControlMessageError):
        encode_connect("not base64", IV_B64)


# --- properties ------------------------------------------------------------------------------

_keys = st.binary(min_size=32, max_size=32)
_ivs = st.binary(min_size=16, max_size=16)
_message = st.one_of(
    st.tuples(_keys, _ivs).map(lambda t: encode_connect(b64(t[0]), b64(t[1]))),
    st.tuples(_keys, _ivs, _keys, _ivs).map(
        lambda t: encode_connect_twin(b64(t[0]), b64(t[1]), b64(t[2]), b64(t[3]))),
    st.just(encode_no_encrypt()),
    st.integers(0, 10**9).map(encode_heartbeat),
    st.tuples(_keys, _ivs).map(lambda t: encode_connect(b64(t[0]), b64(t[1]))[:-1]),  # legacy
    st.just(b"\n"),
)


def _all_events(parser: ControlParser, chunks: list[bytes]) -> list:
    events = []
    for chunk in chunks:
        events += parser.feed(chunk)
    tail = parser.take_legacy()
    return events + ([tail] if tail is not None else [])


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_message, max_size=12), st.data())
def test_any_split_gives_the_same_events(messages, data):
    """Byte-at-a-time, random splits and one chunk all give the same events."""
    stream = b"".join(messages)
    whole = _all_events(ControlParser(), [stream])
    bytewise = _all_events(ControlParser(), [stream[i:i + 1] for i in range(len(stream))])
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    assert whole == bytewise == _all_events(ControlParser(), pieces)
    assert sum(isinstance(e, Connect) for e in whole) == sum(
        m.startswith(b"connect:") for m in messages)


@settings(max_examples=500)
@given(st.binary(max_size=600))
def test_garbage_only_raises_the_projects_error(blob):
    """Fuzz invariant: arbitrary bytes parse or raise ControlMessageError, nothing else."""
    for chunks in ([blob], [blob[i:i + 1] for i in range(len(blob))]):
        parser = ControlParser(max_line=256)
        try:
            for chunk in chunks:
                parser.feed(chunk)
            parser.take_legacy()
        except ControlMessageError:
            pass


@settings(max_examples=200)
@given(st.binary(max_size=300))
def test_bytewise_and_whole_agree_on_garbage(blob):
    """The events delivered before an error are the same however the bytes were split."""
    def run(chunks):
        parser, events = ControlParser(max_line=128), []
        try:
            for chunk in chunks:
                events += parser.feed(chunk)
        except ControlMessageError as exc:
            return events + exc.events, True
        return events, False

    assert run([blob]) == run([blob[i:i + 1] for i in range(len(blob))])
