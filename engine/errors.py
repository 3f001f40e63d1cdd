"""Errors raised to callers of the engine before a command is accepted.

Exceptions::

    EngineRefused          the command was not accepted; nothing will happen
    ├── EngineOverloaded   the shard's mailbox is full (503 OVERLOADED, retry later)
    └── EngineStopping     the engine is draining or stopped (503 UNAVAILABLE)
"""

from __future__ import annotations

__all__ = ["EngineOverloaded", "EngineRefused", "EngineStopping"]


class EngineRefused(Exception):
    """The engine did not accept the command."""


class EngineOverloaded(EngineRefused):
    """A mailbox is at its bound."""


class EngineStopping(EngineRefused):
    """The engine no longer accepts commands."""
