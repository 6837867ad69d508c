"""AtConnection over a fake transport: correlation, prompts, notifications, timeouts, drops."""

from __future__ import annotations

import asyncio

import pytest

from noports.at.connection import AtConnection, AtConnectionError, AtTimeoutError
from noports.errors import AtServerError


class FakeTransport(asyncio.Transport):
    def __init__(self, proto: AtConnection) -> None:
        super().__init__()
        self.proto = proto
        self.written: list[bytes] = []
        self.closing = False
        self.aborted = False

    def write(self, data) -> None:
        self.written.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            asyncio.get_running_loop().call_soon(self.proto.connection_lost, None)

    def abort(self) -> None:
        self.aborted = True
        self.close()


def _conn(**kwargs) -> tuple[AtConnection, FakeTransport]:
    conn = AtConnection(name="fake", **kwargs)
    transport = FakeTransport(conn)
    conn.connection_made(transport)
    return conn, transport


def test_pipelined_requests_match_replies_in_order(run):
    async def main():
        conn, tr = _conn()
        conn.data_received(b"@")                       # greeting
        f1 = conn.send("llookup:a@alice")
        f2 = conn.send("llookup:b@alice")
        f3 = conn.send("llookup:c@alice")
        assert tr.written == []                        # gathered until the loop turns ...
        await asyncio.sleep(0)
        # ... then written as one piece, in order
        assert tr.written == [b"llookup:a@alice\nllookup:b@alice\nllookup:c@alice\n"]
        # replies split and glued to prompts in awkward places
        conn.data_received(b"data:1\n@ali")
        conn.data_received(b"ce@error:AT0015-key not found : b@alice does not exist\n@alice@da")
        conn.data_received(b"ta:3\n@alice@")
        assert await f1 == "1"
        with pytest.raises(AtServerError) as info:
            await f2
        assert info.value.code == "AT0015"
        assert await f3 == "3"
        assert conn.pending == 0

    run(main())


def test_concurrent_callers_each_get_their_reply(run):
    async def main():
        conn, tr = _conn()
        results = {}

        async def caller(i):
            results[i] = await conn.request(f"noop:{i}")

        tasks = [asyncio.ensure_future(caller(i)) for i in range(50)]
        for _ in range(3):                         # tasks start, then the flush runs
            await asyncio.sleep(0)
        lines = b"".join(tr.written).decode().splitlines()
        order = [int(line.split(":")[1]) for line in lines]
        assert sorted(order) == list(range(50))
        conn.data_received(b"".join(f"data:r{i}\n@a@".encode() for i in order))
        await asyncio.gather(*tasks)
        assert results == {i: f"r{i}" for i in range(50)}

    run(main())


def test_notifications_go_to_callback_not_to_requests(run):
    async def main():
        got = []
        conn, _ = _conn(on_notification=got.append)
        fut = conn.send("noop:0")
        conn.data_received(b'@alice@notification: {"id":"n1","key":"k"}\n'
                           b'data:ok\n@alice@notification: {"id":"n2"}\n')
        assert await fut == "ok"
        assert [p["id"] for p in got] == ["n1", "n2"]

    run(main())


def test_drop_fails_pending_and_later_sends(run):
    async def main():
        conn, _ = _conn()
        f1 = conn.send("noop:0")
        conn.connection_lost(ConnectionResetError("reset"))
        with pytest.raises(AtConnectionError):
            await f1
        assert not conn.is_open
        with pytest.raises(AtConnectionError):
            await conn.send("noop:0")
        await asyncio.wait_for(conn.wait_closed(), 1)

    run(main())


def test_timeout_on_silent_peer_closes_connection(run):
    async def main():
        conn, tr = _conn()
        fut = conn.send("noop:0", timeout=0.05)
        with pytest.raises(AtTimeoutError):
            await fut
        await asyncio.wait_for(conn.wait_closed(), 1)
        assert tr.aborted

    run(main())


def test_timeout_on_slow_but_alive_peer_keeps_correlation(run):
    async def main():
        conn, tr = _conn()
        slow = conn.send("noop:5000", timeout=0.05)
        nxt = conn.send("noop:0", timeout=5)
        conn.data_received(b"@")              # the peer is alive (bytes arrive) ...
        with pytest.raises(AtTimeoutError):
            await slow                        # ... but slow: only this request times out
        assert conn.is_open and not tr.aborted
        conn.data_received(b"data:ok\n@")     # the late reply to the slow request
        conn.data_received(b"data:second\n@")
        assert await nxt == "second"

    run(main())


def test_garbage_reply_closes_connection(run):
    async def main():
        conn, tr = _conn()
        f1 = conn.send("noop:0")
        f2 = conn.send("noop:0")
        conn.data_received(b"data:ok\n@bogus reply line\n")
        assert await f1 == "ok"
        with pytest.raises(AtConnectionError):
            await f2
        assert tr.aborted

    run(main())


def test_unsolicited_error_reported(run):
    async def main():
        seen = []
        conn, _ = _conn(on_unsolicited=seen.append)
        conn.send_no_reply("monitor:0 (")
        conn.data_received(b"error:AT0003-Invalid syntax : bad regex\n@alice@")
        assert len(seen) == 1 and seen[0].code == "AT0003"

    run(main())
