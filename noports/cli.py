"""``noports``: the umbrella command (console script ``noports``).

Owns dispatching to subcommands -- today ``noports demo`` (:mod:`noports.demo.cli`) -- and
``noports --version``.  The programs themselves keep their own names (``atserver``,
``at_activate``, ``srvd``, ``npd``/``sshnpd``, ``npt``), as Atsign's binaries do.
"""

from __future__ import annotations

import importlib
import sys

from noports import __version__
from noports._speedups import describe

__all__ = ["COMMANDS", "main"]

#: subcommand -> (module with ``main(argv, prog)``, one line of help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("noports.demo.cli", "run the whole stack on 127.0.0.1 and push data through a "
                                 "tunnel (noports demo --help)"),
}

USAGE = "usage: noports [--help] [--version] COMMAND [ARGS...]"


def _help() -> str:
    lines = [USAGE, "", "NoPorts in Python: reach TCP services on devices that open no inbound "
             "port.", "", "commands:"]
    lines += [f"  {name:<8} {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "programs: atserver, at_activate, srvd, npd (sshnpd), npt -- each with --help",
              "", "options:", "  --help     show this help and exit",
              "  --version  print the version and the live data-plane implementation, exit"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
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
        return module.main(argv[1:], prog=f"noports {first}")
    sys.stderr.write(f"{USAGE}\nnoports: error: unknown command {first!r} "
                     f"(commands: {', '.join(COMMANDS)})\n")
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
