"""What the engine reports about itself; the HTTP edge turns it into Prometheus metrics.

The engine imports only the standard library, so it reports through this small base class
(whose methods do nothing) rather than through a metrics library. Every method is called on
the event loop, synchronously, and must not block.

``batch_failed`` reasons form a closed set (safe as a metric label), listed in
``FAILURE_REASONS``; ``command_rejected`` reasons likewise in ``REJECTION_REASONS``.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "DRIVER_REDRIVE",
    "DRIVER_REQUEST",
    "FAILURE_REASONS",
    "HOLD_EVENTS",
    "REASON_COMMIT_FAILED",
    "REASON_COMMIT_TIMEOUT",
    "REASON_COMMIT_UNKNOWN",
    "REASON_ISOLATION_LIMIT",
    "REASON_LOAD_FAILED",
    "REASON_PREVIOUS_FAILED",
    "REASON_SHARD_CRASHED",
    "REJECTION_REASONS",
    "TRANSFER_DRIVERS",
    "EngineObserver",
]

# Storage refused or could not take the batch; nothing was written.
REASON_COMMIT_FAILED: Final = "commit_failed"
# The connection broke during the commit (or storage raised something unexpected):
# the batch may or may not be in the log.
REASON_COMMIT_UNKNOWN: Final = "commit_outcome_unknown"
# The commit took longer than ``commit_timeout_s``; outcome unknown too.
REASON_COMMIT_TIMEOUT: Final = "commit_timeout"
# Loading wallets or idempotency keys before applying failed; nothing was applied.
REASON_LOAD_FAILED: Final = "load_failed"
# The batch was applied on top of a batch whose commit then failed.
REASON_PREVIOUS_FAILED: Final = "previous_batch_failed"
# The shard task ended on a programmer error; every command it held was answered 503.
REASON_SHARD_CRASHED: Final = "shard_crashed"
# Storage refused a batch for what it holds and isolating the command at fault took more
# than ``refusal_isolation_commits_max`` commits: the rest were answered 503, not applied.
REASON_ISOLATION_LIMIT: Final = "isolation_limit"

FAILURE_REASONS: Final = (
    REASON_COMMIT_FAILED,
    REASON_COMMIT_UNKNOWN,
    REASON_COMMIT_TIMEOUT,
    REASON_LOAD_FAILED,
    REASON_PREVIOUS_FAILED,
    REASON_SHARD_CRASHED,
    REASON_ISOLATION_LIMIT,
)
REJECTION_REASONS: Final = ("overloaded", "stopping")
# Who drove a transfer to its end: the request that opened it (or its retry), or the
# re-drive loop (after a 503 or a restart).
DRIVER_REQUEST: Final = "request"
DRIVER_REDRIVE: Final = "redrive"
TRANSFER_DRIVERS: Final = (DRIVER_REQUEST, DRIVER_REDRIVE)
# What happened to a hold, once its batch committed: opened PENDING, or closed.
HOLD_EVENTS: Final = ("CREATED", "CAPTURED", "VOIDED", "EXPIRED")


class EngineObserver:
    def batch_committed(self, shard: int, ops: int, commands: int, seconds: float) -> None:
        """A batch with ``ops`` log rows (``commands`` commands in all) committed.

        Called for batches that wrote something; ``seconds`` is the commit's latency
        (the ``append_batch`` call). ``commands`` is the ops-per-commit figure to plot.
        """

    def batch_failed(self, shard: int, commands: int, reason: str) -> None:
        """A batch's ``commands`` were answered 503 ``UNAVAILABLE`` (one of FAILURE_REASONS)."""

    def commands_isolated(self, shard: int, commits: int, refused: int) -> None:
        """Storage refused a batch for what it holds; isolating the command(s) at fault
        took ``commits`` more commits and ``refused`` commands were answered alone as
        refused (the others got their true answers)."""

    def command_rejected(self, reason: str) -> None:
        """A command was refused before entering a mailbox (one of REJECTION_REASONS)."""

    def wallets_loaded(self, shard: int, count: int) -> None:
        """``count`` wallets were read from storage into memory (cache misses)."""

    def wallets_evicted(self, shard: int, count: int) -> None:
        """``count`` idle wallets were dropped from memory (passivation)."""

    def shard_restarted(self, shard: int) -> None:
        """A crashed shard was restarted from storage, its memory dropped."""

    def transfer_ended(self, status: str, driver: str) -> None:
        """A transfer this process drove was closed by its commit: ``status`` COMPLETED or
        FAILED, ``driver`` one of TRANSFER_DRIVERS."""

    def hold_changed(self, event: str) -> None:
        """A hold's batch committed it: ``event`` one of HOLD_EVENTS (a replayed creation or
        a refused resolution is not an event)."""
