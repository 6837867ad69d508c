"""bench/report.py: latest.json -> the generated figures table in bench/README.md."""

from __future__ import annotations

import json

import pytest

from bench import harness, report

RUN_FULL = {"started": "2026-11-26 10:00:00", "commit": "abc1234", "dirty": True,
            "data_plane": "compiled", "mode": "full", "tolerance": 0.15}
RUN_QUICK = {"started": "2026-11-27 09:00:00", "commit": "def5678", "dirty": False,
             "data_plane": "pure", "mode": "quick", "tolerance": 0.15}


def _entry(suite, name, ours, baseline, *, target=None, lower=False, run=RUN_FULL, gated=False,
           extra=None, unit="MB/s", when="2026-11-26 10:05:00"):
    return {"suite": suite, "name": name, "ours": ours, "baseline": baseline, "unit": unit,
            "baseline_name": "socat -b 131072", "target": target, "lower_is_better": lower,
            "extra": extra or {}, "ratio": ours / baseline, "when": when, "run": run,
            "load_1m": 1.5, "gated": gated}


SYNTHETIC = {
    # 0.95 >= 0.9: a plain pass, gated
    "pump/stream_compiled_vs_socat": _entry("pump", "stream_compiled_vs_socat", 950, 1000,
                                            target=0.9, gated=True),
    # 0.80 misses 0.9 by 11 %: passes by the tolerance only
    "pump/stream_pure_vs_socat": _entry("pump", "stream_pure_vs_socat", 800, 1000, target=0.9),
    # latency 1.5x against a <= 1.1x target: fails
    "pump/pingpong_p50": _entry("pump", "pingpong_p50", 45.0, 30.0, target=1.1, lower=True,
                                unit="µs"),
    # no target at all; the baseline name has a pipe that must not split the table cell
    "ctr/ctr_vs_openssl": {**_entry("ctr", "ctr_vs_openssl", 4400, 4700, run=RUN_QUICK,
                                    when="2026-11-27 09:01:00"),
                           "baseline_name": "openssl speed | aes"},
    # an absolute target kept in extra (notify's p50 <= 2 ms)
    "notify/latency_p50": _entry("notify", "latency_p50", 2.1, 0.05, lower=True, unit="ms",
                                 extra={"target_ms": 2.0}),
}
SUITES = ["ctr", "notify", "pump", "tunnel"]      # tunnel has no figures: "not run"

README = """# Benchmarks

Hand-written intro | with a pipe.

## Latest figures

<!-- figures:begin -->
stale table
<!-- figures:end -->

## srvd

Hand-written prose that must survive.
"""


def _rows(text: str, suite: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(f"| {suite} |")]


def test_render_one_row_per_figure_with_verdicts():
    out = report.render(SYNTHETIC, SUITES)
    pump = [r for r in _rows(out, "pump") if "MB/s" in r or "µs" in r]
    assert len(pump) == 3
    row = {r.split("|")[2].strip(): r for r in pump}
    assert "0.95×" in row["stream_compiled_vs_socat"]
    assert "≥ 0.9× (gated)" in row["stream_compiled_vs_socat"]
    assert row["stream_compiled_vs_socat"].rstrip().endswith("| pass |")
    assert row["stream_pure_vs_socat"].rstrip().endswith("| pass (tolerance) |")
    assert "(gated)" not in row["stream_pure_vs_socat"]
    assert row["pingpong_p50"].rstrip().endswith("| **FAIL** |")
    assert "≤ 1.1×" in row["pingpong_p50"]
    # absolute target: 2.1 ms against <= 2 ms is within 15 %
    (notify,) = [r for r in _rows(out, "notify") if "latency_p50" in r]
    assert "≤ 2 ms (absolute)" in notify and notify.rstrip().endswith("| pass (tolerance) |")
    # the pipe in a baseline name is escaped, so the row keeps its 7 cells
    (ctr,) = [r for r in _rows(out, "ctr") if "ctr_vs_openssl" in r]
    assert "openssl speed \\| aes" in ctr
    assert len(ctr.replace("\\|", "").split("|")) == 9


def test_render_run_table_commit_mode_and_data_plane():
    out = report.render(SYNTHETIC, SUITES)
    (pump_run,) = [r for r in _rows(out, "pump") if "abc1234" in r]
    assert "`abc1234+dirty`" in pump_run and "| compiled |" in pump_run
    assert "| full |" in pump_run and "2026-11-26 10:05" in pump_run
    assert "3, 3 with a target: 1 failed" in pump_run
    (ctr_run,) = [r for r in _rows(out, "ctr") if "def5678" in r]
    assert "`def5678`" in ctr_run and "+dirty" not in ctr_run
    assert "| pure |" in ctr_run and "quick (NOPORTS_BENCH_QUICK=1)" in ctr_run


def test_missing_suite_is_shown_as_not_run():
    out = report.render(SYNTHETIC, SUITES)
    tunnel = _rows(out, "tunnel")
    assert len(tunnel) == 2                       # one row in each table
    assert all("not run" in r for r in tunnel)
    assert not any("not run" in r for r in _rows(out, "pump"))
    # with nothing measured at all, every suite is "not run"
    empty = report.render({}, SUITES)
    assert all(any("not run" in r for r in _rows(empty, s)) for s in SUITES)


def test_suite_split_by_run_and_unrecorded_entries():
    older = {**_entry("pump", "old_figure", 1.0, 1.0, when="2026-11-20 08:00:00"), "run": None}
    out = report.render({**SYNTHETIC, "pump/old_figure": older}, SUITES)
    runs = [r for r in _rows(out, "pump") if "with a target" in r]
    assert len(runs) == 2
    assert "2026-11-26 10:05" in runs[0] and "unrecorded" in runs[1]   # newest first


def test_replace_section_keeps_prose_and_is_idempotent():
    body = report.render(SYNTHETIC, SUITES)
    once = report.replace_section(README, body)
    twice = report.replace_section(once, body)
    assert once == twice
    assert "stale table" not in once
    head, rest = once.split(report.BEGIN)
    assert head == README.split(report.BEGIN)[0]
    assert rest.split(report.END)[1] == README.split(report.END)[1]
    assert body in once


@pytest.mark.parametrize("text", [
    "no markers here\n",
    f"{report.END}\n{report.BEGIN}\n",                      # wrong order
    f"{report.BEGIN}\n{report.END}\n{report.BEGIN}\n{report.END}\n",
])
def test_replace_section_refuses_bad_markers(text):
    with pytest.raises(ValueError):
        report.replace_section(text, "x\n")


def test_main_rewrites_then_check_passes(tmp_path, capsys):
    results, readme = tmp_path / "latest.json", tmp_path / "README.md"
    results.write_text(json.dumps(SYNTHETIC))
    readme.write_text(README)
    args = ["--results", str(results), "--readme", str(readme)]
    assert report.main([*args, "--check"]) == 1
    assert readme.read_text() == README                     # --check changes nothing
    assert report.main(args) == 0
    first = readme.read_text()
    assert "stale table" not in first and "Hand-written prose that must survive." in first
    assert report.main(args) == 0
    assert readme.read_text() == first
    assert report.main([*args, "--check"]) == 0


def test_every_bench_suite_is_listed():
    suites = report.suite_names()
    for suite in ("ctr", "notify", "relay", "pump", "tunnelpump", "tunnel", "srvd", "e2e"):
        assert suite in suites
    assert len(suites) == len(list(report.BENCH.glob("test_bench_*.py")))


def test_harness_record_stores_run_info_and_gate_marks_gated(tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "RESULTS", tmp_path)
    ok = harness.record(harness.Comparison(
        suite="demo", name="fast", ours=10.0, baseline=10.0, unit="MB/s", baseline_name="x",
        target=1.0))
    harness.record(harness.Comparison(
        suite="demo", name="reported", ours=1.0, baseline=2.0, unit="MB/s", baseline_name="x"))
    harness.gate(ok)
    data = json.loads((tmp_path / "latest.json").read_text())
    assert data["demo/fast"]["gated"] is True and data["demo/reported"]["gated"] is False
    run = data["demo/fast"]["run"]
    assert run["mode"] in ("quick", "full") and run["data_plane"] in ("compiled", "pure")
    assert run["commit"] and isinstance(run["dirty"], (bool, type(None)))
    out = report.render(data, ["demo"])
    assert "| demo | fast |" in out and out.count("| demo |") == 3
