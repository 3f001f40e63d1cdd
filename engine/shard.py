"""A shard: one asyncio task that is the only writer of the wallets hashed to it.

Batch lifecycle (up to ``inflight_batches_max`` batches committing, one more prepared)::

    submit ──▶ mailbox (deque, ≤ mailbox_commands_max; full → EngineOverloaded at once)
                  │ drain ≤ batch_ops_max (everything that queued meanwhile)
                  ▼
              prepare: load missing wallets and unknown idempotency keys (≤ 3 queries;
                  │     a failed load answers the batch with 503 at once, nothing applied),
                  │     then the ledger (engine/ledger.py) decides each command in order on
                  │     the *pending* state
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
                  ├─ stored, predecessor failed ──▶ promote, resolve the true replies; 503
                  │              for those resting on the failed batch's pending state
                  └─ failed ───▶ resolve every reply with UNAVAILABLE; the loop forgets
                                 the touched wallets so they are re-read from storage

The rules live in the pure ledger state machine (engine/ledger.py); this module is the
pipeline around it: mailbox, drain, load, commit tasks, settling failures, answering.

Who mutates what: only the loop changes residents, pending state and key caches; the commit
task only promotes committed state (or marks it unknown) and resolves futures. So memory is
never ahead of the database: committed fields change only after a commit returned, and
pending state that rode on a failed commit is forgotten before the next batch is prepared.

Batch size adapts by itself: at idle a batch holds the one command that arrived; under load
the mailbox fills while a commit is in flight and the next batch takes it all (group commit).
Replies, refusals included, are resolved only once every batch before them has ended.

If the loop itself fails (a broken invariant: a bug), every command it holds — committing,
prepared, queued — is answered 503 and the shard refuses new work; nothing is left hanging.
The engine (engine/router.py) supervises it: a fresh shard with empty memory takes its place,
within a bounded restart rate.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from uuid import UUID

from walletd.engine.commands import Command, Outcome, Reply
from walletd.engine.errors import EngineOverloaded, EngineStopping
from walletd.engine.invariants import require
from walletd.engine.ledger import Applied, Ledger
from walletd.engine.limits import EngineLimits
from walletd.engine.model import Batch, WalletRecord, WalletView
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


class _Open:
    """A batch handed to a commit task: its commands (with their futures) and what the
    ledger decided for them."""

    __slots__ = ("applied", "commands")

    def __init__(self, commands: list[Command], applied: Applied) -> None:
        self.commands = commands
        self.applied = applied


_Inflight = tuple["asyncio.Task[bool]", _Open]


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
        self._observer = observer
        self._ledger = Ledger(limits, clock_us)
        self._mailbox: deque[Command] = deque()
        self._wakeup = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

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
        return self._ledger.read_committed(wallet_id)

    def warm(self, records: list[WalletRecord]) -> int:
        """Make stored wallets resident before serving; returns how many were added.

        Only before ``start``: the loop is the only writer of residents once it runs.
        Stops at the resident bound, so warm-up never evicts anything.
        """
        require(self._task is None, "warm-up after the shard started")
        return self._ledger.warm(records)

    @property
    def mailbox_depth(self) -> int:
        return len(self._mailbox)

    @property
    def resident_wallets(self) -> int:
        return self._ledger.resident_wallets

    def _report_end(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            _log.warning("shard %d: task cancelled", self.index)
        elif (error := task.exception()) is not None:
            _log.critical(
                "shard %d crashed; everything it held was answered 503", self.index,
                exc_info=error,
            )  # fmt: skip

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
                applied = await self._prepare(holding)
                if applied is None:  # the load failed: already answered 503
                    holding = []
                    continue
                batch = _Open(holding, applied)
                # One batch is prepared ahead of the pipeline; it waits here for a slot, and
                # meanwhile the mailbox fills up for the next one (group commit).
                while len(inflight) >= depth and not inflight[0][0].done():
                    await asyncio.wait((inflight[0][0],))
                while inflight and inflight[0][0].done() and self._settle_head(inflight):
                    pass
                if any(task.done() and not task.result() for task, _ in inflight):
                    # A batch this one was applied on top of failed: so does this one.
                    self._fail(batch, REASON_PREVIOUS_FAILED)
                    self._ledger.forget(applied)
                    holding = []
                    await self._settle_failure(inflight)
                    continue
                previous = inflight[-1][0] if inflight else None
                task = asyncio.create_task(self._commit(batch, previous))
                # Wake the loop when a commit ends, so it is settled (and after a failure
                # its wallets forgotten) before anything else is prepared.
                task.add_done_callback(lambda _task: self._wakeup.set())
                inflight.append((task, batch))
                holding = []
                evicted = self._ledger.evict_idle()
                if evicted:
                    self._observer.wallets_evicted(self.index, evicted)
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
        task, _batch = inflight[0]
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
            task, batch = inflight.popleft()
            task.result()  # a broken invariant still crashes the shard
            self._ledger.forget(batch.applied)

    def _fail(self, batch: _Open, reason: str) -> None:
        """Answer every command of the batch with 503; callable from the commit task.

        The wallets it touched are marked unknown before anyone is answered, so a caller
        who retries at once is not served the fast-path read of a wallet whose stored
        state is unknown: the read goes through the mailbox, behind the loop's forgetting
        and re-reading them.
        """
        self._ledger.unknown(batch.applied)
        self._answer_unavailable(batch.commands, reason)

    def _answer_unavailable(self, commands: Sequence[Command], reason: str) -> None:
        """Answer 503 to each command not answered yet, and count them under ``reason``."""
        answered = 0
        for command in commands:
            future = command.reply
            if not future.done():
                future.set_result(_UNAVAILABLE)
                answered += 1
            elif future.cancelled():  # a caller that went away still had its command counted
                answered += 1
        if answered:
            self._observer.batch_failed(self.index, answered, reason)

    def _fail_everything(self, inflight: deque[_Inflight], holding: list[Command]) -> None:
        for task, batch in inflight:
            task.cancel()
            self._fail(batch, REASON_SHARD_CRASHED)
        self._answer_unavailable(holding, REASON_SHARD_CRASHED)
        mailbox = list(self._mailbox)
        self._mailbox.clear()
        self._answer_unavailable(mailbox, REASON_SHARD_CRASHED)

    # -- prepare: load, then decide ----------------------------------------------------

    async def _prepare(self, commands: list[Command]) -> Applied | None:
        """Load what the commands need, then let the ledger decide them; None when the
        load failed (then every command is answered 503 and nothing was applied)."""
        try:
            await self._load_missing(commands)
        except Exception as error:  # any storage failure: nothing was applied
            _log.warning("shard %d: load failed: %r", self.index, error)
            # A 503 does not depend on the batches ahead of it, so it is sent at once.
            self._answer_unavailable(commands, REASON_LOAD_FAILED)
            return None
        # No await from here on: deciding is atomic with respect to the commit tasks.
        return self._ledger.execute(commands)

    async def _load_missing(self, commands: list[Command]) -> None:
        ledger = self._ledger
        wallet_ids, op_keys, create_keys = ledger.missing(commands)
        timeout = self._limits.load_timeout_s
        if wallet_ids:
            records = await asyncio.wait_for(self._log.load_wallets(list(wallet_ids)), timeout)
            # Only the loop adds residents, so none appeared during the await; the ledger
            # still keeps a stale row from ever replacing a resident (memory is newer).
            loaded = ledger.add_wallets(records.values())
            if loaded:
                self._observer.wallets_loaded(self.index, loaded)
        if op_keys:
            found_ops = await asyncio.wait_for(self._log.find_operations(list(op_keys)), timeout)
            ledger.add_operations(found_ops)
        if create_keys:
            found = await asyncio.wait_for(
                self._log.find_wallets_by_create_key(list(create_keys)), timeout
            )
            ledger.add_creations(found)

    # -- commit ------------------------------------------------------------------------

    async def _commit(self, batch: _Open, previous: asyncio.Task[bool] | None) -> bool:
        """Write the batch, wait for the batch before it, then promote and answer.

        Returns False when this write or an earlier one failed (a batch stored behind a
        failed one still sends the replies known to be true). Batches of one shard are
        written concurrently (up to ``inflight_batches_max``) but take effect in order:
        PostgreSQL makes a later batch's snapshot move wait for the row lock of an earlier
        one on the same wallet, and its seq fencing refuses it if the earlier one rolled
        back; in memory, a batch is promoted and answered only after its predecessor.

        Any exception from storage counts as a failed commit of unknown outcome: the batch
        is answered 503 and its wallets re-read, never left unanswered. Only a broken
        invariant in promote escapes, and the loop turns it into a shard crash.
        """
        applied = batch.applied
        rows = applied.batch
        reason: str | None = None
        started = time.perf_counter()
        if not rows.is_empty():
            reason = await self._append(rows, previous)
        earlier_failed = False
        if previous is not None:
            await asyncio.wait((previous,))
            earlier_failed = not _succeeded(previous)
        if reason is not None:
            self._fail(batch, reason)
            return False
        ledger = self._ledger
        if not rows.is_empty():
            self._observer.batch_committed(
                self.index,
                len(rows.operations),
                len(batch.commands),
                time.perf_counter() - started,
            )
            ledger.committed(applied)
        # Stored (or nothing to store): every reply that walletd knows to be true is sent,
        # even behind a failed batch; only those resting on its state are 503.
        replies = ledger.answers(applied, earlier_failed=earlier_failed)
        for command, reply in zip(batch.commands, replies, strict=True):
            future = command.reply
            if not future.done():  # a caller that went away still had its command counted
                future.set_result(reply)
        if earlier_failed:
            unavailable = sum(reply.outcome is Outcome.UNAVAILABLE for reply in replies)
            if unavailable:
                self._observer.batch_failed(self.index, unavailable, REASON_PREVIOUS_FAILED)
        # False keeps the chain broken: the batches behind this one check their replies too,
        # and the loop re-reads everything the failed batch and this one touched.
        return not earlier_failed

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


def _succeeded(task: asyncio.Task[bool]) -> bool:
    return not task.cancelled() and task.exception() is None and task.result()


def _failure_reason(error: Exception) -> str:
    if isinstance(error, TimeoutError):
        return REASON_COMMIT_TIMEOUT
    if isinstance(error, CommitOutcomeUnknown) or not isinstance(error, StorageError):
        return REASON_COMMIT_UNKNOWN
    return REASON_COMMIT_FAILED
