"""Every row of docs/API.md's Errors table, through the real app on a real socket.

Each row is one request and the status, ``code`` and headers the contract promises. Every
answer is also checked for the RFC 9457 shape, an X-Request-Id, the OpenAPI document's
schema for that route and status, and — for requests on an existing wallet — an unchanged
balance (a 4xx never changes money).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import asyncpg
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from tests.conftest import AppFactory
from tests.engine_doubles import until
from tests.openapi_validation import assert_response_matches, schema_errors
from walletd.engine.limits import EngineLimits
from walletd.http.keys import parse_keys
from walletd.http.openapi import build_openapi_document
from walletd.http.settings import HttpSettings
from walletd.http.state import STATE_KEY

Client = TestClient[web.Request, web.Application]
AiohttpClient = Callable[..., Any]

DOCUMENT: Final = build_openapi_document()
WALLETS: Final = "/api/v1/wallets"
WALLET: Final = "/api/v1/wallets/{wallet_id}"
OPERATION: Final = "/api/v1/wallets/{wallet_id}/operation"
OPERATIONS: Final = "/api/v1/wallets/{wallet_id}/operations"
JSON: Final = {"Content-Type": "application/json"}
STARTING_BALANCE: Final = "10.00"
PROBLEM_FIELDS: Final = {"type", "title", "status", "detail", "code", "instance"}


@dataclass(frozen=True)
class Row:
    """One request and the answer the contract promises for it."""

    name: str
    method: str
    path: str  # "{wallet}" is replaced by a funded wallet's id, "{missing}" by an unknown one
    status: int
    code: str
    template: str | None  # the OpenAPI path, or None for requests no route matches
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    expect_headers: tuple[str, ...] = ()


def _op(amount: bytes, kind: bytes = b'"DEPOSIT"') -> bytes:
    return b'{"operation_type": ' + kind + b', "amount": ' + amount + b"}"


def _bad_amount(name: str, amount: bytes) -> Row:
    return Row(
        f"amount {name}", "POST", "/api/v1/wallets/{wallet}/operation", 422,
        "VALIDATION_ERROR", OPERATION, _op(amount), JSON,
    )  # fmt: skip


ROWS: Final = [
    # 400 INVALID_JSON
    Row("not JSON", "POST", "/api/v1/wallets/{wallet}/operation", 400, "INVALID_JSON",
        OPERATION, b"{not json", JSON),
    Row("JSON array", "POST", "/api/v1/wallets/{wallet}/operation", 400, "INVALID_JSON",
        OPERATION, b"[1, 2]", JSON),
    Row("invalid UTF-8", "POST", "/api/v1/wallets/{wallet}/operation", 400, "INVALID_JSON",
        OPERATION, b'{"amount": "\xff"}', JSON),
    Row("create with a JSON string", "POST", WALLETS, 400, "INVALID_JSON", WALLETS,
        b'"wallet"', JSON),
    # 400 INVALID_WALLET_ID
    Row("read a non-UUID", "GET", "/api/v1/wallets/not-a-uuid", 400, "INVALID_WALLET_ID",
        WALLET),
    Row("operate on a non-UUID", "POST", "/api/v1/wallets/123/operation", 400,
        "INVALID_WALLET_ID", OPERATION, _op(b"1"), JSON),
    Row("history of a non-UUID", "GET", "/api/v1/wallets/xyz/operations", 400,
        "INVALID_WALLET_ID", OPERATIONS),
    # 422 VALIDATION_ERROR
    Row("missing operation_type", "POST", "/api/v1/wallets/{wallet}/operation", 422,
        "VALIDATION_ERROR", OPERATION, b'{"amount": 1}', JSON),
    Row("unknown operation_type", "POST", "/api/v1/wallets/{wallet}/operation", 422,
        "VALIDATION_ERROR", OPERATION, _op(b"1", b'"STEAL"'), JSON),
    Row("lower-case operation_type", "POST", "/api/v1/wallets/{wallet}/operation", 422,
        "VALIDATION_ERROR", OPERATION, _op(b"1", b'"deposit"'), JSON),
    Row("missing amount", "POST", "/api/v1/wallets/{wallet}/operation", 422,
        "VALIDATION_ERROR", OPERATION, b'{"operation_type": "DEPOSIT"}', JSON),
    Row("unknown field", "POST", "/api/v1/wallets/{wallet}/operation", 422, "VALIDATION_ERROR",
        OPERATION, b'{"operation_type": "DEPOSIT", "amount": 1, "currency": "EUR"}', JSON),
    Row("both spellings of operation_type", "POST", "/api/v1/wallets/{wallet}/operation", 422,
        "VALIDATION_ERROR", OPERATION,
        b'{"operation_type": "DEPOSIT", "operationType": "DEPOSIT", "amount": 1}', JSON),
    _bad_amount("true", b"true"),
    _bad_amount("null", b"null"),
    _bad_amount("NaN literal", b"NaN"),
    _bad_amount("Infinity literal", b"-Infinity"),
    _bad_amount('"NaN" string', b'"NaN"'),
    _bad_amount("empty string", b'""'),
    _bad_amount("exponent string", b'"1e2"'),
    _bad_amount("signed string", b'"+5"'),
    _bad_amount("zero", b"0"),
    _bad_amount("negative", b"-5"),
    _bad_amount("three decimals", b"10.001"),
    _bad_amount("exponent hiding decimals", b"1e-3"),
    _bad_amount("huge exponent", b"1e400"),
    _bad_amount("past the maximum", b"1000000000000.01"),
    _bad_amount("huge integer", b"9" * 400),
    _bad_amount("object", b'{"value": 1}'),
    _bad_amount("array", b"[1]"),
    Row("create with an unknown field", "POST", WALLETS, 422, "VALIDATION_ERROR", WALLETS,
        b'{"name": "savings"}', JSON),
    Row("create with a non-UUID id", "POST", WALLETS, 422, "VALIDATION_ERROR", WALLETS,
        b'{"id": 42}', JSON),
    Row("limit 0", "GET", "/api/v1/wallets/{wallet}/operations?limit=0", 422,
        "VALIDATION_ERROR", OPERATIONS),
    Row("limit past the cap", "GET", "/api/v1/wallets/{wallet}/operations?limit=501", 422,
        "VALIDATION_ERROR", OPERATIONS),
    Row("limit not a number", "GET", "/api/v1/wallets/{wallet}/operations?limit=ten", 422,
        "VALIDATION_ERROR", OPERATIONS),
    Row("limit a superscript digit", "GET", "/api/v1/wallets/{wallet}/operations?limit=%C2%B2",
        422, "VALIDATION_ERROR", OPERATIONS),
    Row("limit with 5000 digits", "GET",
        "/api/v1/wallets/{wallet}/operations?limit=" + "9" * 5000, 422, "VALIDATION_ERROR",
        OPERATIONS),
    Row("garbage cursor", "GET", "/api/v1/wallets/{wallet}/operations?cursor=%21%21", 422,
        "VALIDATION_ERROR", OPERATIONS),
    Row("cursor past bigint", "GET",
        "/api/v1/wallets/{wallet}/operations?cursor=czk5OTk5OTk5OTk5OTk5OTk5OTk5", 422,
        "VALIDATION_ERROR", OPERATIONS),
    Row("empty Idempotency-Key", "POST", "/api/v1/wallets/{wallet}/operation", 422,
        "VALIDATION_ERROR", OPERATION, _op(b"1"), {**JSON, "Idempotency-Key": ""}),
    Row("Idempotency-Key of 256 characters", "POST", WALLETS, 422, "VALIDATION_ERROR",
        WALLETS, None, {"Idempotency-Key": "k" * 256}),
    # 404 WALLET_NOT_FOUND
    Row("read an unknown wallet", "GET", "/api/v1/wallets/{missing}", 404, "WALLET_NOT_FOUND",
        WALLET),
    Row("operate on an unknown wallet", "POST", "/api/v1/wallets/{missing}/operation", 404,
        "WALLET_NOT_FOUND", OPERATION, _op(b"1"), JSON),
    Row("history of an unknown wallet", "GET", "/api/v1/wallets/{missing}/operations", 404,
        "WALLET_NOT_FOUND", OPERATIONS),
    # 409
    Row("create a taken id", "POST", WALLETS, 409, "WALLET_ALREADY_EXISTS", WALLETS,
        b'{"id": "{wallet}"}', JSON),
    Row("withdraw past the balance", "POST", "/api/v1/wallets/{wallet}/operation", 409,
        "INSUFFICIENT_FUNDS", OPERATION, _op(b'"10.01"', b'"WITHDRAW"'), JSON),
    # 413 / 415
    Row("body past the limit", "POST", "/api/v1/wallets/{wallet}/operation", 413,
        "PAYLOAD_TOO_LARGE", OPERATION, b" " * (64 * 1024 + 1) + _op(b"1"), JSON),
    Row("text/plain body", "POST", "/api/v1/wallets/{wallet}/operation", 415,
        "UNSUPPORTED_MEDIA_TYPE", OPERATION, _op(b"1"), {"Content-Type": "text/plain"}),
    Row("no Content-Type", "POST", "/api/v1/wallets/{wallet}/operation", 415,
        "UNSUPPORTED_MEDIA_TYPE", OPERATION, _op(b"1")),
    Row("form body on create", "POST", WALLETS, 415, "UNSUPPORTED_MEDIA_TYPE", WALLETS,
        b"id=1", {"Content-Type": "application/x-www-form-urlencoded"}),
    # 404 NOT_FOUND, 405 METHOD_NOT_ALLOWED
    Row("unknown route", "GET", "/api/v1/nothing-here", 404, "NOT_FOUND", None),
    Row("unknown version", "GET", "/api/v2/wallets", 404, "NOT_FOUND", None),
    Row("root", "GET", "/", 404, "NOT_FOUND", None),
    Row("DELETE a wallet", "DELETE", "/api/v1/wallets/{wallet}", 405, "METHOD_NOT_ALLOWED",
        None, expect_headers=("Allow",)),
    Row("DELETE the wallet collection", "DELETE", WALLETS, 405, "METHOD_NOT_ALLOWED", None,
        expect_headers=("Allow",)),
    Row("PUT an operation", "PUT", "/api/v1/wallets/{wallet}/operation", 405,
        "METHOD_NOT_ALLOWED", None, _op(b"1"), JSON, expect_headers=("Allow",)),
]  # fmt: skip


def _fill(text: str, wallet_id: str, missing_id: str) -> str:
    return text.replace("{wallet}", wallet_id).replace("{missing}", missing_id)


async def _balance(client: Client, wallet_id: str) -> str:
    response = await client.get(f"/api/v1/wallets/{wallet_id}")
    assert response.status == 200
    balance: str = (await response.json())["balance"]
    return balance


async def _funded_wallet(client: Client) -> str:
    response = await client.post(WALLETS)
    wallet_id: str = (await response.json())["id"]
    response = await client.post(
        f"/api/v1/wallets/{wallet_id}/operation",
        json={"operation_type": "DEPOSIT", "amount": STARTING_BALANCE},
    )
    assert response.status == 200
    return wallet_id


def assert_problem(
    status: int, headers: Any, raw: bytes, *, code: str, path: str, template: str | None,
    method: str,
) -> dict[str, Any]:  # fmt: skip
    """The RFC 9457 shape, the code, X-Request-Id, and the OpenAPI document's schema."""
    assert headers["Content-Type"] == "application/problem+json", raw
    assert headers.get("X-Request-Id"), "every response carries X-Request-Id"
    body: dict[str, Any] = orjson.loads(raw)
    assert set(body) >= PROBLEM_FIELDS, body
    assert (body["status"], body["code"], body["type"]) == (status, code, "about:blank"), body
    assert body["instance"] == path.split("?", 1)[0]
    if code == "VALIDATION_ERROR":
        assert body["errors"]
        assert all({"field", "message"} <= set(e) for e in body["errors"])
    if template is not None:
        assert_response_matches(
            DOCUMENT, method, template, status, headers["Content-Type"], body,
            headers=dict(headers),
        )  # fmt: skip
    else:
        name = {404: "NotFound", 405: "MethodNotAllowed"}[status]
        pointer = f"/components/responses/{name}/content/application~1problem+json/schema"
        assert not schema_errors(DOCUMENT, pointer, body), body
    return body


@pytest.mark.parametrize("row", ROWS, ids=[row.name for row in ROWS])
async def test_error_row(module_client: Client, row: Row) -> None:
    """The request gets the contract's status and code as problem+json; money is unchanged."""
    client = module_client
    wallet_id = await _funded_wallet(client)
    path = _fill(row.path, wallet_id, str(uuid.uuid4()))
    body = None if row.body is None else _fill(row.body.decode("latin-1"), wallet_id, "")
    response = await client.request(
        row.method,
        path,
        data=None if body is None else body.encode("latin-1"),
        headers=row.headers,
        skip_auto_headers=["Content-Type"],
    )
    raw = await response.read()
    assert response.status == row.status, raw
    assert_problem(
        response.status, response.headers, raw, code=row.code, path=path,
        template=row.template, method=row.method,
    )  # fmt: skip
    for name in row.expect_headers:
        assert response.headers.get(name), name
    if row.status == 405:
        assert row.method not in response.headers["Allow"]
    assert await _balance(client, wallet_id) == STARTING_BALANCE


async def test_idempotency_key_reused_with_a_different_request(module_client: Client) -> None:
    """A key reused with another amount is 422 IDEMPOTENCY_KEY_REUSED and applies nothing."""
    client = module_client
    wallet_id = await _funded_wallet(client)
    path = f"/api/v1/wallets/{wallet_id}/operation"
    headers = {"Idempotency-Key": "order-1"}
    first = await client.post(
        path, json={"operation_type": "DEPOSIT", "amount": "1.00"}, headers=headers
    )
    assert first.status == 200
    response = await client.post(
        path, json={"operation_type": "DEPOSIT", "amount": "2.00"}, headers=headers
    )
    assert response.status == 422
    assert_problem(
        422, response.headers, await response.read(), code="IDEMPOTENCY_KEY_REUSED",
        path=path, template=OPERATION, method="POST",
    )  # fmt: skip
    assert await _balance(client, wallet_id) == "11.00"


async def test_deposit_past_the_balance_ceiling(module_client: Client) -> None:
    """A deposit that would pass 10^15 is 409 BALANCE_LIMIT_EXCEEDED; the balance stays."""
    client = module_client
    response = await client.post(WALLETS)
    wallet_id = (await response.json())["id"]
    path = f"/api/v1/wallets/{wallet_id}/operation"
    semaphore = asyncio.Semaphore(64)

    async def deposit_max() -> int:
        async with semaphore:
            response = await client.post(
                path, json={"operation_type": "DEPOSIT", "amount": "1000000000000.00"}
            )
            return response.status

    statuses = await asyncio.gather(*(deposit_max() for _ in range(1000)))
    assert set(statuses) == {200}
    ceiling = "1000000000000000.00"
    assert await _balance(client, wallet_id) == ceiling
    response = await client.post(path, json={"operation_type": "DEPOSIT", "amount": "0.01"})
    assert response.status == 409
    assert_problem(
        409, response.headers, await response.read(), code="BALANCE_LIMIT_EXCEEDED",
        path=path, template=OPERATION, method="POST",
    )  # fmt: skip
    assert await _balance(client, wallet_id) == ceiling


async def test_unauthorized_when_api_keys_are_set(
    make_app: AppFactory, aiohttp_client: AiohttpClient
) -> None:
    """With API keys, /api/v1 needs a right bearer token (401 + WWW-Authenticate otherwise);
    health, readiness, metrics and docs stay open."""
    client: Client = await aiohttp_client(
        make_app(HttpSettings(api_keys=parse_keys("k-one,k-two")))
    )
    refusals: list[dict[str, str]] = [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "Basic azpvbmU="},
        {"Authorization": "Bearer"},
        {"Authorization": "k-one"},
        {"Authorization": "Bearer k-one-and-more"},
        {"Authorization": "Bearer k-\u00e9"},
    ]
    for headers in refusals:
        response = await client.post(WALLETS, headers=headers)
        assert response.status == 401, headers
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        assert_problem(
            401, response.headers, await response.read(), code="UNAUTHORIZED", path=WALLETS,
            template=WALLETS, method="POST",
        )  # fmt: skip
    # Unknown routes under /api/v1 are refused too: no route discovery without a key.
    response = await client.get("/api/v1/nothing-here")
    assert response.status == 401
    created = await client.post(WALLETS, headers={"Authorization": "Bearer k-two"})
    assert created.status == 201
    wallet_id = (await created.json())["id"]
    read = await client.get(
        f"/api/v1/wallets/{wallet_id}", headers={"Authorization": "bearer k-one"}
    )
    assert read.status == 200
    for open_path in ("/healthz", "/readyz", "/metrics", "/api/openapi.json", "/api/docs"):
        assert (await client.get(open_path)).status == 200, open_path


async def test_unavailable_when_the_engine_is_stopped(client: Client) -> None:
    """Once the engine stops accepting, operations are 503 UNAVAILABLE with Retry-After."""
    wallet_id = await _funded_wallet(client)
    path = f"/api/v1/wallets/{wallet_id}/operation"
    await client.app[STATE_KEY].services.engine.stop()
    response = await client.post(path, json={"operation_type": "DEPOSIT", "amount": 1})
    assert response.status == 503
    assert response.headers["Retry-After"] == "1"
    assert_problem(
        503, response.headers, await response.read(), code="UNAVAILABLE", path=path,
        template=OPERATION, method="POST",
    )  # fmt: skip
    ready = await client.get("/readyz")
    assert ready.status == 503


async def test_unavailable_when_storage_is_unreachable(client: Client) -> None:
    """A storage failure is 503 UNAVAILABLE with Retry-After, and never leaks SQL."""
    wallet_id = await _funded_wallet(client)
    services = client.app[STATE_KEY].services
    await services.log._pool.close()  # type: ignore[attr-defined]
    path = f"/api/v1/wallets/{wallet_id}/operations"
    response = await client.get(path)
    assert response.status == 503
    assert response.headers["Retry-After"] == "1"
    body = assert_problem(
        503, response.headers, await response.read(), code="UNAVAILABLE", path=path,
        template=OPERATIONS, method="GET",
    )  # fmt: skip
    assert "SELECT" not in body["detail"]
    assert "pool" not in body["detail"]


async def test_overloaded_when_the_mailbox_is_full(
    make_app: AppFactory,
    aiohttp_client: AiohttpClient,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A full mailbox refuses at once: 503 OVERLOADED with Retry-After, nothing applied."""
    limits = EngineLimits(
        pipelines=1, mailbox_commands_max=2, batch_ops_max=1, inflight_batches_max=2
    )
    client: Client = await aiohttp_client(make_app(limits=limits))
    wallet_id = await _funded_wallet(client)
    engine = client.app[STATE_KEY].services.engine
    path = f"/api/v1/wallets/{wallet_id}/operation"

    # Counts the commands the HTTP layer has handed to the engine: apply() submits before
    # its first await, so once the count moves, the command is in the mailbox.
    submitted = 0
    apply = engine.apply

    async def counting_apply(*args: Any) -> Any:
        nonlocal submitted
        submitted += 1
        return await apply(*args)

    monkeypatch.setattr(engine, "apply", counting_apply)

    async def deposit() -> int:
        response = await client.post(path, json={"operation_type": "DEPOSIT", "amount": 1})
        return response.status

    # A row lock held by another session stalls the shard's commits for real: the first
    # inflight_batches_max batches (one command each) are stuck in PostgreSQL, the next one
    # waits prepared for a slot, and the rest can only queue. Requests are sent one at a
    # time, each once the shard has settled with the previous one, so none is refused early.
    settled_behind = limits.inflight_batches_max + 1  # commands out of the mailbox at most
    blocker = await asyncpg.connect(database_url)
    stalled: list[asyncio.Future[int]] = []
    try:
        async with blocker.transaction():
            await blocker.execute("SELECT 1 FROM wallets WHERE id = $1 FOR UPDATE", wallet_id)
            for count in range(1, settled_behind + limits.mailbox_commands_max + 1):
                stalled.append(asyncio.ensure_future(deposit()))
                queued = max(0, count - settled_behind)
                await until(lambda: submitted == count and engine.mailbox_depths() == [queued])  # noqa: B023
            assert engine.mailbox_depths() == [limits.mailbox_commands_max]
            response = await client.post(path, json={"operation_type": "DEPOSIT", "amount": 1})
            raw = await response.read()
    finally:
        await blocker.close()
    assert await asyncio.gather(*stalled) == [200] * len(stalled)
    assert response.status == 503, raw
    assert response.headers["Retry-After"] == "1"
    assert_problem(
        503, response.headers, raw, code="OVERLOADED", path=path, template=OPERATION,
        method="POST",
    )  # fmt: skip
    assert await _balance(client, wallet_id) == f"{10 + len(stalled)}.00"


async def test_unexpected_exception_is_a_generic_500_with_a_logged_traceback(
    make_app: AppFactory, aiohttp_client: AiohttpClient, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug is 500 INTERNAL_ERROR with a generic body; the traceback goes to the log."""
    app = make_app()

    async def broken(request: web.Request) -> web.Response:
        raise KeyError("SELECT secret FROM wallets")

    app.router.add_get("/test-only/broken", broken)
    client: Client = await aiohttp_client(app)
    with caplog.at_level(logging.ERROR, logger="walletd.http"):
        response = await client.get("/test-only/broken")
    raw = await response.read()
    assert response.status == 500
    assert response.headers["Content-Type"] == "application/problem+json"
    body = orjson.loads(raw)
    assert body["code"] == "INTERNAL_ERROR"
    assert body["instance"] == "/test-only/broken"
    assert b"SELECT" not in raw
    assert b"KeyError" not in raw
    assert response.headers.get("X-Request-Id")
    [record] = [r for r in caplog.records if r.name == "walletd.http"]
    assert record.exc_info is not None
    assert record.exc_info[0] is KeyError
