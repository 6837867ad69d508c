"""Atsign's own Python SDK (atsdk, PyPI) against our atserver, at_activate and AtClient.

atsdk runs in its own venv with ``SSL_CERT_FILE`` at our CA and a temporary ``HOME`` whose
``~/.atsign/keys/@alice_key.atKeys`` was written by our ``at_activate``.  As @alice it logs in,
puts and gets public, self and shared keys, reads what our AtClient (@bob) shared with it,
receives and decrypts a notification our AtClient sent, and sends one that ours decrypts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from noports.at.atkeys import AtKeys
from noports.at.client import AtClient
from tests.conftest import run_atsdk
from tests.functional.conftest import AtServerProcess

pytestmark = pytest.mark.interop

REPO = Path(__file__).resolve().parents[2]

# argv: root port.  Prints one line "RESULT <json>".
ATSDK_ALICE = r"""
import json, queue, sys, threading, time
from at_client import AtClient
from at_client.common import AtSign
from at_client.common.keys import PublicKey, SelfKey, SharedKey
from at_client.connections import Address
from at_client.connections.notification.atevents import AtEventType

root_port = int(sys.argv[1])
alice, bob = AtSign("@alice"), AtSign("@bob")
out = {}
q = queue.Queue()
client = AtClient(alice, root_address=Address("127.0.0.1", root_port), queue=q)

def key(cls, name, *owners):
    k = cls(name, *owners)
    k.set_namespace("interop")
    return k

client.put(key(PublicKey, "loc", alice), "Paris")
out["own_public"] = client.get(key(PublicKey, "loc", alice))
out["bob_public"] = client.get(key(PublicKey, "bobpub", bob))
client.put(key(SelfKey, "diary", alice), "dear diary")
out["self"] = client.get(key(SelfKey, "diary", alice))
client.put(key(SharedKey, "fromatsdk", alice, bob), "hello from atsdk")
out["shared_by_me"] = client.get(key(SharedKey, "fromatsdk", alice, bob))
out["shared_by_other"] = client.get(key(SharedKey, "fromours", bob, alice))

# monitor:0 replays the notification our client sent before this process started
threading.Thread(target=client.start_monitor, args=(r"note\.interop@bob",), daemon=True).start()
deadline = time.time() + 30
while time.time() < deadline and "notification" not in out:
    try:
        ev = q.get(timeout=1)
    except queue.Empty:
        continue
    if ev.event_type in (AtEventType.UPDATE_NOTIFICATION, AtEventType.SHARED_KEY_NOTIFICATION):
        client.handle_event(q, ev)
    elif ev.event_type == AtEventType.DECRYPTED_UPDATE_NOTIFICATION:
        out["notification"] = {"id": ev.event_data["id"], "key": ev.event_data["key"],
                               "value": ev.event_data["decryptedValue"]}

out["notify_id"] = client.notify(key(SharedKey, "atsdknote", alice, bob), "ping from atsdk")
print("RESULT " + json.dumps(out), flush=True)
"""


UNTRUSTED = r"""
import sys
from at_client.common import AtSign
from at_client.connections.atrootconnection import AtRootConnection
try:
    AtRootConnection.get_instance("127.0.0.1", int(sys.argv[1])).find_secondary(AtSign("@alice"))
except Exception as e:
    print("REFUSED", type(e).__name__, e)
else:
    print("ACCEPTED")
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """@alice and @bob, not activated: at_activate does it."""
    proc = AtServerProcess(tmp_path_factory.mktemp("interop"), ["@alice", "@bob"], keys=False)
    proc.start()
    yield proc
    proc.stop()


def _activate(server: AtServerProcess, atsign: str, home: Path | None, out: Path | None):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    if home is not None:
        env["HOME"] = str(home)
    args = [sys.executable, "-m", "noports.at.activate", "-a", atsign,
            "--cram-secret", server.cram_secret(atsign),
            "--root-domain", f"127.0.0.1:{server.root_port}", "--ca-file", str(server.ca_file)]
    if out is not None:
        args += ["-k", str(out)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr


def test_atsdk_against_our_server_and_client(server, atsdk_python, tmp_path, run):
    home = tmp_path / "home"
    home.mkdir()
    bob_keys_path = tmp_path / "@bob_key.atKeys"
    _activate(server, "@alice", home, None)            # default path: ~/.atsign/keys/
    _activate(server, "@bob", None, bob_keys_path)
    assert (home / ".atsign" / "keys" / "@alice_key.atKeys").exists()
    bob_keys = AtKeys.load(bob_keys_path, "@bob")
    root = f"127.0.0.1:{server.root_port}"

    def bob_client() -> AtClient:
        return AtClient("@bob", bob_keys, root=root, ca_file=str(server.ca_file))

    async def before():
        async with bob_client() as bob:
            await bob.put("public:bobpub.interop@bob", "Bob's public value")
            await bob.put("@alice:fromours.interop@bob", "hello from noports")
            return await bob.notify("@alice:note.interop@bob", "notified by noports",
                                    ttln=600_000)

    note_id = run(before())

    proc = run_atsdk(atsdk_python, ATSDK_ALICE, str(server.root_port),
                     env={"HOME": str(home), "SSL_CERT_FILE": str(server.ca_file)}, timeout=120)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, f"atsdk failed:\nstdout={proc.stdout[-2000:]}\nstderr={proc.stderr[-3000:]}"
    out = json.loads(lines[-1][len("RESULT "):])

    assert out["own_public"] == "Paris"
    assert out["bob_public"] == "Bob's public value"
    assert out["self"] == "dear diary"
    assert out["shared_by_me"] == "hello from atsdk"
    assert out["shared_by_other"] == "hello from noports"
    assert out["notification"] == {"id": note_id, "key": "@alice:note.interop@bob",
                                   "value": "notified by noports"}

    async def after():
        async with bob_client() as bob:
            shared = await bob.get("fromatsdk.interop@alice")
            public = await bob.get("public:loc.interop@alice")
            async with bob.monitor(r"atsdknote\.interop@alice", since=0) as mon:
                n = await mon.get(15)
            return shared, public, n

    shared, public, n = run(after())
    assert shared == "hello from atsdk"
    assert public == "Paris"
    assert n.id == out["notify_id"]
    assert n.decrypt_error is None
    assert n.value == "ping from atsdk"
    assert n.raw["value"] != "ping from atsdk"


def test_atsdk_rejects_untrusted_server(server, atsdk_python, tmp_path):
    """Sanity check of the set-up: without SSL_CERT_FILE atsdk must refuse our certificate,
    so the passing test above really verified TLS."""
    script = UNTRUSTED
    env = {"HOME": str(tmp_path), "SSL_CERT_FILE": str(tmp_path / "missing.pem")}
    proc = run_atsdk(atsdk_python, script, str(server.root_port), env=env, timeout=60)
    assert "REFUSED" in proc.stdout, proc.stdout + proc.stderr
    assert "CERTIFICATE_VERIFY_FAILED" in proc.stdout
