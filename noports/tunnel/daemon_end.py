"""The daemon end of a multi-mode tunnel (relay side B): what ``npd`` runs for one session.

Owns (noports-protocol.md §5.5 "Multi mode", §6): the control socket to the relay's port B (auth
line in clear, then AES-256-CTR with the session key/IV); reading and decrypting control
messages; and, for every ``connect:`` message, in message order: a new socket to port B with the
auth line, a connection to the one permitted target, and the encrypting splice between them.

The target (host, port) is fixed when the end is made -- npd has already checked it against
permit-open -- and nothing on the control channel can change it: a ``connect:`` line carries
keys only, and one that carries anything else is a protocol error that ends the session.

Not here: deciding whether to serve the request (npd), the pump, the control codec.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
import time

from noports.at.stream import CtrStream
from noports.tunnel.connecting import connect_any, describe, resolve
from noports.tunnel.control import (
    Connect,
    ControlMessageError,
    ControlParser,
    Heartbeat,
    Unknown,
    encode_heartbeat_echo,
)
from noports.tunnel.endpoint import (
    CONNECT_TIMEOUT,
    HEARTBEAT_GRACE,
    IDLE_GRACE,
    ControlProtocol,
    TunnelEnd,
)

__all__ = ["LEGACY_FLUSH_DELAY", "DaemonEnd"]

log = logging.getLogger("noports.tunnel")

#: Seconds of silence after which a buffered newline-less 77-byte ``connect:`` (clients before
#: 5.6.1) is taken as complete.  Newer clients end each line with "\n" at once.
LEGACY_FLUSH_DELAY = 0.05
#: Attempts to open a data socket to the relay, one second apart (Atsign's newer daemon: 4).
RELAY_ATTEMPTS = 4
RELAY_RETRY_DELAY = 1.0


class _DaemonControl(ControlProtocol):
    def __init__(self, end: DaemonEnd, send_cipher, recv_cipher) -> None:
        super().__init__(end, send_cipher, recv_cipher)
        self.parser = ControlParser()
        self.legacy_timer: asyncio.TimerHandle | None = None

    def plaintext_received(self, data: bytes) -> None:
        end: DaemonEnd = self.end  # type: ignore[assignment]
        if end.state not in ("new", "open"):
            return
        try:
            events = self.parser.feed(data)
        except ControlMessageError as exc:
            for event in exc.events:
                end._control_event(event)
            end._end("protocol_error", str(exc))
            return
        for event in events:
            end._control_event(event)
        if self.legacy_timer is not None:
            self.legacy_timer.cancel()
            self.legacy_timer = None
        if self.parser.legacy_pending:
            loop = asyncio.get_running_loop()
            self.legacy_timer = loop.call_later(LEGACY_FLUSH_DELAY, self._legacy_flush)

    def _legacy_flush(self) -> None:
        self.legacy_timer = None
        event = self.parser.take_legacy()
        if event is not None:
            self.end._control_event(event)  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.legacy_timer is not None:
            self.legacy_timer.cancel()
            self.legacy_timer = None
        super().connection_lost(exc)


class DaemonEnd(TunnelEnd):
    """Relay side B of one session.

    ``session_key`` / ``session_iv``: the base64 key and IV that encrypt the control channel
    (``sessionAESKey``/``sessionIV``; with twin keys, ``aesKeyC2D``/``ivC2D``), None for both
    when the session is not encrypted.  In an encrypted session a ``connect:no:encrypt`` is
    refused (that connection only); in an unencrypted one a keyed ``connect:`` is honoured.

    Heartbeats (``heartbeat:<n>`` from the client end) are echoed unless ``echo_heartbeats`` is
    off; once two have come, a client that then goes silent for the longest recent gap between
    them plus ``heartbeat_grace`` seconds ends the session (``peer_silent``).

    ``idle_timeout`` (the request's ``timeout``): the end closes once it has had no live data
    connection for ``idle_timeout + idle_grace`` seconds.  The grace lets the client end (whose
    timer has the same length and started later) be the one that ends an idle session, by
    closing the control channel, so no ``connect:`` can arrive at a daemon end that just left.
    The control channel closing ends the daemon end at once, aborting its data connections.

    A target that refuses (or does not answer within ``target_timeout``): the connection's relay
    socket has been opened and authenticated already (relay first, in message order), so it is
    simply closed -- with a FIN, never an RST, which could overtake the auth line -- and the
    client's paired socket sees EOF.  Later connections stay correctly paired.  A data socket
    that cannot reach the relay after RELAY_ATTEMPTS tries ends the whole end
    (``relay_unreachable``): the relay would pair every later socket with the wrong peer.
    """

    peer_name = "client"

    def __init__(self, relay_host: str, relay_port: int, auth_line: bytes | str, *,
                 session_key: str | None, session_iv: str | None, target_host: str,
                 target_port: int, idle_timeout: float | None = 60.0,
                 idle_grace: float = IDLE_GRACE, connect_timeout: float = CONNECT_TIMEOUT,
                 target_timeout: float = CONNECT_TIMEOUT, relay_attempts: int = RELAY_ATTEMPTS,
                 relay_retry_delay: float = RELAY_RETRY_DELAY, max_buffer: int | None = None,
                 max_connections: int = 1024, heartbeat_grace: float = HEARTBEAT_GRACE,
                 echo_heartbeats: bool = True) -> None:
        super().__init__(relay_host, relay_port, auth_line, session_key=session_key,
                         session_iv=session_iv, idle_timeout=idle_timeout,
                         connect_timeout=connect_timeout, max_buffer=max_buffer,
                         max_connections=max_connections)
        if not 0 < int(target_port) < 65536:
            raise ValueError(f"not a target port: {target_port!r}")
        self.target_host = target_host
        self.target_port = int(target_port)
        self.idle_grace = idle_grace
        self.target_timeout = target_timeout
        self.relay_attempts = max(1, relay_attempts)
        self.relay_retry_delay = relay_retry_delay
        self.connections_refused = 0      # refused by us (policy) rather than by the target
        self.heartbeat_grace = heartbeat_grace
        self.echo_heartbeats = echo_heartbeats
        self._last_heartbeat: float | None = None
        self._heartbeat_gaps: collections.deque[float] = collections.deque(maxlen=4)
        self._queue: collections.deque[Connect] = collections.deque()
        self._wakeup: asyncio.Event | None = None
        self._opener: asyncio.Task | None = None

    @property
    def target(self) -> tuple[str, int]:
        return self.target_host, self.target_port

    def _idle_limit(self) -> float | None:
        return None if self.idle_timeout is None else self.idle_timeout + self.idle_grace

    def _control_ciphers(self):
        if self.session_keys is None:
            return None, None
        key, iv = self.session_keys
        return CtrStream(key, iv), CtrStream(key, iv)

    async def start(self) -> None:
        """Open the control socket to port B (auth line first) and start serving connect:s."""
        if self.state != "new":
            raise RuntimeError("DaemonEnd already started")
        loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        try:
            await self._connect_control(loop, _DaemonControl)
        except BaseException as exc:
            await self._fail_start(exc)
            raise
        self._opened()
        if self.state == "open":
            self._opener = self._spawn(self._open_in_order())
        log.info("daemon end: control channel to %s:%d up, target %s:%d, %s", self.relay_host,
                 self.relay_port, self.target_host, self.target_port,
                 "encrypted" if self.encrypted else "NOT encrypted")

    # -- control messages --
    def _control_event(self, event) -> None:
        self.stats.control_messages += 1
        if isinstance(event, Connect):
            self._queue.append(event)
            if self._wakeup is not None:
                self._wakeup.set()
        elif isinstance(event, Heartbeat):
            self._heartbeat(event)
        elif isinstance(event, Unknown):
            log.info("daemon end: ignoring unknown control message %r", event.line[:80])

    def _heartbeat(self, event: Heartbeat) -> None:
        """Echo it (our client then watches us) and learn the client's interval from the gaps
        between heartbeats, so that a client that stops sending them is given up on: after
        the longest recent gap plus the grace.  Atsign's clients log and ignore the echo."""
        log.debug("daemon end: heartbeat %s", event.text)
        if self.echo_heartbeats and self._control is not None:
            self._control.send(encode_heartbeat_echo(event))
        now = time.monotonic()
        if self._last_heartbeat is not None:
            self._heartbeat_gaps.append(now - self._last_heartbeat)
            limit = max(max(self._heartbeat_gaps), 0.1) + self.heartbeat_grace
            if self._peer_limit is None:
                log.info("daemon end: the client sends heartbeats (every %.1f s): a silence "
                         "of %.1f s will end the session", self._heartbeat_gaps[-1], limit)
            self._watch_peer(limit)
        self._last_heartbeat = now

    async def _stop_work(self) -> None:
        if self._opener is not None:
            self._opener.cancel()
            await asyncio.gather(self._opener, return_exceptions=True)
        self._queue.clear()

    # -- data connections --
    async def _open_in_order(self) -> None:
        """The one task that opens relay sockets: strictly one at a time, in message order."""
        while self.state == "open":
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            message = self._queue.popleft()
            if not await self._open_one(message):
                return

    def _refusal(self, message: Connect) -> str | None:
        if self.session_keys is not None and not message.encrypted:
            return "connect:no:encrypt in an encrypted session"
        if self.stats.connections_live >= self.max_connections:
            return f"already {self.max_connections} live connections"
        return None

    async def _open_one(self, message: Connect) -> bool:
        """Relay socket for one connect: (and its target, concurrently).  False: stop serving."""
        number = self.stats.connections_total + 1
        refusal = self._refusal(message)
        self._conn_started()
        target = None
        if refusal is None:
            target = self._spawn(self._connect_target())
        try:
            relay = await self._open_relay_with_retries()
        except (OSError, asyncio.TimeoutError) as exc:
            if target is not None:
                target.cancel()
                target.add_done_callback(_close_result)
            self._conn_finished(failed=True)
            self._end("relay_unreachable", f"cannot open data socket {number} to the relay "
                                           f"({describe(exc) or 'timed out'}): later "
                                           "connections could no longer be paired correctly")
            return False
        except BaseException:
            if target is not None:
                target.cancel()
                target.add_done_callback(_close_result)
            self._conn_finished(failed=True)
            raise
        if refusal is not None:
            self.connections_refused += 1
            log.warning("daemon end: connection %d refused: %s", number, refusal)
            relay.close()          # FIN after the auth line: the pairing stays aligned
            self._conn_finished(failed=True)
            return True

        def abandon_target() -> None:
            target.cancel()
            target.add_done_callback(_close_result)

        self._spawn_connection(self._finish_one(number, message, target, relay), (relay,),
                               on_abandon=abandon_target)
        return True

    async def _open_relay_with_retries(self) -> socket.socket:
        for attempt in range(1, self.relay_attempts + 1):
            try:
                return await self.open_relay_socket()
            except (OSError, asyncio.TimeoutError) as exc:
                if attempt == self.relay_attempts:
                    raise
                log.warning("daemon end: data socket to the relay failed (%s), attempt %d of "
                            "%d", describe(exc) or "timed out", attempt, self.relay_attempts)
                await asyncio.sleep(self.relay_retry_delay)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _connect_target(self) -> socket.socket:
        loop = self._loop
        addrs = await resolve(loop, self.target_host, self.target_port)
        sock, _addr = await connect_any(loop, addrs, self.target_timeout)
        return sock

    async def _finish_one(self, number: int, message: Connect, target: asyncio.Task,
                          relay: socket.socket) -> None:
        self._own(relay)
        try:
            plain = await target
        except (OSError, asyncio.TimeoutError) as exc:
            log.warning("daemon end: connection %d: target %s:%d refused or unreachable: %s",
                        number, self.target_host, self.target_port, describe(exc))
            relay.close()          # FIN: the client's paired socket sees EOF
            self._conn_finished(failed=True)
            return
        except BaseException:
            target.add_done_callback(_close_result)
            relay.close()
            self._conn_finished(failed=True)
            raise
        if message.encrypted:
            # daemon -> client is encrypted with the D2C key, client -> daemon decrypted with
            # C2D (the baseline form gives the same key/IV for both, each with its own state)
            encrypt = self.pump.new_cipher(message.key_d2c, message.iv_d2c)
            decrypt = self.pump.new_cipher(message.key_c2d, message.iv_c2d)
        else:
            encrypt = decrypt = None
        # _splice owns both sockets and counts this connection finished when it ends
        await self._splice(plain, relay, encrypt, decrypt)


def _close_result(task: asyncio.Task) -> None:
    """Done callback: close the socket a target-connect task produced, if it did."""
    if task.cancelled() or task.exception() is not None:
        return
    sock = task.result()
    if sock is not None:
        sock.close()
