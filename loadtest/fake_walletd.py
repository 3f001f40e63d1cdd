"""A tiny in-memory stand-in for walletd, to exercise the load tools before the server exists.

Accepts the same command line as `walletd serve` (`--data-dir` is ignored), so the launchers
can run it with `--walletd-cmd "python -m loadtest.fake_walletd"`. `--drop-every N`
acknowledges every Nth deposit without applying it: a deliberate lost write, to prove that
the reconciliation of run_locust and bench catches one.

    python -m loadtest.fake_walletd serve --port 8002 [--drop-every 100]
"""

from __future__ import annotations

import argparse
import uuid
from dataclasses import dataclass, field

import orjson
from aiohttp import web

from loadtest.ledger import format_cents, parse_cents
from loadtest.serving import run

__all__ = ["create_app", "main"]

STAMP = "2025-01-19T10:00:00.000000Z"
JSON = "application/json"
PROBLEM = "application/problem+json"


@dataclass(slots=True)
class Store:
    drop_every: int = 0
    balances: dict[str, int] = field(default_factory=dict)
    # (wallet, key) -> (request fingerprint, status, body)
    replies: dict[tuple[str, str], tuple[bytes, int, bytes]] = field(default_factory=dict)
    deposits: int = 0
    ops: int = 0


STORE = web.AppKey("store", Store)


def _wallet(wallet_id: str, cents: int) -> bytes:
    body = {"id": wallet_id, "balance": format_cents(cents), "created_at": STAMP}
    return orjson.dumps({**body, "updated_at": STAMP})


def _problem(status: int, code: str, path: str) -> web.Response:
    body = {"type": "about:blank", "title": code, "status": status, "detail": code}
    return web.Response(
        status=status,
        body=orjson.dumps({**body, "code": code, "instance": path}),
        content_type=PROBLEM,
    )


async def create_wallet(request: web.Request) -> web.Response:
    store = request.app[STORE]
    raw = await request.read()
    wallet_id = str(orjson.loads(raw).get("id", uuid.uuid4())) if raw else str(uuid.uuid4())
    if wallet_id in store.balances:
        return _problem(409, "WALLET_ALREADY_EXISTS", request.path)
    store.balances[wallet_id] = 0
    headers = {"Location": f"/api/v1/wallets/{wallet_id}"}
    return web.Response(status=201, body=_wallet(wallet_id, 0), content_type=JSON, headers=headers)


async def get_wallet(request: web.Request) -> web.Response:
    wallet_id = request.match_info["wallet_id"]
    try:
        uuid.UUID(wallet_id)
    except ValueError:
        return _problem(400, "INVALID_WALLET_ID", request.path)
    cents = request.app[STORE].balances.get(wallet_id)
    if cents is None:
        return _problem(404, "WALLET_NOT_FOUND", request.path)
    return web.Response(body=_wallet(wallet_id, cents), content_type=JSON)


async def history(request: web.Request) -> web.Response:
    if request.match_info["wallet_id"] not in request.app[STORE].balances:
        return _problem(404, "WALLET_NOT_FOUND", request.path)
    return web.Response(body=b'{"items": [], "next_cursor": null}', content_type=JSON)


def _apply(store: Store, wallet_id: str, body: dict[str, object], path: str) -> web.Response:
    cents = parse_cents(str(body["amount"]))
    kind = body.get("operation_type", body.get("operationType"))
    balance = store.balances[wallet_id]
    if kind == "WITHDRAW" and cents > balance:
        return _problem(409, "INSUFFICIENT_FUNDS", path)
    store.ops += 1
    if kind == "DEPOSIT":
        store.deposits += 1
        if not (store.drop_every and store.deposits % store.drop_every == 0):
            balance += cents
    else:
        balance -= cents
    store.balances[wallet_id] = balance
    return web.Response(body=_wallet(wallet_id, balance), content_type=JSON)


async def operate(request: web.Request) -> web.Response:
    store, wallet_id = request.app[STORE], request.match_info["wallet_id"]
    if wallet_id not in store.balances:
        return _problem(404, "WALLET_NOT_FOUND", request.path)
    raw = await request.read()
    key = request.headers.get("Idempotency-Key")
    if key is not None and (wallet_id, key) in store.replies:
        fingerprint, status, body = store.replies[(wallet_id, key)]
        if fingerprint != raw:
            return _problem(422, "IDEMPOTENCY_KEY_REUSED", request.path)
        headers = {"Idempotent-Replayed": "true"}
        return web.Response(status=status, body=body, content_type=JSON, headers=headers)
    response = _apply(store, wallet_id, orjson.loads(raw), request.path)
    if key is not None and response.status == 200 and isinstance(response.body, bytes):
        store.replies[(wallet_id, key)] = (raw, 200, response.body)
    return response


async def ready(request: web.Request) -> web.Response:
    return web.Response(body=b'{"status": "ready"}', content_type=JSON)


async def metrics(request: web.Request) -> web.Response:
    ops = request.app[STORE].ops
    text = (
        "# TYPE walletd_batch_ops histogram\n"
        f'walletd_batch_ops_bucket{{le="+Inf"}} {ops}\n'
        f"walletd_batch_ops_sum {ops}\nwalletd_batch_ops_count {ops}\n"
    )
    return web.Response(text=text, content_type="text/plain")


def create_app(drop_every: int = 0) -> web.Application:
    app = web.Application()
    app[STORE] = Store(drop_every=drop_every)
    app.router.add_post("/api/v1/wallets", create_wallet)
    app.router.add_get("/api/v1/wallets/{wallet_id}", get_wallet)
    app.router.add_get("/api/v1/wallets/{wallet_id}/operations", history)
    app.router.add_post("/api/v1/wallets/{wallet_id}/operation", operate)
    app.router.add_get("/healthz", ready)
    app.router.add_get("/readyz", ready)
    app.router.add_get("/metrics", metrics)
    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="in-memory fake of walletd")
    parser.add_argument("command", nargs="?", default="serve", choices=["serve"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8002)
    parser.add_argument("--data-dir", default="", help="ignored")
    parser.add_argument("--drop-every", type=int, default=0)
    args = parser.parse_args(argv)
    return run(create_app(args.drop_every), args.host, args.port, "walletd")


if __name__ == "__main__":
    raise SystemExit(main())
