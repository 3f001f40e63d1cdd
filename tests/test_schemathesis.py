"""schemathesis against a live ``walletd serve`` on a loopback port, with every check it has
(``--checks all``): no 5xx; every response conforms to the OpenAPI document (status, content
type, headers, body schema, and each event of the SSE stream); every request the document
allows is accepted, and every request it forbids is refused with a 4xx.

The document is loaded from the running server, so what is checked is what clients get.
Each operation runs positive cases (valid per the document), half of them on a wallet that
exists so that the success paths are reached, and negative cases (invalid per the document),
which must be refused with a documented 4xx.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, Final

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import CHECKS as REGISTERED_CHECKS
from schemathesis.checks import load_all_checks
from schemathesis.specs.openapi.checks import negative_data_rejection, positive_data_acceptance

from tests.conftest import PostgresServer
from tests.processes import start_walletd
from walletd.http.openapi import build_openapi_document

pytestmark = pytest.mark.slow


def _intended_refusal(response: Any) -> bool:
    """Refusals of schema-valid requests that no schema can express: a generated
    Idempotency-Key that an earlier, different request already used; an ``as_of`` instant in
    the future (it depends on the clock); an atomic bulk request over
    several shard actors (it depends on the server's --shards); a transfer from a wallet to
    itself (JSON Schema cannot compare two fields); a bulk item's ``key_index`` without the
    request's Idempotency-Key header (a rule between a header and the body); a listing
    cursor the server did not issue for the request's filters; an If-Match naming another
    version than the wallet's (it depends on the wallet's state); a webhook URL the
    destination guard refuses (its allowlist and DNS are the server's configuration)."""
    if response.status_code == 412:
        return bool(response.json().get("code") == "PRECONDITION_FAILED")
    if response.status_code != 422:
        return False
    body = response.json()
    code = body.get("code")
    if code in (
        "IDEMPOTENCY_KEY_REUSED", "AS_OF_NOT_SETTLED", "ATOMIC_NOT_POSSIBLE",
        # Money between wallets of two currencies: it depends on what they were created in.
        "CURRENCY_MISMATCH",
    ):  # fmt: skip
        return True
    errors = body.get("errors") or []
    if errors and all(error.get("field") == "url" for error in errors):
        return bool(code == "VALIDATION_ERROR")
    # Each error a currency rule or a rule no schema states (a bulk request may show both).
    return (
        code == "VALIDATION_ERROR"
        and bool(errors)
        and all(
            _currency_rule(error)
            or (_item_field(error.get("field")), error.get("message")) in _UNSTATABLE_FIELD_ERRORS
            for error in errors
        )
    )


def _item_field(field: object) -> object:
    """``items[3].key_index`` as ``items[].key_index`` (a payment's ``postings[3].amount``
    likewise): the rule, not the position."""
    for array in ("items", "postings"):
        if isinstance(field, str) and field.startswith(array + "["):
            return array + "[]" + field[field.index("]") + 1 :]
    return field


_UNSTATABLE_FIELD_ERRORS: Final = {
    ("to_wallet_id", "must differ from from_wallet_id"),
    ("postings[].to_wallet_id", "must differ from from_wallet_id"),
    # The postings a payment may have are the server's bound (WALLETD_PAYMENT_POSTINGS_MAX,
    # 16 by default); the document states the largest bound it may be set to (256).
    ("postings", "must be a list of 1 to 16 postings"),
    # A bulk item's key_index is derived under the request's Idempotency-Key header: a rule
    # between a header and the body, which OpenAPI cannot state.
    ("items[].key_index", "needs the request's Idempotency-Key header"),
    # A listing's cursor is valid only as the server issued it, for the same filters (its
    # check value is over both): a schema states its form, not which ones were issued.
    ("cursor", "is not a cursor this listing issued for these filters"),
}


def _currency_rule(error: Any) -> bool:
    """A field refused by a rule of the wallet's currency, which the document cannot state
    per wallet: an amount with more decimals than the currency, or past its maximum in minor
    units (messages end with the currency's code), or a JSON number's decimals (no binary
    float states ``multipleOf: 1e-18`` exactly), for an amount or an overdraft limit; a
    currency code the operator did not declare (the declared assets are configuration)."""
    field = _item_field(error.get("field"))
    message = error.get("message") or ""
    # An overdraft limit is money of the wallet's currency too (PATCH).
    if field in ("amount", "items[].amount", "postings[].amount", "overdraft_limit"):
        return "fractional digits" in message or message.endswith(")")
    return field == "currency" and message == "must be an ISO 4217 code or a declared asset"


def valid_data_is_accepted(ctx: Any, response: Any, case: Any) -> bool | None:
    """schemathesis's "schema-valid request rejected" check, less the intended refusals."""
    if _intended_refusal(response):
        return None
    result: bool | None = positive_data_acceptance(ctx, response, case)
    return result


def invalid_data_is_refused(ctx: Any, response: Any, case: Any) -> bool | None:
    """schemathesis's "schema-violating request accepted" check, with 413 counted as the
    refusal it is (too many items, a body too large), and 412 PRECONDITION_FAILED too: an
    If-Match that is not an entity tag names no version, and the document says it is 412
    (parameter IfMatch), nothing applied."""
    if response.status_code == 413:
        return None
    if response.status_code == 412 and response.json().get("code") == "PRECONDITION_FAILED":
        return None
    if _metadata_filter_valid_as_sent(case):
        return None
    result: bool | None = negative_data_rejection(ctx, response, case)
    return result


def _metadata_filter_valid_as_sent(case: Any) -> bool:
    """A negative case whose only invalid component is the listing's ``metadata[<key>]=``
    filter (a deepObject query parameter) but whose query string, as sent, is valid: a
    generated value of the wrong type (a number, where the document says string) is sent as
    its text, and a query string has no types: ``metadata[k]=3.2e+277`` is a valid filter.
    schemathesis checks this for flat parameters, not for a deepObject's values."""
    data = getattr(getattr(getattr(case, "meta", None), "phase", None), "data", None)
    parameters = {getattr(data, "parameter", None)} | {
        getattr(mutation, "parameter", None) for mutation in getattr(data, "mutations", ())
    }
    parameters.discard(None)
    if parameters != {"metadata"}:
        return False
    sent = (case.query or {}).get("metadata")
    # Judged by the document's own bounds (not the server's parser, which is what is tested).
    schema = DOCUMENT["components"]["parameters"]["WalletMetadataFilter"]["schema"]
    names, values = schema["propertyNames"], schema["additionalProperties"]
    if not isinstance(sent, dict) or len(sent) > schema["maxProperties"]:
        return False
    for key, value in sent.items():
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            return False
        text = value if isinstance(value, str) else json.dumps(value)
        if not (
            isinstance(key, str)
            and names["minLength"] <= len(key) <= names["maxLength"]
            and re.search(names["pattern"], key)
            and len(text) <= values["maxLength"]
            and re.search(values["pattern"], text)
        ):
            return False
    return True


load_all_checks()
# Every check schemathesis has (what `--checks all` runs), the data acceptance ones as
# wrapped above. The stateful and auth ones (use_after_free, ignored_auth, ...)
# find nothing to act on here and pass.
_OURS: Final[dict[Any, Any]] = {
    positive_data_acceptance: valid_data_is_accepted,
    negative_data_rejection: invalid_data_is_refused,
}
CHECKS: Final[list[Any]] = [_OURS.get(check, check) for check in REGISTERED_CHECKS.get_all()]
POSITIVE_EXAMPLES: Final = 25
NEGATIVE_EXAMPLES: Final = 10
SUCCESS_EXAMPLES: Final = 10
# The SSE stream never ends: a case reads it for this long (or 20 events), and each event
# read is checked against the document's event schema.
STREAM_READ_S: Final = 1.0
STREAM_EXAMPLES: Final = 8

# Listed at import from the same document the server serves (a test below checks that the
# served one is identical), so that each operation is its own test item.
DOCUMENT: Final = build_openapi_document()
OPERATIONS: Final = [
    (method.upper(), path) for path, item in DOCUMENT["paths"].items() for method in item
]


@pytest.fixture(scope="module")
async def live_database(pg_server: PostgresServer) -> AsyncIterator[str]:
    dsn = await pg_server.create_database()
    yield dsn
    await pg_server.drop_database(dsn)


@pytest.fixture(scope="module")
def live_url(live_database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real ``walletd serve`` process (it migrates the database itself)."""
    log_dir: Path = tmp_path_factory.mktemp("walletd-schemathesis")
    # Webhooks only to loopback: a fuzzed subscription never sends off the machine.
    process = start_walletd(
        ["--database-url", live_database, "--shards", "2",
         "--webhook-allowed-hosts", "127.0.0.1"],
        log_dir=log_dir,
    )  # fmt: skip
    try:
        yield process.url
    finally:
        assert process.terminate() == 0, process.log()


@pytest.fixture(scope="module")
def session() -> Iterator[requests.Session]:
    with requests.Session() as http:
        yield http


@pytest.fixture(scope="module")
def live_schema(live_url: str, session: requests.Session) -> Any:
    served = session.get(f"{live_url}/api/openapi.json", timeout=10).json()
    assert served == build_openapi_document()
    return schemathesis.openapi.from_url(f"{live_url}/api/openapi.json")


def _funded_wallet(url: str, http: requests.Session) -> str:
    """A new wallet holding 500.00."""
    wallet = http.post(f"{url}/api/v1/wallets", timeout=10).json()
    deposit = http.post(
        f"{url}/api/v1/wallets/{wallet['id']}/operation",
        json={"operation_type": "DEPOSIT", "amount": "500.00"},
        timeout=10,
    )
    assert deposit.status_code == 200
    wallet_id: str = wallet["id"]
    return wallet_id


@pytest.fixture(scope="module")
def wallet_id(live_url: str, session: requests.Session) -> str:
    return _funded_wallet(live_url, session)


@pytest.fixture(scope="module")
def transfer_id(live_url: str, session: requests.Session, wallet_id: str) -> str:
    receiver = session.post(f"{live_url}/api/v1/wallets", timeout=10).json()["id"]
    response = session.post(
        f"{live_url}/api/v1/transfers",
        json={"from_wallet_id": wallet_id, "to_wallet_id": receiver, "amount": "1.00"},
        headers={"Idempotency-Key": "schemathesis-transfer"},
        timeout=10,
    )
    assert response.status_code == 201, response.text
    created: str = response.json()["id"]
    return created


def _new_hold(url: str, http: requests.Session) -> str:
    """A PENDING hold on a wallet of its own (so the holds do not use up the shared
    wallet's money): capture and void reach their 2xx once on each, then meet 409."""
    wallet = http.post(f"{url}/api/v1/wallets", timeout=10).json()["id"]
    deposit = http.post(
        f"{url}/api/v1/wallets/{wallet}/operation",
        json={"operation_type": "DEPOSIT", "amount": "1000000.00"},
        timeout=10,
    )
    assert deposit.status_code == 200
    response = http.post(
        f"{url}/api/v1/wallets/{wallet}/holds", json={"amount": "500000.00"}, timeout=10
    )
    assert response.status_code == 201, response.text
    hold_id: str = response.json()["id"]
    return hold_id


# Operations whose 2xx needs related records a generated body cannot name (two funded
# wallets): their success path is checked against the document with real records in
# tests/test_openapi_responses.py instead.
# Webhook routes: the fuzzed server allowlists only 127.0.0.1 (no request may leave the
# machine), so drawn URLs are refused; tests/test_webhooks.py reaches each success.
_SUCCESS_CHECKED_ELSEWHERE: Final = {
    ("POST", "/api/v1/transfers"),
    # A refund succeeds while the transfer has money left, a reversal once per operation:
    # tests/test_openapi_responses.py reaches each success against the document.
    ("POST", "/api/v1/transfers/{transfer_id}/refunds"),
    ("POST", "/api/v1/wallets/{wallet_id}/operations/{seq}/reversal"),
    # A payment needs two funded wallets, its read and its refund a payment that exists:
    # tests/test_openapi_responses.py (test_payment_refund_routes_match_the_document).
    ("POST", "/api/v1/payments"),
    ("GET", "/api/v1/payments/{payment_id}"),
    ("POST", "/api/v1/payments/{payment_id}/refunds"),
    ("POST", "/api/v1/webhooks"),
    ("GET", "/api/v1/webhooks/{webhook_id}"),
    ("PATCH", "/api/v1/webhooks/{webhook_id}"),
    ("DELETE", "/api/v1/webhooks/{webhook_id}"),
    ("GET", "/api/v1/webhooks/{webhook_id}/deliveries"),
    ("POST", "/api/v1/webhooks/{webhook_id}/deliveries/{delivery_id}/redeliver"),
}


def _run(
    strategy: st.SearchStrategy[Any],
    examples: int,
    url: str,
    http: requests.Session,
    derandomize: bool = False,
    timeout_s: float = 10,
) -> Counter[int]:
    """Runs the cases and returns how often each status came back."""
    statuses: Counter[int] = Counter()

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=derandomize,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def check(case: Any) -> None:
        response = case.call_and_validate(
            base_url=url, session=http, checks=CHECKS, timeout=timeout_s
        )
        statuses[response.status_code] += 1

    check()
    return statuses


@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_operation_conforms(
    live_schema: Any,
    live_url: str,
    session: requests.Session,
    wallet_id: str,
    transfer_id: str,
    method: str,
    path: str,
) -> None:
    """Positive and negative cases for this operation: no 5xx, no schema violation, and
    the success path is reached (a 2xx came back), so the conformance checks saw it."""
    operation = live_schema[path][method]
    positive = operation.as_strategy()
    reaching = positive
    if method == "PATCH":
        # A PATCH may leave its wallet FROZEN, or owing under an overdraft limit: the shared
        # wallet's other operations (holds, bulk) would then never reach their 2xx. Its own
        # wallet holds money, so that no generated close succeeds (CLOSE_BLOCKED) and every
        # later PATCH can still change it.
        wallet_id = _funded_wallet(live_url, session)
    if "{wallet_id}" in path:
        reaching = operation.as_strategy(path_parameters={"wallet_id": wallet_id})
        positive = positive | reaching
        if method == "POST" and path.endswith("/holds"):
            # A hold reserves money until it resolves: the random positive cases above can
            # reserve all the shared wallet has (seen: every success case then 409), so the
            # success run gets a funded wallet of its own, as fresh on every run.
            own = _funded_wallet(live_url, session)
            reaching = operation.as_strategy(path_parameters={"wallet_id": own})
    if "{transfer_id}" in path:
        reaching = operation.as_strategy(path_parameters={"transfer_id": transfer_id})
        positive = positive | reaching
    if "{hold_id}" in path:
        # A hold resolves once: the positive cases get one hold, the success run another.
        hold = _new_hold(live_url, session)
        positive = positive | operation.as_strategy(path_parameters={"hold_id": hold})
        reaching = operation.as_strategy(path_parameters={"hold_id": _new_hold(live_url, session)})
    documented = DOCUMENT["paths"][path][method.lower()]
    streams = "text/event-stream" in documented["responses"].get("200", {}).get("content", {})
    timeout_s = STREAM_READ_S if streams else 10
    positive_examples, success_examples, negative_examples = (
        (STREAM_EXAMPLES,) * 3
        if streams
        else (POSITIVE_EXAMPLES, SUCCESS_EXAMPLES, NEGATIVE_EXAMPLES)
    )
    _run(positive, positive_examples, live_url, session, timeout_s=timeout_s)
    if (method, path) in _SUCCESS_CHECKED_ELSEWHERE:
        return
    # Valid cases on the wallet that exists, drawn the same way on every run (no flake):
    # at least one must succeed, or the checks above may never have seen a 2xx.
    statuses = _run(
        reaching, success_examples, live_url, session, derandomize=True, timeout_s=timeout_s
    )
    assert any(200 <= status < 300 for status in statuses), dict(statuses)
    if documented.get("parameters") or documented.get("requestBody"):
        # Only an operation with inputs has invalid inputs to send.
        negative = operation.as_strategy(generation_mode=schemathesis.GenerationMode.NEGATIVE)
        _run(negative, negative_examples, live_url, session, timeout_s=timeout_s)


def test_stream_events_match_the_document(
    live_schema: Any, live_url: str, session: requests.Session, wallet_id: str
) -> None:
    """The SSE stream from the start carries events, each checked by every check against
    the document's event schema (id, event, and data as an Event), with X-Request-Id."""
    operation = live_schema["/api/v1/events/stream"]["GET"]
    case = operation.Case()
    response = case.call_and_validate(
        base_url=live_url, session=session, checks=CHECKS, timeout=STREAM_READ_S
    )
    assert response.status_code == 200
    assert response.headers.get("x-request-id"), response.headers  # names in lowercase
    assert response.text.count("\nevent: ") >= 2, response.text[:500]
