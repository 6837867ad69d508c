"""``srvd --workers N``: sessions in worker processes, the control plane in the main process.

A real atserver hosts every atSign; srvd runs as a process with ``--workers 2``; test clients ask
for sessions exactly as Atsign's npt does and play side A and side B with real keys.  Covers
issue 5's "how it is shown": the relay functional tests pass with ``--workers 2`` on both pumps
(the compiled one, and the pure twin forced by ``NOPORTS_NO_EXTENSIONS=1`` in srvd's
environment); a worker killed with SIGKILL mid-session loses only its own sessions while the
relay keeps accepting (the worker is restarted); SIGTERM drains every worker.  Several tests of
``test_srvd.py`` are run again here against a two-worker srvd.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time

import psutil
import pytest

from noports.relay.messages import parse_reply
from tests.functional import test_srvd as single
from tests.functional.conftest import AtServerProcess
from tests.functional.relay_helpers import port_is_free, read_until_closed, receive_all
from tests.functional.srvd_helpers import RelayUser, open_pair, play_pair, wait_until
from tests.functional.srvd_workers_helpers import (
    WorkersSrvd,
    drain_socket,
    owner_of_port,
    paced_send,
)

MiB = 1 << 20
NBYTES = 12 * MiB
PUMPS = {"compiled": {}, "pure": {"NOPORTS_NO_EXTENSIONS": "1"}}


@pytest.fixture(scope="module")
def hosted(tmp_path_factory):
    proc = AtServerProcess(tmp_path_factory.mktemp("srvd-workers-atserver"), single.ATSIGNS,
                           keys=True).start()
    yield proc
    proc.stop()


@pytest.fixture
def srvd_workers(hosted, tmp_path):
    """``srvd_workers(*flags, workers=2, pump="compiled")``: a ready multi-worker srvd."""
    started: list[WorkersSrvd] = []

    def factory(*args: str, workers: int = 2, pump: str = "compiled",
                metrics: bool = True) -> WorkersSrvd:
        proc = WorkersSrvd(hosted, tmp_path, "--workers", str(workers), *args, env=PUMPS[pump],
                           metrics=metrics)
        started.append(proc)
        return proc.ready()

    yield factory
    for proc in started:
        pids = proc.worker_pids() if proc.proc.poll() is None else []
        proc.stop()
        for pid in pids:      # a worker never outlives srvd
            with pytest.raises(psutil.NoSuchProcess):
                psutil.Process(pid).wait(5)


@pytest.fixture
def srvd(srvd_workers):
    """test_srvd.py's ``srvd`` fixture, but every relay has two workers."""
    return srvd_workers


def _impl_line(pump: str) -> str:
    return "relaypump=pure" if pump == "pure" else "relaypump=compiled"


# --- the happy path on both pumps -------------------------------------------------------------

@pytest.mark.parametrize("pump", ["compiled", "pure"])
def test_sessions_spread_over_both_workers(hosted, srvd_workers, run, pump):
    """Four concurrent sessions on ``--workers 2`` land two on each worker (the least loaded,
    round robin on ties), each carries 4 MiB each way intact, and the metrics count them per
    worker and summed; each worker runs the pump asked for."""
    relay = srvd_workers("--pairing-timeout", "5", pump=pump)
    assert ", 2 workers, metrics on" in relay.wait_line(r"srvd @relay ready")
    ready_pid = {}
    for i in (0, 1):
        line = relay.wait_line(rf"worker {i} ready: pid \d+")
        assert _impl_line(pump) in line
        ready_pid[i] = int(re.search(rf"worker {i} ready: pid (\d+)", line).group(1))
    workers = relay.worker_pids()
    assert len(workers) == 2 and relay.proc.pid not in workers

    async def main():
        async with RelayUser(hosted, "@client") as user:
            bodies = [user.body() for _ in range(4)]
            sids = await asyncio.gather(*(user.request(b) for b in bodies))
            replies = [await user.parsed_reply(sid) for sid in sids]
            owners = [owner_of_port(workers, r.port_a) for r in replies]
            assert [owner_of_port(workers, r.port_b) for r in replies] == owners
            await asyncio.gather(*(play_pair(r, b, hosted.keys("@client"),
                                             hosted.keys("@daemon"), 4 * MiB, seed=i)
                                   for i, (r, b) in enumerate(zip(replies, bodies, strict=True))))
            return sids, owners

    sids, owners = run(main(), timeout=90)
    assert sorted(owners.count(pid) for pid in workers) == [2, 2], owners
    for sid, owner in zip(sids, owners, strict=True):
        line = relay.wait_line(rf"relay session {sid} ended", timeout=10)
        assert f"bytes A->B {4 * MiB} B->A {4 * MiB}" in line
        # logged by the worker that ran it, in srvd's format, naming its index and pid
        who = re.search(r" INFO +srvd/w(\d)\[(\d+)\] noports\.relay: relay session ", line)
        assert who is not None, line
        assert ready_pid[int(who.group(1))] == int(who.group(2)) == owner, line
    run(wait_until(lambda: relay.metrics()["noports_relay_sessions_open"] == 0, timeout=5,
                   what="sessions closed"))
    metrics = relay.metrics()
    assert metrics["noports_relay_sessions_total"] == 4
    assert metrics["noports_relay_pairs_total"] == 4
    assert metrics["noports_relay_bytes_relayed_total"] == 4 * 2 * 4 * MiB
    assert metrics["noports_relay_workers"] == 2
    for i in (0, 1):
        assert metrics[f'noports_relay_worker_sessions_total{{worker="{i}"}}'] == 2
        assert metrics[f'noports_relay_worker_bytes_relayed_total{{worker="{i}"}}'] \
            == 2 * 2 * 4 * MiB
    assert relay.session_ports() == set()


# --- test_srvd.py again, with two workers ------------------------------------------------------

@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_csv_reply_then_20_mib_both_ways(hosted, srvd, run, loop):
    single.test_csv_reply_then_20_mib_both_ways(hosted, srvd, run, loop)


def test_json_reply_when_the_request_asks(hosted, srvd, run):
    single.test_json_reply_when_the_request_asks(hosted, srvd, run)


def test_allow_unauthenticated_serves_legacy_requests(hosted, srvd, run):
    single.test_allow_unauthenticated_serves_legacy_requests(hosted, srvd, run)


@pytest.mark.security
def test_s3_non_managers_and_unauthenticated_requests_get_nothing(hosted, srvd, run):
    single.test_s3_non_managers_and_unauthenticated_requests_get_nothing(hosted, srvd, run)


@pytest.mark.storm
def test_r2_request_flood_cannot_exhaust_ports(hosted, srvd, run, record_property):
    single.test_r2_request_flood_cannot_exhaust_ports(hosted, srvd, run, record_property)


@pytest.mark.drain
def test_r6_second_sigterm_exits_at_once(hosted, srvd, run, record_property):
    single.test_r6_second_sigterm_exits_at_once(hosted, srvd, run, record_property)


def test_metrics_endpoint_counts_sessions_bytes_failures_and_refusals(hosted, srvd, run):
    single.test_metrics_endpoint_counts_sessions_bytes_failures_and_refusals(hosted, srvd, run)


# --- a worker that dies -----------------------------------------------------------------------

@pytest.mark.fault
@pytest.mark.parametrize("pump", ["compiled", "pure"])
def test_sigkilled_worker_loses_only_its_own_sessions(hosted, srvd_workers, run,
                                                      record_property, pump):
    """Two sessions, one per worker, both moving 12 MiB each way over ~2 s.  SIGKILL the
    worker of the first mid-transfer: its sockets end (EOF or reset) short of the full
    transfer, while the other worker's transfer completes intact (sha256).  The dead worker is
    restarted (new pid), the lost session is counted and logged, and new sessions still open
    and carry data, one of them on the restarted worker."""
    relay = srvd_workers("--pairing-timeout", "5", pump=pump)
    workers = relay.worker_pids()

    async def main():
        async with RelayUser(hosted, "@client") as user:
            bodies = [user.body(), user.body()]
            sids = [await user.request(b) for b in bodies]
            replies = [await user.parsed_reply(s) for s in sids]
            owners = [owner_of_port(workers, r.port_a) for r in replies]
            assert sorted(owners) == sorted(workers)          # one session per worker
            (a1, b1), (a2, b2) = [await open_pair(r, b, hosted.keys("@client"),
                                                  hosted.keys("@daemon"))
                                  for r, b in zip(replies, bodies, strict=True)]
            victim = owners[0]
            survivor = asyncio.gather(paced_send(a2, NBYTES, 1, 48, 0.04),
                                      paced_send(b2, NBYTES, 2, 48, 0.04),
                                      receive_all(b2), receive_all(a2))
            doomed_send = asyncio.gather(paced_send(a1, NBYTES, 3, 48, 0.04),
                                         paced_send(b1, NBYTES, 4, 48, 0.04),
                                         return_exceptions=True)
            doomed_recv = asyncio.gather(drain_socket(b1), drain_socket(a1))
            await asyncio.sleep(0.5)        # the transfers are live: ~1.5 s of them remain
            os.kill(victim, signal.SIGKILL)
            killed_at = time.monotonic()
            (got_b1, how_b1), (got_a1, how_a1) = await asyncio.wait_for(doomed_recv, 10)
            ended_after = time.monotonic() - killed_at
            await doomed_send
            sent_a, sent_b, got_b2, got_a2 = await asyncio.wait_for(survivor, 30)
            assert got_b2 == (NBYTES, sent_a) and got_a2 == (NBYTES, sent_b)
            assert got_b1 < NBYTES and got_a1 < NBYTES
            for s in (a1, b1, a2, b2):
                s.close()
            await asyncio.get_running_loop().run_in_executor(   # the restart
                None, lambda: relay.wait_line(r"worker \d ready: pid \d+", 30, nth=3))
            new_workers = relay.worker_pids()
            assert len(new_workers) == 2 and victim not in new_workers
            restarted = next(p for p in new_workers if p not in workers)
            # new sessions: the restarted worker (now the least loaded) takes one of them
            more = [user.body(), user.body()]
            more_sids = [await user.request(b) for b in more]
            more_replies = [await user.parsed_reply(s) for s in more_sids]
            await asyncio.gather(*(play_pair(r, b, hosted.keys("@client"),
                                             hosted.keys("@daemon"), MiB, seed=9 + i)
                                   for i, (r, b) in enumerate(zip(more_replies, more,
                                                                  strict=True))))
            more_owners = {owner_of_port(new_workers, r.port_a) for r in more_replies}
            assert restarted in more_owners
            return sids, victim, ended_after, (how_a1, how_b1)

    sids, victim, ended_after, hows = run(main(), timeout=120)
    record_property("doomed_sockets_ended_after_s", ended_after)
    record_property("doomed_sockets_ended_how", hows)
    assert ended_after <= 2.0
    line = relay.wait_line(r"killed by SIGKILL: 1 session\(s\) lost", timeout=5)
    assert f"pid {victim}" in line and sids[0] in line and sids[1] not in line
    metrics = relay.metrics()
    assert metrics["noports_relay_sessions_lost_total"] == 1
    assert metrics["noports_relay_worker_restarts_total"] == 1
    assert metrics["noports_relay_workers"] == 2
    survivor = relay.wait_line(rf"relay session {sids[1]} ended", timeout=10)
    assert f"bytes A->B {NBYTES} B->A {NBYTES}" in survivor
    assert relay.count(rf"relay session {sids[0]}") == 0   # died with its worker, no summary


# --- drain and lifetime -----------------------------------------------------------------------

@pytest.mark.drain
def test_sigterm_drains_every_worker(hosted, srvd_workers, run, record_property):
    """R6 with two workers, --drain-grace 3: after SIGTERM no new session gets ports; four
    transfers of ~1 s (two per worker) complete intact; an idle pair is closed at the grace
    limit; srvd exits 0 within grace + 1 s, its workers are gone and every port is free."""
    grace = 3.0
    relay = srvd_workers("--drain-grace", str(grace))
    workers = relay.worker_pids()

    async def main():
        async with RelayUser(hosted, "@client") as user:
            bodies = [user.body() for _ in range(5)]
            replies = []
            for body in bodies:
                replies.append(await user.parsed_reply(await user.request(body)))
            owners = [owner_of_port(workers, r.port_a) for r in replies]
            assert {owners.count(p) for p in workers} <= {2, 3}
            pairs = [await open_pair(r, b, hosted.keys("@client"), hosted.keys("@daemon"))
                     for r, b in zip(replies, bodies, strict=True)]
            await wait_until(lambda: relay.metrics()["noports_relay_pairs_total"] == 5,
                             what="5 pairs")
            t0 = time.monotonic()
            relay.signal(signal.SIGTERM)
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, relay.wait_line, r"SIGTERM: draining", 5)
            late_sid = await user.request(user.body())
            await loop.run_in_executor(None, relay.wait_line,
                                       r"request refused \(draining\)", 5)

            async def transfer(i, a, b):
                sent_ab, sent_ba, got_b, got_a = await asyncio.gather(
                    paced_send(a, 4 * MiB, 10 + i, 16, 0.06),
                    paced_send(b, 4 * MiB, 20 + i, 16, 0.06), receive_all(b), receive_all(a))
                assert got_b == (4 * MiB, sent_ab) and got_a == (4 * MiB, sent_ba)
                return time.monotonic() - t0

            async def idle(a, b):
                data_a, _ = await read_until_closed(a)
                data_b, _ = await read_until_closed(b)
                assert data_a == b"" and data_b == b""
                return time.monotonic() - t0

            results = await asyncio.gather(*(transfer(i, *pairs[i]) for i in range(4)),
                                           idle(*pairs[4]))
            for a, b in pairs:
                a.close()
                b.close()
            rc = await loop.run_in_executor(None, relay.wait, grace + 2)
            return rc, time.monotonic() - t0, results, late_sid, user.replies, replies

    rc, exited, results, late_sid, got, replies = run(main(), timeout=60)
    record_property("exit_after_sigterm_s", exited)
    assert rc == 0 and exited <= grace + 1.0, exited
    assert all(t < grace for t in results[:4]), results
    assert grace - 0.3 <= results[4] <= grace + 1.0, results
    assert late_sid not in got
    assert relay.count(r"relay session .* drained") == 5
    for pid in workers:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"
    for reply in replies:
        assert port_is_free(reply.port_a) and port_is_free(reply.port_b)


def test_workers_do_not_outlive_a_killed_main_process(hosted, srvd_workers, run):
    """SIGKILL on srvd's main process (no drain possible): its workers die with it
    (PR_SET_PDEATHSIG) and a session they served is closed."""
    relay = srvd_workers()
    workers = relay.worker_pids()

    async def main():
        async with RelayUser(hosted, "@client") as user:
            body = user.body()
            reply = parse_reply((await user.reply(await user.request(body))).value)
            a, b = await open_pair(reply, body, hosted.keys("@client"), hosted.keys("@daemon"))
            relay.signal(signal.SIGKILL)
            got = await asyncio.wait_for(asyncio.gather(drain_socket(a), drain_socket(b)), 5)
            a.close()
            b.close()
            return got

    got = run(main(), timeout=30)
    assert all(n == 0 for n, _how in got)
    _gone, alive = psutil.wait_procs([psutil.Process(p) for p in workers
                                     if psutil.pid_exists(p)], timeout=5)
    assert not alive, alive


def test_workers_0_means_one_per_core(hosted, srvd_workers):
    """``--workers 0`` starts one worker per core (``os.cpu_count()``); on a one-core machine
    that is the single-process relay."""
    cores = os.cpu_count() or 1
    relay = srvd_workers(workers=0)
    line = relay.wait_line(r"srvd @relay ready")
    if cores > 1:
        assert re.search(rf", {cores} workers, metrics on", line), line
        assert len(relay.worker_pids()) == cores
    else:
        assert "workers" not in line and relay.worker_pids() == []
