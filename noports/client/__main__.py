"""``python -m noports.client``: the same as the ``npt`` console script."""

import sys

from noports.client.cli import main

sys.exit(main())
