"""noports.logsetup: the one -v/-q logging set-up, and every program having both flags."""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

import pytest

from noports import logsetup
from noports.logsetup import levels, setup_logging

REPO = Path(__file__).resolve().parents[2]

LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} (?P<level>[A-Z]+) +"
                  r"(?P<program>\S+)\[(?P<pid>\d+)\] (?P<logger>\S+): (?P<message>.*)$")


@pytest.fixture(autouse=True)
def restore_logging():
    """Each test starts from, and leaves, the logging state pytest had."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    named = ("noports.daemon", "noports.relay", "other")
    levels_before = {n: logging.getLogger(n).level for n in named}
    yield
    for h in root.handlers[:]:
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)
    for n, lv in levels_before.items():
        logging.getLogger(n).setLevel(lv)
    logsetup._own_set.clear()


def _emit_all(name: str) -> None:
    log = logging.getLogger(name)
    for lv in (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR):
        log.log(lv, "at %s", logging.getLevelName(lv))


def _ours(err: str) -> list[re.Match]:
    """Our handler's lines (pytest's own capture handler writes nothing to stderr)."""
    return [m for m in map(LINE.match, err.splitlines()) if m]


@pytest.mark.parametrize(("verbose", "quiet", "expected"), [
    (0, False, (logging.WARNING, logging.INFO)),
    (1, False, (logging.INFO, logging.INFO)),
    (2, False, (logging.DEBUG, logging.DEBUG)),
    (5, False, (logging.DEBUG, logging.DEBUG)),        # more v than steps: still DEBUG
    (0, True, (logging.ERROR, logging.ERROR)),
    (2, True, (logging.ERROR, logging.ERROR)),         # -q wins over -v
])
def test_level_mapping(verbose, quiet, expected):
    assert levels(verbose, quiet, own_default=logging.INFO) == expected


def test_level_mapping_without_own_loggers_follows_the_root():
    assert levels(0, False) == (logging.WARNING, logging.WARNING)
    assert levels(1, False) == (logging.INFO, logging.INFO)


def test_line_format_and_stdout_untouched(capsys):
    setup_logging("npd", 0, False, own=("noports.daemon",))
    logging.getLogger("noports.daemon").info("npd @bob ready: pid %d", 7)
    captured = capsys.readouterr()
    assert captured.out == ""
    (m,) = _ours(captured.err)
    assert m["level"] == "INFO" and m["program"] == "npd" and m["logger"] == "noports.daemon"
    assert int(m["pid"]) > 0 and m["message"] == "npd @bob ready: pid 7"
    # the level column is padded so that the program names line up
    logging.getLogger("other").warning("w")
    logging.getLogger("other").error("e")
    lines = capsys.readouterr().err.splitlines()
    assert [line.index("npd[") for line in lines] == [m.start("program")] * 2


def test_default_shows_warnings_and_the_programs_own_info(capsys):
    setup_logging("srvd", 0, False, own=("noports.relay",))
    _emit_all("other")
    _emit_all("noports.relay")
    got = [(m["logger"], m["message"]) for m in _ours(capsys.readouterr().err)]
    assert got == [("other", "at WARNING"), ("other", "at ERROR"),
                   ("noports.relay", "at INFO"), ("noports.relay", "at WARNING"),
                   ("noports.relay", "at ERROR")]


@pytest.mark.parametrize(("verbose", "lowest"), [(1, "INFO"), (2, "DEBUG")])
def test_each_v_is_one_step_more(capsys, verbose, lowest):
    setup_logging("atserver", verbose, False)
    _emit_all("other")
    got = [m["message"] for m in _ours(capsys.readouterr().err)]
    order = ["at DEBUG", "at INFO", "at WARNING", "at ERROR"]
    assert got == order[order.index(f"at {lowest}"):]


def test_quiet_is_errors_only_even_for_the_programs_own_lines(capsys):
    setup_logging("npd", 2, True, own=("noports.daemon",))
    _emit_all("other")
    _emit_all("noports.daemon")
    got = [(m["logger"], m["level"]) for m in _ours(capsys.readouterr().err)]
    assert got == [("other", "ERROR"), ("noports.daemon", "ERROR")]


def test_idempotent_one_handler_and_the_last_call_wins(capsys):
    root = logging.getLogger()
    before = len(root.handlers)
    first = setup_logging("npt", 0, False)
    second = setup_logging("npt", 1, False)
    assert first is second
    assert len(root.handlers) == before + 1
    logging.getLogger("other").info("once")
    (m,) = _ours(capsys.readouterr().err)          # one line, not two
    assert m["message"] == "once" and m["program"] == "npt"
    # a second call with another program name and no own loggers resets the first's
    setup_logging("npd", 0, False, own=("noports.daemon",))
    setup_logging("srvd/w3", 0, False)
    assert logging.getLogger("noports.daemon").level == logging.NOTSET
    logging.getLogger("noports.daemon").info("hidden now")
    logging.getLogger("noports.relay").warning("shown")
    (m,) = _ours(capsys.readouterr().err)
    assert m["program"] == "srvd/w3" and m["message"] == "shown"


def test_follows_sys_stderr_when_it_is_replaced(monkeypatch, capsys):
    import io

    setup_logging("npt", 0, False)
    swapped = io.StringIO()
    monkeypatch.setattr(sys, "stderr", swapped)
    logging.getLogger("other").warning("to the new stderr")
    assert "to the new stderr" in swapped.getvalue()


# --- every program has -v/--verbose (counted) and -q/--quiet ----------------------------------

def _console_scripts() -> dict[str, str]:
    """name -> "module:function" from pyproject's [project.scripts] (no tomllib on 3.10)."""
    text = (REPO / "pyproject.toml").read_text()
    section = text.split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    return dict(re.findall(r'^(\S+)\s*=\s*"([^"]+)"', section, re.M))


def test_the_console_scripts_are_the_ones_checked_below():
    assert set(_console_scripts()) == {"atserver", "at_activate", "srvd", "npd", "sshnpd", "npt",
                                       "noports"}


@pytest.mark.parametrize("name", sorted(_console_scripts()))
def test_every_console_script_has_v_and_q_in_its_help(name, capsys):
    import importlib

    module, func = _console_scripts()[name].split(":")
    main = getattr(importlib.import_module(module), func)
    commands = [[]] if name != "noports" else [[], ["demo"]]
    for sub in commands:
        try:
            code = main([*sub, "--help"])
        except SystemExit as exc:
            code = exc.code
        assert code in (0, None)
        out = capsys.readouterr().out
        assert re.search(r"^\s+-v, --verbose\s", out, re.M), (name, sub, out)
        assert re.search(r"^\s+-q, --quiet\s", out, re.M), (name, sub, out)


def _parsers():
    from noports.at.activate import _parser as activate_parser
    from noports.atserver.cli import build_parser as atserver_parser
    from noports.client.cli import build_parser as npt_parser
    from noports.daemon.cli import build_parser as npd_parser
    from noports.demo.cli import build_parser as demo_parser
    from noports.relay.cli import build_parser as srvd_parser

    return {
        "atserver": (atserver_parser(), ["--state-dir", "/tmp/x"]),
        "at_activate": (activate_parser(), ["-a", "@a", "-c", "s"]),
        "srvd": (srvd_parser(), ["-a", "@r", "-i", "127.0.0.1"]),
        "npd": (npd_parser(), ["-a", "@d", "-m", "@c"]),
        "npt": (npt_parser(), ["-f", "@c"]),
        "noports demo": (demo_parser(), []),
    }


@pytest.mark.parametrize("name", ["atserver", "at_activate", "srvd", "npd", "npt",
                                  "noports demo"])
def test_every_parser_counts_v_and_takes_q(name):
    parser, required = _parsers()[name]
    args = parser.parse_args([*required])
    assert (args.verbose, args.quiet) == (0, False)
    args = parser.parse_args([*required, "-vv", "-q"])
    assert (args.verbose, args.quiet) == (2, True)
    args = parser.parse_args([*required, "--verbose", "--quiet", "-v"])
    assert (args.verbose, args.quiet) == (2, True)


def test_the_srvd_worker_takes_v_and_q():
    from noports.relay.worker import _parse

    args = _parse(["--fd", "3", "--index", "1", "--parent", "1", "--config", "{}", "-vv", "-q"])
    assert (args.verbose, args.quiet) == (2, True)


def test_noports_hands_leading_v_and_q_to_the_command(monkeypatch):
    import noports.cli as umbrella
    import noports.demo.cli as demo

    seen = []
    monkeypatch.setattr(demo, "main", lambda argv, prog: seen.append((argv, prog)) or 0)
    assert umbrella.main(["-vv", "--quiet", "demo", "--size", "0"]) == 0
    assert seen == [(["-vv", "--quiet", "--size", "0"], "noports demo")]
