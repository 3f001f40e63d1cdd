"""Forwarding a request for a shard this process does not serve to the process that does.

HAProxy normally sends a request to the owner of its wallet's shard. During a move, with a
stale map, or for requests whose wallet is not in the path (a creation with a chosen id or
an Idempotency-Key), a request reaches a process that does not serve the shard: the engine
raises ``NotOwner`` before accepting anything, and this middleware sends the request on to
the owner named by the ownership table (the lease keeper reads it every step)::

    client ─▶ HAProxy ─▶ walletd A ──(NotOwner)──▶ walletd B (owner) ──▶ answer
                                     X-Walletd-Forwarded: 1

A request whose shard has no live owner in the table, is owned by this very process (a
claim whose memory is not dropped yet), or arrives forwarded and still meets ``NotOwner``
waits for the next read of the table (bounded: two lease steps) and is then answered here
if this process serves the shard by then. Otherwise, at most one hop: a second hop, a
shard still without a live owner, or an owner that cannot be connected to is answered 503
``NOT_OWNER``: nothing was applied, retry. A process that could not read the table for a
whole lease (cut off from PostgreSQL) answers 503 ``UNAVAILABLE`` at once.

Once the request was sent, a failure (timeout, connection reset) leaves the
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

__all__ = [
    "FORWARDED_HEADER",
    "FORWARDER_KEY",
    "AnswerLost",
    "Forwarder",
    "Unreachable",
    "forwarded_headers",
]

FORWARDED_HEADER: Final = "X-Walletd-Forwarded"
_REQUEST_HEADERS: Final = (
    "Content-Type", "Idempotency-Key", "Authorization", "X-Request-Id", "Accept", "If-Match",
)  # fmt: skip
# Hop-by-hop or recomputed by aiohttp: never copied from the owner's answer.
_DROPPED_RESPONSE_HEADERS: Final = frozenset(
    {"content-length", "transfer-encoding", "connection", "keep-alive", "date", "server"}
)
_RETRY_AFTER: Final = {"Retry-After": "1"}
# Lease steps to wait for a fresh ownership table before answering NOT_OWNER.
_TABLE_WAIT_STEPS: Final = 2


def _not_owner(shard: int, why: str) -> ProblemError:
    return ProblemError(
        503, "NOT_OWNER",
        f"the wallet's shard ({shard}) is moving between walletd processes ({why}); "
        "nothing was applied, retry shortly",
        headers=_RETRY_AFTER,
    )  # fmt: skip


def _cut_off(shard: int) -> ProblemError:
    return ProblemError(
        503, "UNAVAILABLE",
        f"this walletd cannot reach PostgreSQL to renew or look up the lease of the wallet's "
        f"shard ({shard}); nothing was applied, retry shortly",
        headers=_RETRY_AFTER,
    )  # fmt: skip


def forwarded_headers(request: web.Request) -> dict[str, str]:
    """The request's headers that travel with it to another process."""
    return {name: request.headers[name] for name in _REQUEST_HEADERS if name in request.headers}


class Unreachable(Exception):
    """The other process could not be connected to: nothing was sent."""


class AnswerLost(Exception):
    """The request was sent and its answer was lost (timeout, reset): outcome unknown."""


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

    async def exchange(
        self, method: str, url: str, body: bytes, headers: dict[str, str]
    ) -> tuple[int, dict[str, str], bytes]:
        """Send one request to another walletd process (always with the forwarded marker);
        its status, headers (hop-by-hop ones dropped) and body. Raises ``Unreachable`` or
        ``AnswerLost``."""
        if self._session is None:
            raise Unreachable("the forwarding pool is closed")
        headers = {**headers, FORWARDED_HEADER: "1"}
        try:
            async with self._session.request(method, url, data=body, headers=headers) as answer:
                payload = await answer.read()
                answer_headers = {
                    name: value
                    for name, value in answer.headers.items()
                    if name.lower() not in _DROPPED_RESPONSE_HEADERS
                }
                return answer.status, answer_headers, payload
        except aiohttp.ClientConnectorError as error:
            raise Unreachable(str(error)) from None
        except (aiohttp.ClientError, TimeoutError) as error:
            raise AnswerLost(repr(error)) from None

    def middleware(self) -> Middleware:
        @web.middleware
        async def forward(request: web.Request, handler: Handler) -> web.StreamResponse:
            try:
                return await handler(request)
            except NotOwner as refused:
                return await self.forward(request, handler, refused.shard)

        return forward

    async def forward(
        self, request: web.Request, handler: Handler, shard: int
    ) -> web.StreamResponse:
        services = request.app[STATE_KEY].services
        ownership = services.engine.ownership
        url = ownership.owner_url(shard)
        if FORWARDED_HEADER in request.headers or url is None or url == services.self_url:
            # A move under way (released, not claimed yet; claimed, memory not dropped yet)
            # or a stale table: wait for the next read of the table (a quarter of a lease),
            # then answer it here if this process serves the shard by then.
            if ownership.table_stale():
                self._metrics.observe_forward("cut_off")
                raise _cut_off(shard)
            await ownership.next_table(_TABLE_WAIT_STEPS * ownership.table_stale_s / 4)
            if ownership.serving(shard):
                try:
                    return await handler(request)
                except NotOwner:
                    pass
            url = ownership.owner_url(shard)
        if FORWARDED_HEADER in request.headers:
            self._metrics.observe_forward("second_hop")
            raise _not_owner(shard, "it was forwarded once already")
        if url is None or url == services.self_url or self._session is None:
            self._metrics.observe_forward("no_owner")
            raise _not_owner(shard, "no live owner right now")
        headers = forwarded_headers(request)
        body = await request.read()
        try:
            status, answer_headers, payload = await self.exchange(
                request.method, url + request.raw_path, body, headers
            )
        except Unreachable:
            # Not connected: the owner never saw the request.
            self._metrics.observe_forward("unreachable")
            raise _not_owner(shard, "its owner cannot be reached") from None
        except AnswerLost:
            self._metrics.observe_forward("unknown")
            raise ProblemError(
                503, "UNAVAILABLE",
                "the request was forwarded to the wallet's owner and its answer was lost; "
                "retry with the same Idempotency-Key",
                headers=_RETRY_AFTER,
            ) from None  # fmt: skip
        self._metrics.observe_forward("answered")
        return web.Response(status=status, body=payload, headers=answer_headers)


FORWARDER_KEY = web.AppKey("walletd_forwarder", Forwarder)
