"""Row R3 of the reliability checks: SIGKILL during a write burst loses no acknowledged write.

20 runs of (1,000 ``update``s + 1,000 ``notify``s pipelined from one client, SIGKILL of the
atserver at a uniformly random moment of the burst, restart).  After each restart:
every update that got ``data:<commitId>`` reads back unchanged; acknowledged commit ids strictly
increase, also across restarts; every notification id that got ``data:<id>`` is known to
``notify:status`` and is replayed to the recipient's monitor; ``PRAGMA integrity_check`` = ok.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import re
import signal
import ssl
import time
import uuid

import pytest

from noports.at import crypto

RUNS = 20
UPDATES = 1000
NOTIFIES = 1000
CHUNK = 50
WINDOW = 200
_PROMPT = re.compile(r"^(?:@alice@|@bob@|@)+")


class Wire:
    """Minimal pipelining atProtocol client over asyncio streams (test-side only)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int, ctx: ssl.SSLContext) -> Wire:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx,
                                                       server_hostname="127.0.0.1")
        return cls(reader, writer)

    async def line(self, timeout: float = 10.0) -> str:
        raw = await asyncio.wait_for(self.reader.readline(), timeout)
        if not raw.endswith(b"\n"):
            raise ConnectionError("closed")
        return _PROMPT.sub("", raw.decode().rstrip("\r\n"))

    async def request(self, line: str) -> str:
        self.writer.write(line.encode() + b"\n")
        return await self.line()

    async def login(self, keys) -> None:
        challenge = (await self.request(f"from:{keys.atsign}"))[5:]
        reply = await self.request("pkam:" + crypto.pkam_sign(keys.pkam_private, challenge))
        assert reply == "data:success", reply

    async def pipeline(self, lines: list[str]) -> list[str]:
        self.writer.write(("\n".join(lines) + "\n").encode())
        return [await self.line() for _ in lines]

    def close(self) -> None:
        self.writer.close()


def _burst_lines(run: int) -> tuple[list[str], list[tuple[str, str, str]]]:
    """Interleaved updates and notifies; returns the lines and (kind, key-or-id, value)."""
    lines, meta = [], []
    for i in range(max(UPDATES, NOTIFIES)):
        if i < UPDATES:
            value = f"v{run}.{i}.{uuid.uuid4().hex[:8]}"
            lines.append(f"update:public:r3u{run}.{i}@alice {value}")
            meta.append(("update", f"public:r3u{run}.{i}@alice", value))
        if i < NOTIFIES:
            nid = str(uuid.uuid4())
            lines.append(f"notify:id:{nid}:update:@bob:r3n{run}.{i}@alice:payload{i}")
            meta.append(("notify", nid, ""))
    return lines, meta


async def _burst(srv, run: int, kill_after: float | None) -> tuple[list, float]:
    """Send one burst; SIGKILL the server ``kill_after`` s after the first byte (if given).

    Returns the acknowledged commands as (kind, key-or-id, value, reply payload) and the
    seconds from the first byte sent to the last reply read."""
    ctx = srv.ssl_context()
    wire = await Wire.open(srv.ports["@alice"], ctx)
    await wire.login(srv.keys("@alice"))
    lines, meta = _burst_lines(run)
    loop = asyncio.get_running_loop()
    killer = None
    if kill_after is not None:
        killer = loop.call_later(kill_after, os.kill, srv.pid, signal.SIGKILL)
    started = loop.time()
    acked: list = []
    progress = asyncio.Event()

    async def writer() -> None:
        # Windowed pipelining: keep up to WINDOW commands in flight, written CHUNK at a time,
        # so acknowledgements (and so the kill) spread over the whole burst.
        for start in range(0, len(lines), CHUNK):
            while start - len(acked) > WINDOW:
                progress.clear()
                await progress.wait()
            wire.writer.write(("\n".join(lines[start:start + CHUNK]) + "\n").encode())
            await wire.writer.drain()

    sender = asyncio.ensure_future(writer())
    try:
        for m in meta:
            reply = await wire.line(timeout=30)
            assert reply.startswith("data:"), reply
            acked.append((*m, reply[5:]))
            progress.set()
    except (ConnectionError, OSError, asyncio.IncompleteReadError, ssl.SSLError):
        assert kill_after is not None, "connection lost without a kill"
    finally:
        sender.cancel()
        try:
            await sender
        except (asyncio.CancelledError, ConnectionError, OSError, ssl.SSLError):
            pass
        wire.close()
    elapsed = loop.time() - started
    if killer is not None:
        # If the burst finished before the kill moment, the kill still comes (then restart).
        deadline = loop.time() + kill_after + 15
        while srv.alive() and loop.time() < deadline:
            await asyncio.sleep(0.01)
    return acked, elapsed


async def _verify(srv, run_no: int, acked_all: list, last_commit: int, run_acked: list) -> int:
    ctx = srv.ssl_context()
    alice = await Wire.open(srv.ports["@alice"], ctx)
    await alice.login(srv.keys("@alice"))
    updates = [a for a in acked_all if a[0] == "update"]
    notifies = [a for a in run_acked if a[0] == "notify"]
    # 1. Every acknowledged update reads back unchanged (all runs so far).
    got = await alice.pipeline([f"llookup:{key}" for _, key, _, _ in updates])
    for (_, key, value, _), reply in zip(updates, got, strict=True):
        assert reply == f"data:{value}", (key, value, reply)
    # 2. Commit ids of this run's acknowledged updates strictly increase, above every earlier.
    ids = [int(r) for kind, _, _, r in run_acked if kind == "update"]
    assert all(a < b for a, b in itertools.pairwise(ids)), "commit ids not increasing"
    if ids:
        assert ids[0] > last_commit, (ids[0], last_commit)
        last_commit = ids[-1]
    # 3. Acknowledged notifications are known and delivered.
    statuses = await alice.pipeline([f"notify:status:{nid}" for _, nid, _, _ in notifies])
    assert all(s == "data:delivered" for s in statuses), set(statuses)
    alice.close()
    if notifies:
        bob = await Wire.open(srv.ports["@bob"], ctx)
        await bob.login(srv.keys("@bob"))
        want = {nid for _, nid, _, _ in notifies}
        key_prefix = re.escape(f"@bob:r3n{run_no}.")
        bob.writer.write(f"monitor:0 ^{key_prefix}\n".encode())
        deadline = time.monotonic() + 30
        while want and time.monotonic() < deadline:
            line = await bob.line(timeout=30)
            if line.startswith("notification: "):
                nid = line.split('"id":"', 1)[1].split('"', 1)[0]
                want.discard(nid)
        assert not want, f"{len(want)} acknowledged notifications not replayed"
        bob.close()
    return last_commit


@pytest.mark.slow
@pytest.mark.fault
def test_r3_sigkill_loses_no_acknowledged_write(atserver, run):
    srv = atserver("@alice", "@bob")
    rng = random.Random(int(os.environ.get("NOPORTS_R3_SEED", str(int(time.time())))))
    # Calibration burst (no kill): how long a burst takes, so kills land inside one.
    calib, duration = run(_burst(srv, -1, None))
    assert len(calib) == UPDATES + NOTIFIES
    acked_all = list(calib)
    last_commit = max(int(r) for kind, _, _, r in calib if kind == "update")
    partial = 0
    for r in range(RUNS):
        kill_after = rng.uniform(0, duration)
        acked, _ = run(_burst(srv, r, kill_after), timeout=120)
        srv.proc.wait(15)
        assert srv.proc.returncode == -signal.SIGKILL
        assert srv.db_integrity() == "ok"
        if 0 < len(acked) < UPDATES + NOTIFIES:
            partial += 1
        print(f"run {r}: kill at {kill_after * 1000:.0f} ms of {duration * 1000:.0f}, "
              f"{len(acked)} acknowledged")
        srv.restart()
        acked_all += acked
        last_commit = run(_verify(srv, r, acked_all, last_commit, acked), timeout=120)
    # Most kills must land mid-burst, or the test proves little.
    assert partial >= RUNS // 3, f"only {partial} of {RUNS} kills interrupted a burst"
    # After all that, a new write still gets a larger commit id.
    conn = srv.login("@alice")
    try:
        assert int(conn.request("update:public:after@alice x")[5:]) > last_commit
    finally:
        conn.close()
