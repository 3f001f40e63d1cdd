"""Real faults against real PostgreSQL, through the real app: connections killed with
pg_terminate_backend mid-batch, and the server stopped and started under load."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import socket
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
from aiohttp import web
from aiohttp.test_utils import TestClient

from tests.conftest import AppFactory, PostgresServer
from walletd.cli.config import load_config
from walletd.cli.service import migrate_database, running_services
from walletd.engine.money import MINOR_UNITS_PER_UNIT
from walletd.http.app import create_app
from walletd.http.settings import HttpSettings
from walletd.persistence.embedded import EmbeddedPostgres

Client = TestClient[web.Request, web.Application]
WORKERS = 8
REQUESTS_PER_WORKER = 30
REQUESTS_PER_WORKER_MAX = 3000
RECOVERY_S = 30.0


async def create_wallets(client: Client, count: int) -> list[str]:
    ids = []
    for _ in range(count):
        response = await client.post("/api/v1/wallets")
        assert response.status == 201
        ids.append((await response.json())["id"])
    return ids


async def deposit(client: Client, wallet: str, amount: int, key: str) -> int:
    response = await client.post(
        f"/api/v1/wallets/{wallet}/operation",
        json={"operation_type": "DEPOSIT", "amount": amount},
        headers={"Idempotency-Key": key},
    )
    if response.status == 503:
        body = await response.json()
        assert body["code"] in {"UNAVAILABLE", "OVERLOADED"}
        assert response.headers["Retry-After"]
    return response.status


async def load(client: Client, wallets: list[str], acked: dict[str, tuple[str, int]],
               statuses: Counter[int], stop: asyncio.Event | None = None) -> None:  # fmt: skip
    """Deposits from concurrent workers, each with its own key; records what was acked.

    Each worker sends REQUESTS_PER_WORKER deposits, or with ``stop`` keeps going (paced,
    and bounded by REQUESTS_PER_WORKER_MAX) until it is set.
    """

    async def worker(number: int) -> None:
        for n in range(REQUESTS_PER_WORKER if stop is None else REQUESTS_PER_WORKER_MAX):
            if stop is not None and stop.is_set():
                return
            wallet = wallets[(number + n) % len(wallets)]
            key = f"w{number}-{n}"
            amount = 1 + n % 5
            status = await deposit(client, wallet, amount, key)
            statuses[status] += 1
            if status == 200:
                acked[key] = (wallet, amount * MINOR_UNITS_PER_UNIT)
            if stop is not None:
                await asyncio.sleep(0.01)

    await asyncio.gather(*(worker(n) for n in range(WORKERS)))


async def until_serving(client: Client, wallet: str) -> None:
    """Retry a deposit until it succeeds: walletd recovered by itself."""
    deadline = asyncio.get_running_loop().time() + RECOVERY_S
    while asyncio.get_running_loop().time() < deadline:
        if await deposit(client, wallet, 1, f"probe-{uuid.uuid4()}") == 200:
            return
        await asyncio.sleep(0.1)
    raise AssertionError("walletd did not recover")


async def check_database(dsn: str, acked: dict[str, tuple[str, int]]) -> None:
    """Every acknowledged deposit is in the log once; balance == sum(log) for every wallet."""
    connection = await asyncpg.connect(dsn)
    try:
        rows = await connection.fetch(
            "SELECT wallet_id::text, idempotency_key, amount FROM wallet_operations"
        )
        logged = {row["idempotency_key"]: (row["wallet_id"], row["amount"]) for row in rows}
        assert len(logged) == len(rows)
        missing = {key: op for key, op in acked.items() if logged.get(key) != op}
        assert not missing, f"acknowledged but not stored: {missing}"
        mismatched = await connection.fetch(
            """SELECT w.id, w.balance, coalesce(sum(CASE o.kind WHEN 1 THEN o.amount
                                                  ELSE -o.amount END), 0) AS total,
                      w.seq, count(o.id) AS ops
                 FROM wallets w LEFT JOIN wallet_operations o ON o.wallet_id = w.id
                GROUP BY w.id HAVING w.balance <> coalesce(sum(CASE o.kind WHEN 1 THEN o.amount
                                                  ELSE -o.amount END), 0)
                   OR w.seq <> count(o.id)"""
        )
        assert mismatched == []
    finally:
        await connection.close()


async def test_killed_connections_answer_503_and_lose_nothing(
    make_app: AppFactory,
    database_url: str,
    pg_server: PostgresServer,
    aiohttp_client: Callable[..., Any],
) -> None:
    """pg_terminate_backend on walletd's connections during concurrent deposits: requests
    get 200 or 503 (never 500), walletd recovers alone, every acked deposit is stored."""
    client: Client = await aiohttp_client(make_app())
    wallets = await create_wallets(client, 6)
    acked: dict[str, tuple[str, int]] = {}
    statuses: Counter[int] = Counter()
    database = urlsplit(database_url).path.lstrip("/")
    admin = await asyncpg.connect(pg_server.admin_dsn)
    killed = 0
    try:
        loading = asyncio.create_task(load(client, wallets, acked, statuses))
        while not loading.done():
            rows = await admin.fetch(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = $1 AND pid <> pg_backend_pid()",
                database,
            )
            killed += len(rows)
            await asyncio.sleep(0.02)
        await loading
    finally:
        await admin.close()
    assert killed > 0
    assert set(statuses) <= {200, 503}, statuses
    await until_serving(client, wallets[0])
    await check_database(database_url, acked)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@contextlib.asynccontextmanager
async def own_postgres(folder: Path) -> AsyncIterator[EmbeddedPostgres]:
    """An embedded PostgreSQL owned by one test, so it may be stopped (never the session's)."""
    server = EmbeddedPostgres(folder, port=_free_port())
    await asyncio.to_thread(server.start)
    try:
        yield server
    finally:
        await asyncio.to_thread(server.stop, "immediate")
        shutil.rmtree(folder, ignore_errors=True)


async def ready_status(client: Client) -> int:
    return (await client.get("/readyz")).status


async def test_postgres_stopped_and_started_under_load(
    tmp_path: Path, aiohttp_client: Callable[..., Any]
) -> None:
    """With the production wiring: stopping PostgreSQL under load gives 503s (no 500) and
    readiness 503; once it is back walletd serves again without a restart, readiness 200,
    and nothing acknowledged is lost."""
    async with own_postgres(tmp_path / "pg") as server:
        await migrate_database(server.dsn)
        config = load_config(
            argparse.Namespace(),
            environ={"WALLETD_DATABASE_URL": server.dsn, "WALLETD_SHARDS": "2"},
        )
        app = create_app(HttpSettings(), lambda: running_services(config))
        client: Client = await aiohttp_client(app)
        wallets = await create_wallets(client, 4)
        assert await ready_status(client) == 200
        acked: dict[str, tuple[str, int]] = {}
        statuses: Counter[int] = Counter()
        stop = asyncio.Event()
        loading = asyncio.create_task(load(client, wallets, acked, statuses, stop))
        await asyncio.sleep(0.3)
        acked_before = len(acked)
        await asyncio.to_thread(server.stop, "fast")
        await asyncio.sleep(1.2)  # past the readiness cache
        assert await ready_status(client) == 503
        await asyncio.to_thread(server.start)
        await until_serving(client, wallets[0])
        deadline = asyncio.get_running_loop().time() + RECOVERY_S
        while await ready_status(client) != 200:
            assert asyncio.get_running_loop().time() < deadline, "never ready again"
            await asyncio.sleep(0.2)
        acked_after_restart = len(acked)
        await asyncio.sleep(0.3)  # the load goes on against the restarted server
        stop.set()
        await loading
        assert acked_before > 0
        assert len(acked) > acked_after_restart
        assert set(statuses) <= {200, 503}, statuses
        assert statuses[503] > 0  # the outage was seen by clients
        await client.close()
        await check_database(server.dsn, acked)
