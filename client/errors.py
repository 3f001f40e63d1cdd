"""What the walletd client raises: one class per problem ``code``, arranged as a tree.

Exceptions::

    WalletdError                  everything the client raises
    ├── TransportError            no HTTP answer (connection refused or cut, timeout), after
    │                             every retry that was safe
    ├── UnexpectedResponse        an answer that is not what the API documents
    └── ProblemError              an RFC 9457 problem answer: ``status``, ``code``, ``detail``
        ├── InvalidRequest        400/408/413/415/422: the request itself must change
        │   ├── ValidationError         VALIDATION_ERROR (``errors``: one entry per field)
        │   └── IdempotencyKeyReused    IDEMPOTENCY_KEY_REUSED
        ├── Unauthorized          UNAUTHORIZED
        ├── NotFound              a route or a resource that does not exist
        │   ├── WalletNotFound          WALLET_NOT_FOUND
        │   ├── TransferNotFound        TRANSFER_NOT_FOUND
        │   └── HoldNotFound            HOLD_NOT_FOUND
        ├── Refused               a business refusal: final for its Idempotency-Key
        │   ├── WalletAlreadyExists     WALLET_ALREADY_EXISTS
        │   ├── InsufficientFunds       INSUFFICIENT_FUNDS
        │   ├── BalanceLimitExceeded    BALANCE_LIMIT_EXCEEDED
        │   ├── TooManyHolds            TOO_MANY_HOLDS
        │   ├── CaptureExceedsHold      CAPTURE_EXCEEDS_HOLD
        │   └── HoldNotPending          a capture or void of a hold that cannot be resolved:
        │       ├── HoldExpired             HOLD_EXPIRED
        │       ├── HoldAlreadyCaptured     HOLD_ALREADY_CAPTURED
        │       └── HoldAlreadyVoided       HOLD_ALREADY_VOIDED
        ├── StorageRefused        STORAGE_REFUSED (409): the database refused this request
        │                         alone by a constraint; nothing applied, not recorded (a
        │                         retry is decided again)
        ├── ServiceUnavailable    503 still answered after the last retry: "not applied, or
        │   │                     unknown"; the same Idempotency-Key resolves it later
        │   ├── Unavailable             UNAVAILABLE
        │   ├── Overloaded              OVERLOADED
        │   └── NotOwner                NOT_OWNER (a shard moving between processes)
        └── ServerError           500 INTERNAL_ERROR, or any other 5xx

A code this client does not know yet falls back to its status's class, so a newer server
never breaks an older client. A new code is one line in ``PROBLEM_CLASSES``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

__all__ = [
    "PROBLEM_CLASSES",
    "BalanceLimitExceeded",
    "CaptureExceedsHold",
    "HoldAlreadyCaptured",
    "HoldAlreadyVoided",
    "HoldExpired",
    "HoldNotFound",
    "HoldNotPending",
    "IdempotencyKeyReused",
    "InsufficientFunds",
    "InvalidRequest",
    "NotFound",
    "NotOwner",
    "Overloaded",
    "ProblemError",
    "Refused",
    "ServerError",
    "ServiceUnavailable",
    "StorageRefused",
    "TooManyHolds",
    "TransferNotFound",
    "TransportError",
    "Unauthorized",
    "Unavailable",
    "UnexpectedResponse",
    "ValidationError",
    "WalletAlreadyExists",
    "WalletNotFound",
    "WalletdError",
    "problem_error",
]


class WalletdError(Exception):
    """Everything the walletd client raises."""


class TransportError(WalletdError):
    """No HTTP answer: the connection failed or was cut, or the attempt timed out."""


class UnexpectedResponse(WalletdError):
    """An answer outside the documented API (not JSON, a missing field, an odd status)."""


class ProblemError(WalletdError):
    """An RFC 9457 problem answer from walletd."""

    def __init__(self, status: int, code: str, detail: str, body: Mapping[str, Any]) -> None:
        super().__init__(f"{status} {code}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail
        self.body = body


class InvalidRequest(ProblemError):
    """The request itself is wrong (400, 413, 415, 422); sending it again cannot help."""


class ValidationError(InvalidRequest):
    """422 VALIDATION_ERROR; ``errors`` lists each field and what is wrong with it."""

    @property
    def errors(self) -> list[dict[str, str]]:
        errors = self.body.get("errors")
        return list(errors) if isinstance(errors, list) else []


class IdempotencyKeyReused(InvalidRequest):
    """The Idempotency-Key was already used for a different request."""


class Unauthorized(ProblemError):
    """Missing or wrong API key."""


class NotFound(ProblemError):
    """The route or the resource does not exist."""


class WalletNotFound(NotFound):
    """No wallet has this id."""


class TransferNotFound(NotFound):
    """No transfer has this id."""


class HoldNotFound(NotFound):
    """No hold has this id."""


class Refused(ProblemError):
    """A business refusal decided by the engine; a retry with the same key replays it."""


class WalletAlreadyExists(Refused):
    """A wallet with the chosen id exists already."""


class InsufficientFunds(Refused):
    """The withdrawal is larger than the balance; the balance is unchanged."""


class BalanceLimitExceeded(Refused):
    """The deposit would push the balance past the documented ceiling."""


class TooManyHolds(Refused):
    """The wallet has the most PENDING holds it may have."""


class CaptureExceedsHold(Refused):
    """The capture is larger than the hold; the hold is unchanged."""


class StorageRefused(ProblemError):
    """The database refused this request alone (a constraint walletd cannot foresee, such
    as one an operator added); nothing was applied. Unlike a ``Refused``, it is not recorded
    under the Idempotency-Key: a retry is decided again."""


class HoldNotPending(Refused):
    """The hold cannot be captured or voided any more; ``body["hold"]`` is its state."""


class HoldExpired(HoldNotPending):
    """The hold's expires_at has passed (released, or about to be, by the sweep)."""


class HoldAlreadyCaptured(HoldNotPending):
    """The hold was captured already."""


class HoldAlreadyVoided(HoldNotPending):
    """The hold was voided already."""


class ServiceUnavailable(ProblemError):
    """503 after the last retry: not applied, or outcome unknown. Retry with the same key."""


class Unavailable(ServiceUnavailable):
    """Storage is unreachable or walletd is stopping."""


class Overloaded(ServiceUnavailable):
    """The wallet's shard is at capacity."""


class NotOwner(ServiceUnavailable):
    """The wallet's shard is moving between walletd processes; nothing was applied."""


class ServerError(ProblemError):
    """A 5xx other than 503: a bug in walletd; never retried."""


PROBLEM_CLASSES: Final[Mapping[str, type[ProblemError]]] = {
    "INVALID_JSON": InvalidRequest,
    "INVALID_WALLET_ID": InvalidRequest,
    "VALIDATION_ERROR": ValidationError,
    "IDEMPOTENCY_KEY_REUSED": IdempotencyKeyReused,
    "PAYLOAD_TOO_LARGE": InvalidRequest,
    "REQUEST_TIMEOUT": InvalidRequest,
    "TOO_MANY_ITEMS": InvalidRequest,
    "ATOMIC_NOT_POSSIBLE": InvalidRequest,
    "UNSUPPORTED_MEDIA_TYPE": InvalidRequest,
    "BAD_REQUEST": InvalidRequest,
    "METHOD_NOT_ALLOWED": InvalidRequest,
    "UNAUTHORIZED": Unauthorized,
    "NOT_FOUND": NotFound,
    "WALLET_NOT_FOUND": WalletNotFound,
    "TRANSFER_NOT_FOUND": TransferNotFound,
    "INVALID_HOLD_ID": InvalidRequest,
    "HOLD_NOT_FOUND": HoldNotFound,
    "HOLD_EXPIRED": HoldExpired,
    "HOLD_ALREADY_CAPTURED": HoldAlreadyCaptured,
    "HOLD_ALREADY_VOIDED": HoldAlreadyVoided,
    "CAPTURE_EXCEEDS_HOLD": CaptureExceedsHold,
    "TOO_MANY_HOLDS": TooManyHolds,
    "STORAGE_REFUSED": StorageRefused,
    "INVALID_TRANSFER_ID": InvalidRequest,
    # An as_of instant too recent to answer yet: ask again after Retry-After.
    "AS_OF_NOT_SETTLED": InvalidRequest,
    "WALLET_ALREADY_EXISTS": WalletAlreadyExists,
    "INSUFFICIENT_FUNDS": InsufficientFunds,
    "BALANCE_LIMIT_EXCEEDED": BalanceLimitExceeded,
    "UNAVAILABLE": Unavailable,
    "OVERLOADED": Overloaded,
    "NOT_OWNER": NotOwner,
    "INTERNAL_ERROR": ServerError,
}


def _class_for_status(status: int) -> type[ProblemError]:
    if status == 503:
        return ServiceUnavailable
    if status >= 500:
        return ServerError
    if status == 401:
        return Unauthorized
    if status == 404:
        return NotFound
    if status == 409:
        return Refused
    if 400 <= status < 500:
        return InvalidRequest
    return ProblemError


def problem_error(status: int, body: Mapping[str, Any]) -> ProblemError:
    """The exception for a problem answer: by its ``code``, else by its status."""
    code = body.get("code")
    detail = body.get("detail")
    code_text = code if isinstance(code, str) else f"HTTP_{status}"
    detail_text = detail if isinstance(detail, str) else ""
    error_class = PROBLEM_CLASSES.get(code_text) or _class_for_status(status)
    return error_class(status, code_text, detail_text, body)
