"""What the AtClient writes: its hand-built notify line equals the contract encoder's, and the
login lines (legacy and signingAlgo/enrollmentId pkam forms, cram)."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from noports.at.atkeys import AtKeys
from noports.at.client import AtClient, notify_line
from noports.at.command_types import Notify
from noports.at.commands import encode_command, parse_command
from noports.at.crypto import (
    cram_digest,
    encrypt_value,
    generate_aes_key_b64,
    generate_iv_b64,
    generate_rsa_private_key,
    pkam_verify,
    public_key_md5,
    public_key_to_b64,
    wrap_shared_key,
)
from noports.at.metadata import Metadata
from noports.at.names import AtKey

_PRIV = generate_rsa_private_key()
_AES = generate_aes_key_b64()
_WRAPPED = wrap_shared_key(_PRIV.public_key(), _AES)
_CS = public_key_md5(public_key_to_b64(_PRIV.public_key()))


def _metadata(ttl, ttr, ccd) -> Metadata:
    return Metadata(ttl=ttl, ttr=ttr, ccd=ccd, is_encrypted=True, iv_nonce=generate_iv_b64(),
                    shared_key_enc=_WRAPPED, pub_key_cs=_CS)


@pytest.mark.parametrize("key", ["@bob:ping.dev.sshnp@alice", "@alice:self.note@alice",
                                 "@b0b_x:1234.sshrvd@alice"])
@pytest.mark.parametrize("operation", ["update", "delete"])
def test_notify_line_matches_encoder(key, operation):
    akey = AtKey.parse(key)
    md = _metadata(10_000, -1, True)
    value = encrypt_value(_AES, "hello: world\n with newline", md.iv_nonce)
    nid = str(uuid.uuid4())
    ours = notify_line(nid, operation, 60_000, md, akey, value)
    assert ours == encode_command(Notify(akey, value, id=nid, operation=operation, ttln=60_000,
                                         metadata=md))
    parsed = parse_command(ours)
    assert parsed.id == nid and parsed.value == value and parsed.metadata == md


@given(ttln=st.none() | st.integers(0, 10**9), ttl=st.none() | st.integers(0, 10**9),
       ttr=st.none() | st.integers(-1, 10**9), ccd=st.none() | st.booleans(),
       entity=st.from_regex(r"[a-z0-9_][a-z0-9_.\-]{0,40}", fullmatch=True),
       plain=st.text(max_size=300))
def test_notify_line_matches_encoder_any_fields(ttln, ttl, ttr, ccd, entity, plain):
    akey = AtKey(entity=entity, owner="@alice", kind="shared", shared_with="@bob")
    md = _metadata(ttl, ttr, ccd)
    value = encrypt_value(_AES, plain, md.iv_nonce)
    nid = str(uuid.uuid4())
    assert notify_line(nid, "update", ttln, md, akey, value) == encode_command(
        Notify(akey, value, id=nid, ttln=ttln, metadata=md))


class _RecordingConn:
    """Stands in for an AtConnection during login: records lines, plays back replies."""

    def __init__(self, replies):
        self.lines: list[str] = []
        self.replies = list(replies)

    async def request(self, line, timeout=None):
        self.lines.append(line)
        return self.replies.pop(0)


@pytest.mark.parametrize(("form", "enrollment", "expected_prefix"), [
    ("auto", None, "pkam:"),
    ("auto", "0c6c3dc1-5a0e-4c7c-a6a0-bb1d1c1e2f30",
     "pkam:signingAlgo:rsa2048:hashingAlgo:sha256:enrollmentId:0c6c3dc1-5a0e-4c7c-a6a0-bb1d1c1e2f30:"),
    ("legacy", "0c6c3dc1-5a0e-4c7c-a6a0-bb1d1c1e2f30", "pkam:"),
    ("algo", None, "pkam:signingAlgo:rsa2048:hashingAlgo:sha256:"),
])
def test_login_pkam_forms(run, form, enrollment, expected_prefix):
    keys = AtKeys.generate("@alice")
    keys.enrollment_id = enrollment
    challenge = "_4af2c0de-1111-2222-3333-444455556666@alice:d6ca0000-1111-2222-3333-444455556666"
    conn = _RecordingConn([challenge, "success"])
    client = AtClient("@alice", keys, server="127.0.0.1:1", pkam_form=form)
    run(client._login(conn))
    assert conn.lines[0] == "from:@alice"
    pkam = conn.lines[1]
    assert pkam.startswith(expected_prefix)
    signature = pkam[len(expected_prefix):]
    assert ":" not in signature
    assert pkam_verify(keys.pkam_public, challenge, signature)


def test_login_cram(run):
    challenge = "_0000@bob:1111"
    conn = _RecordingConn([challenge, "success"])
    run(AtClient("@bob", cram_secret="s3cret", server="127.0.0.1:1")._login(conn))
    assert conn.lines == ["from:@bob", f"cram:{cram_digest('s3cret', challenge)}"]
