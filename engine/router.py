"""The engine: a fixed set of shards and the stable hash that routes a wallet to one.

Routing is ``crc32(wallet_id.bytes) % shards`` (IEEE CRC-32 of the UUID's 16 bytes, as in
``zlib.crc32``). It depends on nothing but the id and the shard count, so it is the same
across restarts, processes and versions: the shard is the unit of distribution later.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
import zlib
from collections import deque
from collections.abc import Callable
from uuid import UUID

from walletd.engine.commands import ApplyOperation, CreateWallet, Outcome, ReadWallet, Reply
from walletd.engine.errors import EngineOverloaded, EngineStopping
from walletd.engine.limits import EngineLimits
from walletd.engine.model import OperationKind, WalletRecord, WalletView
from walletd.engine.observer import EngineObserver
from walletd.engine.ports import WalletLog
from walletd.engine.shard import Shard

__all__ = ["CREATE_KEY_NAMESPACE", "Engine", "shard_of", "wall_clock_us"]

_log = logging.getLogger("walletd.engine")

# Wallets created with an Idempotency-Key and no chosen id get uuid5(namespace, key), so a
# retry lands on the same id, hence the same shard, which finds its own earlier answer.
CREATE_KEY_NAMESPACE = UUID("6f1c9a52-3f0e-4d8e-9d0a-5b7f2c1e8a44")


def wall_clock_us() -> int:
    return time.time_ns() // 1000


def shard_of(wallet_id: UUID, shards: int) -> int:
    return zlib.crc32(wallet_id.bytes) % shards


class Engine:
    def __init__(
        self,
        log: WalletLog,
        limits: EngineLimits | None = None,
        *,
        clock_us: Callable[[], int] = wall_clock_us,
        observer: EngineObserver | None = None,
        on_fatal: Callable[[str], None] | None = None,
    ) -> None:
        self.limits = limits or EngineLimits()
        self.log = log
        self._clock_us = clock_us
        self._observer = observer or EngineObserver()
        # Called once when the engine gives up (shards crash faster than the restart rate):
        # the process should exit non-zero so that its own supervisor restarts it.
        self._on_fatal = on_fatal
        self._shards = [self._new_shard(index) for index in range(self.limits.shards)]
        self._started = False
        self._stopping = False
        self._restarted_at: deque[float] = deque()  # monotonic times of recent restarts
        self.failure: str | None = None  # why the engine gave up, once it has

    async def warm_up(self, wallets_max: int) -> int:
        """Before start: load up to ``wallets_max`` most recently updated wallets into their
        shards, so the first requests after a restart find them resident. Returns how many."""
        if wallets_max <= 0:
            return 0
        records = await self.log.recent_wallets(min(wallets_max, self.limits.resident_wallets_max))
        by_shard: dict[Shard, list[WalletRecord]] = {shard: [] for shard in self._shards}
        for record in records:
            by_shard[self._shard(record.wallet_id)].append(record)
        return sum(shard.warm(part) for shard, part in by_shard.items())

    async def start(self) -> None:
        for shard in self._shards:
            self._start_shard(shard)
        self._started = True

    async def stop(self) -> None:
        """Refuse new commands, answer every accepted one, and stop the shards."""
        self._stopping = True
        await asyncio.gather(*(shard.stop() for shard in self._shards), return_exceptions=True)

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
        return Shard(index, self.log, self.limits, self._clock_us, self._observer)

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
        return self._shards

    def _shard(self, wallet_id: UUID) -> Shard:
        shards = self._shards
        if len(shards) == 1:  # the default: no hash to compute (UUID.bytes is Python code)
            return shards[0]
        return shards[shard_of(wallet_id, len(shards))]

    def _submit(self, shard: Shard, command: ApplyOperation | CreateWallet | ReadWallet) -> None:
        try:
            shard.submit(command)
        except EngineOverloaded:
            self._observer.command_rejected("overloaded")
            raise
        except EngineStopping:
            self._observer.command_rejected("stopping")
            raise

    async def apply(
        self, wallet_id: UUID, kind: OperationKind, amount: int, idempotency_key: str | None
    ) -> Reply:
        """Apply a deposit or withdrawal; the reply arrives once its batch has committed."""
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._submit(
            self._shard(wallet_id),
            ApplyOperation(wallet_id, kind, amount, idempotency_key, future),
        )
        return await future

    async def create_wallet(
        self, wallet_id: UUID | None, idempotency_key: str | None
    ) -> tuple[UUID, Reply]:
        """Create a wallet (with a chosen or a new id); returns the id and the reply."""
        fingerprint = "" if wallet_id is None else str(wallet_id)
        if wallet_id is None:
            if idempotency_key is None:
                wallet_id = uuid.uuid4()
            else:
                wallet_id = uuid.uuid5(CREATE_KEY_NAMESPACE, idempotency_key)
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._submit(
            self._shard(wallet_id), CreateWallet(wallet_id, idempotency_key, fingerprint, future)
        )
        return wallet_id, await future

    async def read(self, wallet_id: UUID) -> Reply:
        """The committed wallet; resident wallets are answered without a mailbox trip."""
        shard = self._shard(wallet_id)
        view = shard.read_committed(wallet_id)
        if view is not None:
            return Reply(Outcome.OK, view)
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._submit(shard, ReadWallet(wallet_id, future))
        return await future

    def read_resident(self, wallet_id: UUID) -> WalletView | None:
        return self._shard(wallet_id).read_committed(wallet_id)

    def mailbox_depths(self) -> list[int]:
        return [shard.mailbox_depth for shard in self._shards]

    def resident_wallets(self) -> int:
        return sum(shard.resident_wallets for shard in self._shards)
