"""``python -m noports.daemon``: run npd."""

import sys

from noports.daemon.cli import main

sys.exit(main())
