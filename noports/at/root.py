"""Root directory (atDirectory) lookups: which ``host:port`` serves an atSign.

Owns the client side of spec atprotocol.md §1: parse a ``HOST[:PORT]`` root address, ask the
root over TLS (greeting ``@``, request ``alice\\n``, answer ``host:port`` or ``null``), retry
transient failures (5 attempts, 50/100/150/200 ms apart, like Dart's at_lookup) and cache
answers for an hour.  The default root, ``root.atsign.org:64``, is Atsign's public directory: it
cannot be reached from an isolated network (nor from this project's tests, which always start
their own root with ``atserver``).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time

from noports.at.connection import (
    AtConnectionError,
    AtTimeoutError,
    AtTlsError,
    connect_protocol,
)
from noports.at.names import bare_atsign, normalize_atsign
from noports.at.responses import RootAnswer, RootNotFound, RootResponseParser
from noports.errors import AtProtocolError, AtServerError

__all__ = [
    "DEFAULT_ROOT",
    "DEFAULT_ROOT_PORT",
    "RETRY_DELAYS",
    "ROOT_CACHE_SECONDS",
    "AtSignNotFoundError",
    "RootClient",
    "clear_root_cache",
    "parse_root_address",
]

log = logging.getLogger(__name__)

#: Atsign's public root directory (not reachable without Internet access).
DEFAULT_ROOT = "root.atsign.org:64"
DEFAULT_ROOT_PORT = 64
#: Pauses between the 5 attempts of one lookup (at_lookup's schedule).
RETRY_DELAYS = (0.05, 0.10, 0.15, 0.20)
ROOT_CACHE_SECONDS = 3600.0

# (root host, root port, bare atSign) -> (expires at (monotonic), host, port); shared by every
# RootClient of the process so that many AtClients ask the root once.
_CACHE: dict[tuple[str, int, str], tuple[float, str, int]] = {}


class AtSignNotFoundError(AtServerError):
    """The root directory has no atServer for this atSign (it answered ``null``).

    Code AT0007 ("Secondary server not found"), as the Dart server reports the same condition.
    """

    def __init__(self, atsign: str, root: str) -> None:
        super().__init__("AT0007", f"the root {root} has no atServer for {atsign}")
        self.atsign = atsign
        self.root = root


def clear_root_cache() -> None:
    """Forget every cached root answer (tests; or after the operator moved atServers)."""
    _CACHE.clear()


def parse_root_address(text: str, default_port: int = DEFAULT_ROOT_PORT) -> tuple[str, int]:
    """``"host"``, ``"host:port"``, ``"[::1]:6464"`` or ``"::1"`` -> ``(host, port)``."""
    text = text.strip()
    if not text:
        raise ValueError("empty root address")
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"bad root address {text!r}")
        port_text = rest[1:] if rest else ""
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:  # plain host name, IPv4 address or bare IPv6 address
        host, port_text = text, ""
    if not host:
        raise ValueError(f"bad root address {text!r}: no host")
    if not port_text:
        return host, default_port
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"bad root address {text!r}: port {port_text!r} is not a number") from None
    if not 0 < port < 65536:
        raise ValueError(f"bad root address {text!r}: port {port} out of range")
    return host, port


class RootClient:
    """Looks atSigns up in one root directory.

    ``root`` is ``HOST[:PORT]`` (default ``root.atsign.org:64``, unreachable here); the TLS
    context should verify certificates (see ``noports.at.connection.make_ssl_context``).
    """

    def __init__(self, root: str = DEFAULT_ROOT, ssl_context: ssl.SSLContext | None = None, *,
                 timeout: float = 10.0, cache_seconds: float = ROOT_CACHE_SECONDS,
                 retry_delays: tuple[float, ...] = RETRY_DELAYS) -> None:
        self.host, self.port = parse_root_address(root)
        self.root = f"{self.host}:{self.port}"
        self.ssl_context = ssl_context
        self.timeout = timeout
        self.cache_seconds = cache_seconds
        self.retry_delays = retry_delays

    def invalidate(self, atsign: str) -> None:
        _CACHE.pop((self.host, self.port, bare_atsign(atsign)), None)

    async def lookup(self, atsign: str) -> tuple[str, int]:
        """The ``(host, port)`` of the atServer of ``atsign``.

        Raises AtSignNotFoundError when the root answers ``null``; AtConnectionError /
        AtTimeoutError when it cannot be asked after 5 attempts.
        """
        atsign = normalize_atsign(atsign)
        key = (self.host, self.port, atsign[1:])
        hit = _CACHE.get(key)
        if hit is not None and hit[0] > time.monotonic():
            return hit[1], hit[2]
        last: Exception | None = None
        for attempt in range(len(self.retry_delays) + 1):
            if attempt:
                await asyncio.sleep(self.retry_delays[attempt - 1])
            try:
                host, port = await self._ask(atsign)
            except AtTlsError:
                raise   # an untrusted certificate stays untrusted: no point retrying
            except (AtConnectionError, AtTimeoutError, AtProtocolError) as exc:
                last = exc
                log.debug("root %s lookup of %s failed (attempt %d): %s", self.root, atsign,
                          attempt + 1, exc)
                continue
            _CACHE[key] = (time.monotonic() + self.cache_seconds, host, port)
            return host, port
        raise AtConnectionError(
            f"cannot look up {atsign} in root {self.root} after "
            f"{len(self.retry_delays) + 1} attempts: {last}") from last

    async def _ask(self, atsign: str) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        proto = await connect_protocol(lambda: _RootProtocol(loop), self.host, self.port,
                                       self.ssl_context, timeout=self.timeout)
        try:
            proto.write(atsign[1:].encode() + b"\n")
            try:
                event = await asyncio.wait_for(asyncio.shield(proto.answer), self.timeout)
            except asyncio.TimeoutError:
                raise AtTimeoutError(f"root {self.root} did not answer") from None
        finally:
            proto.finish()
        if isinstance(event, RootNotFound):
            raise AtSignNotFoundError(atsign, self.root)
        if not isinstance(event, RootAnswer):  # pragma: no cover - parser contract
            raise AtProtocolError(f"unexpected root answer {event!r}")
        return event.host, int(event.port)


class _RootProtocol(asyncio.Protocol):
    """One root connection: first parsed answer (or the failure) lands in ``answer``."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.answer: asyncio.Future = loop.create_future()
        self._parser = RootResponseParser()
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        if self.answer.done():
            return
        try:
            events = self._parser.feed(data)
        except AtProtocolError as exc:
            self.answer.set_exception(exc)
            return
        if events:
            self.answer.set_result(events[0])

    def connection_lost(self, exc) -> None:
        if not self.answer.done():
            self.answer.set_exception(AtConnectionError(
                "root closed the connection without answering" + (f": {exc}" if exc else "")))

    def write(self, data: bytes) -> None:
        if self._transport is None or self._transport.is_closing():
            raise AtConnectionError("root connection closed")
        self._transport.write(data)

    def finish(self) -> None:
        """Say ``@exit`` (Dart at_lookup does) and close."""
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(b"@exit\n")
            self._transport.close()
        if self.answer.done() and not self.answer.cancelled():
            self.answer.exception()  # retrieved: never "exception was never retrieved"
