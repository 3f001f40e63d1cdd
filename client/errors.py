"""What the walletd client raises: one class per problem ``code``, arranged as a tree.

Exceptions::

    WalletdError                  everything the client raises; ``request_id`` (the
    │                             X-Request-Id of the call, to find it in walletd's log)
    │                             and ``retry_after_s`` (the server's Retry-After, or None)
    ├── TransportError            no HTTP answer (connection refused or cut, timeout), after
    │                             every retry that was safe
    ├── UnexpectedResponse        an answer that is not what the API documents
    └── ProblemError              an RFC 9457 problem answer: ``status``, ``code``, ``detail``
        ├── InvalidRequest        400/408/413/415/422: the request itself must change
        │   ├── InvalidJson             INVALID_JSON
        │   ├── BadRequest              BAD_REQUEST
        │   ├── InvalidId               a path id that is not a canonical UUID:
        │   │   ├── InvalidWalletId         INVALID_WALLET_ID
        │   │   ├── InvalidTransferId       INVALID_TRANSFER_ID
        │   │   ├── InvalidHoldId           INVALID_HOLD_ID
        │   │   ├── InvalidPaymentId        INVALID_PAYMENT_ID
        │   │   └── InvalidWebhookId        INVALID_WEBHOOK_ID
        │   ├── ValidationError         VALIDATION_ERROR (``errors``: one entry per field)
        │   ├── IdempotencyKeyReused    IDEMPOTENCY_KEY_REUSED
        │   ├── CurrencyMismatch        CURRENCY_MISMATCH
        │   ├── AsOfNotSettled          AS_OF_NOT_SETTLED (ask again after ``retry_after_s``)
        │   ├── PayloadTooLarge         PAYLOAD_TOO_LARGE
        │   ├── TooManyItems            TOO_MANY_ITEMS
        │   ├── AtomicNotPossible       ATOMIC_NOT_POSSIBLE
        │   ├── RequestTimeout          REQUEST_TIMEOUT
        │   ├── UnsupportedMediaType    UNSUPPORTED_MEDIA_TYPE
        │   └── MethodNotAllowed        METHOD_NOT_ALLOWED
        ├── AccessDenied          401/403: the credential is missing, wrong or not enough
        │   ├── Unauthorized            UNAUTHORIZED
        │   └── Forbidden               FORBIDDEN: the key lacks the route's scope
        ├── RateLimited           429: the key is over one of its quotas; nothing was applied
        │   │                     (ask again after ``retry_after_s``)
        │   ├── RateExceeded            RATE_LIMITED (the key's request rate)
        │   └── TooManyStreams          TOO_MANY_STREAMS (the key's feed streams)
        ├── NotFound              a route or a resource that does not exist
        │   ├── RouteNotFound           NOT_FOUND
        │   ├── WalletNotFound          WALLET_NOT_FOUND
        │   ├── TransferNotFound        TRANSFER_NOT_FOUND
        │   ├── HoldNotFound            HOLD_NOT_FOUND
        │   ├── OperationNotFound       OPERATION_NOT_FOUND (a reversal's seq)
        │   ├── PaymentNotFound         PAYMENT_NOT_FOUND
        │   ├── WebhookNotFound         WEBHOOK_NOT_FOUND
        │   └── DeliveryNotFound        DELIVERY_NOT_FOUND
        ├── Refused               a business refusal: final for its Idempotency-Key
        │   ├── WalletAlreadyExists     WALLET_ALREADY_EXISTS
        │   ├── WalletFrozen            WALLET_FROZEN: a debit of a FROZEN wallet
        │   ├── WalletClosed            WALLET_CLOSED: anything on a CLOSED wallet
        │   ├── CloseBlocked            CLOSE_BLOCKED (``blocked_by``: what keeps it open)
        │   ├── OverdraftLimitInUse     OVERDRAFT_LIMIT_IN_USE
        │   ├── InsufficientFunds       INSUFFICIENT_FUNDS
        │   ├── BalanceLimitExceeded    BALANCE_LIMIT_EXCEEDED
        │   ├── TooManyHolds            TOO_MANY_HOLDS
        │   ├── TooManyWebhooks         TOO_MANY_WEBHOOKS
        │   ├── CaptureExceedsHold      CAPTURE_EXCEEDS_HOLD
        │   ├── RefundExceedsTransfer   REFUND_EXCEEDS_TRANSFER (``body["refundable"]``)
        │   ├── TransferNotCompleted    TRANSFER_NOT_COMPLETED: only those are refunded
        │   ├── TransferIsRefund        TRANSFER_IS_REFUND: a refund is not refunded
        │   ├── PaymentNotCompleted     PAYMENT_NOT_COMPLETED: a payment (or its posting) is
        │   │                           refunded once the payment is COMPLETED
        │   ├── AlreadyReversed         ALREADY_REVERSED (under another key)
        │   ├── NotReversible           NOT_REVERSIBLE: not a DEPOSIT or WITHDRAW
        │   └── HoldNotPending          a capture or void of a hold that cannot be resolved:
        │       ├── HoldExpired             HOLD_EXPIRED
        │       ├── HoldAlreadyCaptured     HOLD_ALREADY_CAPTURED
        │       └── HoldAlreadyVoided       HOLD_ALREADY_VOIDED
        ├── PreconditionFailed    PRECONDITION_FAILED (412): If-Match named another version
        │                         (``seq``: the wallet's); nothing applied
        ├── StorageRefused        STORAGE_REFUSED (409): the database refused this request
        │                         alone by a constraint; nothing applied, not recorded (a
        │                         retry is decided again)
        ├── ServiceUnavailable    503 still answered after the last retry: "not applied, or
        │   │                     unknown"; the same Idempotency-Key resolves it later
        │   ├── Unavailable             UNAVAILABLE
        │   ├── Overloaded              OVERLOADED
        │   └── NotOwner                NOT_OWNER (a shard moving between processes)
        └── ServerError           any other 5xx: a bug in walletd, never retried
            └── InternalError           INTERNAL_ERROR

Every code walletd declares has a class of its own (tests/test_client.py walks the
server's codes). A code this client does not know yet falls back to its status's class, so
a newer server never breaks an older client. A new code is a class and one line in
``PROBLEM_CLASSES``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

__all__ = [
    "PROBLEM_CLASSES",
    "AccessDenied",
    "AlreadyReversed",
    "AsOfNotSettled",
    "AtomicNotPossible",
    "BadRequest",
    "BalanceLimitExceeded",
    "CaptureExceedsHold",
    "CloseBlocked",
    "CurrencyMismatch",
    "DeliveryNotFound",
    "Forbidden",
    "HoldAlreadyCaptured",
    "HoldAlreadyVoided",
    "HoldExpired",
    "HoldNotFound",
    "HoldNotPending",
    "IdempotencyKeyReused",
    "InsufficientFunds",
    "InternalError",
    "InvalidHoldId",
    "InvalidId",
    "InvalidJson",
    "InvalidPaymentId",
    "InvalidRequest",
    "InvalidTransferId",
    "InvalidWalletId",
    "InvalidWebhookId",
    "MethodNotAllowed",
    "NotFound",
    "NotOwner",
    "NotReversible",
    "OperationNotFound",
    "OverdraftLimitInUse",
    "Overloaded",
    "PayloadTooLarge",
    "PaymentNotCompleted",
    "PaymentNotFound",
    "PreconditionFailed",
    "ProblemError",
    "RateExceeded",
    "RateLimited",
    "RefundExceedsTransfer",
    "Refused",
    "RequestTimeout",
    "RouteNotFound",
    "ServerError",
    "ServiceUnavailable",
    "StorageRefused",
    "TooManyHolds",
    "TooManyItems",
    "TooManyStreams",
    "TooManyWebhooks",
    "TransferIsRefund",
    "TransferNotCompleted",
    "TransferNotFound",
    "TransportError",
    "Unauthorized",
    "Unavailable",
    "UnexpectedResponse",
    "UnsupportedMediaType",
    "ValidationError",
    "WalletAlreadyExists",
    "WalletClosed",
    "WalletFrozen",
    "WalletNotFound",
    "WalletdError",
    "WebhookNotFound",
    "class_for_status",
    "problem_error",
]


class WalletdError(Exception):
    """Everything the walletd client raises.

    ``request_id``: the X-Request-Id of the call (the one walletd echoed, else the one the
    client sent), the key to its lines in walletd's access log; None only for an error
    raised before anything was sent. ``retry_after_s``: the answer's Retry-After in seconds,
    or None.
    """

    def __init__(
        self, message: str, *, request_id: str | None = None, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message)
        self.request_id = request_id
        self.retry_after_s = retry_after_s


class TransportError(WalletdError):
    """No HTTP answer: the connection failed or was cut, or the attempt timed out."""


class UnexpectedResponse(WalletdError):
    """An answer outside the documented API (not JSON, a missing field, an odd status)."""


class ProblemError(WalletdError):
    """An RFC 9457 problem answer from walletd."""

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        body: Mapping[str, Any],
        *,
        request_id: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(
            f"{status} {code}: {detail}", request_id=request_id, retry_after_s=retry_after_s
        )
        self.status = status
        self.code = code
        self.detail = detail
        self.body = body


class InvalidRequest(ProblemError):
    """The request itself is wrong (400, 408, 413, 415, 422); sending it again cannot help."""


class InvalidJson(InvalidRequest):
    """The body is not JSON, not an object, or holds a lone surrogate."""


class BadRequest(InvalidRequest):
    """A request the HTTP layer could not take (a malformed request line or header)."""


class InvalidId(InvalidRequest):
    """An id in the path is not a canonical UUID."""


class InvalidWalletId(InvalidId):
    """The wallet id in the path is not a canonical UUID."""


class InvalidTransferId(InvalidId):
    """The transfer id in the path is not a UUID."""


class InvalidHoldId(InvalidId):
    """The hold id in the path is not a UUID."""


class InvalidPaymentId(InvalidId):
    """The payment id in the path is not a UUID."""


class ValidationError(InvalidRequest):
    """422 VALIDATION_ERROR; ``errors`` lists each field and what is wrong with it."""

    @property
    def errors(self) -> list[dict[str, str]]:
        errors = self.body.get("errors")
        return list(errors) if isinstance(errors, list) else []


class IdempotencyKeyReused(InvalidRequest):
    """The Idempotency-Key was already used for a different request."""


class CurrencyMismatch(InvalidRequest):
    """Money between wallets of different currencies (a transfer, a capture into a wallet,
    an atomic bulk request): nothing moved; walletd converts nothing."""


class AsOfNotSettled(InvalidRequest):
    """The as_of instant is still ahead of walletd's clock; ask again after
    ``retry_after_s``."""


class PayloadTooLarge(InvalidRequest):
    """The body is larger than the server's limit."""


class TooManyItems(InvalidRequest):
    """A bulk request with more items than the server takes (atomic: more than a batch)."""


class AtomicNotPossible(InvalidRequest):
    """An atomic bulk request whose wallets are not all on one shard actor."""


class RequestTimeout(InvalidRequest):
    """The body did not arrive within the server's read timeout."""


class UnsupportedMediaType(InvalidRequest):
    """The body was not sent as application/json."""


class MethodNotAllowed(InvalidRequest):
    """The route does not take this method; ``body`` names the allowed ones."""


class AccessDenied(ProblemError):
    """The credential is missing, wrong or not enough (401, 403)."""


class Unauthorized(AccessDenied):
    """Missing or wrong API key."""


class Forbidden(AccessDenied):
    """The API key is valid but lacks the scope the route needs; another key is needed."""


class RateLimited(ProblemError):
    """429: the API key is over one of its quotas; nothing was applied. ``retry_after_s`` is
    the server's Retry-After in seconds, when it sent one."""


class RateExceeded(RateLimited):
    """RATE_LIMITED: the API key sent more requests than its rate allows."""


class TooManyStreams(RateLimited):
    """The API key holds the most feed streams it may; close one first."""


class NotFound(ProblemError):
    """The route or the resource does not exist."""


class RouteNotFound(NotFound):
    """No route has this path (a wrong base URL, or a newer API version)."""


class WalletNotFound(NotFound):
    """No wallet has this id (for a transfer, ``body["side"]`` says which)."""


class TransferNotFound(NotFound):
    """No transfer has this id."""


class HoldNotFound(NotFound):
    """No hold has this id."""


class OperationNotFound(NotFound):
    """The wallet has no operation with this seq (a reversal)."""


class PaymentNotFound(NotFound):
    """No payment has this id."""


class InvalidWebhookId(InvalidId):
    pass


class WebhookNotFound(NotFound):
    pass


class DeliveryNotFound(NotFound):
    pass


class Refused(ProblemError):
    """A business refusal decided by the engine; a retry with the same key replays it."""


class TooManyWebhooks(Refused):
    """409 TOO_MANY_WEBHOOKS: the server keeps webhook_subscriptions_max at most."""


class WalletAlreadyExists(Refused):
    """A wallet with the chosen id exists already."""


class InsufficientFunds(Refused):
    """The withdrawal is larger than the available money; the balance is unchanged."""


class BalanceLimitExceeded(Refused):
    """The credit would push the balance past the documented ceiling (counting the room the
    wallet's PENDING outgoing transfers keep for their refunds)."""


class TooManyHolds(Refused):
    """The wallet has the most PENDING holds it may have."""


class CaptureExceedsHold(Refused):
    """The capture is larger than the hold; the hold is unchanged."""


class RefundExceedsTransfer(Refused):
    """More than the transfer has left to refund (``body["refundable"]`` says how much
    is). Not recorded: a retry is decided again (a FAILED refund frees its amount)."""


class TransferNotCompleted(Refused):
    """Only a COMPLETED transfer is refunded (this one is PENDING or FAILED)."""


class TransferIsRefund(Refused):
    """The transfer is a refund; a refund is never refunded."""


class PaymentNotCompleted(Refused):
    """The payment (or the payment of this posting) is PENDING or FAILED: only a COMPLETED
    payment's postings are refunded (``body["payment_id"]``)."""


class AlreadyReversed(Refused):
    """The operation was reversed already, under another Idempotency-Key."""


class NotReversible(Refused):
    """Only a DEPOSIT or WITHDRAW is reversed (a transfer is refunded instead)."""


class WalletFrozen(Refused):
    """The wallet is FROZEN: it takes credits only (a transfer's ``body["side"]``)."""


class WalletClosed(Refused):
    """The wallet is CLOSED: nothing moves on it and it never changes again."""


class CloseBlocked(Refused):
    """The wallet cannot close yet: ``blocked_by`` lists BALANCE, HOLDS, TRANSFERS."""

    @property
    def blocked_by(self) -> list[str]:
        found = self.body.get("blocked_by")
        return [str(item) for item in found] if isinstance(found, list) else []


class OverdraftLimitInUse(Refused):
    """The wallet owes more than the overdraft limit asked for."""


class PreconditionFailed(ProblemError):
    """If-Match named another version than the wallet's (``seq``: the wallet's now); nothing
    was applied: read the wallet again and decide again."""

    @property
    def seq(self) -> int | None:
        found = self.body.get("seq")
        return found if isinstance(found, int) else None


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
    """Storage is unreachable, a commit's outcome is unknown, or walletd is stopping."""


class Overloaded(ServiceUnavailable):
    """The wallet's shard (or the feed's streams, or bulk admission) is at capacity."""


class NotOwner(ServiceUnavailable):
    """The wallet's shard is moving between walletd processes; nothing was applied."""


class ServerError(ProblemError):
    """A 5xx other than 503: a bug in walletd; never retried."""


class InternalError(ServerError):
    """500 INTERNAL_ERROR: walletd logged the exception under this ``request_id``."""


PROBLEM_CLASSES: Final[Mapping[str, type[ProblemError]]] = {
    "INVALID_JSON": InvalidJson,
    "INVALID_WALLET_ID": InvalidWalletId,
    "VALIDATION_ERROR": ValidationError,
    "IDEMPOTENCY_KEY_REUSED": IdempotencyKeyReused,
    "CURRENCY_MISMATCH": CurrencyMismatch,
    "PAYLOAD_TOO_LARGE": PayloadTooLarge,
    "REQUEST_TIMEOUT": RequestTimeout,
    "TOO_MANY_ITEMS": TooManyItems,
    "ATOMIC_NOT_POSSIBLE": AtomicNotPossible,
    "UNSUPPORTED_MEDIA_TYPE": UnsupportedMediaType,
    "BAD_REQUEST": BadRequest,
    "METHOD_NOT_ALLOWED": MethodNotAllowed,
    "UNAUTHORIZED": Unauthorized,
    "FORBIDDEN": Forbidden,
    "RATE_LIMITED": RateExceeded,
    "TOO_MANY_STREAMS": TooManyStreams,
    "NOT_FOUND": RouteNotFound,
    "WALLET_NOT_FOUND": WalletNotFound,
    "TRANSFER_NOT_FOUND": TransferNotFound,
    "INVALID_HOLD_ID": InvalidHoldId,
    "HOLD_NOT_FOUND": HoldNotFound,
    "OPERATION_NOT_FOUND": OperationNotFound,
    "REFUND_EXCEEDS_TRANSFER": RefundExceedsTransfer,
    "TRANSFER_NOT_COMPLETED": TransferNotCompleted,
    "TRANSFER_IS_REFUND": TransferIsRefund,
    "PAYMENT_NOT_COMPLETED": PaymentNotCompleted,
    "ALREADY_REVERSED": AlreadyReversed,
    "NOT_REVERSIBLE": NotReversible,
    "INVALID_PAYMENT_ID": InvalidPaymentId,
    "PAYMENT_NOT_FOUND": PaymentNotFound,
    "HOLD_EXPIRED": HoldExpired,
    "HOLD_ALREADY_CAPTURED": HoldAlreadyCaptured,
    "HOLD_ALREADY_VOIDED": HoldAlreadyVoided,
    "CAPTURE_EXCEEDS_HOLD": CaptureExceedsHold,
    "TOO_MANY_HOLDS": TooManyHolds,
    "STORAGE_REFUSED": StorageRefused,
    "INVALID_TRANSFER_ID": InvalidTransferId,
    "AS_OF_NOT_SETTLED": AsOfNotSettled,
    "WALLET_ALREADY_EXISTS": WalletAlreadyExists,
    "INSUFFICIENT_FUNDS": InsufficientFunds,
    "BALANCE_LIMIT_EXCEEDED": BalanceLimitExceeded,
    "WALLET_FROZEN": WalletFrozen,
    "WALLET_CLOSED": WalletClosed,
    "CLOSE_BLOCKED": CloseBlocked,
    "OVERDRAFT_LIMIT_IN_USE": OverdraftLimitInUse,
    "PRECONDITION_FAILED": PreconditionFailed,
    "UNAVAILABLE": Unavailable,
    "OVERLOADED": Overloaded,
    "NOT_OWNER": NotOwner,
    "INVALID_WEBHOOK_ID": InvalidWebhookId,
    "WEBHOOK_NOT_FOUND": WebhookNotFound,
    "DELIVERY_NOT_FOUND": DeliveryNotFound,
    "TOO_MANY_WEBHOOKS": TooManyWebhooks,
    "INTERNAL_ERROR": InternalError,
}


def class_for_status(status: int) -> type[ProblemError]:
    """The class of a problem whose code this client does not know: its status's group."""
    if status == 503:
        return ServiceUnavailable
    if status >= 500:
        return ServerError
    if status in (401, 403):
        return AccessDenied
    if status == 429:
        return RateLimited
    if status == 404:
        return NotFound
    if status == 409:
        return Refused
    if 400 <= status < 500:
        return InvalidRequest
    return ProblemError


def problem_error(
    status: int,
    body: Mapping[str, Any],
    *,
    request_id: str | None = None,
    retry_after_s: float | None = None,
) -> ProblemError:
    """The exception for a problem answer: by its ``code``, else by its status."""
    code = body.get("code")
    detail = body.get("detail")
    code_text = code if isinstance(code, str) else f"HTTP_{status}"
    detail_text = detail if isinstance(detail, str) else ""
    error_class = PROBLEM_CLASSES.get(code_text) or class_for_status(status)
    return error_class(
        status, code_text, detail_text, body, request_id=request_id, retry_after_s=retry_after_s
    )
