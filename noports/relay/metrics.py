"""srvd's ``--metrics-port``: a tiny HTTP server that serves the Prometheus text of the relay.

Owns the HTTP side only: ``GET /metrics`` (and ``HEAD``) answered with whatever the ``render``
callable returns (``RelayStats.render()`` plus the control plane's counters), ``404`` for other
paths, ``405`` for other methods, one request per connection.  It listens on 127.0.0.1 by default
(``--metrics-host``), reads at most 8 KiB of request head within a few seconds, and serves a few
connections at a time, so a stray client cannot hold the relay's resources.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

__all__ = ["CONTENT_TYPE", "MetricsServer"]

log = logging.getLogger("noports.relay")

#: The Prometheus text exposition format, version 0.0.4.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_MAX_HEAD = 8192


class MetricsServer:
    """``await MetricsServer(render, host, port).start()`` -> the bound port; ``close()``."""

    def __init__(self, render: Callable[[], str], host: str = "127.0.0.1", port: int = 0, *,
                 max_connections: int = 16, timeout: float = 5.0) -> None:
        self.render = render
        self.host = host
        self.port = port
        self.max_connections = max_connections
        self.timeout = timeout
        self.requests_total = 0
        self._server: asyncio.base_events.Server | None = None
        self._live = 0
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._client, self.host, self.port,
                                                  reuse_address=True, limit=_MAX_HEAD)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        self._live += 1
        try:
            if self._live > self.max_connections:
                return          # over the cap: close at once, never queue
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.timeout)
            except asyncio.LimitOverrunError:      # more than _MAX_HEAD bytes of head
                await self._respond(writer, 431, "Request Header Fields Too Large", "")
                return
            except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError):
                return
            await self._answer(head, writer)
        except (ConnectionError, asyncio.TimeoutError):
            pass
        finally:
            self._live -= 1
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)
            if task is not None:
                self._tasks.discard(task)

    async def _answer(self, head: bytes, writer: asyncio.StreamWriter) -> None:
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = request_line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            await self._respond(writer, 400, "Bad Request", "bad request line\n")
            return
        method, target, _version = parts
        path = target.split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            await self._respond(writer, 405, "Method Not Allowed", "GET /metrics only\n",
                                extra="Allow: GET, HEAD\r\n")
            return
        if path != "/metrics":
            await self._respond(writer, 404, "Not Found", "try /metrics\n")
            return
        self.requests_total += 1
        await self._respond(writer, 200, "OK", self.render(), head_only=method == "HEAD",
                            content_type=CONTENT_TYPE)

    async def _respond(self, writer: asyncio.StreamWriter, status: int, phrase: str, body: str,
                       *, head_only: bool = False, content_type: str = "text/plain; charset=utf-8",
                       extra: str = "") -> None:
        data = body.encode()
        header = (f"HTTP/1.1 {status} {phrase}\r\nContent-Type: {content_type}\r\n"
                  f"Content-Length: {len(data)}\r\nConnection: close\r\n{extra}\r\n").encode()
        writer.write(header if head_only else header + data)
        await asyncio.wait_for(writer.drain(), self.timeout)
