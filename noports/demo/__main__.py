"""``python -m noports.demo``: the same as ``noports demo`` (see :mod:`noports.demo.cli`)."""

import sys

from noports.demo.cli import main

sys.exit(main(prog="python -m noports.demo"))
