"""Both ends of a relayed NoPorts tunnel, in-process (multi mode, as npt and npd use it).

``ClientEnd`` is relay side A (npt): a local listener; each local connection gets its own relay
socket and per-connection AES key, announced on the encrypted control channel.  ``DaemonEnd`` is
relay side B (npd): it reads the control channel and connects each announced connection to its
one permitted target.  The bytes move through ``noports._speedups.load("tunnelpump")``.
See docs/internals.md, ``noports.tunnel``.
"""

from noports.tunnel.client_end import ClientEnd
from noports.tunnel.daemon_end import DaemonEnd
from noports.tunnel.endpoint import TunnelEnd, TunnelEnded, TunnelError, TunnelStats

__all__ = ["ClientEnd", "DaemonEnd", "TunnelEnd", "TunnelEnded", "TunnelError", "TunnelStats"]
