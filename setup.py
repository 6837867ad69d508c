"""Build script: only the list of compiled data-plane extensions lives here.

Every ``_speedups/<name>.pyx`` becomes ``noports._speedups.<name>``.  With
``NOPORTS_NO_EXTENSIONS=1`` nothing is compiled and the pure twins are used at run time.
Metadata, dependencies and entry points are in pyproject.toml.
"""

import os
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent

#: Extra C libraries per compiled module (the AES pumps call OpenSSL's libcrypto in place).
LIBRARIES: dict[str, list[str]] = {
    "tunnelpump": ["crypto"],
}


def _extensions():
    if os.environ.get("NOPORTS_NO_EXTENSIONS", "").strip().lower() not in ("", "0", "false", "no"):
        return []
    sources = sorted((HERE / "_speedups").glob("*.pyx"))
    if not sources:
        return []
    from Cython.Build import cythonize
    from setuptools import Extension

    extensions = [
        Extension(
            f"noports._speedups.{src.stem}",
            [str(src.relative_to(HERE))],
            libraries=LIBRARIES.get(src.stem, []),
            # its C headers: a change to one alone must rebuild the module too
            depends=[str(h.relative_to(HERE)) for h in sorted(src.parent.glob(f"{src.stem}*.h"))],
        )
        for src in sources
    ]
    return cythonize(
        extensions,
        # from the project root Cython finds noports/_speedups/pumpcore.pxd, the pumps' shared
        # base class, under its dotted name (a cimported class is looked up nowhere else)
        include_path=[str(HERE)],
        compiler_directives={"language_level": "3", "boundscheck": False, "wraparound": False},
    )


setup(ext_modules=_extensions())
