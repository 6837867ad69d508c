"""The demo's phases: the whole NoPorts stack on 127.0.0.1, used and measured, then stopped.

Owns the order of things and what each phase checks:

1. ``atserver``: embedded root + atServer hosting three fresh atSigns (client, daemon, relay),
   activated with ``--keys-dir`` (keys generated, public halves installed, files written);
2. ``web``: a web service on 127.0.0.1, a process of its own (the service "on the device");
3. ``srvd``: the relay, advertising and binding 127.0.0.1;
4. ``npd``: the daemon, managed by the client atSign, permitted to open only the web service;
5. ``npt``: ``npt -x`` asks for a session and leaves the tunnel running in the background;
6. ``page``: the page fetched through the tunnel, byte for byte and with this run's token;
7. ``download`` / ``upload``: ``--size`` MiB each way through the tunnel, sha256 compared at
   both ends, timed;

then (``--keep``) the commands to do the same by hand, and at the end ``stop``: tunnel, daemon,
relay, atServer, web service in that order, each by SIGTERM (SIGKILL after a grace period).
Every program runs as ``python -m noports.<program>``: exactly the code of the console scripts.
"""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import shutil
import signal
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from noports.demo.processes import Child, ChildError, Detached, child_env, module_command
from noports.demo.transfer import MIB, HttpError, LiveCounter, download, fetch, upload
from noports.demo.webservice import page

__all__ = ["Demo", "DemoOptions", "PhaseFailed", "Phases"]

HOST = "127.0.0.1"


@dataclass
class DemoOptions:
    size_mib: int = 256
    keep: bool = False
    client: str = "@client"
    daemon: str = "@daemon"
    relay: str = "@relay"
    device: str = "demo"
    ready_timeout: float = 60.0       # any one program's start-up
    stall_timeout: float = 30.0       # any transfer without progress


class PhaseFailed(Exception):
    def __init__(self, phase: str, message: str, tail: list[str] | None = None) -> None:
        super().__init__(f"{phase}: {message}")
        self.phase = phase
        self.message = message
        self.tail = list(tail or [])


class Phases:
    """Prints one aligned line per phase: its duration, its name, what it showed."""

    NAME_WIDTH = 9

    def __init__(self, out=None) -> None:
        self.out = out or sys.stdout
        self.t0 = time.perf_counter()

    def say(self, text: str = "") -> None:
        try:
            self.out.write(text + "\n")
            self.out.flush()
        except (OSError, ValueError):
            pass          # nobody reads our output any more (`| head`): carry on, stop cleanly

    def line(self, seconds: float, name: str, text: str) -> None:
        self.say(f"{seconds:8.2f} s  {name:<{self.NAME_WIDTH}} {text}")

    def failed(self, failure: PhaseFailed) -> None:
        self.say(f"  FAILED  {failure.phase:<{self.NAME_WIDTH}} {failure.message}")
        if failure.tail:
            self.say(f"{'':20}last lines of its output:")
            for line in failure.tail:
                self.say(f"{'':22}{line}")

    def total(self) -> float:
        return time.perf_counter() - self.t0

    def run(self, name: str) -> _Phase:
        return _Phase(self, name)


class _Phase:
    """``with phases.run("npd") as ph: ...; ph.text = "..."``: times the block, prints its line;
    any error inside becomes a :class:`PhaseFailed` naming the phase."""

    def __init__(self, phases: Phases, name: str) -> None:
        self.phases = phases
        self.name = name
        self.text = ""

    def __enter__(self) -> _Phase:
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None:
            self.phases.line(time.perf_counter() - self.t0, self.name, self.text)
            return False
        if isinstance(exc, PhaseFailed) or not isinstance(exc, Exception):
            return False                      # already named, or cancellation: pass it on
        if isinstance(exc, ChildError):
            raise PhaseFailed(self.name, str(exc), exc.tail) from exc
        if isinstance(exc, HttpError):
            raise PhaseFailed(self.name, f"through the tunnel: {exc}") from exc
        raise PhaseFailed(self.name, f"{type(exc).__name__}: {exc}") from exc


@dataclass
class Program:
    """How one program is run (``argv``) and how a user would type it (``typed``)."""

    name: str
    script: str | None        # console script, None for the demo's own web service
    module: str
    args: list[str]
    shown_args: list[str] | None = None      # when the typed form differs (real root port)
    child: Child | None = None
    argv: list[str] = field(default_factory=list)
    ready: bool = False

    def typed(self, pythonpath: str | None) -> str:
        args = self.shown_args if self.shown_args is not None else self.args
        script = _script_path(self.script) if self.script else None
        if script is not None:
            return shlex.join([script, *args])
        prefix = f"PYTHONPATH={shlex.quote(pythonpath)} " if pythonpath else ""
        return prefix + shlex.join(module_command(self.module, *args))


def _script_path(script: str) -> str | None:
    """The console script of *this* installation (Atsign's own npt/npd/srvd binaries have the
    same names and other flags): its bare name if PATH finds it, else its full path."""
    candidate = Path(sys.executable).parent / script
    if not candidate.is_file():
        return None
    found = shutil.which(script)
    if found and Path(found).resolve() == candidate.resolve():
        return script
    return str(candidate)


def _short(digest: str) -> str:
    return f"{digest[:16]}…"


class Demo:
    """One run of the demo in ``state_dir``; ``run()`` then (always) ``stop()``."""

    def __init__(self, opts: DemoOptions, state_dir: Path, phases: Phases) -> None:
        self.opts = opts
        self.state = state_dir
        self.phases = phases
        self.env, self.pythonpath = child_env()
        self.keys_dir = state_dir / "keys"
        self.logs = state_dir / "logs"
        self.programs: dict[str, Program] = {}
        self.runner: Detached | None = None
        self.root = ""
        self.ca_file = ""
        self.web_port = 0
        self.web_token = ""
        self.tunnel_port = 0
        self.stopped: list[str] = []
        self.hurry = False                   # a second Ctrl-C: short grace periods

    def keys(self, atsign: str) -> str:
        return str(self.keys_dir / f"{atsign}_key.atKeys")

    async def _start(self, prog: Program) -> Child:
        prog.argv = module_command(prog.module, *prog.args)
        prog.child = Child(prog.name, prog.argv, self.logs / f"{prog.name}.log", self.env)
        self.programs[prog.name] = prog
        return await prog.child.start()

    # -- the phases -------------------------------------------------------------------------

    async def run(self) -> None:
        """Every phase, in order; PhaseFailed names the one that failed."""
        for name, step in (("atserver", self._atserver), ("web", self._web),
                           ("srvd", self._srvd), ("npd", self._npd), ("npt", self._npt),
                           ("page", self._page), ("download", self._download),
                           ("upload", self._upload)):
            if name in ("download", "upload") and not self.opts.size_mib:
                continue
            with self.phases.run(name) as ph:
                ph.text = await step()
            if name in self.programs:
                self.programs[name].ready = True

    async def _atserver(self) -> str:
        o = self.opts

        def args(root_port: int) -> list[str]:
            return ["--state-dir", str(self.state / "atserver"), "--host", HOST,
                    "--root-port", str(root_port), "--atsign", o.client, "--atsign", o.daemon,
                    "--atsign", o.relay, "--keys-dir", str(self.keys_dir)]

        prog = Program("atserver", "atserver", "noports.atserver", args(0))
        child = await self._start(prog)
        line = await child.wait_line(r"^\{", stream="stdout", timeout=o.ready_timeout)
        try:
            ready = json.loads(line)
            root_port = int(ready["root_port"])
            self.ca_file = str(ready["ca_file"])
            ports = {a: int(ready["atsigns"][a]) for a in (o.client, o.daemon, o.relay)}
        except (ValueError, KeyError, TypeError):
            raise ChildError(f"atserver printed an unexpected ready line: {line[:200]}",
                             child.tail()) from None
        self.root = f"{HOST}:{root_port}"
        for atsign in ports:
            if not Path(self.keys(atsign)).is_file():
                raise ChildError(f"atserver did not write {self.keys(atsign)}", child.tail())
        prog.shown_args = args(root_port)   # by hand one picks the port: show this run's
        return (f"root {self.root} and atServer up; {', '.join(ports)} hosted and activated "
                f"(TLS, own CA)")

    async def _web(self) -> str:
        prog = Program("web", None, "noports.demo.webservice", ["--host", HOST, "--port", "0"])
        child = await self._start(prog)
        line = await child.wait_line(r'"event": "ready"', stream="stdout",
                                     timeout=self.opts.ready_timeout)
        try:
            ready = json.loads(line)
            self.web_port, self.web_token = int(ready["port"]), str(ready["token"])
        except (ValueError, KeyError, TypeError):
            raise ChildError(f"the web service printed an unexpected ready line: {line[:200]}",
                             child.tail()) from None
        prog.shown_args = ["--host", HOST, "--port", str(self.web_port)]
        return f"web service on {HOST}:{self.web_port} (the service on the device)"

    def _common(self) -> list[str]:
        return ["--root-domain", self.root, "--ca-file", self.ca_file]

    async def _srvd(self) -> str:
        o = self.opts
        prog = Program("srvd", "srvd", "noports.relay", [
            "-a", o.relay, "-i", HOST, "--bind", HOST, "-k", self.keys(o.relay),
            *self._common(), "--drain-grace", "2"])
        child = await self._start(prog)
        await child.wait_line(rf"srvd {re.escape(o.relay)} ready", stream="stderr",
                              timeout=o.ready_timeout)
        return f"relay {o.relay} ready: advertises {HOST}, session ports on {HOST}"

    async def _npd(self) -> str:
        o = self.opts
        permit = f"{HOST}:{self.web_port}"
        prog = Program("npd", "npd", "noports.daemon", [
            "-a", o.daemon, "-m", o.client, "-d", o.device, "--permit-open", permit,
            "-k", self.keys(o.daemon), *self._common(),
            "--storage-path", str(self.state / "npd")])
        child = await self._start(prog)
        await child.wait_line(rf"npd {re.escape(o.daemon)} ready", stream="stderr",
                              timeout=o.ready_timeout)
        return (f"daemon {o.daemon} ready: device {o.device}, manager {o.client}, "
                f"permit-open {permit}")

    def _npt_args(self) -> list[str]:
        o = self.opts
        return ["-x", "-f", o.client, "-t", o.daemon, "-r", o.relay, "-d", o.device,
                "-h", HOST, "-p", str(self.web_port), "-k", self.keys(o.client),
                *self._common()]

    async def _npt(self) -> str:
        o = self.opts
        child = await self._start(Program("npt", "npt", "noports.client", self._npt_args()))
        try:
            code = await child.wait(o.ready_timeout)
        except asyncio.TimeoutError:
            raise ChildError(f"npt -x did not finish within {o.ready_timeout:g} s",
                             child.tail()) from None
        self._note_runner()
        if code != 0:
            raise ChildError(f"npt -x exited with code {code}", child.tail())
        out = child.stdout_lines()
        if not out or not out[-1].strip().isdigit():
            raise ChildError("npt -x printed no port", child.tail())
        self.tunnel_port = int(out[-1])
        if self.runner is None:
            raise ChildError("npt -x did not say which process runs the tunnel", child.tail())
        return (f"tunnel {HOST}:{self.tunnel_port} -> {o.relay} -> {o.daemon} -> "
                f"{HOST}:{self.web_port}, end-to-end encrypted (runner pid {self.runner.pid})")

    async def _page(self) -> str:
        resp = await fetch(self.tunnel_port, "/", timeout=self.opts.stall_timeout)
        if resp.status != 200:
            raise HttpError(f"GET / answered HTTP {resp.status} {resp.reason}")
        if resp.body != page(self.web_token):
            raise HttpError(f"GET / gave {len(resp.body)} bytes that are not the web "
                            f"service's page")
        return (f"GET / -> {resp.status} {resp.reason}, {len(resp.body)} bytes: the web "
                f"service's page, with this run's token {self.web_token[:8]}…")

    async def _download(self) -> str:
        size = self.opts.size_mib * MIB
        rid = uuid.uuid4().hex
        live = LiveCounter("download", size)
        try:
            t = await download(self.tunnel_port, f"/blob?bytes={size}&id={rid}", size,
                               lambda: self._sent_digest(rid), progress=live,
                               stall=self.opts.stall_timeout)
        finally:
            live.clear()
        if t.sha256 != t.peer_sha256:
            raise HttpError(f"sha256 differs: sent {t.peer_sha256}, received {t.sha256}")
        return (f"GET {self.opts.size_mib} MiB: {t.mib_per_s:7.1f} MiB/s, "
                f"sha256 {_short(t.sha256)} same at both ends")

    async def _upload(self) -> str:
        size = self.opts.size_mib * MIB
        live = LiveCounter("upload", size)
        try:
            t = await upload(self.tunnel_port, "/sink", size, progress=live,
                             stall=self.opts.stall_timeout)
        finally:
            live.clear()
        if t.sha256 != t.peer_sha256:
            raise HttpError(f"sha256 differs: sent {t.sha256}, received {t.peer_sha256}")
        return (f"PUT {self.opts.size_mib} MiB: {t.mib_per_s:7.1f} MiB/s, "
                f"sha256 {_short(t.sha256)} same at both ends")

    async def _sent_digest(self, request_id: str) -> str:
        """The sha256 the web service reports for the body it sent for ``request_id``."""
        line = await self.programs["web"].child.wait_line(
            rf'"event": "sent", "id": "{re.escape(request_id)}"', stream="stdout",
            timeout=10.0, what="'sent' line")
        return str(json.loads(line)["sha256"])

    def _note_runner(self) -> None:
        """Find the pid of npt -x's background runner in npt's output (once known)."""
        if self.runner is not None or "npt" not in self.programs:
            return
        child = self.programs["npt"].child
        for line in child.tail(len(child.lines)) if child else []:
            m = re.search(r"in the background as pid (\d+)", line)
            if m:
                self.runner = Detached("npt runner", int(m.group(1)))
                return

    # -- --keep ---------------------------------------------------------------------------------

    def print_commands(self) -> None:
        o, say = self.opts, self.phases.say
        pp = self.pythonpath
        npt = Program("npt", "npt", "noports.client", self._npt_args())
        say("")
        say("The stack keeps running.  Running now, started as you would start them by hand")
        say("(paths, ports and atSigns are this run's):")
        notes = {
            "atserver": "root directory + atServer for the three atSigns; --keys-dir "
                        "activates them",
            "web": "the web service on the device (GET /, GET /blob?bytes=N, PUT /sink)",
            "srvd": "the relay",
            "npd": f"the daemon on the device: only {o.client} may use it, and only to reach "
                   f"{HOST}:{self.web_port}",
        }
        for name in ("atserver", "web", "srvd", "npd"):
            prog = self.programs[name]
            say(f"  # {notes[name]} (pid {prog.child.pid})")
            say(f"  {prog.typed(pp)}")
        say("")
        say("Try it yourself: open a tunnel (npt -x prints its local port) and fetch the page")
        say("through it, or a large body (/blob?bytes=N):")
        say(f"  port=$({npt.typed(pp)}) && curl -s \"http://{HOST}:$port/\"")
        say("")
        say(f"State and logs: {self.state}")
        say("Ctrl-C stops everything and removes the state directory.")

    async def watch(self) -> None:
        """--keep: return never; PhaseFailed if one of the programs exits on its own."""
        waits = {asyncio.ensure_future(p.child.wait()): name
                 for name, p in self.programs.items()
                 if name != "npt" and p.child is not None}
        try:
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in waits:
                t.cancel()
        fut = next(iter(done))
        name = waits[fut]
        child = self.programs[name].child
        raise PhaseFailed("keep", f"{name} exited on its own with code {child.returncode}",
                          child.tail())

    # -- stop -----------------------------------------------------------------------------------

    def _grace(self, seconds: float) -> float:
        return 1.0 if self.hurry else seconds

    async def stop(self) -> list[str]:
        """Stop everything that was started, in order; the list of problems (empty: clean)."""
        problems: list[str] = []
        stopped: list[str] = []
        npt = self.programs.get("npt")
        if npt is not None and npt.child is not None and npt.child.returncode is None:
            # interrupted while npt -x was setting up: SIGINT is what makes it stop its
            # background runner too (it is in a session of its own)
            _, killed = await npt.child.stop(signal.SIGINT, grace=self._grace(8.0))
            stopped.append("npt -x")
            if killed:
                problems.append("npt -x needed SIGKILL")
        self._note_runner()
        if self.runner is not None:
            if self.runner.alive():
                stopped.append("npt runner")
            if await self.runner.stop(signal.SIGTERM, grace=self._grace(8.0)):
                problems.append(f"the npt runner (pid {self.runner.pid}) needed SIGKILL")
        for name in ("npd", "srvd", "atserver", "web"):
            prog = self.programs.get(name)
            if prog is None or prog.child is None or prog.child.proc is None:
                continue
            was_running = prog.child.returncode is None
            code, killed = await prog.child.stop(signal.SIGTERM, grace=self._grace(15.0))
            if was_running:
                stopped.append("web service" if name == "web" else name)
                if killed:
                    problems.append(f"{name} needed SIGKILL")
                elif code != 0 and (prog.ready or code != -signal.SIGTERM):
                    # (a program still starting up may not handle SIGTERM yet: that is fine)
                    problems.append(f"{name} exited with code {code} after SIGTERM")
        self.stopped = stopped
        return problems
