"""atserver notifications over TLS: notify between hosted atSigns, status, monitor (regex,
epoch replay, prompt-less replies), stats notifications, ttln expiry, restart survival.

Expected shapes are derived from the spec (atprotocol.md §4.8-§4.10, §5, §7.6).
"""

from __future__ import annotations

import json
import uuid

from tests.functional.conftest import wait_for


def _id() -> str:
    return str(uuid.uuid4())


def read_notification(conn, timeout: float = 10.0) -> dict:
    line = conn.read_line(timeout)
    assert line.startswith("notification: "), line
    return json.loads(line[len("notification: "):])


def next_real(conn, timeout: float = 10.0) -> dict:
    """The next notification that is not a stats notification (id -1)."""
    while True:
        n = read_notification(conn, timeout)
        if n["id"] != "-1":
            return n


def start_monitor(srv, atsign: str, command: str = "monitor"):
    conn = srv.login(atsign)
    conn.send(command)
    conn.prompt = ""          # spec §7.6: no prompts on a monitor connection
    return conn


def test_notify_reaches_monitor_and_status_delivered(shared_atserver):
    srv = shared_atserver
    mon = start_monitor(srv, "@bob", r"monitor .*\.exchange")
    alice = srv.login("@alice")
    try:
        nid = _id()
        reply = alice.request(f"notify:id:{nid}:update:messageType:key:ttln:60000:"
                              f"isEncrypted:true:ivNonce:AAAAAAAAAAAAAAAAAAAAAA==:"
                              f"@bob:m1.exchange@alice:Y2lwaGVy")
        assert reply == f"data:{nid}"
        n = next_real(mon)
        assert n["id"] == nid and n["from"] == "@alice" and n["to"] == "@bob"
        assert n["key"] == "@bob:m1.exchange@alice" and n["value"] == "Y2lwaGVy"
        assert n["operation"] == "update" and n["messageType"] == "MessageType.key"
        assert n["isEncrypted"] is True and n["metadata"]["ivNonce"] == "AAAAAAAAAAAAAAAAAAAAAA=="
        assert isinstance(n["epochMillis"], int)
        assert alice.request(f"notify:status:{nid}") == "data:delivered"
        assert alice.request(f"notify:status:{_id()}") == "data:null"
        # Replies on the monitor connection carry no prompt, and the next notification line is
        # therefore not glued to one (the atsdk defect of spec §7.6).
        mon.send("noop:0")
        assert mon.read_chunk() == b"data:ok\n"
        alice.request("notify:@bob:m2.exchange@alice:v2")
        n2 = next_real(mon)
        assert n2["key"] == "@bob:m2.exchange@alice"
    finally:
        mon.close()
        alice.close()


def test_monitor_regex_on_key_or_sender(shared_atserver):
    srv = shared_atserver
    mon_key = start_monitor(srv, "@carol", r"monitor wanted\.ns")
    mon_from = start_monitor(srv, "@carol", "monitor ^bob$")
    alice, bob = srv.login("@alice"), srv.login("@bob")
    try:
        alice.request("notify:@carol:other.ns@alice:x")
        alice.request("notify:@carol:wanted.ns@alice:y")
        bob.request("notify:@carol:anything@bob:z")
        assert next_real(mon_key)["key"] == "@carol:wanted.ns@alice"
        assert next_real(mon_from)["key"] == "@carol:anything@bob"
        # Nothing else is pending on either (the unmatched ones were filtered).
        for conn in (mon_key, mon_from):
            conn.send("noop:0")
            line = conn.read_line()
            while line.startswith("notification: ") and '"id":"-1"' in line:
                line = conn.read_line()
            assert line == "data:ok"
    finally:
        for c in (mon_key, mon_from, alice, bob):
            c.close()


def test_epoch_replay_strictly_greater_oldest_first(atserver):
    srv = atserver("@alice", "@bob")
    alice = srv.login("@alice")
    ids = [alice.request(f"notify:@bob:r{i}.replay@alice:v{i}")[5:] for i in range(5)]
    alice.close()
    mon = start_monitor(srv, "@bob", "monitor:0 replay")
    got = [next_real(mon) for _ in ids]
    mon.close()
    assert [n["id"] for n in got] == ids
    epochs = [n["epochMillis"] for n in got]
    assert epochs == sorted(epochs)
    cut = epochs[2]
    mon = start_monitor(srv, "@bob", f"monitor:{cut} replay")
    mon.send("noop:0")
    replayed = []
    while True:
        line = mon.read_line()
        if line == "data:ok":
            break
        replayed.append(json.loads(line[len("notification: "):])["id"])
    mon.close()
    assert replayed == [n["id"] for n in got if n["epochMillis"] > cut]


def test_stats_notification(atserver):
    srv = atserver("@alice", "@bob", args=("--stats-interval", "0.3"))
    alice = srv.login("@alice")
    last = int(alice.request("update:public:statsprobe@alice v")[5:])
    alice.close()
    mon = start_monitor(srv, "@alice", "monitor nomatch-for-anything")
    try:
        n = read_notification(mon, timeout=5)
        assert n["id"] == "-1" and n["key"] == "statsNotification.@alice"
        assert n["from"] == n["to"] == "@alice" and n["value"] == str(last)
        assert n["isEncrypted"] is False and n["metadata"] is None
    finally:
        mon.close()


def test_ttln_expiry_and_unhosted_recipient(atserver):
    srv = atserver("@alice", "@bob")
    alice = srv.login("@alice")
    try:
        short = alice.request("notify:ttln:1500:@bob:short@alice:v")[5:]
        long_ = alice.request("notify:@bob:long@alice:v")[5:]
        assert alice.request(f"notify:status:{short}") == "data:delivered"
        wait_for(lambda: alice.request(f"notify:status:{short}") == "data:expired",
                 what="notification expiry")
        assert alice.request(f"notify:status:{long_}") == "data:delivered"
        remote = alice.request("notify:@zed:x@alice:v")[5:]
        assert alice.request(f"notify:status:{remote}") == "data:errored"
    finally:
        alice.close()
    mon = start_monitor(srv, "@bob", "monitor:0")
    try:
        n = next_real(mon)
        assert n["id"] == long_      # the expired one is not replayed
    finally:
        mon.close()


def test_notify_list_fetch_remove_self_and_text(atserver):
    srv = atserver("@alice", "@bob")
    alice, bob = srv.login("@alice"), srv.login("@bob")
    try:
        nid = alice.request("notify:@bob:listed@alice:v")[5:]
        listed = json.loads(bob.request("notify:list")[5:])
        assert [n["id"] for n in listed] == [nid]
        assert json.loads(bob.request("notify:list:listed")[5:])[0]["id"] == nid
        assert json.loads(bob.request("notify:list:nomatch")[5:]) == []
        fetched = json.loads(bob.request(f"notify:fetch:{nid}")[5:])
        assert fetched["id"] == nid and fetched["fromAtSign"] == "@alice"
        assert bob.request(f"notify:remove:{nid}") == "data:success"
        assert json.loads(bob.request("notify:list")[5:]) == []
        gone = json.loads(bob.request(f"notify:fetch:{nid}")[5:])
        assert gone["notificationStatus"] == "NotificationStatus.expired"
        # Self notification and text message.
        mon = start_monitor(srv, "@alice", "monitor:selfNotifications")
        try:
            alice.request("notify:@alice:note.self@alice:me")
            n = next_real(mon)
            assert n["from"] == n["to"] == "@alice" and n["key"] == "@alice:note.self@alice"
            bob.request("notify:messageType:text:@alice:hello")
            t = next_real(mon)
            assert t["messageType"] == "MessageType.text" and t["key"] == "@alice:hello"
        finally:
            mon.close()
    finally:
        alice.close()
        bob.close()


def test_notify_with_ttr_is_cached_by_recipient(shared_atserver):
    srv = shared_atserver
    alice, bob = srv.login("@alice"), srv.login("@bob")
    try:
        alice.request("notify:ttr:-1:@bob:device_info.cached@alice:{\"a\":1}")
        assert bob.request("llookup:cached:@bob:device_info.cached@alice") == 'data:{"a":1}'
    finally:
        alice.close()
        bob.close()


def test_notifications_survive_restart_and_replay(atserver):
    srv = atserver("@alice", "@bob")
    alice = srv.login("@alice")
    ids = [alice.request(f"notify:@bob:keep{i}@alice:v{i}")[5:] for i in range(20)]
    alice.close()
    ports_before = dict(srv.ports)
    root_before = srv.root_port
    srv.restart()
    assert srv.ports == ports_before and srv.root_port == root_before
    alice = srv.login("@alice")
    try:
        assert all(alice.request(f"notify:status:{i}") == "data:delivered" for i in ids)
    finally:
        alice.close()
    mon = start_monitor(srv, "@bob", "monitor:0 keep")
    try:
        assert [next_real(mon)["id"] for _ in ids] == ids
    finally:
        mon.close()


def test_monitor_sees_live_notifications_after_replay_without_gap(atserver):
    """Replay and live delivery meet without loss or duplicates while a sender is busy."""
    srv = atserver("@alice", "@bob")
    alice = srv.login("@alice")
    first = [alice.request(f"notify:@bob:gap{i}@alice:v")[5:] for i in range(30)]
    # Pipeline a burst and start the monitor while it is being processed.
    burst = [f"notify:id:{_id()}:update:@bob:gap{i}@alice:v" for i in range(30, 230)]
    alice.sock.sendall(("\n".join(burst) + "\n").encode())
    mon = start_monitor(srv, "@bob", "monitor:0 gap")
    expected = first + [line.split(":")[2] for line in burst]
    for _ in burst:
        alice.read_reply()
    got = [next_real(mon)["id"] for _ in expected]
    assert sorted(got) == sorted(expected) and len(set(got)) == len(expected)
    mon.close()
    alice.close()
