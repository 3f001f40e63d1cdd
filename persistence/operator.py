"""Operator commands on the durable log: verify, restore, seed.

- ``verify`` replays the log in wallet order through two server-side cursors (wallets by id,
  operations by (wallet id, seq)) on two connections sharing one REPEATABLE READ snapshot
  (``pg_export_snapshot``), each with its next fetch in flight, and checks, for every
  wallet, that the snapshot's balance and seq equal the log's sum and last seq, and that the
  log's own chain holds (seq = 1, 2, 3, ..., each balance_after = the running balance,
  each held_after = the running held with 0 <= held <= balance, and created_at never goes
  back: as-of reads binary-search by it); the snapshot's held equals the log's too. Then
  that every wallet's held is the sum of its PENDING holds (``HELD_CHECK``, one statement).
  Memory is bounded by the cursor fetch size, whatever the table sizes. Then it checks
  that every log row and every wallet creation has exactly one change-feed position:
  none without one, no two sharing one (``FEED_POSITIONS_CHECK``).
- ``restore`` rebuilds every wallet's balance, held, seq and updated_at from the log in one
  transaction, holding every shard lease so no walletd serves the database meanwhile. It is
  one statement on purpose: split into 64 slices of the id space (to report progress) it
  took 3-4 times as long (200k wallets, 1M operations: 1.1-4.3 s against 5.8-8.8 s).
- ``seed`` bulk-loads wallets and their history with COPY, snapshot and log consistent.

Each takes an optional ``ProgressSink`` (the CLI's progress bar) that hears the expected
total and each step done: wallets for verify and seed, its one statement for restore.

Exceptions: ``DatabaseBusy`` (restore while a server runs), ``DatabaseError`` (connect).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol
from uuid import UUID

import asyncpg

from walletd.persistence.database import connect
from walletd.persistence.leases import hold_every_lease

__all__ = [
    "SEED_CHUNK_WALLETS",
    "VERIFY_FETCH_ROWS",
    "Mismatch",
    "ProgressSink",
    "RestoreReport",
    "SeedReport",
    "VerifyReport",
    "restore",
    "seed",
    "verify",
]

# Rows per FETCH from each cursor: the whole of verify's memory, whatever the table sizes.
VERIFY_FETCH_ROWS = 20_000
# Wallets generated and copied per COPY round by seed (with their operations).
SEED_CHUNK_WALLETS = 20_000
# Wallets replayed between two turns of the event loop during verify.
VERIFY_YIELD_WALLETS = 500

_DEPOSIT = 1
_WITHDRAW = 2
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


class ProgressSink(Protocol):
    """Hears how much work a command expects and each part of it done (cli/progress.py)."""

    def set_total(self, total: int | None) -> None: ...

    def advance(self, units: int) -> None: ...


class _NoProgress:
    def set_total(self, total: int | None) -> None:
        pass

    def advance(self, units: int) -> None:
        pass


@dataclass(frozen=True, slots=True)
class Mismatch:
    wallet_id: UUID
    problem: str

    def __str__(self) -> str:
        return f"mismatch: wallet {self.wallet_id}: {self.problem}"


@dataclass(slots=True)
class VerifyReport:
    wallets: int = 0
    operations: int = 0
    mismatches: int = 0
    seconds: float = 0.0
    first_mismatches: list[Mismatch] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return self.mismatches == 0

    def summary(self) -> str:
        verdict = "OK" if self.clean else f"{self.mismatches} MISMATCHES"
        return (
            f"verify: {self.wallets} wallets, {self.operations} operations checked in "
            f"{self.seconds:.1f} s: {verdict}"
        )


# How many mismatches the report keeps (all are passed to the callback, none accumulate).
MISMATCHES_KEPT_MAX = 100


# Rows of the change feed with no position, or sharing theirs with another row, each named
# by its wallet; at most FEED_MISMATCHES_MAX come back. Log rows cannot share one among
# themselves (id is their primary key), so only wallet creations are looked up: in the
# log's (xid, id) index and among each other. 3.3 s on 1M wallets / 5M operations, where
# one hash aggregate over both tables took 18 s.
FEED_MISMATCHES_MAX = 1000
FEED_POSITIONS_CHECK = f"""
SELECT w.id, w.created_xid::text, w.feed_id FROM wallets w
 WHERE w.created_xid IS NULL OR w.feed_id IS NULL
    OR EXISTS (SELECT 1 FROM wallet_operations o
                WHERE o.xid = w.created_xid AND o.id = w.feed_id)
UNION ALL
SELECT o.wallet_id, o.xid::text, o.id FROM wallet_operations o WHERE o.xid IS NULL
UNION ALL
SELECT w.id, w.created_xid::text, w.feed_id
  FROM wallets w
  JOIN (SELECT created_xid, feed_id FROM wallets GROUP BY 1, 2 HAVING count(*) > 1) AS d
       USING (created_xid, feed_id)
 LIMIT {FEED_MISMATCHES_MAX}
"""

_WALLETS_IN_ORDER = "SELECT id, balance, seq, held FROM wallets ORDER BY id"
# How each kind moves balance and held (migration 0008): DEPOSIT, TRANSFER_IN and
# TRANSFER_REFUND add money, HOLD and RELEASE move none, the others take it out; HOLD adds
# to held, CAPTURE and RELEASE take from it.
SIGNED_BALANCE_SQL = (
    "CASE WHEN kind IN (1, 4, 5) THEN amount WHEN kind IN (6, 8) THEN 0 ELSE -amount END"
)
SIGNED_HELD_SQL = "CASE kind WHEN 6 THEN amount WHEN 7 THEN -amount WHEN 8 THEN -amount ELSE 0 END"
# The signed amounts are computed by the server: fewer columns to decode per row. So is
# whether a row is stamped before the one before it (as-of reads binary-search a wallet's
# log by created_at, so it must not go back): a boolean, where a timestamp would be decoded.
_OPERATIONS_IN_ORDER = (
    f"SELECT wallet_id, seq, {SIGNED_BALANCE_SQL}, balance_after, "
    "created_at < lag(created_at) OVER (PARTITION BY wallet_id ORDER BY seq), "
    f"{SIGNED_HELD_SQL}, held_after "
    "FROM wallet_operations ORDER BY wallet_id, seq"
)
# Wallets whose held is not the sum of their PENDING holds (one statement: one snapshot).
HELD_CHECK = f"""
SELECT w.id, w.held, coalesce(h.pending, 0)
  FROM wallets w
  FULL JOIN (SELECT wallet_id, sum(amount) AS pending FROM holds WHERE status = 1
              GROUP BY wallet_id) AS h ON h.wallet_id = w.id
 WHERE w.held IS DISTINCT FROM coalesce(h.pending, 0)
 LIMIT {FEED_MISMATCHES_MAX}
"""


class _Rows:
    """A server-side cursor read in fixed-size fetches, the next one always in flight.

    Each reader owns its connection, so the fetch of the next batch overlaps with the
    replay of the current one: the server walks the index while Python checks rows.
    """

    def __init__(
        self, cursor: asyncpg.cursor.Cursor, fetch_rows: int, row_count: int | None = None
    ) -> None:
        self.row_count = row_count  # when known: the progress bar's total
        self._cursor = cursor
        self._fetch_rows = fetch_rows
        self._next: asyncio.Task[list[asyncpg.Record]] | None = asyncio.create_task(
            cursor.fetch(fetch_rows)
        )

    async def take_batch(self) -> list[asyncpg.Record]:
        """The next batch of rows; empty at the end."""
        if self._next is None:
            return []
        rows = await self._next
        self._next = None
        if len(rows) == self._fetch_rows:
            self._next = asyncio.create_task(self._cursor.fetch(self._fetch_rows))
        return rows

    async def close(self) -> None:
        if self._next is not None:
            self._next.cancel()
            with contextlib.suppress(asyncio.CancelledError, asyncpg.PostgresError):
                await self._next
            self._next = None


@contextlib.asynccontextmanager
async def _snapshot_readers(dsn: str, fetch_rows: int) -> AsyncIterator[tuple[_Rows, _Rows]]:
    """Wallets and operations readers on two connections that share one snapshot."""
    first = await connect(dsn)
    second: asyncpg.Connection | None = None
    readers: list[_Rows] = []
    try:
        second = await connect(dsn)
        async with (
            first.transaction(isolation="repeatable_read", readonly=True),
            second.transaction(isolation="repeatable_read", readonly=True),
        ):
            snapshot = await first.fetchval("SELECT pg_export_snapshot()")
            await second.execute(f"SET TRANSACTION SNAPSHOT '{snapshot}'")
            # The progress bar's total, counted in the same snapshot the cursor reads.
            wallet_count = await first.fetchval("SELECT count(*) FROM wallets")
            readers.append(
                _Rows(await first.cursor(_WALLETS_IN_ORDER), fetch_rows, int(wallet_count))
            )
            readers.append(_Rows(await second.cursor(_OPERATIONS_IN_ORDER), fetch_rows))
            try:
                yield readers[0], readers[1]
            finally:
                for reader in readers:
                    await reader.close()
    finally:
        for connection in (first, second):
            if connection is not None:
                await connection.close()


async def verify(
    dsn: str,
    on_mismatch: Callable[[Mismatch], None] = lambda _m: None,
    *,
    fetch_rows: int = VERIFY_FETCH_ROWS,
    progress: ProgressSink | None = None,
) -> VerifyReport:
    """Check every wallet's snapshot against its log; see the module docstring."""
    started = time.perf_counter()
    report = VerifyReport()
    progress = progress or _NoProgress()

    def found(wallet_id: UUID, problem: str) -> None:
        mismatch = Mismatch(wallet_id, problem)
        report.mismatches += 1
        if len(report.first_mismatches) < MISMATCHES_KEPT_MAX:
            report.first_mismatches.append(mismatch)
        on_mismatch(mismatch)

    operations_checked = 0
    async with _snapshot_readers(dsn, fetch_rows) as (wallets, operations):
        progress.set_total(wallets.row_count)
        pending: list[asyncpg.Record] = []  # log rows fetched, not yet replayed
        position = 0
        pending_rows = 0  # len(pending), kept in a local: this loop runs per log row
        for_wallets = await wallets.take_batch()
        while for_wallets:
            report.wallets += len(for_wallets)
            for index, (wallet_id, snap_balance, snap_seq, snap_held) in enumerate(for_wallets):
                if not index % VERIFY_YIELD_WALLETS:
                    # Let the event loop read the fetches in flight: the server streams on
                    # (another core) instead of stalling on a full socket buffer.
                    await asyncio.sleep(0)
                balance = 0
                held = 0
                seq = 0
                chain_ok = True
                while True:
                    if position >= pending_rows:
                        operations_checked += pending_rows
                        pending = await operations.take_batch()
                        position = 0
                        pending_rows = len(pending)
                        if not pending:
                            break
                    (
                        op_wallet,
                        op_seq,
                        signed_amount,
                        balance_after,
                        back,
                        signed_held,
                        held_after,
                    ) = pending[position]
                    if op_wallet != wallet_id:
                        if op_wallet < wallet_id:
                            found(op_wallet, "log rows without a snapshot row")
                            position += 1
                            continue
                        break
                    position += 1
                    balance += signed_amount
                    held += signed_held
                    seq += 1
                    if chain_ok and (
                        op_seq != seq
                        or balance_after != balance
                        or held_after != held
                        or not 0 <= held <= balance
                    ):
                        chain_ok = False
                        found(
                            wallet_id,
                            f"log chain broken at seq {op_seq} (expected seq {seq}, "
                            f"balance_after {balance_after}, replayed balance {balance}, "
                            f"held_after {held_after}, replayed held {held})",
                        )
                    if back:
                        found(wallet_id, f"created_at of seq {op_seq} is before seq {op_seq - 1}'s")
                if snap_balance != balance:
                    found(wallet_id, f"snapshot balance {snap_balance} != log sum {balance}")
                if snap_seq != seq:
                    found(wallet_id, f"snapshot seq {snap_seq} != log operations {seq}")
                if snap_held != held:
                    found(wallet_id, f"snapshot held {snap_held} != log held {held}")
            progress.advance(len(for_wallets))
            for_wallets = await wallets.take_batch()
        # Log rows past the last wallet belong to no snapshot row.
        while True:
            if position >= pending_rows:
                operations_checked += pending_rows
                pending = await operations.take_batch()
                position = 0
                pending_rows = len(pending)
                if not pending:
                    break
            found(pending[position][0], "log rows without a snapshot row")
            position += 1
    report.operations = operations_checked
    await _check_feed_positions(dsn, found)
    await _check_held(dsn, found)
    report.seconds = time.perf_counter() - started
    return report


async def _check_held(dsn: str, found: Callable[[UUID, str], None]) -> None:
    connection = await connect(dsn)
    try:
        rows = await connection.fetch(HELD_CHECK)
    finally:
        await connection.close()
    for wallet_id, held, pending in rows:
        found(wallet_id, f"held {held} != sum of its PENDING holds {pending}")


async def _check_feed_positions(dsn: str, found: Callable[[UUID, str], None]) -> None:
    connection = await connect(dsn)
    try:
        rows = await connection.fetch(FEED_POSITIONS_CHECK)
    finally:
        await connection.close()
    for wallet_id, xid, row_id in rows:
        if xid is None or row_id is None:
            found(wallet_id, "a change-feed row has no position")
        else:
            found(wallet_id, f"change-feed position {xid}-{row_id} is shared by several rows")


@dataclass(frozen=True, slots=True)
class RestoreReport:
    wallets: int
    repaired: int
    seconds: float

    def summary(self) -> str:
        return (
            f"restore: {self.wallets} wallets, {self.repaired} snapshot rows rebuilt from the "
            f"log in {self.seconds:.1f} s"
        )


# Every wallet's snapshot from its log; rows already equal are left alone.
_RESTORE = f"""
WITH replay AS (
    SELECT wallet_id,
           sum({SIGNED_BALANCE_SQL}) AS balance,
           sum({SIGNED_HELD_SQL}) AS held,
           max(seq) AS seq,
           max(created_at) AS updated_at
      FROM wallet_operations
     GROUP BY wallet_id
), target AS (
    SELECT w.id,
           coalesce(r.balance, 0)::bigint AS balance,
           coalesce(r.held, 0)::bigint AS held,
           coalesce(r.seq, 0) AS seq,
           coalesce(r.updated_at, w.created_at) AS updated_at
      FROM wallets w LEFT JOIN replay r ON r.wallet_id = w.id
)
UPDATE wallets AS w
   SET balance = t.balance, held = t.held, seq = t.seq, updated_at = t.updated_at
  FROM target t
 WHERE w.id = t.id
   AND (w.balance, w.held, w.seq, w.updated_at)
       IS DISTINCT FROM (t.balance, t.held, t.seq, t.updated_at)
"""


async def restore(dsn: str, progress: ProgressSink | None = None) -> RestoreReport:
    """Rebuild the snapshot from the log; refuses (DatabaseBusy) while walletd serves."""
    started = time.perf_counter()
    progress = progress or _NoProgress()
    connection = await connect(dsn)
    try:
        # Every shard lease taken for the operator: refused while a server holds one, and
        # no server can claim (or write to) a shard until the restore is over.
        progress.set_total(1)
        async with hold_every_lease(connection), connection.transaction():
            await connection.execute("LOCK TABLE wallets, wallet_operations IN EXCLUSIVE MODE")
            status = await connection.execute(_RESTORE)
            wallets = await connection.fetchval("SELECT count(*) FROM wallets")
        progress.advance(1)
    finally:
        await connection.close()
    repaired = int(status.split()[-1])
    return RestoreReport(int(wallets), repaired, time.perf_counter() - started)


@dataclass(frozen=True, slots=True)
class SeedReport:
    wallets: int
    operations: int
    seconds: float

    def summary(self) -> str:
        return (
            f"seed: {self.wallets} wallets and {self.operations} operations created in "
            f"{self.seconds:.1f} s"
        )


# Seeded history: deposits of 100.00 on odd seqs, withdrawals of 30.00 on even ones, so
# every balance stays positive and the chain is easy to check by eye.
_SEED_DEPOSIT_MINOR = 10_000
_SEED_WITHDRAW_MINOR = 3_000


def _seed_chunk(
    count: int, ops_each: int, ops_extra: int, base_us: int
) -> tuple[list[tuple[object, ...]], list[tuple[object, ...]], int]:
    """Rows for ``count`` wallets: the first ``ops_extra`` get one operation more."""
    wallet_rows: list[tuple[object, ...]] = []
    op_rows: list[tuple[object, ...]] = []
    created = _EPOCH + dt.timedelta(microseconds=base_us)
    step = dt.timedelta(microseconds=1)
    for index in range(count):
        wallet_id = uuid.uuid4()
        ops = ops_each + (1 if index < ops_extra else 0)
        balance = 0
        at = created
        for seq in range(1, ops + 1):
            at = created + seq * step
            if seq % 2:
                balance += _SEED_DEPOSIT_MINOR
                op_rows.append((wallet_id, seq, _DEPOSIT, _SEED_DEPOSIT_MINOR, balance, at))
            else:
                balance -= _SEED_WITHDRAW_MINOR
                op_rows.append((wallet_id, seq, _WITHDRAW, _SEED_WITHDRAW_MINOR, balance, at))
        wallet_rows.append((wallet_id, balance, ops, created, at))
    return wallet_rows, op_rows, len(op_rows)


def _chunks(wallets: int, chunk: int) -> Iterator[tuple[int, int]]:
    """(first wallet index, wallets in the chunk) for every chunk."""
    for first in range(0, wallets, chunk):
        yield first, min(chunk, wallets - first)


async def seed(
    dsn: str, wallets: int, operations: int = 0, progress: ProgressSink | None = None
) -> SeedReport:
    """Create ``wallets`` wallets and ``operations`` operations spread evenly, in one
    transaction, with COPY; snapshot rows match their logs exactly."""
    if wallets < 0 or operations < 0:
        raise ValueError("--wallets and --operations must not be negative")
    if operations and not wallets:
        raise ValueError("operations need wallets: give --wallets too")
    started = time.perf_counter()
    progress = progress or _NoProgress()
    progress.set_total(wallets)
    ops_each, ops_extra_total = divmod(operations, wallets) if wallets else (0, 0)
    base_us = time.time_ns() // 1000
    written_ops = 0
    connection = await connect(dsn)
    try:
        async with connection.transaction():
            for first, count in _chunks(wallets, SEED_CHUNK_WALLETS):
                extra = max(0, min(count, ops_extra_total - first))
                wallet_rows, op_rows, made = _seed_chunk(count, ops_each, extra, base_us)
                await connection.copy_records_to_table(
                    "wallets",
                    records=wallet_rows,
                    columns=("id", "balance", "seq", "created_at", "updated_at"),
                )
                if op_rows:
                    await connection.copy_records_to_table(
                        "wallet_operations",
                        records=op_rows,
                        columns=("wallet_id", "seq", "kind", "amount", "balance_after",
                                 "created_at"),
                    )  # fmt: skip
                written_ops += made
                progress.advance(count)
        await connection.execute("ANALYZE wallets, wallet_operations")
    finally:
        await connection.close()
    return SeedReport(wallets, written_ops, time.perf_counter() - started)
