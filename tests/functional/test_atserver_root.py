"""The embedded root directory over TLS (spec atprotocol.md §1; expectations derived from it)."""

from __future__ import annotations

import time

from tests.functional.conftest import RawConn


def _root(srv, **kw) -> RawConn:
    return RawConn(srv.root_port, srv.ssl_context(), **kw)


def test_root_lookups(shared_atserver):
    srv = shared_atserver
    conn = _root(srv)
    try:
        assert conn.greeting == b"@"
        conn.send("alice")
        # Answer, CRLF and the prompt in one write.
        assert conn.read_chunk() == f"127.0.0.1:{srv.ports['@alice']}\r\n@".encode()
        # Leading "@", upper case, CRLF line ending and surrounding blanks are all fine.
        conn.sock.sendall(b"  @BOB \r\n")
        assert conn.read_chunk() == f"127.0.0.1:{srv.ports['@bob']}\r\n@".encode()
        conn.send("nobody")
        assert conn.read_chunk() == b"null\r\n@"
        conn.send("")
        assert conn.read_chunk() == b"null\r\n@"
        conn.sock.sendall(b"carol\nalice\n")     # pipelined lookups answer in order
        got = b""
        want = (f"127.0.0.1:{srv.ports['@carol']}\r\n@127.0.0.1:{srv.ports['@alice']}\r\n@"
                .encode())
        deadline = time.monotonic() + 5
        while len(got) < len(want) and time.monotonic() < deadline:
            got += conn.read_chunk()
        assert got == want
        conn.send("@exit")
        assert conn.closed_by_peer()
    finally:
        conn.close()


def test_root_throttle_and_line_cap(atserver):
    srv = atserver("@alice", args=("--root-free-misses", "2", "--root-miss-delay", "0.6",
                                   "--root-max-misses", "4"))
    conn = _root(srv)
    try:
        times = []
        for i in range(4):
            t0 = time.monotonic()
            conn.send(f"unknown{i}")
            assert conn.read_chunk() == b"null\r\n@"
            times.append(time.monotonic() - t0)
        assert times[0] < 0.5 and times[1] < 0.5, times
        assert times[2] >= 0.55 and times[3] >= 0.55, times
        # Known names are never throttled.
        conn.send("alice")
        assert conn.read_chunk().startswith(b"127.0.0.1:")
        conn.send("unknown-final")
        assert conn.closed_by_peer()
    finally:
        conn.close()
    conn = _root(srv)
    try:
        conn.sock.sendall(b"x" * 300)          # no newline, over the 255-byte cap
        assert conn.closed_by_peer()
    finally:
        conn.close()
    # Other root clients are unaffected.
    conn = _root(srv)
    try:
        conn.send("alice")
        assert conn.read_chunk().startswith(b"127.0.0.1:")
    finally:
        conn.close()
