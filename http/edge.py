"""The middlewares around every handler: request id + metrics, and optional bearer auth.

Order, outermost first::

    edge_middleware      X-Request-Id on every response, request counts and latency
    problems_middleware  every error becomes problem+json (problems.py)
    auth_middleware      only when keys are configured: 401 without a known key, 403
                         when the key lacks the route's scope (keys.py), 429 over its rate

The edge middleware sits outside the problems middleware so that it sees the final
response of every request, errors included; auth sits inside it so that a refusal is
problem+json like any other error. With auth off, its middleware is not installed at all.
"""

from __future__ import annotations

import itertools
import secrets
import time
from typing import Final

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from walletd.http.keys import KEY_NAME, ROUTE_SCOPES, ApiKey, KeyRing, RateLimiter
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
    "is_protected_path",
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


def is_protected_path(path: str) -> bool:
    # The public app only: the internal routes are not registered on it (a path under
    # /internal/ is 404 here, key or not); their own app checks the cluster credential.
    return path.startswith(PREFIX + "/") or path == PREFIX


def _is_protected(request: web.Request) -> bool:
    if is_protected_path(request.path):
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
    # Headers may carry any octets; the ring compares bytes.
    return token.strip().encode("utf-8", "surrogateescape")


def _unauthorized() -> ProblemError:
    return ProblemError(
        401,
        "UNAUTHORIZED",
        "send Authorization: Bearer <key> with one of the configured API keys",
        headers={"WWW-Authenticate": 'Bearer realm="walletd"'},
    )


def auth_middleware(
    api_keys: tuple[ApiKey, ...],
    metrics: Metrics,
    *,
    rate_per_s: float = 0.0,
    rate_burst: int = 1,
) -> Middleware:
    """On every protected request: find the bearer key (401), check the route's scope
    (403 FORBIDDEN), take a token from the key's bucket when a rate is set (429
    RATE_LIMITED), and leave the key's name on the request (``KEY_NAME``) for the handler,
    the access log and the log rows it writes."""
    ring = KeyRing(api_keys)
    names = [key.name for key in ring.keys]
    metrics.watch_keys(names)
    limiter = RateLimiter(names, rate_per_s, rate_burst, time.monotonic()) if rate_per_s else None

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not _is_protected(request):
            return await handler(request)
        token = _bearer_token(request.headers.get("Authorization"))
        key = None if token is None else ring.find(token)
        if key is None:
            raise _unauthorized()
        request[KEY_NAME] = key.name
        match_info = request.match_info
        if match_info.http_exception is None:  # 404/405 need no scope: nothing runs
            scope = ROUTE_SCOPES.get(match_info.handler)
            if scope is None or scope not in key.scopes:
                metrics.observe_key(key.name, "FORBIDDEN")
                needed = "a declared scope" if scope is None else f"the {scope.value!r} scope"
                raise ProblemError(
                    403,
                    "FORBIDDEN",
                    f"key {key.name!r} may not {request.method} this route: it needs {needed}",
                )
        if limiter is not None:
            wait_s = limiter.take(key.name, time.monotonic())
            if wait_s:
                metrics.observe_key(key.name, "RATE_LIMITED")
                raise ProblemError(
                    429,
                    "RATE_LIMITED",
                    f"key {key.name!r} is over its rate of {rate_per_s:g} requests/s "
                    f"(burst {rate_burst}); retry in {wait_s} s",
                    headers={"Retry-After": str(wait_s)},
                )
        metrics.observe_key(key.name, "ALLOWED")
        return await handler(request)

    return auth
