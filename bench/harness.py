"""Measuring against a baseline in the same run.

Every suite in bench/ compares our code with a baseline (cryptography, openssl, socat, iperf3,
direct loopback) on this very machine, in this very run: rounds are interleaved (ours, baseline,
ours, baseline ... with the order rotated each round) and the medians are compared.  Absolute
figures are reported; only ratios are gated, with a tolerance, so a noisy machine cannot fail CI
while a real regression still does.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

RESULTS = Path(os.environ.get("NOPORTS_BENCH_RESULTS", Path(__file__).parent / ".results"))

#: Fraction by which a ratio may miss its target before the gate fails (issue 7: 15 %).
TOLERANCE = float(os.environ.get("NOPORTS_BENCH_TOLERANCE", "0.15"))


def within_target(ratio: float, target: float | None, lower_is_better: bool,
                  tolerance: float = TOLERANCE) -> bool:
    """The gate's rule: a ratio may miss its target by at most ``tolerance`` (a fraction)."""
    if target is None:
        return True
    if lower_is_better:
        return ratio <= target * (1 + tolerance)
    return ratio >= target * (1 - tolerance)


def quick() -> bool:
    """True for the short version run by .ci/run (fewer rounds, smaller transfers)."""
    return os.environ.get("NOPORTS_BENCH_QUICK", "") not in ("", "0")


def require_compiled(what: str, *modules: str) -> None:
    """Skip a suite that measures compiled modules when they are not built, except on CI.

    CI builds them (.ci/run), so there a missing one is a failure, not a reason to skip."""
    import pytest  # not at the top: bench.report and the suites' child processes import harness

    try:
        for module in modules:
            importlib.import_module(module)
    except ImportError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"compiled {what} not built: {exc}")
        pytest.skip(f"compiled {what} not built: {exc}")


def rounds(default: int = 5) -> int:
    return 3 if quick() else default


def interleaved(cases: dict[str, Callable[[], float]],
                n_rounds: int | None = None) -> dict[str, list[float]]:
    """Run each case once per round, rotating the order each round; return samples per case.

    A case returns one figure (a rate, or a duration: the caller knows which)."""
    n_rounds = n_rounds or rounds()
    names = list(cases)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(n_rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            samples[name].append(cases[name]())
    return samples


def median(values: list[float]) -> float:
    return statistics.median(values)


def percentile(values: list[float], q: float) -> float:
    """The sample at fraction ``q`` (0.99: p99) of the sorted values, no interpolation."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def timed_rate(fn: Callable[[], int]) -> float:
    """Call fn (which returns a byte count) and return bytes per second."""
    start = time.perf_counter()
    nbytes = fn()
    return nbytes / (time.perf_counter() - start)


@dataclass
class Comparison:
    """One gated or reported ratio, ours / baseline (latencies: pass lower_is_better)."""

    suite: str
    name: str
    ours: float
    baseline: float
    unit: str
    baseline_name: str
    target: float | None = None
    lower_is_better: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.ours / self.baseline if self.baseline else float("inf")

    def passed(self) -> bool:
        return within_target(self.ratio, self.target, self.lower_is_better)

    def describe(self) -> str:
        tgt = ""
        if self.target is not None:
            tgt = f" (target {'<=' if self.lower_is_better else '>='} {self.target:g}x)"
        return (f"{self.suite}/{self.name}: ours {self.ours:,.4g} {self.unit} vs "
                f"{self.baseline_name} {self.baseline:,.4g} {self.unit} = {self.ratio:.3f}x{tgt}")


def _git(*args: str) -> str | None:
    """Output of a read-only git command in the repository, or None (no git, not a clone).

    ``--no-optional-locks``: status must not take the index lock while someone commits."""
    try:
        out = subprocess.run(["git", "--no-optional-locks", *args], capture_output=True,
                             text=True, timeout=20, cwd=Path(__file__).resolve().parent.parent,
                             stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def _data_plane() -> str:
    """"compiled" or "pure" (or one entry per module when mixed): what this process runs."""
    try:
        import noports._speedups as speedups
    except ImportError:
        return "unknown"
    live = {name: speedups.implementation(name) for name in speedups.MODULES}
    kinds = set(live.values())
    if len(kinds) == 1:
        return kinds.pop()
    return ", ".join(f"{name}={impl}" for name, impl in live.items()) or "pure"


@functools.cache
def run_info() -> dict:
    """What a figure was measured at: once per benchmark process, stored with every record.

    The commit is the short hash of HEAD, "dirty" when the working tree differed from it
    (tracked edits or untracked files), so a figure can be traced to the code it measured."""
    commit = _git("rev-parse", "--short", "HEAD")
    if commit:
        status = _git("status", "--porcelain")
        dirty = None if status is None else bool(status.strip())
        commit = commit.strip()
    else:
        commit, dirty = (os.environ.get("GITHUB_SHA", "")[:7] or "unknown"), None
    return {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "commit": commit, "dirty": dirty,
            "data_plane": _data_plane(), "mode": "quick" if quick() else "full",
            "tolerance": TOLERANCE, "cpus": os.cpu_count(),
            "python": platform.python_version()}


def _update_latest(key: str, update: Callable[[dict], None]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "latest.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {}
    entry = data.setdefault(key, {})
    update(entry)
    if not entry:               # gate() on a comparison that was never recorded
        del data[key]
    path.write_text(json.dumps(data, indent=2, sort_keys=True))


def record(comparison: Comparison, benchmark=None) -> Comparison:
    """Store a comparison in pytest-benchmark's extra_info and in bench/.results/latest.json.

    The entry carries ``run`` (run_info(): commit, data plane, quick/full mode) and the load
    average at the time; ``python -m bench.report`` turns the file into bench/README.md's table."""
    if benchmark is not None:
        benchmark.extra_info[comparison.name] = {
            "ours": comparison.ours, "baseline": comparison.baseline, "unit": comparison.unit,
            "baseline_name": comparison.baseline_name, "ratio": comparison.ratio,
            "target": comparison.target, **comparison.extra,
        }
    fresh = {**asdict(comparison), "ratio": comparison.ratio,
             "when": time.strftime("%Y-%m-%d %H:%M:%S"), "run": run_info(),
             "load_1m": round(os.getloadavg()[0], 2), "gated": False}

    def replace(entry: dict) -> None:
        entry.clear()           # a figure from an earlier run must not leak into this one
        entry.update(fresh)

    _update_latest(f"{comparison.suite}/{comparison.name}", replace)
    print(comparison.describe())
    return comparison


def gate(comparison: Comparison) -> None:
    """Fail the benchmark when a ratio misses its target by more than TOLERANCE.

    The recorded entry is marked ``gated`` first, so the report can tell gated figures from
    figures that are only reported."""
    def mark(entry: dict) -> None:
        if entry:
            entry["gated"] = True

    _update_latest(f"{comparison.suite}/{comparison.name}", mark)
    assert comparison.passed(), "ratio target missed: " + comparison.describe()
