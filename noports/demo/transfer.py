"""The demo's side of the tunnel: a minimal asyncio HTTP/1.0 client and the measurements.

Owns fetching the page, downloading and uploading generated bodies through the tunnel's local
port, hashing (sha256) what crossed, and timing it.  asyncio rather than urllib in a thread so
that a Ctrl-C cancels a transfer at once.  Only what our own web service speaks is supported:
one request per connection, a Content-Length body.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from noports.demo.webservice import CHUNK, keystream_chunks

__all__ = ["HttpError", "Response", "Transfer", "download", "fetch", "upload"]

MIB = 1 << 20


class HttpError(Exception):
    pass


@dataclass
class Response:
    status: int
    reason: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Transfer:
    nbytes: int
    sha256: str          # of what this side sent or received
    peer_sha256: str     # of what the other side received or sent
    seconds: float

    @property
    def mib_per_s(self) -> float:
        return self.nbytes / MIB / self.seconds if self.seconds > 0 else float("inf")


async def _open(port: int, timeout: float):
    try:
        return await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, limit=4 * CHUNK), timeout)
    except (OSError, asyncio.TimeoutError) as exc:
        raise HttpError(f"cannot connect to 127.0.0.1:{port}: {exc or 'timeout'}") from None


async def _head(reader: asyncio.StreamReader, timeout: float) -> tuple[int, str, dict]:
    try:
        raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    except asyncio.IncompleteReadError as exc:
        raise HttpError(f"the connection closed before a response "
                        f"({len(exc.partial)} bytes)") from None
    except asyncio.LimitOverrunError:
        raise HttpError("response headers too long") from None
    except asyncio.TimeoutError:
        raise HttpError(f"no response within {timeout:g} s") from None
    lines = raw.decode("iso-8859-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise HttpError(f"not an HTTP response: {lines[0][:80]!r}")
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    return int(parts[1]), parts[2] if len(parts) > 2 else "", headers


def _length(headers: dict) -> int:
    try:
        return int(headers["content-length"])
    except (KeyError, ValueError):
        raise HttpError("response without a usable Content-Length") from None


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), 2.0)
    except (OSError, asyncio.TimeoutError):
        pass


def _request(method: str, path: str, port: int, length: int | None = None) -> bytes:
    head = f"{method} {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: noports-demo\r\n"
    if length is not None:
        head += f"Content-Length: {length}\r\nContent-Type: application/octet-stream\r\n"
    return (head + "\r\n").encode()


async def fetch(port: int, path: str = "/", timeout: float = 20.0) -> Response:
    """GET ``path``; the whole body."""
    reader, writer = await _open(port, timeout)
    try:
        writer.write(_request("GET", path, port))
        status, reason, headers = await _head(reader, timeout)
        try:
            body = await asyncio.wait_for(reader.readexactly(_length(headers)), timeout)
        except asyncio.IncompleteReadError as exc:
            raise HttpError(f"body cut short at {len(exc.partial)} bytes") from None
        return Response(status, reason, headers, body)
    finally:
        await _close(writer)


Progress = Callable[[int], None]


class _Watchdog:
    """Aborts the connection when no progress was made for ``seconds``.

    Why not ``asyncio.wait_for`` around each read: before Python 3.12 it can swallow the
    task's cancellation when the read completes at the same moment -- which, mid-transfer, is
    nearly always -- so a Ctrl-C would be lost.  Here the reads are awaited bare.
    """

    def __init__(self, writer: asyncio.StreamWriter, seconds: float) -> None:
        self.writer = writer
        self.seconds = seconds
        self.fired = False
        self.last = time.monotonic()
        self._loop = asyncio.get_running_loop()
        self._handle = self._loop.call_later(seconds, self._check)

    def progress(self) -> None:
        self.last = time.monotonic()

    def _check(self) -> None:
        idle = time.monotonic() - self.last
        if idle >= self.seconds:
            self.fired = True
            self.writer.transport.abort()
        else:
            self._handle = self._loop.call_later(self.seconds - idle, self._check)

    def cancel(self) -> None:
        self._handle.cancel()


async def download(port: int, path: str, expected: int,
                   peer_digest: Callable[[], Awaitable[str]], *,
                   progress: Progress | None = None, stall: float = 30.0) -> Transfer:
    """GET ``path`` (``expected`` bytes), hashing as it arrives; ``peer_digest()`` then gives
    the sender's sha256.  ``stall``: longest wait for any progress."""
    t0 = time.perf_counter()
    reader, writer = await _open(port, stall)
    try:
        writer.write(_request("GET", path, port))
        status, reason, headers = await _head(reader, stall)
        if status != 200:
            raise HttpError(f"HTTP {status} {reason}")
        length = _length(headers)
        if length != expected:
            raise HttpError(f"Content-Length {length}, expected {expected}")
        h = hashlib.sha256()
        got = 0
        dog = _Watchdog(writer, stall)
        try:
            while got < length:
                try:
                    data = await reader.read(min(4 * CHUNK, length - got))
                except (ConnectionError, OSError):
                    data = b""
                if not data:
                    if dog.fired:
                        raise HttpError(f"stalled at {got} of {length} bytes for {stall:g} s")
                    raise HttpError(f"the connection closed after {got} of {length} bytes")
                dog.progress()
                h.update(data)
                got += len(data)
                if progress is not None:
                    progress(got)
        finally:
            dog.cancel()
        seconds = time.perf_counter() - t0
    finally:
        await _close(writer)
    return Transfer(got, h.hexdigest(), await peer_digest(), seconds)


async def upload(port: int, path: str, size: int, *, progress: Progress | None = None,
                 stall: float = 30.0) -> Transfer:
    """PUT ``size`` generated bytes; the service answers with the sha256 of what it got."""
    t0 = time.perf_counter()
    reader, writer = await _open(port, stall)
    try:
        writer.write(_request("PUT", path, port, size))
        h = hashlib.sha256()
        sent = 0
        dog = _Watchdog(writer, stall)
        try:
            for chunk in keystream_chunks(size):
                h.update(chunk)
                writer.write(bytes(chunk))      # the view's buffer is reused for the next one
                sent += len(chunk)
                try:
                    await writer.drain()
                except (ConnectionError, OSError) as exc:
                    if dog.fired:
                        raise HttpError(f"stalled at {sent} of {size} bytes for "
                                        f"{stall:g} s") from None
                    raise HttpError(f"the connection broke after {sent} of {size} bytes: "
                                    f"{exc}") from None
                dog.progress()
                if progress is not None:
                    progress(sent)
        finally:
            dog.cancel()
        status, reason, headers = await _head(reader, stall)
        if status != 200:
            raise HttpError(f"HTTP {status} {reason}")
        try:
            body = await asyncio.wait_for(reader.readexactly(_length(headers)), stall)
            reply = json.loads(body)
            got, digest = int(reply["bytes"]), str(reply["sha256"])
        except (asyncio.IncompleteReadError, ValueError, KeyError, TypeError):
            raise HttpError("the web service's reply was not understood") from None
        seconds = time.perf_counter() - t0
    finally:
        await _close(writer)
    if got != size:
        raise HttpError(f"the web service received {got} of {size} bytes")
    return Transfer(size, h.hexdigest(), digest, seconds)


class LiveCounter:
    """``progress`` callback that redraws one status line on a terminal (nothing otherwise)."""

    def __init__(self, label: str, total: int, stream=None) -> None:
        self.stream = stream or sys.stdout
        self.enabled = bool(getattr(self.stream, "isatty", lambda: False)())
        self.label = label
        self.total = total
        self.t0 = time.perf_counter()
        self.last = 0.0

    def __call__(self, done: int) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if now - self.last < 0.2 and done < self.total:
            return
        self.last = now
        rate = done / MIB / max(now - self.t0, 1e-9)
        self.stream.write(f"\r          {self.label} {done // MIB:>6} / {self.total // MIB} MiB"
                          f"  {rate:8.1f} MiB/s ")
        self.stream.flush()

    def clear(self) -> None:
        if self.enabled:
            self.stream.write("\r\033[K")
            self.stream.flush()
