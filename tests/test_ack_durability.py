"""A 2xx waits for the disk: the app's own connections commit synchronously with fsync on,
and every acknowledged deposit survives PostgreSQL crashing right after the last answer.

(tests/test_durability.py proves the settings are enforced against the role, database and DSN.)"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from tests.test_faults import Tally, check_database, create_wallets, deposit, own_postgres
from walletd.cli.config import Config, load_config
from walletd.cli.service import migrate_database, running_services
from walletd.engine.money import MINOR_UNITS_PER_UNIT
from walletd.http.app import create_app
from walletd.http.settings import HttpSettings
from walletd.http.state import STATE_KEY
from walletd.persistence.postgres_log import PostgresLog

Client = TestClient[web.Request, web.Application]
WORKERS = 8
DEPOSITS_PER_WORKER = 40  # 320 acknowledged deposits in all


def _config(dsn: str) -> Config:
    return load_config(argparse.Namespace(), environ={"WALLETD_DATABASE_URL": dsn})


async def test_the_apps_own_connections_commit_synchronously_with_fsync(
    database_url: str, aiohttp_client: Callable[..., Any]
) -> None:
    """Through a connection of the serving app's own pool (production wiring): fsync and
    synchronous_commit are on, and the append function does not turn them off for itself."""
    config = _config(database_url)
    client: Client = await aiohttp_client(
        create_app(HttpSettings(), lambda: running_services(config))
    )
    log = client.app[STATE_KEY].services.log
    assert isinstance(log, PostgresLog)
    async with log._pool.acquire() as connection:
        assert await connection.fetchval("SHOW fsync") == "on"
        assert await connection.fetchval("SHOW synchronous_commit") == "on"
        overrides = await connection.fetchval(
            "SELECT proconfig FROM pg_proc WHERE proname = 'walletd_append_batch'"
        )
    assert not any("synchronous_commit" in setting or "fsync" in setting
                   for setting in overrides or [])  # fmt: skip


@pytest.mark.slow
async def test_acknowledged_deposits_survive_an_immediate_stop(
    tmp_path: Path, aiohttp_client: Callable[..., Any]
) -> None:
    """Hundreds of concurrent keyed deposits are acknowledged; PostgreSQL is stopped with
    ``-m immediate`` (a crash: no checkpoint, WAL buffers dropped) right after the last
    answer and started again: every acknowledged deposit is there, once."""
    async with own_postgres(tmp_path / "pg") as server:
        admin = await asyncpg.connect(server.dsn)
        try:
            # WAL of an asynchronous commit would then wait in memory for up to 10 s, so a
            # 2xx sent before the flush is lost by the crash below instead of by luck.
            await admin.execute("ALTER SYSTEM SET wal_writer_delay = '10s'")
            await admin.execute("SELECT pg_reload_conf()")
        finally:
            await admin.close()
        await migrate_database(server.dsn)
        config = _config(server.dsn)
        client: Client = await aiohttp_client(
            create_app(HttpSettings(), lambda: running_services(config))
        )
        wallets = await create_wallets(client, 8)
        tally = Tally()

        async def worker(number: int) -> None:
            for n in range(DEPOSITS_PER_WORKER):
                wallet = wallets[(number + n) % len(wallets)]
                key, minor = f"w{number}-{n}", (1 + n % 7) * MINOR_UNITS_PER_UNIT
                status, _replayed = await deposit(client, wallet, minor, key)
                tally.statuses[status] += 1
                if status == 200:
                    tally.acked[key] = (wallet, minor)

        await asyncio.gather(*(worker(n) for n in range(WORKERS)))
        await asyncio.to_thread(server.stop, "immediate")
        await client.close()
        assert tally.statuses == {200: WORKERS * DEPOSITS_PER_WORKER}, tally.statuses
        await asyncio.to_thread(server.start)
        await check_database(server.dsn, tally.acked)
