"""Holds end to end: real app, real socket, real PostgreSQL. Authorize -> capture / void /
expire, available and held on the wallet, the history's hold rows, references, keys, and no
overdraft through races of withdrawals, transfers and holds on one wallet."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from tests.conftest import AppFactory
from tests.test_transfers_api import new_wallet
from walletd.client.api import WalletdClient
from walletd.client.errors import (
    CaptureExceedsHold,
    HoldAlreadyCaptured,
    HoldAlreadyVoided,
    HoldNotFound,
    InsufficientFunds,
)
from walletd.engine.limits import EngineLimits
from walletd.engine.ownership import shard_of
from walletd.persistence.operator import verify

Client = TestClient[web.Request, web.Application]

# Everything wallets own plus money in flight, against deposits - withdrawals - captures,
# and held against the PENDING holds, in one REPEATABLE READ snapshot.
INVARIANTS_SQL = """
SELECT (SELECT coalesce(sum(balance), 0) FROM wallets)
       + (SELECT coalesce(sum(amount), 0) FROM transfers WHERE status = 1)
       - (SELECT coalesce(sum(CASE kind WHEN 1 THEN amount WHEN 2 THEN -amount
                                        WHEN 7 THEN -amount ELSE 0 END), 0)
            FROM wallet_operations) AS conservation_gap,
       (SELECT count(*) FROM wallets w
         WHERE w.held <> (SELECT coalesce(sum(amount), 0) FROM holds h
                           WHERE h.wallet_id = w.id AND h.status = 1)
            OR w.held > w.balance OR w.held < 0) AS held_wrong,
       (SELECT count(*) FROM wallet_operations
         WHERE held_after > balance_after OR held_after < 0) AS rows_wrong
"""


async def invariants(database_url: str) -> tuple[int, int, int]:
    connection = await asyncpg.connect(database_url)
    try:
        async with connection.transaction(isolation="repeatable_read", readonly=True):
            row = await connection.fetchrow(INVARIANTS_SQL)
    finally:
        await connection.close()
    assert row is not None
    return int(row[0]), int(row[1]), int(row[2])


async def call(
    client: Client, method: str, path: str, body: Any = None, key: str | None = None
) -> tuple[int, dict[str, Any], Any]:
    headers = {"Idempotency-Key": key} if key is not None else None
    response = await client.request(method, path, json=body, headers=headers)
    return response.status, await response.json(content_type=None), response.headers


async def wallet(client: Client, wallet_id: str) -> tuple[str, str, str]:
    status, body, _ = await call(client, "GET", f"/api/v1/wallets/{wallet_id}")
    assert status == 200, body
    return body["balance"], body["available"], body["held"]


async def history(client: Client, wallet_id: str) -> list[dict[str, Any]]:
    status, body, _ = await call(client, "GET", f"/api/v1/wallets/{wallet_id}/operations")
    assert status == 200, body
    items: list[dict[str, Any]] = body["items"]
    return items


async def test_a_hold_reserves_money_and_a_partial_capture_releases_the_rest(
    client: Client, database_url: str
) -> None:
    """201 PENDING hold; available drops, balance not; a withdrawal or a hold past
    available is 409; a partial capture takes the captured part out and releases the rest;
    the history shows HOLD, CAPTURE and RELEASE rows with held_after, hold id, reference."""
    wallet_id = await new_wallet(client, "100.00")
    status, hold, headers = await call(
        client, "POST", f"/api/v1/wallets/{wallet_id}/holds",
        {"amount": "60.00", "expires_in_s": 600, "reference": "order-7"},
    )  # fmt: skip
    assert status == 201, hold
    assert (hold["status"], hold["amount"], hold["wallet_id"]) == ("PENDING", "60.00", wallet_id)
    assert headers["Location"] == f"/api/v1/holds/{hold['id']}"
    assert await wallet(client, wallet_id) == ("100.00", "40.00", "60.00")
    status, refused, _ = await call(
        client, "POST", f"/api/v1/wallets/{wallet_id}/operation",
        {"operation_type": "WITHDRAW", "amount": "40.01"},
    )  # fmt: skip
    assert (status, refused["code"]) == (409, "INSUFFICIENT_FUNDS")
    status, refused, _ = await call(
        client, "POST", f"/api/v1/wallets/{wallet_id}/holds", {"amount": "40.01"}
    )
    assert (status, refused["code"]) == (409, "INSUFFICIENT_FUNDS")
    status, read, _ = await call(client, "GET", f"/api/v1/holds/{hold['id']}")
    assert (status, read) == (200, hold)

    status, captured, _ = await call(
        client, "POST", f"/api/v1/holds/{hold['id']}/capture", {"amount": "25.00"}
    )
    assert status == 200, captured
    assert (captured["status"], captured["captured_amount"], captured["released_amount"]) == (
        "CAPTURED", "25.00", "35.00",
    )  # fmt: skip
    assert await wallet(client, wallet_id) == ("75.00", "75.00", "0.00")
    rows = [
        (i["operation_type"], i["amount"], i["balance_after"], i["held_after"], i["hold_id"],
         i["reference"])
        for i in await history(client, wallet_id)
    ]  # fmt: skip
    assert rows == [
        ("RELEASE", "35.00", "75.00", "0.00", hold["id"], "order-7"),
        ("CAPTURE", "25.00", "75.00", "35.00", hold["id"], "order-7"),
        ("HOLD", "60.00", "100.00", "60.00", hold["id"], "order-7"),
        ("DEPOSIT", "100.00", "100.00", "0.00", None, None),
    ]
    # Resolved once: a second capture or a void is refused with the hold's state.
    status, again, _ = await call(client, "POST", f"/api/v1/holds/{hold['id']}/capture")
    assert (status, again["code"], again["hold"]["status"]) == (
        409, "HOLD_ALREADY_CAPTURED", "CAPTURED",
    )  # fmt: skip
    status, again, _ = await call(client, "POST", f"/api/v1/holds/{hold['id']}/void")
    assert (status, again["code"]) == (409, "HOLD_ALREADY_CAPTURED")
    assert await invariants(database_url) == (0, 0, 0)


async def test_void_releases_everything_and_a_voided_hold_cannot_be_captured(
    client: Client,
) -> None:
    wallet_id = await new_wallet(client, "10.00")
    _, hold, _ = await call(client, "POST", f"/api/v1/wallets/{wallet_id}/holds", {"amount": 10})
    assert await wallet(client, wallet_id) == ("10.00", "0.00", "10.00")
    status, voided, _ = await call(client, "POST", f"/api/v1/holds/{hold['id']}/void")
    assert (status, voided["status"], voided["released_amount"]) == (200, "VOIDED", "10.00")
    assert await wallet(client, wallet_id) == ("10.00", "10.00", "0.00")
    status, again, _ = await call(client, "POST", f"/api/v1/holds/{hold['id']}/capture")
    assert (status, again["code"]) == (409, "HOLD_ALREADY_VOIDED")
    status, again, _ = await call(client, "POST", f"/api/v1/holds/{hold['id']}/void")
    assert (status, again["code"]) == (409, "HOLD_ALREADY_VOIDED")


async def test_a_full_capture_takes_the_money_out(client: Client, database_url: str) -> None:
    wallet_id = await new_wallet(client, "10.00")
    _, hold, _ = await call(client, "POST", f"/api/v1/wallets/{wallet_id}/holds", {"amount": 4})
    status, captured, _ = await call(client, "POST", f"/api/v1/holds/{hold['id']}/capture")
    assert (status, captured["captured_amount"], captured["released_amount"]) == (
        200, "4.00", "0.00",
    )  # fmt: skip
    assert await wallet(client, wallet_id) == ("6.00", "6.00", "0.00")
    assert [i["operation_type"] for i in await history(client, wallet_id)][:1] == ["CAPTURE"]
    status, more, _ = await call(
        client, "POST", f"/api/v1/wallets/{wallet_id}/holds", {"amount": 6}
    )
    status, over, _ = await call(
        client, "POST", f"/api/v1/holds/{more['id']}/capture", {"amount": "6.01"}
    )
    assert (status, over["code"], over["hold"]["status"]) == (
        409, "CAPTURE_EXCEEDS_HOLD", "PENDING",
    )  # fmt: skip
    assert await invariants(database_url) == (0, 0, 0)


async def test_capture_after_expires_at_is_refused_and_the_sweep_releases_the_money(
    make_app: AppFactory, aiohttp_client: Callable[..., Any], database_url: str
) -> None:
    """Expiry goes by expires_at: with the sweep far away a capture past it is 409
    HOLD_EXPIRED and the money is still held; once the sweep runs it is back in available
    and the hold reads EXPIRED."""
    limits = EngineLimits(pipelines=2, hold_sweep_interval_s=3.0)
    client: Client = await aiohttp_client(make_app(limits=limits))
    wallet_id = await new_wallet(client, "10.00")
    _, hold, _ = await call(
        client, "POST", f"/api/v1/wallets/{wallet_id}/holds", {"amount": 3, "expires_in_s": 1}
    )
    await asyncio.sleep(1.1)
    status, refused, _ = await call(client, "POST", f"/api/v1/holds/{hold['id']}/capture")
    assert (status, refused["code"]) == (409, "HOLD_EXPIRED")
    status, refused, _ = await call(client, "POST", f"/api/v1/holds/{hold['id']}/void")
    assert (status, refused["code"]) == (409, "HOLD_EXPIRED")
    deadline = asyncio.get_running_loop().time() + 10
    while (await wallet(client, wallet_id))[2] != "0.00":
        assert asyncio.get_running_loop().time() < deadline, "the sweep never released it"
        await asyncio.sleep(0.1)
    assert await wallet(client, wallet_id) == ("10.00", "10.00", "0.00")
    status, read, _ = await call(client, "GET", f"/api/v1/holds/{hold['id']}")
    assert (status, read["status"], read["released_amount"]) == (200, "EXPIRED", "3.00")
    assert (await history(client, wallet_id))[0]["operation_type"] == "RELEASE"
    status, refused, _ = await call(client, "POST", f"/api/v1/holds/{hold['id']}/capture")
    assert (status, refused["code"]) == (409, "HOLD_EXPIRED")
    assert await invariants(database_url) == (0, 0, 0)


async def test_keys_replay_holds_and_their_resolutions(client: Client) -> None:
    """Creation: same key + same body -> the same hold, replayed; another body -> 422.
    Capture/void: the key that resolved the hold replays it; another body under it -> 422;
    no key -> 409 by status."""
    wallet_id = await new_wallet(client, "50.00")
    path = f"/api/v1/wallets/{wallet_id}/holds"
    first = await call(client, "POST", path, {"amount": 5, "reference": "r"}, key="h-1")
    again = await call(client, "POST", path, {"amount": 5, "reference": "r"}, key="h-1")
    assert (first[0], again[0], again[1]) == (201, 201, first[1])
    assert again[2].get("Idempotent-Replayed") == "true"
    assert first[2].get("Idempotent-Replayed") is None
    for other in ({"amount": 6, "reference": "r"}, {"amount": 5}, {"amount": 5, "reference": "s"},
                  {"amount": 5, "reference": "r", "expires_in_s": 86400}):  # fmt: skip
        status, body, _ = await call(client, "POST", path, other, key="h-1")
        assert (status, body["code"]) == (422, "IDEMPOTENCY_KEY_REUSED"), other
    assert await wallet(client, wallet_id) == ("50.00", "45.00", "5.00")
    # The key's scope is the wallet: another wallet's hold under it is a new hold.
    other_wallet = await new_wallet(client, "50.00")
    status, elsewhere, _ = await call(
        client, "POST", f"/api/v1/wallets/{other_wallet}/holds", {"amount": 5}, key="h-1"
    )
    assert status == 201
    assert elsewhere["id"] != first[1]["id"]

    hold_path = f"/api/v1/holds/{first[1]['id']}"
    captured = await call(client, "POST", hold_path + "/capture", {"amount": 2}, key="c-1")
    replay = await call(client, "POST", hold_path + "/capture", {"amount": 2}, key="c-1")
    assert (captured[0], replay[0], replay[1]) == (200, 200, captured[1])
    assert replay[2].get("Idempotent-Replayed") == "true"
    status, body, _ = await call(client, "POST", hold_path + "/capture", {"amount": 3}, key="c-1")
    assert (status, body["code"]) == (422, "IDEMPOTENCY_KEY_REUSED")
    status, body, _ = await call(client, "POST", hold_path + "/void", key="c-1")
    assert (status, body["code"]) == (422, "IDEMPOTENCY_KEY_REUSED")
    status, body, _ = await call(client, "POST", hold_path + "/capture", {"amount": 2})
    assert (status, body["code"]) == (409, "HOLD_ALREADY_CAPTURED")
    assert await wallet(client, wallet_id) == ("48.00", "48.00", "0.00")


async def test_reference_on_operations_is_stored_and_part_of_the_key(client: Client) -> None:
    wallet_id = await new_wallet(client)
    path = f"/api/v1/wallets/{wallet_id}/operation"
    body = {"operation_type": "DEPOSIT", "amount": "7.00", "reference": "inv-42"}
    first = await call(client, "POST", path, body, key="d-1")
    again = await call(client, "POST", path, body, key="d-1")
    assert (first[0], again[0], again[2].get("Idempotent-Replayed")) == (200, 200, "true")
    status, reused, _ = await call(client, "POST", path, {**body, "reference": "inv-43"}, key="d-1")
    assert (status, reused["code"]) == (422, "IDEMPOTENCY_KEY_REUSED")
    status, reused, _ = await call(
        client, "POST", path, {"operation_type": "DEPOSIT", "amount": "7.00"}, key="d-1"
    )
    assert (status, reused["code"]) == (422, "IDEMPOTENCY_KEY_REUSED")
    # A recorded refusal is replayed only for the same reference too.
    refused_body = {"operation_type": "WITHDRAW", "amount": "99.00", "reference": "w"}
    status, refused, _ = await call(client, "POST", path, refused_body, key="w-1")
    assert (status, refused["code"]) == (409, "INSUFFICIENT_FUNDS")
    status, reused, _ = await call(client, "POST", path, {**refused_body, "reference": "x"},
                                   key="w-1")  # fmt: skip
    assert (status, reused["code"]) == (422, "IDEMPOTENCY_KEY_REUSED")
    status, bulk, _ = await call(
        client, "POST", "/api/v1/operations/bulk",
        {"items": [{"wallet_id": wallet_id, "operation_type": "DEPOSIT", "amount": 1,
                    "reference": "bulk-1"}]},
    )  # fmt: skip
    assert status == 200, bulk
    items = await history(client, wallet_id)
    assert [(i["operation_type"], i["reference"]) for i in items] == [
        ("DEPOSIT", "bulk-1"), ("DEPOSIT", "inv-42"),
    ]  # fmt: skip
    status, bad, _ = await call(client, "POST", path, {**body, "reference": "a\nb"})
    assert (status, bad["code"]) == (422, "VALIDATION_ERROR")
    status, bad, _ = await call(client, "POST", path, {**body, "reference": "x" * 256})
    assert (status, bad["code"]) == (422, "VALIDATION_ERROR")


async def test_bad_hold_requests_are_refused_before_anything_is_written(
    client: Client, database_url: str
) -> None:
    wallet_id = await new_wallet(client, "10.00")
    path = f"/api/v1/wallets/{wallet_id}/holds"
    for body in (
        {}, {"amount": 0}, {"amount": "1.001"}, {"amount": True}, {"amount": "-1"},
        {"amount": 1, "expires_in_s": 0}, {"amount": 1, "expires_in_s": 2_592_001},
        {"amount": 1, "expires_in_s": 1.5}, {"amount": 1, "expires_in_s": True},
        {"amount": 1, "color": "red"}, {"amount": 1, "reference": ""},
    ):  # fmt: skip
        status, problem, _ = await call(client, "POST", path, body)
        assert (status, problem["code"]) == (422, "VALIDATION_ERROR"), body
    hold_id = str(uuid.uuid4())
    status, problem, _ = await call(client, "GET", f"/api/v1/holds/{hold_id}")
    assert (status, problem["code"]) == (404, "HOLD_NOT_FOUND")
    status, problem, _ = await call(client, "POST", f"/api/v1/holds/{hold_id}/capture")
    assert (status, problem["code"]) == (404, "HOLD_NOT_FOUND")
    status, problem, _ = await call(client, "GET", "/api/v1/holds/not-a-uuid")
    assert (status, problem["code"]) == (400, "INVALID_HOLD_ID")
    _, hold, _ = await call(client, "POST", path, {"amount": 1})
    status, problem, _ = await call(client, "POST", f"/api/v1/holds/{hold['id']}/capture",
                                    {"amount": 1, "to": "x"})  # fmt: skip
    assert (status, problem["code"]) == (422, "VALIDATION_ERROR")
    status, problem, _ = await call(client, "POST", f"/api/v1/holds/{hold['id']}/void", {"a": 1})
    assert (status, problem["code"]) == (422, "VALIDATION_ERROR")
    status, problem, _ = await call(
        client, "POST", f"/api/v1/wallets/{uuid.uuid4()}/holds", {"amount": 1}
    )
    assert (status, problem["code"]) == (404, "WALLET_NOT_FOUND")
    assert await wallet(client, wallet_id) == ("10.00", "9.00", "1.00")


async def test_pending_holds_per_wallet_are_bounded(
    make_app: AppFactory, aiohttp_client: Callable[..., Any]
) -> None:
    client: Client = await aiohttp_client(
        make_app(limits=EngineLimits(pipelines=2, holds_per_wallet_max=2))
    )
    wallet_id = await new_wallet(client, "10.00")
    path = f"/api/v1/wallets/{wallet_id}/holds"
    holds = [(await call(client, "POST", path, {"amount": 1}))[1] for _ in range(2)]
    status, problem, _ = await call(client, "POST", path, {"amount": 1})
    assert (status, problem["code"]) == (409, "TOO_MANY_HOLDS")
    await call(client, "POST", f"/api/v1/holds/{holds[0]['id']}/void")
    status, _, _ = await call(client, "POST", path, {"amount": 1})
    assert status == 201


async def test_hold_ids_land_on_their_wallets_shard(
    make_app: AppFactory, aiohttp_client: Callable[..., Any]
) -> None:
    """So /api/v1/holds/{id} routes (HAProxy's hash, forwarding) to the wallet's owner."""
    client: Client = await aiohttp_client(make_app(limits=EngineLimits(pipelines=8)))
    for n in range(6):
        wallet_id = await new_wallet(client, "10.00")
        key = f"k-{n}" if n % 2 else None
        _, hold, _ = await call(
            client, "POST", f"/api/v1/wallets/{wallet_id}/holds", {"amount": 1}, key=key
        )
        assert shard_of(uuid.UUID(hold["id"]), 8) == shard_of(uuid.UUID(wallet_id), 8)


async def test_no_overdraft_through_races_of_withdrawals_transfers_and_holds(
    make_app: AppFactory, aiohttp_client: Callable[..., Any], database_url: str
) -> None:
    """Concurrent withdrawals, transfers out, holds, captures and voids on one wallet (on
    4 shards' worth of counterparties): available never goes below zero in any answer, and
    the stored invariants hold after the run."""
    client: Client = await aiohttp_client(make_app(limits=EngineLimits(pipelines=4)))
    source = await new_wallet(client, "100.00")
    others = [await new_wallet(client) for _ in range(4)]
    holds: list[str] = []
    seen_available: list[float] = []
    statuses: dict[int, int] = {}

    async def worker(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(25):
            roll = rng.random()
            amount = f"{rng.randint(1, 900) / 100:.2f}"
            if roll < 0.25:
                status, _, _ = await call(
                    client, "POST", f"/api/v1/wallets/{source}/operation",
                    {"operation_type": "WITHDRAW", "amount": amount},
                )  # fmt: skip
            elif roll < 0.45:
                status, _, _ = await call(
                    client, "POST", "/api/v1/transfers",
                    {"from_wallet_id": source, "to_wallet_id": rng.choice(others),
                     "amount": amount},
                )  # fmt: skip
            elif roll < 0.75:
                status, body, _ = await call(
                    client, "POST", f"/api/v1/wallets/{source}/holds", {"amount": amount}
                )
                if status == 201:
                    holds.append(body["id"])
            elif holds:
                hold_id = holds.pop(rng.randrange(len(holds)))
                action = "capture" if roll < 0.9 else "void"
                status, _, _ = await call(client, "POST", f"/api/v1/holds/{hold_id}/{action}")
            else:
                status = 200
            statuses[status] = statuses.get(status, 0) + 1
            _, available, _ = await wallet(client, source)
            seen_available.append(float(available))

    await asyncio.gather(*(worker(n) for n in range(12)))
    assert set(statuses) <= {200, 201, 409}, statuses
    assert statuses.get(409, 0) > 0, statuses  # the wallet did run dry
    assert min(seen_available) >= 0
    assert await invariants(database_url) == (0, 0, 0)


async def test_verify_checks_held_against_the_log_and_the_pending_holds(
    client: Client, database_url: str
) -> None:
    """walletd verify: clean after holds, captures and voids; a held that differs from the
    log or from the PENDING holds is reported."""
    wallet_id = await new_wallet(client, "20.00")
    path = f"/api/v1/wallets/{wallet_id}/holds"
    holds = [(await call(client, "POST", path, {"amount": 5}))[1]["id"] for _ in range(3)]
    await call(client, "POST", f"/api/v1/holds/{holds[0]}/capture", {"amount": 2})
    await call(client, "POST", f"/api/v1/holds/{holds[1]}/void")
    report = await verify(database_url)
    assert report.clean, report.first_mismatches
    connection = await asyncpg.connect(database_url)
    try:
        await connection.execute("UPDATE holds SET status = 3 WHERE id = $1", uuid.UUID(holds[2]))
    finally:
        await connection.close()
    report = await verify(database_url)
    assert sorted(m.problem for m in report.first_mismatches) == [
        "held 500 != sum of its PENDING holds 0",
        f"hold {holds[2]} (VOIDED) has no RELEASE row of 500 on this wallet",
    ]


async def test_the_client_creates_captures_voids_and_reads_holds(client: Client) -> None:
    """walletd.client: each hold call, its replay by key, and a class per hold refusal."""
    base = str(client.make_url("")).rstrip("/")
    async with WalletdClient(base) as walletd:
        wallet = await walletd.create_wallet()
        await walletd.deposit(wallet.id, "10.00")
        hold = await walletd.create_hold(wallet.id, "4.00", reference="r-1", idempotency_key="h")
        assert (hold.status, hold.amount, hold.reference) == ("PENDING", Decimal("4.00"), "r-1")
        again = await walletd.create_hold(wallet.id, "4.00", reference="r-1", idempotency_key="h")
        assert (again.id, again.replayed) == (hold.id, True)
        read = await walletd.get_wallet(wallet.id)
        assert (read.balance, read.available, read.held) == (
            Decimal("10.00"), Decimal("6.00"), Decimal("4.00"),
        )  # fmt: skip
        with pytest.raises(CaptureExceedsHold):
            await walletd.capture(hold.id, "5.00")
        captured = await walletd.capture(hold.id, "1.50", idempotency_key="c")
        assert (captured.status, captured.released_amount) == ("CAPTURED", Decimal("2.50"))
        assert (await walletd.capture(hold.id, "1.50", idempotency_key="c")).replayed
        with pytest.raises(HoldAlreadyCaptured):
            await walletd.void(hold.id)
        other = await walletd.create_hold(wallet.id, "1.00")
        assert (await walletd.void(other.id)).status == "VOIDED"
        with pytest.raises(HoldAlreadyVoided):
            await walletd.capture(other.id)
        assert (await walletd.get_hold(other.id)).released_amount == Decimal("1.00")
        with pytest.raises(HoldNotFound):
            await walletd.get_hold(uuid.uuid4())
        with pytest.raises(InsufficientFunds):
            await walletd.create_hold(wallet.id, "8.51")
        target = await walletd.create_wallet()
        moving = await walletd.create_hold(wallet.id, "2.00")
        moved = await walletd.capture(moving.id, to_wallet_id=target.id)
        assert (moved.to_wallet_id, moved.transfer_id is not None) == (target.id, True)
        assert (await walletd.get_wallet(target.id)).balance == Decimal("2.00")


async def test_a_capture_into_another_wallet_moves_the_money_by_a_transfer(
    make_app: AppFactory, aiohttp_client: Callable[..., Any], database_url: str
) -> None:
    """to_wallet_id: the hold is CAPTURED, the captured part goes to the other wallet by
    a transfer (COMPLETED), the rest is released; into a missing wallet the transfer ends
    FAILED and the debit is refunded; money is conserved and no capture left the system."""
    client: Client = await aiohttp_client(make_app(limits=EngineLimits(pipelines=4)))
    source, target = await new_wallet(client, "50.00"), await new_wallet(client)
    _, hold, _ = await call(client, "POST", f"/api/v1/wallets/{source}/holds",
                            {"amount": "20.00", "reference": "order-9"})  # fmt: skip
    status, same, _ = await call(client, "POST", f"/api/v1/holds/{hold['id']}/capture",
                                 {"to_wallet_id": source})  # fmt: skip
    assert (status, same["code"]) == (422, "VALIDATION_ERROR")
    status, captured, _ = await call(
        client, "POST", f"/api/v1/holds/{hold['id']}/capture",
        {"amount": "12.00", "to_wallet_id": target}, key="move-1",
    )  # fmt: skip
    assert status == 200, captured
    assert (captured["status"], captured["captured_amount"], captured["released_amount"]) == (
        "CAPTURED", "12.00", "8.00",
    )  # fmt: skip
    assert captured["to_wallet_id"] == target
    transfer = captured["transfer"]
    assert (transfer["id"], transfer["status"], transfer["amount"], transfer["reference"]) == (
        captured["transfer_id"], "COMPLETED", "12.00", "order-9",
    )  # fmt: skip
    assert await wallet(client, source) == ("38.00", "38.00", "0.00")
    assert await wallet(client, target) == ("12.00", "12.00", "0.00")
    source_rows = [(i["operation_type"], i["amount"], i["held_after"])
                   for i in await history(client, source)][:2]  # fmt: skip
    assert source_rows == [("TRANSFER_OUT", "12.00", "0.00"), ("RELEASE", "20.00", "0.00")]
    assert (await history(client, target))[0]["transfer_id"] == captured["transfer_id"]
    replay = await call(client, "POST", f"/api/v1/holds/{hold['id']}/capture",
                        {"amount": "12.00", "to_wallet_id": target}, key="move-1")  # fmt: skip
    assert (replay[0], replay[1]["transfer"]["status"], replay[2].get("Idempotent-Replayed")) == (
        200, "COMPLETED", "true",
    )  # fmt: skip

    _, other, _ = await call(client, "POST", f"/api/v1/wallets/{source}/holds", {"amount": 5})
    status, refunded, _ = await call(
        client, "POST", f"/api/v1/holds/{other['id']}/capture",
        {"to_wallet_id": str(uuid.uuid4())},
    )  # fmt: skip
    assert (status, refunded["status"]) == (200, "CAPTURED")
    assert (refunded["transfer"]["status"], refunded["transfer"]["failure_code"]) == (
        "FAILED", "WALLET_NOT_FOUND",
    )  # fmt: skip
    assert await wallet(client, source) == ("38.00", "38.00", "0.00")
    assert await invariants(database_url) == (0, 0, 0)
    assert (await verify(database_url)).clean
