"""The shared pieces npd and srvd use: :mod:`noports.runner` (the process main's event loop) and
:class:`noports.at.pubkeys.PublicKeys` (parsed public keys by their text, bounded)."""

from __future__ import annotations

import asyncio

import pytest

from noports.at.crypto import generate_rsa_private_key, public_key_to_b64
from noports.at.pubkeys import PublicKeys
from noports.errors import AtServerError
from noports.runner import new_event_loop, run


@pytest.mark.parametrize("no_uvloop", [False, True])
def test_run_returns_the_exit_code_and_closes_the_loop(no_uvloop):
    seen = {}

    async def main() -> int:
        seen["loop"] = asyncio.get_running_loop()
        return 3

    assert run(main(), no_uvloop=no_uvloop) == 3
    assert seen["loop"].is_closed()
    assert ("uvloop" in type(seen["loop"]).__module__) is not no_uvloop


def test_run_closes_the_loop_when_main_raises():
    seen = {}

    async def main() -> int:
        seen["loop"] = asyncio.get_running_loop()
        raise KeyError("boom")

    with pytest.raises(KeyError):
        run(main())
    assert seen["loop"].is_closed()


def test_new_event_loop_stock_when_asked():
    loop = new_event_loop(no_uvloop=True)
    try:
        assert type(loop).__module__.startswith("asyncio")
    finally:
        loop.close()


class _Client:
    """Stands in for AtClient.plookup only: the text it returns is all that is under test."""

    def __init__(self, texts: dict[str, str]) -> None:
        self.texts = texts
        self.asked: list[str] = []

    async def plookup(self, key: str) -> str:
        self.asked.append(key)
        return self.texts.get(key, "")


def test_parse_caches_by_text_and_keeps_at_most_size():
    texts = [public_key_to_b64(generate_rsa_private_key()) for _ in range(3)]
    keys = PublicKeys(2)
    first = keys.parse(texts[0])
    assert keys.parse(texts[0]) is first
    keys.parse(texts[1])
    keys.parse(texts[2])
    assert len(keys) == 2
    assert keys.parse(texts[0]) is not first        # the oldest went out first
    with pytest.raises(ValueError):
        keys.parse("bm90IGEga2V5")


def test_lookup_asks_every_time_and_refuses_an_atsign_without_a_key():
    text = public_key_to_b64(generate_rsa_private_key())
    client = _Client({"publickey@alice": text})
    keys = PublicKeys(4)

    async def main():
        a = await keys.lookup(client, "@alice", 1.0)
        b = await keys.lookup(client, "@alice", 1.0)
        assert a is b
        with pytest.raises(AtServerError) as info:
            await keys.lookup(client, "@bob", 1.0)
        assert info.value.code == "AT0015"

    asyncio.run(main())
    assert client.asked == ["publickey@alice", "publickey@alice", "publickey@bob"]
