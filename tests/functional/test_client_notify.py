"""AtClient against real atserver processes over TLS: verbs, encryption, notify, errors."""

from __future__ import annotations

import asyncio

import pytest

from noports.at.atkeys import AtKeys
from noports.at.client import AtClient
from noports.at.connection import AtConnectionError, AtTlsError
from noports.at.crypto import encrypt_value, generate_iv_b64, unwrap_shared_key
from noports.at.metadata import Metadata
from noports.at.root import AtSignNotFoundError, clear_root_cache
from noports.errors import AtServerError


def client_for(proc, atsign: str, **kw) -> AtClient:
    return AtClient(atsign, proc.keys(atsign), root=f"127.0.0.1:{proc.root_port}",
                    ca_file=str(proc.ca_file), **kw)


def test_encrypted_notify_both_directions(shared_atserver, run, event_loop_kind):
    """@alice -> @bob and @bob -> @alice, encrypted; each side decrypts the other's value."""
    proc = shared_atserver
    tag = event_loop_kind

    async def main():
        regex = rf"{tag}\.both\.test@"
        async with client_for(proc, "@alice") as alice, client_for(proc, "@bob") as bob, \
                alice.monitor(regex) as ma, bob.monitor(regex) as mb:
            to_bob = f"secret for bob ({tag}) ü"
            to_alice = f"secret for alice ({tag}) ✓"
            id1 = await alice.notify(f"@bob:m1.{tag}.both.test", to_bob, ttln=60_000)
            id2 = await bob.notify(f"@alice:m2.{tag}.both.test", to_alice, ttln=60_000)
            got_b = await mb.get(10)
            got_a = await ma.get(10)
        assert (got_b.id, got_b.from_atsign, got_b.to_atsign) == (id1, "@alice", "@bob")
        assert (got_a.id, got_a.from_atsign, got_a.to_atsign) == (id2, "@bob", "@alice")
        assert got_b.value == to_bob and got_a.value == to_alice
        for n, plain in ((got_b, to_bob), (got_a, to_alice)):
            assert n.is_encrypted and n.decrypt_error is None
            assert n.raw["value"] != plain                  # ciphertext on the wire
            assert n.metadata["ivNonce"] and n.metadata["sharedKeyEnc"]
        assert got_b.metadata["ivNonce"] != got_a.metadata["ivNonce"]
        assert got_b.entity == f"m1.{tag}.both.test"

    run(main())


def test_notify_status_and_ids(shared_atserver, run):
    async def main():
        async with client_for(shared_atserver, "@alice") as alice:
            ids = [await alice.notify("@bob:status.test", f"v{i}", ttln=60_000) for i in range(3)]
            assert len(set(ids)) == 3
            mine = await alice.notify("@bob:status.test", "x", id="my-own-id-1")
            assert mine == "my-own-id-1"
            status = await alice.notify_status(ids[0])
            assert status in ("delivered", "queued")
            assert await alice.notify_status("no-such-notification") is None

    run(main())


def test_put_get_public_self_shared(shared_atserver, run):
    proc = shared_atserver

    async def main():
        async with client_for(proc, "@alice") as alice, client_for(proc, "@carol") as carol:
            assert isinstance(await alice.put("public:city.pgs@alice", "Paris"), int)
            await alice.put("diary.pgs@alice", "dear diary")
            await alice.put("@carol:gift.pgs@alice", "for carol only", ttl=600_000)
            assert await alice.get("public:city.pgs@alice") == "Paris"
            assert await carol.get("public:city.pgs@alice") == "Paris"
            assert await alice.get("diary.pgs@alice") == "dear diary"
            assert await alice.get("@carol:gift.pgs@alice") == "for carol only"
            assert await carol.get("gift.pgs@alice") == "for carol only"
            # stored values are ciphertext for self and shared keys
            raw_self = await alice.llookup("diary.pgs@alice")
            raw_shared = await alice.llookup("@carol:gift.pgs@alice")
            assert raw_self != "dear diary" and raw_shared != "for carol only"
            meta = await alice.llookup("public:city.pgs@alice", "meta")
            assert meta["dataSignature"]
            keys = await alice.scan(r"\.pgs@")
            expected = {"public:city.pgs@alice", "diary.pgs@alice", "@carol:gift.pgs@alice"}
            assert expected <= set(keys)
            assert await alice.delete("diary.pgs@alice") is not None
            with pytest.raises(AtServerError) as info:
                await alice.llookup("diary.pgs@alice")
            assert info.value.code == "AT0015"
            # the connection is still usable after an error reply
            assert await alice.get("public:city.pgs@alice") == "Paris"

    run(main())


def test_shared_key_records_as_spec(shared_atserver, run):
    """Own copy shared_key.bob@alice (for alice's key pair) and @bob:shared_key@alice
    (for bob's), both holding the same AES key (spec §5.4)."""
    proc = shared_atserver

    async def main():
        async with client_for(proc, "@carol") as carol, client_for(proc, "@bob") as bob:
            out = await carol.shared_keys.for_sending("@bob")
            own = await carol.llookup("shared_key.bob@carol")
            theirs_meta = await carol.llookup("@bob:shared_key@carol", "meta")
            assert unwrap_shared_key(proc.keys("@carol").encrypt_private, own) == out.aes_key
            assert theirs_meta["ttr"] > 0
            assert await bob.shared_keys.for_receiving("@carol") == out.aes_key

    run(main())


def test_decrypt_without_shared_key_enc(shared_atserver, run):
    """A sender that attaches no sharedKeyEnc (atsdk does not): the receiver fetches the key
    with lookup:shared_key@sender."""
    proc = shared_atserver

    async def main():
        async with client_for(proc, "@carol") as carol, client_for(proc, "@alice") as alice:
            aes = (await carol.shared_keys.for_sending("@alice")).aes_key
            iv = generate_iv_b64()
            cipher = encrypt_value(aes, "no sharedKeyEnc here", iv)
            async with alice.monitor(r"nokeyenc\.test@carol") as mon:
                await carol.notify("@alice:nokeyenc.test", cipher, encrypt=False,
                                   metadata=Metadata(is_encrypted=True, iv_nonce=iv))
                n = await mon.get(10)
            assert "sharedKeyEnc" not in (n.metadata or {}) or not n.metadata["sharedKeyEnc"]
            assert n.value == "no sharedKeyEnc here"

    run(main())


def test_shared_key_notification_is_decrypted_and_cached(atserver, run):
    proc = atserver("@alice", "@bob")

    async def main():
        async with client_for(proc, "@alice") as alice, client_for(proc, "@bob") as bob:
            async with bob.monitor("shared_key") as mon:
                out = await alice.shared_keys.for_sending("@bob")
                n = await mon.get(10)
            assert n.key == "@bob:shared_key@alice"
            assert n.value == out.aes_key
            assert bob.shared_keys.cached_for_receiving("@alice") == out.aes_key

    run(main())


def test_concurrent_callers_pipelined(shared_atserver, run):
    async def main():
        async with client_for(shared_atserver, "@bob") as bob:
            async def one(i):
                await bob.put(f"cc{i}.conc@bob", f"value {i}")
                return await bob.get(f"cc{i}.conc@bob")

            results = await asyncio.gather(*(one(i) for i in range(100)))
            assert results == [f"value {i}" for i in range(100)]

    run(main())


def test_pkam_forms(shared_atserver, run):
    async def main():
        for form in ("legacy", "algo"):
            async with client_for(shared_atserver, "@carol", pkam_form=form) as c:
                assert await c.execute("noop:0") == "ok"

    run(main())


def test_wrong_keys_refused(shared_atserver, run):
    async def main():
        stranger = AtKeys.generate("@alice")   # never registered with the server
        client = AtClient("@alice", stranger, root=f"127.0.0.1:{shared_atserver.root_port}",
                          ca_file=str(shared_atserver.ca_file))
        with pytest.raises(AtServerError) as info:
            await client.connect()
        assert info.value.code == "AT0401"
        await client.close()

    run(main())


def test_unknown_atsign_and_untrusted_ca(shared_atserver, run, monkeypatch):
    monkeypatch.delenv("NOPORTS_CA_FILE", raising=False)
    clear_root_cache()
    root = f"127.0.0.1:{shared_atserver.root_port}"

    async def main():
        nobody = AtClient("@nobody", AtKeys.generate("@nobody"), root=root,
                          ca_file=str(shared_atserver.ca_file))
        with pytest.raises(AtSignNotFoundError) as info:
            await nobody.connect()
        assert info.value.code == "AT0007" and "@nobody" in str(info.value)
        untrusting = AtClient("@alice", shared_atserver.keys("@alice"), root=root)
        with pytest.raises(AtTlsError):
            await untrusting.connect()

    run(main())


def test_server_address_bypasses_root(shared_atserver, run):
    async def main():
        port = shared_atserver.ports["@bob"]
        async with AtClient("@bob", shared_atserver.keys("@bob"), root="127.0.0.1:1",
                            server=f"127.0.0.1:{port}", ca_file=str(shared_atserver.ca_file)) as b:
            assert await b.execute("noop:0") == "ok"

    run(main())


def test_dropped_connection_fails_pending_then_reconnects(atserver, run):
    proc = atserver("@alice", "@bob")

    async def main():
        loop = asyncio.get_running_loop()
        async with client_for(proc, "@alice") as alice:
            await alice.put("before.drop@alice", "1")
            slow = asyncio.ensure_future(alice.execute("noop:4000", timeout=30))
            await asyncio.sleep(0)                 # let the request go out
            await loop.run_in_executor(None, proc.kill)
            with pytest.raises(AtConnectionError):
                await asyncio.wait_for(slow, 10)
            await loop.run_in_executor(None, proc.start)
            # next use reconnects (same ports: the server keeps them across restarts)
            assert await alice.get("before.drop@alice") == "1"

    run(main())


def test_self_notification_round_trip(shared_atserver, run):
    async def main():
        async with client_for(shared_atserver, "@carol") as carol, \
                carol.monitor(r"note\.self@carol") as mon:
            nid = await carol.notify("@carol:note.self", "to myself", ttln=60_000)
            n = await mon.get(10)
        assert (n.id, n.from_atsign, n.to_atsign, n.value) == (nid, "@carol", "@carol",
                                                              "to myself")
        assert n.raw["value"] != "to myself"

    run(main())
