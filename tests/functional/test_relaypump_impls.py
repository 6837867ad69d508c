"""The relay pump's contract, run on every implementation and both event loops.

Implementations: the pure twin (``noports._pure.relaypump``), the compiled module
(``noports._speedups.relaypump``) on its kernel-splice path, and the compiled module forced onto
its portable recv/send path (what macOS wheels run).  Each test splices two real TCP
connections on 127.0.0.1: the test holds the outer ends ``a`` and ``b``, the pump owns the
accepted ends.  Compiled params are skipped when the module is not built, except under CI
(env ``CI`` set), where a missing build fails.

The contract the relay pump shares with the tunnel pump (FIN, RST, close, head bytes,
back-pressure, counts, no FD leaks) is written once in ``pump_contract.py`` and collected here
through :class:`TestRelayPumpContract`; this file adds what only the relay pump has (its
data paths and their pooled carriers).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os

import pytest

import noports._pure.relaypump as pure_pump
from tests.functional.pump_contract import (
    PumpContract,
    Twin,
    close_links,
    compiled_or_skip,
    exchange_and_idle,
    fd_count,
    no_fd_leak,
    open_link,
)

IMPLS = ["pure", "compiled", "compiled-copy"]


@dataclasses.dataclass
class RelayTwin(Twin):
    """The relay pump: both outer ends speak plaintext.  ``path`` is the data path each
    direction of a compiled splice must take ("splice" | "copy"), None for the pure twin."""

    MODULE = "relaypump"
    SIDES = ("a", "b")
    FUNCTIONS = ("open_splice", "splice")
    SPLICE, RESULT = "Splice", "SpliceResult"
    path: str | None

    async def open(self, link, *, head_a=b"", head_b=b"", **kw):
        return await self.mod.open_splice(asyncio.get_running_loop(), link.sa, link.sb,
                                          head_a=head_a, head_b=head_b, **kw)

    def splice(self, loop, link):
        return self.mod.splice(loop, link.sa, link.sb)

    def new_splice(self, loop, max_buffer):
        return self.mod.Splice(loop, b"", b"", max_buffer)


@pytest.fixture(params=IMPLS)
def impl(request):
    """The pump under test; ``impl.name`` says which variant."""
    if request.param == "pure":
        yield RelayTwin("pure", pure_pump, None)
        return
    compiled = compiled_or_skip("relaypump")
    if request.param == "compiled":
        if not compiled._splice_supported():
            pytest.skip("no splice(2) on this platform: the compiled module copies "
                        "(covered by compiled-copy)")
        previous = compiled._configure(use_splice=True)
        twin = RelayTwin("compiled", compiled, "splice")
    else:
        previous = compiled._configure(use_splice=False)
        twin = RelayTwin("compiled-copy", compiled, "copy")
    try:
        yield twin
    finally:
        compiled._configure(*previous)


class TestRelayPumpContract(PumpContract):
    TWIN = RelayTwin


# --- what only the relay pump does ----------------------------------------------------------

def test_100mb_one_way_and_30mb_the_other_intact(run, event_loop_kind, impl):
    seed = int.from_bytes(os.urandom(4), "big")
    n_ab, n_ba = 100 * 10**6, 30 * 10**6 + 12345

    async def main():
        async with no_fd_leak():
            link = await open_link(impl)
            pump = link.pump
            try:
                sent_ab, sent_ba, got_b, got_a = await asyncio.gather(
                    link.send_stream("a", n_ab, seed), link.send_stream("b", n_ba, seed + 1),
                    link.recv_all("b"), link.recv_all("a"))
                if impl.path:
                    assert pump._paths == (impl.path, impl.path)
                result = await asyncio.wait_for(pump.wait(), 5)
            finally:
                link.close_outer()
            assert got_b == (n_ab, sent_ab), f"A->B corrupted (seed {seed})"
            assert got_a == (n_ba, sent_ba), f"B->A corrupted (seed {seed})"
            assert (result.bytes_a_to_b, result.bytes_b_to_a) == (n_ab, n_ba)
            assert (pump.bytes_a_to_b, pump.bytes_b_to_a) == (n_ab, n_ba)
            assert (result.how_ended, result.ended_by) == ("eof", None)
            assert pump.done and pump.buffered_a_to_b == pump.buffered_b_to_a == 0

    run(main(), timeout=180)


def test_idle_splices_hold_no_carriers(run, event_loop_kind, impl):
    """Once its bytes are through, an idle splice holds no pipe and no copy block: 40 splices
    that carried 1 MiB each way leave at most the pool's bound of pipes open."""
    if impl.path is None:
        pytest.skip("the pure twin has no carriers of its own (the transports' buffers)")

    async def main():
        async with no_fd_leak():
            links = [await open_link(impl) for _ in range(40)]
            before, pooled_before = fd_count(), impl.mod._pool_size()[0]
            await exchange_and_idle(links)
            for link in links:
                assert link.pump._paths == (impl.path, impl.path)
            pipes, blocks = impl.mod._pool_size()
            assert pipes <= 32 and blocks <= 32
            if before is not None and impl.path == "splice":
                assert fd_count() - before == 2 * (pipes - pooled_before)
            await close_links(links)

    run(main(), timeout=60)
