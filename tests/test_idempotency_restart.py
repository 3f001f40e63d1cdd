"""Idempotency keys outlive the process: replays after a restart, reuse refused, one apply."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient

from tests.conftest import AppFactory

Client = TestClient[web.Request, web.Application]
ClientFactory = Callable[..., Any]


async def _operate(
    client: Client, wallet_id: str, kind: str, amount: str, key: str
) -> tuple[int, dict[str, Any], str | None]:
    response = await client.post(
        f"/api/v1/wallets/{wallet_id}/operation",
        json={"operation_type": kind, "amount": amount},
        headers={"Idempotency-Key": key},
    )
    body = await response.json(content_type=None)
    return response.status, body, response.headers.get("Idempotent-Replayed")


async def test_replays_after_a_restart_return_the_original_response(
    make_app: AppFactory, aiohttp_client: ClientFactory
) -> None:
    """A second app on the same database answers old keys with the original bodies."""
    first: Client = await aiohttp_client(make_app())
    created = await first.post("/api/v1/wallets", headers={"Idempotency-Key": "create-1"})
    assert created.status == 201
    wallet = await created.json()
    wallet_id = wallet["id"]
    status, deposit, replayed = await _operate(first, wallet_id, "DEPOSIT", "100.50", "op-1")
    assert (status, replayed) == (200, None)
    status, withdraw, _ = await _operate(first, wallet_id, "WITHDRAW", "0.50", "op-2")
    assert status == 200
    await first.close()  # the app stops: engine, pool and serving lock released

    second: Client = await aiohttp_client(make_app())
    again = await second.post("/api/v1/wallets", headers={"Idempotency-Key": "create-1"})
    assert again.status == 201
    assert again.headers["Idempotent-Replayed"] == "true"
    assert await again.json() == wallet
    assert again.headers["Location"] == f"/api/v1/wallets/{wallet_id}"

    status, body, replayed = await _operate(second, wallet_id, "DEPOSIT", "100.50", "op-1")
    assert (status, replayed) == (200, "true")
    assert body == deposit  # the balance right after op-1, not the current one
    status, body, replayed = await _operate(second, wallet_id, "WITHDRAW", "0.50", "op-2")
    assert (status, body, replayed) == (200, withdraw, "true")

    current = await (await second.get(f"/api/v1/wallets/{wallet_id}")).json()
    assert current["balance"] == "100.00"  # nothing applied twice
    history = await (await second.get(f"/api/v1/wallets/{wallet_id}/operations")).json()
    assert [item["idempotency_key"] for item in history["items"]] == ["op-2", "op-1"]


async def test_a_reused_key_with_another_request_is_refused_after_a_restart(
    make_app: AppFactory, aiohttp_client: ClientFactory
) -> None:
    """Same key, different amount, kind or creation id after a restart: 422, nothing applied."""
    first: Client = await aiohttp_client(make_app())
    wallet_id = (await (await first.post("/api/v1/wallets")).json())["id"]
    assert (await _operate(first, wallet_id, "DEPOSIT", "10.00", "k"))[0] == 200
    created = await first.post(
        "/api/v1/wallets", json={"id": "3f0e1c2a-0000-4000-8000-000000000001"},
        headers={"Idempotency-Key": "create-k"},
    )  # fmt: skip
    assert created.status == 201
    await first.close()

    second: Client = await aiohttp_client(make_app())
    for kind, amount in (("DEPOSIT", "10.01"), ("WITHDRAW", "10.00")):
        status, body, _ = await _operate(second, wallet_id, kind, amount, "k")
        assert (status, body["code"]) == (422, "IDEMPOTENCY_KEY_REUSED")
    other = await second.post(
        "/api/v1/wallets", json={"id": "3f0e1c2a-0000-4000-8000-000000000002"},
        headers={"Idempotency-Key": "create-k"},
    )  # fmt: skip
    assert other.status == 422
    assert (await other.json())["code"] == "IDEMPOTENCY_KEY_REUSED"
    current = await (await second.get(f"/api/v1/wallets/{wallet_id}")).json()
    assert current["balance"] == "10.00"


async def test_concurrent_requests_with_one_key_apply_once(
    make_app: AppFactory, aiohttp_client: ClientFactory
) -> None:
    """30 simultaneous deposits under one key: one applied, 29 replays, same bodies."""
    client: Client = await aiohttp_client(make_app())
    wallet_id = (await (await client.post("/api/v1/wallets")).json())["id"]
    results = await asyncio.gather(
        *(_operate(client, wallet_id, "DEPOSIT", "7.00", "same") for _ in range(30))
    )
    assert {status for status, _, _ in results} == {200}
    assert sum(1 for _, _, replayed in results if replayed is None) == 1
    assert len({body["balance"] for _, body, _ in results}) == 1
    current = await (await client.get(f"/api/v1/wallets/{wallet_id}")).json()
    assert current["balance"] == "7.00"
    history = await (await client.get(f"/api/v1/wallets/{wallet_id}/operations")).json()
    assert len(history["items"]) == 1
    await client.close()

    # And across the restart, concurrently: still replays only.
    second: Client = await aiohttp_client(make_app())
    results = await asyncio.gather(
        *(_operate(second, wallet_id, "DEPOSIT", "7.00", "same") for _ in range(10))
    )
    assert {(status, replayed) for status, _, replayed in results} == {(200, "true")}
    current = await (await second.get(f"/api/v1/wallets/{wallet_id}")).json()
    assert current["balance"] == "7.00"


async def test_a_refusal_is_replayed_after_a_deposit_and_a_restart(
    make_app: AppFactory, aiohttp_client: ClientFactory
) -> None:
    """A keyed withdrawal refused 409 stays refused: its retry replays the same status and
    body (Idempotent-Replayed: true) after a deposit that would now cover it, and after a
    restart; the same key with another request is 422; a validation error records nothing."""
    first: Client = await aiohttp_client(make_app())
    wallet_id = (await (await first.post("/api/v1/wallets")).json())["id"]
    status, refused, replayed = await _operate(first, wallet_id, "WITHDRAW", "5.00", "w-1")
    assert (status, refused["code"], replayed) == (409, "INSUFFICIENT_FUNDS", None)
    # Validation errors happen before the engine: the key stays unused.
    assert (await _operate(first, wallet_id, "WITHDRAW", "-1", "bad"))[0] == 422
    assert (await _operate(first, wallet_id, "DEPOSIT", "20.00", "d-1"))[0] == 200
    assert await _operate(first, wallet_id, "WITHDRAW", "5.00", "w-1") == (
        409, refused, "true",
    )  # fmt: skip
    await first.close()

    second: Client = await aiohttp_client(make_app())
    assert await _operate(second, wallet_id, "WITHDRAW", "5.00", "w-1") == (
        409, refused, "true",
    )  # fmt: skip
    status, body, _ = await _operate(second, wallet_id, "WITHDRAW", "5.01", "w-1")
    assert (status, body["code"]) == (422, "IDEMPOTENCY_KEY_REUSED")
    assert (await _operate(second, wallet_id, "WITHDRAW", "1.00", "bad"))[0] == 200
    current = await (await second.get(f"/api/v1/wallets/{wallet_id}")).json()
    assert current["balance"] == "19.00"  # 20.00 - 1.00: the refused 5.00 never applied


async def test_a_refused_transfer_is_replayed_after_a_deposit_and_a_restart(
    make_app: AppFactory, aiohttp_client: ClientFactory
) -> None:
    """A keyed transfer refused 409 INSUFFICIENT_FUNDS is read back from PostgreSQL by a new
    app: the same 409 body with Idempotent-Replayed, though the sender could pay by now."""
    first: Client = await aiohttp_client(make_app())
    sender = (await (await first.post("/api/v1/wallets")).json())["id"]
    receiver = (await (await first.post("/api/v1/wallets")).json())["id"]
    request = {"from_wallet_id": sender, "to_wallet_id": receiver, "amount": "5.00"}
    key = {"Idempotency-Key": "t-1"}
    response = await first.post("/api/v1/transfers", json=request, headers=key)
    refused = await response.json(content_type=None)
    assert (response.status, refused["code"]) == (409, "INSUFFICIENT_FUNDS")
    assert (await _operate(first, sender, "DEPOSIT", "20.00", "d-1"))[0] == 200
    await first.close()

    second: Client = await aiohttp_client(make_app())
    response = await second.post("/api/v1/transfers", json=request, headers=key)
    assert (response.status, await response.json(content_type=None)) == (409, refused)
    assert response.headers.get("Idempotent-Replayed") == "true"
    current = await (await second.get(f"/api/v1/wallets/{sender}")).json()
    assert current["balance"] == "20.00"


async def test_a_refused_hold_is_replayed_after_a_deposit_and_a_restart(
    make_app: AppFactory, aiohttp_client: ClientFactory
) -> None:
    """A keyed hold creation refused 409 INSUFFICIENT_FUNDS stays refused: its retry replays
    the 409 (Idempotent-Replayed) after a deposit that would cover it and after a restart;
    another amount under the key is 422; no hold exists and nothing is held."""
    first: Client = await aiohttp_client(make_app())
    wallet_id = (await (await first.post("/api/v1/wallets")).json())["id"]
    path, key = f"/api/v1/wallets/{wallet_id}/holds", {"Idempotency-Key": "h-1"}
    response = await first.post(path, json={"amount": "5.00"}, headers=key)
    refused = await response.json(content_type=None)
    assert (response.status, refused["code"]) == (409, "INSUFFICIENT_FUNDS")
    assert (await _operate(first, wallet_id, "DEPOSIT", "20.00", "d-1"))[0] == 200
    response = await first.post(path, json={"amount": "5.00"}, headers=key)
    assert (response.status, await response.json(content_type=None)) == (409, refused)
    assert response.headers.get("Idempotent-Replayed") == "true"
    await first.close()

    second: Client = await aiohttp_client(make_app())
    response = await second.post(path, json={"amount": "5.00"}, headers=key)
    assert (response.status, await response.json(content_type=None)) == (409, refused)
    assert response.headers.get("Idempotent-Replayed") == "true"
    response = await second.post(path, json={"amount": "6.00"}, headers=key)
    assert (response.status, (await response.json())["code"]) == (422, "IDEMPOTENCY_KEY_REUSED")
    current = await (await second.get(f"/api/v1/wallets/{wallet_id}")).json()
    assert (current["balance"], current["held"], current["available"]) == (
        "20.00", "0.00", "20.00",
    )  # fmt: skip
