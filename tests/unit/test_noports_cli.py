"""The ``noports`` umbrella command, ``--version`` of atserver / at_activate / noports demo, the
console-script table, and the demo's sans-IO parts (phase lines, phase errors, typed commands,
the generated bodies).  No sockets, no child processes."""

from __future__ import annotations

import importlib
import io
import re
from pathlib import Path

import pytest

from noports import __version__
from noports._speedups import describe

REPO = Path(__file__).resolve().parents[2]


def _version_lines(prog: str) -> list[str]:
    return [f"{prog} (noports) {__version__}", describe()]


# --- noports --------------------------------------------------------------------------------------

def test_noports_version_names_the_live_implementation(capsys):
    from noports.cli import main

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"noports {__version__}", describe()]


def test_noports_without_a_command_is_a_usage_error(capsys):
    from noports.cli import main

    assert main([]) == 2
    assert "usage: noports" in capsys.readouterr().err
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_noports_help_lists_demo(capsys):
    from noports.cli import main

    assert main(["--help"]) == 0
    assert re.search(r"^  demo +run the whole stack", capsys.readouterr().out, re.M)


def test_noports_demo_help_and_bad_size_go_through_the_dispatcher(capsys):
    from noports.cli import main

    with pytest.raises(SystemExit) as info:
        main(["demo", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: noports demo ")
    assert "130  interrupted by Ctrl-C" in out
    with pytest.raises(SystemExit) as info:
        main(["demo", "--size", "-1"])
    assert info.value.code == 2
    assert "--size: must be 0..1048576 MiB" in capsys.readouterr().err


@pytest.mark.parametrize("module, parser_fn, prog", [
    ("noports.atserver.cli", "build_parser", "atserver"),
    ("noports.at.activate", "_parser", "at_activate"),
    ("noports.demo.cli", "build_parser", "noports demo"),
])
def test_version_before_the_required_flags(capsys, module, parser_fn, prog):
    parser = getattr(importlib.import_module(module), parser_fn)()
    with pytest.raises(SystemExit) as info:
        parser.parse_args(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.splitlines() == _version_lines(prog)


def test_every_console_script_resolves_and_noports_is_one():
    text = (REPO / "pyproject.toml").read_text()
    table = text.split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    scripts = dict(re.findall(r'^(\S+) = "([^"]+)"$', table, re.M))
    assert scripts["noports"] == "noports.cli:main"
    for name, target in scripts.items():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func)), name


# --- the demo's parts ---------------------------------------------------------------------------

def test_phase_lines_are_aligned():
    from noports.demo.stack import Phases

    out = io.StringIO()
    ph = Phases(out)
    ph.line(0.5, "npt", "tunnel up")
    ph.line(123.456, "download", "fast")
    lines = out.getvalue().splitlines()
    assert lines == ["    0.50 s  npt       tunnel up", "  123.46 s  download  fast"]
    assert lines[0].index("tunnel") == lines[1].index("fast")


def test_a_failing_phase_is_named_with_the_programs_last_lines():
    from noports.demo.processes import ChildError
    from noports.demo.stack import PhaseFailed, Phases
    from noports.demo.transfer import HttpError

    out = io.StringIO()
    phases = Phases(out)
    with pytest.raises(PhaseFailed) as info, phases.run("npd"):
        raise ChildError("npd exited with code 1 before its ready line", ["boom", "bang"])
    assert (info.value.phase, info.value.tail) == ("npd", ["boom", "bang"])
    phases.failed(info.value)
    text = out.getvalue()
    assert "FAILED  npd       npd exited with code 1 before its ready line" in text
    assert text.rstrip().endswith("boom\n" + " " * 22 + "bang")
    with pytest.raises(PhaseFailed, match="page: through the tunnel: HTTP 404"), \
            phases.run("page"):
        raise HttpError("HTTP 404")
    with pytest.raises(PhaseFailed, match="stop: KeyError: 'x'"), phases.run("stop"):
        raise KeyError("x")
    # a finished phase prints its line; nothing else was printed for the failed ones
    with phases.run("web") as p:
        p.text = "ok"
    assert [line.split()[2] for line in out.getvalue().splitlines()
            if re.match(r"^ +\d+\.\d\d s ", line)] == ["web"]


def test_typed_commands_use_this_installations_scripts_or_python_m(monkeypatch, tmp_path):
    from noports.demo import stack

    prog = stack.Program("srvd", "srvd", "noports.relay", ["-a", "@relay", "-i", "127.0.0.1"])
    bindir = tmp_path / "bin"
    bindir.mkdir()
    python = bindir / "python3"
    python.write_text("")
    monkeypatch.setattr(stack.sys, "executable", str(python))
    # no console script next to this python: python -m, with the source tree on PYTHONPATH
    assert prog.typed("/src/noports repo") == (
        f"PYTHONPATH='/src/noports repo' {python} -m noports.relay -a @relay -i 127.0.0.1")
    # a console script next to it but not first on PATH (e.g. Atsign's srvd is): full path
    (bindir / "srvd").write_text("")
    monkeypatch.setenv("PATH", "/nonexistent")
    assert prog.typed(None) == f"{bindir / 'srvd'} -a @relay -i 127.0.0.1"
    # first on PATH: its bare name
    (bindir / "srvd").chmod(0o755)
    monkeypatch.setenv("PATH", str(bindir))
    assert prog.typed(None) == "srvd -a @relay -i 127.0.0.1"


def test_generated_bodies_have_the_exact_size_and_differ_per_run():
    from noports.demo.webservice import keystream_chunks, page

    sizes = [len(c) for c in keystream_chunks(3 * 1024 + 5, chunk=1024)]
    assert sizes == [1024, 1024, 1024, 5]
    a = b"".join(bytes(c) for c in keystream_chunks(4096))
    b = b"".join(bytes(c) for c in keystream_chunks(4096))
    assert len(a) == 4096 and a != b and a != bytes(4096)
    assert b"token abc123" in page("abc123")
