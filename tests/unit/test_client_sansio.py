"""Sans-IO parts of the AtClient: reply correlation, replay de-duplication, backoff, addresses."""

from __future__ import annotations

import asyncio

import pytest

from noports.at.connection import AtConnectionError, ReplyQueue
from noports.at.monitor import SeenIds, backoff_delay, notification_from_json
from noports.at.root import parse_root_address
from noports.errors import AtServerError

# ---- ReplyQueue ---------------------------------------------------------------------------


def _futures(loop, n):
    return [loop.create_future() for _ in range(n)]


def test_replies_go_to_requests_in_order():
    loop = asyncio.new_event_loop()
    try:
        q = ReplyQueue()
        futs = _futures(loop, 3)
        for f in futs:
            q.push(f)
        assert q.resolve("one") and q.resolve(error=AtServerError("AT0015", "nf"))
        assert q.resolve("three")
        assert futs[0].result() == "one"
        assert futs[1].exception().code == "AT0015"
        assert futs[2].result() == "three"
        assert len(q) == 0
        assert q.resolve("stray") is False      # a reply nobody asked for is reported
    finally:
        loop.close()


def test_abandoned_request_keeps_its_place():
    """A timed-out/cancelled request still owns the next reply, so later ones stay matched."""
    loop = asyncio.new_event_loop()
    try:
        q = ReplyQueue()
        first, second = _futures(loop, 2)
        q.push(first)
        q.push(second)
        first.cancel()                         # caller gave up
        q.resolve("late answer to first")
        q.resolve("answer to second")
        assert second.result() == "answer to second"
    finally:
        loop.close()


def test_fail_all_fails_pending_and_cancels_timers():
    loop = asyncio.new_event_loop()
    try:
        q = ReplyQueue()
        futs = _futures(loop, 2)
        handles = [loop.call_later(100, lambda: None) for _ in futs]
        for f, h in zip(futs, handles, strict=True):
            q.push(f, h)
        q.fail_all(AtConnectionError("gone"))
        assert all(isinstance(f.exception(), AtConnectionError) for f in futs)
        assert all(h.cancelled() for h in handles)
        assert len(q) == 0
    finally:
        loop.close()


# ---- SeenIds --------------------------------------------------------------------------------


def test_seen_ids_drops_duplicates_and_tracks_last_epoch():
    seen = SeenIds(last_epoch=1000, overlap_ms=100)
    assert seen.add("a", 1001)
    assert seen.add("b", 1005)
    assert not seen.add("a", 1001)
    assert seen.last_epoch == 1005
    assert seen.replay_from() == 905


def test_seen_ids_prunes_outside_overlap_window():
    seen = SeenIds(last_epoch=0, overlap_ms=10)
    for i in range(100):
        assert seen.add(f"id{i}", 1000 + i)
    # only ids within 10 ms of the newest (1099) can be replayed, so only they are kept
    assert len(seen) == 11
    assert "id99" in seen and "id89" in seen and "id88" not in seen


def test_seen_ids_capacity_bounds_memory():
    seen = SeenIds(last_epoch=0, overlap_ms=10**9, capacity=50)
    for i in range(1000):
        seen.add(str(i), 5)
    assert len(seen) == 50
    assert "999" in seen and "0" not in seen


def test_seen_ids_replay_not_negative():
    assert SeenIds(last_epoch=5, overlap_ms=1000).replay_from() == 0


def test_replay_window_with_same_millisecond():
    """Two notifications in one millisecond, drop after the first: the second is replayed
    (replay starts before last_epoch) and the first is recognised as a duplicate."""
    seen = SeenIds(last_epoch=0, overlap_ms=1)
    assert seen.add("x", 500)
    start = seen.replay_from()
    assert start < 500                          # server replays epochs > start, so 500 again
    assert not seen.add("x", 500)
    assert seen.add("y", 500)


# ---- backoff ----------------------------------------------------------------------------------


def test_backoff_grows_and_caps():
    delays = [backoff_delay(a, base=0.1, cap=2.0, jitter=0.0) for a in range(10)]
    assert delays[:4] == pytest.approx([0.1, 0.2, 0.4, 0.8])
    assert max(delays) == pytest.approx(2.0)
    assert delays == sorted(delays)


def test_backoff_jitter_bounds():
    lo = backoff_delay(3, base=0.1, cap=10, jitter=0.2, rng=lambda: 0.0)
    hi = backoff_delay(3, base=0.1, cap=10, jitter=0.2, rng=lambda: 0.999999)
    assert lo == pytest.approx(0.8 * 0.8)
    assert hi == pytest.approx(0.8 * 1.2, rel=1e-5)
    assert backoff_delay(10**6, base=0.1, cap=5, jitter=0) == 5   # huge attempt: no overflow


# ---- root addresses ---------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("root.atsign.org", ("root.atsign.org", 64)),
    ("root.atsign.org:64", ("root.atsign.org", 64)),
    ("127.0.0.1:6464", ("127.0.0.1", 6464)),
    ("[::1]:6464", ("::1", 6464)),
    ("[::1]", ("::1", 64)),
    ("::1", ("::1", 64)),
    (" localhost:1 ", ("localhost", 1)),
])
def test_parse_root_address(text, expected):
    assert parse_root_address(text) == expected


@pytest.mark.parametrize("text", ["", ":64", "host:x", "host:0", "host:70000", "[::1"])
def test_parse_root_address_rejects(text):
    with pytest.raises(ValueError):
        parse_root_address(text)


# ---- notification JSON ------------------------------------------------------------------------


def test_notification_fields_and_entity():
    n = notification_from_json({
        "id": "abc", "from": "@Alice", "to": "@bob", "key": "@bob:Ping.Dev.sshnp@alice",
        "value": "x", "operation": "update", "epochMillis": 17, "messageType": "MessageType.key",
        "isEncrypted": True, "metadata": {"ivNonce": "AA=="}})
    assert (n.id, n.from_atsign, n.to_atsign, n.epoch_millis) == ("abc", "@alice", "@bob", 17)
    assert n.entity == "ping.dev.sshnp"
    assert n.is_encrypted and not n.is_stats
    assert n.metadata == {"ivNonce": "AA=="}


def test_stats_notification_is_recognised():
    n = notification_from_json({"id": "-1", "from": "@a", "to": "@a",
                                "key": "statsNotification.@a", "value": "3",
                                "epochMillis": "bad", "metadata": None})
    assert n.is_stats and n.epoch_millis == 0 and n.metadata is None
