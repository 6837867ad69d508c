"""AtConnection request timeouts with one timer per connection (not one per request).

The connection arms a single timer for the earliest deadline in flight; these tests check that
it still times out exactly the requests past their own deadline, earliest first, whatever order
they were sent in, and never one that was answered.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from noports.at.connection import AtConnection, AtTimeoutError
from tests.unit.test_client_connection import FakeTransport


def _conn() -> tuple[AtConnection, FakeTransport]:
    conn = AtConnection(name="fake")
    transport = FakeTransport(conn)
    conn.connection_made(transport)
    return conn, transport


def test_each_request_times_out_at_its_own_deadline(run):
    async def main():
        conn, tr = _conn()
        order: list[str] = []
        t0 = time.monotonic()
        slow = conn.send("noop:1", timeout=0.4)           # armed first ...
        fast = conn.send("noop:2", timeout=0.05)          # ... an earlier deadline re-arms
        never = conn.send("noop:3", timeout=30)
        for name, fut in (("slow", slow), ("fast", fast)):
            fut.add_done_callback(lambda f, n=name: order.append(n))
        conn.data_received(b"@")                          # the peer is alive
        with pytest.raises(AtTimeoutError):
            await asyncio.wait_for(fast, 5)
        assert time.monotonic() - t0 < 0.35 and not slow.done()
        with pytest.raises(AtTimeoutError):
            await asyncio.wait_for(slow, 5)
        assert time.monotonic() - t0 >= 0.39
        assert order == ["fast", "slow"]
        assert conn.is_open and not tr.aborted and not never.done()
        # the late replies are dropped in order; the third request gets its own
        conn.data_received(b"data:1\n@data:2\n@data:3\n@")
        assert await asyncio.wait_for(never, 1) == "3"
        assert conn.pending == 0

    run(main())


def test_answered_requests_never_time_out(run):
    async def main():
        conn, _tr = _conn()
        answered = [conn.send(f"noop:{i}", timeout=0.05) for i in range(3)]
        conn.data_received(b"data:a\n@data:b\n@data:c\n@")
        assert [await f for f in answered] == ["a", "b", "c"]
        late = conn.send("noop:9", timeout=0.1)           # the timer outlives the answered ones
        with pytest.raises(AtTimeoutError):
            await asyncio.wait_for(late, 5)
        assert [f.result() for f in answered] == ["a", "b", "c"]

    run(main())


def test_no_timeout_means_no_timer(run):
    async def main():
        conn, _tr = _conn()
        fut = conn.send("noop:0", timeout=None)
        assert conn._watchdog is None
        conn.data_received(b"data:ok\n@")
        assert await asyncio.wait_for(fut, 1) == "ok"

    run(main())
