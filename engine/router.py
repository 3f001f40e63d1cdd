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
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from uuid import UUID

from walletd.engine.commands import ApplyOperation, CreateWallet, Outcome, ReadWallet, Reply
from walletd.engine.errors import EngineOverloaded, EngineStopping, NotOwner
from walletd.engine.limits import EngineLimits
from walletd.engine.model import (
    Batch,
    OperationKind,
    OperationRecord,
    RefusalRecord,
    WalletRecord,
    WalletView,
)
from walletd.engine.observer import EngineObserver
from walletd.engine.ownership import Ownership, shard_of
from walletd.engine.ports import StaleEpoch, WalletLog
from walletd.engine.shard import Shard

__all__ = ["CREATE_ID_TRIES_MAX", "CREATE_KEY_NAMESPACE", "Engine", "shard_of", "wall_clock_us"]

_log = logging.getLogger("walletd.engine")

# Wallets created with an Idempotency-Key and no chosen id get uuid5(namespace, key), so a
# retry lands on the same id, hence the same shard, which finds its own earlier answer.
CREATE_KEY_NAMESPACE = UUID("6f1c9a52-3f0e-4d8e-9d0a-5b7f2c1e8a44")


def wall_clock_us() -> int:
    return time.time_ns() // 1000


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
    ) -> None:
        self.limits = limits or EngineLimits()
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
        self._restarted_at: deque[float] = deque()  # monotonic times of recent restarts
        self.failure: str | None = None  # why the engine gave up, once it has

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

    async def stop(self) -> None:
        """Refuse new commands, answer every accepted one, and stop the shards."""
        self._stopping = True
        await asyncio.gather(*(shard.stop() for shard in self._shards), return_exceptions=True)

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
        fresh = self._shards[index] = self._new_shard(index)
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

    def _new_shard(self, index: int) -> Shard:
        return Shard(index, self._pipeline_log, self.limits, self._clock_us, self._observer)

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
        fresh = self._shards[shard.index] = self._new_shard(shard.index)
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

    def _submit(self, shard: Shard, command: ApplyOperation | CreateWallet | ReadWallet) -> None:
        try:
            shard.submit(command)
        except EngineOverloaded:
            self._observer.command_rejected("overloaded")
            raise
        except EngineStopping:
            self._observer.command_rejected("stopping")
            raise

    async def _answer(
        self, shard: int, pipeline: Shard, command: ApplyOperation | CreateWallet | ReadWallet
    ) -> Reply:
        """Submit and await the reply; a reply resting on memory alone is kept only if the
        shard stayed served under one epoch from admission to answer."""
        epoch = self.ownership.epoch(shard)
        self._submit(pipeline, command)
        self._admitted[shard] += 1
        try:
            reply = await command.reply
        finally:
            self._admitted[shard] -= 1
            if not self._admitted[shard] and self._drained:
                event = self._drained.pop(shard, None)
                if event is not None:
                    event.set()
        outcome = reply.outcome
        if outcome is Outcome.UNAVAILABLE or (
            outcome in _WRITTEN and not isinstance(command, ReadWallet)
        ):
            return reply  # committed under the fence (or a replay of it), or "unknown" already
        if self.ownership.serving(shard) and self.ownership.epoch(shard) == epoch:
            return reply
        return Reply(Outcome.UNAVAILABLE)

    async def apply(
        self, wallet_id: UUID, kind: OperationKind, amount: int, idempotency_key: str | None
    ) -> Reply:
        """Apply a deposit or withdrawal; the reply arrives once its batch has committed."""
        shard, pipeline = self._route(wallet_id)
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        return await self._answer(
            shard, pipeline, ApplyOperation(wallet_id, kind, amount, idempotency_key, future)
        )

    async def create_wallet(
        self, wallet_id: UUID | None, idempotency_key: str | None
    ) -> tuple[UUID, Reply]:
        """Create a wallet (with a chosen or a new id); returns the id and the reply."""
        fingerprint = "" if wallet_id is None else str(wallet_id)
        if wallet_id is None:
            if idempotency_key is None:
                wallet_id = self._new_served_id()
            else:
                wallet_id = uuid.uuid5(CREATE_KEY_NAMESPACE, idempotency_key)
        shard, pipeline = self._route(wallet_id)
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        reply = await self._answer(
            shard, pipeline, CreateWallet(wallet_id, idempotency_key, fingerprint, future)
        )
        return wallet_id, reply

    def _new_served_id(self) -> UUID:
        ownership = self.ownership
        wallet_id = uuid.uuid4()
        if not ownership.fenced:
            return wallet_id
        for _ in range(CREATE_ID_TRIES_MAX):
            if ownership.serving(shard_of(wallet_id, ownership.shard_count)):
                break
            wallet_id = uuid.uuid4()
        return wallet_id

    async def read(self, wallet_id: UUID) -> Reply:
        """The committed wallet; resident wallets are answered without a mailbox trip."""
        shard, pipeline = self._route(wallet_id)
        view = pipeline.read_committed(wallet_id)
        if view is not None:
            return Reply(Outcome.OK, view)
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        return await self._answer(shard, pipeline, ReadWallet(wallet_id, future))

    def read_resident(self, wallet_id: UUID) -> WalletView | None:
        return self._route(wallet_id)[1].read_committed(wallet_id)

    def mailbox_depths(self) -> list[int]:
        return [shard.mailbox_depth for shard in self._shards]

    def resident_wallets(self) -> int:
        return sum(shard.resident_wallets for shard in self._shards)


# Outcomes whose batch wrote to the log, so the fence vouched for them.
_WRITTEN = frozenset({Outcome.OK, Outcome.CREATED})
