"""Arbitrary bodies, headers, paths and queries against the real app: never a 5xx, and a 4xx
never changes a balance.

All examples run against one app on one database (``module_client``); each property keeps
its own wallet and tracks the balance it must have, computed from the old balance and the
amount the request asked for (read here with exact decimals, not by the server's parser),
so a refused request that moved money, or an accepted one that moved it wrongly, is caught.
"""

from __future__ import annotations

import json
from decimal import Decimal, InvalidOperation
from typing import Any, Final
from urllib.parse import quote

from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

Client = TestClient[web.Request, web.Application]

FUZZ_SETTINGS: Final = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# Full Unicode, lone surrogates (U+D800-U+DFFF) included: JSON can carry them as \uD800
# escapes (and the standard library's parser lets them through), though they are no text.
any_character = st.characters() | st.characters(categories=["Cs"])


def any_text(max_size: int) -> st.SearchStrategy[str]:
    # Joined from characters: st.text(alphabet=...) drops the surrogates again.
    return st.lists(any_character, max_size=max_size).map("".join)


json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=True, allow_infinity=True)
    | any_text(20)
    | st.sampled_from(["DEPOSIT", "WITHDRAW", "deposit", "1.00", "0.01", "10.5", "1e2", ""])
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(any_text(5), children, max_size=3)
    ),
    max_leaves=5,
)
field_names = st.sampled_from(["operation_type", "operationType", "amount"]) | any_text(8)
operation_bodies = st.dictionaries(field_names, json_values, max_size=4) | st.fixed_dictionaries(
    {
        "operation_type": st.sampled_from(["DEPOSIT", "WITHDRAW"]),
        "amount": json_scalars,
    }
)
# Header values aiohttp's client can send: no CR/LF; Latin-1 beyond ASCII included.
header_text = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"),
    max_size=300,
)
content_types = st.sampled_from(
    ["application/json", "application/json; charset=utf-8", "APPLICATION/JSON", "text/plain",
     "application/problem+json", "", "multipart/form-data; boundary=x"]
) | header_text  # fmt: skip


class Ledger:
    """A wallet, the balance it must have, and the first answer to each Idempotency-Key."""

    def __init__(self, wallet_id: str) -> None:
        self.wallet_id = wallet_id
        self.balance = Decimal("0.00")
        self.answered: dict[str, Decimal] = {}  # key -> the balance its first 200 reported

    @property
    def operation_path(self) -> str:
        return f"/api/v1/wallets/{self.wallet_id}/operation"


async def _new_ledger(client: Client, deposit: str = "1000.00") -> Ledger:
    response = await client.post("/api/v1/wallets")
    ledger = Ledger((await response.json())["id"])
    response = await client.post(
        ledger.operation_path, json={"operation_type": "DEPOSIT", "amount": deposit}
    )
    assert response.status == 200
    ledger.balance = Decimal(deposit)
    return ledger


def requested_delta(raw: bytes) -> Decimal | None:
    """What an operation body asks to move (+ deposit, - withdrawal), read with exact
    decimals and without the server's parser; None when no 200 could stand for it."""
    try:
        body = json.loads(
            raw, parse_float=Decimal, parse_int=Decimal, parse_constant=lambda _name: None
        )
    except (ValueError, RecursionError):
        return None
    if not isinstance(body, dict):
        return None
    amount = body.get("amount")
    if isinstance(amount, str):
        try:
            amount = Decimal(amount)
        except InvalidOperation:
            return None
    if not isinstance(amount, Decimal) or not amount.is_finite():
        return None
    kind = body.get("operation_type", body.get("operationType"))
    return {"DEPOSIT": amount, "WITHDRAW": -amount}.get(kind) if isinstance(kind, str) else None


async def _check_balance(client: Client, ledger: Ledger) -> None:
    response = await client.get(f"/api/v1/wallets/{ledger.wallet_id}")
    assert response.status == 200
    assert Decimal((await response.json())["balance"]) == ledger.balance


async def _check_answer(
    client: Client, ledger: Ledger, response: ClientResponse, raw: bytes, key: str | None = None
) -> None:
    """No 5xx. A 200 moved the balance by exactly what ``raw`` asked for, and says so; a
    replay (same key) moved nothing and repeats the first answer; anything else is a
    problem+json 4xx that moved nothing. The stored balance agrees."""
    status, body = response.status, await response.read()
    assert status < 500, body
    if status == 200:
        answered = Decimal(json.loads(body)["balance"])
        # HTTP drops a header value's surrounding blanks, so the server sees the key bare.
        bare_key = None if key is None else key.strip(" \t")
        if response.headers.get("Idempotent-Replayed") == "true":
            assert bare_key in ledger.answered, f"replay of a key never answered: {key!r}"
            assert answered == ledger.answered[bare_key]
        else:
            delta = requested_delta(raw)
            assert delta is not None, f"200 for a body that asks for no operation: {raw!r}"
            assert answered == ledger.balance + delta, (raw, ledger.balance, body)
            assert answered >= 0
            ledger.balance = answered
            if bare_key is not None:
                ledger.answered[bare_key] = answered
    else:
        assert 400 <= status < 500, body
        assert json.loads(body)["code"]
    await _check_balance(client, ledger)


_LEDGERS: dict[tuple[int, str], Ledger] = {}


async def _ledger(client: Client, name: str) -> Ledger:
    """This property's wallet on this client's app, made on the first example."""
    key = (id(client), name)
    if key not in _LEDGERS:
        _LEDGERS[key] = await _new_ledger(client)
    return _LEDGERS[key]


def _encode(body: Any) -> bytes:
    """JSON with every non-ASCII character escaped: a lone surrogate becomes ``\\ud800``."""
    return json.dumps(body, allow_nan=True).encode()


def _encode_unescaped(body: Any) -> bytes:
    """JSON with characters as UTF-8 bytes: a lone surrogate becomes its (invalid) 3 bytes."""
    return json.dumps(body, allow_nan=True, ensure_ascii=False).encode("utf-8", "surrogatepass")


@FUZZ_SETTINGS
@given(body=operation_bodies)
async def test_arbitrary_operation_bodies(module_client: Client, body: dict[str, Any]) -> None:
    """Any JSON object as an operation body: 2xx/4xx only, and only a 200 moves money."""
    ledger = await _ledger(module_client, "bodies")
    raw = _encode(body)
    response = await module_client.post(
        ledger.operation_path, data=raw, headers={"Content-Type": "application/json"}
    )
    await _check_answer(module_client, ledger, response, raw)


@FUZZ_SETTINGS
@given(
    body=st.binary(max_size=200) | json_values.map(_encode) | json_values.map(_encode_unescaped),
    content_type=content_types,
)
async def test_arbitrary_raw_bodies_and_content_types(
    module_client: Client, body: bytes, content_type: str
) -> None:
    """Any bytes under any Content-Type: never a 5xx, and only a 200 moves money."""
    ledger = await _ledger(module_client, "raw")
    response = await module_client.post(
        ledger.operation_path,
        data=body,
        headers={"Content-Type": content_type},
        skip_auto_headers=["Content-Type"],
    )
    await _check_answer(module_client, ledger, response, body)


@FUZZ_SETTINGS
@given(
    key=st.none() | header_text,
    request_id=st.none() | header_text,
    authorization=st.none() | header_text,
)
# A key used, another key used, then the first again: the replay reports the older balance,
# which must not be taken for the wallet's balance now.
@example(key="fuzz-key-a", request_id=None, authorization=None)
@example(key="fuzz-key-b", request_id=None, authorization=None)
@example(key="fuzz-key-a", request_id="again", authorization=None)
async def test_arbitrary_headers(
    module_client: Client, key: str | None, request_id: str | None, authorization: str | None
) -> None:
    """Any Idempotency-Key, X-Request-Id or Authorization value on a valid deposit:
    2xx/4xx only, and a 4xx leaves the balance as it was."""
    ledger = await _ledger(module_client, "headers")
    headers = {"Content-Type": "application/json"}
    for name, value in (
        ("Idempotency-Key", key),
        ("X-Request-Id", request_id),
        ("Authorization", authorization),
    ):
        if value is not None:
            headers[name] = value
    raw = b'{"operation_type": "DEPOSIT", "amount": "0.01"}'
    response = await module_client.post(ledger.operation_path, data=raw, headers=headers)
    assert response.headers.get("X-Request-Id")
    await _check_answer(module_client, ledger, response, raw, key)


queries = st.none() | st.text(max_size=40) | st.integers().map(str)


@FUZZ_SETTINGS
@given(
    segment=st.none() | any_text(60),
    limit=queries,
    cursor=queries,
    method=st.sampled_from(["GET", "POST", "DELETE"]),
)
async def test_arbitrary_paths_and_queries(
    module_client: Client, segment: str | None, limit: str | None, cursor: str | None, method: str
) -> None:
    """Any wallet id segment, limit and cursor on every wallet route: 2xx/4xx only, errors
    as problem+json, and the wallet's balance untouched (None = the real wallet's id)."""
    ledger = await _ledger(module_client, "paths")
    params = {name: value for name, value in (("limit", limit), ("cursor", cursor)) if value}
    wallet_segment = (
        ledger.wallet_id if segment is None else quote(segment, safe="", errors="surrogatepass")
    )
    path = f"/api/v1/wallets/{wallet_segment}"
    for suffix in ("", "/operations", "/operation"):
        response = await module_client.request(
            method, path + suffix, params=params if method == "GET" else None
        )
        raw = await response.read()
        assert response.status < 500, raw
        if response.status >= 400:
            assert response.headers["Content-Type"] == "application/problem+json", raw
    await _check_balance(module_client, ledger)
