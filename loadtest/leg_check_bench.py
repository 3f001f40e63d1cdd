"""What the leg checks cost one append: ``python -m loadtest.leg_check_bench``.

    python -m loadtest.leg_check_bench [--runs 7] [--commits 1000] [--sizes 1,10,50]
                                       [--shapes transfer,hold]

Migration 0010 (legs_match_their_transfers_and_holds) makes ``walletd_append_transfers`` and
``walletd_append_holds`` take the batch's log rows and check them against their transfers
and holds. This writes the same batches through ``PostgresLog.append_batch`` two ways, in
one embedded PostgreSQL database (fsync on), alternating run by run:

- ``checked``: as shipped (the 15- and 22-argument functions of migration 0010);
- ``unchecked``: the functions as migrations 0007 / 0008 defined them, created beside the
  new ones as overloads (10 and 17 arguments), called by the same statements without the
  log-row arguments.

Shapes, per batch of ``size`` pairs: ``transfer`` = a joint transfer per pair (TRANSFER_OUT
+ TRANSFER_IN rows, the transfer opened and closed COMPLETED: what one pipeline writes for
POST /transfers); ``hold`` = a hold created and captured in part per wallet (HOLD, CAPTURE,
RELEASE rows, the hold inserted and closed). Printed: the PostgreSQL backend's CPU µs per
commit (utime + stime from /proc: steadier than latency on a shared machine) as medians of
the runs, and the median latency per commit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import asyncpg

from loadtest.feed_bench import _cpu_seconds
from walletd.engine.commands import hold_key, transfer_leg_key
from walletd.engine.model import (
    Batch,
    HoldRecord,
    HoldStatus,
    HoldUpdate,
    NewWallet,
    OperationKind,
    OperationRecord,
    SnapshotUpdate,
    TransferRecord,
    TransferStatus,
    TransferUpdate,
)
from walletd.persistence import postgres_log
from walletd.persistence.database import PoolSettings, create_pool
from walletd.persistence.embedded import EmbeddedPostgres
from walletd.persistence.migrate import apply_migrations

__all__ = ["main"]

K = OperationKind
_FUNDS = 10**12


def _old_function(migration: str, name: str) -> str:
    """The CREATE FUNCTION text of ``name`` in the migration file ``migration``."""
    text = resources.files("walletd.persistence.migrations").joinpath(migration).read_text()
    found = re.search(rf"CREATE FUNCTION {name}\(.*?\n\$\$;", text, re.DOTALL)
    assert found is not None, (migration, name)
    return found.group(0)


# The statements without the log-row arguments: the unchecked overloads answer them.
_UNCHECKED = {
    key: statement.replace(", $5, $6, $7, $8, $10)", ")")
    for key, statement in postgres_log._APPEND_STATEMENTS.items()
}


@contextlib.contextmanager
def _statements(checked: bool) -> Iterator[None]:
    if checked:
        yield
        return
    shipped = postgres_log._APPEND_STATEMENTS
    postgres_log._APPEND_STATEMENTS = _UNCHECKED
    try:
        yield
    finally:
        postgres_log._APPEND_STATEMENTS = shipped


class Wallets:
    """Pairs of wallets and their stored (seq, balance, held)."""

    def __init__(self, count: int) -> None:
        self.ids = [uuid.uuid4() for _ in range(count)]
        self.state = {wallet: [0, 0, 0] for wallet in self.ids}

    def row(self, batch: Batch, wallet: uuid.UUID, kind: OperationKind, amount: int,
            key: str | None, balance: int, held: int) -> None:  # fmt: skip
        state = self.state[wallet]
        state[0] += 1
        state[1] += balance
        state[2] += held
        now = time.time_ns() // 1000
        batch.operations.append(
            OperationRecord(wallet, state[0], kind, amount, state[1], key, now, state[2])
        )

    def snapshots(self, batch: Batch, before: dict[uuid.UUID, int]) -> Batch:
        now = time.time_ns() // 1000
        batch.snapshots = [
            SnapshotUpdate(w, seq, self.state[w][0], self.state[w][1], now, self.state[w][2])
            for w, seq in before.items()
        ]
        return batch


def transfer_batch(wallets: Wallets, size: int) -> Batch:
    batch = Batch()
    senders, receivers = wallets.ids[:size], wallets.ids[size : 2 * size]
    before = {w: wallets.state[w][0] for w in (*senders, *receivers)}
    now = time.time_ns() // 1000
    for sender, receiver in zip(senders, receivers, strict=True):
        transfer_id = uuid.uuid4()
        wallets.row(batch, sender, K.TRANSFER_OUT, 1,
                    transfer_leg_key(K.TRANSFER_OUT, transfer_id), -1, 0)  # fmt: skip
        wallets.row(batch, receiver, K.TRANSFER_IN, 1,
                    transfer_leg_key(K.TRANSFER_IN, transfer_id), 1, 0)  # fmt: skip
        batch.new_transfers.append(
            TransferRecord(transfer_id, sender, receiver, 1, None, TransferStatus.PENDING,
                           None, now, now)
        )  # fmt: skip
        batch.transfer_updates.append(
            TransferUpdate(transfer_id, TransferStatus.COMPLETED, None, now)
        )
    return wallets.snapshots(batch, before)


def hold_batch(wallets: Wallets, size: int) -> Batch:
    batch = Batch()
    holders = wallets.ids[:size]
    before = {w: wallets.state[w][0] for w in holders}
    now = time.time_ns() // 1000
    for wallet in holders:
        hold_id = uuid.uuid4()
        wallets.row(batch, wallet, K.HOLD, 10, hold_key(K.HOLD, hold_id), 0, 10)
        wallets.row(batch, wallet, K.CAPTURE, 3, hold_key(K.CAPTURE, hold_id), -3, -3)
        wallets.row(batch, wallet, K.RELEASE, 7, hold_key(K.RELEASE, hold_id), 0, -7)
        batch.new_holds.append(
            HoldRecord(hold_id, wallet, 0, 10, HoldStatus.PENDING, now + 10**9, 0, None, None,
                       None, None, "", None, None, now, now)
        )  # fmt: skip
        batch.hold_updates.append(
            HoldUpdate(hold_id, HoldStatus.CAPTURED, 3, None, None, None, None, now)
        )
    return wallets.snapshots(batch, before)


SHAPES: dict[str, Callable[[Wallets, int], Batch]] = {
    "transfer": transfer_batch,
    "hold": hold_batch,
}


async def _measure(args: argparse.Namespace, dsn: str) -> None:
    connection = await asyncpg.connect(dsn)
    try:
        await apply_migrations(connection)
        await connection.execute(_old_function("0007_transfers.sql", "walletd_append_transfers"))
        await connection.execute(_old_function("0008_holds.sql", "walletd_append_holds"))
    finally:
        await connection.close()
    sizes = [int(size) for size in args.sizes.split(",")]
    pools: dict[bool, asyncpg.Pool] = {}
    logs: dict[bool, postgres_log.PostgresLog] = {}
    backends: dict[bool, int] = {}
    for checked in (True, False):
        # One connection each: its backend's CPU is the append's.
        pools[checked] = await create_pool(dsn, PoolSettings(size_max=1))
        logs[checked] = postgres_log.PostgresLog(pools[checked])
        backends[checked] = int(await pools[checked].fetchval("SELECT pg_backend_pid()"))
    try:
        wallets = Wallets(2 * max(sizes))
        funding = Batch(new_wallets=[NewWallet(w, 0, None, "") for w in wallets.ids])
        await logs[True].append_batch(funding)
        deposit = Batch()
        before = {w: 0 for w in wallets.ids}
        for wallet in wallets.ids:
            wallets.row(deposit, wallet, K.DEPOSIT, _FUNDS, None, _FUNDS, 0)
        await logs[True].append_batch(wallets.snapshots(deposit, before))
        print("| shape | pairs per batch | PostgreSQL CPU µs per commit: checked / unchecked "
              "| change | median ms per commit: checked / unchecked |")  # fmt: skip
        print("| --- | ---: | ---: | ---: | ---: |")
        for shape in args.shapes.split(","):
            build = SHAPES[shape]
            for size in sizes:
                cpu_us: dict[bool, list[float]] = {True: [], False: []}
                latencies: dict[bool, list[float]] = {True: [], False: []}
                for run in range(args.runs):
                    for checked in (True, False) if run % 2 == 0 else (False, True):
                        cpu_before = _cpu_seconds(backends[checked])
                        with _statements(checked):
                            for _ in range(args.commits):
                                batch = build(wallets, size)
                                started = time.perf_counter()
                                await logs[checked].append_batch(batch)
                                latencies[checked].append(time.perf_counter() - started)
                        spent = _cpu_seconds(backends[checked]) - cpu_before
                        cpu_us[checked].append(spent * 1e6 / args.commits)
                checked_us = statistics.median(cpu_us[True])
                unchecked_us = statistics.median(cpu_us[False])
                checked_ms = statistics.median(latencies[True]) * 1000
                unchecked_ms = statistics.median(latencies[False]) * 1000
                print(f"| {shape} | {size} | {checked_us:.0f} / {unchecked_us:.0f} | "
                      f"{100 * (checked_us / max(unchecked_us, 1e-9) - 1):+.1f}% | "
                      f"{checked_ms:.2f} / {unchecked_ms:.2f} |", flush=True)  # fmt: skip
    finally:
        for pool in pools.values():
            await pool.close()


async def _bench(args: argparse.Namespace) -> None:
    folder = Path(tempfile.mkdtemp(prefix="walletd-leg-check-"))
    embedded = EmbeddedPostgres(folder)
    try:
        dsn = await asyncio.to_thread(embedded.start)
        await _measure(args, dsn)
    finally:
        await asyncio.to_thread(embedded.stop, "immediate")
        shutil.rmtree(folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="runs per shape, size and variant")
    parser.add_argument("--commits", type=int, default=1000, help="commits per run")
    parser.add_argument("--sizes", default="1,10,50", help="pairs per batch")
    parser.add_argument("--shapes", default=",".join(SHAPES), help="of: " + ", ".join(SHAPES))
    args: Any = parser.parse_args(argv)
    asyncio.run(_bench(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
