"""noports.client.phases: npt's sans-IO decisions: what it sends, accepts, and how it fails."""

from __future__ import annotations

import json

import pytest

from noports.at.crypto import b64d, b64e, generate_rsa_private_key, public_key_to_b64
from noports.at.envelope import compact_json, encode_envelope
from noports.client.phases import (
    DEFAULT_TIMEOUT_S,
    EXIT_CODES,
    PHASES,
    PhaseError,
    SessionKeys,
    build_npt_request,
    check_features,
    ended_error,
    parse_relay_reply,
    read_ping_response,
    read_response,
    relay_request_body,
    required_features,
)
from noports.messages import (
    DaemonResponse,
    NptRequest,
    PingResponse,
    encrypt_session_secret,
    not_permitted_error,
)
from noports.relay.messages import (
    RelayReply,
    encode_reply_csv,
    encode_reply_json,
    parse_request_ports,
)
from noports.tunnel import TunnelEnded

SID = "0f8e1c2d-3b4a-4c5d-8e9f-a0b1c2d3e4f5"
KEY = bytes(range(32))
IV = bytes(range(100, 116))


@pytest.fixture(scope="module")
def daemon_key():
    return generate_rsa_private_key()


@pytest.fixture(scope="module")
def ephemeral():
    return generate_rsa_private_key()


@pytest.fixture(scope="module")
def stranger():
    return generate_rsa_private_key()


def _envelope(payload: dict, signer) -> str:
    return encode_envelope(payload, signer)


def _ok_payload(eph, session_id=SID, key=KEY, iv=IV, **extra) -> dict:
    payload = DaemonResponse(session_id, encrypt_session_secret(eph.public_key(), key),
                             encrypt_session_secret(eph.public_key(), iv)).to_payload()
    payload.update(extra)
    return payload


def _read(value, daemon_key, eph, *, encrypt=True, session_id=SID):
    return read_response(value, daemon="@daemon", daemon_key=daemon_key.public_key(),
                         session_id=session_id, ephemeral_key=eph, encrypt=encrypt)


# --- phases and exit codes ----------------------------------------------------------------------

def test_every_phase_has_its_own_exit_code_and_is_named_in_the_message():
    codes = [code for code, _ in PHASES.values()]
    assert len(set(codes)) == len(codes)
    assert not {0, 1, 2} & set(codes)
    for name, (code, what) in PHASES.items():
        err = PhaseError(name, "it broke")
        assert err.exit_code == code
        assert str(err).startswith(f"{name} phase failed ({what}): ")
        assert str(err).endswith("it broke")
    listed = [code for code, _ in EXIT_CODES]
    assert set(codes) <= set(listed) and len(set(listed)) == len(listed)


def test_unknown_phase_is_a_bug():
    with pytest.raises(ValueError):
        PhaseError("lunch", "x")


# --- relay --------------------------------------------------------------------------------------

def test_relay_request_is_atsigns_baseline_body_in_order():
    """Derived from the spec (§3.2): the baseline fields in the order Atsign's client writes."""
    body = relay_request_body(SID, "@client", "@daemon", "nonce-1")
    assert body == ('{"sessionId":"' + SID + '","atSignA":"@client","atSignB":"@daemon",'
                    '"authenticateSocketA":true,"authenticateSocketB":true,'
                    '"clientNonce":"nonce-1"}')
    # and our relay reads it as a fully authenticated request that wants a CSV reply
    req = parse_request_ports(body)
    assert req.fully_authenticated and not req.send_json_response
    assert (req.session_id, req.atsign_a, req.atsign_b, req.client_nonce) == \
        (SID, "@client", "@daemon", "nonce-1")


@pytest.mark.parametrize("text", [
    encode_reply_csv("relay.example", 40001, 40002, "n0nce"),
    encode_reply_json("relay.example", 40001, 40002, "n0nce"),
    # Atsign's newer relay: JSON with fields we do not use
    '{"address":"relay.example","portA":40001,"portB":40002,"rvdNonce":"n0nce",'
    '"supportsEventLogging":true,"autoDetectsRelayAuth":true,"future":[1]}',
])
def test_both_relay_reply_forms_are_accepted(text):
    reply = parse_relay_reply(text, "@relay")
    assert (reply.address, reply.port_a, reply.port_b, reply.rvd_nonce) == \
        ("relay.example", 40001, 40002, "n0nce")


@pytest.mark.parametrize("text, words", [
    ("relay.example,40001,40002,null", "without a relay nonce"),
    ("garbage", "malformed"),
    ('{"address":"x","portA":0,"portB":1,"rvdNonce":"n"}', "malformed"),
    (None, "could not be read"),
])
def test_unusable_relay_replies_fail_the_relay_phase(text, words):
    with pytest.raises(PhaseError) as info:
        parse_relay_reply(text, "@relay")
    assert info.value.phase == "relay" and words in str(info.value)
    assert "@relay" in str(info.value)


# --- ping ---------------------------------------------------------------------------------------

def test_required_features_follow_the_timeout():
    assert required_features(DEFAULT_TIMEOUT_S) == ["srAuth", "srE2ee", "supportsPortChoice"]
    assert required_features(60) == ["srAuth", "srE2ee", "supportsPortChoice",
                                     "adjustableTimeout"]


def _ping(**features) -> PingResponse:
    return PingResponse.from_json(json.dumps({"devicename": "dev", "version": "5.6.3",
                                              "supportedFeatures": features}))


def test_a_daemon_with_every_feature_passes():
    check_features(_ping(srAuth=True, srE2ee=True, supportsPortChoice=True,
                         adjustableTimeout=True), 3600, "@daemon", "dev")


def test_the_c_daemon_serves_the_default_timeout_only():
    """Atsign's C daemon 0.2.0 has no adjustableTimeout (spec §3.1)."""
    c_daemon = _ping(srAuth=True, srE2ee=True, acceptsPublicKeys=True, supportsPortChoice=True)
    check_features(c_daemon, DEFAULT_TIMEOUT_S, "@daemon", "dev")
    with pytest.raises(PhaseError) as info:
        check_features(c_daemon, 60, "@daemon", "dev")
    assert info.value.phase == "ping"
    assert "This device daemon" in str(info.value)
    assert "does not support adjustable timeouts (adjustableTimeout)" in str(info.value)
    assert "-T 30s" in str(info.value)


def test_a_v4_daemon_without_features_is_refused_naming_each_missing_one():
    v4 = PingResponse.from_json('{"devicename":"dev","version":"4.0.0"}')
    with pytest.raises(PhaseError) as info:
        check_features(v4, DEFAULT_TIMEOUT_S, "@daemon", "dev")
    for name in ("srAuth", "srE2ee", "supportsPortChoice"):
        assert name in str(info.value)
    assert "4.0.0" in str(info.value)


def test_a_feature_that_is_not_exactly_true_is_missing():
    with pytest.raises(PhaseError, match="srE2ee"):
        check_features(_ping(srAuth=True, srE2ee="yes", supportsPortChoice=True), 30,
                       "@daemon", "dev")


def test_malformed_ping_responses_fail_the_ping_phase():
    for text in ("not json", '{"supportedFeatures":[1]}', None):
        with pytest.raises(PhaseError) as info:
            read_ping_response(text, "@daemon")
        assert info.value.phase == "ping"


def test_ping_response_with_unknown_fields_is_read():
    ping = read_ping_response('{"devicename":"dev","supportedFeatures":{"srAuth":true,'
                              '"twinKeys":true},"npCpVersion":"1.5.0","authModes":["escr"]}',
                              "@daemon")
    assert ping.supported_features["srAuth"] is True and ping.devicename == "dev"


# --- request ------------------------------------------------------------------------------------

def test_npt_request_carries_port_b_both_nonces_the_key_and_timeout_ms(ephemeral):
    reply = RelayReply("10.0.0.9", 40001, 40002, "relay-nonce")
    pk = public_key_to_b64(ephemeral)
    req = build_npt_request(session_id=SID, reply=reply, remote_host="intranet", remote_port=8080,
                            client_nonce="client-nonce", encrypt=True, ephemeral_public_b64=pk,
                            timeout_s=4470)
    payload = req.to_payload()
    assert list(payload) == ["sessionId", "rvdHost", "rvdPort", "requestedPort", "requestedHost",
                             "authenticateToRvd", "clientNonce", "rvdNonce", "encryptRvdTraffic",
                             "clientEphemeralPK", "clientEphemeralPKType", "timeout"]
    assert payload["rvdHost"] == "10.0.0.9" and payload["rvdPort"] == 40002
    assert payload["requestedHost"] == "intranet" and payload["requestedPort"] == 8080
    assert payload["clientNonce"] == "client-nonce" and payload["rvdNonce"] == "relay-nonce"
    assert payload["clientEphemeralPK"] == pk and payload["clientEphemeralPKType"] == "rsa2048"
    assert payload["timeout"] == 4_470_000 and payload["authenticateToRvd"] is True
    # what the daemon parses back is what we meant
    assert NptRequest.from_payload(json.loads(compact_json(payload))) == req


# --- response -----------------------------------------------------------------------------------

def test_a_daemon_error_text_is_shown_as_it_is(daemon_key, ephemeral):
    text = not_permitted_error("localhost", 8080)
    with pytest.raises(PhaseError) as info:
        _read(text, daemon_key, ephemeral)
    assert info.value.phase == "request" and info.value.exit_code == PHASES["request"][0]
    assert "refused" in str(info.value)
    assert str(info.value).endswith("Daemon does not permit connections to localhost:8080")


def test_a_multi_line_error_text_becomes_one_line(daemon_key, ephemeral):
    with pytest.raises(PhaseError) as info:
        _read("Failed to start\nsomething : boom\n", daemon_key, ephemeral)
    assert "\n" not in str(info.value) and "Failed to start something : boom" in str(info.value)


def test_a_signed_response_gives_the_session_key_and_iv(daemon_key, ephemeral):
    keys = _read(_envelope(_ok_payload(ephemeral), daemon_key), daemon_key, ephemeral)
    assert keys == SessionKeys(b64e(KEY), b64e(IV))
    assert b64d(keys.key_b64) == KEY and b64d(keys.iv_b64) == IV


def test_twin_key_responses_and_unknown_fields_are_accepted(daemon_key, ephemeral):
    """Newer Dart daemons name the keys aesKeyC2D/ivC2D and add D2C keys and more (§3.5)."""
    pub = ephemeral.public_key()
    payload = {"status": "connected", "sessionId": SID,
               "aesKeyC2D": encrypt_session_secret(pub, KEY),
               "ivC2D": encrypt_session_secret(pub, IV),
               "aesKeyD2C": encrypt_session_secret(pub, bytes(32)),
               "ivD2C": encrypt_session_secret(pub, bytes(16)),
               "eventLoggingConfig": None, "somethingNew": {"x": [1, 2]}}
    keys = _read(_envelope(payload, daemon_key), daemon_key, ephemeral)
    assert keys == SessionKeys(b64e(KEY), b64e(IV))


def test_a_response_signed_by_anyone_else_is_refused(daemon_key, ephemeral, stranger):
    with pytest.raises(PhaseError) as info:
        _read(_envelope(_ok_payload(ephemeral), stranger), daemon_key, ephemeral)
    assert info.value.phase == "request" and "signature" in str(info.value)


def test_a_tampered_response_is_refused(daemon_key, ephemeral):
    env = json.loads(_envelope(_ok_payload(ephemeral), daemon_key))
    env["payload"]["status"] = "connected "
    with pytest.raises(PhaseError, match="signature"):
        _read(json.dumps(env, separators=(",", ":")), daemon_key, ephemeral)


def test_a_response_for_another_session_is_refused(daemon_key, ephemeral):
    other = "11111111-2222-4333-8444-555555555555"
    with pytest.raises(PhaseError, match="another session"):
        _read(_envelope(_ok_payload(ephemeral, session_id=other), daemon_key), daemon_key,
              ephemeral)


def test_keys_wrapped_for_another_key_are_refused(daemon_key, ephemeral, stranger):
    with pytest.raises(PhaseError, match="does not decrypt"):
        _read(_envelope(_ok_payload(stranger), daemon_key), daemon_key, ephemeral)


def test_keys_of_the_wrong_size_are_refused(daemon_key, ephemeral):
    payload = _ok_payload(ephemeral, key=bytes(16))
    with pytest.raises(PhaseError, match="wrong size"):
        _read(_envelope(payload, daemon_key), daemon_key, ephemeral)


def test_encrypted_session_without_keys_is_refused(daemon_key, ephemeral):
    payload = DaemonResponse(SID, None, None).to_payload()
    with pytest.raises(PhaseError, match="no session key"):
        _read(_envelope(payload, daemon_key), daemon_key, ephemeral)
    # ... but is what an unencrypted session expects
    assert _read(_envelope(payload, daemon_key), daemon_key, ephemeral, encrypt=False) == \
        SessionKeys(None, None)


def test_a_status_other_than_connected_is_refused(daemon_key, ephemeral):
    payload = _ok_payload(ephemeral, status="failed")
    with pytest.raises(PhaseError, match="status"):
        _read(_envelope(payload, daemon_key), daemon_key, ephemeral)


# --- the end of a running tunnel ----------------------------------------------------------------

def test_normal_ends_are_not_errors():
    assert ended_error(TunnelEnded("idle", "no connections for 30 s")) is None
    assert ended_error(TunnelEnded("closed", "closed by its owner")) is None
    assert ended_error(None) is None


@pytest.mark.parametrize("reason, phase, words", [
    ("relay_refused", "tunnel", "relay refused"),
    ("control_closed", "session", "daemon or the relay"),
    ("control_reset", "session", "relay or the device daemon has gone"),
    ("protocol_error", "session", "garbage"),
    ("internal_error", "session", "internal_error"),
])
def test_abnormal_ends_name_their_phase(reason, phase, words):
    err = ended_error(TunnelEnded(reason, "details here"))
    assert err is not None and err.phase == phase and words in str(err)
    assert err.exit_code == PHASES[phase][0]


def test_an_end_before_the_port_was_reported_is_the_tunnel_phase():
    err = ended_error(TunnelEnded("control_closed", "x"), started=False)
    assert err.phase == "tunnel"
