"""Test doubles for engine tests: a controllable in-memory log and a recording observer.

``ControlledLog`` is the shipped ``InMemoryLog`` plus gates: an append or a load can be held
until the test opens its gate, which is how tests observe what the engine does while a
commit is in flight. It also records every call, so tests can count loads and check that a
shard never has two commits in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace
from uuid import UUID

from walletd.engine.limits import EngineLimits
from walletd.engine.memory_log import InMemoryLog
from walletd.engine.model import (
    CREDIT_KINDS,
    Batch,
    NewWallet,
    OperationRecord,
    RefusalRecord,
    WalletRecord,
)
from walletd.engine.observer import EngineObserver
from walletd.engine.ports import CommitOutcomeUnknown, StorageError
from walletd.engine.router import Engine, shard_of

WAIT_S = 5.0  # every wait in these tests is bounded; a hang fails the test instead


class Gate:
    """Closed until opened; counts who is waiting so a test can wait for them to arrive."""

    def __init__(self) -> None:
        self._open = asyncio.Event()
        self.waiting = 0
        self.arrived = 0

    async def pass_through(self) -> None:
        self.arrived += 1
        self.waiting += 1
        try:
            await self._open.wait()
        finally:
            self.waiting -= 1

    def open(self) -> None:
        self._open.set()

    async def wait_for_arrivals(self, count: int) -> None:
        await until(lambda: self.arrived >= count)


class ControlledLog(InMemoryLog):
    def __init__(self) -> None:
        super().__init__()
        self.append_gate: Gate | None = None
        self.load_gate: Gate | None = None
        self.load_calls: list[list[UUID]] = []
        self.finds = 0  # find_operations calls
        self.appended: list[Batch] = []
        self.appends_in_flight = 0
        self.appends_in_flight_max = 0
        # Raised by the next append instead of writing (an exception storage should not raise).
        self.raise_on_append: Exception | None = None
        # The next N wallet loads return a corrupt row (a negative balance): the first
        # operation on it breaks a ledger invariant and crashes its shard, for real.
        self.corrupt_loads = 0
        # The next N appends that close a transfer (credit or refund leg) fail; with
        # ``closes_land`` they are written first (an ambiguous commit).
        self.fail_next_closes = 0
        self.closes_land = False

    async def load_wallets(self, wallet_ids: Sequence[UUID]) -> dict[UUID, WalletRecord]:
        self.load_calls.append(list(wallet_ids))
        if self.load_gate is not None:
            await self.load_gate.pass_through()
        loaded = await super().load_wallets(wallet_ids)
        if self.corrupt_loads > 0 and loaded:
            self.corrupt_loads -= 1
            return {w: replace(r, balance=-100) for w, r in loaded.items()}
        return loaded

    async def append_batch(self, batch: Batch) -> None:
        self.appends_in_flight += 1
        self.appends_in_flight_max = max(self.appends_in_flight_max, self.appends_in_flight)
        try:
            if self.append_gate is not None:
                await self.append_gate.pass_through()
            if self.raise_on_append is not None:
                error, self.raise_on_append = self.raise_on_append, None
                raise error
            if self.fail_next_closes > 0 and batch.transfer_updates:
                self.fail_next_closes -= 1
                if not self.closes_land:
                    raise StorageError("injected failure of a transfer-closing commit")
                self._apply(batch)
                raise CommitOutcomeUnknown("injected: connection lost after the commit")
            await super().append_batch(batch)
            self.appended.append(batch)
        finally:
            self.appends_in_flight -= 1

    async def find_operations(
        self, keys: Sequence[tuple[UUID, str]]
    ) -> dict[tuple[UUID, str], OperationRecord | RefusalRecord]:
        self.finds += 1
        return await super().find_operations(keys)

    def loads_of(self, wallet_id: UUID) -> int:
        return sum(wallet_id in call for call in self.load_calls)

    def add_wallet(self, wallet_id: UUID) -> None:
        """Put a wallet straight into the log, as a previous run of walletd would have."""
        self._apply(Batch(new_wallets=[NewWallet(wallet_id, 1, None, "")]))

    def balance_from_log(self, wallet_id: UUID) -> int:
        total = 0
        for op in self.operations.get(wallet_id, []):
            total += op.amount if op.kind in CREDIT_KINDS else -op.amount
        return total


@dataclass
class RecordingObserver(EngineObserver):
    committed: list[tuple[int, int, int]] = field(default_factory=list)  # shard, ops, commands
    failed: list[tuple[int, int, str]] = field(default_factory=list)  # shard, commands, reason
    rejected: list[str] = field(default_factory=list)
    loaded: int = 0
    evicted: int = 0
    restarted: list[int] = field(default_factory=list)

    def batch_committed(self, shard: int, ops: int, commands: int, seconds: float) -> None:
        assert seconds >= 0
        self.committed.append((shard, ops, commands))

    def batch_failed(self, shard: int, commands: int, reason: str) -> None:
        self.failed.append((shard, commands, reason))

    def command_rejected(self, reason: str) -> None:
        self.rejected.append(reason)

    def wallets_loaded(self, shard: int, count: int) -> None:
        self.loaded += count

    def wallets_evicted(self, shard: int, count: int) -> None:
        self.evicted += count

    def shard_restarted(self, shard: int) -> None:
        self.restarted.append(shard)


async def until(predicate: Callable[[], bool], timeout_s: float = WAIT_S) -> None:
    """Let the event loop run until ``predicate`` holds; fail after ``timeout_s``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.001)


@contextlib.asynccontextmanager
async def running_engine(
    log: ControlledLog,
    limits: EngineLimits | None = None,
    observer: EngineObserver | None = None,
    clock_us: Callable[[], int] | None = None,
    on_fatal: Callable[[str], None] | None = None,
) -> AsyncIterator[Engine]:
    limits = limits or EngineLimits(pipelines=2, batch_ops_max=64, mailbox_commands_max=256)
    if clock_us is None:
        engine = Engine(log, limits, observer=observer, on_fatal=on_fatal)
    else:
        engine = Engine(log, limits, observer=observer, clock_us=clock_us, on_fatal=on_fatal)
    await engine.start()
    try:
        yield engine
    finally:
        await asyncio.wait_for(engine.stop(), WAIT_S)


def wallet_ids_on_shard(shard: int, shards: int, count: int) -> list[UUID]:
    """Deterministic wallet ids that hash to ``shard``."""
    found: list[UUID] = []
    number = 1
    while len(found) < count:
        candidate = UUID(int=number)
        if shard_of(candidate, shards) == shard:
            found.append(candidate)
        number += 1
    return found
