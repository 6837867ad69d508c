"""The relay's counters (sessions, pairs, bytes, auth failures, refusals by reason) and their
Prometheus text rendering.  Plain integers updated on the event loop thread; no I/O here (the
``--metrics-port`` server that serves the text belongs to the relay's CLI).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

__all__ = ["RelayStats"]


class RelayStats:
    """Counters shared by every session of one relay process."""

    def __init__(self) -> None:
        self.sessions_open = 0           # gauge
        self.sessions_total = 0
        self.pairs_total = 0
        self.bytes_relayed = 0           # bytes of finished pairs, both directions
        self.auth_failures = 0           # sockets that presented no valid auth line
        self.unauth_sockets = 0          # gauge: sockets still in their auth phase
        self.refusals: Counter[str] = Counter()   # every refused socket or request, by reason
        #: Called by render() for bytes still moving in live pairs (the registry sets it).
        self.live_bytes: Callable[[], int] = lambda: 0

    def refuse(self, reason: str) -> None:
        self.refusals[reason] += 1

    def auth_failed(self, reason: str) -> None:
        self.auth_failures += 1
        self.refusals[reason] += 1

    def total_bytes(self) -> int:
        return self.bytes_relayed + self.live_bytes()

    def render(self, prefix: str = "noports_relay") -> str:
        """The counters in the Prometheus text exposition format (version 0.0.4)."""
        lines: list[str] = []

        def metric(name: str, kind: str, help_text: str, value: int) -> None:
            lines.extend((f"# HELP {prefix}_{name} {help_text}", f"# TYPE {prefix}_{name} {kind}",
                          f"{prefix}_{name} {value}"))

        metric("sessions_open", "gauge", "Relay sessions currently open.", self.sessions_open)
        metric("sessions_total", "counter", "Relay sessions opened.", self.sessions_total)
        metric("pairs_total", "counter", "Socket pairs spliced.", self.pairs_total)
        metric("bytes_relayed_total", "counter", "Bytes relayed, both directions.",
               self.total_bytes())
        metric("auth_failures_total", "counter", "Sockets refused for a missing or bad auth line.",
               self.auth_failures)
        metric("unauthenticated_sockets", "gauge", "Sockets in their auth phase.",
               self.unauth_sockets)
        lines.append(f"# HELP {prefix}_refusals_total Refused sockets and requests, by reason.")
        lines.append(f"# TYPE {prefix}_refusals_total counter")
        for reason in sorted(self.refusals):
            lines.append(f'{prefix}_refusals_total{{reason="{reason}"}} {self.refusals[reason]}')
        return "\n".join(lines) + "\n"
