"""atserver verbs over TLS: update/llookup/lookup/plookup/delete/scan, metadata, TTLs, commit
ids, visibility between atSigns, noop/info/@exit and the one-write reply shape.

Expected values are derived from the spec (atprotocol.md §4), not from a Dart server.
"""

from __future__ import annotations

import json
import uuid

import pytest

from tests.functional.conftest import wait_for


def _name(prefix: str = "k") -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


@pytest.fixture
def alice(shared_atserver):
    conn = shared_atserver.login("@alice")
    yield conn
    conn.close()


@pytest.fixture
def bob(shared_atserver):
    conn = shared_atserver.login("@bob")
    yield conn
    conn.close()


def test_reply_and_prompt_arrive_in_one_write(shared_atserver):
    conn = shared_atserver.connect("@alice")
    try:
        conn.send("noop:0")
        assert conn.read_chunk() == b"data:ok\n@"
        conn.login_pkam(shared_atserver.keys("@alice"))
        conn.send("update:public:oneshot@alice v")
        chunk = conn.read_chunk()
        assert chunk.startswith(b"data:") and chunk.endswith(b"\n@alice@"), chunk
        conn.send("llookup:nokey@alice")
        chunk = conn.read_chunk()
        assert chunk.startswith(b"error:AT0015-") and chunk.endswith(b"\n@alice@"), chunk
    finally:
        conn.close()


def test_update_llookup_and_commit_ids(alice):
    n = _name()
    c1 = int(alice.request(f"update:public:{n}@alice first value")[5:])
    c2 = int(alice.request(f"update:{n}@alice secret")[5:])
    c3 = int(alice.request(f"update:@bob:{n}@alice shared")[5:])
    assert 0 <= c1 < c2 < c3
    assert alice.request(f"llookup:public:{n}@alice") == "data:first value"
    assert alice.request(f"llookup:{n}@alice") == "data:secret"
    assert alice.request(f"llookup:@alice:{n}@alice") == "data:secret"   # same self key
    assert alice.request(f"llookup:@bob:{n}@alice") == "data:shared"
    # Keys are lower-cased.
    assert alice.request(f"llookup:PUBLIC:{n.upper()}@ALICE") == "data:first value"
    # Uncommitted kinds answer -1 (spec §4.1).
    assert alice.request(f"update:public:_{n}@alice hidden") == "data:-1"
    assert int(alice.request(f"update:public:__{n}@alice shown")[5:]) > c3


def test_metadata_any_order_and_derived_fields(alice):
    n = _name()
    alice.request(f"update:isEncrypted:true:ivNonce:AAAAAAAAAAAAAAAAAAAAAA==:ttr:-1:ccd:true:"
                  f"dataSignature:c2ln:@bob:{n}@alice cipher")
    meta = json.loads(alice.request(f"llookup:meta:@bob:{n}@alice")[5:])
    assert meta["isEncrypted"] is True and meta["ivNonce"] == "AAAAAAAAAAAAAAAAAAAAAA=="
    assert meta["ttr"] == -1 and meta["ccd"] is True and meta["dataSignature"] == "c2ln"
    assert meta["version"] == 0 and meta["createdBy"] == "@alice"
    assert meta["createdAt"].endswith("Z") and meta["status"] == "active"
    # A second update keeps absent fields, bumps the version, keeps createdAt.
    alice.request(f"update:ttl:600000:@bob:{n}@alice cipher2")
    meta2 = json.loads(alice.request(f"llookup:meta:@bob:{n}@alice")[5:])
    assert meta2["version"] == 1 and meta2["ivNonce"] == "AAAAAAAAAAAAAAAAAAAAAA=="
    assert meta2["createdAt"] == meta["createdAt"] and "expiresAt" in meta2
    allj = json.loads(alice.request(f"llookup:all:@bob:{n}@alice")[5:])
    assert allj["key"] == f"@bob:{n}@alice" and allj["data"] == "cipher2"
    assert allj["metaData"]["ttl"] == 600000
    # update:meta changes metadata only.
    assert alice.request(f"update:meta:@bob:{n}@alice:ttl:0").startswith("data:")
    meta3 = json.loads(alice.request(f"llookup:meta:@bob:{n}@alice")[5:])
    assert "expiresAt" not in meta3 and meta3["version"] == 2
    assert alice.request(f"llookup:@bob:{n}@alice") == "data:cipher2"


def test_bad_metadata_and_keys(alice):
    n = _name()
    assert alice.request(f"update:ttl:-5:{n}@alice v").startswith("error:AT0003")
    assert alice.request(f"update:ttr:-2:{n}@alice v").startswith("error:AT0003")
    assert alice.request(f"update:public:{n}@bob v").startswith("error:AT0016")
    # Grammar (AT0003) or key rule (AT0016): either way refused.
    assert alice.request(f"update:cached:public:{n}@bob v")[:12] in ("error:AT0003",
                                                                     "error:AT0016")
    assert alice.request(f"update:privatekey:{n} v")[:12] in ("error:AT0003", "error:AT0016")
    assert alice.request("update:" + "x" * 300 + "@alice v").startswith("error:AT0016")
    assert alice.request("update:public:signing_publickey@alice v").startswith("error:AT0009")
    assert alice.request(f"notify:@bob:{n}@carol:v").startswith("error:AT0009")
    assert alice.request("frobnicate:x").startswith("error:AT0003")
    assert alice.request("noop:0") == "data:ok"     # connection still usable


def test_ttl_and_ttb(alice):
    n = _name()
    alice.request(f"update:ttl:300:public:{n}@alice soon-gone")
    alice.request(f"update:ttb:2000:public:b{n}@alice not-yet")
    assert alice.request(f"llookup:public:b{n}@alice") == "data:null"
    assert f"public:b{n}@alice" not in json.loads(alice.request("scan")[5:])
    wait_for(lambda: alice.request(f"llookup:public:{n}@alice") == "data:null",
             what="ttl expiry")
    assert f"public:{n}@alice" not in json.loads(alice.request("scan")[5:])
    wait_for(lambda: alice.request(f"llookup:public:b{n}@alice") == "data:not-yet",
             what="ttb")


def test_delete(alice):
    n = _name()
    c1 = int(alice.request(f"update:public:{n}@alice v")[5:])
    c2 = int(alice.request(f"delete:public:{n}@alice")[5:])
    assert c2 > c1
    assert alice.request(f"llookup:public:{n}@alice").startswith("error:AT0015")
    # Deleting a missing key still answers a commit id.
    assert int(alice.request(f"delete:public:{n}@alice")[5:]) > c2
    assert alice.request("delete:public:publickey@alice").startswith("error:AT0009")


def test_lookup_between_hosted_atsigns(shared_atserver, alice, bob):
    n = _name()
    alice.request(f"update:@bob:{n}@alice for-bob")
    alice.request(f"update:{n}@alice alice-only")
    alice.request(f"update:public:{n}@alice everyone")
    alice.request(f"update:@carol:{n}@alice for-carol")
    assert bob.request(f"lookup:{n}@alice") == "data:for-bob"
    allj = json.loads(bob.request(f"lookup:all:{n}@alice")[5:])
    assert allj["key"] == f"@bob:{n}@alice" and allj["data"] == "for-bob"
    assert bob.request(f"plookup:{n}@alice") == "data:everyone"
    assert json.loads(bob.request(f"plookup:all:{n}@alice")[5:])["key"] == f"public:{n}@alice"
    carol = shared_atserver.login("@carol")
    try:
        assert carol.request(f"lookup:{n}@alice") == "data:for-carol"
        # Nobody reads another atSign's self or private keys.
        assert carol.request("lookup:signing_privatekey@alice").startswith("error:AT0015")
        assert carol.request("plookup:at_pkam_publickey@alice").startswith("error:AT0015")
    finally:
        carol.close()
    # Owner's own lookup reads its self key.
    assert alice.request(f"lookup:{n}@alice") == "data:alice-only"
    # Unknown atSign (not hosted, no server-to-server yet).
    assert bob.request(f"lookup:{n}@nosuchatsign").startswith("error:AT0007")
    # Unauthenticated lookup reads public keys only.
    anon = shared_atserver.connect("@alice")
    try:
        assert anon.request(f"lookup:{n}@alice") == "data:everyone"
        assert anon.request("lookup:publickey@alice") == \
            "data:" + shared_atserver.keys("@alice").encrypt_public_b64
        assert anon.request("lookup:signing_privatekey@alice").startswith("error:AT0015")
    finally:
        anon.close()


def test_scan_visibility(shared_atserver, alice, bob):
    n = _name()
    alice.request(f"update:public:{n}@alice p")
    alice.request(f"update:{n}@alice s")
    alice.request(f"update:_{n}@alice hidden")
    alice.request(f"update:public:_{n}@alice hp")
    alice.request(f"update:public:__{n}@alice dhp")
    alice.request(f"update:@bob:{n}@alice sh")
    alice.request(f"update:@bob:_{n}@alice hsh")
    keys = json.loads(alice.request(f"scan {n}")[5:])
    assert sorted(keys) == sorted([f"public:{n}@alice", f"{n}@alice", f"@bob:{n}@alice"])
    shown = json.loads(alice.request(f"scan:showHidden:true {n}")[5:])
    assert sorted(shown) == sorted([*keys, f"_{n}@alice", f"public:__{n}@alice",
                                    f"@bob:_{n}@alice"])
    all_keys = json.loads(alice.request("scan:showHidden:true")[5:])
    assert not any(k.startswith(("privatekey:", "private:")) for k in all_keys)
    # Bob sees, on @alice, only what is shared with him and not hidden.
    assert json.loads(bob.request(f"scan:@alice {n}")[5:]) == [f"{n}@alice"]
    assert not any(n in k for k in json.loads(bob.request("scan")[5:])
                   if not k.startswith("cached:"))
    anon = shared_atserver.connect("@alice")
    try:
        assert json.loads(anon.request(f"scan {n}")[5:]) == [f"{n}@alice"]
    finally:
        anon.close()
    assert alice.request("scan (unclosed").startswith("error:AT0003")


def test_auto_notify_caches_shared_key_at_recipient(shared_atserver, alice, bob):
    n = _name("shared_key")
    alice.request(f"update:ttr:86400000:@bob:{n}@alice wrapped-key")
    assert bob.request(f"llookup:cached:@bob:{n}@alice") == "data:wrapped-key"
    meta = json.loads(bob.request(f"llookup:meta:cached:@bob:{n}@alice")[5:])
    assert meta["ttr"] == 86400000
    # lookup from bob is served (cache or owner) and equal.
    assert bob.request(f"lookup:{n}@alice") == "data:wrapped-key"
    # A key without ttr is not cached.
    alice.request(f"update:@bob:x{n}@alice v")
    assert bob.request(f"llookup:cached:@bob:x{n}@alice").startswith("error:AT0015")
    # Delete with ccd removes the cached copy.
    alice.request(f"update:ttr:1000:ccd:true:@bob:c{n}@alice v")
    assert bob.request(f"llookup:cached:@bob:c{n}@alice") == "data:v"
    alice.request(f"delete:@bob:c{n}@alice")
    assert bob.request(f"llookup:cached:@bob:c{n}@alice").startswith("error:AT0015")


def test_noop_info_stats_exit(shared_atserver, alice):
    assert alice.request("noop:5001").startswith("error:AT0022")
    assert alice.request("noop:1") == "data:ok"
    info = json.loads(alice.request("info")[5:])
    assert info["version"] and "uptimeAsWords" in info
    brief = json.loads(alice.request("info:brief")[5:])
    assert isinstance(brief["uptimeAsMillis"], int)
    alice.send("stats:3")
    line = alice.read_reply()
    assert line.startswith("data: [")
    stats = json.loads(line[len("data: "):])
    assert stats[0]["name"] == "lastCommitID" and int(stats[0]["value"]) >= 0
    alice.send("@exit")
    assert alice.closed_by_peer()


def test_pipelined_commands_answer_in_order(alice):
    n = _name()
    lines = [f"update:public:{n}{i}@alice v{i}" for i in range(50)]
    lines += [f"llookup:public:{n}{i}@alice" for i in range(50)]
    alice.sock.sendall(("\n".join(lines) + "\n").encode())
    replies = [alice.read_reply() for _ in lines]
    ids = [int(r[5:]) for r in replies[:50]]
    assert ids == sorted(ids) and len(set(ids)) == 50
    assert replies[50:] == [f"data:v{i}" for i in range(50)]


def test_stock_asyncio_loop(atserver):
    """The same server on the stock asyncio loop (--no-uvloop): pipelining, monitor without
    prompts, line cap."""
    srv = atserver("@alice", "@bob", args=("--no-uvloop", "--max-line", "4096"))
    mon = srv.login("@bob")
    mon.send("monitor")
    mon.prompt = ""
    alice = srv.login("@alice")
    try:
        lines = [f"notify:@bob:loop{i}@alice:v{i}" for i in range(20)]
        alice.sock.sendall(("\n".join(lines) + "\n").encode())
        ids = [alice.read_reply()[5:] for _ in lines]
        got = []
        while len(got) < len(ids):
            line = mon.read_line()
            if '"id":"-1"' not in line:
                got.append(json.loads(line[len("notification: "):])["id"])
        assert got == ids
        mon.send("noop:0")
        assert mon.read_chunk() == b"data:ok\n"
        alice.send("scan " + "x" * 5000)
        assert alice.read_line().startswith("error:AT0005")
        assert alice.closed_by_peer()
    finally:
        mon.close()
        alice.close()


def test_restart_keeps_ca_ports_and_data(atserver):
    srv = atserver("@alice", "@bob")
    ca = srv.ca_file.read_bytes()
    ports, root = dict(srv.ports), srv.root_port
    alice = srv.login("@alice")
    cid = int(alice.request("update:public:persist@alice kept")[5:])
    alice.close()
    assert srv.stop() == 0              # SIGTERM: orderly stop, exit code 0
    srv.start()
    assert srv.ca_file.read_bytes() == ca
    assert srv.ports == ports and srv.root_port == root
    alice = srv.login("@alice")
    try:
        assert alice.request("llookup:public:persist@alice") == "data:kept"
        assert int(alice.request("update:public:persist2@alice x")[5:]) > cid
    finally:
        alice.close()
    srv.proc.send_signal(2)             # SIGINT behaves the same
    assert srv.proc.wait(15) == 0
