"""Keep the ``--help`` blocks of the program pages in docs/ true.

Each page holds its program's real ``--help`` output between two markers::

    <!-- help: srvd -->
    ```text
    ...
    ```
    <!-- /help -->

``python docs/sync_help.py`` rewrites those blocks from the installed code (run with
``COLUMNS=100`` so the wrapping does not depend on the terminal); ``--check`` changes nothing and
exits 1 with a diff when a block is stale (tests/unit/test_docs.py runs it).  argparse formats
help differently on Python 3.10 and 3.13+, so the blocks are generated, and checked, on 3.11/3.12.
"""

from __future__ import annotations

import difflib
import os
import re
import subprocess
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
REPO = DOCS.parent

#: block name -> the module command whose --help it shows
COMMANDS: dict[str, list[str]] = {
    "atserver": ["-m", "noports.atserver", "--help"],
    "at_activate": ["-m", "noports.at.activate", "--help"],
    "srvd": ["-m", "noports.relay", "--help"],
    "npd": ["-m", "noports.daemon", "--help"],
    "npt": ["-m", "noports.client", "--help"],
    "noports": ["-m", "noports.cli", "--help"],
    "noports demo": ["-m", "noports.cli", "demo", "--help"],
}

BLOCK = re.compile(r"(<!-- help: (?P<name>[^>]+?) -->\n)(?P<body>.*?)(<!-- /help -->)", re.S)


def help_text(name: str) -> str:
    env = dict(os.environ, COLUMNS="100")
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"]
                                     if env.get("PYTHONPATH") else "")
    env.pop("NOPORTS_CA_FILE", None)            # it would show up as a default
    proc = subprocess.run([sys.executable, *COMMANDS[name]], capture_output=True, text=True,
                          env=env, cwd=str(REPO), timeout=60, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{name} --help exited {proc.returncode}: {proc.stderr}")
    return proc.stdout.rstrip("\n") + "\n"


def render(text: str) -> tuple[str, list[str]]:
    """The page with every block regenerated, and the names of the blocks it holds."""
    names: list[str] = []

    def sub(m: re.Match) -> str:
        name = m.group("name")
        if name not in COMMANDS:
            raise SystemExit(f"unknown help block {name!r}")
        names.append(name)
        return f"{m.group(1)}```text\n{help_text(name)}```\n{m.group(4)}"

    return BLOCK.sub(sub, text), names


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = 0
    for page in sorted(DOCS.glob("*.md")):
        old = page.read_text()
        new, _ = render(old)
        if new == old:
            continue
        stale += 1
        if check:
            sys.stdout.writelines(difflib.unified_diff(
                old.splitlines(True), new.splitlines(True), f"{page.name} (in docs)",
                f"{page.name} (--help now)"))
        else:
            page.write_text(new)
            print(f"updated {page.relative_to(REPO)}")
    if check and stale:
        print(f"\n{stale} page(s) out of date: run `python docs/sync_help.py`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
