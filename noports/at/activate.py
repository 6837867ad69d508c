"""``at_activate``: onboard an atSign with its CRAM secret and write its .atKeys file.

Owns the legacy onboarding sequence of spec atprotocol.md §6.2: generate keys, ``from`` +
``cram``, ``update:privatekey:at_pkam_publickey``, then PKAM on a fresh connection (which proves
the new keys work), ``update:public:publickey@x``, ``delete:privatekey:at_secret``.  The keys
file is written after the PKAM login succeeded and before the CRAM secret is deleted, so a
failure can never leave an atSign whose secret is gone and whose keys were not saved.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from noports.at.atkeys import AtKeys, default_keys_path
from noports.at.client import AtClient
from noports.at.connection import CA_FILE_ENV, AtConnectionError, AtTimeoutError, make_ssl_context
from noports.at.names import normalize_atsign
from noports.at.root import DEFAULT_ROOT, AtSignNotFoundError, RootClient, parse_root_address
from noports.cliflags import add_root_flags, add_version_flag
from noports.errors import AtServerError, InvalidAtSignError, NoPortsError
from noports.logsetup import add_flags as add_log_flags
from noports.logsetup import setup_logging

__all__ = ["EXIT", "activate", "main"]

log = logging.getLogger("at_activate")

#: Exit codes (also listed in --help).
EXIT = {
    "ok": 0,
    "error": 1,           # anything unexpected
    "usage": 2,           # bad arguments (argparse)
    "exists": 3,          # keys file exists and --force not given
    "unreachable": 4,     # root or atServer cannot be reached / TLS not trusted / timeout
    "not_found": 5,       # the root has no atServer for this atSign
    "auth": 6,            # CRAM (or the follow-up PKAM) login refused: wrong secret, or
                          # the atSign is already activated
    "server": 7,          # the atServer refused an onboarding step
    "write": 8,           # the keys file could not be written
}

_EPILOG = """\
exit codes:
  0  activated; keys written
  1  unexpected error
  2  bad arguments
  3  the keys file already exists (use --force to overwrite)
  4  cannot reach the root or the atServer (network, TLS trust, timeout)
  5  the root directory does not know this atSign
  6  login refused: wrong CRAM secret, or the atSign is already activated
  7  the atServer refused an onboarding step
  8  the keys file could not be written

The default root, root.atsign.org:64, is Atsign's public directory; it cannot be reached
without Internet access (use --root-domain with your own `atserver`).
"""


class _WriteError(NoPortsError):
    pass


async def activate(atsign: str, cram_secret: str, *, root: str = DEFAULT_ROOT,
                   ca_file: str | None = None, keys_path: str | os.PathLike | None = None,
                   force: bool = False, server: str | None = None,
                   timeout: float = 10.0) -> Path:
    """Onboard ``atsign``; return the path of the written .atKeys file."""
    atsign = normalize_atsign(atsign)
    path = Path(keys_path) if keys_path else default_keys_path(atsign)
    if path.exists() and not force:
        raise FileExistsError(str(path))
    ctx = make_ssl_context(ca_file)
    root_client = RootClient(root, ctx, timeout=timeout)
    keys = AtKeys.generate(atsign)
    common = {"root_client": root_client, "ssl_context": ctx, "server": server,
              "request_timeout": timeout, "connect_timeout": timeout}

    async with AtClient(atsign, cram_secret=cram_secret, **common) as cram:
        log.info("CRAM login as %s succeeded; storing the PKAM public key", atsign)
        await cram.execute(f"update:privatekey:at_pkam_publickey {keys.pkam_public_b64}")

    async with AtClient(atsign, keys, pkam_form="legacy", **common) as client:
        log.info("PKAM login with the new keys succeeded; writing %s", path)
        try:
            if path.exists() and not force:  # created meanwhile by someone else
                raise FileExistsError(str(path))
            keys.save(path)
        except FileExistsError:
            raise
        except OSError as exc:
            raise _WriteError(f"cannot write {path}: {exc}") from exc
        await client.update(f"public:publickey{atsign}", keys.encrypt_public_b64)
        await client.delete("privatekey:at_secret")
    return path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="at_activate",
        description="Activate (onboard) an atSign with its CRAM secret: generate its keys, "
                    "register them with its atServer and write its .atKeys file.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-a", "--atsign", required=True, help="the atSign to activate, e.g. @alice")
    p.add_argument("-c", "--cram-secret", required=True,
                   help="the atSign's CRAM secret (from the atServer's operator)")
    add_root_flags(p, root_short="-r",
                   root_help=f"root directory (default {DEFAULT_ROOT}, needs Internet access)",
                   ca_help=f"PEM CA bundle to trust instead of the system store "
                           f"(default ${CA_FILE_ENV})")
    p.add_argument("-k", "--keys", dest="keys_path", metavar="OUT",
                   help="where to write the .atKeys file (default ~/.atsign/keys/@x_key.atKeys)")
    p.add_argument("--force", action="store_true", help="overwrite an existing keys file")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per step (default 10)")
    add_log_flags(p, verbose_help="log each step (-v), with protocol detail (-vv)")
    add_version_flag(p)
    return p


def _run(coro):
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is optional
        uvloop = None
    loop = uvloop.new_event_loop() if uvloop is not None else asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging("at_activate", args.verbose, args.quiet)

    def fail(code: str, message: str) -> int:
        print(f"at_activate: {message}", file=sys.stderr)
        return EXIT[code]

    try:
        atsign = normalize_atsign(args.atsign)
    except InvalidAtSignError as exc:
        return fail("usage", str(exc))
    try:
        parse_root_address(args.root_domain)
    except ValueError as exc:
        return fail("usage", f"--root-domain: {exc}")
    try:
        path = _run(activate(atsign, args.cram_secret, root=args.root_domain,
                             ca_file=args.ca_file, keys_path=args.keys_path, force=args.force,
                             timeout=args.timeout))
    except FileExistsError as exc:
        return fail("exists", f"{exc} already exists; not overwriting it (use --force)")
    except AtSignNotFoundError as exc:
        return fail("not_found", str(exc))
    except (AtConnectionError, AtTimeoutError) as exc:
        return fail("unreachable", str(exc))
    except _WriteError as exc:
        return fail("write", str(exc))
    except AtServerError as exc:
        if exc.code == "AT0401":
            return fail("auth", f"login as {atsign} refused ({exc}); wrong CRAM secret, or "
                                "the atSign is already activated")
        return fail("server", f"the atServer refused: {exc}")
    except NoPortsError as exc:
        return fail("error", str(exc))
    print(f"activated {atsign}; keys written to {path}")
    return EXIT["ok"]


if __name__ == "__main__":
    sys.exit(main())
