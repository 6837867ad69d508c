"""atProtocol reply bytes: incremental parsers (client side), line reader (server side), encoders.

Owns the framing of what an atServer or root writes back (spec atprotocol.md §1, §2.2, §2.4,
§2.6, §5.3): prompts, ``data:``, the three ``error:`` shapes, ``notification: <json>`` and root
answers, plus the server-side split of the command stream into lines.  Sans-IO: bytes in,
events/lines out; no sockets, no verbs.

Rules every parser here keeps:

* **Chunking never matters.**  The same bytes give the same events whether they arrive in one
  chunk, one byte at a time or anything between; decisions depend only on bytes already seen.
* **Bounded memory.**  A line longer than ``max_line`` bytes (not counting its ``\\n`` or a prompt
  glued to its front) raises LineTooLongError as soon as the excess is seen, without waiting for
  a newline; what stays buffered between calls is at most ``max_line`` plus a few hundred bytes.
* **Only AtProtocolError.**  Garbage raises AtProtocolError (or a subclass), never anything else.
* **Faults are sticky and never eat good data.**  If a fault follows complete events in the same
  ``feed``, those events are returned and the fault is raised by the next ``feed`` call
  (``feed(b"")`` works; ``.error`` shows it at once).  After a fault the buffer is dropped and
  every later ``feed`` raises again.

Prompt rule (ResponseParser): the server writes ``<reply>\\n<prompt>`` in one write and the next
reply arrives glued to that prompt (``@alice@data:ok``, ``@alice@notification: {...}``).  A prompt
is ``@`` or ``@<atSign>@``.  ``@<atSign>@`` is reported as soon as its closing ``@`` arrives;
a bare ``@`` is reported once the byte after it shows it is not the start of ``@<atSign>@``
(a ``:``, whitespace or newline before any closing ``@``, or 256 bytes without one).  So a bare
``@`` (greeting, unauthenticated prompt) at the very end of the bytes fed so far stays pending
until more bytes arrive.  Clients should wait for ``Data``/``Error`` events, not prompts.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import msgspec

from noports.errors import AtProtocolError, LineTooLongError

__all__ = [
    "ERROR_TEXT",
    "Data",
    "Error",
    "Event",
    "LineReader",
    "Notification",
    "Prompt",
    "ResponseParser",
    "RootAnswer",
    "RootEvent",
    "RootNotFound",
    "RootResponseParser",
    "encode_data",
    "encode_error",
    "encode_notification",
    "encode_root_answer",
    "parse_error_line",
    "parse_notification_json",
]

#: Standard texts of the atProtocol error codes (at_commons error_message.dart, spec §2.6).
ERROR_TEXT: dict[str, str] = {
    "AT0001": "Server exception",
    "AT0002": "DataStore exception",
    "AT0003": "Invalid syntax",
    "AT0004": "Socket error",
    "AT0005": "Buffer limit exceeded",
    "AT0006": "Outbound connection limit exceeded",
    "AT0007": "Secondary server not found",
    "AT0008": "Handshake failure",
    "AT0009": "UnAuthorized client in request",
    "AT0010": "Internal server error",
    "AT0011": "Internal server exception",
    "AT0012": "Inbound connection limit exceeded",
    "AT0013": "Connection Exception",
    "AT0014": "Unknown AtClient exception",
    "AT0015": "key not found",
    "AT0016": "Invalid key",
    "AT0021": "Unable to connect to secondary",
    "AT0022": "Illegal arguments",
    "AT0023": "Timeout waiting for response",
    "AT0024": "Server is paused",
    "AT0025": "Apkam Auth Denied",
    "AT0026": "Apkam Auth Failed",
    "AT0027": "Apkam Access Revoked",
    "AT0028": "Too Many Requests",
    "AT0029": "Apkam Enrollment Expired",
    "AT0030": "Invalid Enrollment Status",
    "AT0031": "Cannot revoke self enrollment",
    "AT0401": "Client authentication failed",
}

DEFAULT_MAX_LINE = 10_240_000     # the Dart server's command buffer (spec §2.3)
_PROMPT_WINDOW = 256              # "@" + up to 55 atSign characters (4 bytes each) + "@"
_PROMPT_BODY = re.compile(rb"[^@:\s]*")
_ERROR_CODE = re.compile(r"(AT[0-9]{4})(?:[-:]|$)")
_PORT = re.compile(r"[0-9]{1,5}")


@dataclass(frozen=True)
class Prompt:
    text: str                 # "@" or "@alice@"


@dataclass(frozen=True)
class Data:
    payload: str              # verbatim after "data:" (stats replies keep their leading space)


@dataclass(frozen=True)
class Error:
    code: str                 # "AT0015"
    message: str              # "key not found : ..." / errorDescription / text after "AT0026:"
    raw: str                  # the whole line, e.g. "error:AT0015-key not found : ..."


@dataclass(frozen=True)
class Notification:
    payload: dict


@dataclass(frozen=True)
class RootAnswer:
    host: str
    port: int


@dataclass(frozen=True)
class RootNotFound:
    pass


Event = Prompt | Data | Error | Notification
RootEvent = RootAnswer | RootNotFound


def _show(raw: bytes | str) -> str:
    return repr(raw) if len(raw) <= 60 else repr(raw[:57]) + "..."


def _decode(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise AtProtocolError(f"{what} is not valid UTF-8: {_show(raw)}") from None


# msgspec's decoder is strict RFC 8259 JSON and, for everything it accepts, gives what
# json.loads gives (big integers included) in a fraction of the time; what it refuses (NaN,
# out-of-range floats, lone surrogates, very deep nesting) goes to json.loads, so the result
# (or error) is always json.loads'.  tests/unit/test_responses_fast.py holds them equal.
_fast_json = msgspec.json.Decoder().decode


def parse_notification_json(text: str) -> dict:
    """The JSON object of a ``notification:`` line (text after the colon; blanks allowed)."""
    try:
        value = _fast_json(text)
    except (msgspec.DecodeError, RecursionError):
        value = None
    if value is None:           # refused by the fast decoder, or JSON null: json.loads decides
        try:
            value = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise AtProtocolError(
                f"notification is not valid JSON: {str(exc)[:80]}") from None
    if not isinstance(value, dict):
        raise AtProtocolError("notification JSON is not an object")
    return value


def parse_error_line(text: str) -> Error:
    """An ``error:`` line (without prompt) in any of its three shapes (spec §2.4)."""
    if not text.startswith("error:"):
        raise AtProtocolError(f"not an error line: {_show(text)}")
    body = text[6:]
    if body.startswith("{"):
        try:
            obj = json.loads(body)
        except (ValueError, RecursionError):
            raise AtProtocolError(f"error reply is not valid JSON: {_show(body)}") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("errorCode"), str):
            raise AtProtocolError(f"JSON error reply without errorCode: {_show(body)}")
        description = obj.get("errorDescription", "")
        if not isinstance(description, str):
            description = json.dumps(description)
        return Error(obj["errorCode"], description, text)
    match = _ERROR_CODE.match(body)
    if match is None:
        raise AtProtocolError(f"error reply without an AT code: {_show(text)}")
    return Error(match.group(1), body[match.end():], text)


def _reply_item(raw: bytes) -> str | dict | Error | None:
    """One reply line as a bare item: data payload (str), notification (dict) or Error."""
    if raw.endswith(b"\r"):
        raw = raw[:-1]
    if not raw:
        return None
    if raw.startswith(b"notification:"):
        # Straight from the bytes (no str made and re-encoded); anything but a dict -- a
        # refusal, invalid UTF-8, another JSON type -- takes the general path below, which
        # then answers exactly as it always did.
        try:
            value = _fast_json(raw[13:])
        except (msgspec.DecodeError, RecursionError, UnicodeDecodeError):
            value = None
        if value.__class__ is dict:
            return value
    text = _decode(raw, "reply line")
    if text.startswith("data:"):
        return text[5:]
    if text.startswith("error:"):
        return parse_error_line(text)
    if text.startswith("notification:"):
        return parse_notification_json(text[13:])
    raise AtProtocolError(f"unexpected reply from atServer: {_show(text)}")


def _reply_line(raw: bytes) -> Event | None:
    item = _reply_item(raw)
    kind = type(item)
    if kind is str:
        return Data(item)
    if kind is dict:
        return Notification(item)
    return item


class _Framer:
    """Shared machinery: buffer, cap, sticky faults, incremental newline search."""

    def __init__(self, max_line: int) -> None:
        if not isinstance(max_line, int) or max_line < 1:
            raise ValueError("max_line must be a positive integer")
        self.max_line = max_line
        self._buf = bytearray()
        self._scanned = 0                         # bytes at the buffer's front without b"\n"
        self._error: AtProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes held while waiting for the rest of a line (bounded by ``max_line`` + 256)."""
        return len(self._buf)

    @property
    def error(self) -> AtProtocolError | None:
        """The fault this parser hit, if any (it is also raised by the next ``feed``)."""
        return self._error

    def feed(self, data: bytes) -> list:
        if self._error is not None:
            raise self._error.with_traceback(None)
        out: list = []
        self._buf += data
        try:
            consumed = self._parse(out)
        except AtProtocolError as exc:
            self._error = exc
            self._buf = bytearray()
            self._scanned = 0
            if out:
                return out                        # hand over good data; raise on next call
            raise
        del self._buf[:consumed]
        return out

    def _next_line(self, pos: int) -> tuple[bytes | None, int]:
        """The line starting at ``pos`` and the position after it, or (None, pos) if partial."""
        buf = self._buf
        start = pos + self._scanned if pos == 0 else pos
        self._scanned = 0
        nl = buf.find(b"\n", start)
        if nl < 0:
            if len(buf) - pos > self.max_line:
                raise LineTooLongError(f"line longer than {self.max_line} bytes")
            # feed() cuts the consumed bytes off, so this is where the next search resumes
            self._scanned = len(buf) - pos
            return None, pos
        if nl - pos > self.max_line:
            raise LineTooLongError(f"line longer than {self.max_line} bytes")
        return bytes(buf[pos:nl]), nl + 1

    def _parse(self, out: list) -> int:  # pragma: no cover - abstract
        raise NotImplementedError


class ResponseParser(_Framer):
    """Incremental client-side parser of an atServer connection (see the module docstring)."""

    def __init__(self, max_line: int = DEFAULT_MAX_LINE) -> None:
        super().__init__(max_line)
        self._items = False
        # The last ``@<atSign>@`` prompt seen, and its event: a connection sees the same one
        # after every reply, so it is recognised by one bytes comparison (same decision as
        # the general path: its body is known to be valid and its closing "@" is there).
        self._prompt_bytes: bytes | None = None
        self._prompt_event: Prompt | None = None

    def feed(self, data: bytes) -> list[Event]:
        """Events completed by ``data``; AtProtocolError on garbage."""
        return super().feed(data)

    def feed_items(self, data: bytes) -> list[str | dict | Error]:
        """Like :meth:`feed`, as bare items and without prompts (what a client connection
        needs, without an event object per line): a ``data:`` payload is a ``str``, a
        ``notification:`` is its ``dict``, an ``error:`` is its :class:`Error` event."""
        self._items = True
        try:
            return super().feed(data)
        finally:
            self._items = False

    def _parse(self, out: list) -> int:
        buf = self._buf
        n = len(buf)
        pos = 0
        items = self._items
        line_item = _reply_item if items else _reply_line
        known = self._prompt_bytes
        while pos < n:
            if buf[pos] == 0x40:                                  # "@": a prompt starts here
                self._scanned = 0
                if known is not None and buf.startswith(known, pos):
                    if not items:
                        out.append(self._prompt_event)
                    pos += len(known)
                    continue
                limit = min(n, pos + 1 + _PROMPT_WINDOW)
                end = _PROMPT_BODY.match(buf, pos + 1, limit).end()
                if end == pos + 1 + _PROMPT_WINDOW:
                    if not items:                                 # too long for an atSign
                        out.append(Prompt("@"))
                    pos += 1
                elif end == n:
                    break                                         # undecided: wait for more
                elif buf[end] == 0x40 and end > pos + 1:
                    known = bytes(buf[pos:end + 1])
                    prompt = Prompt(_decode(known, "prompt"))
                    self._prompt_bytes, self._prompt_event = known, prompt
                    if not items:
                        out.append(prompt)
                    pos = end + 1
                else:
                    if not items:
                        out.append(Prompt("@"))
                    pos += 1
                continue
            line, pos = self._next_line(pos)
            if line is None:
                break
            event = line_item(line)
            if event is not None:
                out.append(event)
        return pos


class RootResponseParser(_Framer):
    """Replies of a root directory: ``host:port\\r\\n@`` or ``null\\r\\n@`` (spec §1).

    Leading ``@`` prompts are ignored; ``null``, ``data:null`` and an empty line mean "no such
    atSign"; a ``data:`` prefix on an answer is tolerated (Dart at_lookup does the same).
    """

    def __init__(self, max_line: int = 1024) -> None:
        super().__init__(max_line)

    def feed(self, data: bytes) -> list[RootEvent]:
        return super().feed(data)

    def _parse(self, out: list) -> int:
        pos = 0
        while True:
            line, pos = self._next_line(pos)
            if line is None:
                return pos
            out.append(_root_line(line))


def _root_line(raw: bytes) -> RootEvent:
    text = _decode(raw, "root answer").lstrip("@").strip()
    if text.startswith("data:"):
        text = text[5:].strip()
    if text in ("", "null"):
        return RootNotFound()
    host, colon, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]                                         # "[::1]:6464"
    if (not colon or not host or not _PORT.fullmatch(port) or not 0 < int(port) < 65536
            or any(c.isspace() or c in "@/" or not c.isprintable() for c in host)):
        raise AtProtocolError(f"bad root answer: {_show(text)}")
    return RootAnswer(host, int(port))


class LineReader(_Framer):
    """Server side: split a command stream into lines (``\\n``; a trailing ``\\r`` is dropped).

    Empty lines are returned as ``""`` (the server decides what they mean).  Invalid UTF-8 and
    over-long lines are faults (sticky, see the module docstring).
    """

    def feed(self, data: bytes) -> list[str]:
        return super().feed(data)

    def _parse(self, out: list) -> int:
        pos = 0
        while True:
            line, pos = self._next_line(pos)
            if line is None:
                return pos
            if line.endswith(b"\r"):
                line = line[:-1]
            out.append(_decode(line, "command"))


# ---- encoders (server side) -----------------------------------------------------------------

def _one_line(text: str) -> str:
    return text.replace("\r", " ").replace("\n", " ")


def encode_data(payload: str, prompt: str) -> bytes:
    """``b"data:<payload>\\n<prompt>"`` (one write, as the Dart server does)."""
    if "\n" in payload:
        raise AtProtocolError("a data payload cannot contain a newline")
    return f"data:{payload}\n{prompt}".encode()


def encode_error(code: str, message: str, prompt: str, *, json_form: bool = False,
                 authenticated: bool = False) -> bytes:
    """An ``error:`` reply plus prompt (spec §2.4).

    Description: ``<standard text> : <message>`` on cram/pkam-authenticated connections,
    ``Exception: <message>`` otherwise.  ``json_form`` (clients that announced clientConfig
    version > 3.0.37) wraps code and description as ``{"errorCode":..,"errorDescription":..}``;
    otherwise the legacy ``<code>-<description>``.  Newlines in ``message`` become spaces.
    """
    message = _one_line(message)
    if authenticated:
        description = f"{ERROR_TEXT.get(code, 'Error')} : {message}"
    else:
        description = f"Exception: {message}"
    if json_form:
        body = json.dumps({"errorCode": code, "errorDescription": description},
                          separators=(",", ":"), ensure_ascii=False)
    else:
        body = f"{code}-{description}"
    return f"error:{_one_line(body)}\n{prompt}".encode("utf-8", "replace")


def encode_notification(payload: dict) -> bytes:
    """``b"notification: <compact json>\\n"`` (no prompt; spec §5.3)."""
    try:
        text = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
        return f"notification: {text}\n".encode()
    except UnicodeEncodeError:       # lone surrogates: escaped JSON is equivalent and encodable
        text = json.dumps(payload, separators=(",", ":"))
        return f"notification: {text}\n".encode()


def encode_root_answer(host: str | None, port: int | None) -> bytes:
    """``b"host:port\\r\\n@"`` or, when ``host`` is None, ``b"null\\r\\n@"``."""
    if host is None:
        return b"null\r\n@"
    return f"{host}:{int(port)}\r\n@".encode()
