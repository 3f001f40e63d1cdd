"""Forwarding a request for a shard this process does not serve to the process that does.

HAProxy normally sends a request to the owner of its wallet's shard. During a move, with a
stale map, or for requests whose wallet is not in the path (a creation with a chosen id or
an Idempotency-Key), a request reaches a process that does not serve the shard: the engine
raises ``NotOwner`` before accepting anything, and this middleware sends the request on to
the owner named by the ownership table (the lease keeper reads it every step)::

    client ─▶ HAProxy ─▶ walletd A ──(NotOwner)──▶ walletd B (owner) ──▶ answer
                                     X-Walletd-Forwarded: 1

At most one hop: a forwarded request that meets ``NotOwner`` again, a shard with no live
owner, or an owner that cannot be connected to is answered 503 ``NOT_OWNER``: nothing was
applied, retry. Once the request was sent, a failure (timeout, connection reset) leaves the
outcome unknown: 503 ``UNAVAILABLE``, as for a commit that failed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Final

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from walletd.engine.errors import NotOwner
from walletd.http.metrics import Metrics
from walletd.http.problems import ProblemError
from walletd.http.state import STATE_KEY

__all__ = ["FORWARDED_HEADER", "Forwarder"]

FORWARDED_HEADER: Final = "X-Walletd-Forwarded"
_REQUEST_HEADERS: Final = (
    "Content-Type", "Idempotency-Key", "Authorization", "X-Request-Id", "Accept",
)  # fmt: skip
# Hop-by-hop or recomputed by aiohttp: never copied from the owner's answer.
_DROPPED_RESPONSE_HEADERS: Final = frozenset(
    {"content-length", "transfer-encoding", "connection", "keep-alive", "date", "server"}
)
_RETRY_AFTER: Final = {"Retry-After": "1"}


def _not_owner(shard: int, why: str) -> ProblemError:
    return ProblemError(
        503, "NOT_OWNER",
        f"the wallet's shard ({shard}) is moving between walletd processes ({why}); "
        "nothing was applied, retry shortly",
        headers=_RETRY_AFTER,
    )  # fmt: skip


class Forwarder:
    """One bounded HTTP client pool to the other walletd processes, and the middleware."""

    def __init__(self, metrics: Metrics, *, timeout_s: float, connections_max: int) -> None:
        self._metrics = metrics
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._connections_max = connections_max
        self._session: aiohttp.ClientSession | None = None

    async def session_ctx(self, _app: web.Application) -> AsyncIterator[None]:
        """A cleanup_ctx: the client pool lives as long as the app serves."""
        connector = aiohttp.TCPConnector(limit=self._connections_max)
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=self._timeout, auto_decompress=False
        )
        try:
            yield
        finally:
            await self._session.close()
            self._session = None

    def middleware(self) -> Middleware:
        @web.middleware
        async def forward(request: web.Request, handler: Handler) -> web.StreamResponse:
            try:
                return await handler(request)
            except NotOwner as refused:
                return await self.forward(request, refused.shard)

        return forward

    async def forward(self, request: web.Request, shard: int) -> web.Response:
        if FORWARDED_HEADER in request.headers:
            self._metrics.observe_forward("second_hop")
            raise _not_owner(shard, "it was forwarded once already")
        services = request.app[STATE_KEY].services
        url = services.engine.ownership.owner_url(shard)
        if url is None or url == services.self_url or self._session is None:
            self._metrics.observe_forward("no_owner")
            raise _not_owner(shard, "no live owner right now")
        headers = {
            name: request.headers[name] for name in _REQUEST_HEADERS if name in request.headers
        }
        headers[FORWARDED_HEADER] = "1"
        body = await request.read()
        try:
            async with self._session.request(
                request.method, url + request.raw_path, data=body, headers=headers
            ) as answer:
                payload = await answer.read()
                status = answer.status
                answer_headers = {
                    name: value
                    for name, value in answer.headers.items()
                    if name.lower() not in _DROPPED_RESPONSE_HEADERS
                }
        except aiohttp.ClientConnectorError:
            # Not connected: the owner never saw the request.
            self._metrics.observe_forward("unreachable")
            raise _not_owner(shard, "its owner cannot be reached") from None
        except (aiohttp.ClientError, TimeoutError):
            self._metrics.observe_forward("unknown")
            raise ProblemError(
                503, "UNAVAILABLE",
                "the request was forwarded to the wallet's owner and its answer was lost; "
                "retry with the same Idempotency-Key",
                headers=_RETRY_AFTER,
            ) from None  # fmt: skip
        self._metrics.observe_forward("answered")
        return web.Response(status=status, body=payload, headers=answer_headers)
