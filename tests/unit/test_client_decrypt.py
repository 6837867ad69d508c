"""Decryption of received notifications and the monitor's de-duplication, without a server.

The AtClient's verbs are replaced by stubs: these tests check which key each notification is
decrypted with and when the client has to ask the server for one.
"""

from __future__ import annotations

import asyncio

import pytest

from noports.at.atkeys import AtKeys
from noports.at.client import AtClient
from noports.at.crypto import (
    encrypt_value,
    generate_aes_key_b64,
    generate_iv_b64,
    public_key_md5,
    wrap_shared_key,
)
from noports.at.monitor import Monitor

BOB = AtKeys.generate("@bob")


def _client(lookups: list, answers: dict) -> AtClient:
    client = AtClient("@bob", BOB, server="127.0.0.1:1")

    async def lookup(key, mode=None, bypass_cache=None):
        lookups.append((key, bypass_cache))
        return answers[(key, bool(bypass_cache))]

    async def no_network(*a, **k):
        raise AssertionError("no server round trip expected")

    client.lookup = lookup
    client.execute = no_network
    return client


def _payload(cipher, iv=None, **meta) -> dict:
    md = {"encKeyName": None, "encAlgo": None, "ivNonce": iv, "skeEncKeyName": None,
          "skeEncAlgo": None, **meta}
    return {"id": "n-1", "from": "@alice", "to": "@bob", "key": "@bob:msg.test@alice",
            "value": cipher, "operation": "update", "epochMillis": 5,
            "messageType": "MessageType.key", "isEncrypted": True, "metadata": md}


def test_shared_key_enc_in_metadata_needs_no_lookup(run):
    aes = generate_aes_key_b64()
    iv = generate_iv_b64()
    lookups: list = []
    client = _client(lookups, {})
    payload = _payload(encrypt_value(aes, "hi bob", iv), iv,
                       sharedKeyEnc=wrap_shared_key(BOB.encrypt_public, aes),
                       pubKeyCS=public_key_md5(BOB.encrypt_public_b64))
    n = run(client.decrypt_notification(payload))
    assert n.value == "hi bob" and n.decrypt_error is None
    assert lookups == []
    # the unwrapped key is remembered: the next one costs no RSA operation either
    assert client.shared_keys.cached_for_receiving(
        "@alice", payload["metadata"]["sharedKeyEnc"], payload["metadata"]["pubKeyCS"]) == aes


def test_without_shared_key_enc_the_key_is_looked_up_once(run):
    aes = generate_aes_key_b64()
    lookups: list = []
    client = _client(lookups, {("shared_key@alice", False):
                               wrap_shared_key(BOB.encrypt_public, aes)})
    for text in ("one", "two"):
        iv = generate_iv_b64()
        n = run(client.decrypt_notification(_payload(encrypt_value(aes, text, iv), iv)))
        assert n.value == text
    assert lookups == [("shared_key@alice", None)]


def test_legacy_zero_iv_when_no_iv_nonce(run):
    aes = generate_aes_key_b64()
    client = _client([], {("shared_key@alice", False): wrap_shared_key(BOB.encrypt_public, aes)})
    n = run(client.decrypt_notification(_payload(encrypt_value(aes, "old style"), "null")))
    assert n.value == "old style"


def test_stale_cached_key_is_refreshed(run):
    """The sender made a new shared key: the cached one fails, a bypass-cache lookup fixes it."""
    old, new = generate_aes_key_b64(), generate_aes_key_b64()
    lookups: list = []
    client = _client(lookups, {
        ("shared_key@alice", False): wrap_shared_key(BOB.encrypt_public, old),
        ("shared_key@alice", True): wrap_shared_key(BOB.encrypt_public, new)})
    iv = generate_iv_b64()
    assert run(client.decrypt_notification(_payload(encrypt_value(old, "a", iv), iv))).value == "a"
    iv = generate_iv_b64()
    n = run(client.decrypt_notification(_payload(encrypt_value(new, "b" * 40, iv), iv)))
    assert n.value == "b" * 40
    assert lookups == [("shared_key@alice", None), ("shared_key@alice", True)]


def test_undecryptable_value_is_reported_not_raised(run):
    aes = generate_aes_key_b64()
    client = _client([], {("shared_key@alice", False): wrap_shared_key(BOB.encrypt_public, aes),
                          ("shared_key@alice", True): wrap_shared_key(BOB.encrypt_public, aes)})
    n = run(client.decrypt_notification(_payload("bm90IGNpcGhlcnRleHQ=", generate_iv_b64())))
    assert n.value is None and n.decrypt_error is not None
    assert n.raw["value"] == "bm90IGNpcGhlcnRleHQ="


def test_shared_key_notification_caches_the_key(run):
    aes = generate_aes_key_b64()
    client = _client([], {})
    payload = {"id": "k-1", "from": "@alice", "to": "@bob", "key": "@bob:shared_key@alice",
               "value": wrap_shared_key(BOB.encrypt_public, aes), "operation": "update",
               "epochMillis": 9, "isEncrypted": False, "metadata": None}
    n = run(client.decrypt_notification(payload))
    assert n.value == aes
    assert client.shared_keys.cached_for_receiving("@alice") == aes


def test_plain_and_stats_notifications_untouched(run):
    client = _client([], {})
    plain = {"id": "p", "from": "@alice", "to": "@bob", "key": "@bob:x@alice", "value": "v",
             "operation": "update", "epochMillis": 1, "isEncrypted": False, "metadata": None}
    assert run(client.decrypt_notification(plain)).value == "v"
    stats = {"id": "-1", "from": "@bob", "to": "@bob", "key": "statsNotification.@bob",
             "value": "17", "operation": "update", "epochMillis": 2}
    assert run(client.decrypt_notification(stats)).is_stats


def test_monitor_delivers_each_id_once_and_filters_stats(run):
    async def main():
        mon = Monitor(client=None, regex=".*", since=0, decrypt=False)
        for nid, epoch in (("a", 10), ("b", 11), ("a", 10), ("-1", 12), ("b", 11), ("c", 9)):
            mon._on_notification({"id": nid, "epochMillis": epoch, "key": "k", "from": "@x",
                                  "to": "@y", "value": nid})
        got = [(await mon.get(1)).id for _ in range(3)]
        assert got == ["a", "b", "c"]
        assert mon.duplicates == 2
        assert mon.last_epoch == 11
        with pytest.raises(asyncio.TimeoutError):
            await mon.get(0.05)

        stats = Monitor(client=None, since=0, decrypt=False, include_stats=True)
        stats._on_notification({"id": "-1", "epochMillis": 1})
        stats._on_notification({"id": "-1", "epochMillis": 2})    # stats are never de-duplicated
        assert (await stats.get(1)).is_stats and (await stats.get(1)).is_stats

    run(main())
