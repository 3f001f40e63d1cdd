"""POST /api/v1/operations/bulk through the real app on real PostgreSQL."""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import AppFactory, running_services
from tests.processes import WalletdProcess
from tests.test_faults import check_database
from walletd.cli.config import SETTINGS
from walletd.cli.service import migrate_database
from walletd.engine.limits import EngineLimits
from walletd.engine.model import (
    Batch,
    NewWallet,
    OperationKind,
    OperationRecord,
    RefusalReason,
    RefusalRecord,
    SnapshotUpdate,
)
from walletd.http.app import create_app
from walletd.http.bulk import (
    KEY_INDEX_MAX,
    REQUEST_KEY_LENGTH_MAX,
    BulkItem,
    _checked_item,
    _parse_item,
    item_json,
    parse_bulk,
)
from walletd.http.metrics import Metrics
from walletd.http.openapi import build_openapi_document
from walletd.http.parsing import derived_key
from walletd.http.settings import HttpSettings
from walletd.http.state import STATE_KEY
from walletd.persistence.database import PoolSettings, create_pool
from walletd.persistence.postgres_log import PostgresLog

Client = TestClient[web.Request, web.Application]
BULK = "/api/v1/operations/bulk"


async def until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Poll ``condition`` until it holds; fail after ``timeout_s``."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition never held"
        await asyncio.sleep(0.001)


async def new_wallet(client: Client) -> str:
    response = await client.post("/api/v1/wallets")
    assert response.status == 201
    wallet_id: str = (await response.json())["id"]
    return wallet_id


def op(wallet_id: str, kind: str, amount: Any, key: str | None = None) -> dict[str, Any]:
    item: dict[str, Any] = {"wallet_id": wallet_id, "operation_type": kind, "amount": amount}
    if key is not None:
        item["idempotency_key"] = key
    return item


async def bulk(client: Client, items: list[Any], **headers: str) -> tuple[int, dict[str, Any]]:
    response = await client.post(BULK, json={"items": items}, headers=headers)
    return response.status, await response.json(content_type=None)


async def balance(client: Client, wallet_id: str) -> Decimal:
    response = await client.get(f"/api/v1/wallets/{wallet_id}")
    assert response.status == 200
    return Decimal((await response.json())["balance"])


async def history(client: Client, wallet_id: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor = None
    while True:
        query = f"?limit=500&cursor={cursor}" if cursor else "?limit=500"
        response = await client.get(f"/api/v1/wallets/{wallet_id}/operations{query}")
        assert response.status == 200
        page = await response.json()
        items.extend(page["items"])
        cursor = page["next_cursor"]
        if cursor is None:
            return items


async def test_mixed_items_get_exactly_the_single_endpoint_results(client: Client) -> None:
    """Valid, refused and invalid items each get the single endpoint's status and body."""
    a, b = await new_wallet(client), await new_wallet(client)
    missing = str(uuid.uuid4())
    status, body = await bulk(
        client,
        [
            op(a, "DEPOSIT", "10.50"),
            op(a, "WITHDRAW", 0.5),  # a JSON float, read exactly
            op(b, "WITHDRAW", "1.00"),  # nothing there: 409
            op(missing, "DEPOSIT", 1),  # 404
            op(a, "DEPOSIT", "0.001"),  # three decimals: 422
            {"wallet_id": "not-a-uuid", "operation_type": "DEPOSIT", "amount": 1},
            op(b, "DEPOSIT", 7),
            {"wallet_id": a, "operation_type": "DEPOSIT", "amount": 1, "extra": True},
        ],
    )
    assert status == 200, body
    statuses = [result["status"] for result in body["results"]]
    assert statuses == [200, 200, 409, 404, 422, 422, 200, 422]
    assert [result["index"] for result in body["results"]] == list(range(8))
    assert body["applied"] == 3
    assert body["refused"] == 5
    results = body["results"]
    assert results[0]["body"]["balance"] == "10.50"
    assert results[1]["body"]["balance"] == "10.00"
    assert results[2]["body"]["code"] == "INSUFFICIENT_FUNDS"
    assert results[3]["body"]["code"] == "WALLET_NOT_FOUND"
    assert results[4]["body"]["errors"] == [
        {"field": "items[4].amount", "message": "must have at most 2 fractional digits (USD)"}
    ]
    assert results[5]["body"]["errors"][0]["field"] == "items[5].wallet_id"
    unknown = {"field": "items[7].extra", "message": "unknown field"}
    assert results[7]["body"]["errors"][0] == unknown
    assert results[6]["body"]["balance"] == "7.00"
    assert await balance(client, a) == Decimal("10.00")
    assert await balance(client, b) == Decimal("7.00")


async def test_a_thousand_items_on_one_wallet_apply_in_order_and_match_history(
    client: Client,
) -> None:
    """1,000 items on one wallet apply in array order: balances_after and history agree."""
    wallet = await new_wallet(client)
    amounts = [Decimal(f"{(i % 97) + 1}.{i % 100:02d}") for i in range(1000)]
    items = [
        op(wallet, "DEPOSIT" if i % 3 else "WITHDRAW", str(amount), key=f"k{i}")
        for i, amount in enumerate(amounts)
    ]
    status, body = await bulk(client, items)
    assert status == 200
    expected = Decimal(0)
    for i, (item, result) in enumerate(zip(items, body["results"], strict=True)):
        amount = Decimal(item["amount"])
        if item["operation_type"] == "DEPOSIT":
            expected += amount
            assert result["status"] == 200, result
        elif amount <= expected:
            expected -= amount
            assert result["status"] == 200, result
        else:
            assert result["status"] == 409, (i, result)
            continue
        assert Decimal(result["body"]["balance"]) == expected
    assert await balance(client, wallet) == expected
    logged = await history(client, wallet)
    applied = [r for r in body["results"] if r["status"] == 200]
    assert len(logged) == len(applied)
    assert [Decimal(row["balance_after"]) for row in reversed(logged)] == [
        Decimal(r["body"]["balance"]) for r in applied
    ]


async def test_item_keys_and_the_request_key_replay_without_applying_twice(
    client: Client,
) -> None:
    """A retried bulk request (same Idempotency-Key) replays every item; nothing applies
    twice; a reused item key with another amount is 422 for that item only."""
    a, b = await new_wallet(client), await new_wallet(client)
    items = [op(a, "DEPOSIT", "5.00", key="own-key"), op(b, "DEPOSIT", "3.00"), op(a, "DEPOSIT", 2)]
    first_status, first = await bulk(client, items, **{"Idempotency-Key": "batch-1"})
    again_status, again = await bulk(client, items, **{"Idempotency-Key": "batch-1"})
    assert first_status == again_status == 200
    assert [r["body"] for r in first["results"]] == [r["body"] for r in again["results"]]
    assert [r["replayed"] for r in first["results"]] == [False, False, False]
    assert [r["replayed"] for r in again["results"]] == [True, True, True]
    assert await balance(client, a) == Decimal("7.00")
    assert await balance(client, b) == Decimal("3.00")
    # The derived keys are visible in the history, as the single endpoint's keys are.
    assert {row["idempotency_key"] for row in await history(client, a)} == {"own-key", "batch-1/2"}
    status, body = await bulk(client, [op(a, "DEPOSIT", "6.00", key="own-key")])
    assert status == 200
    assert body["results"][0]["status"] == 422
    assert body["results"][0]["body"]["code"] == "IDEMPOTENCY_KEY_REUSED"
    assert await balance(client, a) == Decimal("7.00")


async def test_derived_item_keys_never_meet_a_key_a_client_sends(client: Client) -> None:
    """Issue 20 item 7: a client key ``R/0`` beside request key ``R`` is its own key, not a
    replay of item 0 (it was: applied 3, balance 17 instead of 27); the same key text on
    the single endpoint, on a hold and on a transfer is never a bulk item either, and a key
    a client used first does not swallow a derived one. A retry still replays item by item."""
    a, b = await new_wallet(client), await new_wallet(client)
    items = [op(a, "DEPOSIT", 10), op(a, "DEPOSIT", 10, key="R/0"), op(a, "DEPOSIT", 7)]
    status, body = await bulk(client, items, **{"Idempotency-Key": "R"})
    assert status == 200, body
    assert (body["applied"], [r["replayed"] for r in body["results"]]) == (3, [False] * 3)
    assert await balance(client, a) == Decimal(27)
    response = await client.post(
        f"/api/v1/wallets/{a}/operation",
        json={"operation_type": "DEPOSIT", "amount": 7},
        headers={"Idempotency-Key": "R/2"},
    )
    assert (response.status, response.headers.get("Idempotent-Replayed")) == (200, None)
    assert await balance(client, a) == Decimal(34)
    response = await client.post(
        f"/api/v1/wallets/{a}/holds", json={"amount": 10}, headers={"Idempotency-Key": "R/0"}
    )
    assert (response.status, response.headers.get("Idempotent-Replayed")) == (201, None)
    response = await client.post(
        "/api/v1/transfers",
        json={"from_wallet_id": a, "to_wallet_id": b, "amount": 10},
        headers={"Idempotency-Key": "R/0"},
    )
    assert (response.status, response.headers.get("Idempotent-Replayed")) == (201, None)
    assert await balance(client, a) == Decimal(24)
    # A client's "S/0" first, then request S: item 0 is applied, not a replay of it (only a
    # row stored before the upgrade under "S/0" is taken for item 0 of request S:
    # test_a_bulk_request_sent_before_the_upgrade_replays_after_it).
    response = await client.post(
        f"/api/v1/wallets/{b}/operation",
        json={"operation_type": "DEPOSIT", "amount": 1},
        headers={"Idempotency-Key": "S/0"},
    )
    assert response.status == 200
    status, body = await bulk(client, [op(b, "DEPOSIT", 5)], **{"Idempotency-Key": "S"})
    assert (body["applied"], body["results"][0]["replayed"]) == (1, False)
    assert await balance(client, b) == Decimal(16)
    status, again = await bulk(client, items, **{"Idempotency-Key": "R"})
    assert [r["replayed"] for r in again["results"]] == [True] * 3
    assert await balance(client, a) == Decimal(24)
    # Shown as before in the history and the feed: the derived key as "R/<index>".
    shown = [row["idempotency_key"] for row in await history(client, a)]
    assert shown.count("R/0") == 2
    assert shown.count("R/2") == 2
    assert sorted(key for key in await feed_keys(client, a) if key) == sorted(
        key for key in shown if key
    )


# The migration that marks the rows stored before derived keys took the unit separator,
# named, never numbered (the lead renumbers migrations at merge).
OLD_KEY_SPELLING = "old_key_spelling"
_LOG_TABLES = ("wallet_operations", "wallet_refusals")


async def _before_the_upgrade(connection: asyncpg.Connection) -> None:
    """Undo migration ``old_key_spelling`` (it only adds one column to each log table): the
    schema a walletd of the version before it wrote its bulk items' keys on."""
    for table in _LOG_TABLES:
        await connection.execute(f"ALTER TABLE {table} DROP COLUMN {OLD_KEY_SPELLING}")
    await connection.execute(
        "DELETE FROM walletd_schema_migrations WHERE name = $1", OLD_KEY_SPELLING
    )


async def _write_as_an_old_walletd(dsn: str, wallet: uuid.UUID) -> None:
    """What a walletd before the upgrade stored for bulk request ``R`` = [DEPOSIT 10,
    WITHDRAW 100 (refused, 409), DEPOSIT 5 keyed ``own``] on a new wallet: its unkeyed
    items under ``R/<index>``, through the same storage calls."""
    now_us = 1_700_000_000_000_000
    old = OperationRecord(wallet, 1, OperationKind.DEPOSIT, 1000, 1000, "R/0", now_us)
    refused = RefusalRecord(
        wallet, "R/1", OperationKind.WITHDRAW, 10000, RefusalReason.INSUFFICIENT_FUNDS,
        1000, 1, now_us,
    )  # fmt: skip
    own = OperationRecord(wallet, 2, OperationKind.DEPOSIT, 500, 1500, "own", now_us)
    pool = await create_pool(dsn, PoolSettings(size_max=1))
    try:
        log = PostgresLog(pool)
        await log.append_batch(Batch(new_wallets=[NewWallet(wallet, now_us, None, "")]))
        await log.append_batch(
            Batch(operations=[old], snapshots=[SnapshotUpdate(wallet, 0, 1, 1000, now_us)])
        )
        await log.append_batch(
            Batch(
                operations=[own],
                snapshots=[SnapshotUpdate(wallet, 1, 2, 1500, now_us)],
                refusals=[refused],
            )
        )
    finally:
        await pool.close()


async def test_a_bulk_request_sent_before_the_upgrade_replays_after_it(
    fresh_database_url: str, aiohttp_client: Callable[..., Any]
) -> None:
    """Issue 20 item 7: a bulk request whose unkeyed items an older walletd stored under
    ``R/<index>`` and that is retried after the upgrade (derived keys ``R<US><index>``)
    replays every item, the refusal included, with the original results: nothing applies
    twice (without the fallback item 0 applied again and the withdrawal, decided anew after
    a deposit, applied). A key ``T/0`` a client sends after the upgrade is still its own,
    never item 0 of request ``T``. The migration rewrites neither log table."""
    dsn = fresh_database_url
    await migrate_database(dsn)
    connection = await asyncpg.connect(dsn)
    try:
        await _before_the_upgrade(connection)
        wallet = uuid.uuid4()
        await _write_as_an_old_walletd(dsn, wallet)
        files = "SELECT relname, relfilenode FROM pg_class WHERE relname = ANY($1::text[])"
        before = await connection.fetch(files, list(_LOG_TABLES))
        applied = await migrate_database(dsn)  # the upgrade
        assert [name.partition("_")[2] for name in applied] == [OLD_KEY_SPELLING]
        assert await connection.fetch(files, list(_LOG_TABLES)) == before  # no rewrite
    finally:
        await connection.close()
    metrics = Metrics()
    app = create_app(
        HttpSettings(), lambda: running_services(dsn, None, metrics.engine), metrics=metrics
    )
    client: Client = await aiohttp_client(app)
    a = str(wallet)
    response = await client.post(
        f"/api/v1/wallets/{a}/operation", json={"operation_type": "DEPOSIT", "amount": 200}
    )
    assert response.status == 200
    items = [op(a, "DEPOSIT", 10), op(a, "WITHDRAW", 100), op(a, "DEPOSIT", 5, key="own")]
    status, body = await bulk(client, items, **{"Idempotency-Key": "R"})
    assert status == 200, body
    results = body["results"]
    # A refusal carries no "replayed": that it is the stored one shows in the balance (the
    # withdrawal, decided anew on 210, would apply).
    assert [(r["status"], r.get("replayed")) for r in results] == [
        (200, True),
        (409, None),
        (200, True),
    ], results
    assert (results[0]["body"]["balance"], results[2]["body"]["balance"]) == ("10.00", "15.00")
    assert results[1]["body"]["code"] == "INSUFFICIENT_FUNDS"
    assert await balance(client, a) == Decimal(215)
    # After the upgrade, a client's key "T/0" and bulk request T are two keys.
    response = await client.post(
        f"/api/v1/wallets/{a}/operation",
        json={"operation_type": "DEPOSIT", "amount": 1},
        headers={"Idempotency-Key": "T/0"},
    )
    assert (response.status, response.headers.get("Idempotent-Replayed")) == (200, None)
    for replayed in (False, True):
        status, body = await bulk(client, [op(a, "DEPOSIT", 2)], **{"Idempotency-Key": "T"})
        assert [(r["status"], r.get("replayed")) for r in body["results"]] == [(200, replayed)]
    assert await balance(client, a) == Decimal(218)


async def test_storage_answers_an_old_spelling_under_the_derived_key_asked_for(
    fresh_database_url: str,
) -> None:
    """PostgresLog.find_operations, after the upgrade: a derived key finds the operation or
    refusal stored under ``R/<index>`` before it, answered under the derived key (the key
    cache and the replay speak of that one); the client key ``R/0`` still finds its row as
    stored; a row stored under the derived key itself wins over the old spelling."""
    dsn = fresh_database_url
    await migrate_database(dsn)
    connection = await asyncpg.connect(dsn)
    try:
        await _before_the_upgrade(connection)
    finally:
        await connection.close()
    wallet = uuid.uuid4()
    await _write_as_an_old_walletd(dsn, wallet)
    await migrate_database(dsn)
    pool = await create_pool(dsn, PoolSettings(size_max=1))
    try:
        log = PostgresLog(pool)
        zero, one = derived_key("R", 0), derived_key("R", 1)
        found = await log.find_operations([(wallet, zero), (wallet, one), (wallet, "R/0")])
        assert {key: (record.idempotency_key, record.amount) for key, record in found.items()} == {
            (wallet, zero): (zero, 1000),
            (wallet, one): (one, 10000),
            (wallet, "R/0"): ("R/0", 1000),
        }
        assert isinstance(found[(wallet, one)], RefusalRecord)
        both = OperationRecord(wallet, 3, OperationKind.DEPOSIT, 7, 1507, zero, 0)
        await log.append_batch(
            Batch(operations=[both], snapshots=[SnapshotUpdate(wallet, 2, 3, 1507, 0)])
        )
        assert (await log.find_operations([(wallet, zero)]))[(wallet, zero)].amount == 7
    finally:
        await pool.close()


async def feed_keys(client: Client, wallet_id: str) -> list[str | None]:
    """The idempotency_key of every operation.applied event of one wallet in the feed."""
    keys: list[str | None] = []
    after: str | None = None
    for _ in range(1000):  # bounded
        params = {"limit": "500"} | ({"after": after} if after else {})
        response = await client.get("/api/v1/events", params=params)
        body = await response.json()
        assert response.status == 200, body
        keys += [
            event["idempotency_key"]
            for event in body["events"]
            if event["type"] == "operation.applied" and event["wallet_id"] == wallet_id
        ]
        after = body["next_position"]
        if len(body["events"]) < 500:
            return keys
    raise AssertionError("the feed never ran dry")


def test_a_forwarded_item_keeps_every_field() -> None:
    """Issue 20 item 7: what a sub-request spells for an item parses back, at the owner, to
    the very same item: every field of BulkItem (reference was lost), a derived key as the
    same derived key (through key_index and the request key), a client key as itself."""
    wallet = uuid.uuid4()
    derived = BulkItem(
        wallet, OperationKind.WITHDRAW, 1234, derived_key("R", 7), "ref é 1",
        metadata=(("m", "é 1"),),
    )  # fmt: skip
    own = BulkItem(wallet, OperationKind.DEPOSIT, 1, "own/7", "ref 2")
    for item in (derived, own):
        # Every field is set: a field added to BulkItem and not to item_json fails here.
        assert all(value is not None for value in item), item
        assert derived.metadata
        raw = orjson.dumps({"items": [item_json(item)]})
        assert parse_bulk(raw, 10, "R").items == [item]
    bare = BulkItem(wallet, OperationKind.DEPOSIT, 5, None)
    assert parse_bulk(orjson.dumps({"items": [item_json(bare)]}), 10, None).items == [bare]


async def test_key_index_is_checked_and_derives_the_key(client: Client) -> None:
    """``key_index`` (what a forwarding process sets) needs the request key, excludes an
    own key, is an integer 0..999999; it derives the key an item at that index gets."""
    a = await new_wallet(client)
    bad: list[tuple[Any, dict[str, str], str]] = [
        (True, {"Idempotency-Key": "K"}, f"must be an integer from 0 to {KEY_INDEX_MAX}"),
        (KEY_INDEX_MAX + 1, {"Idempotency-Key": "K"}, "must be an integer from 0 to 999999"),
        (-1, {"Idempotency-Key": "K"}, "must be an integer from 0 to 999999"),
        ("1", {"Idempotency-Key": "K"}, "must be an integer from 0 to 999999"),
        (1, {}, "needs the request's Idempotency-Key header"),
    ]
    for value, headers, message in bad:
        _status, body = await bulk(client, [op(a, "DEPOSIT", 1) | {"key_index": value}], **headers)
        assert body["results"][0]["body"]["errors"] == [
            {"field": "items[0].key_index", "message": message}
        ], value
    _status, body = await bulk(
        client, [op(a, "DEPOSIT", 1, key="own") | {"key_index": 1}], **{"Idempotency-Key": "K"}
    )
    assert body["results"][0]["body"]["errors"][0]["message"] == (
        "give idempotency_key or key_index, not both"
    )
    assert await balance(client, a) == Decimal(0)
    items = [op(a, "DEPOSIT", 1), op(a, "DEPOSIT", 2)]
    assert (await bulk(client, items, **{"Idempotency-Key": "K"}))[0] == 200
    _status, body = await bulk(
        client, [op(a, "DEPOSIT", 2) | {"key_index": 1}], **{"Idempotency-Key": "K"}
    )
    assert body["results"][0]["replayed"] is True
    # 1.0 is an integer to JSON Schema, so the document allows it: the same index as 1.
    _status, body = await bulk(
        client, [op(a, "DEPOSIT", 2) | {"key_index": 1.0}], **{"Idempotency-Key": "K"}
    )
    assert body["results"][0]["replayed"] is True
    assert await balance(client, a) == Decimal(3)


async def test_concurrent_retries_of_one_keyed_bulk_apply_once(client: Client) -> None:
    """Ten concurrent copies of one keyed bulk request apply each item exactly once."""
    wallets = [await new_wallet(client) for _ in range(5)]
    items = [op(w, "DEPOSIT", "1.25") for w in wallets for _ in range(4)]
    answers = await asyncio.gather(
        *(bulk(client, items, **{"Idempotency-Key": "same"}) for _ in range(10))
    )
    assert all(status == 200 for status, _ in answers)
    for wallet in wallets:
        assert await balance(client, wallet) == Decimal("5.00")


@pytest.fixture
async def one_actor(make_app: AppFactory, aiohttp_client: Callable[..., Any]) -> Client:
    """The app with one shard actor (the default of `walletd serve`): atomic requests fit."""
    client: Client = await aiohttp_client(make_app(HttpSettings(), EngineLimits(pipelines=1)))
    return client


async def atomic(client: Client, items: list[Any], **headers: str) -> tuple[int, dict[str, Any]]:
    response = await client.post(BULK, json={"items": items, "atomic": True}, headers=headers)
    return response.status, await response.json(content_type=None)


async def test_atomic_applies_everything_in_one_transaction(
    one_actor: Client, database_url: str
) -> None:
    """An atomic request applies every item in array order (a withdrawal may spend an
    earlier deposit of the same request), all in one PostgreSQL transaction."""
    client = one_actor
    a, b = await new_wallet(client), await new_wallet(client)
    items = [
        op(a, "DEPOSIT", "10.00"),
        op(a, "WITHDRAW", "7.50"),
        op(b, "DEPOSIT", "1.25"),
        op(a, "WITHDRAW", "2.50"),
    ]
    status, body = await atomic(client, items)
    assert status == 200, body
    assert [r["body"]["balance"] for r in body["results"]] == ["10.00", "2.50", "1.25", "0.00"]
    connection = await asyncpg.connect(database_url)
    try:
        transactions = await connection.fetchval(
            "SELECT count(DISTINCT xmin::text) FROM wallet_operations WHERE wallet_id = ANY($1)",
            [uuid.UUID(a), uuid.UUID(b)],
        )
    finally:
        await connection.close()
    assert transactions == 1


async def test_atomic_refuses_whole_on_one_bad_item(one_actor: Client) -> None:
    """One refused item (409, 404, key reuse) or one invalid item (422) refuses an atomic
    request whole: nothing is applied, and the problem names the item."""
    client = one_actor
    a, b = await new_wallet(client), await new_wallet(client)
    assert (await bulk(client, [op(a, "DEPOSIT", "5.00", key="seed")]))[0] == 200
    cases: list[tuple[list[dict[str, Any]], int, str, int | None]] = [
        ([op(a, "DEPOSIT", 1), op(b, "WITHDRAW", "0.01"), op(a, "DEPOSIT", 2)],
         409, "INSUFFICIENT_FUNDS", 1),
        ([op(a, "WITHDRAW", 5), op(a, "WITHDRAW", "0.01")], 409, "INSUFFICIENT_FUNDS", 1),
        ([op(b, "DEPOSIT", 1), op(str(uuid.uuid4()), "DEPOSIT", 1)], 404, "WALLET_NOT_FOUND", 1),
        ([op(b, "DEPOSIT", 1), op(a, "DEPOSIT", 9, key="seed")], 422, "IDEMPOTENCY_KEY_REUSED", 1),
        ([op(b, "DEPOSIT", 1, key="twice"), op(b, "DEPOSIT", 2, key="twice")],
         422, "IDEMPOTENCY_KEY_REUSED", 1),
        # More decimals than the wallet's currency (USD) has: refused by its shard, which
        # names the item; past any currency's 18: refused by the edge, before the engine.
        ([op(b, "DEPOSIT", 1), op(a, "DEPOSIT", "0.001")], 422, "VALIDATION_ERROR", 1),
        ([op(b, "DEPOSIT", 1), op(a, "DEPOSIT", "0." + "0" * 18 + "1")],
         422, "VALIDATION_ERROR", None),
    ]  # fmt: skip
    for items, status, code, index in cases:
        answer_status, answer = await atomic(client, items)
        assert (answer_status, answer["code"]) == (status, code), answer
        assert answer.get("index") == index
        assert "nothing was applied" in answer["detail"] or code == "VALIDATION_ERROR"
    assert await balance(client, a) == Decimal("5.00")
    assert await balance(client, b) == Decimal(0)
    assert len(await history(client, b)) == 0


async def test_atomic_bulk_takes_only_available_money_on_a_wallet_with_holds(
    one_actor: Client,
) -> None:
    """Issue 20 item 11: the atomic trial run decides on ``available``, not ``balance``: a
    withdrawal past the available money of a wallet with a hold refuses the group whole
    (409, nothing applied, the hold untouched), exactly the available amount applies, and
    a deposit earlier in the group makes room for a later withdrawal."""
    client = one_actor
    a, b = await new_wallet(client), await new_wallet(client)
    assert (await bulk(client, [op(a, "DEPOSIT", 10)]))[0] == 200
    response = await client.post(f"/api/v1/wallets/{a}/holds", json={"amount": 8})
    assert response.status == 201
    status, answer = await atomic(client, [op(b, "DEPOSIT", 1), op(a, "WITHDRAW", 5)])
    assert (status, answer["code"], answer["index"]) == (409, "INSUFFICIENT_FUNDS", 1), answer
    assert (await balance(client, a), await balance(client, b)) == (Decimal(10), Decimal(0))
    status, answer = await atomic(client, [op(a, "WITHDRAW", "2.01")])
    assert (status, answer["code"]) == (409, "INSUFFICIENT_FUNDS"), answer
    status, answer = await atomic(client, [op(a, "WITHDRAW", "2.00")])
    assert status == 200, answer
    status, answer = await atomic(client, [op(a, "DEPOSIT", 4), op(a, "WITHDRAW", 4)])
    assert status == 200, answer
    wallet = await (await client.get(f"/api/v1/wallets/{a}")).json()
    assert (wallet["balance"], wallet["held"], wallet["available"]) == ("8.00", "8.00", "0.00")


async def test_atomic_replays_and_a_key_used_twice_in_one_request(one_actor: Client) -> None:
    """A retried atomic request replays every item; a key used twice for the same operation
    within one request applies once."""
    client = one_actor
    a = await new_wallet(client)
    items = [op(a, "DEPOSIT", 3, key="k"), op(a, "DEPOSIT", 3, key="k"), op(a, "WITHDRAW", 1)]
    first = await atomic(client, items, **{"Idempotency-Key": "atomic-1"})
    again = await atomic(client, items, **{"Idempotency-Key": "atomic-1"})
    assert first[0] == again[0] == 200
    assert [r["replayed"] for r in first[1]["results"]] == [False, True, False]
    assert [r["replayed"] for r in again[1]["results"]] == [True, True, True]
    assert await balance(client, a) == Decimal("2.00")


async def test_atomic_bounds(make_app: AppFactory, aiohttp_client: Callable[..., Any]) -> None:
    """An atomic request must fit one batch (413) and one shard actor (422
    ATOMIC_NOT_POSSIBLE); independent requests of the same items are fine."""
    limits = EngineLimits(pipelines=2, batch_ops_max=4, mailbox_commands_max=64)
    client: Client = await aiohttp_client(make_app(HttpSettings(), limits))
    wallets = [await new_wallet(client) for _ in range(8)]
    by_shard: dict[int, list[str]] = {}
    for wallet in wallets:
        engine = client.app[STATE_KEY].services.engine
        pipeline = engine.shard_of(uuid.UUID(wallet)) % len(engine.shards)
        by_shard.setdefault(pipeline, []).append(wallet)
    assert len(by_shard) == 2, "eight random wallets on one shard of two"
    one, other = by_shard[0][0], by_shard[1][0]
    status, body = await atomic(client, [op(one, "DEPOSIT", 1)] * 5)
    assert (status, body["code"]) == (413, "TOO_MANY_ITEMS")
    status, body = await atomic(client, [op(one, "DEPOSIT", 1), op(other, "DEPOSIT", 1)])
    assert (status, body["code"]) == (422, "ATOMIC_NOT_POSSIBLE")
    assert await balance(client, one) == Decimal(0)
    status, body = await atomic(client, [op(one, "DEPOSIT", 1)] * 4)
    assert status == 200
    status, body = await bulk(client, [op(one, "DEPOSIT", 1), op(other, "DEPOSIT", 1)] * 5)
    assert status == 200
    assert await balance(client, one) == Decimal(9)
    assert await balance(client, other) == Decimal(5)


async def test_envelope_errors_refuse_the_whole_request(client: Client) -> None:
    """A body that is not a bulk envelope is refused whole, and nothing is applied."""
    wallet = await new_wallet(client)
    cases: list[tuple[bytes, int, str]] = [
        (b"[1, 2]", 400, "INVALID_JSON"),
        (b"{", 400, "INVALID_JSON"),
        (b'{"items": []}', 422, "VALIDATION_ERROR"),
        (b'{"items": {}}', 422, "VALIDATION_ERROR"),
        (
            b'{"items": [{"wallet_id": "%s", "operation_type": "DEPOSIT", "amount": 1}],'
            b' "atomic": "yes"}' % wallet.encode(),
            422,
            "VALIDATION_ERROR",
        ),
    ]
    for raw, status, code in cases:
        response = await client.post(BULK, data=raw, headers={"Content-Type": "application/json"})
        assert response.status == status, raw
        assert response.content_type == "application/problem+json"
        assert (await response.json())["code"] == code
    response = await client.post(BULK, data=b"{}", headers={"Content-Type": "text/plain"})
    assert response.status == 415
    response = await client.post(
        BULK, json={"items": [op(wallet, "DEPOSIT", 1)]}, headers={"Idempotency-Key": "x" * 249}
    )
    assert response.status == 422
    assert await balance(client, wallet) == Decimal(0)


async def test_bounds_refuse_the_whole_request(
    make_app: AppFactory, aiohttp_client: Callable[..., Any]
) -> None:
    """Past the item maximum (413 TOO_MANY_ITEMS) or the body bound (413, also chunked),
    the request is refused whole and nothing is applied."""
    settings = HttpSettings(bulk_body_bytes_max=64 * 1024)
    client: Client = await aiohttp_client(make_app(settings, EngineLimits(bulk_items_max=10)))
    wallet = await new_wallet(client)
    status, body = await bulk(client, [op(wallet, "DEPOSIT", 1)] * 11)
    assert (status, body["code"]) == (413, "TOO_MANY_ITEMS")
    big = {"items": [op(wallet, "DEPOSIT", 1)], "pad": "x" * 70_000}
    response = await client.post(BULK, json=big)
    assert response.status == 413

    async def chunks() -> Any:
        yield b'{"items": ['
        for _ in range(2000):
            yield b'{"wallet_id": "%s", "operation_type": "DEPOSIT", "amount": 1},' % (
                wallet.encode()
            )
        yield b"]}"

    response = await client.post(BULK, data=chunks(), headers={"Content-Type": "application/json"})
    assert response.status == 413
    assert await balance(client, wallet) == Decimal(0)


async def _fill_mailbox(client: Client, wallet: str, blocker: asyncpg.Connection) -> list[Any]:
    """Hold the wallet's row lock, then queue two 30-item bulks: two batches wait on the lock,
    a third is prepared and waits for a slot, and the rest stays in the mailbox."""
    await blocker.execute("SELECT 1 FROM wallets WHERE id = $1 FOR UPDATE", uuid.UUID(wallet))
    tasks = [asyncio.create_task(bulk(client, [op(wallet, "DEPOSIT", 1)] * 30)) for _ in range(2)]
    engine = client.app[STATE_KEY].services.engine
    await until(lambda: sum(engine.mailbox_depths()) >= 10)
    return tasks


async def _all_applied(tasks: list[Any]) -> None:
    for task in tasks:
        status, body = await task
        assert status == 200
        assert all(result["status"] == 200 for result in body["results"])


async def test_a_bulk_that_finds_no_room_in_time_is_refused_whole(
    make_app: AppFactory, aiohttp_client: Callable[..., Any], database_url: str
) -> None:
    """With the shard busy past the admission wait, a bulk request whose items do not all
    fit its mailbox gets 503 OVERLOADED and none of its items is applied (never
    half-queued); so does one past the bound on waiting requests."""
    limits = EngineLimits(
        pipelines=1,
        mailbox_commands_max=40,
        batch_ops_max=20,
        commit_timeout_s=60,
        bulk_items_max=40,
        bulk_admission_wait_s=0.2,
        bulk_waiting_max=1,
    )
    client: Client = await aiohttp_client(make_app(HttpSettings(), limits))
    wallet = await new_wallet(client)
    blocker = await asyncpg.connect(database_url)
    try:
        async with blocker.transaction():
            tasks = await _fill_mailbox(client, wallet, blocker)
            status, body = await bulk(client, [op(wallet, "DEPOSIT", 100)] * 31)
            assert (status, body["code"]) == (503, "OVERLOADED")
            # One request waits (the bound is 1): a second one is refused at once.
            waiting = asyncio.create_task(bulk(client, [op(wallet, "DEPOSIT", 100)] * 31))
            engine = client.app[STATE_KEY].services.engine
            await until(lambda: engine.bulk_waiting > 0)
            status, body = await bulk(client, [op(wallet, "DEPOSIT", 100)] * 31)
            assert (status, body["code"]) == (503, "OVERLOADED")
            assert (await waiting)[0] == 503
            # Leaving the block rolls back and releases the row lock.
        await _all_applied(tasks)
    finally:
        await blocker.close()
    assert await balance(client, wallet) == Decimal(60)


async def test_a_bulk_waits_for_room_and_is_admitted_whole(
    make_app: AppFactory, aiohttp_client: Callable[..., Any], database_url: str
) -> None:
    """A bulk request that does not fit now waits for room, and is applied whole once the
    shard drains within the admission wait."""
    limits = EngineLimits(
        pipelines=1, mailbox_commands_max=40, batch_ops_max=20, commit_timeout_s=60,
        bulk_items_max=40, bulk_admission_wait_s=30,
    )  # fmt: skip
    client: Client = await aiohttp_client(make_app(HttpSettings(), limits))
    wallet = await new_wallet(client)
    blocker = await asyncpg.connect(database_url)
    try:
        async with blocker.transaction():
            tasks = await _fill_mailbox(client, wallet, blocker)
            waiting = asyncio.create_task(bulk(client, [op(wallet, "DEPOSIT", 100)] * 31))
            engine = client.app[STATE_KEY].services.engine
            await until(lambda: engine.bulk_waiting > 0)
            assert not waiting.done()
        await _all_applied([*tasks, waiting])
    finally:
        await blocker.close()
    assert await balance(client, wallet) == Decimal(60 + 3100)


def test_the_documented_bulk_defaults_are_the_settings_defaults() -> None:
    """The OpenAPI document states the default item bound that the settings apply, and the
    request key's bound that the handler applies."""
    document = build_openapi_document()
    items = document["components"]["schemas"]["BulkRequest"]["properties"]["items"]
    items_max = items["maxItems"]
    assert EngineLimits().bulk_ops_max == items_max
    atomic = document["components"]["schemas"]["BulkRequest"]["then"]["properties"]["items"]
    assert min(EngineLimits().batch_ops_max, EngineLimits().bulk_ops_max) == atomic["maxItems"]
    key = document["components"]["parameters"]["BulkIdempotencyKey"]["schema"]
    assert key["maxLength"] == REQUEST_KEY_LENGTH_MAX
    setting = next(s for s in SETTINGS if s.name == "bulk_items_max")
    assert f"0 = {items_max}" in setting.help
    assert len(derived_key("r" * REQUEST_KEY_LENGTH_MAX, KEY_INDEX_MAX)) == 255


@pytest.mark.slow
async def test_kill_9_during_bulk_load_loses_no_acknowledged_item(
    walletd_process: Callable[..., WalletdProcess], database_url: str
) -> None:
    """SIGKILL while bulk requests run: after a restart every item of every acknowledged
    request is stored once; retrying every request with its keys applies nothing twice."""
    first = await asyncio.to_thread(walletd_process, "--database-url", database_url)
    timeout = aiohttp.ClientTimeout(total=30)
    # Each request: its items (wallet, cents, own key or None) and its request key.
    requests: list[tuple[list[tuple[str, int, str | None]], str]] = []
    acked: dict[str, tuple[str, int]] = {}
    stop = asyncio.Event()

    def payload(items: list[tuple[str, int, str | None]]) -> dict[str, Any]:
        return {
            "items": [
                {"wallet_id": w, "operation_type": "DEPOSIT", "amount": cents / 100}
                | ({"idempotency_key": key} if key else {})
                for w, cents, key in items
            ]
        }

    async def worker(session: aiohttp.ClientSession, url: str, number: int) -> None:
        for n in range(10_000):
            if stop.is_set():
                return
            request_key = f"bulk-{number}-{n}"
            # Odd requests key every item themselves; even ones rely on the request key.
            items = [
                (wallets[(n + i) % len(wallets)], 1 + (n * 7 + i) % 500,
                 f"{request_key}-item-{i}" if n % 2 else None)
                for i in range(50)
            ]  # fmt: skip
            requests.append((items, request_key))
            try:
                async with session.post(
                    url + BULK, json=payload(items), headers={"Idempotency-Key": request_key}
                ) as response:
                    if response.status == 200:
                        results = (await response.json())["results"]
                        assert [r["status"] for r in results] == [200] * len(items)
                        for i, (wallet, cents, key) in enumerate(items):
                            acked[key or derived_key(request_key, i)] = (wallet, cents)
            except (TimeoutError, aiohttp.ClientError):
                await asyncio.sleep(0.01)  # the process is gone

    async with aiohttp.ClientSession(timeout=timeout) as session:
        wallets = [
            (await (await session.post(first.url + "/api/v1/wallets")).json())["id"]
            for _ in range(8)
        ]
        load = asyncio.gather(*(worker(session, first.url, n) for n in range(4)))
        deadline = asyncio.get_running_loop().time() + 60
        while len(acked) < 20 * 50:
            assert asyncio.get_running_loop().time() < deadline, len(acked)
            await asyncio.sleep(0.01)
        first.process.send_signal(signal.SIGKILL)
        await asyncio.to_thread(first.process.wait, 10)
        stop.set()
        await load
    await check_database(database_url, acked)

    second = await asyncio.to_thread(walletd_process, "--database-url", database_url)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for items, request_key in requests:
            async with session.post(
                second.url + BULK, json=payload(items), headers={"Idempotency-Key": request_key}
            ) as response:
                assert response.status == 200
                results = (await response.json())["results"]
                assert [r["status"] for r in results] == [200] * len(items)
    every_item = {
        key or derived_key(request_key, i): (wallet, cents)
        for items, request_key in requests
        for i, (wallet, cents, key) in enumerate(items)
    }
    await check_database(database_url, every_item)
    connection = await asyncpg.connect(database_url)
    try:
        assert await connection.fetchval("SELECT count(*) FROM wallet_operations") == len(
            every_item
        )
    finally:
        await connection.close()


_TEXTS = st.one_of(
    st.text(max_size=20),
    st.sampled_from(["DEPOSIT", "WITHDRAW", "0", "10", "10.5", "10.50", "10.505", "1e2", "-1"]),
    st.from_regex(r"[0-9]{1,14}(\.[0-9]{0,3})?", fullmatch=True),
)
_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**16), max_value=10**16),
    st.floats(allow_nan=True),
    _TEXTS,
    st.uuids().map(str),
    st.uuids().map(lambda u: str(u).upper()),
    st.uuids().map(lambda u: u.hex),
    st.lists(st.integers(), max_size=2),
)


_EDGE_AMOUNTS = st.sampled_from(
    [0, "0", "0.0", "0.00", "0.01", 1, "1", "1.", ".5", "00.10", 10**12, 10**12 + 1,
     "1000000000000.00", "1000000000000.01", "9999999999999", "1.234", True, 1.5, -3]
)  # fmt: skip


@st.composite
def _items(draw: st.DrawFn) -> dict[str, Any]:
    """Mostly valid items with one field changed at a time, so that the short path's edges
    (amount bounds, id spellings, key shapes) are reached, not only random junk."""
    item: dict[str, Any] = {
        "wallet_id": str(draw(st.uuids())),
        "operation_type": draw(st.sampled_from(["DEPOSIT", "WITHDRAW"])),
        "amount": draw(st.one_of(st.integers(1, 10**12), _EDGE_AMOUNTS)),
    }
    if draw(st.booleans()):
        item["idempotency_key"] = draw(st.one_of(st.text(max_size=3), st.just("k" * 256)))
    changes = draw(
        st.dictionaries(
            st.sampled_from(
                [
                    "wallet_id",
                    "operation_type",
                    "operationType",
                    "amount",
                    "idempotency_key",
                    "key_index",
                    "x",
                ]
            ),
            st.one_of(_VALUES, _EDGE_AMOUNTS),
            max_size=1,
        )
    )
    return item | changes


@settings(max_examples=1500, deadline=None)
@given(_items(), st.one_of(st.none(), st.just("req")))
def test_the_short_path_decides_items_exactly_as_the_full_check(
    item: dict[str, Any], request_key: str | None
) -> None:
    """For any item, the short path gives what the full check gives (same item or errors)."""
    assert _parse_item(3, item, request_key) == _checked_item(3, item, request_key)


async def test_lone_surrogates_and_slow_bodies_get_problems(
    make_app: AppFactory, aiohttp_client: Callable[..., Any]
) -> None:
    """A lone surrogate anywhere in a bulk body is 400 INVALID_JSON (never a 500), and a body
    that does not arrive within the read timeout is 408; nothing is applied."""
    client: Client = await aiohttp_client(make_app(HttpSettings(body_read_timeout_s=0.3)))
    wallet = await new_wallet(client)
    for raw in (
        b'{"items": [{"wallet_id": "%s", "operation_type": "DEPOSIT", "amount": 1.5,'
        b' "\\ud800": 1}]}' % wallet.encode(),
        b'{"items": [{"wallet_id": "%s", "operation_type": "DEPOSIT", "amount": 1,'
        b' "idempotency_key": "\\udfff"}]}' % wallet.encode(),
    ):
        response = await client.post(BULK, data=raw, headers={"Content-Type": "application/json"})
        assert response.status == 400, await response.text()
        assert (await response.json())["code"] == "INVALID_JSON"

    async def trickle() -> Any:
        yield b'{"items": ['
        await asyncio.sleep(2)
        yield b"]}"

    response = await client.post(BULK, data=trickle(), headers={"Content-Type": "application/json"})
    assert response.status == 408
    assert await balance(client, wallet) == Decimal(0)
