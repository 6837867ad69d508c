"""The selector between compiled data-plane modules and their pure twins (noports._speedups).

No compiled module ships yet, so these tests stand in fake module objects for a compiled
module and its twin and check every branch of the choice, plus the real package state.
"""

from __future__ import annotations

import sys
import types

import pytest

import noports._speedups as speedups


@pytest.fixture
def fake_pair(monkeypatch):
    compiled = types.ModuleType("noports._speedups.fakepump")
    compiled.KIND = "compiled"
    pure = types.ModuleType("noports._pure.fakepump")
    pure.KIND = "pure"
    monkeypatch.setitem(sys.modules, "noports._speedups.fakepump", compiled)
    monkeypatch.setitem(sys.modules, "noports._pure.fakepump", pure)
    speedups.clear_cache()
    yield compiled, pure
    speedups.clear_cache()


def test_compiled_module_preferred_when_present(fake_pair, monkeypatch):
    monkeypatch.delenv("NOPORTS_NO_EXTENSIONS", raising=False)
    assert speedups.load("fakepump").KIND == "compiled"
    assert speedups.implementation("fakepump") == "compiled"


@pytest.mark.parametrize("value", ["1", "true", "yes", "on"])
def test_env_var_forces_pure_twin(fake_pair, monkeypatch, value):
    monkeypatch.setenv("NOPORTS_NO_EXTENSIONS", value)
    assert speedups.extensions_disabled()
    assert speedups.load("fakepump").KIND == "pure"
    assert speedups.implementation("fakepump") == "pure"


@pytest.mark.parametrize("value", ["", "0", "false", "no"])
def test_env_var_off_values(monkeypatch, value):
    monkeypatch.setenv("NOPORTS_NO_EXTENSIONS", value)
    assert not speedups.extensions_disabled()


def test_falls_back_when_compiled_module_missing(fake_pair, monkeypatch):
    monkeypatch.delenv("NOPORTS_NO_EXTENSIONS", raising=False)
    # A None entry in sys.modules makes the import raise ImportError, as for an unbuilt module.
    monkeypatch.setitem(sys.modules, "noports._speedups.fakepump", None)
    assert speedups.load("fakepump").KIND == "pure"
    assert speedups.implementation("fakepump") == "pure"


def test_missing_twin_is_an_import_error(monkeypatch):
    monkeypatch.setenv("NOPORTS_NO_EXTENSIONS", "1")
    speedups.clear_cache()
    with pytest.raises(ImportError):
        speedups.load("no_such_module_anywhere")


def test_rejects_non_identifier_names():
    with pytest.raises(ValueError):
        speedups.load("../etc")


def test_every_declared_module_has_a_twin_and_describe_names_it():
    speedups.clear_cache()
    for name in speedups.MODULES:
        assert speedups.implementation(name) in ("compiled", "pure")
        assert name in speedups.describe()
    assert speedups.describe().startswith("data plane:")
