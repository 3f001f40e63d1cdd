"""Batch append alternatives, measured: ``python -m loadtest.append_bench``.

Each method writes what a shard commit writes, atomically: N log rows (one per wallet) and
N snapshot moves with seq fencing, against an embedded PostgreSQL the script starts in a
temporary folder (fsync and synchronous_commit on, as in production):

- ``function``: ``SELECT walletd_append_batch(<unnest arrays>)`` in autocommit; 1 round trip.
- ``executemany``: BEGIN; executemany(INSERT); executemany(UPDATE); COMMIT; 4 round trips,
  and no row counts, so no fencing check (it would need one more query).
- ``copy``: BEGIN; COPY into a temp table; INSERT..SELECT; fenced UPDATE..FROM; COMMIT.

Per method and batch size it times ``--batches`` commits, ``--runs`` times, and prints the
median per-commit latency and the rows per second it implies.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import platform
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg

from walletd.persistence.embedded import EmbeddedPostgres
from walletd.persistence.migrate import apply_migrations

BATCH_SIZES = (1, 10, 100, 1000)
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)

_FUNCTION = (
    "SELECT walletd_append_batch($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, "
    "$14, $15, $16, $17, $18, $19, $20, $21, $22, $23, $24)"
)
_INSERT_ONE = (
    "INSERT INTO wallet_operations (wallet_id, seq, kind, amount, balance_after, "
    "idempotency_key, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7)"
)
_UPDATE_ONE = (
    "UPDATE wallets SET balance = $3, seq = $4, updated_at = $5 WHERE id = $1 AND seq = $2"
)
_TEMP = """
CREATE TEMP TABLE IF NOT EXISTS append_ops (
    wallet_id uuid, seq bigint, kind smallint, amount bigint, balance_after bigint,
    idempotency_key text, created_at timestamptz
) ON COMMIT DELETE ROWS
"""
_FROM_TEMP = """
INSERT INTO wallet_operations (wallet_id, seq, kind, amount, balance_after, idempotency_key,
                               created_at)
SELECT wallet_id, seq, kind, amount, balance_after, idempotency_key, created_at FROM append_ops
"""
_SNAPSHOTS_FROM_TEMP = """
UPDATE wallets AS w SET balance = t.balance_after, seq = t.seq, updated_at = t.created_at
  FROM append_ops t WHERE w.id = t.wallet_id AND w.seq = t.seq - 1
"""
_COLUMNS = ("wallet_id", "seq", "kind", "amount", "balance_after", "idempotency_key", "created_at")

Rows = list[tuple[uuid.UUID, int, int, int, int, None, dt.datetime]]


class Wallets:
    """The bench's wallets and their seq/balance, advanced by every batch written."""

    def __init__(self, ids: list[uuid.UUID]) -> None:
        self.ids = ids
        self.seq = dict.fromkeys(ids, 0)

    def next_batch(self, size: int) -> Rows:
        now = time.time_ns() // 1000
        rows: Rows = []
        for wallet_id in self.ids[:size]:
            seq = self.seq[wallet_id] + 1
            self.seq[wallet_id] = seq
            at = _EPOCH + dt.timedelta(microseconds=now)
            rows.append((wallet_id, seq, 1, 100, 100 * seq, None, at))
        return rows


async def by_function(connection: asyncpg.Connection, rows: Rows) -> None:
    us = [int((r[6] - _EPOCH) / dt.timedelta(microseconds=1)) for r in rows]
    ids = [r[0] for r in rows]
    await connection.execute(
        _FUNCTION, [], [], [], [],
        ids, [r[1] for r in rows], [r[2] for r in rows], [r[3] for r in rows],
        [r[4] for r in rows], [r[5] for r in rows], us,
        ids, [r[1] - 1 for r in rows], [r[1] for r in rows], [r[4] for r in rows], us,
        [], [], [], [], [], [], [], [],
    )  # fmt: skip


async def by_executemany(connection: asyncpg.Connection, rows: Rows) -> None:
    async with connection.transaction():
        await connection.executemany(_INSERT_ONE, rows)
        await connection.executemany(
            _UPDATE_ONE, [(r[0], r[1] - 1, r[4], r[1], r[6]) for r in rows]
        )


async def by_copy(connection: asyncpg.Connection, rows: Rows) -> None:
    async with connection.transaction():
        await connection.copy_records_to_table("append_ops", records=rows, columns=_COLUMNS)
        await connection.execute(_FROM_TEMP)
        status = await connection.execute(_SNAPSHOTS_FROM_TEMP)
        if int(status.split()[-1]) != len(rows):
            raise RuntimeError("fencing failed")


METHODS: dict[str, Callable[[asyncpg.Connection, Rows], Awaitable[None]]] = {
    "executemany": by_executemany,
    "function": by_function,
    "copy": by_copy,
}


async def bench(dsn: str, batches: int, runs: int) -> list[tuple[str, int, float, float]]:
    connection = await asyncpg.connect(dsn)
    try:
        await apply_migrations(connection)
        await connection.execute(_TEMP)
        ids = [uuid.uuid4() for _ in range(max(BATCH_SIZES))]
        await connection.copy_records_to_table(
            "wallets",
            records=[(i, _EPOCH, _EPOCH) for i in ids],
            columns=("id", "created_at", "updated_at"),
        )
        wallets = Wallets(ids)
        results = []
        for size in BATCH_SIZES:
            count = max(3, batches // max(1, size // 10))  # fewer big batches: keep it brief
            medians: dict[str, list[float]] = {name: [] for name in METHODS}
            for _run in range(runs):
                for name, method in METHODS.items():  # interleaved: noise hits all alike
                    timings = []
                    for _ in range(count):
                        rows = wallets.next_batch(size)
                        started = time.perf_counter()
                        await method(connection, rows)
                        timings.append(time.perf_counter() - started)
                    medians[name].append(statistics.median(timings))
            for name in METHODS:
                latency = statistics.median(medians[name])
                results.append((name, size, latency * 1000, size / latency))
        return results
    finally:
        await connection.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=40, help="commits per run (size 1)")
    parser.add_argument("--runs", type=int, default=5, help="runs; the median is reported")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="walletd-append-bench-"))
    embedded = EmbeddedPostgres(folder)
    try:
        dsn = embedded.start()
        results = asyncio.run(bench(dsn, args.batches, args.runs))
    finally:
        embedded.stop("immediate")
        shutil.rmtree(folder, ignore_errors=True)
    print(f"# {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, {platform.platform()}, "
          f"runs={args.runs}, batches={args.batches}")  # fmt: skip
    print("| method | batch size | median ms per commit | rows/s |")
    print("| --- | ---: | ---: | ---: |")
    for name, size, latency_ms, rate in results:
        print(f"| {name} | {size} | {latency_ms:.2f} | {rate:,.0f} |")


if __name__ == "__main__":
    main()
