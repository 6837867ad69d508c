"""The README's main job, `python -m noports.demo`, run as a user would run it."""

from __future__ import annotations

import subprocess
import sys


def test_demo_exchanges_an_encrypted_notification():
    proc = subprocess.run([sys.executable, "-m", "noports.demo", "--message", "ping 42"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert any("decrypted: 'ping 42'" in line for line in lines), proc.stdout
    assert any(": delivered" in line for line in lines), proc.stdout
    assert lines[-1].startswith("OK: end-to-end encrypted notification"), proc.stdout
