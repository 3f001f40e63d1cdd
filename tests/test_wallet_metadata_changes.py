"""A wallet's metadata changed by PATCH /api/v1/wallets/{id} (docs/API.md, "Changing a
wallet"): real app, real socket, real PostgreSQL. A merge (null deletes a key) recorded as a
WALLET_UPDATE row carrying the metadata after it, in the history and the feed; as-of reads
see the metadata of their instant; the bounds after the merge; Idempotency-Key, If-Match,
a combined change as one row; a restart and `walletd verify` agree with the log."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import asyncpg
from aiohttp import web
from aiohttp.test_utils import TestClient

from tests.conftest import AppFactory
from tests.test_wallet_status_api import patch
from walletd.engine.bounds import METADATA_KEYS_MAX, METADATA_PATCH_KEYS_MAX
from walletd.http.keys import parse_keys
from walletd.http.settings import HttpSettings
from walletd.persistence.operator import restore, verify

Client = TestClient[web.Request, web.Application]

CREATED = {"order": "A-1", "tier": "gold"}


async def _create(client: Client, metadata: dict[str, str] | None = None) -> dict[str, Any]:
    response = await client.post("/api/v1/wallets", json={"metadata": metadata or CREATED})
    assert response.status == 201
    body: dict[str, Any] = await response.json()
    return body


async def _read(client: Client, wallet_id: str, **params: str) -> dict[str, Any]:
    response = await client.get(f"/api/v1/wallets/{wallet_id}", params=params)
    assert response.status == 200, await response.text()
    body: dict[str, Any] = await response.json()
    return body


async def test_a_merge_sets_and_deletes_keys_and_is_one_logged_change(
    make_app: AppFactory, aiohttp_client: Callable[..., Any], database_url: str
) -> None:
    """A merge sets and deletes keys (deleting an absent key is no change); each change is a
    WALLET_UPDATE history item and a wallet.updated event carrying the metadata after it,
    wallet.created keeping the creation's; as_of at each instant shows the metadata then
    (the creation's before the first change); a status change with a metadata change is one
    row; emptying leaves the seed's shape (no metadata field); a PATCH that changes nothing
    writes nothing. After a restart GET shows the same, verify finds nothing, restore
    repairs nothing."""
    client: Client = await aiohttp_client(make_app())
    wallet = await _create(client)
    wallet_id = wallet["id"]
    status, body, headers = await patch(
        client, wallet_id, {"metadata": {"tier": "platinum", "order": None, "ghost": None}}
    )
    assert (status, body["metadata"], headers["ETag"]) == (200, {"tier": "platinum"}, '"1"')
    first = await _read(client, wallet_id)
    assert first == body
    status, body, headers = await patch(
        client, wallet_id, {"status": "FROZEN", "metadata": {"note": "under review"}}
    )
    assert (status, body["status"], body["metadata"], headers["ETag"]) == (
        200, "FROZEN", {"tier": "platinum", "note": "under review"}, '"2"',
    )  # fmt: skip
    status, body, headers = await patch(client, wallet_id, {"metadata": {"note": "under review"}})
    assert (status, headers["ETag"]) == (200, '"2"')  # nothing to change: nothing written
    status, body, headers = await patch(
        client, wallet_id, {"metadata": {"tier": None, "note": None}}
    )
    assert (status, headers["ETag"]) == (200, '"3"')
    assert "metadata" not in body
    assert "metadata" not in await _read(client, wallet_id)

    history = await (await client.get(f"/api/v1/wallets/{wallet_id}/operations")).json()
    items = history["items"]
    assert [(i["seq"], i["operation_type"], i["status"], i["metadata"]) for i in items] == [
        (3, "WALLET_UPDATE", "FROZEN", {}),
        (2, "WALLET_UPDATE", "FROZEN", {"tier": "platinum", "note": "under review"}),
        (1, "WALLET_UPDATE", "ACTIVE", {"tier": "platinum"}),
    ]  # fmt: skip
    events = (await (await client.get("/api/v1/events", params={"limit": "1000"})).json())["events"]
    mine = [(e["type"], e["metadata"]) for e in events if e.get("wallet_id") == wallet_id]
    assert mine == [
        ("wallet.created", CREATED),
        ("wallet.updated", {"tier": "platinum"}),
        ("wallet.updated", {"tier": "platinum", "note": "under review"}),
        ("wallet.updated", {}),
    ]
    as_of_created = await _read(client, wallet_id, as_of=wallet["created_at"])
    assert as_of_created["metadata"] == CREATED
    as_of_first = await _read(client, wallet_id, as_of=first["updated_at"])
    assert "status" not in as_of_first  # ACTIVE then
    assert as_of_first["metadata"] == {"tier": "platinum"}
    final = await _read(client, wallet_id)
    await client.close()

    again: Client = await aiohttp_client(make_app())
    assert await _read(again, wallet_id) == final
    status, body, _ = await patch(again, wallet_id, {"metadata": {"back": "1"}})
    assert (status, body["metadata"]) == (200, {"back": "1"})
    report = await verify(database_url)
    assert report.mismatches == 0, report.first_mismatches
    assert (await restore(database_url)).repaired == 0


async def test_verify_and_restore_check_the_metadata_against_the_log(
    client: Client, database_url: str
) -> None:
    """A wallet row whose metadata differs from its last WALLET_UPDATE row's (or from its
    creation's, with no update) is a verify mismatch, and restore rebuilds it."""
    changed = (await _create(client))["id"]
    assert (await patch(client, changed, {"metadata": {"tier": "silver"}}))[0] == 200
    untouched = (await _create(client))["id"]
    connection = await asyncpg.connect(database_url)
    try:
        await connection.execute(
            'UPDATE wallets SET metadata = \'{"forged": "1"}\' WHERE id = ANY($1::uuid[])',
            [changed, untouched],
        )
    finally:
        await connection.close()
    report = await verify(database_url)
    assert sorted(str(m.wallet_id) for m in report.first_mismatches) == sorted(
        [changed, untouched]
    ), report.first_mismatches
    assert all("metadata" in m.problem for m in report.first_mismatches)


async def test_bounds_idempotency_and_if_match(client: Client) -> None:
    """Past the bounds after the merge (keys), or in the change itself (key, value, type,
    count, null, {} alone): 422 VALIDATION_ERROR naming the field, nothing written. The same
    change under its Idempotency-Key replays the first answer even after the wallet changed;
    other metadata under it is 422 IDEMPOTENCY_KEY_REUSED. A stale If-Match is 412."""
    full = {f"k{n:02d}": "v" for n in range(METADATA_KEYS_MAX)}
    wallet_id = (await _create(client, full))["id"]
    for change, field in (
        ({"metadata": {"one-more": "v"}}, "metadata"),
        ({"metadata": {"k" * 41: "v"}}, "metadata." + "k" * 41),
        ({"metadata": {"k": "v" * 501}}, "metadata.k"),
        ({"metadata": {"k": 1}}, "metadata.k"),
        ({"metadata": {"k": {"a": "b"}}}, "metadata.k"),
        ({"metadata": {"a[b]": "v"}}, "metadata.a[b]"),
        ({"metadata": {f"n{n}": None for n in range(METADATA_PATCH_KEYS_MAX + 1)}}, "metadata"),
        ({"metadata": None}, "metadata"),
        ({"metadata": ["k", "v"]}, "metadata"),
        ({"metadata": {}}, "metadata"),
        ({"status": "ACTIVE", "metadata": {}}, "metadata"),
    ):
        status, body, _ = await patch(client, wallet_id, change)
        assert (status, body["code"]) == (422, "VALIDATION_ERROR"), (change, body)
        assert [e["field"] for e in body["errors"]] == [field], (change, body)
    assert (await client.get(f"/api/v1/wallets/{wallet_id}")).headers["ETag"] == '"0"'
    # A replacement of every key in one change keeps within the bound.
    swap = {**{key: None for key in full}, **{f"j{n:02d}": "w" for n in range(METADATA_KEYS_MAX)}}
    status, body, headers = await patch(client, wallet_id, {"metadata": swap}, key="swap")
    assert (status, len(body["metadata"]), headers["ETag"]) == (200, METADATA_KEYS_MAX, '"1"')
    swapped = body
    assert (await patch(client, wallet_id, {"metadata": {"j00": None}}))[0] == 200
    status, body, headers = await patch(client, wallet_id, {"metadata": swap}, key="swap")
    assert (status, body, headers["Idempotent-Replayed"]) == (200, swapped, "true")
    status, body, _ = await patch(client, wallet_id, {"metadata": {"j00": "x"}}, key="swap")
    assert (status, body["code"]) == (422, "IDEMPOTENCY_KEY_REUSED")
    status, body, _ = await patch(client, wallet_id, {"metadata": {"a": "1"}}, if_match='"1"')
    assert (status, body["code"], body["seq"]) == (412, "PRECONDITION_FAILED", 2)
    status, body, headers = await patch(client, wallet_id, {"metadata": {"a": "1"}}, if_match='"2"')
    assert (status, body["metadata"]["a"], headers["ETag"]) == (200, "1", '"3"')


async def test_a_metadata_change_needs_the_admin_scope(
    make_app: AppFactory, aiohttp_client: Callable[..., Any]
) -> None:
    """A key with every scope but admin is 403 FORBIDDEN on a metadata PATCH, nothing
    written; an admin key changes the metadata, and the change names it (actor)."""
    keys = parse_keys("mover:read+create+move+feed:mover-secret,boss:admin:boss-secret")
    client: Client = await aiohttp_client(make_app(HttpSettings(api_keys=keys)))
    mover = {"Authorization": "Bearer mover-secret"}
    boss = {"Authorization": "Bearer boss-secret"}
    created = await client.post("/api/v1/wallets", json={"metadata": CREATED}, headers=mover)
    wallet_id = (await created.json())["id"]
    change = {"metadata": {"tier": "platinum"}}
    status, body, _ = await patch(client, wallet_id, change, headers=mover)
    assert (status, body["code"]) == (403, "FORBIDDEN")
    read = await client.get(f"/api/v1/wallets/{wallet_id}", headers=mover)
    assert (await read.json())["metadata"] == CREATED
    status, body, _ = await patch(client, wallet_id, change, headers=boss)
    assert (status, body["metadata"]) == (200, {**CREATED, "tier": "platinum"})
    history = await client.get(f"/api/v1/wallets/{wallet_id}/operations", headers=mover)
    assert [i["actor"] for i in (await history.json())["items"]] == ["boss"]


async def test_a_closed_wallets_metadata_never_changes(client: Client) -> None:
    """CLOSED is final: a metadata change is 409 WALLET_CLOSED."""
    wallet_id = (await _create(client))["id"]
    assert (await patch(client, wallet_id, {"status": "CLOSED"}))[0] == 200
    status, body, _ = await patch(client, wallet_id, {"metadata": {"late": "1"}})
    assert (status, body["code"]) == (409, "WALLET_CLOSED")
    assert (await _read(client, wallet_id))["metadata"] == CREATED
