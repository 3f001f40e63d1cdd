"""Real success responses of every route, checked against the OpenAPI document.

(Every error row is checked against the document in test_contract_errors.py.)
"""

from __future__ import annotations

from typing import Any, Final

from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient

from tests.openapi_validation import assert_response_matches, schema_errors
from walletd.http.openapi import DOCS_ASSETS, build_openapi_document

Client = TestClient[web.Request, web.Application]

DOCUMENT: Final = build_openapi_document()


async def _matches(response: ClientResponse, method: str, template: str) -> Any:
    """Assert the response is documented for the route; return its decoded body."""
    raw = await response.read()
    content_type = response.headers["Content-Type"]
    if content_type.startswith(("application/json", "application/problem+json")):
        body: Any = await response.json(content_type=None)
    else:
        body = raw.decode("utf-8", "replace")
    assert_response_matches(
        DOCUMENT,
        method,
        template,
        response.status,
        content_type,
        body,
        headers=dict(response.headers),
    )
    return body


async def test_wallet_routes_match_the_document(module_client: Client) -> None:
    """Create (fresh and replayed), read, deposit, withdraw and two history pages conform."""
    client = module_client
    created = await client.post("/api/v1/wallets", headers={"Idempotency-Key": "create-doc"})
    assert created.status == 201
    wallet = await _matches(created, "POST", "/api/v1/wallets")
    replayed = await client.post("/api/v1/wallets", headers={"Idempotency-Key": "create-doc"})
    assert (replayed.status, replayed.headers["Idempotent-Replayed"]) == (201, "true")
    await _matches(replayed, "POST", "/api/v1/wallets")

    wallet_path = f"/api/v1/wallets/{wallet['id']}"
    read = await client.get(wallet_path)
    assert read.status == 200
    await _matches(read, "GET", "/api/v1/wallets/{wallet_id}")

    for kind, amount, key in (
        ("DEPOSIT", 100, "d-1"),
        ("WITHDRAW", "0.5", None),
        ("DEPOSIT", 100, "d-1"),
    ):
        headers = {"Idempotency-Key": key} if key else {}
        response = await client.post(
            wallet_path + "/operation",
            json={"operation_type": kind, "amount": amount},
            headers=headers,
        )
        assert response.status == 200
        await _matches(response, "POST", "/api/v1/wallets/{wallet_id}/operation")

    first = await client.get(wallet_path + "/operations", params={"limit": "1"})
    page = await _matches(first, "GET", "/api/v1/wallets/{wallet_id}/operations")
    assert len(page["items"]) == 1
    assert page["items"][0]["idempotency_key"] is None
    assert page["next_cursor"] is not None
    second = await client.get(
        wallet_path + "/operations", params={"limit": "5", "cursor": page["next_cursor"]}
    )
    last = await _matches(second, "GET", "/api/v1/wallets/{wallet_id}/operations")
    assert [item["seq"] for item in last["items"]] == [1]
    assert last["next_cursor"] is None


async def test_service_and_docs_routes_match_the_document(module_client: Client) -> None:
    """Health, readiness, metrics, the document, the docs page and its assets conform."""
    for path in ("/healthz", "/readyz", "/metrics", "/api/openapi.json", "/api/docs"):
        response = await module_client.get(path)
        assert response.status == 200, path
        await _matches(response, "GET", path)
    for asset in DOCS_ASSETS:
        response = await module_client.get(f"/api/docs/static/{asset}")
        assert response.status == 200, asset
        assert response.headers.get("X-Request-Id")
        assert_response_matches(
            DOCUMENT,
            "GET",
            "/api/docs/static/{asset}",
            200,
            response.headers["Content-Type"],
            "",  # the body schema is any string; the bytes themselves are tested elsewhere
            headers=dict(response.headers),
        )


async def test_bulk_responses_match_the_document(module_client: Client) -> None:
    """A bulk answer with applied, refused and invalid items, and its refusals, conform."""
    client = module_client
    created = await client.post("/api/v1/wallets")
    wallet_id = (await created.json())["id"]
    items = [
        {"wallet_id": wallet_id, "operation_type": "DEPOSIT", "amount": "1.00"},
        {"wallet_id": wallet_id, "operation_type": "WITHDRAW", "amount": "5.00"},
        {"wallet_id": wallet_id, "operation_type": "DEPOSIT", "amount": "0.001"},
    ]
    answer = await client.post("/api/v1/operations/bulk", json={"items": items})
    assert answer.status == 200
    body = await _matches(answer, "POST", "/api/v1/operations/bulk")
    assert [result["status"] for result in body["results"]] == [200, 409, 422]
    too_many = await client.post("/api/v1/operations/bulk", json={"items": [items[0]] * 1001})
    assert too_many.status == 413
    await _matches(too_many, "POST", "/api/v1/operations/bulk")
    other = (await (await client.post("/api/v1/wallets")).json())["id"]
    for atomic_items, status in (
        (items[:2], 409),
        ([{**items[0], "wallet_id": "00000000-0000-4000-8000-000000000000"}], 404),
        ([items[0], {**items[0], "wallet_id": other}], None),  # 422 unless on one actor
    ):
        refused = await client.post(
            "/api/v1/operations/bulk", json={"items": atomic_items, "atomic": True}
        )
        assert status is None or refused.status == status
        await _matches(refused, "POST", "/api/v1/operations/bulk")


async def test_transfer_routes_match_the_document(module_client: Client) -> None:
    """A transfer (fresh and replayed), its read, its history legs, and its refusals by
    side (404 to with the FAILED transfer, 409 from) conform."""
    client = module_client
    ids = []
    for _ in range(2):
        created = await client.post("/api/v1/wallets")
        ids.append((await created.json())["id"])
    sender, receiver = ids
    deposit = {"operation_type": "DEPOSIT", "amount": "10.00"}
    assert (await client.post(f"/api/v1/wallets/{sender}/operation", json=deposit)).status == 200
    body = {"from_wallet_id": sender, "to_wallet_id": receiver, "amount": "4.00", "reference": "r"}
    for _attempt in range(2):
        response = await client.post(
            "/api/v1/transfers", json=body, headers={"Idempotency-Key": "doc-transfer"}
        )
        assert response.status == 201
        transfer = await _matches(response, "POST", "/api/v1/transfers")
    response = await client.get(f"/api/v1/transfers/{transfer['id']}")
    assert response.status == 200
    await _matches(response, "GET", "/api/v1/transfers/{transfer_id}")
    response = await client.get(f"/api/v1/wallets/{receiver}/operations")
    page = await _matches(response, "GET", "/api/v1/wallets/{wallet_id}/operations")
    assert page["items"][0]["transfer_id"] == transfer["id"]
    missing = {**body, "to_wallet_id": "00000000-0000-4000-8000-000000000001"}
    response = await client.post("/api/v1/transfers", json=missing)
    assert response.status == 404
    problem = await _matches(response, "POST", "/api/v1/transfers")
    assert (problem["side"], problem["transfer"]["status"]) == ("to", "FAILED")
    response = await client.post("/api/v1/transfers", json={**body, "amount": "100.00"})
    assert response.status == 409
    assert (await _matches(response, "POST", "/api/v1/transfers"))["side"] == "from"


async def test_refund_and_reversal_routes_match_the_document(module_client: Client) -> None:
    """A refund (fresh and replayed) and its refusals, the original read with its refunded
    amount, the refund's legs in the history, a reversal (and replay) and its refusals, and
    the linked history rows all conform."""
    client = module_client
    ids = []
    for _ in range(2):
        created = await client.post("/api/v1/wallets")
        ids.append((await created.json())["id"])
    sender, receiver = ids
    deposit = {"operation_type": "DEPOSIT", "amount": "10.00"}
    assert (await client.post(f"/api/v1/wallets/{sender}/operation", json=deposit)).status == 200
    body = {"from_wallet_id": sender, "to_wallet_id": receiver, "amount": "4.00"}
    response = await client.post("/api/v1/transfers", json=body)
    original = (await response.json())["id"]
    refunds = f"/api/v1/transfers/{original}/refunds"
    template = "/api/v1/transfers/{transfer_id}/refunds"
    for _attempt in range(2):
        response = await client.post(
            refunds, json={"amount": "1.00", "reason": "r", "metadata": {"a": "b"}},
            headers={"Idempotency-Key": "doc-refund"},
        )  # fmt: skip
        assert response.status == 201
        refund = await _matches(response, "POST", template)
    assert refund["refund_of"] == original
    for refused_body, status in (({"amount": "9.00"}, 409), ({"amount": "x"}, 422)):
        response = await client.post(refunds, json=refused_body, headers={"Idempotency-Key": "d"})
        assert response.status == status
        await _matches(response, "POST", template)
    response = await client.post(refunds, json={})
    assert response.status == 422  # no key
    await _matches(response, "POST", template)
    response = await client.get(f"/api/v1/transfers/{original}")
    assert (await _matches(response, "GET", "/api/v1/transfers/{transfer_id}"))[
        "refunded_amount"
    ] == "1.00"
    reversal = "/api/v1/wallets/{wallet_id}/operations/{seq}/reversal"
    for _attempt in range(2):
        response = await client.post(
            f"/api/v1/wallets/{receiver}/operations/1/reversal", json={"reason": "x"},
            headers={"Idempotency-Key": "doc-reversal"},
        )  # fmt: skip
        assert response.status == 409  # the receiver's row 1 is a TRANSFER_IN
        await _matches(response, "POST", reversal)
    response = await client.post(
        f"/api/v1/wallets/{sender}/operations/1/reversal", headers={"Idempotency-Key": "doc-r"}
    )
    assert response.status == 409  # it holds 7.00 of the 10.00 deposited: refused
    await _matches(response, "POST", reversal)
    await client.post(f"/api/v1/wallets/{sender}/operation", json=deposit)
    for _attempt in range(2):
        response = await client.post(
            f"/api/v1/wallets/{sender}/operations/1/reversal", headers={"Idempotency-Key": "ok"}
        )
        assert response.status == 200
        await _matches(response, "POST", reversal)
    response = await client.post(
        f"/api/v1/wallets/{sender}/operations/99/reversal", headers={"Idempotency-Key": "ok"}
    )
    assert response.status == 404
    await _matches(response, "POST", reversal)
    response = await client.get(f"/api/v1/wallets/{sender}/operations")
    page = await _matches(response, "GET", "/api/v1/wallets/{wallet_id}/operations")
    assert page["items"][0]["reversal_of"] == 1
    assert page["items"][-1]["reversed_by"] == page["items"][0]["seq"]
    assert page["items"][1]["refund_of"] is None  # the deposit
    assert page["items"][2]["refund_of"] == original  # the refund's credit


async def test_payment_refund_routes_match_the_document(module_client: Client) -> None:
    """A payment (201, and a 409 carrying the FAILED payment) and its read, a posting read
    with its payment_id, the whole payment's refund (fresh, replayed, with a refused
    posting) and its refusals (no key, no payment, a FAILED payment)."""
    client = module_client
    ids = []
    for _ in range(3):
        created = await client.post("/api/v1/wallets")
        ids.append((await created.json())["id"])
    buyer, merchant, fee = ids
    deposit = {"operation_type": "DEPOSIT", "amount": "10.00"}
    assert (await client.post(f"/api/v1/wallets/{buyer}/operation", json=deposit)).status == 200
    postings = [
        {"from_wallet_id": buyer, "to_wallet_id": merchant, "amount": "9.00"},
        {"from_wallet_id": buyer, "to_wallet_id": fee, "amount": "1.00"},
    ]
    response = await client.post("/api/v1/payments", json={"postings": postings})
    assert response.status == 201
    payment = await _matches(response, "POST", "/api/v1/payments")
    response = await client.get(f"/api/v1/payments/{payment['id']}")
    assert response.status == 200
    await _matches(response, "GET", "/api/v1/payments/{payment_id}")
    response = await client.get(f"/api/v1/transfers/{payment['postings'][0]['transfer_id']}")
    read = await _matches(response, "GET", "/api/v1/transfers/{transfer_id}")
    assert read["payment_id"] == payment["id"]
    withdraw = {"operation_type": "WITHDRAW", "amount": "5.00"}
    assert (await client.post(f"/api/v1/wallets/{merchant}/operation", json=withdraw)).status == 200
    template = "/api/v1/payments/{payment_id}/refunds"
    path = f"/api/v1/payments/{payment['id']}/refunds"
    for _attempt in range(2):
        response = await client.post(
            path, json={"reason": "r"}, headers={"Idempotency-Key": "doc-payment-refund"}
        )
        assert response.status == 200
        body = await _matches(response, "POST", template)
        assert [r["status"] for r in body["results"]] == [409, 201]
    response = await client.post(path)
    assert response.status == 422
    await _matches(response, "POST", template)
    missing = "/api/v1/payments/00000000-0000-4000-8000-000000000000/refunds"
    response = await client.post(missing, headers={"Idempotency-Key": "k"})
    assert response.status == 404
    await _matches(response, "POST", template)
    short = {"postings": [{"from_wallet_id": fee, "to_wallet_id": buyer, "amount": "50.00"}]}
    response = await client.post("/api/v1/payments", json=short)
    assert response.status == 409
    failed = await _matches(response, "POST", "/api/v1/payments")
    response = await client.post(
        f"/api/v1/payments/{failed['payment']['id']}/refunds", headers={"Idempotency-Key": "k"}
    )
    assert response.status == 409
    await _matches(response, "POST", template)


def _request_schema_errors(method: str, path: str, body: Any) -> list[str]:
    """How ``body`` breaks the JSON request body schema documented for the route."""
    pointer = f"/paths/{path.replace('/', '~1')}/{method}/requestBody/content/application~1json"
    return schema_errors(DOCUMENT, pointer + "/schema", body)


async def test_what_the_server_accepts_the_document_allows(module_client: Client) -> None:
    """Requests the server accepts are valid per the document: null optional fields (the
    same as absent), the camelCase alias, zeros around an amount, and a bulk item that is
    not an operation (answered in its own 422 result, the request 200)."""
    client = module_client
    wallet_id = (await (await client.post("/api/v1/wallets")).json())["id"]
    operation = "/api/v1/wallets/{wallet_id}/operation"
    for body in (
        {"operation_type": "DEPOSIT", "amount": "010.50", "reference": None},
        {"operationType": "DEPOSIT", "amount": "10.500"},
        {"operation_type": "DEPOSIT", "amount": "0000001"},
    ):
        assert _request_schema_errors("post", operation, body) == [], body
        response = await client.post(f"/api/v1/wallets/{wallet_id}/operation", json=body)
        assert response.status == 200, body
    both = {"operation_type": "DEPOSIT", "operationType": "DEPOSIT", "amount": 1}
    assert _request_schema_errors("post", operation, both) != []
    hold = {"amount": "1.00", "expires_in_s": None, "reference": None}
    assert _request_schema_errors("post", "/api/v1/wallets/{wallet_id}/holds", hold) == []
    response = await client.post(f"/api/v1/wallets/{wallet_id}/holds", json=hold)
    assert response.status == 201
    item = {"wallet_id": wallet_id, "operation_type": "DEPOSIT", "amount": 1}
    bulk = {"items": [{**item, "idempotency_key": None, "reference": None}, {"nonsense": True}]}
    assert _request_schema_errors("post", "/api/v1/operations/bulk", bulk) == []
    response = await client.post("/api/v1/operations/bulk", json=bulk)
    assert response.status == 200
    results = (await _matches(response, "POST", "/api/v1/operations/bulk"))["results"]
    assert [result["status"] for result in results] == [200, 422]
    # All or nothing: the same request atomic is refused whole, and the document says so.
    atomic = {**bulk, "atomic": True}
    assert _request_schema_errors("post", "/api/v1/operations/bulk", atomic) != []
    response = await client.post("/api/v1/operations/bulk", json=atomic)
    assert response.status == 422
