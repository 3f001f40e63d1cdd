"""Metadata over HTTP (docs/API.md, "Metadata"): every bound refused with 422 naming the
field, on every request that takes metadata; metadata returned by every read and in the
feed; fixed at creation and part of an idempotent request's identity."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from tests.conftest import AppFactory
from tests.test_transfers_api import new_wallet
from walletd.engine.bounds import (
    METADATA_KEY_LENGTH_MAX,
    METADATA_KEYS_MAX,
    METADATA_VALUE_LENGTH_MAX,
)

Client = TestClient[web.Request, web.Application]

META = {"order": "A-1", "note": 'é ✓ "quoted"'}
# The largest metadata the bounds allow: every one at its maximum.
AT_BOUNDS = {
    f"{n:0{METADATA_KEY_LENGTH_MAX}d}": "v" * METADATA_VALUE_LENGTH_MAX
    for n in range(METADATA_KEYS_MAX)
}
# Past one bound each, and the field the 422 must name.
PAST_BOUNDS: list[tuple[Any, str]] = [
    ({f"k{n}": "v" for n in range(METADATA_KEYS_MAX + 1)}, "metadata"),
    ({"k" * (METADATA_KEY_LENGTH_MAX + 1): "v"}, "metadata." + "k" * (METADATA_KEY_LENGTH_MAX + 1)),
    ({"k": "v" * (METADATA_VALUE_LENGTH_MAX + 1)}, "metadata.k"),
    ({"k": 1}, "metadata.k"),
    ({"k": None}, "metadata.k"),
    ({"k": {"nested": "no"}}, "metadata.k"),
    ({"": "v"}, "metadata."),
    ({"a[b]": "v"}, "metadata.a[b]"),
    ({"tab\there": "v"}, "metadata.tab\there"),
    ({"k": "nul\x00"}, "metadata.k"),
    (["k", "v"], "metadata"),
    ("k=v", "metadata"),
]


async def _post(client: Client, path: str, body: Any, key: str | None = None) -> Any:
    headers = {} if key is None else {"Idempotency-Key": key}
    response = await client.post(path, json=body, headers=headers)
    return response.status, await response.json(content_type=None)


async def _requests(client: Client) -> list[tuple[str, dict[str, Any]]]:
    """Every request that takes metadata, as (path, body without metadata)."""
    funded = await new_wallet(client, "100.00")
    other = await new_wallet(client)
    return [
        ("/api/v1/wallets", {}),
        (f"/api/v1/wallets/{funded}/operation", {"operation_type": "DEPOSIT", "amount": 1}),
        (
            "/api/v1/transfers",
            {"from_wallet_id": funded, "to_wallet_id": other, "amount": "1.00"},
        ),
        (f"/api/v1/wallets/{funded}/holds", {"amount": "1.00"}),
    ]


@pytest.mark.parametrize(("metadata", "field"), PAST_BOUNDS)
async def test_every_bound_is_refused_on_every_request(
    client: Client, metadata: Any, field: str
) -> None:
    """Past any bound (keys, key length, value length, value type, key characters, shape):
    422 VALIDATION_ERROR naming the field, nothing applied, on each request that takes
    metadata, and on a bulk item (named within the item)."""
    for path, body in await _requests(client):
        status, problem = await _post(client, path, {**body, "metadata": metadata})
        assert status == 422, (path, problem)
        assert problem["code"] == "VALIDATION_ERROR"
        assert field in [error["field"] for error in problem["errors"]], (path, problem)
    wallet = await new_wallet(client)
    item = {"wallet_id": wallet, "operation_type": "DEPOSIT", "amount": 1, "metadata": metadata}
    status, body = await _post(client, "/api/v1/operations/bulk", {"items": [item]})
    assert status == 200, body
    [result] = body["results"]
    assert result["status"] == 422, result
    assert f"items[0].{field}" in [error["field"] for error in result["body"]["errors"]]
    wallet_now = await (await client.get(f"/api/v1/wallets/{wallet}")).json()
    assert wallet_now["balance"] == "0.00"


async def test_metadata_at_its_bounds_is_stored_and_read_back(client: Client) -> None:
    """50 keys of 40 characters with values of 500: taken, and returned whole by the wallet,
    the operation's history item, the transfer and the hold."""
    status, wallet = await _post(client, "/api/v1/wallets", {"metadata": AT_BOUNDS})
    assert status == 201, wallet
    assert wallet["metadata"] == AT_BOUNDS
    wallet_id = wallet["id"]
    status, body = await _post(
        client,
        f"/api/v1/wallets/{wallet_id}/operation",
        {"operation_type": "DEPOSIT", "amount": 10, "metadata": AT_BOUNDS},
    )
    assert status == 200, body
    history = await (await client.get(f"/api/v1/wallets/{wallet_id}/operations")).json()
    assert history["items"][0]["metadata"] == AT_BOUNDS


async def test_metadata_in_every_read(client: Client) -> None:
    """The wallet's metadata in its creation, reads, as_of and operation replies; an
    operation's in its history item and in the feed; a transfer's and a hold's in their
    reads and on their rows; a wallet without metadata keeps the seed's shape."""
    status, wallet = await _post(client, "/api/v1/wallets", {"metadata": META})
    assert (status, wallet["metadata"]) == (201, META)
    wallet_id = wallet["id"]
    fetched = await (await client.get(f"/api/v1/wallets/{wallet_id}")).json()
    assert fetched == wallet
    status, after = await _post(
        client,
        f"/api/v1/wallets/{wallet_id}/operation",
        {"operation_type": "DEPOSIT", "amount": 50, "metadata": {"op": "1"}},
    )
    assert (status, after["metadata"]) == (200, META)  # the reply is the wallet
    as_of = await (
        await client.get(f"/api/v1/wallets/{wallet_id}", params={"as_of": after["updated_at"]})
    ).json()
    assert as_of["metadata"] == META
    plain = await new_wallet(client)
    status, transfer = await _post(
        client,
        "/api/v1/transfers",
        {"from_wallet_id": wallet_id, "to_wallet_id": plain, "amount": 5, "metadata": {"t": "1"}},
    )
    assert (status, transfer["metadata"]) == (201, {"t": "1"}), transfer
    read = await (await client.get(f"/api/v1/transfers/{transfer['id']}")).json()
    assert read["metadata"] == {"t": "1"}
    status, hold = await _post(
        client, f"/api/v1/wallets/{wallet_id}/holds", {"amount": 3, "metadata": {"h": "1"}}
    )
    assert (status, hold["metadata"]) == (201, {"h": "1"}), hold
    status, captured = await _post(client, f"/api/v1/holds/{hold['id']}/capture", {"amount": 1})
    assert (status, captured["metadata"]) == (200, {"h": "1"}), captured
    read = await (await client.get(f"/api/v1/holds/{hold['id']}")).json()
    assert read["metadata"] == {"h": "1"}
    history = await (await client.get(f"/api/v1/wallets/{wallet_id}/operations")).json()
    by_type = [(item["operation_type"], item["metadata"]) for item in history["items"]]
    assert by_type == [
        ("RELEASE", {"h": "1"}),
        ("CAPTURE", {"h": "1"}),
        ("HOLD", {"h": "1"}),
        ("TRANSFER_OUT", {"t": "1"}),
        ("DEPOSIT", {"op": "1"}),
    ]
    received = await (await client.get(f"/api/v1/wallets/{plain}/operations")).json()
    assert received["items"][0]["metadata"] == {"t": "1"}
    plain_wallet = await (await client.get(f"/api/v1/wallets/{plain}")).json()
    assert "metadata" not in plain_wallet  # the seed's shape


async def test_a_status_change_keeps_the_wallets_metadata(client: Client) -> None:
    """A PATCH of a wallet with metadata (status, overdraft limit): its answer, GET, an
    as_of read after it and a withdrawal into the overdraft all show the metadata, after
    status and overdraft_limit; each WALLET_UPDATE history item carries the wallet's
    metadata after it (unchanged here)."""
    status, wallet = await _post(client, "/api/v1/wallets", {"metadata": META})
    assert status == 201
    path = f"/api/v1/wallets/{wallet['id']}"
    response = await client.patch(path, json={"status": "FROZEN", "overdraft_limit": "5.00"})
    assert response.status == 200, await response.text()
    text = await response.text()
    assert text.index('"status"') < text.index('"overdraft_limit"') < text.index('"metadata"')
    patched = await response.json()
    assert (patched["status"], patched["overdraft_limit"], patched["metadata"]) == (
        "FROZEN", "5.00", META,
    )  # fmt: skip
    assert await (await client.get(path)).json() == patched
    response = await client.patch(path, json={"status": "ACTIVE"})
    assert response.status == 200
    status, after = await _post(
        client, f"{path}/operation", {"operation_type": "WITHDRAW", "amount": 2}
    )
    assert (status, after["balance"], after["metadata"]) == (200, "-2.00", META), after
    as_of = await (await client.get(path, params={"as_of": patched["updated_at"]})).json()
    assert (as_of["status"], as_of["metadata"]) == ("FROZEN", META)
    history = await (await client.get(f"{path}/operations")).json()
    updates = [i for i in history["items"] if i["operation_type"] == "WALLET_UPDATE"]
    assert [(i["status"], i["metadata"]) for i in updates] == [("ACTIVE", META), ("FROZEN", META)]


@pytest.mark.parametrize("kind", ["wallet", "operation", "transfer", "hold", "bulk"])
async def test_a_retry_with_other_metadata_is_a_reuse_of_the_key(client: Client, kind: str) -> None:
    """Metadata is part of the request: the same Idempotency-Key with the same metadata
    replays the original answer; with other (or no) metadata it is 422
    IDEMPOTENCY_KEY_REUSED, nothing applied."""
    funded = await new_wallet(client, "100.00")
    other = await new_wallet(client)
    requests: dict[str, tuple[str, dict[str, Any]]] = {
        "wallet": ("/api/v1/wallets", {}),
        "operation": (
            f"/api/v1/wallets/{funded}/operation",
            {"operation_type": "WITHDRAW", "amount": 1},
        ),
        "transfer": ("/api/v1/transfers", {"from_wallet_id": funded, "to_wallet_id": other,
                                           "amount": 1}),
        "hold": (f"/api/v1/wallets/{funded}/holds", {"amount": 1}),
        "bulk": ("/api/v1/operations/bulk", {"items": [
            {"wallet_id": funded, "operation_type": "WITHDRAW", "amount": 1,
             "idempotency_key": "item-key", "metadata": {"m": "1"}}]}),
    }  # fmt: skip
    path, body = requests[kind]
    key = f"key-{uuid.uuid4()}"
    first = {**body, "metadata": {"m": "1"}} if kind != "bulk" else body
    status, answer = await _post(client, path, first, key)
    assert status in (200, 201, 207), answer
    replay = await client.post(path, json=first, headers={"Idempotency-Key": key})
    assert replay.status == status
    if kind != "bulk":
        assert replay.headers.get("Idempotent-Replayed") == "true"
    for changed in ({"m": "2"}, {"m": "1", "n": "1"}, None):
        if kind == "bulk":
            item = {**body["items"][0], "metadata": changed}
            second: dict[str, Any] = {"items": [item]}
        else:
            second = {**body, "metadata": changed}
        status, problem = await _post(client, path, second, key)
        if kind == "bulk":  # the item's own answer
            assert status == 200, problem
            status, problem = problem["results"][0]["status"], problem["results"][0]["body"]
        assert (status, problem["code"]) == (422, "IDEMPOTENCY_KEY_REUSED"), problem
    balance = (await (await client.get(f"/api/v1/wallets/{funded}")).json())["balance"]
    assert balance == ("99.00" if kind in ("operation", "transfer", "bulk") else "100.00")


async def test_a_refused_operation_is_replayed_only_with_its_metadata(client: Client) -> None:
    """A keyed withdrawal refused for funds is recorded with its metadata: the retry with
    the same metadata gets the same 409, replayed; with other metadata, 422."""
    wallet = await new_wallet(client)
    path = f"/api/v1/wallets/{wallet}/operation"
    body = {"operation_type": "WITHDRAW", "amount": 5, "metadata": {"m": "1"}}
    status, problem = await _post(client, path, body, "refused")
    assert (status, problem["code"]) == (409, "INSUFFICIENT_FUNDS")
    response = await client.post(path, json=body, headers={"Idempotency-Key": "refused"})
    assert response.status == 409
    assert response.headers.get("Idempotent-Replayed") == "true"
    status, problem = await _post(client, path, {**body, "metadata": {"m": "2"}}, "refused")
    assert (status, problem["code"]) == (422, "IDEMPOTENCY_KEY_REUSED")


async def test_metadata_is_restored_after_a_restart(
    make_app: AppFactory, aiohttp_client: Callable[..., Any]
) -> None:
    """A second app on the same database reads every metadata back from PostgreSQL (the
    wallet, history, transfer, hold, a PENDING hold's rows written after the restart), and
    keyed retries compare against the stored metadata: same replays, other is 422."""
    first: Client = await aiohttp_client(make_app())
    status, wallet = await _post(first, "/api/v1/wallets", {"metadata": META}, "w-key")
    assert status == 201
    wallet_id = wallet["id"]
    deposit = {"operation_type": "DEPOSIT", "amount": 20, "metadata": {"op": "1"}}
    path = f"/api/v1/wallets/{wallet_id}/operation"
    assert (await _post(first, path, deposit, "op-key"))[0] == 200
    other = await new_wallet(first)
    move = {"from_wallet_id": wallet_id, "to_wallet_id": other, "amount": 1, "metadata": META}
    status, transfer = await _post(first, "/api/v1/transfers", move, "t-key")
    assert status == 201
    status, hold = await _post(
        first, f"/api/v1/wallets/{wallet_id}/holds", {"amount": 2, "metadata": {"h": "1"}}
    )
    assert status == 201
    await first.close()

    second: Client = await aiohttp_client(make_app())
    assert (await (await second.get(f"/api/v1/wallets/{wallet_id}")).json())["metadata"] == META
    assert (await _post(second, "/api/v1/wallets", {"metadata": META}, "w-key"))[0] == 201
    status, problem = await _post(second, "/api/v1/wallets", {"metadata": {"x": "y"}}, "w-key")
    assert (status, problem["code"]) == (422, "IDEMPOTENCY_KEY_REUSED")
    assert (await _post(second, path, deposit, "op-key"))[0] == 200
    status, problem = await _post(second, path, {**deposit, "metadata": None}, "op-key")
    assert (status, problem["code"]) == (422, "IDEMPOTENCY_KEY_REUSED")
    read = await (await second.get(f"/api/v1/transfers/{transfer['id']}")).json()
    assert read["metadata"] == META
    assert (await _post(second, "/api/v1/transfers", move, "t-key"))[0] == 201
    status, problem = await _post(second, "/api/v1/transfers", {**move, "metadata": {}}, "t-key")
    assert (status, problem["code"]) == (422, "IDEMPOTENCY_KEY_REUSED")
    status, voided = await _post(second, f"/api/v1/holds/{hold['id']}/void", {})
    assert (status, voided["metadata"]) == (200, {"h": "1"})
    history = await (await second.get(f"/api/v1/wallets/{wallet_id}/operations")).json()
    assert history["items"][0]["operation_type"] == "RELEASE"
    assert history["items"][0]["metadata"] == {"h": "1"}  # loaded with the PENDING hold
    balance = (await (await second.get(f"/api/v1/wallets/{wallet_id}")).json())["balance"]
    assert balance == "19.00"


async def test_metadata_in_the_feed(client: Client) -> None:
    """wallet.created carries the wallet's metadata, operation.applied its row's ({} when
    none), as the history does."""
    status, wallet = await _post(client, "/api/v1/wallets", {"metadata": META})
    assert status == 201
    path = f"/api/v1/wallets/{wallet['id']}/operation"
    await _post(client, path, {"operation_type": "DEPOSIT", "amount": 1, "metadata": {"o": "1"}})
    await _post(client, path, {"operation_type": "DEPOSIT", "amount": 1})
    events = (await (await client.get("/api/v1/events", params={"limit": "1000"})).json())["events"]
    mine = [e for e in events if e.get("wallet_id") == wallet["id"]]
    assert [(e["type"], e["metadata"]) for e in mine] == [
        ("wallet.created", META),
        ("operation.applied", {"o": "1"}),
        ("operation.applied", {}),
    ]
