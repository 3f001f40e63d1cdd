"""The engine: the cluster's shards, spread over this process's pipelines (actor loops).

A wallet belongs to shard ``crc32(canonical lowercase id text) % shard_count`` (IEEE CRC-32,
as ``zlib.crc32``; engine/ownership.py): the unit of ownership and routing, which HAProxy
computes from the path too. A shard is served by pipeline ``shard % pipelines``; several
shards share one pipeline, so one process keeps the batching of one actor loop.

Every command is admitted only while this process serves the wallet's shard (its lease is
held and not past its local deadline); otherwise ``NotOwner`` is raised before anything is
accepted. Every batch carries the epochs of the shards it writes (the fence); a stale one
is refused by the database and the shards are given up at once. An answer that rests on
memory alone (a read, a refusal) is given only if the shard was served under one epoch from
admission to answer; otherwise it is 503 ``UNAVAILABLE``: another process may have written.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple
from uuid import UUID

from walletd.engine.commands import (
    ApplyOperation,
    ApplyOperations,
    Command,
    CreateWallet,
    HoldAction,
    HoldCommand,
    JointPayment,
    JointTransfer,
    Operation,
    Outcome,
    ReadWallet,
    Reply,
    TransferLeg,
    UpdateWallet,
    reversal_key,
)
from walletd.engine.errors import (
    AtomicSpansShards,
    AtomicTooLarge,
    EngineOverloaded,
    EngineRefused,
    EngineStopping,
    NotOwner,
)
from walletd.engine.holds import (
    capture_transfer_id,
    create_fingerprint,
    fingerprint_amount,
    new_hold_id,
    replay_creation,
    resolve_fingerprint,
    resolved_reply,
)
from walletd.engine.ids import new_uuid4
from walletd.engine.limits import EngineLimits
from walletd.engine.log_reads import LogReader, WalletAsOf
from walletd.engine.model import (
    NO_METADATA,
    REVERSAL_KINDS,
    Batch,
    HoldRecord,
    HoldStatus,
    Metadata,
    MetadataPatch,
    OperationKind,
    OperationRecord,
    PaymentRecord,
    PaymentStatus,
    RefusalRecord,
    TransferRecord,
    TransferStatus,
    WalletRecord,
    WalletStatus,
    WalletView,
)
from walletd.engine.money import SEED_CURRENCY, Currency
from walletd.engine.observer import EngineObserver
from walletd.engine.ownership import Ownership, shard_of
from walletd.engine.payments import (
    PAYMENT_KEY_NAMESPACE,
    PaymentCoordinator,
    PaymentReply,
    Posting,
)
from walletd.engine.ports import StaleEpoch, StorageError, WalletLog
from walletd.engine.shard import Shard
from walletd.engine.transfers import (
    LegDelivery,
    RemoteLegs,
    RoutedLegDelivery,
    TransferCoordinator,
    TransferReply,
)

__all__ = [
    "CREATE_ID_TRIES_MAX",
    "CREATE_KEY_NAMESPACE",
    "REFUND_KEY_NAMESPACE",
    "TRANSFER_KEY_NAMESPACE",
    "BulkReply",
    "Engine",
    "payment_refund_key",
    "shard_of",
    "wall_clock_us",
]

_log = logging.getLogger("walletd.engine")

# Wallets created with an Idempotency-Key and no chosen id get uuid5(namespace, key), so a
# retry lands on the same id, hence the same shard, which finds its own earlier answer.
CREATE_KEY_NAMESPACE = UUID("6f1c9a52-3f0e-4d8e-9d0a-5b7f2c1e8a44")
# Transfers sent with an Idempotency-Key and no chosen id get uuid5(namespace, key): the key
# becomes the transfer id, whose scope is global.
TRANSFER_KEY_NAMESPACE = UUID("0b6d2f7e-8a51-4c3e-9f42-7d1e5a6c9b30")
# A refund's id is uuid5(namespace, "<original id>:<Idempotency-Key>"): a retry under the
# key finds the refund (or its recorded refusal); the same key on another transfer is
# another refund.
REFUND_KEY_NAMESPACE = UUID("5d0c3a1e-6b27-4f89-a4d2-8e91c7b3f056")


def payment_refund_key(idempotency_key: str) -> str:
    """The key each posting's refund of a whole-payment refund is made under: the client's
    key and a U+001F separator, which no client key may hold (printable ASCII only), so no
    refund of a single transfer can ever take the same refund id."""
    return f"{idempotency_key}\x1fpayment"


_ROOM_POLL_S = 0.001
_UNAVAILABLE = Reply(Outcome.UNAVAILABLE)
# A bulk item whose wallet another walletd process serves: not applied (503 NOT_OWNER).
_NOT_OWNER = Reply(Outcome.NOT_OWNER)


class BulkReply(NamedTuple):
    """One reply per operation, in order; or, when an atomic request was refused, the
    replies up to the refused operation, whose index ``refused_at`` is (nothing applied)."""

    replies: list[Reply]
    refused_at: int | None


def wall_clock_us() -> int:
    return time.time_ns() // 1000


async def _first_of(*events: asyncio.Event, timeout_s: float) -> None:
    """Wait until one of the events is set, or ``timeout_s`` passed."""
    waits = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waits, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()


# A creation without a chosen id or key picks a random id in a shard this process serves;
# past this many tries (it serves few shards) it takes the last one and lets it be forwarded.
CREATE_ID_TRIES_MAX = 256


class _FencedLog(WalletLog):
    """The log as the pipelines see it: every append carries the epochs of its shards.

    A batch that writes a shard whose lease this process no longer holds is refused before
    it is sent; one that the database refuses (stale epoch) gives the shards up at once.
    """

    def __init__(self, log: WalletLog, ownership: Ownership) -> None:
        self._log = log
        self._ownership = ownership

    async def append_batch(self, batch: Batch) -> None:
        ownership = self._ownership
        count = ownership.shard_count
        shards = {shard_of(n.wallet_id, count) for n in batch.new_wallets}
        shards.update(shard_of(s.wallet_id, count) for s in batch.snapshots)
        shards.update(shard_of(r.wallet_id, count) for r in batch.refusals)
        fence = []
        for shard in sorted(shards):
            epoch = ownership.epoch(shard)
            if epoch is None:
                ownership.lost([shard])
                raise StaleEpoch(f"shard {shard} is no longer held; batch not sent", [shard])
            fence.append((shard, epoch))
        batch.fence = fence
        try:
            await self._log.append_batch(batch)
        except StaleEpoch:
            ownership.lost(shards)
            raise

    async def load_wallets(self, wallet_ids: Sequence[UUID]) -> dict[UUID, WalletRecord]:
        return await self._log.load_wallets(wallet_ids)

    async def find_operations(
        self, keys: Sequence[tuple[UUID, str]]
    ) -> dict[tuple[UUID, str], OperationRecord | RefusalRecord]:
        return await self._log.find_operations(keys)

    async def find_wallets_by_create_key(self, keys: Sequence[str]) -> dict[str, WalletRecord]:
        return await self._log.find_wallets_by_create_key(keys)

    async def read_history(
        self, wallet_id: UUID, before_seq: int | None, limit: int
    ) -> list[tuple[int, OperationRecord]]:
        return await self._log.read_history(wallet_id, before_seq, limit)

    async def recent_wallets(self, limit: int) -> list[WalletRecord]:
        return await self._log.recent_wallets(limit)

    async def load_transfers(self, transfer_ids: Sequence[UUID]) -> dict[UUID, TransferRecord]:
        return await self._log.load_transfers(transfer_ids)

    async def refunded_amount(self, transfer_id: UUID) -> int:
        return await self._log.refunded_amount(transfer_id)

    async def read_operation(
        self, wallet_id: UUID, seq: int
    ) -> tuple[OperationRecord | None, OperationRecord | None]:
        return await self._log.read_operation(wallet_id, seq)

    async def pending_transfers(
        self, created_before_us: int, limit: int, after: tuple[int, UUID] | None = None
    ) -> list[TransferRecord]:
        return await self._log.pending_transfers(created_before_us, limit, after)

    async def pending_transfers_of(self, wallet_id: UUID) -> int:
        return await self._log.pending_transfers_of(wallet_id)

    async def load_holds(self, hold_ids: Sequence[UUID]) -> dict[UUID, HoldRecord]:
        return await self._log.load_holds(hold_ids)

    async def expired_holds(
        self, shards: Sequence[int], now_us: int, limit: int
    ) -> list[HoldRecord]:
        return await self._log.expired_holds(shards, now_us, limit)

    async def ping(self) -> None:
        await self._log.ping()


class Engine:
    def __init__(
        self,
        log: WalletLog,
        limits: EngineLimits | None = None,
        *,
        ownership: Ownership | None = None,
        clock_us: Callable[[], int] = wall_clock_us,
        observer: EngineObserver | None = None,
        on_fatal: Callable[[str], None] | None = None,
        delivery: LegDelivery | None = None,
        remote_legs: RemoteLegs | None = None,
        self_url: str | None = None,
        default_currency: Currency = SEED_CURRENCY,
    ) -> None:
        self.limits = limits or EngineLimits()
        # The currency of a wallet created without one (the seed's request).
        self.default_currency = default_currency
        # Alone (tests, tools): every shard served, one shard per pipeline, no fence.
        self.ownership = ownership or Ownership.everything(self.limits.pipelines)
        self.log = log
        self._clock_us = clock_us
        self._observer = observer or EngineObserver()
        self._pipeline_log = _FencedLog(log, self.ownership) if self.ownership.fenced else log
        # Called once when the engine gives up (shards crash faster than the restart rate):
        # the process should exit non-zero so that its own supervisor restarts it.
        self._on_fatal = on_fatal
        self._shards = [self._new_shard(index) for index in range(self.limits.pipelines)]
        # Shards whose wallets each pipeline may hold in memory since it started: a shard
        # regained with a new epoch is served only after its pipeline forgot them.
        self._remembered: list[set[int]] = [set() for _ in self._shards]
        # Commands admitted and not yet answered, per shard: a release waits for zero.
        self._admitted = [0] * self.ownership.shard_count
        self._drained: dict[int, asyncio.Event] = {}
        self._started = False
        self._stopping = False
        # Bulk requests waiting for mailbox room, and the line they wait in.
        self._bulk_waiting = 0
        self._bulk_line = asyncio.Lock()
        self._restarted_at: deque[float] = deque()  # monotonic times of recent restarts
        self.failure: str | None = None  # why the engine gave up, once it has
        # Legs go to this process's shards, or to the process that serves the wallet's
        # shard through ``remote_legs`` (the HTTP edge's internal route).
        delivery = delivery or RoutedLegDelivery(
            self.deliver_leg,
            self.ownership,
            remote_legs,
            self_url=self_url,
            tries_max=self.limits.transfer_leg_tries_max,
            local_joint=self.deliver_joint,
            local_joint_payment=self.deliver_joint_payment,
            local_read=self.read,
        )
        self.transfers = TransferCoordinator(
            log,
            delivery,
            self.limits.load_timeout_s,
            # A wave of lookups by id is bounded like a mailbox: requests past it wait.
            lookup_ids_max=self.limits.mailbox_commands_max,
            observer=self._observer,
            currency_cache_wallets_max=self.limits.currency_cache_wallets_max,
        )
        self.payments = PaymentCoordinator(
            log, delivery, self.transfers, self.limits.load_timeout_s, clock_us,
            observer=self._observer,
        )  # fmt: skip
        self._redrive_task: asyncio.Task[None] | None = None
        self._redrive_stop = asyncio.Event()
        self._sweep_task: asyncio.Task[None] | None = None
        self.sweep_passes = 0  # sweep passes ended (done or failed), since start
        # Set when this process starts serving shards it did not (failover, rebalancing):
        # their PENDING transfers now belong to this process's re-drive, at once.
        self._redrive_wake = asyncio.Event()
        self.ownership.on_ready = self._shards_ready

    async def warm_up(self, wallets_max: int) -> int:
        """Load up to ``wallets_max`` most recently updated wallets of the shards served
        now into their pipelines, so the first requests after a restart find them
        resident. Returns how many."""
        if wallets_max <= 0:
            return 0
        records = await self.log.recent_wallets(min(wallets_max, self.limits.resident_wallets_max))
        by_pipeline: dict[int, list[WalletRecord]] = {}
        for record in records:
            shard = shard_of(record.wallet_id, self.ownership.shard_count)
            if not self.ownership.serving(shard):
                continue
            pipeline = shard % len(self._shards)
            by_pipeline.setdefault(pipeline, []).append(record)
            self._remembered[pipeline].add(shard)
        return sum(self._shards[index].warm(part) for index, part in by_pipeline.items())

    async def start(self) -> None:
        for shard in self._shards:
            self._start_shard(shard)
        self._started = True
        # Recovery runs by itself: the first pass drives every transfer a previous run left
        # PENDING, later passes the ones a 503 left behind.
        self._redrive_task = asyncio.create_task(self._redrive_loop(), name="walletd-redrive")
        self._sweep_task = asyncio.create_task(self._sweep_loop(), name="walletd-hold-sweep")

    async def stop(self) -> None:
        """Refuse new commands, answer every accepted one, and stop the shards."""
        self._stopping = True
        self._redrive_stop.set()
        # The re-drive stops with the shards: legs it still sends are refused (the transfer
        # stays PENDING, for the next start), and the ones accepted are answered.
        redrive = [t for t in (self._redrive_task, self._sweep_task) if t is not None]
        await asyncio.gather(
            *(shard.stop() for shard in self._shards), *redrive, return_exceptions=True
        )

    async def redrive_transfers(self, *, created_before_us: int | None = None) -> int:
        """One recovery pass: drive again the PENDING transfers whose sending wallet's
        shard this process serves (so after a crash exactly one process drives a given
        transfer: the owner of its ``from`` side); how many ended."""
        if created_before_us is None:
            created_before_us = self._clock_us()
        # A pass submits its legs at once: past a mailbox's bound they would only be
        # refused as overloaded.
        limits = self.limits
        batch_max = min(limits.transfer_redrive_batch_max, limits.mailbox_commands_max)
        ownership = self.ownership

        def owns(transfer: TransferRecord) -> bool:
            return ownership.serving(shard_of(transfer.from_wallet_id, ownership.shard_count))

        return await self.transfers.redrive(created_before_us, batch_max, owns)

    async def redrive_payments(self, *, created_before_us: int | None = None) -> int:
        """One recovery pass of payments: the ones not final whose first posting's sending
        wallet's shard this process serves (one process drives a given payment after a
        crash); how many ended."""
        if created_before_us is None:
            created_before_us = self._clock_us()
        limits = self.limits
        # Each payment sends up to payment_postings_max legs at once.
        batch_max = max(
            1, min(limits.transfer_redrive_batch_max, limits.mailbox_commands_max)
            // limits.payment_postings_max,
        )  # fmt: skip
        ownership = self.ownership

        def owns(payment: PaymentRecord) -> bool:
            first = payment.postings[0].from_wallet_id
            return ownership.serving(shard_of(first, ownership.shard_count))

        return await self.payments.redrive(created_before_us, batch_max, owns)

    def _shards_ready(self, shards: Iterable[int]) -> None:
        del shards  # a pass reads every PENDING transfer this process now owns
        self._redrive_wake.set()

    async def _redrive_loop(self) -> None:
        interval_s = self.limits.transfer_redrive_interval_s
        interval_us = int(interval_s * 1_000_000)
        first = True
        while not self._redrive_stop.is_set():
            # The first pass takes every PENDING transfer (none is driven yet), and so does
            # a pass after shards were gained (their previous owner may have died mid-way);
            # other passes only those older than an interval, which their own request has
            # given up on.
            everything = first or self._redrive_wake.is_set()
            self._redrive_wake.clear()
            before_us = self._clock_us() - (0 if everything else interval_us)
            try:
                ended = await self.redrive_transfers(created_before_us=before_us)
                if ended:
                    _log.info("re-drive: %d pending transfers ended", ended)
                paid = await self.redrive_payments(created_before_us=before_us)
                if paid:
                    _log.info("re-drive: %d pending payments ended", paid)
                first = False
            except (StorageError, TimeoutError) as error:
                _log.warning("re-drive of pending transfers failed: %r", error)
            except Exception:
                # A bug must not end recovery for the life of the process: log, go on.
                _log.exception("re-drive of pending transfers raised")
            await _first_of(self._redrive_stop, self._redrive_wake, timeout_s=interval_s)

    async def sweep_holds(self, *, now_us: int | None = None) -> int:
        """One sweep pass: release up to ``hold_sweep_batch_max`` PENDING holds of the
        shards served here whose expires_at has passed; how many were released."""
        if now_us is None:
            now_us = self._clock_us()
        ownership = self.ownership
        served = [s for s in range(ownership.shard_count) if ownership.serving(s)]
        if not served:
            return 0
        limits = self.limits
        batch_max = min(limits.hold_sweep_batch_max, limits.mailbox_commands_max)
        expired = await asyncio.wait_for(
            self.log.expired_holds(served, now_us, batch_max), limits.load_timeout_s
        )
        replies = await asyncio.gather(
            *(self._expire(hold) for hold in expired), return_exceptions=True
        )
        released = sum(1 for r in replies if isinstance(r, Reply) and r.outcome is Outcome.OK)
        for _ in range(released):
            self._observer.hold_changed("EXPIRED")
        return released

    async def _expire(self, hold: HoldRecord) -> Reply:
        shard, pipeline = self._route(hold.wallet_id)
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        return await self._answer(
            shard, pipeline, HoldCommand(HoldAction.EXPIRE, hold.wallet_id, hold.hold_id, future)
        )

    async def _sweep_loop(self) -> None:
        """Expired holds back to ``available``: a pass every ``hold_sweep_interval_s``, at
        once again after a full one. A capture past expires_at is refused without it; the
        sweep only bounds how long the money stays held (docs/ARCHITECTURE.md)."""
        interval_s = self.limits.hold_sweep_interval_s
        while not self._redrive_stop.is_set():
            full = False
            try:
                released = await self.sweep_holds()
                full = released >= self.limits.hold_sweep_batch_max
                if released:
                    _log.info("hold sweep: %d expired holds released", released)
            except (StorageError, TimeoutError) as error:
                _log.warning("hold sweep failed: %r", error)
            except Exception:
                _log.exception("hold sweep raised")  # a bug must not end the sweep
            self.sweep_passes += 1
            if full:
                await asyncio.sleep(0)
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._redrive_stop.wait(), interval_s)

    async def forget_shards(self, shards: Iterable[int]) -> None:
        """Drop what the pipelines remember of these shards' wallets (before serving them
        under a new epoch: another process may have changed them). A pipeline that may hold
        some is drained and replaced by a fresh one."""
        pipelines = len(self._shards)
        stale = {
            shard % pipelines for shard in shards if shard in self._remembered[shard % pipelines]
        }
        for index in sorted(stale):
            self._remembered[index] = set()
            await self.restart_shard(index)

    def admitted(self, shard: int) -> int:
        return self._admitted[shard]

    def _release(self, shard: int) -> None:
        """An admitted command (or bulk group) of the shard is answered; the last one wakes a
        ``drain_shards`` waiting for the shard."""
        self._admitted[shard] -= 1
        if not self._admitted[shard] and self._drained:
            event = self._drained.pop(shard, None)
            if event is not None:
                event.set()

    async def drain_shards(self, shards: Iterable[int], timeout_s: float) -> bool:
        """Wait until no admitted command of these shards is unanswered (the caller stopped
        admitting them first). Returns False when ``timeout_s`` passed first."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        for shard in shards:
            if not self._admitted[shard]:
                continue
            event = self._drained.setdefault(shard, asyncio.Event())
            try:
                await asyncio.wait_for(event.wait(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                return False
        return True

    async def restart_shard(self, index: int) -> None:
        """Drop shard ``index``'s memory and start it afresh from storage.

        The old shard stops taking commands at once (new ones queue in the fresh shard's
        mailbox), answers everything it accepted, and only then does the fresh one start,
        so nothing it loads can be older than a commit of the old one.
        """
        old = self._shards[index]
        fresh = self._shards[index] = self._new_shard(index, old)
        if old.task is not None and not old.task.done():
            with contextlib.suppress(Exception):  # a crash in between is answered by it
                await old.stop()
        if self._started and not self._stopping:
            self._start_shard(fresh)

    @property
    def accepting(self) -> bool:
        """True while every shard runs and the engine takes commands."""
        if not self._started or self._stopping or self.failure is not None:
            return False
        return all(s.task is not None and not s.task.done() for s in self._shards)

    # -- supervision -------------------------------------------------------------------

    def _new_shard(self, index: int, previous: Shard | None = None) -> Shard:
        return Shard(
            index, self._pipeline_log, self.limits, self._clock_us, self._observer, previous
        )

    def _start_shard(self, shard: Shard) -> None:
        shard.start()
        assert shard.task is not None
        shard.task.add_done_callback(lambda task: self._shard_ended(shard, task))

    def _shard_ended(self, shard: Shard, task: asyncio.Task[None]) -> None:
        """A shard's loop ended: after a crash, restart it from storage, within the rate.

        Like an actor system's one-for-one supervisor: the crashed shard has answered
        everything it held (503); a fresh one with empty memory takes its place. Past
        ``shard_restarts_max`` restarts in ``shard_restart_window_s`` the engine gives up.
        """
        if self._stopping or self._shards[shard.index] is not shard:
            return  # a stop, or a shard already replaced by restart_shard
        if task.cancelled() or task.exception() is None:
            return
        now = time.monotonic()
        window_s = self.limits.shard_restart_window_s
        restarted_at = self._restarted_at
        while restarted_at and now - restarted_at[0] > window_s:
            restarted_at.popleft()
        if len(restarted_at) >= self.limits.shard_restarts_max:
            self._give_up(
                f"shard {shard.index} crashed after {len(restarted_at)} restarts in {window_s:g} s"
            )
            return
        restarted_at.append(now)
        _log.error("shard %d crashed: restarting it from storage", shard.index)
        self._observer.shard_restarted(shard.index)
        fresh = self._shards[shard.index] = self._new_shard(shard.index, shard)
        self._start_shard(fresh)

    def _give_up(self, reason: str) -> None:
        self.failure = reason
        _log.critical("engine gives up: %s", reason)
        if self._on_fatal is not None:
            self._on_fatal(reason)

    @property
    def shards(self) -> list[Shard]:
        """The pipelines (actor loops)."""
        return self._shards

    def shard_of(self, wallet_id: UUID) -> int:
        return shard_of(wallet_id, self.ownership.shard_count)

    def _route(self, wallet_id: UUID) -> tuple[int, Shard]:
        """The wallet's shard and its pipeline; NotOwner unless this process serves it."""
        ownership = self.ownership
        if not ownership.fenced and len(self._shards) == 1:
            return 0, self._shards[0]  # alone with one pipeline: no hash to compute
        shard = shard_of(wallet_id, ownership.shard_count)
        if not ownership.serving(shard):
            raise NotOwner(shard)
        index = shard % len(self._shards)
        self._remembered[index].add(shard)
        return shard, self._shards[index]

    async def deliver_leg(self, leg: TransferLeg) -> Reply:
        """Apply a transfer leg on this process's shard of its wallet (``NotOwner`` when
        another process serves it: the delivery sends it there). Counted like any admitted
        command, so a release waits for it; a refusal holds only under one epoch."""
        shard, pipeline = self._route(leg.wallet_id)
        return await self._answer(shard, pipeline, leg)

    async def deliver_joint(self, joint: JointTransfer) -> Reply | None:
        """Both legs of a new transfer in one batch, when this process serves both wallets'
        shards on one pipeline; None otherwise, nothing submitted (the legs then travel one
        by one). Admitted on both shards, so a release waits for it; a refusal (resting on
        memory) holds only if the sender's shard stayed served under one epoch."""
        if joint.weight > self.limits.batch_ops_max:  # batches of one operation: no room
            return None
        try:
            debit_shard, pipeline = self._route(joint.debit.wallet_id)
            credit_shard, credit_pipeline = self._route(joint.credit.wallet_id)
        except NotOwner:
            return None
        if credit_pipeline is not pipeline:
            return None
        epoch = self.ownership.epoch(debit_shard)
        try:
            self._submit(pipeline, joint)
        except EngineRefused:
            # Not taken (overload, stopping): nothing applied; the legs' own path decides.
            return None
        shards = {debit_shard, credit_shard}
        for shard in shards:
            self._admitted[shard] += 1
        try:
            reply = await joint.reply
        finally:
            for shard in shards:
                self._release(shard)
        if reply.outcome is Outcome.UNAVAILABLE or reply.outcome in _WRITTEN:
            return reply
        if self.ownership.serving(debit_shard) and self.ownership.epoch(debit_shard) == epoch:
            return reply
        return Reply(Outcome.UNAVAILABLE)

    async def deliver_joint_payment(self, transfers: Sequence[TransferRecord]) -> Reply | None:
        """Every posting of a payment in one batch (``JointPayment``), when this process
        serves all its wallets' shards on one pipeline; None otherwise, nothing submitted
        (the saga then runs). OK: all applied; NOT_OWNER: none (not taken whole);
        UNAVAILABLE: the commit's outcome is unknown (the saga's legs find out, by key)."""
        if 2 * len(transfers) > self.limits.batch_ops_max:
            return None
        wallets = {w for t in transfers for w in (t.from_wallet_id, t.to_wallet_id)}
        try:
            routes = [self._route(wallet) for wallet in wallets]
        except NotOwner:
            return None
        pipeline = routes[0][1]
        if any(route[1] is not pipeline for route in routes):
            return None
        shards = {route[0] for route in routes}
        epochs = {shard: self.ownership.epoch(shard) for shard in shards}
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        try:
            self._submit(pipeline, JointPayment(transfers, future))
        except EngineRefused:
            return None
        for shard in shards:
            self._admitted[shard] += 1
        try:
            reply = await future
        finally:
            for shard in shards:
                self._release(shard)
        if reply.outcome is not Outcome.NOT_OWNER:
            return reply
        # Not taken, decided on memory: it holds only if the shards stayed served.
        if all(self.ownership.serving(s) and self.ownership.epoch(s) == e
               for s, e in epochs.items()):  # fmt: skip
            return reply
        return None

    def _submit(self, shard: Shard, command: Command) -> None:
        try:
            shard.submit(command)
        except EngineOverloaded:
            self._observer.command_rejected("overloaded")
            raise
        except EngineStopping:
            self._observer.command_rejected("stopping")
            raise

    async def _answer(
        self,
        shard: int,
        pipeline: Shard,
        command: (
            ApplyOperation | CreateWallet | ReadWallet | HoldCommand | TransferLeg | UpdateWallet
        ),
    ) -> Reply:
        """Submit and await the reply; a reply resting on memory alone is kept only if the
        shard stayed served under one epoch from admission to answer."""
        epoch = self.ownership.epoch(shard)
        self._submit(pipeline, command)
        self._admitted[shard] += 1
        try:
            reply = await command.reply
        finally:
            self._release(shard)
        outcome = reply.outcome
        if outcome is Outcome.UNAVAILABLE or (
            outcome in _WRITTEN and not isinstance(command, ReadWallet)
        ):
            return reply  # committed under the fence (or a replay of it), or "unknown" already
        if self.ownership.serving(shard) and self.ownership.epoch(shard) == epoch:
            return reply
        return Reply(Outcome.UNAVAILABLE)

    async def apply(
        self,
        wallet_id: UUID,
        kind: OperationKind,
        amount: int,
        idempotency_key: str | None,
        reference: str | None = None,
        actor: str | None = None,
        expected_seq: int | None = None,
        scale: int | None = None,
        metadata: Metadata = NO_METADATA,
    ) -> Reply:
        """Apply a deposit or withdrawal; the reply arrives once its batch has committed.
        ``actor``: the API key's name, recorded on the row (None when auth is off).
        ``expected_seq`` (If-Match): refused PRECONDITION_FAILED unless the wallet's seq is
        that one when the operation's turn comes. ``scale``: ``amount`` is amount / 10^scale,
        rescaled to the wallet's currency by its shard (None: in its minor units already)."""
        shard, pipeline = self._route(wallet_id)
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        return await self._answer(
            shard, pipeline,
            ApplyOperation(
                wallet_id, kind, amount, idempotency_key, future, reference, actor,
                expected_seq=expected_seq, scale=scale, metadata=metadata,
            ),
        )  # fmt: skip

    async def update_wallet(
        self,
        wallet_id: UUID,
        status: WalletStatus | None,
        overdraft_limit: int | None,
        idempotency_key: str | None,
        fingerprint: str,
        *,
        expected_seq: int | None = None,
        actor: str | None = None,
        limit_scale: int | None = None,
        metadata: MetadataPatch | None = None,
    ) -> Reply:
        """Change a wallet's status, overdraft limit and/or metadata (PATCH;
        ledger._update_wallet). ``limit_scale`` as ``scale`` for ``apply``: the limit is
        rescaled to the wallet's currency by its shard. ``metadata``: merged into the
        wallet's (None: unchanged).
        A close first asks storage for the wallet's PENDING transfers, which the ledger
        cannot see (a transfer's credit ends on another shard); storage checks again when
        the close commits, so one opened in between refuses the close there."""
        shard, pipeline = self._route(wallet_id)
        transfers_pending = 0
        if status is WalletStatus.CLOSED:
            transfers_pending = await self.log.pending_transfers_of(wallet_id)
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        return await self._answer(
            shard, pipeline,
            UpdateWallet(
                wallet_id, status, overdraft_limit, idempotency_key, fingerprint, future,
                expected_seq=expected_seq, actor=actor, transfers_pending=transfers_pending,
                limit_scale=limit_scale, metadata=metadata,
            ),
        )  # fmt: skip

    # -- holds (docs/ARCHITECTURE.md, "Holds"; engine/holds.py) ------------------------

    async def create_hold(
        self,
        wallet_id: UUID,
        amount: int,
        expires_in_s: int | None,
        reference: str | None,
        idempotency_key: str | None,
        actor: str | None = None,
        scale: int | None = None,
        metadata: Metadata = NO_METADATA,
    ) -> tuple[UUID, Reply]:
        """Reserve ``amount`` of the wallet's available money; returns the hold id (on the
        wallet's shard; derived from the key when there is one) and the reply (CREATED
        with the hold, or a refusal). ``scale`` as for ``apply``."""
        shard, pipeline = self._route(wallet_id)
        count = self.ownership.shard_count
        hold_id = new_hold_id(wallet_id, idempotency_key, count)
        fingerprint = create_fingerprint(
            fingerprint_amount(amount, scale), expires_in_s, reference, metadata
        )
        if idempotency_key is not None:
            stored = (await self.log.load_holds([hold_id])).get(hold_id)
            if stored is not None:
                return hold_id, replay_creation(stored, fingerprint)
        seconds = self.limits.hold_expires_in_s_default if expires_in_s is None else expires_in_s
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        command = HoldCommand(
            HoldAction.CREATE, wallet_id, hold_id, future, amount=amount,
            expires_in_us=seconds * 1_000_000, reference=reference, shard=shard,
            key=idempotency_key, fingerprint=fingerprint, actor=actor, scale=scale,
            metadata=metadata,
        )  # fmt: skip
        reply = await self._answer(shard, pipeline, command)
        if reply.outcome is Outcome.CREATED and reply.replayed:
            # A retry that met its first attempt in memory: answer from storage.
            stored = (await self.log.load_holds([hold_id])).get(hold_id)
            if stored is None:
                return hold_id, _UNAVAILABLE
            return hold_id, replay_creation(stored, fingerprint)
        if reply.outcome is Outcome.CREATED:
            self._observer.hold_changed("CREATED")
        return hold_id, reply

    async def resolve_hold(
        self,
        action: HoldAction,
        hold_id: UUID,
        amount: int | None,
        idempotency_key: str | None,
        to_wallet_id: UUID | None = None,
        actor: str | None = None,
        scale: int | None = None,
    ) -> Reply:
        """Capture (``amount`` or all of it; the rest released) or void a hold. A capture
        with ``to_wallet_id`` moves the captured money there: its commit opens a PENDING
        transfer (the debit out of the hold), then the transfer's credit is driven (refund
        if refused) as for any transfer; the reply's hold names the transfer."""
        shard, pipeline = self._route(hold_id)  # the hold's shard is its wallet's
        fingerprint = resolve_fingerprint(
            action, None if amount is None else fingerprint_amount(amount, scale), to_wallet_id
        )
        stored = (await self.log.load_holds([hold_id])).get(hold_id)
        if stored is None:
            return Reply(Outcome.HOLD_NOT_FOUND)
        if stored.status is not HoldStatus.PENDING:
            return resolved_reply(stored, idempotency_key, fingerprint)
        if to_wallet_id == stored.wallet_id:
            return Reply(Outcome.SAME_WALLET, hold=stored)
        to_currency = None
        if to_wallet_id is not None:
            # The receiver's currency, read before anything moves: the hold's shard refuses
            # another one (CURRENCY_MISMATCH). Missing: None, refused by the credit as today.
            to_currency, read = await self.transfers.currency_of(to_wallet_id)
            if to_currency is None and read.outcome is not Outcome.WALLET_NOT_FOUND:
                return _UNAVAILABLE
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        command = HoldCommand(
            action, stored.wallet_id, hold_id, future, amount=amount, key=idempotency_key,
            fingerprint=fingerprint, to_wallet_id=to_wallet_id,
            transfer_id=None if to_wallet_id is None else capture_transfer_id(hold_id),
            actor=actor, scale=scale, to_currency=to_currency,
        )  # fmt: skip
        reply = await self._answer(shard, pipeline, command)
        if reply.outcome is Outcome.OK:
            self._observer.hold_changed("CAPTURED" if action is HoldAction.CAPTURE else "VOIDED")
        hold = reply.hold
        if reply.outcome is Outcome.OK and hold is not None and hold.transfer_id is not None:
            assert hold.to_wallet_id is not None
            opened = TransferRecord(
                hold.transfer_id, hold.wallet_id, hold.to_wallet_id, hold.captured,
                hold.reference, TransferStatus.PENDING, None, hold.updated_at_us,
                hold.updated_at_us, actor, hold.currency, hold.metadata,
            )  # fmt: skip
            # The hold is CAPTURED whatever the credit does: a refused credit refunds the
            # debit (FAILED), a 503 leaves the transfer PENDING for the re-drive loop.
            await self.transfers.drive_opened(opened)
        if reply.outcome is not Outcome.HOLD_NOT_PENDING:
            return reply
        # Resolved meanwhile by a batch that has committed (replies follow their batches).
        stored = (await self.log.load_holds([hold_id])).get(hold_id)
        if stored is None or stored.status is HoldStatus.PENDING:
            return _UNAVAILABLE
        return resolved_reply(stored, idempotency_key, fingerprint)

    async def read_hold(self, hold_id: UUID) -> HoldRecord | None:
        """The stored hold (every acknowledged change of it is committed there)."""
        self._route(hold_id)  # served by the wallet's owner, like the wallet's reads
        return (await self.log.load_holds([hold_id])).get(hold_id)

    async def apply_operations(
        self, operations: Sequence[Operation], *, atomic: bool = False, actor: str | None = None
    ) -> BulkReply:
        """Apply many deposits/withdrawals as one unit per shard; one reply per operation.

        The operations of each shard travel as commands (``ApplyOperations``) of at most
        ``batch_ops_max`` each, every one decided in one batch, written in one transaction;
        an ``atomic`` request must be one such group (one shard actor, else
        ``AtomicSpansShards``; at most ``batch_ops_max`` operations, else ``AtomicTooLarge``)
        and applies whole or not at all. Admission is all
        or nothing: when some shard's mailbox cannot take its share now, the request waits
        for room, in arrival order, for at most ``bulk_admission_wait_s``, with at most
        ``bulk_waiting_max`` others; past either bound it raises ``EngineOverloaded`` with
        nothing queued. Operations on one wallet apply in list order. The reply arrives once
        every group has committed, like ``apply``'s.
        """
        by_shard: dict[Shard, list[int]] = {}
        shards: list[int | None] = []  # each operation's shard; None: not served here
        for index, operation in enumerate(operations):
            try:
                shard, pipeline = self._route(operation.wallet_id)
            except NotOwner:
                shards.append(None)
                continue
            shards.append(shard)
            by_shard.setdefault(pipeline, []).append(index)
        group_max = self.limits.batch_ops_max
        if atomic and None in shards:
            raise AtomicSpansShards("some of the wallets are served by other walletd processes")
        if atomic and len(by_shard) > 1:
            raise AtomicSpansShards(f"the operations are on {len(by_shard)} shard actors")
        if atomic and len(operations) > group_max:
            raise AtomicTooLarge(f"an atomic request holds at most {group_max} operations")
        wanted = {shard: len(indexes) for shard, indexes in by_shard.items()}
        if not self._fits(wanted) or self._bulk_waiting:
            await self._wait_for_room(wanted)
        if not self.accepting:
            self._observer.command_rejected("stopping")
            raise EngineStopping("walletd is not accepting commands")
        ownership = self.ownership
        served = {shard for shard in shards if shard is not None}
        # Lost while waiting for room: refuse those operations (nothing queued for them yet).
        lost = {shard for shard in served if not ownership.serving(shard)}
        epochs = {shard: ownership.epoch(shard) for shard in served}
        loop = asyncio.get_running_loop()
        submitted: list[tuple[list[int], asyncio.Future[Reply]]] = []
        # No await between the room check and the last submit: nothing else can fill a
        # mailbox meanwhile, so every submit below finds room.
        for pipeline, pipeline_indexes in by_shard.items():
            kept = [i for i in pipeline_indexes if shards[i] not in lost]
            # Groups of at most one batch, in order: one wallet's operations stay in order.
            for start in range(0, len(kept), group_max):
                indexes = kept[start : start + group_max]
                future: asyncio.Future[Reply] = loop.create_future()
                items = [operations[i] for i in indexes]
                self._submit(pipeline, ApplyOperations(items, atomic, future, actor))
                submitted.append((indexes, future))
        for shard in served:  # a handover waits for these like for single requests
            self._admitted[shard] += 1
        replies: list[Reply] = [
            _NOT_OWNER if shard is None or shard in lost else _UNAVAILABLE for shard in shards
        ]
        try:
            for indexes, future in submitted:
                group = await future
                if group.items is None:  # the group's batch failed: every item is unknown
                    continue
                if group.outcome is not Outcome.OK:  # an atomic group, refused whole
                    return BulkReply(list(group.items), len(group.items) - 1)
                for index, reply in zip(indexes, group.items, strict=True):
                    # A reply resting on memory alone (a refusal, a replay) holds only if the
                    # shard stayed served under one epoch, as for a single operation.
                    item_shard = shards[index]
                    assert item_shard is not None
                    if (reply.outcome not in _WRITTEN or reply.replayed) and (
                        not ownership.serving(item_shard)
                        or ownership.epoch(item_shard) != epochs[item_shard]
                    ):
                        reply = _UNAVAILABLE
                    replies[index] = reply
        finally:
            for shard in served:
                self._release(shard)
        return BulkReply(replies, None)

    @property
    def bulk_waiting(self) -> int:
        """Bulk requests waiting for mailbox room now."""
        return self._bulk_waiting

    def _fits(self, wanted: dict[Shard, int]) -> bool:
        mailbox_max = self.limits.mailbox_commands_max
        return all(shard.mailbox_depth + count <= mailbox_max for shard, count in wanted.items())

    async def _wait_for_room(self, wanted: dict[Shard, int]) -> None:
        """Wait, first come first served, until every shard has room for its share.

        Polled: a shard frees room whenever it drains a batch, and a bulk request that
        waits at all waits for a commit or more (milliseconds), so a 1 ms poll by the one
        request at the head of the line costs little and needs no hook in the shards.
        """
        limits = self.limits
        if self._bulk_waiting >= limits.bulk_waiting_max:
            self._observer.command_rejected("overloaded")
            raise EngineOverloaded("too many bulk requests are waiting for room")
        self._bulk_waiting += 1
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limits.bulk_admission_wait_s
        try:
            async with self._bulk_line:
                while not self._fits(wanted):
                    if loop.time() >= deadline or not self.accepting:
                        self._observer.command_rejected("overloaded")
                        raise EngineOverloaded("the shards stayed full past the admission wait")
                    await asyncio.sleep(_ROOM_POLL_S)
        finally:
            self._bulk_waiting -= 1

    async def create_wallet(
        self,
        wallet_id: UUID | None,
        idempotency_key: str | None,
        currency: Currency | None = None,
        metadata: Metadata = NO_METADATA,
    ) -> tuple[UUID, Reply]:
        """Create a wallet (with a chosen or a new id) in ``currency`` (None: the default
        currency); returns the id and the reply."""
        fingerprint = "" if wallet_id is None else str(wallet_id)
        if currency is None or currency == self.default_currency:
            currency = self.default_currency  # the fingerprint of a request of before
        else:
            fingerprint += f"|{currency.code}"
        if metadata:
            # Spelled so that a creation without metadata keeps the fingerprint stored
            # before metadata existed (its retry still replays).
            fingerprint = json.dumps([fingerprint, metadata], separators=(",", ":"))
        if wallet_id is None:
            if idempotency_key is None:
                wallet_id = self._new_served_id()
            else:
                wallet_id = uuid.uuid5(CREATE_KEY_NAMESPACE, idempotency_key)
        shard, pipeline = self._route(wallet_id)
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        reply = await self._answer(
            shard, pipeline,
            CreateWallet(wallet_id, idempotency_key, fingerprint, future, currency, metadata),
        )  # fmt: skip
        return wallet_id, reply

    def _new_served_id(self) -> UUID:
        ownership = self.ownership
        wallet_id = new_uuid4()
        if not ownership.fenced:
            return wallet_id
        for _ in range(CREATE_ID_TRIES_MAX):
            if ownership.serving(shard_of(wallet_id, ownership.shard_count)):
                break
            wallet_id = new_uuid4()
        return wallet_id

    async def read(self, wallet_id: UUID) -> Reply:
        """The committed wallet; resident wallets are answered without a mailbox trip."""
        shard, pipeline = self._route(wallet_id)
        view = pipeline.read_committed(wallet_id)
        if view is not None:
            return Reply(Outcome.OK, view)
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        return await self._answer(shard, pipeline, ReadWallet(wallet_id, future))

    async def transfer(
        self,
        transfer_id: UUID | None,
        idempotency_key: str | None,
        from_wallet_id: UUID,
        to_wallet_id: UUID,
        amount: int,
        reference: str | None,
        actor: str | None = None,
        scale: int | None = None,
        metadata: Metadata = NO_METADATA,
    ) -> tuple[UUID, TransferReply]:
        """Move money between two wallets (docs/ARCHITECTURE.md, "Transfers"); returns the
        transfer id (chosen, derived from the key, or new) and the reply."""
        fresh_id = transfer_id is None and idempotency_key is None
        if transfer_id is None:
            if idempotency_key is None:
                transfer_id = new_uuid4()
            else:
                transfer_id = uuid.uuid5(TRANSFER_KEY_NAMESPACE, idempotency_key)
        if self._stopping:
            raise EngineStopping("the engine is stopping")
        reply = await self.transfers.transfer(
            transfer_id,
            from_wallet_id,
            to_wallet_id,
            amount,
            reference,
            fresh_id=fresh_id,
            actor=actor,
            scale=scale,
            metadata=metadata,
        )
        return transfer_id, reply

    async def read_transfer(self, transfer_id: UUID) -> TransferRecord | None:
        return await self.transfers.read(transfer_id)

    async def refund(
        self,
        original_id: UUID,
        idempotency_key: str,
        amount: int | None,
        reason: str | None,
        actor: str | None = None,
        scale: int | None = None,
        metadata: Metadata = NO_METADATA,
    ) -> tuple[UUID, TransferReply]:
        """Refund a COMPLETED transfer (engine/transfers.py ``refund``); returns the refund's
        id, derived from the original and the key, and the reply."""
        refund_id = uuid.uuid5(REFUND_KEY_NAMESPACE, f"{original_id}:{idempotency_key}")
        if self._stopping:
            raise EngineStopping("the engine is stopping")
        reply = await self.transfers.refund(
            refund_id, original_id, amount, reason, actor=actor, scale=scale, metadata=metadata
        )
        return refund_id, reply

    async def reverse(
        self,
        wallet_id: UUID,
        seq: int,
        idempotency_key: str,
        reason: str | None,
        actor: str | None = None,
        metadata: Metadata = NO_METADATA,
    ) -> tuple[Reply, OperationRecord | None]:
        """Reverse the wallet's DEPOSIT or WITHDRAW ``seq`` (docs/ARCHITECTURE.md, "Refunds
        and reversals"): the opposite movement of its amount on the same wallet, a
        DEPOSIT_REVERSAL (a debit: refused like a withdrawal, recorded under its key) or a
        WITHDRAW_REVERSAL (a credit), keyed ``reversal_key(seq, key)``. Returns the reply and
        the original row (None when not found).

        The original is read from storage (the ledger keeps no log rows), with its reversal
        if any: one under another key answers ALREADY_REVERSED at once; one under this key
        is replayed by the shard from its key. Two reversals under different keys at once
        both pass that read; storage's unique index (wallet, original seq) refuses the
        second, which the pipeline answers alone ALREADY_REVERSED (engine/shard.py)."""
        shard, pipeline = self._route(wallet_id)  # NotOwner first: the owner reads and applies
        try:
            original, reversal = await asyncio.wait_for(
                self.log.read_operation(wallet_id, seq), self.limits.load_timeout_s
            )
        except (StorageError, TimeoutError):
            return _UNAVAILABLE, None
        if original is None:
            return Reply(Outcome.OPERATION_NOT_FOUND), None
        kind = REVERSAL_KINDS.get(original.kind)
        if kind is None:
            return Reply(Outcome.NOT_REVERSIBLE), original
        key = reversal_key(seq, idempotency_key)
        if reversal is not None and reversal.idempotency_key != key:
            return Reply(Outcome.ALREADY_REVERSED), original
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        reply = await self._answer(
            shard, pipeline,
            ApplyOperation(
                wallet_id, kind, original.amount, key, future, reason, actor, metadata=metadata
            ),
        )  # fmt: skip
        return reply, original

    async def pay(
        self,
        payment_id: UUID | None,
        idempotency_key: str | None,
        postings: Sequence[Posting],
        reference: str | None,
        metadata: Metadata = NO_METADATA,
        actor: str | None = None,
    ) -> tuple[UUID, PaymentReply]:
        """Apply every posting or none (docs/ARCHITECTURE.md, "Payments"); returns the
        payment id (chosen, derived from the key, or new) and the reply."""
        if payment_id is None:
            if idempotency_key is None:
                payment_id = new_uuid4()
            else:
                payment_id = uuid.uuid5(PAYMENT_KEY_NAMESPACE, idempotency_key)
        if self._stopping:
            raise EngineStopping("the engine is stopping")
        reply = await self.payments.pay(payment_id, postings, reference, metadata, actor)
        return payment_id, reply

    async def read_payment(self, payment_id: UUID) -> PaymentRecord | None:
        return await self.payments.read(payment_id)

    async def refund_payment(
        self,
        payment_id: UUID,
        idempotency_key: str,
        reason: str | None,
        actor: str | None = None,
        metadata: Metadata = NO_METADATA,
    ) -> tuple[PaymentRecord | None, list[tuple[UUID, TransferReply]]]:
        """Refund what is left of every posting of a COMPLETED payment (docs/API.md,
        "Payments"): one ordinary refund per posting (``refund``: the WD010 bound per
        posting, refused per posting), all at once. Not atomic as a group: each refund is a
        transfer of its own, answered on its own. Each refund's key is derived from the
        client's key (``payment_refund_key``), so its id is derived from the payment's id
        (through the posting's transfer id), the key and the posting's index: a retry
        replays every refund made. Returns the payment (None: no such payment) and, when it
        is COMPLETED, each posting's refund id and reply, in posting order (else none)."""
        payment = await self.read_payment(payment_id)
        if payment is None or payment.status is not PaymentStatus.COMPLETED:
            return payment, []
        key = payment_refund_key(idempotency_key)
        replies = await asyncio.gather(*(
            self.refund(posting.transfer_id, key, None, reason, actor, None, metadata)
            for posting in payment.postings
        ))  # fmt: skip
        return payment, list(replies)

    async def read_as_of(
        self, wallet_id: UUID, at_us: int, reader: LogReader, timeout_s: float
    ) -> WalletAsOf | None:
        """The wallet as the log holds it at ``at_us`` (None: it did not exist then), read
        once that is final: this process's clock is past ``at_us`` and no batch of the
        wallet's shard stamped at or before it is in flight (engine/shard.py, "Stamps").

        Only the owner knows its batches in flight: ``NotOwner`` elsewhere, and when the
        shard changed hands meanwhile (the edge forwards the request to the owner).
        ``TimeoutError`` when that takes more than ``timeout_s``: a commit is slow.
        """
        shard = self._route(wallet_id)[0]
        epoch = self.ownership.epoch(shard)
        async with asyncio.timeout(timeout_s):
            # Stamps come from this clock and never go below it: once it reads past at_us,
            # every batch prepared from then on is stamped after at_us.
            ahead_us = at_us - self._clock_us()
            if ahead_us >= 0:  # 1 ms more: the event loop's clock is not this one
                await asyncio.sleep(ahead_us / 1_000_000 + 0.001)
                if self._clock_us() <= at_us:  # this clock was slewed back meanwhile
                    raise TimeoutError(f"the clock did not pass {at_us}")
            # Routed again: the shard's pipeline may have been replaced while this slept
            # (the fresh one waits for its predecessor's batches too).
            await self._route(wallet_id)[1].settled(at_us)
        found = await reader.wallet_as_of(wallet_id, at_us)
        if not (self.ownership.serving(shard) and self.ownership.epoch(shard) == epoch):
            raise NotOwner(shard)
        return found

    def read_resident(self, wallet_id: UUID) -> WalletView | None:
        return self._route(wallet_id)[1].read_committed(wallet_id)

    def mailbox_depths(self) -> list[int]:
        return [shard.mailbox_depth for shard in self._shards]

    def resident_wallets(self) -> int:
        return sum(shard.resident_wallets for shard in self._shards)


# Outcomes whose batch wrote to the log, so the fence vouched for them.
_WRITTEN = frozenset({Outcome.OK, Outcome.CREATED})
