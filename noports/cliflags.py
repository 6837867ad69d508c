"""The command-line flags that several noports programs share, defined once.

Owns the spelling, type, default and metavar of each shared flag: ``--version`` (every
program), ``--root-domain`` + ``--ca-file`` (srvd, npd, npt, at_activate), ``-k/--key-file``
(srvd, npd, npt: the program's own .atKeys) and ``--metrics-port`` + ``--metrics-host`` (srvd,
npd).  The programs decide where in their ``--help`` each group stands (argparse lists flags in
the order they are added) and pass their own help text where theirs says something the shared
one does not (whose keys, which default).  ``-v``/``-q`` live in :mod:`noports.logsetup`.

The flag names of srvd, npd and npt follow Atsign's binaries (noports-protocol.md): never rename
one here.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from noports import __version__
from noports._speedups import describe
from noports.at.connection import CA_FILE_ENV
from noports.at.root import DEFAULT_ROOT, parse_root_address

__all__ = ["add_key_file_flag", "add_metrics_flags", "add_root_flags", "add_version_flag",
           "check_root_domain"]

ROOT_HELP = f"atDirectory (root) server (default {DEFAULT_ROOT})"
CA_HELP = ("PEM bundle to trust for atServer TLS instead of the system store "
           f"(default ${CA_FILE_ENV})")


class _Version(argparse.Action):
    """``--version``: two unwrapped lines (argparse's own version action re-wraps the text),
    acted on as soon as it is seen, so before any required flag is missed."""

    def __init__(self, option_strings, dest, program: str | None = None, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs=0, **kwargs)
        self.program = program

    def __call__(self, parser, namespace, values, option_string=None):
        sys.stdout.write(f"{self.program or parser.prog} (noports) {__version__}\n"
                         f"{describe()}\n")
        sys.stdout.flush()
        parser.exit(0)


def add_version_flag(parser: argparse.ArgumentParser, program: str | None = None) -> None:
    """``--version``: ``<program> (noports) <version>`` and the live data-plane implementation.

    ``program`` defaults to the parser's prog (npd passes ``npd`` so sshnpd says the same)."""
    parser.add_argument("--version", action=_Version, program=program,
                        help="print the noports version and the data-plane implementation, exit")


def add_root_flags(parser: argparse.ArgumentParser, *, root_short: str | None = None,
                   root_help: str = ROOT_HELP, ca_help: str = CA_HELP) -> None:
    """``--root-domain HOST[:PORT]`` (default Atsign's root) and ``--ca-file`` (default
    ``$NOPORTS_CA_FILE``, else the system store): where and how the program finds atServers."""
    flags = (root_short, "--root-domain") if root_short else ("--root-domain",)
    parser.add_argument(*flags, default=DEFAULT_ROOT, metavar="HOST[:PORT]", help=root_help)
    parser.add_argument("--ca-file", default=os.environ.get(CA_FILE_ENV) or None, help=ca_help)


def check_root_domain(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exit 2 (argparse's way) if ``--root-domain`` is not ``host[:port]``; a bare host means
    Atsign's root port, 64."""
    try:
        parse_root_address(args.root_domain, default_port=64)
    except ValueError as exc:
        parser.error(f"--root-domain: {exc}")


def add_key_file_flag(parser: argparse.ArgumentParser, help: str) -> None:
    """``-k/--key-file/--keyFile`` (Atsign's spellings): the program's own .atKeys file.

    Left None when not given: the program fills in ``default_keys_path(atsign)`` once its
    atSign is known."""
    parser.add_argument("-k", "--key-file", "--keyFile", dest="key_file", type=Path, help=help)


def _port(text: str) -> int:
    # named _port as before: argparse says "invalid _port value: 'x'" for a non-number
    value = int(text)
    if not 0 <= value < 65536:
        raise argparse.ArgumentTypeError(f"not a TCP port: {text}")
    return value


def add_metrics_flags(parser: argparse.ArgumentParser, *, port_help: str) -> None:
    """``--metrics-port PORT`` (default: no metrics server) and ``--metrics-host`` (default
    127.0.0.1): the Prometheus endpoint of a long-running program."""
    parser.add_argument("--metrics-port", type=_port, metavar="PORT", help=port_help)
    parser.add_argument("--metrics-host", default="127.0.0.1", metavar="HOST",
                        help="address of the metrics server (default 127.0.0.1)")
