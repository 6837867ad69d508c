"""The client end of a multi-mode tunnel (relay side A): what ``npt`` runs in-process.

Owns (noports-protocol.md §5.5 "Multi mode", §6): the control socket to the relay's port A
(auth line in clear, then everything AES-256-CTR with the session key/IV, one long-lived state);
the local listener (127.0.0.1 and any free port unless told otherwise); and, for every accepted
local connection, strictly in accept order: a new socket to port A with the auth line, a fresh
per-connection key and IV, ``connect:<key>:<iv>\\n`` on the control channel (or
``connect:no:encrypt\\n``), then the encrypting splice.  Also the idle timeout and heartbeats.

Not here: negotiating the session (npt), parsing control lines (``control.py``), the pump.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket

from noports.at.crypto import b64d, generate_aes_key_b64, generate_iv_b64
from noports.at.stream import CtrStream
from noports.tunnel.connecting import describe
from noports.tunnel.control import encode_connect, encode_heartbeat, encode_no_encrypt
from noports.tunnel.endpoint import (
    CONNECT_TIMEOUT,
    HEARTBEAT_GRACE,
    ControlProtocol,
    TunnelEnd,
    TunnelError,
)

__all__ = ["ClientEnd"]

log = logging.getLogger("noports.tunnel")

# accept() errors that mean "out of some resource": back off instead of spinning
_RESOURCE_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


#: Longest line kept while looking for heartbeat echoes; anything longer is just dropped.
_MAX_ECHO_LINE = 256


class _ClientControl(ControlProtocol):
    """Baseline daemons never write on the control channel.  Ours echoes each ``heartbeat:<n>``
    line back; the first echo tells the client end that this daemon's silence is meaningful.
    Anything else is logged and ignored, as Atsign's clients do."""

    def __init__(self, end, send_cipher, recv_cipher) -> None:
        super().__init__(end, send_cipher, recv_cipher)
        self.partial = b""

    def plaintext_received(self, data: bytes) -> None:
        *lines, rest = (self.partial + data).split(b"\n")
        self.partial = rest[-_MAX_ECHO_LINE:]
        for line in lines:
            if line.startswith(b"heartbeat:"):
                self.end._heartbeat_echo()  # type: ignore[attr-defined]
            else:
                log.debug("client end: ignoring %d unexpected bytes from the daemon on the "
                          "control channel", len(line) + 1)


class ClientEnd(TunnelEnd):
    """Relay side A of one session.

    ``session_key`` / ``session_iv`` are the base64 strings from the daemon's response (None
    for both when ``encryptRvdTraffic`` is off).  ``idle_timeout`` (npt ``-T``): the end closes
    once it has had no live local connection for that many seconds -- counted from start()
    and again from each moment the last live local connection ends; None or 0 = never.
    ``heartbeat_interval``: send ``heartbeat:<n>`` at start and then that often (off by
    default: only daemons whose ping says ``controlChannelHeartbeats`` understand it).  A daemon
    that echoes them (ours does) is then watched: nothing from it for ``heartbeat_interval +
    heartbeat_grace`` seconds ends the session with ``peer_silent`` -- the only way to notice a
    relay path that swallows bytes without closing (TCP keepalive is answered by the relay).
    """

    peer_name = "daemon"

    def __init__(self, relay_host: str, relay_port: int, auth_line: bytes | str, *,
                 session_key: str | None, session_iv: str | None,
                 bind_host: str = "127.0.0.1", bind_port: int = 0,
                 idle_timeout: float | None = 30.0, connect_timeout: float = CONNECT_TIMEOUT,
                 heartbeat_interval: float | None = None,
                 heartbeat_grace: float = HEARTBEAT_GRACE, max_buffer: int | None = None,
                 max_connections: int = 1024, backlog: int = 128) -> None:
        super().__init__(relay_host, relay_port, auth_line, session_key=session_key,
                         session_iv=session_iv, idle_timeout=idle_timeout,
                         connect_timeout=connect_timeout, max_buffer=max_buffer,
                         max_connections=max_connections)
        self.bind_host = bind_host
        self.bind_port = int(bind_port)
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_grace = heartbeat_grace
        self.heartbeat_echoes = 0
        self.backlog = backlog
        self.local_port = 0
        self._listener: socket.socket | None = None
        self._accept_task: asyncio.Task | None = None
        self._slot_free: asyncio.Event | None = None
        self.heartbeats_sent = 0

    @property
    def local_address(self) -> tuple[str, int]:
        """The listener's own address (``getsockname``), e.g. ``("127.0.0.1", 40123)``."""
        if self._listener is not None and self._listener.fileno() >= 0:
            host, port = self._listener.getsockname()[:2]
            return host, port
        return self.bind_host, self.local_port

    def _control_ciphers(self):
        if self.session_keys is None:
            return None, None
        key, iv = self.session_keys
        # baseline: the same key and IV both ways, each direction with its own state
        return CtrStream(key, iv), CtrStream(key, iv)

    async def start(self) -> int:
        """Open the control socket, bind the local port; return the local port."""
        if self.state != "new":
            raise RuntimeError("ClientEnd already started")
        loop = asyncio.get_running_loop()
        try:
            await self._connect_control(loop, _ClientControl)
            self._listener = self._bind()
        except BaseException as exc:
            await self._fail_start(exc)
            raise
        self.local_port = self._listener.getsockname()[1]
        self._slot_free = asyncio.Event()
        self._opened()
        if self.state == "open":
            self._accept_task = self._spawn(self._accept_loop())
            if self.heartbeat_interval:
                self._spawn(self._heartbeats(self.heartbeat_interval))
        log.info("client end: listening on %s:%d, relay %s:%d, %s", self.bind_host,
                 self.local_port, self.relay_host, self.relay_port,
                 "encrypted" if self.encrypted else "NOT encrypted")
        return self.local_port

    def _bind(self) -> socket.socket:
        # Bound directly on the asked port (0: the kernel picks a free one), never "find a free
        # port, close it, bind it again" as Atsign's srv does: no window for another process.
        try:
            family = socket.AF_INET6 if ":" in self.bind_host else socket.AF_INET
            sock = socket.create_server((self.bind_host, self.bind_port), family=family,
                                        backlog=self.backlog)
        except OSError as exc:
            raise TunnelError(f"cannot listen on {self.bind_host}:{self.bind_port}: "
                              f"{describe(exc)}") from None
        sock.setblocking(False)
        return sock

    async def _stop_work(self) -> None:
        if self._accept_task is not None:
            self._accept_task.cancel()
            await asyncio.gather(self._accept_task, return_exceptions=True)
        if self._listener is not None:
            self._listener.close()

    def _conn_finished(self, failed: bool = False) -> None:
        super()._conn_finished(failed)
        if self._slot_free is not None:
            self._slot_free.set()

    async def _accept_loop(self) -> None:
        loop = self._loop
        listener = self._listener
        while self.state == "open":
            while self.stats.connections_live >= self.max_connections:
                self._slot_free.clear()
                await self._slot_free.wait()
            try:
                conn, peer = await loop.sock_accept(listener)
            except OSError as exc:
                if listener.fileno() < 0:
                    return
                if exc.errno in _RESOURCE_ERRNOS:
                    log.warning("client end: accept failed (%s); backing off", exc)
                    await asyncio.sleep(0.1)   # the condition clears as sockets close
                continue
            # One connection at a time, in accept order: its relay socket and its connect:
            # line must come in the same order on both ends (the relay pairs FIFO).
            await self._connect_one(conn, peer)

    async def _connect_one(self, conn: socket.socket, peer) -> None:
        self._conn_started()
        try:
            relay = await self.open_relay_socket()
        except (OSError, asyncio.TimeoutError) as exc:
            # no connect: line is sent for it, so the pairing of later connections is intact
            log.warning("client end: local connection from %s dropped: cannot open a socket "
                        "to the relay: %s", peer, describe(exc) or "timed out")
            conn.close()
            self._conn_finished(failed=True)
            return
        except BaseException:
            conn.close()
            self._conn_finished(failed=True)
            raise
        if self.session_keys is not None:
            key_b64, iv_b64 = generate_aes_key_b64(), generate_iv_b64()
            line = encode_connect(key_b64, iv_b64)
            key, iv = b64d(key_b64), b64d(iv_b64)
            encrypt, decrypt = self.pump.new_cipher(key, iv), self.pump.new_cipher(key, iv)
        else:
            line = encode_no_encrypt()
            encrypt = decrypt = None
        if not self._control.send(line):
            conn.close()
            relay.close()
            self._conn_finished(failed=True)
            return
        self.stats.control_messages += 1
        log.debug("client end: local connection %d from %s", self.stats.connections_total, peer)
        self._spawn_splice(conn, relay, encrypt, decrypt)

    async def _heartbeats(self, interval: float) -> None:
        # the first goes out at once, so that an echoing daemon is known (and watched) from
        # the start of the session rather than from one interval into it
        while self.state == "open":
            self.heartbeats_sent += 1
            if self._control.send(encode_heartbeat(self.heartbeats_sent)):
                self.stats.control_messages += 1
            await asyncio.sleep(interval)

    def _heartbeat_echo(self) -> None:
        self.heartbeat_echoes += 1
        if self.heartbeat_echoes == 1 and self.heartbeat_interval:
            log.debug("client end: the daemon answers heartbeats; watching its liveness")
            self._watch_peer(self.heartbeat_interval + self.heartbeat_grace)
