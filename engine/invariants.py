"""Invariant checks that hold even under ``python -O``.

Operating errors (insufficient funds, unknown wallet) are values in ``engine.commands``;
a broken invariant is a programmer error, so it raises and crashes the shard loudly.
"""

from __future__ import annotations

__all__ = ["InvariantViolation", "require"]


class InvariantViolation(AssertionError):
    """An engine invariant does not hold: a bug, never a client's fault."""


def require(condition: bool, message: str) -> None:
    # ``assert`` disappears under ``python -O``; money invariants must not.
    if not condition:
        raise InvariantViolation(message)
