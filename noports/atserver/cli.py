"""``atserver``: run the embedded root directory and atServer.

Owns the command line (flags, logging, exit codes) and the process lifecycle: start, print one
machine-readable ``ready`` line on stdout, serve until SIGTERM/SIGINT, stop cleanly (exit 0).
Exit codes: 0 normal stop, 1 start-up failure (e.g. a port in use), 2 bad flags.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from pathlib import Path

from noports.atserver.app import AtServerApp, ServerConfig
from noports.atserver.root import RootDirectory
from noports.atserver.server import ConnectionLimits
from noports.atserver.verbs import Limits
from noports.cliflags import add_version_flag
from noports.errors import NoPortsError
from noports.logsetup import add_flags as add_log_flags
from noports.logsetup import setup_logging

__all__ = ["build_parser", "main"]

log = logging.getLogger("noports.atserver")

_EPILOG = """\
exit codes:
  0  stopped by SIGTERM or SIGINT (connections closed, store flushed)
  1  start-up failure (a port in use, the state directory unusable, ...)
  2  bad flags
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="atserver",
        description="Embedded atProtocol root directory + atServer hosting any number of "
                    "atSigns\n(each on its own TLS port), with a local CA.  When ready it prints "
                    "one JSON line\non stdout: {\"event\":\"ready\",...}.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--state-dir", required=True, type=Path,
                   help="directory for the SQLite store, the CA (ca.pem) and CRAM secrets")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on and to advertise in the root (default 127.0.0.1)")
    p.add_argument("--root-port", type=int, default=6464,
                   help="root directory TLS port (default 6464; 0 = ephemeral, remembered)")
    p.add_argument("--atsign", "-a", action="append", default=[], metavar="@X",
                   help="host this atSign (repeatable); new ones get a CRAM secret")
    p.add_argument("--keys-dir", "-k", type=Path,
                   help="activate hosted atSigns with no DIR/@x_key.atKeys yet: generate keys, "
                        "install their public halves, write the file")
    g = p.add_argument_group("limits")
    g.add_argument("--max-line", type=int, default=10_240_000,
                   help="longest command line in bytes; longer -> AT0005 and close")
    g.add_argument("--max-connections", type=int, default=200,
                   help="connections per atSign; beyond -> AT0012 and close (default 200)")
    g.add_argument("--unauth-idle-timeout", type=float, default=600.0,
                   help="seconds an unauthenticated connection may stay without a command "
                        "(default 600, as Dart; 0 = never)")
    g.add_argument("--handshake-timeout", type=float, default=10.0,
                   help="seconds allowed for the TLS handshake (default 10)")
    g.add_argument("--login-free-failures", type=int, default=3,
                   help="failed cram/pkam per connection answered without delay (default 3)")
    g.add_argument("--login-delay", type=float, default=1.0,
                   help="first delay after that, doubling per failure (default 1 s)")
    g.add_argument("--login-delay-max", type=float, default=5.0,
                   help="cap of the failed-login delay (default 5 s)")
    g.add_argument("--peer-fail-limit", type=int, default=30,
                   help="failed logins per peer address per minute before every further "
                        "failure is delayed by --login-delay-max (default 30)")
    g.add_argument("--root-free-misses", type=int, default=10,
                   help="unknown names per root connection answered at once (default 10)")
    g.add_argument("--root-miss-delay", type=float, default=1.0,
                   help="delay of each further unknown-name answer (default 1 s)")
    g.add_argument("--root-max-misses", type=int, default=20,
                   help="unknown names after which a root connection is closed (default 20)")
    t = p.add_argument_group("timing")
    t.add_argument("--stats-interval", type=float, default=15.0,
                   help="seconds between stats notifications to monitors (default 15; 0 = off)")
    t.add_argument("--sweep-interval", type=float, default=60.0,
                   help="seconds between expiry sweeps of keys and notifications (default 60)")
    t.add_argument("--notification-ttl", type=int, default=15 * 60 * 1000, metavar="MS",
                   help="default notification ttln in ms (default 900000 = 15 min, as Dart)")
    p.add_argument("--sync", choices=("normal", "full"), default="normal",
                   help="SQLite synchronous mode: normal survives a killed process, full also "
                        "a power loss (slower; default normal)")
    p.add_argument("--no-uvloop", action="store_true", help="use the stock asyncio loop")
    add_log_flags(p)
    add_version_flag(p)
    return p


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(
        state_dir=args.state_dir, host=args.host, root_port=args.root_port,
        atsigns=list(args.atsign), keys_dir=args.keys_dir, synchronous=args.sync.upper(),
        stats_interval=args.stats_interval, sweep_interval=args.sweep_interval,
        handshake_timeout=args.handshake_timeout,
        connection=ConnectionLimits(max_line=args.max_line,
                                    max_connections=args.max_connections,
                                    unauth_idle_timeout=args.unauth_idle_timeout),
        limits=Limits(notification_ttl_ms=args.notification_ttl,
                      login_free_failures=args.login_free_failures,
                      login_delay=args.login_delay, login_delay_max=args.login_delay_max,
                      peer_fail_limit=args.peer_fail_limit),
        root=RootDirectory(free_misses=args.root_free_misses, miss_delay=args.root_miss_delay,
                           max_misses=args.root_max_misses,
                           idle_timeout=args.unauth_idle_timeout),
    )


async def _serve(config: ServerConfig) -> int:
    app = AtServerApp(config)
    try:
        await app.start()
    except (OSError, NoPortsError, ValueError) as exc:
        print(f"atserver: cannot start: {exc}", file=sys.stderr, flush=True)
        await app.stop()
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):   # pragma: no cover - non-POSIX
            signal.signal(sig, lambda *_: loop.call_soon_threadsafe(stop.set))
    sys.stdout.write(json.dumps(app.ready_info(), separators=(",", ":")) + "\n")
    sys.stdout.flush()
    log.info("serving root on %s:%d and %s", config.host, app.root_port,
             ", ".join(f"{a}:{p}" for a, p in app.ports.items()))
    await stop.wait()
    log.info("stopping")
    await app.stop()
    return 0


def _raise_fd_limit() -> None:
    """Use the hard RLIMIT_NOFILE: the connection caps, not EMFILE, should limit us."""
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY:
            hard = 65536
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):    # pragma: no cover - platform dependent
        pass


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging("atserver", args.verbose, args.quiet)
    config = config_from_args(args)
    _raise_fd_limit()
    if not args.no_uvloop:
        try:
            import uvloop
        except ImportError:           # pragma: no cover - platforms without uvloop
            uvloop = None
        if uvloop is not None:
            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    try:
        return asyncio.run(_serve(config))
    except KeyboardInterrupt:         # pragma: no cover - signal before the handler is set
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
