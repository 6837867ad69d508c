"""Read-side verbs of the embedded atServer: llookup, lookup, plookup, scan, notify:status /
list / fetch / remove, stats.

Owns who may read what (spec atprotocol.md §4.3-§4.7, §4.9): the owner reads its own store;
another hosted atSign reads only ``@<reader>:<entity>@<owner>`` keys (lookup) and
``public:`` keys (plookup); an unauthenticated connection reads ``public:`` keys of the port's
atSign.  Split from :mod:`noports.atserver.verbs` (authentication and writes) to keep both small.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
from typing import TYPE_CHECKING

from noports.at.names import AtKey, normalize_atsign
from noports.atserver.keystore import (
    KeyStore,
    Reply,
    VerbError,
    format_time,
    now_ms,
    render,
    scan_visible,
)
from noports.atserver.notifications import payload_of
from noports.atserver.store import RECEIVED, SENT, KeyRecord, StoredNotification

if TYPE_CHECKING:  # pragma: no cover
    from noports.atserver.verbs import AtServerCore, Session

__all__ = ["QueryVerbs"]

MAX_REGEX = 1000
_HIDDEN_SECRETS = ("privatekey:at_secret",)


def _compile(regex: str | None) -> re.Pattern | None:
    if not regex:
        return None
    if len(regex) > MAX_REGEX:
        raise VerbError("AT0003", f"regex longer than {MAX_REGEX} characters")
    try:
        return re.compile(regex)
    except (re.error, RecursionError, OverflowError) as exc:
        raise VerbError("AT0003", f"invalid regex: {exc}") from None


def _not_found(key: str) -> VerbError:
    return VerbError("AT0015", f"{key} does not exist in keystore")


class QueryVerbs:
    def __init__(self, core: AtServerCore) -> None:
        self.core = core

    def _ks(self, atsign: str) -> KeyStore:
        return self.core.hosted[atsign].ks

    def _read(self, ks: KeyStore, key: str, mode: str | None, shown: str | None = None,
              rec: KeyRecord | None = None) -> Reply:
        rec = rec if rec is not None else ks.get(key)
        if rec is None:
            raise _not_found(key)
        if not rec.active(now_ms()):
            return Reply(data="null")
        return Reply(data=render(key, rec, mode, shown))

    # -- lookups ------------------------------------------------------------------------------

    def llookup(self, s: Session, cmd) -> Reply:
        key: AtKey = cmd.key
        text = f"privatekey:{key.entity}" if key.kind == "privatekey" else str(key)
        if text in _HIDDEN_SECRETS:
            raise _not_found(text)
        return self._read(self._ks(s.atsign), text, cmd.mode)

    def lookup(self, s: Session, cmd) -> Reply:
        entity = str(cmd.entity).lower()
        owner = normalize_atsign(cmd.owner)
        me = s.atsign
        mode = cmd.mode
        own = self._ks(me)
        if not s.authenticated:
            return self._read(own, f"public:{entity}{owner}", mode)
        if owner == me:
            for text in (f"{entity}{me}", f"public:{entity}{me}"):
                rec = own.get(text)
                if rec is not None:
                    return self._read(own, text, mode, rec=rec)
            raise _not_found(f"{me}:{entity}{me}")
        remote_key = f"{me}:{entity}{owner}"
        if not getattr(cmd, "bypass_cache", False):
            cached = f"cached:{remote_key}"
            rec = own.get_active(cached)
            if rec is not None and self._fresh(rec):
                return Reply(data=render(cached, rec, mode))
        other = self.core.hosted.get(owner)
        if other is None:
            raise VerbError("AT0007", f"secondary server not found for {owner}: server-to-server "
                            "lookups are not supported by this server yet")
        # In-process stand-in for the pol lookup: exactly the key @owner's server would serve.
        return self._read(other.ks, remote_key, mode)

    @staticmethod
    def _fresh(rec: KeyRecord) -> bool:
        ttr = rec.meta.get("ttr")
        refresh = rec.meta.get("refreshAt")
        return ttr == -1 or refresh is None or refresh > now_ms()

    def plookup(self, s: Session, cmd) -> Reply:
        entity = str(cmd.entity).lower()
        owner = normalize_atsign(cmd.owner)
        public = f"public:{entity}{owner}"
        other = self.core.hosted.get(owner)
        if other is not None:
            return self._read(other.ks, public, cmd.mode)
        rec = self._ks(s.atsign).get_active(f"cached:{public}")
        if rec is not None:
            return Reply(data=render(f"cached:{public}", rec, cmd.mode))
        raise VerbError("AT0007", f"secondary server not found for {owner}: server-to-server "
                        "lookups are not supported by this server yet")

    # -- scan ---------------------------------------------------------------------------------

    def scan(self, s: Session, cmd) -> Reply:
        rx = _compile(cmd.regex)
        me = s.atsign
        for_atsign = normalize_atsign(cmd.for_atsign) if cmd.for_atsign else None
        if not s.authenticated:
            names = [k[7:] for k in self._ks(me).names()
                     if k.startswith("public:") and not k.startswith("public:_")]
        elif for_atsign is None or for_atsign == me:
            names = [k for k in self._ks(me).names() if scan_visible(k, bool(cmd.show_hidden))]
        else:
            other = self.core.hosted.get(for_atsign)
            if other is None:
                raise VerbError("AT0007", f"secondary server not found for {for_atsign}")
            prefix = f"{me}:"
            # What a pol connection as @me would see there: keys shared with @me, unhidden.
            names = [k[len(prefix):] for k in other.ks.names()
                     if k.startswith(prefix) and not k[len(prefix):].startswith("_")]
        if rx is not None:
            names = [k for k in names if rx.search(k)]
        return Reply(data=json.dumps(names, separators=(",", ":"), ensure_ascii=False))

    # -- notification queries -----------------------------------------------------------------

    def notify_status(self, s: Session, cmd) -> Reply:
        status = self.core.hub.status(s.atsign, str(cmd.id))
        return Reply(data="null" if status is None else status)

    def notify_list(self, s: Session, cmd) -> Reply:
        since = self._date_ms(getattr(cmd, "since", None))
        until = self._date_ms(getattr(cmd, "until", None))
        rx = _compile(getattr(cmd, "regex", None))
        rows = self.core.store.list_received(s.atsign, since, until, now_ms())
        out = [payload_of(n) for n in rows
               if rx is None or rx.search(n.key) or rx.search(n.from_atsign[1:])]
        return Reply(data=json.dumps(out, separators=(",", ":"), ensure_ascii=False))

    @staticmethod
    def _date_ms(text) -> int | None:
        if text in (None, ""):
            return None
        if isinstance(text, int):
            return text
        try:
            day = _dt.datetime.strptime(str(text), "%Y-%m-%d")
        except ValueError:
            raise VerbError("AT0003", f"dates are yyyy-mm-dd, not {text!r}") from None
        return int(day.replace(tzinfo=_dt.timezone.utc).timestamp() * 1000)

    def notify_remove(self, s: Session, cmd) -> Reply:
        self.core.store.remove_notification(s.atsign, RECEIVED, str(cmd.id))
        return Reply(data="success")

    def notify_fetch(self, s: Session, cmd) -> Reply:
        nid = str(cmd.id)
        store = self.core.store
        n = store.get_notification(s.atsign, RECEIVED, nid)
        box = "received"
        if n is None:
            n = store.get_notification(s.atsign, SENT, nid)
            box = "sent"
        if n is None or n.expires_at <= now_ms():
            return Reply(data=json.dumps({"id": nid,
                                           "notificationStatus": "NotificationStatus.expired"},
                                          separators=(",", ":")))
        return Reply(data=json.dumps(self._fetch_json(n, box), separators=(",", ":"),
                                      ensure_ascii=False))

    @staticmethod
    def _fetch_json(n: StoredNotification, box: str) -> dict:
        """A Dart-like ``AtNotification.toJson`` (field names as at_persistence writes them)."""
        return {
            "id": n.id, "fromAtSign": n.from_atsign, "toAtSign": n.to_atsign,
            "notificationDateTime": format_time(n.epoch_millis), "notification": n.key,
            "type": f"NotificationType.{box}", "opType": f"OperationType.{n.operation}",
            "messageType": f"MessageType.{n.message_type}",
            "notificationStatus": f"NotificationStatus.{n.status}", "atValue": n.value,
            "expiresAt": format_time(n.expires_at), "atMetaData": n.metadata,
        }

    # -- stats --------------------------------------------------------------------------------

    def stats(self, s: Session, cmd) -> Reply:
        core = self.core
        hosted = core.hosted[s.atsign]
        providers = {
            "1": ("activeInboundConnections", lambda: hosted.connections),
            "3": ("lastCommitID", lambda: core.store.last_commit_id(s.atsign)),
            "4": ("secondaryStorageSize", lambda: _file_size(core.store.path)),
            "7": ("secondaryServerVersion", lambda: _version()),
            "11": ("NotificationCount", lambda: core.store.count_notifications(s.atsign)),
        }
        wanted = [i.strip() for i in str(cmd.ids).split(",")] if cmd.ids else list(providers)
        items = []
        for sid in wanted:
            if sid in providers:
                name, fn = providers[sid]
                items.append(json.dumps({"id": sid, "name": name, "value": str(fn())},
                                        separators=(",", ":")))
        # Dart prints a List of JSON strings: "data: [{...}, {...}]" (note the spaces).
        return Reply(data=" [" + ", ".join(items) + "]")


def _file_size(path) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _version() -> str:
    from noports.atserver.verbs import SERVER_VERSION
    return SERVER_VERSION
