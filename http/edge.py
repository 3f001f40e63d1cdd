"""The middlewares around every handler: request id + metrics, and optional bearer auth.

Order, outermost first::

    edge_middleware      X-Request-Id on every response, request counts and latency
    problems_middleware  every error becomes problem+json (problems.py)
    auth_middleware      only when WALLETD_API_KEYS is set; raises 401 as a ProblemError

The edge middleware sits outside the problems middleware so that it sees the final
response of every request, errors included; auth sits inside it so that a refusal is
problem+json like any other error. With auth off, its middleware is not installed at all.
"""

from __future__ import annotations

import hmac
import itertools
import secrets
import time
from typing import Final

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from walletd.http.legs import INTERNAL_PREFIX
from walletd.http.metrics import UNMATCHED_ROUTE, Metrics
from walletd.http.problems import PROBLEM_CODE_KEY, ProblemError
from walletd.http.routes_v1 import PREFIX

__all__ = [
    "REQUEST_ID_HEADER",
    "REQUEST_ID_KEY",
    "REQUEST_ID_LENGTH_MAX",
    "Middleware",
    "RequestIds",
    "auth_middleware",
    "edge_middleware",
]

REQUEST_ID_HEADER: Final = "X-Request-Id"
# A client's id longer than this, or with characters outside printable ASCII, is replaced
# by a generated one rather than echoed (it goes into logs and a response header).
REQUEST_ID_LENGTH_MAX: Final = 128
# The request's id, for a handler that sends its headers itself (a stream is prepared before
# this middleware sees it, so it cannot add the header afterwards).
REQUEST_ID_KEY: Final = web.RequestKey("walletd_request_id", str)


class RequestIds:
    """Cheap unique ids: a random per-process prefix and a counter (no syscall per id)."""

    __slots__ = ("_counter", "_prefix")

    def __init__(self) -> None:
        self._prefix = secrets.token_hex(6) + "-"
        self._counter = itertools.count(1)

    def next(self) -> str:
        return f"{self._prefix}{next(self._counter):x}"

    def for_request(self, request: web.Request) -> str:
        given = request.headers.get(REQUEST_ID_HEADER)
        if (
            given
            and len(given) <= REQUEST_ID_LENGTH_MAX
            and given.isascii()
            and given.isprintable()
        ):
            return given
        return self.next()


def _route_label(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return UNMATCHED_ROUTE if resource is None else resource.canonical


def edge_middleware(metrics: Metrics) -> Middleware:
    ids = RequestIds()
    perf_counter = time.perf_counter

    @web.middleware
    async def edge(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = perf_counter()
        request_id = ids.for_request(request)
        request[REQUEST_ID_KEY] = request_id
        try:
            response = await handler(request)
        except web.HTTPException as error:  # a redirect: the problems middleware passes them
            error.headers[REQUEST_ID_HEADER] = request_id
            metrics.observe_request(
                _route_label(request), request.method, error.status, perf_counter() - started
            )
            raise
        except BaseException:
            # Cancelled (client gone) or a failure past the problems middleware: no response
            # reaches the client from here, but the request still counts.
            metrics.observe_request(
                _route_label(request), request.method, 500, perf_counter() - started
            )
            raise
        if not response.prepared:
            response.headers[REQUEST_ID_HEADER] = request_id
        status = response.status
        if status == 503:
            metrics.observe_unavailable(response.get(PROBLEM_CODE_KEY, "UNKNOWN"))
        metrics.observe_request(
            _route_label(request), request.method, status, perf_counter() - started
        )
        return response

    return edge


def _is_protected(request: web.Request) -> bool:
    path = request.path
    if path.startswith((PREFIX + "/", INTERNAL_PREFIX + "/")) or path == PREFIX:
        return True
    # Belt and braces: whatever path spelling the router matched, a v1 route is protected.
    resource = request.match_info.route.resource
    return resource is not None and resource.canonical.startswith(PREFIX + "/")


def _bearer_token(header: str | None) -> bytes | None:
    if header is None:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    # compare_digest needs bytes for non-ASCII input; headers may carry any octets.
    return token.strip().encode("utf-8", "surrogateescape")


def auth_middleware(api_keys: tuple[str, ...]) -> Middleware:
    """Require ``Authorization: Bearer <one of api_keys>`` on every /api/v1 request."""
    if not api_keys:
        raise ValueError("auth_middleware needs at least one key")
    keys = tuple(key.encode("utf-8") for key in api_keys)

    def authorized(token: bytes) -> bool:
        # Every key is compared, so the time taken does not tell which key came close.
        matched = False
        for key in keys:
            matched |= hmac.compare_digest(token, key)
        return matched

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if _is_protected(request):
            token = _bearer_token(request.headers.get("Authorization"))
            if token is None or not authorized(token):
                raise ProblemError(
                    401,
                    "UNAUTHORIZED",
                    "send Authorization: Bearer <key> with one of the configured API keys",
                    headers={"WWW-Authenticate": 'Bearer realm="walletd"'},
                )
        return await handler(request)

    return auth
