"""The embedded root directory (atDirectory): atSign -> ``host:port`` over TLS.

Owns the root wire behaviour (spec atprotocol.md §1): ``@`` on accept; each line is one lookup
(lower-cased, trimmed, a leading ``@`` stripped -- the Dart root does not strip it, every client
strips it before sending); answer ``host:port\\r\\n@`` or ``null\\r\\n@`` in one write; ``@exit``
closes; an empty line (at_c's liveness probe) is answered ``null`` and not counted.

Throttle on repeated misses (the Dart root delays its 2nd miss by 3 s and closes on the 3rd; that
would break test suites that probe unknown names, so ours is gentler): per connection the first
``free_misses`` (default 10) unknown names are answered at once, each further one after
``miss_delay`` seconds (default 1 s), and after ``max_misses`` (default 20) the connection is
closed without an answer.  Lines are capped at 255 bytes like the Dart root's buffer.
"""

from __future__ import annotations

import asyncio
import collections
import logging

from noports.at.responses import LineReader, encode_root_answer
from noports.atserver.server import close_soon
from noports.errors import AtProtocolError

__all__ = ["RootDirectory", "RootProtocol"]

log = logging.getLogger("noports.atserver.root")

ROOT_MAX_LINE = 255


class RootDirectory:
    """The table the root serves, plus its throttle settings and live connections."""

    def __init__(self, *, free_misses: int = 10, miss_delay: float = 1.0, max_misses: int = 20,
                 idle_timeout: float = 600.0, max_connections: int = 1000) -> None:
        self.records: dict[str, tuple[str, int]] = {}
        self.free_misses = free_misses
        self.miss_delay = miss_delay
        self.max_misses = max_misses
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self.connections: set[RootProtocol] = set()

    def set(self, atsign: str, host: str, port: int) -> None:
        self.records[atsign.lstrip("@").lower()] = (host, port)

    def resolve(self, name: str) -> tuple[str, int] | None:
        return self.records.get(name)


class RootProtocol(asyncio.Protocol):
    def __init__(self, directory: RootDirectory) -> None:
        self.directory = directory
        self.transport = None
        self.reader = LineReader(ROOT_MAX_LINE)
        self.queue: collections.deque[str] = collections.deque()
        self.misses = 0
        self.busy = False
        self.closed = False
        self.last_active = 0.0
        self._timer = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        d = self.directory
        if len(d.connections) >= d.max_connections:
            self.closed = True
            transport.close()
            return
        d.connections.add(self)
        self.last_active = asyncio.get_running_loop().time()
        transport.write(b"@")

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.directory.connections.discard(self)
        if self._timer is not None:
            self._timer.cancel()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            lines = self.reader.feed(data)
        except AtProtocolError:      # over the 255-byte cap, or not UTF-8
            try:
                self.transport.pause_reading()
            except (RuntimeError, AttributeError):
                pass
            self._close()
            return
        if lines:
            self.last_active = asyncio.get_running_loop().time()
            self.queue.extend(lines)
            self._process()

    def _close(self) -> None:
        self.closed = True
        self.queue.clear()
        if self.transport is not None:
            close_soon(asyncio.get_running_loop(), self.transport)

    def _process(self) -> None:
        d = self.directory
        while self.queue and not self.busy and not self.closed:
            name = self.queue.popleft().strip().lower()
            if name == "@exit":
                self._close()
                return
            if name.startswith("@"):
                name = name[1:]
            answer = d.resolve(name) if name else None
            if answer is not None or not name:
                self.transport.write(encode_root_answer(*answer) if answer
                                     else encode_root_answer(None, None))
                continue
            self.misses += 1
            if self.misses > d.max_misses:
                log.info("root: closing a connection after %d unknown names", self.misses - 1)
                self._close()
                return
            if self.misses > d.free_misses and d.miss_delay > 0:
                self.busy = True
                loop = asyncio.get_running_loop()
                self._timer = loop.call_later(d.miss_delay, self._answer_late)
                return
            self.transport.write(encode_root_answer(None, None))

    def _answer_late(self) -> None:
        self._timer = None
        self.busy = False
        if self.closed:
            return
        self.transport.write(encode_root_answer(None, None))
        self._process()
