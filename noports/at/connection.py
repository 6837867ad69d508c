"""One TLS connection to an atServer: request/response correlation over an asyncio Protocol.

Owns the transport-level client side of the atProtocol (spec atprotocol.md §2): TLS with
certificate and host-name verification, the FIFO matching of ``data:``/``error:`` replies to
the commands that caused them (pipelining allowed), per-request timeouts, and routing of
``notification:`` lines to a callback.  It knows nothing about verbs, keys or encryption (that
is ``noports.at.client``) and nothing about reconnecting (callers open a new connection).

The atProtocol answers every command with exactly one ``data:`` or ``error:`` line, in order,
except ``monitor`` (no reply at all) and ``@exit`` (connection closes); so a deque of futures is
the whole correlation state.  :class:`ReplyQueue` holds it without any I/O, so it can be unit
tested; :class:`AtConnection` is the thin asyncio layer around it.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import ssl
import time
from collections.abc import Callable

from noports.at.responses import ResponseParser
from noports.errors import AtProtocolError, AtServerError, NoPortsError

__all__ = [
    "CA_FILE_ENV",
    "AtConnection",
    "AtConnectionError",
    "AtTimeoutError",
    "AtTlsError",
    "ReplyQueue",
    "connect_protocol",
    "make_ssl_context",
    "open_connection",
]

log = logging.getLogger(__name__)

#: Environment variable naming a PEM CA bundle to trust instead of the system store.
CA_FILE_ENV = "NOPORTS_CA_FILE"

#: Longest reply line accepted (the Dart server's own command buffer size).
MAX_REPLY_LINE = 10_240_000


class AtConnectionError(NoPortsError, ConnectionError):
    """A connection to a root or atServer could not be made, or dropped mid-request."""


class AtTlsError(AtConnectionError):
    """The peer's TLS certificate did not verify (retrying will not help)."""


class AtTimeoutError(NoPortsError, asyncio.TimeoutError):
    """An atServer (or root) did not answer within the allowed time."""


def make_ssl_context(ca_file: str | os.PathLike | None = None) -> ssl.SSLContext:
    """A client TLS context with certificate and host-name verification on.

    ``ca_file`` (or, when it is None, the environment variable ``NOPORTS_CA_FILE``) names a PEM
    bundle that replaces the system trust store; with neither, the system store is used.
    """
    if ca_file is None:
        ca_file = os.environ.get(CA_FILE_ENV) or None
    try:
        ctx = ssl.create_default_context(cafile=os.fspath(ca_file) if ca_file else None)
    except (OSError, ssl.SSLError) as exc:
        raise AtConnectionError(f"cannot load CA file {ca_file}: {exc}") from exc
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


class ReplyQueue:
    """FIFO correlation of replies to requests (sans-IO).

    Each entry is ``[future, timer_handle]``, optionally followed by ``deadline, line,
    sent_at`` (see :meth:`AtConnection.send`).  A request that timed out or was cancelled keeps
    its place until its reply arrives (the reply is then dropped): the server still answers it,
    and removing it would shift every later reply onto the wrong caller.
    """

    __slots__ = ("_entries",)

    def __init__(self) -> None:
        self._entries: collections.deque[list] = collections.deque()

    def __len__(self) -> int:
        return len(self._entries)

    def push(self, fut: asyncio.Future, handle=None) -> list:
        entry = [fut, handle]
        self._entries.append(entry)
        return entry

    def resolve(self, result: str | None = None, error: BaseException | None = None) -> bool:
        """Hand one reply to the oldest request; False when nobody was waiting for one."""
        if not self._entries:
            return False
        entry = self._entries.popleft()
        fut, handle = entry[0], entry[1]
        if handle is not None:
            handle.cancel()
        if not fut.done():
            if error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(result)
        return True

    def pending_deadlines(self):
        """``(future, deadline, line, sent_at)`` of every entry that has a deadline."""
        for entry in self._entries:
            if len(entry) > 2:
                yield entry[0], entry[2], entry[3], entry[4]

    def fail_all(self, exc: BaseException) -> None:
        while self._entries:
            entry = self._entries.popleft()
            fut, handle = entry[0], entry[1]
            if handle is not None:
                handle.cancel()
            if not fut.done():
                fut.set_exception(exc)
                fut.add_done_callback(_retrieve)


def _retrieve(fut: asyncio.Future) -> None:
    # A timed-out or abandoned future may never be awaited; reading its exception keeps asyncio
    # from logging "exception was never retrieved".
    if not fut.cancelled():
        fut.exception()


class AtConnection(asyncio.Protocol):
    """An atServer connection; use :func:`open_connection` to make one.

    ``on_notification(payload: dict)`` is called synchronously (from ``data_received``) for each
    ``notification:`` line; ``on_unsolicited(exc)`` for a reply nobody asked for (e.g. the
    server's error answer to ``monitor``).
    """

    def __init__(self, *, on_notification: Callable[[dict], None] | None = None,
                 on_unsolicited: Callable[[BaseException | str], None] | None = None,
                 name: str = "", max_line: int = MAX_REPLY_LINE) -> None:
        self.name = name
        self._parser = ResponseParser(max_line=max_line)
        self._replies = ReplyQueue()
        self._on_notification = on_notification
        self._on_unsolicited = on_unsolicited
        self._transport: asyncio.Transport | None = None
        # Lines written in one loop iteration leave as one TLS record / one syscall (see send).
        self._wbuf: list[bytes] = []
        self._flush_scheduled = False
        self._loop = asyncio.get_running_loop()
        self._closed: asyncio.Future = self._loop.create_future()
        self._close_reason: BaseException | None = None
        # Request timeouts: one timer per connection, armed for the earliest deadline of the
        # requests in flight (a timer per request costs a timer handle and a cancel each).
        self._watchdog: asyncio.TimerHandle | None = None
        self._watch_at: float | None = None
        #: monotonic time of the last bytes received (used to tell a dead peer from a slow one)
        self.last_received = time.monotonic()

    # ---- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        self.last_received = time.monotonic()
        try:
            # Bare items, no prompts: replies are matched by order, not by prompt.
            items = self._parser.feed_items(data)
        except AtProtocolError as exc:
            log.warning("%s: unparseable reply from server, closing: %s", self.name, exc)
            self._abort(AtConnectionError(f"garbled reply from atServer: {exc}"))
            return
        for item in items:
            kind = type(item)
            if kind is str:                       # data: payload
                if not self._replies.resolve(item):
                    self._unsolicited(item)
            elif kind is dict:                    # notification:
                if self._on_notification is not None:
                    self._on_notification(item)
            else:                                 # error: (an Error event)
                err = AtServerError(item.code, item.message, item.raw)
                if not self._replies.resolve(error=err):
                    self._unsolicited(err)
        if self._parser.error is not None:
            # The parser hands over the good events before a fault; the fault itself is final.
            log.warning("%s: unparseable reply from server, closing: %s", self.name,
                        self._parser.error)
            self._abort(AtConnectionError(f"garbled reply from atServer: {self._parser.error}"))

    def connection_lost(self, exc: Exception | None) -> None:
        reason = self._close_reason or AtConnectionError(
            f"connection to atServer {self.name} closed" + (f": {exc}" if exc else ""))
        self._close_reason = reason
        self._replies.fail_all(reason)
        self._transport = None
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = self._watch_at = None
        if not self._closed.done():
            self._closed.set_result(None)

    # ---- API ------------------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self._transport is not None and not self._transport.is_closing()

    @property
    def pending(self) -> int:
        """Requests sent whose replies have not arrived yet (timed-out ones included)."""
        return len(self._replies)

    def send(self, line: str, timeout: float | None = 10.0) -> asyncio.Future:
        """Write one command; return a future for its ``data:`` payload.

        The future fails with AtServerError for an ``error:`` reply, AtTimeoutError after
        ``timeout`` seconds, AtConnectionError if the connection drops first.
        """
        fut = self._loop.create_future()
        transport = self._transport
        if transport is None or transport.is_closing():
            fut.set_exception(self._close_reason or AtConnectionError("connection is closed"))
            fut.add_done_callback(_retrieve)
            return fut
        entry = self._replies.push(fut)
        self._write(line.encode() + b"\n")
        if timeout is not None:
            deadline = self._loop.time() + timeout
            entry += (deadline, line, time.monotonic())
            watch_at = self._watch_at
            if watch_at is None or deadline < watch_at:
                self._arm(deadline)
        return fut

    async def request(self, line: str, timeout: float | None = 10.0) -> str:
        return await self.send(line, timeout)

    def send_no_reply(self, line: str) -> None:
        """Write a command that gets no reply (``monitor``, ``@exit``)."""
        transport = self._transport
        if transport is None or transport.is_closing():
            raise self._close_reason or AtConnectionError("connection is closed")
        self._write(line.encode() + b"\n")

    def _write(self, data: bytes) -> None:
        # Many tasks pipelining on one connection each write a line; writing them one by one
        # costs one TLS record and one send() each, on both ends.  Gathering the lines of one
        # loop iteration and writing them together keeps a burst to a few records, at the price
        # of one loop turn (microseconds) for a lone request.
        self._wbuf.append(data)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        buf, self._wbuf = self._wbuf, []
        transport = self._transport
        if buf and transport is not None and not transport.is_closing():
            transport.write(buf[0] if len(buf) == 1 else b"".join(buf))

    def close(self, reason: BaseException | None = None) -> None:
        if reason is not None and self._close_reason is None:
            self._close_reason = reason
        if self._transport is not None:
            self._flush()
            self._transport.close()

    async def wait_closed(self) -> None:
        await asyncio.shield(self._closed)

    async def aclose(self, timeout: float = 5.0) -> None:
        """Close and wait (bounded) until the transport is gone."""
        if self._transport is not None:
            try:
                self._flush()
                self._transport.write(b"@exit\n")
            except Exception:  # the transport may already be broken; closing is what matters
                pass
            self.close()
        try:
            await asyncio.wait_for(self.wait_closed(), timeout)
        except asyncio.TimeoutError:
            if self._transport is not None:
                self._transport.abort()

    # ---- internals -------------------------------------------------------------------------

    def _arm(self, when: float) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        self._watch_at = when
        self._watchdog = self._loop.call_at(when, self._watch)

    def _watch(self) -> None:
        """Time out every request past its deadline; re-arm for the next one."""
        self._watchdog = self._watch_at = None
        # (1 ms of slack: a loop's timers may fire a hair before its clock reaches the mark)
        now = self._loop.time() + 0.001
        due, nxt = [], None
        for fut, deadline, line, sent_at in self._replies.pending_deadlines():
            if fut.done():
                continue
            if deadline <= now:
                due.append((fut, line, sent_at))
            elif nxt is None or deadline < nxt:
                nxt = deadline
        for fut, line, sent_at in due:
            self._timed_out(fut, line, sent_at)
        if nxt is not None and self._transport is not None:
            self._arm(nxt)

    def _timed_out(self, fut: asyncio.Future, line: str, sent_at: float) -> None:
        if fut.done():
            return
        verb = line.split(":", 1)[0][:20]
        fut.set_exception(AtTimeoutError(f"no reply to {verb!r} from atServer {self.name}"))
        fut.add_done_callback(_retrieve)
        if self.last_received <= sent_at:
            # Nothing at all arrived since the request went out: the peer is dead or wedged.
            # Close so that the owner reconnects instead of queueing behind it forever.
            self._abort(AtConnectionError(f"atServer {self.name} stopped answering"))

    def _unsolicited(self, what) -> None:
        if self._on_unsolicited is not None:
            self._on_unsolicited(what)
        else:
            log.debug("%s: reply with no request: %r", self.name, what)

    def _abort(self, reason: BaseException) -> None:
        if self._close_reason is None:
            self._close_reason = reason
        if self._transport is not None:
            self._transport.abort()


async def connect_protocol(factory: Callable[[], asyncio.Protocol], host: str, port: int,
                           ssl_context: ssl.SSLContext | None, *,
                           server_hostname: str | None = None,
                           timeout: float = 10.0) -> asyncio.Protocol:
    """``loop.create_connection`` with TLS host-name checking and errors mapped to ours."""
    loop = asyncio.get_running_loop()
    name = f"{host}:{port}"
    kwargs = {}
    if ssl_context is not None:
        kwargs = {"ssl": ssl_context, "server_hostname": server_hostname or host}
    try:
        _, proto = await asyncio.wait_for(loop.create_connection(factory, host, port, **kwargs),
                                          timeout)
    except ssl.SSLCertVerificationError as exc:
        raise AtTlsError(
            f"TLS certificate of {name} not trusted ({exc.verify_message or exc}); "
            f"pass --ca-file / {CA_FILE_ENV} if it uses a private CA") from exc
    except asyncio.TimeoutError as exc:
        raise AtConnectionError(f"timed out connecting to {name}") from exc
    except OSError as exc:
        raise AtConnectionError(f"cannot connect to {name}: {exc}") from exc
    return proto


async def open_connection(host: str, port: int, ssl_context: ssl.SSLContext | None, *,
                          server_hostname: str | None = None, timeout: float = 10.0,
                          on_notification: Callable[[dict], None] | None = None,
                          on_unsolicited: Callable[[BaseException | str], None] | None = None,
                          ) -> AtConnection:
    """Connect (TLS unless ``ssl_context`` is None) and return the :class:`AtConnection`."""
    name = f"{host}:{port}"

    def factory() -> AtConnection:
        return AtConnection(on_notification=on_notification, on_unsolicited=on_unsolicited,
                            name=name)

    return await connect_protocol(factory, host, port, ssl_context,
                                  server_hostname=server_hostname, timeout=timeout)
