"""Relay sessions on demand, in their own process: the relay of the relay and tunnel suites.

    python -m bench.session_server [--loop uvloop|asyncio] [--pairing-timeout SECONDS]

A RelaySessions on 127.0.0.1 (no atServer: the bench plays the control plane).  For each stdin
line ``{"request": .., "pub_a": .., "pub_b": ..}`` (a session request as npt sends it and both
sides' public keys, base64) it opens a session and answers one line ``{"port_a": ..,
"port_b": .., "nonce": ..}``; it exits when stdin closes.  The pump is whatever the environment
selects (the suites set NOPORTS_NO_EXTENSIONS=1: the pure pump).  open_session() is the
parent's side.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import uuid

from bench.plumbing import run_loop


async def serve(pairing_timeout: float) -> None:
    from noports.at.crypto import public_key_from_b64
    from noports.relay import DataPlaneConfig, RelaySessions
    from noports.relay.messages import parse_request_ports

    registry = RelaySessions(DataPlaneConfig(bind_host="127.0.0.1",
                                             pairing_timeout=pairing_timeout))
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        cmd = json.loads(line)
        session = await registry.open(parse_request_ports(cmd["request"]),
                                      public_key_a=public_key_from_b64(cmd["pub_a"]),
                                      public_key_b=public_key_from_b64(cmd["pub_b"]))
        print(json.dumps({"port_a": session.port_a, "port_b": session.port_b,
                          "nonce": session.rvd_nonce}), flush=True)
    await registry.close()


def open_session(server: subprocess.Popen, keys_a, keys_b,
                 client_nonce: str) -> tuple[dict, bytes, bytes]:
    """A fresh session between ``keys_a``'s and ``keys_b``'s atSigns, both sides authenticated,
    from the session server ``server`` (a text-mode Popen): (its reply, side A's auth line,
    side B's auth line)."""
    from noports.relay.messages import encode_auth_line

    sid = str(uuid.uuid4())
    request = json.dumps({"sessionId": sid, "atSignA": keys_a.atsign, "atSignB": keys_b.atsign,
                          "authenticateSocketA": True, "authenticateSocketB": True,
                          "clientNonce": client_nonce})
    server.stdin.write(json.dumps({"request": request, "pub_a": keys_a.encrypt_public_b64,
                                   "pub_b": keys_b.encrypt_public_b64}) + "\n")
    server.stdin.flush()
    reply = json.loads(server.stdout.readline())
    line_a = encode_auth_line(sid, client_nonce, reply["nonce"], keys_a.encrypt_private)
    line_b = encode_auth_line(sid, client_nonce, reply["nonce"], keys_b.encrypt_private)
    return reply, line_a, line_b


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    parser.add_argument("--pairing-timeout", type=float, default=120.0)
    args = parser.parse_args()
    run_loop(serve(args.pairing_timeout), args.loop)


if __name__ == "__main__":
    main()
