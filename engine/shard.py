"""A shard: one asyncio task that is the only writer of the wallets hashed to it.

Batch lifecycle (up to ``inflight_batches_max`` batches committing, one more prepared)::

    submit ──▶ mailbox (deque, ≤ mailbox_commands_max operations; full → EngineOverloaded)
                  │ drain ≤ batch_ops_max operations (everything that queued meanwhile;
                  │ a bulk group, at most batch_ops_max, is never split)
                  ▼
              prepare: load missing wallets and unknown idempotency keys (≤ 3 queries,
                  │     a 4th, rare, for reservations that may be stale (ledger.stale_outs);
                  │     a failed load answers the batch with 503 at once, nothing applied),
                  │     then the ledger (engine/ledger.py) decides each command in order on
                  │     the *pending* state
                  ▼
              wait for a free slot ──a batch in flight failed──▶ answer this one with 503,
                  │                  wait for every batch in flight, forget all they touched
                  │               ──a batch in flight was refused──▶ keep this one's commands
                  │                  for isolation (below), unanswered
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
                  │              (predecessor refused: those are kept for isolation instead)
                  ├─ refused (StorageRefused: the rows themselves, nothing written), or
                  │  not written behind a refused batch ──▶ answer nothing: keep every
                  │              command for isolation
                  └─ failed ───▶ resolve every reply with UNAVAILABLE; the loop forgets
                                 the touched wallets so they are re-read from storage

    isolation (the loop, once every batch in flight has ended; nothing else is prepared
    meanwhile; a later batch that rested on none of the kept commands' state may already
    be stored, so they are decided after it — linearizable, as none was answered)::

        kept commands, in order ──▶ prepare + commit them as one batch (re-read state)
             ▲                          ├─ stored ──▶ their true answers
             │ left half, then          ├─ refused, one command ──▶ answered alone:
             │ right half               │      409 STORAGE_REFUSED (503 for a transfer or
             └──── refused, several ◀───┘      hold another driver closed first)
        at most refusal_isolation_commits_max commits; past it, the rest are answered 503
        (nothing of them applied); a failure of unknown outcome answers the rest 503 too

The rules live in the pure ledger state machine (engine/ledger.py); this module is the
pipeline around it: mailbox, drain, load, commit tasks, settling failures, answering.

Who mutates what: only the loop changes residents, pending state and key caches; the commit
task only promotes committed state (or marks it unknown) and resolves futures. So memory is
never ahead of the database: committed fields change only after a commit returned, and
pending state that rode on a failed commit is forgotten before the next batch is prepared.

Batch size adapts by itself: at idle a batch holds the one command that arrived; under load
the mailbox fills while a commit is in flight and the next batch takes it all (group commit).
Replies, refusals included, are resolved only once every batch before them has ended.

Stamps and as-of reads: the ledger stamps each row with the clock when the batch is prepared
(never below the wallet's last stamp), so a batch prepared later is stamped later. The shard
keeps the stamp each batch with rows got (the clock just before ``execute``: every row's is at
least that) from prepare until its rows' fate is known: stored, or surely not written
(refused, failed with an answer, never handed over). A commit of unknown outcome (timeout,
connection lost, cancelled) keeps its stamp for ``commit_timeout_s`` more, the time a
statement the server has not finished may still need. Commands kept for isolation are
prepared again, so they get a new stamp. ``settled(at_us)`` waits until no kept stamp is at or
before ``at_us``: from then on, with the clock past ``at_us``, the log up to ``at_us`` is final
for this shard's wallets (http/routes_v1.py, ``?as_of=``).

If the loop itself fails (a broken invariant: a bug), every command it holds — committing,
prepared, queued — is answered 503 and the shard refuses new work; nothing is left hanging.
The engine (engine/router.py) supervises it: a fresh shard with empty memory takes its place,
within a bounded restart rate.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import deque
from collections.abc import Callable, Sequence
from uuid import UUID

from walletd.engine.commands import ApplyOperations, Command, Outcome, Reply, command_ids
from walletd.engine.errors import EngineOverloaded, EngineStopping
from walletd.engine.invariants import require
from walletd.engine.ledger import Applied, Ledger
from walletd.engine.limits import EngineLimits
from walletd.engine.model import WalletRecord, WalletView
from walletd.engine.observer import (
    REASON_COMMIT_FAILED,
    REASON_COMMIT_TIMEOUT,
    REASON_COMMIT_UNKNOWN,
    REASON_ISOLATION_LIMIT,
    REASON_LOAD_FAILED,
    REASON_PREVIOUS_FAILED,
    REASON_SHARD_CRASHED,
    EngineObserver,
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

__all__ = ["Shard"]

_log = logging.getLogger("walletd.engine")

_UNAVAILABLE = Reply(Outcome.UNAVAILABLE)
# An id as a refusal's text spells it (PostgreSQL's detail, a repr of a row).
_UUID_TEXT = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_STORAGE_REFUSED = Reply(Outcome.STORAGE_REFUSED)
# Not a StorageRefused of the rows' own making: another driver closed the transfer or hold
# first. The caller reads storage to answer (as after any 503 of a leg or a resolution).
_RACES = (TransferNotPending, HoldNotPending)

# Refusals of storage that are answers of their own when a command meets them alone: a
# refund past what its transfer has left (migration "refunds_and_reversals": WD010), a
# second reversal of an operation (its unique index). The caller answers them 409 with
# their own code, as the ledger would had it known (engine/transfers.py, router.py).
_REFUND_EXCEEDS = Reply(Outcome.REFUND_EXCEEDS_TRANSFER)
_ALREADY_REVERSED = Reply(Outcome.ALREADY_REVERSED)
_REVERSED_ONCE_INDEX = "wallet_operations_reversed_once"


def _refused_alone(refusal: StorageRefused | None) -> Reply:
    """The answer of a command that storage refused when it stood alone."""
    if isinstance(refusal, _RACES):
        return _UNAVAILABLE
    if refusal is not None:
        if refusal.sqlstate == "WD010":
            return _REFUND_EXCEEDS
        if refusal.sqlstate == "23505" and _REVERSED_ONCE_INDEX in str(refusal):
            return _ALREADY_REVERSED
    return _STORAGE_REFUSED


# How a commit task ended (its result).
_COMMITTED = 0  # stored; every command answered
_FAILED = 1  # failed, or stored behind a failed batch: 503 sent to what rests on it
_KEPT = 2  # refused, or behind a refused batch: some commands left unanswered in ``kept``

# The reasons a batch's own append wrote nothing for sure, so its commands may be applied
# again: its rows were refused, or it waited for a predecessor that did not commit.
_REFUSED = "refused"


class _Open:
    """A batch handed to a commit task: its commands (with their futures), what the ledger
    decided for them, and, when it ends ``_KEPT``, the commands left for isolation."""

    __slots__ = ("applied", "commands", "kept", "refusal")

    def __init__(self, commands: list[Command], applied: Applied) -> None:
        self.commands = commands
        self.applied = applied
        self.kept: list[Command] = []
        self.refusal: StorageRefused | None = None


_Inflight = tuple["asyncio.Task[int]", _Open]


class _Stamps:
    """The stamps of a shard's batches whose rows' fate is not known yet, by batch (see
    "Stamps" in the module's docstring): at most ``inflight_batches_max`` + 1 prepared
    batches, plus those of unknown outcome waiting out their grace. ``previous``: those of
    the shard this one replaced, while it may still hold any."""

    __slots__ = ("by_batch", "changed", "closed", "previous")

    def __init__(self, previous: _Stamps | None) -> None:
        while previous is not None and previous.done:
            previous = previous.previous
        self.previous: _Stamps | None = previous
        # id(batch) -> (stamp, batch): the reference keeps the id from being reused by a new
        # batch while this one's removal is pending.
        self.by_batch: dict[int, tuple[int, object]] = {}
        self.changed: asyncio.Event | None = None  # set (and dropped) on each removal
        self.closed = False  # the shard's loop ended: nothing more is added

    @property
    def done(self) -> bool:
        return self.closed and not self.by_batch

    def add(self, batch: object, stamp_us: int) -> None:
        self.by_batch[id(batch)] = (stamp_us, batch)

    def remove(self, batch: object) -> None:
        if self.by_batch.pop(id(batch), None) is not None:
            self._wake()

    def clear(self) -> None:
        self.by_batch.clear()
        self._wake()

    def _wake(self) -> None:
        if self.changed is not None:
            self.changed.set()
            self.changed = None

    async def settled(self, at_us: int) -> None:
        if self.previous is not None:
            await self.previous.settled(at_us)
            if self.previous.done:
                self.previous = self.previous.previous
        while any(stamp_us <= at_us for stamp_us, _batch in self.by_batch.values()):
            if self.changed is None:
                self.changed = asyncio.Event()
            await self.changed.wait()


class Shard:
    def __init__(
        self,
        index: int,
        log: WalletLog,
        limits: EngineLimits,
        clock_us: Callable[[], int],
        observer: EngineObserver,
        previous: Shard | None = None,
    ) -> None:
        self.index = index
        self._log = log
        self._limits = limits
        self._observer = observer
        self._clock_us = clock_us
        self._ledger = Ledger(limits, clock_us)
        # The shard this one replaced (a restart) may still be landing its last commits:
        # its stamps are waited for too.
        self._stamps: _Stamps = _Stamps(None if previous is None else previous._stamps)
        self._mailbox: deque[Command] = deque()
        # Operations queued: the mailbox and batch bounds count these, not commands (a bulk
        # request's group weighs as many operations as it holds).
        self._mailbox_ops = 0
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
        weight = command.weight
        require(weight <= self._limits.batch_ops_max, "a group larger than a batch")
        if self._mailbox_ops + weight > self._limits.mailbox_commands_max:
            raise EngineOverloaded(f"shard {self.index} mailbox is full")
        self._mailbox.append(command)
        self._mailbox_ops += weight
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

    async def settled(self, at_us: int) -> None:
        """Return once no batch stamped at or before ``at_us`` is in flight here or in the
        shard this one replaced. The caller has seen the clock past ``at_us`` (no batch
        prepared from now on is stamped that early) and bounds the wait itself."""
        await self._stamps.settled(at_us)

    def _unstamp(self, applied: Applied, *, after_s: float = 0.0) -> None:
        """The batch's rows are stored or surely not written (after ``after_s``: of unknown
        outcome, they may still land until then)."""
        if after_s:
            asyncio.get_running_loop().call_later(after_s, self._stamps.remove, applied)
        else:
            self._stamps.remove(applied)

    @property
    def mailbox_depth(self) -> int:
        """Operations queued (what ``mailbox_commands_max`` bounds)."""
        return self._mailbox_ops

    @property
    def resident_wallets(self) -> int:
        return self._ledger.resident_wallets

    def _report_end(self, task: asyncio.Task[None]) -> None:
        self._stamps.closed = True
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
        # Commands drained but not yet handed to a commit task, or kept for isolation:
        # owned by the loop alone, answered 503 if the loop dies.
        holding: list[Command] = []
        depth = self._limits.inflight_batches_max
        try:
            while True:
                if inflight and inflight[0][0].done():
                    if not self._settle_head(inflight):
                        holding, refusal = await self._settle_failure(inflight, None)
                        await self._isolate(holding, refusal)
                        holding = []
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
                if any(task.done() and task.result() != _COMMITTED for task, _ in inflight):
                    # A batch this one was applied on top of failed (so does this one), or
                    # was refused (this one's commands are applied again, after it).
                    holding, refusal = await self._settle_failure(inflight, batch)
                    await self._isolate(holding, refusal)
                    holding = []
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
        """Up to ``batch_ops_max`` operations' worth of commands, in order.

        A group (at most ``batch_ops_max`` operations) heavier than the room left waits for
        the next batch, whole: groups are never split, so an atomic one is one transaction.
        """
        mailbox = self._mailbox
        popleft = mailbox.popleft
        budget = self._limits.batch_ops_max
        drained: list[Command] = []
        while mailbox and mailbox[0].weight <= budget:
            command = popleft()
            drained.append(command)
            budget -= command.weight
        self._mailbox_ops -= self._limits.batch_ops_max - budget
        return drained

    @staticmethod
    def _settle_head(inflight: deque[_Inflight]) -> bool:
        """Pop the oldest batch, which has finished; whether it committed.

        Re-raises what the commit task raised: only a broken invariant gets there.
        """
        task, _batch = inflight[0]
        if task.result() != _COMMITTED:
            return False
        inflight.popleft()
        return True

    async def _settle_failure(
        self, inflight: deque[_Inflight], prepared: _Open | None
    ) -> tuple[list[Command], StorageRefused | None]:
        """A commit failed or was refused: wait out the batches behind it, forget all they
        touched, and return the commands kept for isolation, in arrival order, with the
        refusal that kept them.

        Each of them ends too (it waits for its predecessor), but its append may still be
        running; re-reading before it ends could read a state it is about to change.
        ``prepared``: the batch decided on their pending state and not handed over yet;
        answered 503 if a batch failed, else kept whole (nothing of it was written).
        """
        if inflight:
            await asyncio.wait([task for task, _ in inflight])
        for task, _batch in inflight:
            task.result()  # a broken invariant crashes the shard before anything is popped
        kept: list[Command] = []
        refusal: StorageRefused | None = None
        failed = False
        while inflight:
            task, batch = inflight.popleft()
            failed |= task.result() == _FAILED
            self._ledger.forget(batch.applied)
            kept += batch.kept
            refusal = refusal or batch.refusal
        if prepared is not None:
            if failed:
                self._fail(prepared, REASON_PREVIOUS_FAILED)
            else:
                kept += prepared.commands
            self._ledger.forget(prepared.applied)
            self._unstamp(prepared.applied)  # never handed over: nothing of it written
        return kept, refusal

    async def _isolate(self, commands: list[Command], first_refusal: StorageRefused | None) -> None:
        """Apply again, after a refused batch, the commands it and the batches resting on
        it kept unanswered, until each command storage refuses stands alone (see the
        module's diagram): a commit of everything, then of halves of what is refused.

        Runs in the loop with nothing in flight, so the wallets they touch are re-read
        from storage (``_settle_failure`` forgot them) and nothing newer overtakes them.
        Each refused set is split first by the ids the refusal names (``_split``), so one
        offender usually costs two commits, not 2 * log2(n).
        """
        if not commands:
            return
        commits = refused = 0
        budget = self._limits.refusal_isolation_commits_max
        segments: deque[list[Command]] = deque(_split(commands, first_refusal))
        while segments:
            segment = segments.popleft()
            if commits >= budget:
                rest = [command for part in (segment, *segments) for command in part]
                self._answer_unavailable(rest, REASON_ISOLATION_LIMIT)
                break
            commits += 1
            applied = await self._prepare(segment)
            if applied is None:  # the load failed: answered 503, nothing applied
                continue
            batch = _Open(segment, applied)
            ended = await self._commit(batch, None)
            if ended == _COMMITTED:
                continue
            self._ledger.forget(applied)
            if ended == _FAILED:  # outcome unknown: storage is not answering for sure
                rest = [command for part in segments for command in part]
                self._answer_unavailable(rest, REASON_PREVIOUS_FAILED)
                break
            kept = batch.kept
            if len(kept) > 1:
                segments.extendleft(reversed(_split(kept, batch.refusal)))
                continue
            if kept:
                refused += 1
                _log.warning(
                    "shard %d: storage refused a command alone: %r", self.index, batch.refusal
                )
                reply = _refused_alone(batch.refusal)
                future = kept[0].reply
                if not future.done():
                    future.set_result(reply)
        self._observer.commands_isolated(self.index, commits, refused)

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
        # Cancelled commits are of unknown outcome; a prepared batch never handed over
        # wrote nothing. Every stamp is freed after the grace of the former.
        asyncio.get_running_loop().call_later(self._limits.commit_timeout_s, self._stamps.clear)
        self._answer_unavailable(holding, REASON_SHARD_CRASHED)
        mailbox = list(self._mailbox)
        self._mailbox.clear()
        self._mailbox_ops = 0
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
        stamp_us = self._clock_us()
        applied = self._ledger.execute(commands)
        if not applied.batch.is_empty():
            self._stamps.add(applied, stamp_us)
        return applied

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
        # Rare (engine/ledger.py ``stale_outs``): reservations that may be stale, checked
        # once the wallets are resident.
        stale = ledger.stale_outs(commands)
        if stale:
            transfers = await asyncio.wait_for(self._log.load_transfers(stale), timeout)
            ledger.drop_closed(transfers.values())

    # -- commit ------------------------------------------------------------------------

    async def _commit(self, batch: _Open, previous: asyncio.Task[int] | None) -> int:
        """Write the batch, wait for the batch before it, then promote and answer.

        Returns ``_COMMITTED``; ``_FAILED`` when this write or an earlier one failed (a batch
        stored behind a failed one still sends the replies known to be true); ``_KEPT`` when
        storage refused this batch's rows, or an earlier batch's, and nothing here failed:
        the commands not answered are left in ``batch.kept`` for isolation. Batches of one
        shard are written concurrently (up to ``inflight_batches_max``) but take effect in
        order: PostgreSQL makes a later batch's snapshot move wait for the row lock of an
        earlier one on the same wallet, and its seq fencing refuses it if the earlier one
        rolled back; in memory, a batch is promoted and answered only after its predecessor.

        Any other exception from storage counts as a failed commit of unknown outcome: the
        batch is answered 503 and its wallets re-read, never left unanswered. Only a broken
        invariant in promote escapes, and the loop turns it into a shard crash.
        """
        applied = batch.applied
        rows = applied.batch
        reason: str | None = None
        started = time.perf_counter()
        if not rows.is_empty():
            reason = await self._append(batch, previous)
            # Cancelled instead (the shard crashed): _fail_everything frees its stamps.
            self._unstamp(applied, after_s=_grace_s(reason, self._limits.commit_timeout_s))
        before = _COMMITTED
        if previous is not None:
            await asyncio.wait((previous,))
            before = _ended(previous)
        if reason is not None:
            if before != _FAILED and reason in (_REFUSED, REASON_PREVIOUS_FAILED):
                # Nothing of it was written for sure: kept, unanswered, to be applied again.
                self._ledger.unknown(applied)
                batch.kept = batch.commands
                return _KEPT
            self._fail(batch, reason)
            return _FAILED
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
        # even behind a failed batch; only those resting on its state are 503 (behind a
        # refused batch: kept, to be decided again once it is isolated).
        replies = ledger.answers(applied, earlier_failed=before != _COMMITTED)
        unavailable = 0
        for command, reply in zip(batch.commands, replies, strict=True):
            future = command.reply
            if future.done():  # a caller that went away still had its command counted
                continue
            if reply.outcome is Outcome.UNAVAILABLE and before != _COMMITTED:
                # Such a reply wrote nothing (a refusal, a replay, a read), except a bulk
                # group's, whose other items may have been written: that one stays 503.
                if before == _KEPT and not isinstance(command, ApplyOperations):
                    batch.kept.append(command)
                    continue
                unavailable += 1
            future.set_result(reply)
        if unavailable:
            self._observer.batch_failed(self.index, unavailable, REASON_PREVIOUS_FAILED)
        # Not committed keeps the chain broken: the batches behind this one check their
        # replies too, and the loop re-reads everything the failed batch and this one touched.
        return before

    async def _append(self, open_batch: _Open, previous: asyncio.Task[int] | None) -> str | None:
        """Store the batch; None once stored, else the reason it failed (``_REFUSED``: its
        rows were refused, ``open_batch.refusal`` says how).

        A batch sent while its predecessor is still on the way can reach PostgreSQL first;
        storage then refuses it as ``PredecessorPending`` without writing anything, and it
        is written again, once, after the predecessor has committed.
        """
        batch = open_batch.applied.batch
        for attempt in (1, 2):
            try:
                await asyncio.wait_for(self._log.append_batch(batch), self._limits.commit_timeout_s)
                return None
            except StorageRefused as error:
                open_batch.refusal = error
                return _REFUSED
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


def _split(commands: list[Command], refusal: StorageRefused | None) -> list[list[Command]]:
    """Parts of a refused set of commands to commit one after the other, each in arrival
    order: first those apart from what the refusal names, then those it names (a command
    naming an id in its text, such as the wallet of "Failing row contains (<id>, ...)"),
    with every command sharing a wallet with them, so that the parts touch disjoint
    wallets and committing one before the other reorders nothing on any wallet. When the
    refusal names none of them, or all, the halves (bisection)."""
    named: set[int] = set()
    if refusal is not None:
        named = {UUID(text).int for text in _UUID_TEXT.findall(str(refusal).lower())}
    if named:
        ids = [command_ids(command) for command in commands]
        suspect = [False] * len(commands)
        wallets: set[int] = set()
        changed = True
        while changed:  # at most one pass per command: each pass marks one at least
            changed = False
            for index, (touched, mentioned) in enumerate(ids):
                if not suspect[index] and (mentioned & named or touched & wallets):
                    suspect[index] = changed = True
                    wallets |= touched
        marked = list(zip(commands, suspect, strict=True))
        apart = [command for command, is_suspect in marked if not is_suspect]
        if apart and len(apart) < len(commands):
            return [apart, [command for command, is_suspect in marked if is_suspect]]
    if len(commands) < 2:
        return [commands]
    middle = len(commands) // 2
    return [commands[:middle], commands[middle:]]


def _grace_s(reason: str | None, commit_timeout_s: float) -> float:
    """How long a batch's rows may still land after its append ended this way."""
    if reason in (REASON_COMMIT_TIMEOUT, REASON_COMMIT_UNKNOWN):
        return commit_timeout_s
    return 0.0


def _succeeded(task: asyncio.Task[int]) -> bool:
    return _ended(task) == _COMMITTED


def _ended(task: asyncio.Task[int]) -> int:
    """How a finished commit task ended; cancelled or raised counts as failed."""
    if task.cancelled() or task.exception() is not None:
        return _FAILED
    return task.result()


def _failure_reason(error: Exception) -> str:
    if isinstance(error, TimeoutError):
        return REASON_COMMIT_TIMEOUT
    if isinstance(error, CommitOutcomeUnknown) or not isinstance(error, StorageError):
        return REASON_COMMIT_UNKNOWN
    return REASON_COMMIT_FAILED
