"""atserver authentication over TLS: from/cram/pkam (all three forms), error shapes, throttle.

Expected replies are derived from the spec (atprotocol.md §2.4, §3), not from a Dart server.
"""

from __future__ import annotations

import json
import re
import time

import pytest

from noports.at import crypto
from noports.at.atkeys import AtKeys

CHALLENGE = re.compile(r"_[0-9a-f-]{36}@alice:[0-9a-f-]{36}")


def test_greeting_and_challenge_shape(shared_atserver):
    conn = shared_atserver.connect("@alice")
    try:
        assert conn.greeting == b"@"
        ch = conn.challenge("@alice")
        assert CHALLENGE.fullmatch(ch), ch
        # A second from gives a new challenge (fresh proof every time).
        assert conn.challenge("alice") != ch
    finally:
        conn.close()


def test_pkam_legacy_form(shared_atserver):
    conn = shared_atserver.connect("@alice")
    try:
        conn.login_pkam(shared_atserver.keys("@alice"))
        assert conn.request("noop:0") == "data:ok"
    finally:
        conn.close()


@pytest.mark.parametrize("hashing", ["sha256", "sha512"])
def test_pkam_with_signing_and_hashing_algo(shared_atserver, hashing):
    keys = shared_atserver.keys("@bob")
    conn = shared_atserver.connect("@bob")
    try:
        ch = conn.challenge("@bob")
        sig = crypto.pkam_sign(keys.pkam_private, ch, hashing)
        reply = conn.request(f"pkam:signingAlgo:rsa2048:hashingAlgo:{hashing}:{sig}",
                             prompt="@bob@")
        assert reply == "data:success"
    finally:
        conn.close()


def test_pkam_hashing_mismatch_fails(shared_atserver):
    keys = shared_atserver.keys("@bob")
    conn = shared_atserver.connect("@bob")
    try:
        ch = conn.challenge("@bob")
        sig = crypto.pkam_sign(keys.pkam_private, ch, "sha256")
        reply = conn.request(f"pkam:signingAlgo:rsa2048:hashingAlgo:sha512:{sig}")
        assert reply.startswith("error:AT0401"), reply
    finally:
        conn.close()


def test_pkam_enrollment_form(shared_atserver):
    """Documented choice: an enrollmentId is accepted when the signature verifies under the
    legacy key (the first enrollment's key); otherwise AT0028 in the colon shape."""
    keys = shared_atserver.keys("@carol")
    conn = shared_atserver.connect("@carol")
    try:
        ch = conn.challenge("@carol")
        sig = crypto.pkam_sign(keys.pkam_private, ch)
        reply = conn.request(f"pkam:enrollmentId:0b1c2d3e-aaaa-4bbb-8ccc-123456789abc:{sig}",
                             prompt="@carol@")
        assert reply == "data:success"
    finally:
        conn.close()
    other = AtKeys.generate("@carol")
    conn = shared_atserver.connect("@carol")
    try:
        ch = conn.challenge("@carol")
        sig = crypto.pkam_sign(other.pkam_private, ch)
        reply = conn.request(f"pkam:signingAlgo:rsa2048:hashingAlgo:sha256:"
                             f"enrollmentId:0b1c2d3e-aaaa-4bbb-8ccc-123456789abc:{sig}")
        assert reply.startswith("error:AT0028:"), reply
    finally:
        conn.close()


def test_wrong_pkam_signature_keeps_connection_open(shared_atserver):
    keys = shared_atserver.keys("@alice")
    stranger = AtKeys.generate("@alice")
    conn = shared_atserver.connect("@alice")
    try:
        ch = conn.challenge("@alice")
        bad = conn.request("pkam:" + crypto.pkam_sign(stranger.pkam_private, ch))
        assert bad == "error:AT0401-Exception: pkam authentication failed"
        assert conn.request("pkam:not-base64!!").startswith("error:AT0401")
        # Still open: the right key works on the same connection.
        conn.login_pkam(keys)
        assert conn.request("llookup:public:publickey@alice") == "data:" + keys.encrypt_public_b64
    finally:
        conn.close()


def test_pkam_without_from_and_for_other_atsign(shared_atserver):
    conn = shared_atserver.connect("@alice")
    try:
        assert conn.request("pkam:AAAA").startswith("error:AT0401")
        # from:@bob on @alice's port is the server-to-server form: a "proof:" challenge.
        reply = conn.request("from:@bob")
        assert reply.startswith("data:proof:_") and "@bob:" in reply, reply
        keys = shared_atserver.keys("@bob")
        sig = crypto.pkam_sign(keys.pkam_private, reply[len("data:proof:"):])
        assert conn.request("pkam:" + sig).startswith("error:AT0401")
    finally:
        conn.close()


def test_verbs_need_auth(shared_atserver):
    conn = shared_atserver.connect("@alice")
    try:
        for line in ("update:public:x@alice 1", "llookup:public:publickey@alice",
                     "notify:@bob:x@alice:v", "monitor", "delete:public:x@alice",
                     "plookup:publickey@bob", "notify:status:abc"):
            reply = conn.request(line)
            assert reply.startswith("error:AT0401-"), (line, reply)
        # Open verbs work unauthenticated.
        assert conn.request("noop:0") == "data:ok"
        assert json.loads(conn.request("info:brief")[5:])["version"]
    finally:
        conn.close()


def test_error_shape_follows_client_config_version(shared_atserver):
    conn = shared_atserver.connect("@alice")
    try:
        conn.request('from:@alice:clientConfig:{"version":"3.0.38"}')
        reply = conn.request("llookup:nothing@alice")
        assert reply.startswith("error:{"), reply
        body = json.loads(reply[len("error:"):])
        assert body["errorCode"] == "AT0401"
    finally:
        conn.close()
    conn = shared_atserver.connect("@alice")
    try:
        conn.request('from:@alice:clientConfig:{"version":"3.0.37"}')
        assert conn.request("llookup:nothing@alice").startswith("error:AT0401-")
    finally:
        conn.close()
    conn = shared_atserver.connect("@alice")
    try:
        conn.request('from:@alice:clientConfig:{"version":"3.0.52"}')
        conn.login_pkam(shared_atserver.keys("@alice"))
        reply = conn.request("llookup:nothing@alice")
        assert json.loads(reply[6:])["errorCode"] == "AT0015"
    finally:
        conn.close()


def test_cram_then_activation_by_update(atserver):
    """Legacy onboarding (spec §6.2) against a server started without --keys-dir."""
    srv = atserver("@dave", keys=False)
    secret = srv.cram_secret("@dave")
    assert len(secret) >= 64
    conn = srv.connect("@dave")
    try:
        ch = conn.challenge("@dave")
        assert conn.request("cram:" + "0" * 128).startswith("error:AT0401")
        ch = conn.challenge("@dave")
        assert conn.request("cram:" + crypto.cram_digest(secret, ch), prompt="@dave@") \
            == "data:success"
        conn.prompt = "@dave@"
        keys = AtKeys.generate("@dave")
        assert conn.request("update:privatekey:at_pkam_publickey " + keys.pkam_public_b64) \
            == "data:-1"
        assert conn.request(f"update:public:publickey@dave {keys.encrypt_public_b64}") \
            .startswith("data:")
        assert conn.request("delete:privatekey:at_secret") == "data:-1"
    finally:
        conn.close()
    assert not (srv.state_dir / "secrets" / "@dave.cram").exists()
    conn = srv.connect("@dave")
    try:
        ch = conn.challenge("@dave")
        # The secret is gone: cram fails; pkam with the new key works.
        assert conn.request("cram:" + crypto.cram_digest(secret, ch)).startswith("error:AT0401")
        conn.login_pkam(keys)
    finally:
        conn.close()


def test_keys_dir_activation_removed_cram(shared_atserver):
    assert shared_atserver.info["cram_secret_files"] == {}
    for atsign in ("@alice", "@bob", "@carol"):
        assert (shared_atserver.keys_dir / f"{atsign}_key.atKeys").stat().st_mode & 0o077 == 0
        assert not (shared_atserver.state_dir / "secrets" / f"{atsign}.cram").exists()


def test_failed_login_delay(atserver):
    srv = atserver("@erin", args=("--login-free-failures", "1", "--login-delay", "0.6",
                                  "--login-delay-max", "1.2"))
    stranger = AtKeys.generate("@erin")
    conn = srv.connect("@erin")
    try:
        timings = []
        for _ in range(3):
            ch = conn.challenge("@erin")
            t0 = time.monotonic()
            reply = conn.request("pkam:" + crypto.pkam_sign(stranger.pkam_private, ch))
            timings.append(time.monotonic() - t0)
            assert reply.startswith("error:AT0401")
        # 1st answered at once, then 0.6 s, then 1.2 s (doubling, capped).
        assert timings[0] < 0.5, timings
        assert 0.55 <= timings[1] < 2.5, timings
        assert 1.15 <= timings[2] < 3.0, timings
        # Other connections are not slowed by this one's failures.
        other = srv.connect("@erin")
        t0 = time.monotonic()
        other.login_pkam(srv.keys("@erin"))
        assert time.monotonic() - t0 < 1.0
        other.close()
    finally:
        conn.close()
