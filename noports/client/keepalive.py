"""``npt -K`` (``--keep-alive``): re-create the session whenever it ends (noports-protocol.md
§9.1, §10 "npt keep-alive retry 5 s after a session ends").

Owns the retry policy and the loop around :class:`~noports.client.session.NptSession`:

* a session that ends for any reason (the relay or the daemon gone, the control channel closed,
  its idle time passed) or that cannot be set up is re-created after a back-off: 5 s first, then
  doubling up to 60 s; a session that lived longer than 60 s resets the back-off, so one drop
  after a long healthy session waits 5 s again;
* the local port stays the same: ``-l`` is always rebound; without ``-l`` the port the first
  session got is asked for again (and if something else took it meanwhile, any free port);
* every retry is written on stderr with its reason, even with ``-q`` (an operator must see a
  tunnel flapping); the local port goes to stdout when the first tunnel is up and again only
  when it changed;
* Ctrl-C / SIGTERM stop it at any point: exit 0 once a tunnel had been up, else 130.  A keys
  failure is not retried (nothing will change by waiting).

:class:`Backoff` is sans-IO (unit-tested); :func:`keep_alive` does the waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import sys
import time
from typing import TYPE_CHECKING

from noports.client.keygen import EphemeralKey
from noports.client.phases import PhaseError, ended_error

if TYPE_CHECKING:  # pragma: no cover
    from noports.client.session import Progress, SessionOptions

__all__ = ["KEEP_ALIVE_TIMEOUT_S", "RETRY_CAP", "RETRY_DELAY", "Backoff", "keep_alive"]

#: Atsign's npt re-creates the session 5 s after it ends.
RETRY_DELAY = 5.0
#: Back-off ceiling for a session that keeps failing.
RETRY_CAP = 60.0
#: A session up longer than this was healthy: the next retry starts from RETRY_DELAY again.
HEALTHY_AFTER = 60.0
#: -K without -T: the idle timeout becomes 24 h (as Atsign's npt).
KEEP_ALIVE_TIMEOUT_S = 24 * 3600
#: Phases whose failure waiting cannot fix.
NOT_RETRIED = frozenset({"keys"})
EXIT_INTERRUPTED = 130


class Backoff:
    """Delay before the next attempt: 5, 10, 20, 40, 60, 60 ... s; reset by a healthy session."""

    def __init__(self, base: float = RETRY_DELAY, cap: float = RETRY_CAP,
                 healthy_after: float = HEALTHY_AFTER) -> None:
        self.base, self.cap, self.healthy_after = base, cap, healthy_after
        self.failures = 0

    def next_delay(self, lived: float | None) -> float:
        """``lived``: how long the session that just ended was up (None: it never came up)."""
        if lived is not None and lived > self.healthy_after:
            self.failures = 0
        delay = min(self.cap, self.base * (2 ** min(self.failures, 16)))
        self.failures += 1
        return delay


async def keep_alive(opts: SessionOptions, progress: Progress, ephemeral: EphemeralKey,
                     stop: asyncio.Event, *, backoff: Backoff | None = None,
                     clock=time.monotonic) -> int:
    """Run sessions back to back until ``stop`` is set; the exit status."""
    from noports.client.session import NptSession

    backoff = backoff or Backoff()
    wanted_port = opts.local_port          # 0: whatever we got first, kept when possible
    reported: int | None = None
    ever_up = False
    attempt = 0
    key = ephemeral
    stopper = asyncio.ensure_future(stop.wait())
    try:
        while True:
            attempt += 1
            run_opts = dataclasses.replace(opts, local_port=wanted_port)
            # each session needs a fresh one-time key; the first was forked before the loop
            session = NptSession(run_opts, progress, ephemeral=key or EphemeralKey())
            key = None
            lived: float | None = None
            try:
                setup = asyncio.ensure_future(session.establish())
                await asyncio.wait({setup, stopper}, return_when=asyncio.FIRST_COMPLETED)
                if not setup.done():
                    setup.cancel()
                    await asyncio.gather(setup, return_exceptions=True)
                    progress.step("keep-alive", "stopping on request")
                    return 0 if ever_up else EXIT_INTERRUPTED
                try:
                    port = setup.result()
                except PhaseError as exc:
                    if exc.phase in NOT_RETRIED:
                        progress.error(str(exc))
                        return exc.exit_code
                    reason = str(exc)
                    if exc.phase == "tunnel" and opts.local_port == 0 and wanted_port:
                        # the port we tried to keep is taken: any port will do
                        wanted_port = 0
                else:
                    ever_up = True
                    if opts.local_port == 0:
                        wanted_port = port
                    progress.step("ready", f"tunnel up (attempt {attempt}): connect to "
                                           f"{opts.local_host}:{port}")
                    if port != reported:
                        sys.stdout.write(f"{port}\n")
                        sys.stdout.flush()
                        reported = port
                    t_up = clock()
                    closed = asyncio.ensure_future(session.wait_closed())
                    await asyncio.wait({closed, stopper}, return_when=asyncio.FIRST_COMPLETED)
                    if not closed.done():
                        closed.cancel()
                        progress.step("session", "stopping on request")
                        return 0
                    lived = clock() - t_up
                    ended = closed.result()
                    err = ended_error(ended)
                    reason = str(err) if err is not None else (
                        f"the session ended: {ended}" if ended else "the session ended")
            finally:
                await session.close()
            delay = backoff.next_delay(lived)
            progress.write(f"npt: [{progress.elapsed_ms():6.0f} ms] keep-alive: {reason}; "
                           f"re-establishing in {delay:g} s (attempt {attempt + 1})")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(stopper), delay)
            if stop.is_set():
                progress.step("keep-alive", "stopping on request")
                return 0 if ever_up else EXIT_INTERRUPTED
    finally:
        stopper.cancel()
        if key is not None:
            key.close()
