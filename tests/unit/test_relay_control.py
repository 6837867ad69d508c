"""noports.relay.control (and the srvd flag checks): who may open a session, decided without
sockets.  The I/O half (RelayControl) runs here against a fake AtClient and a fake session
registry, so the order of checks -- and what a refused request does *not* cost -- is visible."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid

import pytest

from noports.at.atkeys import AtKeys
from noports.at.monitor import notification_from_json
from noports.errors import AtServerError, InvalidAtSignError
from noports.relay import cli
from noports.relay.control import (
    LEGACY,
    REQUEST_PORTS,
    ControlPolicy,
    Ignored,
    RefusalLog,
    RelayControl,
    request_kind,
)
from noports.relay.session import RelayRefused
from noports.relay.stats import RelayStats

RELAY = "@relay"


def body(atsign_a="@client", atsign_b="@daemon", **fields) -> dict:
    out = {"sessionId": str(uuid.uuid4()), "atSignA": atsign_a, "atSignB": atsign_b,
           "authenticateSocketA": True, "authenticateSocketB": True,
           "clientNonce": "2024-06-18T09:48:41.331275"}
    out.update(fields)
    return out


def screen(policy: ControlPolicy, entity="dev.request_ports.sshrvd", sender="@client", **kw):
    kw.setdefault("recipient", RELAY)
    return policy.screen(entity=entity, sender=sender, **kw)


# --- request_kind ---------------------------------------------------------------------------

@pytest.mark.parametrize("entity,kind", [
    ("dev.request_ports.sshrvd", REQUEST_PORTS),
    ("my_laptop-2.request_ports.sshrvd", REQUEST_PORTS),
    ("dev.sshrvd", LEGACY),
    ("default.sshrvd", LEGACY),
    # newer relay keys and replies are never requests (Atsign's relay would take them as legacy)
    ("dev.auth_modes.sshrvd", None),
    ("nack.3a4c9e1f.sshrvd", None),
    ("logging.3a4c9e1f.sessions.sshrvd", None),
    ("discover_request.sshrvd", None),
    ("request_ports.sshrvd", None),
    ("x.sshrvd", None),                          # device names have 2-36 characters
    ("dev.request_ports.sshrvd.evil", None),
    ("dev.sshnp", None),
    ("", None),
])
def test_request_kind(entity, kind):
    assert request_kind(entity) == kind


# --- screen: before any decryption ----------------------------------------------------------

def test_screen_passes_a_request_to_an_open_relay():
    policy = ControlPolicy(RELAY)
    assert screen(policy) == REQUEST_PORTS
    assert screen(policy, sender="@anyone") == REQUEST_PORTS


@pytest.mark.parametrize("kw,reason", [
    ({"entity": "dev.auth_modes.sshrvd"}, "not_a_request"),
    ({"operation": "delete"}, "not_a_request"),
    ({"recipient": "@someone_else"}, "not_a_request"),
])
def test_screen_ignores_what_is_not_a_request(kw, reason):
    verdict = screen(ControlPolicy(RELAY), **kw)
    assert isinstance(verdict, Ignored) and verdict.reason == reason


def test_manager_rule_checks_the_sender():
    policy = ControlPolicy(RELAY, manager="@MGR")
    assert policy.manager == "@mgr"
    assert screen(policy, sender="@mgr") == REQUEST_PORTS
    for sender in ("@mallory", "@client", RELAY):
        verdict = screen(policy, sender=sender)
        assert isinstance(verdict, Ignored) and verdict.reason == "not_manager"
        assert "@mgr" in verdict.message and sender in verdict.message


def test_non_managers_are_refused_first_whatever_else_holds():
    """A stranger is refused as a stranger (the cheapest check) even when draining, over quota
    or sending a legacy request; so stranger floods never reach the later checks."""
    policy = ControlPolicy(RELAY, manager="@mgr", pending_quota=1, max_inflight=1)
    verdict = screen(policy, entity="dev.sshrvd", sender="@mallory", draining=True, pending=5,
                     inflight=5, total_inflight=5)
    assert verdict.reason == "not_manager"


def test_empty_manager_cannot_mean_anyone():
    with pytest.raises(InvalidAtSignError):
        ControlPolicy(RELAY, manager="")


def test_legacy_requests_are_refused_unless_allowed():
    verdict = screen(ControlPolicy(RELAY), entity="dev.sshrvd")
    assert isinstance(verdict, Ignored) and verdict.reason == "unauthenticated"
    assert "--allow-unauthenticated" in verdict.message
    assert screen(ControlPolicy(RELAY, allow_unauthenticated=True), entity="dev.sshrvd") == LEGACY


def test_draining_refuses_new_requests():
    verdict = screen(ControlPolicy(RELAY), draining=True)
    assert verdict.reason == "draining"


def test_quota_counts_pending_and_in_flight_requests():
    policy = ControlPolicy(RELAY, pending_quota=3)
    assert screen(policy, pending=2, inflight=0) == REQUEST_PORTS
    assert screen(policy, pending=0, inflight=2) == REQUEST_PORTS
    for pending, inflight in ((3, 0), (0, 3), (2, 1)):
        verdict = screen(policy, pending=pending, inflight=inflight)
        assert verdict.reason == "quota", (pending, inflight)


def test_global_in_flight_cap():
    policy = ControlPolicy(RELAY, max_inflight=4)
    assert screen(policy, total_inflight=3) == REQUEST_PORTS
    assert screen(policy, total_inflight=4).reason == "busy"


def test_quota_must_be_positive():
    with pytest.raises(ValueError):
        ControlPolicy(RELAY, pending_quota=0)


# --- admit: the decrypted value -------------------------------------------------------------

def test_admit_parses_a_good_request():
    b = body()
    request = ControlPolicy(RELAY).admit(REQUEST_PORTS, json.dumps(b), "@client")
    assert request.session_id == b["sessionId"]
    assert (request.atsign_a, request.atsign_b) == ("@client", "@daemon")


@pytest.mark.parametrize("value", [None, "", "not json", "[1]", json.dumps({"sessionId": "x"}),
                                   json.dumps(body(authenticateSocketA="yes"))])
def test_admit_refuses_malformed_values(value):
    verdict = ControlPolicy(RELAY).admit(REQUEST_PORTS, value, "@client")
    assert isinstance(verdict, Ignored) and verdict.reason == "bad_request"


def test_atsign_a_must_be_the_sender():
    """With or without --manager: nobody opens a session in another atSign's name (the
    manager sending atSignA=@client is refused too)."""
    for policy, sender in ((ControlPolicy(RELAY), "@mallory"),
                           (ControlPolicy(RELAY, manager="@mgr"), "@mgr")):
        verdict = policy.admit(REQUEST_PORTS, json.dumps(body("@client")), sender)
        assert isinstance(verdict, Ignored) and verdict.reason == "sender_mismatch"
    # spelling differences are not differences
    ok = ControlPolicy(RELAY).admit(REQUEST_PORTS, json.dumps(body(" @Client ")), "@client")
    assert not isinstance(ok, Ignored)


@pytest.mark.parametrize("fields", [{"authenticateSocketA": False},
                                    {"authenticateSocketB": False},
                                    {"authenticateSocketA": False, "authenticateSocketB": False}])
def test_unauthenticated_json_requests_are_refused_unless_allowed(fields):
    value = json.dumps(body(**fields))
    verdict = ControlPolicy(RELAY).admit(REQUEST_PORTS, value, "@client")
    assert isinstance(verdict, Ignored) and verdict.reason == "unauthenticated"
    allowed = ControlPolicy(RELAY, allow_unauthenticated=True).admit(REQUEST_PORTS, value,
                                                                     "@client")
    assert not isinstance(allowed, Ignored)


def test_admit_legacy_takes_the_sender_as_side_a():
    policy = ControlPolicy(RELAY, allow_unauthenticated=True)
    request = policy.admit(LEGACY, " 3a4c9e1f-5b2d-4e8a-9c7f-0d1e2f3a4b5c\n", "@client")
    assert request.legacy and request.atsign_a == "@client" and request.atsign_b is None
    assert policy.admit(LEGACY, "bad id!", "@client").reason == "bad_request"


# --- RefusalLog -----------------------------------------------------------------------------

def test_refusal_log_once_per_reason_per_window(caplog):
    now = [100.0]
    rlog = RefusalLog(logging.getLogger("test.refusals"), window=60.0, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="test.refusals"):
        assert rlog("quota", "first") is True
        assert [rlog("quota", f"n{i}") for i in range(50)] == [False] * 50
        assert rlog("not_manager", "other reason") is True
        now[0] += 59.9
        assert rlog("quota", "still inside") is False
        now[0] += 0.2
        assert rlog("quota", "after the window") is True
        rlog("quota", "held back")
        rlog.flush()
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "request refused (quota): first",
        "request refused (not_manager): other reason",
        "request refused (quota): after the window (51 more refused for this reason since "
        "the last line)",
        "request refused (quota): 1 more since the last line",
    ]


# --- RelayControl against fakes (no sockets) ------------------------------------------------

class FakeClient:
    """What RelayControl uses of AtClient: plookup, notify, decrypt_notification."""

    def __init__(self, keys: dict[str, AtKeys]) -> None:
        self.keys = keys
        self.lookups: list[str] = []
        self.notified: list[tuple] = []
        self.decrypted = 0
        self.gate: asyncio.Event | None = None    # when set, lookups wait for it
        self.fail_notify = False

    async def plookup(self, key):
        self.lookups.append(key)
        if self.gate is not None:
            await self.gate.wait()
        atsign = key[len("publickey"):]
        if atsign not in self.keys:
            raise AtServerError("AT0015", f"key not found: public:{key}")
        return self.keys[atsign].encrypt_public_b64

    async def notify(self, key, value, **kw):
        if self.fail_notify:
            raise AtServerError("AT0013", "connection exception")
        self.notified.append((key, value, kw))
        return str(uuid.uuid4())

    async def decrypt_notification(self, payload):
        self.decrypted += 1
        n = notification_from_json(dict(payload, value=payload["plain"], isEncrypted=False))
        return n


class FakeSession:
    def __init__(self, request, n: int) -> None:
        self.request = request
        self.session_id = request.session_id
        self.port_a, self.port_b = 40000 + 2 * n, 40001 + 2 * n
        self.rvd_nonce = None if request.legacy else f"nonce{n}"
        self.state = "open"
        self.close_reason = ""

    async def close(self, grace=0.0, reason="closed"):
        self.state, self.close_reason = "closed", reason


class FakeSessions:
    """The registry surface RelayControl uses; duplicate sessionIds refused as the real one."""

    def __init__(self) -> None:
        self.stats = RelayStats()
        self.draining = False
        self.opened: list[tuple] = []
        self.live: dict[str, FakeSession] = {}

    def pending_for(self, atsign):
        return sum(1 for s in self.live.values() if s.request.atsign_a == atsign)

    def check(self, request, requester=None):
        if request.session_id in self.live:
            self.stats.refuse("duplicate_session")
            raise RelayRefused("duplicate_session", f"session {request.session_id} is live")

    async def open(self, request, *, public_key_a=None, public_key_b=None, requester=None):
        self.check(request, requester)
        session = FakeSession(request, len(self.opened))
        self.opened.append((request, public_key_a, public_key_b, requester))
        self.live[request.session_id] = session
        return session


@pytest.fixture(scope="module")
def atkeys():
    return {a: AtKeys.generate(a) for a in ("@client", "@daemon", "@mgr")}


def notification(entity, value, sender="@client", to=RELAY, encrypted=True, operation="update"):
    """A received notification; ``encrypted`` ones carry ciphertext the fake client 'decrypts'."""
    return notification_from_json({
        "id": str(uuid.uuid4()), "from": sender, "to": to, "key": f"{to}:{entity}{sender}",
        "value": "Y2lwaGVydGV4dA==" if encrypted else value, "plain": value,
        "operation": operation, "epochMillis": 1, "isEncrypted": encrypted})


def control_for(atkeys, **policy_kw):
    client = FakeClient(atkeys)
    sessions = FakeSessions()
    control = RelayControl(client, sessions, ControlPolicy(RELAY, **policy_kw),
                           address="relay.example.com",
                           refusal_log=RefusalLog(logging.getLogger("test.control")))
    return control, client, sessions


async def handle(control, n):
    task = control.dispatch(n)
    if task is not None:
        await task


def test_a_request_is_answered_with_csv_as_the_requester_shares_it(atkeys, run):
    control, client, sessions = control_for(atkeys)
    b = body()
    run(handle(control, notification("dev.request_ports.sshrvd", json.dumps(b))))
    assert client.lookups == ["publickey@client", "publickey@daemon"]
    _request, key_a, key_b, requester = sessions.opened[0]
    assert requester == "@client"
    assert key_a.public_numbers() == atkeys["@client"].encrypt_public.public_numbers()
    assert key_b.public_numbers() == atkeys["@daemon"].encrypt_public.public_numbers()
    assert client.notified == [(f"@client:{b['sessionId']}.sshrvd",
                                "relay.example.com,40000,40001,nonce0",
                                {"ttl": 10_000, "ttln": 60_000})]
    assert (control.requests_total, control.replies_total) == (1, 1)


def test_json_reply_when_asked(atkeys, run):
    control, client, _ = control_for(atkeys)
    b = body(sendJsonResponse=True)
    run(handle(control, notification("dev.request_ports.sshrvd", json.dumps(b))))
    reply = json.loads(client.notified[0][1])
    assert reply == {"address": "relay.example.com", "portA": 40000, "portB": 40001,
                     "rvdNonce": "nonce0", "supportsEventLogging": False}


def test_a_stranger_costs_no_decryption_and_no_lookup(atkeys, run):
    control, client, sessions = control_for(atkeys, manager="@mgr")
    for entity, value in (("dev.request_ports.sshrvd", json.dumps(body("@mgr"))),
                          ("dev.sshrvd", "3a4c9e1f-5b2d-4e8a-9c7f-0d1e2f3a4b5c")):
        assert control.dispatch(notification(entity, value, sender="@mallory")) is None
    assert (client.decrypted, client.lookups, sessions.opened, client.notified) == (0, [], [], [])
    assert sessions.stats.refusals["not_manager"] == 2
    # the manager itself is served
    run(handle(control, notification("dev.request_ports.sshrvd", json.dumps(body("@mgr")),
                                     sender="@mgr")))
    assert len(client.notified) == 1 and client.notified[0][0].startswith("@mgr:")


def test_refused_after_decryption_gets_no_lookup_and_no_reply(atkeys, run):
    control, client, sessions = control_for(atkeys)
    for value in ("garbage", json.dumps(body("@daemon")),
                  json.dumps(body(authenticateSocketB=False))):
        run(handle(control, notification("dev.request_ports.sshrvd", value)))
    assert client.decrypted == 3
    assert (client.lookups, sessions.opened, client.notified) == ([], [], [])
    assert dict(sessions.stats.refusals) == {"bad_request": 1, "sender_mismatch": 1,
                                             "unauthenticated": 1}


def test_a_live_session_id_is_ignored(atkeys, run):
    control, client, sessions = control_for(atkeys)
    b = body()
    run(handle(control, notification("dev.request_ports.sshrvd", json.dumps(b))))
    lookups = len(client.lookups)
    run(handle(control, notification("dev.request_ports.sshrvd",
                                     json.dumps(dict(b, clientNonce="other")))))
    assert len(client.notified) == 1 and len(sessions.opened) == 1
    assert len(client.lookups) == lookups          # refused before any lookup
    assert sessions.stats.refusals["duplicate_session"] == 1


def test_quota_includes_requests_still_being_looked_up(atkeys, run):
    """A burst arrives faster than lookups finish: requests in flight count against the
    quota, so the burst never gets past it."""
    control, client, sessions = control_for(atkeys, pending_quota=2)

    async def main():
        client.gate = asyncio.Event()
        tasks = [control.dispatch(notification("dev.request_ports.sshrvd", json.dumps(body())))
                 for _ in range(6)]
        started = [t for t in tasks if t is not None]
        assert len(started) == 2
        client.gate.set()
        await asyncio.gather(*started)

    run(main())
    assert len(sessions.opened) == 2 and len(client.notified) == 2
    assert sessions.stats.refusals["quota"] == 4
    # the two sessions are still pending: the next request is refused too
    assert control.dispatch(notification("dev.request_ports.sshrvd", json.dumps(body()))) is None
    assert sessions.stats.refusals["quota"] == 5


def test_missing_public_key_opens_nothing(atkeys, run):
    control, client, sessions = control_for(atkeys)
    run(handle(control, notification("dev.request_ports.sshrvd",
                                     json.dumps(body(atsign_b="@nobody")))))
    assert sessions.opened == [] and client.notified == []
    assert sessions.stats.refusals["no_public_key"] == 1


def test_a_reply_that_cannot_be_sent_frees_the_session(atkeys, run):
    control, client, sessions = control_for(atkeys)
    client.fail_notify = True
    b = body()
    run(handle(control, notification("dev.request_ports.sshrvd", json.dumps(b))))
    session = sessions.live[b["sessionId"]]
    assert (session.state, session.close_reason) == ("closed", "reply_failed")
    assert sessions.stats.refusals["reply_failed"] == 1 and control.replies_total == 0


def test_draining_control_refuses(atkeys, run):
    control, client, sessions = control_for(atkeys)
    control.draining = True
    assert control.dispatch(notification("dev.request_ports.sshrvd", json.dumps(body()))) is None
    assert sessions.stats.refusals["draining"] == 1 and client.decrypted == 0


def test_legacy_request_with_allow_unauthenticated_gets_a_null_nonce(atkeys, run):
    control, client, _ = control_for(atkeys, allow_unauthenticated=True)
    sid = "3a4c9e1f-5b2d-4e8a-9c7f-0d1e2f3a4b5c"
    run(handle(control, notification("dev.sshrvd", sid)))
    assert client.lookups == []                     # nobody authenticates: no keys needed
    assert client.notified[0][:2] == (f"@client:{sid}.sshrvd",
                                      "relay.example.com,40000,40001,null")


def test_control_counters_render_as_prometheus_text(atkeys, run):
    control, _, _ = control_for(atkeys)
    run(handle(control, notification("dev.request_ports.sshrvd", json.dumps(body()))))
    text = control.render()
    assert "noports_relay_requests_total 1\n" in text and "noports_relay_replies_total 1\n" in text
    assert "# TYPE noports_relay_replies_total counter" in text


# --- srvd flags -----------------------------------------------------------------------------

def test_production_defaults():
    args = cli.parse_args(["-a", "@relay", "-i", "relay.example.com"])
    assert (args.auth_timeout, args.pairing_timeout, args.pending_quota, args.drain_grace) \
        == (5.0, 30.0, 32, 10.0)
    assert args.bind == "0.0.0.0" and args.metrics_port is None
    assert args.metrics_host == "127.0.0.1"
    assert args.root_domain == "root.atsign.org:64"
    assert args.manager is None and args.allow_unauthenticated is False
    assert args.key_file.name == "@relay_key.atKeys" and args.key_file.parent.name == "keys"


def test_manager_flag_forms():
    parse = cli.parse_args
    assert parse(["-a", "@r", "-i", "h", "-m", "open"]).manager is None
    assert parse(["-a", "@r", "-i", "h", "-m", "OPEN"]).manager is None
    assert parse(["-a", "@r", "-i", "h", "-m", " @Mgr "]).manager == "@mgr"
    assert parse(["-a", "@r", "-i", "h", "--manager", "mgr"]).manager == "@mgr"


@pytest.mark.parametrize("argv", [["-m", ""], ["-m", " "], ["--manager="], ["--nope"],
                                  ["--pending-quota", "-1"], ["--drain-grace", "-1"],
                                  ["--auth-timeout", "0"], ["--metrics-port", "70000"],
                                  ["--root-domain", "host:notaport"]])
def test_bad_flags_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.parse_args(["-a", "@relay", "-i", "h", *argv])
    assert exc.value.code == 2
    assert "srvd: error:" in capsys.readouterr().err


def test_fd_limit_is_raised_to_the_hard_limit():
    import resource
    soft, hard = cli.raise_fd_limit()
    assert (soft, hard) == resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY:
        assert soft == hard
