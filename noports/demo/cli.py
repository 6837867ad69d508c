"""``noports demo`` (also ``python -m noports.demo``): the command line of the demo.

Owns the flags, the temporary state directory (always removed at the end), the signals and the
exit codes: 0 every phase passed (with ``--keep``: also after the Ctrl-C that ends it), 1 a phase
failed (the message names it), 2 bad flags, 130 interrupted by Ctrl-C/SIGINT (143: SIGTERM)
before the end.  Whatever happens, the programs it started are stopped before it exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from noports import __version__
from noports._speedups import describe
from noports.cliflags import add_version_flag
from noports.demo.stack import Demo, DemoOptions, PhaseFailed, Phases
from noports.logsetup import add_flags as add_log_flags
from noports.logsetup import setup_logging

__all__ = ["EXIT_CODES", "build_parser", "main"]

EXIT_OK, EXIT_FAILED = 0, 1
EXIT_CODES = (
    (0, "every phase passed (--keep: also when Ctrl-C then ends it)"),
    (1, "a phase failed; the message names it and shows the program's last output lines"),
    (2, "bad command line"),
    (130, "interrupted by Ctrl-C (SIGINT) before the end; everything stopped and removed"),
    (143, "stopped by SIGTERM before the end; everything stopped and removed"),
)

DESCRIPTION = """\
Run the whole NoPorts stack on this machine, on 127.0.0.1 only, and use it: an embedded root
directory + atServer for three fresh atSigns (activated), the relay (srvd), the daemon (npd),
a web service, and a tunnel to it (npt -x); then a page and --size MiB each way through the
tunnel, sha256-checked and timed.  Each phase prints its time.  Everything lives in a
temporary directory that is removed at the end; Ctrl-C stops it all at any time."""


def _size(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number of MiB: {text!r}") from None
    if not 0 <= value <= 1 << 20:
        raise argparse.ArgumentTypeError(f"must be 0..1048576 MiB, got {value}")
    return value


def build_parser(prog: str = "noports demo") -> argparse.ArgumentParser:
    epilog = "exit codes:\n" + "\n".join(f"  {c:>3}  {t}" for c, t in EXIT_CODES)
    p = argparse.ArgumentParser(prog=prog, description=DESCRIPTION, epilog=epilog,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=_size, default=256, metavar="MIB",
                   help="MiB to download and then upload through the tunnel (default 256; "
                        "0 = only the page)")
    p.add_argument("--keep", action="store_true",
                   help="after the phases, leave the stack running, print the atserver, srvd, "
                        "npd and npt commands to do the same by hand, and wait for Ctrl-C")
    add_log_flags(p, verbose_help="the demo's own log lines on stderr (-v info, -vv debug); "
                                  "the programs it runs log to their own files")
    add_version_flag(p)
    return p


async def _main(opts: DemoOptions, state_dir: Path, phases: Phases) -> int:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    got: dict[str, int | None] = {"signal": None}
    stopping = False

    def cancel_main() -> None:
        # again until it takes: before 3.12 a wait_for() that completes at the same moment
        # can swallow a cancellation
        if not stopping:
            task.cancel()
            loop.call_later(1.0, cancel_main)

    def on_signal(sig: int) -> None:
        if got["signal"] is None:
            got["signal"] = sig
            cancel_main()
        elif not demo.hurry:
            demo.hurry = True
            phases.say("  (stopping faster: whatever has not stopped 1 s after its signal gets "
                       "SIGKILL)")

    demo = Demo(opts, state_dir, phases)
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    failure: PhaseFailed | None = None
    waiting = False
    code = EXIT_OK
    try:
        try:
            await demo.run()
            if opts.keep:
                demo.print_commands()
                waiting = True
                await demo.watch()
        except PhaseFailed as exc:
            failure = exc
            code = EXIT_FAILED
        except asyncio.CancelledError:
            if got["signal"] is None:
                raise
            # our own cancellation (a signal): carry on with stopping everything
            uncancel = getattr(task, "uncancel", None)
            while uncancel is not None and task.cancelling():
                uncancel()
            if waiting and got["signal"] == signal.SIGINT:
                code = EXIT_OK                 # --keep: Ctrl-C is how it is meant to end
            else:
                code = 128 + int(got["signal"])
                phases.say(f"  interrupted ({signal.Signals(got['signal']).name}); stopping")
    finally:
        stopping = True
        if failure is not None:
            phases.failed(failure)
        problems = await _stop(demo, state_dir, phases)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    if problems and code == EXIT_OK:
        phases.failed(PhaseFailed("stop", "; ".join(problems)))
        code = EXIT_FAILED
    elif problems:
        phases.say(f"  (also at stop: {'; '.join(problems)})")
    if code == EXIT_OK and not opts.keep:
        moved = f"page + 2 x {opts.size_mib} MiB" if opts.size_mib else "page"
        phases.say(f"OK: {moved} through an end-to-end encrypted NoPorts tunnel; "
                   f"{phases.total():.1f} s in all")
    elif code == EXIT_OK:
        phases.say(f"OK: stopped after {phases.total():.1f} s")
    elif code == EXIT_FAILED and failure is not None:
        phases.say(f"FAILED in the {failure.phase} phase (exit {code})")
    return code


async def _stop(demo: Demo, state_dir: Path, phases: Phases) -> list[str]:
    """The ``stop`` phase: every program stopped, the state directory removed; the problems."""
    try:
        with phases.run("stop") as ph:
            problems = await demo.stop()
            shutil.rmtree(state_dir, ignore_errors=True)
            if state_dir.exists():
                problems.append(f"could not remove {state_dir}")
            ph.text = (f"{', '.join(demo.stopped) or 'nothing was running'}"
                       f"{' stopped' if demo.stopped else ''}; state directory "
                       f"{'removed' if not state_dir.exists() else 'NOT removed'}")
    except PhaseFailed as exc:               # a bug in stopping: say so, still exit
        return [exc.message]
    return problems


def main(argv: list[str] | None = None, prog: str = "noports demo") -> int:
    args = build_parser(prog).parse_args(argv)
    setup_logging(prog.replace(" ", "-"), args.verbose, args.quiet)
    opts = DemoOptions(size_mib=args.size, keep=args.keep)
    state_dir = Path(tempfile.mkdtemp(prefix="noports-demo-"))
    phases = Phases()
    try:
        phases.say(f"{prog} {__version__}: the NoPorts stack on 127.0.0.1 ({describe()})")
        phases.say(f"state directory {state_dir} (removed at the end)")
        # the stock loop: the programs use uvloop; the demo's own part is hashing, not I/O
        loop = asyncio.new_event_loop()
        try:
            return loop.run_until_complete(_main(opts, state_dir, phases))
        finally:
            with contextlib.suppress(Exception):
                loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
    except KeyboardInterrupt:         # before the signal handlers were in place: nothing started
        return 130
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
