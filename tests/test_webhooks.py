"""Webhooks fed from the change feed: subscriptions (admin scope, secret shown once, URLs
checked against the SSRF guard), and delivery through a real receiving server on loopback
that fails in every way (500, timeout, cut connection, down): every event delivered at
least once, in feed order, none skipped, signatures verifying; the failing state, the
bounded attempts log and redelivery. Real app, real PostgreSQL, real sockets."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Final

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import AppFactory
from tests.processes import WalletdProcess
from walletd.client import verify_webhook_signature
from walletd.http.keys import parse_keys
from walletd.http.settings import HttpSettings, WebhookSettings
from walletd.http.webhooks import check_url, sign

Client = TestClient[web.Request, web.Application]
AiohttpClient = Callable[..., Any]

DEADLINE_S: Final = 20.0
# Seconds, not hours: the retry schedule shrunk so that a test sees many retries.
FAST: Final = WebhookSettings(
    allowed_hosts=frozenset({"127.0.0.1"}),
    timeout_s=0.5,
    backoff_initial_s=0.05,
    backoff_max_s=0.2,
    poll_interval_s=0.05,
    lease_ttl_s=1.0,
    page_events=7,
)


@dataclass
class Received:
    body: bytes
    signature: str
    answered: int | None  # None: no answer (timed out or cut)

    @property
    def position(self) -> str:
        return str(orjson.loads(self.body)["event"]["position"])


@dataclass
class Receiver:
    """A webhook endpoint on 127.0.0.1 whose next answers are scripted: an int status, or
    "timeout" (answers after the sender gave up), or "close" (cuts the connection); once
    the script is spent it answers 200."""

    script: list[int | str] = field(default_factory=list)
    received: list[Received] = field(default_factory=list)
    runner: web.AppRunner | None = None
    port: int = 0
    delay_s: float = 0.0  # a slow endpoint: each answer this late

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        action = self.script.pop(0) if self.script else 200
        signature = request.headers.get("Walletd-Signature", "")
        if action == "timeout":
            self.received.append(Received(body, signature, None))
            await asyncio.sleep(FAST.timeout_s * 3)
            return web.Response(status=200)
        if action == "close":
            self.received.append(Received(body, signature, None))
            assert request.transport is not None
            request.transport.abort()
            return web.Response(status=200)
        assert isinstance(action, int)
        self.received.append(Received(body, signature, action))
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        return web.Response(status=action)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self.runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", self.port)
        await site.start()
        self.port = self.runner.addresses[0][1]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    def delivered(self) -> list[str]:
        return [r.position for r in self.received if r.answered == 200]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    found = Receiver()
    await found.start()
    yield found
    await found.stop()


async def _app(
    make_app: AppFactory, aiohttp_client: AiohttpClient, webhooks: WebhookSettings = FAST,
    **settings: Any,
) -> Client:  # fmt: skip
    client: Client = await aiohttp_client(make_app(HttpSettings(webhooks=webhooks, **settings)))
    return client


async def _create(client: Client, url: str, **fields: Any) -> dict[str, Any]:
    response = await client.post("/api/v1/webhooks", json={"url": url, **fields})
    assert response.status == 201, await response.text()
    body: dict[str, Any] = await response.json()
    return body


async def _deposits(client: Client, count: int) -> None:
    wallets = []
    for _ in range(3):
        response = await client.post("/api/v1/wallets")
        assert response.status == 201
        wallets.append((await response.json())["id"])
    for index in range(count):
        response = await client.post(
            f"/api/v1/wallets/{wallets[index % 3]}/operation",
            json={"operation_type": "DEPOSIT", "amount": f"{index + 1}.00"},
        )
        assert response.status == 200


async def _feed(client: Client, types: set[str]) -> list[str]:
    """Every position of the feed, of the given types, in feed order."""
    positions: list[str] = []
    after = "0-0"
    while True:
        response = await client.get("/api/v1/events", params={"after": after, "limit": "1000"})
        page = await response.json()
        positions += [e["position"] for e in page["events"] if e["type"] in types]
        if not page["events"]:
            return positions
        after = page["next_position"]


async def _until(predicate: Callable[[], Any], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not await predicate():
        assert time.monotonic() < deadline, f"not within {DEADLINE_S} s: {what}"
        await asyncio.sleep(0.05)


async def test_a_subscription_shows_its_secret_once_and_is_validated(
    make_app: AppFactory, aiohttp_client: AiohttpClient
) -> None:
    """Create/read/update/delete; the secret is in the creation's answer only; bad input is
    a per-field 422, an unknown id 404, a malformed one 400."""
    client = await _app(make_app, aiohttp_client)
    created = await _create(client, "http://127.0.0.1:9/hook", event_types=["operation.applied"])
    assert created["secret"].startswith("whsec_")
    assert len(created["secret"]) > 40
    assert created["status"] == "active"
    assert created["event_types"] == ["operation.applied"]
    path = f"/api/v1/webhooks/{created['id']}"
    shown = await (await client.get(path)).json()
    assert "secret" not in shown
    assert shown["url"] == "http://127.0.0.1:9/hook"
    listed = await (await client.get("/api/v1/webhooks")).json()
    assert [item["id"] for item in listed["items"]] == [created["id"]]
    assert all("secret" not in item for item in listed["items"])
    patched = await client.patch(path, json={"enabled": False})
    assert (await patched.json())["status"] == "disabled"
    for bad in (
        {"url": "ftp://127.0.0.1/x"},
        {"url": "http://user:pw@127.0.0.1/x"},
        {"url": "http://127.0.0.1/x", "event_types": ["money.minted"]},
        {"url": "http://127.0.0.1/x", "event_types": []},
        {"url": "http://127.0.0.1/x", "colour": "red"},
        {"url": "http://127.0.0.1/x", "after": "yesterday"},
        {"url": 42},
    ):
        response = await client.post("/api/v1/webhooks", json=bad)
        assert response.status == 422, bad
        assert (await response.json())["code"] == "VALIDATION_ERROR"
    assert (await client.delete(path)).status == 204
    missing = await client.get(path)
    assert missing.status == 404
    assert (await missing.json())["code"] == "WEBHOOK_NOT_FOUND"
    malformed = await client.get("/api/v1/webhooks/not-a-uuid")
    assert malformed.status == 400
    assert (await malformed.json())["code"] == "INVALID_WEBHOOK_ID"


async def test_webhooks_need_the_admin_scope(
    make_app: AppFactory, aiohttp_client: AiohttpClient
) -> None:
    """A key with every other scope gets 403 on every webhook route; an admin key passes."""
    keys = parse_keys("ops:read+create+move+feed:ops-secret-1,boss:admin:admin-secret-1")
    client = await _app(make_app, aiohttp_client, api_keys=keys)
    ops = {"Authorization": "Bearer ops-secret-1"}
    admin = {"Authorization": "Bearer admin-secret-1"}
    some_id = uuid.uuid4()
    for method, path in (
        ("POST", "/api/v1/webhooks"),
        ("GET", "/api/v1/webhooks"),
        ("GET", f"/api/v1/webhooks/{some_id}"),
        ("PATCH", f"/api/v1/webhooks/{some_id}"),
        ("DELETE", f"/api/v1/webhooks/{some_id}"),
        ("GET", f"/api/v1/webhooks/{some_id}/deliveries"),
        ("POST", f"/api/v1/webhooks/{some_id}/deliveries/1/redeliver"),
    ):
        response = await client.request(method, path, headers=ops, json={})
        assert response.status == 403, (method, path)
    response = await client.post(
        "/api/v1/webhooks", headers=admin, json={"url": "http://127.0.0.1:9/"}
    )
    assert response.status == 201


def test_the_url_guard() -> None:
    """Loopback, private and link-local literals are refused unless allowlisted; with an
    allowlist, only its hosts pass."""
    for url in (
        "http://127.0.0.1/",
        "http://10.1.2.3/",
        "http://169.254.169.254/latest/meta-data",
        "http://[::1]/",
        "http://[::ffff:127.0.0.1]/",
        "http://0.0.0.0/",
    ):
        assert check_url(url, frozenset()) is not None, url
    assert check_url("https://hooks.example.com/x", frozenset()) is None
    assert check_url("http://127.0.0.1:8080/x", frozenset({"127.0.0.1"})) is None
    assert check_url("https://hooks.example.com/x", frozenset({"127.0.0.1"})) is not None


async def test_loopback_is_refused_unless_allowlisted(
    make_app: AppFactory, aiohttp_client: AiohttpClient, receiver: Receiver
) -> None:
    """Without an allowlist a loopback literal is a 422, and a name resolving to loopback
    is refused at send time (logged, nothing reaches the receiver)."""
    webhooks = WebhookSettings(
        timeout_s=0.5, backoff_initial_s=0.05, backoff_max_s=0.1, poll_interval_s=0.05,
        lease_ttl_s=1.0,
    )  # fmt: skip
    client = await _app(make_app, aiohttp_client, webhooks)
    response = await client.post("/api/v1/webhooks", json={"url": receiver.url})
    assert response.status == 422
    created = await _create(client, f"http://localhost:{receiver.port}/hook")
    await _deposits(client, 1)

    async def refused() -> bool:
        page = await client.get(f"/api/v1/webhooks/{created['id']}/deliveries")
        items = (await page.json())["items"]
        return bool(items) and "not public" in (items[0]["error"] or "")

    await _until(refused, "a refused attempt logged")
    assert receiver.received == []


async def test_every_event_arrives_in_order_through_failures(
    make_app: AppFactory, aiohttp_client: AiohttpClient, receiver: Receiver
) -> None:
    """500, a timeout, a cut connection, and the receiver down for a while: every event is
    delivered, in feed order (never going back), none skipped, each one signed."""
    client = await _app(make_app, aiohttp_client)
    receiver.script = [500, "timeout", 200, "close", 503, 200, 500]
    created = await _create(client, receiver.url, after="0-0")
    await _deposits(client, 20)
    expected = await _feed(client, {"wallet.created", "operation.applied"})
    assert len(expected) == 23

    async def some_delivered() -> bool:
        return len(receiver.delivered()) >= 8

    await _until(some_delivered, "the first events delivered")
    await receiver.stop()  # down: connections refused
    await asyncio.sleep(1.0)
    await receiver.start()  # back on the same port
    await _deposits(client, 5)
    expected = await _feed(client, {"wallet.created", "operation.applied"})

    async def all_delivered() -> bool:
        return set(receiver.delivered()) >= set(expected)

    await _until(all_delivered, "every event delivered")
    positions = [r.position for r in receiver.received]
    order = {position: index for index, position in enumerate(expected)}
    assert [order[p] for p in positions] == sorted(order[p] for p in positions)
    for request in receiver.received:
        assert verify_webhook_signature(request.body, request.signature, created["secret"])
    assert any(r.answered is None for r in receiver.received)
    log = await (await client.get(f"/api/v1/webhooks/{created['id']}/deliveries")).json()
    statuses = {item["status"] for item in log["items"]}
    assert {500, 503, 200, None} <= statuses
    ids = [int(item["id"]) for item in log["items"]]
    assert ids == sorted(ids, reverse=True)  # newest first
    shown = await (await client.get(f"/api/v1/webhooks/{created['id']}")).json()
    assert shown["position"] == expected[-1]


async def test_a_subscription_failing_for_the_retry_period_keeps_its_cursor(
    make_app: AppFactory, aiohttp_client: AiohttpClient, receiver: Receiver
) -> None:
    """Past the retry period the subscription is failing (metric 1), its cursor still on
    the undelivered event; enabling it again delivers from there."""
    webhooks = WebhookSettings(
        allowed_hosts=frozenset({"127.0.0.1"}), timeout_s=0.5, retry_period_s=0.5,
        backoff_initial_s=0.05, backoff_max_s=0.1, poll_interval_s=0.05, lease_ttl_s=1.0,
        deliveries_kept=5,
    )  # fmt: skip
    client = await _app(make_app, aiohttp_client, webhooks)
    receiver.script = [500] * 1000
    created = await _create(client, receiver.url, event_types=["operation.applied"])
    path = f"/api/v1/webhooks/{created['id']}"
    await _deposits(client, 2)

    async def failing() -> bool:
        return bool((await (await client.get(path)).json())["status"] == "failing")

    await _until(failing, "the subscription marked failing")
    shown = await (await client.get(path)).json()
    assert shown["position"] == created["position"]
    assert shown["failing_since"] is not None
    log = await (await client.get(path + "/deliveries")).json()
    assert len(log["items"]) == 5  # bounded: deliveries_kept

    async def metric() -> bool:
        text = await (await client.get("/metrics")).text()
        for family in text_string_to_metric_families(text):
            if family.name == "walletd_webhooks_failing":
                return family.samples[0].value == 1
        return False

    await _until(metric, "walletd_webhooks_failing == 1")
    receiver.script = []
    patched = await client.patch(path, json={"enabled": True})
    assert (await patched.json())["status"] == "active"
    expected = await _feed(client, {"operation.applied"})

    async def delivered() -> bool:
        return receiver.delivered() == expected

    await _until(delivered, "both events delivered after re-enabling")


async def test_redelivery_sends_the_logged_event_again(
    make_app: AppFactory, aiohttp_client: AiohttpClient, receiver: Receiver
) -> None:
    """POST .../deliveries/{id}/redeliver sends that event again, now, and logs it."""
    client = await _app(make_app, aiohttp_client)
    created = await _create(client, receiver.url, event_types=["wallet.created"])
    await client.post("/api/v1/wallets")

    path = f"/api/v1/webhooks/{created['id']}/deliveries"

    async def logged() -> bool:
        return bool((await (await client.get(path)).json())["items"])

    await _until(logged, "the delivery logged")
    first = (await (await client.get(path)).json())["items"][0]
    assert first["status"] == 200
    assert len(receiver.delivered()) == 1
    again = await client.post(f"{path}/{first['id']}/redeliver")
    assert again.status == 200
    attempt = await again.json()
    assert attempt["redelivery"] is True
    assert attempt["status"] == 200
    assert attempt["position"] == first["position"]
    assert receiver.delivered() == [first["position"]] * 2
    missing = await client.post(f"{path}/999999/redeliver")
    assert missing.status == 404
    assert (await missing.json())["code"] == "DELIVERY_NOT_FOUND"


def test_the_client_verifies_signatures() -> None:
    """The client's verifier accepts walletd's signature, and refuses another secret, a
    changed body, a stale timestamp and a malformed header."""
    body = b'{"event": {"position": "1-2"}}'
    now = int(time.time())
    header = sign("whsec_x", body, now)
    assert verify_webhook_signature(body, header, "whsec_x")
    assert verify_webhook_signature(body.decode(), header, "whsec_x")
    assert not verify_webhook_signature(body, header, "whsec_y")
    assert not verify_webhook_signature(body + b" ", header, "whsec_x")
    assert not verify_webhook_signature(body, sign("whsec_x", body, now - 301), "whsec_x")
    assert verify_webhook_signature(
        body, sign("whsec_x", body, now - 301), "whsec_x", tolerance_s=600
    )
    for bad in ("", "t=abc,v1=00", f"t={now}", "v1=00", f"t={now},v1="):
        assert not verify_webhook_signature(body, bad, "whsec_x"), bad


@pytest.mark.slow
async def test_kill_9_mid_delivery_resumes_from_the_cursor(
    database_url: str, walletd_process: Callable[..., WalletdProcess], receiver: Receiver
) -> None:
    """A real `walletd serve` killed with SIGKILL while a slow receiver takes its events:
    the next process resumes from the durable cursor: nothing skipped, feed order kept, and
    at most the event in flight sent twice (not a replay from the start)."""
    receiver.delay_s = 0.15
    args = [
        "--database-url", database_url, "--shards", "2",
        "--webhook-allowed-hosts", "127.0.0.1", "--webhook-lease-ttl", "1",
        "--webhook-poll-interval", "0.05", "--webhook-backoff-initial", "0.05",
        "--webhook-backoff-max", "0.2", "--webhook-timeout", "2",
    ]  # fmt: skip
    first = await asyncio.to_thread(walletd_process, *args)
    async with aiohttp.ClientSession(first.url) as http:
        created = await (
            await http.post("/api/v1/webhooks", json={"url": receiver.url, "after": "0-0"})
        ).json()
        wallets = [(await (await http.post("/api/v1/wallets")).json())["id"] for _ in range(3)]
        for index in range(30):
            answer = await http.post(
                f"/api/v1/wallets/{wallets[index % 3]}/operation",
                json={"operation_type": "DEPOSIT", "amount": "1.00"},
            )
            assert answer.status == 200
        page = await (await http.get("/api/v1/events", params={"limit": "1000"})).json()
    expected = [event["position"] for event in page["events"]]
    assert len(expected) == 33

    async def some() -> bool:
        return len(receiver.received) >= 8

    await _until(some, "the first events delivered")
    first.kill()
    before = len(receiver.received)
    assert before < len(expected), "all delivered before the kill: nothing tested"
    second = await asyncio.to_thread(walletd_process, *args)

    async def all_of_them() -> bool:
        return set(receiver.delivered()) >= set(expected)

    await _until(all_of_them, "every event delivered after the restart")
    arrived = [r.position for r in receiver.received]
    order = {position: index for index, position in enumerate(expected)}
    assert [order[p] for p in arrived] == sorted(order[p] for p in arrived)
    assert len(arrived) - len(set(arrived)) <= 1, arrived
    for request in receiver.received:
        assert verify_webhook_signature(request.body, request.signature, created["secret"])
    second.kill()
