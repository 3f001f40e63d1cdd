"""Payments end to end: real app, real socket, real PostgreSQL. Every posting applied or
none, refusals naming the posting (recorded and replayed under the key), PENDING visible
while a payment is in flight, one currency per payment, and money conserved throughout."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any

import asyncpg

from tests.conftest import AppFactory
from tests.test_transfers_api import Client, balance, conservation_gap, new_wallet
from walletd.engine.limits import EngineLimits
from walletd.engine.ownership import shard_of
from walletd.http.state import STATE_KEY
from walletd.persistence.operator import Mismatch, verify


async def pay(
    client: Client, headers: dict[str, str] | None = None, **body: Any
) -> tuple[int, dict[str, Any], Any]:
    response = await client.post("/api/v1/payments", json=body, headers=headers)
    return response.status, await response.json(content_type=None), response.headers


def posting(sender: str, receiver: str, amount: str, **more: Any) -> dict[str, Any]:
    return {"from_wallet_id": sender, "to_wallet_id": receiver, "amount": amount, **more}


async def test_a_payment_with_a_fee_is_201_readable_and_applied_whole(
    client: Client, database_url: str
) -> None:
    buyer, merchant, platform = (
        await new_wallet(client, "100.00"), await new_wallet(client), await new_wallet(client)
    )  # fmt: skip
    status, body, headers = await pay(
        client,
        postings=[
            posting(buyer, merchant, "97.00", metadata={"role": "merchant"}),
            posting(buyer, platform, "3.00"),
        ],
        reference="order-7",
        metadata={"cart": "c1"},
    )
    assert status == 201, body
    assert (body["status"], body["currency"], body["reference"]) == ("COMPLETED", "USD", "order-7")
    assert [p["status"] for p in body["postings"]] == ["COMPLETED", "COMPLETED"]
    assert body["postings"][0]["metadata"] == {"role": "merchant"}
    assert body["failure"] is None
    assert headers["Location"] == f"/api/v1/payments/{body['id']}"
    response = await client.get(headers["Location"])
    assert (response.status, await response.json()) == (200, body)
    assert [await balance(client, w) for w in (buyer, merchant, platform)] == [
        "0.00", "97.00", "3.00",
    ]  # fmt: skip
    # Each posting is a transfer, readable as one, naming nothing it was not asked for.
    response = await client.get(f"/api/v1/transfers/{body['postings'][1]['transfer_id']}")
    transfer = await response.json()
    assert (transfer["status"], transfer["amount"], transfer["reference"]) == (
        "COMPLETED", "3.00", "order-7",
    )  # fmt: skip
    connection = await asyncpg.connect(database_url)
    try:
        assert await conservation_gap(connection) == 0
    finally:
        await connection.close()


async def test_each_refusal_names_its_posting_and_nothing_is_applied(client: Client) -> None:
    """Insufficient funds over both postings of one sender (postings[1]), a missing wallet,
    a FROZEN sender: each problem names postings[i] and its side; no balance moved."""
    buyer, merchant, platform = (
        await new_wallet(client, "10.00"), await new_wallet(client), await new_wallet(client)
    )  # fmt: skip
    status, body, _ = await pay(
        client, postings=[posting(buyer, merchant, "8.00"), posting(buyer, platform, "2.01")]
    )
    assert (status, body["code"], body["posting"], body["side"]) == (
        409, "INSUFFICIENT_FUNDS", 1, "from",
    )  # fmt: skip
    assert "postings[1]" in body["detail"]
    assert body["payment"]["status"] == "FAILED"
    assert body["payment"]["failure"] == {
        "posting": 1,
        "side": "from",
        "code": "INSUFFICIENT_FUNDS",
    }
    assert [p["status"] for p in body["payment"]["postings"]] == ["FAILED", "FAILED"]
    assert [await balance(client, w) for w in (buyer, merchant, platform)] == [
        "10.00", "0.00", "0.00",
    ]  # fmt: skip
    nowhere = str(uuid.uuid4())
    status, body, _ = await pay(
        client, postings=[posting(buyer, merchant, "1.00"), posting(buyer, nowhere, "1.00")]
    )
    assert (status, body["code"], body["posting"], body["side"]) == (
        404, "WALLET_NOT_FOUND", 1, "to",
    )  # fmt: skip
    response = await client.patch(f"/api/v1/wallets/{platform}", json={"status": "FROZEN"})
    assert response.status == 200, await response.text()
    await client.post(
        f"/api/v1/wallets/{platform}/operation",
        json={"operation_type": "DEPOSIT", "amount": "5.00"},
    )
    status, body, _ = await pay(
        client, postings=[posting(buyer, merchant, "1.00"), posting(platform, merchant, "1.00")]
    )
    assert (status, body["code"], body["posting"], body["side"]) == (
        409, "WALLET_FROZEN", 1, "from",
    )  # fmt: skip
    assert [await balance(client, w) for w in (buyer, merchant, platform)] == [
        "10.00", "0.00", "5.00",
    ]  # fmt: skip


async def test_a_closed_receiver_fails_the_payment_on_its_side(client: Client) -> None:
    buyer, merchant, platform = (
        await new_wallet(client, "10.00"), await new_wallet(client), await new_wallet(client)
    )  # fmt: skip
    response = await client.patch(f"/api/v1/wallets/{platform}", json={"status": "CLOSED"})
    assert response.status == 200, await response.text()
    status, body, _ = await pay(
        client, postings=[posting(buyer, merchant, "1.00"), posting(buyer, platform, "1.00")]
    )
    assert (status, body["code"], body["posting"], body["side"]) == (409, "WALLET_CLOSED", 1, "to")
    assert [await balance(client, w) for w in (buyer, merchant)] == ["10.00", "0.00"]


async def test_a_refusal_is_replayed_under_its_key_and_another_body_is_422(
    client: Client,
) -> None:
    buyer, merchant = await new_wallet(client, "5.00"), await new_wallet(client)
    key = {"Idempotency-Key": f"pay-{uuid.uuid4()}"}
    request = {"postings": [posting(buyer, merchant, "3.00"), posting(buyer, merchant, "3.00")]}
    status, first, headers = await pay(client, key, **request)
    assert (status, first["code"], first["posting"]) == (409, "INSUFFICIENT_FUNDS", 1)
    assert "Idempotent-Replayed" not in headers
    await client.post(
        f"/api/v1/wallets/{buyer}/operation",
        json={"operation_type": "DEPOSIT", "amount": "5.00"},
    )
    status, again, headers = await pay(client, key, **request)
    assert (status, again, headers.get("Idempotent-Replayed")) == (409, first, "true")
    status, other, _ = await pay(client, key, postings=[posting(buyer, merchant, "3.00")])
    assert (status, other["code"]) == (422, "IDEMPOTENCY_KEY_REUSED")
    assert await balance(client, merchant) == "0.00"
    # A completed payment is replayed too, applied once.
    key = {"Idempotency-Key": f"pay-{uuid.uuid4()}"}
    status, done, _ = await pay(client, key, postings=[posting(buyer, merchant, "4.00")])
    assert status == 201
    status, replay, headers = await pay(client, key, postings=[posting(buyer, merchant, "4.00")])
    assert (status, replay, headers.get("Idempotent-Replayed")) == (201, done, "true")
    assert await balance(client, merchant) == "4.00"


async def test_one_currency_per_payment_and_the_body_is_validated(client: Client) -> None:
    buyer, merchant = await new_wallet(client, "5.00"), await new_wallet(client)
    response = await client.post("/api/v1/wallets", json={"currency": "JPY"})
    assert response.status == 201, await response.text()
    yen = (await response.json())["id"]
    status, body, _ = await pay(
        client, postings=[posting(buyer, merchant, "1.00"), posting(buyer, yen, "1")]
    )
    assert (status, body["code"], body["posting"], body["side"]) == (
        422, "CURRENCY_MISMATCH", 1, "to",
    )  # fmt: skip
    status, body, _ = await pay(
        client, postings=[posting(buyer, merchant, "1.00"), posting(merchant, yen, "1.5")]
    )
    assert (status, body["code"]) == (422, "CURRENCY_MISMATCH")
    status, body, _ = await pay(client, postings=[posting(buyer, merchant, "1.001")])
    assert (status, [e["field"] for e in body["errors"]]) == (422, ["postings[0].amount"])
    status, body, _ = await pay(client, postings=[])
    assert (status, body["code"]) == (422, "VALIDATION_ERROR")
    status, body, _ = await pay(client, postings=[posting(buyer, merchant, "1.00")] * 17)
    assert [e["field"] for e in body["errors"]] == ["postings"]
    status, body, _ = await pay(
        client, postings=[posting(buyer, buyer, "1.00"), {"from_wallet_id": buyer, "amount": -1}]
    )
    assert status == 422
    assert [e["field"] for e in body["errors"]] == [
        "postings[0].to_wallet_id", "postings[1].to_wallet_id", "postings[1].amount",
    ]  # fmt: skip
    response = await client.get("/api/v1/payments/nope")
    assert (response.status, (await response.json())["code"]) == (400, "INVALID_PAYMENT_ID")
    response = await client.get(f"/api/v1/payments/{uuid.uuid4()}")
    assert (response.status, (await response.json())["code"]) == (404, "PAYMENT_NOT_FOUND")
    assert await balance(client, buyer) == "5.00"


async def test_a_payment_in_flight_is_visible_pending(
    make_app: AppFactory, aiohttp_client: Callable[..., Any], database_url: str
) -> None:
    """Wallets on two pipelines (so not one joint commit: the saga). While a receiver's
    wallet row is locked (its shard's commits wait), the payment is debited and PENDING:
    readable as such, its money in its PENDING postings (conservation exact meanwhile); once
    the lock goes, it completes."""
    app = make_app(limits=EngineLimits(pipelines=4))
    client: Client = await aiohttp_client(app)
    engine = app[STATE_KEY].services.engine

    def pipeline(wallet: str) -> int:
        return shard_of(uuid.UUID(wallet), engine.ownership.shard_count) % 4

    buyer, platform = await new_wallet(client, "10.00"), await new_wallet(client)
    merchant = await new_wallet(client)
    while pipeline(merchant) == pipeline(buyer):
        merchant = await new_wallet(client)
    locker = await asyncpg.connect(database_url)
    watcher = await asyncpg.connect(database_url)
    payment_id = str(uuid.uuid4())
    try:
        locker_tx = locker.transaction()
        await locker_tx.start()
        await locker.execute("SELECT 1 FROM wallets WHERE id = $1 FOR UPDATE", uuid.UUID(merchant))
        task = asyncio.create_task(
            pay(
                client,
                id=payment_id,
                postings=[posting(buyer, merchant, "6.00"), posting(buyer, platform, "1.00")],
            )
        )
        for _ in range(200):  # until both debits are in (the buyer's balance shows them)
            if await balance(client, buyer) == "3.00":
                break
            await asyncio.sleep(0.05)
        response = await client.get(f"/api/v1/payments/{payment_id}")
        seen = await response.json()
        assert seen["status"] == "PENDING"
        assert [p["status"] for p in seen["postings"]] == ["PENDING", "PENDING"]
        assert await conservation_gap(watcher) == 0
        await locker_tx.rollback()
        status, body, _ = await task
        assert (status, body["status"]) == (201, "COMPLETED")
        assert await conservation_gap(watcher) == 0
    finally:
        await locker.close()
        await watcher.close()


async def test_verify_checks_payments_against_their_postings(
    client: Client, database_url: str
) -> None:
    """After a completed and a failed payment (one posting never debited, one refunded)
    `walletd verify` is clean; a posting's transfer flipped to COMPLETED in a FAILING
    payment is reported as not all or nothing."""
    buyer, merchant, platform = (
        await new_wallet(client, "10.00"), await new_wallet(client), await new_wallet(client)
    )  # fmt: skip
    status, _body, _ = await pay(
        client, postings=[posting(buyer, merchant, "6.00"), posting(buyer, platform, "1.00")]
    )
    assert status == 201
    status, failed, _ = await pay(
        client,
        postings=[
            posting(buyer, merchant, "1.00"),
            posting(buyer, platform, "9.00"),
            posting(merchant, platform, "1.00"),
        ],
    )
    assert (status, failed["posting"]) == (409, 1)
    report = await verify(database_url)
    assert report.clean, report.first_mismatches
    assert report.payments == 2
    connection = await asyncpg.connect(database_url)
    try:
        await connection.execute(
            "UPDATE transfers SET status = 2, failure_code = NULL WHERE id = $1",
            uuid.UUID(failed["payment"]["postings"][2]["transfer_id"]),
        )
    finally:
        await connection.close()
    found: list[Mismatch] = []
    await verify(database_url, found.append)
    assert any(
        f"payment {failed['payment_id']} (FAILING)" in m.problem
        and "not all or nothing" in m.problem
        for m in found
    ), found


async def test_the_feed_has_a_payment_created_and_decided_between_its_legs(
    client: Client,
) -> None:
    """payment.created (the total), then the debits, payment.decided (COMPLETED), then the
    credits (or, every posting committed at once, the legs then the decision), each leg
    naming its posting's transfer; a failed payment's decision names the posting refused."""
    buyer, merchant, platform = (
        await new_wallet(client, "10.00"), await new_wallet(client), await new_wallet(client)
    )  # fmt: skip
    status, paid, _ = await pay(
        client, postings=[posting(buyer, merchant, "6.00"), posting(buyer, platform, "1.50")]
    )
    assert status == 201
    status, failed, _ = await pay(client, postings=[posting(buyer, merchant, "9.00")])
    assert status == 409
    for _ in range(100):
        events = (await (await client.get("/api/v1/events?limit=100")).json())["events"]
        if sum(e["type"] == "payment.decided" for e in events) == 2:
            break
        await asyncio.sleep(0.05)
    transfers = {p["transfer_id"] for p in paid["postings"]}
    mine = [
        (e["type"], e.get("operation_type"))
        for e in events
        if e.get("payment_id") == paid["id"] or e.get("transfer_id") in transfers
    ]
    assert mine[0] == ("payment.created", None)
    decided_at = mine.index(("payment.decided", None))
    if decided_at == 5:
        # Every posting in one commit (JointPayment: one pipeline owns all the wallets),
        # then the decision: the legs come before it, each debit before its credit.
        legs = mine[1:5]
        assert sorted(legs) == sorted([("operation.applied", "TRANSFER_OUT")] * 2
                                      + [("operation.applied", "TRANSFER_IN")] * 2)  # fmt: skip
    else:  # the saga: the debits, the decision, the credits
        assert decided_at == 3, mine
        assert sorted(mine[1:3]) == [("operation.applied", "TRANSFER_OUT")] * 2
        assert sorted(mine[4:]) == [("operation.applied", "TRANSFER_IN")] * 2
    created = next(
        e for e in events if e["type"] == "payment.created" and e["payment_id"] == paid["id"]
    )
    assert (created["amount"], created["postings"], created["currency"]) == ("7.50", 2, "USD")
    decided = [e for e in events if e["type"] == "payment.decided"]
    assert [(e["payment_id"], e["outcome"], e["failure"]) for e in decided] == [
        (paid["id"], "COMPLETED", None),
        (
            failed["payment_id"],
            "FAILED",
            {"posting": 0, "side": "from", "code": "INSUFFICIENT_FUNDS"},
        ),
    ]
