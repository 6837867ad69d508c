"""A bare relay for bench/test_bench_pump.py: splices TCP pairs with one chosen pump.

Serves pairs as bench/pump_process.py describes: listens on two ephemeral ports on 127.0.0.1,
prints one JSON line ``{"port_a": .., "port_b": ..}``, then accepts one connection on each port
and splices them (no auth line: this measures the pump alone), pair after pair, until stdin
closes.

    python bench/pump_relay.py --impl compiled|compiled-copy|pure [--loop uvloop|asyncio]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run as a script: find bench

from bench.plumbing import run_loop
from bench.pump_process import serve_pairs


def _pump(impl: str, pipe_size: int | None):
    if impl == "pure":
        import noports._pure.relaypump as pump
        return pump
    import noports._speedups.relaypump as pump  # the bench compares implementations directly
    pump._configure(use_splice=impl == "compiled", pipe_size=pipe_size)
    return pump


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impl", choices=["compiled", "compiled-copy", "pure"], required=True)
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    parser.add_argument("--pipe-size", type=int, default=None,
                        help="compiled: kernel pipe capacity to ask for (tuning experiments)")
    args = parser.parse_args()
    pump = _pump(args.impl, args.pipe_size)
    run_loop(serve_pairs(pump.splice), args.loop)


if __name__ == "__main__":
    main()
