"""``noports``: the umbrella command (console script ``noports``).

Owns dispatching to subcommands -- today ``noports demo`` (:mod:`noports.demo.cli`) -- and
``noports --version``. ``-v``/``--verbose`` and ``-q``/``--quiet`` given before the command are
handed to it (every command takes them, see :mod:`noports.logsetup`). The programs themselves
keep their own names (``atserver``, ``at_activate``, ``srvd``, ``npd``/``sshnpd``, ``npt``), as
Atsign's binaries do.
"""

from __future__ import annotations

import importlib
import re
import sys

from noports import __version__
from noports._speedups import describe

__all__ = ["COMMANDS", "main"]

#: subcommand -> (module with ``main(argv, prog)``, one line of help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("noports.demo.cli", "run the whole stack on 127.0.0.1 and push data through a "
                                 "tunnel (noports demo --help)"),
}

USAGE = "usage: noports [--help] [--version] [-v] [-q] COMMAND [ARGS...]"
#: Flags taken before the command and handed on to it.
_LOG_FLAG = re.compile(r"^(?:-[vq]+|--verbose|--quiet)$")


def _help() -> str:
    lines = [USAGE, "", "NoPorts in Python: reach TCP services on devices that open no inbound "
             "port.", "", "commands:"]
    lines += [f"  {name:<8} {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "programs: atserver, at_activate, srvd, npd (sshnpd), npt -- each with --help",
              "", "options:", "  --help         show this help and exit",
              "  --version      print the version and the live data-plane implementation, exit",
              "  -v, --verbose  more logging on stderr (-v info, -vv debug), handed to COMMAND",
              "  -q, --quiet    log errors only (overrides -v), handed to COMMAND"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        sys.stderr.write(_help())
        return 2
    log_flags = []
    while argv and _LOG_FLAG.match(argv[0]):
        log_flags.append(argv.pop(0))
    if not argv:
        sys.stderr.write(_help())
        return 2
    first = argv[0]
    if first in ("-h", "--help", "help"):
        sys.stdout.write(_help())
        return 0
    if first == "--version":
        sys.stdout.write(f"noports {__version__}\n{describe()}\n")
        return 0
    if first in COMMANDS:
        module = importlib.import_module(COMMANDS[first][0])
        return module.main(log_flags + argv[1:], prog=f"noports {first}")
    sys.stderr.write(f"{USAGE}\nnoports: error: unknown command {first!r} "
                     f"(commands: {', '.join(COMMANDS)})\n")
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
