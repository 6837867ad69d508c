"""srvd --workers, the parts that need no process or socket: the IPC framing, the request's
trip through it, worker choice and the summed/per-worker metrics of :class:`WorkerPool`."""

from __future__ import annotations

import asyncio
import os
import struct
from types import SimpleNamespace

import pytest

from noports.relay.messages import parse_request_ports
from noports.relay.stats import RelayStats
from noports.relay.worker import (
    MAX_MESSAGE,
    frame,
    read_message,
    request_from_dict,
    request_to_dict,
    snapshot,
)
from noports.relay.workers import WorkerPool, cpu_workers


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value}."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def _reader(data: bytes, eof: bool = True) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    if eof:
        reader.feed_eof()
    return reader


def test_frames_round_trip_and_eof_is_none():
    async def main():
        messages = [{"t": "open", "sid": "x", "n": 1}, {"t": "stats", "stats": {"a": [1, 2]}}]
        reader = _reader(b"".join(frame(m) for m in messages))
        got = [await read_message(reader) for _ in messages]
        assert got == messages
        assert await read_message(reader) is None
        # a frame cut short by the peer's death is EOF, not garbage
        assert await read_message(_reader(frame(messages[0])[:-3])) is None

    asyncio.run(main())


def test_oversized_or_untyped_frames_are_refused():
    async def main():
        with pytest.raises(ValueError):
            await read_message(_reader(struct.pack(">I", MAX_MESSAGE + 1), eof=False))
        payload = b'{"no":"type"}'
        with pytest.raises(ValueError):
            await read_message(_reader(struct.pack(">I", len(payload)) + payload))

    asyncio.run(main())


def test_a_request_survives_the_trip_to_a_worker():
    request = parse_request_ports(
        '{"sessionId":"4c1a2d0e-5b0e-4a8e-9d62-5f5d7a1b0c33","atSignA":"@a","atSignB":"@b",'
        '"authenticateSocketA":true,"authenticateSocketB":false,"clientNonce":"n",'
        '"preFetch":["x","y"],"sendJsonResponse":true}')
    import msgspec
    wire = msgspec.json.decode(msgspec.json.encode(request_to_dict(request)))
    assert request_from_dict(wire) == request


def test_snapshot_counts_live_bytes():
    stats = RelayStats()
    stats.bytes_relayed = 10
    stats.live_bytes = lambda: 5
    stats.refuse("timeout")
    snap = snapshot(stats)
    assert snap["bytes_relayed"] == 15 and snap["refusals"] == {"timeout": 1}


def test_workers_0_is_one_per_core():
    assert cpu_workers(0) == max(1, os.cpu_count() or 1)
    assert cpu_workers(3) == 3


def test_choice_is_least_loaded_then_round_robin():
    async def main():
        pool = WorkerPool(3)
        loop = asyncio.get_running_loop()
        workers = []
        for i, load in enumerate((2, 1, 1)):
            ready = loop.create_future()
            ready.set_result(True)
            workers.append(SimpleNamespace(index=i, sessions=dict.fromkeys(range(load)),
                                           alive=True, ready=ready, stats={}))
        pool._workers = workers
        # 1 and 2 tie on load: round robin between them, never the busier 0
        first = pool._choose()
        second = pool._choose()
        assert {first.index, second.index} == {1, 2}
        workers[1].sessions[99] = None
        workers[2].sessions[99] = None    # now all hold 2: every worker gets its turn
        assert {pool._choose().index for _ in range(3)} == {0, 1, 2}
        workers[0].alive = False
        assert all(pool._choose().index != 0 for _ in range(4))

    asyncio.run(main())


def test_metrics_are_summed_per_worker_and_survive_a_dead_worker():
    async def main():
        pool = WorkerPool(2)
        pool.stats.refuse("quota")                 # a control-plane refusal in the main process
        loop = asyncio.get_running_loop()
        workers = []
        for i, (opened, nbytes) in enumerate(((3, 100), (5, 200))):
            ready = loop.create_future()
            ready.set_result(True)
            workers.append(SimpleNamespace(
                index=i, sessions={}, alive=True, ready=ready,
                stats={"sessions_open": 1, "sessions_total": opened, "pairs_total": opened,
                       "bytes_relayed": nbytes, "auth_failures": i, "unauth_sockets": 0,
                       "refusals": {"timeout": i + 1}}))
        pool._workers = workers
        m = parse_metrics(pool.render())
        assert m["noports_relay_sessions_total"] == 8
        assert m["noports_relay_sessions_open"] == 2
        assert m["noports_relay_bytes_relayed_total"] == 300
        assert m['noports_relay_refusals_total{reason="timeout"}'] == 3
        assert m['noports_relay_refusals_total{reason="quota"}'] == 1
        assert m['noports_relay_worker_sessions_total{worker="1"}'] == 5
        assert m['noports_relay_worker_refusals_total{worker="0",reason="timeout"}'] == 1
        assert m["noports_relay_workers"] == 2
        # worker 1 dies and is replaced: its counters stay, its gauges go
        for name in ("sessions_total", "pairs_total", "bytes_relayed", "auth_failures"):
            pool._retired[1][name] += workers[1].stats[name]
        pool._refusals_retired[1].update(workers[1].stats["refusals"])
        workers[1].stats = {}
        workers[1].alive = False
        m = parse_metrics(pool.render())
        assert m["noports_relay_sessions_total"] == 8
        assert m["noports_relay_sessions_open"] == 1
        assert m['noports_relay_worker_bytes_relayed_total{worker="1"}'] == 200
        assert m["noports_relay_workers"] == 1

    asyncio.run(main())
