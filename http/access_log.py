"""An optional access log: one JSON object per line, written by aiohttp after each response.

Off by default (WALLETD_ACCESS_LOG): formatting and writing a line per request costs more
than the rest of the edge's bookkeeping together. When on, lines go to their own logger
(``walletd.access``) with a bare ``%(message)s`` format, so the stream stays pure JSON lines
whatever the root logger's format is.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import IO, Any, Final

import orjson
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from walletd.http.edge import REQUEST_ID_HEADER
from walletd.http.keys import KEY_NAME
from walletd.http.metrics import UNMATCHED_ROUTE

__all__ = ["ACCESS_LOGGER_NAME", "JsonAccessLogger", "access_log_options"]

ACCESS_LOGGER_NAME: Final = "walletd.access"


class JsonAccessLogger(AbstractAccessLogger):
    """Writes ``{"ts", "request_id", "remote", "method", "path", "route", "status",
    "bytes", "duration_ms", "key"}`` per request; ``key`` is the API key's name (never its
    secret), null when auth is off or the request had no known key."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time_s: float) -> None:
        resource = _resource(request)
        line = {
            "ts": time.time(),
            "request_id": response.headers.get(REQUEST_ID_HEADER),
            "remote": request.remote,
            "method": request.method,
            "path": request.path,
            "route": UNMATCHED_ROUTE if resource is None else resource.canonical,
            "status": response.status,
            "bytes": response.body_length,
            "duration_ms": round(time_s * 1000, 3),
            "key": request.get(KEY_NAME) if isinstance(request, web.Request) else None,
        }
        self.logger.info(orjson.dumps(line).decode())


def _resource(request: web.BaseRequest) -> web.AbstractResource | None:
    """The route the request matched; None for one aiohttp refused before routing (a
    malformed request line or header, answered 400), whose ``match_info`` property
    asserts rather than returning None: such probes are logged like any request."""
    if not isinstance(request, web.Request):
        return None
    try:
        match_info = request.match_info
    except AssertionError:
        return None
    return match_info.route.resource


def _json_lines_logger(stream: IO[str]) -> logging.Logger:
    logger = logging.getLogger(ACCESS_LOGGER_NAME)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    return logger


def access_log_options(enabled: bool, stream: IO[str] | None = None) -> dict[str, Any]:
    """Keyword arguments for ``web.AppRunner`` (or a test server): JSON lines, or none."""
    if not enabled:
        return {"access_log": None}
    return {
        "access_log": _json_lines_logger(stream or sys.stderr),
        "access_log_class": JsonAccessLogger,
    }
