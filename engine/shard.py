"""A shard: one asyncio task that is the only writer of the wallets hashed to it.

Batch lifecycle (two batches in flight at most: one committing, one being prepared)::

    submit ──▶ mailbox (deque, ≤ mailbox_commands_max; full → EngineOverloaded at once)
                  │ drain ≤ batch_ops_max (everything that queued while N committed)
                  ▼
              prepare N+1: load missing wallets and unknown idempotency keys (≤ 3 queries;
                  │        a failed load answers N+1 with 503 at once, nothing applied),
                  │        then apply each command in order to the *pending* state
                  ▼
              wait for commit N ──failed──▶ answer N+1 with 503, forget what N and N+1
                  │ ok                       touched (wallets, keys), go on
                  ▼
              hand N+1 to its commit task; evict idle clean wallets past the resident bound
                  │
                  ▼
              commit N+1 (its own task): one append_batch (log rows + snapshots, one
                  │        transaction), bounded by commit_timeout_s
                  ├─ committed ──▶ promote pending → committed, then resolve every reply
                  └─ failed ─────▶ resolve every reply with UNAVAILABLE; the loop forgets
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
)
from walletd.engine.errors import EngineOverloaded, EngineStopping
from walletd.engine.invariants import require
from walletd.engine.limits import EngineLimits
from walletd.engine.model import (
    Batch,
    NewWallet,
    OperationKind,
    OperationRecord,
    SnapshotUpdate,
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
from walletd.engine.ports import CommitOutcomeUnknown, StorageError, WalletLog

__all__ = ["Shard"]

_log = logging.getLogger("walletd.engine")

_UNAVAILABLE = Reply(Outcome.UNAVAILABLE)


class _Resident:
    """A wallet held in memory: its committed state and its pending (applied, unacked) state."""

    __slots__ = (
        "balance",
        "committed",
        "committed_balance",
        "committed_seq",
        "committed_updated_at_us",
        "created_at_us",
        "seq",
        "updated_at_us",
        "wallet_id",
    )

    def __init__(self, record: WalletRecord, *, committed: bool) -> None:
        self.wallet_id = record.wallet_id
        self.created_at_us = record.created_at_us
        self.committed = committed
        self.committed_balance = record.balance
        self.committed_seq = record.seq
        self.committed_updated_at_us = record.updated_at_us
        self.balance = record.balance
        self.seq = record.seq
        self.updated_at_us = record.updated_at_us

    def is_dirty(self) -> bool:
        return not self.committed or self.seq != self.committed_seq

    def pending_view(self) -> WalletView:
        return WalletView(
            self.wallet_id, self.balance, self.seq, self.created_at_us, self.updated_at_us
        )

    def committed_view(self) -> WalletView:
        return WalletView(
            self.wallet_id,
            self.committed_balance,
            self.committed_seq,
            self.created_at_us,
            self.committed_updated_at_us,
        )


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
    # Final state of each wallet written by the batch: (balance, seq, updated_at_us).
    finals: dict[UUID, tuple[_Resident, int, int, int]] = field(default_factory=dict)
    touched_wallets: set[UUID] = field(default_factory=set)
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
        self._residents: OrderedDict[UUID, _Resident] = OrderedDict()
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
        resident = self._residents.get(wallet_id)
        if resident is None or not resident.committed:
            return None
        self._residents.move_to_end(wallet_id)  # a read is a use, for LRU passivation
        return resident.committed_view()

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
        inflight: _Inflight | None = None
        # Commands drained but not yet handed to a commit task: owned by the loop alone.
        holding: list[Command] = []
        try:
            while True:
                if inflight is not None and inflight[0].done():
                    self._settle(inflight)
                    inflight = None
                if not self._mailbox:
                    if self._stopping:
                        break
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                holding = self._drain()
                prepared = await self._prepare(holding)
                if inflight is not None:
                    await asyncio.wait((inflight[0],))
                    committed = self._settle(inflight)
                    inflight = None
                    if not committed:
                        self._fail(prepared, REASON_PREVIOUS_FAILED)
                        self._forget(prepared)
                        holding = []
                        continue
                task = asyncio.create_task(self._commit(prepared))
                # Wake the loop when the commit ends, so a failure is settled (its wallets
                # forgotten) before anything else is prepared, even when the mailbox is idle.
                task.add_done_callback(lambda _task: self._wakeup.set())
                inflight = (task, prepared)
                holding = []
                self._evict_idle()
            if inflight is not None:
                await asyncio.wait((inflight[0],))
                self._settle(inflight)
        except BaseException:
            self._stopping = True
            self._fail_everything(inflight, holding)
            raise

    def _drain(self) -> list[Command]:
        count = min(len(self._mailbox), self._limits.batch_ops_max)
        popleft = self._mailbox.popleft
        return [popleft() for _ in range(count)]

    def _settle(self, inflight: _Inflight) -> bool:
        """Whether the commit succeeded; after a failure, forget what the batch touched.

        Re-raises what the commit task raised: only a broken invariant gets there.
        """
        task, prepared = inflight
        committed = task.result()
        if not committed:
            self._forget(prepared)
        return committed

    def _fail(self, prepared: _Prepared, reason: str) -> None:
        """Answer every command of the batch with 503; callable from the commit task.

        The wallets it touched are marked not committed before anyone is answered, so a
        caller who retries at once is not served the fast-path read of a wallet whose
        stored state is unknown: the read goes through the mailbox, behind the loop's
        forgetting and re-reading them.
        """
        for wallet_id in prepared.touched_wallets:
            resident = self._residents.get(wallet_id)
            if resident is not None:
                resident.committed = False
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
        for wallet_id in prepared.touched_wallets:
            self._residents.pop(wallet_id, None)
        for key in prepared.added_keys:
            self._keys.pop(key, None)
        for create_key in prepared.added_create_keys:
            self._create_keys.pop(create_key, None)

    def _fail_everything(self, inflight: _Inflight | None, holding: list[Command]) -> None:
        if inflight is not None:
            inflight[0].cancel()
            self._fail(inflight[1], REASON_SHARD_CRASHED)
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
            elif isinstance(command, CreateWallet):
                reply = self._create_wallet(command, prepared)
            else:
                wallet_id = command.wallet_id
                prepared.reads.append((command.reply, wallet_id, self._residents.get(wallet_id)))
                continue
            prepared.replies.append((command.reply, reply))
        self._write_snapshots(prepared)
        return prepared

    async def _load_missing(self, commands: list[Command]) -> None:
        wallet_ids: set[UUID] = set()
        op_keys: set[tuple[UUID, str]] = set()
        create_keys: set[str] = set()
        for command in commands:
            if command.wallet_id not in self._residents:
                wallet_ids.add(command.wallet_id)
            if isinstance(command, ApplyOperation) and command.idempotency_key is not None:
                key = (command.wallet_id, command.idempotency_key)
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
                if wallet_id not in self._residents:
                    self._residents[wallet_id] = _Resident(record, committed=True)
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
        wallet_id = command.wallet_id
        resident = self._residents.get(wallet_id)
        if resident is None:
            return Reply(Outcome.WALLET_NOT_FOUND)
        self._residents.move_to_end(wallet_id)
        key = command.idempotency_key
        if key is not None:
            earlier = self._keys.get((wallet_id, key))
            if earlier is not None:
                return self._replay_operation(command, earlier, resident)
        if command.kind is OperationKind.WITHDRAW:
            if command.amount > resident.balance:
                return Reply(Outcome.INSUFFICIENT_FUNDS, balance_seen=resident.balance)
            balance = resident.balance - command.amount
        else:
            if resident.balance + command.amount > BALANCE_MINOR_MAX:
                return Reply(Outcome.BALANCE_LIMIT_EXCEEDED, balance_seen=resident.balance)
            balance = resident.balance + command.amount
        require(0 <= balance <= BALANCE_MINOR_MAX, "balance out of range after apply")
        if wallet_id not in prepared.finals:
            prepared.touched_wallets.add(wallet_id)
            prepared.batch.snapshots.append(
                SnapshotUpdate(wallet_id, resident.seq, 0, 0, 0)  # completed at the end
            )
        now_us = max(self._clock_us(), resident.updated_at_us)
        resident.balance = balance
        resident.seq += 1
        resident.updated_at_us = now_us
        record = OperationRecord(
            wallet_id, resident.seq, command.kind, command.amount, balance, key, now_us
        )
        prepared.batch.operations.append(record)
        prepared.finals[wallet_id] = (resident, balance, resident.seq, now_us)
        if key is not None:
            self._remember_key((wallet_id, key), record)
            prepared.added_keys.append((wallet_id, key))
        return Reply(Outcome.OK, resident.pending_view())

    @staticmethod
    def _replay_operation(
        command: ApplyOperation, earlier: OperationRecord, resident: _Resident
    ) -> Reply:
        if earlier.kind is not command.kind or earlier.amount != command.amount:
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
        if wallet_id in self._residents:
            return Reply(Outcome.WALLET_ALREADY_EXISTS)
        now_us = self._clock_us()
        record = WalletRecord(wallet_id, 0, 0, now_us, now_us, key, command.fingerprint)
        self._residents[wallet_id] = _Resident(record, committed=False)
        prepared.touched_wallets.add(wallet_id)
        prepared.batch.new_wallets.append(NewWallet(wallet_id, now_us, key, command.fingerprint))
        if key is not None:
            self._remember_create_key(key, _CreationKey(wallet_id, command.fingerprint, now_us))
            prepared.added_create_keys.append(key)
        return Reply(Outcome.CREATED, record.view())

    def _write_snapshots(self, prepared: _Prepared) -> None:
        snapshots = prepared.batch.snapshots
        for index, placeholder in enumerate(snapshots):
            _resident, balance, seq, updated_at_us = prepared.finals[placeholder.wallet_id]
            snapshots[index] = SnapshotUpdate(
                placeholder.wallet_id, placeholder.prev_seq, seq, balance, updated_at_us
            )

    # -- commit ------------------------------------------------------------------------

    async def _commit(self, prepared: _Prepared) -> bool:
        """Write the batch, then promote and answer; False when the write failed.

        Any exception from storage counts as a failed commit of unknown outcome: the batch
        is answered 503 and its wallets re-read, never left unanswered. Only a broken
        invariant in promote escapes, and the loop turns it into a shard crash.
        """
        batch = prepared.batch
        if not batch.is_empty():
            started = time.perf_counter()
            try:
                await asyncio.wait_for(self._log.append_batch(batch), self._limits.commit_timeout_s)
            except Exception as error:
                reason = _failure_reason(error)
                if reason == REASON_COMMIT_UNKNOWN and not isinstance(error, StorageError):
                    _log.error("shard %d: commit raised", self.index, exc_info=error)
                else:
                    _log.warning("shard %d: commit failed: %r", self.index, error)
                self._fail(prepared, reason)
                return False
            self._observer.batch_committed(
                self.index,
                len(batch.operations),
                prepared.commands,
                time.perf_counter() - started,
            )
            self._promote(prepared)
        self._resolve(prepared)
        return True

    def _promote(self, prepared: _Prepared) -> None:
        for new in prepared.batch.new_wallets:
            resident = self._residents.get(new.wallet_id)
            if resident is not None:
                resident.committed = True
        for resident, balance, seq, updated_at_us in prepared.finals.values():
            require(seq > resident.committed_seq, "commits of one wallet must be in order")
            resident.committed = True
            resident.committed_balance = balance
            resident.committed_seq = seq
            resident.committed_updated_at_us = updated_at_us

    def _resolve(self, prepared: _Prepared) -> None:
        for future, reply in prepared.replies:
            if not future.done():  # a caller that went away still had its command counted
                future.set_result(reply)
        for future, wallet_id, resident in prepared.reads:
            if not future.done():
                future.set_result(self._committed_reply(wallet_id, resident))

    def _committed_reply(self, wallet_id: UUID, resident: _Resident | None) -> Reply:
        if resident is None:  # not there when applied; perhaps created later in the batch
            resident = self._residents.get(wallet_id)
        if resident is None or not resident.committed:
            return Reply(Outcome.WALLET_NOT_FOUND)
        return Reply(Outcome.OK, resident.committed_view())

    def _evict_idle(self) -> None:
        """Passivation: drop the least recently used clean wallets past the resident bound.

        Called by the loop only, right after a hand-off to the commit task, so no batch is
        being prepared (a prepare must find the residents it checked before its load). Dirty
        wallets (pending changes of the committing batch) stay: the overshoot is bounded by
        the wallets of two batches.
        """
        excess = len(self._residents) - self._limits.resident_wallets_per_shard_max
        if excess <= 0:
            return
        # Dirty wallets are rotated to the back; the budget bounds the scan.
        budget = 2 * self._limits.batch_ops_max
        evicted = 0
        while excess > 0 and budget > 0:
            wallet_id, resident = next(iter(self._residents.items()))
            if resident.is_dirty():
                self._residents.move_to_end(wallet_id)
                budget -= 1
                continue
            del self._residents[wallet_id]
            excess -= 1
            evicted += 1
        if evicted:
            self._observer.wallets_evicted(self.index, evicted)

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


def _failure_reason(error: Exception) -> str:
    if isinstance(error, TimeoutError):
        return REASON_COMMIT_TIMEOUT
    if isinstance(error, CommitOutcomeUnknown) or not isinstance(error, StorageError):
        return REASON_COMMIT_UNKNOWN
    return REASON_COMMIT_FAILED
