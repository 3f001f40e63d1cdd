"""Payments over HTTP: the request body, the payment's representation, and its problems
(docs/API.md, "Payments"; the routes are in http/routes_v1.py)."""

from __future__ import annotations

from typing import Any, Final, NamedTuple
from uuid import UUID

import orjson
from aiohttp import web

from walletd.engine.commands import Outcome, Reply
from walletd.engine.model import NO_METADATA, Metadata, PaymentRecord
from walletd.engine.money import SEED_CURRENCY, format_minor
from walletd.engine.payments import PaymentReply, Posting
from walletd.engine.transfers import SIDE_FROM
from walletd.http.parsing import (
    Amount,
    body_wallet_id,
    loads_exact,
    parse_amount,
    parse_metadata,
    parse_reference,
)
from walletd.http.problems import FieldError, ProblemError, ValidationProblem
from walletd.http.responses import amount_problem, format_timestamp, reply_problem

__all__ = [
    "PaymentRequest",
    "parse_payment_body",
    "payment_body",
    "payment_reply_response",
    "payment_response",
]

_FIELDS: Final = frozenset({"id", "postings", "reference", "metadata"})
_POSTING_FIELDS: Final = frozenset({"from_wallet_id", "to_wallet_id", "amount", "metadata"})
_JSON_HEADERS: Final = {"Content-Type": "application/json"}
_RETRY_AFTER: Final = {"Retry-After": "1"}


class PaymentRequest(NamedTuple):
    payment_id: UUID | None
    postings: tuple[Posting, ...]
    amounts: tuple[Amount, ...]  # as written, for the problems' details
    reference: str | None
    metadata: Metadata = NO_METADATA


def parse_payment_body(body: dict[str, Any], raw: bytes, postings_max: int) -> PaymentRequest:
    """The payment asked for, or 422 VALIDATION_ERROR naming each bad field
    (``postings[i].amount``...)."""
    errors: list[FieldError] = []
    for name in body:
        if name not in _FIELDS:
            errors.append({"field": str(name)[:64], "message": "unknown field"})
    payment_id = None
    if "id" in body:
        payment_id = body_wallet_id(body["id"])
        if payment_id is None:
            errors.append({"field": "id", "message": "must be a UUID"})
    wanted = body.get("postings")
    postings: list[Posting] = []
    amounts: list[Amount] = []
    if type(wanted) is not list or not 1 <= len(wanted) <= postings_max:
        errors.append(
            {"field": "postings", "message": f"must be a list of 1 to {postings_max} postings"}
        )
        wanted = []
    exact: list[Any] | None = None
    if any(type(p) is dict and isinstance(p.get("amount"), float) for p in wanted):
        # A float is read again exactly as the client wrote it (the whole body, once).
        exact = loads_exact(raw)["postings"]
    for index, item in enumerate(wanted):
        field = f"postings[{index}]"
        if type(item) is not dict:
            errors.append({"field": field, "message": "must be an object"})
            continue
        for name in item:
            if name not in _POSTING_FIELDS:
                errors.append({"field": f"{field}.{str(name)[:64]}", "message": "unknown field"})
        ids: list[UUID | None] = []
        for side in ("from_wallet_id", "to_wallet_id"):
            found = body_wallet_id(item.get(side))
            if found is None:
                message = "is required" if item.get(side) is None else "must be a wallet id"
                errors.append({"field": f"{field}.{side}", "message": message})
            ids.append(found)
        if ids[0] is not None and ids[0] == ids[1]:
            errors.append(
                {"field": f"{field}.to_wallet_id", "message": "must differ from from_wallet_id"}
            )
        amount: Amount | FieldError
        if "amount" not in item:
            amount = {"field": f"{field}.amount", "message": "is required"}
        else:
            value = item["amount"] if exact is None else exact[index]["amount"]
            amount = parse_amount(value, raw, f"{field}.amount")
        if isinstance(amount, dict):
            errors.append(amount)
            continue
        posting_errors: list[FieldError] = []
        metadata = parse_metadata(item, posting_errors)
        errors += [{**e, "field": f"{field}.{e['field']}"} for e in posting_errors]
        if ids[0] is not None and ids[1] is not None:
            postings.append(Posting(ids[0], ids[1], amount.value, amount.scale, metadata))
            amounts.append(amount)
    reference = parse_reference(body, errors)
    metadata = parse_metadata(body, errors)
    if errors:
        raise ValidationProblem(errors)
    return PaymentRequest(payment_id, tuple(postings), tuple(amounts), reference, metadata)


def payment_body(payment: PaymentRecord) -> dict[str, object]:
    currency = payment.currency
    exponent = currency.exponent
    body: dict[str, object] = {
        "id": str(payment.payment_id),
        "status": payment.status.name,
        "currency": currency.code,
        "reference": payment.reference,
        "metadata": dict(payment.metadata),
        "postings": [
            {
                "transfer_id": str(p.transfer_id),
                "from_wallet_id": str(p.from_wallet_id),
                "to_wallet_id": str(p.to_wallet_id),
                "amount": format_minor(p.amount, exponent),
                "status": "PENDING" if p.status is None else p.status.name,
                "metadata": dict(p.metadata),
            }
            for p in payment.postings
        ],
        "failure": None,
        "created_at": format_timestamp(payment.created_at_us),
        "updated_at": format_timestamp(payment.updated_at_us),
    }
    if payment.failure_code is not None:
        body["failure"] = {
            "posting": payment.failed_index,
            "side": payment.failed_side,
            "code": payment.failure_code,
        }
    return body


def payment_response(payment: PaymentRecord, status: int, replayed: bool) -> web.Response:
    headers = dict(_JSON_HEADERS)
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    if status == 201:
        headers["Location"] = f"/api/v1/payments/{payment.payment_id}"
    return web.Response(status=status, body=orjson.dumps(payment_body(payment)), headers=headers)


def payment_reply_response(
    reply: PaymentReply, payment_id: UUID, wanted: PaymentRequest
) -> web.Response:
    """201 with the COMPLETED payment, or the problem; a refusal names its posting
    (``posting``: its index, ``side``) and holds the FAILED payment when one is stored."""
    payment = reply.payment
    if reply.outcome is Outcome.OK and payment is not None:
        return payment_response(payment, 201, reply.replayed)
    outcome, index, side = reply.outcome, reply.posting, reply.side or SIDE_FROM
    extra: dict[str, object] = {"payment_id": str(payment_id)}
    headers = {"Idempotent-Replayed": "true"} if reply.replayed else None
    if payment is not None:
        extra["payment"] = payment_body(payment)
    if outcome is Outcome.IDEMPOTENCY_KEY_REUSED:
        raise ProblemError(
            422, "IDEMPOTENCY_KEY_REUSED",
            f"payment {payment_id} was already requested with a different body", extra=extra,
        )  # fmt: skip
    if outcome in (Outcome.UNAVAILABLE, Outcome.NOT_OWNER) or index is None:
        raise ProblemError(
            503, "UNAVAILABLE",
            f"payment {payment_id} is PENDING or was not applied: retry with the same id or "
            "Idempotency-Key, or read the payment", headers=_RETRY_AFTER, extra=extra,
        )  # fmt: skip
    extra["posting"] = index
    extra["side"] = side
    field = f"postings[{index}]"
    posting = wanted.postings[index] if index < len(wanted.postings) else None
    wallet_id = (
        UUID(int=0)
        if posting is None
        else posting.from_wallet_id
        if side == SIDE_FROM
        else posting.to_wallet_id
    )
    amount = wanted.amounts[index] if index < len(wanted.amounts) else None
    currency = reply.currency
    if outcome is Outcome.AMOUNT_NOT_IN_CURRENCY and currency is not None:
        raise amount_problem(currency, amount, f"{field}.amount")
    if outcome is Outcome.CURRENCY_MISMATCH:
        raise ProblemError(
            422, "CURRENCY_MISMATCH",
            f"{field}: wallet {wallet_id} holds another currency than the payment's first "
            "wallet; all postings of a payment are in one currency", extra=extra,
        )  # fmt: skip
    if outcome is Outcome.INSUFFICIENT_FUNDS:
        exponent = (currency or SEED_CURRENCY).exponent
        seen = format_minor(reply.balance_seen or 0, exponent)
        detail = f"{field}: wallet {wallet_id} had {seen} available, not enough for its postings"
        raise ProblemError(409, "INSUFFICIENT_FUNDS", detail, headers=headers, extra=extra)
    problem = reply_problem(Reply(outcome, currency=currency), wallet_id, amount)
    problem.detail = f"{field}: {problem.detail}"
    problem.extra = {**(problem.extra or {}), **extra}
    if headers:
        problem.headers = {**(problem.headers or {}), **headers}
    raise problem
