"""``srvd`` (``python -m noports.relay``): the relay's command line and process lifecycle.

Owns the flags (Atsign's ``-a``, ``-i/--ip``, ``-m/--manager``, ``-k/--key-file``,
``--root-domain``, ``-v``, plus ours: ``-q``, ``--bind``, ``--ca-file``,
``--allow-unauthenticated``, ``--metrics-port``/``--metrics-host``, ``--pending-quota``,
``--drain-grace``, ``--auth-timeout``, ``--pairing-timeout``, ``--workers``, ``--version``),
refusing configurations that would fail open (``-m ""``); raising RLIMIT_NOFILE; logging in;
starting the metrics server and the control plane; and the signals: the first SIGTERM (or
SIGINT) stops new sessions and lets live ones finish within ``--drain-grace`` before closing
everything and exiting 0; a second one ends the live sessions at once. With ``--workers N`` (N >
1; 0 = one per core) the sessions run in N worker processes (``noports.relay.workers``) while
this process keeps the control plane.

Exit codes: 0 after a drain, 1 start-up failure (keys, login, bind), 2 bad flags.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import stat
import sys
from pathlib import Path

from noports.at.atkeys import AtKeys, default_keys_path
from noports.at.client import AtClient
from noports.at.names import normalize_atsign
from noports.cliflags import (
    add_key_file_flag,
    add_metrics_flags,
    add_root_flags,
    add_version_flag,
    check_root_domain,
)
from noports.errors import InvalidAtSignError, NoPortsError
from noports.logsetup import add_flags as add_log_flags
from noports.logsetup import setup_logging
from noports.relay.control import ControlPolicy, RelayControl
from noports.relay.dataplane import DataPlaneConfig
from noports.relay.messages import encode_reply_csv
from noports.relay.metrics import MetricsServer
from noports.relay.session import RelaySessions
from noports.relay.stats import RelayStats
from noports.relay.workers import WorkerPool, cpu_workers
from noports.runner import run

__all__ = ["build_parser", "main", "parse_args"]

log = logging.getLogger("noports.relay")

#: Atsign's srvd spells an unrestricted relay ``--manager open`` (its default).
OPEN = "open"


def _positive(kind):
    def convert(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    convert.__name__ = kind.__name__
    return convert


def _non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="srvd",
        description="NoPorts relay: gives each client/daemon session two TCP ports on this "
                    "host and splices the sockets that authenticate on them.  Requests arrive "
                    "as atProtocol notifications to the relay's atSign.")
    p.add_argument("-a", "--atsign", required=True, help="the relay's atSign")
    p.add_argument("-i", "--ip", required=True, metavar="ADDRESS",
                   help="FQDN or IP address sent to clients and daemons (verbatim)")
    p.add_argument("-m", "--manager", default=OPEN, metavar="@CLIENT",
                   help="only this client atSign may open sessions: the request's sender must "
                        "be it and atSignA must be the sender; 'open' = anyone (default open)")
    add_key_file_flag(p, "the relay's .atKeys file (default ~/.atsign/keys/<atsign>_key.atKeys)")
    add_root_flags(p)
    p.add_argument("--bind", default="0.0.0.0", metavar="HOST",
                   help="local address of the session ports (default 0.0.0.0, as Atsign's srvd)")
    p.add_argument("--allow-unauthenticated", action="store_true",
                   help="also serve requests whose sockets do not authenticate (legacy "
                        "bare-sessionId requests, authenticateSocketA/B false); default: refuse")
    p.add_argument("--pending-quota", type=_positive(int), default=32, metavar="N",
                   help="sessions one requesting atSign may hold before they pair (default 32)")
    p.add_argument("--drain-grace", type=_non_negative_float, default=10.0, metavar="SECONDS",
                   help="on SIGTERM, how long live sessions may go on (default 10)")
    p.add_argument("--auth-timeout", type=_positive(float), default=5.0, metavar="SECONDS",
                   help="per socket, time to present a valid auth line (default 5)")
    p.add_argument("--pairing-timeout", type=_positive(float), default=30.0, metavar="SECONDS",
                   help="a session with no pair by then is closed (default 30)")
    add_metrics_flags(p, port_help="serve Prometheus metrics at "
                                   "http://<metrics-host>:PORT/metrics (0 = any free port; "
                                   "default: no metrics server)")
    p.add_argument("--workers", type=_non_negative_int, default=1, metavar="N",
                   help="worker processes that run the sessions' data plane (default 1: all in "
                        "this process; 0 = one per core); the control plane stays here")
    p.add_argument("--no-uvloop", action="store_true", help="use the stock asyncio event loop")
    add_log_flags(p, verbose_help="more logging on stderr (-v info from every module, -vv "
                                  "debug; srvd's own lines are always shown unless -q)")
    add_version_flag(p)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check the flags; exits 2 with a message on any that would be unsafe."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.atsign = normalize_atsign(args.atsign)
    except InvalidAtSignError as exc:
        parser.error(f"-a/--atsign: {exc}")
    manager = args.manager.strip()
    if not manager:
        # an empty manager must never mean "anyone": that is the fail-open configuration
        parser.error("-m/--manager is empty; give the one client atSign allowed to open "
                     "sessions, or 'open' to serve anyone")
    if manager.lower() == OPEN:
        args.manager = None
    else:
        try:
            args.manager = normalize_atsign(manager)
        except InvalidAtSignError as exc:
            parser.error(f"-m/--manager {manager!r}: {exc}")
    try:
        encode_reply_csv(args.ip, 1, 1, None)
    except ValueError as exc:
        parser.error(f"-i/--ip: {exc}")
    check_root_domain(parser, args)
    if args.key_file is None:
        args.key_file = default_keys_path(args.atsign)
    return args


def raise_fd_limit() -> tuple[int, int]:
    """Set the soft RLIMIT_NOFILE to the hard one (the relay's own caps, not EMFILE, should
    limit it); returns the (soft, hard) now in force."""
    try:
        import resource
    except ImportError:  # pragma: no cover - non-POSIX
        return (-1, -1)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def _load_keys(path: Path, atsign: str) -> AtKeys:
    keys = AtKeys.load(path, atsign)
    with contextlib.suppress(OSError):
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("%s is readable by group or others (mode %o): chmod 600 it",
                        path, stat.S_IMODE(mode))
    return keys


def _check_bind(host: str) -> None:
    """Fail at start, not at the first request, if the session address cannot be bound."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))


class _Signals:
    """First SIGTERM/SIGINT: drain.  Second: end the live sessions now."""

    def __init__(self) -> None:
        self.count = 0
        self.stop = asyncio.Event()
        self.hurry = asyncio.Event()

    def __call__(self, signame: str) -> None:
        self.count += 1
        if self.count == 1:
            log.info("%s: draining (no new sessions)", signame)
            self.stop.set()
        else:
            log.info("%s again: closing every session now", signame)
            self.hurry.set()


async def _drain(sessions: RelaySessions | WorkerPool, control: RelayControl, grace: float,
                 signals: _Signals) -> None:
    control.draining = True
    live = len(sessions)
    log.info("draining %d session(s) for up to %.1f s", live, grace)
    drain = asyncio.ensure_future(sessions.close(grace=grace))
    hurry = asyncio.ensure_future(signals.hurry.wait())
    try:
        await asyncio.wait({drain, hurry}, return_when=asyncio.FIRST_COMPLETED)
        if not drain.done():
            # abort every live pair: each session's close() then stops waiting at once
            if isinstance(sessions, WorkerPool):
                sessions.abort()
            for session in sessions.sessions():
                for splice in session.splices():
                    splice.close()
            done, _ = await asyncio.wait({drain}, timeout=0.3)
            if not done:
                log.warning("sessions did not close within 0.3 s; exiting anyway")
                drain.cancel()
                if isinstance(sessions, WorkerPool):
                    await sessions.kill()
    finally:
        hurry.cancel()


async def _shutdown(control: RelayControl, client: AtClient,
                    metrics: MetricsServer | None) -> None:
    """Close the monitor, the atServer connection and the metrics server, 0.4 s at most in all:
    a hung atServer connection must not hold the exit."""
    async def close_all() -> None:
        await control.close()
        await client.close()
        if metrics is not None:
            await metrics.close()

    with contextlib.suppress(Exception, asyncio.CancelledError, asyncio.TimeoutError):
        await asyncio.wait_for(close_all(), 0.4)


async def serve(args: argparse.Namespace) -> int:
    """Run the relay until drained; the process exit code."""
    try:
        keys = _load_keys(args.key_file, args.atsign)
    except (NoPortsError, OSError, ValueError) as exc:
        print(f"srvd: cannot read the keys of {args.atsign} from {args.key_file}: {exc}",
              file=sys.stderr, flush=True)
        return 1
    try:
        _check_bind(args.bind)
    except OSError as exc:
        print(f"srvd: cannot bind --bind {args.bind}: {exc}", file=sys.stderr, flush=True)
        return 1
    stats = RelayStats()
    config = DataPlaneConfig(bind_host=args.bind, auth_timeout=args.auth_timeout,
                             pairing_timeout=args.pairing_timeout)
    workers = cpu_workers(args.workers)
    sessions: RelaySessions | WorkerPool
    if workers > 1:
        sessions = WorkerPool(workers, config, allow_unauthenticated=args.allow_unauthenticated,
                              pending_quota=args.pending_quota, stats=stats,
                              no_uvloop=args.no_uvloop, verbose=args.verbose,
                              quiet=args.quiet)
        try:
            await sessions.start()
        except (OSError, RuntimeError) as exc:
            print(f"srvd: cannot start {workers} workers: {exc}", file=sys.stderr, flush=True)
            return 1
    else:
        sessions = RelaySessions(config, allow_unauthenticated=args.allow_unauthenticated,
                                 pending_quota=args.pending_quota, stats=stats)
    policy = ControlPolicy(args.atsign, manager=args.manager,
                           allow_unauthenticated=args.allow_unauthenticated,
                           pending_quota=args.pending_quota)
    client = AtClient(args.atsign, keys, root=args.root_domain, ca_file=args.ca_file)
    control = RelayControl(client, sessions, policy, address=args.ip)
    metrics: MetricsServer | None = None
    render = sessions.render if isinstance(sessions, WorkerPool) else stats.render
    try:
        try:
            await client.connect()
            await control.start()
        except (NoPortsError, OSError, asyncio.TimeoutError) as exc:
            print(f"srvd: cannot log in as {args.atsign} (root {args.root_domain}): {exc}",
                  file=sys.stderr, flush=True)
            return 1
        if args.metrics_port is not None:
            metrics = MetricsServer(lambda: render() + control.render(),
                                    args.metrics_host, args.metrics_port)
            try:
                await metrics.start()
            except OSError as exc:
                print(f"srvd: cannot serve metrics on {args.metrics_host}:{args.metrics_port}:"
                      f" {exc}", file=sys.stderr, flush=True)
                metrics = None
                return 1
        signals = _Signals()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, signals, sig.name)
        log.info("srvd %s ready: pid %d, advertising %s, binding %s, manager %s, %s%s%s",
                 args.atsign, os.getpid(), args.ip, args.bind, args.manager or OPEN,
                 "unauthenticated requests allowed" if args.allow_unauthenticated
                 else "authenticated sessions only",
                 f", {workers} workers" if workers > 1 else "",
                 f", metrics on {args.metrics_host}:{metrics.port}" if metrics else "")
        stop = asyncio.ensure_future(signals.stop.wait())
        try:
            await asyncio.wait({stop, control.reader}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if not signals.stop.is_set():
            # the monitor gave up for good (its server refused us): nothing more will come
            log.error("the request monitor stopped: %s", control.reader.exception()
                      if not control.reader.cancelled() else "cancelled")
            await _drain(sessions, control, args.drain_grace, signals)
            return 1
        await _drain(sessions, control, args.drain_grace, signals)
        log.info("drained; exiting")
        return 0
    finally:
        await _shutdown(control, client, metrics)
        if isinstance(sessions, WorkerPool):
            await sessions.kill()     # none may outlive us (they are gone after a drain)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # the relay's own lines (one per session, refusals, start and stop) are shown unless -q
    setup_logging("srvd", args.verbose, args.quiet, own=("noports.relay",))
    soft, hard = raise_fd_limit()
    log.debug("RLIMIT_NOFILE soft %d hard %d", soft, hard)
    return run(serve(args), no_uvloop=args.no_uvloop)
