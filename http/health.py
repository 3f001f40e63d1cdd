"""Liveness and readiness."""

from __future__ import annotations

import orjson
from aiohttp import web

from walletd.http.problems import problem_response
from walletd.http.state import STATE_KEY

__all__ = ["routes"]

routes = web.RouteTableDef()

_OK = orjson.dumps({"status": "ok"})
_READY = orjson.dumps({"status": "ready"})


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    """Alive: the process answers. Says nothing about storage. 503 while draining after
    SIGTERM: a proxy stops opening connections to a process about to close its listener."""
    if request.app[STATE_KEY].draining:
        return _draining(request)
    return web.Response(body=_OK, content_type="application/json")


def _draining(request: web.Request) -> web.Response:
    return problem_response(
        503, "UNAVAILABLE", "walletd is stopping; send requests to another process",
        request.path, headers={"Retry-After": "1"},
    )  # fmt: skip


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    """Ready: storage answers and the engine accepts work."""
    if request.app[STATE_KEY].draining:
        return _draining(request)
    try:
        services = request.app[STATE_KEY].services
    except RuntimeError:
        reason: str | None = "walletd is starting or stopping"
    else:
        reason = await services.readiness()
    if reason is not None:
        return problem_response(
            503, "UNAVAILABLE", reason, request.path, headers={"Retry-After": "1"}
        )
    return web.Response(body=_READY, content_type="application/json")
