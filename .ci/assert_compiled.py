"""Fail when a compiled data-plane module was expected but the pure twin is live.

Used by cibuildwheel's test step and by .ci/run after a compiled install: a broken build must
never hide behind the fallback.  With NOPORTS_NO_EXTENSIONS set it checks the opposite.
"""

import sys

import noports._speedups as speedups

want = "pure" if speedups.extensions_disabled() else "compiled"
bad = {name: speedups.implementation(name) for name in speedups.MODULES
       if speedups.implementation(name) != want}
print(speedups.describe())
if bad:
    sys.exit(f"expected {want} implementations, got {bad}")
