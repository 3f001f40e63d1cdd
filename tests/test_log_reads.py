"""As-of balances and filtered history: against a model, over HTTP, and by their plans."""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import AppFactory
from walletd.cli.config import load_config
from walletd.cli.main import http_settings
from walletd.engine.limits import EngineLimits
from walletd.engine.log_reads import HistoryFilter
from walletd.engine.model import (
    Batch,
    NewWallet,
    OperationKind,
    OperationRecord,
    SnapshotUpdate,
)
from walletd.http.instants import parse_instant_us
from walletd.http.problems import ValidationProblem
from walletd.http.responses import format_timestamp
from walletd.http.routes_v1 import AS_OF_AHEAD_S_MAX
from walletd.http.settings import HttpSettings
from walletd.persistence.database import PoolSettings, create_pool
from walletd.persistence.log_reads import (
    AS_OF_SQL,
    EVENTS_SQL,
    FILTERED_HISTORY_SQL,
    PostgresLogReader,
)
from walletd.persistence.postgres_log import PostgresLog

Client = TestClient[web.Request, web.Application]
# The append of a batch that waits for a row lock held by the test's own transaction.
_BLOCKED_APPEND = """
SELECT count(*) FROM pg_stat_activity
 WHERE wait_event_type = 'Lock' AND query LIKE 'SELECT walletd_append_batch%'
"""

# 2020-01-01T00:00:00Z: history far older than any settle window.
_BASE_US = 1_577_836_800 * 1_000_000


class _Log:
    """A real PostgresLog and reader on one database, for writing chosen histories."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.log = PostgresLog(pool)
        self.reader = PostgresLogReader(pool)

    async def write_wallet(
        self, created_us: int, ops: list[tuple[int, OperationKind, int]]
    ) -> tuple[uuid.UUID, list[tuple[int, int, OperationKind, int]]]:
        """A wallet created at ``created_us`` with ops (at_us, kind, amount), one batch each;
        returns its id and the model rows (at_us, balance_after, kind, amount)."""
        wallet_id = uuid.uuid4()
        await self.log.append_batch(
            Batch([NewWallet(wallet_id, created_us, None, "")], [], [])
        )  # fmt: skip
        balance = 0
        model: list[tuple[int, int, OperationKind, int]] = []
        for seq, (at_us, kind, amount) in enumerate(ops, start=1):
            balance += amount if kind is OperationKind.DEPOSIT else -amount
            record = OperationRecord(wallet_id, seq, kind, amount, balance, None, at_us)
            snapshot = SnapshotUpdate(wallet_id, seq - 1, seq, balance, at_us)
            await self.log.append_batch(Batch([], [record], [snapshot]))
            model.append((at_us, balance, kind, amount))
        return wallet_id, model


@pytest.fixture
async def log_on(database_url: str) -> AsyncIterator[_Log]:
    pool = await create_pool(database_url, PoolSettings(size_max=2))
    try:
        yield _Log(pool)
    finally:
        await pool.close()


def _histories() -> st.SearchStrategy[tuple[int, list[tuple[int, OperationKind, int]]]]:
    """A creation time and ops at non-decreasing times (ties too), never overdrawn."""

    @st.composite
    def build(draw: st.DrawFn) -> tuple[int, list[tuple[int, OperationKind, int]]]:
        created = _BASE_US + draw(st.integers(0, 10_000))
        at = created
        balance = 0
        ops: list[tuple[int, OperationKind, int]] = []
        for _ in range(draw(st.integers(0, 8))):
            at += draw(st.sampled_from([0, 1, 7, 1_000, 3_600_000_000]))
            amount = draw(st.integers(1, 10_000))
            if balance >= amount and draw(st.booleans()):
                ops.append((at, OperationKind.WITHDRAW, amount))
                balance -= amount
            else:
                ops.append((at, OperationKind.DEPOSIT, amount))
                balance += amount
        return created, ops

    return build()


def _model_as_of(
    created_us: int, model: list[tuple[int, int, OperationKind, int]], at_us: int
) -> tuple[int, int] | None:
    """(balance, seq) at ``at_us``, None before the wallet existed."""
    if at_us < created_us:
        return None
    balance, seq = 0, 0
    for index, (op_at, balance_after, _kind, _amount) in enumerate(model, start=1):
        if op_at <= at_us:
            balance, seq = balance_after, index
    return balance, seq


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(history=_histories(), probes=st.lists(st.integers(-5, 5), min_size=1, max_size=6))
async def test_as_of_matches_a_model_over_random_histories(
    log_on: _Log, history: tuple[int, list[tuple[int, OperationKind, int]]], probes: list[int]
) -> None:
    """At instants before, at, between and after operations (and with none), the balance
    read from the log is the model's: the balance after the last operation at or before."""
    created, ops = history
    wallet_id, model = await log_on.write_wallet(created, ops)
    instants = {created - 1, created, created + 1}
    for at_us, _balance, _kind, _amount in model:
        instants.update({at_us - 1, at_us, at_us + 1})
    last = model[-1][0] if model else created
    instants.update(last + delta * 1_000_003 for delta in probes)
    for at_us in sorted(instants):
        found = await log_on.reader.wallet_as_of(wallet_id, at_us)
        expected = _model_as_of(created, model, at_us)
        if expected is None:
            assert found is None, at_us
            continue
        assert found is not None, at_us
        assert (found.balance, found.seq) == expected, at_us
        assert found.created_at_us == created


def _iso(micros: int) -> str:
    return format_timestamp(micros)


async def test_as_of_over_http(client: Client, log_on: _Log) -> None:
    """GET ?as_of= answers 200 from the log, 404 before creation, 422 for bad instants,
    and an untouched wallet reads 0.00."""
    hour = 3_600_000_000
    wallet_id, _model = await log_on.write_wallet(
        _BASE_US, [(_BASE_US + hour, OperationKind.DEPOSIT, 1050), (_BASE_US + 2 * hour,
                   OperationKind.WITHDRAW, 50)]
    )  # fmt: skip
    empty_id, _ = await log_on.write_wallet(_BASE_US, [])

    async def as_of(wallet: uuid.UUID | str, instant: str) -> tuple[int, dict[str, Any], Any]:
        response = await client.get(f"/api/v1/wallets/{wallet}", params={"as_of": instant})
        return response.status, await response.json(content_type=None), response.headers

    status, body, _ = await as_of(wallet_id, "2020-01-01T01:30:00Z")
    assert status == 200, body
    assert body == {
        "id": str(wallet_id),
        "balance": "10.50",
        "available": "10.50",
        "held": "0.00",
        "currency": "USD",
        "created_at": _iso(_BASE_US),
        "updated_at": _iso(_BASE_US + hour),
        "as_of": "2020-01-01T01:30:00.000000Z",
    }
    status, body, _ = await as_of(wallet_id, "2020-01-01T04:00:00+02:00")  # 02:00Z exactly
    assert (status, body["balance"]) == (200, "10.00")
    status, body, _ = await as_of(empty_id, "2024-06-30T23:59:59.999999Z")
    assert (status, body["balance"]) == (200, "0.00")
    status, body, _ = await as_of(wallet_id, "2019-12-31T23:59:59.999999Z")
    assert (status, body["code"]) == (404, "WALLET_NOT_FOUND")
    for bad in ("yesterday", "2020-01-01", "2020-01-01T00:00:00", "2020-02-30T00:00:00Z",
                "2020-01-01T00:00:00+24:00", "２０２０-01-01T00:00:00Z"):  # fmt: skip
        status, body, _ = await as_of(wallet_id, bad)
        assert (status, body["code"]) == (422, "VALIDATION_ERROR"), bad


async def _as_of(client: Client, wallet: str, at_us: int) -> tuple[int, dict[str, Any], Any]:
    response = await client.get(f"/api/v1/wallets/{wallet}", params={"as_of": _iso(at_us)})
    return response.status, await response.json(content_type=None), response.headers


def _now_us() -> int:
    return time.time_ns() // 1000


async def _deposit(client: Client, wallet: str, amount: str) -> int:
    response = await client.post(
        f"/api/v1/wallets/{wallet}/operation",
        json={"operation_type": "DEPOSIT", "amount": amount},
    )
    return response.status


async def test_as_of_an_instant_just_committed_is_answered_at_once(client: Client) -> None:
    """An as_of for the instant right after a deposit committed (and for "now") is answered
    200 at once with the deposit in the balance, not refused as too recent."""
    response = await client.post("/api/v1/wallets", json={})
    wallet = (await response.json())["id"]
    assert await _deposit(client, wallet, "10.00") == 200
    committed_us = _now_us()
    for at_us in (committed_us, _now_us()):
        started = time.monotonic()
        status, body, _ = await _as_of(client, wallet, at_us)
        assert (status, body.get("balance")) == (200, "10.00"), body
        assert time.monotonic() - started < 2.0  # nothing in flight: no wait


async def test_as_of_waits_for_a_batch_in_flight_and_includes_it(
    make_app: AppFactory, aiohttp_client: Callable[..., Any], database_url: str
) -> None:
    """A deposit's batch held in flight by a row lock: an as_of for an instant after it was
    stamped waits (never answers the balance without it), then, once the lock is released
    and the deposit commits, answers the balance with it."""
    limits = EngineLimits(pipelines=1, commit_timeout_s=60)
    client: Client = await aiohttp_client(make_app(HttpSettings(as_of_wait_s=60), limits))
    response = await client.post("/api/v1/wallets", json={})
    wallet = (await response.json())["id"]
    assert await _deposit(client, wallet, "1.00") == 200
    blocker = await asyncpg.connect(database_url)
    try:
        transaction = blocker.transaction()
        await transaction.start()
        await blocker.execute("SELECT 1 FROM wallets WHERE id = $1 FOR UPDATE", uuid.UUID(wallet))
        deposit = asyncio.create_task(_deposit(client, wallet, "5.00"))
        for _ in range(500):  # until the deposit's append waits for the lock: it is stamped
            if await blocker.fetchval(_BLOCKED_APPEND):
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("the deposit's batch never reached the lock")
        read = asyncio.create_task(_as_of(client, wallet, _now_us()))
        done, _ = await asyncio.wait((read,), timeout=1.0)
        assert not done, read.result()  # an answer now could only miss the deposit
        await transaction.rollback()
        assert await asyncio.wait_for(deposit, 30) == 200
        status, body, _ = await asyncio.wait_for(read, 30)
        assert (status, body.get("balance")) == (200, "6.00"), body
    finally:
        await blocker.close()


async def test_as_of_a_future_instant_is_refused_and_a_skewed_now_waited_for(
    client: Client,
) -> None:
    """An instant beyond the clock-skew allowance ahead is 422 AS_OF_NOT_SETTLED with a
    Retry-After of the seconds until it; one within the allowance is waited for and read."""
    response = await client.post("/api/v1/wallets", json={})
    wallet = (await response.json())["id"]
    assert await _deposit(client, wallet, "2.00") == 200
    status, body, headers = await _as_of(client, wallet, _now_us() + 300_000_000)
    assert (status, body["code"]) == (422, "AS_OF_NOT_SETTLED")
    assert 299 <= int(headers["Retry-After"]) <= 300
    ahead_us = int(AS_OF_AHEAD_S_MAX * 1_000_000) // 2
    status, body, _ = await _as_of(client, wallet, _now_us() + ahead_us)
    assert (status, body.get("balance")) == (200, "2.00"), body


def test_instants_are_parsed_exactly() -> None:
    """Offsets, lowercase separators, leap seconds and nanoseconds (cut, not rounded)."""
    assert parse_instant_us("t", "1970-01-01T00:00:00Z") == 0
    assert parse_instant_us("t", "1970-01-01t01:00:00+01:00") == 0
    assert parse_instant_us("t", "1970-01-01T00:00:00.0000019z") == 1
    assert parse_instant_us("t", "1969-12-31T23:59:59.999999Z") == -1
    assert parse_instant_us("t", "1970-01-01T00:00:60Z") == 59_000_000
    for bad in ("1970-01-01T00:00:61Z", "1970-13-01T00:00:00Z", "1970-01-01T00:00Z"):
        with pytest.raises(ValidationProblem):
            parse_instant_us("t", bad)


async def _walk(client: Client, wallet_id: uuid.UUID, **query: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor: str | None = None
    for _ in range(200):  # bounded walk
        params = dict(query) if cursor is None else {**query, "cursor": cursor}
        response = await client.get(f"/api/v1/wallets/{wallet_id}/operations", params=params)
        body = await response.json()
        assert response.status == 200, body
        assert len(body["items"]) <= int(query.get("limit", "50"))
        items.extend(body["items"])
        cursor = body["next_cursor"]
        if cursor is None:
            return items
    raise AssertionError("the walk did not end")


async def test_filtered_history_walks_match_the_model(client: Client, log_on: _Log) -> None:
    """since (inclusive), until (exclusive) and operation_type, alone and together, walked
    page by page with small limits, give exactly the model's operations, newest first."""
    minute = 60_000_000
    ops = [
        (_BASE_US + (n // 3) * minute, OperationKind.WITHDRAW if n % 4 == 3 else
         OperationKind.DEPOSIT, 100 + n)
        for n in range(40)
    ]  # fmt: skip
    wallet_id, model = await log_on.write_wallet(_BASE_US, ops)
    since, until = _BASE_US + 3 * minute, _BASE_US + 9 * minute
    cases: list[tuple[dict[str, str], HistoryFilter]] = [
        ({"since": _iso(since)}, HistoryFilter(since_us=since)),
        ({"until": _iso(until)}, HistoryFilter(until_us=until)),
        ({"since": _iso(since), "until": _iso(until)}, HistoryFilter(since, until)),
        ({"operation_type": "WITHDRAW"}, HistoryFilter(kind=OperationKind.WITHDRAW)),
        ({"operation_type": "DEPOSIT", "since": _iso(since)},
         HistoryFilter(since_us=since, kind=OperationKind.DEPOSIT)),
    ]  # fmt: skip
    for query, wanted in cases:
        expected = [
            seq
            for seq, (at_us, _balance, kind, _amount) in enumerate(model, start=1)
            if (wanted.since_us is None or at_us >= wanted.since_us)
            and (wanted.until_us is None or at_us < wanted.until_us)
            and (wanted.kind is None or kind is wanted.kind)
        ][::-1]
        for limit in ("1", "3", "50"):
            items = await _walk(client, wallet_id, limit=limit, **query)
            assert [item["seq"] for item in items] == expected, (query, limit)
    response = await client.get(
        f"/api/v1/wallets/{wallet_id}/operations", params={"operation_type": "deposit"}
    )
    assert response.status == 422
    response = await client.get(
        f"/api/v1/wallets/{wallet_id}/operations", params={"since": "2020-01-01"}
    )
    assert response.status == 422


def _rows_read(plan: dict[str, Any]) -> int:
    """Rows that scans of wallet_operations and wallets produced, over all loops."""
    own = 0
    if plan.get("Relation Name") in {"wallet_operations", "wallets"}:
        own = int(plan["Actual Rows"] * plan["Actual Loops"])
        own += int(plan.get("Rows Removed by Filter", 0))
    return own + sum(_rows_read(child) for child in plan.get("Plans", []))


async def _explain(connection: asyncpg.Connection, sql: str, *args: object) -> int:
    text = await connection.fetchval("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + sql, *args)
    return _rows_read(json.loads(text)[0]["Plan"])


_ROWS_TOUCHED = """
SELECT coalesce(sum(seq_tup_read + coalesce(idx_tup_fetch, 0)), 0)
  FROM pg_stat_xact_user_tables WHERE relname IN ('wallet_operations', 'wallets')
"""


async def _rows_touched(connection: asyncpg.Connection, sql: str, *args: object) -> int:
    """Every row the statement read from the two tables, the binary search's probes inside
    walletd_last_seq_at included (EXPLAIN does not show a function's own queries)."""
    async with connection.transaction():
        before = int(await connection.fetchval(_ROWS_TOUCHED))
        await connection.fetch(sql, *args)
        return int(await connection.fetchval(_ROWS_TOUCHED)) - before


async def test_reads_touch_a_bounded_number_of_rows(database_url: str) -> None:
    """On a 20,000-operation wallet, the rows each read takes are bounded by its page, not
    by the history: as of an early instant at most a binary search's probes (log2 20,000 =
    15, plus the wallet and the row), a filtered page two searches plus its rows, deep in
    the walk too (EXPLAIN ANALYZE: the page itself is one range scan), a feed page at most
    its limit from each source and its operation events' wallets (their currencies)."""
    wallet_id = uuid.uuid4()
    operations = 20_000
    probes_max = 15 + 3
    connection = await asyncpg.connect(database_url)
    try:
        await connection.execute(
            "INSERT INTO wallets (id, balance, seq, created_at, updated_at) VALUES "
            "($1, $2::bigint, $2::bigint, timestamptz '2020-01-01', now())",
            wallet_id,
            operations,
        )
        await connection.execute(
            "INSERT INTO wallet_operations (wallet_id, seq, kind, amount, balance_after, "
            "created_at) SELECT $1, s, 1, 1, s, timestamptz '2020-01-01' + s * interval '1 s' "
            "FROM generate_series(1, $2::bigint) s",
            wallet_id,
            operations,
        )
        await connection.execute("ANALYZE wallet_operations, wallets")
        early_us = _BASE_US + 10 * 1_000_000
        assert await _rows_touched(connection, AS_OF_SQL, wallet_id, early_us) <= probes_max
        late_until = _BASE_US + (operations - 100) * 1_000_000
        page = 51
        for cursor in (2**63 - 1, 500):
            query = (FILTERED_HISTORY_SQL, wallet_id, _BASE_US, late_until, cursor, page)
            assert await _explain(connection, *query) <= page
            assert await _rows_touched(connection, *query) <= 2 * probes_max + page
        # Each source's page, and one wallet row per operation event (its currency).
        assert await _explain(connection, EVENTS_SQL, "0", 0, 100) <= 3 * 100
        assert await _explain(connection, EVENTS_SQL, "0", 10_000, 100) <= 3 * 100
    finally:
        await connection.close()


async def test_a_kind_filter_reads_a_bounded_page_and_goes_on(client: Client, log_on: _Log) -> None:
    """With few matches far apart, a page stops after its scan bound with fewer items (even
    none) and a cursor, and the walk still finds every match."""
    ops = [(_BASE_US + n, OperationKind.DEPOSIT, 10) for n in range(60)]
    ops[5] = (_BASE_US + 5, OperationKind.WITHDRAW, 1)
    wallet_id, _model = await log_on.write_wallet(_BASE_US, ops)
    response = await client.get(
        f"/api/v1/wallets/{wallet_id}/operations",
        params={"operation_type": "WITHDRAW", "limit": "2"},
    )
    body = await response.json()
    assert response.status == 200
    assert body["items"] == []
    assert body["next_cursor"] is not None
    items = await _walk(client, wallet_id, operation_type="WITHDRAW", limit="2")
    assert [item["seq"] for item in items] == [6]


def test_as_of_wait_defaults_to_the_commit_timeout() -> None:
    """By default an as_of read waits for the commits in flight at most one commit timeout;
    WALLETD_AS_OF_WAIT sets it."""
    config = load_config(argparse.Namespace(), {"WALLETD_COMMIT_TIMEOUT": "2"})
    assert http_settings(config).as_of_wait_s == 2.0
    config = load_config(argparse.Namespace(), {"WALLETD_AS_OF_WAIT": "7.5"})
    assert http_settings(config).as_of_wait_s == 7.5
