"""``npd`` / ``sshnpd`` (``python -m noports.daemon``): the daemon's command line and lifecycle.

Owns the flags (Atsign's ``-a``, ``-m/--managers/--manager``, ``-d``, ``-k``,
``--permit-open/--po``, ``-h/--hide``, ``--device-group``, ``--root-domain``, ``--storage-path``,
``-v``, plus ours: ``-q``, ``--ca-file``, ``--metrics-port``/``--metrics-host``, ``--no-uvloop``,
``--version``), refusing every configuration that would fail open (no managers, ``-m ""``,
``--permit-open ""``, an .atKeys file others can read), logging in, and the signals: SIGTERM or
SIGINT closes every tunnel and exits 0.

Exit codes (also in ``--help``): 0 stopped by SIGTERM/SIGINT; 1 start-up failure (keys
unreadable, login or monitor refused, storage path not writable, metrics port busy) or the
monitor failing for good; 2 bad flags; 3 the .atKeys file is readable by group or others.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import stat
import sys
from pathlib import Path

from noports.at.atkeys import AtKeys, default_keys_path
from noports.at.client import AtClient
from noports.at.names import normalize_atsign, validate_device_name
from noports.cliflags import (
    add_key_file_flag,
    add_metrics_flags,
    add_root_flags,
    add_version_flag,
    check_root_domain,
)
from noports.daemon.daemon import DaemonConfig, Npd, StateStore, default_storage_path
from noports.errors import InvalidAtSignError, InvalidDeviceNameError, NoPortsError
from noports.logsetup import add_flags as add_log_flags
from noports.logsetup import setup_logging
from noports.messages import (
    DEFAULT_DEVICE_GROUP,
    DEFAULT_PERMIT_OPEN,
    MessageError,
    parse_atsign_list,
    parse_permit_open,
)
from noports.relay.metrics import MetricsServer
from noports.runner import run

__all__ = ["EXIT_BAD_FLAGS", "EXIT_FAILURE", "EXIT_OK", "EXIT_UNSAFE_KEYS", "build_parser",
           "main", "parse_args"]

log = logging.getLogger("noports.daemon")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BAD_FLAGS = 2
EXIT_UNSAFE_KEYS = 3

_EPILOG = """\
exit codes:
  0  stopped by SIGTERM or SIGINT (every tunnel closed)
  1  start-up failure (keys unreadable, login or monitor refused, storage path not
     writable, metrics port busy), or the notification monitor failed for good
  2  bad flags (missing or empty -m, empty --permit-open, bad atSign or device name,
     unknown flags)
  3  the .atKeys file is readable by group or others (chmod 600 it)

Only the atSigns given with -m are heard: anyone else's notifications are dropped, before
any decryption or lookup, without a reply.  A manager's npt_request is served only if its
signature verifies and its host:port is allowed by --permit-open (exact strings; entries
host:port, *:port, host:* or *:*)."""


class _Help(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        parser.print_help()
        parser.exit(0)


def build_parser(prog: str = "npd") -> argparse.ArgumentParser:
    # -h is Atsign's --hide, so --help has no short form
    p = argparse.ArgumentParser(
        prog=prog, add_help=False, epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="NoPorts daemon: lets its managers reach TCP services on this device "
                    "through a NoPorts relay, without opening any inbound port.")
    p.add_argument("--help", action=_Help, nargs=0, help="show this help and exit")
    p.add_argument("-a", "--atsign", required=True, help="the daemon's atSign (mandatory)")
    p.add_argument("-m", "--managers", "--manager", dest="managers", required=True,
                   metavar="@A[,@B...]",
                   help="comma-separated atSigns allowed to ping this device and open "
                        "sessions (mandatory, never empty)")
    p.add_argument("-p", "--policy-manager", dest="policy_manager", default=None,
                   help=argparse.SUPPRESS)
    p.add_argument("-d", "--device", default="default",
                   help="device name: lower-cased, spaces become '_', then 2-36 of a-z 0-9 _ - "
                        "(default 'default')")
    add_key_file_flag(p, "the daemon's .atKeys (default ~/.atsign/keys/<atsign>_key.atKeys); "
                         "must not be readable by group or others")
    p.add_argument("--permit-open", "--po", dest="permit_open", default=DEFAULT_PERMIT_OPEN,
                   metavar="HOST:PORT[,...]",
                   help="what a manager's session may connect to: host:port, *:port, host:* "
                        f"or *:*, exact strings (default {DEFAULT_PERMIT_OPEN}; never empty)")
    p.add_argument("-h", "--hide", action="store_true",
                   help="do not share device_info and username with the managers (they are "
                        "deleted at start); pings are still answered")
    p.add_argument("-u", "--un-hide", dest="un_hide", action="store_true",
                   help=argparse.SUPPRESS)   # Atsign's deprecated no-op, kept for scripts
    p.add_argument("--device-group", "--dg", dest="device_group", default=DEFAULT_DEVICE_GROUP,
                   help=f"device group name in the ping response (default {DEFAULT_DEVICE_GROUP})")
    add_root_flags(p)
    p.add_argument("--storage-path", type=Path, metavar="DIR",
                   help="where npd keeps its state: the last notification epoch and the "
                        "sessionIds already served, so a restart neither misses nor repeats "
                        "a request (default ~/.atsign/storage/<atsign>/.npd/<device>)")
    add_metrics_flags(p, port_help="serve Prometheus counters at "
                                   "http://<metrics-host>:PORT/metrics (0 = any free port; "
                                   "default: none)")
    p.add_argument("--no-uvloop", action="store_true", help="use the stock asyncio event loop")
    add_log_flags(p, verbose_help="more logging on stderr (-v info from every module, -vv "
                                  "debug; npd's own lines are always shown unless -q)")
    add_version_flag(p, "npd")   # sshnpd --version says npd too
    return p


def parse_args(argv: list[str] | None = None, prog: str = "npd") -> argparse.Namespace:
    """Parse and check the flags; exits 2 with a message on anything unsafe or malformed."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.policy_manager is not None:
        parser.error("-p/--policy-manager: policy services are not supported by this npd; "
                     "list the manager atSigns with -m")
    try:
        args.atsign = normalize_atsign(args.atsign)
    except InvalidAtSignError as exc:
        parser.error(f"-a/--atsign: {exc}")
    try:
        # an empty list must never mean "anyone": that is the fail-open configuration
        args.managers = tuple(parse_atsign_list(args.managers))
    except MessageError as exc:
        parser.error(f"-m/--managers: {exc}; give the atSigns allowed to use this device")
    try:
        args.device = validate_device_name(args.device)
    except InvalidDeviceNameError as exc:
        parser.error(f"-d/--device: {exc}")
    try:
        args.permit_open = tuple(parse_permit_open(args.permit_open))
    except MessageError as exc:
        parser.error(f"--permit-open: {exc}")
    check_root_domain(parser, args)
    if not args.device_group.strip():
        parser.error("--device-group is empty")
    if args.key_file is None:
        args.key_file = default_keys_path(args.atsign)
    if args.storage_path is None:
        args.storage_path = default_storage_path(args.atsign, args.device)
    return args


def keys_file_problem(path: Path) -> str | None:
    """Why ``path`` is unsafe to use as an .atKeys file, or None."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return None      # unreadable: AtKeys.load says why
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        return (f"{path} is accessible by group or others (mode {stat.S_IMODE(mode):04o}); "
                f"it holds the daemon's private keys: run  chmod 600 {path}")
    return None


class _Stop:
    def __init__(self) -> None:
        self.event = asyncio.Event()

    def __call__(self, signame: str) -> None:
        if not self.event.is_set():
            log.info("%s: stopping", signame)
        self.event.set()


async def serve(args: argparse.Namespace) -> int:
    """Run the daemon until a signal; the process exit code."""
    problem = keys_file_problem(args.key_file)
    if problem is not None:
        print(f"npd: refusing to start: {problem}", file=sys.stderr, flush=True)
        return EXIT_UNSAFE_KEYS
    try:
        keys = AtKeys.load(args.key_file, args.atsign)
    except (NoPortsError, OSError, ValueError) as exc:
        print(f"npd: cannot read the keys of {args.atsign} from {args.key_file}: {exc}",
              file=sys.stderr, flush=True)
        return EXIT_FAILURE
    state = StateStore(args.storage_path)
    try:
        state.prepare()
    except OSError as exc:
        print(f"npd: cannot use --storage-path {args.storage_path}: {exc}", file=sys.stderr,
              flush=True)
        return EXIT_FAILURE
    config = DaemonConfig(atsign=args.atsign, managers=args.managers, device=args.device,
                          permit_open=args.permit_open, device_group=args.device_group,
                          hide=args.hide)
    client = AtClient(args.atsign, keys, root=args.root_domain, ca_file=args.ca_file)
    npd = Npd(client, config, state=state)
    metrics: MetricsServer | None = None
    try:
        try:
            await client.connect()
            await npd.start()
        except (NoPortsError, OSError, asyncio.TimeoutError) as exc:
            print(f"npd: cannot log in as {args.atsign} (root {args.root_domain}): {exc}",
                  file=sys.stderr, flush=True)
            return EXIT_FAILURE
        if args.metrics_port is not None:
            metrics = MetricsServer(npd.render, args.metrics_host, args.metrics_port)
            try:
                await metrics.start()
            except OSError as exc:
                print(f"npd: cannot serve metrics on {args.metrics_host}:{args.metrics_port}: "
                      f"{exc}", file=sys.stderr, flush=True)
                metrics = None
                return EXIT_FAILURE
        stop = _Stop()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop, sig.name)
        log.info("npd %s ready: pid %d, device %s, managers %s, permit-open %s, %s, storage "
                 "%s%s", args.atsign, os.getpid(), args.device, ",".join(args.managers),
                 ",".join(args.permit_open),
                 "hidden (no device_info/username)" if args.hide else "device_info shared",
                 args.storage_path,
                 f", metrics on {args.metrics_host}:{metrics.port}" if metrics else "")
        stopped = asyncio.ensure_future(stop.event.wait())
        try:
            await asyncio.wait({stopped, npd.reader}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
        if not stop.event.is_set():
            reader = npd.reader
            log.error("the notification monitor stopped: %s",
                      reader.exception() if not reader.cancelled() else "cancelled")
            return EXIT_FAILURE
        return EXIT_OK
    finally:
        await _shutdown(npd, client, metrics)


async def _shutdown(npd: Npd, client: AtClient, metrics: MetricsServer | None) -> None:
    """Close the tunnels, the monitor, the atServer connection and the metrics server; a hung
    atServer connection must not hold the exit for long."""
    with contextlib.suppress(Exception, asyncio.CancelledError, asyncio.TimeoutError):
        await asyncio.wait_for(npd.close(), 5.0)
    with contextlib.suppress(Exception, asyncio.CancelledError, asyncio.TimeoutError):
        await asyncio.wait_for(client.close(), 0.5)
    if metrics is not None:
        with contextlib.suppress(Exception, asyncio.CancelledError, asyncio.TimeoutError):
            await asyncio.wait_for(metrics.close(), 0.5)
    s = npd.stats
    log.info("stopped: %d ping(s) answered, %d session(s), %d dropped, %d duplicate(s)",
             s.pings_answered, s.sessions_total, sum(s.dropped.values()), s.duplicates)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    if prog is None:
        prog = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "npd"
        if prog not in ("npd", "sshnpd"):
            prog = "npd"
    args = parse_args(argv, prog)
    # the daemon's own lines (ready, sessions, drops, stop) are shown unless -q
    setup_logging(prog, args.verbose, args.quiet, own=("noports.daemon",))
    return run(serve(args), no_uvloop=args.no_uvloop)
