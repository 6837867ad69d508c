"""``python -m noports.demo``: the embedded root + atServer with two atSigns exchanging an
end-to-end encrypted notification, each phase printed with its time.

Everything runs on 127.0.0.1 in a temporary state directory that is removed afterwards
(``--keep`` keeps it and prints how to reuse it).  Nothing is contacted outside this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path

from noports.at.atkeys import AtKeys
from noports.at.client import AtClient
from noports.demo.processes import start_server


class Phases:
    """Prints ``[  12.3 ms] phase`` lines: time since the previous phase."""

    def __init__(self) -> None:
        self.t0 = self.last = time.perf_counter()

    def done(self, what: str) -> None:
        now = time.perf_counter()
        print(f"[{(now - self.last) * 1000:8.1f} ms] {what}", flush=True)
        self.last = now

    def total(self) -> float:
        return time.perf_counter() - self.t0


async def run(state_dir: Path, message: str, alice: str, bob: str) -> int:
    phases = Phases()
    keys_dir = state_dir / "keys"
    server = await start_server(
        "atserver", "noports.atserver", "--state-dir", str(state_dir), "--root-port", "0",
        "--atsign", alice, "--atsign", bob, "--keys-dir", str(keys_dir))
    try:
        ready = server.ready
        root = f"127.0.0.1:{ready['root_port']}"
        phases.done(f"atserver up: root {root}, {alice} on port {ready['atsigns'][alice]}, "
                    f"{bob} on port {ready['atsigns'][bob]} (TLS, CA {ready['ca_file']})")
        ca = ready["ca_file"]
        a_keys = AtKeys.load(keys_dir / f"{alice}_key.atKeys")
        b_keys = AtKeys.load(keys_dir / f"{bob}_key.atKeys")
        async with AtClient(alice, a_keys, root=root, ca_file=ca) as a, \
                AtClient(bob, b_keys, root=root, ca_file=ca) as b:
            phases.done(f"{alice} and {bob} looked up in the root and logged in with PKAM")
            async with b.monitor(r"greeting\.demo") as mon:
                phases.done(f"{bob} monitoring for 'greeting.demo'")
                nid = await a.notify(f"@{bob.lstrip('@')}:greeting.demo{alice}", message,
                                     ttln=60_000)
                phases.done(f"{alice} sent notification {nid} (AES-256 encrypted for {bob})")
                note = await asyncio.wait_for(anext(mon), 10)
                phases.done(f"{bob} received it from {note.from_atsign} and decrypted: "
                            f"{note.value!r}")
            status = await a.notify_status(nid)
            phases.done(f"notify:status of {nid} at {alice}'s server: {status}")
        ok = note.value == message and status == "delivered"
    finally:
        code = await server.stop()
        phases.done(f"atserver stopped (exit code {code})")
    print(f"{'OK' if ok else 'FAILED'}: end-to-end encrypted notification in "
          f"{phases.total():.2f} s", flush=True)
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m noports.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--message", default="hello from the embedded atServer")
    p.add_argument("--keep", action="store_true", help="keep the state directory")
    args = p.parse_args(argv)
    state_dir = Path(tempfile.mkdtemp(prefix="noports-demo-"))
    try:
        return asyncio.run(run(state_dir, args.message, "@alice", "@bob"))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if args.keep:
            print(f"state kept in {state_dir}: `python -m noports.atserver --state-dir "
                  f"{state_dir} --root-port 0` serves it again")
        else:
            shutil.rmtree(state_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
