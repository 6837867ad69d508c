"""The monitor: a long-lived notification subscription that survives drops, exactly once.

Owns spec atprotocol.md §4.10/§5.3 on the client side: a dedicated authenticated connection that
sends ``monitor:<epoch> <regex>``, a ``noop:0`` heartbeat, reconnection with capped exponential
backoff after any drop or missed heartbeat, replay from the last seen ``epochMillis`` (with a
small overlap, because several notifications can share one millisecond and a busy server may
push them slightly out of order), and de-duplication by notification id, so the application
sees each notification once.  The bookkeeping parts (:class:`SeenIds`, :func:`backoff_delay`)
are sans-IO.

Usage (async iterator)::

    async with client.monitor(r"\\.sshnp@") as mon:     # returns once subscribed
        async for n in mon:                              # AtNotification, value decrypted
            ...

``Monitor.run(callback)`` is the callback form: it awaits ``callback(n)`` for each one.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from noports.at.command_types import Monitor as MonitorCommand
from noports.at.commands import encode_command
from noports.at.connection import AtConnection, AtConnectionError, AtTimeoutError
from noports.errors import AtServerError, NoPortsError

if TYPE_CHECKING:  # pragma: no cover
    from noports.at.client import AtClient

__all__ = ["AtNotification", "Monitor", "SeenIds", "backoff_delay", "notification_from_json"]

log = logging.getLogger(__name__)

#: Id of the atServer's periodic stats notification.
STATS_ID = "-1"


@dataclass
class AtNotification:
    """One received notification (spec §5.3 fields), value decrypted when it could be."""

    id: str
    key: str                  # full key as sent, lower-cased: "@bob:ping.dev.sshnp@alice"
    from_atsign: str          # "@alice"
    to_atsign: str            # "@bob"
    value: str | None         # plaintext (decrypted) or None (no value / could not decrypt)
    operation: str = "update"
    epoch_millis: int = 0
    is_encrypted: bool = False
    metadata: dict | None = None
    raw: dict = field(default_factory=dict, repr=False)   # the JSON object as received
    decrypt_error: Exception | None = None

    @property
    def is_stats(self) -> bool:
        return self.id == STATS_ID

    @property
    def entity(self) -> str:
        """The key without ``@to:`` and ``@from``: ``"ping.dev.sshnp"``."""
        key = self.key
        prefix = self.to_atsign + ":"
        if key.startswith(prefix):
            key = key[len(prefix):]
        if self.from_atsign and key.endswith(self.from_atsign):
            key = key[: -len(self.from_atsign)]
        return key


def notification_from_json(payload: dict) -> AtNotification:
    """Fields of a ``notification:`` JSON object; the value is left as received."""
    metadata = payload.get("metadata")
    epoch = payload.get("epochMillis")
    try:
        epoch = int(epoch) if epoch is not None else 0
    except (TypeError, ValueError):
        epoch = 0
    return AtNotification(
        id=str(payload.get("id", "")),
        key=str(payload.get("key", "")).lower(),
        from_atsign=str(payload.get("from", "")).lower(),
        to_atsign=str(payload.get("to", "")).lower(),
        value=payload.get("value"),
        operation=str(payload.get("operation") or "update"),
        epoch_millis=epoch,
        is_encrypted=payload.get("isEncrypted") in (True, "true"),
        metadata=metadata if isinstance(metadata, dict) else None,
        raw=payload,
    )


def backoff_delay(attempt: int, *, base: float = 0.1, cap: float = 5.0,
                  jitter: float = 0.2, rng: Callable[[], float] = random.random) -> float:
    """Pause before reconnect ``attempt`` (0-based): base * 2**attempt, capped, +/- jitter.

    The jitter (a fraction of the delay) keeps many monitors of one restarted server from
    reconnecting in lock step.
    """
    delay = min(cap, base * (2 ** min(attempt, 30)))
    return max(0.0, delay * (1.0 + jitter * (2.0 * rng() - 1.0)))


class SeenIds:
    """Ids delivered recently, for de-duplicating replays (sans-IO, bounded memory).

    A reconnect replays everything newer than ``last_epoch - overlap_ms``, so only ids inside that
    window can come back; older ones are pruned, and ``capacity`` bounds the set even under a
    flood.  ``last_epoch`` is the highest epochMillis seen.
    """

    __slots__ = ("_ids", "capacity", "last_epoch", "overlap_ms")

    def __init__(self, last_epoch: int = 0, overlap_ms: int = 1000,
                 capacity: int = 50_000) -> None:
        self._ids: OrderedDict[str, int] = OrderedDict()
        self.last_epoch = last_epoch
        self.overlap_ms = overlap_ms
        self.capacity = capacity

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, nid: str) -> bool:
        return nid in self._ids

    def add(self, nid: str, epoch: int) -> bool:
        """Record a notification; False when it was already seen (drop it)."""
        ids = self._ids
        if nid in ids:
            return False
        ids[nid] = epoch
        if epoch > self.last_epoch:
            self.last_epoch = epoch
        floor = self.last_epoch - self.overlap_ms
        while ids:
            first_id, first_epoch = next(iter(ids.items()))
            if first_epoch >= floor and len(ids) <= self.capacity:
                break
            del ids[first_id]
        return True

    def replay_from(self) -> int:
        """The epoch to put in ``monitor:<epoch>`` (server replays strictly newer ones)."""
        return max(0, self.last_epoch - self.overlap_ms)


class Monitor:
    """A self-healing monitor on one atSign's atServer; see the module docstring.

    Do not construct directly: use ``AtClient.monitor(regex, ...)``.  Counters ``connects``,
    ``drops`` and ``duplicates`` are kept for tests and logs.
    """

    def __init__(self, client: AtClient, regex: str = ".*", *, since: int | None = None,
                 decrypt: bool = True, include_stats: bool = False,
                 heartbeat_interval: float = 30.0, heartbeat_timeout: float = 10.0,
                 replay_overlap_ms: int = 1000, seen_capacity: int = 50_000,
                 backoff_base: float = 0.1, backoff_cap: float = 5.0) -> None:
        self._client = client
        self.regex = regex
        self.decrypt = decrypt
        self.include_stats = include_stats
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        # since=None: "from now" by this machine's clock (the server replays strictly newer
        # notifications, so a server clock far behind ours could hide a few early ones).
        self.since = int(time.time() * 1000) if since is None else int(since)
        self._seen = SeenIds(last_epoch=self.since, overlap_ms=replay_overlap_ms,
                             capacity=seen_capacity)
        self._queue: asyncio.Queue = asyncio.Queue()
        self._ready = asyncio.Event()
        self._closed = False
        self._task: asyncio.Task | None = None
        self._conn: AtConnection | None = None
        self._fatal: BaseException | None = None
        self.connects = 0
        self.drops = 0
        self.duplicates = 0
        self.last_error: BaseException | None = None

    # ---- lifecycle --------------------------------------------------------------------------

    async def start(self, timeout: float | None = 30.0) -> Monitor:
        """Connect and subscribe; returns once the server has the subscription.

        Unreachable servers are retried (with backoff) for up to ``timeout`` seconds; a refusal
        by the server (AtServerError: login or regex refused) is raised at once.  On failure
        the monitor is closed.
        """
        if self._fatal is not None:
            raise self._fatal
        loop = asyncio.get_running_loop()
        if self._task is None:
            self._task = loop.create_task(self._supervise())
        ready = loop.create_task(self._ready.wait())
        try:
            await asyncio.wait({ready, self._task}, timeout=timeout,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
        if self._ready.is_set():
            return self
        await self.close()
        if self._fatal is not None:       # the server refused the subscription itself
            raise self._fatal
        err = self.last_error
        raise AtTimeoutError(f"monitor could not subscribe: {err}") from err

    async def close(self) -> None:
        self._closed = True
        task, self._task = self._task, None
        conn = self._conn
        if conn is not None:
            conn.close()
        if task is not None:
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        self._queue.put_nowait(None)  # wake an iterator

    async def __aenter__(self) -> Monitor:
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.close()

    @property
    def ready(self) -> bool:
        """True while subscribed (False during a reconnect)."""
        return self._ready.is_set()

    @property
    def last_epoch(self) -> int:
        return self._seen.last_epoch

    # ---- delivery ---------------------------------------------------------------------------

    def __aiter__(self) -> Monitor:
        return self

    async def __anext__(self) -> AtNotification:
        if self._closed and self._queue.empty():
            raise StopAsyncIteration
        return await self._deliver(await self._queue.get())

    async def _deliver(self, payload: dict | None) -> AtNotification:
        if payload is None:
            if self._fatal is not None:
                raise self._fatal
            raise StopAsyncIteration
        if self.decrypt:
            return await self._client.decrypt_notification(payload)
        return notification_from_json(payload)

    async def get(self, timeout: float | None = None) -> AtNotification:
        """The next notification; AtTimeoutError after ``timeout`` seconds, AtConnectionError
        once the monitor is closed (or the server's refusal, if it refused the subscription)."""
        if self._closed and self._queue.empty():
            raise self._fatal or AtConnectionError("monitor is closed")
        if self._queue.empty():
            try:
                payload = await asyncio.wait_for(self._queue.get(), timeout)
            except asyncio.TimeoutError:
                raise AtTimeoutError(f"no notification within {timeout} s") from None
        else:
            payload = self._queue.get_nowait()   # already here: no wait_for (a task per call)
        try:
            return await self._deliver(payload)
        except StopAsyncIteration:
            raise AtConnectionError("monitor is closed") from None

    async def run(self, callback: Callable[[AtNotification], Awaitable[Any]]) -> None:
        """Callback form: await ``callback(n)`` for every notification until closed."""
        async for n in self:
            await callback(n)

    def _on_notification(self, payload: dict) -> None:
        # Called from data_received: keep it short.
        nid = payload.get("id")
        if nid == STATS_ID or nid == -1:
            if self.include_stats:
                self._queue.put_nowait(payload)
            return
        if not isinstance(nid, str) or not nid:
            log.warning("notification without an id dropped: %.200r", payload)
            return
        epoch = payload.get("epochMillis")
        if not isinstance(epoch, int):
            try:
                epoch = int(epoch)
            except (TypeError, ValueError):
                epoch = 0
        if self._seen.add(nid, epoch):
            self._queue.put_nowait(payload)
        else:
            self.duplicates += 1

    def _on_unsolicited(self, what) -> None:
        # After a refused monitor command the noop's own "data:ok" arrives with no request
        # left waiting; anything else unexpected on this connection is logged.
        if what != "ok":
            log.warning("monitor %r: unexpected reply %r", self.regex, what)

    # ---- connection supervision -------------------------------------------------------------

    async def _supervise(self) -> None:
        attempt = 0
        while not self._closed:
            conn = None
            heartbeat = None
            try:
                conn = await self._client.open_connection(
                    on_notification=self._on_notification, on_unsolicited=self._on_unsolicited)
                self._conn = conn
                # Never ask for anything older than `since`; after a drop, replay the overlap
                # window before the newest notification seen (duplicates are dropped by id).
                epoch = max(self.since, self._seen.replay_from())
                cmd = MonitorCommand(epoch=epoch, regex=self.regex)
                conn.send_no_reply(encode_command(cmd))
                # The server handles one connection's commands in order and sends nothing for
                # a good monitor command, so the noop's answer means the subscription is live.
                # A refused one (bad regex, not authorised) answers error: which, by order, is
                # matched to the noop.
                await conn.request("noop:0", self.heartbeat_timeout)
                attempt = 0
                self.connects += 1
                self._ready.set()
                heartbeat = asyncio.get_running_loop().create_task(self._heartbeat(conn))
                await conn.wait_closed()
            except asyncio.CancelledError:
                raise
            except (NoPortsError, OSError, asyncio.TimeoutError) as exc:
                self.last_error = exc
                log.info("monitor %r: %s", self.regex, exc)
                if self.connects == 0 and isinstance(exc, AtServerError):
                    # Refused before ever subscribing (bad keys, bad regex): retrying will not
                    # help, so start() reports it.  Once running, everything is retried.
                    self._fatal = exc
            finally:
                self._ready.clear()
                if heartbeat is not None:
                    heartbeat.cancel()
                if conn is not None:
                    conn.close()
                self._conn = None
            if self._fatal is not None:
                self._closed = True
                self._queue.put_nowait(None)
                return
            if self._closed:
                return
            self.drops += 1
            await asyncio.sleep(backoff_delay(attempt, base=self.backoff_base,
                                              cap=self.backoff_cap))
            attempt += 1

    async def _heartbeat(self, conn: AtConnection) -> None:
        try:
            while conn.is_open:
                await asyncio.sleep(self.heartbeat_interval)
                await conn.request("noop:0", self.heartbeat_timeout)
        except asyncio.CancelledError:
            raise
        except (AtConnectionError, AtTimeoutError, AtServerError, OSError) as exc:
            log.info("monitor %r: heartbeat failed (%s); reconnecting", self.regex, exc)
            self.last_error = exc
            conn.close(exc if isinstance(exc, AtConnectionError) else None)
