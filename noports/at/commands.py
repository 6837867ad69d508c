"""atProtocol command lines: ``parse_command(line)`` reads one the way the Dart server does and
``encode_command(cmd)`` writes one the way atsdk/Dart clients do (spec atprotocol.md §2.3, §3,
§4).  Sans-IO; the entry points over the command dataclasses (``noports.at.command_types``) and
the verb readers (``noports.at.grammar``, ``noports.at.notify_fast``), which live apart.
"""

from __future__ import annotations

import json

from noports.at.command_types import (
    Command,
    Cram,
    Delete,
    Exit,
    From,
    Info,
    LLookup,
    Lookup,
    Monitor,
    Noop,
    Notify,
    NotifyFetch,
    NotifyList,
    NotifyRemove,
    NotifyStatus,
    Pkam,
    PLookup,
    Pol,
    Scan,
    Stats,
    Update,
    UpdateMeta,
)
from noports.at.grammar import VERB_PARSERS
from noports.at.notify_fast import parse_notify
from noports.at.syntax import show, syntax_error
from noports.errors import AtProtocolError, UnsupportedVerbError

__all__ = ["encode_command", "parse_command"]

# The general readers, with notify going through the fast path first (noports.at.notify_fast).
_PARSERS = {**VERB_PARSERS, "notify": parse_notify}
# Real atProtocol verbs (at_server 3.0.52 and later) that this implementation does not serve.
_UNSUPPORTED = frozenset({"sync", "enroll", "keys", "otp", "totp", "batch", "stream", "config"})


def parse_command(line: str) -> Command:
    """Parse one command line (without its "\\n"); AtProtocolError / UnsupportedVerbError."""
    if not isinstance(line, str):
        raise AtProtocolError("a command must be text")
    text = line.strip()
    if not text:
        raise syntax_error("empty command")
    if "\n" in text:
        raise syntax_error("a command is one line")
    # The verb is the text before the first ':', lower-cased with spaces removed.
    colon = text.find(":")
    head = text if colon < 0 else text[:colon]
    first_word = head.split(" ", 1)[0]
    if colon < 0 or (" " in head and first_word.lower() in _PARSERS):
        # "scan .*", "monitor a:b": the verb is the first word; the rest keeps its case
        verb, rest = first_word.lower(), text[len(first_word):]
    else:
        verb, rest = head.replace(" ", "").lower(), text[colon:]
    parser = _PARSERS.get(verb)
    if parser is not None:
        return parser(rest)
    if verb in _UNSUPPORTED:
        raise UnsupportedVerbError(f"the {verb} verb is not supported by this server")
    raise syntax_error(f"unknown verb {show(verb)}")


# ---- encoding -------------------------------------------------------------------------------

def _enc_from(cmd: From) -> str:
    line = f"from:{cmd.atsign}"
    if cmd.client_config is not None:
        try:
            text = json.dumps(cmd.client_config, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise AtProtocolError(f"clientConfig is not JSON-serialisable: {exc}") from None
        line += f":clientConfig:{text}"
    return line


def _enc_pkam(cmd: Pkam) -> str:
    line = "pkam"
    if cmd.signing_algo is not None:
        line += f":signingAlgo:{cmd.signing_algo}"
    if cmd.hashing_algo is not None:
        line += f":hashingAlgo:{cmd.hashing_algo}"
    if cmd.enrollment_id is not None:
        line += f":enrollmentId:{cmd.enrollment_id}"
    return f"{line}:{cmd.signature}"


def _enc_lookup(cmd: Lookup | PLookup) -> str:
    line = "plookup" if isinstance(cmd, PLookup) else "lookup"
    if cmd.bypass_cache is not None:
        line += f":bypassCache:{'true' if cmd.bypass_cache else 'false'}"
    if cmd.mode is not None:
        line += f":{cmd.mode}"
    return f"{line}:{cmd.entity}{cmd.owner}"


def _enc_scan(cmd: Scan) -> str:
    line = "scan"
    if cmd.show_hidden:
        line += ":showhidden:true"
    if cmd.for_atsign is not None:
        line += f":{cmd.for_atsign}"
    if cmd.page is not None:
        line += f":page:{cmd.page}"
    return line if cmd.regex is None else f"{line} {cmd.regex}"


def _enc_notify(cmd: Notify) -> str:
    parts = ["notify"]
    if cmd.id is not None:
        parts.append(f"id:{cmd.id}")
    parts.append(cmd.operation)
    for wire, value in (("messageType", cmd.message_type), ("priority", cmd.priority),
                        ("strategy", cmd.strategy), ("latestN", cmd.latest_n),
                        ("notifier", cmd.notifier), ("ttln", cmd.ttln)):
        if value is not None:
            parts.append(f"{wire}:{value}")
    line = ":".join(parts) + cmd.metadata.encode()
    key = cmd.key
    if cmd.text is not None:
        return f"{line}:{cmd.to}:{cmd.text}"
    if key is None:
        raise AtProtocolError("notify needs a key (or text for messageType:text)")
    owner = key.owner or ""
    if key.kind == "public":
        target = f"public:{key.entity}{owner}"
        if cmd.to is not None:
            target = f"{cmd.to}:{target}"
    else:
        target = f"{cmd.to}:{key.entity}{owner}"
    line = f"{line}:{target}"
    return line if cmd.value is None else f"{line}:{cmd.value}"


def _enc_notify_list(cmd: NotifyList) -> str:
    parts = ["notify:list"] + [p for p in (cmd.since, cmd.until, cmd.regex) if p is not None]
    return ":".join(parts)


def _enc_monitor(cmd: Monitor) -> str:
    line = "monitor"
    if cmd.strict:
        line += ":strict"
    if cmd.self_notifications:
        line += ":selfNotifications"
    if cmd.multiplexed:
        line += ":multiplexed"
    if cmd.epoch is not None:
        line += f":{cmd.epoch}"
    return line if cmd.regex is None else f"{line} {cmd.regex}"


def _enc_stats(cmd: Stats) -> str:
    line = "stats" if cmd.ids is None else f"stats:{cmd.ids}"
    return line if cmd.regex is None else f"{line}:{cmd.regex}"


_ENCODERS = {
    From: _enc_from,
    Cram: lambda c: f"cram:{c.digest}",
    Pol: lambda c: "pol",
    Pkam: _enc_pkam,
    Update: lambda c: f"update{c.metadata.encode()}:{c.key} {c.value}",
    UpdateMeta: lambda c: f"update:meta:{c.key}{c.metadata.encode()}",
    LLookup: lambda c: f"llookup{'' if c.mode is None else ':' + c.mode}:{c.key}",
    Lookup: _enc_lookup,
    PLookup: _enc_lookup,
    Delete: lambda c: f"delete{'' if c.priority is None else ':priority:' + c.priority}:{c.key}",
    Scan: _enc_scan,
    Notify: _enc_notify,
    NotifyStatus: lambda c: f"notify:status:{c.id}",
    NotifyList: _enc_notify_list,
    NotifyRemove: lambda c: f"notify:remove:{c.id}",
    NotifyFetch: lambda c: f"notify:fetch:{c.id}",
    Monitor: _enc_monitor,
    Noop: lambda c: f"noop:{c.millis}",
    Info: lambda c: "info:brief" if c.brief else "info",
    Stats: _enc_stats,
    Exit: lambda c: "@exit",
}


def encode_command(cmd: Command) -> str:
    """The wire line (no "\\n") for ``cmd``; AtProtocolError if no line would parse back to it."""
    encoder = _ENCODERS.get(type(cmd))
    if encoder is None:
        raise AtProtocolError(f"not a command: {type(cmd).__name__}")
    try:
        line = encoder(cmd)
    except (AttributeError, TypeError) as exc:      # a field of the wrong type
        raise AtProtocolError(f"malformed {type(cmd).__name__}: {exc}") from None
    # The self-check is what makes "client encodes, server parses" safe for free text (values,
    # regexes, ids): anything with a newline, trailing blanks, a stray ':' or an unencodable
    # character is refused here instead of being misread by the server.
    try:
        line.encode("utf-8")
        same = parse_command(line) == cmd
    except (AtProtocolError, UnicodeEncodeError) as exc:
        raise AtProtocolError(f"cannot encode {type(cmd).__name__}: {exc}") from None
    if not same:
        raise AtProtocolError(
            f"cannot encode {type(cmd).__name__} faithfully: {show(line)} reads back differently")
    return line
