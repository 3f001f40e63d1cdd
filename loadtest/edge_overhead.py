"""Per-request cost of the HTTP edge's middlewares, measured in-process (no sockets).

    .venv/bin/python loadtest/edge_overhead.py [requests]

Builds the real app with create_app, resolves GET /healthz through its router once, then
times N calls of the handler alone and of the handler wrapped in each middleware stack, the
way aiohttp wraps it. Sockets and HTTP parsing are left out on purpose: they cost the same
with or without the middlewares and would drown the difference in noise.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from functools import partial

from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from aiohttp.typedefs import Handler, Middleware

from walletd.http.app import create_app
from walletd.http.edge import auth_middleware, edge_middleware
from walletd.http.keys import parse_keys
from walletd.http.metrics import Metrics
from walletd.http.problems import problems_middleware
from walletd.http.settings import HttpSettings
from walletd.http.state import Services

ROUNDS = 5


def _no_services() -> contextlib.AbstractAsyncContextManager[Services]:
    raise AssertionError("the app is never started in this benchmark")


def _wrap(handler: Handler, middlewares: list[Middleware]) -> Handler:
    for middleware in reversed(middlewares):
        handler = partial(middleware, handler=handler)
    return handler


async def _time(handler: Handler, request: web.Request, count: int) -> float:
    """Best of ROUNDS, in microseconds per request."""
    results = []
    for _ in range(ROUNDS):
        started = time.perf_counter()
        for _ in range(count):
            await handler(request)
        results.append((time.perf_counter() - started) / count * 1e6)
    return min(results)


async def main(count: int) -> None:
    app = create_app(HttpSettings(), _no_services)
    request = make_mocked_request(
        "GET", "/api/v1/wallets/123e4567-e89b-12d3-a456-426614174000", app=app,
        headers={"Authorization": "Bearer key-1"},
    )  # fmt: skip
    match_info = await app.router.resolve(request)
    request._match_info = match_info  # what aiohttp's request handling does before middlewares

    async def trivial(request: web.Request) -> web.StreamResponse:
        # A handler that costs almost nothing, so only the middlewares are measured.
        return web.Response(body=b"{}", content_type="application/json")

    metrics = Metrics()
    stacks: dict[str, list[Middleware]] = {
        "handler alone": [],
        "problems only (before this work)": [problems_middleware],
        "edge + problems (default)": [edge_middleware(metrics), problems_middleware],
        "edge + problems + auth (keys set)": [
            edge_middleware(metrics), problems_middleware,
            auth_middleware(parse_keys("key-0,key-1"), metrics),
        ],
    }  # fmt: skip
    baseline = None
    print(f"{count} requests x best of {ROUNDS}, Python {sys.version.split()[0]}")
    for name, middlewares in stacks.items():
        cost = await _time(_wrap(trivial, middlewares), request, count)
        baseline = cost if baseline is None else baseline
        print(f"  {name:38s} {cost:7.2f} us/request  (+{cost - baseline:5.2f} us)")


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 50_000))
