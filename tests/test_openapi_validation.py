"""Tests of tests/openapi_validation.py against the real walletd OpenAPI document."""

from __future__ import annotations

from typing import Any, Final

import pytest

from tests.openapi_validation import assert_response_matches
from walletd.http.openapi import build_openapi_document

WALLET_ID: Final = "123e4567-e89b-12d3-a456-426614174000"
WALLET_PATH: Final = "/api/v1/wallets/{wallet_id}"
OPERATION_PATH: Final = "/api/v1/wallets/{wallet_id}/operation"
JSON: Final = "application/json"
PROBLEM: Final = "application/problem+json"


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    """The document under test, built once for the module."""
    return build_openapi_document()


def _wallet(**changes: Any) -> dict[str, Any]:
    wallet = {
        "id": WALLET_ID,
        "balance": "1000.00",
        "available": "1000.00",
        "held": "0.00",
        "currency": "USD",
        "created_at": "2025-01-19T10:00:00.123456Z",
        "updated_at": "2025-01-19T10:30:00.000001Z",
    }
    return wallet | changes


def _problem(status: int, code: str, **extra: Any) -> dict[str, Any]:
    return {
        "type": "about:blank",
        "title": "t",
        "status": status,
        "detail": "d",
        "code": code,
        "instance": "/api/v1/wallets",
    } | extra


def test_valid_wallet_passes(document: dict[str, Any]) -> None:
    """A wallet in the documented shape, with a charset parameter, is accepted."""
    assert_response_matches(
        document, "GET", WALLET_PATH, 200, "application/json; charset=utf-8", _wallet()
    )


@pytest.mark.parametrize(
    ("body", "where"),
    [
        (_wallet(balance="10.5.0"), "balance"),
        (_wallet(balance="1." + "0" * 19), "balance"),  # past any currency's 18 decimals
        (_wallet(currency="usd"), "currency"),
        (_wallet(balance=10.5), "balance"),
        (_wallet(id="not-a-uuid"), "id"),
        (_wallet(created_at="2025-01-19T10:00:00Z"), "created_at"),
        ({k: v for k, v in _wallet().items() if k != "updated_at"}, "updated_at"),
    ],
)
def test_wrong_wallet_fails(document: dict[str, Any], body: dict[str, Any], where: str) -> None:
    """A wallet body that breaks the schema (pattern, type, uuid format, required) fails."""
    with pytest.raises(AssertionError, match=where):
        assert_response_matches(document, "GET", WALLET_PATH, 200, JSON, body)


def test_undocumented_status_fails(document: dict[str, Any]) -> None:
    """A status the route does not document is reported, even with a valid body."""
    with pytest.raises(AssertionError, match="status 409 is not documented"):
        assert_response_matches(
            document, "GET", WALLET_PATH, 409, PROBLEM, _problem(409, "INSUFFICIENT_FUNDS")
        )


def test_undocumented_route_fails(document: dict[str, Any]) -> None:
    """A method or path that the document lacks is reported."""
    with pytest.raises(AssertionError, match="is not documented"):
        assert_response_matches(document, "DELETE", WALLET_PATH, 200, JSON, _wallet())


def test_undocumented_content_type_fails(document: dict[str, Any]) -> None:
    """An error sent as plain JSON instead of problem+json is reported."""
    with pytest.raises(AssertionError, match="content type"):
        assert_response_matches(
            document, "GET", WALLET_PATH, 404, JSON, _problem(404, "WALLET_NOT_FOUND")
        )


def test_problem_code_is_narrowed_per_response(document: dict[str, Any]) -> None:
    """A 409 on an operation accepts INSUFFICIENT_FUNDS but not an unrelated code."""
    assert_response_matches(
        document, "POST", OPERATION_PATH, 409, PROBLEM, _problem(409, "INSUFFICIENT_FUNDS")
    )
    with pytest.raises(AssertionError, match="code"):
        assert_response_matches(
            document, "POST", OPERATION_PATH, 409, PROBLEM, _problem(409, "WALLET_NOT_FOUND")
        )
    with pytest.raises(AssertionError, match="status"):
        assert_response_matches(
            document, "POST", OPERATION_PATH, 409, PROBLEM, _problem(400, "INSUFFICIENT_FUNDS")
        )


def test_validation_problem_needs_errors(document: dict[str, Any]) -> None:
    """A 422 VALIDATION_ERROR must carry the errors list; IDEMPOTENCY_KEY_REUSED need not."""
    errors = [{"field": "amount", "message": "must be > 0"}]
    assert_response_matches(
        document,
        "POST",
        OPERATION_PATH,
        422,
        PROBLEM,
        _problem(422, "VALIDATION_ERROR", errors=errors),
    )
    assert_response_matches(
        document, "POST", OPERATION_PATH, 422, PROBLEM, _problem(422, "IDEMPOTENCY_KEY_REUSED")
    )
    with pytest.raises(AssertionError, match="body does not match"):
        assert_response_matches(
            document, "POST", OPERATION_PATH, 422, PROBLEM, _problem(422, "VALIDATION_ERROR")
        )


def test_required_headers_are_checked(document: dict[str, Any]) -> None:
    """A 503 (a response given by $ref) needs Retry-After as an integer and X-Request-Id."""
    body = _problem(503, "OVERLOADED")
    good = {"Retry-After": "1", "x-request-id": "abc"}
    assert_response_matches(document, "GET", WALLET_PATH, 503, PROBLEM, body, headers=good)
    with pytest.raises(AssertionError, match="Retry-After is missing"):
        assert_response_matches(
            document, "GET", WALLET_PATH, 503, PROBLEM, body, headers={"X-Request-Id": "abc"}
        )
    with pytest.raises(AssertionError, match="Location"):
        assert_response_matches(
            document,
            "POST",
            "/api/v1/wallets",
            201,
            JSON,
            _wallet(),
            headers={"X-Request-Id": "abc", "Location": "/elsewhere"},
        )
