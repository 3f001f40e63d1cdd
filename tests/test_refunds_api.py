"""Refunds and reversals end to end (docs/API.md, "Refunds and reversals"): real app, real
socket, real PostgreSQL. Every refusal and field, replays under the key, the links in
reads, listings, history and feed, the bound under concurrency, and restarts."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from tests.conftest import AppFactory
from tests.test_transfers_api import balance, conservation_gap, new_wallet, transfer
from walletd.persistence.operator import Mismatch, verify

Client = TestClient[web.Request, web.Application]


async def refund(
    client: Client, transfer_id: str, key: str | None = "r1", **body: Any
) -> tuple[int, dict[str, Any], Any]:
    headers = None if key is None else {"Idempotency-Key": key}
    response = await client.post(
        f"/api/v1/transfers/{transfer_id}/refunds", json=body, headers=headers
    )
    return response.status, await response.json(content_type=None), response.headers


async def reverse(
    client: Client, wallet_id: str, seq: int | str, key: str | None = "v1", **body: Any
) -> tuple[int, dict[str, Any], Any]:
    headers = None if key is None else {"Idempotency-Key": key}
    response = await client.post(
        f"/api/v1/wallets/{wallet_id}/operations/{seq}/reversal", json=body, headers=headers
    )
    return response.status, await response.json(content_type=None), response.headers


async def completed(client: Client, amount: str = "30.00") -> tuple[str, str, str]:
    """A COMPLETED transfer of ``amount`` from a funded sender: (id, sender, receiver)."""
    sender, receiver = await new_wallet(client, "100.00"), await new_wallet(client)
    status, body, _ = await transfer(
        client, from_wallet_id=sender, to_wallet_id=receiver, amount=amount
    )
    assert status == 201, body
    return body["id"], sender, receiver


async def feed_events(client: Client, count: int, wanted: Any) -> list[dict[str, Any]]:
    """The feed's events that ``wanted`` selects, once there are ``count`` of them: the feed
    shows a commit once every transaction before it has ended (other sessions' too), so it
    is read again until then (bounded)."""
    chosen: list[dict[str, Any]] = []
    for _ in range(200):
        events = (await (await client.get("/api/v1/events?limit=500")).json())["events"]
        chosen = [event for event in events if wanted(event)]
        if len(chosen) >= count:
            break
        await asyncio.sleep(0.05)
    return chosen


async def history(client: Client, wallet_id: str) -> list[dict[str, Any]]:
    response = await client.get(f"/api/v1/wallets/{wallet_id}/operations")
    assert response.status == 200
    items: list[dict[str, Any]] = (await response.json())["items"]
    return items


async def test_partial_refunds_up_to_the_amount_then_409(client: Client) -> None:
    """Partial refunds move money back from the receiver to the sender, each a transfer
    with refund_of; the original shows refunded_amount; past the amount is 409 with what is
    left; an omitted amount refunds what is left; then nothing is left."""
    original, sender, receiver = await completed(client)
    status, body, headers = await refund(client, original, "r1", amount="10.00", reason="dup")
    assert status == 201, body
    assert body["refund_of"] == original
    assert (body["from_wallet_id"], body["to_wallet_id"]) == (receiver, sender)
    assert (body["amount"], body["status"], body["reference"]) == ("10.00", "COMPLETED", "dup")
    assert headers["Location"] == f"/api/v1/transfers/{body['id']}"
    read = await (await client.get(headers["Location"])).json()
    assert read["refund_of"] == original
    assert read["refunded_amount"] == "0.00"
    assert (await balance(client, sender), await balance(client, receiver)) == ("80.00", "20.00")

    status, body, _ = await refund(client, original, "r2", amount="20.01")
    assert status == 409, body
    assert body["code"] == "REFUND_EXCEEDS_TRANSFER"
    assert body["refundable"] == "20.00"
    assert body["refund_of"] == original
    status, rest, _ = await refund(client, original, "r3")
    assert status == 201, rest
    assert rest["amount"] == "20.00"
    status, body, _ = await refund(client, original, "r4", amount="0.01")
    assert status == 409
    assert body["code"] == "REFUND_EXCEEDS_TRANSFER"
    status, body, _ = await refund(client, original, "r5")
    assert status == 409
    assert body["refundable"] == "0.00"

    read = await (await client.get(f"/api/v1/transfers/{original}")).json()
    assert (read["refunded_amount"], read["refund_of"]) == ("30.00", None)
    assert (await balance(client, sender), await balance(client, receiver)) == ("100.00", "0.00")
    # Listed on the original, newest first.
    response = await client.get(f"/api/v1/transfers?refund_of={original}")
    assert response.status == 200
    listed = (await response.json())["items"]
    assert [item["amount"] for item in listed] == ["20.00", "10.00"]
    assert all(item["refund_of"] == original for item in listed)


async def test_refund_replays_under_its_key_and_refuses_another_request(
    client: Client,
) -> None:
    """The same key and body: the same refund, Idempotent-Replayed, nothing moved twice (an
    omitted amount included); another body under the key: 422; the key on another
    transfer is another refund. No key: 422."""
    original, sender, _ = await completed(client)
    status, first, _ = await refund(client, original, "k", amount="5.00")
    assert status == 201
    status, again, headers = await refund(client, original, "k", amount="5.00")
    assert status == 201
    assert again == first
    assert headers["Idempotent-Replayed"] == "true"
    status, again, _ = await refund(client, original, "k")  # "what was left" then
    assert status == 201
    assert again == first
    status, body, _ = await refund(client, original, "k", amount="6.00")
    assert status == 422, body
    assert body["code"] == "IDEMPOTENCY_KEY_REUSED"
    status, body, _ = await refund(client, original, "k", amount="5.00", reason="other")
    assert status == 422
    assert body["code"] == "IDEMPOTENCY_KEY_REUSED"
    assert await balance(client, sender) == "75.00"
    other, _, _ = await completed(client)
    status, body, _ = await refund(client, other, "k", amount="5.00")
    assert status == 201
    assert body["id"] != first["id"]
    status, body, _ = await refund(client, original, None)
    assert status == 422, body
    assert body["errors"][0]["field"] == "Idempotency-Key"


async def test_refund_refusals(client: Client) -> None:
    """404 unknown transfer; 409 TRANSFER_IS_REFUND for a refund of a refund; 409
    TRANSFER_NOT_COMPLETED for a FAILED transfer; 422 for bad fields; 400 a bad id."""
    status, body, _ = await refund(client, str(uuid.uuid4()))
    assert status == 404
    assert body["code"] == "TRANSFER_NOT_FOUND"
    original, _, _ = await completed(client)
    status, first, _ = await refund(client, original, amount="1.00")
    assert status == 201
    status, body, _ = await refund(client, first["id"], "rr")
    assert status == 409, body
    assert body["code"] == "TRANSFER_IS_REFUND"
    # FAILED: the receiver does not exist (the debit refunded).
    sender = await new_wallet(client, "10.00")
    status, failed, _ = await transfer(
        client, from_wallet_id=sender, to_wallet_id=str(uuid.uuid4()), amount="1.00"
    )
    assert status == 404
    status, body, _ = await refund(client, failed["transfer_id"])
    assert status == 409, body
    assert body["code"] == "TRANSFER_NOT_COMPLETED"
    for bad in ({"amount": "-1"}, {"amount": "0"}, {"reason": ""}, {"color": "red"}):
        status, body, _ = await refund(client, original, "bad", **bad)
        assert status == 422, (bad, body)
    status, body, _ = await refund(client, original, "r9", amount="0.001")
    assert status == 422, body
    response = await client.post(
        "/api/v1/transfers/not-a-uuid/refunds", json={}, headers={"Idempotency-Key": "x"}
    )
    assert response.status == 400


async def test_a_refund_the_receiver_cannot_pay_is_refused_recorded_and_replayed(
    client: Client,
) -> None:
    """409 INSUFFICIENT_FUNDS (side from: the original's receiver), replayed under the key
    after money arrived (an omitted amount as well); WALLET_FROZEN likewise."""
    original, _, receiver = await completed(client)
    response = await client.post(
        f"/api/v1/wallets/{receiver}/operation",
        json={"operation_type": "WITHDRAW", "amount": "25.00"},
    )
    assert response.status == 200
    status, body, _ = await refund(client, original, "poor")
    assert status == 409, body
    assert body["code"] == "INSUFFICIENT_FUNDS"
    assert body["side"] == "from"
    await client.post(
        f"/api/v1/wallets/{receiver}/operation",
        json={"operation_type": "DEPOSIT", "amount": "50.00"},
    )
    status, again, headers = await refund(client, original, "poor")
    assert status == 409
    assert again["code"] == "INSUFFICIENT_FUNDS"
    assert headers["Idempotent-Replayed"] == "true"
    status, body, _ = await refund(client, original, "rich")
    assert status == 201
    assert body["amount"] == "30.00"

    original, _, receiver = await completed(client)
    response = await client.patch(f"/api/v1/wallets/{receiver}", json={"status": "FROZEN"})
    assert response.status == 200
    status, body, _ = await refund(client, original, "frozen")
    assert status == 409, body
    assert body["code"] == "WALLET_FROZEN"


async def test_concurrent_refunds_never_pass_the_amount(client: Client, database_url: str) -> None:
    """Twenty refunds of 5.00 at once on a transfer of 30.00: exactly six apply, the others
    are 409 REFUND_EXCEEDS_TRANSFER (the pre-check or storage's WD010, the receiver holding
    plenty, so its balance decides nothing); money conserved."""
    original, sender, receiver = await completed(client)
    response = await client.post(
        f"/api/v1/wallets/{receiver}/operation",
        json={"operation_type": "DEPOSIT", "amount": "1000.00"},
    )
    assert response.status == 200
    results = await asyncio.gather(
        *(refund(client, original, f"c{i}", amount="5.00") for i in range(20))
    )
    statuses = sorted(status for status, _, _ in results)
    assert statuses == [201] * 6 + [409] * 14, [body for _, body, _ in results]
    assert {body["code"] for status, body, _ in results if status == 409} == {
        "REFUND_EXCEEDS_TRANSFER"
    }
    assert (await balance(client, sender), await balance(client, receiver)) == (
        "100.00", "1000.00",
    )  # fmt: skip
    connection = await asyncpg.connect(database_url)
    try:
        assert await conservation_gap(connection) == 0
    finally:
        await connection.close()


async def test_storage_refuses_a_refund_past_the_amount(database_url: str) -> None:
    """The bound holds in storage alone (WD010), whatever the engine sends: a refund row
    past the original's amount, of a transfer not COMPLETED, or the wrong way round."""
    connection = await asyncpg.connect(database_url)
    try:
        a, b, t = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
        await connection.execute(
            "INSERT INTO transfers (id, from_wallet_id, to_wallet_id, amount, status,"
            " created_at, updated_at) VALUES ($1, $2, $3, 100, 2, now(), now())",
            t, a, b,
        )  # fmt: skip
        call = (
            "SELECT walletd_append_transfers($1::uuid[], $2::uuid[], $3::uuid[], $4::bigint[],"
            " ARRAY[NULL]::text[], ARRAY[0]::bigint[], '{}', '{}', '{}', '{}', $5::uuid[],"
            " ARRAY[1]::bigint[], ARRAY[3]::smallint[], $4::bigint[],"
            " ARRAY[chr(31) || 'TRANSFER_OUT:' || $6::text], $7::uuid[])"
        )
        for from_id, to_id, amount in ((b, a, 101), (a, b, 10)):
            refund_id = uuid.uuid4()
            with pytest.raises(asyncpg.PostgresError) as refused:
                await connection.execute(
                    call, [refund_id], [from_id], [to_id], [amount], [from_id], str(refund_id),
                    [t],
                )  # fmt: skip
            assert refused.value.sqlstate == "WD010", refused.value
        refund_id = uuid.uuid4()
        await connection.execute(
            call, [refund_id], [b], [a], [100], [b], str(refund_id), [t]
        )  # the whole amount: stored
    finally:
        await connection.close()


async def test_refunded_amounts_survive_a_restart(make_app: AppFactory) -> None:
    """After a restart (empty memory), the original reads its refunded amount and the
    bound still holds."""
    async with TestClient(TestServer(make_app())) as client:
        original, _, _ = await completed(client)
        status, _, _ = await refund(client, original, "a", amount="12.00")
        assert status == 201
    async with TestClient(TestServer(make_app())) as client:
        read = await (await client.get(f"/api/v1/transfers/{original}")).json()
        assert read["refunded_amount"] == "12.00"
        status, body, _ = await refund(client, original, "b", amount="18.01")
        assert status == 409
        assert body["refundable"] == "18.00"
        status, _, _ = await refund(client, original, "b", amount="18.00")
        assert status == 201


async def test_refund_links_in_history_and_feed(client: Client) -> None:
    """Each leg of a refund names the transfer it refunds, in the history and in the
    feed; an ordinary transfer's legs name none."""
    original, sender, _ = await completed(client)
    status, body, _ = await refund(client, original, amount="3.00")
    assert status == 201
    rows = await history(client, sender)
    assert [(r["operation_type"], r["refund_of"]) for r in rows[:2]] == [
        ("TRANSFER_IN", original),
        ("TRANSFER_OUT", None),
    ]
    assert rows[0]["transfer_id"] == body["id"]
    legs = await feed_events(client, 2, lambda e: e.get("transfer_id") == body["id"])
    assert len(legs) == 2
    assert all(leg["refund_of"] == original for leg in legs)


async def test_reversal_of_a_deposit_and_of_a_withdrawal(client: Client) -> None:
    """A deposit's reversal takes its amount back out, a withdrawal's puts it back; both
    linked both ways (reversal_of on the reversal's row and event, reversed_by on the
    original's row); the same key replays; another key is 409 ALREADY_REVERSED."""
    wallet = await new_wallet(client, "100.00")  # seq 1
    await client.post(
        f"/api/v1/wallets/{wallet}/operation",
        json={"operation_type": "WITHDRAW", "amount": "40.00"},
    )  # seq 2
    status, body, headers = await reverse(client, wallet, 2, "w", reason="bank returned it")
    assert status == 200, body
    assert (body["balance"], headers["ETag"]) == ("100.00", '"3"')
    status, again, headers = await reverse(client, wallet, 2, "w", reason="bank returned it")
    assert status == 200
    assert again == body
    assert headers["Idempotent-Replayed"] == "true"
    status, body, _ = await reverse(client, wallet, 2, "other")
    assert status == 409, body
    assert body["code"] == "ALREADY_REVERSED"
    status, body, _ = await reverse(client, wallet, 2, "w", reason="another reason")
    assert status == 422, body
    assert body["code"] == "IDEMPOTENCY_KEY_REUSED"
    status, body, _ = await reverse(client, wallet, 1, "d")
    assert status == 200
    assert body["balance"] == "0.00"
    rows = await history(client, wallet)
    assert [
        (r["seq"], r["operation_type"], r["reversal_of"], r["reversed_by"], r["idempotency_key"])
        for r in rows
    ] == [
        (4, "DEPOSIT_REVERSAL", 1, None, None),
        (3, "WITHDRAW_REVERSAL", 2, None, None),
        (2, "WITHDRAW", None, 3, None),
        (1, "DEPOSIT", None, 4, None),
    ]
    assert rows[1]["reference"] == "bank returned it"
    events = await feed_events(
        client, 2, lambda e: e.get("wallet_id") == wallet and e.get("reversal_of") is not None
    )
    reversals = [(e["operation_type"], e["reversal_of"], e["amount"]) for e in events]
    assert reversals == [("WITHDRAW_REVERSAL", 2, "40.00"), ("DEPOSIT_REVERSAL", 1, "100.00")]
    filtered = await client.get(
        f"/api/v1/wallets/{wallet}/operations?operation_type=DEPOSIT_REVERSAL"
    )
    assert [r["seq"] for r in (await filtered.json())["items"]] == [4]


async def test_reversal_refusals(client: Client) -> None:
    """A deposit's reversal the wallet cannot pay: 409 INSUFFICIENT_FUNDS, replayed under
    its key, and another key may try again once money is there; 404 for no such
    operation; 409 NOT_REVERSIBLE for a transfer leg (or a reversal); 422 without a key,
    for a bad seq or field."""
    wallet = await new_wallet(client, "50.00")  # seq 1
    await client.post(
        f"/api/v1/wallets/{wallet}/operation",
        json={"operation_type": "WITHDRAW", "amount": "20.00"},
    )
    status, body, _ = await reverse(client, wallet, 1, "poor")
    assert status == 409, body
    assert body["code"] == "INSUFFICIENT_FUNDS"
    await client.post(
        f"/api/v1/wallets/{wallet}/operation",
        json={"operation_type": "DEPOSIT", "amount": "20.00"},
    )
    status, body, headers = await reverse(client, wallet, 1, "poor")
    assert status == 409
    assert headers["Idempotent-Replayed"] == "true"
    status, body, _ = await reverse(client, wallet, 1, "rich")
    assert status == 200, body
    assert body["balance"] == "0.00"
    status, body, _ = await reverse(client, wallet, 99)
    assert status == 404
    assert body["code"] == "OPERATION_NOT_FOUND"
    status, body, _ = await reverse(client, wallet, 4, "again")  # the reversal itself
    assert status == 409, body
    assert body["code"] == "NOT_REVERSIBLE"
    _original, sender, _ = await completed(client)
    status, body, _ = await reverse(client, sender, 2)  # its TRANSFER_OUT
    assert status == 409
    assert body["code"] == "NOT_REVERSIBLE"
    for seq in ("0", "x", "01", "99999999999999999999"):
        status, body, _ = await reverse(client, wallet, seq)
        assert status == 422, (seq, body)
    status, body, _ = await reverse(client, wallet, 1, None)
    assert status == 422
    assert body["errors"][0]["field"] == "Idempotency-Key"
    status, body, _ = await reverse(client, wallet, 1, "f", amount="1.00")
    assert status == 422
    status, body, _ = await reverse(client, str(uuid.uuid4()), 1)
    assert status == 404
    assert body["code"] == "OPERATION_NOT_FOUND"


async def test_concurrent_reversals_under_different_keys_apply_once(client: Client) -> None:
    """Ten reversals of one deposit at once, each under its own key: one applies, the
    others are 409 ALREADY_REVERSED (the read before, or storage's unique index)."""
    wallet = await new_wallet(client, "10.00")
    results = await asyncio.gather(*(reverse(client, wallet, 1, f"k{i}") for i in range(10)))
    statuses = sorted(status for status, _, _ in results)
    assert statuses == [200] + [409] * 9, [body for _, body, _ in results]
    assert {body["code"] for status, body, _ in results if status == 409} == {"ALREADY_REVERSED"}
    assert await balance(client, wallet) == "0.00"


async def test_verify_checks_refunds_and_reversals(make_app: AppFactory, database_url: str) -> None:
    """verify passes a log with refunds and reversals (conservation net of reversals), and
    names a refund past its transfer's amount and a reversal of the wrong amount written
    straight into the database."""
    async with TestClient(TestServer(make_app())) as client:
        original, sender, _ = await completed(client)
        status, _, _ = await refund(client, original, "a", amount="10.00")
        assert status == 201
        status, _, _ = await reverse(client, sender, 1, "v")  # the sender's deposit of 100
        assert status == 409  # it holds 80.00: refused, recorded
        wallet = await new_wallet(client, "7.00")
        status, _, _ = await reverse(client, wallet, 1, "v")
        assert status == 200
    clean = await verify(database_url)
    assert clean.clean, clean.first_mismatches
    connection = await asyncpg.connect(database_url)
    try:
        await connection.execute(
            "INSERT INTO transfers (id, from_wallet_id, to_wallet_id, amount, status,"
            " created_at, updated_at, refund_of)"
            " SELECT $1, to_wallet_id, from_wallet_id, 2001, 2, now(), now(), id"
            " FROM transfers WHERE id = $2",
            uuid.uuid4(), uuid.UUID(original),
        )  # fmt: skip
        await connection.execute(
            "UPDATE wallet_operations SET amount = 600 WHERE kind = 10 AND wallet_id = $1",
            uuid.UUID(wallet),
        )
    finally:
        await connection.close()
    found: list[Mismatch] = []
    await verify(database_url, found.append)
    problems = [m.problem for m in found]
    assert any(
        f"the refunds of transfer {original} that are not FAILED sum to 3001, past its amount "
        "3000" in problem
        for problem in problems
    ), problems
    assert any(
        "log row seq 2 (DEPOSIT_REVERSAL of 600) reverses seq 1 (DEPOSIT of 700)" in problem
        for problem in problems
    ), problems
