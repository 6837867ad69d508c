"""A bare relay for bench/test_bench_pump.py: splices TCP pairs with one chosen pump.

Listens on two ephemeral ports on 127.0.0.1, prints one JSON line ``{"port_a": .., "port_b": ..}``,
then forever: accepts one connection on each port and splices them (no auth line: this measures
the pump alone).  Pairs are served one after another, so the process's CPU time between two
moments is the pump's cost for the transfer in between.  Exits when stdin closes.

    python bench/pump_relay.py --impl compiled|compiled-copy|pure [--loop uvloop|asyncio]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _pump(impl: str, pipe_size: int | None):
    if impl == "pure":
        import noports._pure.relaypump as pump
        return pump
    import noports._speedups.relaypump as pump  # the bench compares implementations directly
    pump._configure(use_splice=impl == "compiled", pipe_size=pipe_size)
    return pump


async def serve(pump) -> None:
    loop = asyncio.get_running_loop()
    listeners = []
    for _ in range(2):
        sock = socket.create_server(("127.0.0.1", 0), backlog=16)
        sock.setblocking(False)
        listeners.append(sock)
    print(json.dumps({"port_a": listeners[0].getsockname()[1],
                      "port_b": listeners[1].getsockname()[1]}), flush=True)
    stdin_closed = loop.create_future()
    loop.add_reader(sys.stdin.fileno(), lambda: stdin_closed.done() or
                    (sys.stdin.buffer.read1(4096) or stdin_closed.set_result(None)))

    async def pairs():
        while True:
            sock_a, _ = await loop.sock_accept(listeners[0])
            sock_b, _ = await loop.sock_accept(listeners[1])
            await pump.splice(loop, sock_a, sock_b)

    task = asyncio.ensure_future(pairs())
    await stdin_closed
    task.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impl", choices=["compiled", "compiled-copy", "pure"], required=True)
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    parser.add_argument("--pipe-size", type=int, default=None,
                        help="compiled: kernel pipe capacity to ask for (tuning experiments)")
    args = parser.parse_args()
    pump = _pump(args.impl, args.pipe_size)
    if args.loop == "uvloop":
        import uvloop
        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(serve(pump))
    finally:
        loop.close()


if __name__ == "__main__":
    main()
