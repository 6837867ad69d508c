"""npt's command line (noports.client.cli): flags, defaults, refusals, --help and --version."""

from __future__ import annotations

from pathlib import Path

import pytest

from noports.at.atkeys import default_keys_path
from noports.client.cli import build_parser, options_from_args, parse_args
from noports.client.phases import EXIT_CODES
from noports.messages import FOREVER_SECONDS

BASE = ["-f", "@Client", "-t", "daemon", "-r", "@relay", "-d", "My Dev", "-p", "8080"]


def _error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as info:
        parse_args(argv)
    assert info.value.code == 2
    return capsys.readouterr().err


def test_defaults_are_atsigns_and_safe_ones():
    args = parse_args(BASE)
    opts = options_from_args(args)
    assert (opts.client, opts.daemon, opts.relay) == ("@client", "@daemon", "@relay")
    assert opts.device == "my_dev"                 # snakified, spec §2.2
    assert opts.remote_host == "localhost" and opts.remote_port == 8080
    assert opts.local_port == 0 and opts.local_host == "127.0.0.1"
    assert opts.daemon_ping_timeout == 20 and opts.timeout_s == 30 and opts.encrypt is True
    assert opts.root_domain == "root.atsign.org:64"
    assert opts.key_file == default_keys_path("@client")
    assert args.exit_when_connected is False and args.quiet is False and args.verbose == 0


def test_dash_h_is_the_remote_host_not_help():
    args = parse_args([*BASE, "-h", "intranet.local"])
    assert args.remote_host == "intranet.local"


@pytest.mark.parametrize("flags, field, value", [
    (["--rh", "db"], "remote_host", "db"),
    (["--remote-host", "db"], "remote_host", "db"),
    (["--lp", "9000"], "local_port", 9000),
    (["-l", "9000"], "local_port", 9000),
    (["--local-host", "127.0.0.5"], "local_host", "127.0.0.5"),
    (["--dpt", "2.5"], "daemon_ping_timeout", 2.5),
    (["-T", "1h,14m,30s"], "timeout", 4470),
    (["--timeout", "7d"], "timeout", 7 * 86400),
    (["-T", "0"], "timeout", FOREVER_SECONDS),
    (["--no-encrypt-rvd-traffic"], "encrypt", False),
    (["--no-et"], "encrypt", False),
    (["-k", "/x/keys.atKeys"], "key_file", Path("/x/keys.atKeys")),
    (["--keyFile", "/x/keys.atKeys"], "key_file", Path("/x/keys.atKeys")),
    (["-x"], "exit_when_connected", True),
    (["-q"], "quiet", True),
    (["-vv"], "verbose", 2),
    (["--ca-file", "/ca.pem"], "ca_file", "/ca.pem"),
    (["--root-domain", "127.0.0.1:6464"], "root_domain", "127.0.0.1:6464"),
])
def test_flags_and_their_aliases(flags, field, value):
    assert getattr(parse_args([*BASE, *flags]), field) == value


def test_rp_alias_for_the_remote_port():
    argv = [a for a in BASE]
    argv[argv.index("-p")] = "--rp"
    assert parse_args(argv).remote_port == 8080


def test_ca_file_defaults_to_the_environment(monkeypatch):
    monkeypatch.setenv("NOPORTS_CA_FILE", "/env/ca.pem")
    assert parse_args(BASE).ca_file == "/env/ca.pem"


@pytest.mark.parametrize("missing", ["-f", "-t", "-r", "-d", "-p"])
def test_each_mandatory_flag_is_required(missing, capsys):
    i = BASE.index(missing)
    err = _error(BASE[:i] + BASE[i + 2:], capsys)
    assert "required" in err and missing in err


@pytest.mark.parametrize("flags, words", [
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["-p", "0"], "-p/--remote-port"),
    (["-p", "70000"], "not a TCP port"),
    (["-l", "x"], "not a TCP port"),
    (["-T", "5x"], "bad duration"),
    (["-T", ""], "duration is empty"),
    (["--dpt", "0"], "must be > 0"),
    (["-h", ""], "-h/--remote-host"),
    (["-h", "a b"], "-h/--remote-host"),
    (["-d", "x"], "-d/--device"),
    (["-d", "bad/name"], "-d/--device"),
    (["-f", "@"], "-f/--from"),
    (["--root-domain", "host:notaport"], "--root-domain"),
])
def test_bad_flags_exit_2_with_a_clear_message(flags, words, capsys):
    err = _error([*BASE, *flags], capsys)
    assert words in err
    assert err.rstrip().splitlines()[-1].startswith("npt: error:")


def test_help_lists_every_flag_and_exit_code(capsys):
    with pytest.raises(SystemExit) as info:
        parse_args(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--from", "--to", "--srvd", "--device", "--remote-port", "--remote-host",
                 "--local-port", "--key-file", "--root-domain", "--ca-file",
                 "--daemon-ping-timeout", "--exit-when-connected", "--timeout",
                 "--no-encrypt-rvd-traffic", "--local-host", "--quiet", "--verbose",
                 "--version"):
        assert flag in out, flag
    for code, what in EXIT_CODES:
        assert f"{code:>3}  {what}" in out


def test_version_names_the_data_plane(capsys):
    with pytest.raises(SystemExit) as info:
        parse_args(["--version"])
    assert info.value.code == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("npt (noports) ")
    assert out[1].startswith("data plane: ")


def test_the_parser_has_no_dash_h_help():
    parser = build_parser()
    assert parser.add_help is False
