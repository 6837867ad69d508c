"""The atServer's notification line: the spelled-out payload keeps the pushed metadata names and
order, and the orjson line reads back as the codec encoder's (performance work, issue 3)."""

from __future__ import annotations

import json

import pytest

from noports.at.responses import encode_notification
from noports.atserver.notifications import _PUSHED_META, notification_line, payload_of
from noports.atserver.store import StoredNotification


@pytest.mark.parametrize("meta", [{}, {"ivNonce": "i", "pubKeyCS": "c", "ttr": 5},
                                  {name: f"v-{name}" for name in _PUSHED_META}])
def test_payload_metadata_names_and_order(meta):
    n = StoredNotification("n1", "@alice", "@bob", "@bob:k.x@alice", "é\u2028v", "update", "key",
                           True, meta, 17, 99)
    payload = payload_of(n)
    assert list(payload["metadata"]) == list(_PUSHED_META)
    assert payload["metadata"] == {name: meta.get(name) for name in _PUSHED_META}
    line = notification_line(payload)
    assert line.startswith(b"notification: ") and line.endswith(b"\n")
    assert line.count(b"\n") == 1
    assert json.loads(line[14:]) == json.loads(encode_notification(payload)[14:]) == payload
