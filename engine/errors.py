"""Errors raised to callers of the engine before a command is accepted.

Exceptions::

    EngineRefused          the command was not accepted; nothing will happen
    ├── EngineOverloaded   the shard's mailbox is full (503 OVERLOADED, retry later)
    ├── EngineStopping     the engine is draining or stopped (503 UNAVAILABLE)
    └── NotOwner           this process does not serve the wallet's shard (forwarded, or
                           503 NOT_OWNER)
"""

from __future__ import annotations

__all__ = ["EngineOverloaded", "EngineRefused", "EngineStopping", "NotOwner"]


class EngineRefused(Exception):
    """The engine did not accept the command."""


class EngineOverloaded(EngineRefused):
    """A mailbox is at its bound."""


class EngineStopping(EngineRefused):
    """The engine no longer accepts commands."""


class NotOwner(EngineRefused):
    """This process does not serve the wallet's shard now (another one owns it, or nobody
    does yet): the HTTP edge forwards the request to the owner or answers 503 NOT_OWNER."""

    def __init__(self, shard: int) -> None:
        super().__init__(f"shard {shard} is not served by this process")
        self.shard = shard
