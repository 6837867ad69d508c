"""One logging set-up for every noports program (``-v``/``--verbose``, ``-q``/``--quiet``).

Owns the stderr log line format, the level each ``-v``/``-q`` gives, and the handler every
program installs; the programs' command lines only add the two flags (:func:`add_flags`) and
call :func:`setup_logging` once their flags are parsed.

Levels: everything logs at WARNING by default; each ``-v`` is one step more (``-v`` INFO,
``-vv`` DEBUG); ``-q`` is ERROR only and wins over ``-v``.  A program may name its *own*
loggers (npd's ``noports.daemon``, srvd's ``noports.relay``): those print their lifecycle lines
(ready, one line per session, stop) at INFO by default, so they are never quieter than INFO
unless ``-q`` is given.

One line format, whatever the program::

    2025-01-02 13:04:05.123 INFO    npd[4242] noports.daemon: npd @bob ready: ...

local time with milliseconds, the level, the program (a srvd worker is ``srvd/w1``) and its
pid, the logger, the message.  The handler writes to whatever ``sys.stderr`` is at the time of
each line (npt's detached runner and pytest's capture swap it), and calling
:func:`setup_logging` again replaces the handler instead of adding a second one.  Nothing here
touches stdout, which belongs to the programs' own output (``npt -x`` prints the port alone
on it).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

__all__ = ["DATE_FORMAT", "LINE_FORMAT", "add_flags", "levels", "setup_logging"]

#: ``%(program)s`` is the formatter's default; ``%(process)d`` is the pid that logged the line.
LINE_FORMAT = "%(asctime)s %(levelname)-7s %(program)s[%(process)d] %(name)s: %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"

_STEPS = (logging.WARNING, logging.INFO, logging.DEBUG)
#: The loggers the last call gave their own level (a second call resets those it does not name).
_own_set: set[str] = set()


def add_flags(parser: argparse.ArgumentParser, *, verbose_help: str | None = None,
              quiet_help: str | None = None) -> None:
    """``-v/--verbose`` (counted) and ``-q/--quiet``, the same on every program."""
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help=verbose_help or "more logging on stderr (-v info, -vv debug)")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help=quiet_help or "log errors only (overrides -v)")


def levels(verbose: int = 0, quiet: bool = False,
           own_default: int = logging.WARNING) -> tuple[int, int]:
    """``(every logger, the program's own loggers)`` for the given flags."""
    if quiet:
        return logging.ERROR, logging.ERROR
    root = _STEPS[min(max(verbose, 0), len(_STEPS) - 1)]
    return root, min(root, own_default)


class _Formatter(logging.Formatter):
    def __init__(self, program: str) -> None:
        super().__init__(LINE_FORMAT, DATE_FORMAT, defaults={"program": program})

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        # logging adds the milliseconds only without a datefmt, and then with a comma
        text = time.strftime(datefmt or DATE_FORMAT, self.converter(record.created))
        return f"{text}.{int(record.msecs):03d}"


class _StderrHandler(logging.StreamHandler):
    """A stream handler bound to ``sys.stderr`` as it is when each line is written."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass        # always the current sys.stderr


def setup_logging(program: str, verbose: int = 0, quiet: bool = False, *,
                  own: tuple[str, ...] = (), own_default: int = logging.INFO) -> logging.Handler:
    """Configure the root logger for ``program`` (``npd``, ``srvd/w1``...); idempotent.

    ``own`` are the program's own loggers, shown at ``own_default`` (INFO) unless ``-q``.
    Returns the handler (tests look at it)."""
    root_level, own_level = levels(verbose, quiet, own_default)
    root = logging.getLogger()
    handler = next((h for h in root.handlers if isinstance(h, _StderrHandler)), None)
    if handler is None:
        handler = _StderrHandler()
        root.addHandler(handler)
    handler.setFormatter(_Formatter(program))
    handler.setLevel(logging.NOTSET)
    root.setLevel(root_level)
    for name in _own_set - set(own):
        logging.getLogger(name).setLevel(logging.NOTSET)
    for name in own:
        logging.getLogger(name).setLevel(own_level)
    _own_set.clear()
    _own_set.update(own)
    return handler
