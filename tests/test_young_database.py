"""A young database's plans: the embedded PostgreSQL analyzes a table that grows within
seconds, not a minute.

Plans cached by long-lived connections (PL/pgSQL's inside walletd_append_batch, asyncpg's
prepared statements) are made while the tables are nearly empty and choose sequential scans
and hash joins; only an ANALYZE of the grown table replaces them. With PostgreSQL's default
autovacuum_naptime (1 min) a fresh walletd spent its first minute on them: ab_probe's first
round on 10,000 new wallets, PostgreSQL CPU per deposit 308 against 57 µs (docs/BENCHMARKS.md,
"A young database's plans").
"""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest

pytestmark = pytest.mark.slow

ANALYZED_WITHIN_S = 20.0


async def _analyzed_after(connection: asyncpg.Connection, rows: int, since: int) -> None:
    """Inserts ``rows`` into the table and waits until autovacuum has analyzed it more than
    ``since`` times; fails after ANALYZED_WITHIN_S."""
    await connection.execute("INSERT INTO grows (n) SELECT generate_series(1, $1)", rows)
    started = time.monotonic()
    while time.monotonic() - started < ANALYZED_WITHIN_S:
        count = await connection.fetchval(
            "SELECT autoanalyze_count FROM pg_stat_user_tables WHERE relname = 'grows'"
        )
        if count > since:
            return
        await asyncio.sleep(0.25)
    raise AssertionError(f"'grows' not analyzed within {ANALYZED_WITHIN_S} s of {rows} rows")


async def test_a_growing_table_is_analyzed_again_within_seconds(own_server: str) -> None:
    """Twice: a new table filled, then grown tenfold; each time autovacuum analyzes it well
    within a minute (the default naptime would leave the second wait at up to 60 s)."""
    connection = await asyncpg.connect(own_server)
    try:
        await connection.execute("CREATE TABLE grows (n bigint NOT NULL)")
        await _analyzed_after(connection, 1_000, 0)
        await _analyzed_after(connection, 10_000, 1)
        assert (
            await connection.fetchval("SELECT reltuples FROM pg_class WHERE relname = 'grows'")
            == 11_000
        )
    finally:
        await connection.close()
