"""What listing indexes cost the writes; what a page costs: ``python -m loadtest.listing_bench``.

    python -m loadtest.listing_bench [--runs 5] [--commits 500] [--sizes 1,10]
                                     [--shapes transfer,hold] [--rows 1000000] [--pages 50]

Writes: migration "listings" adds index entries to every transfer and hold written (and
drops the partial ``transfers_pending``). This writes the same batches through
``PostgresLog.append_batch`` into two databases of one embedded PostgreSQL (fsync on),
alternating run by run: ``indexed`` (every migration) and ``bare`` (the listing indexes
dropped and ``transfers_pending`` back: the schema before the migration). Shapes as in
loadtest/leg_check_bench.py (a joint transfer per pair, opened and closed COMPLETED; a hold
created and captured in part per wallet). Printed: the PostgreSQL backend's CPU µs per
commit (utime + stime from /proc), medians of the runs, and the median ms per commit.

Reads: ``--rows`` transfers (generate_series; 5,000 senders, 1 in 1,000 PENDING) in the
indexed database, then ``--pages`` pages of 50 followed by cursor through
``PostgresLogReader.list_page``, per filter set: median and worst ms per page.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg

from loadtest.feed_bench import _cpu_seconds
from loadtest.leg_check_bench import SHAPES, Wallets
from walletd.engine.listings import FilterValue, Listing, ListingQuery
from walletd.engine.model import Batch, NewWallet, OperationKind
from walletd.persistence.database import PoolSettings, create_pool
from walletd.persistence.embedded import EmbeddedPostgres
from walletd.persistence.log_reads import PostgresLogReader
from walletd.persistence.migrate import apply_migrations
from walletd.persistence.postgres_log import PostgresLog

__all__ = ["main"]

_FUNDS = 10**12
_BARE = """
DROP INDEX wallets_listing, transfers_by_status, transfers_from, transfers_to,
           holds_by_status, holds_by_wallet;
CREATE INDEX transfers_pending ON transfers (created_at) WHERE status = 1;
"""
_ID = "('{0}0000000-0000-4000-8000-' || lpad(to_hex({1}), 12, '0'))::uuid"
_FILL = f"""
INSERT INTO transfers (id, from_wallet_id, to_wallet_id, amount, status, failure_code,
                       created_at, updated_at)
SELECT {_ID.format("b", "n")}, {_ID.format("a", "n % 5000")},
       {_ID.format("a", "(n * 7 + 1) % 5000 + 5000")}, 100,
       CASE WHEN n % 1000 = 0 THEN 1 ELSE 2 END, NULL,
       now() - ($1 - n) * interval '1 second', now() - ($1 - n) * interval '1 second'
  FROM generate_series(1, $1) AS n
"""
_SENDER = uuid.UUID("a0000000-0000-4000-8000-000000000003")
_PAGE_QUERIES: dict[str, tuple[tuple[str, FilterValue], ...]] = {
    "all": (),
    "status=PENDING": (("status", 1),),
    "wallet_id": (("wallet_id", _SENDER),),
    "wallet_id + status=COMPLETED": (("status", 2), ("wallet_id", _SENDER)),
}


async def _writes(args: argparse.Namespace, dsns: dict[str, str]) -> None:
    sizes = [int(size) for size in args.sizes.split(",")]
    pools: dict[str, asyncpg.Pool] = {}
    logs: dict[str, PostgresLog] = {}
    backends: dict[str, int] = {}
    wallets: dict[str, Wallets] = {}
    for variant, dsn in dsns.items():
        pools[variant] = await create_pool(dsn, PoolSettings(size_max=1))
        logs[variant] = PostgresLog(pools[variant])
        backends[variant] = int(await pools[variant].fetchval("SELECT pg_backend_pid()"))
        wallets[variant] = mine = Wallets(2 * max(sizes))
        await logs[variant].append_batch(
            Batch(new_wallets=[NewWallet(w, 0, None, "") for w in mine.ids])
        )
        deposit = Batch()
        before = dict.fromkeys(mine.ids, 0)
        for wallet in mine.ids:
            mine.row(deposit, wallet, OperationKind.DEPOSIT, _FUNDS, None, _FUNDS, 0)
        await logs[variant].append_batch(mine.snapshots(deposit, before))
    try:
        print("| shape | per batch | PostgreSQL CPU µs per commit: indexed / bare | change "
              "| median ms per commit: indexed / bare |")  # fmt: skip
        print("| --- | ---: | ---: | ---: | ---: |")
        for shape in args.shapes.split(","):
            build = SHAPES[shape]
            for size in sizes:
                cpu_us: dict[str, list[float]] = {v: [] for v in dsns}
                latencies: dict[str, list[float]] = {v: [] for v in dsns}
                for run in range(args.runs):
                    order = list(dsns) if run % 2 == 0 else list(reversed(dsns))
                    for variant in order:
                        cpu_before = _cpu_seconds(backends[variant])
                        for _ in range(args.commits):
                            batch = build(wallets[variant], size)
                            started = time.perf_counter()
                            await logs[variant].append_batch(batch)
                            latencies[variant].append(time.perf_counter() - started)
                        spent = _cpu_seconds(backends[variant]) - cpu_before
                        cpu_us[variant].append(spent * 1e6 / args.commits)
                indexed, bare = (statistics.median(cpu_us[v]) for v in ("indexed", "bare"))
                indexed_ms, bare_ms = (
                    statistics.median(latencies[v]) * 1000 for v in ("indexed", "bare")
                )
                print(f"| {shape} | {size} | {indexed:.0f} / {bare:.0f} | "
                      f"{100 * (indexed / max(bare, 1e-9) - 1):+.1f}% | "
                      f"{indexed_ms:.2f} / {bare_ms:.2f} |", flush=True)  # fmt: skip
    finally:
        for pool in pools.values():
            await pool.close()


async def _pages(args: argparse.Namespace, dsn: str) -> None:
    connection = await asyncpg.connect(dsn)
    try:
        started = time.perf_counter()
        await connection.execute(_FILL, args.rows)
        await connection.execute("ANALYZE transfers")
        print(f"\n{args.rows:,} transfers written in {time.perf_counter() - started:.1f} s")
    finally:
        await connection.close()
    pool = await create_pool(dsn, PoolSettings(size_max=1))
    reader = PostgresLogReader(pool)
    try:
        print("| filters | pages | median ms per page | worst ms | items |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for name, filters in _PAGE_QUERIES.items():
            timings: list[float] = []
            items = 0
            after = None
            for _ in range(args.pages):
                query = ListingQuery(Listing.TRANSFERS, filters, after=after, limit=50,
                                     scan_max=204)  # fmt: skip
                started = time.perf_counter()
                page = await reader.list_page(query)
                timings.append(time.perf_counter() - started)
                items += len(page.items)
                if page.next is None:
                    break
                after = page.next
            print(f"| {name} | {len(timings)} | {statistics.median(timings) * 1000:.2f} | "
                  f"{max(timings) * 1000:.2f} | {items} |", flush=True)  # fmt: skip
    finally:
        await pool.close()


async def _bench(args: argparse.Namespace) -> None:
    folder = Path(tempfile.mkdtemp(prefix="walletd-listing-bench-"))
    embedded = EmbeddedPostgres(folder)
    try:
        dsn = await asyncio.to_thread(embedded.start)
        admin = await asyncpg.connect(dsn)
        dsns: dict[str, str] = {}
        try:
            for variant in ("indexed", "bare"):
                await admin.execute(f"CREATE DATABASE listing_bench_{variant}")
                dsns[variant] = dsn.rsplit("/", 1)[0] + f"/listing_bench_{variant}"
                connection = await asyncpg.connect(dsns[variant])
                try:
                    await apply_migrations(connection)
                    if variant == "bare":
                        await connection.execute(_BARE)
                finally:
                    await connection.close()
        finally:
            await admin.close()
        await _writes(args, dsns)
        if args.rows:
            await _pages(args, dsns["indexed"])
    finally:
        await asyncio.to_thread(embedded.stop, "immediate")
        shutil.rmtree(folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="runs per shape, size and variant")
    parser.add_argument("--commits", type=int, default=500, help="commits per run")
    parser.add_argument("--sizes", default="1,10", help="pairs (transfers) per batch")
    parser.add_argument("--shapes", default=",".join(SHAPES), help="of: " + ", ".join(SHAPES))
    parser.add_argument("--rows", type=int, default=1_000_000, help="transfers for the reads")
    parser.add_argument("--pages", type=int, default=50, help="pages read per filter set")
    args: Any = parser.parse_args(argv)
    asyncio.run(_bench(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
