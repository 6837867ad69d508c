"""``python -m noports.atserver``: same as the ``atserver`` console script."""

import sys

from noports.atserver.cli import main

sys.exit(main())
