"""The seed's API end to end: real app, real socket, real PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient

Client = TestClient[web.Request, web.Application]
JSON = {"Content-Type": "application/json"}


async def create_wallet(client: Client, **body: Any) -> dict[str, Any]:
    response = await client.post("/api/v1/wallets", json=body or None)
    assert response.status == 201, await response.text()
    wallet: dict[str, Any] = await response.json()
    return wallet


async def operate(
    client: Client, wallet_id: str, kind: str, amount: Any, **headers: str
) -> tuple[int, dict[str, Any]]:
    response = await client.post(
        f"/api/v1/wallets/{wallet_id}/operation",
        json={"operation_type": kind, "amount": amount},
        headers=headers,
    )
    return response.status, await response.json(content_type=None)


async def test_create_wallet_returns_the_seed_shape(client: Client) -> None:
    """POST /wallets answers 201 with the seed's four fields and a Location header."""
    response = await client.post("/api/v1/wallets")
    assert response.status == 201
    body = await response.json()
    assert set(body) == {
        "id", "balance", "available", "held", "currency", "created_at", "updated_at",
    }  # fmt: skip
    assert body["balance"] == "0.00"
    assert body["currency"] == "USD"  # the default currency's default
    assert body["created_at"] == body["updated_at"]
    assert body["created_at"].endswith("Z")
    assert response.headers["Location"] == f"/api/v1/wallets/{body['id']}"
    uuid.UUID(body["id"])


async def test_create_wallet_with_a_chosen_id_and_conflict(client: Client) -> None:
    """A chosen id is used; choosing it again is 409 WALLET_ALREADY_EXISTS."""
    chosen = str(uuid.uuid4())
    wallet = await create_wallet(client, id=chosen)
    assert wallet["id"] == chosen
    response = await client.post("/api/v1/wallets", json={"id": chosen})
    assert response.status == 409
    assert response.content_type == "application/problem+json"
    assert (await response.json())["code"] == "WALLET_ALREADY_EXISTS"


async def test_get_wallet(client: Client) -> None:
    """GET returns the wallet; an unknown one is 404; a non-UUID is 400."""
    wallet = await create_wallet(client)
    response = await client.get(f"/api/v1/wallets/{wallet['id']}")
    assert response.status == 200
    assert await response.json() == wallet
    missing = await client.get(f"/api/v1/wallets/{uuid.uuid4()}")
    assert missing.status == 404
    assert (await missing.json())["code"] == "WALLET_NOT_FOUND"
    bad = await client.get("/api/v1/wallets/not-a-uuid")
    assert bad.status == 400
    assert (await bad.json())["code"] == "INVALID_WALLET_ID"


async def test_deposit_and_withdraw(client: Client) -> None:
    """Deposits add, withdrawals subtract, each response is the wallet after the op."""
    wallet = await create_wallet(client)
    status, body = await operate(client, wallet["id"], "DEPOSIT", 1000)
    assert (status, body["balance"]) == (200, "1000.00")
    status, body = await operate(client, wallet["id"], "WITHDRAW", "250.50")
    assert (status, body["balance"]) == (200, "749.50")
    assert body["updated_at"] >= body["created_at"]
    fetched = await (await client.get(f"/api/v1/wallets/{wallet['id']}")).json()
    assert fetched["balance"] == "749.50"


async def test_exact_decimal_arithmetic(client: Client) -> None:
    """0.1 + 0.2 is exactly 0.30: no binary floats anywhere."""
    wallet = await create_wallet(client)
    await operate(client, wallet["id"], "DEPOSIT", 0.1)
    status, body = await operate(client, wallet["id"], "DEPOSIT", 0.2)
    assert (status, body["balance"]) == (200, "0.30")
    status, body = await operate(client, wallet["id"], "WITHDRAW", "0.30")
    assert (status, body["balance"]) == (200, "0.00")


async def test_operation_type_alias(client: Client) -> None:
    """The camelCase key operationType is accepted as an alias."""
    wallet = await create_wallet(client)
    response = await client.post(
        f"/api/v1/wallets/{wallet['id']}/operation",
        json={"operationType": "DEPOSIT", "amount": "5"},
    )
    assert response.status == 200
    assert (await response.json())["balance"] == "5.00"


async def test_insufficient_funds_leaves_balance_unchanged(client: Client) -> None:
    """A withdrawal past the balance is 409 INSUFFICIENT_FUNDS and changes nothing."""
    wallet = await create_wallet(client)
    await operate(client, wallet["id"], "DEPOSIT", "10.00")
    status, body = await operate(client, wallet["id"], "WITHDRAW", "25.00")
    assert status == 409
    assert body["code"] == "INSUFFICIENT_FUNDS"
    assert "10.00" in body["detail"]
    assert "25.00" in body["detail"]
    assert body["instance"] == f"/api/v1/wallets/{wallet['id']}/operation"
    fetched = await (await client.get(f"/api/v1/wallets/{wallet['id']}")).json()
    assert fetched["balance"] == "10.00"


async def test_operation_on_unknown_wallet_is_404(client: Client) -> None:
    """An operation on a wallet that does not exist is 404 and creates nothing."""
    missing = str(uuid.uuid4())
    status, body = await operate(client, missing, "DEPOSIT", 1)
    assert (status, body["code"]) == (404, "WALLET_NOT_FOUND")
    assert (await client.get(f"/api/v1/wallets/{missing}")).status == 404


async def test_validation_errors(client: Client) -> None:
    """Bad bodies are 400/422 problem+json with a per-field errors list."""
    wallet = await create_wallet(client)
    url = f"/api/v1/wallets/{wallet['id']}/operation"
    cases: list[tuple[bytes, int, str]] = [
        (b"{not json", 400, "INVALID_JSON"),
        (b"[1, 2]", 400, "INVALID_JSON"),
        (b'{"operation_type": "DEPOSIT"}', 422, "VALIDATION_ERROR"),
        (b'{"operation_type": "STEAL", "amount": 1}', 422, "VALIDATION_ERROR"),
        (b'{"operation_type": "DEPOSIT", "amount": -5}', 422, "VALIDATION_ERROR"),
        (b'{"operation_type": "DEPOSIT", "amount": 0}', 422, "VALIDATION_ERROR"),
        (b'{"operation_type": "DEPOSIT", "amount": 1.005}', 422, "VALIDATION_ERROR"),
        (b'{"operation_type": "DEPOSIT", "amount": true}', 422, "VALIDATION_ERROR"),
        (b'{"operation_type": "DEPOSIT", "amount": ""}', 422, "VALIDATION_ERROR"),
        (b'{"operation_type": "DEPOSIT", "amount": NaN}', 422, "VALIDATION_ERROR"),
        (b'{"operation_type": "DEPOSIT", "amount": 1e400}', 422, "VALIDATION_ERROR"),
        (b'{"operation_type": "DEPOSIT", "amount": 1e-3}', 422, "VALIDATION_ERROR"),
        (b'{"operation_type": "DEPOSIT", "amount": 99999999999999999999}', 422,
         "VALIDATION_ERROR"),
        (b'{"operation_type": "DEPOSIT", "amount": 1, "extra": 1}', 422, "VALIDATION_ERROR"),
    ]  # fmt: skip
    for raw, status, code in cases:
        response = await client.post(url, data=raw, headers=JSON)
        body = await response.json(content_type=None)
        assert (response.status, body.get("code")) == (status, code), raw
        assert response.content_type == "application/problem+json", raw
        if status == 422:
            assert body["errors"], raw
    fetched = await (await client.get(f"/api/v1/wallets/{wallet['id']}")).json()
    assert fetched["balance"] == "0.00"


async def test_unknown_route_and_wrong_method_are_problems(client: Client) -> None:
    """Unknown routes are 404 NOT_FOUND and wrong methods 405, as problem+json."""
    response = await client.get("/api/v1/nothing-here")
    assert response.status == 404
    assert (await response.json())["code"] == "NOT_FOUND"
    response = await client.delete(f"/api/v1/wallets/{uuid.uuid4()}")
    assert response.status == 405
    assert response.content_type == "application/problem+json"
    assert "GET" in response.headers["Allow"]


async def test_health_endpoints(client: Client) -> None:
    """/healthz and /readyz answer 200 while serving."""
    assert (await client.get("/healthz")).status == 200
    ready = await client.get("/readyz")
    assert ready.status == 200
    assert (await ready.json()) == {"status": "ready"}


async def test_concurrent_operations_on_one_wallet_are_exact(client: Client) -> None:
    """1,000 concurrent deposits/withdrawals on one wallet: exact balance, no 5xx, never < 0."""
    wallet = await create_wallet(client)
    wallet_id = wallet["id"]
    await operate(client, wallet_id, "DEPOSIT", "100.00")
    semaphore = asyncio.Semaphore(200)

    async def one(index: int) -> tuple[int, str, str | None]:
        kind = "DEPOSIT" if index % 2 == 0 else "WITHDRAW"
        async with semaphore:
            status, body = await operate(client, wallet_id, kind, "1.00")
        return status, kind, body.get("balance")

    results = await asyncio.gather(*(one(i) for i in range(1000)))
    assert all(status < 500 for status, _, _ in results)
    applied = 10000
    for status, kind, balance in results:
        assert status in (200, 409)
        if status == 200:
            applied += 100 if kind == "DEPOSIT" else -100
            assert balance is not None
            assert not balance.startswith("-")
    fetched = await (await client.get(f"/api/v1/wallets/{wallet_id}")).json()
    units, cents = divmod(applied, 100)
    assert fetched["balance"] == f"{units}.{cents:02d}"
    assert sum(1 for status, _, _ in results if status == 200) >= 500
