"""The multi-mode control channel's messages, sans-IO (noports-protocol.md §5.5 items 3-7).

Owns the plaintext lines the client end writes on the (AES-encrypted) control socket and the
daemon end reads: ``connect:<key>:<iv>\\n`` (a per-connection AES-256 key and IV, base64),
``connect:no:encrypt\\n``, the newer twin-key form ``connect:<kC2D>:<ivC2D>:<kD2C>:<ivD2C>\\n``
(parsed, never emitted by our client), ``heartbeat:<n>\\n`` (parsed; the daemon end echoes
it), and the newline-less 77-byte form that Atsign's clients before 5.6.1 wrote back to back.
No sockets, no asyncio, no cipher: the ends decrypt first and feed this module plaintext.

Garbage raises :class:`ControlMessageError` (an ``AtProtocolError``), nothing else; lines are
capped at :data:`MAX_CONTROL_LINE` bytes so a peer cannot make the parser buffer without bound.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from noports.at.crypto import b64d
from noports.errors import AtProtocolError

__all__ = [
    "IV_B64_LEN",
    "KEY_B64_LEN",
    "LEGACY_CONNECT_LEN",
    "MAX_CONTROL_LINE",
    "NO_ENCRYPT_LINE",
    "Connect",
    "ControlEvent",
    "ControlMessageError",
    "ControlParser",
    "Heartbeat",
    "Unknown",
    "encode_connect",
    "encode_connect_twin",
    "encode_heartbeat",
    "encode_heartbeat_echo",
    "encode_no_encrypt",
    "parse_line",
]

KEY_B64_LEN = 44          # base64 of a 32-byte AES-256 key
IV_B64_LEN = 24           # base64 of a 16-byte IV
#: ``connect:`` + key + ``:`` + IV, the unit of the old newline-less form.
LEGACY_CONNECT_LEN = len("connect:") + KEY_B64_LEN + 1 + IV_B64_LEN
#: Longest control line accepted, newline excluded (the twin-key line is 148 bytes; Atsign's C
#: srv reads control messages in 4096-byte reads, so nothing legitimate is longer).
MAX_CONTROL_LINE = 4096
NO_ENCRYPT_LINE = b"connect:no:encrypt\n"

_KEY_BYTES = 32
_IV_BYTES = 16
_B64 = rb"[A-Za-z0-9+/]"
# A candidate for the old form: exactly what ``connect:`` + base64(32) + ``:`` + base64(16) is.
_LEGACY_RE = re.compile(rb"connect:" + _B64 + rb"{43}=:" + _B64 + rb"{22}==")
# Verbs we do not know are ignored (forward compatibility: heartbeat was added this way).
_VERB_RE = re.compile(r"[a-z][A-Za-z0-9_\-]{0,31}")


class ControlMessageError(AtProtocolError):
    """Bytes on the control channel that are not a control message (or a line over the cap).

    When raised by :meth:`ControlParser.feed`, ``events`` lists the messages that the same call
    completed before the garbage.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.events: list = []


@dataclass(frozen=True)
class Connect:
    """Open one data connection.  Keys are raw bytes; all four are None for ``no:encrypt``.

    The baseline form carries one key/IV used by both directions (``key_c2d is key_d2c``);
    the twin-key form has one pair per direction.
    """

    key_c2d: bytes | None
    iv_c2d: bytes | None
    key_d2c: bytes | None
    iv_d2c: bytes | None
    twin: bool = False

    @property
    def encrypted(self) -> bool:
        return self.key_c2d is not None


@dataclass(frozen=True)
class Heartbeat:
    """``heartbeat:<n>`` (client -> daemon keep-alive); ``text`` is what followed the colon."""

    text: str


@dataclass(frozen=True)
class Unknown:
    """A well-formed line with a verb we do not know; logged and ignored by the daemon end."""

    line: str


ControlEvent = Connect | Heartbeat | Unknown


def _show(raw: bytes | str) -> str:
    text = repr(raw)
    return text if len(text) <= 80 else text[:77] + "..."


def _decode(text: str, size: int, what: str) -> bytes:
    try:
        raw = b64d(text)
    except ValueError:
        raise ControlMessageError(f"control channel: {what} is not base64: {_show(text)}") from None
    if len(raw) != size:
        raise ControlMessageError(f"control channel: {what} must be {size} bytes, "
                                  f"got {len(raw)}")
    return raw


# --- encoding (client end) -----------------------------------------------------------------

def encode_connect(key_b64: str, iv_b64: str) -> bytes:
    """``connect:<key>:<iv>\\n`` (baseline: one key/IV for both directions)."""
    _decode(key_b64, _KEY_BYTES, "key")
    _decode(iv_b64, _IV_BYTES, "IV")
    return f"connect:{key_b64}:{iv_b64}\n".encode("ascii")


def encode_connect_twin(key_c2d: str, iv_c2d: str, key_d2c: str, iv_d2c: str) -> bytes:
    """``connect:<kC2D>:<ivC2D>:<kD2C>:<ivD2C>\\n`` (newer clients with ``twinKeys``)."""
    for text, size, what in ((key_c2d, _KEY_BYTES, "key C2D"), (iv_c2d, _IV_BYTES, "IV C2D"),
                             (key_d2c, _KEY_BYTES, "key D2C"), (iv_d2c, _IV_BYTES, "IV D2C")):
        _decode(text, size, what)
    return f"connect:{key_c2d}:{iv_c2d}:{key_d2c}:{iv_d2c}\n".encode("ascii")


def encode_no_encrypt() -> bytes:
    """``connect:no:encrypt\\n`` (a session with ``encryptRvdTraffic`` false)."""
    return NO_ENCRYPT_LINE


def encode_heartbeat(count: int) -> bytes:
    """``heartbeat:<n>\\n``."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"heartbeat count must be a non-negative int, got {count!r}")
    return b"heartbeat:%d\n" % count


def encode_heartbeat_echo(heartbeat: Heartbeat) -> bytes:
    """What our daemon end sends back for a ``heartbeat:<text>``: the same line.  Atsign's
    clients only log what they read on the control channel; ours take it as proof of life."""
    return b"heartbeat:%s\n" % heartbeat.text.encode("ascii", "replace")


# --- parsing (daemon end) ------------------------------------------------------------------

def _parse_connect(rest: str) -> Connect:
    parts = rest.split(":")
    if parts == ["no", "encrypt"]:
        return Connect(None, None, None, None)
    if len(parts) == 2:
        key = _decode(parts[0], _KEY_BYTES, "key")
        iv = _decode(parts[1], _IV_BYTES, "IV")
        return Connect(key, iv, key, iv)
    if len(parts) == 4:
        return Connect(_decode(parts[0], _KEY_BYTES, "key C2D"),
                       _decode(parts[1], _IV_BYTES, "IV C2D"),
                       _decode(parts[2], _KEY_BYTES, "key D2C"),
                       _decode(parts[3], _IV_BYTES, "IV D2C"), twin=True)
    raise ControlMessageError(f"control channel: malformed connect message: "
                              f"{_show('connect:' + rest)}")


def parse_line(line: bytes, max_line: int = MAX_CONTROL_LINE) -> ControlEvent:
    """One control line, without its newline (one trailing ``\\r`` is tolerated)."""
    if line.endswith(b"\r"):
        line = line[:-1]
    if len(line) > max_line:
        raise ControlMessageError(f"control channel: line longer than {max_line} bytes")
    if not all(0x20 <= b < 0x7F for b in line):
        raise ControlMessageError(f"control channel: not a printable ASCII line: {_show(line)} "
                                  "(wrong session key, or not a NoPorts client)")
    text = line.decode("ascii")
    verb, colon, rest = text.partition(":")
    if verb == "connect":
        if not colon:
            raise ControlMessageError("control channel: connect message without keys")
        return _parse_connect(rest)
    if verb == "heartbeat":
        return Heartbeat(rest)
    if _VERB_RE.fullmatch(verb):
        return Unknown(text)
    raise ControlMessageError(f"control channel: not a control message: {_show(text)}")


class ControlParser:
    """Incremental parser: ``feed(plaintext) -> [events]``, same events however bytes are split.

    The old newline-less form is recognised as follows: a buffer that starts with a complete
    77-byte ``connect:<key>:<iv>`` is a message on its own when the byte after it is neither
    ``\\n``/``\\r`` (the newline form) nor ``:`` (the twin-key form) -- so back-to-back old
    messages split cleanly and no newer form is ever cut short.  Only the very last old-style
    message of a burst has no "next byte": it stays buffered and :attr:`legacy_pending` turns
    true; the I/O layer calls :meth:`take_legacy` when no further byte has come for a short
    while (Atsign's newer daemon treats a whole read of a multiple of 77 bytes the same way).
    """

    def __init__(self, max_line: int = MAX_CONTROL_LINE) -> None:
        self.max_line = max_line
        self._buf = bytearray()

    @property
    def buffered(self) -> int:
        """Bytes held that are not yet a complete message."""
        return len(self._buf)

    @property
    def legacy_pending(self) -> bool:
        """The buffer is exactly one old-style message waiting for its next byte."""
        return (len(self._buf) == LEGACY_CONNECT_LEN
                and _LEGACY_RE.fullmatch(self._buf) is not None)

    def take_legacy(self) -> Connect | None:
        """Accept the pending old-style message (see the class docstring); None if there is none."""
        if not self.legacy_pending:
            return None
        line = bytes(self._buf)
        self._buf.clear()
        return _parse_connect(line[len("connect:"):].decode("ascii"))

    def feed(self, data: bytes | bytearray | memoryview) -> list[ControlEvent]:
        """Events completed by ``data``.  On garbage raises ControlMessageError whose ``events``
        holds the messages completed before the garbage (so the caller can still act on them)."""
        events: list[ControlEvent] = []
        try:
            self._feed(data, events)
        except ControlMessageError as exc:
            exc.events = events
            self._buf.clear()
            raise
        return events

    def _feed(self, data, events: list[ControlEvent]) -> None:
        buf = self._buf
        buf += data
        while buf:
            first = buf[0]
            if first == 0x0A:
                # blank lines (and the newline after an old-style message) carry nothing
                del buf[0]
                continue
            if first == 0x0D:
                if len(buf) == 1:
                    return        # may be the start of "\r\n": wait for the next byte
                if buf[1] != 0x0A:
                    raise ControlMessageError("control channel: stray carriage return")
                del buf[:2]
                continue
            if (len(buf) > LEGACY_CONNECT_LEN
                    and buf[LEGACY_CONNECT_LEN] not in b"\r\n:"
                    and _LEGACY_RE.fullmatch(buf, 0, LEGACY_CONNECT_LEN) is not None):
                line = bytes(buf[:LEGACY_CONNECT_LEN])
                del buf[:LEGACY_CONNECT_LEN]
                events.append(_parse_connect(line[len("connect:"):].decode("ascii")))
                continue
            nl = buf.find(b"\n", 0, self.max_line + 2)
            if nl < 0:
                # +1: a line of max_line bytes may still be followed by "\r\n"
                if len(buf) > self.max_line + 1:
                    raise ControlMessageError(f"control channel: line longer than "
                                              f"{self.max_line} bytes")
                return
            line = bytes(buf[:nl])
            del buf[:nl + 1]
            events.append(parse_line(line, self.max_line))
