"""A shard: one asyncio task that is the only writer of the wallets hashed to it.

Batch lifecycle (up to ``inflight_batches_max`` batches committing, one more prepared)::

    submit ──▶ mailbox (deque, ≤ mailbox_commands_max; full → EngineOverloaded at once)
                  │ drain ≤ batch_ops_max (everything that queued meanwhile)
                  ▼
              prepare: load missing wallets and unknown idempotency keys (≤ 3 queries;
                  │     a failed load answers the batch with 503 at once, nothing applied),
                  │     then apply each command in order to the *pending* state
                  ▼
              wait for a free slot ──a batch in flight failed──▶ answer this one with 503,
                  │                  wait for every batch in flight, forget all they touched
                  ▼
              hand over to a commit task; evict idle clean wallets past the resident bound
                  │
                  ▼
              commit task: one append_batch (log rows + snapshots, one transaction, bounded
                  │        by commit_timeout_s; refused as PredecessorPending when it reached
                  │        PostgreSQL before its predecessor: written again after it),
                  │        then wait for the predecessor's task
                  ├─ both ok ──▶ promote pending → committed, then resolve every reply
                  └─ failed ───▶ resolve every reply with UNAVAILABLE; the loop forgets
                                 the touched wallets so they are re-read from storage

Who mutates what: only the loop changes residents, pending state and key caches; the commit
task only promotes committed state and resolves futures. So memory is never ahead of the
database: committed fields change only after a commit returned, and pending state that
rode on a failed commit is forgotten before the next batch is prepared.

Batch size adapts by itself: at idle a batch holds the one command that arrived; under load
the mailbox fills while a commit is in flight and the next batch takes it all (group commit).
Replies, refusals included, are resolved only once every batch before them has committed.

If the loop itself fails (a broken invariant: a bug), every command it holds — committing,
prepared, queued — is answered 503 and the shard refuses new work; nothing is left hanging.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from uuid import UUID

from walletd.engine.commands import (
    ApplyOperation,
    Command,
    CreateWallet,
    Outcome,
    Reply,
    TransferLeg,
)
from walletd.engine.errors import EngineOverloaded, EngineStopping
from walletd.engine.invariants import require
from walletd.engine.limits import EngineLimits
from walletd.engine.model import (
    CREDIT_KINDS,
    Batch,
    NewWallet,
    OperationKind,
    OperationRecord,
    SnapshotUpdate,
    TransferUpdate,
    WalletRecord,
    WalletView,
)
from walletd.engine.money import BALANCE_MINOR_MAX
from walletd.engine.observer import (
    REASON_COMMIT_FAILED,
    REASON_COMMIT_TIMEOUT,
    REASON_COMMIT_UNKNOWN,
    REASON_LOAD_FAILED,
    REASON_PREVIOUS_FAILED,
    REASON_SHARD_CRASHED,
    EngineObserver,
)
from walletd.engine.ports import (
    CommitOutcomeUnknown,
    PredecessorPending,
    StorageError,
    WalletLog,
)

__all__ = ["Shard"]

_log = logging.getLogger("walletd.engine")

_UNAVAILABLE = Reply(Outcome.UNAVAILABLE)


# A resident's committed seq when no committed state is known: its creation is still in
# flight, or a batch that touched it failed and it waits to be re-read.
_NOT_COMMITTED = -1


class _Pending:
    """Applied but not yet committed state of a wallet: exists only while a batch is open."""

    __slots__ = ("balance", "seq", "updated_at_us")

    def __init__(self, balance: int, seq: int, updated_at_us: int) -> None:
        self.balance = balance
        self.seq = seq
        self.updated_at_us = updated_at_us


class _Resident:
    """A wallet held in memory: its committed state, and pending state while it is dirty.

    Kept small on purpose (one of these per resident wallet, up to a million): the id is the
    table's key, and the pending part is a separate object only while a batch is open.
    """

    __slots__ = ("balance", "created_at_us", "pending", "seq", "updated_at_us")

    def __init__(self, balance: int, seq: int, created_at_us: int, updated_at_us: int) -> None:
        self.balance = balance
        self.seq = seq
        self.created_at_us = created_at_us
        self.updated_at_us = updated_at_us
        self.pending: _Pending | None = None

    @classmethod
    def loaded(cls, record: WalletRecord) -> _Resident:
        return cls(record.balance, record.seq, record.created_at_us, record.updated_at_us)

    @classmethod
    def being_created(cls, created_at_us: int) -> _Resident:
        resident = cls(0, _NOT_COMMITTED, created_at_us, created_at_us)
        resident.pending = _Pending(0, 0, created_at_us)
        return resident

    @property
    def committed(self) -> bool:
        return self.seq != _NOT_COMMITTED

    def is_dirty(self) -> bool:
        return self.pending is not None or self.seq == _NOT_COMMITTED

    def pending_view(self, wallet_id: UUID) -> WalletView:
        pending = self.pending
        assert pending is not None
        return WalletView(
            wallet_id, pending.balance, pending.seq, self.created_at_us, pending.updated_at_us
        )

    def committed_view(self, wallet_id: UUID) -> WalletView:
        return WalletView(wallet_id, self.balance, self.seq, self.created_at_us, self.updated_at_us)


@dataclass(frozen=True, slots=True)
class _CreationKey:
    wallet_id: UUID
    fingerprint: str
    created_at_us: int


@dataclass(slots=True)
class _Prepared:
    """One batch after apply: what to write, what to answer, and what it touched."""

    batch: Batch = field(default_factory=Batch)
    replies: list[tuple[asyncio.Future[Reply], Reply]] = field(default_factory=list)
    # Reads are answered from committed state when the batch resolves, not when applied.
    # The resident is captured at apply time: it may be evicted from the table before the
    # batch resolves, and its committed fields stay exact until then (it is clean, so no
    # other batch can commit it in between).
    reads: list[tuple[asyncio.Future[Reply], UUID, _Resident | None]] = field(default_factory=list)
    # Each wallet the batch writes, with its seq before the batch.
    written: dict[int, tuple[UUID, _Resident, int]] = field(default_factory=dict)
    # Final state of each written wallet: (resident, balance, seq, updated_at_us).
    finals: list[tuple[_Resident, int, int, int]] = field(default_factory=list)
    touched_wallets: set[int] = field(default_factory=set)  # wallet ids as ints
    added_keys: list[tuple[UUID, str]] = field(default_factory=list)
    added_create_keys: list[str] = field(default_factory=list)
    commands: int = 0


_Inflight = tuple["asyncio.Task[bool]", _Prepared]


class Shard:
    def __init__(
        self,
        index: int,
        log: WalletLog,
        limits: EngineLimits,
        clock_us: Callable[[], int],
        observer: EngineObserver,
    ) -> None:
        self.index = index
        self._log = log
        self._limits = limits
        self._clock_us = clock_us
        self._observer = observer
        self._mailbox: deque[Command] = deque()
        self._wakeup = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        # Insertion-ordered plain dict used as an LRU: a use re-inserts the wallet at the
        # end; eviction takes from the front (an OrderedDict costs ~180 B more per entry).
        # Keyed by the id's 128-bit int: hashed in C, and no UUID object kept per wallet
        # (asyncpg's UUIDs also grow a cached int when hashed). ~250 B per resident wallet.
        self._residents: dict[int, _Resident] = {}
        self._keys: OrderedDict[tuple[UUID, str], OperationRecord] = OrderedDict()
        self._create_keys: OrderedDict[str, _CreationKey] = OrderedDict()

    # -- outside interface -------------------------------------------------------------

    def start(self) -> None:
        require(self._task is None, "shard started twice")
        self._task = asyncio.create_task(self._run(), name=f"walletd-shard-{self.index}")
        self._task.add_done_callback(self._report_end)

    async def stop(self) -> None:
        """Stop accepting, answer every accepted command, then return."""
        self._stopping = True
        self._wakeup.set()
        if self._task is not None:
            await self._task

    @property
    def task(self) -> asyncio.Task[None] | None:
        return self._task

    def submit(self, command: Command) -> None:
        if self._stopping:
            raise EngineStopping(f"shard {self.index} is stopping")
        if len(self._mailbox) >= self._limits.mailbox_commands_max:
            raise EngineOverloaded(f"shard {self.index} mailbox is full")
        self._mailbox.append(command)
        self._wakeup.set()

    def read_committed(self, wallet_id: UUID) -> WalletView | None:
        """The committed view of a resident wallet, or None when it is not resident.

        Safe without the mailbox: the engine runs on one event loop, and committed state
        changes only when a batch commits.
        """
        residents = self._residents
        wid = wallet_id.int
        resident = residents.get(wid)
        if resident is None or resident.seq == _NOT_COMMITTED:
            return None
        residents[wid] = residents.pop(wid)  # a read is a use, for passivation
        return resident.committed_view(wallet_id)

    def warm(self, records: list[WalletRecord]) -> int:
        """Make stored wallets resident before serving; returns how many were added.

        Only before ``start``: the loop is the only writer of residents once it runs.
        Stops at the resident bound, so warm-up never evicts anything.
        """
        require(self._task is None, "warm-up after the shard started")
        bound = self._limits.resident_wallets_per_shard_max
        added = 0
        for record in records:
            if len(self._residents) >= bound:
                break
            wid = record.wallet_id.int
            if wid not in self._residents:
                self._residents[wid] = _Resident.loaded(record)
                added += 1
        return added

    @property
    def mailbox_depth(self) -> int:
        return len(self._mailbox)

    @property
    def resident_wallets(self) -> int:
        return len(self._residents)

    def _report_end(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            _log.warning("shard %d: task cancelled", self.index)
        elif (error := task.exception()) is not None:
            _log.critical("shard %d crashed; it refuses new work", self.index, exc_info=error)

    # -- the actor loop ----------------------------------------------------------------

    async def _run(self) -> None:
        inflight: deque[_Inflight] = deque()
        # Commands drained but not yet handed to a commit task: owned by the loop alone.
        holding: list[Command] = []
        depth = self._limits.inflight_batches_max
        try:
            while True:
                if inflight and inflight[0][0].done():
                    if not self._settle_head(inflight):
                        await self._settle_failure(inflight)
                    continue
                if not self._mailbox:
                    if self._stopping and not inflight:
                        break
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                holding = self._drain()
                prepared = await self._prepare(holding)
                # One batch is prepared ahead of the pipeline; it waits here for a slot, and
                # meanwhile the mailbox fills up for the next one (group commit).
                while len(inflight) >= depth and not inflight[0][0].done():
                    await asyncio.wait((inflight[0][0],))
                while inflight and inflight[0][0].done() and self._settle_head(inflight):
                    pass
                if any(task.done() and not task.result() for task, _ in inflight):
                    # A batch this one was applied on top of failed: so does this one.
                    self._fail(prepared, REASON_PREVIOUS_FAILED)
                    self._forget(prepared)
                    holding = []
                    await self._settle_failure(inflight)
                    continue
                previous = inflight[-1][0] if inflight else None
                task = asyncio.create_task(self._commit(prepared, previous))
                # Wake the loop when a commit ends, so it is settled (and after a failure
                # its wallets forgotten) before anything else is prepared.
                task.add_done_callback(lambda _task: self._wakeup.set())
                inflight.append((task, prepared))
                holding = []
                self._evict_idle()
        except BaseException:
            self._stopping = True
            self._fail_everything(inflight, holding)
            raise

    def _drain(self) -> list[Command]:
        count = min(len(self._mailbox), self._limits.batch_ops_max)
        popleft = self._mailbox.popleft
        return [popleft() for _ in range(count)]

    @staticmethod
    def _settle_head(inflight: deque[_Inflight]) -> bool:
        """Pop the oldest batch, which has finished; whether it committed.

        Re-raises what the commit task raised: only a broken invariant gets there.
        """
        task, _prepared = inflight[0]
        if not task.result():
            return False
        inflight.popleft()
        return True

    async def _settle_failure(self, inflight: deque[_Inflight]) -> None:
        """A commit failed: wait out the batches behind it, then forget all they touched.

        Each of them fails too (it waits for its predecessor), but its append may still be
        running; re-reading before it ends could read a state it is about to change.
        """
        await asyncio.wait([task for task, _ in inflight])
        while inflight:
            task, prepared = inflight.popleft()
            task.result()  # a broken invariant still crashes the shard
            self._forget(prepared)

    def _fail(self, prepared: _Prepared, reason: str) -> None:
        """Answer every command of the batch with 503; callable from the commit task.

        The wallets it touched are marked not committed before anyone is answered, so a
        caller who retries at once is not served the fast-path read of a wallet whose
        stored state is unknown: the read goes through the mailbox, behind the loop's
        forgetting and re-reading them.
        """
        for wid in prepared.touched_wallets:
            resident = self._residents.get(wid)
            if resident is not None:
                resident.seq = _NOT_COMMITTED
        for future, _reply in prepared.replies:
            if not future.done():
                future.set_result(_UNAVAILABLE)
        for future, _wallet_id, _resident in prepared.reads:
            if not future.done():
                future.set_result(_UNAVAILABLE)
        if prepared.commands:
            self._observer.batch_failed(self.index, prepared.commands, reason)

    def _forget(self, prepared: _Prepared) -> None:
        """Drop what a failed batch touched, so it is re-read from storage before use."""
        for wid in prepared.touched_wallets:
            self._residents.pop(wid, None)
        for key in prepared.added_keys:
            self._keys.pop(key, None)
        for create_key in prepared.added_create_keys:
            self._create_keys.pop(create_key, None)

    def _fail_everything(self, inflight: deque[_Inflight], holding: list[Command]) -> None:
        for task, prepared in inflight:
            task.cancel()
            self._fail(prepared, REASON_SHARD_CRASHED)
        failed = 0
        for command in holding:
            if not command.reply.done():
                command.reply.set_result(_UNAVAILABLE)
                failed += 1
        while self._mailbox:
            future = self._mailbox.popleft().reply
            if not future.done():
                future.set_result(_UNAVAILABLE)
                failed += 1
        if failed:
            self._observer.batch_failed(self.index, failed, REASON_SHARD_CRASHED)

    # -- prepare: load, then apply -----------------------------------------------------

    async def _prepare(self, commands: list[Command]) -> _Prepared:
        prepared = _Prepared(commands=len(commands))
        try:
            await self._load_missing(commands)
        except Exception as error:  # any storage failure: nothing was applied
            _log.warning("shard %d: load failed: %r", self.index, error)
            # A 503 does not depend on the batches ahead of it, so it is sent at once.
            for command in commands:
                if not command.reply.done():
                    command.reply.set_result(_UNAVAILABLE)
            self._observer.batch_failed(self.index, len(commands), REASON_LOAD_FAILED)
            return _Prepared()
        # No await from here to the end: applying is atomic with respect to the commit task.
        for command in commands:
            if isinstance(command, ApplyOperation):
                reply = self._apply_operation(command, prepared)
            elif isinstance(command, TransferLeg):
                reply = self._apply_transfer_leg(command, prepared)
            elif isinstance(command, CreateWallet):
                reply = self._create_wallet(command, prepared)
            else:
                wallet_id = command.wallet_id
                resident = self._residents.get(wallet_id.int)
                prepared.reads.append((command.reply, wallet_id, resident))
                continue
            prepared.replies.append((command.reply, reply))
        self._write_snapshots(prepared)
        return prepared

    async def _load_missing(self, commands: list[Command]) -> None:
        wallet_ids: set[UUID] = set()
        op_keys: set[tuple[UUID, str]] = set()
        create_keys: set[str] = set()
        for command in commands:
            if command.wallet_id.int not in self._residents:
                wallet_ids.add(command.wallet_id)
            if isinstance(command, ApplyOperation) and command.idempotency_key is not None:
                key = (command.wallet_id, command.idempotency_key)
                if key not in self._keys:
                    op_keys.add(key)
            elif isinstance(command, TransferLeg):
                key = (command.wallet_id, command.key)
                if key not in self._keys:
                    op_keys.add(key)
            elif (
                isinstance(command, CreateWallet)
                and command.idempotency_key is not None
                and command.idempotency_key not in self._create_keys
            ):
                create_keys.add(command.idempotency_key)
        timeout = self._limits.load_timeout_s
        if wallet_ids:
            records = await asyncio.wait_for(self._log.load_wallets(list(wallet_ids)), timeout)
            loaded = 0
            for wallet_id, record in records.items():
                # Only the loop adds residents, so none appeared during the await; the check
                # keeps a stale row from ever replacing a resident (memory is newer).
                wid = wallet_id.int
                if wid not in self._residents:
                    self._residents[wid] = _Resident.loaded(record)
                    loaded += 1
            if loaded:
                self._observer.wallets_loaded(self.index, loaded)
        if op_keys:
            found_ops = await asyncio.wait_for(self._log.find_operations(list(op_keys)), timeout)
            for key, op in found_ops.items():
                self._remember_key(key, op)
        if create_keys:
            found = await asyncio.wait_for(
                self._log.find_wallets_by_create_key(list(create_keys)), timeout
            )
            for create_key, record in found.items():
                self._remember_create_key(
                    create_key,
                    _CreationKey(record.wallet_id, record.create_fingerprint, record.created_at_us),
                )

    def _apply_operation(self, command: ApplyOperation, prepared: _Prepared) -> Reply:
        return self._move(
            command.wallet_id, command.kind, command.amount, command.idempotency_key, prepared
        )

    def _apply_transfer_leg(self, command: TransferLeg, prepared: _Prepared) -> Reply:
        """A leg moves money like a deposit or withdrawal, and opens or closes its transfer
        in the same batch; a replayed leg (its key is logged) writes nothing."""
        transfer = command.transfer
        reply = self._move(command.wallet_id, command.kind, transfer.amount, command.key, prepared)
        if reply.outcome is not Outcome.OK or reply.replayed:
            return reply
        assert reply.wallet is not None
        now_us = reply.wallet.updated_at_us
        if command.closes_as is None:
            prepared.batch.new_transfers.append(
                transfer._replace(created_at_us=now_us, updated_at_us=now_us)
            )
        else:
            prepared.batch.transfer_updates.append(
                TransferUpdate(transfer.transfer_id, command.closes_as, command.failure_code,
                               now_us)
            )  # fmt: skip
        return reply

    def _move(
        self,
        wallet_id: UUID,
        kind: OperationKind,
        amount: int,
        key: str | None,
        prepared: _Prepared,
    ) -> Reply:
        residents = self._residents
        wid = wallet_id.int
        resident = residents.get(wid)
        if resident is None:
            return Reply(Outcome.WALLET_NOT_FOUND)
        if key is not None:
            earlier = self._keys.get((wallet_id, key))
            if earlier is not None:
                return self._replay_operation(kind, amount, earlier, resident)
        pending = resident.pending
        balance_before = resident.balance if pending is None else pending.balance
        if kind not in CREDIT_KINDS:
            if amount > balance_before:
                return Reply(Outcome.INSUFFICIENT_FUNDS, balance_seen=balance_before)
            balance = balance_before - amount
        else:
            if balance_before + amount > BALANCE_MINOR_MAX:
                return Reply(Outcome.BALANCE_LIMIT_EXCEEDED, balance_seen=balance_before)
            balance = balance_before + amount
        require(0 <= balance <= BALANCE_MINOR_MAX, "balance out of range after apply")
        if pending is None:
            pending = resident.pending = _Pending(
                resident.balance, resident.seq, resident.updated_at_us
            )
        if wid not in prepared.written:
            prepared.written[wid] = (wallet_id, resident, pending.seq)
            prepared.touched_wallets.add(wid)
            residents[wid] = residents.pop(wid)  # a use, for LRU passivation
        now_us = max(self._clock_us(), pending.updated_at_us)
        seq = pending.seq + 1
        pending.balance = balance
        pending.seq = seq
        pending.updated_at_us = now_us
        record = OperationRecord(wallet_id, seq, kind, amount, balance, key, now_us)
        prepared.batch.operations.append(record)
        if key is not None:
            self._remember_key((wallet_id, key), record)
            prepared.added_keys.append((wallet_id, key))
        return Reply(
            Outcome.OK, WalletView(wallet_id, balance, seq, resident.created_at_us, now_us)
        )

    @staticmethod
    def _replay_operation(
        kind: OperationKind, amount: int, earlier: OperationRecord, resident: _Resident
    ) -> Reply:
        if earlier.kind is not kind or earlier.amount != amount:
            return Reply(Outcome.IDEMPOTENCY_KEY_REUSED)
        view = WalletView(
            earlier.wallet_id,
            earlier.balance_after,
            earlier.seq,
            resident.created_at_us,
            earlier.created_at_us,
        )
        return Reply(Outcome.OK, view, replayed=True)

    def _create_wallet(self, command: CreateWallet, prepared: _Prepared) -> Reply:
        wallet_id = command.wallet_id
        key = command.idempotency_key
        if key is not None:
            earlier = self._create_keys.get(key)
            if earlier is not None:
                if earlier.wallet_id != wallet_id or earlier.fingerprint != command.fingerprint:
                    return Reply(Outcome.IDEMPOTENCY_KEY_REUSED)
                created = earlier.created_at_us
                return Reply(
                    Outcome.CREATED, WalletView(wallet_id, 0, 0, created, created), replayed=True
                )
        wid = wallet_id.int
        if wid in self._residents:
            return Reply(Outcome.WALLET_ALREADY_EXISTS)
        now_us = self._clock_us()
        self._residents[wid] = _Resident.being_created(now_us)
        prepared.touched_wallets.add(wid)
        prepared.batch.new_wallets.append(NewWallet(wallet_id, now_us, key, command.fingerprint))
        if key is not None:
            self._remember_create_key(key, _CreationKey(wallet_id, command.fingerprint, now_us))
            prepared.added_create_keys.append(key)
        return Reply(Outcome.CREATED, WalletView(wallet_id, 0, 0, now_us, now_us))

    @staticmethod
    def _write_snapshots(prepared: _Prepared) -> None:
        """The snapshot row of each written wallet: its pending state at the batch's end."""
        snapshots = prepared.batch.snapshots
        finals = prepared.finals
        for wallet_id, resident, prev_seq in prepared.written.values():
            pending = resident.pending
            assert pending is not None
            snapshots.append(
                SnapshotUpdate(wallet_id, prev_seq, pending.seq, pending.balance,
                               pending.updated_at_us)
            )  # fmt: skip
            finals.append((resident, pending.balance, pending.seq, pending.updated_at_us))

    # -- commit ------------------------------------------------------------------------

    async def _commit(self, prepared: _Prepared, previous: asyncio.Task[bool] | None) -> bool:
        """Write the batch, wait for the batch before it, then promote and answer.

        Returns False when this write or an earlier one failed. Batches of one shard are
        written concurrently (up to ``inflight_batches_max``) but take effect in order:
        PostgreSQL makes a later batch's snapshot move wait for the row lock of an earlier
        one on the same wallet, and its seq fencing refuses it if the earlier one rolled
        back; in memory, a batch is promoted and answered only after its predecessor.

        Any exception from storage counts as a failed commit of unknown outcome: the batch
        is answered 503 and its wallets re-read, never left unanswered. Only a broken
        invariant in promote escapes, and the loop turns it into a shard crash.
        """
        batch = prepared.batch
        reason: str | None = None
        started = time.perf_counter()
        if not batch.is_empty():
            reason = await self._append(batch, previous)
        if previous is not None:
            await asyncio.wait((previous,))
            if not _succeeded(previous):
                reason = reason or REASON_PREVIOUS_FAILED
        if reason is not None:
            self._fail(prepared, reason)
            return False
        if not batch.is_empty():
            self._observer.batch_committed(
                self.index,
                len(batch.operations),
                prepared.commands,
                time.perf_counter() - started,
            )
            self._promote(prepared)
        self._resolve(prepared)
        return True

    async def _append(self, batch: Batch, previous: asyncio.Task[bool] | None) -> str | None:
        """Store the batch; None once stored, else the reason it failed.

        A batch sent while its predecessor is still on the way can reach PostgreSQL first;
        storage then refuses it as ``PredecessorPending`` without writing anything, and it
        is written again, once, after the predecessor has committed.
        """
        for attempt in (1, 2):
            try:
                await asyncio.wait_for(self._log.append_batch(batch), self._limits.commit_timeout_s)
                return None
            except PredecessorPending as error:
                if previous is None or attempt == 2:
                    _log.warning("shard %d: commit failed: %r", self.index, error)
                    return REASON_COMMIT_FAILED
                await asyncio.wait((previous,))
                if not _succeeded(previous):
                    return REASON_PREVIOUS_FAILED
            except Exception as error:
                reason = _failure_reason(error)
                if reason == REASON_COMMIT_UNKNOWN and not isinstance(error, StorageError):
                    _log.error("shard %d: commit raised", self.index, exc_info=error)
                else:
                    _log.warning("shard %d: commit failed: %r", self.index, error)
                return reason
        raise AssertionError("unreachable")

    def _promote(self, prepared: _Prepared) -> None:
        for new in prepared.batch.new_wallets:
            resident = self._residents.get(new.wallet_id.int)
            if resident is not None and resident.seq == _NOT_COMMITTED:
                resident.seq = 0
                _drop_pending_if_caught_up(resident)
        for resident, balance, seq, updated_at_us in prepared.finals:
            require(seq > resident.seq, "commits of one wallet must be in order")
            resident.balance = balance
            resident.seq = seq
            resident.updated_at_us = updated_at_us
            _drop_pending_if_caught_up(resident)

    def _resolve(self, prepared: _Prepared) -> None:
        for future, reply in prepared.replies:
            if not future.done():  # a caller that went away still had its command counted
                future.set_result(reply)
        for future, wallet_id, resident in prepared.reads:
            if not future.done():
                future.set_result(self._committed_reply(wallet_id, resident))

    def _committed_reply(self, wallet_id: UUID, resident: _Resident | None) -> Reply:
        if resident is None:  # not there when applied; perhaps created later in the batch
            resident = self._residents.get(wallet_id.int)
        if resident is None or resident.seq == _NOT_COMMITTED:
            return Reply(Outcome.WALLET_NOT_FOUND)
        return Reply(Outcome.OK, resident.committed_view(wallet_id))

    def _evict_idle(self) -> None:
        """Passivation: drop the least recently used clean wallets past the resident bound.

        Called by the loop only, right after a hand-off to the commit task, so no batch is
        being prepared (a prepare must find the residents it checked before its load). Dirty
        wallets (pending changes of the committing batch) stay: the overshoot is bounded by
        the wallets of two batches.
        """
        residents = self._residents
        bound = self._limits.resident_wallets_per_shard_max
        if len(residents) <= bound:
            return
        # Evict down to a little under the bound, so the scan from the front of the dict
        # (which steps over the holes re-insertions leave) is paid once per chunk.
        target = len(residents) - bound + bound // 16
        victims: list[int] = []
        # Dirty wallets are the most recently used, near the end: the scan stops early.
        scan_max = target + 2 * self._limits.batch_ops_max
        for scanned, (wallet_id, resident) in enumerate(residents.items()):
            if len(victims) >= target or scanned >= scan_max:
                break
            if not resident.is_dirty():
                victims.append(wallet_id)
        for wallet_id in victims:
            del residents[wallet_id]
        if victims:
            self._observer.wallets_evicted(self.index, len(victims))

    # -- bounded caches ----------------------------------------------------------------

    def _remember_key(self, key: tuple[UUID, str], record: OperationRecord) -> None:
        self._keys[key] = record
        self._keys.move_to_end(key)
        while len(self._keys) > self._limits.idempotency_keys_per_shard_max:
            self._keys.popitem(last=False)

    def _remember_create_key(self, key: str, entry: _CreationKey) -> None:
        self._create_keys[key] = entry
        self._create_keys.move_to_end(key)
        while len(self._create_keys) > self._limits.idempotency_keys_per_shard_max:
            self._create_keys.popitem(last=False)


def _succeeded(task: asyncio.Task[bool]) -> bool:
    return not task.cancelled() and task.exception() is None and task.result()


def _drop_pending_if_caught_up(resident: _Resident) -> None:
    pending = resident.pending
    if pending is not None and pending.seq == resident.seq:
        resident.pending = None


def _failure_reason(error: Exception) -> str:
    if isinstance(error, TimeoutError):
        return REASON_COMMIT_TIMEOUT
    if isinstance(error, CommitOutcomeUnknown) or not isinstance(error, StorageError):
        return REASON_COMMIT_UNKNOWN
    return REASON_COMMIT_FAILED
