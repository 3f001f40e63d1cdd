"""The change feed: it never skips a late commit (a naive reader does), the stream resumes,
and its bounds hold (stream cap, slow consumer, heartbeat)."""

from __future__ import annotations

import asyncio
import random
import signal
import socket
import time
import uuid
from collections.abc import Callable
from typing import Any, Final

import aiohttp
import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from tests.conftest import AppFactory
from tests.processes import WalletdProcess
from walletd.http.feed import FEED_KEY
from walletd.http.openapi import build_openapi_document
from walletd.http.settings import HttpSettings

Client = TestClient[web.Request, web.Application]
AiohttpClient = Callable[..., Any]

DEADLINE_S: Final = 20.0
_APPEND: Final = (
    "SELECT walletd_append_batch($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, "
    "$14, $15, $16, $17, $18, $19, $20, $21, $22, $23, $24)"
)


async def _append_new_wallets(connection: asyncpg.Connection, wallets: int) -> None:
    """One batch as a shard writes it: new wallets, each with a first deposit."""
    ids = [uuid.uuid4() for _ in range(wallets)]
    now_us = time.time_ns() // 1000
    at = [now_us] * wallets
    ones = [1] * wallets
    await connection.execute(
        _APPEND,
        ids, at, [None] * wallets, [""] * wallets,
        ids, ones, ones, [100] * wallets, [100] * wallets, [None] * wallets, at,
        ids, [0] * wallets, ones, [100] * wallets, at,
        [], [], [], [], [], [], [], [],  # no recorded refusals
    )  # fmt: skip


class _FeedReader:
    """Pages GET /api/v1/events from its last position, as a consumer would."""

    def __init__(self, client: Client, limit: int) -> None:
        self.client = client
        self.limit = limit
        self.after: str | None = None
        self.seen: list[tuple[str, str, Any]] = []  # (position, type, operation id/wallet)

    async def catch_up(self) -> None:
        for _ in range(10_000):  # bounded
            params = {"limit": str(self.limit)}
            if self.after is not None:
                params["after"] = self.after
            response = await self.client.get("/api/v1/events", params=params)
            body = await response.json()
            assert response.status == 200, body
            for event in body["events"]:
                key = event.get("operation_id", event["wallet_id"])
                self.seen.append((event["position"], event["type"], key))
            self.after = body["next_position"]
            if len(body["events"]) < self.limit:
                return
        raise AssertionError("the feed never ran dry")


class _NaiveReader:
    """The control: pages the log by ``id > last``, the classic sequence-gap trap."""

    def __init__(self, connection: asyncpg.Connection, limit: int) -> None:
        self.connection = connection
        self.limit = limit
        self.last = 0
        self.seen: list[int] = []

    async def catch_up(self) -> None:
        for _ in range(10_000):
            rows = await self.connection.fetch(
                "SELECT id FROM wallet_operations WHERE id > $1 ORDER BY id LIMIT $2",
                self.last,
                self.limit,
            )
            self.seen.extend(row[0] for row in rows)
            if rows:
                self.last = rows[-1][0]
            if len(rows) < self.limit:
                return
        raise AssertionError("the log never ran dry")


def _position_key(position: str) -> tuple[int, int]:
    xid, _, row_id = position.partition("-")
    return int(xid), int(row_id)


async def _log_contents(connection: asyncpg.Connection) -> tuple[set[int], set[uuid.UUID]]:
    operations = {row[0] for row in await connection.fetch("SELECT id FROM wallet_operations")}
    wallets = {row[0] for row in await connection.fetch("SELECT id FROM wallets")}
    return operations, wallets


def _check_consumer(reader: _FeedReader, operations: set[int], wallets: set[uuid.UUID]) -> None:
    """Every committed change exactly once, positions growing in the order read."""
    keys = [_position_key(position) for position, _type, _key in reader.seen]
    assert keys == sorted(keys)
    assert len(set(keys)) == len(keys)
    seen_ops = [key for _p, kind, key in reader.seen if kind == "operation.applied"]
    seen_wallets = [uuid.UUID(key) for _p, kind, key in reader.seen if kind == "wallet.created"]
    assert len(seen_ops) == len(set(seen_ops))
    assert set(seen_ops) == operations
    assert len(seen_wallets) == len(set(seen_wallets))
    assert set(seen_wallets) == wallets


async def test_late_commits_with_smaller_ids_are_never_skipped(
    client: Client, database_url: str
) -> None:
    """Two writers: the one that drew the smaller ids commits after the other, while a
    consumer of /api/v1/events and a naive ``id > last`` reader page between the commits.
    The naive reader skips the late rows; the feed delivers every change exactly once."""
    rng = random.Random(14)
    early = await asyncpg.connect(database_url)
    late = await asyncpg.connect(database_url)
    naive_connection = await asyncpg.connect(database_url)
    try:
        feed = _FeedReader(client, limit=3)
        naive = _NaiveReader(naive_connection, limit=3)
        for _round in range(12):
            transaction = early.transaction()
            await transaction.start()
            await _append_new_wallets(early, rng.randint(1, 4))  # draws the smaller ids
            await _append_new_wallets(late, rng.randint(1, 4))  # commits first (autocommit)
            await feed.catch_up()
            await naive.catch_up()
            if rng.random() < 0.2:
                await transaction.rollback()  # its ids are never used: a gap for ever
            else:
                await transaction.commit()
            await feed.catch_up()
            await naive.catch_up()
        operations, wallets = await _log_contents(naive_connection)
        skipped = operations - set(naive.seen)
        assert skipped, "the control should have skipped the late commits"
        _check_consumer(feed, operations, wallets)
    finally:
        for connection in (early, late, naive_connection):
            await connection.close()


async def test_a_consumer_beside_concurrent_shards_sees_the_whole_log(
    aiohttp_client: AiohttpClient, make_app: AppFactory, database_url: str
) -> None:
    """Four shards committing concurrent batches of deposits while a consumer pages the
    feed: once the writes stop and the feed runs dry, it has every change exactly once."""
    from walletd.engine.limits import EngineLimits

    client: Client = await aiohttp_client(make_app(limits=EngineLimits(pipelines=4)))
    wallets = []
    for _ in range(12):
        response = await client.post("/api/v1/wallets")
        wallets.append((await response.json())["id"])
    done = asyncio.Event()

    async def deposit(worker: int) -> None:
        for n in range(30):
            wallet_id = wallets[(worker * 7 + n) % len(wallets)]
            response = await client.post(
                f"/api/v1/wallets/{wallet_id}/operation",
                json={"operation_type": "DEPOSIT", "amount": "1.00"},
            )
            assert response.status == 200

    feed = _FeedReader(client, limit=7)

    async def consume() -> None:
        while not done.is_set():
            await feed.catch_up()
            await asyncio.sleep(0)

    consumer = asyncio.create_task(consume())
    await asyncio.gather(*(deposit(worker) for worker in range(8)))
    done.set()
    await consumer
    await feed.catch_up()
    connection = await asyncpg.connect(database_url)
    try:
        operations, wallet_ids = await _log_contents(connection)
    finally:
        await connection.close()
    assert len(operations) == 8 * 30
    _check_consumer(feed, operations, wallet_ids)


class _Sse:
    """Reads Server-Sent Events from a response: (id, event, data) per event, comments."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response
        self.comments: list[str] = []

    async def next_event(self) -> tuple[str, str, str]:
        fields: dict[str, str] = {}
        while True:
            line = await asyncio.wait_for(self.response.content.readline(), DEADLINE_S)
            assert line, "the stream ended"
            text = line.decode().rstrip("\n")
            if not text:
                if fields:
                    return fields["id"], fields["event"], fields["data"]
                continue
            if text.startswith(":"):
                self.comments.append(text)
                continue
            name, _, value = text.partition(": ")
            fields[name] = value


async def _deposit(client: Client, wallet_id: str) -> None:
    response = await client.post(
        f"/api/v1/wallets/{wallet_id}/operation",
        json={"operation_type": "DEPOSIT", "amount": "2.50"},
    )
    assert response.status == 200


async def test_stream_resumes_from_last_event_id_without_loss(
    aiohttp_client: AiohttpClient, make_app: AppFactory
) -> None:
    """Read part of the stream, drop the connection, resume with Last-Event-ID while new
    operations commit: every change arrives, none twice, in position order."""
    client: Client = await aiohttp_client(make_app(HttpSettings(feed_poll_interval_s=0.05)))
    wallet_id = (await (await client.post("/api/v1/wallets")).json())["id"]
    for _ in range(10):
        await _deposit(client, wallet_id)
    received: list[tuple[str, str, str]] = []
    async with client.get("/api/v1/events/stream") as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/event-stream"
        stream = _Sse(response)
        for _ in range(4):
            received.append(await stream.next_event())
    assert received[0][1] == "wallet.created"
    for _ in range(5):
        await _deposit(client, wallet_id)
    headers = {"Last-Event-ID": received[-1][0]}
    async with client.get("/api/v1/events/stream", headers=headers) as response:
        stream = _Sse(response)
        for _ in range(12):  # 7 left from before, then the 5 new ones as they commit
            received.append(await stream.next_event())
        await _deposit(client, wallet_id)  # live tail: committed after the stream opened
        received.append(await stream.next_event())
    positions = [_position_key(event_id) for event_id, _kind, _data in received]
    assert positions == sorted(positions)
    assert len(set(positions)) == len(positions) == 17
    assert [kind for _id, kind, _data in received].count("operation.applied") == 16
    last = received[-1][2]
    assert '"balance_after":"40.00"' in last
    assert '"amount":"2.50"' in last


async def test_stream_cap_answers_503_until_a_stream_closes(
    aiohttp_client: AiohttpClient, make_app: AppFactory
) -> None:
    """With feed_streams_max = 1 a second stream is 503 OVERLOADED with Retry-After; once
    the first one is closed a new one is served."""
    settings = HttpSettings(feed_streams_max=1, feed_heartbeat_s=60.0, feed_poll_interval_s=0.1)
    client: Client = await aiohttp_client(make_app(settings))
    async with client.get("/api/v1/events/stream") as first:
        assert first.status == 200
        refused = await client.get("/api/v1/events/stream")
        assert refused.status == 503
        body = await refused.json(content_type="application/problem+json")
        assert body["code"] == "OVERLOADED"
        assert refused.headers["Retry-After"] == "5"
    deadline = time.monotonic() + 5.0
    while client.app[FEED_KEY].open:  # the test server cancels the handler on close
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    async with client.get("/api/v1/events/stream") as again:
        assert again.status == 200


async def test_bad_positions_and_limits_are_422(client: Client) -> None:
    """after / Last-Event-ID must be a feed position; limit within 1..events_limit_max (as
    the OpenAPI document says)."""
    documented = build_openapi_document()["components"]["parameters"]["EventsLimit"]["schema"]
    assert HttpSettings().events_limit_max == documented["maximum"]
    assert HttpSettings().events_limit_default == documented["default"]
    for params in ({"after": "12"}, {"after": "1-2-3"}, {"after": "-1-2"}, {"limit": "0"},
                   {"limit": "1001"}, {"after": "99999999999999999999-1"}):  # fmt: skip
        response = await client.get("/api/v1/events", params=params)
        assert response.status == 422, params
    response = await client.get("/api/v1/events/stream", headers={"Last-Event-ID": "x"})
    assert response.status == 422
    # Last-Event-ID wins over `after`, but a malformed `after` is still refused.
    response = await client.get(
        "/api/v1/events/stream", params={"after": "x"}, headers={"Last-Event-ID": "0-0"}
    )
    assert response.status == 422
    body = await (await client.get("/api/v1/events")).json()
    assert body == {"events": [], "next_position": "0-0"}


async def test_idle_stream_sends_heartbeats(
    aiohttp_client: AiohttpClient, make_app: AppFactory
) -> None:
    """A stream with nothing to send writes a comment every feed_heartbeat_s."""
    settings = HttpSettings(feed_heartbeat_s=0.1, feed_poll_interval_s=0.05)
    client: Client = await aiohttp_client(make_app(settings))
    async with client.get("/api/v1/events/stream") as response:
        line = await asyncio.wait_for(response.content.readline(), DEADLINE_S)
        assert line == b": heartbeat\n"


async def test_a_slow_consumer_is_disconnected_and_resumes(
    aiohttp_client: AiohttpClient, make_app: AppFactory, database_url: str
) -> None:
    """A consumer that stops reading fills its bounded buffer; after feed_write_timeout_s
    the server drops it (the stream slot is freed), and it resumes from the last event it
    fully received with nothing lost."""
    settings = HttpSettings(feed_stream_buffer_bytes=4096, feed_write_timeout_s=0.3)
    client: Client = await aiohttp_client(make_app(settings))
    connection = await asyncpg.connect(database_url)
    try:
        for _ in range(30):
            await _append_new_wallets(connection, 100)
        operations, wallets = await _log_contents(connection)
    finally:
        await connection.close()
    server = client.server
    assert isinstance(server, TestServer)
    slow = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.settimeout(DEADLINE_S)
    slow.connect((str(server.host), int(server.port or 0)))
    received = b""
    try:
        # HTTP/1.0: the body is the bare event stream, no chunked framing to strip.
        slow.sendall(b"GET /api/v1/events/stream HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        streams = client.app[FEED_KEY]
        deadline = time.monotonic() + DEADLINE_S
        while streams.slow_disconnects == 0:  # not reading meanwhile: the buffer fills
            assert time.monotonic() < deadline, "the slow consumer was never dropped"
            await asyncio.sleep(0.05)
        while chunk := await asyncio.to_thread(slow.recv, 65536):
            received += chunk
    except ConnectionResetError:
        pass  # aborted by the server: what was delivered before it is in ``received``
    finally:
        slow.close()
    assert streams.open == 0
    metrics = await (await client.get("/metrics")).text()
    assert "walletd_feed_slow_consumers_disconnected_total 1.0" in metrics
    assert "walletd_feed_streams_open 0.0" in metrics
    complete = received.rpartition(b"\n\n")[0].decode(errors="replace")
    ids = [line[4:] for line in complete.split("\n") if line.startswith("id: ")]
    first_part, last_id = len(ids), ids[-1]
    assert 0 < first_part < len(operations) + len(wallets)
    feed = _FeedReader(client, limit=1000)
    feed.after = last_id
    await feed.catch_up()
    assert first_part + len(feed.seen) == len(operations) + len(wallets)


@pytest.mark.slow
async def test_sigterm_ends_open_streams_at_once(
    walletd_process: Callable[..., WalletdProcess], database_url: str
) -> None:
    """A real walletd with an open stream exits 0 on SIGTERM within seconds: the stream is
    ended at shutdown instead of holding the 30 s drain."""
    process = walletd_process("--database-url", database_url)
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{process.url}/api/v1/events/stream") as response,
    ):
        assert response.status == 200
        started = time.monotonic()
        process.process.send_signal(signal.SIGTERM)
        rest = await asyncio.wait_for(response.content.read(), DEADLINE_S)
        assert rest == b""  # the stream ended cleanly
        exit_code = await asyncio.to_thread(process.process.wait, DEADLINE_S)
    assert exit_code == 0, process.log()
    assert time.monotonic() - started < 10.0
    assert "Traceback" not in process.log()


@pytest.mark.slow
async def test_a_real_server_frees_a_closed_streams_slot_at_its_next_poll(
    walletd_process: Callable[..., WalletdProcess], database_url: str
) -> None:
    """`walletd serve` does not cancel handlers when a client leaves (aiohttp's test server
    does): the stream notices at its next poll, well before a heartbeat would fail."""
    process = walletd_process(
        "--database-url", database_url, "--feed-heartbeat", "600", "--feed-poll-interval", "0.1"
    )
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{process.url}/api/v1/events/stream") as response:
            assert response.status == 200
        deadline = time.monotonic() + 5.0
        while True:
            async with session.get(f"{process.url}/metrics") as metrics:
                if "walletd_feed_streams_open 0.0" in await metrics.text():
                    break
            assert time.monotonic() < deadline, "the closed stream still holds its slot"
            await asyncio.sleep(0.1)


async def test_transfer_legs_are_events_naming_their_transfer(client: Client) -> None:
    """A transfer's legs reach the feed as operation events of their kind, naming the
    transfer and never the internal leg key."""
    wallets = []
    for _ in range(2):
        wallets.append((await (await client.post("/api/v1/wallets")).json())["id"])
    deposit = {"operation_type": "DEPOSIT", "amount": "5.00"}
    assert (
        await client.post(f"/api/v1/wallets/{wallets[0]}/operation", json=deposit)
    ).status == 200
    response = await client.post(
        "/api/v1/transfers",
        json={"from_wallet_id": wallets[0], "to_wallet_id": wallets[1], "amount": "2.00"},
    )
    assert response.status == 201, await response.text()
    transfer_id = (await response.json())["id"]
    # The feed shows a change once every older transaction has ended: poll until the three
    # operations (the deposit and both legs) are there.
    deadline = asyncio.get_running_loop().time() + DEADLINE_S
    while True:
        response = await client.get("/api/v1/events", params={"limit": "50"})
        events = (await response.json())["events"]
        if sum(e["type"] == "operation.applied" for e in events) >= 3:
            break
        assert asyncio.get_running_loop().time() < deadline, events
        await asyncio.sleep(0.05)
    by_type = {e.get("operation_type"): e for e in events if e["type"] == "operation.applied"}
    assert by_type["TRANSFER_OUT"]["transfer_id"] == transfer_id
    assert by_type["TRANSFER_IN"]["transfer_id"] == transfer_id
    assert by_type["TRANSFER_IN"]["wallet_id"] == wallets[1]
    assert by_type["TRANSFER_OUT"]["idempotency_key"] is None
    assert by_type["DEPOSIT"]["transfer_id"] is None
