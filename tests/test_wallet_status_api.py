"""Wallet status (ACTIVE / FROZEN / CLOSED) and overdraft limits end to end: real app, real
socket, real PostgreSQL. PATCH /api/v1/wallets/{id}, If-Match on PATCH and on operations,
every refusal with its problem code, the log rows and feed events a change writes, and the
database's own floors."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from tests.conftest import AppFactory
from tests.test_holds_api import call, history
from tests.test_transfers_api import new_wallet
from walletd.engine.limits import EngineLimits
from walletd.http.keys import parse_keys
from walletd.http.settings import HttpSettings
from walletd.http.state import STATE_KEY
from walletd.persistence.operator import verify

Client = TestClient[web.Request, web.Application]


async def patch(
    client: Client,
    wallet_id: str,
    body: Any,
    *,
    key: str | None = None,
    if_match: str | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any], Any]:
    sent = dict(headers or {})
    if key is not None:
        sent["Idempotency-Key"] = key
    if if_match is not None:
        sent["If-Match"] = if_match
    response = await client.patch(f"/api/v1/wallets/{wallet_id}", json=body, headers=sent)
    return response.status, await response.json(content_type=None), response.headers


async def operate(
    client: Client,
    wallet_id: str,
    kind: str,
    amount: str,
    *,
    key: str | None = None,
    if_match: str | None = None,
) -> tuple[int, dict[str, Any], Any]:
    headers = {}
    if key is not None:
        headers["Idempotency-Key"] = key
    if if_match is not None:
        headers["If-Match"] = if_match
    response = await client.post(
        f"/api/v1/wallets/{wallet_id}/operation",
        json={"operation_type": kind, "amount": amount},
        headers=headers,
    )
    return response.status, await response.json(content_type=None), response.headers


async def test_a_default_wallet_keeps_the_seeds_shape_and_reads_carry_an_etag(
    client: Client,
) -> None:
    """Create, read and deposit on a wallet that uses nothing new answer exactly the fields
    they answered before plus its currency (no status, no overdraft_limit), in that order,
    each with ETag "<seq>"."""
    fields = ["id", "balance", "available", "held", "currency", "created_at", "updated_at"]
    created = await client.post("/api/v1/wallets")
    body = await created.json()
    assert (created.status, list(body), created.headers["ETag"]) == (201, fields, '"0"')
    assert body["currency"] == "USD"
    wallet_id = body["id"]
    status, body, headers = await operate(client, wallet_id, "DEPOSIT", "1000")
    assert (status, list(body), body["balance"], headers["ETag"]) == (
        200,
        fields,
        "1000.00",
        '"1"',
    )
    read = await client.get(f"/api/v1/wallets/{wallet_id}")
    raw = await read.read()
    body = await read.json()
    assert (list(body), body["available"], read.headers["ETag"]) == (fields, "1000.00", '"1"')
    assert (
        raw
        == (
            f'{{"id":"{wallet_id}","balance":"1000.00","available":"1000.00","held":"0.00",'
            f'"currency":"USD","created_at":"{body["created_at"]}",'
            f'"updated_at":"{body["updated_at"]}"}}'
        ).encode()
    )


async def test_an_overdraft_limit_lets_a_debit_go_below_zero_down_to_it_and_no_further(
    client: Client, database_url: str
) -> None:
    """PATCH overdraft_limit 50: a withdrawal takes the balance to -30.00 (available 20.00),
    one more cent past the limit is 409 INSUFFICIENT_FUNDS; the limit cannot go below what
    is owed (409 OVERDRAFT_LIMIT_IN_USE); a hold counts against it too; the history holds
    WALLET_UPDATE rows; verify is clean."""
    wallet_id = await new_wallet(client)
    status, body, headers = await patch(client, wallet_id, {"overdraft_limit": "50.00"})
    assert status == 200, body
    assert (body["overdraft_limit"], body["available"], headers["ETag"]) == (
        "50.00",
        "50.00",
        '"1"',
    )
    status, body, _ = await operate(client, wallet_id, "WITHDRAW", "30.00")
    assert (status, body["balance"], body["available"]) == (200, "-30.00", "20.00")
    status, body, _ = await operate(client, wallet_id, "WITHDRAW", "20.01")
    assert (status, body["code"]) == (409, "INSUFFICIENT_FUNDS"), body
    status, body, _ = await patch(client, wallet_id, {"overdraft_limit": "29.99"})
    assert (status, body["code"]) == (409, "OVERDRAFT_LIMIT_IN_USE"), body
    status, body, _ = await call(
        client, "POST", f"/api/v1/wallets/{wallet_id}/holds", {"amount": "20.01"}
    )
    assert (status, body["code"]) == (409, "INSUFFICIENT_FUNDS"), body
    status, body, _ = await call(
        client, "POST", f"/api/v1/wallets/{wallet_id}/holds", {"amount": "20.00"}
    )
    assert status == 201, body
    status, body, _ = await call(client, "POST", f"/api/v1/holds/{body['id']}/void")
    assert status == 200, body
    status, body, _ = await patch(client, wallet_id, {"overdraft_limit": 30})
    assert (status, body["overdraft_limit"], body["available"]) == (200, "30.00", "0.00")
    rows = [(i["operation_type"], i["balance_after"], i.get("overdraft_limit")) for i in (
        await history(client, wallet_id)
    )]  # fmt: skip
    assert rows[0] == ("WALLET_UPDATE", "-30.00", "30.00")
    assert rows[-1] == ("WALLET_UPDATE", "0.00", "50.00")
    assert ("WITHDRAW", "-30.00", None) in rows
    report = await verify(database_url)
    assert report.clean, report.first_mismatches


async def test_the_database_refuses_a_row_below_the_floor(
    client: Client, database_url: str
) -> None:
    """Past the engine: the snapshot and a log row below -overdraft_limit are refused by
    PostgreSQL itself at commit (23514), and a CLOSED wallet's row cannot change."""
    wallet_id = await new_wallet(client)
    assert (await patch(client, wallet_id, {"overdraft_limit": "10.00"}))[0] == 200
    connection = await asyncpg.connect(database_url)
    try:
        with pytest.raises(asyncpg.CheckViolationError):
            await connection.execute(
                "UPDATE wallets SET balance = -1001 WHERE id = $1", uuid.UUID(wallet_id)
            )
        await connection.execute(
            "UPDATE wallets SET balance = -1000 WHERE id = $1", uuid.UUID(wallet_id)
        )  # at the floor: taken (then put back)
        await connection.execute(
            "UPDATE wallets SET balance = 0 WHERE id = $1", uuid.UUID(wallet_id)
        )
        with pytest.raises(asyncpg.CheckViolationError):
            await connection.execute(
                "INSERT INTO wallet_operations (wallet_id, seq, kind, amount, balance_after,"
                " created_at) VALUES ($1, 99, 2, 1001, -1001, now())",
                uuid.UUID(wallet_id),
            )
        closed = await new_wallet(client)
        assert (await patch(client, closed, {"status": "CLOSED"}))[0] == 200
        with pytest.raises(asyncpg.CheckViolationError):
            await connection.execute(
                "UPDATE wallets SET status = 1 WHERE id = $1", uuid.UUID(closed)
            )
    finally:
        await connection.close()


async def test_a_frozen_wallet_takes_credits_and_refuses_every_debit(client: Client) -> None:
    """FROZEN: deposit and an incoming transfer go through; withdraw (recorded under its
    key, replayed as such after the unfreeze), transfer out, hold creation and capture are
    409 WALLET_FROZEN; a void still releases; ACTIVE again lets debits through."""
    wallet_id = await new_wallet(client, "100.00")
    other = await new_wallet(client, "100.00")
    status, hold, _ = await call(
        client, "POST", f"/api/v1/wallets/{wallet_id}/holds", {"amount": "10.00"}
    )
    assert status == 201
    status, second, _ = await call(
        client, "POST", f"/api/v1/wallets/{wallet_id}/holds", {"amount": "5.00"}
    )
    assert status == 201
    status, body, _ = await patch(client, wallet_id, {"status": "FROZEN"})
    assert (status, body["status"]) == (200, "FROZEN")
    status, body, _ = await operate(client, wallet_id, "WITHDRAW", "1.00", key="w-frozen")
    assert (status, body["code"]) == (409, "WALLET_FROZEN"), body
    status, body, _ = await operate(client, wallet_id, "DEPOSIT", "1.00")
    assert (status, body["balance"]) == (200, "101.00")
    transfer = {"from_wallet_id": wallet_id, "to_wallet_id": other, "amount": "1.00"}
    status, body, _ = await call(client, "POST", "/api/v1/transfers", transfer)
    assert (status, body["code"], body["side"]) == (409, "WALLET_FROZEN", "from"), body
    inbound = {"from_wallet_id": other, "to_wallet_id": wallet_id, "amount": "1.00"}
    status, body, _ = await call(client, "POST", "/api/v1/transfers", inbound)
    assert (status, body["status"]) == (201, "COMPLETED"), body
    status, body, _ = await call(
        client, "POST", f"/api/v1/wallets/{wallet_id}/holds", {"amount": "1.00"}
    )
    assert (status, body["code"]) == (409, "WALLET_FROZEN"), body
    status, body, _ = await call(client, "POST", f"/api/v1/holds/{hold['id']}/capture")
    assert (status, body["code"]) == (409, "WALLET_FROZEN"), body
    status, body, _ = await call(client, "POST", f"/api/v1/holds/{second['id']}/void")
    assert (status, body["status"]) == (200, "VOIDED"), body
    status, body, _ = await patch(client, wallet_id, {"status": "ACTIVE"})
    assert (status, "status" in body) == (200, False)
    status, body, headers = await operate(client, wallet_id, "WITHDRAW", "1.00", key="w-frozen")
    assert (status, body["code"], headers["Idempotent-Replayed"]) == (409, "WALLET_FROZEN", "true")
    status, body, _ = await call(client, "POST", f"/api/v1/holds/{hold['id']}/capture")
    assert (status, body["status"]) == (200, "CAPTURED"), body


async def test_close_needs_an_empty_wallet_and_a_closed_wallet_never_moves_again(
    client: Client, database_url: str
) -> None:
    """A close is 409 CLOSE_BLOCKED naming BALANCE, HOLDS or TRANSFERS while any holds;
    once closed (status CLOSED, zero balance) every deposit, withdrawal, change and
    transfer into it is 409 WALLET_CLOSED, the transfer refunded; reads still answer."""
    wallet_id = await new_wallet(client, "10.00")
    status, body, _ = await patch(client, wallet_id, {"status": "CLOSED"})
    assert (status, body["code"], body["blocked_by"]) == (409, "CLOSE_BLOCKED", ["BALANCE"])
    status, hold, _ = await call(
        client, "POST", f"/api/v1/wallets/{wallet_id}/holds", {"amount": "10.00"}
    )
    assert status == 201
    status, body, _ = await patch(client, wallet_id, {"status": "CLOSED"})
    assert (status, body["blocked_by"]) == (409, ["BALANCE", "HOLDS"])
    assert (await call(client, "POST", f"/api/v1/holds/{hold['id']}/void"))[0] == 200
    assert (await operate(client, wallet_id, "WITHDRAW", "10.00"))[0] == 200
    # A PENDING transfer on it (stored as one in flight looks; dated ahead so that no
    # re-drive picks it up while the test runs) blocks the close too.
    connection = await asyncpg.connect(database_url)
    try:
        transfer_id = uuid.uuid4()
        await connection.execute(
            "INSERT INTO transfers (id, from_wallet_id, to_wallet_id, amount, status,"
            " created_at, updated_at) VALUES ($1, $2, $3, 1, 1, now() + interval '1 day',"
            " now() + interval '1 day')",
            transfer_id, uuid.uuid4(), uuid.UUID(wallet_id),
        )  # fmt: skip
        status, body, _ = await patch(client, wallet_id, {"status": "CLOSED"})
        assert (status, body["blocked_by"]) == (409, ["TRANSFERS"])
        await connection.execute("DELETE FROM transfers WHERE id = $1", transfer_id)
    finally:
        await connection.close()
    status, body, _ = await patch(client, wallet_id, {"status": "CLOSED"})
    assert (status, body["status"], body["balance"]) == (200, "CLOSED", "0.00")
    for kind in ("DEPOSIT", "WITHDRAW"):
        status, body, _ = await operate(client, wallet_id, kind, "1.00")
        assert (status, body["code"]) == (409, "WALLET_CLOSED"), body
    for change in ({"status": "ACTIVE"}, {"status": "FROZEN"}, {"overdraft_limit": "5.00"}):
        status, body, _ = await patch(client, wallet_id, change)
        assert (status, body["code"]) == (409, "WALLET_CLOSED"), body
    sender = await new_wallet(client, "5.00")
    inbound = {"from_wallet_id": sender, "to_wallet_id": wallet_id, "amount": "5.00"}
    status, body, _ = await call(client, "POST", "/api/v1/transfers", inbound)
    assert (status, body["code"], body["side"]) == (409, "WALLET_CLOSED", "to"), body
    read = await client.get(f"/api/v1/wallets/{sender}")
    assert (await read.json())["balance"] == "5.00"
    read = await client.get(f"/api/v1/wallets/{wallet_id}")
    assert (read.status, (await read.json())["status"]) == (200, "CLOSED")
    report = await verify(database_url)
    assert report.clean, report.first_mismatches


async def test_a_transfer_into_a_closed_wallet_on_another_pipeline_is_refunded(
    make_app: AppFactory, aiohttp_client: Callable[..., Any]
) -> None:
    """The saga's credit leg (the wallets on two pipelines, so two commits) is refused
    WALLET_CLOSED and the debit refunded: the transfer ends FAILED with that failure code,
    never PENDING."""
    client: Client = await aiohttp_client(make_app())
    engine = client.app[STATE_KEY].services.engine
    closed = await new_wallet(client)
    sender = await new_wallet(client, "7.00")
    while engine.shard_of(uuid.UUID(sender)) == engine.shard_of(uuid.UUID(closed)):
        sender = await new_wallet(client, "7.00")
    assert (await patch(client, closed, {"status": "CLOSED"}))[0] == 200
    inbound = {"from_wallet_id": sender, "to_wallet_id": closed, "amount": "7.00"}
    status, body, _ = await call(client, "POST", "/api/v1/transfers", inbound)
    assert (status, body["code"]) == (409, "WALLET_CLOSED"), body
    assert (body["transfer"]["status"], body["transfer"]["failure_code"]) == (
        "FAILED", "WALLET_CLOSED",
    )  # fmt: skip
    read = await client.get(f"/api/v1/wallets/{sender}")
    assert (await read.json())["balance"] == "7.00"


async def test_patch_replays_under_its_key_and_refuses_bad_bodies(client: Client) -> None:
    """The same PATCH under the same Idempotency-Key answers the original (replayed, even
    after the wallet changed again); another body under it is 422; unknown fields, an
    empty change, a bad status or limit are 422 VALIDATION_ERROR; an unknown wallet 404."""
    wallet_id = await new_wallet(client)
    first = await patch(client, wallet_id, {"overdraft_limit": "5.00"}, key="limit-1")
    assert first[0] == 200
    assert (await patch(client, wallet_id, {"overdraft_limit": "9.00"}))[0] == 200
    again = await patch(client, wallet_id, {"overdraft_limit": "5.00"}, key="limit-1")
    assert (again[0], again[1], again[2]["Idempotent-Replayed"]) == (200, first[1], "true")
    status, body, _ = await patch(client, wallet_id, {"status": "FROZEN"}, key="limit-1")
    assert (status, body["code"]) == (422, "IDEMPOTENCY_KEY_REUSED")
    bad: dict[str, Any]
    for bad in (
        {}, {"metadata": {}}, {"status": "OPEN"}, {"status": None}, {"overdraft_limit": -1},
        {"overdraft_limit": "1.001"}, {"overdraft_limit": True}, {"overdraft_limit": "1e3"},
    ):  # fmt: skip
        status, body, _ = await patch(client, wallet_id, bad)
        assert (status, body["code"]) == (422, "VALIDATION_ERROR"), (bad, body)
    status, body, _ = await patch(client, str(uuid.uuid4()), {"status": "FROZEN"})
    assert (status, body["code"]) == (404, "WALLET_NOT_FOUND")


async def test_if_match_applies_only_on_the_version_it_names(client: Client) -> None:
    """If-Match "<seq>" on PATCH and on an operation: a stale or malformed one is 412
    PRECONDITION_FAILED and applies nothing; the current one applies; a keyed retry of an
    applied operation replays it although the seq moved (by that very operation)."""
    wallet_id = await new_wallet(client, "10.00")
    status, body, _ = await operate(client, wallet_id, "WITHDRAW", "1.00", if_match='"0"')
    assert (status, body["code"], body["seq"]) == (412, "PRECONDITION_FAILED", 1), body
    for malformed in ("1", 'W/"1"', '"1", "2"', '"x"'):
        status, body, _ = await patch(client, wallet_id, {"status": "FROZEN"}, if_match=malformed)
        assert (status, body["code"]) == (412, "PRECONDITION_FAILED"), malformed
    status, body, headers = await operate(
        client, wallet_id, "WITHDRAW", "1.00", key="im-1", if_match='"1"'
    )
    assert (status, body["balance"], headers["ETag"]) == (200, "9.00", '"2"')
    status, body, headers = await operate(
        client, wallet_id, "WITHDRAW", "1.00", key="im-1", if_match='"1"'
    )
    assert (status, body["balance"], headers["Idempotent-Replayed"]) == (200, "9.00", "true")
    status, body, _ = await patch(client, wallet_id, {"status": "FROZEN"}, if_match='"1"')
    assert (status, body["code"]) == (412, "PRECONDITION_FAILED")
    status, body, _ = await patch(client, wallet_id, {"status": "FROZEN"}, if_match='"2"')
    assert (status, body["status"]) == (200, "FROZEN")
    read = await client.get(f"/api/v1/wallets/{wallet_id}")
    assert ((await read.json())["balance"], read.headers["ETag"]) == ("9.00", '"3"')


async def test_changes_need_the_admin_scope_and_are_in_the_feed_with_their_actor(
    make_app: AppFactory, aiohttp_client: Callable[..., Any]
) -> None:
    """A key with every other scope is 403 FORBIDDEN on PATCH; an admin key changes the
    wallet, and the history item and the feed's wallet.updated event name that key."""
    keys = parse_keys("mover:read+create+move+feed:mover-secret,boss:admin:boss-secret")
    client: Client = await aiohttp_client(make_app(HttpSettings(api_keys=keys)))
    mover = {"Authorization": "Bearer mover-secret"}
    boss = {"Authorization": "Bearer boss-secret"}
    created = await client.post("/api/v1/wallets", headers=mover)
    wallet_id = (await created.json())["id"]
    status, body, _ = await patch(client, wallet_id, {"status": "FROZEN"}, headers=mover)
    assert (status, body["code"]) == (403, "FORBIDDEN")
    status, body, _ = await patch(client, wallet_id, {"status": "FROZEN"}, headers=boss)
    assert (status, body["status"]) == (200, "FROZEN")
    read = await client.get(f"/api/v1/wallets/{wallet_id}/operations", headers=mover)
    items = (await read.json())["items"]
    assert [(i["operation_type"], i["status"], i["actor"]) for i in items] == [
        ("WALLET_UPDATE", "FROZEN", "boss")
    ]
    feed = await client.get("/api/v1/events?limit=100", headers=mover)
    events = (await feed.json())["events"]
    updated = [e for e in events if e["type"] == "wallet.updated"]
    assert [(e["wallet_id"], e["status"], e["overdraft_limit"], e["actor"]) for e in updated] == [
        (wallet_id, "FROZEN", "0.00", "boss")
    ]


async def test_bulk_items_on_frozen_and_closed_wallets_are_refused_alone_or_whole(
    make_app: AppFactory, aiohttp_client: Callable[..., Any]
) -> None:
    """In a bulk request, a withdrawal from a FROZEN wallet is its item's 409 WALLET_FROZEN
    and a deposit to a CLOSED one 409 WALLET_CLOSED while the other items apply; in an
    atomic request (one pipeline: every group can be atomic) either refuses the whole
    group, nothing applied."""
    client: Client = await aiohttp_client(make_app(limits=EngineLimits(pipelines=1)))
    frozen = await new_wallet(client, "10.00")
    closed = await new_wallet(client)
    fine = await new_wallet(client)
    assert (await patch(client, frozen, {"status": "FROZEN"}))[0] == 200
    assert (await patch(client, closed, {"status": "CLOSED"}))[0] == 200
    items = [
        {"wallet_id": frozen, "operation_type": "WITHDRAW", "amount": "1.00"},
        {"wallet_id": closed, "operation_type": "DEPOSIT", "amount": "1.00"},
        {"wallet_id": fine, "operation_type": "DEPOSIT", "amount": "1.00"},
    ]
    status, body, _ = await call(client, "POST", "/api/v1/operations/bulk", {"items": items})
    assert status == 200, body
    assert [(r["status"], r["body"].get("code")) for r in body["results"]] == [
        (409, "WALLET_FROZEN"), (409, "WALLET_CLOSED"), (200, None),
    ]  # fmt: skip
    codes = {frozen: "WALLET_FROZEN", closed: "WALLET_CLOSED"}
    for first in items[:2]:
        atomic = {"items": [items[2], first], "atomic": True}
        status, body, _ = await call(client, "POST", "/api/v1/operations/bulk", atomic)
        assert (status, body["code"]) == (409, codes[first["wallet_id"]]), body
    read = await client.get(f"/api/v1/wallets/{fine}")
    assert (await read.json())["balance"] == "1.00"


async def test_as_of_shows_the_status_and_limit_the_wallet_had_then(client: Client) -> None:
    """A read as of an instant between two changes shows that instant's status, limit and
    available (balance - held + limit then), and the seq then as its ETag."""
    wallet_id = await new_wallet(client)
    assert (await patch(client, wallet_id, {"overdraft_limit": "30.00"}))[0] == 200
    assert (await operate(client, wallet_id, "WITHDRAW", "10.00"))[0] == 200
    read = await client.get(f"/api/v1/wallets/{wallet_id}")
    between = (await read.json())["updated_at"]
    status, body, _ = await patch(client, wallet_id, {"status": "FROZEN", "overdraft_limit": 10})
    assert (status, body["status"], body["available"]) == (200, "FROZEN", "0.00")
    past = await client.get(f"/api/v1/wallets/{wallet_id}", params={"as_of": between})
    body = await past.json()
    assert (past.status, past.headers["ETag"]) == (200, '"2"')
    assert (body["balance"], body["available"], body["overdraft_limit"]) == (
        "-10.00", "20.00", "30.00",
    )  # fmt: skip
    assert "status" not in body  # ACTIVE then
