"""Shared AES keys between two atSigns: creation, storage on the atServer and caching.

Owns the key management of spec atprotocol.md §5.4 (client side), for the atSign ``me``:

* to send to ``@bob``: a key "shared by me" -- own copy ``shared_key.bob@me`` (RSA-encrypted
  with my public key), Bob's copy ``@bob:shared_key@me`` (RSA-encrypted with Bob's public key,
  from ``plookup:publickey@bob``, stored with a ttr so that Bob's atServer caches it);
* to read what ``@bob`` sent: Bob's key "shared by other" -- from the notification/record
  metadata ``sharedKeyEnc`` when present (Dart clients add it), else ``lookup:shared_key@bob``,
  or from a ``@me:shared_key@bob`` notification.

Verb execution is borrowed from the AtClient (``noports.at.client``); this module holds no
connection.  RSA unwrapping costs about a millisecond, so every unwrapped key is cached, and the
``sharedKeyEnc`` text a sender attaches to each notification is cached too.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

from noports.at.crypto import (
    generate_aes_key_b64,
    public_key_from_b64,
    public_key_md5,
    unwrap_shared_key,
    wrap_shared_key,
)
from noports.at.metadata import Metadata
from noports.at.names import AtKey, bare_atsign, normalize_atsign
from noports.at.valuecipher import ValueCipher
from noports.errors import AtServerError

if TYPE_CHECKING:  # pragma: no cover
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

    from noports.at.client import AtClient

__all__ = ["SHARED_KEY_TTR_MS", "OutgoingKey", "SharedKeys"]

#: ttr on ``@bob:shared_key@me``: Bob's atServer may serve its cached copy for a day (atsdk's
#: value; Dart uses a shorter one).
SHARED_KEY_TTR_MS = 86_400_000
#: How many distinct ``sharedKeyEnc`` texts to remember (one per sender and key generation).
_ENC_CACHE_SIZE = 1024
#: How many ready value ciphers (one per AES key in use) to keep.
_CIPHER_CACHE_SIZE = 1024


@dataclass(frozen=True)
class OutgoingKey:
    """What encrypting for one recipient needs."""

    aes_key: str          # base64 AES-256 key
    shared_key_enc: str   # the key RSA-encrypted for the recipient (metadata ``sharedKeyEnc``)
    pub_key_cs: str       # MD5 hex of the recipient's public key (metadata ``pubKeyCS``)


def _not_found(exc: AtServerError) -> bool:
    return exc.code == "AT0015"


class SharedKeys:
    """Shared-key cache and creation for one AtClient."""

    def __init__(self, client: AtClient) -> None:
        self._client = client
        self._outgoing: dict[str, OutgoingKey] = {}
        self._incoming: dict[str, str] = {}
        self._by_enc: OrderedDict[str, str] = OrderedDict()
        self._public: dict[str, tuple[RSAPublicKey, str]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._md5: str | None = None
        self._ciphers: dict[str, ValueCipher] = {}

    @property
    def _me(self) -> str:
        return self._client.atsign

    def _lock(self, name: str) -> asyncio.Lock:
        lock = self._locks.get(name)
        if lock is None:
            lock = self._locks[name] = asyncio.Lock()
        return lock

    def forget(self, other: str | None = None) -> None:
        """Drop cached keys (for ``other`` only, or all)."""
        if other is None:
            self._outgoing.clear()
            self._incoming.clear()
            self._by_enc.clear()
            self._public.clear()
            self._ciphers.clear()
            return
        other = normalize_atsign(other)
        self._outgoing.pop(other, None)
        self._incoming.pop(other, None)
        self._public.pop(other, None)

    def cipher(self, aes_key: str) -> ValueCipher:
        """A ready :class:`ValueCipher` for ``aes_key`` (base64): one AES context per key, not
        one per value (ValueError for a malformed key)."""
        vc = self._ciphers.get(aes_key)
        if vc is None:
            vc = ValueCipher(aes_key)
            if len(self._ciphers) >= _CIPHER_CACHE_SIZE:
                self._ciphers.clear()
            self._ciphers[aes_key] = vc
        return vc

    # ---- public keys ------------------------------------------------------------------------

    async def public_key(self, atsign: str, *, refresh: bool = False) -> tuple[RSAPublicKey, str]:
        """``(key, base64 text)`` of an atSign's encryption public key (``publickey@x``)."""
        atsign = normalize_atsign(atsign)
        keys = self._client.keys
        if atsign == self._me and keys is not None:
            return keys.encrypt_public, keys.encrypt_public_b64
        hit = self._public.get(atsign)
        if hit is not None and not refresh:
            return hit
        text = await self._client.plookup(f"publickey{atsign}", bypass_cache=True if refresh
                                          else None)
        if not text:
            raise AtServerError("AT0015", f"{atsign} has no public encryption key (publickey)")
        entry = (public_key_from_b64(text), text)
        self._public[atsign] = entry
        return entry

    # ---- keys shared by me ------------------------------------------------------------------

    def cached_for_sending(self, other: str) -> OutgoingKey | None:
        """The key for ``other`` (a normalised atSign) if it is cached, else None; no I/O."""
        return self._outgoing.get(other)

    async def for_sending(self, other: str) -> OutgoingKey:
        """The key for encrypting values to ``other``; created and stored if there is none."""
        hit = self._outgoing.get(other)      # callers mostly pass normalised atSigns
        if hit is not None:
            return hit
        other = normalize_atsign(other)
        hit = self._outgoing.get(other)
        if hit is not None:
            return hit
        async with self._lock("out" + other):
            hit = self._outgoing.get(other)
            if hit is None:
                hit = await self._load_or_create(other)
                self._outgoing[other] = hit
            return hit

    async def _load_or_create(self, other: str) -> OutgoingKey:
        client = self._client
        keys = client.require_keys()
        me = self._me
        own_key = AtKey(entity=f"shared_key.{bare_atsign(other)}", owner=me, kind="self")
        try:
            own_wrapped = await client.llookup(own_key)
        except AtServerError as exc:
            if not _not_found(exc):
                raise
            own_wrapped = None
        aes = None
        if own_wrapped:
            try:
                aes = unwrap_shared_key(keys.encrypt_private, own_wrapped)
            except ValueError:
                # Wrapped with another key pair (the atSign was re-activated): start afresh.
                aes = None
        pub, pub_b64 = await self.public_key(other)
        if other == me:
            # Notifications to oneself: the own copy is all there is.
            if aes is None:
                aes = generate_aes_key_b64()
                own_wrapped = wrap_shared_key(keys.encrypt_public, aes)
                await client.update(own_key, own_wrapped)
            return OutgoingKey(aes, own_wrapped, public_key_md5(pub_b64))
        their_key = AtKey(entity="shared_key", owner=me, kind="shared", shared_with=other)
        theirs = None
        if aes is None:
            aes = generate_aes_key_b64()
            await client.update(own_key, wrap_shared_key(keys.encrypt_public, aes))
        else:
            try:
                theirs = await client.llookup(their_key)
            except AtServerError as exc:
                if not _not_found(exc):
                    raise
        if not theirs:
            theirs = wrap_shared_key(pub, aes)
            await client.update(their_key, theirs, Metadata(ttr=SHARED_KEY_TTR_MS))
        return OutgoingKey(aes, theirs, public_key_md5(pub_b64))

    # ---- keys shared with me ----------------------------------------------------------------

    def _unwrap_enc(self, shared_key_enc: str) -> str:
        aes = self._by_enc.get(shared_key_enc)
        if aes is None:
            aes = unwrap_shared_key(self._client.require_keys().encrypt_private, shared_key_enc)
            self._by_enc[shared_key_enc] = aes
            if len(self._by_enc) > _ENC_CACHE_SIZE:
                self._by_enc.popitem(last=False)
        return aes

    def cached_for_receiving(self, other: str, shared_key_enc: str | None = None,
                             pub_key_cs: str | None = None) -> str | None:
        """The key without any network round trip, or None (fast path for the monitor)."""
        if shared_key_enc and self._enc_is_for_me(pub_key_cs):
            aes = self._by_enc.get(shared_key_enc)
            if aes is not None:
                return aes
        if other == self._me:
            hit = self._outgoing.get(other)
            return hit.aes_key if hit is not None else None
        return self._incoming.get(other)

    def _enc_is_for_me(self, pub_key_cs: str | None) -> bool:
        keys = self._client.keys
        return not pub_key_cs or keys is None or pub_key_cs == self._my_md5()

    def _my_md5(self) -> str:
        if self._md5 is None:
            self._md5 = public_key_md5(self._client.require_keys().encrypt_public_b64)
        return self._md5

    async def for_receiving(self, other: str, shared_key_enc: str | None = None,
                            pub_key_cs: str | None = None, *, refresh: bool = False) -> str:
        """The key ``other`` encrypts with for me (base64 AES).

        ``shared_key_enc``/``pub_key_cs`` come from the notification's or record's metadata;
        ``refresh`` bypasses every cache (used after a decryption failure).
        """
        other = normalize_atsign(other)
        if other == self._me:
            if refresh:
                self._outgoing.pop(other, None)
            return (await self.for_sending(other)).aes_key
        if shared_key_enc and self._enc_is_for_me(pub_key_cs):
            try:
                aes = self._unwrap_enc(shared_key_enc)
            except ValueError:
                aes = None  # not for our key pair after all: ask the server
            if aes is not None:
                return aes
        if not refresh:
            hit = self._incoming.get(other)
            if hit is not None:
                return hit
        async with self._lock("in" + other):
            if not refresh:
                hit = self._incoming.get(other)
                if hit is not None:
                    return hit
            wrapped = await self._client.lookup(f"shared_key{other}",
                                                bypass_cache=True if refresh else None)
            if not wrapped:
                raise AtServerError("AT0015", f"{other} has not shared a key with {self._me}")
            aes = unwrap_shared_key(self._client.require_keys().encrypt_private, wrapped)
            self._incoming[other] = aes
            return aes

    def remember_received(self, other: str, wrapped: str) -> str:
        """Cache the key from a ``@me:shared_key@other`` notification; return it (base64)."""
        other = normalize_atsign(other)
        aes = unwrap_shared_key(self._client.require_keys().encrypt_private, wrapped)
        self._incoming[other] = aes
        return aes
