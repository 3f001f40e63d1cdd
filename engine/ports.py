"""The storage port the engine talks through, and the errors it may raise.

Exceptions::

    StorageError                  storage could not do what was asked
    ├── StorageUnavailable        nothing was written (connection refused, timeout before send)
    ├── CommitOutcomeUnknown      the commit may or may not have happened
    ├── StaleEpoch                refused, nothing written: another process took a shard the
    │                             batch writes (its lease epoch is newer than the batch's)
    ├── PredecessorPending        refused, nothing written: a wallet's stored seq is behind the
    │                             batch's prev_seq (an earlier batch of the shard has not
    │                             landed yet); retried once that batch has committed
    └── StorageRefused            refused, nothing written, and the same rows would be refused
        │                         again: a constraint or a walletd check on what the batch
        │                         holds (not the connection, the lease or the seq fencing)
        ├── TransferNotPending    the batch closes a transfer that is no longer PENDING
        │                         (another driver closed it first)
        └── HoldNotPending        the batch closes a hold that is no longer PENDING

The engine treats the first two the same way (fail the batch with 503, re-read the truth),
but the distinction is kept for metrics and logs. A ``StorageRefused`` batch is not failed
whole: the pipeline isolates the command(s) at fault and answers the others truly
(engine/shard.py, "isolation").
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from uuid import UUID

from walletd.engine.model import (
    Batch,
    HoldRecord,
    OperationRecord,
    PaymentDecision,
    PaymentPhase,
    PaymentRecord,
    RefusalRecord,
    TransferRecord,
    WalletRecord,
)

__all__ = [
    "CommitOutcomeUnknown",
    "HoldNotPending",
    "PredecessorPending",
    "StaleEpoch",
    "StorageError",
    "StorageRefused",
    "StorageUnavailable",
    "TransferNotPending",
    "WalletLog",
]


class StorageError(Exception):
    """Storage failed; the engine answers 503 and re-reads before trusting memory again."""


class StorageUnavailable(StorageError):
    """Storage is unreachable; nothing was written."""


class CommitOutcomeUnknown(StorageError):
    """The commit was sent but its outcome is unknown."""


class PredecessorPending(StorageError):
    """The batch was refused because an earlier batch it builds on is not stored yet."""


class StorageRefused(StorageError):
    """A definite refusal of what the batch holds: nothing was written, and writing the same
    rows again would be refused again (PostgreSQL: an integrity or data error, or a check
    raised by walletd's own functions). ``sqlstate`` names it ("" when not PostgreSQL's)."""

    def __init__(self, message: str, sqlstate: str = "") -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


class HoldNotPending(StorageRefused):
    """A hold the batch closes is not PENDING in storage (nothing written)."""


class TransferNotPending(StorageRefused):
    """The batch closes a transfer that is not PENDING; nothing was written."""


class StaleEpoch(StorageError):
    """The batch was refused: a shard it writes has a newer lease epoch (a successor owns
    it). Nothing was written; the process gives the shards up."""

    def __init__(self, message: str, shards: Sequence[int] = ()) -> None:
        super().__init__(message)
        self.shards = tuple(shards)


class WalletLog(abc.ABC):
    """The durable log of wallets and their operations.

    Contract, checked by the same tests against every implementation:
    - ``append_batch`` is atomic: all of a batch is written, or none of it.
    - ``append_batch`` refuses (raising ``StorageError``, writing nothing) a snapshot update
      whose ``prev_seq`` is not the stored seq, so two writers can never interleave; when
      the stored seq is behind (or the wallet not there yet), it raises
      ``PredecessorPending``: an earlier batch sent concurrently has not landed. A refusal
      whose wallet's stored seq (before the batch) is behind its ``fence_seq`` is refused
      the same way; an idempotency key is used at most once per wallet, by an operation or
      a refusal, and an id (wallet, transfer, hold) once (``StorageRefused`` otherwise, as
      for any row a constraint of storage refuses).
    - ``append_batch`` writes the batch's new transfers (PENDING) and closes its transfer
      updates in the same transaction; a close of a transfer that is not PENDING refuses the
      batch with ``TransferNotPending``, so a transfer is closed at most once.
    - After ``append_batch`` returns, every load sees the batch.
    """

    @abc.abstractmethod
    async def load_wallets(self, wallet_ids: Sequence[UUID]) -> dict[UUID, WalletRecord]:
        """The committed snapshot of each wallet that exists."""

    @abc.abstractmethod
    async def find_operations(
        self, keys: Sequence[tuple[UUID, str]]
    ) -> dict[tuple[UUID, str], OperationRecord | RefusalRecord]:
        """What the engine decided for each (wallet id, idempotency key) that has a stored
        outcome: the logged operation, or the recorded refusal. Storage may find a key under
        an older spelling it still honours, and answers it under the key asked for
        (PostgresLog: a bulk item's key as stored before the upgrade that changed it)."""

    @abc.abstractmethod
    async def find_wallets_by_create_key(self, keys: Sequence[str]) -> dict[str, WalletRecord]:
        """The wallet created under each creation idempotency key that has one."""

    @abc.abstractmethod
    async def load_transfers(self, transfer_ids: Sequence[UUID]) -> dict[UUID, TransferRecord]:
        """The stored record of each transfer that exists."""

    @abc.abstractmethod
    async def pending_transfers(
        self, created_before_us: int, limit: int, after: tuple[int, UUID] | None = None
    ) -> list[TransferRecord]:
        """Up to ``limit`` PENDING transfers created before the instant, oldest first
        (by creation instant, then id); with ``after`` (an instant and an id), only those
        after it in that order: the next page of a scan."""

    @abc.abstractmethod
    async def pending_transfers_of(self, wallet_id: UUID) -> int:
        """How many PENDING transfers the wallet is on, from or to it (what blocks a close)."""

    @abc.abstractmethod
    async def load_holds(self, hold_ids: Sequence[UUID]) -> dict[UUID, HoldRecord]:
        """The stored record of each hold that exists."""

    @abc.abstractmethod
    async def expired_holds(
        self, shards: Sequence[int], now_us: int, limit: int
    ) -> list[HoldRecord]:
        """Up to ``limit`` PENDING holds of these shards whose expires_at has passed,
        earliest expiry first."""

    @abc.abstractmethod
    async def append_batch(self, batch: Batch) -> None:
        """Write a batch atomically; see the class contract."""

    @abc.abstractmethod
    async def read_history(
        self, wallet_id: UUID, before_seq: int | None, limit: int
    ) -> list[tuple[int, OperationRecord]]:
        """Up to ``limit`` operations with seq < before_seq, newest first, with their ids."""

    @abc.abstractmethod
    async def recent_wallets(self, limit: int) -> list[WalletRecord]:
        """Up to ``limit`` wallets, most recently updated first (for warm-up at start)."""

    # -- payments (docs/ARCHITECTURE.md, "Payments"): storage that has none refuses them --

    async def open_payment(self, payment: PaymentRecord) -> PaymentRecord:
        """Store ``payment`` (phase DEBITING, its postings) unless a payment is stored under
        its id; return the stored one, its postings with their transfers' statuses."""
        raise StorageUnavailable("this storage keeps no payments")

    async def load_payments(self, payment_ids: Sequence[UUID]) -> dict[UUID, PaymentRecord]:
        """The stored payments among ``payment_ids``, with their postings' statuses."""
        raise StorageUnavailable("this storage keeps no payments")

    async def decide_payment(
        self,
        payment: PaymentRecord,
        phase: PaymentPhase,
        failed_index: int | None,
        failure_code: str | None,
        balance_seen: int | None,
        now_us: int,
    ) -> PaymentRecord:
        """Decide a DEBITING ``payment`` (as the caller knows it) once, atomically; return
        it as stored after (its phase may be the decision of another driver, taken first).

        CREDITING only when every posting's transfer is PENDING (``StorageRefused``
        otherwise, nothing written) and no receiving wallet is CLOSED; a CLOSED receiver
        turns it into FAILING (WALLET_CLOSED, naming the first such posting), and from the
        commit on no receiver can close while its posting is PENDING (WD009). FAILING
        stores each posting not debited yet as a FAILED transfer (``PAYMENT_NOT_DEBITED``),
        so its debit can never be stored after (the transfer's id is taken)."""
        raise StorageUnavailable("this storage keeps no payments")

    async def open_payments(self, payments: Sequence[PaymentRecord]) -> list[PaymentRecord]:
        """``open_payment`` of each, in order (one statement where storage can: a wave)."""
        return [await self.open_payment(payment) for payment in payments]

    async def decide_payments(
        self, decisions: Sequence[PaymentDecision]
    ) -> list[PaymentRecord | None]:
        """``decide_payment`` of each, in order; None where storage refused it (nothing
        written for that one). One statement where storage can (a wave)."""
        decided: list[PaymentRecord | None] = []
        for d in decisions:
            try:
                one = await self.decide_payment(
                    d.payment, d.phase, d.failed_index, d.failure_code, d.balance_seen, d.now_us
                )
            except StorageRefused:
                decided.append(None)
            else:
                decided.append(one)
        return decided

    async def pending_payments(self, created_before_us: int, limit: int) -> list[PaymentRecord]:
        """Up to ``limit`` payments created before the instant that are not final (DEBITING,
        or a posting PENDING), oldest first."""
        raise StorageUnavailable("this storage keeps no payments")

    @abc.abstractmethod
    async def refunded_amount(self, transfer_id: UUID) -> int:
        """The sum of the amounts of the transfer's refunds that are not FAILED (COMPLETED
        and PENDING: money given back or on its way back); 0 without any."""

    @abc.abstractmethod
    async def read_operation(
        self, wallet_id: UUID, seq: int
    ) -> tuple[OperationRecord | None, OperationRecord | None]:
        """The wallet's log row ``seq`` (None: no such row), and the row that reverses it
        (a DEPOSIT_REVERSAL or WITHDRAW_REVERSAL naming that seq; None: not reversed)."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise ``StorageError`` unless storage answers."""
