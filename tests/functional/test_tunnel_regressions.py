"""Regressions of noports.tunnel found by the fault-injection work (test_r5_faults.py).

1. A new connection opened while another streams used to wait the full 2 s DELIVERY_WAIT for
   the streaming socket's bulk bytes to be acknowledged (SIOCOUTQ counts them, not just the
   auth line), after its TCP connect -- so the relay's 2 s auth deadline refused it.
2. A data socket reset inside its auth line on the daemon hop (the relay never pairs it) must
   end the session with ``pairing_lost`` rather than shift the pairing of later connections.
   (The client-hop twin is in test_r5_faults.py.)
"""

from __future__ import annotations

import asyncio
import os
import time

from noports.at.crypto import generate_aes_key_b64, generate_iv_b64
from noports.tunnel import ClientEnd, DaemonEnd
from tests.functional.test_r5_faults import (
    DETECT,
    HOST,
    Streamer,
    Target,
    echo,
    local_connect,
    read_to_end,
    relay_and_proxy,
    tunnel,
    until,
)
from tests.functional.toxic import ResetPeer


def test_new_connection_while_another_streams_is_not_delayed(run, event_loop_kind):
    """Relay auth deadline 2 s (as in the report): the second connection's round trip takes
    well under 1 s and the relay refuses no socket."""
    async def main():
        async with relay_and_proxy("daemon", auth_timeout=2.0) as rig, Target() as target:
            relay = rig.relay
            key, iv = generate_aes_key_b64(), generate_iv_b64()
            # both ends direct to the relay: no proxy ACKing on the relay's behalf
            daemon = DaemonEnd(HOST, relay.port_b, relay.line_b, session_key=key,
                               session_iv=iv, target_host=HOST, target_port=target.port)
            client = ClientEnd(HOST, relay.port_a, relay.line_a, session_key=key,
                               session_iv=iv, idle_timeout=60)
            try:
                await daemon.start()
                await client.start()
                streamer = Streamer(await local_connect(client.local_port))
                await until(lambda: streamer.received > 4 << 20, 20, "streaming")
                for _ in range(3):
                    payload = os.urandom(10_000)
                    start = time.monotonic()
                    assert await echo(target, client.local_port, payload)
                    took = time.monotonic() - start
                    assert took < 1.0, f"second connection took {took:.2f}s"
                assert streamer.received > 4 << 20 and streamer.intact
                assert rig.session.auth_failures == 0
                assert client.state == daemon.state == "open"
                streamer.close()
            finally:
                await asyncio.wait_for(client.close(), 15)
                await asyncio.wait_for(daemon.close(), 15)

    run(main(), timeout=60)


def test_daemon_data_socket_reset_inside_its_auth_line_ends_the_session(run):
    """reset_peer 100 bytes into the daemon's first data socket's auth line: the relay never
    pairs it, so the client's socket for that connection waits unpaired.  The daemon end ends
    with ``pairing_lost``, the client end follows (its control channel closes), and the
    target receives no byte."""
    async def main():
        async with relay_and_proxy("daemon") as rig, Target() as target:
            rig.proxy.add(ResetPeer(100), direction="up", where=1)
            async with tunnel(rig, target.port) as (client, daemon):
                sock = await local_connect(client.local_port)
                await asyncio.get_running_loop().sock_sendall(sock, b"hello" * 1000)
                ended = await asyncio.wait_for(daemon.wait_closed(), DETECT)
                assert ended.reason == "pairing_lost", ended
                assert (await asyncio.wait_for(client.wait_closed(), DETECT)).reason in (
                    "control_closed", "control_reset")
                assert (await asyncio.wait_for(read_to_end(sock), DETECT))[0] == 0
                sock.close()
                assert rig.proxy.conns[1].how == "reset"
                await until(lambda: target.live == 0, DETECT, "target connections to end")
                assert all(n == 0 for n, _digest in target.got), target.got

    run(main(), timeout=30)
