"""The AtClient monitor against real atserver processes: restarts, replay, dedupe, heartbeat."""

from __future__ import annotations

import asyncio
import os
import signal

from noports.at.atkeys import AtKeys
from noports.at.client import AtClient
from noports.errors import AtServerError


def client_for(proc, atsign: str, **kw) -> AtClient:
    return AtClient(atsign, proc.keys(atsign), root=f"127.0.0.1:{proc.root_port}",
                    ca_file=str(proc.ca_file), **kw)


async def _collect(mon, n: int, timeout: float = 20.0) -> list:
    got = []
    for _ in range(n):
        got.append(await mon.get(timeout))
    return got


def test_monitor_survives_server_restart_exactly_once(atserver, run, event_loop_kind):
    """N notifications before a restart, N after (sent while the monitor is still backing
    off, so they arrive by replay): exactly 2N delivered, each once, all decrypted."""
    proc = atserver("@alice", "@bob")
    n = 15

    async def main():
        loop = asyncio.get_running_loop()
        async with client_for(proc, "@alice") as alice, client_for(proc, "@bob") as bob:
            # a long overlap makes the reconnect replay the first batch too: the
            # de-duplication, not luck, is what keeps it exactly-once
            mon = bob.monitor(r"\.restart\.test@alice", replay_overlap_ms=600_000,
                              backoff_base=1.0, backoff_cap=1.0)
            await mon.start()
            sent = [await alice.notify(f"@bob:b{i}.restart.test", f"before {i}", ttln=600_000)
                    for i in range(n)]
            first = await _collect(mon, n)
            await loop.run_in_executor(None, proc.restart)
            sent += [await alice.notify(f"@bob:a{i}.restart.test", f"after {i}", ttln=600_000)
                     for i in range(n)]
            second = await _collect(mon, n)
            # anything extra would already be queued behind the 2N: a short wait suffices
            extra = []
            try:
                extra.append(await mon.get(1.0))
            except asyncio.TimeoutError:
                pass
            stats = (mon.drops, mon.duplicates)
        got = first + second
        assert extra == []
        assert [x.id for x in got] == sent
        assert [x.value for x in got] == [f"before {i}" for i in range(n)] + \
            [f"after {i}" for i in range(n)]
        drops, duplicates = stats
        assert drops >= 1
        assert duplicates >= n          # the first batch was replayed and dropped

    run(main())


def test_monitor_regex_and_stats_filter(atserver, run):
    proc = atserver("@alice", "@bob", args=("--stats-interval", "0.2"))

    async def main():
        regex = r":wanted\.rx@"          # the server searches: "unwanted" must not match
        async with client_for(proc, "@alice") as alice, client_for(proc, "@bob") as bob, \
                bob.monitor(regex) as plain, bob.monitor(regex, include_stats=True) as with_stats:
            await alice.notify("@bob:unwanted.rx", "no")
            await alice.notify("@bob:wanted.rx", "yes")
            got = await plain.get(10)
            assert got.value == "yes" and not got.is_stats
            seen_stats = False
            for _ in range(20):
                x = await with_stats.get(10)
                if x.is_stats:
                    seen_stats = True
                    break
                assert x.value == "yes"
            assert seen_stats
            # several stats intervals later the plain monitor still has only real ones
            await alice.notify("@bob:wanted.rx", "again")
            assert (await plain.get(10)).value == "again"

    run(main())


def test_monitor_since_zero_replays_history(atserver, run):
    proc = atserver("@alice", "@bob")

    async def main():
        async with client_for(proc, "@alice") as alice, client_for(proc, "@bob") as bob:
            ids = [await alice.notify(f"@bob:h{i}.hist", f"old {i}", ttln=600_000)
                   for i in range(3)]
            async with bob.monitor(r"\.hist@", since=0) as mon:
                got = await _collect(mon, 3)
            assert [g.id for g in got] == ids
            async with bob.monitor(r"\.hist@") as fresh:   # default: from now, no history
                nid = await alice.notify("@bob:new.hist", "new")
                assert (await fresh.get(10)).id == nid

    run(main())


def test_monitor_heartbeat_detects_frozen_server(atserver, run):
    """A server that stops answering (SIGSTOP) is detected by the noop heartbeat; the
    monitor reconnects once it runs again and nothing sent meanwhile is lost."""
    proc = atserver("@alice", "@bob")

    async def main():
        async with client_for(proc, "@alice") as alice, \
                client_for(proc, "@bob", connect_timeout=1.0) as bob:
            mon = bob.monitor(r"\.hb@", heartbeat_interval=0.2, heartbeat_timeout=0.5,
                              backoff_base=0.1, backoff_cap=0.3)
            await mon.start()
            os.kill(proc.pid, signal.SIGSTOP)
            try:
                deadline = asyncio.get_running_loop().time() + 10
                while mon.ready and asyncio.get_running_loop().time() < deadline:
                    await asyncio.sleep(0.05)          # polling a condition, bounded
                assert not mon.ready, "heartbeat did not notice the frozen server"
            finally:
                os.kill(proc.pid, signal.SIGCONT)
            nid = await alice.notify("@bob:after.hb", "still here")
            got = await mon.get(20)
            assert got.id == nid and got.value == "still here"
            assert mon.drops >= 1          # it did go through a reconnect
            await mon.close()

    run(main())


def test_monitor_callback_form(shared_atserver, run):
    async def main():
        async with client_for(shared_atserver, "@alice") as alice, \
                client_for(shared_atserver, "@carol") as carol:
            mon = await carol.monitor(r"\.cb@alice").start()
            received: list = []
            done = asyncio.Event()

            async def on_notification(n):
                received.append(n.value)
                if len(received) == 3:
                    done.set()

            task = asyncio.ensure_future(mon.run(on_notification))
            for i in range(3):
                await alice.notify(f"@carol:x{i}.cb", f"cb {i}")
            await asyncio.wait_for(done.wait(), 10)
            await mon.close()
            await asyncio.wait_for(task, 5)        # run() ends when the monitor closes
            assert received == ["cb 0", "cb 1", "cb 2"]

    run(main())


def test_monitor_refused_regex_raises(shared_atserver, run):
    async def main():
        async with client_for(shared_atserver, "@bob") as bob:
            mon = bob.monitor("(unclosed")
            try:
                await mon.start(timeout=10)
            except AtServerError as exc:
                assert exc.code == "AT0003"
            else:
                raise AssertionError("a bad regex was accepted")
            # the main connection is unaffected
            assert await bob.execute("noop:0") == "ok"

    run(main())


def test_monitor_refused_login_raises_quickly(shared_atserver, run):
    async def main():
        stranger = AtClient("@bob", AtKeys.generate("@bob"),
                            root=f"127.0.0.1:{shared_atserver.root_port}",
                            ca_file=str(shared_atserver.ca_file))
        mon = stranger.monitor(".*")
        t0 = asyncio.get_running_loop().time()
        try:
            await mon.start(timeout=20)
        except AtServerError as exc:
            assert exc.code == "AT0401"
        else:
            raise AssertionError("monitor logged in with unregistered keys")
        assert asyncio.get_running_loop().time() - t0 < 10    # not retried until the timeout
        await stranger.close()

    run(main())
