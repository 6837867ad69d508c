"""Starting and stopping the stack's programs as child processes, for demos.

Owns: spawning ``python -m noports.<program>``, reading the one JSON ``ready`` line a server
prints, and stopping children cleanly (SIGTERM, then SIGKILL after a grace period).  Nothing
protocol-specific lives here.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from dataclasses import dataclass, field


@dataclass
class Child:
    name: str
    proc: asyncio.subprocess.Process
    ready: dict = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def stop(self, grace: float = 5.0) -> int:
        if self.proc.returncode is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                await asyncio.wait_for(self.proc.wait(), grace)
            except asyncio.TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        return self.proc.returncode


async def start_server(name: str, module: str, *args: str, timeout: float = 60.0,
                       stderr=None) -> Child:
    """Start ``python -m <module> args...`` and wait for its JSON ready line on stdout."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", module, *args,
        stdout=asyncio.subprocess.PIPE, stderr=stderr, env=dict(os.environ))
    child = Child(name, proc)
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), timeout)
    except asyncio.TimeoutError:
        await child.stop(grace=1.0)
        raise RuntimeError(f"{name} did not become ready within {timeout:.0f} s") from None
    if not line:
        code = await proc.wait()
        raise RuntimeError(f"{name} exited with code {code} before it was ready")
    try:
        child.ready = json.loads(line)
    except ValueError:
        await child.stop(grace=1.0)
        raise RuntimeError(f"{name} printed an unexpected first line: {line[:200]!r}") from None
    return child
