"""The one selector between compiled data-plane modules and their pure-Python twins.

Compiled modules are built from the top-level ``_speedups/<name>.pyx`` as
``noports._speedups.<name>``; each has a twin with the same API in ``noports._pure.<name>``.
Everything on the data path imports through :func:`load`, so one environment variable
(``NOPORTS_NO_EXTENSIONS=1``) forces the twins everywhere, and ``--version`` can say which
implementation is live.  Nothing else in the package may import a compiled module directly.

``noports._speedups.pumpcore`` (with its ``pumpcore.pxd`` here) is not one of them: it is the
compiled pumps' shared base class, imported by those two modules only, with no twin to choose.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

#: Names that have (or will have) both a compiled module and a pure twin.  Each entry must
#: exist as ``noports/_pure/<name>.py``; the compiled one may be missing (pure build).
MODULES: tuple[str, ...] = ("relaypump", "tunnelpump")

_cache: dict[str, tuple[ModuleType, str]] = {}


def extensions_disabled() -> bool:
    """True when ``NOPORTS_NO_EXTENSIONS`` asks for the pure twins."""
    value = os.environ.get("NOPORTS_NO_EXTENSIONS", "").strip().lower()
    return value not in ("", "0", "false", "no")


def _select(name: str) -> tuple[ModuleType, str]:
    if name in _cache:
        return _cache[name]
    if not name.isidentifier():
        raise ValueError(f"not a module name: {name!r}")
    chosen: tuple[ModuleType, str] | None = None
    if not extensions_disabled():
        try:
            chosen = (importlib.import_module(f"{__name__}.{name}"), "compiled")
        except ImportError:
            chosen = None  # not built (pure install, or a platform without a wheel)
    if chosen is None:
        chosen = (importlib.import_module(f"noports._pure.{name}"), "pure")
    _cache[name] = chosen
    return chosen


def load(name: str) -> ModuleType:
    """Return the live implementation of data-plane module ``name``."""
    return _select(name)[0]


def implementation(name: str) -> str:
    """``"compiled"`` or ``"pure"``: which implementation of ``name`` is live."""
    return _select(name)[1]


def describe() -> str:
    """One line for ``--version``: the live implementation of every data-plane module."""
    if not MODULES:
        return "data plane: pure Python (no compiled modules in this release)"
    parts = []
    for name in MODULES:
        part = f"{name}={implementation(name)}"
        engines = getattr(load(name), "_aes_engines", None)
        if engines is not None and implementation(name) == "compiled":
            part += f" (AES: {engines()[0]})"    # VAES where the CPU has it, else OpenSSL EVP
        parts.append(part)
    return "data plane: " + ", ".join(parts)


def clear_cache() -> None:
    """Forget earlier choices (tests flip NOPORTS_NO_EXTENSIONS)."""
    _cache.clear()
