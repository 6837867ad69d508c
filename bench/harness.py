"""Measuring against a baseline in the same run.

Every suite in bench/ compares our code with a baseline (cryptography, openssl, socat, iperf3,
direct loopback) on this very machine, in this very run: rounds are interleaved (ours, baseline,
ours, baseline ... with the order rotated each round) and the medians are compared.  Absolute
figures are reported; only ratios are gated, with a tolerance, so a noisy machine cannot fail CI
while a real regression still does.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

RESULTS = Path(os.environ.get("NOPORTS_BENCH_RESULTS", Path(__file__).parent / ".results"))

#: Fraction by which a ratio may miss its target before the gate fails (issue 7: 15 %).
TOLERANCE = float(os.environ.get("NOPORTS_BENCH_TOLERANCE", "0.15"))


def quick() -> bool:
    """True for the short version run by .ci/run (fewer rounds, smaller transfers)."""
    return os.environ.get("NOPORTS_BENCH_QUICK", "") not in ("", "0")


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
        if self.target is None:
            return True
        if self.lower_is_better:
            return self.ratio <= self.target * (1 + TOLERANCE)
        return self.ratio >= self.target * (1 - TOLERANCE)

    def describe(self) -> str:
        tgt = ""
        if self.target is not None:
            tgt = f" (target {'<=' if self.lower_is_better else '>='} {self.target:g}x)"
        return (f"{self.suite}/{self.name}: ours {self.ours:,.4g} {self.unit} vs "
                f"{self.baseline_name} {self.baseline:,.4g} {self.unit} = {self.ratio:.3f}x{tgt}")


def record(comparison: Comparison, benchmark=None) -> Comparison:
    """Store a comparison in pytest-benchmark's extra_info and in bench/.results/latest.json."""
    if benchmark is not None:
        benchmark.extra_info[comparison.name] = {
            "ours": comparison.ours, "baseline": comparison.baseline, "unit": comparison.unit,
            "baseline_name": comparison.baseline_name, "ratio": comparison.ratio,
            "target": comparison.target, **comparison.extra,
        }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "latest.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {}
    data[f"{comparison.suite}/{comparison.name}"] = {
        **asdict(comparison), "ratio": comparison.ratio,
        "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    path.write_text(json.dumps(data, indent=2, sort_keys=True))
    print(comparison.describe())
    return comparison


def gate(comparison: Comparison) -> None:
    """Fail the benchmark when a ratio misses its target by more than TOLERANCE."""
    assert comparison.passed(), "ratio target missed: " + comparison.describe()
