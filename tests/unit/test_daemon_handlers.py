"""noports.daemon.handlers (sans-IO decisions) and the parts of noports.daemon.daemon that need
no sockets: the screen, request checks, the signed response, the sessionId ledger, the drop
log, the counters, the state file, and that a stranger's notification touches nothing."""

from __future__ import annotations

import base64
import json
import logging
import stat

import pytest

from noports.at.crypto import generate_rsa_private_key
from noports.at.envelope import encode_envelope, verify_envelope
from noports.at.monitor import notification_from_json
from noports.daemon.daemon import DaemonConfig, Npd, StateStore
from noports.daemon.handlers import (
    DaemonPolicy,
    DaemonStats,
    Drop,
    DropLog,
    SessionKeys,
    SessionLedger,
    build_response,
    classify,
    new_session_keys,
    parse_request_envelope,
)
from noports.messages import (
    DaemonResponse,
    MessageError,
    NptRequest,
    decrypt_session_secret,
)

SID = "3a4c9e1f-5b2d-4e8a-9c7f-0d1e2f3a4b5c"


@pytest.fixture(scope="module")
def rsa():
    return generate_rsa_private_key(), generate_rsa_private_key()


def policy(**kw) -> DaemonPolicy:
    base = dict(atsign="@daemon", managers=["@client"], device="dev",
                permit_open=["localhost:22", "*:8080"])
    base.update(kw)
    return DaemonPolicy(**base)


def request(**kw) -> NptRequest:
    base = dict(session_id=SID, rvd_host="127.0.0.1", rvd_port=4000, requested_port=22,
                requested_host="localhost", client_nonce="cn", rvd_nonce="rn",
                client_ephemeral_pk="MIIB")
    base.update(kw)
    return NptRequest(**base)


# --- screen -----------------------------------------------------------------------------

def test_classify():
    assert classify("ping.dev.sshnp", "dev") == "ping"
    assert classify("npt_request.dev.sshnp", "dev") == "npt_request"
    assert classify("ping.other.sshnp", "dev") is None
    assert classify("x.y.dev.sshnp", "dev") is None
    assert classify(".dev.sshnp", "dev") is None
    assert classify("ping.dev.sshrvd", "dev") is None


@pytest.mark.parametrize(("kw", "expected"), [
    (dict(entity="ping.dev.sshnp", sender="@client", recipient="@daemon"), "ping"),
    (dict(entity="npt_request.dev.sshnp", sender="@client", recipient="@daemon"),
     "npt_request"),
    (dict(entity="ping.dev.sshnp", sender="@mallory", recipient="@daemon"), "not_manager"),
    (dict(entity="npt_request.dev.sshnp", sender="@mallory", recipient="@daemon"),
     "not_manager"),
    (dict(entity="anything", sender="@mallory", recipient="@daemon"), "not_manager"),
    (dict(entity="ping.dev.sshnp", sender="@client", recipient="@other"), "not_for_me"),
    (dict(entity="ping.other.sshnp", sender="@client", recipient="@daemon"), "not_for_device"),
    (dict(entity="ping.dev.sshnp", sender="@client", recipient="@daemon", operation="delete"),
     "not_update"),
    (dict(entity="ssh_request.dev.sshnp", sender="@client", recipient="@daemon"),
     "unsupported"),
    (dict(entity="sshpublickey.dev.sshnp", sender="@client", recipient="@daemon"),
     "unsupported"),
])
def test_screen(kw, expected):
    verdict = policy().screen(**kw)
    got = verdict.reason if isinstance(verdict, Drop) else verdict
    assert got == expected


def test_policy_refuses_empty_configuration():
    with pytest.raises(ValueError):
        policy(managers=[])
    with pytest.raises(ValueError):
        policy(permit_open=[])


def test_ping_response_is_built_from_the_configuration():
    obj = json.loads(policy(device_group="g").ping_response())
    assert obj["devicename"] == "dev" and obj["deviceGroupName"] == "g"
    assert obj["allowedServices"] == ["localhost:22", "*:8080"]


def test_check_request():
    p = policy()
    assert p.check_request(request()) is None
    assert p.check_request(request(requested_host="other", requested_port=8080)) is None
    assert p.check_request(request(requested_port=23)) == \
        "Daemon does not permit connections to localhost:23"
    assert p.check_request(request(requested_host="127.0.0.1")) == \
        "Daemon does not permit connections to 127.0.0.1:22"
    assert "rsa2048" in p.check_request(request(client_ephemeral_pk_type="ed25519"))
    assert "authenticateToRvd" in p.check_request(request(authenticate_to_rvd=False))
    assert "rvdNonce" in p.check_request(request(rvd_nonce=None))
    # an unencrypted session carries no key type worth checking
    assert p.check_request(request(encrypt_rvd_traffic=False,
                                   client_ephemeral_pk_type="x")) is None


# --- request envelope, response ------------------------------------------------------------

def test_parse_request_envelope(rsa):
    client, _ = rsa
    text = encode_envelope(request().to_payload(), client)
    env, req = parse_request_envelope(text)
    assert req == request()
    assert verify_envelope(env, client.public_key()) == env["payload"]
    for bad in (None, "", "[]", "not json", '{"payload":[]}', '{"signature":"x"}',
                json.dumps({"payload": {"sessionId": SID}})):
        with pytest.raises(MessageError):
            parse_request_envelope(bad)


def test_build_response_round_trip(rsa):
    daemon, ephemeral = rsa
    keys = new_session_keys()
    text = build_response(request(), keys, daemon, ephemeral.public_key())
    env = json.loads(text)
    assert list(env["payload"]) == ["status", "sessionId", "sessionAESKey", "sessionIV"]
    payload = verify_envelope(text, daemon.public_key())
    resp = DaemonResponse.from_payload(payload)
    assert resp.status == "connected" and resp.session_id == SID
    assert decrypt_session_secret(ephemeral, resp.session_aes_key) == keys.key
    assert decrypt_session_secret(ephemeral, resp.session_iv) == keys.iv
    plain = verify_envelope(build_response(request(encrypt_rvd_traffic=False), None, daemon,
                                           None), daemon.public_key())
    assert plain["sessionAESKey"] is None and plain["sessionIV"] is None
    with pytest.raises(ValueError):
        build_response(request(), keys, daemon, None)


def test_session_keys_are_fresh_and_never_in_a_repr():
    a, b = new_session_keys(), new_session_keys()
    assert (len(a.key), len(a.iv)) == (32, 16) and a.key != b.key and a.iv != b.iv
    assert a.key_b64 not in repr(a) and a.iv_b64 not in repr(a)
    fixed = SessionKeys(b"k" * 32, b"i" * 16)
    assert (fixed.key_b64, fixed.iv_b64) == (base64.b64encode(b"k" * 32).decode(),
                                             base64.b64encode(b"i" * 16).decode())


# --- the ledger ----------------------------------------------------------------------------

def test_ledger_claims_once_and_forgets_after_its_memory():
    ledger = SessionLedger(memory_ms=1000)
    assert ledger.claim("a", 0) is True
    assert ledger.claim("a", 10) is False
    assert ledger.claim("b", 500) is True
    assert ledger.claim("a", 999) is False
    assert ledger.claim("a", 1000) is True      # forgotten, then claimed afresh
    assert "b" in ledger
    ledger.prune(1501)
    assert "b" not in ledger and "a" in ledger


def test_ledger_is_bounded_and_round_trips():
    ledger = SessionLedger(memory_ms=10_000, max_entries=3)
    for i in range(5):
        assert ledger.claim(f"s{i}", i)
    assert len(ledger) == 3 and "s0" not in ledger and "s4" in ledger
    again = SessionLedger.from_dict(json.loads(json.dumps(ledger.to_dict())), now_ms=5,
                                    memory_ms=10_000, max_entries=3)
    assert again.to_dict() == ledger.to_dict()
    assert again.claim("s4", 6) is False
    # malformed or expired entries in a persisted file are skipped, never fatal
    odd = SessionLedger.from_dict({"x": "soon", "y": True, "z": 5, "w": 10_050, 7: 1},
                                  now_ms=100)
    assert odd.to_dict() == {"w": 10_050}
    assert len(SessionLedger.from_dict(["not", "a", "dict"], now_ms=0)) == 0


# --- drop log, counters --------------------------------------------------------------------

class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_drop_log_first_per_sender_then_rate_limited(caplog):
    clock = _Clock()
    logger = logging.getLogger("test.droplog")
    log = DropLog(logger, window=60, max_lines=3, clock=clock)
    drop = Drop("not_manager", "x")
    with caplog.at_level(logging.INFO, logger="test.droplog"):
        assert log("@a", drop) is True
        assert log("@a", drop) is False          # same sender inside the window
        assert log("@b", drop) is True
        assert log("@c", drop) is True
        assert log("@d", drop) is False          # max_lines per window reached
        clock.now = 61
        assert log("@a", drop) is True          # a new window
    messages = [r.getMessage() for r in caplog.records]
    assert sum("dropped (not_manager)" in m for m in messages) == 4
    assert any("2 more notification(s)" in m for m in messages)


def test_stats_render_always_shows_unauthorised_counters():
    stats = DaemonStats()
    text = stats.render()
    assert 'noports_npd_decrypt_attempts_total{authorized="false"} 0' in text
    assert 'noports_npd_lookups_total{authorized="false"} 0' in text
    stats.dropped["not_manager"] += 3
    stats.decrypt_attempts["true"] += 1
    text = stats.render()
    assert 'noports_npd_dropped_total{reason="not_manager"} 3' in text
    assert 'noports_npd_decrypt_attempts_total{authorized="true"} 1' in text


# --- the state file ---------------------------------------------------------------------------

def test_state_store_round_trip_and_damage(tmp_path, caplog):
    store = StateStore(tmp_path / "state")
    store.prepare()
    epoch, fresh = store.load(0)
    assert epoch is None and len(fresh) == 0
    ledger = SessionLedger()
    ledger.claim("s1", 1000)
    store.save(123456, ledger)
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    epoch, again = store.load(2000)
    assert epoch == 123456 and "s1" in again
    store.path.write_text("{ damaged")
    with caplog.at_level(logging.WARNING, logger="noports.daemon"):
        epoch, again = store.load(2000)
    assert epoch is None and len(again) == 0
    assert any("unreadable state file" in r.getMessage() for r in caplog.records)
    assert StateStore(None).load(0)[0] is None      # in memory only: nothing to read


# --- a stranger's notification costs nothing --------------------------------------------------

class _TouchNothing:
    """An AtClient stand-in that fails the test if anything is asked of it."""

    atsign = "@daemon"

    def __getattr__(self, name):
        raise AssertionError(f"npd used the client ({name}) for a non-manager")


def test_non_manager_notifications_touch_nothing():
    npd = Npd(_TouchNothing(), DaemonConfig(atsign="@daemon", managers=("@client",),
                                            device="dev"))
    for entity, value in (("ping.dev.sshnp", "ping"), ("npt_request.dev.sshnp", "{}"),
                          ("shared_key", "x")):
        n = notification_from_json({
            "id": entity, "from": "@mallory", "to": "@daemon",
            "key": f"@daemon:{entity}@mallory", "value": value, "operation": "update",
            "epochMillis": 1, "isEncrypted": True,
            "metadata": {"sharedKeyEnc": "abc", "pubKeyCS": "def", "ivNonce": "AAAA"}})
        assert npd.dispatch(n) is None
    assert npd.stats.dropped["not_manager"] == 3
    assert npd.stats.decrypt_attempts["false"] == 0 and npd.stats.lookups["false"] == 0
