"""The client-side reply fast paths give what the general code gives.

* ``parse_notification_json`` decodes with msgspec and falls back to ``json.loads``: its result
  (or error) must be json.loads' for any text.
* ``ResponseParser.feed_items`` (what AtConnection uses: bare items, no prompts) must carry the
  same information as ``feed``'s events, however the bytes are chunked, and the remembered
  prompt must not change any decision ``feed`` makes.
"""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from noports.at.responses import (
    Data,
    Error,
    Notification,
    Prompt,
    ResponseParser,
    parse_notification_json,
)
from noports.errors import AtProtocolError

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**80), 2**80)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                max_size=3),
    max_leaves=8)


def _outcome(text: str):
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return "error", None
    if not isinstance(value, dict):
        return "error", None
    return "ok", repr(value)            # repr: tells 1 from 1.0 and nan from nan


def _ours(text: str):
    try:
        return "ok", repr(parse_notification_json(text))
    except AtProtocolError:
        return "error", None


@settings(max_examples=400)
@given(st.dictionaries(st.text(max_size=6), _json_values, max_size=5))
def test_json_objects_decode_as_json_loads(obj):
    for text in (json.dumps(obj), json.dumps(obj, ensure_ascii=False), json.dumps(obj, indent=1)):
        assert _ours(text) == _outcome(text)


@settings(max_examples=600)
@given(st.text(alphabet=st.sampled_from('{}[]":,0123456789.eE+-tfnrulsaINy \\u\t\n\x01é'),
               max_size=24))
def test_json_garbage_fails_like_json_loads(text):
    assert _ours("{" + text) == _outcome("{" + text)
    assert _ours(text) == _outcome(text)


@pytest.mark.parametrize("text", [
    '{"a":NaN}', '{"a":-Infinity}', '{"a":1e400}', '{"a":123456789012345678901234567890}',
    '{"a":"\\ud800"}', '{"a":"\\udc00\\ud800"}', '{"a":1,"a":2}', '\ufeff{"a":1}',
    '{"a":' * 3000 + "1" + "}" * 3000, "null", "[]", '{"a":"\x01"}', '{"a":-0.0}',
])
def test_json_edge_cases(text):
    assert _ours(text) == _outcome(text)


# ---- feed_items vs feed ----------------------------------------------------------------------

def _as_items(events):
    out = []
    for e in events:
        if isinstance(e, (Data, Notification)):
            out.append(e.payload)
        elif isinstance(e, Error):
            out.append(e)
        else:
            assert isinstance(e, Prompt)
    return out


_pieces = st.sampled_from([
    b"@", b"@alice@", b"@bob@", b"data:ok\n", b"data:12\r\n", b"data:\n", b"\n",
    b'notification: {"id":"1","key":"@bob:x@alice","epochMillis":5}\n',
    b"error:AT0015-key not found : x@alice does not exist\n",
    b'error:{"errorCode":"AT0003","errorDescription":"bad"}\n', b"@al", b"ice@", b"da",
    b"ta:split\n", b"@" + b"a" * 300, b"@a b\n", b"@:\n", "data:é\n".encode(), b"garbage\n",
    b"\xff\xfe\n", b'notification: {"id":"\xff"}\n', b'notification: {"id":"\xc3\xa9"}\n',
    b"notification: [1]\n", b"notification: NaN\n", b'notification: {"a":NaN}\n',
    b"notification:\n", b'notification: \xef\xbb\xbf{"a":1}\n',
])


@settings(max_examples=500)
@given(pieces=st.lists(_pieces, max_size=12), cuts=st.lists(st.integers(0, 2000), max_size=6))
def test_items_carry_what_events_carry(pieces, cuts):
    stream = b"".join(pieces)
    bounds = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    chunks = [stream[a:b] for a, b in itertools.pairwise(bounds)]
    events, items = ResponseParser(), ResponseParser()
    got_events, got_items, err_events, err_items = [], [], None, None
    for chunk in [*chunks, b""]:
        if err_events is None:
            try:
                got_events += events.feed(chunk)
            except AtProtocolError as exc:
                err_events = str(exc)
        if err_items is None:
            try:
                got_items += items.feed_items(chunk)
            except AtProtocolError as exc:
                err_items = str(exc)
    assert got_items == _as_items(got_events)
    assert err_items == err_events
    assert items.buffered == events.buffered


def test_remembered_prompt_gives_the_same_events():
    parser = ResponseParser()
    stream = b"@alice@data:1\n@alice@data:2\n@alice@@alice@data:3\n@alicex@data:4\n@"
    events = parser.feed(stream)
    assert events == [Prompt("@alice@"), Data("1"), Prompt("@alice@"), Data("2"),
                      Prompt("@alice@"), Prompt("@alice@"), Data("3"), Prompt("@alicex@"),
                      Data("4")]
    assert parser.buffered == 1                    # the bare "@" stays pending
    assert parser.feed(b"alice@") == [Prompt("@alice@")]
