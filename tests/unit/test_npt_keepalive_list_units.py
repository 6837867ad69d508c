"""npt -K and --list-devices, the sans-IO parts: back-off, flag rules, key-name parsing and
rendering.  The 5 s first retry and 24 h -K timeout are derived from the spec (§9.1, §10)."""

from __future__ import annotations

import json

import pytest

from noports.client.cli import parse_args
from noports.client.keepalive import KEEP_ALIVE_TIMEOUT_S, Backoff
from noports.client.listing import DeviceRow, parse_device_info_name, render_json, render_table

BASE = ["-f", "@alice", "-t", "@bob", "-r", "@relay", "-d", "dev", "-p", "22"]


def test_backoff_starts_at_5_s_doubles_to_a_cap_and_resets_after_a_healthy_session():
    b = Backoff()
    delays = [b.next_delay(None) for _ in range(7)]
    assert delays == [5, 10, 20, 40, 60, 60, 60]
    # a short-lived session does not reset it
    assert b.next_delay(10.0) == 60
    # one that lived over 60 s does
    assert b.next_delay(61.0) == 5
    assert b.next_delay(None) == 10


def test_keep_alive_sets_24h_unless_t_is_given():
    assert parse_args(BASE).timeout == 30
    assert parse_args([*BASE, "-K"]).timeout == KEEP_ALIVE_TIMEOUT_S == 86400
    assert parse_args([*BASE, "-K", "-T", "5m"]).timeout == 300
    assert parse_args([*BASE, "--keep-alive"]).keep_alive is True


def _error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as info:
        parse_args(argv)
    assert info.value.code == 2
    return capsys.readouterr().err


def test_keep_alive_with_x_is_a_usage_error(capsys):
    assert "cannot be used together" in _error([*BASE, "-K", "-x"], capsys)


def test_list_devices_needs_only_from(capsys):
    args = parse_args(["-f", "@alice", "--ls"])
    assert args.list_devices and args.daemon is None and args.list_timeout == 10.0
    args = parse_args(["-f", "@alice", "-t", "bob", "--list-devices", "--json",
                       "--list-timeout", "3"])
    assert args.daemon == "@bob" and args.json and args.list_timeout == 3.0
    assert "required: -f/--from" in _error(["--ls"], capsys)
    assert "--json goes with --list-devices" in _error([*BASE, "--json"], capsys)
    assert "not with -K or -x" in _error(["-f", "@a", "--ls", "-K"], capsys)


@pytest.mark.parametrize("name, expected", [
    ("device_info.dev.sshnp@bob", ("dev", "@bob")),
    ("@alice:device_info.my-pi.sshnp@bob", ("my-pi", "@bob")),
    ("cached:@alice:device_info.Kitchen.sshnp@bob", ("kitchen", "@bob")),
    ("username.dev.sshnp@bob", None),
    ("device_info.dev.other@bob", None),
])
def test_device_info_names(name, expected):
    assert parse_device_info_name(name) == expected


def test_table_is_aligned_and_summarised():
    rows = [DeviceRow("dev", "@bob", "active", "1.2.3", ["localhost:22", "*:80"]),
            DeviceRow("a-much-longer-name", "@carol", "inactive", "", [])]
    text = render_table(rows, timeout=4)
    lines = text.splitlines()
    col = lines[0].index("STATUS")
    assert lines[1][col:].startswith("active")
    assert lines[2][col:].startswith("inactive")
    assert "localhost:22,*:80" in lines[1]
    assert "1 of 2 device(s) active" in text
    assert render_table([], daemons=["@bob"]).startswith("no devices found shared by @bob")
    assert render_table([]).startswith("no devices found (no daemon atSign has shared")


def test_json_lists_every_field():
    doc = json.loads(render_json([DeviceRow("dev", "@bob", "active", "1.2.3", ["h:1"], "g")],
                                 timeout=2))
    assert doc == {"timeout": 2, "devices": [{"device": "dev", "atsign": "@bob",
                                              "status": "active", "version": "1.2.3",
                                              "permitOpen": ["h:1"], "deviceGroup": "g"}]}
