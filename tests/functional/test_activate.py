"""``at_activate`` against a real atserver started without --keys-dir (CRAM secrets only)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from noports.at.atkeys import AtKeys
from noports.at.client import AtClient
from noports.errors import AtServerError

REPO = Path(__file__).resolve().parents[2]


def at_activate(*args: str, env: dict | None = None, timeout: float = 60.0):
    full_env = dict(os.environ)
    full_env.pop("NOPORTS_CA_FILE", None)
    full_env["PYTHONPATH"] = str(REPO) + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "noports.at.activate", *args],
                          capture_output=True, text=True, timeout=timeout, env=full_env,
                          cwd=str(REPO))


@pytest.fixture
def fresh(atserver):
    """A server whose @alice and @bob are not activated yet."""
    return atserver("@alice", "@bob", keys=False)


def _common(proc) -> list[str]:
    return ["--root-domain", f"127.0.0.1:{proc.root_port}", "--ca-file", str(proc.ca_file)]


def test_activate_then_login_with_written_keys(fresh, tmp_path, run):
    out = tmp_path / "out" / "@alice_key.atKeys"
    secret = fresh.cram_secret("@alice")
    proc = at_activate("-a", "@alice", "--cram-secret", secret, "-k", str(out), *_common(fresh))
    assert proc.returncode == 0, proc.stderr
    assert out.exists()
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    keys = AtKeys.load(out, "@alice")

    async def main():
        async with AtClient("@alice", keys, root=f"127.0.0.1:{fresh.root_port}",
                            ca_file=str(fresh.ca_file)) as alice:
            # the public encryption key went up, and it is ours
            assert await alice.llookup("public:publickey@alice") == keys.encrypt_public_b64
            await alice.put("after.activation@alice", "works")
            assert await alice.get("after.activation@alice") == "works"
        # the CRAM secret is gone: cram login no longer works
        cram = AtClient("@alice", cram_secret=secret, root=f"127.0.0.1:{fresh.root_port}",
                        ca_file=str(fresh.ca_file))
        with pytest.raises(AtServerError) as info:
            await cram.connect()
        assert info.value.code == "AT0401"
        await cram.close()

    run(main())

    # activating again (even with --force) fails cleanly: the secret was deleted
    again = at_activate("-a", "@alice", "--cram-secret", secret, "-k", str(tmp_path / "x"),
                        *_common(fresh))
    assert again.returncode == 6, again.stderr
    assert "already activated" in again.stderr


def test_refuses_to_overwrite_keys_file(fresh, tmp_path):
    out = tmp_path / "@bob_key.atKeys"
    out.write_text("precious")
    proc = at_activate("-a", "@bob", "--cram-secret", fresh.cram_secret("@bob"),
                       "-k", str(out), *_common(fresh))
    assert proc.returncode == 3
    assert "--force" in proc.stderr
    assert out.read_text() == "precious"


def test_force_overwrites(fresh, tmp_path):
    out = tmp_path / "@bob_key.atKeys"
    out.write_text("old")
    proc = at_activate("-a", "@bob", "--cram-secret", fresh.cram_secret("@bob"),
                       "-k", str(out), "--force", *_common(fresh))
    assert proc.returncode == 0, proc.stderr
    assert AtKeys.load(out, "@bob").atsign == "@bob"


def test_default_keys_path_under_home(fresh, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    proc = at_activate("-a", "bob", "--cram-secret", fresh.cram_secret("@bob"),
                       *_common(fresh), env={"HOME": str(home)})
    assert proc.returncode == 0, proc.stderr
    assert (home / ".atsign" / "keys" / "@bob_key.atKeys").exists()


def test_wrong_secret_unknown_atsign_untrusted_ca(fresh, tmp_path):
    out = tmp_path / "k.atKeys"
    wrong = at_activate("-a", "@alice", "--cram-secret", "not-the-secret", "-k", str(out),
                        *_common(fresh))
    assert wrong.returncode == 6
    assert not out.exists()
    unknown = at_activate("-a", "@zed", "--cram-secret", "x", "-k", str(out), *_common(fresh))
    assert unknown.returncode == 5
    assert "@zed" in unknown.stderr
    untrusted = at_activate("-a", "@alice", "--cram-secret", "x", "-k", str(out),
                            "--root-domain", f"127.0.0.1:{fresh.root_port}")
    assert untrusted.returncode == 4
    assert "not trusted" in untrusted.stderr
    assert not out.exists()


def test_help_documents_exit_codes():
    proc = at_activate("--help")
    assert proc.returncode == 0
    for code in ("0", "3", "4", "5", "6", "7", "8"):
        assert f"\n  {code}  " in proc.stdout
    assert "root.atsign.org:64" in proc.stdout


def test_bad_arguments_exit_2():
    assert at_activate("-a", "@alice").returncode == 2          # no secret
    bad_root = at_activate("-a", "@alice", "--cram-secret", "s", "--root-domain", "host:notaport")
    assert bad_root.returncode == 2
    assert at_activate("-a", "not valid!", "--cram-secret", "s").returncode == 2
