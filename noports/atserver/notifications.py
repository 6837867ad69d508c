"""Notifications inside the embedded atServer: routing, status, caching, monitors, stats.

Owns what happens after a ``notify`` (or an autoNotify from update/delete) is accepted
(spec atprotocol.md §4.8-§4.10, §5): the sender's record and its status, delivery to the
recipient, the receiver's ``cached:`` copy when the notification carries a ttr, the push to
matching monitor connections, epoch replay, and the periodic stats notification.

Delivery is behind one seam, :meth:`NotificationHub.route`: atSigns hosted by this process are
delivered in-process (stored as received, pushed to monitors, status ``delivered`` in the same
transaction); anything else goes to :class:`RemoteDelivery`, which is where server-to-server
delivery (root lookup + ``from``/``pol`` + forwarded ``notify``) plugs in later.  Until then a
remote notification is recorded with status ``errored`` and expires after its ttln.

No sockets here: a monitor is any object with ``push(data: bytes)`` (the server's connection).
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import orjson

from noports.at.names import AtKey
from noports.at.responses import encode_notification
from noports.atserver.keystore import KeyStore, now_ms
from noports.atserver.store import RECEIVED, SENT, Store, StoredNotification
from noports.errors import InvalidKeyError

__all__ = ["Monitor", "NotificationHub", "RemoteDelivery", "payload_of"]

log = logging.getLogger("noports.atserver.notifications")

DEFAULT_TTLN_MS = 15 * 60 * 1000     # Dart config expiryInMins: 15
# Metadata fields a notification line carries (Dart live delivery; pubKeyCS added because our
# client can use it to pick the right key, and extra fields are ignored by every client).
_PUSHED_META = ("encKeyName", "encAlgo", "ivNonce", "skeEncKeyName", "skeEncAlgo",
                "sharedKeyEnc", "pubKeyCS")
# Metadata a receiver keeps on its cached copy (value fields, not delivery fields).
_CACHED_META = ("ttl", "ttb", "ttr", "ccd", "isBinary", "isEncrypted", "dataSignature",
                "sharedKeyEnc", "pubKeyCS", "encoding", "encKeyName", "encAlgo", "ivNonce",
                "skeEncKeyName", "skeEncAlgo")
_MESSAGE_TYPES = {"key": "MessageType.key", "text": "MessageType.text"}


def notification_line(payload: dict) -> bytes:
    """``notification: <json>\n`` -- orjson on the hot path (values come from UTF-8 lines, so
    they hold no lone surrogates); the codec's encoder for anything orjson refuses."""
    try:
        return b"notification: " + orjson.dumps(payload, option=orjson.OPT_APPEND_NEWLINE)
    except (TypeError, orjson.JSONEncodeError):
        return encode_notification(payload)


def payload_of(n: StoredNotification) -> dict:
    """The JSON object of a ``notification:`` line (spec §5.3)."""
    get = n.metadata.get
    return {
        "id": n.id, "from": n.from_atsign, "to": n.to_atsign, "key": n.key, "value": n.value,
        "operation": n.operation, "epochMillis": n.epoch_millis,
        "messageType": _MESSAGE_TYPES.get(n.message_type, "MessageType.key"),
        "isEncrypted": n.is_encrypted,
        # = {name: get(name) for name in _PUSHED_META}, spelled out (once per notification)
        "metadata": {"encKeyName": get("encKeyName"), "encAlgo": get("encAlgo"),
                     "ivNonce": get("ivNonce"), "skeEncKeyName": get("skeEncKeyName"),
                     "skeEncAlgo": get("skeEncAlgo"), "sharedKeyEnc": get("sharedKeyEnc"),
                     "pubKeyCS": get("pubKeyCS")},
    }


@dataclass(eq=False)
class Monitor:
    """One connection that issued ``monitor``."""

    sink: object                     # has push(data: bytes) -> None
    regex: re.Pattern | None
    self_notifications: bool = False

    def matches(self, n: StoredNotification) -> bool:
        # Dart: the regex is searched in the key or in the sender without its "@".
        rx = self.regex
        return rx is None or bool(rx.search(n.key) or rx.search(n.from_atsign[1:]))


class RemoteDelivery:
    """Delivery to atSigns that this process does not host.

    Server-to-server delivery is a later issue; this is its seam.  ``deliver`` is called inside
    the sender's transaction with the sender's stored record and returns the status to record.
    A real implementation returns ``"queued"`` and later calls ``hub.set_status``.
    """

    def deliver(self, hub: NotificationHub, n: StoredNotification) -> str:
        log.info("notification %s for %s: not hosted here and server-to-server delivery is not "
                 "implemented; marked errored", n.id, n.to_atsign)
        return "errored"


class NotificationHub:
    def __init__(self, store: Store, *, remote: RemoteDelivery | None = None,
                 clock: Callable[[], int] = now_ms) -> None:
        self.store = store
        self.remote = remote or RemoteDelivery()
        self.clock = clock
        self.hosted: dict[str, KeyStore] = {}
        self.monitors: dict[str, list[Monitor]] = defaultdict(list)

    def host(self, ks: KeyStore) -> None:
        self.hosted[ks.atsign] = ks

    # -- sending ----------------------------------------------------------------------------

    def send(self, n: StoredNotification) -> None:
        """Record ``n`` as sent by ``n.from_atsign`` and route it (same transaction)."""
        n.status = self.route(n)
        self.store.put_notification(n.from_atsign, SENT, n)

    def route(self, n: StoredNotification) -> str:
        """The one delivery seam: in-process when the recipient is hosted here."""
        if n.to_atsign in self.hosted:
            self.receive(n)
            return "delivered"
        return self.remote.deliver(self, n)

    def set_status(self, atsign: str, nid: str, status: str) -> None:
        self.store.set_notification_status(atsign, SENT, nid, status)

    # -- receiving --------------------------------------------------------------------------

    def receive(self, sent: StoredNotification) -> StoredNotification:
        """Store ``sent`` as received by its recipient, apply caching, push to monitors."""
        # A field-by-field copy: dataclasses.replace costs several times more on this hot path.
        n = StoredNotification(sent.id, sent.from_atsign, sent.to_atsign, sent.key, sent.value,
                               sent.operation, sent.message_type, sent.is_encrypted,
                               sent.metadata, self.clock(), sent.expires_at, "delivered")
        to = n.to_atsign
        self.store.put_notification(to, RECEIVED, n)
        self._apply_cache(self.hosted[to], n)
        monitors = self.monitors.get(to)
        if monitors:
            line = None
            for m in list(monitors):
                if m.matches(n):
                    if line is None:
                        line = notification_line(payload_of(n))
                    m.sink.push(line)
        return n

    def _apply_cache(self, ks: KeyStore, n: StoredNotification) -> None:
        """Receiver side of spec §4.8: a value with ttr is cached as ``cached:<key>``."""
        if n.message_type != "key":
            return
        meta = n.metadata
        if n.operation != "delete" and (n.value is None or meta.get("ttr") in (None, 0)):
            return          # the common case: nothing to cache, no need to parse the key
        try:
            key = AtKey.parse(n.key)
        except InvalidKeyError:
            return
        if key.owner != n.from_atsign or key.cached or key.kind not in ("shared", "public"):
            return
        if key.kind == "shared" and key.shared_with != n.to_atsign:
            return
        cached = "cached:" + str(key)
        if n.operation == "delete":
            old = ks.get(cached)
            if old is not None and (old.meta.get("ccd") or meta.get("ccd")):
                ks.delete(cached)
            return
        changes = {name: meta[name] for name in _CACHED_META if meta.get(name) is not None}
        ks.put(cached, n.value, changes, by=n.from_atsign)

    # -- monitors ---------------------------------------------------------------------------

    def add_monitor(self, atsign: str, monitor: Monitor, epoch: int | None) -> int:
        """Replay stored notifications newer than ``epoch`` (if given), then go live.

        Runs synchronously inside the current batch, so nothing received in between can be
        missed or sent twice.  Returns the number replayed.
        """
        replayed = 0
        if epoch is not None:
            for n in self.store.received_since(atsign, epoch, self.clock()):
                if monitor.matches(n):
                    monitor.sink.push(notification_line(payload_of(n)))
                    replayed += 1
        self.monitors[atsign].append(monitor)
        return replayed

    def remove_monitor(self, atsign: str, monitor: Monitor) -> None:
        lst = self.monitors.get(atsign)
        if lst and monitor in lst:
            lst.remove(monitor)
            if not lst:
                del self.monitors[atsign]

    def stats_tick(self) -> int:
        """Send the stats notification (id -1) to every monitor; returns how many were sent."""
        sent = 0
        now = self.clock()
        for atsign, monitors in list(self.monitors.items()):
            payload = {
                "id": "-1", "from": atsign, "to": atsign, "key": f"statsNotification.{atsign}",
                "value": str(self.store.last_commit_id(atsign)),
                "operation": "delete" if self.store.last_commit_op(atsign) == "-" else "update",
                "epochMillis": now, "messageType": "MessageType.key", "isEncrypted": False,
                "metadata": None,
            }
            line = notification_line(payload)
            for m in list(monitors):
                m.sink.push(line)
                sent += 1
        return sent

    # -- queries ----------------------------------------------------------------------------

    def status(self, atsign: str, nid: str) -> str | None:
        n = self.store.get_notification(atsign, SENT, nid)
        if n is None:
            return None
        if n.expires_at <= self.clock():
            return "expired"
        return n.status

    def received(self, atsign: str, nid: str) -> StoredNotification | None:
        return self.store.get_notification(atsign, RECEIVED, nid)
