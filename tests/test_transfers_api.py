"""Transfers end to end: real app, real socket, real PostgreSQL. The API's answers, and money
conserved at every instant while transfers run concurrently across shards."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Callable
from typing import Any

import asyncpg
from aiohttp import web
from aiohttp.test_utils import TestClient

from tests.conftest import AppFactory
from walletd.engine.limits import EngineLimits

Client = TestClient[web.Request, web.Application]

# Money in (deposits) minus money out (withdrawals), net of their reversals (kinds 10 and
# 11), from the log; against it, what the wallets hold plus what is visibly in flight. One
# REPEATABLE READ snapshot for both.
CONSERVATION_SQL = """
SELECT (SELECT coalesce(sum(balance), 0) FROM wallets)
       + (SELECT coalesce(sum(amount), 0) FROM transfers WHERE status = 1) AS held,
       (SELECT coalesce(sum(CASE kind WHEN 1 THEN amount WHEN 2 THEN -amount
                                      WHEN 10 THEN -amount WHEN 11 THEN amount ELSE 0 END), 0)
          FROM wallet_operations) AS external
"""


async def conservation_gap(connection: asyncpg.Connection) -> int:
    """held - external in one consistent snapshot; 0 when money is conserved."""
    async with connection.transaction(isolation="repeatable_read", readonly=True):
        row = await connection.fetchrow(CONSERVATION_SQL)
    assert row is not None
    return int(row["held"]) - int(row["external"])


async def new_wallet(client: Client, deposit: str | None = None) -> str:
    response = await client.post("/api/v1/wallets")
    assert response.status == 201
    wallet_id: str = (await response.json())["id"]
    if deposit is not None:
        response = await client.post(
            f"/api/v1/wallets/{wallet_id}/operation",
            json={"operation_type": "DEPOSIT", "amount": deposit},
        )
        assert response.status == 200
    return wallet_id


async def transfer(
    client: Client, headers: dict[str, str] | None = None, **body: Any
) -> tuple[int, dict[str, Any], Any]:
    response = await client.post("/api/v1/transfers", json=body, headers=headers)
    return response.status, await response.json(content_type=None), response.headers


async def balance(client: Client, wallet_id: str) -> str:
    response = await client.get(f"/api/v1/wallets/{wallet_id}")
    assert response.status == 200
    value: str = (await response.json())["balance"]
    return value


async def test_a_transfer_is_201_readable_and_in_both_histories(client: Client) -> None:
    """201 with the COMPLETED transfer and a Location; GET reads it; each wallet's history
    lists its leg with the transfer id; both balances moved."""
    sender, receiver = await new_wallet(client, "100.00"), await new_wallet(client)
    status, body, headers = await transfer(
        client, from_wallet_id=sender, to_wallet_id=receiver, amount="30.50", reference="inv-9"
    )
    assert status == 201, body
    assert body["status"] == "COMPLETED"
    assert (body["amount"], body["reference"], body["failure_code"]) == ("30.50", "inv-9", None)
    assert headers["Location"] == f"/api/v1/transfers/{body['id']}"
    response = await client.get(headers["Location"])
    assert response.status == 200
    assert await response.json() == body
    assert (await balance(client, sender), await balance(client, receiver)) == ("69.50", "30.50")
    for wallet_id, kind in ((sender, "TRANSFER_OUT"), (receiver, "TRANSFER_IN")):
        response = await client.get(f"/api/v1/wallets/{wallet_id}/operations")
        newest = (await response.json())["items"][0]
        assert (newest["operation_type"], newest["transfer_id"]) == (kind, body["id"])
        assert newest["idempotency_key"] is None
    metrics = await (await client.get("/metrics")).text()
    assert 'walletd_transfers_ended_total{driver="REQUEST",status="COMPLETED"} 1.0' in metrics
    assert "walletd_transfers_driving 0.0" in metrics


async def test_refusals_name_their_side_and_a_failed_transfer_is_refunded(
    client: Client,
) -> None:
    """404 names the missing side; a missing receiver ends the transfer FAILED with the
    debit refunded (visible in history and by GET); insufficient funds is 409 on `from`."""
    sender = await new_wallet(client, "10.00")
    nowhere = str(uuid.uuid4())
    status, body, _ = await transfer(
        client, from_wallet_id=nowhere, to_wallet_id=sender, amount="1.00"
    )
    assert (status, body["code"], body["side"]) == (404, "WALLET_NOT_FOUND", "from")
    status, body, _ = await transfer(
        client, from_wallet_id=sender, to_wallet_id=nowhere, amount="4.00"
    )
    assert (status, body["code"], body["side"]) == (404, "WALLET_NOT_FOUND", "to")
    assert body["transfer"]["status"] == "FAILED"
    assert body["transfer"]["failure_code"] == "WALLET_NOT_FOUND"
    response = await client.get(f"/api/v1/transfers/{body['transfer_id']}")
    assert (await response.json())["status"] == "FAILED"
    assert await balance(client, sender) == "10.00"
    response = await client.get(f"/api/v1/wallets/{sender}/operations")
    kinds = [item["operation_type"] for item in (await response.json())["items"]]
    assert kinds == ["TRANSFER_REFUND", "TRANSFER_OUT", "DEPOSIT"]
    receiver = await new_wallet(client)
    status, body, _ = await transfer(
        client, from_wallet_id=sender, to_wallet_id=receiver, amount="10.01"
    )
    assert (status, body["code"], body["side"]) == (409, "INSUFFICIENT_FUNDS", "from")


async def test_a_refused_transfer_is_replayed_by_its_key_even_after_a_deposit(
    client: Client,
) -> None:
    """A keyed transfer refused for funds is an original answer: after a deposit that would
    cover it, the retry gets the same 409 and body with Idempotent-Replayed, nothing moves,
    and no transfer exists; a different amount under the key is 422."""
    sender, receiver = await new_wallet(client, "10.00"), await new_wallet(client)
    key = {"Idempotency-Key": f"pay-{uuid.uuid4()}"}
    request = {"from_wallet_id": sender, "to_wallet_id": receiver, "amount": "10.01"}
    status, first, headers = await transfer(client, key, **request)
    assert (status, first["code"], first["side"]) == (409, "INSUFFICIENT_FUNDS", "from")
    assert "Idempotent-Replayed" not in headers
    response = await client.post(
        f"/api/v1/wallets/{sender}/operation",
        json={"operation_type": "DEPOSIT", "amount": "5.00"},
    )
    assert response.status == 200
    status, again, headers = await transfer(client, key, **request)
    assert (status, again, headers.get("Idempotent-Replayed")) == (409, first, "true")
    status, other, _ = await transfer(client, key, **{**request, "amount": "10.02"})
    assert (status, other["code"]) == (422, "IDEMPOTENCY_KEY_REUSED")
    assert (await balance(client, sender), await balance(client, receiver)) == ("15.00", "0.00")
    response = await client.get(f"/api/v1/wallets/{sender}/operations")
    kinds = [item["operation_type"] for item in (await response.json())["items"]]
    assert kinds == ["DEPOSIT", "DEPOSIT"]


async def test_bad_transfer_requests_are_422_and_write_nothing(client: Client) -> None:
    """Same wallet on both sides, bad amount, unknown field, bad reference: 422 per field."""
    wallet = await new_wallet(client, "5.00")
    other = await new_wallet(client)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"from_wallet_id": wallet, "to_wallet_id": wallet, "amount": 1}, "to_wallet_id"),
        ({"from_wallet_id": wallet, "to_wallet_id": other, "amount": "0.001"}, "amount"),
        ({"from_wallet_id": wallet, "to_wallet_id": other, "amount": 0}, "amount"),
        ({"from_wallet_id": wallet, "to_wallet_id": other, "amount": 1, "x": 1}, "x"),
        ({"from_wallet_id": wallet, "to_wallet_id": other, "amount": 1, "reference": ""},
         "reference"),
        ({"from_wallet_id": wallet, "to_wallet_id": other, "amount": 1, "reference": "a\x00"},
         "reference"),
        ({"from_wallet_id": wallet, "to_wallet_id": wallet.replace("-", ""), "amount": 1},
         "to_wallet_id"),
        ({"to_wallet_id": other, "amount": 1}, "from_wallet_id"),
    ]  # fmt: skip
    for body, field in cases:
        status, problem, _ = await transfer(client, **body)
        assert status == 422, (body, problem)
        assert field in {error["field"] for error in problem["errors"]}, (body, problem)
    assert (await balance(client, wallet), await balance(client, other)) == ("5.00", "0.00")
    response = await client.get("/api/v1/transfers/not-a-uuid")
    assert (response.status, (await response.json())["code"]) == (400, "INVALID_TRANSFER_ID")
    response = await client.get(f"/api/v1/transfers/{uuid.uuid4()}")
    assert (response.status, (await response.json())["code"]) == (404, "TRANSFER_NOT_FOUND")


async def test_idempotency_by_id_and_by_key(client: Client) -> None:
    """A chosen id or an Idempotency-Key alone replays the original 201 (applied once);
    the same id with another request is 422 IDEMPOTENCY_KEY_REUSED."""
    sender, receiver = await new_wallet(client, "50.00"), await new_wallet(client)
    chosen = str(uuid.uuid4())
    body: dict[str, Any] = {
        "id": chosen,
        "from_wallet_id": sender,
        "to_wallet_id": receiver,
        "amount": 5,
    }
    first = await transfer(client, **body)
    again = await transfer(client, **body)
    assert (first[0], again[0]) == (201, 201)
    assert again[1] == first[1]
    assert again[2]["Idempotent-Replayed"] == "true"
    status, problem, _ = await transfer(client, **{**body, "amount": 6})
    assert (status, problem["code"]) == (422, "IDEMPOTENCY_KEY_REUSED")
    keyed = {"from_wallet_id": sender, "to_wallet_id": receiver, "amount": "7.00"}
    first = await transfer(client, {"Idempotency-Key": "pay-1"}, **keyed)
    again = await transfer(client, {"Idempotency-Key": "pay-1"}, **keyed)
    assert (first[0], again[0], again[1]["id"]) == (201, 201, first[1]["id"])
    assert (await balance(client, sender), await balance(client, receiver)) == ("38.00", "12.00")


async def test_money_is_conserved_at_every_instant_of_concurrent_transfers(
    make_app: AppFactory, aiohttp_client: Callable[..., Any], database_url: str
) -> None:
    """100 wallets over 4 shards, transfers between random pairs plus deposits and
    withdrawals, all concurrent; the sum of balances plus PENDING transfers equals deposits
    minus withdrawals in every one of many REPEATABLE READ samples taken during the run,
    and no balance is ever negative."""
    app = make_app(limits=EngineLimits(pipelines=4))
    client: Client = await aiohttp_client(app)
    wallets = [await new_wallet(client, "100.00") for _ in range(100)]
    rng = random.Random(13)
    samples: list[int] = []
    done = asyncio.Event()

    async def sampler() -> None:
        connection = await asyncpg.connect(database_url)
        try:
            while not done.is_set():
                samples.append(await conservation_gap(connection))
                await asyncio.sleep(0.005)  # pacing only: each sample is its own check
            samples.append(await conservation_gap(connection))
        finally:
            await connection.close()

    statuses: dict[int, int] = {}

    async def worker(seed: int) -> None:
        local = random.Random(seed)
        for _ in range(40):
            roll = local.random()
            if roll < 0.8:
                sender, receiver = local.sample(wallets, 2)
                amount = f"{local.randint(1, 6000) / 100:.2f}"
                status, _body, _ = await transfer(
                    client, from_wallet_id=sender, to_wallet_id=receiver, amount=amount
                )
            else:
                kind = "DEPOSIT" if roll < 0.9 else "WITHDRAW"
                response = await client.post(
                    f"/api/v1/wallets/{local.choice(wallets)}/operation",
                    json={"operation_type": kind, "amount": f"{local.randint(1, 3000) / 100:.2f}"},
                )
                status = response.status
            statuses[status] = statuses.get(status, 0) + 1

    sampling = asyncio.create_task(sampler())
    await asyncio.gather(*(worker(rng.randrange(2**32)) for _ in range(16)))
    done.set()
    await sampling
    assert set(statuses) <= {200, 201, 409}, statuses
    assert statuses.get(201, 0) > 100, statuses
    assert len(samples) >= 20
    assert samples == [0] * len(samples)
    connection = await asyncpg.connect(database_url)
    try:
        negative = await connection.fetchval("SELECT count(*) FROM wallets WHERE balance < 0")
        pending = await connection.fetchval("SELECT count(*) FROM transfers WHERE status = 1")
    finally:
        await connection.close()
    assert (negative, pending) == (0, 0)
