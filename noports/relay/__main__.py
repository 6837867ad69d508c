"""``python -m noports.relay``: run srvd, the NoPorts relay (see ``noports.relay.cli``)."""

from noports.relay.cli import main

raise SystemExit(main())
