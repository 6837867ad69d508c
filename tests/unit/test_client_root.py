"""RootClient retry, cache and error policy, with the network step replaced (no sockets)."""

from __future__ import annotations

import pytest

from noports.at import root as root_mod
from noports.at.connection import AtConnectionError, AtTimeoutError, AtTlsError
from noports.at.root import RETRY_DELAYS, AtSignNotFoundError, RootClient, clear_root_cache


class Scripted(RootClient):
    """A RootClient whose network step plays back a script of results/exceptions."""

    def __init__(self, script, **kw):
        super().__init__("root.example:64", None, **kw)
        self.script = list(script)
        self.asked = []

    async def _ask(self, atsign):
        self.asked.append(atsign)
        step = self.script.pop(0)
        if isinstance(step, BaseException):
            raise step
        return step


@pytest.fixture(autouse=True)
def slept(monkeypatch):
    clear_root_cache()
    slept = []

    async def fake_sleep(delay):
        slept.append(delay)

    monkeypatch.setattr(root_mod.asyncio, "sleep", fake_sleep)
    yield slept
    clear_root_cache()


def test_retries_transient_failures_with_at_lookup_schedule(run, slept):
    rc = Scripted([AtConnectionError("refused"), AtTimeoutError("slow"), ("h", 1)])
    assert run(rc.lookup("Alice")) == ("h", 1)
    assert rc.asked == ["@alice"] * 3
    assert slept == list(RETRY_DELAYS[:2])


def test_gives_up_after_five_attempts(run, slept):
    rc = Scripted([AtConnectionError(f"fail {i}") for i in range(5)])
    with pytest.raises(AtConnectionError) as info:
        run(rc.lookup("@alice"))
    assert len(rc.asked) == 5
    assert "5 attempts" in str(info.value) and "fail 4" in str(info.value)
    assert slept == [0.05, 0.10, 0.15, 0.20]


def test_null_answer_is_not_retried(run):
    rc = Scripted([AtSignNotFoundError("@ghost", "root.example:64")])
    with pytest.raises(AtSignNotFoundError) as info:
        run(rc.lookup("@ghost"))
    assert info.value.code == "AT0007"
    assert len(rc.asked) == 1


def test_untrusted_certificate_is_not_retried(run):
    rc = Scripted([AtTlsError("bad cert")])
    with pytest.raises(AtTlsError):
        run(rc.lookup("@alice"))
    assert len(rc.asked) == 1


def test_answers_are_cached_per_root_and_invalidated(run, monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(root_mod.time, "monotonic", lambda: now[0])
    rc = Scripted([("h1", 1), ("h2", 2), ("h3", 3)])
    assert run(rc.lookup("@alice")) == ("h1", 1)
    assert run(rc.lookup("@ALICE")) == ("h1", 1)          # cached, normalised
    assert len(rc.asked) == 1
    now[0] += 3599
    assert run(rc.lookup("@alice")) == ("h1", 1)
    now[0] += 2                                            # past one hour
    assert run(rc.lookup("@alice")) == ("h2", 2)
    rc.invalidate("@alice")
    assert run(rc.lookup("@alice")) == ("h3", 3)
    assert len(rc.asked) == 3
