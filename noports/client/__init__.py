"""npt, the NoPorts client: one tunnel session from the command line.

``cli`` (flags, exit codes, running in the foreground or detached with ``-x``), ``session`` (the
phases' I/O: atServer, relay, daemon, tunnel), ``phases`` (their sans-IO decisions and
messages), ``keygen`` (the one-time RSA key, made in parallel), ``detach`` (the ``-x`` hand-off),
``debug`` (the opt-in key log).  See docs/internals.md, ``noports.client``.
"""

from noports.client.phases import PhaseError

__all__ = ["NptSession", "PhaseError", "SessionOptions"]


def __getattr__(name: str):
    # the session pulls in the whole network stack; `npt --help` and the -x parent need none
    if name in ("NptSession", "SessionOptions"):
        from noports.client import session
        return getattr(session, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
