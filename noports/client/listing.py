"""``npt --list-devices`` (``--ls``): which devices can I reach, and are they up?
(noports-protocol.md §7.3, §2.3 keys #2 heartbeat and #3 device_info.)

Owns discovery, the liveness probe and the two renderings (aligned table, ``--json``):

1. discovery.  Every npd shares ``@<manager>:device_info.<device>.sshnp@<daemon>`` with each of
   its managers (ttl 30 days, refreshed hourly).  With ``-t @daemon`` (repeatable) we ask the
   atServer for what that atSign shares with us: ``scan:@daemon device_info\\..+\\.sshnp``.
   Without ``-t`` we scan our own atServer, which holds a ``cached:`` copy of every such record
   shared with us by any daemon atSign: npd writes them with ttr -1 and ccd true, so the
   update notification caches them and the daemon's delete (``--hide``) removes them (ours
   does this for the atSigns it hosts, as Atsign's does).  Either way the record itself is
   then read from its owner, never from the cache (step 2).
2. each record is read with ``lookup`` bypassing any cache (its JSON is the daemon's ping
   response: version, permit-open list, device group);
3. a monitor for ``heartbeat\\..+\\.sshnp@`` is subscribed, then every device is pinged at
   once; heartbeats are collected until every device has answered or ``--list-timeout``
   (default 10 s, as Atsign's sshnp) has passed.  A heartbeat counts only from the atSign that
   owns the device.  Answered: ``active``, else ``inactive`` (a device_info record outlives its
   daemon by up to 30 days).

Rendering is sans-IO (:func:`render_table`, :func:`render_json`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from noports.at.names import normalize_atsign
from noports.errors import NoPortsError
from noports.messages import PingResponse, device_info_key, ping_key

if TYPE_CHECKING:  # pragma: no cover - `npt --help` imports this module: keep it light
    from noports.at.client import AtClient

__all__ = [
    "LIST_TIMEOUT",
    "DeviceRow",
    "list_devices",
    "parse_device_info_name",
    "render_json",
    "render_table",
]

log = logging.getLogger("noports.client")

#: Seconds to collect heartbeats (Atsign's sshnp --list-devices waits 10 s).
LIST_TIMEOUT = 10.0
#: The scan regex for one daemon's records (the names come back as ``device_info.<d>.sshnp@D``).
INFO_REGEX = r"device_info\..+\.sshnp"
#: Pings and their answers live briefly (spec §2.3 #1, #2).
PING_TTL_MS = 10_000
PING_TTLN_MS = 60_000
#: Monitor replay window before "now" (clock skew between us and the atServer).
MONITOR_SKEW_MS = 2_000

_NAME = re.compile(r"^(?:cached:)?(?:@[^:@]+:)?device_info\.(?P<device>.+)\.sshnp"
                   r"(?P<owner>@[^@:]+)$")


@dataclass
class DeviceRow:
    """One line of the listing."""

    device: str
    atsign: str                          # the daemon's atSign
    status: str = "inactive"             # "active": it answered the ping within the timeout
    version: str = ""
    permit_open: list[str] = field(default_factory=list)
    device_group: str = ""
    info_error: str | None = None        # the device_info record could not be read

    def to_json(self) -> dict:
        out = {"device": self.device, "atsign": self.atsign, "status": self.status,
               "version": self.version or None, "permitOpen": list(self.permit_open),
               "deviceGroup": self.device_group or None}
        if self.info_error:
            out["error"] = self.info_error
        return out


def parse_device_info_name(name: str) -> tuple[str, str] | None:
    """``(device, daemon)`` of a scanned key name, or None if it is not a device_info key.
    Accepts ``device_info.d.sshnp@D``, ``@me:device_info.d.sshnp@D`` and their ``cached:``
    forms."""
    m = _NAME.match(name.strip())
    if m is None:
        return None
    try:
        return m.group("device").lower(), normalize_atsign(m.group("owner"))
    except NoPortsError:
        return None


def _apply_ping(row: DeviceRow, text: str | None) -> bool:
    """Fill the row from a ping-response JSON; False if it is not one."""
    if not text:
        return False
    try:
        ping = PingResponse.from_json(text)
    except NoPortsError:
        return False
    row.version = ping.version or row.version
    row.permit_open = list(ping.allowed_services) or row.permit_open
    row.device_group = ping.device_group_name or row.device_group
    return True


async def _discover(client: AtClient, daemons: list[str] | None) -> list[tuple[str, str]]:
    found: set[tuple[str, str]] = set()
    if daemons:
        for daemon in daemons:
            for name in await client.scan(INFO_REGEX, for_atsign=daemon):
                parsed = parse_device_info_name(name)
                if parsed is not None and parsed[1] == daemon:
                    found.add(parsed)
    else:
        for name in await client.scan(INFO_REGEX + "@"):
            parsed = parse_device_info_name(name)
            if parsed is not None and parsed[1] != client.atsign:
                found.add(parsed)
    return sorted(found, key=lambda dd: (dd[1], dd[0]))


async def _read_info(client: AtClient, row: DeviceRow) -> None:
    key = f"{device_info_key(row.device)}{row.atsign}"
    try:
        value = await client.get(key, bypass_cache=True)
    except (NoPortsError, OSError, ValueError, asyncio.TimeoutError) as exc:
        row.info_error = f"cannot read {key}: {exc}"
        return
    if not _apply_ping(row, value):
        row.info_error = f"{key} is not a device_info record"


async def list_devices(client: AtClient, daemons: list[str] | None = None, *,
                       device: str | None = None,
                       timeout: float = LIST_TIMEOUT) -> list[DeviceRow]:
    """Discover, read and ping; ``client`` must be connected (logged in)."""
    pairs = await _discover(client, daemons)
    if device is not None:
        pairs = [p for p in pairs if p[0] == device.lower()]
    rows = {pair: DeviceRow(device=pair[0], atsign=pair[1]) for pair in pairs}
    if not rows:
        return []
    await asyncio.gather(*(_read_info(client, r) for r in rows.values()))

    waiting = set(rows)
    all_in = asyncio.Event()
    mon = client.monitor(r"heartbeat\..+\.sshnp@",
                         since=int(time.time() * 1000) - MONITOR_SKEW_MS)

    def on_heartbeat(n) -> None:
        if n.operation == "delete" or n.value is None:
            return
        m = re.fullmatch(r"heartbeat\.(.+)\.sshnp", n.entity)
        if m is None:
            return
        pair = (m.group(1).lower(), n.from_atsign)
        row = rows.get(pair)
        if row is None or pair not in waiting:
            return
        if _apply_ping(row, n.value):
            row.status = "active"
            waiting.discard(pair)
            if not waiting:
                all_in.set()

    async def collect() -> None:
        async for n in mon:
            on_heartbeat(n)

    await mon.start(timeout=min(30.0, max(timeout, 5.0)))
    reader = asyncio.ensure_future(collect())
    try:
        pings = [client.notify(f"{d}:{ping_key(dev)}", "ping", ttl=PING_TTL_MS,
                               ttln=PING_TTLN_MS) for dev, d in rows]
        results = await asyncio.gather(*pings, return_exceptions=True)
        for (dev, d), res in zip(rows, results, strict=True):
            if isinstance(res, BaseException):
                log.warning("cannot ping %s%s: %s", dev, d, res)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(all_in.wait(), timeout)
    finally:
        reader.cancel()
        with contextlib.suppress(BaseException):
            await reader
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await asyncio.wait_for(mon.close(), 2.0)
    return [rows[p] for p in pairs]


# ---- rendering --------------------------------------------------------------------------------

_HEADERS = ("DEVICE", "ATSIGN", "STATUS", "VERSION", "PERMIT-OPEN")


def render_table(rows: list[DeviceRow], *, timeout: float = LIST_TIMEOUT,
                 daemons: list[str] | None = None) -> str:
    """Aligned columns, one device a line, then a summary line."""
    if not rows:
        where = (f" shared by {', '.join(daemons)}" if daemons
                 else " (no daemon atSign has shared its device_info with this atSign)")
        return f"no devices found{where}\n"
    cells = [(r.device, r.atsign, r.status, r.version or "?",
              ",".join(r.permit_open) or "?") for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(_HEADERS)]

    def line(values) -> str:
        return "  ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)).rstrip()

    out = [line(_HEADERS)]
    out += [line(c) for c in cells]
    active = sum(1 for r in rows if r.status == "active")
    out.append("")
    out.append(f"{active} of {len(rows)} device(s) active (answered a ping within "
               f"{timeout:g} s)")
    return "\n".join(out) + "\n"


def render_json(rows: list[DeviceRow], *, timeout: float = LIST_TIMEOUT) -> str:
    return json.dumps({"timeout": timeout, "devices": [r.to_json() for r in rows]},
                      indent=2) + "\n"

