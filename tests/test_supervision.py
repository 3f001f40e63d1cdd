"""Shard supervision for real: a corrupt row in PostgreSQL (its CHECK dropped) breaks a
ledger invariant and crashes the shard that loads it; the shard is restarted from storage,
and past the restart rate /readyz fails and ``walletd serve`` exits non-zero."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from tests.conftest import AppFactory
from tests.engine_doubles import until
from tests.processes import WalletdProcess
from walletd.engine.limits import EngineLimits
from walletd.http.state import STATE_KEY

Client = TestClient[web.Request, web.Application]
WAIT_S = 30.0


async def _corrupt_wallets(dsn: str, count: int) -> list[str]:
    """Stored wallets with a negative balance: the first deposit on one breaks the ledger's
    'balance in range' invariant (a bug or a bad restore, never a client's fault)."""
    ids = [str(uuid.uuid4()) for _ in range(count)]
    connection = await asyncpg.connect(dsn)
    try:
        # The range CHECK and the floor (a constraint trigger: balance - held >= -limit).
        await connection.execute("ALTER TABLE wallets DROP CONSTRAINT wallets_balance_range")
        await connection.execute("ALTER TABLE wallets DISABLE TRIGGER wallets_floor")
        for wallet_id in ids:
            await connection.execute(
                "INSERT INTO wallets (id, balance, seq, created_at, updated_at) "
                "VALUES ($1, -100, 0, now(), now())",
                uuid.UUID(wallet_id),
            )
    finally:
        await connection.close()
    return ids


def _deposit(wallet_id: str) -> tuple[str, dict[str, Any]]:
    return f"/api/v1/wallets/{wallet_id}/operation", {"operation_type": "DEPOSIT", "amount": "0.01"}


async def test_a_shard_crash_past_the_restart_rate_turns_readyz_503(
    database_url: str, make_app: AppFactory, aiohttp_client: Callable[..., Any]
) -> None:
    """One crash is restarted (ready again, other wallets served); the next one, past
    shard_restarts_max, leaves the engine not accepting: /readyz 503, operations 503."""
    limits = EngineLimits(pipelines=1, shard_restarts_max=1, shard_restart_window_s=600)
    client: Client = await aiohttp_client(make_app(limits=limits))
    engine = client.app[STATE_KEY].services.engine
    healthy = (await (await client.post("/api/v1/wallets")).json())["id"]
    first, second = await _corrupt_wallets(database_url, 2)
    path, body = _deposit(first)
    assert (await client.post(path, json=body)).status == 503
    await until(lambda: engine.accepting, WAIT_S)
    assert (await client.get("/readyz")).status == 200
    metrics = await (await client.get("/metrics")).text()
    assert "walletd_shard_restarts_total 1.0" in metrics
    path, body = _deposit(healthy)
    assert (await client.post(path, json=body)).status == 200
    path, body = _deposit(second)
    assert (await client.post(path, json=body)).status == 503
    await until(lambda: engine.failure is not None, WAIT_S)
    ready = await client.get("/readyz")
    assert ready.status == 503
    path, body = _deposit(healthy)
    assert (await client.post(path, json=body)).status == 503


@pytest.mark.slow
async def test_walletd_exits_non_zero_when_shards_crash_past_the_rate(
    database_url: str, walletd_process: Callable[..., WalletdProcess]
) -> None:
    """A real walletd with --shard-restarts-max 0: the first crash makes it give up, stop
    serving and exit with status 3, so its supervisor restarts it."""
    process = walletd_process("--database-url", database_url, "--shard-restarts-max", "0")
    (wallet_id,) = await _corrupt_wallets(database_url, 1)
    async with aiohttp.ClientSession(process.url) as http:
        path, body = _deposit(wallet_id)
        async with http.post(path, json=body) as response:
            assert response.status == 503
    code = await asyncio.to_thread(process.process.wait, WAIT_S)
    assert code == 3, process.log()
    assert "engine gives up" in process.log()
