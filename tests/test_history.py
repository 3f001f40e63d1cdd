"""GET /api/v1/wallets/{id}/operations: order, keyset pages, bounds, and the index it uses."""

from __future__ import annotations

import base64
import itertools
import json
import re
import uuid
from decimal import Decimal
from typing import Any

import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st

from walletd.engine.model import OperationKind
from walletd.http.openapi import build_openapi_document
from walletd.http.problems import ValidationProblem
from walletd.http.routes_v1 import CURSOR_PATTERN, _decode_cursor, _encode_cursor
from walletd.persistence.operator import seed
from walletd.persistence.postgres_log import HISTORY_BEFORE_SQL, HISTORY_FIRST_SQL

Client = TestClient[web.Request, web.Application]


async def _wallet_with_history(client: Client, operations: int) -> str:
    response = await client.post("/api/v1/wallets")
    wallet_id: str = (await response.json())["id"]
    for n in range(1, operations + 1):
        kind = "WITHDRAW" if n % 4 == 0 else "DEPOSIT"
        response = await client.post(
            f"/api/v1/wallets/{wallet_id}/operation",
            json={"operation_type": kind, "amount": f"{n}.00"},
            headers={"Idempotency-Key": f"k{n}"} if n % 3 == 0 else {},
        )
        assert response.status == 200, await response.text()
    return wallet_id


async def _page(client: Client, wallet_id: str, **query: str) -> tuple[int, dict[str, Any]]:
    response = await client.get(f"/api/v1/wallets/{wallet_id}/operations", params=query)
    return response.status, await response.json(content_type=None)


async def test_pages_are_newest_first_without_gaps_or_duplicates(client: Client) -> None:
    """Walking the cursor with limit 7 yields seq 23..1 exactly once, newest first."""
    wallet_id = await _wallet_with_history(client, 23)
    seen: list[dict[str, Any]] = []
    cursor: str | None = None
    for _ in range(10):  # 4 pages expected; bounded loop
        query = {"limit": "7"} if cursor is None else {"limit": "7", "cursor": cursor}
        status, body = await _page(client, wallet_id, **query)
        assert status == 200
        assert len(body["items"]) <= 7
        seen.extend(body["items"])
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert [item["seq"] for item in seen] == list(range(23, 0, -1))
    assert len({item["id"] for item in seen}) == 23
    newest = seen[0]
    assert set(newest) == {
        "id", "seq", "operation_type", "amount", "balance_after", "held_after", "idempotency_key",
        "transfer_id", "hold_id", "reference", "created_at", "actor", "metadata", "refund_of",
        "reversal_of", "reversed_by",
    }  # fmt: skip
    assert newest["operation_type"] == "DEPOSIT"
    assert newest["amount"] == "23.00"
    assert seen[23 - 21]["idempotency_key"] == "k21"
    assert seen[23 - 20]["operation_type"] == "WITHDRAW"
    # balance_after chains: each item's balance follows from the older one.
    for newer, older in itertools.pairwise(seen):
        sign = -1 if newer["operation_type"] == "WITHDRAW" else 1
        moved = sign * Decimal(newer["amount"])
        assert Decimal(newer["balance_after"]) == Decimal(older["balance_after"]) + moved
    wallet = await (await client.get(f"/api/v1/wallets/{wallet_id}")).json()
    assert wallet["balance"] == newest["balance_after"]


async def test_an_exact_last_page_has_no_next_cursor(client: Client) -> None:
    """With exactly limit items left, the page ends the walk (next_cursor null)."""
    wallet_id = await _wallet_with_history(client, 4)
    status, body = await _page(client, wallet_id, limit="2")
    assert status == 200
    status, body = await _page(client, wallet_id, limit="2", cursor=body["next_cursor"])
    assert [item["seq"] for item in body["items"]] == [2, 1]
    assert body["next_cursor"] is None
    status, body = await _page(client, wallet_id)
    assert len(body["items"]) == 4  # default limit 50


async def test_a_wallet_without_operations_has_an_empty_history(client: Client) -> None:
    """A new wallet answers 200 with no items and no cursor."""
    response = await client.post("/api/v1/wallets")
    wallet_id = (await response.json())["id"]
    assert await _page(client, wallet_id) == (200, {"items": [], "next_cursor": None})


def _cursor(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


async def test_limit_and_cursor_are_validated(client: Client) -> None:
    """limit past 500 or below 1 and malformed cursors (anything CURSOR_PATTERN does not
    match, even when base64 would decode it) are 422; unknown wallets 404."""
    wallet_id = await _wallet_with_history(client, 1)
    assert (await _page(client, wallet_id, limit="500"))[0] == 200
    for limit in ("501", "0", "-1", "abc", "", "1e2"):
        status, body = await _page(client, wallet_id, limit=limit)
        assert (status, body["code"]) == (422, "VALIDATION_ERROR"), limit
        assert body["errors"][0]["field"] == "limit"
    bad_cursors = (
        "!!!", "abc", _cursor("x5"), _cursor("s0"), _cursor("s-1"), _cursor("s 5"),
        _cursor("s" + "9" * 19), _cursor("s" + "9" * 400), "c" * 500,
        "czF", _cursor("s1") + "=", " " + _cursor("s1"), _cursor("s1") + "\n",
        "",  # the pattern forbids an empty cursor: not the same as none
    )  # fmt: skip
    for cursor in bad_cursors:
        status, body = await _page(client, wallet_id, cursor=cursor)
        assert (status, body["code"]) == (422, "VALIDATION_ERROR"), cursor
        assert body["errors"][0]["field"] == "cursor"
    status, body = await _page(client, wallet_id, cursor=_cursor("s" + "9" * 18))
    assert status == 200  # the largest seq a cursor holds
    assert len(body["items"]) == 1
    status, body = await _page(client, str(uuid.uuid4()))
    assert (status, body["code"]) == (404, "WALLET_NOT_FOUND")
    status, body = await _page(client, "not-a-uuid")
    assert (status, body["code"]) == (400, "INVALID_WALLET_ID")


async def test_the_operation_type_filter_takes_every_kind_and_its_error_names_them(
    client: Client,
) -> None:
    """`operation_type` filters by any kind of history row (a HOLD row here, not only
    DEPOSIT / WITHDRAW), and a value that is none of them is 422 naming every kind."""
    wallet_id = await _wallet_with_history(client, 1)
    response = await client.post(f"/api/v1/wallets/{wallet_id}/holds", json={"amount": "0.50"})
    assert response.status == 201, await response.text()
    status, body = await _page(client, wallet_id, operation_type="HOLD")
    assert status == 200
    assert [item["operation_type"] for item in body["items"]] == ["HOLD"]
    status, body = await _page(client, wallet_id, operation_type="GIFT")
    assert (status, body["code"]) == (422, "VALIDATION_ERROR")
    assert body["errors"] == [
        {
            "field": "operation_type",
            "message": "must be one of " + ", ".join(kind.name for kind in OperationKind),
        }
    ]


_CURSOR_TEXT = re.compile(CURSOR_PATTERN.strip("^$"))


def test_the_documented_cursor_pattern_is_the_enforced_one() -> None:
    """The OpenAPI document states CURSOR_PATTERN for `cursor`, the constant the parser uses."""
    parameter = build_openapi_document()["components"]["parameters"]["Cursor"]
    assert parameter["schema"]["pattern"] == CURSOR_PATTERN


@settings(max_examples=300, deadline=None)
@given(st.from_regex(_CURSOR_TEXT, fullmatch=True))
def test_every_cursor_the_pattern_allows_is_accepted(cursor: str) -> None:
    """A text matching the documented pattern is a cursor the server would have written, so
    a client (or schemathesis) that follows the document never gets 422 for it."""
    assert _encode_cursor(_decode_cursor(cursor)) == cursor


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=1, max_value=10**18 - 1), st.text(max_size=30))
def test_every_cursor_the_server_writes_matches_the_pattern(seq: int, junk: str) -> None:
    """Each written cursor matches the pattern and reads back; other texts are 422 exactly
    when the pattern refuses them."""
    assert _matches_pattern(_encode_cursor(seq))
    assert _decode_cursor(_encode_cursor(seq)) == seq
    if _matches_pattern(junk):
        _decode_cursor(junk)
    else:
        with pytest.raises(ValidationProblem):
            _decode_cursor(junk)


def _matches_pattern(text: str) -> bool:
    return _CURSOR_TEXT.fullmatch(text) is not None


def _plan_nodes(plan: dict[str, Any]) -> list[tuple[str, str]]:
    nodes = [(plan["Node Type"], plan.get("Relation Name", ""))]
    for child in plan.get("Plans", []):
        nodes.extend(_plan_nodes(child))
    return nodes


async def test_history_queries_use_the_wallet_seq_index(database_url: str) -> None:
    """Both history queries are index scans on (wallet_id, seq), never a scan of the log."""
    await seed(database_url, 50, 10_000)  # 200 operations per wallet
    connection = await asyncpg.connect(database_url)
    try:
        wallet_id = await connection.fetchval("SELECT id FROM wallets LIMIT 1")
        for query, args in (
            (HISTORY_FIRST_SQL, (wallet_id, 51)),
            (HISTORY_BEFORE_SQL, (wallet_id, 150, 51)),
        ):
            raw = await connection.fetchval("EXPLAIN (FORMAT JSON) " + query, *args)
            nodes = _plan_nodes(json.loads(raw)[0]["Plan"])
            scans = [node for node in nodes if node[1] == "wallet_operations"]
            assert scans, nodes
            assert all(kind in {"Index Scan", "Index Scan Backward"} or "Index" in kind
                       for kind, _rel in scans), nodes  # fmt: skip
            assert ("Seq Scan", "wallet_operations") not in nodes
            assert "Sort" not in {kind for kind, _rel in nodes}  # order comes from the index
    finally:
        await connection.close()
