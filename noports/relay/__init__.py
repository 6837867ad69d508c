"""srvd, the relay: messages (sans-IO), the per-session data plane, the session registry.

The atProtocol control plane (monitoring ``request_ports`` notifications, looking up public keys,
replying) and the CLI build on :class:`RelaySessions`; see docs/internals.md, ``noports.relay``.
"""

from noports.relay.dataplane import DataPlaneConfig, RelaySession, UnauthGate
from noports.relay.session import RelayRefused, RelaySessions
from noports.relay.stats import RelayStats

__all__ = ["DataPlaneConfig", "RelayRefused", "RelaySession", "RelaySessions", "RelayStats",
           "UnauthGate"]
