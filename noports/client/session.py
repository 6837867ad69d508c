"""One npt session, phase by phase (noports-protocol.md §7.1, sequence.md): the I/O half.

Owns the order and overlap of the phases, their timeouts and their progress lines:

1. sessionId (UUID v4); the one-time RSA key is already being made (``keygen.py``);
2. log in to the client's atServer while a monitor for this session's replies subscribes
   (replies that arrive before it is live are replayed to it: it asks from "now");
3. send the ping and the relay's ``request_ports`` together, without waiting;
4. wait for the relay's reply (20 s), then for the ping response (``--daemon-ping-timeout``,
   counted from the ping) and check its features;
5. send the signed ``npt_request``; wait for the daemon's reply (15 s); verify and unwrap it;
6. open the tunnel's client end (control socket to the relay's port A, local listener);
7. drop the atServer connections: the running tunnel needs none.

Each failure is a :class:`~noports.client.phases.PhaseError` naming its phase.  Decisions (what
to send, what a reply means) live in ``phases.py``; this module only moves bytes and waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import stat
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from noports.at.atkeys import AtKeys
from noports.at.client import AtClient
from noports.at.crypto import public_key_to_b64
from noports.at.envelope import encode_envelope
from noports.at.monitor import AtNotification, Monitor
from noports.client import debug
from noports.client.keygen import EphemeralKey
from noports.client.phases import (
    PhaseError,
    SessionKeys,
    build_npt_request,
    check_features,
    ended_error,
    new_client_nonce,
    parse_relay_reply,
    read_ping_response,
    read_response,
    relay_request_body,
)
from noports.errors import NoPortsError
from noports.messages import (
    client_monitor_regex,
    heartbeat_key,
    npt_request_key,
    ping_key,
    relay_request_key,
    response_key,
)
from noports.relay.messages import RelayReply, encode_auth_line
from noports.tunnel import ClientEnd, TunnelEnded, TunnelError

__all__ = ["NptSession", "Progress", "SessionOptions"]

log = logging.getLogger("noports.client")

#: Seconds to wait for the relay's reply (Atsign: DefaultArgs.relayResponseTimeoutSeconds).
RELAY_TIMEOUT = 20.0
#: Seconds to wait for the daemon's reply to the session request (Atsign: 100 x 150 ms).
RESPONSE_TIMEOUT = 15.0
#: Seconds between control-channel heartbeats (Atsign's srv: 1800 s, to keep middleboxes from
#: idling the control connection out).  Ours are also a liveness check against our daemon,
#: which echoes them: a relay path that swallows bytes is noticed within this + 5 s.
DEFAULT_HEARTBEAT = 15.0
#: Seconds for logging in and subscribing (each call of AtClient also has its own timeout).
ATSERVER_TIMEOUT = 20.0
#: Notification lifetimes: the session keys live 10 s (ttl), notifications 1 min (ttln).
KEY_TTL_MS = 10_000
NOTIFY_TTLN_MS = 60_000
#: The monitor asks for notifications from this long before "now" by our clock, so that an
#: atServer whose clock lags ours still replays a reply that beat the subscription.  Only the
#: ping response key is not session-specific; an older one from the same daemon is harmless.
MONITOR_SKEW_MS = 2_000
#: After the control socket is up, how long to listen for the relay refusing its auth line
#: before reporting the port: a few round trips of the control connection, within bounds.
SETTLE_MIN, SETTLE_MAX, SETTLE_RTTS = 0.02, 0.5, 3


@dataclass
class SessionOptions:
    """What npt's flags say about one session (already validated and normalised)."""

    client: str                     # -f, "@alice"
    daemon: str                     # -t
    relay: str                      # -r
    device: str                     # -d, validated
    remote_port: int                # -p
    remote_host: str = "localhost"  # -h
    local_port: int = 0             # -l
    local_host: str = "127.0.0.1"   # --local-host
    key_file: Path | None = None    # -k
    root_domain: str = "root.atsign.org:64"
    ca_file: str | None = None
    daemon_ping_timeout: float = 20.0
    timeout_s: float = 30.0         # -T, seconds
    encrypt: bool = True
    relay_timeout: float = RELAY_TIMEOUT
    response_timeout: float = RESPONSE_TIMEOUT
    #: --heartbeat: control-channel heartbeat seconds (only to daemons whose ping offers
    #: controlChannelHeartbeats); a daemon that echoes them is given up on after this + 5 s
    #: of silence.  0 = none.
    heartbeat: float = DEFAULT_HEARTBEAT


class Progress:
    """Progress lines on stderr, ``npt: [  123 ms] phase: text``; silent with -q."""

    def __init__(self, quiet: bool = False, stream=None, clock=time.monotonic,
                 started: float | None = None) -> None:
        self.quiet = quiet
        self.stream = stream if stream is not None else sys.stderr
        self.clock = clock
        self.t0 = clock() if started is None else started

    def elapsed_ms(self) -> float:
        return (self.clock() - self.t0) * 1000.0

    def step(self, phase: str, text: str) -> None:
        if self.quiet:
            return
        self.write(f"npt: [{self.elapsed_ms():6.0f} ms] {phase}: {text}")

    def error(self, text: str) -> None:
        """Always shown, even with -q."""
        self.write(f"npt: error: {text}")

    def write(self, line: str) -> None:
        try:
            self.stream.write(line + "\n")
            self.stream.flush()
        except (OSError, ValueError):
            pass      # stderr gone (a detached run after its hand-off): nothing to tell


@dataclass
class _Waits:
    """The futures the monitor's notifications resolve."""

    relay: asyncio.Future
    ping: asyncio.Future
    response: asyncio.Future
    ignored: int = 0


class NptSession:
    """``port = await establish()``, then ``await wait_closed()`` or ``await close()``."""

    def __init__(self, opts: SessionOptions, progress: Progress | None = None, *,
                 ephemeral: EphemeralKey | None = None) -> None:
        self.opts = opts
        self.progress = progress or Progress(quiet=True)
        self.ephemeral = ephemeral or EphemeralKey()
        self.session_id = str(uuid.uuid4())
        self.client_nonce = new_client_nonce()
        self.client: AtClient | None = None
        self.monitor: Monitor | None = None
        self.end: ClientEnd | None = None
        self.heartbeats = False           # the daemon's ping offered controlChannelHeartbeats
        self.reply: RelayReply | None = None
        self.local_port: int | None = None
        self._dispatcher: asyncio.Task | None = None
        self._waits: _Waits | None = None
        self._tasks: set[asyncio.Task] = set()
        self._closing_at: asyncio.Future | None = None

    # ---- the phases --------------------------------------------------------------------------

    async def establish(self) -> int:
        """Run every phase up to a listening local port; PhaseError on failure (then every
        connection and helper of the session is closed)."""
        try:
            return await self._establish()
        except BaseException:
            await self.close()
            raise

    async def _establish(self) -> int:
        o = self.opts
        p = self.progress
        loop = asyncio.get_running_loop()
        self._waits = _Waits(loop.create_future(), loop.create_future(), loop.create_future())
        p.step("session", f"{self.session_id}: {o.client} -> {o.device}{o.daemon} "
                          f"{o.remote_host}:{o.remote_port} via relay {o.relay}")

        keys = self._load_keys()
        client = self.client = AtClient(o.client, keys, root=o.root_domain, ca_file=o.ca_file)
        regex = client_monitor_regex(self.session_id, o.device, o.daemon)
        since = int(time.time() * 1000) - MONITOR_SKEW_MS
        mon = self.monitor = client.monitor(regex, since=since)

        # login and subscription overlap; the sends need only the login
        subscribed = self._spawn(mon.start(timeout=ATSERVER_TIMEOUT))
        await self._phase("atserver", client.connect(), ATSERVER_TIMEOUT,
                          f"cannot log in as {o.client}")
        p.step("atserver", f"logged in as {o.client}")
        self._dispatcher = self._spawn(self._dispatch(mon))
        daemon_key = self._spawn(client.shared_keys.public_key(o.daemon))
        t_ping = loop.time()
        ping_sent = self._spawn(client.notify(f"{o.daemon}:{ping_key(o.device)}", "ping",
                                              ttl=KEY_TTL_MS, ttln=NOTIFY_TTLN_MS))
        t_relay = loop.time()
        body = relay_request_body(self.session_id, o.client, o.daemon, self.client_nonce)
        relay_sent = self._spawn(client.notify(f"{o.relay}:{relay_request_key(o.device)}", body,
                                               ttl=KEY_TTL_MS, ttln=NOTIFY_TTLN_MS))
        await self._phase("atserver", subscribed, ATSERVER_TIMEOUT,
                          "cannot subscribe to this session's notifications")
        await self._phase("relay", relay_sent, o.relay_timeout,
                          f"cannot send the request to {o.relay}")
        await self._phase("ping", ping_sent, o.daemon_ping_timeout,
                          f"cannot send the ping to {o.daemon}")
        p.step("atserver", "monitor subscribed; ping and relay request sent")

        # relay: its reply, within 20 s of the request
        n = await self._wait_for("relay", self._waits.relay, t_relay + o.relay_timeout,
                                 f"no reply from the relay {o.relay} within "
                                 f"{o.relay_timeout:g} s: is srvd running as {o.relay}, and "
                                 f"does it serve {o.client}?")
        reply = self.reply = parse_relay_reply(n.value, o.relay)
        p.step("relay", f"{o.relay} gave {reply.address} ports {reply.port_a}/{reply.port_b}")

        # ping: its answer, within --daemon-ping-timeout of the ping
        n = await self._wait_for("ping", self._waits.ping, t_ping + o.daemon_ping_timeout,
                                 f"no ping response from the device daemon {o.daemon} "
                                 f"(device {o.device!r}) within {o.daemon_ping_timeout:g} s: "
                                 f"the daemon is not running, the device name is wrong, or "
                                 f"{o.client} is not one of its managers")
        ping = read_ping_response(n.value, o.daemon)
        check_features(ping, o.timeout_s, o.daemon, o.device)
        p.step("ping", f"device {o.device!r} on {o.daemon} answered (version "
                       f"{ping.version or '?'})")
        self.heartbeats = bool(ping.supported_features.get("controlChannelHeartbeats") is True
                               and o.heartbeat and o.heartbeat > 0)

        # request: signed, with the one-time public key
        eph = await self._phase("request", self.ephemeral.get(), 60.0,
                                "cannot make the session's RSA key")
        request = build_npt_request(
            session_id=self.session_id, reply=reply, remote_host=o.remote_host,
            remote_port=o.remote_port, client_nonce=self.client_nonce, encrypt=o.encrypt,
            ephemeral_public_b64=public_key_to_b64(eph), timeout_s=o.timeout_s)
        envelope = encode_envelope(request.to_payload(), keys.encrypt_private)
        t_request = loop.time()
        await self._phase("request", client.notify(f"{o.daemon}:{npt_request_key(o.device)}",
                                                   envelope, ttl=KEY_TTL_MS,
                                                   ttln=NOTIFY_TTLN_MS),
                          o.response_timeout, f"cannot send the session request to {o.daemon}")
        p.step("request", f"session request sent to {o.daemon}")
        n = await self._wait_for("request", self._waits.response,
                                 t_request + o.response_timeout,
                                 f"no response from the device daemon {o.daemon} within "
                                 f"{o.response_timeout:g} s of the session request")
        pub, _ = await self._phase("request", daemon_key, RESPONSE_TIMEOUT,
                                   f"cannot fetch the public key of {o.daemon}")
        secrets_ = read_response(n.value, daemon=o.daemon, daemon_key=pub,
                                 session_id=self.session_id, ephemeral_key=eph,
                                 encrypt=o.encrypt)
        debug.record_session_keys(secrets_.key_b64, secrets_.iv_b64)
        p.step("request", f"{o.daemon} accepted; response verified"
                          + ("" if o.encrypt else " (traffic NOT encrypted)"))

        port = await self._open_tunnel(reply, keys, secrets_)
        # the tunnel needs no atServer from here on (closed in the background: the port is
        # reported meanwhile; close() waits for it)
        self._closing_at = asyncio.ensure_future(self._close_at())
        return port

    async def _open_tunnel(self, reply: RelayReply, keys: AtKeys, s: SessionKeys) -> int:
        o = self.opts
        auth_line = encode_auth_line(self.session_id, self.client_nonce, reply.rvd_nonce,
                                     keys.encrypt_private)
        try:
            end = self.end = ClientEnd(reply.address, reply.port_a, auth_line,
                                       session_key=s.key_b64, session_iv=s.iv_b64,
                                       bind_host=o.local_host, bind_port=o.local_port,
                                       idle_timeout=o.timeout_s,
                                       heartbeat_interval=o.heartbeat if self.heartbeats
                                       else None)
        except TunnelError as exc:
            raise PhaseError("tunnel", str(exc)) from None
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        try:
            port = await end.start()
        except TunnelError as exc:
            # its text already says what: the relay unreachable, or the local port not free
            raise PhaseError("tunnel", str(exc)) from None
        # A relay that rejects the auth line says so at once ("Socket auth failed") and
        # closes; a healthy one says nothing.  Listen for a few round trips before telling
        # the user the port, so that a refusal is reported as the phase that failed.
        settle = min(SETTLE_MAX, max(SETTLE_MIN, SETTLE_RTTS * (loop.time() - t0)))
        try:
            ended = await asyncio.wait_for(asyncio.shield(end.wait_closed()), settle)
        except asyncio.TimeoutError:
            ended = None
        if ended is not None:
            raise ended_error(ended, started=False) or PhaseError(
                "tunnel", f"the tunnel closed at once: {ended}")
        host, port = end.local_address
        self.local_port = port
        self.progress.step("tunnel", f"listening on {host}:{port} "
                                     f"({'encrypted' if end.encrypted else 'NOT encrypted'})")
        return port

    # ---- helpers -----------------------------------------------------------------------------

    def _load_keys(self) -> AtKeys:
        o = self.opts
        path = o.key_file
        try:
            keys = AtKeys.load(path, o.client)
        except (NoPortsError, OSError, ValueError) as exc:
            raise PhaseError("keys", f"cannot read the keys of {o.client} from {path}: "
                                     f"{exc}") from None
        with contextlib.suppress(OSError):
            mode = Path(path).stat().st_mode
            if mode & (stat.S_IRWXG | stat.S_IRWXO):
                # the file holds the atSign's private keys: say so, as ssh does
                self.progress.write(f"npt: warning: {path} is readable by group or others "
                                    f"(mode {stat.S_IMODE(mode):o}): chmod 600 it")
        return keys

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _phase(self, phase: str, aw, timeout: float, what: str):
        """Await ``aw`` within ``timeout``; any failure -> PhaseError(phase, what: why)."""
        try:
            return await asyncio.wait_for(aw, timeout)
        except asyncio.TimeoutError:
            raise PhaseError(phase, f"{what}: timed out after {timeout:g} s") from None
        except PhaseError:
            raise
        except (NoPortsError, OSError, ValueError) as exc:
            raise PhaseError(phase, f"{what}: {exc}") from None

    async def _wait_for(self, phase: str, fut: asyncio.Future, deadline: float,
                        on_timeout: str) -> AtNotification:
        """A routed notification, by ``deadline`` (loop time); the monitor failing for good
        ends the wait at once."""
        loop = asyncio.get_running_loop()
        waiters = {fut}
        if self._dispatcher is not None:
            waiters.add(self._dispatcher)
        left = deadline - loop.time()
        if not fut.done() and left > 0:
            await asyncio.wait(waiters, timeout=left, return_when=asyncio.FIRST_COMPLETED)
        if fut.done():
            return fut.result()      # may raise the PhaseError the router put there
        d = self._dispatcher
        if d is not None and d.done():
            why = d.exception() if not d.cancelled() else "cancelled"
            raise PhaseError(phase, f"the notification monitor stopped: {why}")
        raise PhaseError(phase, on_timeout)

    async def _dispatch(self, mon: Monitor) -> None:
        async for n in mon:
            self._route(n)

    def _route(self, n: AtNotification) -> None:
        """Hand a notification to the wait it answers -- only from the atSign that must send it
        (the regex is a filter, not an authorisation)."""
        o = self.opts
        w = self._waits
        entity, sender = n.entity, n.from_atsign
        target: asyncio.Future | None = None
        phase = ""
        if sender == o.relay and entity == f"{self.session_id}.sshrvd":
            target, phase = w.relay, "relay"
        elif sender == o.relay and entity == f"nack.{self.session_id}.sshrvd":
            if not w.relay.done():
                w.relay.set_exception(PhaseError(
                    "relay", f"the relay {o.relay} refused the request: {n.value}"))
            return
        elif sender == o.daemon and entity == heartbeat_key(o.device):
            target, phase = w.ping, "ping"
        elif sender == o.daemon and entity == response_key(self.session_id, o.device):
            target, phase = w.response, "request"
        if target is None or n.operation == "delete":
            w.ignored += 1
            log.debug("ignored notification %s from %s", n.key, sender)
            return
        if target.done():
            log.debug("duplicate %s notification %s ignored", phase, n.id)
            return
        if n.value is None and n.decrypt_error is not None:
            target.set_exception(PhaseError(phase, f"the {phase} reply from {sender} could "
                                                   f"not be decrypted: {n.decrypt_error}"))
            return
        target.set_result(n)

    async def _close_at(self) -> None:
        """Close the monitor and the atServer connection (the tunnel runs without them)."""
        mon, self.monitor = self.monitor, None
        client, self.client = self.client, None
        d, self._dispatcher = self._dispatcher, None
        with contextlib.suppress(Exception, asyncio.CancelledError):
            if mon is not None:
                await asyncio.wait_for(mon.close(), 2.0)
        if d is not None:
            d.cancel()
            with contextlib.suppress(BaseException):
                await d
        with contextlib.suppress(Exception, asyncio.CancelledError):
            if client is not None:
                await asyncio.wait_for(client.close(), 2.0)

    # ---- running ----------------------------------------------------------------------------

    async def wait_closed(self) -> TunnelEnded | None:
        if self.end is None:
            return None
        return await self.end.wait_closed()

    async def close(self) -> None:
        """End everything this session opened (idempotent)."""
        self.ephemeral.close()
        if self.end is not None:
            with contextlib.suppress(Exception):
                await self.end.close()
        if self._closing_at is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await self._closing_at
        await self._close_at()
        current = asyncio.current_task()
        for task in list(self._tasks):
            if task is not current and not task.done():
                task.cancel()
        pending = [t for t in self._tasks if t is not current]
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
