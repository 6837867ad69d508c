"""npt, the NoPorts client: one tunnel session from the command line.

``cli`` (flags, exit codes, running in the foreground or detached with ``-x``), ``session`` (the
phases' I/O: atServer, relay, daemon, tunnel), ``phases`` (their sans-IO decisions and
messages), ``keygen`` (the one-time RSA key, made in parallel), ``detach`` (the ``-x`` hand-off),
``debug`` (the opt-in key log).  See docs/internals.md, ``noports.client``.
"""

from noports.client.phases import PhaseError
from noports.client.session import NptSession, SessionOptions

__all__ = ["NptSession", "PhaseError", "SessionOptions"]
