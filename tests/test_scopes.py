"""API keys with names and scopes: who may call what, quotas per key, and secrets kept out
of logs. Real app, real PostgreSQL, real sockets."""

from __future__ import annotations

import argparse
import asyncio
import io
import logging
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import aiohttp
import asyncpg
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer, make_mocked_request
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import AppFactory
from tests.processes import walletd_command
from tests.test_cluster import serve
from tests.test_cluster_transfers import owner_of, post_transfer, wallets_on_each
from walletd.cli.config import load_config
from walletd.cli.main import main
from walletd.http.access_log import access_log_options
from walletd.http.edge import is_protected_path
from walletd.http.feed import FEED_KEY
from walletd.http.keys import (
    API_KEYS_MAX,
    ROUTE_SCOPES,
    ApiKey,
    RateLimiter,
    Scope,
    check_route_scopes,
    parse_keys,
)
from walletd.http.openapi import build_openapi_document
from walletd.http.settings import HttpSettings
from walletd.http.state import STATE_KEY

Client = TestClient[web.Request, web.Application]
AiohttpClient = Callable[..., Any]

SECRETS: Final = {scope: f"secret-{scope.value}-{uuid.uuid4().hex}" for scope in Scope}
ALL_SECRET: Final = f"secret-all-{uuid.uuid4().hex}"
# One key per scope, named after it, and one holding every scope.
KEYS_TEXT: Final = ",".join(
    [f"{scope.value}-only:{scope.value}:{secret}" for scope, secret in SECRETS.items()]
    + [f"ops:read+create+move+feed:{ALL_SECRET}"]
)


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


async def _funded(client: Client, secret: str) -> str:
    created = await client.post("/api/v1/wallets", headers=bearer(secret))
    assert created.status == 201
    wallet_id: str = (await created.json())["id"]
    deposit = await client.post(
        f"/api/v1/wallets/{wallet_id}/operation",
        json={"operation_type": "DEPOSIT", "amount": "100.00"},
        headers=bearer(secret),
    )
    assert deposit.status == 200
    return wallet_id


async def _hold(client: Client, wallet_id: str) -> str:
    held = await client.post(
        f"/api/v1/wallets/{wallet_id}/holds", json={"amount": "1.00"}, headers=bearer(ALL_SECRET)
    )
    assert held.status == 201
    hold_id: str = (await held.json())["id"]
    return hold_id


def _body(operation_id: str, wallet_id: str, other_id: str) -> Any:
    """A valid body for each operation that takes one, so an allowed call does its work."""
    return {
        "applyOperation": {"operation_type": "DEPOSIT", "amount": "1.00"},
        "bulkOperations": {
            "items": [{"wallet_id": wallet_id, "operation_type": "DEPOSIT", "amount": "1.00"}]
        },
        "createTransfer": {"from_wallet_id": wallet_id, "to_wallet_id": other_id, "amount": "1.00"},
        "createHold": {"amount": "1.00"},
        "createPayment": {
            "postings": [{"from_wallet_id": wallet_id, "to_wallet_id": other_id, "amount": "1.00"}]
        },
    }.get(operation_id)


async def _call(
    client: Client, method: str, path: str, secret: str, body: Any
) -> tuple[int, dict[str, Any] | None]:
    async with client.request(method, path, json=body, headers=bearer(secret)) as response:
        if response.content_type == "text/event-stream":
            return response.status, None  # an endless stream: its status is the answer
        payload = await response.read()
        parsed = orjson.loads(payload) if payload else None
        return response.status, parsed


def _documented_operations() -> list[tuple[str, str, dict[str, Any]]]:
    paths: dict[str, dict[str, dict[str, Any]]] = build_openapi_document()["paths"]
    return [
        (method.upper(), path, operation)
        for path, methods in paths.items()
        for method, operation in methods.items()
        if is_protected_path(path)
    ]


async def test_every_documented_route_declares_the_scope_the_server_enforces(
    make_app: AppFactory, aiohttp_client: AiohttpClient
) -> None:
    """Walks the OpenAPI document: every /api/v1 operation names one scope, its handler
    declares the same one (a route missing from the scope table fails here), a read-only
    key gets 2xx/404 on every read and 403 FORBIDDEN on every write, and each one-scope key
    passes exactly the routes of its scope."""
    client: Client = await aiohttp_client(make_app(HttpSettings(api_keys=parse_keys(KEYS_TEXT))))
    app = client.app
    wallet_id = await _funded(client, ALL_SECRET)
    other_id = await _funded(client, ALL_SECRET)
    operations = _documented_operations()
    assert len(operations) >= 12
    # Every protected route the app serves is documented (the internal legs route aside,
    # which is not a client route), so none escapes the walk below.
    documented = {(method, path) for method, path, _ in operations}
    for route in app.router.routes():
        canonical = route.resource.canonical if route.resource is not None else ""
        if canonical.startswith("/api/v1") and route.method != "HEAD":
            templated = canonical.replace("{wallet_id:[^/]+}", "{wallet_id}").replace(
                "{hold_id:[^/]+}", "{hold_id}"
            )
            assert (route.method, templated) in documented, canonical
    for method, template, operation in operations:
        # Bearer auth is optional and stated once at the top level; the scope is x-scope.
        assert "security" not in operation, template
        scope = Scope(operation["x-scope"])
        hold_id = await _hold(client, wallet_id)
        path = template.format(
            wallet_id=wallet_id, hold_id=hold_id, transfer_id=uuid.uuid4(),
            webhook_id=uuid.uuid4(), delivery_id=1, seq=1, payment_id=uuid.uuid4(),
        )  # fmt: skip
        resource = (await app.router.resolve(_fake_request(method, path))).route.handler
        assert ROUTE_SCOPES.get(resource) is scope, f"{method} {template}"
        body = _body(operation["operationId"], wallet_id, other_id)
        for key_scope, secret in SECRETS.items():
            status, answer = await _call(client, method, path, secret, body)
            if key_scope is scope:
                assert status not in (401, 403), (method, template, key_scope, answer)
                assert status < 500, (method, template, answer)
            else:
                assert status == 403, (method, template, key_scope, answer)
                assert answer is not None
                assert answer["code"] == "FORBIDDEN"
            if key_scope is Scope.READ and method == "GET" and scope is Scope.READ:
                assert status in (200, 404), (template, answer)
            if key_scope is Scope.READ and method != "GET":
                assert status == 403, template


def _fake_request(method: str, path: str) -> web.Request:
    return make_mocked_request(method, path)


def test_an_app_with_a_protected_route_without_a_scope_does_not_start() -> None:
    """check_route_scopes (run by create_app) refuses a /api/v1 route that declares no
    scope, so a new route cannot ship open to every key."""
    app = web.Application()

    async def undeclared(_request: web.Request) -> web.Response:
        return web.Response()

    app.router.add_get("/api/v1/new-thing", undeclared)
    with pytest.raises(RuntimeError, match="declares no scope"):
        check_route_scopes(app, is_protected_path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("billing:mvoe:s3cret-value", "unknown scope 'mvoe'"),
        ("billing:read:s3cret-value,billing:move:0ther-value", "'billing' is declared twice"),
        ("a:read:s3cret-value,b:move:s3cret-value", "same secret"),
        ("billing:s3cret-value", "expected name:scope+scope:secret"),
        ("bad name:read:s3cret-value", "key name must match"),
        ("billing:read:", "secret must be non-empty"),
        ("billing::s3cret-value", "unknown scope ''"),
    ],
)
def test_a_malformed_key_list_is_refused_at_start(
    text: str, message: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """walletd refuses to start (exit 2, one line naming the entry) on a malformed entry,
    a duplicate name or secret, or an unknown scope; the line never shows a secret."""
    monkeypatch.setenv("WALLETD_API_KEYS", text)
    code = main(["migrate"])  # any command: the configuration is read before anything runs
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("walletd: error: WALLETD_API_KEYS"), err
    assert message in err, err
    assert "s3cret" not in err
    assert "0ther" not in err
    assert err.count("\n") == 1


def test_a_keys_file_is_read_and_checked_with_the_environment(tmp_path: Path) -> None:
    """WALLETD_API_KEYS_FILE: one key per line, comments and blanks skipped; a name or
    secret also declared in WALLETD_API_KEYS, or a bad line, is refused with its line."""
    keys_file = tmp_path / "keys"
    keys_file.write_text("# billing\nbilling:read+move:b-secret-1\n\nreports:read:r-secret-2\n")
    keys_file.chmod(0o600)
    flags = _flags()
    config = load_config(flags, {"WALLETD_API_KEYS_FILE": str(keys_file)})
    assert [(k.name, sorted(s.value for s in k.scopes)) for k in config.client_keys] == [
        ("billing", ["move", "read"]),
        ("reports", ["read"]),
    ]
    both = load_config(
        flags, {"WALLETD_API_KEYS_FILE": str(keys_file), "WALLETD_API_KEYS": "ops:feed:r-secret-2"}
    )
    with pytest.raises(ValueError, match="same secret"):
        _ = both.client_keys
    keys_file.write_text("billing:read+move:b-secret-1\nreports:raed:r-secret-2\n")
    with pytest.raises(ValueError, match=r"keys line 2 \(key 'reports'\): unknown scope"):
        _ = config.client_keys
    missing = load_config(flags, {"WALLETD_API_KEYS_FILE": str(tmp_path / "absent")})
    with pytest.raises(ValueError, match="WALLETD_API_KEYS_FILE: cannot read it"):
        _ = missing.client_keys


def _flags() -> argparse.Namespace:
    return argparse.Namespace()


def test_a_bare_secret_holds_every_client_scope_under_a_name_that_is_not_the_secret() -> None:
    """The old form (a bare secret) keeps working: every client scope, named by position;
    the secret appears in no repr (a logged config or settings object)."""
    keys = parse_keys("old-secret-one, named:read:new-secret ,old-secret-two")
    assert [key.name for key in keys] == ["key-1", "named", "key-3"]
    assert keys[0].scopes == frozenset(Scope)
    assert keys[1].scopes == frozenset({Scope.READ})
    shown = repr(keys) + repr(HttpSettings(api_keys=keys))
    assert "secret" not in shown.replace("secret=", "")
    assert "old-secret" not in shown
    with pytest.raises(ValueError, match=f"at most {API_KEYS_MAX}"):
        parse_keys(",".join(f"k{i}:read:s{i}" for i in range(API_KEYS_MAX + 1)))
    assert isinstance(keys[0], ApiKey)


async def test_secrets_never_reach_the_access_log_the_logs_or_metrics(
    make_app: AppFactory, aiohttp_client: AiohttpClient, caplog: pytest.LogCaptureFixture
) -> None:
    """The access log names the key (``"key": <name>``), never its secret; nor does any log
    record or /metrics (labels use the name), for allowed, forbidden and wrong requests."""
    stream = io.StringIO()
    server = TestServer(make_app(HttpSettings(api_keys=parse_keys(KEYS_TEXT))))
    await server.start_server(**access_log_options(True, stream))
    client: Client = await aiohttp_client(server)
    caplog.set_level(logging.DEBUG)
    read_secret = SECRETS[Scope.READ]
    created = await client.post("/api/v1/wallets", headers=bearer(ALL_SECRET))
    wallet_id = (await created.json())["id"]
    forbidden = await client.post("/api/v1/wallets", headers=bearer(read_secret))
    assert forbidden.status == 403
    assert read_secret not in await forbidden.text()
    near_miss = await client.get(f"/api/v1/wallets/{wallet_id}", headers=bearer(read_secret + "x"))
    assert near_miss.status == 401
    metrics = await (await client.get("/metrics")).text()
    for _ in range(100):  # bounded: aiohttp logs after the response is written
        if stream.getvalue().count("\n") >= 4:
            break
        await asyncio.sleep(0.01)
    lines = [orjson.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["key"] for line in lines[:3]] == ["ops", "read-only", None]
    everything = stream.getvalue() + caplog.text + metrics
    for secret in (*SECRETS.values(), ALL_SECRET):
        assert secret not in everything
    families = {f.name: f for f in text_string_to_metric_families(metrics)}
    samples = {
        (s.labels["key"], s.labels["result"]): s.value
        for s in families["walletd_key_requests"].samples
    }
    assert samples[("ops", "ALLOWED")] == 1
    assert samples[("read-only", "FORBIDDEN")] == 1


async def test_a_key_over_its_rate_gets_429_with_retry_after(
    make_app: AppFactory, aiohttp_client: AiohttpClient
) -> None:
    """With a per-key rate, a key past its burst is 429 RATE_LIMITED with Retry-After, and
    nothing is applied; another key's bucket is its own."""
    settings = HttpSettings(api_keys=parse_keys(KEYS_TEXT), key_rate_per_s=0.5, key_rate_burst=3)
    client: Client = await aiohttp_client(make_app(settings))
    statuses = []
    for _ in range(4):
        response = await client.post("/api/v1/wallets", headers=bearer(ALL_SECRET))
        statuses.append(response.status)
    assert statuses == [201, 201, 201, 429]
    assert response.headers["Retry-After"] == "2"
    assert response.headers["Content-Type"] == "application/problem+json"
    body = await response.json()
    assert body["code"] == "RATE_LIMITED"
    assert body["status"] == 429
    other = await client.post("/api/v1/wallets", headers=bearer(SECRETS[Scope.CREATE]))
    assert other.status == 201


def test_the_token_bucket_refills_at_its_rate_up_to_its_burst() -> None:
    """take() spends a token per request, refills rate_per_s a second, never past burst,
    and tells the whole seconds until the next token."""
    limiter = RateLimiter(["a"], rate_per_s=2.0, burst=2, now_s=0.0)
    assert [limiter.take("a", 0.0) for _ in range(3)] == [0, 0, 1]
    assert limiter.take("a", 0.5) == 0  # one token back after half a second
    assert limiter.take("a", 100.0) == 0
    assert limiter.take("a", 100.0) == 0
    assert limiter.take("a", 100.0) == 1  # the burst caps the refill at 2


async def test_one_key_cannot_hold_every_feed_stream(
    make_app: AppFactory, aiohttp_client: AiohttpClient
) -> None:
    """Past feed_streams_per_key_max open streams a key gets 429 TOO_MANY_STREAMS with
    Retry-After, while another key still opens one; a closed stream frees its slot."""
    settings = HttpSettings(
        api_keys=parse_keys(KEYS_TEXT), feed_streams_max=8, feed_streams_per_key_max=2
    )
    client: Client = await aiohttp_client(make_app(settings))
    path = "/api/v1/events/stream"
    feed = SECRETS[Scope.FEED]
    first = await client.get(path, headers=bearer(feed))
    second = await client.get(path, headers=bearer(feed))
    assert (first.status, second.status) == (200, 200)
    third = await client.get(path, headers=bearer(feed))
    assert third.status == 429
    assert third.headers["Retry-After"] == "5"
    assert (await third.json())["code"] == "TOO_MANY_STREAMS"
    other = await client.get(path, headers=bearer(ALL_SECRET))
    assert other.status == 200
    first.close()
    for _ in range(200):  # bounded: the server notices the closed stream within a poll
        again = await client.get(path, headers=bearer(feed))
        if again.status == 200:
            break
        await asyncio.sleep(0.05)
    else:
        pytest.fail("the closed stream's slot was never freed")
    for response in (again, second, other):
        response.close()
    streams = client.app[FEED_KEY]
    for _ in range(200):  # the table forgets a key with no stream open (bounded by keys)
        if streams.open == 0 and not streams.by_key:
            break
        await asyncio.sleep(0.05)
    assert (streams.open, streams.by_key) == (0, {})


async def test_history_and_feed_name_the_key_that_moved_the_money(
    make_app: AppFactory, aiohttp_client: AiohttpClient
) -> None:
    """Every log row names the key whose request wrote it: a deposit and a hold capture by
    one key, a transfer (both legs), a hold, a bulk item and a recorded refusal by another;
    the history,
    the feed and a transfer read back from storage show the key's name."""
    keys = parse_keys("alice:read+create+move+feed:alice-secret-1,bob:read+move:bob-secret-2")
    client: Client = await aiohttp_client(make_app(HttpSettings(api_keys=keys)))
    alice, bob = bearer("alice-secret-1"), bearer("bob-secret-2")
    first, second = [
        (await (await client.post("/api/v1/wallets", headers=alice)).json())["id"] for _ in range(2)
    ]
    deposit = await client.post(
        f"/api/v1/wallets/{first}/operation",
        json={"operation_type": "DEPOSIT", "amount": "100.00"},
        headers=alice,
    )
    assert deposit.status == 200
    transfer = await client.post(
        "/api/v1/transfers",
        json={"from_wallet_id": first, "to_wallet_id": second, "amount": "30.00"},
        headers=bob,
    )
    assert transfer.status == 201
    transfer_id = (await transfer.json())["id"]
    held = await client.post(
        f"/api/v1/wallets/{first}/holds", json={"amount": "10.00"}, headers=bob
    )
    hold_id = (await held.json())["id"]
    captured = await client.post(
        f"/api/v1/holds/{hold_id}/capture", json={"amount": "4.00"}, headers=alice
    )
    assert captured.status == 200
    refused = await client.post(
        f"/api/v1/wallets/{first}/operation",
        json={"operation_type": "WITHDRAW", "amount": "1000.00"},
        headers={**bob, "Idempotency-Key": "too-much"},
    )
    assert refused.status == 409
    bulk = await client.post(
        "/api/v1/operations/bulk",
        json={"items": [{"wallet_id": second, "operation_type": "DEPOSIT", "amount": "2.00"}]},
        headers=bob,
    )
    assert bulk.status == 200

    expected = {
        (first, "DEPOSIT"): "alice",
        (first, "TRANSFER_OUT"): "bob",
        (second, "TRANSFER_IN"): "bob",
        (second, "DEPOSIT"): "bob",
        (first, "HOLD"): "bob",
        (first, "CAPTURE"): "alice",
        (first, "RELEASE"): "alice",
    }
    history: dict[tuple[str, str], str | None] = {}
    for wallet in (first, second):
        page = await (
            await client.get(f"/api/v1/wallets/{wallet}/operations", headers=alice)
        ).json()
        history.update({(wallet, item["operation_type"]): item["actor"] for item in page["items"]})
    assert history == expected
    events = await (await client.get("/api/v1/events", headers=alice)).json()
    feed = {
        (event["wallet_id"], event["operation_type"]): event["actor"]
        for event in events["events"]
        if event["type"] == "operation.applied"
    }
    assert feed == expected
    services = client.app[STATE_KEY].services
    stored = (await services.log.load_transfers([uuid.UUID(transfer_id)]))[uuid.UUID(transfer_id)]
    assert stored.actor == "bob"  # what a re-drive of its credit would carry
    found = await services.log.find_operations([(uuid.UUID(first), "too-much")])
    assert found[(uuid.UUID(first), "too-much")].actor == "bob"


async def test_without_keys_the_actor_is_null(client: Client) -> None:
    """With auth off no key names the rows: actor is null in history and the feed."""
    wallet_id = (await (await client.post("/api/v1/wallets")).json())["id"]
    await client.post(
        f"/api/v1/wallets/{wallet_id}/operation",
        json={"operation_type": "DEPOSIT", "amount": "1.00"},
    )
    page = await (await client.get(f"/api/v1/wallets/{wallet_id}/operations")).json()
    assert [item["actor"] for item in page["items"]] == [None]
    events = await (await client.get("/api/v1/events")).json()
    applied = [e for e in events["events"] if e["type"] == "operation.applied"]
    assert [e["actor"] for e in applied] == [None]


@pytest.mark.slow
async def test_a_transfer_between_two_processes_names_its_key_on_both_legs(
    database_url: str, tmp_path: Path
) -> None:
    """Two walletd processes read one keys file (--api-keys-file): a transfer between
    wallets they each own completes, both legs' rows name the key that asked for it (the
    credit applied by the other process included), a read-only key is 403 there too, and
    neither process's log shows a secret."""
    payer, auditor = f"payer-{uuid.uuid4().hex}", f"auditor-{uuid.uuid4().hex}"
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"payer:read+create+move:{payer}\nauditor:read:{auditor}\n")
    keys_file.chmod(0o600)
    servers = [
        serve(database_url, tmp_path, "--api-keys-file", str(keys_file), "--access-log",
              "--transfer-redrive-interval", "60")
        for _ in "ab"
    ]  # fmt: skip
    urls = [server.url for server in servers]
    try:
        timeout = aiohttp.ClientTimeout(total=20)
        async with aiohttp.ClientSession(timeout=timeout, headers=bearer(payer)) as http:
            table, wallets = await wallets_on_each(http, database_url, urls, 1, fund=100)
            sender, receiver = wallets[urls[0]][0], wallets[urls[1]][0]
            assert owner_of(table, sender) != owner_of(table, receiver)
            body = {"from_wallet_id": sender, "to_wallet_id": receiver, "amount": "1.25"}
            status, answer, _ = await post_transfer(http, urls[0], body, "t-1")
            assert (status, answer["status"]) == (201, "COMPLETED")
            async with http.post(
                f"{urls[1]}/api/v1/transfers", json=body, headers=bearer(auditor)
            ) as refused:
                assert refused.status == 403
        connection = await asyncpg.connect(database_url)
        try:
            rows = await connection.fetch(
                "SELECT kind, actor FROM wallet_operations WHERE wallet_id = ANY($1::uuid[])",
                [uuid.UUID(sender), uuid.UUID(receiver)],
            )
        finally:
            await connection.close()
        # Two keyed deposits, the debit (3) and the credit (4), each by the payer.
        assert sorted((row["kind"], row["actor"]) for row in rows) == [
            (1, "payer"), (1, "payer"), (3, "payer"), (4, "payer"),
        ]  # fmt: skip
    finally:
        for server in servers:
            server.terminate()
    logs = "".join(server.log() for server in servers)
    assert '"key":"payer"' in logs
    assert payer not in logs
    assert auditor not in logs


@pytest.mark.slow
def test_walletd_serve_refuses_a_bad_keys_file_with_one_line(tmp_path: Path) -> None:
    """The real command: a keys file with an unknown scope stops `walletd serve` before it
    starts anything (exit 2), with one line naming the file, the line and the key, and
    not the secret."""
    keys_file = tmp_path / "keys"
    keys_file.write_text("ok:read:first-s3cret\nbilling:read+mvoe:second-s3cret\n")
    done = subprocess.run(
        walletd_command(["serve", "--port", "0", "--api-keys-file", str(keys_file)]),
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"walletd: error: {keys_file} line 2 (key 'billing'): unknown scope 'mvoe'; "
        "known: read, create, move, feed, admin"
    )
