"""Refunds of payments, end to end (real app, real socket, real PostgreSQL): one posting
refunded as the transfer it is, once its payment is COMPLETED; the whole payment refunded
by POST /api/v1/payments/{id}/refunds, one ordinary refund per posting (bounded per
posting, refused per posting, replayed under the key); money conserved throughout."""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg

from tests.test_payments_api import pay, posting
from tests.test_transfers_api import Client, balance, conservation_gap, new_wallet
from walletd.engine.router import REFUND_KEY_NAMESPACE, payment_refund_key


async def post(
    client: Client, path: str, key: str | None, body: dict[str, Any] | None = None
) -> tuple[int, dict[str, Any], Any]:
    headers = None if key is None else {"Idempotency-Key": key}
    response = await client.post(path, json=body, headers=headers)
    return response.status, await response.json(content_type=None), response.headers


async def paid(client: Client) -> tuple[dict[str, Any], str, str, str]:
    """A COMPLETED payment of 10.00: 9.70 to a merchant and a 0.30 fee."""
    buyer, merchant, fee = (
        await new_wallet(client, "10.00"), await new_wallet(client), await new_wallet(client)
    )  # fmt: skip
    status, payment, _ = await pay(
        client, postings=[posting(buyer, merchant, "9.70"), posting(buyer, fee, "0.30")]
    )
    assert status == 201, payment
    return payment, buyer, merchant, fee


async def test_one_posting_of_a_completed_payment_is_refunded_as_its_transfer(
    client: Client, database_url: str
) -> None:
    """POST /transfers/{posting}/refunds gives back part of one posting; the posting (GET
    and the listing) names its payment and shows what was refunded; the payment itself is
    unchanged (COMPLETED: a refund is a transfer of its own)."""
    payment, buyer, merchant, fee = await paid(client)
    first = payment["postings"][0]["transfer_id"]
    status, refund, _ = await post(
        client, f"/api/v1/transfers/{first}/refunds", "part", {"amount": "2.00"}
    )
    assert status == 201, refund
    assert (refund["refund_of"], refund["from_wallet_id"], refund["payment_id"]) == (
        first, merchant, None,
    )  # fmt: skip
    response = await client.get(f"/api/v1/transfers/{first}")
    read = await response.json()
    assert (read["payment_id"], read["refunded_amount"]) == (payment["id"], "2.00")
    response = await client.get("/api/v1/transfers", params={"wallet_id": fee})
    (listed,) = (await response.json())["items"]
    assert listed["payment_id"] == payment["id"]
    response = await client.get(f"/api/v1/payments/{payment['id']}")
    assert (await response.json())["status"] == "COMPLETED"
    assert [await balance(client, w) for w in (buyer, merchant, fee)] == ["2.00", "7.70", "0.30"]
    connection = await asyncpg.connect(database_url)
    try:
        assert await conservation_gap(connection) == 0
    finally:
        await connection.close()


async def test_a_posting_of_a_failed_or_pending_payment_is_not_refunded(
    client: Client, database_url: str
) -> None:
    """A FAILED payment's posting (debited, then refunded) is 409 TRANSFER_NOT_COMPLETED; a
    posting COMPLETED while its payment is not decided yet (a joint commit before the
    decision, as a crash leaves it) is 409 PAYMENT_NOT_COMPLETED; the whole payment too."""
    buyer, merchant, fee = (
        await new_wallet(client, "10.00"), await new_wallet(client), await new_wallet(client)
    )  # fmt: skip
    status, failed, _ = await pay(
        client, postings=[posting(buyer, merchant, "9.00"), posting(buyer, fee, "1.01")]
    )
    assert status == 409, failed
    first = failed["payment"]["postings"][0]["transfer_id"]
    status, body, _ = await post(client, f"/api/v1/transfers/{first}/refunds", "k")
    assert (status, body["code"]) == (409, "TRANSFER_NOT_COMPLETED"), body
    payment_id = failed["payment"]["id"]
    status, body, _ = await post(client, f"/api/v1/payments/{payment_id}/refunds", "k")
    assert (status, body["code"], body["payment_id"]) == (
        409, "PAYMENT_NOT_COMPLETED", payment_id,
    ), body  # fmt: skip

    payment, *_wallets = await paid(client)
    connection = await asyncpg.connect(database_url)
    try:
        # Back to DEBITING with its postings COMPLETED, as a crash between the joint
        # commit and the decision leaves a payment (its creation moved ahead so that the
        # re-drive leaves it alone meanwhile); restored below.
        payment_id = uuid.UUID(payment["id"])
        created_at = await connection.fetchval(
            "SELECT created_at FROM payments WHERE id = $1", payment_id
        )
        await connection.execute(
            "UPDATE payments SET phase = 1, created_at = now() + interval '1 hour' WHERE id = $1",
            payment_id,
        )
        first = payment["postings"][0]["transfer_id"]
        status, body, _ = await post(client, f"/api/v1/transfers/{first}/refunds", "k")
        assert (status, body["code"], body["payment_id"]) == (
            409, "PAYMENT_NOT_COMPLETED", payment["id"],
        ), body  # fmt: skip
        status, body, _ = await post(client, f"/api/v1/payments/{payment['id']}/refunds", "k")
        assert (status, body["code"]) == (409, "PAYMENT_NOT_COMPLETED"), body
        await connection.execute(
            "UPDATE payments SET phase = 2, created_at = $2 WHERE id = $1",
            payment_id, created_at,
        )  # fmt: skip
        status, body, _ = await post(client, f"/api/v1/transfers/{first}/refunds", "k")
        assert status == 201, body
    finally:
        await connection.close()


async def test_the_whole_payment_is_refunded_one_refund_per_posting_and_replayed(
    client: Client, database_url: str
) -> None:
    """What is left of each posting goes back (a posting refunded in part before: the
    rest); the ids are derived from the payment, the key and the index; the same key
    replays every refund; another key finds nothing left (409 per posting, refundable 0)."""
    payment, buyer, merchant, fee = await paid(client)
    first, second = (p["transfer_id"] for p in payment["postings"])
    status, _, _ = await post(client, f"/api/v1/transfers/{first}/refunds", "p", {"amount": "2"})
    assert status == 201
    path = f"/api/v1/payments/{payment['id']}/refunds"
    status, body, headers = await post(
        client, path, "whole", {"reason": "returned", "metadata": {"rma": "9"}}
    )
    assert status == 200, body
    assert "Idempotent-Replayed" not in headers
    assert (body["payment_id"], body["refunded"], body["refused"]) == (payment["id"], 2, 0)
    results = body["results"]
    assert [(r["posting"], r["transfer_id"], r["status"]) for r in results] == [
        (0, first, 201), (1, second, 201),
    ]  # fmt: skip
    for result in results:
        refund = result["body"]
        key = payment_refund_key("whole")
        assert result["refund_id"] == refund["id"]
        assert refund["id"] == str(uuid.uuid5(REFUND_KEY_NAMESPACE, f"{refund['refund_of']}:{key}"))
        assert (refund["reference"], refund["metadata"]) == ("returned", {"rma": "9"})
    assert [r["body"]["amount"] for r in results] == ["7.70", "0.30"]
    assert [await balance(client, w) for w in (buyer, merchant, fee)] == ["10.00", "0.00", "0.00"]

    status, again, headers = await post(
        client, path, "whole", {"reason": "returned", "metadata": {"rma": "9"}}
    )
    assert status == 200
    assert headers["Idempotent-Replayed"] == "true"
    assert [r["replayed"] for r in again["results"]] == [True, True]
    assert [r["body"] for r in again["results"]] == [r["body"] for r in results]
    status, other, _ = await post(client, path, "whole", {"reason": "other"})
    assert [r["body"]["code"] for r in other["results"]] == ["IDEMPOTENCY_KEY_REUSED"] * 2

    status, later, _ = await post(client, path, "later")
    assert (status, later["refunded"], later["refused"]) == (200, 0, 2)
    refused = [(r["status"], r["body"]["code"], r["body"]["refundable"]) for r in later["results"]]
    assert refused == [(409, "REFUND_EXCEEDS_TRANSFER", "0.00")] * 2
    assert [await balance(client, w) for w in (buyer, merchant, fee)] == ["10.00", "0.00", "0.00"]
    connection = await asyncpg.connect(database_url)
    try:
        assert await conservation_gap(connection) == 0
    finally:
        await connection.close()


async def test_a_receiver_that_cannot_pay_refuses_its_posting_alone(client: Client) -> None:
    """The merchant spent its money: its posting's refund is 409 INSUFFICIENT_FUNDS (side
    from), the fee's is 201. Not atomic as a group: the fee is refunded. The same key
    replays both; once the merchant has money, another key refunds its posting."""
    payment, buyer, merchant, fee = await paid(client)
    response = await client.post(
        f"/api/v1/wallets/{merchant}/operation",
        json={"operation_type": "WITHDRAW", "amount": "5.00"},
    )
    assert response.status == 200
    path = f"/api/v1/payments/{payment['id']}/refunds"
    status, body, _ = await post(client, path, "now")
    assert (status, body["refunded"], body["refused"]) == (200, 1, 1), body
    short, paid_back = body["results"]
    assert (short["status"], short["body"]["code"], short["body"]["side"]) == (
        409, "INSUFFICIENT_FUNDS", "from",
    )  # fmt: skip
    assert (paid_back["status"], paid_back["body"]["amount"]) == (201, "0.30")
    assert [await balance(client, w) for w in (buyer, merchant, fee)] == ["0.30", "4.70", "0.00"]
    await client.post(
        f"/api/v1/wallets/{merchant}/operation",
        json={"operation_type": "DEPOSIT", "amount": "5.00"},
    )
    status, again, _ = await post(client, path, "now")
    assert [(r["status"], r["replayed"]) for r in again["results"]] == [(409, True), (201, True)]
    status, later, _ = await post(client, path, "later")
    assert [r["status"] for r in later["results"]] == [201, 409]
    assert later["results"][0]["body"]["amount"] == "9.70"
    assert [await balance(client, w) for w in (buyer, merchant, fee)] == ["10.00", "0.00", "0.00"]


async def test_a_payment_refund_is_refused_before_anything_without_a_key_or_a_payment(
    client: Client,
) -> None:
    """422 without an Idempotency-Key or with an unknown field, 404 for no such payment,
    400 for an id that is not a UUID; nothing refunded."""
    payment, buyer, *_ = await paid(client)
    path = f"/api/v1/payments/{payment['id']}/refunds"
    status, body, _ = await post(client, path, None)
    assert (status, body["code"], body["errors"][0]["field"]) == (
        422, "VALIDATION_ERROR", "Idempotency-Key",
    )  # fmt: skip
    status, body, _ = await post(client, path, "k", {"amount": "1.00"})
    assert (status, body["errors"][0]["field"]) == (422, "amount")
    status, body, _ = await post(client, f"/api/v1/payments/{uuid.uuid4()}/refunds", "k")
    assert (status, body["code"]) == (404, "PAYMENT_NOT_FOUND")
    status, body, _ = await post(client, "/api/v1/payments/nope/refunds", "k")
    assert (status, body["code"]) == (400, "INVALID_PAYMENT_ID")
    assert await balance(client, buyer) == "0.00"
