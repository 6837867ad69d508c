"""``npt`` (``python -m noports.client``): the command line and process lifecycle of the client.

Owns Atsign's npt flags (noports-protocol.md §9.1; ``-h`` is ``--remote-host`` as there, so help
is ``--help`` only) plus ours (``--ca-file``, ``--local-host``, ``--version``, ``--no-uvloop``),
checking them before anything touches the network, the exit codes (listed in ``--help``, from
``phases.EXIT_CODES``), the event loop, the signals, and the two ways to run:

* foreground (default): progress on stderr, the local port alone on stdout once the tunnel is
  up, then run until Ctrl-C/SIGTERM (exit 0) or until the tunnel ends (idle: exit 0; the relay
  or the daemon gone: a message naming the phase, non-zero);
* ``-x``: the same session in a detached background process (``detach.py``); this process
  prints the port alone on the last line of stdout and exits 0 once the tunnel is up.
* ``-K``: sessions back to back, re-created after each end (``keepalive.py``);
* ``--list-devices``: list the devices shared with us and whether they answer (``listing.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import time
from typing import TYPE_CHECKING

from noports.at.atkeys import default_keys_path
from noports.at.names import normalize_atsign, validate_device_name
from noports.client import debug
from noports.client.detach import Handoff, run_detached
from noports.client.keepalive import KEEP_ALIVE_TIMEOUT_S
from noports.client.keygen import EphemeralKey
from noports.client.listing import LIST_TIMEOUT
from noports.client.phases import DEFAULT_TIMEOUT_S, EXIT_CODES, PhaseError, ended_error
from noports.cliflags import (
    add_key_file_flag,
    add_root_flags,
    add_version_flag,
    check_root_domain,
)

if TYPE_CHECKING:  # pragma: no cover
    from noports.client.session import Progress, SessionOptions
from noports.errors import InvalidAtSignError, InvalidDeviceNameError, NoPortsError
from noports.logsetup import add_flags as add_log_flags
from noports.logsetup import setup_logging
from noports.messages import MessageError, parse_duration

__all__ = ["build_parser", "main", "options_from_args", "parse_args"]

log = logging.getLogger("noports.client")

EXIT_INTERRUPTED = 130
#: When this process began, near enough (progress times count from here).
_STARTED = time.monotonic()


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a TCP port: {text!r}") from None
    if not 0 <= value < 65536:
        raise argparse.ArgumentTypeError(f"not a TCP port: {text}")
    return value


def _seconds_or_zero(text: str) -> float:
    return 0.0 if text.strip() in ("0", "0.0") else _seconds(text)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"must be > 0 and <= 3600 seconds, got {text}")
    return value


def _duration(text: str) -> int:
    try:
        return parse_duration(text)
    except MessageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=34)


def _epilog() -> str:
    lines = ["exit codes:"]
    lines += [f"  {code:>3}  {what}" for code, what in EXIT_CODES]
    lines += [
        "",
        "The tunnel's local port is printed alone on stdout (with -x: the last line); progress",
        "and errors go to stderr.  Every error names the phase that failed.",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="npt", add_help=False, formatter_class=_HelpFormatter, epilog=_epilog(),
        description="NoPorts tunnel: reach a TCP port on a device's network through a relay, "
                    "with no inbound port open on the device.  Asks the relay (-r) for a "
                    "session, asks the device daemon (-t, -d) to connect it to -h:-p, and "
                    "listens on a local port that leads there.")
    p.add_argument("--help", action="help", help="show this help and exit")
    # Mandatory for a tunnel, but --list-devices needs only -f: parse_args checks them (with
    # argparse's own wording) once it knows which of the two it is.
    p.add_argument("-f", "--from", dest="client", metavar="@CLIENT",
                   help="the client atSign (yours); always required")
    p.add_argument("-t", "--to", dest="daemon", metavar="@DAEMON",
                   help="the device daemon's atSign (required, except with --list-devices)")
    p.add_argument("-r", "--srvd", dest="relay", metavar="@RELAY",
                   help="the relay's atSign (required for a tunnel)")
    p.add_argument("-d", "--device", help="the device name (required for a tunnel)")
    p.add_argument("-p", "--remote-port", "--rp", dest="remote_port", type=_port,
                   metavar="PORT", help="the port to reach on the device's network "
                                        "(required for a tunnel)")
    p.add_argument("-h", "--remote-host", "--rh", dest="remote_host", default="localhost",
                   metavar="HOST", help="the host to reach, as the device sees it "
                                        "(default localhost)")
    p.add_argument("-l", "--local-port", "--lp", dest="local_port", type=_port, default=0,
                   metavar="PORT", help="local port to listen on (default 0: any free port)")
    p.add_argument("--local-host", default="127.0.0.1", metavar="ADDRESS",
                   help="local address to listen on (default 127.0.0.1: this machine only)")
    add_key_file_flag(p, "the client's .atKeys (default ~/.atsign/keys/<@client>_key.atKeys)")
    add_root_flags(p)
    p.add_argument("--daemon-ping-timeout", "--dpt", dest="daemon_ping_timeout",
                   type=_seconds, default=20.0, metavar="SECONDS",
                   help="how long to wait for the daemon's ping response (default 20)")
    p.add_argument("-x", "--exit-when-connected", action="store_true",
                   help="once the tunnel is up, print its port, leave it running in the "
                        "background (until -T idle time passes) and exit")
    p.add_argument("-K", "--keep-alive", dest="keep_alive", action="store_true",
                   help="re-create the session 5 s after it ends (back-off up to 60 s), on the "
                        "same local port; runs until Ctrl-C; not with -x; sets -T to 24h "
                        "unless -T is given")
    p.add_argument("-T", "--timeout", type=_duration, default=None, metavar="DURATION",
                   help="idle timeout: the tunnel closes after this long without "
                        "connections; 30s, 1h, 1h,14m,30s, 7d; 0 = 365 days (default 30s; "
                        "24h with -K)")
    p.add_argument("--encrypt-rvd-traffic", "--et", dest="encrypt",
                   action=argparse.BooleanOptionalAction, default=True,
                   help="encrypt the traffic end to end through the relay (default on)")
    p.add_argument("--heartbeat", type=_seconds_or_zero, default=None, metavar="SECONDS",
                   help="control-channel heartbeat interval, sent only to daemons that "
                        "support them; a daemon that answers them (noports' npd) and then "
                        "goes silent for this + 5 s ends the session; 0 = none (default 15)")
    p.add_argument("--list-devices", "--ls", dest="list_devices", action="store_true",
                   help="list the devices shared with -f (those of -t only, if given): "
                        "pings each and prints a table of device, atSign, status "
                        "(active/inactive), version and permit-open, then exits")
    p.add_argument("--json", action="store_true",
                   help="with --list-devices: print JSON instead of the table")
    p.add_argument("--list-timeout", dest="list_timeout", type=_seconds,
                   default=LIST_TIMEOUT, metavar="SECONDS",
                   help=f"with --list-devices: how long to wait for the devices' answers "
                        f"(default {LIST_TIMEOUT:g})")
    add_log_flags(p, quiet_help="no progress lines, and log errors only (overrides -v)")
    p.add_argument("--no-uvloop", action="store_true", help="use the stock asyncio event loop")
    add_version_flag(p)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check the flags; exits 2 with a message for anything wrong."""
    parser = build_parser()
    args = parser.parse_args(argv)
    needed = [("client", "-f/--from")]
    if not args.list_devices:
        needed += [("daemon", "-t/--to"), ("relay", "-r/--srvd"), ("device", "-d/--device"),
                   ("remote_port", "-p/--remote-port")]
    missing = [flag for name, flag in needed if getattr(args, name) is None]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)}")
    for name, flag in (("client", "-f/--from"), ("daemon", "-t/--to"), ("relay", "-r/--srvd")):
        if getattr(args, name) is None:
            continue
        try:
            setattr(args, name, normalize_atsign(getattr(args, name)))
        except InvalidAtSignError as exc:
            parser.error(f"{flag}: {exc}")
    if args.device is not None:
        try:
            args.device = validate_device_name(args.device)
        except InvalidDeviceNameError as exc:
            parser.error(f"-d/--device: {exc}")
    if args.keep_alive and args.exit_when_connected:
        parser.error("-K/--keep-alive and -x/--exit-when-connected cannot be used together "
                     "(-x leaves the tunnel to a background process that ends with it)")
    if args.list_devices and (args.keep_alive or args.exit_when_connected):
        parser.error("--list-devices lists and exits: not with -K or -x")
    if args.json and not args.list_devices:
        parser.error("--json goes with --list-devices")
    if args.timeout is None:
        args.timeout = KEEP_ALIVE_TIMEOUT_S if args.keep_alive else DEFAULT_TIMEOUT_S
    if args.list_devices:
        if args.key_file is None:
            args.key_file = default_keys_path(args.client)
        check_root_domain(parser, args)
        return args
    if args.remote_port == 0:
        parser.error("-p/--remote-port: must be 1..65535")
    host = args.remote_host.strip()
    if not host or any(ch.isspace() or ch == "," for ch in host):
        parser.error(f"-h/--remote-host: not a host name: {args.remote_host!r}")
    args.remote_host = host
    check_root_domain(parser, args)
    if args.key_file is None:
        args.key_file = default_keys_path(args.client)
    return args


def options_from_args(args: argparse.Namespace) -> SessionOptions:
    from noports.client.session import SessionOptions

    return SessionOptions(
        client=args.client, daemon=args.daemon, relay=args.relay, device=args.device,
        remote_port=args.remote_port, remote_host=args.remote_host,
        local_port=args.local_port, local_host=args.local_host, key_file=args.key_file,
        root_domain=args.root_domain, ca_file=args.ca_file,
        daemon_ping_timeout=args.daemon_ping_timeout, timeout_s=args.timeout,
        encrypt=args.encrypt,
        **({} if args.heartbeat is None else {"heartbeat": args.heartbeat}))


def _stop_event():
    """An event Ctrl-C / SIGTERM set (instead of raising KeyboardInterrupt mid-await)."""
    import asyncio

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    return stop


async def _serve_keep_alive(opts: SessionOptions, progress: Progress,
                            ephemeral: EphemeralKey) -> int:
    """-K: sessions back to back until Ctrl-C (keepalive.py)."""
    from noports.client.keepalive import keep_alive

    return await keep_alive(opts, progress, ephemeral, _stop_event())


async def _list(args: argparse.Namespace, progress: Progress) -> int:
    """--list-devices: log in, list, print; exit 0 even when no device answers."""
    import asyncio

    from noports.at.atkeys import AtKeys
    from noports.at.client import AtClient
    from noports.client.listing import list_devices, render_json, render_table

    try:
        keys = AtKeys.load(args.key_file, args.client)
    except (NoPortsError, OSError, ValueError) as exc:
        err = PhaseError("keys", f"cannot read the keys of {args.client} from "
                                 f"{args.key_file}: {exc}")
        progress.error(str(err))
        return err.exit_code
    client = AtClient(args.client, keys, root=args.root_domain, ca_file=args.ca_file)
    stop = _stop_event()
    daemons = [args.daemon] if args.daemon else None

    async def work():
        try:
            await asyncio.wait_for(client.connect(), 20.0)
        except (NoPortsError, OSError, ValueError, asyncio.TimeoutError) as exc:
            raise PhaseError("atserver", f"cannot log in as {args.client}: "
                                         f"{exc or type(exc).__name__}") from None
        progress.step("atserver", f"logged in as {args.client}")
        progress.step("list", f"looking for devices{' of ' + args.daemon if daemons else ''}; "
                              f"pinging them for up to {args.list_timeout:g} s")
        try:
            return await list_devices(client, daemons, device=args.device,
                                      timeout=args.list_timeout)
        except (NoPortsError, OSError, asyncio.TimeoutError) as exc:
            raise PhaseError("atserver", f"cannot list the devices: "
                                         f"{exc or type(exc).__name__}") from None

    task = asyncio.ensure_future(work())
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            progress.error("interrupted")
            return EXIT_INTERRUPTED
        try:
            rows = task.result()
        except PhaseError as exc:
            progress.error(str(exc))
            return exc.exit_code
    finally:
        stopper.cancel()
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await asyncio.wait_for(client.close(), 2.0)
    text = (render_json(rows, timeout=args.list_timeout) if args.json
            else render_table(rows, timeout=args.list_timeout, daemons=daemons))
    sys.stdout.write(text)
    sys.stdout.flush()
    return 0


async def _serve(opts: SessionOptions, progress: Progress, ephemeral: EphemeralKey,
                 handoff: Handoff | None) -> int:
    """One session from set-up to its end; the exit status."""
    import asyncio

    from noports.client.session import NptSession

    stop = _stop_event()
    session = NptSession(opts, progress, ephemeral=ephemeral)
    stopper = asyncio.ensure_future(stop.wait())
    try:
        setup = asyncio.ensure_future(session.establish())
        await asyncio.wait({setup, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if not setup.done():
            setup.cancel()
            await asyncio.gather(setup, return_exceptions=True)
            progress.error("interrupted before the tunnel was up")
            return EXIT_INTERRUPTED
        try:
            port = setup.result()
        except PhaseError as exc:
            progress.error(str(exc))
            return exc.exit_code
        progress.step("ready", f"tunnel up in {progress.elapsed_ms():.0f} ms: connect to "
                               f"{opts.local_host}:{port}")
        try:
            if handoff is not None:
                handoff.ready(port)
            else:
                sys.stdout.write(f"{port}\n")
                sys.stdout.flush()
        except OSError as exc:
            # nobody will ever learn the port: do not leave a tunnel nobody can use
            log.warning("cannot report the port (%s); closing the session", exc)
            return 1
        closed = asyncio.ensure_future(session.wait_closed())
        await asyncio.wait({closed, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if not closed.done():
            closed.cancel()
            progress.step("session", "stopping on request")
            return 0
        ended = closed.result()
        err = ended_error(ended)
        if err is not None:
            progress.error(str(err))
            return err.exit_code
        progress.step("session", f"closed: {ended.message if ended else 'done'}")
        return 0
    finally:
        stopper.cancel()
        await session.close()


def _new_loop(no_uvloop: bool):
    import asyncio

    if not no_uvloop:
        try:
            import uvloop
            return uvloop.new_event_loop()
        except ImportError:  # pragma: no cover - platforms without uvloop
            pass
    return asyncio.new_event_loop()


def _run(args: argparse.Namespace, handoff: Handoff | None) -> int:
    """Run one session in this process (foreground, or the -x runner)."""
    # Forked first, while this process has no thread and no loop (see keygen.py), and before
    # the network stack is imported: the key is made on the other core meanwhile.
    ephemeral = EphemeralKey.start()
    from noports.client.session import Progress

    opts = options_from_args(args)
    progress = Progress(quiet=args.quiet, started=_STARTED)
    debug.install_connection_hook()
    loop = _new_loop(args.no_uvloop)
    main = (_serve_keep_alive(opts, progress, ephemeral) if args.keep_alive
            else _serve(opts, progress, ephemeral, handoff))
    try:
        return loop.run_until_complete(main)
    except NoPortsError as exc:            # pragma: no cover - every phase maps its own errors
        progress.error(str(exc))
        return 1
    except Exception as exc:
        log.error("internal error", exc_info=exc)
        progress.error(f"internal error: {type(exc).__name__}: {exc}")
        return 1
    finally:
        ephemeral.close()
        with contextlib.suppress(Exception):
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()


def _run_list(args: argparse.Namespace) -> int:
    from noports.client.session import Progress

    progress = Progress(quiet=args.quiet, started=_STARTED)
    loop = _new_loop(args.no_uvloop)
    try:
        return loop.run_until_complete(_list(args, progress))
    except Exception as exc:
        log.error("internal error", exc_info=exc)
        progress.error(f"internal error: {type(exc).__name__}: {exc}")
        return 1
    finally:
        with contextlib.suppress(Exception):
            loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging("npt", args.verbose, args.quiet)
    if args.list_devices:
        return _run_list(args)
    if args.exit_when_connected:
        return run_detached(lambda handoff: _run(args, handoff), quiet=args.quiet)
    return _run(args, None)
