"""What the engine reports about itself; the HTTP edge turns it into Prometheus metrics.

The engine imports only the standard library, so it reports through this small base class
(whose methods do nothing) rather than through a metrics library.
"""

from __future__ import annotations

__all__ = ["EngineObserver"]


class EngineObserver:
    def batch_committed(self, shard: int, ops: int, commands: int, seconds: float) -> None:
        """A batch with ``ops`` log rows (``commands`` commands in all) committed."""

    def batch_failed(self, shard: int, commands: int, reason: str) -> None:
        """A batch's commands were answered 503 because storage failed (``reason``)."""

    def command_rejected(self, reason: str) -> None:
        """A command was refused before entering a mailbox (``overloaded``, ``stopping``)."""
