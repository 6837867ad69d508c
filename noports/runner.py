"""The process main of every long-running asyncio command (npd, srvd, srvd's workers).

Owns the event loop's life: uvloop unless ``--no-uvloop`` (or uvloop is not installed), the
command's main coroutine run to completion (its value is the exit code), then async generators
shut down and the loop closed, whatever happened.

Not here: signal handling.  The signals mean different things per program (npd stops; srvd
drains, and ends live sessions at a second signal; srvd's workers ignore them because their main
process drains them), so each command installs its own handlers.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["new_event_loop", "run"]

T = TypeVar("T")


def new_event_loop(no_uvloop: bool = False) -> asyncio.AbstractEventLoop:
    """A new uvloop loop, or the stock asyncio one if ``no_uvloop`` or uvloop is missing."""
    if not no_uvloop:
        try:
            import uvloop
        except ImportError:  # pragma: no cover - platforms without uvloop
            pass
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def run(main: Coroutine[Any, Any, T], *, no_uvloop: bool = False) -> T:
    """Run ``main`` on a new loop (see :func:`new_event_loop`) and close the loop after it."""
    loop = new_event_loop(no_uvloop)
    try:
        return loop.run_until_complete(main)
    finally:
        with contextlib.suppress(Exception):
            loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
