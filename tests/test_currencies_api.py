"""Issue 22 item 1 over HTTP: a currency per wallet, its minor unit, and CURRENCY_MISMATCH.

The seed's request still makes the seed's wallet (USD, two decimals, "1000.00"); a wallet
created in another currency renders every amount with exactly its decimals, refuses an
amount with more (422 naming the field), and money never moves between currencies.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from tests.conftest import AppFactory
from walletd.engine.limits import EngineLimits
from walletd.http.currencies import Currencies, parse_assets
from walletd.http.settings import HttpSettings

Client = TestClient[web.Request, web.Application]
ASSETS = "POINTS:0,TOKEN:18"


@pytest.fixture
async def client(make_app: AppFactory, aiohttp_client: Callable[..., Any]) -> Client:
    """One shard actor (atomic groups fit) and two declared assets."""
    settings = HttpSettings(currencies=Currencies(parse_assets(ASSETS)))
    app = make_app(settings, EngineLimits(pipelines=1))
    test_client: Client = await aiohttp_client(app)
    return test_client


async def call(
    client: Client, method: str, path: str, body: Any = None, **headers: str
) -> tuple[int, dict[str, Any]]:
    response = await client.request(method, path, json=body, headers=headers)
    return response.status, await response.json(content_type=None)


async def new_wallet(client: Client, currency: str | None = None) -> str:
    status, body = await call(
        client, "POST", "/api/v1/wallets", None if currency is None else {"currency": currency}
    )
    assert status == 201, body
    assert body["currency"] == (currency or "USD")
    wallet_id: str = body["id"]
    return wallet_id


async def move(client: Client, wallet_id: str, kind: str, amount: Any) -> tuple[int, Any]:
    return await call(
        client, "POST", f"/api/v1/wallets/{wallet_id}/operation",
        {"operation_type": kind, "amount": amount},
    )  # fmt: skip


async def test_the_seed_request_makes_the_seed_wallet(client: Client) -> None:
    """The seed's own requests, byte for byte: no currency sent, the default (USD) made,
    and "1000.00" rendered as the seed shows it."""
    status, created = await call(client, "POST", "/api/v1/wallets")
    assert status == 201
    assert set(created) == {
        "id", "balance", "available", "held", "currency", "created_at", "updated_at",
    }  # fmt: skip
    assert (created["balance"], created["currency"]) == ("0.00", "USD")
    status, body = await move(client, created["id"], "DEPOSIT", 1000)
    assert (status, body["balance"]) == (200, "1000.00")
    status, body = await call(client, "GET", f"/api/v1/wallets/{created['id']}")
    assert (status, body["balance"], body["available"]) == (200, "1000.00", "1000.00")


async def test_money_renders_in_each_currency_decimals(client: Client) -> None:
    """JPY has 0 decimals, BHD 3, a declared TOKEN 18 and POINTS 0 (ISO 4217 from the
    iso4217 package, assets from the setting): every read renders exactly those."""
    expected = {
        "JPY": ("1000", "1000"),
        "BHD": ("1.005", "1.005"),
        "TOKEN": ("0.000000000000000001", "0.000000000000000001"),
        "POINTS": (7, "7"),
        "USD": ("0.1", "0.10"),
    }
    for code, (amount, shown) in expected.items():
        wallet_id = await new_wallet(client, code)
        status, body = await move(client, wallet_id, "DEPOSIT", amount)
        assert (status, body["balance"], body["currency"]) == (200, shown, code), body
        status, page = await call(client, "GET", f"/api/v1/wallets/{wallet_id}/operations")
        assert page["items"][0]["amount"] == shown
        assert page["items"][0]["balance_after"] == shown


async def test_more_decimals_than_the_currency_has_is_422_naming_the_field(
    client: Client,
) -> None:
    """An amount is exact in the wallet's exponent: one more decimal is refused (the
    wallet's shard decides it, nothing recorded), trailing zeros are not decimals."""
    jpy, bhd, token = [await new_wallet(client, c) for c in ("JPY", "BHD", "TOKEN")]
    for wallet_id, amount, digits in ((jpy, "10.5", 0), (bhd, "1.0005", 3), (jpy, 0.5, 0)):
        status, body = await move(client, wallet_id, "DEPOSIT", amount)
        assert (status, body["code"]) == (422, "VALIDATION_ERROR"), body
        assert body["errors"][0]["field"] == "amount"
        assert f"at most {digits} fractional digits" in body["errors"][0]["message"]
    status, body = await move(client, jpy, "DEPOSIT", "10.000")
    assert (status, body["balance"]) == (200, "10")
    # Past the most minor units an amount may have: 10^14 units fit JPY, not USD (found by
    # schemathesis: it was the generic "a field is past what storage holds").
    status, body = await move(client, jpy, "DEPOSIT", "100000000000000")
    assert (status, body["balance"]) == (200, "100000000000010")
    usd = await new_wallet(client)
    status, body = await move(client, usd, "WITHDRAW", "000000100000000000000.0000000000")
    assert (status, body["errors"]) == (422, [
        {"field": "amount", "message": "must be at most 1000000000000.00 (USD)"}
    ]), body  # fmt: skip
    # On a wallet that does not exist no currency decides: 404, not a 422 (schemathesis).
    status, body = await call(client, "POST", f"/api/v1/wallets/{uuid.uuid4()}/holds",
                              {"amount": 100000000000000.0})  # fmt: skip
    assert (status, body["code"]) == (404, "WALLET_NOT_FOUND"), body
    # An 18-decimal token's amount is at most 10^14 minor units: 0.0001 of it.
    status, body = await move(client, token, "DEPOSIT", "0.0001")
    assert (status, body["balance"]) == (200, "0.000100000000000000")
    status, body = await move(client, token, "DEPOSIT", "0.0002")
    assert (status, body["errors"][0]["field"]) == (422, "amount"), body
    assert "at most 0.000100000000000000 (TOKEN)" in body["errors"][0]["message"]
    status, page = await call(client, "GET", f"/api/v1/wallets/{bhd}/operations")
    assert page["items"] == []  # the refusals recorded nothing


async def test_a_currency_must_be_iso_4217_or_declared(client: Client) -> None:
    """XAU (no minor unit), an unknown code, a number: 422 naming ``currency``."""
    for currency in ("XAU", "ABC", 840, "usd", None):
        status, body = await call(client, "POST", "/api/v1/wallets", {"currency": currency})
        assert (status, body["errors"][0]["field"]) == (422, "currency"), body


async def test_a_creation_key_replays_only_the_same_currency(client: Client) -> None:
    """The currency is part of a creation request: the same key with another is 422."""
    status, first = await call(client, "POST", "/api/v1/wallets", {"currency": "JPY"},
                               **{"Idempotency-Key": "c1"})  # fmt: skip
    assert status == 201
    status, again = await call(client, "POST", "/api/v1/wallets", {"currency": "JPY"},
                               **{"Idempotency-Key": "c1"})  # fmt: skip
    assert (status, again["id"], again["currency"]) == (201, first["id"], "JPY")
    status, other = await call(client, "POST", "/api/v1/wallets", {"currency": "EUR"},
                               **{"Idempotency-Key": "c1"})  # fmt: skip
    assert (status, other["code"]) == (422, "IDEMPOTENCY_KEY_REUSED")


async def test_a_transfer_across_currencies_moves_nothing(client: Client) -> None:
    """USD -> JPY is 422 CURRENCY_MISMATCH: no transfer stored (never PENDING), no leg in
    either history; JPY -> JPY moves, rendered in yen, its amount exact in yen."""
    usd, jpy, jpy2 = await new_wallet(client), *(
        [await new_wallet(client, "JPY") for _ in range(2)]
    )  # fmt: skip
    await move(client, usd, "DEPOSIT", 100)
    await move(client, jpy, "DEPOSIT", 1000)
    for sender, receiver in ((usd, jpy), (jpy, usd)):
        transfer_id = str(uuid.uuid4())
        status, body = await call(client, "POST", "/api/v1/transfers", {
            "id": transfer_id, "from_wallet_id": sender, "to_wallet_id": receiver,
            "amount": "1",
        })  # fmt: skip
        assert (status, body["code"]) == (422, "CURRENCY_MISMATCH"), body
        status, _body = await call(client, "GET", f"/api/v1/transfers/{transfer_id}")
        assert status == 404  # never stored, so never PENDING
    for wallet_id, balance in ((usd, "100.00"), (jpy, "1000")):
        status, body = await call(client, "GET", f"/api/v1/wallets/{wallet_id}")
        assert body["balance"] == balance
        status, page = await call(client, "GET", f"/api/v1/wallets/{wallet_id}/operations")
        assert [item["operation_type"] for item in page["items"]] == ["DEPOSIT"]
    status, body = await call(client, "POST", "/api/v1/transfers", {
        "from_wallet_id": jpy, "to_wallet_id": jpy2, "amount": "1.5"})  # fmt: skip
    assert (status, body["errors"][0]["field"]) == (422, "amount"), body
    status, body = await call(client, "POST", "/api/v1/transfers", {
        "from_wallet_id": jpy, "to_wallet_id": jpy2, "amount": 150})  # fmt: skip
    assert (status, body["amount"], body["currency"]) == (201, "150", "JPY"), body
    status, body = await call(client, "GET", f"/api/v1/transfers/{body['id']}")
    assert (body["status"], body["amount"], body["currency"]) == ("COMPLETED", "150", "JPY")


async def test_a_capture_into_another_currency_captures_nothing(client: Client) -> None:
    """A hold of a USD wallet captured into a JPY wallet: 422 CURRENCY_MISMATCH, the hold
    stays PENDING, nothing moved; captured into a USD wallet it moves."""
    usd, other_usd, jpy = (
        await new_wallet(client),
        await new_wallet(client),
        await new_wallet(client, "JPY"),
    )
    await move(client, usd, "DEPOSIT", 10)
    status, hold = await call(client, "POST", f"/api/v1/wallets/{usd}/holds", {"amount": "2.5"})
    assert (status, hold["amount"], hold["currency"]) == (201, "2.50", "USD"), hold
    path = f"/api/v1/holds/{hold['id']}"
    status, body = await call(client, "POST", path + "/capture", {"to_wallet_id": jpy})
    assert (status, body["code"]) == (422, "CURRENCY_MISMATCH"), body
    status, body = await call(client, "GET", path)
    assert body["status"] == "PENDING"
    status, body = await call(client, "POST", path + "/capture", {"to_wallet_id": other_usd})
    assert (status, body["status"], body["transfer"]["currency"]) == (200, "CAPTURED", "USD")


async def test_an_atomic_group_across_currencies_is_refused_whole(client: Client) -> None:
    """All or nothing cannot span two currencies: 422 CURRENCY_MISMATCH, nothing applied;
    a non-atomic request may, each result in its wallet's currency."""
    usd, jpy = await new_wallet(client), await new_wallet(client, "JPY")
    items = [
        {"wallet_id": usd, "operation_type": "DEPOSIT", "amount": 5},
        {"wallet_id": jpy, "operation_type": "DEPOSIT", "amount": 5},
    ]
    status, body = await call(client, "POST", "/api/v1/operations/bulk",
                              {"items": items, "atomic": True})  # fmt: skip
    assert (status, body["code"], body["index"]) == (422, "CURRENCY_MISMATCH", 1), body
    status, body = await call(client, "POST", "/api/v1/operations/bulk", {"items": items})
    assert status == 200, body
    shown = [(r["body"]["balance"], r["body"]["currency"]) for r in body["results"]]
    assert shown == [("5.00", "USD"), ("5", "JPY")]


async def test_the_feed_and_as_of_carry_the_currency(client: Client) -> None:
    """A wallet's events name its currency and render its money in its decimals; a read
    as of an instant does too."""
    jpy = await new_wallet(client, "JPY")
    status, body = await move(client, jpy, "DEPOSIT", 1500)
    mine: list[dict[str, Any]] = []
    for _ in range(50):  # the feed shows a commit once every older transaction has ended
        status, page = await call(client, "GET", "/api/v1/events?limit=1000")
        assert status == 200
        mine = [e for e in page["events"] if e.get("wallet_id") == jpy]
        if len(mine) == 2:
            break
        await asyncio.sleep(0.1)
    assert [e["type"] for e in mine] == ["wallet.created", "operation.applied"]
    assert all(e["currency"] == "JPY" and "exponent" not in e for e in mine)
    assert (mine[1]["amount"], mine[1]["balance_after"]) == ("1500", "1500")
    status, body = await call(client, "GET", f"/api/v1/wallets/{jpy}",
                              None)  # fmt: skip
    status, past = await call(client, "GET", f"/api/v1/wallets/{jpy}?as_of={body['updated_at']}")
    assert (status, past["balance"], past["currency"]) == (200, "1500", "JPY"), past


async def test_an_overdraft_limit_is_in_the_wallets_currency(client: Client) -> None:
    """Currency meets status: a JPY wallet's overdraft limit has 0 decimals (one more is
    422 naming overdraft_limit, nothing changed), its balance renders negative in yen, the
    refusal and history render in yen, and its listing item, history item and wallet.updated
    event agree with its GET; an 18-decimal token takes a limit of one minor unit."""
    jpy = await new_wallet(client, "JPY")
    path = f"/api/v1/wallets/{jpy}"
    status, body = await call(client, "PATCH", path, {"overdraft_limit": "0.5"})
    assert (status, body["errors"]) == (422, [
        {"field": "overdraft_limit", "message": "must have at most 0 fractional digits (JPY)"}
    ]), body  # fmt: skip
    status, body = await call(client, "PATCH", path, {"overdraft_limit": "500"})
    assert (status, body["overdraft_limit"], body["available"]) == (200, "500", "500"), body
    status, body = await move(client, jpy, "WITHDRAW", 300)
    assert (status, body["balance"], body["available"]) == (200, "-300", "200"), body
    status, body = await move(client, jpy, "WITHDRAW", 201)
    assert (status, body["code"]) == (409, "INSUFFICIENT_FUNDS"), body
    assert "has 200 available" in body["detail"]
    status, body = await call(client, "PATCH", path, {"overdraft_limit": 299})
    assert (status, body["code"]) == (409, "OVERDRAFT_LIMIT_IN_USE"), body
    assert "owes 300 beyond" in body["detail"]
    status, wallet = await call(client, "GET", path)
    assert (status, wallet["balance"], wallet["overdraft_limit"]) == (200, "-300", "500")
    status, page = await call(client, "GET", "/api/v1/wallets?limit=500")
    assert [w for w in page["items"] if w["id"] == jpy] == [wallet]
    status, history = await call(client, "GET", f"{path}/operations")
    update = history["items"][-1]
    assert (update["operation_type"], update["overdraft_limit"], update["amount"]) == (
        "WALLET_UPDATE", "500", "0",
    )  # fmt: skip
    token = await new_wallet(client, "TOKEN")
    status, body = await call(
        client, "PATCH", f"/api/v1/wallets/{token}", {"overdraft_limit": "0.000000000000000001"}
    )
    assert (status, body["overdraft_limit"]) == (200, "0.000000000000000001"), body
    updated: list[dict[str, Any]] = []
    for _ in range(50):  # the feed shows a commit once every older transaction has ended
        status, page = await call(client, "GET", "/api/v1/events?limit=1000")
        updated = [e for e in page["events"]
                   if e.get("wallet_id") == jpy and e["type"] == "wallet.updated"]  # fmt: skip
        if updated:
            break
        await asyncio.sleep(0.1)
    assert [(e["currency"], e["overdraft_limit"]) for e in updated] == [("JPY", "500")]
