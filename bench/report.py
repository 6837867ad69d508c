"""Write the latest benchmark figures into bench/README.md.

``python -m bench.report`` reads ``bench/.results/latest.json`` (written by
``bench.harness.record``) and replaces the one generated section of bench/README.md, between
``<!-- figures:begin -->`` and ``<!-- figures:end -->``, with two tables: which run each suite's
figures come from (date, commit, compiled or pure data plane, quick or full mode) and one row
per recorded figure (ours, baseline, ratio, target, pass/fail).  Everything outside the markers
is left alone.  The output depends only on latest.json, so running it twice changes nothing.

Suites are the ``bench/test_bench_<suite>.py`` files; one with no figures in latest.json is
listed as "not run", so a suite that silently stopped recording shows up.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import textwrap
from collections.abc import Callable, Iterable
from pathlib import Path

from bench.harness import RESULTS, TOLERANCE, within_target

BENCH = Path(__file__).resolve().parent
README = BENCH / "README.md"
BEGIN = "<!-- figures:begin -->"
END = "<!-- figures:end -->"

#: Bottom-up: the crypto primitive, the atServer path, the pumps, then whole programs.  Suites
#: not named here follow in alphabetical order.
ORDER = ("ctr", "notify", "relay", "pump", "tunnelpump", "tunnel", "srvd", "e2e")

#: Absolute targets some suites keep in ``extra`` (e.g. notify: p50 <= 2 ms), by key.
ABSOLUTE_TARGETS = {"target_ms": "ms", "target_per_s": "/s"}


def suite_names(bench_dir: Path = BENCH) -> list[str]:
    """Every suite that `pytest bench` runs, from the file names."""
    found = {p.stem.removeprefix("test_bench_") for p in bench_dir.glob("test_bench_*.py")}
    return _ordered(found)


def _ordered(names: Iterable[str]) -> list[str]:
    names = set(names)
    return [n for n in ORDER if n in names] + sorted(names - set(ORDER))


def load(path: Path) -> dict[str, dict]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object of figures")
    return data


# --- formatting --------------------------------------------------------------------------------

def _num(x: float) -> str:
    if not math.isfinite(x):
        return str(x)
    a = abs(x)
    if a >= 100:
        return f"{x:,.0f}"
    if a >= 10:
        return f"{x:.1f}"
    if a >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}"


def _ratio(x: float) -> str:
    if not math.isfinite(x):
        return str(x)
    return f"{x:.3f}×" if abs(x) < 0.1 else f"{x:.2f}×"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _commit(run: dict | None) -> str:
    if not run:
        return "unrecorded"
    commit = run.get("commit") or "unknown"
    if run.get("dirty"):
        commit += "+dirty"
    return f"`{commit}`"


def _mode(run: dict | None) -> str:
    if not run:
        return "unrecorded"
    return "quick (NOPORTS_BENCH_QUICK=1)" if run.get("mode") == "quick" else "full"


# --- verdicts ----------------------------------------------------------------------------------

def _targets(entry: dict) -> list[tuple[str, float, float, bool]]:
    """(label, measured, target, lower_is_better) for the ratio target and absolute ones."""
    lower = bool(entry.get("lower_is_better"))
    sign = "≤" if lower else "≥"
    out = []
    if entry.get("target") is not None:
        out.append((f"{sign} {entry['target']:g}×", float(entry["ratio"]), float(entry["target"]),
                    lower))
    extra = entry.get("extra") or {}
    for key, unit in ABSOLUTE_TARGETS.items():
        value = extra.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out.append((f"{sign} {value:,g} {unit} (absolute)", float(entry["ours"]),
                        float(value), lower))
    return out


def verdict(entry: dict) -> str:
    """"pass", "pass (tolerance)" (missed, but by less than the tolerance), "FAIL" or "–"."""
    tolerance = float((entry.get("run") or {}).get("tolerance", TOLERANCE))
    results = []
    for _label, measured, target, lower in _targets(entry):
        ratio = measured / target if target else math.inf
        if within_target(ratio, 1.0, lower, 0.0):
            results.append("pass")
        elif within_target(ratio, 1.0, lower, tolerance):
            results.append("pass (tolerance)")
        else:
            return "**FAIL**"
    if not results:
        return "–"
    return "pass (tolerance)" if "pass (tolerance)" in results else "pass"


# --- rendering ---------------------------------------------------------------------------------

def _by_suite(entries: dict[str, dict], suites: Iterable[str]) -> dict[str, list[dict]]:
    grouped: dict[str, list[dict]] = {}
    for key, entry in entries.items():
        suite = entry.get("suite") or key.split("/", 1)[0]
        grouped.setdefault(suite, []).append({**entry, "name": entry.get("name") or key})
    return {s: sorted(grouped.get(s, []), key=lambda e: e["name"])
            for s in _ordered([*suites, *grouped])}


def _runs(rows: list[dict]) -> list[list[dict]]:
    """A suite's figures split by the benchmark process that measured them, newest first."""
    runs: dict[str, list[dict]] = {}
    for e in rows:
        run = e.get("run") or {}
        runs.setdefault(run.get("started") or "unrecorded " + e.get("when", "")[:10], []).append(e)
    return sorted(runs.values(), key=lambda rs: max(r.get("when", "") for r in rs), reverse=True)


def _run_rows(suite: str, rows: list[dict]) -> list[str]:
    """The first table's rows of one suite: one per benchmark process that measured it."""
    lines = []
    for run_rows in _runs(rows):
        run = run_rows[0].get("run")
        loads = [e["load_1m"] for e in run_rows if isinstance(e.get("load_1m"), (int, float))]
        load = (f"{min(loads):.1f}–{max(loads):.1f}" if loads and min(loads) != max(loads)
                else f"{loads[0]:.1f}" if loads else "–")
        verdicts = [verdict(e) for e in run_rows]
        targeted = [v for v in verdicts if v != "–"]
        fails = sum(v == "**FAIL**" for v in targeted)
        summary = f"{len(run_rows)}, {len(targeted)} with a target"
        if targeted:
            summary += f": {fails} failed" if fails else ": all pass"
        when = max(e.get("when", "") for e in run_rows)[:16]
        plane = _cell(run.get("data_plane", "unknown")) if run else "unrecorded"
        lines.append(f"| {suite} | {when} | {_commit(run)} | {plane} | {_mode(run)} | {load} |"
                     f" {summary} |")
    return lines


def _figure_rows(suite: str, rows: list[dict]) -> list[str]:
    """The second table's rows of one suite: one per recorded figure."""
    lines = []
    for e in rows:
        unit = e.get("unit", "")
        targets = "; ".join(label for label, *_ in _targets(e)) or "–"
        if e.get("gated"):
            targets += " (gated)"
        lines.append(
            f"| {suite} | {_cell(e['name'])} | {_num(e['ours'])} {_cell(unit)} |"
            f" {_num(e['baseline'])} {_cell(unit)} ({_cell(e.get('baseline_name', ''))}) |"
            f" {_ratio(e['ratio'])} | {_cell(targets)} | {verdict(e)} |")
    return lines


def _table(header: str, grouped: dict[str, list[dict]], not_run: str,
           suite_rows: Callable[[str, list[dict]], list[str]]) -> list[str]:
    """A seven-column table: ``suite_rows`` of each suite, or ``not_run`` for one with no
    figures (``{suite}`` in it is the suite's name)."""
    lines = [header, "|---|---|---|---|---|---|---|"]
    for suite, rows in grouped.items():
        lines += suite_rows(suite, rows) if rows else [not_run.format(suite=suite)]
    return lines


def render(entries: dict[str, dict], suites: Iterable[str]) -> str:
    """The generated section (without the markers) as Markdown."""
    grouped = _by_suite(entries, suites)
    tolerances = sorted({float((e.get("run") or {}).get("tolerance", TOLERANCE))
                         for rows in grouped.values() for e in rows} or {TOLERANCE})
    tol = " / ".join(f"{t * 100:g} %" for t in tolerances)
    legend = (
        "_Generated by `python -m bench.report` from `bench/.results/latest.json`; do not edit"
        " between the markers._  Ratios are ours / baseline, measured in the same run.  A target"
        f" may be missed by at most {tol} (\"pass (tolerance)\"); \"gated\" targets fail the"
        " benchmark, the others are only reported.  Absolute targets are judged by the same rule.")
    lines = [
        textwrap.fill(legend, width=100, break_on_hyphens=False, break_long_words=False),
        "",
        *_table("| suite | measured | commit | data plane | mode | load (1 min) | figures |",
                grouped, "| {suite} | **not run** | – | – | – | – | – |", _run_rows),
        "",
        *_table("| suite | figure | ours | baseline | ratio | target | result |",
                grouped, "| {suite} | – | not run | – | – | – | – |", _figure_rows),
    ]
    return "\n".join(lines) + "\n"


def replace_section(text: str, body: str) -> str:
    """Put ``body`` between the markers in ``text``; the markers themselves stay."""
    begin, end = text.find(BEGIN), text.find(END)
    if begin < 0 or end < 0 or end < begin or text.count(BEGIN) != 1 or text.count(END) != 1:
        raise ValueError(f"expected one {BEGIN} ... {END} section, in that order")
    head = text[: begin + len(BEGIN)]
    return head + "\n" + body + text[end:]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n")[0])
    ap.add_argument("--results", type=Path, default=RESULTS / "latest.json")
    ap.add_argument("--readme", type=Path, default=README)
    ap.add_argument("--check", action="store_true",
                    help="change nothing; exit 1 when the README's table is not up to date")
    ap.add_argument("--print", action="store_true", dest="print_only",
                    help="print the generated section instead of writing the README")
    args = ap.parse_args(argv)
    body = render(load(args.results), suite_names())
    if args.print_only:
        sys.stdout.write(body)
        return 0
    old = args.readme.read_text()
    new = replace_section(old, body)
    if args.check:
        if new != old:
            print(f"{args.readme}: figures table is not up to date (python -m bench.report)")
            return 1
        return 0
    if new != old:
        args.readme.write_text(new)
    print(f"{args.readme}: figures of {len(load(args.results))} records written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
