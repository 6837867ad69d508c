"""noports.messages: the client <-> daemon messages Atsign's programs read (sans-IO)."""

from __future__ import annotations

import base64
import json
import re

import pytest
from cryptography.hazmat.primitives.asymmetric import padding as asym_padding
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from noports.at.crypto import generate_rsa_private_key, public_key_to_b64
from noports.at.envelope import compact_json, encode_envelope, verify_envelope
from noports.errors import AtProtocolError
from noports.messages import (
    FEATURES,
    FOREVER_SECONDS,
    DaemonResponse,
    MessageError,
    NptRequest,
    PingResponse,
    client_monitor_regex,
    daemon_monitor_regex,
    decrypt_session_secret,
    device_info_key,
    encrypt_session_secret,
    heartbeat_key,
    is_error_reply,
    not_permitted_error,
    npt_request_key,
    parse_atsign_list,
    parse_duration,
    parse_permit_open,
    permits,
    ping_key,
    relay_request_key,
    response_key,
    signature_error,
    tunnel_error,
    username_key,
)

SID = "3a4c9e1f-5b2d-4e8a-9c7f-0d1e2f3a4b5c"


@pytest.fixture(scope="module")
def rsa_pair():
    return generate_rsa_private_key()


@pytest.fixture(scope="module")
def other_rsa():
    return generate_rsa_private_key()


# --- key names ------------------------------------------------------------------------------

def test_key_names_derived_from_the_spec():
    """Derived from the spec (§2.3 rows 1-4, 7, 8, 11): the entity names of every key."""
    assert ping_key("default") == "ping.default.sshnp"
    assert heartbeat_key("default") == "heartbeat.default.sshnp"
    assert npt_request_key("my_dev") == "npt_request.my_dev.sshnp"
    assert response_key(SID, "default") == f"{SID}.default.sshnp"
    assert device_info_key("d1") == "device_info.d1.sshnp"
    assert username_key("d1") == "username.d1.sshnp"
    assert relay_request_key("d1") == "d1.request_ports.sshrvd"


def test_daemon_regex_matches_its_keys_only():
    """Derived from the spec (§2.3 subscriptions): the daemon monitors ``<device>\\.sshnp@``."""
    rx = daemon_monitor_regex("default")
    assert rx == r"default\.sshnp@"
    assert re.search(rx, "@daemon:ping.default.sshnp@client")
    assert re.search(rx, "@daemon:npt_request.default.sshnp@client")
    assert not re.search(rx, "@daemon:ping.other.sshnp@client")
    assert not re.search(rx, "@daemon:x.default.sshrvd@client")
    assert re.search(daemon_monitor_regex("a-b"), "@d:ping.a-b.sshnp@c")


def test_client_regex_matches_response_heartbeat_relay_reply():
    rx = client_monitor_regex(SID, "default", "@Daemon")
    assert re.search(rx, f"@client:{SID}.default.sshnp@daemon")
    assert re.search(rx, "@client:heartbeat.default.sshnp@daemon")
    assert re.search(rx, f"@client:{SID}.sshrvd@relay")
    assert re.search(rx, f"@client:nack.{SID}.sshrvd@relay")
    assert not re.search(rx, "@client:heartbeat.default.sshnp@mallory")
    assert not re.search(rx, f"@client:{SID}.other.sshnp@daemon")
    assert not re.search(rx, "@client:ffff.sshrvd@relay")


# --- ping response ----------------------------------------------------------------------------

def test_ping_response_json_dart_order_derived_from_the_spec():
    """Derived from the spec (§3.1): field order of the Dart daemon, compact JSON, features of a
    Dart daemon started without -s minus everything we do not implement."""
    ping = PingResponse("default", version="0.1.0", core_package_version="py0.1.0",
                        allowed_services=["localhost:22", "localhost:3389"])
    assert ping.to_json() == (
        '{"devicename":"default","deviceGroupName":"__none__","version":"0.1.0",'
        '"corePackageVersion":"py0.1.0","supportedFeatures":{"srAuth":true,"srE2ee":true,'
        '"acceptsPublicKeys":false,"supportsPortChoice":true,"adjustableTimeout":true,'
        '"controlChannelHeartbeats":true},'
        '"allowedServices":["localhost:22","localhost:3389"]}'
    )


def test_ping_response_advertises_only_implemented_features():
    features = PingResponse("d").supported_features
    assert {k for k, v in features.items() if v} == set(FEATURES)
    for unimplemented in ("acceptsPublicKeys", "twinKeys", "supportsRamEscr"):
        assert features.get(unimplemented) is not True
    # what npt requires (§3.1): srAuth, srE2ee, supportsPortChoice, adjustableTimeout
    assert PingResponse("d").missing_features(list(FEATURES)) == []
    assert PingResponse("d").missing_features(["twinKeys"]) == ["twinKeys"]


def test_ping_response_liberal_parse():
    """Derived from the spec (§3.1): a newer Dart daemon's extra fields are ignored."""
    newer = json.dumps({
        "devicename": "pi", "deviceGroupName": "g", "version": "5.15.0",
        "corePackageVersion": "6.16.0",
        "supportedFeatures": {"srAuth": True, "srE2ee": True, "acceptsPublicKeys": False,
                              "supportsPortChoice": True, "adjustableTimeout": True,
                              "controlChannelHeartbeats": True, "twinKeys": True,
                              "weird": "yes"},
        "allowedServices": ["*:*"], "authModes": ["payload", "escr"], "npCpVersion": "1.5.0",
        "publicSigningKeyUri": "public:x@y",
    })
    p = PingResponse.from_json(newer)
    assert (p.devicename, p.device_group_name, p.version) == ("pi", "g", "5.15.0")
    assert p.supported_features["twinKeys"] is True
    assert p.supported_features["weird"] is False          # not exactly true -> not supported
    assert p.allowed_services == ["*:*"]
    # C daemon 0.2.0: no deviceGroupName, no adjustableTimeout
    c = PingResponse.from_json('{"devicename":"x","version":"0.2.0","corePackageVersion":"c0.1.0",'
                               '"supportedFeatures":{"srAuth":true,"srE2ee":true,'
                               '"acceptsPublicKeys":false,"supportsPortChoice":true},'
                               '"allowedServices":["localhost:22"]}')
    assert c.device_group_name == "__none__"
    assert c.missing_features(list(FEATURES)) == ["adjustableTimeout", "controlChannelHeartbeats"]
    # v4 daemon: no supportedFeatures at all -> only acceptsPublicKeys
    v4 = PingResponse.from_json('{"devicename":"old","version":"4.0.5"}')
    assert v4.supported_features == {"acceptsPublicKeys": True}
    assert v4.allowed_services == []


def test_ping_response_round_trip():
    p = PingResponse("dev_1", device_group_name="grp", allowed_services=["h:1", "*:*"])
    assert PingResponse.from_json(p.to_json()) == p


@pytest.mark.parametrize("text", ["", "[]", "null", "{", '{"supportedFeatures":[]}',
                                  '{"allowedServices":"x"}', '{"allowedServices":[1]}',
                                  '{"devicename":5}', b"\xff\xfe", '{"version":NaN}'])
def test_ping_response_garbage(text):
    with pytest.raises(MessageError):
        PingResponse.from_json(text)


# --- npt_request --------------------------------------------------------------------------

def _request(**kw) -> NptRequest:
    base = dict(session_id=SID, rvd_host="127.0.0.1", rvd_port=40001, requested_port=22,
                requested_host="localhost", client_nonce="2024-06-18T09:48:41.331275",
                rvd_nonce="q7Jm2xV9cR4tY1wZ8nB3kL6p", client_ephemeral_pk="MIIBIjAN",
                timeout_ms=30_000)
    base.update(kw)
    return NptRequest(**base)


def test_npt_request_payload_order_derived_from_the_spec():
    """Derived from the spec (§3.4): baseline field order and value types, compact JSON."""
    payload = _request().to_payload()
    assert list(payload) == ["sessionId", "rvdHost", "rvdPort", "requestedPort", "requestedHost",
                             "authenticateToRvd", "clientNonce", "rvdNonce", "encryptRvdTraffic",
                             "clientEphemeralPK", "clientEphemeralPKType", "timeout"]
    assert compact_json(payload) == (
        '{"sessionId":"3a4c9e1f-5b2d-4e8a-9c7f-0d1e2f3a4b5c","rvdHost":"127.0.0.1",'
        '"rvdPort":40001,"requestedPort":22,"requestedHost":"localhost",'
        '"authenticateToRvd":true,"clientNonce":"2024-06-18T09:48:41.331275",'
        '"rvdNonce":"q7Jm2xV9cR4tY1wZ8nB3kL6p","encryptRvdTraffic":true,'
        '"clientEphemeralPK":"MIIBIjAN","clientEphemeralPKType":"rsa2048","timeout":30000}'
    )


def test_npt_request_signed_round_trip(rsa_pair, other_rsa):
    req = _request(client_ephemeral_pk=public_key_to_b64(other_rsa.public_key()))
    text = encode_envelope(req.to_payload(), rsa_pair)
    back = NptRequest.from_payload(verify_envelope(text, rsa_pair.public_key()))
    assert back == req
    assert back.timeout == 30.0


def test_npt_request_liberal_parse():
    """Derived from the spec (§3.4, §13): newer fields ignored; no timeout means 60 s."""
    payload = _request().to_payload()
    del payload["timeout"]
    payload["relayAuthMode"] = "payload"
    payload["relayAuthAesKey"] = None
    payload["twinKeys"] = False
    payload["relayAtsign"] = "@relay"
    req = NptRequest.from_payload(payload)
    assert req.timeout_ms == 60_000 and req.timeout == 60.0
    assert req.requested_port == 22
    # requestedHost absent -> localhost; rvdNonce null (legacy relay) allowed
    payload2 = _request().to_payload()
    del payload2["requestedHost"]
    payload2["rvdNonce"] = None
    req2 = NptRequest.from_payload(payload2)
    assert req2.requested_host == "localhost" and req2.rvd_nonce is None


@pytest.mark.parametrize("mutate", [
    lambda p: p.pop("sessionId"),
    lambda p: p.pop("rvdHost"),
    lambda p: p.pop("rvdPort"),
    lambda p: p.pop("requestedPort"),
    lambda p: p.update(sessionId=5),
    lambda p: p.update(sessionId="../../x"),
    lambda p: p.update(rvdPort="40001"),
    lambda p: p.update(rvdPort=True),
    lambda p: p.update(rvdPort=0),
    lambda p: p.update(requestedPort=70000),
    lambda p: p.update(requestedPort=22.0),
    lambda p: p.update(requestedHost=""),
    lambda p: p.update(rvdHost=["x"]),
    lambda p: p.update(timeout="60000"),
    lambda p: p.update(timeout=0),
    lambda p: p.update(encryptRvdTraffic="yes"),
    lambda p: p.update(clientEphemeralPK=""),
    lambda p: p.update(clientNonce={"a": 1}),
])
def test_npt_request_malformed(mutate):
    payload = _request().to_payload()
    mutate(payload)
    with pytest.raises(MessageError):
        NptRequest.from_payload(payload)


def test_npt_request_not_a_dict():
    for bad in (None, [], "x", 5):
        with pytest.raises(MessageError):
            NptRequest.from_payload(bad)


# --- daemon response --------------------------------------------------------------------------

def test_daemon_response_payload_order_derived_from_the_spec():
    """Derived from the spec (§3.5): baseline npt order status, sessionId, sessionAESKey,
    sessionIV."""
    resp = DaemonResponse(SID, "K==", "I==")
    assert compact_json(resp.to_payload()) == (
        '{"status":"connected","sessionId":"3a4c9e1f-5b2d-4e8a-9c7f-0d1e2f3a4b5c",'
        '"sessionAESKey":"K==","sessionIV":"I=="}'
    )
    assert compact_json(DaemonResponse(SID, None, None).to_payload()).endswith(
        '"sessionAESKey":null,"sessionIV":null}')


def test_daemon_response_twin_key_names_accepted():
    """Derived from the spec (§3.5 [NEW]): ``sessionAESKey ?? aesKeyC2D``."""
    newer = {"status": "connected", "sessionId": SID, "aesKeyC2D": "C", "ivC2D": "V",
             "aesKeyD2C": "D", "ivD2C": "W", "eventLoggingConfig": None}
    r = DaemonResponse.from_payload(newer)
    assert (r.session_aes_key, r.session_iv, r.aes_key_d2c, r.iv_d2c) == ("C", "V", "D", "W")
    both = dict(newer, sessionAESKey="S", sessionIV="T")
    r2 = DaemonResponse.from_payload(both)
    assert (r2.session_aes_key, r2.session_iv) == ("S", "T")
    assert DaemonResponse.from_payload(DaemonResponse(SID, "a", "b").to_payload()) == \
        DaemonResponse(SID, "a", "b")


@pytest.mark.parametrize("payload", [{}, {"sessionId": 1}, {"sessionId": SID, "sessionIV": 3},
                                     {"sessionId": SID, "status": False}, [], None])
def test_daemon_response_malformed(payload):
    with pytest.raises(MessageError):
        DaemonResponse.from_payload(payload)


def test_error_strings_derived_from_the_spec():
    """Derived from the spec (§3.6): the baseline wording, byte for byte."""
    assert not_permitted_error("localhost", 22) == \
        "Daemon does not permit connections to localhost:22"
    assert signature_error(ValueError("bad")) == "Signature not verified: bad"
    assert tunnel_error("refused") == \
        "Failed to start up the daemon side of the srv socket tunnel : refused"
    assert is_error_reply(not_permitted_error("h", 1))
    assert not is_error_reply('{"payload":{}}')
    assert is_error_reply(None)


# --- session secret wrapping ------------------------------------------------------------------

def test_session_secret_round_trip_derived_from_the_spec(rsa_pair, other_rsa):
    """Derived from the spec (§3.5): RSA-PKCS#1 v1.5 over the UTF-8 of the *base64 text*."""
    raw = bytes(range(32))
    wrapped = encrypt_session_secret(rsa_pair.public_key(), raw)
    # decrypt independently of the module: the plaintext is the base64 text of the raw key
    inner = rsa_pair.decrypt(base64.b64decode(wrapped), asym_padding.PKCS1v15())
    assert inner == base64.b64encode(raw)
    assert decrypt_session_secret(rsa_pair, wrapped) == raw
    iv = bytes(range(16))
    assert decrypt_session_secret(rsa_pair, encrypt_session_secret(rsa_pair.public_key(), iv)) == iv
    # wrapped the other way round (as a Dart daemon would): our decrypt reads it
    foreign = base64.b64encode(rsa_pair.public_key().encrypt(
        base64.b64encode(raw), asym_padding.PKCS1v15())).decode()
    assert decrypt_session_secret(rsa_pair, foreign) == raw
    with pytest.raises(MessageError):
        decrypt_session_secret(other_rsa, wrapped)
    for bad in ("", "not base64!", "QUJD", None):
        with pytest.raises(MessageError):
            decrypt_session_secret(rsa_pair, bad)


# --- permit-open ----------------------------------------------------------------------------

# (entry list, host, port, expected): the §8.2 rule, exact string comparison
PERMIT_TABLE = [
    (["localhost:22"], "localhost", 22, True),
    (["localhost:22"], "localhost", 23, False),
    (["localhost:22"], "127.0.0.1", 22, False),       # no DNS/IP normalisation
    (["*:22"], "anything", 22, True),
    (["*:22"], "anything", 80, False),
    (["localhost:*"], "localhost", 65535, True),
    (["localhost:*"], "otherhost", 22, False),
    (["*:*"], "x", 1, True),
    ([], "localhost", 22, False),
    (["localhost:22", "localhost:3389"], "localhost", 3389, True),
    (["Localhost:22"], "localhost", 22, False),       # exact, case included
]


@pytest.mark.parametrize(("entries", "host", "port", "expected"), PERMIT_TABLE)
def test_permits_table_derived_from_the_spec(entries, host, port, expected):
    """Derived from the spec (§8.2): host:port, *:port, host:* and *:* match; nothing else."""
    assert permits(entries, host, port) is expected
    assert permits(entries, host, str(port)) is expected


def test_parse_permit_open():
    assert parse_permit_open("localhost:22,localhost:3389") == ["localhost:22", "localhost:3389"]
    assert parse_permit_open(" *:80 , h:* ,*:*") == ["*:80", "h:*", "*:*"]
    assert parse_permit_open("[::1]:22") == ["[::1]:22"]
    assert parse_permit_open("a:1,a:1") == ["a:1"]


@pytest.mark.parametrize("text", ["", "  ", ",", "localhost", ":22", "h:", "h:0", "h:65536",
                                  "h:x", "h:22,", "a b:22", "h:٣", "h:-1"])
def test_parse_permit_open_refuses(text):
    with pytest.raises(MessageError):
        parse_permit_open(text)


# --- durations and atSign lists ---------------------------------------------------------------

@pytest.mark.parametrize(("text", "seconds"), [
    ("30s", 30), ("1h", 3600), ("1h,14m,30s", 3600 + 14 * 60 + 30), ("7d", 7 * 86400),
    ("90", 90), ("0", FOREVER_SECONDS), ("0s", FOREVER_SECONDS), ("2M", 120),
])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "x", "1w", "1h,", "-5s", "1.5h", "s", "1h 2m"])
def test_parse_duration_refuses(text):
    with pytest.raises(MessageError):
        parse_duration(text)


def test_parse_atsign_list():
    assert parse_atsign_list("@Alice, bob,@alice") == ["@alice", "@bob"]
    for bad in ("", " ", "@a,", ",@a", "@a b"):
        with pytest.raises(MessageError):
            parse_atsign_list(bad)


# --- garbage -> only MessageError ---------------------------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=20,
)
_keys = st.sampled_from(["sessionId", "rvdHost", "rvdPort", "requestedPort", "requestedHost",
                         "authenticateToRvd", "clientNonce", "rvdNonce", "encryptRvdTraffic",
                         "clientEphemeralPK", "clientEphemeralPKType", "timeout", "status",
                         "sessionAESKey", "sessionIV", "aesKeyC2D", "ivC2D", "devicename",
                         "supportedFeatures", "allowedServices"])
_payloads = st.dictionaries(_keys | st.text(max_size=8), _json, max_size=14)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_payloads)
def test_garbage_payloads_raise_only_message_error(payload):
    for parse in (NptRequest.from_payload, DaemonResponse.from_payload):
        try:
            parse(payload)
        except MessageError:
            pass
    try:
        PingResponse.from_json(json.dumps(payload))
    except MessageError:
        pass


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.text(max_size=200), st.binary(max_size=200)))
def test_garbage_text_raises_only_message_error(text):
    for parse in (PingResponse.from_json, parse_permit_open, parse_duration, parse_atsign_list):
        try:
            parse(text)
        except MessageError:
            pass


@settings(max_examples=50, deadline=None)
@given(st.text(max_size=400))
def test_garbage_secret_raises_only_message_error(rsa_pair, text):
    try:
        decrypt_session_secret(rsa_pair, text)
    except MessageError:
        pass


def test_message_error_is_a_protocol_error():
    assert issubclass(MessageError, AtProtocolError)
    assert issubclass(MessageError, ValueError)
