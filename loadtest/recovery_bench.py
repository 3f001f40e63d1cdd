"""Recovery at scale, measured: ``python -m loadtest.recovery_bench --data-dir DIR``.

Expects a data dir migrated and seeded with ``walletd migrate --data-dir DIR`` and then
``walletd seed --data-dir DIR --wallets 1000000 --operations 5000000`` (embedded
PostgreSQL) or ``--database-url``. Measures:

1. ``walletd serve`` start to ready: from process start to ``/readyz`` answering 200.
2. ``walletd verify`` duration (the whole command, as an operator runs it).
3. Memory per resident wallet: ``--resident`` wallets loaded into one shard through the
   real PostgresLog, measured with tracemalloc (shard residents only, not the pool).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import subprocess
import sys
import time
import tracemalloc
import urllib.request
import uuid
from pathlib import Path

import asyncpg

from walletd.engine.commands import Command, ReadWallet
from walletd.engine.limits import EngineLimits
from walletd.engine.observer import EngineObserver
from walletd.engine.router import wall_clock_us
from walletd.engine.shard import Shard
from walletd.persistence.database import PoolSettings, create_pool
from walletd.persistence.embedded import EmbeddedPostgres
from walletd.persistence.postgres_log import PostgresLog

STARTUP_TIMEOUT_S = 120.0


def _walletd(*args: str) -> list[str]:
    return [sys.executable, "-m", "walletd.cli.main", *args]


def time_serve_to_ready(storage: list[str], port: int) -> float:
    started = time.perf_counter()
    process = subprocess.Popen(
        _walletd("serve", "--port", str(port), "--log-level", "WARNING", *storage),
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = started + STARTUP_TIMEOUT_S
        while time.perf_counter() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
                    if r.status == 200:
                        return time.perf_counter() - started
            except OSError:
                pass
            time.sleep(0.02)
        raise RuntimeError("walletd did not become ready")
    finally:
        process.terminate()
        process.wait(30)


def time_verify(storage: list[str]) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(
        _walletd("verify", "--log-level", "WARNING", *storage),
        capture_output=True, text=True, check=False, timeout=600,
    )  # fmt: skip
    return time.perf_counter() - started, done.stdout.strip().splitlines()[-1]


async def resident_bytes(dsn: str, wallets: int) -> tuple[int, float]:
    """Bytes per resident wallet in one shard, loaded from PostgreSQL in batches."""
    connection = await asyncpg.connect(dsn)
    try:
        rows = await connection.fetch("SELECT id FROM wallets LIMIT $1", wallets)
        # Plain uuid.UUIDs, as the HTTP edge makes them: asyncpg's UUIDs cache their int and
        # hash when first hashed, which would count here as if the shard kept it.
        ids = [uuid.UUID(bytes=r[0].bytes) for r in rows]
    finally:
        await connection.close()
    pool = await create_pool(dsn, PoolSettings(size_max=2))
    try:
        log = PostgresLog(pool)
        limits = EngineLimits(pipelines=1, resident_wallets_max=max(wallets, 1))
        shard = Shard(0, log, limits, wall_clock_us, EngineObserver())
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        loop = asyncio.get_running_loop()
        for first in range(0, len(ids), 10_000):
            # What the shard does for a batch of reads of unknown wallets: load, keep them.
            reads = [ReadWallet(i, loop.create_future()) for i in ids[first : first + 10_000]]
            await shard._load_missing(list[Command](reads))
            del reads
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        count = shard.resident_wallets
        return count, (after - before) / count
    finally:
        await pool.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--database-url")
    parser.add_argument("--port", type=int, default=18080)
    parser.add_argument("--resident", type=int, default=100_000)
    args = parser.parse_args()
    embedded: EmbeddedPostgres | None = None
    if args.database_url:
        storage, dsn = ["--database-url", args.database_url], args.database_url
    else:
        storage = ["--data-dir", str(args.data_dir)]
        embedded = EmbeddedPostgres(args.data_dir)
        dsn = embedded.start()
        embedded.stop()  # measured cold: serve starts the embedded server itself
    print(f"serve to ready: {time_serve_to_ready(storage, args.port):.2f} s (cold PostgreSQL)")
    if embedded is not None:
        dsn = embedded.start()  # warm for the rest, as beside a running server
    try:
        print(f"serve to ready: {time_serve_to_ready(storage, args.port):.2f} s (warm)")
        seconds, summary = time_verify(storage)
        print(f"verify: {seconds:.1f} s  [{summary}]")
        count, per_wallet = asyncio.run(resident_bytes(dsn, args.resident))
        print(f"resident wallets: {count}, {per_wallet:.0f} bytes each (tracemalloc)")
    finally:
        if embedded is not None:
            embedded.stop()


if __name__ == "__main__":
    main()
