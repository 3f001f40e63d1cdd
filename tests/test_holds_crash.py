"""Holds outlive the process: kill -9 of walletd with PENDING holds, then a new process
keeps them held, captures and voids them, replays their keys, and releases the expired one
by its sweep."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from tests.processes import WalletdProcess
from tests.test_holds_api import invariants
from walletd.persistence.operator import verify

pytestmark = pytest.mark.slow

StartWalletd = Callable[..., WalletdProcess]
TIMEOUT = aiohttp.ClientTimeout(total=30)


async def _call(
    session: aiohttp.ClientSession, method: str, url: str, body: Any = None,
    key: str | None = None,
) -> tuple[int, dict[str, Any], str | None]:  # fmt: skip
    headers = {"Idempotency-Key": key} if key is not None else None
    async with session.request(method, url, json=body, headers=headers) as response:
        return (
            response.status,
            await response.json(content_type=None),
            response.headers.get("Idempotent-Replayed"),
        )


async def test_holds_survive_kill_9_and_expire_after_it(
    walletd_process: StartWalletd, database_url: str
) -> None:
    args = ("--database-url", database_url, "--shards", "4", "--hold-sweep-interval", "0.2")
    first = await asyncio.to_thread(walletd_process, *args)
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        base = first.url + "/api/v1"
        _, wallet, _ = await _call(session, "POST", base + "/wallets")
        wallet_url = f"{base}/wallets/{wallet['id']}"
        await _call(session, "POST", wallet_url + "/operation",
                    {"operation_type": "DEPOSIT", "amount": "100.00"})  # fmt: skip
        status, kept, _ = await _call(session, "POST", wallet_url + "/holds",
                                      {"amount": "30.00"}, key="keep")  # fmt: skip
        assert status == 201
        _, voided, _ = await _call(session, "POST", wallet_url + "/holds", {"amount": "20.00"})
        _, expiring, _ = await _call(
            session, "POST", wallet_url + "/holds", {"amount": "10.00", "expires_in_s": 3}
        )
        _, captured, _ = await _call(
            session, "POST", f"{base}/holds/{voided['id']}/void", key="v-1"
        )
        assert captured["status"] == "VOIDED"
    first.kill()  # SIGKILL: no drain

    second = await asyncio.to_thread(walletd_process, *args)
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        base = second.url + "/api/v1"
        wallet_url = f"{base}/wallets/{wallet['id']}"
        _, body, _ = await _call(session, "GET", wallet_url)
        assert body["balance"] == "100.00"
        assert (body["available"], body["held"]) in {("60.00", "40.00"), ("70.00", "30.00")}
        # Keys replay after the restart: the creation and the void.
        status, again, replayed = await _call(session, "POST", wallet_url + "/holds",
                                              {"amount": "30.00"}, key="keep")  # fmt: skip
        assert (status, again["id"], replayed) == (201, kept["id"], "true")
        status, again, replayed = await _call(
            session, "POST", f"{base}/holds/{voided['id']}/void", key="v-1"
        )
        assert (status, again["status"], replayed) == (200, "VOIDED", "true")
        status, _, _ = await _call(session, "POST", wallet_url + "/holds", {"amount": "70.01"})
        assert status == 409  # 30 still held after the restart (10 more until swept)
        # The expired hold is released by the new process's sweep.
        deadline = asyncio.get_running_loop().time() + 15
        while True:
            _, hold, _ = await _call(session, "GET", f"{base}/holds/{expiring['id']}")
            if hold["status"] == "EXPIRED":
                break
            assert asyncio.get_running_loop().time() < deadline, hold
            await asyncio.sleep(0.2)
        status, done, _ = await _call(
            session, "POST", f"{base}/holds/{kept['id']}/capture", {"amount": "12.50"}
        )
        assert (status, done["status"], done["released_amount"]) == (200, "CAPTURED", "17.50")
        _, body, _ = await _call(session, "GET", wallet_url)
        assert (body["balance"], body["available"], body["held"]) == ("87.50", "87.50", "0.00")
    second.terminate()
    assert await invariants(database_url) == (0, 0, 0)
    assert (await verify(database_url)).clean
