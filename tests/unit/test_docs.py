"""The operator documentation stays true: docs/<program>.md, docs/exit-codes.md, the example
systemd units and the README, checked against the programs' real parsers and --help output.

No sockets: parsers are run in this process, --help in child processes (docs/sync_help.py).
"""

from __future__ import annotations

import argparse
import configparser
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"

#: page -> the command it documents (a key of docs/sync_help.py COMMANDS)
PAGES = {
    "atserver.md": "atserver",
    "at_activate.md": "at_activate",
    "srvd.md": "srvd",
    "npd.md": "npd",
    "npt.md": "npt",
    "noports-demo.md": "noports demo",
}


def _parsers() -> dict[str, tuple[argparse.ArgumentParser, callable]]:
    """program -> (its parser, a function that parses argv like the program does)."""
    from noports.at import activate
    from noports.atserver import cli as atserver_cli
    from noports.client import cli as npt_cli
    from noports.daemon import cli as npd_cli
    from noports.demo import cli as demo_cli
    from noports.relay import cli as srvd_cli

    return {
        "atserver": (atserver_cli.build_parser(), atserver_cli.build_parser().parse_args),
        "at_activate": (activate._parser(), activate._parser().parse_args),
        "srvd": (srvd_cli.build_parser(), srvd_cli.parse_args),
        "npd": (npd_cli.build_parser(), npd_cli.parse_args),
        "sshnpd": (npd_cli.build_parser("sshnpd"), lambda a: npd_cli.parse_args(a, "sshnpd")),
        "npt": (npt_cli.build_parser(), npt_cli.parse_args),
        "noports demo": (demo_cli.build_parser(), demo_cli.build_parser().parse_args),
    }


def _accepts(program: str, argv: list[str]) -> str | None:
    """None if ``program`` accepts ``argv``, else what it said."""
    _, parse = _parsers()[program]
    try:
        parse(argv)
    except SystemExit as exc:
        return f"{program} {shlex.join(argv)}: exit {exc.code}"
    return None


def _code_blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


def _commands_in(text: str) -> list[tuple[str, list[str]]]:
    """Every command line of a known program in the page's ```sh blocks (also inside
    ``$(...)``), as (program, argv)."""
    found = []
    for block in _code_blocks(text, "sh"):
        for line in block.splitlines():
            inner = re.findall(r"\$\(([^()]*)\)", line)
            for part in [*inner, re.sub(r"\$\([^()]*\)", "X", line)]:
                for cmd in re.split(r"&&|\|\||;", part):
                    words = shlex.split(cmd)
                    if not words:
                        continue
                    if words[0] == "noports" and len(words) > 1:
                        words = [f"noports {words[1]}", *words[2:]]
                    if words[0] in _parsers():
                        found.append((words[0], words[1:]))
    return found


def _table_codes(text: str, program: str | None = None) -> set[int]:
    """Exit codes in a page's "Exit codes" table (or, in exit-codes.md, one program's rows)."""
    codes: set[int] = set()
    section = text.split("## Exit codes", 1)[-1] if program is None else text
    current = None
    for row in re.findall(r"^\|(.*)\|$", section, re.M):
        cells = [c.strip() for c in row.split("|")]
        if program is not None:
            if cells[0]:
                current = re.sub(r"[\[\]`]|\(.*?\)", "", cells[0]).split()[0]
            if current != program:
                continue
            cell = cells[1]
        else:
            cell = cells[0]
        m = re.fullmatch(r"(\d+)(?:–(\d+))?", cell)
        if m:
            lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
            codes |= set(range(lo, hi + 1))
    return codes


def _help_block(text: str) -> str:
    m = re.search(r"<!-- help: [^>]+ -->\n```text\n(.*?)```\n<!-- /help -->", text, re.S)
    assert m, "no generated --help block"
    return m.group(1)


# --- the pages ------------------------------------------------------------------------------------

@pytest.mark.skipif(not (3, 11) <= sys.version_info[:2] < (3, 13),
                    reason="argparse words --help differently on 3.10 and 3.13+; the blocks "
                           "are generated on 3.11/3.12")
def test_help_blocks_are_the_programs_real_help_output():
    proc = subprocess.run([sys.executable, str(DOCS / "sync_help.py"), "--check"],
                          capture_output=True, text=True, timeout=300, cwd=str(REPO))
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("page", sorted(PAGES))
def test_every_flag_of_the_program_is_on_its_page(page):
    text = (DOCS / page).read_text()
    parser, _ = _parsers()[PAGES[page]]
    missing = [opt for action in parser._actions for opt in action.option_strings
               if not re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", text)]
    assert missing == [], f"{page} does not mention {missing}"


@pytest.mark.parametrize("page", sorted(PAGES))
def test_every_example_on_the_page_is_accepted_by_the_program(page):
    text = (DOCS / page).read_text()
    commands = _commands_in(text)
    assert any(program == PAGES[page] for program, _ in commands), f"{page} has no example"
    assert [_accepts(p, argv) for p, argv in commands] == [None] * len(commands)


@pytest.mark.parametrize("page", sorted(PAGES))
def test_exit_code_tables_agree_with_help_and_the_summary(page):
    text = (DOCS / page).read_text()
    table = _table_codes(text)
    assert 0 in table and 2 in table, page
    in_help = {int(c) for c in re.findall(r"^ +(\d+)  \S", _help_block(text).split(
        "exit codes:", 1)[-1], re.M)} if "exit codes:" in _help_block(text) else None
    if in_help is not None:                    # srvd's --help lists none: checked by hand
        assert table == in_help, page
    summary = (DOCS / "exit-codes.md").read_text()
    name = PAGES[page].split()[-1] if PAGES[page] != "noports demo" else "noports"
    assert _table_codes(summary, name) == table, page


def test_a_bad_example_would_be_caught():
    """The example check is not vacuous: a flag the program does not have is refused."""
    assert _accepts("srvd", ["-a", "@r", "-i", "127.0.0.1", "--no-such-flag"]) is not None
    assert _accepts("npd", ["-a", "@d", "-m", ""]) is not None


# --- systemd units -------------------------------------------------------------------------------

UNITS = sorted((DOCS / "systemd").glob("*.service"))


@pytest.mark.parametrize("unit", UNITS, ids=[u.name for u in UNITS])
def test_systemd_unit_runs_its_program_with_flags_it_accepts(unit):
    cfg = configparser.ConfigParser(interpolation=None, strict=False)
    cfg.optionxform = str
    cfg.read(unit)
    words = shlex.split(cfg["Service"]["ExecStart"])
    program = Path(words[0]).name
    assert program == unit.stem, (unit.name, words[0])
    assert _accepts(program, words[1:]) is None


# --- README --------------------------------------------------------------------------------------

def test_readme_links_every_page_and_unit_and_runs_the_demo():
    readme = (REPO / "README.md").read_text()
    for page in [*PAGES, "exit-codes.md"]:
        assert f"(docs/{page})" in readme, page
    for unit in UNITS:
        assert f"(docs/systemd/{unit.name})" in readme, unit.name
    assert "pip install -e . && noports demo" in readme
    for program in ("noports demo", "atserver", "at_activate", "srvd", "npd", "npt"):
        assert re.search(rf"^\| `{program}`", readme, re.M), program
