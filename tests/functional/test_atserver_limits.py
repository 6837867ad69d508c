"""atserver limits and bad input: line cap, connection cap, idle and handshake timeouts, slow
clients, invalid bytes, hostile command lines (hypothesis).  The server keeps serving everyone.

Error codes are those of the spec (atprotocol.md §2.5/§2.6).
"""

from __future__ import annotations

import socket
import ssl
import time

import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.functional.conftest import RawConn, wait_for


def _still_serving(srv, atsign: str = "@alice") -> None:
    conn = srv.login(atsign)
    try:
        assert conn.request("noop:0") == "data:ok"
    finally:
        conn.close()


def test_oversized_line_gets_at0005_and_close(atserver):
    srv = atserver("@alice", args=("--max-line", "65536"))
    conn = srv.login("@alice")
    try:
        conn.send("update:public:big@alice " + "x" * 70_000)
        reply = conn.read_line()
        assert reply.startswith("error:AT0005-"), reply[:200]
        assert conn.closed_by_peer()
    finally:
        conn.close()
    _still_serving(srv)


def test_unterminated_flood_keeps_memory_bounded(atserver):
    """A line without end: the server answers AT0005 once over the cap, stops using the bytes
    and drops the connection within its close grace (1 s) however fast the client sends."""
    srv = atserver("@alice", args=("--max-line", "65536"))
    proc = psutil.Process(srv.pid)
    rss0 = proc.memory_info().rss
    for _ in range(3):
        conn = srv.connect("@alice")
        t0 = time.monotonic()
        dropped = False
        try:
            chunk = b"y" * 65536
            while time.monotonic() - t0 < 10:
                conn.sock.sendall(chunk)
        except (ConnectionError, OSError):
            dropped = True
        finally:
            conn.close()
        assert dropped and time.monotonic() - t0 < 5, "the server did not drop the flood"
    growth = proc.memory_info().rss - rss0
    assert growth < 30 << 20, f"RSS grew by {growth} bytes"
    _still_serving(srv)


def test_invalid_utf8_closes_only_that_connection(shared_atserver):
    conn = shared_atserver.connect("@alice")
    try:
        conn.sock.sendall(b"noop:0\nscan \xff\xfe\n")
        assert conn.read_reply() == "data:ok"
        assert conn.read_line().startswith("error:AT0003")
        assert conn.closed_by_peer()
    finally:
        conn.close()
    _still_serving(shared_atserver)


def test_slow_client_byte_by_byte(shared_atserver):
    conn = shared_atserver.connect("@alice")
    try:
        for b in b"noop:0\r\n":
            conn.sock.sendall(bytes([b]))
            time.sleep(0.01)
        assert conn.read_reply() == "data:ok"
    finally:
        conn.close()


def test_idle_and_handshake_timeouts(atserver):
    srv = atserver("@alice", args=("--unauth-idle-timeout", "0.6", "--handshake-timeout", "0.6"))
    # Half-open: TCP connected, never starts TLS.
    raw = socket.create_connection(("127.0.0.1", srv.ports["@alice"]), timeout=5)
    try:
        t0 = time.monotonic()
        raw.settimeout(5)
        try:
            data = raw.recv(100)
        except ConnectionError:
            data = b""
        assert data == b"" and time.monotonic() - t0 < 4
    finally:
        raw.close()
    t0 = time.monotonic()
    idle = srv.connect("@alice")
    authed = srv.login("@alice")
    try:
        assert idle.closed_by_peer(timeout=5)
        assert 0.5 < time.monotonic() - t0 < 4
        # An authenticated connection is not subject to that timeout.
        assert not authed.closed_by_peer(timeout=1.5)
        assert authed.request("noop:0") == "data:ok"
    finally:
        idle.close()
        authed.close()
    # A trickle of bytes without a newline does not count as activity.
    slow = srv.connect("@alice")
    try:
        t0 = time.monotonic()
        closed = False
        while time.monotonic() - t0 < 5 and not closed:
            try:
                slow.sock.sendall(b"n")
            except OSError:
                closed = True
                break
            closed = slow.closed_by_peer(timeout=0.2)
        assert closed
    finally:
        slow.close()


def test_connection_cap(atserver):
    srv = atserver("@alice", args=("--max-connections", "3"))
    conns = [srv.connect("@alice") for _ in range(3)]
    try:
        extra = RawConn(srv.ports["@alice"], srv.ssl_context(), read_greeting=False)
        try:
            got = b""
            while not got.endswith(b"\n"):
                got += extra.read_chunk()
            assert got == b"error:AT0012-Inbound connection limit exceeded\n"
            assert extra.closed_by_peer()
        finally:
            extra.close()
        conns.pop().close()

        def can_connect():
            c = RawConn(srv.ports["@alice"], srv.ssl_context(), read_greeting=False)
            try:
                first = c.read_chunk()
            except (ConnectionError, OSError):
                return False
            finally:
                c.close()
            return first == b"@"
        wait_for(can_connect, what="a slot to free up")
    finally:
        for c in conns:
            c.close()


def test_client_that_never_reads(atserver):
    """Pipelined reads whose replies are never consumed: the server stops reading from that
    client instead of buffering without bound, and serves others meanwhile."""
    srv = atserver("@alice")
    conn = srv.login("@alice")
    try:
        conn.request("update:public:fat@alice " + "z" * 200_000)
        proc = psutil.Process(srv.pid)
        rss0 = proc.memory_info().rss
        conn.sock.setblocking(False)
        sent = 0
        line = b"llookup:public:fat@alice\n" * 100
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                sent += conn.sock.send(line)
            except (BlockingIOError, ssl.SSLWantWriteError):
                break
        # 200 kB per reply: without back-pressure this would be gigabytes.
        _still_serving(srv)
        growth = proc.memory_info().rss - rss0
        assert growth < 100 << 20, f"RSS grew by {growth} bytes after {sent} bytes of requests"
    finally:
        conn.close()
    _still_serving(srv)


_VERBS = ["update:", "update:meta:", "llookup:", "llookup:all:", "lookup:", "plookup:", "delete:",
          "scan", "scan:", "notify:", "notify:status:", "notify:list", "notify:fetch:",
          "notify:remove:", "from:", "cram:", "pkam:", "pkam:enrollmentId:", "info", "info:",
          "stats", "stats:", "pol", "sync:", "enroll:", "config:", "update:ttl:",
          "notify:id:", "notify:update:messageType:text:", "llookup:cached:", "update:@bob:",
          "update:json:", "keys:", "", ":", "@", "@@"]
_HOSTILE = st.builds(
    lambda verb, body: verb + body,
    st.sampled_from(_VERBS),
    st.text(alphabet=st.characters(blacklist_characters="\n", blacklist_categories=("Cs",)),
            max_size=300)
    | st.sampled_from(["@alice", "public:x@alice", "@bob:k@alice v", "ttl:-1:x@alice v",
                       "x" * 260 + "@alice v", ":" * 50, "@" * 50, "(((((", ".*" * 40,
                       "\x00\x01\x7f", "é@ålice", "🛠@alice v", "{\"version\":\"9.9.9\"}"]),
)


@pytest.mark.fuzz
@settings(max_examples=400, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(line=_HOSTILE)
def test_hostile_command_lines(hostile_server, line):
    srv, holder = hostile_server
    verb = line.split(":", 1)[0].strip().lower()
    if verb in ("monitor", "noop") or line.strip().lower() == "@exit":
        return      # changes the reply shape or sleeps by design; covered elsewhere
    conn = holder.get("conn")
    if conn is None:
        conn = holder["conn"] = srv.login("@alice")
    try:
        conn.send(line)
        reply = conn.read_line(timeout=10)
        assert reply.startswith(("data:", "error:")), (line, reply)
        assert not reply.startswith("error:AT0011"), (line, reply)   # never an internal error
        if reply.startswith(("error:AT0005", "error:AT0002")):
            holder.pop("conn").close()
            return
        conn._read_exact_prefix(conn.prompt.encode())
    except (ConnectionError, OSError, TimeoutError):
        holder.pop("conn", None)
        raise
    assert srv.alive()


@pytest.fixture(scope="module")
def hostile_server(tmp_path_factory):
    from tests.functional.conftest import AtServerProcess
    base = tmp_path_factory.mktemp("hostile")
    srv = AtServerProcess(base, ["@alice", "@bob"], keys=True,
                          args=("--login-free-failures", "1000000", "--peer-fail-limit",
                                "1000000")).start()
    holder: dict = {}
    yield srv, holder
    if holder.get("conn"):
        holder["conn"].close()
    try:
        _still_serving(srv)
        _still_serving(srv, "@bob")
        assert "Traceback" not in srv.log_text()
    finally:
        srv.stop()
