"""Fixtures shared by every test package.

- ``event_loop_kind``: functional tests that take it run once on stock asyncio and once on uvloop.
- ``run``: run a coroutine to completion on the chosen loop with a bounded wait.
- ``atsdk_python``: the interpreter of a private venv holding Atsign's ``atsdk`` package (PyPI),
  which pins its own ``cryptography``, so it never shares our environment.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ATSDK_VERSION = os.environ.get("NOPORTS_ATSDK_VERSION", "0.2.81")
ATSDK_VENV = Path(os.environ.get(
    "NOPORTS_ATSDK_VENV", Path.home() / ".cache" / "noports" / f"atsdk-{ATSDK_VERSION}"))

try:
    import uvloop
except ImportError:  # pragma: no cover - platforms without uvloop
    uvloop = None

LOOP_KINDS = ["asyncio", "uvloop"] if uvloop is not None else ["asyncio"]


@pytest.fixture(params=LOOP_KINDS)
def event_loop_kind(request) -> str:
    return request.param


def _new_loop(kind: str) -> asyncio.AbstractEventLoop:
    if kind == "uvloop":
        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


@pytest.fixture
def run(request):
    """``run(coro, timeout=30)``: run on the loop named by ``event_loop_kind`` (default asyncio)."""
    kind = "asyncio"
    if "event_loop_kind" in request.fixturenames:
        kind = request.getfixturevalue("event_loop_kind")
    loop = _new_loop(kind)

    def _run(coro, timeout: float = 60.0):
        return loop.run_until_complete(asyncio.wait_for(coro, timeout))

    yield _run
    try:
        loop.run_until_complete(loop.shutdown_asyncgens())
    finally:
        loop.close()


def _venv_python(root: Path) -> Path:
    return root / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")


@pytest.fixture(scope="session")
def atsdk_python() -> Path:
    """Path to a python that can ``import at_client`` (atsdk), created once and cached."""
    py = _venv_python(ATSDK_VENV)
    marker = ATSDK_VENV / ".installed"
    if not marker.exists():
        ATSDK_VENV.parent.mkdir(parents=True, exist_ok=True)
        venv.EnvBuilder(with_pip=True, clear=True).create(ATSDK_VENV)
        proc = subprocess.run(
            [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check",
             f"atsdk=={ATSDK_VERSION}"],
            capture_output=True, text=True, timeout=600,
        )
        if proc.returncode != 0:
            msg = f"cannot install atsdk=={ATSDK_VERSION}: {proc.stderr[-2000:]}"
            if os.environ.get("CI"):
                pytest.fail(msg)
            pytest.skip(msg)
        marker.write_text(ATSDK_VERSION)
    return py


def run_atsdk(python: Path, script: str, *args: str, env: dict | None = None,
              timeout: float = 120.0):
    """Run ``script`` (Python source) under the atsdk venv; return the CompletedProcess."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    full_env.update(env or {})
    return subprocess.run([str(python), "-c", script, *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env)
