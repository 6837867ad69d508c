"""noports.at.responses: reply parsing (prompts, data, errors, notifications), root answers, the
server-side LineReader, encoders and the chunking/cap/garbage properties.

Known-answer byte strings are derived from the spec (atprotocol.md §1, §2.2, §2.4, §3, §5.3,
§7.6, §7.8), not captured from a running Atsign server.  The hypothesis strategies defined here
are reused by tests/fuzz/test_fuzz_parsers.py.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from noports.at.responses import (
    ERROR_TEXT,
    Data,
    Error,
    LineReader,
    Notification,
    Prompt,
    ResponseParser,
    RootAnswer,
    RootNotFound,
    RootResponseParser,
    encode_data,
    encode_error,
    encode_notification,
    encode_root_answer,
    parse_error_line,
)
from noports.errors import AtProtocolError, LineTooLongError

NOTIFICATION = {
    "id": "0b7e8c3e-4c1d-4a5e-9f00-1234567890ab", "from": "@bob", "to": "@alice",
    "key": "@alice:ssh_request.mydevice.sshnp@bob", "value": "Y2lwaGVy", "operation": "update",
    "epochMillis": 1729504008982, "messageType": "MessageType.key", "isEncrypted": True,
    "metadata": {"encKeyName": None, "encAlgo": None, "ivNonce": "aXY=", "skeEncKeyName": None,
                 "skeEncAlgo": None, "sharedKeyEnc": "a2V5"},
}
STATS_NOTIFICATION = {
    "id": "-1", "from": "@alice", "to": "@alice", "key": "statsNotification.@alice",
    "value": "12", "operation": "update", "epochMillis": 1729504008982,
    "messageType": "MessageType.key", "isEncrypted": False, "metadata": None,
}


def feed_all(parser, chunks):
    events = []
    for chunk in chunks:
        events += parser.feed(chunk)
    return events


def bytewise(data: bytes) -> list[bytes]:
    return [data[i:i + 1] for i in range(len(data))]


# ---- ResponseParser: known answers ----------------------------------------------------------

# A whole authenticated session as §7.8 traces it, then a monitor with a heartbeat (§7.6).
SESSION = (
    b"@"
    b"data:_4af2c1de-0000-4000-8000-00000000a01c@alice:d6ca0000-0000-4000-8000-0000000028b9\n@"
    b"data:success\n@alice@"
    b"data:[\"public:publickey@alice\",\"@bob:shared_key@alice\"]\n@alice@"
    b"notification: " + json.dumps(NOTIFICATION).encode() + b"\n"
    b"data:ok\n@alice@"
    b"notification: " + json.dumps(STATS_NOTIFICATION).encode() + b"\n"
    b"error:AT0015-key not found : @bob:shared_key@alice does not exist in keystore\n@alice@"
    b"data: [{\"id\":\"3\",\"name\":\"lastCommitID\",\"value\":\"12\"}]\n@alice@"
)
SESSION_EVENTS = [
    Prompt("@"),
    Data("_4af2c1de-0000-4000-8000-00000000a01c@alice:d6ca0000-0000-4000-8000-0000000028b9"),
    Prompt("@"),
    Data("success"),
    Prompt("@alice@"),
    Data('["public:publickey@alice","@bob:shared_key@alice"]'),
    Prompt("@alice@"),
    Notification(NOTIFICATION),
    Data("ok"),
    Prompt("@alice@"),
    Notification(STATS_NOTIFICATION),
    Error("AT0015", "key not found : @bob:shared_key@alice does not exist in keystore",
          "error:AT0015-key not found : @bob:shared_key@alice does not exist in keystore"),
    Prompt("@alice@"),
    Data(' [{"id":"3","name":"lastCommitID","value":"12"}]'),
    Prompt("@alice@"),
]


def test_session_one_chunk():
    """Derived from the spec: from/pkam/scan/monitor replies, prompts glued to line fronts."""
    assert ResponseParser().feed(SESSION) == SESSION_EVENTS


def test_session_byte_at_a_time():
    """Derived from the spec: the same session one byte per feed gives the same events."""
    assert feed_all(ResponseParser(), bytewise(SESSION)) == SESSION_EVENTS


def test_prompt_glued_to_notification():
    """Derived from the spec (§7.6): after `data:ok\\n@alice@` the next notification arrives as
    `@alice@notification: {...}`; the prompt is stripped, the notification is not lost."""
    parser = ResponseParser()
    assert parser.feed(b"data:ok\n@alice@") == [Data("ok"), Prompt("@alice@")]
    line = b"notification: " + json.dumps(NOTIFICATION).encode() + b"\n"
    assert parser.feed(line) == [Notification(NOTIFICATION)]
    glued = b"@alice@" + line
    assert ResponseParser().feed(glued) == [Prompt("@alice@"), Notification(NOTIFICATION)]


def test_pol_reply_is_a_bare_prompt():
    """Derived from the spec (§3.4): pol answers only with the new prompt `@alice@`."""
    assert ResponseParser().feed(b"@alice@") == [Prompt("@alice@")]


@pytest.mark.parametrize(("line", "event"), [
    (b"error:AT0015-key not found : @bob:shared_key@alice does not exist in keystore",
     Error("AT0015", "key not found : @bob:shared_key@alice does not exist in keystore",
           "error:AT0015-key not found : @bob:shared_key@alice does not exist in keystore")),
    (b"error:AT0401-Exception: pkam authentication failed",
     Error("AT0401", "Exception: pkam authentication failed",
           "error:AT0401-Exception: pkam authentication failed")),
    (b'error:{"errorCode":"AT0015","errorDescription":"key not found : x"}',
     Error("AT0015", "key not found : x",
           'error:{"errorCode":"AT0015","errorDescription":"key not found : x"}')),
    (b"error:AT0026:enrollment_id: 5b0c is pending",
     Error("AT0026", "enrollment_id: 5b0c is pending",
           "error:AT0026:enrollment_id: 5b0c is pending")),
    (b"error:AT0012-Inbound connection limit exceeded",
     Error("AT0012", "Inbound connection limit exceeded",
           "error:AT0012-Inbound connection limit exceeded")),
    (b"error:AT0011", Error("AT0011", "", "error:AT0011")),
])
def test_error_shapes(line, event):
    """Derived from the spec (§2.4): the three error shapes give code, message and raw line."""
    assert ResponseParser().feed(line + b"\n@") == [event]
    assert ResponseParser().feed(line + b"\r\n") == [event]


def test_connection_limit_rejection_without_prompt():
    """Derived from the spec (§2.2): `error:AT0012-...\\n` then close, no prompt at all."""
    parser = ResponseParser()
    events = parser.feed(b"@error:AT0012-Inbound connection limit exceeded\n")
    assert events == [Prompt("@"), Error("AT0012", "Inbound connection limit exceeded",
                                         "error:AT0012-Inbound connection limit exceeded")]
    assert parser.buffered == 0


def test_bare_prompt_stays_pending_until_disambiguated():
    """A trailing `@` may still be the start of `@alice@`; the next byte decides."""
    parser = ResponseParser()
    assert parser.feed(b"@") == []
    assert parser.feed(b"d") == []
    assert parser.feed(b"ata:ok\n") == [Prompt("@"), Data("ok")]
    parser = ResponseParser()
    assert parser.feed(b"@ali") == []
    assert parser.feed(b"ce@") == [Prompt("@alice@")]
    parser = ResponseParser()
    assert parser.feed(b"@@alice@@") == [Prompt("@"), Prompt("@alice@")]
    assert parser.buffered == 1


def test_utf8_split_across_chunks():
    """Emoji atSigns (`@alice🛠`, §1) and non-ASCII payloads split at every byte boundary."""
    data = "@alice🛠@data:héllo wörld ✓\n@alice🛠@".encode()
    expected = [Prompt("@alice🛠@"), Data("héllo wörld ✓"), Prompt("@alice🛠@")]
    for cut in range(len(data) + 1):
        assert feed_all(ResponseParser(), [data[:cut], data[cut:]]) == expected


@pytest.mark.parametrize("line", [
    b"notification: {not json}", b"notification: [1,2]", b"notification: ", b"notification:null",
    b"notification: " + b"[" * 100_000,
])
def test_bad_notification_json(line):
    with pytest.raises(AtProtocolError):
        ResponseParser().feed(line + b"\n")


@pytest.mark.parametrize("line", [
    b"hello", b"DATA:x", b"data", b"error:", b"error:nocode", b"error:{\"x\":1}",
    b"error:{bad json", b"error:AT12-x", b"\xff\xfe", b"data:\xc3", b"@:x", b"@alice\n",
    b"@alice x@",
])
def test_garbage_lines(line):
    parser = ResponseParser()
    with pytest.raises(AtProtocolError):
        parser.feed(line + b"\n")      # "@:x": Prompt("@") first, so the fault comes next call
        parser.feed(b"")
    assert parser.error is not None


def test_empty_lines_are_ignored():
    assert ResponseParser().feed(b"\n\r\n@alice@\ndata:x\n") == [Prompt("@alice@"), Data("x")]


# ---- caps and faults ------------------------------------------------------------------------

def test_line_cap_raises_before_newline_and_stays_bounded():
    parser = ResponseParser(max_line=100)
    assert parser.feed(b"data:" + b"x" * 95) == []           # exactly 100 bytes: still fine
    with pytest.raises(LineTooLongError) as info:
        parser.feed(b"y")
    assert info.value.code == "AT0005"
    assert parser.buffered == 0
    with pytest.raises(LineTooLongError):
        parser.feed(b"\n")                                   # sticky
    assert parser.buffered == 0


def test_line_of_exactly_the_cap_is_accepted():
    line = b"data:" + b"x" * 95
    assert ResponseParser(max_line=100).feed(line + b"\n") == [Data("x" * 95)]
    assert feed_all(ResponseParser(max_line=100), bytewise(line + b"\n")) == [Data("x" * 95)]
    with pytest.raises(LineTooLongError):
        ResponseParser(max_line=100).feed(line + b"x\n")


def test_big_chunk_without_newline_is_refused_and_dropped():
    parser = ResponseParser(max_line=1000)
    with pytest.raises(LineTooLongError):
        parser.feed(b"data:" + b"z" * 1_000_000)
    assert parser.buffered == 0


def test_good_events_before_a_fault_are_not_lost():
    """Events completed before garbage in the same chunk are returned; the fault is raised by
    the next feed (and shown at once by .error)."""
    parser = ResponseParser()
    assert parser.feed(b"data:ok\n@alice@garbage\n") == [Data("ok"), Prompt("@alice@")]
    assert isinstance(parser.error, AtProtocolError)
    with pytest.raises(AtProtocolError):
        parser.feed(b"")
    with pytest.raises(AtProtocolError):
        parser.feed(b"data:late\n")


def test_pending_prompt_is_bounded():
    parser = ResponseParser(max_line=50)
    events = parser.feed(b"@" + b"a" * 300)
    assert events == [Prompt("@")]                 # no atSign is 256 bytes long
    with pytest.raises(LineTooLongError):
        parser.feed(b"a")


# ---- RootResponseParser ---------------------------------------------------------------------

@pytest.mark.parametrize(("data", "events"), [
    (b"@vip.ve.atsign.zone:25000\r\n@", [RootAnswer("vip.ve.atsign.zone", 25000)]),
    (b"@localhost:6465\r\n@", [RootAnswer("localhost", 6465)]),
    (b"@null\r\n@", [RootNotFound()]),
    (b"@", []),
    (b"data:null\n", [RootNotFound()]),
    (b"\r\n@", [RootNotFound()]),
    (b"@127.0.0.1:6464\r\n@null\r\n@", [RootAnswer("127.0.0.1", 6464), RootNotFound()]),
    (b"@[::1]:6464\r\n@", [RootAnswer("::1", 6464)]),
    (b"data:h.example:64\n", [RootAnswer("h.example", 64)]),
])
def test_root_answers(data, events):
    """Derived from the spec (§1): `host:port\\r\\n@`, `null\\r\\n@`, greeting, data:null."""
    assert RootResponseParser().feed(data) == events
    assert feed_all(RootResponseParser(), bytewise(data)) == events


@pytest.mark.parametrize("data", [
    b"host\r\n", b"host:\r\n", b"host:0\r\n", b"host:65536\r\n", b"host:12a\r\n", b":64\r\n",
    b"ho st:64\r\n", b"\xff:1\r\n", b"a" * 2000,
])
def test_root_garbage(data):
    with pytest.raises(AtProtocolError):
        RootResponseParser().feed(data)


# ---- LineReader -----------------------------------------------------------------------------

def test_line_reader_splits_and_strips_cr():
    reader = LineReader(100)
    assert reader.feed(b"from:@alice\r\npkam:abc\nno") == ["from:@alice", "pkam:abc"]
    assert reader.feed(b"op:0\n\n") == ["noop:0", ""]
    assert reader.buffered == 0


def test_line_reader_utf8_across_chunks():
    data = "update:public:x@alice ✓ 🛠\n".encode()
    for cut in range(len(data) + 1):
        reader = LineReader(100)
        assert reader.feed(data[:cut]) + reader.feed(data[cut:]) == [
            "update:public:x@alice ✓ 🛠"]


def test_line_reader_cap_is_sticky_and_does_not_grow():
    reader = LineReader(10)
    assert reader.feed(b"noop:0\n0123456789") == ["noop:0"]
    with pytest.raises(LineTooLongError):
        reader.feed(b"A")
    assert reader.buffered == 0
    for _ in range(3):
        with pytest.raises(LineTooLongError):
            reader.feed(b"B" * 1000 + b"\n")
        assert reader.buffered == 0


def test_line_reader_rejects_invalid_utf8():
    reader = LineReader(100)
    with pytest.raises(AtProtocolError):
        reader.feed(b"noop:\xff\n")


# ---- encoders -------------------------------------------------------------------------------

def test_encode_data():
    """Derived from the spec (§2.2): reply and prompt in one write."""
    assert encode_data("success", "@alice@") == b"data:success\n@alice@"
    assert encode_data("_x@alice:y", "@") == b"data:_x@alice:y\n@"
    with pytest.raises(AtProtocolError):
        encode_data("a\nb", "@")


def test_encode_error_shapes():
    """Derived from the spec (§2.4): the exact legacy and JSON shapes."""
    assert encode_error("AT0015", "@bob:shared_key@alice does not exist in keystore", "@alice@",
                        authenticated=True) == (
        b"error:AT0015-key not found : @bob:shared_key@alice does not exist in keystore\n@alice@")
    assert encode_error("AT0401", "pkam authentication failed", "@") == (
        b"error:AT0401-Exception: pkam authentication failed\n@")
    raw = encode_error("AT0015", "x does not exist", "@alice@", json_form=True,
                       authenticated=True)
    assert raw == (b'error:{"errorCode":"AT0015","errorDescription":"key not found : '
                   b'x does not exist"}\n@alice@')
    assert encode_error("AT0003", "bad\nline", "@") == b"error:AT0003-Exception: bad line\n@"


@pytest.mark.parametrize("kwargs", [{}, {"authenticated": True}, {"json_form": True},
                                    {"json_form": True, "authenticated": True}])
def test_encoded_errors_parse_back(kwargs):
    raw = encode_error("AT0009", "not allowed: x", "@alice@", **kwargs)
    events = ResponseParser().feed(raw + b"data:ok\n")
    assert [type(e) for e in events] == [Error, Prompt, Data]
    assert events[0].code == "AT0009"
    assert "not allowed: x" in events[0].message


def test_encode_notification_round_trip():
    """Derived from the spec (§5.3): `notification: <json>\\n`, no prompt."""
    raw = encode_notification(NOTIFICATION)
    assert raw.startswith(b"notification: {\"id\":")
    assert raw.endswith(b"}\n")
    assert ResponseParser().feed(raw) == [Notification(NOTIFICATION)]
    odd = {"v": "\ud800 lone surrogate", "u": "✓"}
    assert ResponseParser().feed(encode_notification(odd)) == [Notification(odd)]


def test_encode_root_answer():
    """Derived from the spec (§1)."""
    assert encode_root_answer("vip.ve.atsign.zone", 25000) == b"vip.ve.atsign.zone:25000\r\n@"
    assert encode_root_answer(None, None) == b"null\r\n@"
    assert RootResponseParser().feed(b"@" + encode_root_answer("h", 1)) == [RootAnswer("h", 1)]


def test_error_text_table():
    """Derived from the spec (§2.6): every code of the table with its standard text."""
    expected_codes = {f"AT{n:04d}" for n in [*range(1, 17), *range(21, 32), 401]}
    assert set(ERROR_TEXT) == expected_codes
    assert ERROR_TEXT["AT0015"] == "key not found"
    assert ERROR_TEXT["AT0003"] == "Invalid syntax"
    assert ERROR_TEXT["AT0401"] == "Client authentication failed"
    assert ERROR_TEXT["AT0005"] == "Buffer limit exceeded"


def test_parse_error_line_requires_prefix():
    with pytest.raises(AtProtocolError):
        parse_error_line("data:x")


# ---- hypothesis strategies (also used by tests/fuzz/test_fuzz_parsers.py) ------------------

_line_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\n"),
                     max_size=30).filter(lambda s: not s.endswith("\r"))
_codes = st.integers(0, 9999).map(lambda n: f"AT{n:04d}")
_json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**53, 2**53),
                         st.text(max_size=8))
_json_values = st.one_of(_json_scalars, st.lists(_json_scalars, max_size=3),
                         st.dictionaries(st.text(max_size=4), _json_scalars, max_size=3))


def _data(payload):
    return ("data:" + payload).encode(), Data(payload)


def _legacy_error(code, text):
    raw = f"error:{code}-{text}"
    return raw.encode(), Error(code, text, raw)


def _colon_error(code, text):
    raw = f"error:{code}:{text}"
    return raw.encode(), Error(code, text, raw)


def _json_error(code, text):
    raw = "error:" + json.dumps({"errorCode": code, "errorDescription": text})
    return raw.encode(), Error(code, text, raw)


def _notification(payload):
    return encode_notification(payload)[:-1], Notification(payload)


reply_lines = st.one_of(
    st.builds(_data, _line_text),
    st.builds(_legacy_error, _codes, _line_text),
    st.builds(_colon_error, _codes, _line_text),
    st.builds(_json_error, _codes, _line_text),
    st.builds(_notification, st.dictionaries(st.text(max_size=8), _json_values, max_size=4)),
)
prompts = st.one_of(st.just("@"), st.sampled_from(["alice", "bob🛠", "x_y-1"]).map(
    lambda s: f"@{s}@"))
_items = st.lists(st.one_of(prompts.map(lambda p: (p.encode(), Prompt(p))),
                            st.tuples(reply_lines, st.sampled_from([b"\n", b"\r\n"])).map(
                                lambda t: (t[0][0] + t[1], t[0][1]))),
                  max_size=6)


def _stream(items):
    data = b"".join(raw for raw, _ in items)
    events = [event for _, event in items]
    if events and events[-1] == Prompt("@"):
        events.pop()                  # a trailing bare "@" stays pending (documented rule)
    return data, events


reply_streams = _items.map(_stream)


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


@settings(max_examples=200, deadline=None)
@given(reply_streams, st.lists(st.integers(0, 10_000), max_size=8))
def test_reply_stream_property(stream, cuts):
    """Generated server output gives the expected events for any chunking."""
    data, expected = stream
    assert ResponseParser().feed(data) == expected
    assert feed_all(ResponseParser(), bytewise(data)) == expected
    assert feed_all(ResponseParser(), split_at(data, cuts)) == expected


def _outcome(parser, chunks):
    events = []
    try:
        for chunk in chunks:
            events += parser.feed(chunk)
        events += parser.feed(b"")
    except AtProtocolError as exc:
        return [repr(e) for e in events], type(exc)
    return [repr(e) for e in events], None


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=120), st.lists(st.integers(0, 1000), max_size=6))
def test_garbage_bytes_property(data, cuts):
    """Random bytes: only AtProtocolError, and chunking never changes the outcome."""
    for make in (lambda: ResponseParser(max_line=40), lambda: RootResponseParser(max_line=40),
                 lambda: LineReader(40)):
        one = _outcome(make(), [data])
        assert _outcome(make(), bytewise(data)) == one
        assert _outcome(make(), split_at(data, cuts)) == one
