"""The physical ceiling of the stack: aiohttp + uvloop + orjson on walletd's routes, no work.

Every handler does what walletd cannot avoid — route, read the body, parse it as JSON,
serialize a wallet — and nothing else, so its throughput bounds what walletd can reach on
this machine. `python -m loadtest.ceiling --port 8001`.
"""

from __future__ import annotations

import orjson
from aiohttp import web

from loadtest.serving import parse_serve_args, run

__all__ = ["create_app", "main"]

WALLET_ID = "123e4567-e89b-12d3-a456-426614174000"
WALLET = orjson.dumps(
    {
        "id": WALLET_ID,
        "balance": "1000.00",
        "created_at": "2025-01-19T10:00:00.000000Z",
        "updated_at": "2025-01-19T10:30:00.000000Z",
    }
)
TRANSFER = orjson.dumps(
    {
        "id": WALLET_ID,
        "from_wallet_id": WALLET_ID,
        "to_wallet_id": WALLET_ID,
        "amount": "1.00",
        "reference": None,
        "status": "COMPLETED",
        "failure_code": None,
        "created_at": "2025-01-19T10:00:00.000000Z",
        "updated_at": "2025-01-19T10:30:00.000000Z",
    }
)
JSON = "application/json"


async def create_wallet(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(
        status=201,
        body=WALLET,
        content_type=JSON,
        headers={"Location": f"/api/v1/wallets/{WALLET_ID}"},
    )


async def get_wallet(request: web.Request) -> web.Response:
    return web.Response(body=WALLET, content_type=JSON)


async def operate(request: web.Request) -> web.Response:
    # Parsing is part of the floor: walletd must decode every operation body.
    orjson.loads(await request.read())
    return web.Response(body=WALLET, content_type=JSON)


async def transfer(request: web.Request) -> web.Response:
    orjson.loads(await request.read())
    return web.Response(status=201, body=TRANSFER, content_type=JSON)


async def ready(request: web.Request) -> web.Response:
    return web.Response(body=b'{"status": "ready"}', content_type=JSON)


def create_app() -> web.Application:
    app = web.Application()
    app.router.add_post("/api/v1/wallets", create_wallet)
    app.router.add_get("/api/v1/wallets/{wallet_id}", get_wallet)
    app.router.add_post("/api/v1/wallets/{wallet_id}/operation", operate)
    app.router.add_post("/api/v1/transfers", transfer)
    app.router.add_get("/healthz", ready)
    app.router.add_get("/readyz", ready)
    return app


def main(argv: list[str] | None = None) -> int:
    args = parse_serve_args("walletd ceiling server", argv)
    return run(create_app(), args.host, args.port, "ceiling")


if __name__ == "__main__":
    raise SystemExit(main())
