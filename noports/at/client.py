"""The async AtClient: one atSign's authenticated session with its atServer.

Owns everything an application (npt, npd, srvd, at_activate, tests) does as an atSign: finding
the atServer (root lookup, ``noports.at.root``), TLS + ``from``/``pkam`` (or ``cram``) login, the
verbs NoPorts uses (update, llookup, lookup, plookup, delete, scan, notify, notify:status), value
encryption and decryption as spec atprotocol.md §5.4 (self key, shared keys via
``noports.at.sharedkeys``), and starting monitors (``noports.at.monitor``).  The wire bytes come
from ``noports.at.commands``/``responses``; one connection's request/response matching is
``noports.at.connection``.

Concurrency: any number of tasks may call one AtClient at once; commands are pipelined on the
main connection and matched to replies in order.  A dropped connection fails the requests in
flight (AtConnectionError) and the next call reconnects.  Every request has a timeout.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import ssl
import weakref
from collections.abc import Callable

from noports.at.atkeys import AtKeys
from noports.at.command_types import (
    Cram,
    Delete,
    From,
    LLookup,
    Lookup,
    Notify,
    NotifyStatus,
    Pkam,
    PLookup,
    Scan,
    Update,
)
from noports.at.commands import encode_command
from noports.at.connection import (
    AtConnection,
    AtConnectionError,
    AtTimeoutError,
    make_ssl_context,
    open_connection,
)
from noports.at.crypto import (
    cram_digest,
    decrypt_value,
    encrypt_value,
    generate_iv_b64,
    pkam_sign,
    sign,
)
from noports.at.metadata import Metadata
from noports.at.monitor import AtNotification, Monitor, notification_from_json
from noports.at.names import AtKey, normalize_atsign
from noports.at.root import DEFAULT_ROOT, AtSignNotFoundError, RootClient, parse_root_address
from noports.at.sharedkeys import SharedKeys
from noports.errors import AtKeysError, AtServerError, InvalidKeyError, NoPortsError

__all__ = [
    "DEFAULT_ROOT",
    "AtClient",
    "AtConnectionError",
    "AtNotification",
    "AtSignNotFoundError",
    "AtTimeoutError",
    "Monitor",
    "notify_line",
]

log = logging.getLogger(__name__)

_PKAM_FORMS = ("auto", "legacy", "algo")


def _none_if_null(payload: str | None) -> str | None:
    # "data:null" means "no value / not active" (spec §2.4).
    return None if payload is None or payload == "null" else payload


def _json(payload: str | None):
    payload = _none_if_null(payload)
    return None if payload is None else json.loads(payload)


def _meta_iv(meta: dict | None) -> str | None:
    iv = (meta or {}).get("ivNonce")
    # Replayed notifications carry the text "null" for absent fields (spec §5.3).
    return iv if iv and iv != "null" else None


def _meta_text(meta: dict | None, name: str) -> str | None:
    value = (meta or {}).get(name)
    return value if isinstance(value, str) and value and value != "null" else None


def new_notification_id() -> str:
    """A random (version 4) UUID's text, as ``str(uuid.uuid4())`` -- without building a UUID
    object, which costs several times more on the notify path."""
    h = os.urandom(16).hex()
    # version nibble 4; variant bits 10 (the nibble after the third dash is 8, 9, a or b)
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:]}"


_VARIANT = {c: "89ab"[int(c, 16) & 3] for c in "0123456789abcdef"}


def notify_line(nid: str, operation: str, ttln: int | None, md: Metadata, key: AtKey,
                value: str) -> str:
    """``notify:id:<id>:<op>[:ttln:<ms>]<META>:@to:<name>@owner:<value>`` for a shared or self
    key whose fields need no escaping check (see AtClient.notify)."""
    ttln_part = "" if ttln is None else f":ttln:{ttln}"
    to = key.shared_with or key.owner
    return (f"notify:id:{nid}:{operation}{ttln_part}{md.encode()}"
            f":{to}:{key.entity}{key.owner}:{value}")


class AtClient:
    """One atSign's client.  ``async with AtClient("@alice", keys, root=..., ca_file=...) as c``.

    Arguments:
        atsign: the atSign this client acts as.
        keys: its AtKeys (needed for PKAM login and for any encryption); or None with
            ``cram_secret`` for onboarding.
        root: root directory ``HOST[:PORT]``. The default ``root.atsign.org:64`` is Atsign's
            public root and is not reachable from an isolated network.
        server: ``HOST:PORT`` of the atServer, skipping the root lookup.
        ca_file / ssl_context: trust for TLS (default: ``$NOPORTS_CA_FILE``, else system store).
        pkam_form: ``"auto"`` (the ``signingAlgo:rsa2048:hashingAlgo:sha256:enrollmentId:<id>``
            form when the keys have an enrollmentId, else the legacy ``pkam:<sig>``),
            ``"legacy"`` or ``"algo"`` (always the signingAlgo form).
        request_timeout / connect_timeout: seconds.
    """

    def __init__(self, atsign: str, keys: AtKeys | None = None, *, root: str = DEFAULT_ROOT,
                 server: str | tuple[str, int] | None = None, ca_file: str | None = None,
                 ssl_context: ssl.SSLContext | None = None, cram_secret: str | None = None,
                 pkam_form: str = "auto", request_timeout: float = 10.0,
                 connect_timeout: float = 10.0, root_client: RootClient | None = None) -> None:
        self.atsign = normalize_atsign(atsign)
        if keys is not None and normalize_atsign(keys.atsign) != self.atsign:
            raise AtKeysError(f"keys are for {keys.atsign}, not {self.atsign}")
        if pkam_form not in _PKAM_FORMS:
            raise ValueError(f"pkam_form must be one of {_PKAM_FORMS}")
        self.keys = keys
        self.cram_secret = cram_secret
        self.pkam_form = pkam_form
        self.request_timeout = request_timeout
        self.connect_timeout = connect_timeout
        self.ssl_context = ssl_context if ssl_context is not None else make_ssl_context(ca_file)
        if isinstance(server, str):
            server = parse_root_address(server, default_port=0)
            if not server[1]:
                raise ValueError("server must be HOST:PORT")
        self._server = server
        self.root = root_client or RootClient(root, self.ssl_context, timeout=connect_timeout)
        self.shared_keys = SharedKeys(self)
        self._conn: AtConnection | None = None
        self._connect_lock = asyncio.Lock()
        # Weak: a monitor the application closed and dropped is not kept alive by the client.
        self._monitors: weakref.WeakSet[Monitor] = weakref.WeakSet()
        self._key_cache: dict[str, AtKey] = {}

    # ---- lifecycle --------------------------------------------------------------------------

    async def __aenter__(self) -> AtClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def connect(self) -> None:
        """Open and authenticate the main connection now (otherwise done on first use)."""
        await self._connection()

    async def close(self) -> None:
        """Close the main connection and every monitor started from this client."""
        monitors, self._monitors = list(self._monitors), weakref.WeakSet()
        for mon in monitors:
            await mon.close()
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.aclose()

    def require_keys(self) -> AtKeys:
        if self.keys is None:
            raise AtKeysError(f"no .atKeys loaded for {self.atsign}")
        return self.keys

    async def server_address(self) -> tuple[str, int]:
        """``(host, port)`` of this atSign's atServer (root lookup, cached for an hour)."""
        if self._server is not None:
            return self._server
        return await self.root.lookup(self.atsign)

    async def open_connection(self, *, authenticate: bool = True,
                              on_notification: Callable[[dict], None] | None = None,
                              on_unsolicited: Callable | None = None) -> AtConnection:
        """A new connection to the atServer, logged in unless ``authenticate`` is False."""
        host, port = await self.server_address()
        try:
            conn = await open_connection(host, port, self.ssl_context,
                                         timeout=self.connect_timeout,
                                         on_notification=on_notification,
                                         on_unsolicited=on_unsolicited)
        except AtConnectionError:
            if self._server is not None:
                raise
            # The cached root answer may be stale (atServer moved): ask the root again, once.
            self.root.invalidate(self.atsign)
            fresh = await self.root.lookup(self.atsign)
            if fresh == (host, port):
                raise
            conn = await open_connection(*fresh, self.ssl_context, timeout=self.connect_timeout,
                                         on_notification=on_notification,
                                         on_unsolicited=on_unsolicited)
        if authenticate:
            try:
                await self._login(conn)
            except BaseException:
                conn.close()
                raise
        return conn

    async def _login(self, conn: AtConnection) -> None:
        timeout = self.request_timeout
        challenge = await conn.request(encode_command(From(self.atsign)), timeout)
        if self.keys is not None:
            if self.keys.pkam_private is None:
                raise AtKeysError(f"the keys of {self.atsign} hold no PKAM private key")
            signature = pkam_sign(self.keys.pkam_private, challenge)
            enrollment = self.keys.enrollment_id
            if self.pkam_form == "legacy" or (self.pkam_form == "auto" and not enrollment):
                cmd = Pkam(signature)
            else:
                cmd = Pkam(signature, signing_algo="rsa2048", hashing_algo="sha256",
                           enrollment_id=enrollment or None)
        elif self.cram_secret is not None:
            cmd = Cram(cram_digest(self.cram_secret, challenge))
        else:
            raise AtKeysError(f"no keys and no CRAM secret to log in as {self.atsign}")
        reply = await conn.request(encode_command(cmd), timeout)
        if reply != "success":
            raise AtServerError("AT0401", f"unexpected login reply {reply[:80]!r}")

    async def _connection(self) -> AtConnection:
        conn = self._conn
        if conn is not None and conn.is_open:
            return conn
        async with self._connect_lock:
            conn = self._conn
            if conn is None or not conn.is_open:
                conn = self._conn = await self.open_connection()
            return conn

    # ---- raw commands -----------------------------------------------------------------------

    async def execute(self, command, timeout: float | None = None) -> str:
        """Send one command (a ``noports.at.command_types`` object or a raw line); return the
        ``data:`` payload.  AtServerError for ``error:`` replies."""
        line = command if isinstance(command, str) else encode_command(command)
        conn = self._conn
        if conn is None or not conn.is_open:
            conn = await self._connection()
        return await conn.send(line, self.request_timeout if timeout is None else timeout)

    def _key(self, key: AtKey | str) -> AtKey:
        if isinstance(key, AtKey):
            return key
        hit = self._key_cache.get(key)
        if hit is not None:
            return hit
        try:
            parsed = AtKey.parse(key)
        except InvalidKeyError:
            if "@" in key.rpartition(":")[2]:
                raise
            parsed = AtKey.parse(key + self.atsign)   # "phone.wavi" -> "phone.wavi@me"
        # Apps send the same few key names over and over; parsing validates every character.
        if len(self._key_cache) >= 1024:
            self._key_cache.clear()
        self._key_cache[key] = parsed
        return parsed

    @staticmethod
    def _split(key: AtKey | str) -> tuple[str, str]:
        """``"name@owner"`` (or an AtKey) -> ``("name", "@owner")`` for lookup/plookup."""
        if isinstance(key, AtKey):
            return key.entity, key.owner
        entity, at, owner = key.rpartition("@")
        if not at or not entity:
            raise InvalidKeyError(f"expected name@owner, got {key!r}")
        if entity.startswith("public:"):
            entity = entity[len("public:"):]
        return entity.lower(), normalize_atsign(owner)

    # ---- verbs ------------------------------------------------------------------------------

    async def update(self, key: AtKey | str, value: str,
                     metadata: Metadata | None = None) -> int | None:
        """``update`` as given (no encryption); returns the commit id."""
        reply = await self.execute(Update(self._key(key), value, metadata or Metadata()))
        reply = _none_if_null(reply)
        return None if reply is None else int(reply)

    async def llookup(self, key: AtKey | str, mode: str | None = None):
        """Own store read: the value (str), or with mode "meta"/"all" the parsed JSON; None
        for an inactive key; AtServerError AT0015 when missing."""
        reply = await self.execute(LLookup(self._key(key), mode))
        return _none_if_null(reply) if mode is None else _json(reply)

    async def lookup(self, key: AtKey | str, mode: str | None = None,
                     bypass_cache: bool | None = None):
        """``lookup:<name>@<owner>`` (what ``owner`` shares with me, or my own value)."""
        entity, owner = self._split(key)
        reply = await self.execute(Lookup(entity, owner, mode=mode, bypass_cache=bypass_cache))
        return _none_if_null(reply) if mode is None else _json(reply)

    async def plookup(self, key: AtKey | str, mode: str | None = None,
                      bypass_cache: bool | None = None):
        """``plookup:<name>@<owner>``: a public value, fetched via my own atServer."""
        entity, owner = self._split(key)
        reply = await self.execute(PLookup(entity, owner, mode=mode, bypass_cache=bypass_cache))
        return _none_if_null(reply) if mode is None else _json(reply)

    async def delete(self, key: AtKey | str) -> int | None:
        reply = _none_if_null(await self.execute(Delete(self._key(key))))
        return None if reply is None else int(reply)

    async def scan(self, regex: str | None = None, *, show_hidden: bool = False,
                   for_atsign: str | None = None) -> list[str]:
        """Key names visible to me (``for_atsign``: what that atSign shares with me)."""
        cmd = Scan(regex=regex, show_hidden=show_hidden,
                   for_atsign=normalize_atsign(for_atsign) if for_atsign else None)
        return _json(await self.execute(cmd)) or []

    async def notify(self, key: AtKey | str, value: str | None = None, *,
                     operation: str = "update", ttln: int | None = None,
                     ttl: int | None = None, ttr: int | None = None, ccd: bool | None = None,
                     encrypt: bool | None = None, metadata: Metadata | None = None,
                     id: str | None = None, **options) -> str:
        """Notify ``@to:<name>@me``; returns the notification id.

        ``encrypt`` (default: yes for a value on a non-public key) encrypts the value with the
        key shared with the recipient and sets isEncrypted, ivNonce, sharedKeyEnc and pubKeyCS
        like the Dart client.  ``ttln`` is the notification's lifetime (ms); ttl/ttr/ccd are key
        metadata.  Other ``Notify`` fields (message_type, priority, strategy, latest_n,
        notifier) pass through ``options``.
        """
        akey = self._key(key)
        md = dataclasses.replace(metadata) if metadata is not None else Metadata()
        for name, val in (("ttl", ttl), ("ttr", ttr), ("ccd", ccd)):
            if val is not None:
                setattr(md, name, val)
        if encrypt is None:
            encrypt = value is not None and akey.kind != "public"
        if encrypt and value is not None:
            recipient = akey.shared_with or akey.owner
            shared = self.shared_keys
            out = shared.cached_for_sending(recipient)
            if out is None:
                out = await shared.for_sending(recipient)
            value = self._seal(out, value, md)
        elif value is not None and akey.kind != "public" and md.is_encrypted is None:
            md.is_encrypted = False   # the server assumes encrypted unless told otherwise
        nid = id or new_notification_id()
        if (encrypt and value is not None and id is None and metadata is None and not options
                and akey.kind in ("shared", "self") and operation in ("update", "delete")
                and all(v is None or type(v) is int for v in (ttln, ttl, ttr))
                and (ccd is None or type(ccd) is bool)):
            # Hot path (every NoPorts message): every field is ours -- a fresh UUID, base64
            # from the crypto module, ints, a validated AtKey -- so the line is built directly
            # instead of paying encode_command's parse-back check (tens of microseconds).
            # tests/unit/test_client_encoding.py holds it equal to encode_command.
            line = notify_line(nid, operation, ttln, md, akey, value)
            conn = self._conn
            if conn is not None and conn.is_open:     # (execute, minus one coroutine)
                return await conn.send(line, self.request_timeout)
        else:
            line = Notify(akey, value, id=nid, operation=operation, ttln=ttln, metadata=md,
                          **options)
        return await self.execute(line)

    async def notify_status(self, notification_id: str) -> str | None:
        """``delivered``, ``queued``, ``errored``, ``expired`` or None (unknown id)."""
        return _none_if_null(await self.execute(NotifyStatus(notification_id)))

    # ---- encrypted values -------------------------------------------------------------------

    async def _encrypt_shared(self, recipient: str, value: str, md: Metadata) -> str:
        return self._seal(await self.shared_keys.for_sending(recipient), value, md)

    def _seal(self, out, value: str, md: Metadata) -> str:
        """Encrypt ``value`` with the shared key ``out`` (an OutgoingKey) and a fresh IV; fill
        the metadata that lets the recipient decrypt it."""
        iv = generate_iv_b64()
        md.is_encrypted = True
        md.iv_nonce = iv
        md.shared_key_enc = out.shared_key_enc
        md.pub_key_cs = out.pub_key_cs
        return self.shared_keys.cipher(out.aes_key).encrypt(value, iv)

    async def put(self, key: AtKey | str, value: str, *, ttl: int | None = None,
                  ttr: int | None = None, ccd: bool | None = None,
                  metadata: Metadata | None = None) -> int | None:
        """Store a value of mine, encrypted as its kind requires; returns the commit id.

        public: plain, with ``dataSignature``; self: AES with my self-encryption key and a
        random IV; shared (``@bob:name@me``): AES with the key shared with Bob (created on first
        use), with sharedKeyEnc/pubKeyCS; other kinds: stored as given.
        """
        akey = self._key(key)
        if akey.owner is not None and akey.owner != self.atsign:
            raise InvalidKeyError(f"{akey} belongs to {akey.owner}, not {self.atsign}")
        md = dataclasses.replace(metadata) if metadata is not None else Metadata()
        for name, val in (("ttl", ttl), ("ttr", ttr), ("ccd", ccd)):
            if val is not None:
                setattr(md, name, val)
        keys = self.keys
        if akey.kind == "public" and keys is not None and not akey.cached:
            md.data_signature = sign(keys.encrypt_private, value.encode())
        elif akey.kind == "self":
            iv = generate_iv_b64()
            md.is_encrypted = True
            md.iv_nonce = iv
            value = encrypt_value(self.require_keys().self_encryption_key, value, iv)
        elif akey.kind == "shared":
            value = await self._encrypt_shared(akey.shared_with, value, md)
        return await self.update(akey, value, md)

    async def get(self, key: AtKey | str, *, bypass_cache: bool | None = None) -> str | None:
        """Read and decrypt a value: my public/self/shared keys, another atSign's public
        keys (``public:name@bob``) and what another atSign shares with me (``name@bob`` or
        ``@me:name@bob``).  None when the key is inactive."""
        akey = self._key(key)
        me = self.atsign
        if akey.kind == "public":
            if akey.owner == me:
                record = await self.llookup(akey, "all")
            else:
                record = await self.plookup(akey, "all", bypass_cache=bypass_cache)
            return None if record is None else record.get("data")
        if akey.owner == me and akey.kind == "self":
            record = await self.llookup(akey, "all")
            return self._decrypt_record(record, self.require_keys().self_encryption_key)
        if akey.owner == me and akey.kind == "shared":
            record = await self.llookup(akey, "all")
            if record is None:
                return None
            aes = (await self.shared_keys.for_sending(akey.shared_with)).aes_key
            return self._decrypt_record(record, aes)
        if akey.owner != me and akey.kind in ("self", "shared") and akey.shared_with in (None, me):
            record = await self.lookup(f"{akey.entity}{akey.owner}", "all",
                                       bypass_cache=bypass_cache)
            if record is None:
                return None
            meta = record.get("metaData") or {}
            aes = await self.shared_keys.for_receiving(
                akey.owner, _meta_text(meta, "sharedKeyEnc"), _meta_text(meta, "pubKeyCS"))
            try:
                return self._decrypt_record(record, aes)
            except ValueError:
                aes = await self.shared_keys.for_receiving(akey.owner, refresh=True)
                return self._decrypt_record(record, aes)
        raise InvalidKeyError(f"cannot get {akey} as {me}")

    @staticmethod
    def _decrypt_record(record: dict | None, aes_key: str) -> str | None:
        if record is None:
            return None
        data = record.get("data")
        meta = record.get("metaData") or {}
        if data is None or meta.get("isEncrypted") is False:
            return data
        return decrypt_value(aes_key, data, _meta_iv(meta))

    # ---- notifications ----------------------------------------------------------------------

    def monitor(self, regex: str = ".*", **options) -> Monitor:
        """A Monitor (not started): ``async with client.monitor(regex) as mon: async for n in
        mon``.  Options: since (epoch ms to replay from; default now), decrypt, include_stats,
        heartbeat_interval, heartbeat_timeout, replay_overlap_ms, seen_capacity,
        backoff_base, backoff_cap.  Closed with the client."""
        mon = Monitor(self, regex, **options)
        self._monitors.add(mon)
        return mon

    async def decrypt_notification(self, payload: dict) -> AtNotification:
        """Turn a ``notification:`` JSON object into an AtNotification with its value
        decrypted; on failure ``value`` is None and ``decrypt_error`` says why."""
        n = notification_from_json(payload)
        if n.is_stats or n.value is None or n.operation == "delete":
            return n
        try:
            if n.key.startswith(f"{self.atsign}:shared_key@"):
                # Someone shared a new key with me: cache it; the value becomes the key itself.
                n.value = self.shared_keys.remember_received(n.from_atsign, n.value)
                return n
            if not n.is_encrypted:
                return n
            n.value = await self._decrypt_notification_value(n)
        except (NoPortsError, ValueError, OSError, asyncio.TimeoutError) as exc:
            n.decrypt_error = exc
            n.value = None
        return n

    async def _decrypt_notification_value(self, n: AtNotification) -> str:
        meta = n.metadata
        iv = _meta_iv(meta)
        enc = _meta_text(meta, "sharedKeyEnc")
        cs = _meta_text(meta, "pubKeyCS")
        cipher = n.raw.get("value")
        shared = self.shared_keys
        aes = shared.cached_for_receiving(n.from_atsign, enc, cs)
        if aes is None:
            aes = await shared.for_receiving(n.from_atsign, enc, cs)
        try:
            return shared.cipher(aes).decrypt(cipher, iv)
        except ValueError:
            # A cached or stale key that no longer fits (the sender made a new one): ask the
            # sender's atServer afresh, once.
            fresh = await shared.for_receiving(n.from_atsign, refresh=True)
            if fresh == aes:
                raise
            return shared.cipher(fresh).decrypt(cipher, iv)

    async def encrypt_for(self, recipient: str, value: str) -> tuple[str, Metadata]:
        """Encrypt ``value`` for ``recipient`` without sending; returns (cipher, metadata)."""
        md = Metadata()
        return await self._encrypt_shared(normalize_atsign(recipient), value, md), md

