"""Verb handlers of the embedded atServer: one parsed command + the connection's session in, one
:class:`Reply` out.

Owns authentication (``from``/``cram``/``pkam``), the access rules of every verb between the
atSigns this process hosts (spec atprotocol.md §3-§4), and the failed-login throttle.  No
sockets and no asyncio: the server layer turns a :class:`Reply` into bytes (prompt, error
shape) and honours its ``delay`` and ``close``; monitor pushes go through ``session.sink``.

Cross-atSign reads are done directly on the other hosted atSign's store, with exactly the keys
the Dart server would hand over a ``pol`` connection: ``lookup`` reads ``@me:<entity>@other``,
``plookup`` reads ``public:<entity>@other``, ``scan:@other`` lists ``@me:...`` keys of @other.
Nobody reads another atSign's private, self or hidden keys.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from noports.at import crypto
from noports.at.commands import parse_command
from noports.at.names import AtKey, normalize_atsign
from noports.atserver.keystore import (
    RESET,
    KeyStore,
    Reply,
    VerbError,
    metadata_changes,
    now_ms,
)
from noports.atserver.notifications import Monitor, NotificationHub
from noports.atserver.queries import QueryVerbs
from noports.atserver.store import Store, StoredNotification
from noports.errors import AtProtocolError, InvalidAtSignError, InvalidKeyError

__all__ = ["SERVER_VERSION", "AtServerCore", "HostedAtSign", "Limits", "Reply", "Session"]

log = logging.getLogger("noports.atserver.verbs")

#: What ``info`` reports: the Dart server version whose behaviour we follow.
SERVER_VERSION = "3.0.52"
CHALLENGE_TTL_MS = 60_000
AT_SECRET = "privatekey:at_secret"
AT_SECRET_DELETED = "privatekey:at_secret_deleted"
PKAM_KEY = "privatekey:at_pkam_publickey"
MAX_REGEX = 1000
# JSON error replies when the client's clientConfig version is above this (spec §2.4).
JSON_ERRORS_AFTER = (3, 0, 37)
_UNUSABLE_KEY = object()     # privatekey:at_pkam_publickey holds something that is not a key


@dataclass
class Limits:
    """Tunables of the verb layer (command-line flags)."""

    notification_ttl_ms: int = 15 * 60 * 1000
    # Failed logins: the first `login_free_failures` on a connection are answered at once;
    # each later one waits `login_delay` * 2**(n - free - 1) seconds, capped at
    # `login_delay_max`.  Across connections of one peer address, more than
    # `peer_fail_limit` failures within 60 s delay every further failure by login_delay_max.
    login_free_failures: int = 3
    login_delay: float = 1.0
    login_delay_max: float = 5.0
    peer_fail_limit: int = 30
    noop_max_ms: int = 5000


@dataclass(eq=False)
class HostedAtSign:
    atsign: str
    port: int
    ks: KeyStore
    secret_file: Path | None = None
    connections: int = 0
    _pkam_key: object = None

    def pkam_public_key(self):
        """The legacy PKAM public key (parsed once; reset when the key is updated)."""
        if self._pkam_key is None:
            rec = self.ks.get(PKAM_KEY)
            if rec is None or rec.value is None:
                return None
            try:
                self._pkam_key = crypto.public_key_from_b64(rec.value)
            except (ValueError, TypeError):
                # The owner may store garbage there; it then simply verifies nothing.
                self._pkam_key = _UNUSABLE_KEY
        return self._pkam_key

    def forget_pkam_key(self) -> None:
        self._pkam_key = None


@dataclass(eq=False)
class Session:
    """Per-connection state."""

    atsign: str                              # the atSign this port serves
    peer: str = ""
    session_id: str = field(default_factory=lambda: "_" + str(uuid.uuid4()))
    challenge: str | None = None
    challenge_at: int = 0
    from_atsign: str | None = None
    authenticated: bool = False
    auth_type: str | None = None             # "cram" | "pkamLegacy" | "apkam"
    enrollment_id: str | None = None
    json_errors: bool = False
    monitor: Monitor | None = None
    failed_logins: int = 0
    sink: object = None                      # set by the server: has push(bytes)


def _version_tuple(text: object) -> tuple[int, ...]:
    parts = []
    for piece in str(text).split("+")[0].split("-")[0].split("."):
        if not piece.isdigit():
            break
        parts.append(int(piece))
    return tuple(parts)


class AtServerCore:
    """Every hosted atSign's verbs, over one store and one notification hub."""

    def __init__(self, store: Store, hub: NotificationHub, limits: Limits | None = None,
                 *, on_secret_deleted: Callable[[HostedAtSign], None] | None = None) -> None:
        self.store = store
        self.hub = hub
        self.limits = limits or Limits()
        self.hosted: dict[str, HostedAtSign] = {}
        self.started = time.monotonic()
        self.on_secret_deleted = on_secret_deleted
        self._peer_failures: dict[str, list[float]] = {}
        self.queries = QueryVerbs(self)
        self._handlers = {
            "From": self._from, "Cram": self._cram, "Pkam": self._pkam, "Pol": self._pol,
            "Update": self._update, "UpdateMeta": self._update_meta,
            "Delete": self._delete, "Notify": self._notify, "Monitor": self._monitor,
            "Noop": self._noop, "Info": self._info, "Exit": self._exit,
            "LLookup": self.queries.llookup, "Lookup": self.queries.lookup,
            "PLookup": self.queries.plookup, "Scan": self.queries.scan,
            "NotifyStatus": self.queries.notify_status, "NotifyList": self.queries.notify_list,
            "NotifyRemove": self.queries.notify_remove, "NotifyFetch": self.queries.notify_fetch,
            "Stats": self.queries.stats,
        }
        self._open_verbs = {"From", "Cram", "Pkam", "Pol", "Lookup", "Scan", "Noop", "Info",
                            "Exit"}

    def host(self, hosted: HostedAtSign) -> None:
        self.hosted[hosted.atsign] = hosted
        self.hub.host(hosted.ks)

    # -- entry point --------------------------------------------------------------------------

    def handle(self, session: Session, line: str) -> Reply:
        """Run one command line.  Never raises for bad input; bugs become AT0011 + close."""
        try:
            cmd = parse_command(line)
        except AtProtocolError as exc:
            return Reply(error=VerbError(exc.code or "AT0003", str(exc)))
        except (InvalidKeyError, InvalidAtSignError, ValueError) as exc:
            return Reply(error=VerbError("AT0003", str(exc)))
        name = type(cmd).__name__
        handler = self._handlers.get(name)
        if handler is None:
            return Reply(error=VerbError("AT0003", f"{name} is not supported by this server"))
        if not session.authenticated and name not in self._open_verbs:
            return Reply(error=VerbError("AT0401", "Command cannot be executed without auth"))
        try:
            return handler(session, cmd)
        except VerbError as exc:
            return Reply(error=exc, close=exc.close)
        except (InvalidKeyError, InvalidAtSignError) as exc:
            return Reply(error=VerbError("AT0016", str(exc)))
        except AtProtocolError as exc:
            return Reply(error=VerbError(exc.code or "AT0003", str(exc)))

    # -- authentication -----------------------------------------------------------------------

    def _from(self, s: Session, cmd) -> Reply:
        atsign = normalize_atsign(cmd.atsign)
        config = getattr(cmd, "client_config", None)
        if isinstance(config, dict) and "version" in config:
            s.json_errors = _version_tuple(config["version"]) > JSON_ERRORS_AFTER
        proof = str(uuid.uuid4())
        s.challenge_at = now_ms()
        s.from_atsign = atsign
        if atsign == s.atsign:
            s.challenge = f"{s.session_id}{atsign}:{proof}"
            return Reply(data=s.challenge)
        # Another atSign: the pol handshake's proof (pol itself comes with server-to-server).
        s.challenge = None
        return Reply(data=f"proof:{s.session_id}{atsign}:{proof}")

    def _fresh_challenge(self, s: Session) -> str:
        if s.challenge is None or now_ms() - s.challenge_at > CHALLENGE_TTL_MS:
            raise VerbError("AT0401", "no valid challenge: send from:<atSign> first")
        return s.challenge

    def _login_failed(self, s: Session, message: str, *, code: str = "AT0401",
                      colon_form: bool = False) -> Reply:
        """A failed cram/pkam: count it and delay the reply as :class:`Limits` says."""
        lim = self.limits
        s.failed_logins += 1
        over = s.failed_logins - lim.login_free_failures
        delay = 0.0
        if over > 0:
            delay = min(lim.login_delay * 2 ** (over - 1), lim.login_delay_max)
        now = time.monotonic()
        recent = [t for t in self._peer_failures.get(s.peer, ()) if now - t < 60.0]
        recent.append(now)
        self._peer_failures[s.peer] = recent[-(lim.peer_fail_limit + 1):]
        if len(recent) > lim.peer_fail_limit:
            delay = max(delay, lim.login_delay_max)
        if len(self._peer_failures) > 10_000:      # bounded memory under address churn
            self._peer_failures.clear()
        log.info("failed login on %s from %s (%d on this connection)", s.atsign, s.peer,
                 s.failed_logins)
        return Reply(error=VerbError(code, message, colon_form=colon_form), delay=delay)

    def _succeed(self, s: Session, auth_type: str) -> Reply:
        s.authenticated = True
        s.auth_type = auth_type
        s.challenge = None      # one login per challenge
        return Reply(data="success")

    def _cram(self, s: Session, cmd) -> Reply:
        challenge = self._fresh_challenge(s)
        hosted = self.hosted[s.atsign]
        rec = hosted.ks.get(AT_SECRET)
        if rec is None or not rec.value:
            return self._login_failed(s, "Authentication Failed")
        expected = crypto.cram_digest(rec.value, challenge)
        if not hmac.compare_digest(expected.encode(), str(cmd.digest).strip().lower().encode()):
            return self._login_failed(s, "Authentication Failed")
        return self._succeed(s, "cram")

    def _pkam(self, s: Session, cmd) -> Reply:
        challenge = self._fresh_challenge(s)
        hosted = self.hosted[s.atsign]
        pub = hosted.pkam_public_key()
        if pub is None:
            raise VerbError("AT0015", f"{PKAM_KEY}{s.atsign} does not exist in keystore")
        hashing = (cmd.hashing_algo or "sha256").lower()
        if hashing not in ("sha256", "sha512"):
            hashing = "sha256"
        algo = (cmd.signing_algo or "rsa2048").lower()
        ok = (algo == "rsa2048" and pub is not _UNUSABLE_KEY
              and crypto.pkam_verify(pub, challenge, cmd.signature, hashing))
        if cmd.enrollment_id:
            # No enrollment records yet (no `enroll` verb).  The first enrollment of an atSign
            # copies its APKAM key to the legacy slot (spec §3.5), so a signature that verifies
            # under that key proves the same key pair: accept it as that enrollment.  Anything
            # else is an enrollment we do not know: AT0028 in the handler shape, as Dart does.
            if not ok:
                return self._login_failed(
                    s, f"enrollment_id: {cmd.enrollment_id} is expired or invalid",
                    code="AT0028", colon_form=True)
            s.enrollment_id = cmd.enrollment_id
            return self._succeed(s, "apkam")
        if not ok:
            return self._login_failed(s, "pkam authentication failed")
        return self._succeed(s, "pkamLegacy")

    def _pol(self, s: Session, cmd) -> Reply:
        return Reply(error=VerbError("AT0401", "Pol Authentication Failed: server-to-server "
                                     "authentication is not supported by this server yet"))

    # -- writes -------------------------------------------------------------------------------

    def _own_key(self, s: Session, key: AtKey, *, for_delete: bool = False) -> str:
        """Stored text of a key the owner may write; raises AT0016/AT0009 otherwise."""
        if key.kind == "privatekey":
            allowed = "at_secret" if for_delete else "at_pkam_publickey"
            if key.entity != allowed or (key.owner not in (None, s.atsign)):
                raise VerbError("AT0016", f"privatekey:{key.entity} cannot be "
                                f"{'deleted' if for_delete else 'updated'}")
            return f"privatekey:{key.entity}"
        if key.kind in ("private", "local"):
            raise VerbError("AT0016", f"{key.kind}: keys cannot be "
                            f"{'deleted' if for_delete else 'updated'} by a client")
        if key.cached:
            if not for_delete:
                raise VerbError("AT0016", "cached: keys are written by the server only")
            return str(key)
        if key.owner != s.atsign:
            raise VerbError("AT0016", f"the owner of {key} must be {s.atsign}")
        text = str(key)
        if key.entity in ("signing_publickey", "signing_privatekey") or (
                for_delete and text in (f"public:publickey{s.atsign}",)):
            raise VerbError("AT0009", f"{text} is a protected key")
        return text

    def _auto_notify(self, s: Session, key: AtKey, text: str, operation: str,
                     value: str | None, meta: dict) -> None:
        """Dart autoNotify: a change to ``@bob:x@me`` is notified to @bob (spec §4.2/§4.6)."""
        if key.kind != "shared" or key.cached or key.shared_with == s.atsign:
            return
        now = now_ms()
        wire = {k: v for k, v in meta.items()
                if k in ("ttl", "ttb", "ttr", "ccd", "isBinary", "isEncrypted",
                         "dataSignature", "sharedKeyEnc", "pubKeyCS", "encoding", "encKeyName",
                         "encAlgo", "ivNonce", "skeEncKeyName", "skeEncAlgo")}
        n = StoredNotification(
            id=str(uuid.uuid4()), from_atsign=s.atsign, to_atsign=key.shared_with, key=text,
            value=value if operation == "update" else None, operation=operation,
            message_type="key", is_encrypted=bool(meta.get("isEncrypted", False)),
            metadata=wire, epoch_millis=now, expires_at=now + self.limits.notification_ttl_ms)
        self.hub.send(n)

    def _update(self, s: Session, cmd) -> Reply:
        key = cmd.key
        text = self._own_key(s, key)
        hosted = self.hosted[s.atsign]
        changes = metadata_changes(cmd.metadata)
        cid = hosted.ks.put(text, cmd.value, changes, by=s.atsign)
        if text == PKAM_KEY:
            hosted.forget_pkam_key()
        rec = hosted.ks.get(text)
        self._auto_notify(s, key, text, "update", cmd.value, rec.meta if rec else {})
        return Reply(data=str(cid))

    def _update_meta(self, s: Session, cmd) -> Reply:
        key = cmd.key
        text = self._own_key(s, key)
        hosted = self.hosted[s.atsign]
        cid = hosted.ks.put_meta(text, metadata_changes(cmd.metadata), by=s.atsign)
        return Reply(data=str(cid))

    def _delete(self, s: Session, cmd) -> Reply:
        key = cmd.key
        text = self._own_key(s, key, for_delete=True)
        hosted = self.hosted[s.atsign]
        old = hosted.ks.get(text)
        cid = hosted.ks.delete(text)
        if text == AT_SECRET:
            hosted.ks.put(AT_SECRET_DELETED, "true", {}, by=s.atsign)
            if self.on_secret_deleted is not None:
                self.on_secret_deleted(hosted)
        if old is not None:
            self._auto_notify(s, key, text, "delete", None, old.meta)
        return Reply(data=str(cid))

    # -- notifications ------------------------------------------------------------------------

    def _notify(self, s: Session, cmd) -> Reply:
        key = cmd.key
        message_type = (cmd.message_type or "key").lower()
        to = cmd.to
        public = False
        if key is not None:
            if key.owner is not None and key.owner != s.atsign:
                raise VerbError("AT0009", f"{s.atsign} cannot notify as {key.owner}")
            public = key.kind == "public"
            if to is None:
                raise VerbError("AT0003", "notify needs a recipient (@bob:<key>@me)")
            # The notification key always starts with the recipient (Dart: "@bob:x@alice",
            # "@bob:public:x@alice", self notification "@alice:x@alice").
            if key.kind == "shared":
                text = str(key)
            elif key.kind == "self":
                text = f"{to}:{key.entity}{key.owner}"
            else:
                text = f"{to}:{key}"
        else:            # messageType:text: "@bob:<text>", no owner
            if to is None or cmd.text is None:
                raise VerbError("AT0003", "notify:messageType:text needs @<to>:<text>")
            text = f"{to}:{cmd.text}"
            message_type = "text"
        changes = {k: v for k, v in metadata_changes(cmd.metadata).items() if v is not RESET}
        encrypted = changes.get("isEncrypted")
        if encrypted is None:
            encrypted = message_type == "key" and not public
        ttln = cmd.ttln if cmd.ttln is not None else self.limits.notification_ttl_ms
        try:
            ttln = int(ttln)
        except (TypeError, ValueError):
            raise VerbError("AT0003", f"ttln must be an integer, not {ttln!r}") from None
        if ttln < 0:
            raise VerbError("AT0003", "ttln must be >= 0")
        if ttln == 0:
            ttln = self.limits.notification_ttl_ms
        operation = (cmd.operation or "update").lower()
        now = now_ms()
        n = StoredNotification(
            id=cmd.id or str(uuid.uuid4()), from_atsign=s.atsign, to_atsign=to, key=text,
            value=cmd.value, operation=operation, message_type=message_type,
            is_encrypted=bool(encrypted), metadata=changes, epoch_millis=now,
            expires_at=now + ttln)
        self.hub.send(n)
        return Reply(data=n.id)

    def _monitor(self, s: Session, cmd) -> Reply:
        regex = None
        if cmd.regex:
            if len(cmd.regex) > MAX_REGEX:
                raise VerbError("AT0003", f"monitor regex longer than {MAX_REGEX} characters")
            try:
                regex = re.compile(cmd.regex)
            except (re.error, RecursionError, OverflowError) as exc:
                raise VerbError("AT0003", f"invalid regex: {exc}") from None
        if s.monitor is not None:
            self.hub.remove_monitor(s.atsign, s.monitor)
        s.monitor = Monitor(sink=s.sink, regex=regex,
                            self_notifications=bool(cmd.self_notifications))
        self.hub.add_monitor(s.atsign, s.monitor, cmd.epoch)
        return Reply(silent=True)

    def close_session(self, s: Session) -> None:
        if s.monitor is not None:
            self.hub.remove_monitor(s.atsign, s.monitor)
            s.monitor = None

    # -- misc ---------------------------------------------------------------------------------

    def _noop(self, s: Session, cmd) -> Reply:
        try:
            ms = int(cmd.millis)
        except (TypeError, ValueError):
            raise VerbError("AT0003", "noop needs a number of milliseconds") from None
        if ms < 0 or ms > self.limits.noop_max_ms:
            raise VerbError("AT0022", f"noop duration must be 0-{self.limits.noop_max_ms} ms")
        return Reply(data="ok", delay=ms / 1000.0)

    def _info(self, s: Session, cmd) -> Reply:
        up_ms = int((time.monotonic() - self.started) * 1000)
        if getattr(cmd, "brief", False):
            return Reply(data=json.dumps({"version": SERVER_VERSION, "uptimeAsMillis": up_ms},
                                         separators=(",", ":")))
        secs = up_ms // 1000
        words = f"{secs // 3600} hours {secs % 3600 // 60} minutes {secs % 60} seconds"
        return Reply(data=json.dumps({"version": SERVER_VERSION, "uptimeAsWords": words,
                                      "server": "noports atserver"}, separators=(",", ":")))

    def _exit(self, s: Session, cmd) -> Reply:
        return Reply(silent=True, close=True)

