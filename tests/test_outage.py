"""PostgreSQL stops while walletd serves: prompt 503s, /readyz 503, recovery by itself.

The test owns its PostgreSQL (an EmbeddedPostgres in tmp_path) and really stops it with
``pg_ctl stop -m immediate`` (a crash, from the database's view), then starts it again on
the same port. The shared session server is never touched.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from walletd.cli.config import load_config
from walletd.cli.service import migrate_database, running_services
from walletd.http.app import create_app
from walletd.http.settings import HttpSettings
from walletd.persistence.embedded import EmbeddedPostgres
from walletd.persistence.operator import verify

pytestmark = pytest.mark.slow  # stops and starts its own PostgreSQL

Client = TestClient[web.Request, web.Application]

# Generous guards against hangs, not performance assertions: with 1 s database timeouts
# and a 2 s commit timeout every request must be answered well within them.
ANSWER_WITHIN_S = 15.0
RECOVERY_WITHIN_S = 60.0


@pytest.fixture
async def own_postgres(tmp_path: Path) -> AsyncIterator[EmbeddedPostgres]:
    embedded = EmbeddedPostgres(tmp_path / "outage")
    await asyncio.to_thread(embedded.start)
    try:
        yield embedded
    finally:
        await asyncio.to_thread(embedded.stop, "immediate")


async def _deposit(client: Client, wallet_id: str, key: str) -> tuple[int, dict[str, Any]]:
    async with asyncio.timeout(ANSWER_WITHIN_S):
        response = await client.post(
            f"/api/v1/wallets/{wallet_id}/operation",
            json={"operation_type": "DEPOSIT", "amount": "1.00"},
            headers={"Idempotency-Key": key},
        )
        return response.status, await response.json(content_type=None)


async def _status(client: Client, path: str) -> tuple[int, dict[str, Any]]:
    async with asyncio.timeout(ANSWER_WITHIN_S):
        response = await client.get(path)
        return response.status, await response.json(content_type=None)


async def _until(check: Callable[[], Any], within_s: float) -> None:
    deadline = time.monotonic() + within_s
    while not await check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.2)


async def test_requests_fail_fast_while_postgres_is_down_and_recover_after(
    own_postgres: EmbeddedPostgres, aiohttp_client: Callable[..., Any]
) -> None:
    """Down: deposits, history and /readyz answer 503 UNAVAILABLE promptly. Up: all resume."""
    dsn = own_postgres.dsn
    port = own_postgres.port
    await migrate_database(dsn)
    config = load_config(
        argparse.Namespace(),
        {
            "WALLETD_DATABASE_URL": dsn, "WALLETD_SHARDS": "2", "WALLETD_DB_CONNECT_TIMEOUT": "1",
            "WALLETD_DB_COMMAND_TIMEOUT": "2", "WALLETD_COMMIT_TIMEOUT": "2",
        },
    )  # fmt: skip
    app = create_app(HttpSettings(), lambda: running_services(config))
    client: Client = await aiohttp_client(app)
    wallet_id = (await (await client.post("/api/v1/wallets")).json())["id"]
    assert (await _deposit(client, wallet_id, "before"))[0] == 200
    assert (await _status(client, "/readyz"))[0] == 200

    await asyncio.to_thread(own_postgres.stop, "immediate")

    for n in range(3):
        status, body = await _deposit(client, wallet_id, f"down-{n}")
        assert (status, body["code"]) == (503, "UNAVAILABLE")
    status, body = await _status(client, f"/api/v1/wallets/{wallet_id}/operations")
    assert (status, body["code"]) == (503, "UNAVAILABLE")
    status, body = await _status(client, "/api/v1/wallets/00000000-0000-4000-8000-000000000000")
    assert (status, body["code"]) == (503, "UNAVAILABLE")  # a load that cannot happen

    async def not_ready() -> bool:
        status, body = await _status(client, "/readyz")
        return status == 503 and body["code"] == "UNAVAILABLE"

    await _until(not_ready, ANSWER_WITHIN_S)

    await asyncio.to_thread(own_postgres.start)
    assert own_postgres.port == port  # the same DSN works again

    async def deposit_works() -> bool:
        return (await _deposit(client, wallet_id, "after"))[0] == 200

    async def ready() -> bool:
        return (await _status(client, "/readyz"))[0] == 200

    await _until(deposit_works, RECOVERY_WITHIN_S)
    await _until(ready, RECOVERY_WITHIN_S)  # serving lock taken back too

    # Exactly the acknowledged deposits are there; the refused ones never were applied.
    status, wallet = await _status(client, f"/api/v1/wallets/{wallet_id}")
    assert (status, wallet["balance"]) == (200, "2.00")
    status, history = await _status(client, f"/api/v1/wallets/{wallet_id}/operations")
    assert [item["idempotency_key"] for item in history["items"]] == ["after", "before"]
    await client.close()
    assert (await verify(dsn)).clean
