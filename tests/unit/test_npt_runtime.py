"""npt's machinery without the network: progress lines, routing of replies, the one-time key
helper, the key log and the ``-x`` hand-off (forks, but opens no sockets)."""

from __future__ import annotations

import asyncio
import io
import os

import psutil
import pytest
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey

from noports.at.crypto import rsa_decrypt, rsa_encrypt, sign, verify
from noports.at.monitor import AtNotification
from noports.client import debug
from noports.client.detach import run_detached
from noports.client.keygen import EphemeralKey
from noports.client.phases import PhaseError
from noports.client.session import NptSession, Progress, SessionOptions, _Waits

# --- progress -----------------------------------------------------------------------------------

class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_lines_carry_the_time_and_the_phase():
    out, clock = io.StringIO(), _Clock()
    p = Progress(stream=out, clock=clock)
    clock.now += 0.25
    p.step("relay", "ports 1/2")
    assert out.getvalue() == "npt: [   250 ms] relay: ports 1/2\n"


def test_quiet_hides_progress_but_never_errors():
    out = io.StringIO()
    p = Progress(quiet=True, stream=out)
    p.step("relay", "ports")
    p.error("relay phase failed: x")
    assert out.getvalue() == "npt: error: relay phase failed: x\n"


def test_a_closed_stderr_does_not_break_the_session():
    out = io.StringIO()
    out.close()
    Progress(stream=out).step("x", "y")     # no exception


# --- routing ------------------------------------------------------------------------------------

SID = "0f8e1c2d-3b4a-4c5d-8e9f-a0b1c2d3e4f5"


def _opts() -> SessionOptions:
    return SessionOptions(client="@client", daemon="@daemon", relay="@relay", device="dev",
                          remote_port=80)


def _n(key: str, sender: str, value="v", *, operation="update", error=None) -> AtNotification:
    return AtNotification(id=os.urandom(4).hex(), key=f"@client:{key}{sender}",
                          from_atsign=sender, to_atsign="@client", value=value,
                          operation=operation, decrypt_error=error)


@pytest.fixture
def routed():
    loop = asyncio.new_event_loop()
    s = NptSession(_opts())
    s.session_id = SID
    s._waits = _Waits(loop.create_future(), loop.create_future(), loop.create_future())
    yield s
    loop.close()


def test_each_reply_is_taken_only_from_the_atsign_that_must_send_it(routed):
    w = routed._waits
    for forged in (_n(f"{SID}.sshrvd", "@mallory"), _n("heartbeat.dev.sshnp", "@relay"),
                   _n(f"{SID}.dev.sshnp", "@mallory"), _n("heartbeat.dev.sshnp", "@mallory")):
        routed._route(forged)
    assert not (w.relay.done() or w.ping.done() or w.response.done())
    assert w.ignored == 4
    routed._route(_n(f"{SID}.sshrvd", "@relay", "a,1,2,n"))
    routed._route(_n("heartbeat.dev.sshnp", "@daemon", "{}"))
    routed._route(_n(f"{SID}.dev.sshnp", "@daemon", "refused"))
    assert w.relay.result().value == "a,1,2,n"
    assert w.ping.result().value == "{}"
    assert w.response.result().value == "refused"


def test_replies_of_other_sessions_and_other_devices_are_ignored(routed):
    other = "11111111-2222-4333-8444-555555555555"
    routed._route(_n(f"{other}.sshrvd", "@relay"))
    routed._route(_n(f"{other}.dev.sshnp", "@daemon"))
    routed._route(_n("heartbeat.otherdev.sshnp", "@daemon"))
    routed._route(_n(f"{SID}.dev.sshnp", "@daemon", operation="delete"))
    w = routed._waits
    assert not (w.relay.done() or w.ping.done() or w.response.done()) and w.ignored == 4


def test_the_first_reply_wins(routed):
    routed._route(_n(f"{SID}.sshrvd", "@relay", "first"))
    routed._route(_n(f"{SID}.sshrvd", "@relay", "second"))
    assert routed._waits.relay.result().value == "first"


def test_a_relay_nack_fails_the_relay_phase_with_its_text(routed):
    routed._route(_n(f"nack.{SID}.sshrvd", "@relay", "not bound to 443"))
    with pytest.raises(PhaseError) as info:
        routed._waits.relay.result()
    assert info.value.phase == "relay" and "not bound to 443" in str(info.value)


def test_an_undecryptable_reply_fails_its_phase(routed):
    routed._route(_n(f"{SID}.dev.sshnp", "@daemon", None, error=ValueError("bad padding")))
    with pytest.raises(PhaseError) as info:
        routed._waits.response.result()
    assert info.value.phase == "request" and "bad padding" in str(info.value)


def test_a_silent_peer_fails_its_phase_with_the_timeout_message(routed):
    loop = routed._waits.relay.get_loop()

    async def wait():
        return await routed._wait_for("relay", routed._waits.relay, loop.time() + 0.01,
                                      "no reply from the relay @relay within 20 s")

    with pytest.raises(PhaseError) as info:
        loop.run_until_complete(wait())
    assert info.value.phase == "relay"
    assert str(info.value).endswith("no reply from the relay @relay within 20 s")


def test_a_reply_already_there_is_taken_even_after_the_deadline(routed):
    loop = routed._waits.ping.get_loop()
    routed._route(_n("heartbeat.dev.sshnp", "@daemon", "{}"))

    async def wait():
        return await routed._wait_for("ping", routed._waits.ping, loop.time() - 1, "late")

    assert loop.run_until_complete(wait()).value == "{}"


def test_a_monitor_that_stops_for_good_ends_the_wait_at_once(routed):
    loop = routed._waits.response.get_loop()

    async def broken():
        raise ConnectionError("atServer gone")

    async def wait():
        routed._dispatcher = loop.create_task(broken())
        t0 = loop.time()
        with pytest.raises(PhaseError) as info:
            await routed._wait_for("request", routed._waits.response, t0 + 30, "silent")
        return info.value, loop.time() - t0

    err, took = loop.run_until_complete(wait())
    assert err.phase == "request" and "monitor stopped" in str(err)
    assert "atServer gone" in str(err) and took < 5


# --- the one-time key ---------------------------------------------------------------------------

def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children() if p.status() != psutil.STATUS_ZOMBIE}


@pytest.mark.parametrize("fork", [True, False])
def test_the_ephemeral_key_is_rsa_2048_and_no_helper_is_left(fork):
    before = _children()
    eph = EphemeralKey.start(fork=fork)
    assert eph.forked is (fork and hasattr(os, "fork"))
    key = asyncio.run(eph.get())
    assert isinstance(key, RSAPrivateKey) and key.key_size == 2048
    assert key.public_key().public_numbers().e == 65537
    # loaded without OpenSSL's consistency check: prove it is a working key pair
    assert verify(key.public_key(), b"data", sign(key, b"data"))
    assert rsa_decrypt(key, rsa_encrypt(key.public_key(), b"secret")) == b"secret"
    eph.close()
    assert eph.pid is None
    assert _children() == before


def test_each_session_gets_a_different_key():
    a, b = EphemeralKey.start(), EphemeralKey.start()
    ka, kb = asyncio.run(a.get()), asyncio.run(b.get())
    assert ka.private_numbers() != kb.private_numbers()


def test_closing_before_the_key_is_read_kills_and_reaps_the_helper():
    before = _children()
    eph = EphemeralKey.start()
    if not eph.forked:
        pytest.skip("no fork on this platform")
    eph.close()
    assert eph.pid is None and _children() == before


# --- the key log --------------------------------------------------------------------------------

def test_the_key_log_is_off_unless_asked(monkeypatch, tmp_path):
    monkeypatch.delenv(debug.KEYLOG_ENV, raising=False)
    debug.record_session_keys("k", "i")
    assert debug.install_connection_hook() is False
    assert list(tmp_path.iterdir()) == []


def test_the_key_log_records_session_and_connection_secrets(monkeypatch, tmp_path):
    from noports.tunnel import client_end

    path = tmp_path / "keys.log"
    monkeypatch.setenv(debug.KEYLOG_ENV, str(path))
    # restored at teardown: the hook rebinds these two names in client_end
    monkeypatch.setattr(client_end, "generate_aes_key_b64", client_end.generate_aes_key_b64)
    monkeypatch.setattr(client_end, "generate_iv_b64", client_end.generate_iv_b64)
    debug.record_session_keys("S3ssionKey=", "S3ssionIV=")
    assert debug.install_connection_hook() is True
    assert debug.install_connection_hook() is True          # idempotent
    key, iv = client_end.generate_aes_key_b64(), client_end.generate_iv_b64()
    lines = path.read_text().splitlines()
    assert lines == ["SESSION_KEY S3ssionKey=", "SESSION_IV S3ssionIV=",
                     f"CONNECTION_KEY {key}", f"CONNECTION_IV {iv}"]
    assert len(key) == 44 and len(iv) == 24
    assert oct(path.stat().st_mode & 0o777) == "0o600"


# --- the -x hand-off ----------------------------------------------------------------------------

def _detached(runner, capfd, quiet=False):
    code = run_detached(runner, quiet=quiet)
    out, err = capfd.readouterr()
    return code, out, err


def test_ready_prints_the_port_alone_on_the_last_stdout_line(capfd):
    def runner(handoff):
        # fd 2 itself (pytest's capture swaps sys.stderr for its own file object)
        os.write(2, b"progress from the runner\n")
        assert os.getsid(0) == os.getpid()          # a new session: no terminal's signals
        handoff.ready(43210)
        os.write(2, b"after the hand-off: nobody hears this\n")
        return 0

    code, out, err = _detached(runner, capfd)
    assert code == 0
    assert out.splitlines()[-1] == "43210"
    assert "progress from the runner" in err and "nobody hears" not in err
    assert "runs in the background as pid" in err


def test_quiet_hand_off_prints_only_the_port(capfd):
    code, out, err = _detached(lambda h: h.ready(5) or 0, capfd, quiet=True)
    assert (code, out, err) == (0, "5\n", "")


def test_a_failed_set_up_returns_its_code_and_prints_no_port(capfd):
    def runner(handoff):
        os.write(2, b"npt: error: relay phase failed: silence\n")
        handoff.failed(5)
        return 5

    code, out, err = _detached(runner, capfd)
    assert code == 5 and out == ""
    assert "relay phase failed" in err


def test_a_runner_that_ends_without_a_hand_off_reports_failure(capfd):
    code, out, _ = _detached(lambda h: 0, capfd)
    assert code == 1 and out == ""


def test_a_runner_that_crashes_is_reported(capfd):
    def runner(handoff):
        raise RuntimeError("boom")

    code, out, _err = _detached(runner, capfd)
    assert code == 1 and out == ""
