"""Guarantees that had no failing test: one wallet per creation key under concurrency, the
bearer-token comparison, and a bounded set of method labels in the metrics."""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any
from uuid import UUID

import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from tests.conftest import AppFactory
from tests.engine_doubles import wallet_ids_on_shard
from walletd.engine.limits import EngineLimits
from walletd.http import keys as keys_module
from walletd.http.keys import parse_keys
from walletd.http.metrics import KNOWN_METHODS, OTHER_METHOD
from walletd.http.settings import HttpSettings

Client = TestClient[web.Request, web.Application]
AiohttpClient = Callable[..., Any]

WALLETS = "/api/v1/wallets"
RACES = 10
RETRIES_MAX = 20


async def _create_until_answered(client: Client, wallet_id: UUID, key: str) -> tuple[int, Any]:
    """POST a keyed creation; a 503 ("not applied, or unknown") is retried with the same key
    and body until it gets a final answer."""
    for _ in range(RETRIES_MAX):
        response = await client.post(
            WALLETS, json={"id": str(wallet_id)}, headers={"Idempotency-Key": key}
        )
        body = await response.json()
        if response.status != 503:
            return response.status, body
        assert body["code"] == "UNAVAILABLE", body
    raise AssertionError(f"still 503 after {RETRIES_MAX} retries")


async def test_concurrent_creations_of_different_ids_under_one_key_make_one_wallet(
    make_app: AppFactory, aiohttp_client: AiohttpClient, database_url: str
) -> None:
    """Two creations sent at once with one Idempotency-Key and different ids, the ids on
    different shards (neither shard sees the other's key cache): one gets 201; the other
    gets 422 IDEMPOTENCY_KEY_REUSED, at once or after 503s and same-key retries; exactly
    one wallet exists under the key, the winner's, and the loser's id was never created."""
    client: Client = await aiohttp_client(make_app(limits=EngineLimits(pipelines=2)))
    on_shard_0 = wallet_ids_on_shard(0, 2, RACES)
    on_shard_1 = wallet_ids_on_shard(1, 2, RACES)
    for race, ids in enumerate(zip(on_shard_0, on_shard_1, strict=True)):
        key = f"create-race-{race}"
        answers = await asyncio.gather(*(_create_until_answered(client, i, key) for i in ids))
        statuses = sorted(status for status, _body in answers)
        assert statuses == [201, 422], answers
        (winner,) = [UUID(body["id"]) for status, body in answers if status == 201]
        (refusal,) = [body for status, body in answers if status == 422]
        assert refusal["code"] == "IDEMPOTENCY_KEY_REUSED"
        connection = await asyncpg.connect(database_url)
        try:
            under_key = await connection.fetch(
                "SELECT id FROM wallets WHERE create_idempotency_key = $1", key
            )
            existing = await connection.fetch(
                "SELECT id FROM wallets WHERE id = ANY($1::uuid[])", list(ids)
            )
        finally:
            await connection.close()
        assert [row["id"] for row in under_key] == [winner]
        assert [row["id"] for row in existing] == [winner]


async def test_bearer_tokens_are_compared_in_constant_time_against_every_key(
    make_app: AppFactory, aiohttp_client: AiohttpClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every request under /api/v1 compares its token's digest with hmac.compare_digest
    against every configured key's digest, all of one length (no early exit on a match, no
    ``==``, no length to time): the time taken does not tell which key came close. Wrong,
    missing and other-scheme tokens are 401."""
    keys = ("k-one", "k-two", "k-three")
    compared: list[tuple[bytes, bytes]] = []
    compare_digest = hmac.compare_digest

    def recording_compare_digest(given: bytes, key: bytes) -> bool:
        compared.append((given, key))
        return compare_digest(given, key)

    # Only keys.py's view of the module is replaced: nothing else records here.
    monkeypatch.setattr(
        keys_module,
        "hmac",
        SimpleNamespace(compare_digest=recording_compare_digest),
    )
    client: Client = await aiohttp_client(
        make_app(HttpSettings(api_keys=parse_keys(",".join(keys))))
    )
    every_key: list[bytes] | None = None

    for token in ("k-one", "k-three", "k-tw", "k-two-", "K-ONE"):
        compared.clear()
        response = await client.get(WALLETS + "/" + "0" * 8 + "-0000-4000-8000-" + "0" * 12,
                                    headers={"Authorization": f"Bearer {token}"})  # fmt: skip
        assert response.status == (404 if token in keys else 401), token
        givens = {given for given, _key in compared}
        assert len(compared) == len(keys), token
        assert len(givens) == 1, token
        assert {len(given) for given, _ in compared} == {len(key) for _, key in compared}
        compared_keys = [key for _given, key in compared]
        every_key = every_key or compared_keys
        assert compared_keys == every_key, token
        assert len(set(every_key)) == len(keys), token

    for authorization in (None, "Basic azpvbmU=", "Token k-one", "k-one", "Bearer", "Bearer  "):
        compared.clear()
        headers = {} if authorization is None else {"Authorization": authorization}
        response = await client.post(WALLETS, headers=headers)
        assert response.status == 401, authorization
        assert (await response.json())["code"] == "UNAUTHORIZED"
        assert compared == [], authorization  # refused before any comparison
    compared.clear()
    response = await client.post(WALLETS, headers={"Authorization": "bearer k-two"})
    assert response.status == 201  # the scheme is case-insensitive (RFC 9110)
    assert [key for _given, key in compared] == every_key


def _method_labels(metrics_text: str) -> set[str]:
    labels = set()
    for line in metrics_text.splitlines():
        if line.startswith("walletd_http_requests_total{"):
            labels.add(line.split('method="', 1)[1].split('"', 1)[0])
    return labels


async def test_unknown_methods_share_one_metrics_label(client: Client) -> None:
    """Requests with made-up methods are counted under one OTHER label: a client cannot
    grow the metrics' label set (and the server's memory) by inventing methods."""
    # Methods the HTTP parser knows (WebDAV and others) reach the app; made-up ones may be
    # refused by the parser before any middleware, and are then not counted at all.
    webdav_and_more = ["PROPFIND", "PROPPATCH", "MKCOL", "COPY", "MOVE", "LOCK", "UNLOCK",
                       "SEARCH", "REPORT", "MKACTIVITY", "CHECKOUT", "MERGE", "NOTIFY",
                       "SUBSCRIBE", "UNSUBSCRIBE", "PURGE", "LINK", "UNLINK"]  # fmt: skip
    for method in [*webdav_and_more, *(f"X-METHOD-{n}" for n in range(5))]:
        response = await client.request(method, "/healthz")
        assert response.status < 500, method
        response = await client.request(method, WALLETS)
        assert response.status < 500, method
    labels = _method_labels(await (await client.get("/metrics")).text())
    assert OTHER_METHOD in labels
    assert labels <= KNOWN_METHODS | {OTHER_METHOD}, labels - KNOWN_METHODS
