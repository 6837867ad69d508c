"""Fuzz targets for the atProtocol wire parsers (reliability-checks.md row F1).

One plain function per parser, ``fuzz_<name>(data: bytes)``, holding that parser's invariant:

* garbage either parses or raises AtProtocolError (a subclass is fine) -- never anything else;
* chunking does not matter (one chunk == one byte at a time == uneven chunks);
* no parser holds more than its cap (plus the documented prompt window) between calls;
* whatever parses also re-encodes to something that parses back to the same thing.

Any other exception, or an AssertionError, is a finding.  The hypothesis tests in
``test_fuzz_parsers.py`` call these functions in CI; the nightly job runs them under atheris::

    python -m tests.fuzz.atheris_targets <command|response|root|notification> -runs=1000000 [corpus]

atheris is optional and imported only by ``main``.  Without a corpus directory, a temporary one
seeded with the spec's known-answer vectors (``SEEDS``) is used.
"""

from __future__ import annotations

import os
import sys
import tempfile

from noports.at.commands import encode_command, parse_command
from noports.at.responses import (
    LineReader,
    Notification,
    ResponseParser,
    RootResponseParser,
    encode_notification,
)
from noports.errors import AtProtocolError

# Small caps so that the fuzzer reaches the over-long-line paths with short inputs.
RESPONSE_CAP = 200
ROOT_CAP = 100
LINE_CAP = 300
PROMPT_WINDOW = 256        # bytes a pending prompt may add on top of the cap (responses.py)


def _chunkings(data: bytes) -> list[list[bytes]]:
    """One chunk, single bytes, and uneven chunks derived from the data itself."""
    uneven, i, step = [], 0, 1
    while i < len(data):
        uneven.append(data[i:i + step])
        step = step % 7 + (data[i] % 3) + 1
        i += len(uneven[-1])
    return [[data], [data[i:i + 1] for i in range(len(data))], uneven]


def _drive(parser, chunks: list[bytes], cap: int) -> tuple[list, str | None]:
    """Feed ``chunks``; return (events, name of the fault or None)."""
    out: list = []
    fault = None
    try:
        for chunk in chunks:
            out += parser.feed(chunk)
            assert parser.buffered <= cap + PROMPT_WINDOW, parser.buffered
        out += parser.feed(b"")          # raises a fault deferred behind good events
    except AtProtocolError as exc:
        fault = type(exc).__name__
        # Faults are sticky and drop the buffer: the parser must not keep growing.
        assert parser.buffered == 0
        assert parser.error is not None
        try:
            parser.feed(b"x" * 10)
        except AtProtocolError:
            pass
        else:
            raise AssertionError("parser accepted data after a fault") from None
        assert parser.buffered == 0
    return out, fault


def _same_for_all_chunkings(make, data: bytes, cap: int) -> tuple[list, str | None]:
    results = [_drive(make(), chunks, cap) for chunks in _chunkings(data)]
    # Compared by repr: NaN inside notification JSON is not equal to itself, its repr is.
    first = ([repr(e) for e in results[0][0]], results[0][1])
    for events, fault in results[1:]:
        assert ([repr(e) for e in events], fault) == first, (results[0], events, fault)
    return results[0]


def check_command_line(line: str) -> None:
    """The command-line invariant for one decoded line."""
    try:
        cmd = parse_command(line)
    except AtProtocolError:
        return
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        return                           # lone surrogates cannot come off the wire anyway
    again = encode_command(cmd)          # must not raise for anything the server accepted
    assert parse_command(again) == cmd, (line, again)


def fuzz_command(data: bytes) -> None:
    """Server side: bytes -> LineReader -> parse_command, and the command round trip."""
    lines, _ = _same_for_all_chunkings(lambda: LineReader(LINE_CAP), data, LINE_CAP)
    for line in lines[:8]:
        check_command_line(line)
    # The raw input as one line too, including text that is not valid UTF-8.
    check_command_line(data.decode("utf-8", "surrogateescape"))


def fuzz_response(data: bytes) -> None:
    """Client side: atServer reply stream."""
    _same_for_all_chunkings(lambda: ResponseParser(max_line=RESPONSE_CAP), data, RESPONSE_CAP)


def fuzz_root(data: bytes) -> None:
    """Client side: root directory replies."""
    _same_for_all_chunkings(lambda: RootResponseParser(max_line=ROOT_CAP), data, ROOT_CAP)


def fuzz_notification(data: bytes) -> None:
    """``notification: <json>`` lines: parse, and the server encoder round trip."""
    line = b"notification: " + data.replace(b"\n", b" ") + b"\n"
    try:
        events = ResponseParser().feed(line)
    except AtProtocolError:
        return
    assert len(events) == 1 and isinstance(events[0], Notification), events
    payload = events[0].payload
    assert isinstance(payload, dict)
    again = ResponseParser().feed(encode_notification(payload))
    assert [repr(e) for e in again] == [repr(events[0])], (again, events)


TARGETS = {
    "command": fuzz_command,
    "response": fuzz_response,
    "root": fuzz_root,
    "notification": fuzz_notification,
}

# Known-answer vectors from spec atprotocol.md (§1, §2.2, §2.4, §3, §4, §5.3, §7.3).
SEEDS: dict[str, list[bytes]] = {
    "command": [
        b"from:@alice", b"from:alice",
        b'from:@alice:clientConfig:{"version":"3.10.0","clientId":"x","platform":"linux"}',
        b"cram:0123abcd", b"pol", b"pkam:AAAA+/==",
        b"pkam:signingAlgo:rsa2048:hashingAlgo:sha256:enrollmentId:5b0c-11:AAAA==",
        b"pkam:enrollmentId:5b0c-11:AAAA==",
        b"update:public:location@alice Paris", b"update:ttr:86400000:@bob:shared_key@alice QUJD",
        b"update:isEncrypted:true:ivNonce:aXY=:@bob:phone.wavi@alice Y2lwaGVy",
        b"update:privatekey:at_pkam_publickey TUlJQg==",
        b"update:dataSignature:c2ln:isEncrypted:true:ivNonce:aXY=:name@alice Y2lw",
        b"update:meta:@bob:phone.wavi@alice:ttl:1000:isBinary:false",
        b"llookup:all:cached:public:publickey@bob", b"llookup:shared_key.bob@alice",
        b"lookup:bypassCache:true:all:x.wavi@bob", b"lookup:_6f1c@alice", b"plookup:publickey@bob",
        b"delete:priority:low:@bob:x@alice", b"delete:privatekey:at_secret",
        b"scan", b"scan:showHidden:true .*", b"scan:@bob device_info\\.x\\.sshnp",
        b"notify:id:0b7e-4c:update:isEncrypted:true:ivNonce:aXY=:@bob:k.sshnp@alice:Y2lw",
        b"notify:id:0b7e-4c:update:messageType:key:priority:low:strategy:all:latestN:1:"
        b"notifier:SYSTEM:ttln:60000:ttl:10000:isEncrypted:true:sharedKeyEnc:a2V5:"
        b"pubKeyCS:0f0e:ivNonce:aXY=:@bob:s1.dev.sshnp@alice:Y2lw",
        b"notify:@bob:public:x@alice", b"notify:messageType:text:@bob:hello there",
        b"notify:status:0b7e-4c", b"notify:list:2024-01-01:2024-02-01:.*",
        b"notify:remove:0b7e-4c", b"notify:fetch:0b7e-4c",
        b"monitor:0 .*", b"monitor:selfNotifications:1700000000000 sshnp@",
        b"monitor:strict:selfNotifications:multiplexed:5 .*", b"monitor dev.sshnp@",
        b"noop:0", b"info", b"info:brief", b"stats:3", b"stats:3:.*", b"@exit",
        b"sync:from:-1:limit:25", b"enroll:request:{}", b"noop:1\r\nnoop:2\n",
    ],
    "response": [
        b"@", b"@data:_4af2@alice:d6ca\n@", b"data:success\n@alice@",
        b"@alice@notification: {\"id\":\"1\",\"from\":\"@bob\",\"to\":\"@alice\","
        b"\"key\":\"@alice:k@bob\",\"value\":\"v\",\"operation\":\"update\","
        b"\"epochMillis\":1,\"messageType\":\"MessageType.key\",\"isEncrypted\":true,"
        b"\"metadata\":null}\n",
        b"error:AT0015-key not found : @bob:shared_key@alice does not exist in keystore\n@alice@",
        b'error:{"errorCode":"AT0015","errorDescription":"key not found"}\n@alice@',
        b"error:AT0026:enrollment_id: 5b0c is pending\n@",
        b"data: [{\"id\":\"3\",\"name\":\"lastCommitID\",\"value\":\"12\"}]\n@alice@",
        b"error:AT0012-Inbound connection limit exceeded\n", b"@bob@",
        b"data:ok\n@alice@data:ok\n@alice@",
    ],
    "root": [b"@", b"@vip.ve.atsign.zone:25000\r\n@", b"null\r\n@", b"data:null\n",
             b"@127.0.0.1:6464\r\n@null\r\n@", b"[::1]:6464\r\n@"],
    "notification": [
        b'{"id":"-1","from":"@alice","to":"@alice","key":"statsNotification.@alice",'
        b'"value":"12","operation":"update","epochMillis":1,"messageType":"MessageType.key",'
        b'"isEncrypted":false,"metadata":null}',
        b'{"id":"1","metadata":{"ivNonce":"aXY=","sharedKeyEnc":null}}', b"[]", b"{", b"null",
    ],
}


def _seed_dir(target: str) -> str:
    path = tempfile.mkdtemp(prefix=f"noports-fuzz-{target}-")
    for i, seed in enumerate(SEEDS[target]):
        with open(os.path.join(path, f"seed-{i:03d}"), "wb") as fh:
            fh.write(seed)
    return path


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] not in TARGETS:
        print(f"usage: python -m tests.fuzz.atheris_targets {{{'|'.join(TARGETS)}}} "
              "[libFuzzer options] [corpus dirs]", file=sys.stderr)
        return 2
    try:
        import atheris
    except ImportError:
        print("atheris is not installed (pip install atheris); the hypothesis tests in "
              "tests/fuzz/test_fuzz_parsers.py drive the same targets", file=sys.stderr)
        return 2
    target = argv[1]
    args = [argv[0], *argv[2:]]
    corpus = [a for a in args[1:] if not a.startswith("-")]
    if not corpus:
        args.append(_seed_dir(target))
    elif os.path.isdir(corpus[0]) and not os.listdir(corpus[0]):
        for i, seed in enumerate(SEEDS[target]):
            with open(os.path.join(corpus[0], f"seed-{i:03d}"), "wb") as fh:
                fh.write(seed)
    if not any(a.startswith("-rss_limit_mb=") for a in args):
        args.append("-rss_limit_mb=256")          # F1: harness RSS <= 256 MB
    if hasattr(atheris, "instrument_all"):
        atheris.instrument_all()
    atheris.Setup(args, TARGETS[target])
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main())
