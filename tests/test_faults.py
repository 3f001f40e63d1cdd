"""Real faults against real PostgreSQL, through the real app: connections killed with
pg_terminate_backend mid-batch, a commit that lands while its answer is lost, and the
server stopped and started under load."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import socket
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from tests.conftest import AppFactory, PostgresServer
from walletd.cli.config import load_config
from walletd.cli.service import migrate_database, running_services
from walletd.engine.money import MINOR_UNITS_PER_UNIT
from walletd.http.app import create_app
from walletd.http.settings import HttpSettings
from walletd.persistence.embedded import EmbeddedPostgres

pytestmark = pytest.mark.slow  # loads the server; kills, stops and starts PostgreSQL

Client = TestClient[web.Request, web.Application]
WORKERS = 8
REQUESTS_PER_WORKER_MAX = 3000
PACE_S = 0.01  # between one worker's requests: keeps the load steady, not a synchronisation
RECOVERY_S = 30.0
FAULTS_S_MAX = 60.0  # killing goes on until enough faults reached clients, at most this long
UNAVAILABLE_MIN = 3  # 503s that must reach clients before the killing stops
ACKED_MIN = 50
ACKS_BETWEEN_KILLS = 5
POLL_S = 0.05

# Every connection of the test's database that carries requests: never the admin's own, and
# never the serving lock's (it carries none, so killing it would prove nothing).
_KILL_REQUEST_CONNECTIONS = """
SELECT pg_terminate_backend(pid) FROM pg_stat_activity
 WHERE datname = $1 AND pid <> pg_backend_pid()
   AND pid NOT IN (SELECT pid FROM pg_locks WHERE locktype = 'advisory')
"""


@dataclass
class Tally:
    """What clients were told: every 2xx and every 503, by Idempotency-Key."""

    acked: dict[str, tuple[str, int]] = field(default_factory=dict)  # key -> (wallet, minor)
    unavailable: dict[str, tuple[str, int]] = field(default_factory=dict)
    statuses: Counter[int] = field(default_factory=Counter)


async def create_wallets(client: Client, count: int) -> list[str]:
    ids = []
    for _ in range(count):
        response = await client.post("/api/v1/wallets")
        assert response.status == 201
        ids.append((await response.json())["id"])
    return ids


def deposit_body(minor: int) -> dict[str, str]:
    return {"operation_type": "DEPOSIT", "amount": str(Decimal(minor) / MINOR_UNITS_PER_UNIT)}


async def deposit(client: Client, wallet: str, minor: int, key: str) -> tuple[int, bool]:
    """One keyed deposit; returns the status and whether it was a replay."""
    response = await client.post(
        f"/api/v1/wallets/{wallet}/operation",
        json=deposit_body(minor),
        headers={"Idempotency-Key": key},
    )
    if response.status == 503:
        body = await response.json()
        assert body["code"] in {"UNAVAILABLE", "OVERLOADED"}
        assert response.headers["Retry-After"]
    return response.status, response.headers.get("Idempotent-Replayed") == "true"


async def load(client: Client, wallets: list[str], tally: Tally, stop: asyncio.Event) -> None:
    """Keyed deposits from concurrent workers, paced, until ``stop`` is set (or each worker
    has sent REQUESTS_PER_WORKER_MAX); every answer is recorded in ``tally``."""

    async def worker(number: int) -> None:
        for n in range(REQUESTS_PER_WORKER_MAX):
            if stop.is_set():
                return
            wallet = wallets[(number + n) % len(wallets)]
            key, minor = f"w{number}-{n}", (1 + n % 5) * MINOR_UNITS_PER_UNIT
            status, _replayed = await deposit(client, wallet, minor, key)
            tally.statuses[status] += 1
            if status == 200:
                tally.acked[key] = (wallet, minor)
            elif status == 503:
                tally.unavailable[key] = (wallet, minor)
            await asyncio.sleep(PACE_S)

    await asyncio.gather(*(worker(n) for n in range(WORKERS)))


async def until(predicate: Callable[[], bool], within_s: float, what: str) -> None:
    """Poll ``predicate`` until it holds; fail after ``within_s``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while not predicate():
        assert loop.time() < deadline, f"{what}: not reached within {within_s} s"
        await asyncio.sleep(POLL_S)


async def until_serving(client: Client, wallet: str) -> None:
    """Retry a deposit until it succeeds: walletd recovered by itself."""
    deadline = asyncio.get_running_loop().time() + RECOVERY_S
    while asyncio.get_running_loop().time() < deadline:
        status, _replayed = await deposit(client, wallet, 1, f"probe-{uuid.uuid4()}")
        if status == 200:
            return
        await asyncio.sleep(0.1)
    raise AssertionError("walletd did not recover")


async def retry_unavailable(client: Client, tally: Tally) -> int:
    """Send every deposit that got 503 again with its key: each must now be answered 200
    (applied now, or replayed because the 503 hid a commit). Returns how many replayed."""
    replayed = 0
    for key, (wallet, minor) in tally.unavailable.items():
        status, was_replayed = await deposit(client, wallet, minor, key)
        assert status == 200, (key, status)
        replayed += was_replayed
    return replayed


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
        some = dict(list(missing.items())[:10])
        assert not missing, f"{len(missing)} acknowledged but not stored, such as {some}"
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
    """pg_terminate_backend on the connections that carry walletd's requests, during
    concurrent keyed deposits: clients get 200 or 503 (never 500) and some do get 503;
    walletd recovers alone; every acknowledged deposit is stored once; a same-key retry of
    every 503 is answered 200 and leaves that deposit in the log exactly once."""
    client: Client = await aiohttp_client(make_app())
    wallets = await create_wallets(client, 6)
    tally = Tally()
    stop = asyncio.Event()
    database = urlsplit(database_url).path.lstrip("/")
    loop = asyncio.get_running_loop()
    loading = asyncio.create_task(load(client, wallets, tally, stop))
    admin = await asyncpg.connect(pg_server.admin_dsn)
    killed = 0
    try:
        deadline = loop.time() + FAULTS_S_MAX
        while tally.statuses[503] < UNAVAILABLE_MIN or len(tally.acked) < ACKED_MIN:
            assert loop.time() < deadline, f"too few faults reached clients: {tally.statuses}"
            assert not loading.done(), f"the load ended first: {tally.statuses}"
            acked_before = len(tally.acked)
            killed += len(await admin.fetch(_KILL_REQUEST_CONNECTIONS, database))
            # The next kill waits for walletd to acknowledge again: it recovers by itself.
            await until(
                lambda: len(tally.acked) >= acked_before + ACKS_BETWEEN_KILLS,  # noqa: B023
                RECOVERY_S,
                "acks after a kill",
            )
    finally:
        stop.set()
        await loading
        await admin.close()
    assert killed > 0
    assert set(tally.statuses) <= {200, 503}, tally.statuses
    await until_serving(client, wallets[0])
    await retry_unavailable(client, tally)
    await check_database(database_url, {**tally.acked, **tally.unavailable})


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


async def _set_standby_names(dsn: str, value: str) -> None:
    """Change synchronous_standby_names and wait until the postmaster has taken it: from
    then on every backend applies it before it runs its next statement."""
    admin = await asyncpg.connect(dsn)
    try:
        await admin.execute(f"ALTER SYSTEM SET synchronous_standby_names = '{value}'")
        await admin.execute("SELECT pg_reload_conf()")
    finally:
        await admin.close()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + RECOVERY_S
    while True:
        fresh = await asyncpg.connect(dsn)  # a new backend starts with the postmaster's view
        try:
            if await fresh.fetchval("SHOW synchronous_standby_names") == value:
                return
        finally:
            await fresh.close()
        assert loop.time() < deadline, "the configuration was not reloaded"
        await asyncio.sleep(POLL_S)


async def _backend_waiting_for_standby(dsn: str) -> int:
    """The pid of the backend whose COMMIT has landed locally and now waits for a standby."""
    admin = await asyncpg.connect(dsn)
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RECOVERY_S
        while True:
            pid: int | None = await admin.fetchval(
                "SELECT pid FROM pg_stat_activity WHERE wait_event = 'SyncRep' LIMIT 1"
            )
            if pid is not None:
                return pid
            assert loop.time() < deadline, "no commit is waiting for the standby"
            await asyncio.sleep(POLL_S)
    finally:
        await admin.close()


@pytest.mark.parametrize("answer_lost_by", ["connection killed", "commit timeout"])
async def test_a_503_that_hid_a_commit_is_replayed_once_by_a_same_key_retry(
    tmp_path: Path, aiohttp_client: Callable[..., Any], answer_lost_by: str
) -> None:
    """On PostgreSQL: a deposit's commit lands but walletd never hears so (its connection is
    killed, or its commit timeout cancels the statement, while the COMMIT waits for a
    synchronous standby that never comes). The client gets 503; the same-key retry is
    answered 200 as a replay of that commit, and the deposit is stored exactly once."""
    async with own_postgres(tmp_path / "pg") as server:
        await migrate_database(server.dsn)
        commit_timeout_s = "1" if answer_lost_by == "commit timeout" else "60"
        config = load_config(
            argparse.Namespace(),
            environ={
                "WALLETD_DATABASE_URL": server.dsn,
                "WALLETD_COMMIT_TIMEOUT": commit_timeout_s,
            },
        )
        client: Client = await aiohttp_client(
            create_app(HttpSettings(), lambda: running_services(config))
        )
        (wallet,) = await create_wallets(client, 1)
        assert await deposit(client, wallet, 1000, "before") == (200, False)

        await _set_standby_names(server.dsn, "walletd_test_no_such_standby")
        lost = asyncio.create_task(deposit(client, wallet, 500, "lost-answer"))
        pid = await _backend_waiting_for_standby(server.dsn)
        if answer_lost_by == "connection killed":
            admin = await asyncpg.connect(server.dsn)
            try:
                assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
            finally:
                await admin.close()
        assert await lost == (503, False)
        await _set_standby_names(server.dsn, "")

        response = await client.post(
            f"/api/v1/wallets/{wallet}/operation",
            json=deposit_body(500),
            headers={"Idempotency-Key": "lost-answer"},
        )
        assert response.status == 200, await response.text()
        assert response.headers.get("Idempotent-Replayed") == "true"
        assert (await response.json())["balance"] == "15.00"
        wallet_now = await (await client.get(f"/api/v1/wallets/{wallet}")).json()
        assert wallet_now["balance"] == "15.00"
        await client.close()
        await check_database(server.dsn, {"before": (wallet, 1000), "lost-answer": (wallet, 500)})


async def test_postgres_stopped_and_started_under_load(
    tmp_path: Path, aiohttp_client: Callable[..., Any]
) -> None:
    """With the production wiring: stopping PostgreSQL under load gives 503s (no 500) and
    readiness 503; once it is back walletd serves again without a restart, readiness 200,
    nothing acknowledged is lost, and every 503'd deposit retried with its key is stored once."""
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
        tally = Tally()
        stop = asyncio.Event()
        loading = asyncio.create_task(load(client, wallets, tally, stop))
        try:
            await until(lambda: len(tally.acked) >= 20, RECOVERY_S, "acks before the stop")
            await asyncio.to_thread(server.stop, "fast")
            deadline = asyncio.get_running_loop().time() + RECOVERY_S
            while await ready_status(client) != 503:  # readiness is cached for a moment
                assert asyncio.get_running_loop().time() < deadline, "never unready"
                await asyncio.sleep(POLL_S)
            await until(lambda: tally.statuses[503] > 0, RECOVERY_S, "503s while down")
            await asyncio.to_thread(server.start)
            await until_serving(client, wallets[0])
            deadline = asyncio.get_running_loop().time() + RECOVERY_S
            while await ready_status(client) != 200:
                assert asyncio.get_running_loop().time() < deadline, "never ready again"
                await asyncio.sleep(0.2)
            acked_after_restart = len(tally.acked)
            await until(
                lambda: len(tally.acked) >= acked_after_restart + 20,
                RECOVERY_S,
                "acks after the restart",
            )
        finally:
            stop.set()
            await loading
        assert set(tally.statuses) <= {200, 503}, tally.statuses
        await retry_unavailable(client, tally)
        await client.close()
        await check_database(server.dsn, {**tally.acked, **tally.unavailable})
