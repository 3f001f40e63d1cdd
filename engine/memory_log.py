"""An in-memory ``WalletLog``: the engine's first-class test double.

It honours the same contract as the PostgreSQL log (atomic batches, seq fencing) and can be
told to fail, so engine tests exercise failure handling without a database.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from uuid import UUID

from walletd.engine.commands import reversal_of
from walletd.engine.model import (
    Batch,
    HoldRecord,
    HoldStatus,
    OperationKind,
    OperationRecord,
    PaymentPhase,
    PaymentRecord,
    PaymentStatus,
    RefusalRecord,
    TransferRecord,
    TransferStatus,
    WalletRecord,
    WalletStatus,
)
from walletd.engine.ports import (
    CommitOutcomeUnknown,
    HoldNotPending,
    PredecessorPending,
    StorageError,
    StorageRefused,
    TransferNotPending,
    WalletLog,
)

__all__ = ["InMemoryLog"]


_REVERSALS = frozenset({OperationKind.DEPOSIT_REVERSAL, OperationKind.WITHDRAW_REVERSAL})


class InMemoryLog(WalletLog):
    def __init__(self) -> None:
        self.wallets: dict[UUID, WalletRecord] = {}
        self.operations: dict[UUID, list[OperationRecord]] = {}
        self._by_key: dict[tuple[UUID, str], OperationRecord | RefusalRecord] = {}
        self.refusals: dict[tuple[UUID, str], RefusalRecord] = {}
        self._by_create_key: dict[str, UUID] = {}
        self.transfers: dict[UUID, TransferRecord] = {}
        self.holds: dict[UUID, HoldRecord] = {}
        # Payments as opened or decided; their postings' statuses are read from
        # ``transfers`` when loaded.
        self.payments: dict[UUID, PaymentRecord] = {}
        self.appends = 0
        # Fault injection: the next N appends fail; ``apply_then_fail`` writes the batch
        # first, which is what a connection lost during COMMIT looks like from outside.
        self.fail_next_appends = 0
        self.apply_then_fail = False
        self.fail_loads = False
        # A constraint the ledger cannot foresee (an operator's CHECK): a batch holding an
        # operation row this says yes to is refused whole, nothing written (StorageRefused,
        # class 23 as PostgreSQL's CHECK violation).
        self.refuse_operation: Callable[[OperationRecord], bool] | None = None

    async def load_wallets(self, wallet_ids: Sequence[UUID]) -> dict[UUID, WalletRecord]:
        if self.fail_loads:
            raise StorageError("injected load failure")
        return {w: self._with_holds(self.wallets[w]) for w in wallet_ids if w in self.wallets}

    def _with_holds(self, record: WalletRecord) -> WalletRecord:
        """The wallet as loaded: with its PENDING holds and outgoing PENDING transfers."""
        pending_out = tuple(
            (t.transfer_id, t.amount) for t in self.transfers.values()
            if t.from_wallet_id == record.wallet_id and t.status is TransferStatus.PENDING
        )  # fmt: skip
        if pending_out:
            record = replace(record, pending_out=pending_out)
        if not record.held:
            return record
        holds = tuple(
            h for h in self.holds.values()
            if h.wallet_id == record.wallet_id and h.status is HoldStatus.PENDING
        )  # fmt: skip
        return replace(record, holds=holds)

    async def load_holds(self, hold_ids: Sequence[UUID]) -> dict[UUID, HoldRecord]:
        if self.fail_loads:
            raise StorageError("injected load failure")
        return {h: self.holds[h] for h in hold_ids if h in self.holds}

    async def expired_holds(
        self, shards: Sequence[int], now_us: int, limit: int
    ) -> list[HoldRecord]:
        if self.fail_loads:
            raise StorageError("injected load failure")
        wanted = set(shards)
        expired = [
            h for h in self.holds.values()
            if h.status is HoldStatus.PENDING and h.shard in wanted and h.expires_at_us <= now_us
        ]  # fmt: skip
        return sorted(expired, key=lambda h: (h.expires_at_us, h.hold_id))[:limit]

    async def find_operations(
        self, keys: Sequence[tuple[UUID, str]]
    ) -> dict[tuple[UUID, str], OperationRecord | RefusalRecord]:
        if self.fail_loads:
            raise StorageError("injected load failure")
        return {k: self._by_key[k] for k in keys if k in self._by_key}

    async def find_wallets_by_create_key(self, keys: Sequence[str]) -> dict[str, WalletRecord]:
        if self.fail_loads:
            raise StorageError("injected load failure")
        return {k: self.wallets[self._by_create_key[k]] for k in keys if k in self._by_create_key}

    async def load_transfers(self, transfer_ids: Sequence[UUID]) -> dict[UUID, TransferRecord]:
        if self.fail_loads:
            raise StorageError("injected load failure")
        return {
            t: self.transfers[t]._replace(refunded=self._refunded(t))
            for t in transfer_ids
            if t in self.transfers
        }

    async def pending_transfers(
        self, created_before_us: int, limit: int, after: tuple[int, UUID] | None = None
    ) -> list[TransferRecord]:
        if self.fail_loads:
            raise StorageError("injected load failure")
        pending = [
            t
            for t in self.transfers.values()
            if t.status is TransferStatus.PENDING
            and t.payment_id is None  # a payment's posting: driven by its payment
            and t.created_at_us < created_before_us
            and (after is None or (t.created_at_us, t.transfer_id) > after)
        ]
        return sorted(pending, key=lambda t: (t.created_at_us, t.transfer_id))[:limit]

    async def pending_transfers_of(self, wallet_id: UUID) -> int:
        if self.fail_loads:
            raise StorageError("injected load failure")
        return sum(
            1
            for t in self.transfers.values()
            if t.status is TransferStatus.PENDING
            and wallet_id in (t.from_wallet_id, t.to_wallet_id)
        )

    async def append_batch(self, batch: Batch) -> None:
        if self.fail_next_appends > 0:
            self.fail_next_appends -= 1
            if not self.apply_then_fail:
                raise StorageError("injected commit failure")
            self._apply(batch)
            raise CommitOutcomeUnknown("injected failure after commit")
        self._apply(batch)

    def _apply(self, batch: Batch) -> None:
        # Validate everything first so that a refused batch writes nothing (atomicity).
        wallets = dict(self.wallets)
        for new in batch.new_wallets:
            if new.wallet_id in wallets:
                raise StorageRefused(f"wallet {new.wallet_id} exists")
            if new.create_idempotency_key in self._by_create_key:
                raise StorageRefused("creation idempotency key exists")
            wallets[new.wallet_id] = WalletRecord(
                new.wallet_id, 0, 0, new.created_at_us, new.created_at_us,
                new.create_idempotency_key, new.create_fingerprint, currency=new.currency,
                metadata=new.metadata,
            )  # fmt: skip
        for update in batch.snapshots:
            current = wallets.get(update.wallet_id)
            if current is None or current.seq < update.prev_seq:
                raise PredecessorPending(f"{update.wallet_id} is behind the batch")
            if current.seq != update.prev_seq:
                raise StorageError(f"snapshot fencing failed for {update.wallet_id}")
            if current.status is WalletStatus.CLOSED:
                raise StorageRefused(f"{update.wallet_id} is CLOSED", "23514")
            wallets[update.wallet_id] = replace(
                current, balance=update.balance, seq=update.seq,
                updated_at_us=update.updated_at_us, held=update.held,
            )  # fmt: skip
        moved = {update.wallet_id for update in batch.snapshots}
        refuse = self.refuse_operation
        for op in batch.operations:
            if refuse is not None and refuse(op):
                raise StorageRefused(f"injected: a CHECK refuses {op}", "23514")
            if op.wallet_id not in moved:
                raise StorageRefused(f"log row for {op.wallet_id}, whose snapshot is not moved")
            if (
                op.idempotency_key is not None
                and (op.wallet_id, op.idempotency_key) in self._by_key
            ):
                raise StorageRefused("operation idempotency key exists")
        created = {new.wallet_id for new in batch.new_wallets}
        for refusal in batch.refusals:
            stored = self.wallets.get(refusal.wallet_id)  # before this batch
            if refusal.wallet_id not in created and (
                stored is None or stored.seq < refusal.fence_seq
            ):
                raise PredecessorPending(f"{refusal.wallet_id} is behind a refusal")
            if (refusal.wallet_id, refusal.idempotency_key) in self._by_key:
                raise StorageRefused("refusal idempotency key exists")
        transfers = dict(self.transfers)
        for transfer in batch.new_transfers:
            if transfer.transfer_id in transfers:
                raise StorageRefused(f"transfer {transfer.transfer_id} exists")
            transfers[transfer.transfer_id] = transfer
        for close in batch.transfer_updates:
            open_transfer = transfers.get(close.transfer_id)
            if open_transfer is None or open_transfer.status is not TransferStatus.PENDING:
                raise TransferNotPending(f"transfer {close.transfer_id} is not PENDING")
            transfers[close.transfer_id] = open_transfer._replace(
                status=close.status,
                failure_code=close.failure_code,
                updated_at_us=close.updated_at_us,
            )
        self._check_refunds(batch, transfers)
        self._check_reversals(batch)
        self._check_updates(batch, wallets)
        holds = dict(self.holds)
        for hold in batch.new_holds:
            if hold.hold_id in holds:
                raise StorageRefused(f"hold {hold.hold_id} exists")
            holds[hold.hold_id] = hold
        for resolved in batch.hold_updates:
            open_hold = holds.get(resolved.hold_id)
            if open_hold is None or open_hold.status is not HoldStatus.PENDING:
                raise HoldNotPending(f"hold {resolved.hold_id} is not PENDING")
            holds[resolved.hold_id] = open_hold._replace(
                status=resolved.status, captured=resolved.captured,
                to_wallet_id=resolved.to_wallet_id, transfer_id=resolved.transfer_id,
                resolve_key=resolved.resolve_key,
                resolve_fingerprint=resolved.resolve_fingerprint,
                updated_at_us=resolved.updated_at_us,
            )  # fmt: skip
        self._check_closes(batch, holds, transfers)
        for change in batch.wallet_updates:
            wallets[change.wallet_id] = replace(
                wallets[change.wallet_id], status=change.status,
                overdraft_limit=change.overdraft_limit,
            )  # fmt: skip
        # A WALLET_UPDATE row carries the wallet's metadata after it (the last one wins).
        for op in batch.operations:
            if op.kind is OperationKind.WALLET_UPDATE:
                wallets[op.wallet_id] = replace(wallets[op.wallet_id], metadata=op.metadata)
        for wallet in (wallets[update.wallet_id] for update in batch.snapshots):
            if wallet.balance - wallet.held < -wallet.overdraft_limit or wallet.held < 0:
                raise StorageRefused(f"{wallet.wallet_id} is below its floor", "23514")
        self.wallets = wallets
        self.transfers = transfers
        self.holds = holds
        for new in batch.new_wallets:
            if new.create_idempotency_key is not None:
                self._by_create_key[new.create_idempotency_key] = new.wallet_id
        for op in batch.operations:
            self.operations.setdefault(op.wallet_id, []).append(op)
            if op.idempotency_key is not None:
                self._by_key[(op.wallet_id, op.idempotency_key)] = op
        for refusal in batch.refusals:
            key = (refusal.wallet_id, refusal.idempotency_key)
            self._by_key[key] = self.refusals[key] = refusal
        self.appends += 1

    @staticmethod
    def _check_refunds(batch: Batch, transfers: dict[UUID, TransferRecord]) -> None:
        """A refund opened by the batch refunds a COMPLETED transfer that is no refund,
        between its wallets the other way, and its refunds that are not FAILED sum to at
        most its amount (PostgreSQL: WD010)."""
        for refund in batch.new_transfers:
            original_id = refund.refund_of
            if original_id is None:
                continue
            original = transfers.get(original_id)
            refunded = sum(
                t.amount
                for t in transfers.values()
                if t.refund_of == original_id and t.status is not TransferStatus.FAILED
            )
            if (
                original is None
                or original.status is not TransferStatus.COMPLETED
                or original.refund_of is not None
                or (refund.from_wallet_id, refund.to_wallet_id)
                != (original.to_wallet_id, original.from_wallet_id)
                or refunded > original.amount
            ):
                raise StorageRefused(f"refund {refund.transfer_id} refused", "WD010")

    def _check_reversals(self, batch: Batch) -> None:
        """At most one reversal per operation (PostgreSQL: the unique index
        wallet_operations_reversed_once)."""
        seen: set[tuple[UUID, int]] = set()
        for op in batch.operations:
            seq = reversal_of(op.idempotency_key)
            if op.kind not in _REVERSALS or seq is None:
                continue
            if (op.wallet_id, seq) in seen or self._reversal(op.wallet_id, seq) is not None:
                raise StorageRefused(
                    "duplicate key value violates unique constraint "
                    '"wallet_operations_reversed_once"', "23505",
                )  # fmt: skip
            seen.add((op.wallet_id, seq))

    def _reversal(self, wallet_id: UUID, seq: int) -> OperationRecord | None:
        return next(
            (
                op for op in self.operations.get(wallet_id, ())
                if op.kind in _REVERSALS and reversal_of(op.idempotency_key) == seq
            ),
            None,
        )  # fmt: skip

    async def refunded_amount(self, transfer_id: UUID) -> int:
        if self.fail_loads:
            raise StorageError("injected load failure")
        return self._refunded(transfer_id)

    def _refunded(self, transfer_id: UUID) -> int:
        return sum(
            t.amount
            for t in self.transfers.values()
            if t.refund_of == transfer_id and t.status is not TransferStatus.FAILED
        )

    async def read_operation(
        self, wallet_id: UUID, seq: int
    ) -> tuple[OperationRecord | None, OperationRecord | None]:
        if self.fail_loads:
            raise StorageError("injected load failure")
        found = next((op for op in self.operations.get(wallet_id, ()) if op.seq == seq), None)
        return found, self._reversal(wallet_id, seq)

    @staticmethod
    def _check_updates(batch: Batch, wallets: dict[UUID, WalletRecord]) -> None:
        """WALLET_UPDATE rows match the batch's updates one to one (PostgreSQL: WD008);
        every row stays above the floor in force at it (the limit of the wallet's last
        update at or before it)."""
        rows = {
            (op.wallet_id, op.seq)
            for op in batch.operations
            if op.kind is OperationKind.WALLET_UPDATE
        }
        if rows != {(u.wallet_id, u.seq) for u in batch.wallet_updates}:
            raise StorageRefused("a WALLET_UPDATE row does not match its update", "WD008")
        limits = {w: wallets[w].overdraft_limit for w in wallets}
        for op in batch.operations:
            if op.kind is OperationKind.WALLET_UPDATE:
                limits[op.wallet_id] = op.overdraft_limit_after
            if op.balance_after - op.held_after < -limits.get(op.wallet_id, 0):
                raise StorageRefused(f"log row {op.wallet_id}/{op.seq} below its floor", "23514")

    @staticmethod
    def _check_closes(
        batch: Batch, holds: dict[UUID, HoldRecord], transfers: dict[UUID, TransferRecord]
    ) -> None:
        for change in batch.wallet_updates:
            if change.status is not WalletStatus.CLOSED:
                continue
            wid = change.wallet_id
            if any(
                h.wallet_id == wid and h.status is HoldStatus.PENDING for h in holds.values()
            ) or any(
                t.status is TransferStatus.PENDING and wid in (t.from_wallet_id, t.to_wallet_id)
                for t in transfers.values()
            ):
                raise StorageRefused(f"{wid} has a PENDING hold or transfer", "WD009")

    async def read_history(
        self, wallet_id: UUID, before_seq: int | None, limit: int
    ) -> list[tuple[int, OperationRecord]]:
        ops = self.operations.get(wallet_id, [])
        newest_first = [op for op in reversed(ops) if before_seq is None or op.seq < before_seq]
        return [(op.seq, op) for op in newest_first[:limit]]

    async def recent_wallets(self, limit: int) -> list[WalletRecord]:
        newest = sorted(self.wallets.values(), key=lambda w: w.updated_at_us, reverse=True)
        return [self._with_holds(w) for w in newest[:limit]]

    def _payment(self, payment: PaymentRecord) -> PaymentRecord:
        postings = tuple(
            p if (t := self.transfers.get(p.transfer_id)) is None
            else p._replace(status=t.status, failure_code=t.failure_code)
            for p in payment.postings
        )  # fmt: skip
        return payment._replace(postings=postings)

    async def open_payment(self, payment: PaymentRecord) -> PaymentRecord:
        if self.fail_loads:
            raise StorageError("injected load failure")
        stored = self.payments.setdefault(payment.payment_id, payment)
        return self._payment(stored)

    async def load_payments(self, payment_ids: Sequence[UUID]) -> dict[UUID, PaymentRecord]:
        if self.fail_loads:
            raise StorageError("injected load failure")
        return {i: self._payment(self.payments[i]) for i in payment_ids if i in self.payments}

    async def decide_payment(
        self,
        payment: PaymentRecord,
        phase: PaymentPhase,
        failed_index: int | None,
        failure_code: str | None,
        balance_seen: int | None,
        now_us: int,
    ) -> PaymentRecord:
        if self.fail_loads:
            raise StorageError("injected load failure")
        payment_id = payment.payment_id
        stored = self._payment(self.payments[payment_id])
        if stored.phase is not PaymentPhase.DEBITING:
            return stored
        side = None if failed_index is None else "from"
        if phase is PaymentPhase.CREDITING:
            if any(
                p.status not in (TransferStatus.PENDING, TransferStatus.COMPLETED)
                for p in stored.postings
            ):
                raise StorageRefused(f"payment {payment_id} has a posting not debited", "WD011")
            for index, posting in enumerate(stored.postings):
                wallet = self.wallets.get(posting.to_wallet_id)
                if (
                    posting.status is TransferStatus.PENDING
                    and wallet is not None
                    and wallet.status is WalletStatus.CLOSED
                ):
                    phase, failed_index, failure_code = PaymentPhase.FAILING, index, "WALLET_CLOSED"
                    balance_seen, side = None, "to"
                    break
        if phase is PaymentPhase.FAILING:
            for index, posting in enumerate(stored.postings):
                if posting.transfer_id not in self.transfers:
                    self.transfers[posting.transfer_id] = TransferRecord(
                        posting.transfer_id, posting.from_wallet_id, posting.to_wallet_id,
                        posting.amount, stored.reference, TransferStatus.FAILED,
                        "PAYMENT_NOT_DEBITED", now_us, now_us, stored.actor, stored.currency,
                        posting.metadata, payment_id=payment_id, payment_index=index,
                    )  # fmt: skip
        decided = self.payments[payment_id]._replace(
            phase=phase, failed_index=failed_index, failure_code=failure_code,
            balance_seen=balance_seen, updated_at_us=now_us, failed_side=side,
        )  # fmt: skip
        self.payments[payment_id] = decided
        return self._payment(decided)

    async def pending_payments(self, created_before_us: int, limit: int) -> list[PaymentRecord]:
        if self.fail_loads:
            raise StorageError("injected load failure")
        found = [
            loaded for p in self.payments.values()
            if p.created_at_us < created_before_us
            and (loaded := self._payment(p)).status is PaymentStatus.PENDING
        ]  # fmt: skip
        return sorted(found, key=lambda p: (p.created_at_us, p.payment_id))[:limit]

    async def ping(self) -> None:
        if self.fail_loads:
            raise StorageError("injected ping failure")
