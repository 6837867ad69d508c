"""The NoPorts signed envelope (noports.at.envelope).

The pinned vectors are derived from the spec (noports-protocol.md §4): the payload text is written
by hand the way Dart's jsonEncode prints it, the RSA key was generated once with
``openssl genpkey`` and the signature computed with ``openssl dgst -sha256 -sign`` over that text,
so neither comes from our own code.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess

import pytest
from cryptography.hazmat.primitives import serialization
from hypothesis import given, settings
from hypothesis import strategies as st

from noports.at.crypto import generate_rsa_private_key, private_key_from_b64, sign
from noports.at.envelope import compact_json, encode_envelope, sign_envelope, verify_envelope
from noports.errors import SignatureError

OPENSSL = shutil.which("openssl")

FIXED_KEY_B64 = (
    "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQCM7rybuSlMDUOU29ca7tn793GhHQBn0T/AFyxx"
    "ZehPia0UHdTcVHTG9G6kOFWd/qearOuD3oH0/4+DDGuB+F49mve9OwZgLvZIH6+weg0F49RNgym2i7Zemn+QkOvY"
    "rH/QX6xDVvUqCafI/5WZq5157r+JJN+cy/N3bEY/tF5c/rhkgb6A9rUqkltBnQatqXaHUG+ZzlcW8MZqAPTiXuVo"
    "kwCONStQP7fb0NpD8Xj413RxncmJ+zM2xPL6QOB7pd4XsUm7ThPHqlLz0Ce49Isj8k9vPsYaSooVKj8nPdIawfsK"
    "kpyhgG8BBdY8msZFHu//BghS6XVDlHqIn0uCDJO7AgMBAAECggEAFVefZGMOp/USQ5wPNTBFU+z4Xj0KxK4MM3DO"
    "9X/zRahEd66/f3uiu5u57aXtAUzWi4vy6+NprB/PgeRYRjRwlm++DgAUSm3nigCSa0KbGkXoRAdq7Q63WBhEMoZf"
    "0PjpL4sYMT0dSiJwMEt+7OiaTnl4tAd2KEPn44aYFNRMaKnzhfoSyQCOLmLjnkYyEzbkcCasl2E7JdLVkS6a/0pt"
    "C73KkePub2Vg+oM4jkBE6r4miZjoKHMsvO1EuoEbmH5f7+hw7NuBIhuQoFbIxIND29ZfwkP7oW7mWodhXGM36lZb"
    "mwv2Iij870TwdERAquu3qKU5xQ/sORIe6hSSCiNLoQKBgQDAPEH5Wo5BLkav5W6Gb/S6zSV76xXpBVQMCCILpRBE"
    "7pBzMq4OFYEErnjowphp/igNsLDFaGyXsVdLAMYV935tt6P4iMpiUWMJ24GIRJey7BZ2/B3rK0xNtSUDt5yTS3M2"
    "FvvExXwNUmAfm2NliLgLdAg5KXv5HiAZSJ62LHsqCQKBgQC7rhSWhUMbVPu09b+lKMmiuz1ZkZPSo7HKvEiyk02W"
    "HsMxfIOvCUsdUKAAmZcohh5wTdQoH0UdWZhULumZ06uL3Vne04Lv01OLcL7IS+YuYI5jEa8fROitYtj0a/O+taBv"
    "hNbv+4sRhidLQohvFOsH2sa4E7vmok60D9CItg5QowKBgQCyD97IezHjfFrrmShMjK1yzo1XAEWWR2I3ltz6TlYI"
    "k7Xnjt0cnJyaWoYSjBWjsFEnhS/oWzajOBh0l+3j8REBziWrFAHrGhoTymhscaTWjcqtQhDwgXW3UQBNNilpYm0A"
    "gD+LX6XtrQzumf9y0DYyHbN0R1HXSilPYi3o7sDTCQKBgDiVmJF1JjFkYutBOIGkFX7hsvKBSK82OVFliQmGDdtX"
    "9QPDhbRNOf9hoovrwr4uCZlUbcWW//CEZb/j0PxW7B6kIwdif9Ssw0CEQpEDCSgsZmGKIGFuFjTIW579uSRjgDZ/"
    "N4ptLZWf+9LeAWJ0TRQ2KrmvAXTctJvnNLkzIoe/AoGAa1aSNdYbCwYS9pORvdbepLQa6soVKpurdTWnJwl06i4m"
    "HXLpxQfPpEatTxviVaoYp71qAu4k0SfRa6u/Vx5sx2w4GV+SOFuAOAZqgWOp8JvXmHn/xW/biHY8UBWKpZf8RBIe"
    "2mqAjLQ/PaUj9Kq7+EDIGfK0ogkRx90aciwzXNg="
)
PINNED_SIGNATURE = (
    "St9z7tr1QWtZDlrlo5FQGPr1LkNSyGgdCHl9ADUJFwU/+6ZnyS/uE+sJeUa3zw3AkNxY5+WSU5a6WR5VG35l04PC"
    "8JyEwm0Wc85vleVCJD8dbS6V5DB2vncstfL9huabkFPdTVCNLA/UMUdPAB03EW99mjBXOPGROgoRpSRdLGzoXkx4"
    "peICVxwj2z/S0jLUn3W65A48tzXQz8UUcI1jazhiQpsfdNucfvzKVe4UA1+lHady/ngOo4hCXPCeNihJS6BqZBEk"
    "HUcsynktWIz7U8h0WrnGRDo9BTx5B+GNuApzROY9kgmdkCdGDgfJ7av9dJGSku5M3N+wJVV1dKdQUw=="
)

#: A payload as Dart's jsonEncode writes it: insertion order, no spaces, non-ASCII raw, only `"`,
#: `\` and control characters escaped (\t \n as such, others as lower-case \u00xx), DEL and `/`
#: left alone, integers without ".0".
DART_PAYLOAD = ('{"sessionId":"1f0c3e1e-5a6b-4c1d-9e2f-3a4b5c6d7e8f","host":"localhost",'
                '"port":22,"direct":true,"note":"caf\u00e9 \u2603 \U0001f680 tab\\there \\"q\\" '
                'back\\\\slash nl\\nctl\\u0001 \x7f /","pem":null,"list":[1,-2,3.5,{"k":[]}]}')

PINNED_ENVELOPE = ('{"payload":' + DART_PAYLOAD + ',"signature":"' + "".join(PINNED_SIGNATURE)
                   + '","hashingAlgo":"sha256","signingAlgo":"rsa2048"}')

KEY = private_key_from_b64("".join(FIXED_KEY_B64))
PUB = KEY.public_key()


@pytest.fixture(scope="module")
def other_key():
    return generate_rsa_private_key()


def test_dart_payload_re_serialises_identically():
    """Derived from the spec: parse then compact_json gives back Dart's exact bytes."""
    parsed = json.loads(DART_PAYLOAD)
    assert list(parsed) == ["sessionId", "host", "port", "direct", "note", "pem", "list"]
    assert compact_json(parsed) == DART_PAYLOAD


def test_compact_json_escapes_like_dart():
    """Derived from the spec: Dart escapes only quote, backslash and C0 controls."""
    assert compact_json({"a": "\x00\x08\x09\x0a\x0c\x0d\x1f"}) == (
        '{"a":"\\u0000\\b\\t\\n\\f\\r\\u001f"}')
    assert compact_json({"é": "☃/\x7f\u2028"}) == '{"é":"☃/\x7f\u2028"}'
    assert compact_json({"z": 1, "a": [True, False, None, 2.5]}) == (
        '{"z":1,"a":[true,false,null,2.5]}')
    pem = "-----BEGIN OPENSSH PRIVATE KEY-----\nabc\n-----END OPENSSH PRIVATE KEY-----\n"
    assert compact_json({"ephemeralPrivateKey": pem}) == (
        '{"ephemeralPrivateKey":"-----BEGIN OPENSSH PRIVATE KEY-----\\nabc\\n'
        '-----END OPENSSH PRIVATE KEY-----\\n"}')
    with pytest.raises(ValueError):
        compact_json({"x": float("nan")})


def test_encode_envelope_matches_pinned_bytes():
    """Derived from the spec: exact envelope JSON, key order payload/signature/hashingAlgo/
    signingAlgo, signature = openssl's RSA-SHA256 PKCS#1 v1.5 over the payload's UTF-8."""
    assert encode_envelope(json.loads(DART_PAYLOAD), KEY) == PINNED_ENVELOPE
    env = sign_envelope(json.loads(DART_PAYLOAD), KEY)
    assert list(env) == ["payload", "signature", "hashingAlgo", "signingAlgo"]
    assert env["signature"] == "".join(PINNED_SIGNATURE)


@pytest.mark.parametrize("form", ["str", "bytes", "dict", "pretty"])
def test_verify_pinned_envelope_in_every_form(form):
    envelope = {
        "str": PINNED_ENVELOPE,
        "bytes": PINNED_ENVELOPE.encode("utf-8"),
        "dict": json.loads(PINNED_ENVELOPE),
        # Whitespace around the envelope does not matter: the payload is re-serialised.
        "pretty": json.dumps(json.loads(PINNED_ENVELOPE), indent=2, ensure_ascii=True),
    }[form]
    payload = verify_envelope(envelope, PUB)
    assert payload == json.loads(DART_PAYLOAD)
    assert compact_json(payload) == DART_PAYLOAD


@pytest.mark.skipif(OPENSSL is None, reason="openssl command line not installed")
def test_openssl_verifies_our_envelope_signature(tmp_path):
    """Derived from the spec: an independent RSA implementation accepts our signature."""
    payload = {"status": "connected", "sessionId": "s-1", "note": "ünïcode ☃"}
    env = sign_envelope(payload, KEY)
    pub_pem = tmp_path / "pub.pem"
    pub_pem.write_bytes(PUB.public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo))
    sig = tmp_path / "sig.bin"
    sig.write_bytes(base64.b64decode(env["signature"]))
    proc = subprocess.run([OPENSSL, "dgst", "-sha256", "-verify", str(pub_pem), "-signature",
                           str(sig)], input=compact_json(payload).encode("utf-8"),
                          capture_output=True, timeout=30)
    assert proc.returncode == 0 and b"Verified OK" in proc.stdout


def test_key_order_is_part_of_what_is_signed():
    env = json.loads(PINNED_ENVELOPE)
    env["payload"] = dict(reversed(list(env["payload"].items())))
    with pytest.raises(SignatureError, match="did not verify"):
        verify_envelope(env, PUB)


def test_received_order_is_used_not_sorted_order():
    payload = {"zeta": 1, "alpha": 2}
    text = encode_envelope(payload, KEY)
    assert text.startswith('{"payload":{"zeta":1,"alpha":2}')
    assert list(verify_envelope(text, PUB)) == ["zeta", "alpha"]


def test_tampered_payload_or_wrong_key_fails(other_key):
    tampered = PINNED_ENVELOPE.replace('"port":22', '"port":23')
    with pytest.raises(SignatureError):
        verify_envelope(tampered, PUB)
    with pytest.raises(SignatureError):
        verify_envelope(PINNED_ENVELOPE, other_key.public_key())


def test_sha512_hashing_algo_is_accepted():
    payload = {"a": 1}
    env = {"payload": payload, "signature": sign(KEY, compact_json(payload).encode(), "sha512"),
           "hashingAlgo": "sha512", "signingAlgo": "rsa2048"}
    assert verify_envelope(compact_json(env), PUB) == payload
    env["hashingAlgo"] = "sha256"
    with pytest.raises(SignatureError):
        verify_envelope(env, PUB)


def _pinned(**changes):
    env = json.loads(PINNED_ENVELOPE)
    for name, value in changes.items():
        if value is _DELETE:
            del env[name]
        else:
            env[name] = value
    return env


_DELETE = object()


@pytest.mark.parametrize(("changes", "why"), [
    ({"signature": _DELETE}, "signature"),
    ({"signature": 5}, "signature"),
    ({"signature": None}, "signature"),
    ({"hashingAlgo": _DELETE}, "hashingAlgo"),
    ({"hashingAlgo": ["sha256"]}, "hashingAlgo"),
    ({"signingAlgo": _DELETE}, "signingAlgo"),
    ({"signingAlgo": "ecc_secp256r1"}, "signingAlgo"),
    ({"signingAlgo": "RSA2048"}, "signingAlgo"),
    ({"hashingAlgo": "md5"}, "hashingAlgo"),
    ({"payload": _DELETE}, "payload"),
    ({"payload": DART_PAYLOAD}, "payload"),  # a string, not an object
    ({"payload": [1, 2]}, "payload"),
    ({"payload": None}, "payload"),
    ({"signature": "!!not base64!!"}, "did not verify"),
    ({"signature": ""}, "did not verify"),
])
def test_structural_problems_raise_signature_error(changes, why):
    env = _pinned(**changes)
    for form in (env, json.dumps(env)):
        with pytest.raises(SignatureError) as err:
            verify_envelope(form, PUB)
        assert why in str(err.value)


@pytest.mark.parametrize("garbage", [
    "", "null", "[]", '"x"', "42", "{", "{}", b"\xff\xfe", b"{\"payload\":", "[" * 100_000,
    '{"payload":{"a":NaN},"signature":"x","hashingAlgo":"sha256","signingAlgo":"rsa2048"}',
    '{"payload":{"a":"\\ud800"},"signature":"x","hashingAlgo":"sha256","signingAlgo":"rsa2048"}',
    '{"payload":' + "[" * 50_000 + "]" * 50_000 + "}",
])
def test_garbage_raises_signature_error(garbage):
    with pytest.raises(SignatureError):
        verify_envelope(garbage, PUB)


def test_unserialisable_dict_raises_signature_error():
    env = {"payload": {"x": object()}, "signature": "AAAA", "hashingAlgo": "sha256",
           "signingAlgo": "rsa2048"}
    with pytest.raises(SignatureError):
        verify_envelope(env, PUB)
    with pytest.raises(SignatureError):
        verify_envelope(None, PUB)  # type: ignore[arg-type]


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children,
                                                                      max_size=4),
    max_leaves=20,
)


@given(st.one_of(st.binary(max_size=300), st.text(max_size=300), _json,
                 st.dictionaries(st.sampled_from(["payload", "signature", "hashingAlgo",
                                                  "signingAlgo", "x"]), _json, max_size=5)))
@settings(max_examples=300)
def test_any_input_gives_payload_or_signature_error(data):
    """Never another exception type, whatever arrives."""
    if isinstance(data, dict) or not isinstance(data, (str, bytes)):
        candidates = [data, compact_json(data) if _encodable(data) else None]
    else:
        candidates = [data]
    for candidate in candidates:
        if candidate is None:
            continue
        with pytest.raises(SignatureError):
            verify_envelope(candidate, PUB)


def _encodable(obj) -> bool:
    try:
        compact_json(obj)
    except (ValueError, TypeError):
        return False
    return True


@given(st.dictionaries(st.text(max_size=10), _json, max_size=6))
@settings(max_examples=40)
def test_any_json_payload_round_trips(payload):
    text = encode_envelope(payload, KEY)
    got = verify_envelope(text, PUB)
    assert got == payload
    assert list(got) == list(payload)
