"""One spelling per wallet id: canonical 8-4-4-4-12 hex, checked on the raw request path,
and a parse cache that only ever holds canonical ids (so it stays small whatever is sent)."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Callable
from typing import Final

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import example, given, settings
from hypothesis import strategies as st

from loadtest.invalid_paths_rss import scan
from tests.processes import WalletdProcess
from walletd.http.openapi import build_openapi_document
from walletd.http.parsing import (
    WALLET_ID_CACHE_ENTRIES_MAX,
    WALLET_ID_PATTERN,
    _wallet_uuid,
    parse_create_body,
    parse_wallet_id,
)
from walletd.http.problems import ProblemError, ValidationProblem

Client = TestClient[web.Request, web.Application]

READ_TIMEOUT_S: Final = 10.0
CANONICAL: Final = "123e4567-e89b-12d3-a456-426614174000"
# Every spelling Python's UUID() takes for CANONICAL, none of them the canonical one.
OTHER_SPELLINGS: Final = (
    "urn:uuid:" + CANONICAL,
    "{" + CANONICAL + "}",
    CANONICAL.replace("-", ""),
    "0x" + CANONICAL.replace("-", ""),
    "+" + CANONICAL[1:],
    CANONICAL.replace("-", "_"),
    " " + CANONICAL,
    CANONICAL + "\n",
    "123e4567e-89b-12d3-a456-426614174000",  # hyphens in the wrong places
    "123e4567-e89b-12d3-a456-42661417400０",  # a fullwidth digit
)
_CANONICAL_TEXT: Final = re.compile(WALLET_ID_PATTERN.strip("^$"))


def _refused(text: str) -> ProblemError:
    with pytest.raises(ProblemError) as refused:
        parse_wallet_id(text)
    return refused.value


def test_only_the_canonical_form_is_a_wallet_id() -> None:
    """Lower, upper and mixed case canonical ids parse; every other UUID() spelling is 400."""
    for text in (CANONICAL, CANONICAL.upper(), "123E4567-e89b-12D3-a456-426614174000"):
        assert parse_wallet_id(text) == uuid.UUID(CANONICAL)
    for text in OTHER_SPELLINGS:
        error = _refused(text)
        assert (error.status, error.code) == (400, "INVALID_WALLET_ID"), text


@settings(max_examples=500, deadline=None)
@given(st.uuids().map(str) | st.text(max_size=40) | st.from_regex(_CANONICAL_TEXT, fullmatch=True))
@example("00000000-0000-0000-0000-00000000000g")
def test_any_text_is_a_canonical_id_or_refused(text: str) -> None:
    """A text is accepted exactly when it matches the documented pattern, and names the id
    that its lowercase spelling names."""
    if _CANONICAL_TEXT.fullmatch(text) and len(text) == 36:
        assert str(parse_wallet_id(text)) == text.lower()
    else:
        assert _refused(text).code == "INVALID_WALLET_ID"


def test_the_documented_id_pattern_is_the_enforced_one() -> None:
    """The OpenAPI WalletId schema (path parameter and bodies) states WALLET_ID_PATTERN."""
    document = build_openapi_document()
    assert document["components"]["schemas"]["WalletId"]["pattern"] == WALLET_ID_PATTERN
    parameter = document["components"]["parameters"]["WalletId"]
    assert parameter["schema"] == {"$ref": "#/components/schemas/WalletId"}


def test_a_body_id_is_canonical_or_422() -> None:
    """POST /wallets {"id": ...}: the canonical form in either case, anything else 422."""
    assert parse_create_body({"id": CANONICAL.upper()}) == (uuid.UUID(CANONICAL), None, ())
    for text in OTHER_SPELLINGS:
        with pytest.raises(ValidationProblem) as refused:
            parse_create_body({"id": text})
        assert refused.value.extra == {
            "errors": [
                {"field": "id", "message": "must be a UUID in the canonical 8-4-4-4-12 hex form"}
            ]
        }


def test_the_parse_cache_keeps_only_canonical_ids_and_is_bounded() -> None:
    """100,000 invalid texts (up to 7 KB each) add nothing to the cache; valid ids past its
    bound evict older ones, so it never holds more than WALLET_ID_CACHE_ENTRIES_MAX."""
    _wallet_uuid.cache_clear()
    for index in range(100_000):
        with pytest.raises(ProblemError):
            parse_wallet_id(f"{index:x}" * (1 + index % 1000))
    assert _wallet_uuid.cache_info().currsize == 0
    for _ in range(WALLET_ID_CACHE_ENTRIES_MAX + 1000):
        parse_wallet_id(str(uuid.uuid4()))
    assert _wallet_uuid.cache_info().currsize == WALLET_ID_CACHE_ENTRIES_MAX


SCAN_REQUESTS: Final = 30_000
SCAN_RSS_GROWTH_MAX_BYTES: Final = 10 * 1024 * 1024


@pytest.mark.slow
async def test_a_scan_of_junk_ids_leaves_a_real_walletds_memory_flat(
    database_url: str, walletd_process: Callable[..., WalletdProcess]
) -> None:
    """30,000 GETs of distinct junk ids of up to 7 KB against a real ``walletd serve`` grow
    its RSS by less than 10 MB, and every one is 400 (when invalid texts were cached, the
    same scan grew it by ~50 MB). `python -m loadtest.invalid_paths_rss` runs the 1M scan."""
    process = walletd_process("--database-url", database_url)
    result = await scan(process.url, process.process.pid, SCAN_REQUESTS, path_bytes_max=7000)
    assert result.unexpected_answers == 0
    assert result.requests == SCAN_REQUESTS
    assert result.growth_bytes < SCAN_RSS_GROWTH_MAX_BYTES, result.summary(7000)


async def _wallet(client: Client) -> str:
    response = await client.post("/api/v1/wallets")
    assert response.status == 201
    wallet_id: str = (await response.json())["id"]
    return wallet_id


async def _raw_request(client: Client, request_line: str, body: bytes = b"") -> tuple[int, bytes]:
    """Send one request exactly as written (no client-side URL normalisation)."""
    server = client.server
    assert isinstance(server, TestServer)
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        head = [request_line, "Host: 127.0.0.1", "Connection: close"]
        if body:
            head += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), READ_TIMEOUT_S)
    finally:
        writer.close()
    status_line, _, rest = answer.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


async def test_percent_encoded_and_other_path_spellings_are_refused(
    module_client: Client,
) -> None:
    """An id percent-encoded in the path (routed by aiohttp, not by a proxy), %2F that would
    reach another route, and every non-canonical spelling: 400 INVALID_WALLET_ID, no money
    moved. An uppercase id is served and answered in lowercase."""
    client = module_client
    wallet_id = await _wallet(client)
    deposit = b'{"operation_type": "DEPOSIT", "amount": "1.00"}'
    encoded = "".join(f"%{ord(c):02X}" for c in wallet_id[:2]) + wallet_id[2:]
    spellings = [encoded, wallet_id.replace("-", ""), "urn:uuid:" + wallet_id]
    spellings += ["%7B" + wallet_id + "%7D", wallet_id[:-1] + "%" + f"{ord(wallet_id[-1]):02x}"]
    for spelling in spellings:
        for method, suffix, body in (
            ("GET", "", b""),
            ("GET", "/operations", b""),
            ("POST", "/operation", deposit),
        ):
            status, answer = await _raw_request(
                client, f"{method} /api/v1/wallets/{spelling}{suffix} HTTP/1.1", body
            )
            assert (status, orjson.loads(answer)["code"]) == (400, "INVALID_WALLET_ID"), spelling
    # aiohttp routes %2F as part of the segment: the wallet route, which has no POST.
    status, answer = await _raw_request(
        client, f"POST /api/v1/wallets/{wallet_id}%2Foperation HTTP/1.1", deposit
    )
    assert (status, orjson.loads(answer)["code"]) == (405, "METHOD_NOT_ALLOWED")
    status, answer = await _raw_request(
        client, f"GET /api/v1/wallets/{wallet_id}%2Foperations HTTP/1.1"
    )
    assert (status, orjson.loads(answer)["code"]) == (400, "INVALID_WALLET_ID")
    status, answer = await _raw_request(client, f"GET /api/v1/wallets/{wallet_id.upper()} HTTP/1.1")
    assert (status, orjson.loads(answer)["id"], orjson.loads(answer)["balance"]) == (
        200,
        wallet_id,
        "0.00",
    )


async def test_an_absolute_form_request_target_is_served(module_client: Client) -> None:
    """``GET http://host/api/v1/wallets/<id>`` (RFC 9112 absolute form) finds the id too."""
    wallet_id = await _wallet(module_client)
    status, answer = await _raw_request(
        module_client, f"GET http://127.0.0.1/api/v1/wallets/{wallet_id}?x=1 HTTP/1.1"
    )
    assert (status, orjson.loads(answer)["id"]) == (200, wallet_id)


async def test_a_body_id_in_another_spelling_creates_nothing(module_client: Client) -> None:
    """POST /wallets with a non-canonical id is 422 and creates no wallet under it; the
    canonical uppercase form creates the wallet, answered and located in lowercase."""
    client = module_client
    chosen = uuid.uuid4()
    for text in ("urn:uuid:" + str(chosen), "{" + str(chosen) + "}", chosen.hex):
        response = await client.post("/api/v1/wallets", json={"id": text})
        assert response.status == 422, text
        assert (await response.json())["code"] == "VALIDATION_ERROR"
    assert (await client.get(f"/api/v1/wallets/{chosen}")).status == 404
    response = await client.post("/api/v1/wallets", json={"id": str(chosen).upper()})
    assert response.status == 201
    assert (await response.json())["id"] == str(chosen)
    assert response.headers["Location"] == f"/api/v1/wallets/{chosen}"


def _spellings(canonical: str) -> list[str]:
    """Every other way to write ``canonical`` in a path: percent-encoded (upper and lower
    hex, first and last characters, the whole id), braces raw and encoded, no hyphens,
    ``urn:uuid:``, ``0x``, a trailing encoded newline."""
    return [
        "".join(f"%{ord(c):02X}" for c in canonical[:2]) + canonical[2:],
        canonical[:-1] + "%" + f"{ord(canonical[-1]):02x}",
        "".join(f"%{ord(c):02x}" for c in canonical),
        canonical.replace("-", "%2D"),
        "{" + canonical + "}",
        "%7B" + canonical + "%7D",
        canonical.replace("-", ""),
        "urn:uuid:" + canonical,
        "0x" + canonical.replace("-", ""),
        canonical + "%0A",
        canonical[:-1] + "g",
    ]


async def test_hold_and_transfer_ids_have_one_spelling_in_a_path(module_client: Client) -> None:
    """Issue 20 item 8: a hold or transfer id in a path is held to the wallet id's rules:
    every spelling but the canonical one (percent-encoded, braces, no hyphens, ...) is 400
    INVALID_HOLD_ID / INVALID_TRANSFER_ID and moves nothing (``/holds/%62e7…`` was 200, and
    HAProxy hashed it to another shard than walletd); uppercase and the absolute form are
    served, answered in lowercase."""
    client = module_client
    source, target = await _wallet(client), await _wallet(client)
    funded = await client.post(
        f"/api/v1/wallets/{source}/operation", json={"operation_type": "DEPOSIT", "amount": 50}
    )
    assert funded.status == 200
    response = await client.post(f"/api/v1/wallets/{source}/holds", json={"amount": 10})
    assert response.status == 201
    hold_id = (await response.json())["id"]
    response = await client.post(
        "/api/v1/transfers", json={"from_wallet_id": source, "to_wallet_id": target, "amount": 5}
    )
    assert response.status == 201
    transfer_id = (await response.json())["id"]
    for spelling in _spellings(hold_id):
        for method, suffix in (("GET", ""), ("POST", "/capture"), ("POST", "/void")):
            status, answer = await _raw_request(
                client, f"{method} /api/v1/holds/{spelling}{suffix} HTTP/1.1"
            )
            assert (status, orjson.loads(answer)["code"]) == (400, "INVALID_HOLD_ID"), (
                spelling,
                suffix,
            )
    for spelling in _spellings(transfer_id):
        status, answer = await _raw_request(client, f"GET /api/v1/transfers/{spelling} HTTP/1.1")
        assert (status, orjson.loads(answer)["code"]) == (400, "INVALID_TRANSFER_ID"), spelling
    # Nothing moved: the hold is still PENDING, the balances as they were.
    for target_line in (
        f"GET /api/v1/holds/{hold_id.upper()} HTTP/1.1",
        f"GET http://127.0.0.1/api/v1/holds/{hold_id}?x=1 HTTP/1.1",
    ):
        status, answer = await _raw_request(client, target_line)
        hold = orjson.loads(answer)
        assert (status, hold["id"], hold["status"]) == (200, hold_id, "PENDING"), hold
    status, answer = await _raw_request(
        client, f"GET /api/v1/transfers/{transfer_id.upper()} HTTP/1.1"
    )
    assert (status, orjson.loads(answer)["id"]) == (200, transfer_id)
    status, answer = await _raw_request(client, f"GET /api/v1/wallets/{source} HTTP/1.1")
    wallet = orjson.loads(answer)
    assert (wallet["balance"], wallet["held"]) == ("45.00", "10.00")
