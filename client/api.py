"""An async Python client for walletd: exact money, safe retries, one exception per code.

    async with WalletdClient("http://127.0.0.1:8000") as walletd:
        wallet = await walletd.create_wallet()
        await walletd.deposit(wallet.id, Decimal("10.50"))
        async for page in walletd.history(wallet.id):
            ...

Every call that changes something carries an Idempotency-Key: one generated per logical
call (or the caller's own, to make a call idempotent across processes), reused by each of
its retries, so a retry after a cut connection or a 503 is applied at most once.
Retries follow ``RetryPolicy`` (walletd.client.retrying); errors are the tree in
walletd.client.errors. Money is ``Decimal`` both ways; a float is refused, never rounded.

Each endpoint is a few lines over ``_call``: a new one (transfers, holds, the feed) adds
its method and, if it has its own JSON shape, a small dataclass with a ``from_json``.
"""

from __future__ import annotations

import asyncio
import random
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal, InvalidOperation
from types import TracebackType
from typing import Any, Final, Self

import aiohttp
import orjson

from walletd.client.errors import (
    ProblemError,
    TransportError,
    UnexpectedResponse,
    problem_error,
)
from walletd.client.retrying import RetryPolicy, parse_retry_after_s

__all__ = [
    "BulkItem",
    "BulkResult",
    "HistoryPage",
    "Hold",
    "Operation",
    "Wallet",
    "WalletdClient",
    "new_idempotency_key",
]

API_PREFIX: Final = "/api/v1"
REQUEST_TIMEOUT_S: Final = 10.0
CONNECTIONS_MAX: Final = 100
# Methods that change nothing: retried without a key. A POST is retried only with one.
_SAFE_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS"})
# What "no HTTP answer" looks like in aiohttp: refused, reset, cut mid-body, timed out.
_TRANSPORT_ERRORS: Final = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError)

Amount = Decimal | int | str


def new_idempotency_key() -> str:
    """A fresh key for one logical call (a random UUID: 36 printable ASCII characters)."""
    return str(uuid.uuid4())


def _segment(wallet_id: str | uuid.UUID) -> str:
    """An id as one path segment: whatever a caller passes can never reach another route."""
    return urllib.parse.quote(str(wallet_id), safe="")


def _decimal(value: Any, field: str) -> Decimal:
    if not isinstance(value, str):
        raise UnexpectedResponse(f"{field} is not a decimal string: {value!r}")
    try:
        return Decimal(value)
    except InvalidOperation:
        raise UnexpectedResponse(f"{field} is not a decimal string: {value!r}") from None


def _timestamp(value: Any, field: str) -> datetime:
    if not isinstance(value, str):
        raise UnexpectedResponse(f"{field} is not a timestamp: {value!r}")
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise UnexpectedResponse(f"{field} is not a timestamp: {value!r}") from None


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

    @classmethod
    def from_json(cls, body: Mapping[str, Any], replayed: bool = False) -> Wallet:
        try:
            balance = _decimal(body["balance"], "balance")
            return cls(
                id=str(body["id"]),
                balance=balance,
                created_at=_timestamp(body["created_at"], "created_at"),
                updated_at=_timestamp(body["updated_at"], "updated_at"),
                replayed=replayed,
                available=_decimal(body.get("available", body["balance"]), "available"),
                held=_decimal(body.get("held", "0.00"), "held"),
            )
        except KeyError as missing:
            raise UnexpectedResponse(f"wallet JSON lacks {missing}") from None


@dataclass(frozen=True, slots=True)
class Operation:
    id: int
    operation_type: str
    amount: Decimal
    balance_after: Decimal
    idempotency_key: str | None
    created_at: datetime

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Operation:
        try:
            key = body["idempotency_key"]
            return cls(
                id=int(body["id"]),
                operation_type=str(body["operation_type"]),
                amount=_decimal(body["amount"], "amount"),
                balance_after=_decimal(body["balance_after"], "balance_after"),
                idempotency_key=None if key is None else str(key),
                created_at=_timestamp(body["created_at"], "created_at"),
            )
        except KeyError as missing:
            raise UnexpectedResponse(f"history item lacks {missing}") from None


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
    # Set when captured into another wallet: where the money went, by which transfer.
    to_wallet_id: str | None = None
    transfer_id: str | None = None

    @classmethod
    def from_json(cls, body: Mapping[str, Any], replayed: bool = False) -> Hold:
        try:
            reference = body["reference"]
            return cls(
                id=str(body["id"]),
                wallet_id=str(body["wallet_id"]),
                amount=_decimal(body["amount"], "amount"),
                status=str(body["status"]),
                captured_amount=_decimal(body["captured_amount"], "captured_amount"),
                released_amount=_decimal(body["released_amount"], "released_amount"),
                reference=None if reference is None else str(reference),
                expires_at=_timestamp(body["expires_at"], "expires_at"),
                created_at=_timestamp(body["created_at"], "created_at"),
                updated_at=_timestamp(body["updated_at"], "updated_at"),
                replayed=replayed,
                to_wallet_id=_optional_text(body.get("to_wallet_id")),
                transfer_id=_optional_text(body.get("transfer_id")),
            )
        except KeyError as missing:
            raise UnexpectedResponse(f"hold JSON lacks {missing}") from None


def _optional_text(value: Any) -> str | None:
    return None if value is None else str(value)


@dataclass(frozen=True, slots=True)
class HistoryPage:
    items: list[Operation]
    next_cursor: str | None


@dataclass(frozen=True, slots=True)
class BulkItem:
    """One operation of a bulk request; ``idempotency_key`` is optional per item (the
    request's own key covers the items without one)."""

    wallet_id: str | uuid.UUID
    operation_type: str  # "DEPOSIT" or "WITHDRAW"
    amount: Amount
    idempotency_key: str | None = None

    def to_json(self) -> dict[str, Any]:
        item: dict[str, Any] = {
            "wallet_id": str(self.wallet_id),
            "operation_type": self.operation_type,
            "amount": _amount_text(self.amount),
        }
        if self.idempotency_key is not None:
            item["idempotency_key"] = self.idempotency_key
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
    def from_json(cls, body: Mapping[str, Any]) -> BulkResult:
        try:
            status = int(body["status"])
            item_body = body["body"]
            if status == 200:
                wallet = Wallet.from_json(item_body, bool(body.get("replayed")))
                return cls(int(body["index"]), status, wallet, None)
            return cls(int(body["index"]), status, None, problem_error(status, item_body))
        except (KeyError, TypeError, ValueError) as error:
            raise UnexpectedResponse(f"bulk result is malformed: {error!r}") from None


@dataclass(frozen=True, slots=True)
class _Answer:
    status: int
    body: Any
    replayed: bool
    retry_after_s: float | None


class WalletdClient:
    """One walletd base URL; use as ``async with``. Safe to share between tasks."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        retry: RetryPolicy | None = None,
        request_timeout_s: float = REQUEST_TIMEOUT_S,
        session: aiohttp.ClientSession | None = None,
        unit_random: Callable[[], float] = random.random,
    ) -> None:
        self._base_url = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.retry = retry or RetryPolicy()
        self._request_timeout_s = request_timeout_s
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

    # -- the API ------------------------------------------------------------------------

    async def create_wallet(
        self, wallet_id: str | uuid.UUID | None = None, *, idempotency_key: str | None = None
    ) -> Wallet:
        """Creates a wallet, with the id given or one walletd picks."""
        body = None if wallet_id is None else {"id": str(wallet_id)}
        answer = await self._call(
            "POST", "/wallets", body, idempotency_key=idempotency_key or new_idempotency_key()
        )
        return Wallet.from_json(answer.body, answer.replayed)

    async def get_wallet(
        self, wallet_id: str | uuid.UUID, *, as_of: datetime | str | None = None
    ) -> Wallet:
        """The committed balance now, or at the instant ``as_of`` when the server has it."""
        params = None
        if as_of is not None:
            params = {"as_of": as_of.isoformat() if isinstance(as_of, datetime) else as_of}
        answer = await self._call("GET", f"/wallets/{_segment(wallet_id)}", params=params)
        return Wallet.from_json(answer.body)

    async def deposit(
        self, wallet_id: str | uuid.UUID, amount: Amount, *, idempotency_key: str | None = None
    ) -> Wallet:
        return await self._operate(wallet_id, "DEPOSIT", amount, idempotency_key)

    async def withdraw(
        self, wallet_id: str | uuid.UUID, amount: Amount, *, idempotency_key: str | None = None
    ) -> Wallet:
        return await self._operate(wallet_id, "WITHDRAW", amount, idempotency_key)

    async def history(
        self, wallet_id: str | uuid.UUID, *, page_size: int | None = None
    ) -> AsyncIterator[HistoryPage]:
        """Pages of the wallet's operations, newest first, until the last page."""
        path = f"/wallets/{_segment(wallet_id)}/operations"
        cursor: str | None = None
        while True:
            params = {} if page_size is None else {"limit": str(page_size)}
            if cursor is not None:
                params["cursor"] = cursor
            answer = await self._call("GET", path, params=params)
            items = answer.body.get("items") if isinstance(answer.body, dict) else None
            if not isinstance(items, list):
                raise UnexpectedResponse("history page lacks its items list")
            cursor = answer.body.get("next_cursor")
            yield HistoryPage([Operation.from_json(item) for item in items], cursor)
            if cursor is None:
                return

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
        results = answer.body.get("results") if isinstance(answer.body, dict) else None
        if not isinstance(results, list) or len(results) != len(items):
            raise UnexpectedResponse("bulk answer lacks one result per item")
        return [BulkResult.from_json(result) for result in results]

    async def create_hold(
        self,
        wallet_id: str | uuid.UUID,
        amount: Amount,
        *,
        expires_in_s: int | None = None,
        reference: str | None = None,
        idempotency_key: str | None = None,
    ) -> Hold:
        """Reserves ``amount`` of the wallet's available money (a PENDING hold). The key
        (generated unless given) makes a retry return the same hold."""
        body: dict[str, Any] = {"amount": _amount_text(amount)}
        if expires_in_s is not None:
            body["expires_in_s"] = expires_in_s
        if reference is not None:
            body["reference"] = reference
        answer = await self._call(
            "POST", f"/wallets/{_segment(wallet_id)}/holds", body,
            idempotency_key=idempotency_key or new_idempotency_key(),
        )  # fmt: skip
        return Hold.from_json(answer.body, answer.replayed)

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
        (``Hold.transfer_id``; read it with the transfer's GET)."""
        body: dict[str, Any] = {} if amount is None else {"amount": _amount_text(amount)}
        if to_wallet_id is not None:
            body["to_wallet_id"] = str(to_wallet_id)
        answer = await self._call(
            "POST", f"/holds/{_segment(hold_id)}/capture", body,
            idempotency_key=idempotency_key or new_idempotency_key(),
        )  # fmt: skip
        return Hold.from_json(answer.body, answer.replayed)

    async def void(self, hold_id: str | uuid.UUID, *, idempotency_key: str | None = None) -> Hold:
        """Releases the whole hold."""
        answer = await self._call(
            "POST", f"/holds/{_segment(hold_id)}/void", {},
            idempotency_key=idempotency_key or new_idempotency_key(),
        )  # fmt: skip
        return Hold.from_json(answer.body, answer.replayed)

    async def get_hold(self, hold_id: str | uuid.UUID) -> Hold:
        answer = await self._call("GET", f"/holds/{_segment(hold_id)}")
        return Hold.from_json(answer.body)

    async def _operate(
        self, wallet_id: str | uuid.UUID, kind: str, amount: Amount, key: str | None
    ) -> Wallet:
        body = {"operation_type": kind, "amount": _amount_text(amount)}
        answer = await self._call(
            "POST",
            f"/wallets/{_segment(wallet_id)}/operation",
            body,
            idempotency_key=key or new_idempotency_key(),
        )
        return Wallet.from_json(answer.body, answer.replayed)

    # -- one call, with its retries ------------------------------------------------------

    async def _call(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None = None,
        *,
        params: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
    ) -> _Answer:
        """Sends one logical call, retrying what is safe to retry (see retrying.py).

        A POST without ``idempotency_key`` is sent once: walletd could apply it twice.
        """
        headers = dict(self._headers)
        data = None
        if body is not None:
            headers["Content-Type"] = "application/json"
            data = orjson.dumps(body)
        if idempotency_key is not None:
            headers["Idempotency-Key"] = idempotency_key
        retryable = method in _SAFE_METHODS or idempotency_key is not None
        url = f"{self._base_url}{API_PREFIX}{path}"
        loop = asyncio.get_running_loop()
        deadline_s = loop.time() + self.retry.total_s_max
        attempt = 0
        while True:
            attempt += 1
            retry_after_s: float | None = None
            # No attempt outlives the call's total time either.
            timeout_s = min(self._request_timeout_s, max(0.001, deadline_s - loop.time()))
            try:
                answer = await self._attempt(method, url, data, params, headers, timeout_s)
            except _TRANSPORT_ERRORS as error:
                failure: TransportError | ProblemError = TransportError(
                    f"{method} {path}: no answer ({type(error).__name__}: {error})"
                )
                failure.__cause__ = error
            else:
                if answer.status < 400:
                    return answer
                failure = problem_error(
                    answer.status,
                    answer.body if isinstance(answer.body, dict) else {},
                    answer.retry_after_s,
                )
                if answer.status not in (429, 503):
                    raise failure
                retry_after_s = answer.retry_after_s
            delay_s = self.retry.delay_s(attempt, retry_after_s, self._unit_random())
            # A 429 was refused before anything ran: safe to send again, whatever the method.
            if (
                not (retryable or (isinstance(failure, ProblemError) and failure.status == 429))
                or attempt >= self.retry.attempts_max
                or loop.time() + delay_s > deadline_s
            ):
                raise failure
            await asyncio.sleep(delay_s)

    async def _attempt(
        self,
        method: str,
        url: str,
        data: bytes | None,
        params: Mapping[str, str] | None,
        headers: Mapping[str, str],
        timeout_s: float,
    ) -> _Answer:
        session = self._session
        if session is None:
            connector = aiohttp.TCPConnector(limit=CONNECTIONS_MAX)
            session = self._session = aiohttp.ClientSession(connector=connector)
        async with session.request(
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
            status = response.status
        if content_type in ("application/json", "application/problem+json"):
            try:
                parsed = orjson.loads(raw)
            except orjson.JSONDecodeError:
                raise UnexpectedResponse(f"{status} answer is not JSON") from None
        elif status < 400:
            raise UnexpectedResponse(f"{status} answer is {content_type}, not JSON")
        else:
            parsed = {}
        return _Answer(status, parsed, replayed, parse_retry_after_s(retry_after))
