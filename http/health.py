"""Liveness and readiness."""

from __future__ import annotations

import orjson
from aiohttp import hdrs, web

from walletd.http.problems import problem_response
from walletd.http.state import STATE_KEY

__all__ = ["close_while_draining", "routes"]

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


async def close_while_draining(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: while draining, every answer says ``Connection: close`` and
    walletd closes the connection once it is written. A proxy that keeps server connections
    alive (HAProxy, docs/SCALING.md, "Keep-alive and shutdown") learns from the answer itself
    that the connection ends, so it never sends another request on it; the connections left
    open are idle ones, which walletd closes only when its listener closes, after the proxy
    has marked it down and stopped choosing it."""
    if request.app[STATE_KEY].draining:
        response.force_close()
        # aiohttp computes its own Connection header before this hook runs: set it here.
        response.headers[hdrs.CONNECTION] = "close"


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
