"""Listings of wallets, transfers and holds: real app, real socket, real PostgreSQL. Pages
newest first through cursors, every filter, the refusals (422 problem+json), the scope, a
transfer answered 201 never listed PENDING, and the plans on tables of a million rows."""

from __future__ import annotations

import asyncio
import base64
import random
import re
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Final

import asyncpg
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from multidict import MultiDict

from tests.conftest import AppFactory
from tests.test_transfers_api import new_wallet, transfer
from walletd.client.api import WalletdClient
from walletd.client.errors import ValidationError
from walletd.engine.limits import EngineLimits
from walletd.engine.listings import FilterValue, Listing, ListingPosition
from walletd.http.keys import parse_keys
from walletd.http.listings import CURSOR_LENGTH, encode_cursor, parse_parameters
from walletd.http.openapi import build_openapi_document
from walletd.http.problems import ValidationProblem
from walletd.http.settings import HttpSettings
from walletd.persistence.listings import LISTINGS, listing_sql
from walletd.persistence.postgres_log import _PENDING_OUT

Client = TestClient[web.Request, web.Application]
AiohttpClient = Callable[..., Any]


async def page(client: Client, path: str, **query: Any) -> tuple[int, dict[str, Any]]:
    response = await client.get(path, params={k: str(v) for k, v in query.items()})
    body: dict[str, Any] = await response.json(content_type=None)
    if response.status != 200:
        assert response.content_type == "application/problem+json"
    return response.status, body


async def walk(client: Client, path: str, **query: Any) -> tuple[list[dict[str, Any]], int]:
    """Every item of a listing, following next_cursor; and how many pages it took."""
    items: list[dict[str, Any]] = []
    pages = 0
    cursor: str | None = None
    while True:
        extra: dict[str, str] = {} if cursor is None else {"cursor": cursor}
        status, body = await page(client, path, **query, **extra)
        assert status == 200, body
        pages += 1
        assert pages < 1000
        items += body["items"]
        cursor = body["next_cursor"]
        if cursor is None:
            return items, pages


def newest_first(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # Timestamps are all written with 6 fractional digits in UTC: text order is time order.
    return sorted(items, key=lambda item: (item["created_at"], item["id"]), reverse=True)


async def test_wallets_are_listed_newest_first_in_pages_as_get_shows_them(
    client: Client,
) -> None:
    """Seven wallets in pages of 3: 3, 3, 1, newest first by (created_at, id), each item
    exactly the body GET /api/v1/wallets/{id} answers; the last page's next_cursor is null."""
    for number in range(7):
        await new_wallet(client, f"{number + 1}.00")
    seen: list[dict[str, Any]] = []
    sizes = []
    cursor = None
    while True:
        extra: dict[str, str] = {} if cursor is None else {"cursor": cursor}
        status, body = await page(client, "/api/v1/wallets", limit=3, **extra)
        assert status == 200
        assert set(body) == {"items", "next_cursor"}
        sizes.append(len(body["items"]))
        seen += body["items"]
        cursor = body["next_cursor"]
        if cursor is None:
            break
        assert len(cursor) == CURSOR_LENGTH
    assert sizes == [3, 3, 1]
    assert seen == newest_first(seen)
    assert len({item["id"] for item in seen}) == 7
    for item in seen:
        response = await client.get(f"/api/v1/wallets/{item['id']}")
        assert item == await response.json()
    status, body = await page(client, "/api/v1/wallets")
    assert (status, len(body["items"]), body["next_cursor"]) == (200, 7, None)


async def test_the_created_range_selects_wallets_at_or_after_since_and_before_until(
    client: Client,
) -> None:
    """since <= created_at < until, as in the history: bounds at a wallet's own instant
    include it from `since` and exclude it from `until`."""
    for _ in range(5):
        await new_wallet(client)
    everything, _ = await walk(client, "/api/v1/wallets")
    oldest_first = list(reversed(everything))
    middle = oldest_first[2]["created_at"]
    later, _ = await walk(client, "/api/v1/wallets", since=middle, limit=1)
    assert later == [w for w in everything if w["created_at"] >= middle]
    earlier, _ = await walk(client, "/api/v1/wallets", until=middle, limit=2)
    assert earlier == [w for w in everything if w["created_at"] < middle]
    both, _ = await walk(client, "/api/v1/wallets", since=middle, until=middle)
    assert both == []


async def test_wallets_are_listed_by_status_currency_and_a_metadata_value(
    client: Client,
) -> None:
    """status, currency and metadata[key]=value each select exactly the wallets that match,
    alone and together (with the created range too), in pages of one; a metadata change
    moves a wallet into and out of its filter; a value of another key, a code no wallet has
    or an absent key list nothing. The client's wallets() takes the same filters."""
    made: list[tuple[str, str, str, dict[str, str]]] = []
    for number in range(8):
        currency = ("USD", "JPY")[number % 2]
        metadata = {"tier": ("gold", "silver")[number % 3 % 2]} if number % 4 else {}
        response = await client.post(
            "/api/v1/wallets", json={"currency": currency, "metadata": metadata}
        )
        assert response.status == 201
        wallet_id = (await response.json())["id"]
        status = "ACTIVE"
        if number in (1, 2, 5):
            status = "FROZEN" if number != 5 else "CLOSED"
            changed = await client.patch(f"/api/v1/wallets/{wallet_id}", json={"status": status})
            assert changed.status == 200
        made.append((wallet_id, status, currency, metadata))
    everything, _ = await walk(client, "/api/v1/wallets")

    def expected(
        status: str | None = None, currency: str | None = None, tier: str | None = None
    ) -> list[str]:
        chosen = {
            wallet_id
            for wallet_id, s, c, m in made
            if status in (None, s) and currency in (None, c) and tier in (None, m.get("tier"))
        }
        return [item["id"] for item in everything if item["id"] in chosen]

    for by_status in ("ACTIVE", "FROZEN", "CLOSED", None):
        for by_currency in ("USD", "JPY", "BHD", None):
            for tier in ("gold", "silver", "platinum", None):
                query: dict[str, Any] = {"limit": 1}
                if by_status is not None:
                    query["status"] = by_status
                if by_currency is not None:
                    query["currency"] = by_currency
                if tier is not None:
                    query["metadata[tier]"] = tier
                listed, _ = await walk(client, "/api/v1/wallets", **query)
                wanted = expected(by_status, by_currency, tier)
                assert [i["id"] for i in listed] == wanted, query
    assert (await walk(client, "/api/v1/wallets", **{"metadata[colour]": "gold"}))[0] == []
    oldest_first = list(reversed(everything))
    middle = oldest_first[4]["created_at"]
    listed, _ = await walk(client, "/api/v1/wallets", currency="JPY", since=middle)
    assert [i["id"] for i in listed] == [
        i["id"] for i in everything if i["currency"] == "JPY" and i["created_at"] >= middle
    ]
    plain = made[0][0]
    response = await client.patch(f"/api/v1/wallets/{plain}", json={"metadata": {"tier": "gold"}})
    assert response.status == 200
    listed, _ = await walk(client, "/api/v1/wallets", **{"metadata[tier]": "gold"})
    assert plain in [i["id"] for i in listed]
    url = str(client.make_url("")).rstrip("/")
    async with WalletdClient(url) as walletd:
        gold_usd = [w.id async for w in walletd.wallets(currency="USD", metadata=("tier", "gold"))]
        frozen = [w.id async for w in walletd.wallets(status="FROZEN", page_size=1)]
    assert gold_usd == [
        i["id"] for i in everything
        if i["currency"] == "USD" and (i.get("metadata") == {"tier": "gold"} or i["id"] == plain)
    ]  # fmt: skip
    assert frozen == expected("FROZEN")


async def _transfers_of_every_status(
    client: Client, database_url: str
) -> tuple[list[str], list[dict[str, Any]]]:
    """Four wallets, 12 COMPLETED transfers among them, 2 FAILED (receiver missing), and one
    PENDING one written as the debit's commit leaves it (no request leaves one behind; the
    app's re-drive interval is long enough that none finishes it meanwhile)."""
    wallets = [await new_wallet(client, "100.00") for _ in range(4)]
    made: list[dict[str, Any]] = []
    for number in range(12):
        sender, receiver = wallets[number % 4], wallets[(number * 3 + 1) % 4]
        if sender == receiver:
            receiver = wallets[(number + 2) % 4]
        status, body, _ = await transfer(
            client, from_wallet_id=sender, to_wallet_id=receiver, amount="1.00"
        )
        assert status == 201, body
        made.append(body)
    for _ in range(2):
        status, body, _ = await transfer(
            client, from_wallet_id=wallets[0], to_wallet_id=str(uuid.uuid4()), amount="2.00"
        )
        assert status == 404, body
        made.append(body["transfer"])
    pending_id = uuid.uuid4()
    connection = await asyncpg.connect(database_url)
    try:
        await connection.execute(
            "INSERT INTO transfers (id, from_wallet_id, to_wallet_id, amount, status,"
            " created_at, updated_at) VALUES ($1, $2, $3, 300, 1, now(), now())",
            pending_id, uuid.UUID(wallets[3]), uuid.UUID(wallets[2]),
        )  # fmt: skip
    finally:
        await connection.close()
    response = await client.get(f"/api/v1/transfers/{pending_id}")
    made.append(await response.json())
    return wallets, made


async def test_transfers_are_listed_by_wallet_on_either_side_status_and_range(
    make_app: AppFactory, aiohttp_client: AiohttpClient, database_url: str
) -> None:
    """Each filter alone and together: a wallet's transfers are those it sent or received,
    each status selects its own, and every item equals GET /api/v1/transfers/{id}."""
    limits = EngineLimits(pipelines=2, transfer_redrive_interval_s=3600)
    client: Client = await aiohttp_client(make_app(limits=limits))
    wallets, made = await _transfers_of_every_status(client, database_url)
    everything, _ = await walk(client, "/api/v1/transfers", limit=4)
    assert everything == newest_first(made)
    for wallet_id in wallets:
        listed, _ = await walk(client, "/api/v1/transfers", wallet_id=wallet_id, limit=3)
        assert listed == [
            t for t in everything if wallet_id in (t["from_wallet_id"], t["to_wallet_id"])
        ]
        for status in ("PENDING", "COMPLETED", "FAILED"):
            listed, _ = await walk(
                client, "/api/v1/transfers", wallet_id=wallet_id, status=status, limit=2
            )
            assert listed == [
                t for t in everything
                if wallet_id in (t["from_wallet_id"], t["to_wallet_id"]) and t["status"] == status
            ]  # fmt: skip
    for status, count in (("PENDING", 1), ("COMPLETED", 12), ("FAILED", 2)):
        listed, _ = await walk(client, "/api/v1/transfers", status=status, limit=5)
        assert listed == [t for t in everything if t["status"] == status]
        assert len(listed) == count
    since = everything[5]["created_at"]
    listed, _ = await walk(client, "/api/v1/transfers", since=since, wallet_id=wallets[0])
    assert listed == [
        t for t in everything
        if t["created_at"] >= since and wallets[0] in (t["from_wallet_id"], t["to_wallet_id"])
    ]  # fmt: skip
    for item in everything:
        response = await client.get(f"/api/v1/transfers/{item['id']}")
        assert item == await response.json()


async def test_holds_are_listed_by_wallet_status_and_expiry(client: Client) -> None:
    """Holds of two wallets, PENDING, VOIDED and CAPTURED, with different expiries: each
    filter and their combinations select exactly their own; `expires_before` (no index of
    its own) may give short pages, and the walk still finds every match once."""
    wallets = [await new_wallet(client, "1000.00") for _ in range(2)]
    made: list[dict[str, Any]] = []
    for number in range(16):
        response = await client.post(
            f"/api/v1/wallets/{wallets[number % 2]}/holds",
            json={"amount": "1.00", "expires_in_s": 600 + 60 * number},
        )
        assert response.status == 201
        made.append(await response.json())
    for hold in made[:4]:
        await client.post(f"/api/v1/holds/{hold['id']}/void")
    for hold in made[4:6]:
        await client.post(f"/api/v1/holds/{hold['id']}/capture", json={"amount": "0.50"})
    made = [await (await client.get(f"/api/v1/holds/{h['id']}")).json() for h in made]
    everything, _ = await walk(client, "/api/v1/holds", limit=5)
    assert everything == newest_first(made)
    assert {h["status"] for h in everything} == {"PENDING", "VOIDED", "CAPTURED"}
    cut = made[9]["expires_at"]
    cases: list[tuple[dict[str, str], Callable[[dict[str, Any]], bool]]] = [
        ({"wallet_id": wallets[1]}, lambda h: h["wallet_id"] == wallets[1]),
        ({"status": "VOIDED"}, lambda h: h["status"] == "VOIDED"),
        ({"status": "PENDING", "wallet_id": wallets[0]},
         lambda h: h["status"] == "PENDING" and h["wallet_id"] == wallets[0]),
        ({"expires_before": cut}, lambda h: h["expires_at"] < cut),
        ({"expires_before": cut, "status": "PENDING"},
         lambda h: h["expires_at"] < cut and h["status"] == "PENDING"),
    ]  # fmt: skip
    for query, wanted in cases:
        listed, pages = await walk(client, "/api/v1/holds", limit=1, **query)
        expected = [h for h in everything if wanted(h)]
        assert listed == expected, query
        assert pages >= len(expected)


async def test_a_listed_item_carries_the_status_limit_and_metadata_its_get_shows(
    client: Client,
) -> None:
    """Wallets with and without metadata, one FROZEN with an overdraft limit; a transfer
    and a hold with metadata, and the transfer a capture of that hold into a wallet opens
    (the hold's metadata): each listing's item equals its GET, fields included."""
    plain = await new_wallet(client, "10.00")
    response = await client.post("/api/v1/wallets", json={"metadata": {"tier": "gold"}})
    assert response.status == 201
    tagged = (await response.json())["id"]
    frozen = await new_wallet(client, "5.00")
    response = await client.patch(
        f"/api/v1/wallets/{frozen}", json={"status": "FROZEN", "overdraft_limit": "3.00"}
    )
    assert response.status == 200, await response.text()
    status, sent, _ = await transfer(
        client, from_wallet_id=plain, to_wallet_id=tagged, amount="2.00",
        metadata={"order": "A-17"},
    )  # fmt: skip
    assert status == 201, sent
    response = await client.post(
        f"/api/v1/wallets/{plain}/holds", json={"amount": "1.00", "metadata": {"cart": "9"}}
    )
    assert response.status == 201
    hold = await response.json()
    response = await client.post(
        f"/api/v1/holds/{hold['id']}/capture", json={"to_wallet_id": frozen}
    )
    assert response.status == 200, await response.text()
    hold = await response.json()

    wallets, _ = await walk(client, "/api/v1/wallets", limit=2)
    by_id = {w["id"]: w for w in wallets}
    assert set(by_id[plain]) == {
        "id", "balance", "available", "held", "currency", "created_at", "updated_at",
    }  # fmt: skip
    assert by_id[tagged]["metadata"] == {"tier": "gold"}
    assert (by_id[frozen]["status"], by_id[frozen]["overdraft_limit"]) == ("FROZEN", "3.00")
    transfers, _ = await walk(client, "/api/v1/transfers", wallet_id=plain)
    assert {t["id"]: t["metadata"] for t in transfers} == {
        sent["id"]: {"order": "A-17"}, hold["transfer_id"]: {"cart": "9"},
    }  # fmt: skip
    holds, _ = await walk(client, "/api/v1/holds", wallet_id=plain)
    assert [h["metadata"] for h in holds] == [{"cart": "9"}]
    for path, items in (("wallets", wallets), ("transfers", transfers), ("holds", holds)):
        for item in items:
            response = await client.get(f"/api/v1/{path}/{item['id']}")
            assert item == await response.json(), path


async def test_a_filter_no_index_serves_reads_a_bounded_number_of_rows_per_page(
    client: Client,
) -> None:
    """`expires_before` matching only the oldest of 20 holds: a page of 1 reads at most
    4 x 2 rows, so the walk is 3 pages (8, 8 and 4 rows read): two empty ones that carry a
    cursor, then the match with none."""
    wallet_id = await new_wallet(client, "100.00")
    made = []
    for number in range(20):  # the older, the sooner it expires
        response = await client.post(
            f"/api/v1/wallets/{wallet_id}/holds",
            json={"amount": "1.00", "expires_in_s": 1000 + number * 1000},
        )
        assert response.status == 201
        made.append(await response.json())
    sizes = []
    cursor = None
    while True:
        extra: dict[str, str] = {} if cursor is None else {"cursor": cursor}
        status, body = await page(
            client, "/api/v1/holds", limit=1, expires_before=made[1]["expires_at"], **extra
        )
        assert status == 200
        sizes.append(len(body["items"]))
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert sizes == [0, 0, 1]
    assert body["items"][0]["id"] == made[0]["id"]


CURSOR_FIELD_ERROR: Final = {
    "field": "cursor",
    "message": "is not a cursor this listing issued for these filters",
}


async def test_a_cursor_is_accepted_only_by_the_query_that_issued_it(client: Client) -> None:
    """A cursor altered in any character, truncated, from another listing, with other
    filters or another range, or not a cursor at all is 422 problem+json naming `cursor`;
    the same query with another limit takes it."""
    for _ in range(3):
        await new_wallet(client, "5.00")
    wallet_id = await new_wallet(client, "5.00")
    other = await new_wallet(client)
    for _ in range(3):
        status, body, _ = await transfer(
            client, from_wallet_id=wallet_id, to_wallet_id=other, amount="1.00"
        )
        assert status == 201
    status, body = await page(client, "/api/v1/wallets", limit=2)
    cursor = body["next_cursor"]
    assert cursor is not None
    status, body = await page(client, "/api/v1/wallets", limit=3, cursor=cursor)
    assert status == 200  # another limit: the same query
    raw = bytearray(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    raw[3] ^= 1  # one bit of the position
    flipped = base64.urlsafe_b64encode(bytes(raw)).decode().rstrip("=")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    changed_char = cursor[:10] + alphabet[(alphabet.index(cursor[10]) + 1) % 64] + cursor[11:]
    status, transfers_page = await page(client, "/api/v1/transfers", wallet_id=wallet_id, limit=1)
    transfer_cursor = transfers_page["next_cursor"]
    for path, query in (
        ("/api/v1/wallets", {"cursor": flipped}),
        ("/api/v1/wallets", {"cursor": changed_char}),
        ("/api/v1/wallets", {"cursor": cursor[:-1]}),
        ("/api/v1/wallets", {"cursor": cursor + "A"}),
        ("/api/v1/wallets", {"cursor": ""}),
        ("/api/v1/wallets", {"cursor": "not a cursor"}),
        ("/api/v1/wallets", {"cursor": "é" * CURSOR_LENGTH}),
        ("/api/v1/wallets", {"cursor": cursor, "since": "2020-01-01T00:00:00Z"}),
        ("/api/v1/holds", {"cursor": cursor}),
        ("/api/v1/transfers", {"cursor": cursor}),
        ("/api/v1/wallets", {"cursor": transfer_cursor}),
        ("/api/v1/transfers", {"cursor": transfer_cursor}),
        ("/api/v1/transfers", {"cursor": transfer_cursor, "wallet_id": other}),
        ("/api/v1/transfers", {"cursor": transfer_cursor, "wallet_id": wallet_id,
                               "status": "COMPLETED"}),
    ):  # fmt: skip
        status, body = await page(client, path, **query)
        assert (status, body["code"]) == (422, "VALIDATION_ERROR"), (path, query)
        assert body["errors"] == [CURSOR_FIELD_ERROR], (path, query)
    status, body = await page(
        client, "/api/v1/transfers", wallet_id=wallet_id, cursor=transfer_cursor
    )
    assert (status, len(body["items"])) == (200, 2)
    # The check is not secret: a made-up position with a right check value, but past any
    # instant storage can compare, is still a 422 (not a 503 from a timestamp overflow).
    for made_up in (-(2**63), 2**63 - 1):
        forged = encode_cursor(
            ListingPosition(made_up, uuid.uuid4()), b"wallets\nsince=None\nuntil=None"
        )
        status, body = await page(client, "/api/v1/wallets", cursor=forged)
        assert (status, body["errors"]) == (422, [CURSOR_FIELD_ERROR]), made_up
    forged = encode_cursor(ListingPosition(0, uuid.uuid4()), b"wallets\nsince=None\nuntil=None")
    status, body = await page(client, "/api/v1/wallets", cursor=forged)
    assert (status, body["items"]) == (200, [])  # a position in range: nothing before 1970


async def test_malformed_parameters_are_422_naming_each(client: Client) -> None:
    """limit out of 1..max, an unknown or repeated parameter, a status the listing does not
    have, a wallet id not canonical, an instant not RFC 3339: 422 VALIDATION_ERROR with the
    field named, never a 500."""
    cases: list[tuple[str, str, str]] = [
        ("/api/v1/wallets", "limit=0", "limit"),
        ("/api/v1/wallets", "limit=501", "limit"),
        ("/api/v1/wallets", "limit=%C2%B2", "limit"),
        ("/api/v1/wallets", "limit=1e3", "limit"),
        ("/api/v1/wallets", "status=OPEN", "status"),
        ("/api/v1/wallets", "currency=usd", "currency"),
        ("/api/v1/wallets", "currency=U", "currency"),
        ("/api/v1/wallets", "metadata[a]=1&metadata[b]=2", "metadata[b]"),
        ("/api/v1/wallets", "metadata[" + "k" * 41 + "]=1", "metadata[" + "k" * 41 + "]"),
        ("/api/v1/wallets", "metadata[k]=" + "v" * 501, "metadata[k]"),
        ("/api/v1/wallets", "metadata[tab%09key]=1", "metadata[tab\tkey]"),
        ("/api/v1/wallets", "metadata=1", "metadata"),
        ("/api/v1/wallets", "since=yesterday", "since"),
        ("/api/v1/wallets", "limit=1&limit=2", "limit"),
        ("/api/v1/transfers", "wallet_id=" + uuid.uuid4().hex, "wallet_id"),
        ("/api/v1/transfers", "status=CAPTURED", "status"),
        ("/api/v1/transfers", "status=pending", "status"),
        ("/api/v1/transfers", "expires_before=2030-01-01T00:00:00Z", "expires_before"),
        ("/api/v1/transfers", "until=2030-02-30T00:00:00Z", "until"),
        ("/api/v1/holds", "status=COMPLETED", "status"),
        ("/api/v1/holds", "expires_before=2030-01-01", "expires_before"),
        ("/api/v1/holds", "wallet_id=%7B" + str(uuid.uuid4()) + "%7D", "wallet_id"),
        ("/api/v1/holds", "wallet=" + str(uuid.uuid4()), "wallet"),
    ]
    for path, query, field in cases:
        response = await client.get(f"{path}?{query}")
        body = await response.json(content_type=None)
        assert (response.status, response.content_type) == (422, "application/problem+json")
        assert body["code"] == "VALIDATION_ERROR"
        assert [error["field"] for error in body["errors"]] == [field], (path, query)


async def test_limit_default_and_maximum_are_the_settings(
    make_app: AppFactory, aiohttp_client: AiohttpClient
) -> None:
    """WALLETD_LISTING_LIMIT_DEFAULT / _MAX: without a limit a page holds the default; the
    maximum is accepted and one more is 422."""
    client: Client = await aiohttp_client(
        make_app(HttpSettings(listing_limit_default=2, listing_limit_max=3))
    )
    for _ in range(4):
        await new_wallet(client)
    status, body = await page(client, "/api/v1/wallets")
    assert (status, len(body["items"])) == (200, 2)
    status, body = await page(client, "/api/v1/wallets", limit=3)
    assert (status, len(body["items"])) == (200, 3)
    status, body = await page(client, "/api/v1/wallets", limit=4)
    assert (status, body["errors"][0]["message"]) == (422, "must be an integer from 1 to 3")
    with pytest.raises(ValueError, match="listing_limit_default"):
        HttpSettings(listing_limit_default=4, listing_limit_max=3)
    with pytest.raises(ValueError, match="listing_limit_max"):
        HttpSettings(listing_limit_max=5001)


async def test_listings_need_the_read_scope(
    make_app: AppFactory, aiohttp_client: AiohttpClient
) -> None:
    """A key with `read` lists; a key with every other scope but `read` is 403 FORBIDDEN on
    each listing; no key is 401."""
    keys = parse_keys("reader:read:secret-reader,writer:create+move+feed:secret-writer")
    client: Client = await aiohttp_client(make_app(HttpSettings(api_keys=keys)))
    for path in ("/api/v1/wallets", "/api/v1/transfers", "/api/v1/holds"):
        response = await client.get(path, headers={"Authorization": "Bearer secret-reader"})
        assert response.status == 200
        response = await client.get(path, headers={"Authorization": "Bearer secret-writer"})
        assert response.status == 403
        assert (await response.json(content_type=None))["code"] == "FORBIDDEN"
        response = await client.get(path)
        assert response.status == 401


async def test_a_transfer_answered_201_is_never_listed_pending(
    client: Client, database_url: str
) -> None:
    """Transfers run concurrently between wallets of both pipelines (two commits each
    across them, one joint commit within one); right after each 201, the listing of PENDING
    transfers (all, and of its sender) never holds it, and its sender's listing shows it
    COMPLETED: the close is committed before the answer is sent."""
    wallets = [await new_wallet(client, "1000.00") for _ in range(8)]
    seen_pending: list[str] = []
    completed = 0

    async def sender(number: int) -> None:
        nonlocal completed
        rng = random.Random(number)
        for _ in range(12):
            source, target = rng.sample(wallets, 2)
            status, body, _ = await transfer(
                client, from_wallet_id=source, to_wallet_id=target, amount="1.00"
            )
            assert status == 201, body
            for query in ({"status": "PENDING"}, {"status": "PENDING", "wallet_id": source}):
                status, listed = await page(client, "/api/v1/transfers", limit=500, **query)
                assert status == 200
                seen_pending.extend(t["id"] for t in listed["items"] if t["id"] == body["id"])
            status, listed = await page(client, "/api/v1/transfers", wallet_id=source, limit=1)
            newest = listed["items"][0]
            if newest["id"] == body["id"]:
                assert newest["status"] == "COMPLETED"
                completed += 1

    await asyncio.gather(*(sender(number) for number in range(6)))
    assert seen_pending == []
    assert completed > 0
    everything, _ = await walk(client, "/api/v1/transfers", status="COMPLETED", limit=500)
    assert len(everything) == 72


# --- plans on a million rows --------------------------------------------------------------

# transfers, the listing with the most filters and the either-side merge, gets the million;
# the other two a fifth of it (a smaller table only makes a sequential scan more tempting).
ROWS: Final = {Listing.WALLETS: 200_000, Listing.TRANSFERS: 1_000_000, Listing.HOLDS: 200_000}
# Every listing's every combination of filters, with values that select a few rows, many
# rows, or none; each must be a bounded index scan, never a sequential one.
# Ids are sequential (cheap to make, and appended to the primary key's index in order:
# the fill takes seconds, not a minute); each listing's order is its created_at anyway.
_ID: Final = "('{0}0000000-0000-4000-8000-' || lpad(to_hex({1}), 12, '0'))::uuid"
FILLS: Final = {
    Listing.WALLETS: f"""
        INSERT INTO wallets (id, balance, seq, created_at, updated_at, create_fingerprint,
                             status, currency, exponent, metadata)
        SELECT {_ID.format("a", "n")}, 0, 0,
               timestamptz '2025-01-01' + n * interval '1 second',
               timestamptz '2025-01-01' + n * interval '1 second', '',
               CASE WHEN n % 1000 = 0 THEN 2 WHEN n % 100 = 0 THEN 3 ELSE 1 END,
               CASE WHEN n % 10 = 0 THEN 'JPY' ELSE 'USD' END,
               CASE WHEN n % 10 = 0 THEN 0 ELSE 2 END,
               CASE WHEN n % 50 = 0 THEN '{{"tier": "gold"}}'::jsonb END
          FROM generate_series(1, $1) AS n
    """,
    Listing.TRANSFERS: f"""
        INSERT INTO transfers (id, from_wallet_id, to_wallet_id, amount, status, failure_code,
                               created_at, updated_at)
        SELECT {_ID.format("b", "n")}, {_ID.format("a", "n % 5000")},
               {_ID.format("a", "(n * 7 + 1) % 5000 + 5000")}, 100,
               CASE WHEN n % 1000 = 0 THEN 1 WHEN n % 100 = 0 THEN 3 ELSE 2 END,
               CASE WHEN n % 100 = 0 AND n % 1000 <> 0 THEN 'WALLET_NOT_FOUND' END,
               timestamptz '2025-01-01' + n * interval '1 second',
               timestamptz '2025-01-01' + n * interval '1 second'
          FROM generate_series(1, $1) AS n
    """,
    Listing.HOLDS: f"""
        INSERT INTO holds (id, wallet_id, shard, amount, status, expires_at, captured,
                           create_fingerprint, created_at, updated_at)
        SELECT {_ID.format("c", "n")}, {_ID.format("a", "n % 5000")}, 0, 100,
               CASE WHEN n % 1000 = 0 THEN 1 ELSE 3 END,
               timestamptz '2025-01-01' + n * interval '1 second' + interval '1 day', 0, '',
               timestamptz '2025-01-01' + n * interval '1 second',
               timestamptz '2025-01-01' + n * interval '1 second'
          FROM generate_series(1, $1) AS n
    """,
}
_WALLET_3: Final = uuid.UUID("a0000000-0000-4000-8000-000000000003")
VALUES: Final[dict[str, list[object]]] = {
    "wallet_id": [_WALLET_3, uuid.uuid4()],
    "status": [1, 2, 3],
    # 2025-01-01 + 10 days (+1 day expiry): 864,000 holds expire before it, the first
    # 864,000 created; a page from the newest end finds none of them in its scan.
    "expires_before": [1_735_689_600_000_000 + 10 * 86_400_000_000],
    # Wallets: most are USD (a tenth JPY), none EUR; one in 50 has the tier.
    "currency": ["USD", "JPY", "EUR"],
    "metadata": ['{"tier": "gold"}', '{"tier": "none"}'],
    # No transfer is a refund here: the plan must still drive from transfers_refunds.
    "refund_of": [_WALLET_3, uuid.uuid4()],
}
PAGE_LIMIT: Final = 50
SCAN_MAX: Final = (PAGE_LIMIT + 1) * 4


def _combinations(listing: Listing) -> list[tuple[str, ...]]:
    names = sorted(LISTINGS[listing].filters)
    return [
        tuple(name for bit, name in enumerate(names) if mask >> bit & 1)
        for mask in range(1 << len(names))
    ]


def _plan_nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    nodes = [plan]
    for child in plan.get("Plans", []):
        nodes += _plan_nodes(child)
    return nodes


@pytest.mark.slow
async def test_every_filtered_page_is_a_bounded_index_scan_on_a_million_rows(
    database_url: str,
) -> None:
    """A million transfers, and 200,000 wallets and holds (generate_series, in this test's
    own database); every combination of each listing's filters, with and without a
    created range and a cursor, planned both ways PostgreSQL may plan a prepared statement
    (custom and generic): no node is a sequential scan, and the rows the scans read stay
    within the page's bound (limit + 1 per driving scan, 4 x that with a filter no index
    serves), measured with EXPLAIN ANALYZE."""
    connection = await asyncpg.connect(database_url)
    started = time.monotonic()
    try:
        for listing, fill in FILLS.items():
            await _fill(connection, listing.value, fill, ROWS[listing])
        filled_s = time.monotonic() - started
        checked = 0
        for listing in Listing:
            for names in _combinations(listing):
                sql = listing_sql(listing, names)
                await connection.execute(f"PREPARE page AS {sql}")
                try:
                    for mode in ("force_custom_plan", "force_generic_plan"):
                        await connection.execute(f"SET plan_cache_mode = {mode}")
                        for args in _argument_sets(listing, names):
                            await _check_plan(connection, listing, names, args)
                            checked += 1
                finally:
                    await connection.execute("DEALLOCATE page")
        planned_s = time.monotonic() - started - filled_s
        print(f"filled in {filled_s:.1f} s; {checked} plans in {planned_s:.1f} s")
        await _check_pending_out_plan(connection)
    finally:
        await connection.close()


async def _check_pending_out_plan(connection: asyncpg.Connection) -> None:
    """Loading wallets reads their PENDING transfers out (the room their refunds keep under
    the balance ceiling): through the partial index of PENDING rows by sender, in both plan
    modes, never through every transfer each sender ever made (here ~200 per sender)."""
    senders = [
        row["from_wallet_id"]
        for row in await connection.fetch(
            "SELECT DISTINCT from_wallet_id FROM transfers ORDER BY 1 LIMIT 64"
        )
    ]
    await connection.execute(f"PREPARE pending_out AS {_PENDING_OUT.format('$1::uuid[]')}")
    try:
        for mode in ("force_custom_plan", "force_generic_plan"):
            await connection.execute(f"SET plan_cache_mode = {mode}")
            plan = "\n".join(
                row[0]
                for row in await connection.fetch(
                    "EXPLAIN (ANALYZE, COSTS OFF) EXECUTE pending_out("
                    f"ARRAY[{', '.join(repr(str(sender)) for sender in senders)}]::uuid[])"
                )
            )
            assert "transfers_pending_by_sender" in plan, (mode, plan)
            assert "Seq Scan" not in plan, (mode, plan)
    finally:
        await connection.execute("DEALLOCATE pending_out")


async def _fill(connection: asyncpg.Connection, table: str, fill: str, rows: int) -> None:
    """The rows, then the table's indexes as the migrations define them (each non-unique
    one dropped before the load and created again after it: a sorted build, several times
    faster than a million insertions into each); no WAL (a throwaway database)."""
    indexes = await connection.fetch(
        "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = $1"
        " AND indexdef NOT LIKE 'CREATE UNIQUE %'",
        table,
    )
    await connection.execute(f"ALTER TABLE {table} SET UNLOGGED")
    for index in indexes:
        await connection.execute(f"DROP INDEX {index['indexname']}")
    await connection.execute(fill, rows)
    for index in indexes:
        await connection.execute(index["indexdef"])
    await connection.execute(f"ANALYZE {table}")


def _argument_sets(listing: Listing, names: tuple[str, ...]) -> list[list[object]]:
    """Parameters $1-$5 (no range and no cursor; a range and a cursor in the middle of the
    table), then each filter's first and last sample value."""
    second = 1_000_000
    base = 1_735_689_600 * second  # 2025-01-01
    bounds: list[list[object]] = [
        [-(2**57), 2**62, 2**62, uuid.UUID(int=2**128 - 1)],
        [base + 100_000 * second, base + 900_000 * second, base + 500_000 * second,
         uuid.UUID(int=0)],
    ]  # fmt: skip
    sets = []
    for bound in bounds:
        for pick in (0, -1):
            scan = PAGE_LIMIT + 1 if _all_indexed(listing, names) else SCAN_MAX
            sets.append([*bound, scan, *(VALUES[name][pick] for name in names)])
    return sets


def _all_indexed(listing: Listing, names: tuple[str, ...]) -> bool:
    filters = LISTINGS[listing].filters
    driver = next((n for n, f in filters.items() if f.indexed and n in names), None)
    return all(name == driver for name in names)


async def _check_plan(
    connection: asyncpg.Connection, listing: Listing, names: tuple[str, ...], args: list[object]
) -> None:
    literals = ", ".join(
        f"'{arg}'" if isinstance(arg, uuid.UUID | str) else str(arg) for arg in args
    )
    text = await connection.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE page({literals})")
    plan = orjson.loads(text)[0]["Plan"]
    nodes = _plan_nodes(plan)
    kinds = [node["Node Type"] for node in nodes]
    where = (listing.value, names, args[4:])
    assert "Seq Scan" not in kinds, (where, kinds)
    table_indexes = {
        row["indexname"]
        for row in await connection.fetch(
            "SELECT indexname FROM pg_indexes WHERE tablename = $1", listing.value
        )
    }
    read_max = args[4]
    assert isinstance(read_max, int)
    for node in nodes:
        if node.get("Parent Relationship") == "SubPlan":
            # A transfer's or a hold's metadata (persistence/listings.py _row_metadata): one
            # probe of the log's unique key per row the page reads, never a scan; its
            # wallet's currency (_CURRENCY_OF): one probe of the wallets' primary key; a
            # posting's payment: one probe of payment_postings' primary key. A transfer's
            # refunded amount is a sum (an Aggregate) over its refunds, read from the
            # partial index transfers_refunds: that scan is checked below like the page's.
            if node["Node Type"] != "Aggregate":
                assert node.get("Index Name") in (
                    "wallet_operations_idempotency_key",
                    "wallets_pkey",
                    "payment_postings_pkey",
                ), (where, node)
            assert node["Actual Rows"] <= 1, (where, node)
            assert node["Actual Loops"] <= read_max, (where, node)
            continue
        if node["Node Type"] in ("Index Scan", "Index Only Scan", "Bitmap Index Scan"):
            assert node["Index Name"] in table_indexes, (where, node["Index Name"])
        if node["Node Type"] in ("Index Scan", "Index Only Scan"):
            # An ordered scan from the cursor: the page's bound.
            assert node["Actual Rows"] <= read_max, (where, node["Actual Rows"], kinds)
        if node["Node Type"] == "Bitmap Heap Scan":
            # Chosen only when the planner expects few rows to match (one wallet's
            # transfers in a range here: about 160), read whole and then sorted.
            assert node["Actual Rows"] <= 4 * read_max, (where, node["Actual Rows"], kinds)
    assert any("Index" in kind for kind in kinds), (where, kinds)


async def test_the_client_lists_and_follows_cursors_with_every_filter(
    client: Client, database_url: str
) -> None:
    """WalletdClient.wallets/transfers/holds iterate every item the HTTP walk finds, in order,
    as typed records with exact Decimals; *_page gives one page and its cursor; a cursor
    used with other filters raises ValidationError."""
    wallets = [await new_wallet(client, "50.00") for _ in range(3)]
    for number in range(5):
        status, body, _ = await transfer(
            client, from_wallet_id=wallets[number % 3], to_wallet_id=wallets[(number + 1) % 3],
            amount="1.25",
        )  # fmt: skip
        assert status == 201, body
    for number in range(4):
        response = await client.post(
            f"/api/v1/wallets/{wallets[0]}/holds",
            json={"amount": "2.50", "expires_in_s": 600 + 100 * number},
        )
        assert response.status == 201
    url = str(client.make_url("")).rstrip("/")
    async with WalletdClient(url) as walletd:
        listed_wallets = [w async for w in walletd.wallets(page_size=2)]
        http_wallets, _ = await walk(client, "/api/v1/wallets")
        assert [w.id for w in listed_wallets] == [w["id"] for w in http_wallets]
        assert {w.balance for w in listed_wallets} == {Decimal(w["balance"]) for w in http_wallets}
        mine = [t async for t in walletd.transfers(wallet_id=wallets[1], page_size=1)]
        http_mine, _ = await walk(client, "/api/v1/transfers", wallet_id=wallets[1])
        assert [t.id for t in mine] == [t["id"] for t in http_mine]
        assert all(t.amount == Decimal("1.25") and t.status == "COMPLETED" for t in mine)
        completed = [t async for t in walletd.transfers(status="COMPLETED", page_size=2)]
        assert len(completed) == 5
        soon = datetime.now(UTC) + timedelta(seconds=650)  # after the first hold's expiry only
        holds = [
            h async for h in walletd.holds(
                wallet_id=wallets[0], status="PENDING", expires_before=soon, page_size=1
            )
        ]  # fmt: skip
        http_holds, _ = await walk(
            client, "/api/v1/holds", wallet_id=wallets[0], expires_before=soon.isoformat()
        )
        assert [h.id for h in holds] == [h["id"] for h in http_holds]
        assert len(holds) == 1
        page = await walletd.wallets_page(limit=1)
        assert len(page.items) == 1
        assert page.next_cursor is not None
        with pytest.raises(ValidationError):
            await walletd.wallets_page(limit=1, cursor=page.next_cursor, since=soon)
        with pytest.raises(ValidationError):
            await walletd.holds_page(cursor=page.next_cursor)
        since = listed_wallets[1].created_at
        assert [w.id async for w in walletd.wallets(since=since)] == [
            w.id for w in listed_wallets if w.created_at >= since
        ]


def test_the_documented_cursor_form_and_limits_are_the_enforced_ones() -> None:
    """The OpenAPI document states the cursor's length and alphabet (what a generator may
    send; which ones were issued it cannot state), and the default limit and maximum."""
    document = build_openapi_document()
    schema = document["components"]["schemas"]["ListingCursor"]
    assert schema["minLength"] == schema["maxLength"] == CURSOR_LENGTH
    issued = encode_cursor(ListingPosition(-(2**63), uuid.UUID(int=2**128 - 1)), b"")
    assert re.fullmatch(schema["pattern"].strip("^$"), issued)
    limit = document["components"]["parameters"]["ListingLimit"]["schema"]
    settings = HttpSettings()
    assert (limit["default"], limit["maximum"]) == (
        settings.listing_limit_default,
        settings.listing_limit_max,
    )
    for page_schema in ("WalletsPage", "TransfersPage", "HoldsPage"):
        items = document["components"]["schemas"][page_schema]["properties"]["items"]
        assert items["maxItems"] == settings.listing_limit_max


def test_a_keyed_filter_takes_one_parameter_of_its_family() -> None:
    """The machinery of the wallets' `metadata[key]=value` filter: a filter declared
    `name[]` takes `name[<key>]` once, its parser seeing the whole parameter; a second key
    of the family, a repeat, or an unknown parameter is 422 naming it; paging parameters
    come back as text, filters sorted."""

    def metadata(field: str, text: str) -> FilterValue:
        return orjson.dumps({field[len("metadata[") : -1]: text}).decode()

    parsers = {"metadata[]": metadata, "status": lambda field, text: len(text)}
    paging, filters = parse_parameters(
        MultiDict([("status", "ACTIVE"), ("limit", "3"), ("metadata[tier]", "gold")]), parsers
    )
    assert paging == {"limit": "3"}
    assert filters == (("metadata", '{"tier":"gold"}'), ("status", 6))
    for pairs, field, message in (
        ([("metadata[a]", "1"), ("metadata[b]", "2")], "metadata[b]",
         "one metadata[...] filter at most"),
        ([("metadata[a]", "1"), ("metadata[a]", "2")], "metadata[a]", "may be given once"),
        ([("metadata", "1")], "metadata", "is not a parameter of this listing"),
        ([("metadata[]", "1")], "metadata[]", "is not a parameter of this listing"),
        ([("colour[a]", "1")], "colour[a]", "is not a parameter of this listing"),
    ):  # fmt: skip
        with pytest.raises(ValidationProblem) as refused:
            parse_parameters(MultiDict(pairs), parsers)
        assert refused.value.extra == {"errors": [{"field": field, "message": message}]}
