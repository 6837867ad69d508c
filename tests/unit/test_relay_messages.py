"""noports.relay.messages: the relay's requests, replies, nonce and auth line (sans-IO)."""

from __future__ import annotations

import itertools
import json

import pytest

from noports.at.atkeys import AtKeys
from noports.at.crypto import private_key_from_b64
from noports.relay.messages import (
    AUTH_FAILED_LINE,
    AuthVerifier,
    RelayAuthError,
    RelayMessageError,
    RelayReply,
    encode_auth_line,
    encode_reply,
    encode_reply_csv,
    encode_reply_json,
    new_relay_nonce,
    parse_legacy_request,
    parse_reply,
    parse_request_ports,
)

# A throwaway RSA-2048 key made with `openssl genpkey` for these vectors (PKCS#8 DER, base64, as
# .atKeys files hold it), and the signature `openssl dgst -sha256 -sign` made over KAT_PAYLOAD:
# independent of the code under test.
KAT_KEY_B64 = (
    "MIIEvAIBADANBgkqhkiG9w0BAQEFAASCBKYwggSiAgEAAoIBAQDK/qUAwN/rslkZWMw5H0OBMDwX+LpUOEDQr6P2"
    "Pu1ENddla0obK2lebt62vEyF7ZUgIBeT6kiFuDltdNGowd3MOa5AXPJqLL+n3BBAXAxP59zVfypGddnf85Pw0lol"
    "q6mIfsyeiGZtXcOHQfykMVxKnnmSdXzIdnkTKR1Qh4vS6S3hNxPql+4yGTWviyBdc9gkidAC2VcjfVjFPx6gAD5+"
    "v/7axAnblzAfoC6nsu34TMW9i8g/z2f3IiyKoCKTHxOPBQj2I51Y6HA1qWkE4Rkc29q6+rC5ihjI9fyoH6Y5fSCF"
    "yXcS+ws5260iVLCz7BRSIe87EnsksUNYin4UJoN1AgMBAAECggEACSw2uwu8IpZUId8qF/ZdHR2XnZKwTXAe96nJ"
    "fC4C7THh+j5996/Uv/8SYnSsSuH95YN7D+9GgypcXUvp0cPJjg9Y29DcuxEAwROiirH4yXSQp/dqKuBrmGEqlnd+"
    "5NRhYbOvHdvL2xXL/n+WwbmhnL/qqO7/qj72QM17D7bsSdBfHgAArNWvDDX/Z0rRlACj2R6K0uMDMOny8j/5sI/x"
    "ELsBabfRzEDrLNAGhi7h5Z8d1NLHCrFXt7cKhY+dQ5eIjq6+rLBLKoq3nLmWAqExjIDrsedaeSsUAwOiTbhIcky+"
    "V3NTtm+JLcWsvOmnZ2NU1YSKwQVhdoTwJHKD3JZHcQKBgQD1zJ+lWnnN8PvndtOMMBWu/xcChF7nM5l32TlW97vi"
    "oNc1uR49lSK5fUF51MHiReBgxNcAMJY4S7DAC0ZwMdNmYOxAG4jmfgKGSdLk/HnzDzPFBOtyU3q/BaQu7ScfEU4s"
    "eb4USoCYMhZMPAQr7LH1zKJ43AyIwro6xMb0hFOp0QKBgQDTa0OWKzvox7Sh2o8l6uMXF8VRyj9F8+XSQJgi/2n5"
    "GlI1Hjo1W3p4ZprJEBwNaxczGuZ0szvyH3zXyePsWj0w9ESJxOb0/ph5dDWoNowH5ymOIx7K+mjkZ96fwuqRLWz8"
    "sG8hIlhorGzzlQ7qXK1wfd9kmeyGsBsCb2K4jrlEZQKBgF2Ri6RykLOo7Pvr7BQNqfN3/9ZhdY8lwWIyOvW0UL2w"
    "5Lv6wFxJDXL3D5nFOBle6E9uHzpfRJAhoCM7J5FGJmdutgCherfjeCqOp82rnvC79MUnXkmjJbLZ/uouNRpKiCu+"
    "HHG0+sb1Ki/TGPNvoz8iqya+/baCCkqc5e/m/8JBAoGAG+XjnUVHOohfxZvZl99O6BUy7IALqWdtxDjR2oxpp31Z"
    "q7i5ZaEUoB6p/i4qBXtELHI4Rt3/4wtUpgT2FpIx0Ovqv2NENsABzsUO74uDHufaC++GeLJidQFf1yUZXt7nqtB9"
    "WZn2oJlgJyRcO4DPQjDZ8aR+GafTaJbaKBBtUiECgYB23QsB54rYQIE0thEiwkC6ndTZCiBo5NydyfbTX8XA7GP8"
    "ZuCpc+0rhaDpdW+5xsdvig9LZ9tFgbTWuMOX6GNkU+b8fKJ9JHwCf0RaI23D/c4hLVqPdJcihy0ealRJOQCWrBNF"
    "a/ecY1sJnKNjDbMO6+k/cGWVAPaKz3e3wcP0fw=="
)
KAT_SESSION = "3a4c9e1f-5b2d-4e8a-9c7f-0d1e2f3a4b5c"
KAT_CLIENT_NONCE = "2024-06-18T09:48:41.331275"
KAT_RVD_NONCE = "q7Jm2xV9cR4tY1wZ8nB3kL6p"
KAT_PAYLOAD = ('{"sessionId":"3a4c9e1f-5b2d-4e8a-9c7f-0d1e2f3a4b5c",'
               '"clientNonce":"2024-06-18T09:48:41.331275","rvdNonce":"q7Jm2xV9cR4tY1wZ8nB3kL6p"}')
KAT_SIGNATURE = (
    "Fy0ZZXpou4YH0pt9rBzGu6wMQlsyJIEpn1/rpC8slS4aMjUwXErg5qCp6pyXaocczC0skT0EltQKc22YkgLgDIdp"
    "nbXHPoTskJjVUdx4zhO9RklghlX6ZJDzyvGMAwuShSIRTAqQMerrVDUBKJTR6JHKF8nd3WxHvqzvLugfdqIAdgS6"
    "k+QSSK652eN+0eB4L7mCcebRvcsLFl3ePWznnsECqy0YElBVfzB+lZeocW8jvtspAnkSwjccqgariyaFDNPkMhTX"
    "E2JLOzViUxjQ+7ytXdzkepSpRm7ilEmsLdALdrZFneRokrg9KdTsfuObMBZ8p0Y+zA03NKUGBIMltw=="
)
KAT_LINE = ('{"payload":' + KAT_PAYLOAD + ',"signature":"' + KAT_SIGNATURE
            + '","hashingAlgo":"sha256","signingAlgo":"rsa2048"}\n').encode()


@pytest.fixture(scope="module")
def kat_key():
    return private_key_from_b64("".join(KAT_KEY_B64))


@pytest.fixture(scope="module")
def other_key():
    return AtKeys.generate("@mallory").encrypt_private


def kat_verifier() -> AuthVerifier:
    return AuthVerifier(KAT_SESSION, KAT_CLIENT_NONCE, KAT_RVD_NONCE)


# --- the auth line ------------------------------------------------------------------------

def test_auth_line_known_answer(kat_key):
    """Derived from the spec (§4, §5.3): the line Atsign's client and daemon write, byte for
    byte -- payload keys sessionId, clientNonce, rvdNonce; envelope keys payload, signature,
    hashingAlgo, signingAlgo; compact JSON; one trailing newline."""
    assert encode_auth_line(KAT_SESSION, KAT_CLIENT_NONCE, KAT_RVD_NONCE, kat_key) == KAT_LINE


def test_known_answer_line_verifies(kat_key):
    kat_verifier().verify(KAT_LINE, kat_key.public_key())
    kat_verifier().verify(KAT_LINE.rstrip(b"\n"), kat_key.public_key())
    kat_verifier().verify(KAT_LINE.rstrip(b"\n") + b"\r\n", kat_key.public_key())


def test_every_single_bit_flip_is_refused(kat_key):
    """Exhaustive over the known-answer line: no one-bit change of it authenticates."""
    pub = kat_key.public_key()
    verifier = kat_verifier()
    accepted = []
    for i in range(len(KAT_LINE)):
        for bit in range(8):
            line = bytearray(KAT_LINE)
            line[i] ^= 1 << bit
            try:
                verifier.verify(bytes(line), pub)
            except RelayAuthError:
                continue
            accepted.append((i, bit))
    assert accepted == []


def _line(payload: dict, key, **envelope) -> bytes:
    from noports.at.crypto import sign
    from noports.at.envelope import compact_json
    env = {"payload": payload,
           "signature": sign(key, compact_json(payload).encode()),
           "hashingAlgo": "sha256", "signingAlgo": "rsa2048"}
    env.update(envelope)
    return json.dumps(env, separators=(",", ":")).encode() + b"\n"


GOOD = {"sessionId": KAT_SESSION, "clientNonce": KAT_CLIENT_NONCE, "rvdNonce": KAT_RVD_NONCE}


@pytest.mark.parametrize(("line", "reason"), [
    (b"not json\n", "bad_json"),
    (b"\xff\xfe{}\n", "bad_json"),
    (b"[1,2,3]\n", "bad_json"),
    (b'{"payload":' + KAT_PAYLOAD.encode() + b"\n", "bad_json"),      # truncated
    (b'{"payload":"a string","signature":"x","hashingAlgo":"sha256","signingAlgo":"rsa2048"}',
     "bad_envelope"),
    (b'{"payload":' + KAT_PAYLOAD.encode() + b',"hashingAlgo":"sha256","signingAlgo":"rsa2048"}',
     "bad_envelope"),
    (KAT_LINE.replace(b"rsa2048", b"rsa4096"), "bad_envelope"),
    (KAT_LINE.replace(b'"sha256"', b'"md5"'), "bad_envelope"),
    (KAT_LINE.replace(KAT_RVD_NONCE.encode(), b"another-nonce"), "wrong_nonce"),
    (KAT_LINE.replace(KAT_SESSION.encode(), b"another-session"), "wrong_session"),
    (KAT_LINE.replace(KAT_CLIENT_NONCE.encode(), b"2030-01-01T00:00:00.000000"), "wrong_payload"),
    (b"{" * 5000 + b"\n", "line_too_long"),
])
def test_refusal_reasons(kat_key, line, reason):
    with pytest.raises(RelayAuthError) as refused:
        kat_verifier().verify(line, kat_key.public_key())
    assert refused.value.reason == reason


def test_signed_by_another_key_is_refused(kat_key, other_key):
    with pytest.raises(RelayAuthError) as refused:
        kat_verifier().verify(_line(dict(GOOD), other_key), kat_key.public_key())
    assert refused.value.reason == "bad_signature"


def test_payload_in_another_key_order_is_refused_even_if_signed(kat_key):
    """The relay verifies its own reconstruction, so a signer must use exactly this order."""
    reordered = {"rvdNonce": KAT_RVD_NONCE, "sessionId": KAT_SESSION,
                 "clientNonce": KAT_CLIENT_NONCE}
    with pytest.raises(RelayAuthError) as refused:
        kat_verifier().verify(_line(reordered, kat_key), kat_key.public_key())
    assert refused.value.reason == "wrong_payload"
    with_extra = dict(GOOD, extra=1)
    with pytest.raises(RelayAuthError):
        kat_verifier().verify(_line(with_extra, kat_key), kat_key.public_key())


def test_sha512_lines_are_accepted_like_atsigns_relay(kat_key):
    from noports.at.crypto import sign
    from noports.at.envelope import compact_json
    sig = sign(kat_key, compact_json(GOOD).encode(), "sha512")
    kat_verifier().verify(_line(dict(GOOD), kat_key, signature=sig, hashingAlgo="sha512"),
                          kat_key.public_key())


def test_the_failure_line_is_atsigns():
    assert AUTH_FAILED_LINE == b"Socket auth failed\n"


# --- nonces -------------------------------------------------------------------------------

def test_relay_nonces_are_random_not_timestamps():
    nonces = [new_relay_nonce() for _ in range(2000)]
    assert len(set(nonces)) == len(nonces)
    for nonce in nonces[:50]:
        assert len(nonce) >= 22                                   # >= 128 bits
        assert set(nonce) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
                                 "0123456789-_")
    # not a clock: consecutive nonces share no common prefix longer than chance allows
    assert sum(a[:3] == b[:3] for a, b in itertools.pairwise(nonces)) < 5


# --- replies ------------------------------------------------------------------------------

def test_csv_reply_known_answer():
    """Derived from the spec (§3.2): address verbatim, portA (client), portB (daemon), nonce."""
    assert encode_reply_csv("relay.example.com", 51234, 40123, KAT_RVD_NONCE) == \
        "relay.example.com,51234,40123,q7Jm2xV9cR4tY1wZ8nB3kL6p"
    assert encode_reply_csv("203.0.113.7", 1, 65535, None) == "203.0.113.7,1,65535,null"


def test_json_reply_known_answer():
    """Derived from the spec (§3.2) and Atsign's RelayResponse: ports are JSON integers;
    supportsEventLogging is present and false (the Dart client reads it as a non-null bool), and
    nothing is claimed that this relay does not do (no autoDetectsRelayAuth)."""
    text = encode_reply_json("relay.example.com", 51234, 40123, KAT_RVD_NONCE)
    assert text == ('{"address":"relay.example.com","portA":51234,"portB":40123,'
                    '"rvdNonce":"q7Jm2xV9cR4tY1wZ8nB3kL6p","supportsEventLogging":false}')
    assert "autoDetectsRelayAuth" not in text


def test_reply_form_follows_the_request():
    base = {"sessionId": KAT_SESSION, "atSignA": "@alice", "atSignB": "@bob",
            "authenticateSocketA": True, "authenticateSocketB": True,
            "clientNonce": KAT_CLIENT_NONCE}
    csv_request = parse_request_ports(json.dumps(base))
    json_request = parse_request_ports(json.dumps(dict(base, sendJsonResponse=True)))
    assert encode_reply(csv_request, "h", 1, 2, "n") == "h,1,2,n"
    assert encode_reply(json_request, "h", 1, 2, "n").startswith('{"address":"h"')


@pytest.mark.parametrize("text", [
    "relay.example.com,51234,40123,q7Jm2xV9cR4tY1wZ8nB3kL6p",
    encode_reply_json("relay.example.com", 51234, 40123, KAT_RVD_NONCE),
])
def test_replies_parse_back(text):
    assert parse_reply(text) == RelayReply("relay.example.com", 51234, 40123, KAT_RVD_NONCE)


def test_atsigns_json_reply_parses():
    reply = parse_reply('{"address":"1.2.3.4","portA":1,"portB":2,"rvdNonce":"n",'
                        '"supportsEventLogging":true,"autoDetectsRelayAuth":true}')
    assert reply.supports_event_logging and reply.auto_detects_relay_auth
    assert parse_reply("h,1,2,null").rvd_nonce is None


@pytest.mark.parametrize("text", ["", "h,1,2", "h,1,2,n,extra", "h,0,2,n", "h,1,99999,n",
                                  "h,x,2,n", ",1,2,n", "{", '{"address":"h","portA":"x",'
                                  '"portB":2,"rvdNonce":"n"}', "[1]", '{"portA":1,"portB":2}'])
def test_bad_replies_raise(text):
    with pytest.raises(RelayMessageError):
        parse_reply(text)


@pytest.mark.parametrize(("address", "port_a", "port_b"), [
    ("", 1, 2), ("a,b", 1, 2), ("a b", 1, 2), ("h", 0, 2), ("h", 1, 65536), ("h", True, 2)])
def test_replies_refuse_what_cannot_be_advertised(address, port_a, port_b):
    with pytest.raises(ValueError):
        encode_reply_csv(address, port_a, port_b, "n")


# --- requests -----------------------------------------------------------------------------

NEWEST = {   # as Atsign's newest client writes it (RelayRequest.toJson order)
    "sessionId": KAT_SESSION, "atSignA": "@Alice", "atSignB": "@bob",
    "authenticateSocketA": True, "authenticateSocketB": True, "clientNonce": KAT_CLIENT_NONCE,
    "relayAuthMode": "payload", "relayAuthAesKey": None, "only443": False,
    "multipleAcksOk": True, "preFetch": [], "sendJsonResponse": True,
}


def test_newest_request_parses():
    request = parse_request_ports(json.dumps(NEWEST))
    assert (request.session_id, request.atsign_a, request.atsign_b) == \
        (KAT_SESSION, "@alice", "@bob")
    assert request.authenticate_a and request.authenticate_b and request.fully_authenticated
    assert request.client_nonce == KAT_CLIENT_NONCE
    assert request.relay_auth_mode == "payload" and request.relay_auth_aes_key is None
    assert request.multiple_acks_ok and request.send_json_response and not request.only443
    assert request.pre_fetch == () and not request.legacy


def test_baseline_request_parses_with_defaults():
    baseline = {k: NEWEST[k] for k in ("sessionId", "atSignA", "atSignB", "authenticateSocketA",
                                       "authenticateSocketB", "clientNonce")}
    request = parse_request_ports(json.dumps(baseline).encode())
    assert request.relay_auth_mode == "payload" and not request.send_json_response
    assert not request.multiple_acks_ok and request.pre_fetch == ()


def test_unknown_fields_are_ignored():
    request = parse_request_ports(json.dumps(dict(NEWEST, futureField={"x": [1]}, another=2)))
    assert request.session_id == KAT_SESSION


@pytest.mark.parametrize(("field", "value"), [
    ("sessionId", 42), ("sessionId", ""), ("sessionId", "has space"), ("sessionId", "a/b"),
    ("atSignA", None), ("atSignA", "@"), ("atSignB", ["@bob"]),
    ("authenticateSocketA", "true"), ("authenticateSocketA", 1), ("authenticateSocketB", None),
    ("clientNonce", 5), ("clientNonce", ""), ("clientNonce", "x" * 600),
    ("relayAuthMode", "magic"), ("relayAuthMode", 3), ("relayAuthAesKey", 7),
    ("only443", "no"), ("multipleAcksOk", 0), ("preFetch", "key"), ("preFetch", [1]),
    ("sendJsonResponse", "yes"),
])
def test_wrong_types_are_clear_errors(field, value):
    with pytest.raises(RelayMessageError) as bad:
        parse_request_ports(json.dumps(dict(NEWEST, **{field: value})))
    assert field in str(bad.value)


@pytest.mark.parametrize("field", ["sessionId", "atSignA", "atSignB", "authenticateSocketA",
                                   "authenticateSocketB", "clientNonce"])
def test_missing_required_field(field):
    body = dict(NEWEST)
    del body[field]
    with pytest.raises(RelayMessageError) as bad:
        parse_request_ports(json.dumps(body))
    assert field in str(bad.value)


@pytest.mark.parametrize("value", ["", "not json", "[1,2]", '"just a string"', "{" * 100000,
                                   b"\xff\xfe", '{"sessionId": NaN}'])
def test_garbage_requests(value):
    with pytest.raises(RelayMessageError):
        parse_request_ports(value)


def test_legacy_request():
    request = parse_legacy_request(KAT_SESSION, "@Alice")
    assert request.legacy and request.session_id == KAT_SESSION and request.atsign_a == "@alice"
    assert request.atsign_b is None and request.client_nonce is None
    assert not request.authenticate_a and not request.authenticate_b
    assert not request.fully_authenticated
    for bad in ("", "a b", "x" * 200):
        with pytest.raises(RelayMessageError):
            parse_legacy_request(bad, "@alice")
    with pytest.raises(RelayMessageError):
        parse_legacy_request(KAT_SESSION, "not an atsign @@")
