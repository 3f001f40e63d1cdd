"""An async Python client for walletd: exact money, safe retries, one exception per code.

    async with WalletdClient("http://127.0.0.1:8000") as walletd:
        wallet = await walletd.create_wallet()
        await walletd.deposit(wallet.id, Decimal("10.50"), reference="order-42")
        async for operation in walletd.history(wallet.id, operation_type="DEPOSIT"):
            ...
        async for event in walletd.events():  # the change feed, resumed after a cut
            ...
        async for transfer in walletd.transfers(wallet_id=wallet.id, status="PENDING"):
            ...  # listings of wallets, transfers and holds, followed through their cursors

Every call that changes something carries an Idempotency-Key: one generated per logical
call (or the caller's own, to make a call idempotent across processes), reused by each of
its retries, so a retry after a cut connection or a 503 is applied at most once. Every call
also carries one X-Request-Id, which every error keeps (``request_id``) to find the call in
walletd's log. Retries follow ``RetryPolicy`` (walletd.client.retrying); errors are the tree
in walletd.client.errors. Money is ``Decimal`` both ways; a float is refused, never rounded.

Only the standard library and aiohttp: the client installs alone as ``walletd-client``
(client/pyproject.toml). Each endpoint is a few lines over ``_call``; a JSON shape of its
own is a small dataclass with a ``from_json``.
"""

from __future__ import annotations

import asyncio
import json
import random
import urllib.parse
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal, InvalidOperation
from types import TracebackType
from typing import Any, Final, Generic, Protocol, Self, TypeVar

import aiohttp

from walletd.client.errors import (
    ProblemError,
    TransportError,
    UnexpectedResponse,
    WalletdError,
    problem_error,
)
from walletd.client.retrying import RetryPolicy, parse_retry_after_s

__all__ = [
    "BulkItem",
    "BulkResult",
    "Event",
    "EventPage",
    "HistoryPage",
    "Hold",
    "Operation",
    "Page",
    "Payment",
    "PaymentRefund",
    "Posting",
    "Transfer",
    "Wallet",
    "WalletdClient",
    "Webhook",
    "WebhookDelivery",
    "new_idempotency_key",
]

API_PREFIX: Final = "/api/v1"
REQUEST_TIMEOUT_S: Final = 10.0
# A feed stream sends a heartbeat after 15 s of silence (WALLETD_FEED_HEARTBEAT): a stream
# silent for this long is dead (a lost peer, a stuck proxy) and is reconnected.
STREAM_IDLE_TIMEOUT_S: Final = 60.0
# One SSE event's data; walletd's events are a few hundred bytes.
SSE_EVENT_BYTES_MAX: Final = 1 << 20
CONNECTIONS_MAX: Final = 100
REQUEST_ID_HEADER: Final = "X-Request-Id"
# Methods that change nothing: retried without a key. A POST is retried only with one.
_SAFE_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS"})
# What "no HTTP answer" looks like in aiohttp: refused, reset, cut mid-body, timed out.
_TRANSPORT_ERRORS: Final = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError)
# Feed event fields that are money (walletd renders them as decimal strings).
_EVENT_MONEY_FIELDS: Final = frozenset({"amount", "balance_after", "held_after"})

Amount = Decimal | int | str
Instant = datetime | str
_Parsed = TypeVar("_Parsed")
_Item = TypeVar("_Item")
_Item_co = TypeVar("_Item_co", covariant=True)


def new_idempotency_key() -> str:
    """A fresh key for one logical call (a random UUID: 36 printable ASCII characters)."""
    return str(uuid.uuid4())


def _segment(wallet_id: str | uuid.UUID) -> str:
    """An id as one path segment: whatever a caller passes can never reach another route."""
    return urllib.parse.quote(str(wallet_id), safe="")


def _decimal(value: Any, name: str) -> Decimal:
    if not isinstance(value, str):
        raise UnexpectedResponse(f"{name} is not a decimal string: {value!r}")
    try:
        return Decimal(value)
    except InvalidOperation:
        raise UnexpectedResponse(f"{name} is not a decimal string: {value!r}") from None


def _timestamp(value: Any, name: str) -> datetime:
    if not isinstance(value, str):
        raise UnexpectedResponse(f"{name} is not a timestamp: {value!r}")
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise UnexpectedResponse(f"{name} is not a timestamp: {value!r}") from None


def _optional_text(value: Any) -> str | None:
    return None if value is None else str(value)


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _amount_text(amount: Amount) -> str:
    """The amount as the decimal string the API takes; floats are refused, not rounded."""
    if isinstance(amount, bool) or not isinstance(amount, Decimal | int | str):
        raise TypeError(f"amount must be a Decimal, int or str, not {type(amount).__name__}")
    try:
        exact = Decimal(amount)
    except InvalidOperation:
        raise ValueError(f"amount is not a decimal number: {amount!r}") from None
    if not exact.is_finite():
        raise ValueError(f"amount must be finite: {amount!r}")
    return format(exact, "f")  # never an exponent: "1E+2" becomes "100"


def _limit_text(limit: Amount) -> str:
    """An overdraft limit as the API takes it: 0, or an amount."""
    if not isinstance(limit, bool) and isinstance(limit, Decimal | int | str):
        try:
            if Decimal(limit) == 0:
                return "0"
        except InvalidOperation:
            pass
    return _amount_text(limit)


def _instant_text(instant: Instant, name: str) -> str:
    """An instant as RFC 3339; a naive datetime is refused (which zone would it be in?)."""
    if isinstance(instant, str):
        return instant
    if instant.tzinfo is None or instant.utcoffset() is None:
        raise ValueError(f"{name} must be an aware datetime (with a tzinfo)")
    return instant.isoformat()


def _metadata(value: Any) -> dict[str, str]:
    """A metadata object as sent (an absent one, from a server before metadata: empty)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UnexpectedResponse(f"metadata is not an object: {value!r}")
    return {str(k): str(v) for k, v in value.items()}


def _dumps(body: Any) -> bytes:
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass(frozen=True, slots=True)
class Wallet:
    id: str
    balance: Decimal
    created_at: datetime
    updated_at: datetime
    # True when walletd answered a retry (or a repeated key) with the original response.
    replayed: bool = False
    # balance - held; servers before holds send neither (then: balance, 0).
    available: Decimal | None = None
    held: Decimal = Decimal(0)
    # The instant asked for, on a read with ``as_of``.
    as_of: datetime | None = None
    # Its currency (ISO 4217 or a declared asset), for good; servers before currencies
    # send none (then: None). Money is exact in its decimals.
    currency: str | None = None
    # ACTIVE, FROZEN or CLOSED; how far below zero a debit may take the balance.
    status: str = "ACTIVE"
    overdraft_limit: Decimal = Decimal(0)
    # The wallet's seq from the ETag header: pass it as ``if_match`` to act only if nothing
    # changed the wallet since (None: the server sent no ETag).
    version: int | None = None
    # The wallet's metadata (empty when it has none: walletd then sends no field).
    metadata: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_json(
        cls, body: Mapping[str, Any], replayed: bool = False, version: int | None = None
    ) -> Wallet:
        try:
            as_of = body.get("as_of")
            return cls(
                id=str(body["id"]),
                balance=_decimal(body["balance"], "balance"),
                created_at=_timestamp(body["created_at"], "created_at"),
                updated_at=_timestamp(body["updated_at"], "updated_at"),
                replayed=replayed,
                available=_decimal(body.get("available", body["balance"]), "available"),
                held=_decimal(body.get("held", "0.00"), "held"),
                as_of=None if as_of is None else _timestamp(as_of, "as_of"),
                currency=_optional_text(body.get("currency")),
                status=str(body.get("status", "ACTIVE")),
                overdraft_limit=_decimal(body.get("overdraft_limit", "0.00"), "overdraft_limit"),
                version=version,
                metadata=_metadata(body.get("metadata")),
            )
        except KeyError as missing:
            raise UnexpectedResponse(f"wallet JSON lacks {missing}") from None


@dataclass(frozen=True, slots=True)
class Operation:
    """One row of a wallet's history (its log)."""

    id: int
    # DEPOSIT, WITHDRAW, TRANSFER_OUT/IN/REFUND, HOLD, CAPTURE, RELEASE, WALLET_UPDATE
    operation_type: str
    amount: Decimal
    balance_after: Decimal
    idempotency_key: str | None
    created_at: datetime
    seq: int | None = None  # per wallet, from 1
    held_after: Decimal = Decimal(0)
    transfer_id: str | None = None  # on a transfer's legs
    hold_id: str | None = None  # on HOLD, CAPTURE and RELEASE rows
    reference: str | None = None
    # On a WALLET_UPDATE row: the wallet's status and overdraft limit from then on.
    status: str | None = None
    overdraft_limit: Decimal | None = None
    # What wrote the row: the operation's metadata, or its transfer's or hold's.
    metadata: Mapping[str, str] = field(default_factory=dict)
    # Links: on a refund's legs the transfer it refunds; on a DEPOSIT_REVERSAL /
    # WITHDRAW_REVERSAL row the seq it reverses; on a reversed DEPOSIT / WITHDRAW the seq of
    # its reversal (None from servers before refunds).
    refund_of: str | None = None
    reversal_of: int | None = None
    reversed_by: int | None = None

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Operation:
        try:
            seq = body.get("seq")
            return cls(
                id=int(body["id"]),
                operation_type=str(body["operation_type"]),
                amount=_decimal(body["amount"], "amount"),
                balance_after=_decimal(body["balance_after"], "balance_after"),
                idempotency_key=_optional_text(body["idempotency_key"]),
                created_at=_timestamp(body["created_at"], "created_at"),
                seq=None if seq is None else int(seq),
                held_after=_decimal(body.get("held_after", "0.00"), "held_after"),
                transfer_id=_optional_text(body.get("transfer_id")),
                hold_id=_optional_text(body.get("hold_id")),
                reference=_optional_text(body.get("reference")),
                status=_optional_text(body.get("status")),
                overdraft_limit=(
                    None
                    if body.get("overdraft_limit") is None
                    else _decimal(body["overdraft_limit"], "overdraft_limit")
                ),
                metadata=_metadata(body.get("metadata")),
                refund_of=_optional_text(body.get("refund_of")),
                reversal_of=_optional_int(body.get("reversal_of")),
                reversed_by=_optional_int(body.get("reversed_by")),
            )
        except (KeyError, TypeError, ValueError) as error:  # a missing field, a non-int id
            raise UnexpectedResponse(f"history item is malformed: {error!r}") from None


@dataclass(frozen=True, slots=True)
class Transfer:
    id: str
    from_wallet_id: str
    to_wallet_id: str
    amount: Decimal
    reference: str | None
    status: str  # PENDING, COMPLETED, FAILED
    # Why a FAILED transfer's credit was refused (WALLET_NOT_FOUND, BALANCE_LIMIT_EXCEEDED).
    failure_code: str | None
    created_at: datetime
    updated_at: datetime
    replayed: bool = False
    currency: str | None = None  # both wallets' (None from servers before currencies)
    metadata: Mapping[str, str] = field(default_factory=dict)
    # A refund's original transfer; and what this transfer's refunds that are not FAILED
    # sum to (0 from servers before refunds).
    refund_of: str | None = None
    refunded_amount: Decimal = Decimal(0)
    # A payment's posting: its payment (None otherwise, and from servers before payments).
    payment_id: str | None = None

    @classmethod
    def from_json(cls, body: Mapping[str, Any], replayed: bool = False) -> Transfer:
        try:
            return cls(
                id=str(body["id"]),
                from_wallet_id=str(body["from_wallet_id"]),
                to_wallet_id=str(body["to_wallet_id"]),
                amount=_decimal(body["amount"], "amount"),
                reference=_optional_text(body["reference"]),
                status=str(body["status"]),
                failure_code=_optional_text(body["failure_code"]),
                created_at=_timestamp(body["created_at"], "created_at"),
                updated_at=_timestamp(body["updated_at"], "updated_at"),
                replayed=replayed,
                currency=_optional_text(body.get("currency")),
                metadata=_metadata(body.get("metadata")),
                refund_of=_optional_text(body.get("refund_of")),
                refunded_amount=_decimal(body.get("refunded_amount", "0"), "refunded_amount"),
                payment_id=_optional_text(body.get("payment_id")),
            )
        except KeyError as missing:
            raise UnexpectedResponse(f"transfer JSON lacks {missing}") from None


@dataclass(frozen=True, slots=True)
class PaymentRefund:
    """One posting's refund in ``refund_payment``'s answer: the refund (a ``Transfer``),
    or the problem ``refund_transfer`` would have raised for that posting."""

    posting: int
    transfer_id: str  # the posting's transfer, refunded
    refund_id: str
    status: int
    replayed: bool
    refund: Transfer | None
    problem: ProblemError | None

    @classmethod
    def from_json(cls, body: Mapping[str, Any], request_id: str | None = None) -> PaymentRefund:
        try:
            status, replayed = int(body["status"]), bool(body["replayed"])
            item = body["body"]
            refund = Transfer.from_json(item, replayed) if status == 201 else None
            problem = None if status == 201 else problem_error(status, item, request_id=request_id)
            return cls(
                int(body["posting"]), str(body["transfer_id"]), str(body["refund_id"]), status,
                replayed, refund, problem,
            )  # fmt: skip
        except (KeyError, TypeError, ValueError) as error:
            raise UnexpectedResponse(f"payment refund result is malformed: {error!r}") from None


@dataclass(frozen=True, slots=True)
class Posting:
    """One posting of a payment: a transfer of its own (``transfer_id``)."""

    transfer_id: str
    from_wallet_id: str
    to_wallet_id: str
    amount: Decimal
    status: str  # PENDING, COMPLETED, FAILED
    metadata: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Posting:
        return cls(
            transfer_id=str(body["transfer_id"]),
            from_wallet_id=str(body["from_wallet_id"]),
            to_wallet_id=str(body["to_wallet_id"]),
            amount=_decimal(body["amount"], "amount"),
            status=str(body["status"]),
            metadata=_metadata(body.get("metadata")),
        )


@dataclass(frozen=True, slots=True)
class Payment:
    """Several postings applied all together or not at all (COMPLETED / FAILED; PENDING
    in between). ``failure``: for a failed one, the posting refused first (``posting``,
    ``side``, ``code``)."""

    id: str
    status: str
    currency: str
    reference: str | None
    postings: tuple[Posting, ...]
    failure: Mapping[str, Any] | None
    created_at: datetime
    updated_at: datetime
    replayed: bool = False
    metadata: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_json(cls, body: Mapping[str, Any], replayed: bool = False) -> Payment:
        try:
            return cls(
                id=str(body["id"]),
                status=str(body["status"]),
                currency=str(body["currency"]),
                reference=_optional_text(body["reference"]),
                postings=tuple(Posting.from_json(p) for p in body["postings"]),
                failure=body["failure"],
                created_at=_timestamp(body["created_at"], "created_at"),
                updated_at=_timestamp(body["updated_at"], "updated_at"),
                replayed=replayed,
                metadata=_metadata(body.get("metadata")),
            )
        except (KeyError, TypeError) as missing:
            raise UnexpectedResponse(f"payment JSON lacks {missing}") from None


@dataclass(frozen=True, slots=True)
class Hold:
    id: str
    wallet_id: str
    amount: Decimal
    status: str  # PENDING, CAPTURED, VOIDED, EXPIRED
    captured_amount: Decimal
    released_amount: Decimal
    reference: str | None
    expires_at: datetime
    created_at: datetime
    updated_at: datetime
    replayed: bool = False
    # Set when captured into another wallet: where the money went, by which transfer, and
    # (on the capture's answer only) that transfer as it was then.
    to_wallet_id: str | None = None
    transfer_id: str | None = None
    transfer: Transfer | None = None
    currency: str | None = None  # its wallet's (None from servers before currencies)
    metadata: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_json(cls, body: Mapping[str, Any], replayed: bool = False) -> Hold:
        try:
            transfer = body.get("transfer")
            return cls(
                id=str(body["id"]),
                wallet_id=str(body["wallet_id"]),
                amount=_decimal(body["amount"], "amount"),
                status=str(body["status"]),
                captured_amount=_decimal(body["captured_amount"], "captured_amount"),
                released_amount=_decimal(body["released_amount"], "released_amount"),
                reference=_optional_text(body["reference"]),
                expires_at=_timestamp(body["expires_at"], "expires_at"),
                created_at=_timestamp(body["created_at"], "created_at"),
                updated_at=_timestamp(body["updated_at"], "updated_at"),
                replayed=replayed,
                to_wallet_id=_optional_text(body.get("to_wallet_id")),
                transfer_id=_optional_text(body.get("transfer_id")),
                transfer=None if transfer is None else Transfer.from_json(transfer),
                currency=_optional_text(body.get("currency")),
                metadata=_metadata(body.get("metadata")),
            )
        except KeyError as missing:
            raise UnexpectedResponse(f"hold JSON lacks {missing}") from None


@dataclass(frozen=True, slots=True)
class HistoryPage:
    items: list[Operation]
    next_cursor: str | None


@dataclass(frozen=True, slots=True)
class Page(Generic[_Item]):
    """One page of a listing (``Page[Wallet]``, ``Page[Transfer]``, ``Page[Hold]``), newest
    first; ``next_cursor`` goes on with the same filters (None on the last page)."""

    items: list[_Item]
    next_cursor: str | None


class _Paged(Protocol[_Item_co]):
    """A page of any keyset-paginated read (``Page``, ``HistoryPage``)."""

    @property
    def items(self) -> Sequence[_Item_co]: ...
    @property
    def next_cursor(self) -> str | None: ...


async def _every_item(
    fetch: Callable[[str | None], Awaitable[_Paged[_Item]]],
) -> AsyncGenerator[_Item, None]:
    """Every item of the pages ``fetch(cursor)`` returns, following ``next_cursor`` from the
    first page (cursor None) to the last (next_cursor None)."""
    cursor: str | None = None
    while True:
        page = await fetch(cursor)
        for item in page.items:
            yield item
        if page.next_cursor is None:
            return
        cursor = page.next_cursor


@dataclass(frozen=True, slots=True)
class Event:
    """One change of the feed. ``data`` is the whole event as walletd sent it, its money
    fields as ``Decimal``; skip the ``type``s you do not know (more will be added)."""

    position: str  # opaque; pass it back as ``after`` (store it once the event is processed)
    type: str  # wallet.created, operation.applied, ...
    created_at: datetime
    wallet_id: str | None
    data: Mapping[str, Any] = field(repr=False)

    @classmethod
    def from_json(cls, body: Any) -> Event:
        if not isinstance(body, dict):
            raise UnexpectedResponse(f"feed event is not an object: {body!r}")
        try:
            data = {
                name: _decimal(value, name) if name in _EVENT_MONEY_FIELDS else value
                for name, value in body.items()
            }
            return cls(
                position=str(body["position"]),
                type=str(body["type"]),
                created_at=_timestamp(body["created_at"], "created_at"),
                wallet_id=_optional_text(body.get("wallet_id")),
                data=data,
            )
        except KeyError as missing:
            raise UnexpectedResponse(f"feed event lacks {missing}") from None


@dataclass(frozen=True, slots=True)
class Webhook:
    """A webhook subscription. ``secret`` is set only on the answer to its creation: the one
    time walletd shows it (keep it to verify signatures, ``verify_webhook_signature``)."""

    id: str
    url: str
    event_types: list[str]
    enabled: bool
    status: str  # active, disabled, failing
    position: str  # the feed position of the last event it has taken
    failing_since: datetime | None
    created_at: datetime
    updated_at: datetime
    secret: str | None = field(default=None, repr=False)

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Webhook:
        failing = body.get("failing_since")
        return cls(
            id=str(body["id"]), url=str(body["url"]), event_types=list(body["event_types"]),
            enabled=bool(body["enabled"]), status=str(body["status"]),
            position=str(body["position"]),
            failing_since=None if failing is None else _timestamp(failing, "failing_since"),
            created_at=_timestamp(body["created_at"], "created_at"),
            updated_at=_timestamp(body["updated_at"], "updated_at"),
            secret=_optional_text(body.get("secret")),
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class WebhookDelivery:
    """One attempt to deliver an event: ``status`` is None when the endpoint did not
    answer (``error`` says why)."""

    id: str
    webhook_id: str
    position: str
    event_type: str
    attempted_at: datetime
    status: int | None
    error: str | None
    duration_ms: int
    succeeded: bool
    redelivery: bool

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> WebhookDelivery:
        return cls(
            id=str(body["id"]), webhook_id=str(body["webhook_id"]),
            position=str(body["position"]), event_type=str(body["event_type"]),
            attempted_at=_timestamp(body["attempted_at"], "attempted_at"),
            status=body["status"], error=_optional_text(body.get("error")),
            duration_ms=int(body["duration_ms"]), succeeded=bool(body["succeeded"]),
            redelivery=bool(body["redelivery"]),
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class EventPage:
    events: list[Event]
    next_position: str  # the ``after`` of the next page (``after`` itself when none is new)


@dataclass(frozen=True, slots=True)
class BulkItem:
    """One operation of a bulk request; ``idempotency_key`` is optional per item (the
    request's own key covers the items without one)."""

    wallet_id: str | uuid.UUID
    operation_type: str  # "DEPOSIT" or "WITHDRAW"
    amount: Amount
    idempotency_key: str | None = None
    reference: str | None = None
    metadata: Mapping[str, str] | None = None

    def to_json(self) -> dict[str, Any]:
        item: dict[str, Any] = {
            "wallet_id": str(self.wallet_id),
            "operation_type": self.operation_type,
            "amount": _amount_text(self.amount),
        }
        if self.idempotency_key is not None:
            item["idempotency_key"] = self.idempotency_key
        if self.reference is not None:
            item["reference"] = self.reference
        if self.metadata:
            item["metadata"] = dict(self.metadata)
        return item


@dataclass(frozen=True, slots=True)
class BulkResult:
    """What the single endpoint would have answered for one item: the wallet after it,
    or the problem (as the exception the single call would have raised)."""

    index: int
    status: int
    wallet: Wallet | None
    problem: ProblemError | None

    @classmethod
    def from_json(cls, body: Mapping[str, Any], request_id: str | None = None) -> BulkResult:
        try:
            status = int(body["status"])
            item_body = body["body"]
            if status == 200:
                wallet = Wallet.from_json(item_body, bool(body.get("replayed")))
                return cls(int(body["index"]), status, wallet, None)
            problem = problem_error(status, item_body, request_id=request_id)
            return cls(int(body["index"]), status, None, problem)
        except (KeyError, TypeError, ValueError) as error:
            raise UnexpectedResponse(f"bulk result is malformed: {error!r}") from None


@dataclass(frozen=True, slots=True)
class _Answer:
    status: int
    body: Any
    replayed: bool
    retry_after_s: float | None
    request_id: str
    # The wallet's seq from an ETag header ("<seq>"), when the answer had one.
    version: int | None = None

    def wallet(self) -> Wallet:
        return self.decode(lambda body: Wallet.from_json(body, self.replayed, self.version))

    def decode(self, parse: Callable[[Any], _Parsed]) -> _Parsed:
        """``parse(body)``; an answer it cannot read raises with this call's request id."""
        try:
            return parse(self.body)
        except UnexpectedResponse as error:
            error.request_id = self.request_id
            raise


class WalletdClient:
    """One walletd base URL; use as ``async with``. Safe to share between tasks."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        retry: RetryPolicy | None = None,
        request_timeout_s: float = REQUEST_TIMEOUT_S,
        stream_idle_timeout_s: float = STREAM_IDLE_TIMEOUT_S,
        session: aiohttp.ClientSession | None = None,
        unit_random: Callable[[], float] = random.random,
    ) -> None:
        self._base_url = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.retry = retry or RetryPolicy()
        self._request_timeout_s = request_timeout_s
        self._stream_idle_timeout_s = stream_idle_timeout_s
        self._session = session
        self._owns_session = session is None
        self._unit_random = unit_random

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Closes the session the client made itself (never one it was given)."""
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    # -- wallets and their operations ------------------------------------------------------

    async def create_wallet(
        self,
        wallet_id: str | uuid.UUID | None = None,
        *,
        idempotency_key: str | None = None,
        currency: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> Wallet:
        """Creates a wallet, with the id given or one walletd picks, in ``currency`` (an ISO
        4217 code or an asset the operator declared; None: walletd's default currency), and
        your ``metadata`` (strings; at most 50 keys of 1-40 characters, values of at most
        500)."""
        fields: dict[str, Any] = {}
        if wallet_id is not None:
            fields["id"] = str(wallet_id)
        if currency is not None:
            fields["currency"] = currency
        if metadata:
            fields["metadata"] = dict(metadata)
        body = fields or None
        answer = await self._call(
            "POST", "/wallets", body, idempotency_key=idempotency_key or new_idempotency_key()
        )
        return answer.wallet()

    async def get_wallet(
        self, wallet_id: str | uuid.UUID, *, as_of: Instant | None = None
    ) -> Wallet:
        """The committed balance now, or as it was at the instant ``as_of`` (an aware
        datetime or RFC 3339 text; an instant ahead of walletd's clock by more than its
        skew allowance raises AsOfNotSettled, whose ``retry_after_s`` says when to ask
        again)."""
        params = None if as_of is None else {"as_of": _instant_text(as_of, "as_of")}
        answer = await self._call("GET", f"/wallets/{_segment(wallet_id)}", params=params)
        return answer.wallet()

    async def deposit(
        self,
        wallet_id: str | uuid.UUID,
        amount: Amount,
        *,
        reference: str | None = None,
        metadata: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
        if_match: int | None = None,
    ) -> Wallet:
        """Adds ``amount``; ``reference`` (yours, 1-255 characters) and ``metadata`` are
        kept in the history and the feed, and are part of what the key compares.
        ``if_match`` (a Wallet's ``version``): only if nothing changed the wallet since
        (else PreconditionFailed)."""
        return await self._operate(
            wallet_id, "DEPOSIT", amount, reference, idempotency_key, metadata, if_match
        )

    async def withdraw(
        self,
        wallet_id: str | uuid.UUID,
        amount: Amount,
        *,
        reference: str | None = None,
        metadata: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
        if_match: int | None = None,
    ) -> Wallet:
        """Takes ``amount`` out of the available money (InsufficientFunds if short,
        WalletFrozen / WalletClosed by the wallet's status); ``reference``, ``metadata`` and
        ``if_match`` as for deposit."""
        return await self._operate(
            wallet_id, "WITHDRAW", amount, reference, idempotency_key, metadata, if_match
        )

    async def update_wallet(
        self,
        wallet_id: str | uuid.UUID,
        *,
        status: str | None = None,
        overdraft_limit: Amount | None = None,
        metadata: Mapping[str, str | None] | None = None,
        if_match: int | None = None,
        idempotency_key: str | None = None,
    ) -> Wallet:
        """PATCH the wallet: its ``status`` (ACTIVE, FROZEN, CLOSED), its
        ``overdraft_limit`` (0 or an amount) and/or its ``metadata`` (merged: each key set,
        a None value deleting its key), in one change; needs a key with the ``admin`` scope.
        Refusals: WalletClosed, CloseBlocked (``blocked_by``), OverdraftLimitInUse,
        PreconditionFailed (``if_match``, a Wallet's ``version``, named another version),
        ValidationError (metadata past its bounds, after the merge too)."""
        body: dict[str, Any] = {}
        if status is not None:
            body["status"] = status
        if overdraft_limit is not None:
            body["overdraft_limit"] = _limit_text(overdraft_limit)
        if metadata:
            body["metadata"] = dict(metadata)
        if not body:
            raise ValueError("update_wallet needs a status, an overdraft_limit or metadata")
        answer = await self._call(
            "PATCH",
            f"/wallets/{_segment(wallet_id)}",
            body,
            idempotency_key=idempotency_key or new_idempotency_key(),
            if_match=if_match,
        )
        return answer.wallet()

    async def history(
        self,
        wallet_id: str | uuid.UUID,
        *,
        since: Instant | None = None,
        until: Instant | None = None,
        operation_type: str | None = None,
        page_size: int | None = None,
    ) -> AsyncGenerator[Operation, None]:
        """The wallet's operations, newest first: those at or after ``since``, strictly
        before ``until``, of ``operation_type`` (each filter optional), read a page at a time
        (``page_size``, 1-500) until the last one."""
        pages = _every_item(lambda cursor: self.history_page(
            wallet_id, cursor=cursor, since=since, until=until,
            operation_type=operation_type, limit=page_size,
        ))  # fmt: skip
        async for operation in pages:
            yield operation

    async def history_page(
        self,
        wallet_id: str | uuid.UUID,
        *,
        cursor: str | None = None,
        since: Instant | None = None,
        until: Instant | None = None,
        operation_type: str | None = None,
        limit: int | None = None,
    ) -> HistoryPage:
        """One page of ``history``: a filtered page may hold fewer than ``limit`` items, even
        none, with a ``next_cursor`` to go on; the last page's is None."""
        params: dict[str, str] = {}
        if limit is not None:
            params["limit"] = str(limit)
        if cursor is not None:
            params["cursor"] = cursor
        if since is not None:
            params["since"] = _instant_text(since, "since")
        if until is not None:
            params["until"] = _instant_text(until, "until")
        if operation_type is not None:
            params["operation_type"] = operation_type
        answer = await self._call(
            "GET", f"/wallets/{_segment(wallet_id)}/operations", params=params
        )
        return answer.decode(_history_page)

    async def bulk(
        self,
        items: list[BulkItem],
        *,
        atomic: bool = False,
        idempotency_key: str | None = None,
    ) -> list[BulkResult]:
        """Many deposits/withdrawals in one request; one result per item, in order.

        The request key (generated unless given) makes every retry replay item by item, so
        nothing applies twice. ``atomic``: all or nothing; a refusal raises the refused
        item's exception (its ``body["index"]`` names it), nothing applied.
        """
        body = {"items": [item.to_json() for item in items], "atomic": atomic}
        answer = await self._call(
            "POST",
            "/operations/bulk",
            body,
            idempotency_key=idempotency_key or new_idempotency_key(),
        )

        def parse(body: Any) -> list[BulkResult]:
            results = body.get("results") if isinstance(body, dict) else None
            if not isinstance(results, list) or len(results) != len(items):
                raise UnexpectedResponse("bulk answer lacks one result per item")
            return [BulkResult.from_json(result, answer.request_id) for result in results]

        return answer.decode(parse)

    # -- transfers -------------------------------------------------------------------------

    async def create_transfer(
        self,
        from_wallet_id: str | uuid.UUID,
        to_wallet_id: str | uuid.UUID,
        amount: Amount,
        *,
        reference: str | None = None,
        metadata: Mapping[str, str] | None = None,
        transfer_id: str | uuid.UUID | None = None,
        idempotency_key: str | None = None,
    ) -> Transfer:
        """Moves ``amount`` between two wallets; the answer means both legs are committed
        (COMPLETED). ``transfer_id`` (yours) or the key (generated unless given) makes a
        retry return the same transfer. A refusal raises with ``body["side"]`` ("from" /
        "to"); a refusal by the receiver carries the FAILED, refunded ``body["transfer"]``;
        ServiceUnavailable may leave it PENDING: ``get_transfer`` shows it, and walletd
        finishes it by itself."""
        body: dict[str, Any] = {
            "from_wallet_id": str(from_wallet_id),
            "to_wallet_id": str(to_wallet_id),
            "amount": _amount_text(amount),
        }
        if reference is not None:
            body["reference"] = reference
        if metadata:
            body["metadata"] = dict(metadata)
        if transfer_id is not None:
            body["id"] = str(transfer_id)
        answer = await self._call(
            "POST", "/transfers", body, idempotency_key=idempotency_key or new_idempotency_key()
        )
        return answer.decode(lambda body: Transfer.from_json(body, answer.replayed))

    async def get_transfer(self, transfer_id: str | uuid.UUID) -> Transfer:
        answer = await self._call("GET", f"/transfers/{_segment(transfer_id)}")
        return answer.decode(Transfer.from_json)

    async def refund_transfer(
        self,
        transfer_id: str | uuid.UUID,
        amount: Amount | None = None,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
    ) -> Transfer:
        """Gives back ``amount`` (None: all that is left) of a COMPLETED transfer, from its
        receiver to its sender; the answer is the refund, a COMPLETED transfer whose
        ``refund_of`` is ``transfer_id``. The key (generated unless given) makes a retry
        return the same refund. Raises RefundExceedsTransfer past what is left (its
        ``body["refundable"]``), TransferNotCompleted, TransferIsRefund, TransferNotFound,
        or a debit's refusal of the receiver (InsufficientFunds, WalletFrozen...)."""
        body: dict[str, Any] = {}
        if amount is not None:
            body["amount"] = _amount_text(amount)
        if reason is not None:
            body["reason"] = reason
        if metadata:
            body["metadata"] = dict(metadata)
        answer = await self._call(
            "POST", f"/transfers/{_segment(transfer_id)}/refunds", body,
            idempotency_key=idempotency_key or new_idempotency_key(),
        )  # fmt: skip
        return answer.decode(lambda body: Transfer.from_json(body, answer.replayed))

    async def refunds(
        self, transfer_id: str | uuid.UUID, *, page_size: int | None = None
    ) -> AsyncGenerator[Transfer, None]:
        """Every refund of the transfer, newest first, a page at a time."""
        pages = _every_item(lambda cursor: self._refunds_page(transfer_id, cursor, page_size))
        async for refund in pages:
            yield refund

    async def _refunds_page(
        self, transfer_id: str | uuid.UUID, cursor: str | None, limit: int | None
    ) -> Page[Transfer]:
        params = _listing_params(
            since=None, until=None, cursor=cursor, limit=limit, refund_of=transfer_id
        )
        answer = await self._call("GET", "/transfers", params=params)
        return answer.decode(lambda body: _page(body, Transfer.from_json))

    async def reverse_operation(
        self,
        wallet_id: str | uuid.UUID,
        seq: int,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
    ) -> Wallet:
        """Reverses the wallet's DEPOSIT or WITHDRAW ``seq`` (the opposite movement of its
        amount), at most once: the answer is the wallet after it (its ``version`` is the
        reversal's seq). The key (generated unless given) makes a retry replay it; another
        key raises AlreadyReversed. NotReversible for another kind of row,
        OperationNotFound for no such row, InsufficientFunds when a deposit's reversal
        cannot be paid."""
        body: dict[str, Any] = {}
        if reason is not None:
            body["reason"] = reason
        if metadata:
            body["metadata"] = dict(metadata)
        answer = await self._call(
            "POST", f"/wallets/{_segment(wallet_id)}/operations/{int(seq)}/reversal", body,
            idempotency_key=idempotency_key or new_idempotency_key(),
        )  # fmt: skip
        return answer.wallet()

    # -- payments --------------------------------------------------------------------------

    async def create_payment(
        self,
        postings: Sequence[tuple[str | uuid.UUID, str | uuid.UUID, Amount] | Mapping[str, Any]],
        *,
        reference: str | None = None,
        metadata: Mapping[str, str] | None = None,
        payment_id: str | uuid.UUID | None = None,
        idempotency_key: str | None = None,
    ) -> Payment:
        """Applies every posting or none; the answer means every posting is COMPLETED.
        A posting is ``(from_wallet_id, to_wallet_id, amount)`` or a mapping with those
        keys (and ``metadata``). A refusal raises with ``body["posting"]`` (its index) and
        ``body["side"]``, and the FAILED ``body["payment"]``; ServiceUnavailable may leave
        it PENDING: ``get_payment`` shows it, and walletd finishes it by itself. The key
        (generated unless given) or ``payment_id`` makes a retry return the same payment."""
        wanted: list[dict[str, Any]] = []
        for item in postings:
            entry: dict[str, Any]
            if isinstance(item, Mapping):
                entry = {
                    "from_wallet_id": str(item["from_wallet_id"]),
                    "to_wallet_id": str(item["to_wallet_id"]),
                    "amount": _amount_text(item["amount"]),
                }
                if item.get("metadata"):
                    entry["metadata"] = dict(item["metadata"])
            else:
                source, target, amount = item
                entry = {
                    "from_wallet_id": str(source),
                    "to_wallet_id": str(target),
                    "amount": _amount_text(amount),
                }
            wanted.append(entry)
        body: dict[str, Any] = {"postings": wanted}
        if reference is not None:
            body["reference"] = reference
        if metadata:
            body["metadata"] = dict(metadata)
        if payment_id is not None:
            body["id"] = str(payment_id)
        answer = await self._call(
            "POST", "/payments", body, idempotency_key=idempotency_key or new_idempotency_key()
        )
        return answer.decode(lambda body: Payment.from_json(body, answer.replayed))

    async def get_payment(self, payment_id: str | uuid.UUID) -> Payment:
        answer = await self._call("GET", f"/payments/{_segment(payment_id)}")
        return answer.decode(Payment.from_json)

    async def refund_payment(
        self,
        payment_id: str | uuid.UUID,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
    ) -> list[PaymentRefund]:
        """Refunds what is left of every posting of a COMPLETED payment: one refund per
        posting, each its own (not atomic as a group): a ``PaymentRefund`` per posting, in
        order, with the refund or the problem that posting's refund met (a receiver that
        cannot pay: ``InsufficientFunds``; nothing left: ``RefundExceedsTransfer``). The key
        (generated unless given) makes a retry replay every refund. Raises
        PaymentNotCompleted (PENDING or FAILED), PaymentNotFound."""
        body: dict[str, Any] = {}
        if reason is not None:
            body["reason"] = reason
        if metadata:
            body["metadata"] = dict(metadata)
        answer = await self._call(
            "POST", f"/payments/{_segment(payment_id)}/refunds", body,
            idempotency_key=idempotency_key or new_idempotency_key(),
        )  # fmt: skip
        return answer.decode(
            lambda body: [
                PaymentRefund.from_json(item, answer.request_id) for item in body["results"]
            ]
        )

    # -- holds -----------------------------------------------------------------------------

    async def create_hold(
        self,
        wallet_id: str | uuid.UUID,
        amount: Amount,
        *,
        expires_in_s: int | None = None,
        reference: str | None = None,
        metadata: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
    ) -> Hold:
        """Reserves ``amount`` of the wallet's available money (a PENDING hold). The key
        (generated unless given) makes a retry return the same hold."""
        body: dict[str, Any] = {"amount": _amount_text(amount)}
        if expires_in_s is not None:
            body["expires_in_s"] = expires_in_s
        if reference is not None:
            body["reference"] = reference
        if metadata:
            body["metadata"] = dict(metadata)
        answer = await self._call(
            "POST", f"/wallets/{_segment(wallet_id)}/holds", body,
            idempotency_key=idempotency_key or new_idempotency_key(),
        )  # fmt: skip
        return answer.decode(lambda body: Hold.from_json(body, answer.replayed))

    async def capture(
        self,
        hold_id: str | uuid.UUID,
        amount: Amount | None = None,
        *,
        to_wallet_id: str | uuid.UUID | None = None,
        idempotency_key: str | None = None,
    ) -> Hold:
        """Captures ``amount`` of the hold (all of it when None); the rest is released.
        With ``to_wallet_id`` the captured money moves there by a transfer
        (``Hold.transfer``: COMPLETED, FAILED and refunded, or PENDING until walletd
        finishes it; read it again with ``get_transfer(hold.transfer_id)``)."""
        body: dict[str, Any] = {} if amount is None else {"amount": _amount_text(amount)}
        if to_wallet_id is not None:
            body["to_wallet_id"] = str(to_wallet_id)
        answer = await self._call(
            "POST", f"/holds/{_segment(hold_id)}/capture", body,
            idempotency_key=idempotency_key or new_idempotency_key(),
        )  # fmt: skip
        return answer.decode(lambda body: Hold.from_json(body, answer.replayed))

    async def void(self, hold_id: str | uuid.UUID, *, idempotency_key: str | None = None) -> Hold:
        """Releases the whole hold."""
        answer = await self._call(
            "POST", f"/holds/{_segment(hold_id)}/void", {},
            idempotency_key=idempotency_key or new_idempotency_key(),
        )  # fmt: skip
        return answer.decode(lambda body: Hold.from_json(body, answer.replayed))

    async def get_hold(self, hold_id: str | uuid.UUID) -> Hold:
        answer = await self._call("GET", f"/holds/{_segment(hold_id)}")
        return answer.decode(Hold.from_json)

    # -- listings --------------------------------------------------------------------------

    async def wallets_page(
        self,
        *,
        status: str | None = None,
        currency: str | None = None,
        metadata: tuple[str, str] | None = None,
        since: Instant | None = None,
        until: Instant | None = None,
        cursor: str | None = None,
        limit: int | None = None,
    ) -> Page[Wallet]:
        """One page of the wallets in ``status`` (ACTIVE, FROZEN, CLOSED), of ``currency``
        (a code), whose metadata has ``metadata`` = (key, value), created at or after
        ``since`` and strictly before ``until`` (each optional), newest first. With
        ``metadata``, or ``status`` and ``currency`` together, a page may hold fewer than
        ``limit`` items, even none, with a ``next_cursor`` to go on."""
        params = _listing_params(
            since=since, until=until, cursor=cursor, limit=limit, status=status,
        )  # fmt: skip
        if currency is not None:
            params["currency"] = currency
        if metadata is not None:
            key, value = metadata
            params[f"metadata[{key}]"] = value
        answer = await self._call("GET", "/wallets", params=params)
        return answer.decode(lambda body: _page(body, Wallet.from_json))

    async def wallets(
        self,
        *,
        status: str | None = None,
        currency: str | None = None,
        metadata: tuple[str, str] | None = None,
        since: Instant | None = None,
        until: Instant | None = None,
        page_size: int | None = None,
    ) -> AsyncGenerator[Wallet, None]:
        """Every wallet ``wallets_page`` selects, newest first, a page at a time."""
        pages = _every_item(lambda cursor: self.wallets_page(
            status=status, currency=currency, metadata=metadata, since=since, until=until,
            cursor=cursor, limit=page_size,
        ))  # fmt: skip
        async for wallet in pages:
            yield wallet

    async def transfers_page(
        self,
        *,
        wallet_id: str | uuid.UUID | None = None,
        status: str | None = None,
        since: Instant | None = None,
        until: Instant | None = None,
        cursor: str | None = None,
        limit: int | None = None,
    ) -> Page[Transfer]:
        """One page of the transfers from or to ``wallet_id``, in ``status`` (PENDING,
        COMPLETED, FAILED), created in [``since``, ``until``) (each optional), newest first.
        With both ``wallet_id`` and ``status`` a page may hold fewer than ``limit`` items,
        even none, with a ``next_cursor`` to go on."""
        params = _listing_params(
            since=since, until=until, cursor=cursor, limit=limit,
            wallet_id=wallet_id, status=status,
        )  # fmt: skip
        answer = await self._call("GET", "/transfers", params=params)
        return answer.decode(lambda body: _page(body, Transfer.from_json))

    async def transfers(
        self,
        *,
        wallet_id: str | uuid.UUID | None = None,
        status: str | None = None,
        since: Instant | None = None,
        until: Instant | None = None,
        page_size: int | None = None,
    ) -> AsyncGenerator[Transfer, None]:
        """Every transfer ``transfers_page`` selects, newest first, a page at a time."""
        pages = _every_item(lambda cursor: self.transfers_page(
            wallet_id=wallet_id, status=status, since=since, until=until, cursor=cursor,
            limit=page_size,
        ))  # fmt: skip
        async for transfer in pages:
            yield transfer

    async def holds_page(
        self,
        *,
        wallet_id: str | uuid.UUID | None = None,
        status: str | None = None,
        expires_before: Instant | None = None,
        since: Instant | None = None,
        until: Instant | None = None,
        cursor: str | None = None,
        limit: int | None = None,
    ) -> Page[Hold]:
        """One page of the holds on ``wallet_id``, in ``status`` (PENDING, CAPTURED, VOIDED,
        EXPIRED), expiring strictly before ``expires_before``, created in [``since``,
        ``until``) (each optional), newest first. With ``expires_before``, or ``wallet_id``
        and ``status`` together, a page may hold fewer than ``limit`` items, even none,
        with a ``next_cursor`` to go on."""
        params = _listing_params(
            since=since, until=until, cursor=cursor, limit=limit,
            wallet_id=wallet_id, status=status,
        )  # fmt: skip
        if expires_before is not None:
            params["expires_before"] = _instant_text(expires_before, "expires_before")
        answer = await self._call("GET", "/holds", params=params)
        return answer.decode(lambda body: _page(body, Hold.from_json))

    async def holds(
        self,
        *,
        wallet_id: str | uuid.UUID | None = None,
        status: str | None = None,
        expires_before: Instant | None = None,
        since: Instant | None = None,
        until: Instant | None = None,
        page_size: int | None = None,
    ) -> AsyncGenerator[Hold, None]:
        """Every hold ``holds_page`` selects, newest first, a page at a time."""
        pages = _every_item(lambda cursor: self.holds_page(
            wallet_id=wallet_id, status=status, expires_before=expires_before,
            since=since, until=until, cursor=cursor, limit=page_size,
        ))  # fmt: skip
        async for hold in pages:
            yield hold

    # -- the change feed -------------------------------------------------------------------

    async def events_page(self, *, after: str | None = None, limit: int | None = None) -> EventPage:
        """One page of the feed after the position ``after`` (from the start when None)."""
        params: dict[str, str] = {}
        if after is not None:
            params["after"] = after
        if limit is not None:
            params["limit"] = str(limit)
        answer = await self._call("GET", "/events", params=params)
        return answer.decode(_event_page)

    async def events(self, *, after: str | None = None) -> AsyncGenerator[Event, None]:
        """Every change after ``after`` (from the start when None), as it commits, from the
        Server-Sent Events stream; it never ends by itself.

        A dropped stream (a cut connection, walletd restarting, a storage outage, silence
        past ``stream_idle_timeout_s``) is reopened with ``Last-Event-ID`` set to the last
        event received: nothing lost, nothing repeated. Reopening follows ``retry``:
        a run of failed attempts (no 200, or one that brought nothing) ends after
        ``attempts_max`` or ``total_s_max`` with the last error; 503 honours Retry-After,
        any other problem is raised at once. ``aclose()`` it (or leave the ``async for``)
        to close the connection.
        """
        url = f"{self._base_url}{API_PREFIX}/events/stream"
        last_position = after
        loop = asyncio.get_running_loop()
        failures = 0
        failing_since = loop.time()
        while True:
            request_id = _new_request_id()
            headers = dict(self._headers)
            headers.update({"Accept": "text/event-stream", REQUEST_ID_HEADER: request_id})
            if last_position is not None:
                headers["Last-Event-ID"] = last_position
            failure: WalletdError
            stream = _SseReader()
            try:
                async with self._ensure_session().get(
                    url,
                    headers=headers,
                    timeout=aiohttp.ClientTimeout(
                        total=None,
                        connect=self._request_timeout_s,
                        sock_read=self._stream_idle_timeout_s,
                    ),
                ) as response:
                    request_id = response.headers.get(REQUEST_ID_HEADER, request_id)
                    if response.status != 200:
                        raw = await response.read()
                        body = _problem_body(raw, response.content_type)
                        retry_after_s = parse_retry_after_s(response.headers.get("Retry-After"))
                        problem = problem_error(
                            response.status, body, request_id=request_id,
                            retry_after_s=retry_after_s,
                        )  # fmt: skip
                        if response.status != 503:
                            raise problem
                        failure = problem
                    elif response.content_type != "text/event-stream":
                        raise UnexpectedResponse(
                            f"feed stream answered {response.content_type}, not an event stream",
                            request_id=request_id,
                        )
                    else:
                        async for event in stream.events(response.content):
                            last_position = event.position
                            yield event
                        failure = TransportError(
                            "the feed stream ended (walletd stopping, or storage down)",
                            request_id=request_id,
                        )
            except _TRANSPORT_ERRORS as error:
                failure = TransportError(
                    f"feed stream: no answer ({type(error).__name__}: {error})",
                    request_id=request_id,
                )
                failure.__cause__ = error
            except ValueError as error:  # aiohttp: a line past its read buffer
                raise UnexpectedResponse(f"feed stream: {error}", request_id=request_id) from None
            if stream.lines_read > 0:
                # This connection worked: the next failure starts a new run.
                failures = 0
                failing_since = loop.time()
            failures += 1
            delay_s = self.retry.delay_s(failures, failure.retry_after_s, self._unit_random())
            if (
                failures >= self.retry.attempts_max
                or loop.time() + delay_s - failing_since > self.retry.total_s_max
            ):
                raise failure
            await asyncio.sleep(delay_s)

    # -- webhooks (an admin key) ------------------------------------------------------------

    async def create_webhook(
        self,
        url: str,
        *,
        event_types: list[str] | None = None,
        enabled: bool = True,
        after: str | None = None,
    ) -> Webhook:
        """A new subscription; its ``secret`` is shown in this answer only. Sent once (a
        retry could create two): on a transport error, list the webhooks to see."""  # fmt: skip
        body: dict[str, Any] = {"url": url, "enabled": enabled}
        if event_types is not None:
            body["event_types"] = event_types
        if after is not None:
            body["after"] = after
        answer = await self._call("POST", "/webhooks", body)
        return answer.decode(Webhook.from_json)

    async def list_webhooks(self) -> list[Webhook]:
        answer = await self._call("GET", "/webhooks")
        return answer.decode(lambda body: [Webhook.from_json(item) for item in body["items"]])

    async def get_webhook(self, webhook_id: str | uuid.UUID) -> Webhook:
        answer = await self._call("GET", f"/webhooks/{_segment(webhook_id)}")
        return answer.decode(Webhook.from_json)

    async def update_webhook(
        self,
        webhook_id: str | uuid.UUID,
        *,
        url: str | None = None,
        event_types: list[str] | None = None,
        enabled: bool | None = None,
    ) -> Webhook:
        """Changes what is given; ``enabled=True`` also restarts a failing subscription
        from its cursor."""  # fmt: skip
        body: dict[str, Any] = {}
        if url is not None:
            body["url"] = url
        if event_types is not None:
            body["event_types"] = event_types
        if enabled is not None:
            body["enabled"] = enabled
        answer = await self._call("PATCH", f"/webhooks/{_segment(webhook_id)}", body)
        return answer.decode(Webhook.from_json)

    async def delete_webhook(self, webhook_id: str | uuid.UUID) -> None:
        await self._call("DELETE", f"/webhooks/{_segment(webhook_id)}")

    async def webhook_deliveries(
        self, webhook_id: str | uuid.UUID, *, limit: int | None = None
    ) -> list[WebhookDelivery]:
        """The newest attempts first (walletd keeps a bounded number)."""
        params = {} if limit is None else {"limit": str(limit)}
        answer = await self._call(
            "GET", f"/webhooks/{_segment(webhook_id)}/deliveries", params=params
        )
        return answer.decode(
            lambda body: [WebhookDelivery.from_json(item) for item in body["items"]]
        )

    async def redeliver(
        self, webhook_id: str | uuid.UUID, delivery_id: str | int
    ) -> WebhookDelivery:
        """Sends the event of an attempt again, now; the answer is the new attempt."""
        answer = await self._call(
            "POST", f"/webhooks/{_segment(webhook_id)}/deliveries/{int(delivery_id)}/redeliver"
        )
        return answer.decode(WebhookDelivery.from_json)

    # -- one call, with its retries --------------------------------------------------------

    async def _operate(
        self,
        wallet_id: str | uuid.UUID,
        kind: str,
        amount: Amount,
        reference: str | None,
        key: str | None,
        metadata: Mapping[str, str] | None = None,
        if_match: int | None = None,
    ) -> Wallet:
        body: dict[str, Any] = {"operation_type": kind, "amount": _amount_text(amount)}
        if reference is not None:
            body["reference"] = reference
        if metadata:
            body["metadata"] = dict(metadata)
        answer = await self._call(
            "POST",
            f"/wallets/{_segment(wallet_id)}/operation",
            body,
            idempotency_key=key or new_idempotency_key(),
            if_match=if_match,
        )
        return answer.wallet()

    async def _call(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None = None,
        *,
        params: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
        if_match: int | None = None,
    ) -> _Answer:
        """Sends one logical call, retrying what is safe to retry (see retrying.py).

        A POST without ``idempotency_key`` is sent once: walletd could apply it twice.
        Every attempt carries the call's one X-Request-Id.
        """
        request_id = _new_request_id()
        headers = dict(self._headers)
        headers[REQUEST_ID_HEADER] = request_id
        data = None
        if body is not None:
            headers["Content-Type"] = "application/json"
            data = _dumps(body)
        if idempotency_key is not None:
            headers["Idempotency-Key"] = idempotency_key
        if if_match is not None:
            headers["If-Match"] = f'"{if_match}"'
        retryable = method in _SAFE_METHODS or idempotency_key is not None
        url = f"{self._base_url}{API_PREFIX}{path}"
        loop = asyncio.get_running_loop()
        deadline_s = loop.time() + self.retry.total_s_max
        attempt = 0
        while True:
            attempt += 1
            # No attempt outlives the call's total time either.
            timeout_s = min(self._request_timeout_s, max(0.001, deadline_s - loop.time()))
            try:
                answer = await self._attempt(method, url, data, params, headers, timeout_s)
            except _TRANSPORT_ERRORS as error:
                failure: TransportError | ProblemError = TransportError(
                    f"{method} {path}: no answer ({type(error).__name__}: {error})",
                    request_id=request_id,
                )
                failure.__cause__ = error
            else:
                if answer.status < 400:
                    return answer
                failure = problem_error(
                    answer.status,
                    answer.body if isinstance(answer.body, dict) else {},
                    request_id=answer.request_id,
                    retry_after_s=answer.retry_after_s,
                )
                if answer.status not in (429, 503):
                    raise failure
            delay_s = self.retry.delay_s(attempt, failure.retry_after_s, self._unit_random())
            # A 429 was refused before anything ran: safe to send again, whatever the method.
            if (
                not (retryable or (isinstance(failure, ProblemError) and failure.status == 429))
                or attempt >= self.retry.attempts_max
                or loop.time() + delay_s > deadline_s
            ):
                raise failure
            await asyncio.sleep(delay_s)

    def _ensure_session(self) -> aiohttp.ClientSession:
        session = self._session
        if session is None:
            connector = aiohttp.TCPConnector(limit=CONNECTIONS_MAX)
            session = self._session = aiohttp.ClientSession(connector=connector)
        return session

    async def _attempt(
        self,
        method: str,
        url: str,
        data: bytes | None,
        params: Mapping[str, str] | None,
        headers: Mapping[str, str],
        timeout_s: float,
    ) -> _Answer:
        async with self._ensure_session().request(
            method,
            url,
            data=data,
            params=params,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=timeout_s),
        ) as response:
            raw = await response.read()
            content_type = response.content_type
            retry_after = response.headers.get("Retry-After")
            replayed = response.headers.get("Idempotent-Replayed") == "true"
            version = _etag_version(response.headers.get("ETag"))
            status = response.status
            request_id = response.headers.get(REQUEST_ID_HEADER, headers[REQUEST_ID_HEADER])
        if status == 204:  # a deletion: nothing to decode
            return _Answer(status, None, replayed, None, request_id)
        if status < 400 and content_type != "application/json":
            raise UnexpectedResponse(
                f"{status} answer is {content_type}, not JSON", request_id=request_id
            )
        try:
            parsed = _problem_body(raw, content_type) if status >= 400 else json.loads(raw)
        except ValueError:
            raise UnexpectedResponse(
                f"{status} answer is not JSON", request_id=request_id
            ) from None
        return _Answer(
            status, parsed, replayed, parse_retry_after_s(retry_after), request_id, version
        )


def _etag_version(etag: str | None) -> int | None:
    """The seq an ETag names (``"12"``), or None."""
    if etag is None or len(etag) < 3 or etag[0] != '"' or etag[-1] != '"':
        return None
    digits = etag[1:-1]
    return int(digits) if digits.isascii() and digits.isdigit() else None


def _new_request_id() -> str:
    return uuid.uuid4().hex


def _problem_body(raw: bytes, content_type: str) -> dict[str, Any]:
    """A problem's JSON object; an error page that is not one (a proxy's HTML) is {}."""
    if content_type not in ("application/json", "application/problem+json"):
        return {}
    try:
        parsed = json.loads(raw)
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _history_page(body: Any) -> HistoryPage:
    items = body.get("items") if isinstance(body, dict) else None
    if not isinstance(items, list):
        raise UnexpectedResponse("history page lacks its items list")
    return HistoryPage([Operation.from_json(item) for item in items], body.get("next_cursor"))


def _listing_params(
    *,
    since: Instant | None,
    until: Instant | None,
    cursor: str | None,
    limit: int | None,
    wallet_id: str | uuid.UUID | None = None,
    status: str | None = None,
    refund_of: str | uuid.UUID | None = None,
) -> dict[str, str]:
    params: dict[str, str] = {}
    if refund_of is not None:
        params["refund_of"] = str(refund_of)
    if limit is not None:
        params["limit"] = str(limit)
    if cursor is not None:
        params["cursor"] = cursor
    if since is not None:
        params["since"] = _instant_text(since, "since")
    if until is not None:
        params["until"] = _instant_text(until, "until")
    if wallet_id is not None:
        params["wallet_id"] = str(wallet_id)
    if status is not None:
        params["status"] = status
    return params


def _page(body: Any, parse: Callable[[Mapping[str, Any]], _Item]) -> Page[_Item]:
    items = body.get("items") if isinstance(body, dict) else None
    next_cursor = body.get("next_cursor") if isinstance(body, dict) else None
    if not isinstance(items, list) or not (next_cursor is None or isinstance(next_cursor, str)):
        raise UnexpectedResponse("listing page lacks its items list or next_cursor")
    return Page([parse(item) for item in items], next_cursor)


def _event_page(body: Any) -> EventPage:
    events = body.get("events") if isinstance(body, dict) else None
    if not isinstance(events, list) or not isinstance(body.get("next_position"), str):
        raise UnexpectedResponse("feed page lacks its events list or next_position")
    return EventPage([Event.from_json(event) for event in events], body["next_position"])


class _SseReader:
    """Server-Sent Events (the WHATWG event-stream format) read line by line: ``data``
    lines accumulate until a blank line dispatches the event; comments (``: heartbeat``)
    and unknown fields are skipped. ``lines_read`` tells a connection that worked from one
    that brought nothing."""

    __slots__ = ("lines_read",)

    def __init__(self) -> None:
        self.lines_read = 0

    async def events(self, content: aiohttp.StreamReader) -> AsyncIterator[Event]:
        data: list[str] = []
        data_bytes = 0
        while line_bytes := await content.readline():
            self.lines_read += 1
            line = line_bytes.decode("utf-8", errors="replace").rstrip("\r\n")
            if not line:
                if data:
                    yield Event.from_json(_sse_json("\n".join(data)))
                data, data_bytes = [], 0
                continue
            name, _, value = line.partition(":")
            if name == "data":
                value = value.removeprefix(" ")
                data_bytes += len(value)
                if data_bytes > SSE_EVENT_BYTES_MAX:
                    raise UnexpectedResponse(f"a feed event past {SSE_EVENT_BYTES_MAX} bytes")
                data.append(value)
            # "id" is the event's position, which its data carries too; "event" its type,
            # likewise; "" is a comment (the heartbeat). Nothing else is sent.


def _sse_json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        raise UnexpectedResponse(f"feed event data is not JSON: {text[:100]!r}") from None
