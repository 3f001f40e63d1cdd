"""Errors raised to callers of the engine before a command is accepted.

Exceptions::

    EngineRefused          the command was not accepted; nothing will happen
    ├── EngineOverloaded   the shard's mailbox is full (503 OVERLOADED, retry later)
    ├── EngineStopping     the engine is draining or stopped (503 UNAVAILABLE)
    ├── AtomicSpansShards  an atomic group's wallets are on more than one shard actor, so
    │                      no single batch (one transaction) can hold it (422)
    ├── AtomicTooLarge     an atomic group holds more operations than one batch (413)
    └── NotOwner           this process does not serve the wallet's shard (forwarded, or
                           503 NOT_OWNER)
"""

from __future__ import annotations

__all__ = [
    "AtomicSpansShards",
    "AtomicTooLarge",
    "EngineOverloaded",
    "EngineRefused",
    "EngineStopping",
    "NotOwner",
]


class EngineRefused(Exception):
    """The engine did not accept the command."""


class EngineOverloaded(EngineRefused):
    """A mailbox is at its bound."""


class EngineStopping(EngineRefused):
    """The engine no longer accepts commands."""


class AtomicSpansShards(EngineRefused):
    """An atomic group needs one shard actor, and its wallets are on several."""


class AtomicTooLarge(EngineRefused):
    """An atomic group holds more operations than one batch can."""


class NotOwner(EngineRefused):
    """This process does not serve the wallet's shard now (another one owns it, or nobody
    does yet): the HTTP edge forwards the request to the owner or answers 503 NOT_OWNER."""

    def __init__(self, shard: int) -> None:
        super().__init__(f"shard {shard} is not served by this process")
        self.shard = shard
