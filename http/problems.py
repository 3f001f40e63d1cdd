"""RFC 9457 problem responses, and the one middleware that turns every error into one.

Exceptions::

    ProblemError              an error with a status, a stable ``code`` and a detail
    └── ValidationProblem     422 VALIDATION_ERROR with a per-field ``errors`` list
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final

import orjson
from aiohttp import web

from walletd.engine.errors import EngineOverloaded, EngineStopping
from walletd.engine.ports import StorageError

__all__ = [
    "PROBLEM_CODE_KEY",
    "PROBLEM_CONTENT_TYPE",
    "FieldError",
    "ProblemError",
    "ValidationProblem",
    "problem_body",
    "problem_response",
    "problems_middleware",
]

_log = logging.getLogger("walletd.http")

PROBLEM_CONTENT_TYPE: Final = "application/problem+json"
# The problem's ``code`` on the response object, for the metrics middleware (503s by reason).
PROBLEM_CODE_KEY: Final = web.ResponseKey("walletd_problem_code", str)

TITLES: Final = {
    "INVALID_JSON": "Invalid JSON",
    "INVALID_WALLET_ID": "Invalid wallet id",
    "INVALID_TRANSFER_ID": "Invalid transfer id",
    "TRANSFER_NOT_FOUND": "Transfer not found",
    "VALIDATION_ERROR": "Validation error",
    "WALLET_NOT_FOUND": "Wallet not found",
    "WALLET_ALREADY_EXISTS": "Wallet already exists",
    "INSUFFICIENT_FUNDS": "Insufficient funds",
    "BALANCE_LIMIT_EXCEEDED": "Balance limit exceeded",
    "IDEMPOTENCY_KEY_REUSED": "Idempotency key reused",
    "PAYLOAD_TOO_LARGE": "Payload too large",
    "REQUEST_TIMEOUT": "Request timeout",
    "TOO_MANY_ITEMS": "Too many items",
    "ATOMIC_NOT_POSSIBLE": "Atomic request not possible",
    "UNSUPPORTED_MEDIA_TYPE": "Unsupported media type",
    "NOT_FOUND": "Not found",
    "METHOD_NOT_ALLOWED": "Method not allowed",
    "UNAVAILABLE": "Service unavailable",
    "OVERLOADED": "Service overloaded",
    "NOT_OWNER": "Shard not served here",
    "UNAUTHORIZED": "Unauthorized",
    "FORBIDDEN": "Forbidden",
    "RATE_LIMITED": "Rate limited",
    "TOO_MANY_STREAMS": "Too many streams",
    "INTERNAL_ERROR": "Internal server error",
    "BAD_REQUEST": "Bad request",
    "AS_OF_NOT_SETTLED": "Instant not settled yet",
    "INVALID_HOLD_ID": "Invalid hold id",
    "HOLD_NOT_FOUND": "Hold not found",
    "HOLD_EXPIRED": "Hold expired",
    "HOLD_ALREADY_CAPTURED": "Hold already captured",
    "HOLD_ALREADY_VOIDED": "Hold already voided",
    "CAPTURE_EXCEEDS_HOLD": "Capture exceeds hold",
    "TOO_MANY_HOLDS": "Too many holds",
    "STORAGE_REFUSED": "Refused by storage",
    "WALLET_FROZEN": "Wallet frozen",
    "WALLET_CLOSED": "Wallet closed",
    "CLOSE_BLOCKED": "Wallet cannot close",
    "OVERDRAFT_LIMIT_IN_USE": "Overdraft limit in use",
    "PRECONDITION_FAILED": "Precondition failed",
    "INVALID_WEBHOOK_ID": "Invalid webhook id",
    "WEBHOOK_NOT_FOUND": "Webhook not found",
    "DELIVERY_NOT_FOUND": "Delivery not found",
    "TOO_MANY_WEBHOOKS": "Too many webhooks",
    "REFUND_EXCEEDS_TRANSFER": "Refund exceeds transfer",
    "TRANSFER_NOT_COMPLETED": "Transfer not completed",
    "TRANSFER_IS_REFUND": "Transfer is a refund",
    "OPERATION_NOT_FOUND": "Operation not found",
    "NOT_REVERSIBLE": "Operation not reversible",
    "ALREADY_REVERSED": "Operation already reversed",
    "INVALID_PAYMENT_ID": "Invalid payment id",
    "PAYMENT_NOT_FOUND": "Payment not found",
    "PAYMENT_NOT_COMPLETED": "Payment not completed",
}

FieldError = dict[str, str]


class ProblemError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        *,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.headers = headers
        self.extra = extra


class ValidationProblem(ProblemError):
    def __init__(self, errors: list[FieldError]) -> None:
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
        super().__init__(422, "VALIDATION_ERROR", detail, extra={"errors": errors})


def problem_body(
    status: int, code: str, detail: str, instance: str, *, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The RFC 9457 problem document (also embedded per item in bulk results)."""
    body: dict[str, Any] = {
        "type": "about:blank",
        "title": TITLES.get(code, "Error"),
        "status": status,
        "detail": detail,
        "code": code,
        "instance": instance,
    }
    if extra:
        body.update(extra)
    return body


def problem_response(
    status: int,
    code: str,
    detail: str,
    instance: str,
    *,
    headers: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> web.Response:
    body = problem_body(status, code, detail, instance, extra=extra)
    response_headers = {"Content-Type": PROBLEM_CONTENT_TYPE}
    if headers:
        response_headers.update(headers)
    response = web.Response(status=status, body=orjson.dumps(body), headers=response_headers)
    response[PROBLEM_CODE_KEY] = code
    if status in (408, 413):
        # The rest of an oversize or trickling body is not wanted: close instead of draining
        # it for reuse.
        response.force_close()
    return response


_RETRY_AFTER: Final = {"Retry-After": "1"}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _from_http_exception(error: web.HTTPException, path: str) -> web.Response:
    status = error.status
    headers: dict[str, str] | None = None
    if status == 404:
        code, detail = "NOT_FOUND", f"no route for {path}"
    elif status == 405:
        allowed = error.headers.get("Allow", "")
        code, detail = "METHOD_NOT_ALLOWED", f"allowed methods: {allowed}"
        headers = {"Allow": allowed}
    elif status == 413:
        code, detail = "PAYLOAD_TOO_LARGE", "request body is larger than the configured limit"
    elif status == 415:
        code, detail = "UNSUPPORTED_MEDIA_TYPE", "send Content-Type: application/json"
    else:
        code, detail = "BAD_REQUEST", error.reason
    return problem_response(status, code, detail, path, headers=headers)


@web.middleware
async def problems_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ProblemError as error:
        return problem_response(
            error.status,
            error.code,
            error.detail,
            request.path,
            headers=error.headers,
            extra=error.extra,
        )
    except EngineOverloaded:
        return problem_response(
            503, "OVERLOADED", "the wallet's shard is at capacity; retry shortly",
            request.path, headers=_RETRY_AFTER,
        )  # fmt: skip
    except EngineStopping:
        return problem_response(
            503, "UNAVAILABLE", "walletd is shutting down; retry shortly",
            request.path, headers=_RETRY_AFTER,
        )  # fmt: skip
    except StorageError:
        _log.warning("storage error on %s %s", request.method, request.path, exc_info=True)
        return problem_response(
            503, "UNAVAILABLE", "storage is unavailable; retry shortly",
            request.path, headers=_RETRY_AFTER,
        )  # fmt: skip
    except web.HTTPException as error:
        if error.status < 400:
            raise
        return _from_http_exception(error, request.path)
    except asyncio.CancelledError:
        raise
    except ConnectionError:
        # The client went away mid-request (e.g. while its body was read): nobody to answer,
        # and aiohttp drops such a request quietly. Anything else is a bug, answered below.
        if request.transport is None or request.transport.is_closing():
            raise
        _log.exception("unhandled error on %s %s", request.method, request.path)
        return _internal_error(request.path)
    except Exception:
        _log.exception("unhandled error on %s %s", request.method, request.path)
        return _internal_error(request.path)


def _internal_error(path: str) -> web.Response:
    # Generic on purpose: exception text can carry SQL, paths or data; the log has it all.
    return problem_response(
        500, "INTERNAL_ERROR", "an unexpected error occurred; it has been logged", path
    )
