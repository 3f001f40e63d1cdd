"""Rendering engine replies as HTTP responses: the seed's wallet JSON and the errors."""

from __future__ import annotations

import functools
import time
from typing import Final
from uuid import UUID

import orjson
from aiohttp import web

from walletd.engine.bounds import METADATA_KEYS_MAX
from walletd.engine.commands import Outcome, Reply
from walletd.engine.commands import reversal_of as reversal_seq
from walletd.engine.model import (
    HOLD_KINDS,
    HoldRecord,
    HoldStatus,
    OperationKind,
    OperationRecord,
    TransferRecord,
    TransferStatus,
    WalletStatus,
    WalletView,
)
from walletd.engine.money import AMOUNT_MINOR_MAX, SEED_CURRENCY, Currency, format_minor
from walletd.engine.transfers import SIDE_FROM, TransferReply
from walletd.http.parsing import Amount, shown_key
from walletd.http.problems import ProblemError, ValidationProblem

__all__ = [
    "format_timestamp",
    "history_item",
    "hold_body",
    "hold_reply_response",
    "reply_problem",
    "reply_response",
    "transfer_body",
    "transfer_reply_response",
    "wallet_body",
    "wallet_response",
]

_JSON: Final = "application/json"
_JSON_HEADERS: Final = {"Content-Type": _JSON}
_RETRY_AFTER: Final = {"Retry-After": "1"}
_REPLAYED: Final = {"Idempotent-Replayed": "true"}


def format_timestamp(micros: int) -> str:
    """RFC 3339 UTC with microseconds: ``2025-01-19T10:00:00.000000Z``."""
    seconds, fraction = divmod(micros, 1_000_000)
    return f"{_second_prefix(seconds)}.{fraction:06d}Z"


@functools.lru_cache(maxsize=4096)
def _second_prefix(seconds: int) -> str:
    # Most timestamps rendered in one second share it (updated_at of busy wallets): the
    # calendar arithmetic is done once per second instead of per response (3 µs -> 0.4 µs).
    t = time.gmtime(seconds)
    return (
        f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}T"
        f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}"
    )


def wallet_body(view: WalletView) -> bytes:
    """The seed's wallet JSON, written out directly: every field is a UUID, a decimal or a
    timestamp, none needs escaping, and skipping a dict and the encoder is ~30% of the GET
    path's own cost. ``test_responses`` checks it equals orjson's encoding of the fields.

    ``status`` and ``overdraft_limit`` are written only when they differ from their
    defaults (ACTIVE, 0), and ``metadata`` only when the wallet has some: a wallet that uses
    none of them keeps the seed's shape exactly (tests/test_api_v1.py pins it); the contract
    allows fields to be added, and the OpenAPI document gives their defaults. The metadata's
    text is the one field orjson encodes."""
    held = view.held
    code, exponent = view.currency
    overdraft_limit = view.overdraft_limit
    terms = ""
    if view.status != WalletStatus.ACTIVE:
        terms = f',"status":"{WalletStatus(view.status).name}"'
    if overdraft_limit:
        terms += f',"overdraft_limit":"{format_minor(overdraft_limit, exponent)}"'
    if view.metadata:
        terms += f',"metadata":{orjson.dumps(dict(view.metadata)).decode()}'
    return (
        f'{{"id":"{view.wallet_id}","balance":"{format_minor(view.balance, exponent)}",'
        f'"available":"{format_minor(view.balance - held + overdraft_limit, exponent)}",'
        f'"held":"{format_minor(held, exponent)}","currency":"{code}",'
        f'"created_at":"{format_timestamp(view.created_at_us)}",'
        f'"updated_at":"{format_timestamp(view.updated_at_us)}"{terms}}}'
    ).encode()


def wallet_etag(view: WalletView) -> str:
    """The wallet's version as an entity tag: its seq (what If-Match names)."""
    return f'"{view.seq}"'


def _money(amount: Amount | None, currency: Currency | None) -> str:
    """An amount of a request, for a detail: in the wallet's decimals when it has them."""
    return "0" if amount is None else amount.text(currency)


def history_item(
    operation_id: int,
    op: OperationRecord,
    exponent: int = 2,
    links: tuple[dict[UUID, UUID], dict[int, int]] = ({}, {}),
) -> dict[str, object]:
    """A log row as the history shows it; ``links`` (LogReader.history_links): the
    ``refund_of`` of the page's refunds, and the seq that reversed each reversed row."""
    kind = OperationKind(op.kind)
    key = op.idempotency_key
    transfer_id: str | None = None
    hold_id: str | None = None
    refund_of: str | None = None
    reversal_of: int | None = None
    if kind is OperationKind.WALLET_UPDATE:
        return _update_item(operation_id, op, exponent)
    if kind in _REVERSAL_KINDS:
        # "<US>REVERSAL:<seq>:<digest of the client's key>": internal, like a leg's.
        reversal_of = reversal_seq(key)
        key = None
    elif kind not in _CLIENT_KINDS and key is not None:
        # A transfer leg's or a hold row's key is "<US>KIND:<id>" (engine.commands
        # transfer_leg_key, hold_key): internal, so the client sees the id and no key.
        if kind in HOLD_KINDS:
            hold_id = key.partition(":")[2]
        else:
            transfer_id = key.partition(":")[2]
            original = links[0].get(UUID(transfer_id)) if links[0] else None
            refund_of = None if original is None else str(original)
        key = None
    return {
        "id": operation_id,
        "seq": op.seq,
        "operation_type": kind.name,
        "amount": format_minor(op.amount, exponent),
        "balance_after": format_minor(op.balance_after, exponent),
        "held_after": format_minor(op.held_after, exponent),
        "idempotency_key": shown_key(key),
        "transfer_id": transfer_id,
        "hold_id": hold_id,
        "reference": op.reference,
        "created_at": format_timestamp(op.created_at_us),
        # The API key whose request wrote the row; null when auth is off (or the sweep).
        "actor": op.actor,
        # What wrote the row: the operation's own, its transfer's or its hold's.
        "metadata": dict(op.metadata),
        # Links (docs/API.md, "Refunds and reversals"): a refund's legs name the transfer
        # it refunds; a reversal the seq it reverses; a reversed deposit or withdrawal the
        # seq of its reversal.
        "refund_of": refund_of,
        "reversal_of": reversal_of,
        "reversed_by": links[1].get(op.seq) if kind in _CLIENT_KINDS else None,
    }


_CLIENT_KINDS: Final = frozenset({OperationKind.DEPOSIT, OperationKind.WITHDRAW})
_REVERSAL_KINDS: Final = frozenset(
    {OperationKind.DEPOSIT_REVERSAL, OperationKind.WITHDRAW_REVERSAL}
)


def _update_item(operation_id: int, op: OperationRecord, exponent: int) -> dict[str, object]:
    """A WALLET_UPDATE row in the history: the status, overdraft limit and metadata from
    then on, no amount moved (its reference is the request's fingerprint: not shown)."""
    return {
        "id": operation_id,
        "seq": op.seq,
        "operation_type": OperationKind.WALLET_UPDATE.name,
        "amount": format_minor(0, exponent),
        "balance_after": format_minor(op.balance_after, exponent),
        "held_after": format_minor(op.held_after, exponent),
        "idempotency_key": shown_key(op.idempotency_key),
        "transfer_id": None,
        "hold_id": None,
        "reference": None,
        "created_at": format_timestamp(op.created_at_us),
        "actor": op.actor,
        "status": WalletStatus(op.status_after).name,
        "overdraft_limit": format_minor(op.overdraft_limit_after, exponent),
        "metadata": dict(op.metadata),  # the wallet's after the change
        "refund_of": None,
        "reversal_of": None,
        "reversed_by": None,
    }


def transfer_body(transfer: TransferRecord) -> dict[str, object]:
    currency = transfer.currency or SEED_CURRENCY
    return {
        "id": str(transfer.transfer_id),
        "from_wallet_id": str(transfer.from_wallet_id),
        "to_wallet_id": str(transfer.to_wallet_id),
        "amount": format_minor(transfer.amount, currency.exponent),
        "currency": currency.code,
        "reference": transfer.reference,
        "status": transfer.status.name,
        "failure_code": transfer.failure_code,
        "metadata": dict(transfer.metadata),
        # The transfer a refund gives money back for (null: not a refund).
        "refund_of": None if transfer.refund_of is None else str(transfer.refund_of),
        # What its refunds that are not FAILED (COMPLETED, or PENDING: on their way back)
        # sum to; "0" for a refund itself, which is never refunded.
        "refunded_amount": format_minor(transfer.refunded, currency.exponent),
        # The payment whose posting this transfer is (null: none).
        "payment_id": None if transfer.payment_id is None else str(transfer.payment_id),
        "created_at": format_timestamp(transfer.created_at_us),
        "updated_at": format_timestamp(transfer.updated_at_us),
    }


def transfer_response(transfer: TransferRecord, status: int, replayed: bool) -> web.Response:
    headers = dict(_JSON_HEADERS)
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    if status == 201:
        headers["Location"] = f"/api/v1/transfers/{transfer.transfer_id}"
    body = transfer_body(transfer)
    return web.Response(status=status, body=orjson.dumps(body), headers=headers)


def transfer_reply_response(
    reply: TransferReply,
    transfer_id: UUID,
    from_wallet_id: UUID,
    to_wallet_id: UUID,
    amount: Amount | None,
) -> web.Response:
    """201 with the COMPLETED transfer, or the problem: a refusal names its side, and a
    FAILED transfer (its debit refunded) is in the problem as ``transfer``."""
    transfer = reply.transfer
    if reply.outcome is Outcome.OK and transfer is not None:
        assert transfer.status is TransferStatus.COMPLETED
        return transfer_response(transfer, 201, reply.replayed)
    outcome = reply.outcome
    side = reply.side
    wallet_id = from_wallet_id if side == SIDE_FROM else to_wallet_id
    extra: dict[str, object] = {"transfer_id": str(transfer_id)}
    if side is not None:
        extra["side"] = side
    if transfer is not None:
        extra["transfer"] = transfer_body(transfer)
    headers = {"Idempotent-Replayed": "true"} if reply.replayed else None
    if outcome is Outcome.WALLET_NOT_FOUND:
        raise ProblemError(
            404, "WALLET_NOT_FOUND", f"the {side} wallet {wallet_id} does not exist",
            headers=headers, extra=extra,
        )  # fmt: skip
    currency = reply.currency
    exponent = (currency or SEED_CURRENCY).exponent
    if outcome is Outcome.INSUFFICIENT_FUNDS:
        raise ProblemError(
            409, "INSUFFICIENT_FUNDS",
            f"wallet {wallet_id} has {format_minor(reply.balance_seen or 0, exponent)} "
            f"available, cannot transfer {_money(amount, currency)}",
            headers=headers, extra=extra,
        )  # fmt: skip
    if outcome is Outcome.BALANCE_LIMIT_EXCEEDED:
        raise ProblemError(
            409, "BALANCE_LIMIT_EXCEEDED",
            f"crediting {_money(amount, currency)} would pass the balance ceiling of the "
            f"{side} wallet {wallet_id} (counting what its pending outgoing transfers may "
            "need back)",
            headers=headers, extra=extra,
        )  # fmt: skip
    if outcome is Outcome.WALLET_FROZEN or outcome is Outcome.WALLET_CLOSED:
        raise ProblemError(
            409, outcome.value, _status_detail(outcome, wallet_id, f"the {side} wallet"),
            headers=headers, extra=extra,
        )  # fmt: skip
    if outcome is Outcome.CURRENCY_MISMATCH and transfer is None:
        raise currency_mismatch(
            f"wallets {from_wallet_id} and {to_wallet_id} hold different currencies; a "
            "transfer converts nothing", extra,
        )  # fmt: skip
    if outcome is Outcome.IDEMPOTENCY_KEY_REUSED:
        raise ProblemError(
            422, "IDEMPOTENCY_KEY_REUSED",
            f"transfer {transfer_id} was already requested with a different body",
            extra=extra,
        )  # fmt: skip
    if outcome in _FAILED_TRANSFER_CODES and transfer is not None:
        raise ProblemError(
            422, outcome.value,
            f"the {side} wallet {wallet_id} holds another currency; the debit was refunded",
            headers=headers, extra=extra,
        )  # fmt: skip
    if outcome in _PASSED_ON:
        raise reply_problem(Reply(outcome, currency=currency), wallet_id, amount)
    if outcome is Outcome.NOT_OWNER:
        raise ProblemError(
            503, "NOT_OWNER",
            f"the {side} wallet's shard has no reachable walletd owner right now (a move is "
            "under way); nothing was applied, retry with the same id or Idempotency-Key",
            headers=_RETRY_AFTER, extra=extra,
        )  # fmt: skip
    raise ProblemError(
        503, "UNAVAILABLE",
        f"the outcome of transfer {transfer_id} is not known yet; it is PENDING or was not "
        "applied: retry with the same id or Idempotency-Key, or read the transfer",
        headers=_RETRY_AFTER, extra=extra,
    )  # fmt: skip


def refund_problem(reply: TransferReply, original_id: UUID, refund_id: UUID) -> ProblemError | None:
    """The problem of a refund's own refusals (docs/API.md, "Refunds"), or None when the
    reply is a transfer's answer like any other (transfer_reply_response says it)."""
    outcome = reply.outcome
    extra: dict[str, object] = {"transfer_id": str(refund_id), "refund_of": str(original_id)}
    original = reply.transfer
    if outcome is Outcome.TRANSFER_NOT_FOUND:
        return ProblemError(
            404, "TRANSFER_NOT_FOUND", f"transfer {original_id} does not exist", extra=extra
        )
    if outcome is Outcome.TRANSFER_IS_REFUND:
        return ProblemError(
            409, "TRANSFER_IS_REFUND",
            f"transfer {original_id} is a refund; a refund is not refunded (refund less of "
            "the original instead, or make a new transfer)", extra=extra,
        )  # fmt: skip
    if outcome is Outcome.TRANSFER_NOT_COMPLETED:
        status = "not COMPLETED" if original is None else original.status.name
        return ProblemError(
            409, "TRANSFER_NOT_COMPLETED",
            f"transfer {original_id} is {status}; only a COMPLETED transfer is refunded",
            extra=extra,
        )  # fmt: skip
    if outcome is Outcome.PAYMENT_NOT_COMPLETED:
        payment_id = None if original is None else original.payment_id
        extra["payment_id"] = str(payment_id)
        return ProblemError(
            409, "PAYMENT_NOT_COMPLETED",
            f"transfer {original_id} is a posting of payment {payment_id}, which is not "
            "COMPLETED; a posting is refunded once its payment is",
            extra=extra,
        )  # fmt: skip
    if outcome is Outcome.REFUND_EXCEEDS_TRANSFER:
        currency = reply.currency or (original.currency if original is not None else None)
        exponent = (currency or SEED_CURRENCY).exponent
        if reply.balance_seen is not None:
            extra["refundable"] = format_minor(reply.balance_seen, exponent)
        return ProblemError(
            409, "REFUND_EXCEEDS_TRANSFER",
            f"the refunds of transfer {original_id} would pass its amount"
            + (f"; {extra['refundable']} is left to refund" if "refundable" in extra else ""),
            extra=extra,
        )  # fmt: skip
    return None


def reversal_problem(reply: Reply, wallet_id: UUID, seq: int) -> ProblemError | None:
    """The problem of a reversal's own refusals (docs/API.md, "Reversals"), or None."""
    outcome = reply.outcome
    if outcome is Outcome.OPERATION_NOT_FOUND:
        return ProblemError(
            404, "OPERATION_NOT_FOUND", f"wallet {wallet_id} has no operation with seq {seq}"
        )
    if outcome is Outcome.NOT_REVERSIBLE:
        return ProblemError(
            409, "NOT_REVERSIBLE",
            f"operation {seq} of wallet {wallet_id} is not a DEPOSIT or WITHDRAW; only those "
            "are reversed (a transfer is refunded: POST /api/v1/transfers/{id}/refunds)",
        )  # fmt: skip
    if outcome is Outcome.ALREADY_REVERSED:
        return ProblemError(
            409, "ALREADY_REVERSED",
            f"operation {seq} of wallet {wallet_id} was already reversed (under another "
            "Idempotency-Key); an operation is reversed at most once",
        )  # fmt: skip
    return None


def currency_mismatch(detail: str, extra: dict[str, object] | None = None) -> ProblemError:
    return ProblemError(422, "CURRENCY_MISMATCH", detail, extra=extra)


# Transfer outcomes passed on as a wallet operation's would be.
_PASSED_ON: Final = frozenset(
    {Outcome.STORAGE_REFUSED, Outcome.NOT_STORABLE, Outcome.AMOUNT_NOT_IN_CURRENCY}
)
# A FAILED transfer's code that is not a 404/409 of its own (a receiver created in another
# currency after its currency was read, engine/transfers.py).
_FAILED_TRANSFER_CODES: Final = frozenset({Outcome.CURRENCY_MISMATCH})


def hold_body(hold: HoldRecord) -> dict[str, object]:
    currency = hold.currency or SEED_CURRENCY
    exponent = currency.exponent
    return {
        "id": str(hold.hold_id),
        "wallet_id": str(hold.wallet_id),
        "amount": format_minor(hold.amount, exponent),
        "currency": currency.code,
        "status": hold.status.name,
        "captured_amount": format_minor(hold.captured, exponent),
        "to_wallet_id": None if hold.to_wallet_id is None else str(hold.to_wallet_id),
        "transfer_id": None if hold.transfer_id is None else str(hold.transfer_id),
        "released_amount": format_minor(
            0 if hold.status is HoldStatus.PENDING else hold.amount - hold.captured, exponent
        ),
        "reference": hold.reference,
        "metadata": dict(hold.metadata),
        "expires_at": format_timestamp(hold.expires_at_us),
        "created_at": format_timestamp(hold.created_at_us),
        "updated_at": format_timestamp(hold.updated_at_us),
    }


def hold_response(
    hold: HoldRecord, status: int, replayed: bool, transfer: TransferRecord | None = None
) -> web.Response:
    headers = dict(_JSON_HEADERS)
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    if status == 201:
        headers["Location"] = f"/api/v1/holds/{hold.hold_id}"
    body = hold_body(hold)
    if transfer is not None:
        body["transfer"] = transfer_body(transfer)
    return web.Response(status=status, body=orjson.dumps(body), headers=headers)


# Refusals decided on a hold: status, code, and what the detail says.
_HOLD_REFUSALS: Final = {
    Outcome.HOLD_NOT_FOUND: (404, "HOLD_NOT_FOUND", "does not exist"),
    Outcome.HOLD_EXPIRED: (409, "HOLD_EXPIRED", "has expired (its expires_at has passed)"),
    Outcome.HOLD_ALREADY_CAPTURED: (409, "HOLD_ALREADY_CAPTURED", "was captured already"),
    Outcome.HOLD_ALREADY_VOIDED: (409, "HOLD_ALREADY_VOIDED", "was voided already"),
    Outcome.CAPTURE_EXCEEDS_HOLD: (
        409,
        "CAPTURE_EXCEEDS_HOLD",
        "holds less than the amount to capture",
    ),
}


def hold_reply_response(
    reply: Reply,
    hold_id: UUID,
    wallet_id: UUID | None,
    amount: Amount | None = None,
    transfer: TransferRecord | None = None,
) -> web.Response:
    """201 (created) / 200 (captured, voided) with the hold, or the problem it stands for.
    A refusal about an existing hold carries it as ``hold``; a capture into a wallet
    carries its ``transfer``."""
    hold = reply.hold
    outcome = reply.outcome
    if outcome is Outcome.CREATED and hold is not None:
        return hold_response(hold, 201, reply.replayed)
    if outcome is Outcome.OK and hold is not None:
        return hold_response(hold, 200, reply.replayed, transfer)
    if outcome is Outcome.SAME_WALLET:
        raise ValidationProblem(
            [{"field": "to_wallet_id", "message": "must differ from the hold's wallet"}]
        )
    if outcome is Outcome.CURRENCY_MISMATCH:
        raise currency_mismatch(
            f"the hold's wallet and wallet {wallet_id} hold different currencies; a capture "
            "converts nothing; nothing was captured",
            {"hold_id": str(hold_id)},
        )
    refusal = _HOLD_REFUSALS.get(outcome)
    if refusal is not None:
        status, code, what = refusal
        extra: dict[str, object] = {"hold_id": str(hold_id)}
        if hold is not None:
            extra["hold"] = hold_body(hold)
        raise ProblemError(status, code, f"hold {hold_id} {what}", extra=extra)
    if outcome is Outcome.TOO_MANY_HOLDS:
        raise ProblemError(
            409, "TOO_MANY_HOLDS",
            f"wallet {wallet_id} has the most PENDING holds a wallet may have; capture, void "
            "or let one expire first",
        )  # fmt: skip
    if outcome is Outcome.INSUFFICIENT_FUNDS:
        # A keyed creation's refusal is recorded: its retry replays it.
        exponent = (reply.currency or SEED_CURRENCY).exponent
        raise ProblemError(
            409, "INSUFFICIENT_FUNDS",
            f"wallet {wallet_id} has {format_minor(reply.balance_seen or 0, exponent)} "
            f"available, cannot hold {_money(amount, reply.currency)}",
            headers=_REPLAYED if reply.replayed else None,
        )  # fmt: skip
    if outcome is Outcome.IDEMPOTENCY_KEY_REUSED:
        raise ProblemError(
            422, "IDEMPOTENCY_KEY_REUSED",
            "this Idempotency-Key was already used with a different request",
        )  # fmt: skip
    raise reply_problem(reply, wallet_id or hold_id, amount)


def amount_problem(
    currency: Currency, amount: Amount | None, field: str = "amount"
) -> ProblemError:
    """422 naming the field: an amount the wallet's currency cannot hold."""
    code, exponent = currency
    if (
        amount is not None
        and amount.scale > exponent
        and amount.value % 10 ** (amount.scale - exponent)
    ):
        message = f"must have at most {exponent} fractional digits ({code})"
    else:
        message = f"must be at most {format_minor(AMOUNT_MINOR_MAX, exponent)} ({code})"
    return ValidationProblem([{"field": field, "message": message}])


def wallet_response(view: WalletView) -> web.Response:
    """200 with the wallet and its ETag: the response of almost every request, kept lean."""
    return web.Response(
        body=wallet_body(view), headers={"Content-Type": _JSON, "ETag": f'"{view.seq}"'}
    )


def _wallet_response(view: WalletView, status: int, replayed: bool) -> web.Response:
    headers = {"Content-Type": _JSON, "ETag": wallet_etag(view)}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    if status == 201:
        headers["Location"] = f"/api/v1/wallets/{view.wallet_id}"
    return web.Response(status=status, body=wallet_body(view), headers=headers)


def reply_response(reply: Reply, wallet_id: UUID, amount: Amount | None = None) -> web.Response:
    """The response for a reply, or the ProblemError it stands for."""
    outcome = reply.outcome
    if outcome is Outcome.OK and reply.wallet is not None:
        if not reply.replayed:  # the hot path: no header copy
            return wallet_response(reply.wallet)
        return _wallet_response(reply.wallet, 200, reply.replayed)
    if outcome is Outcome.CREATED and reply.wallet is not None:
        return _wallet_response(reply.wallet, 201, reply.replayed)
    raise reply_problem(reply, wallet_id, amount)


def reply_problem(reply: Reply, wallet_id: UUID, amount: Amount | None = None) -> ProblemError:
    """The problem a refused or failed reply stands for."""
    outcome = reply.outcome
    if outcome is Outcome.WALLET_NOT_FOUND:
        return ProblemError(404, "WALLET_NOT_FOUND", f"wallet {wallet_id} does not exist")
    if outcome is Outcome.WALLET_ALREADY_EXISTS:
        return ProblemError(409, "WALLET_ALREADY_EXISTS", f"wallet {wallet_id} already exists")
    # A recorded refusal replayed to a retry with its key: same status and body.
    replayed = _REPLAYED if reply.replayed else None
    currency = reply.currency
    exponent = (currency or SEED_CURRENCY).exponent
    if outcome is Outcome.INSUFFICIENT_FUNDS:
        return ProblemError(
            409,
            "INSUFFICIENT_FUNDS",
            f"wallet {wallet_id} has {format_minor(reply.balance_seen or 0, exponent)} "
            f"available, cannot withdraw {_money(amount, currency)}",
            headers=replayed,
        )
    if outcome is Outcome.BALANCE_LIMIT_EXCEEDED:
        return ProblemError(
            409,
            "BALANCE_LIMIT_EXCEEDED",
            f"wallet {wallet_id} has {format_minor(reply.balance_seen or 0, exponent)}; "
            # The ceiling less the room its PENDING outgoing transfers keep for their
            # refunds (docs/API.md, "Money"): the sum alone may look as if it fits.
            f"depositing {_money(amount, currency)} would pass the balance ceiling "
            "(counting what its pending outgoing transfers may need back)",
            headers=replayed,
        )
    if outcome is Outcome.AMOUNT_NOT_IN_CURRENCY and currency is not None:
        return amount_problem(currency, amount)
    if outcome is Outcome.CURRENCY_MISMATCH:
        return currency_mismatch(
            f"the operations touch wallets of different currencies (wallet {wallet_id} among "
            "them); nothing was applied"
        )
    if outcome is Outcome.IDEMPOTENCY_KEY_REUSED:
        return ProblemError(
            422,
            "IDEMPOTENCY_KEY_REUSED",
            "this Idempotency-Key was already used with a different request",
        )
    status_problem = _status_problem(reply, wallet_id, replayed, exponent)
    if status_problem is not None:
        return status_problem
    if outcome is Outcome.STORAGE_REFUSED:
        # Isolated by the pipeline (engine/shard.py): the database refused this command
        # when it stood alone. Deterministic while the constraint stands, so a 409 (like a
        # business refusal), never a 503 that would invite the same retry forever. Not
        # recorded: a retry with the same key is decided again.
        return ProblemError(
            409,
            "STORAGE_REFUSED",
            f"the database refused this request on wallet {wallet_id} by one of its "
            "constraints; nothing was applied",
        )
    if outcome is Outcome.NOT_STORABLE:
        # The edge's validation refuses the same first; only another way in (a forged
        # leg) reaches the ledger's own bounds.
        return ValidationProblem(
            [{"field": "body", "message": "a field is past what storage holds; nothing applied"}]
        )
    if outcome is Outcome.NOT_OWNER:
        return ProblemError(
            503,
            "NOT_OWNER",
            f"wallet {wallet_id} is served by another walletd process; nothing was applied: "
            "send it there (or to the proxy, which routes by wallet)",
            headers=_RETRY_AFTER,
        )
    return ProblemError(
        503,
        "UNAVAILABLE",
        "storage is unavailable or the outcome of the commit is unknown; retry with the "
        "same Idempotency-Key",
        headers=_RETRY_AFTER,
    )


def _status_detail(outcome: Outcome, wallet_id: UUID, which: str = "wallet") -> str:
    if outcome is Outcome.WALLET_FROZEN:
        return f"{which} {wallet_id} is FROZEN: it takes credits only, no debit"
    return f"{which} {wallet_id} is CLOSED: nothing moves on it any more"


# What a CLOSE_BLOCKED problem's blocked_by names, in its detail.
_BLOCKERS: Final = {
    "BALANCE": "its balance is not zero",
    "HOLDS": "it has PENDING holds",
    "TRANSFERS": "it has PENDING transfers",
}


def _status_problem(
    reply: Reply, wallet_id: UUID, replayed: dict[str, str] | None, exponent: int
) -> ProblemError | None:
    """The problems of wallet status, overdraft limits and If-Match, or None."""
    outcome = reply.outcome
    if outcome is Outcome.WALLET_FROZEN or outcome is Outcome.WALLET_CLOSED:
        return ProblemError(
            409, outcome.value, _status_detail(outcome, wallet_id), headers=replayed
        )
    if outcome is Outcome.PRECONDITION_FAILED:
        return ProblemError(
            412,
            "PRECONDITION_FAILED",
            f'wallet {wallet_id} is at version "{reply.balance_seen}", not the one If-Match '
            "names; nothing was applied: read it again",
            extra={"seq": reply.balance_seen},
        )
    if outcome is Outcome.CLOSE_BLOCKED:
        why = "; ".join(_BLOCKERS[what] for what in reply.blocked_by)
        return ProblemError(
            409,
            "CLOSE_BLOCKED",
            f"wallet {wallet_id} cannot close: {why}",
            extra={"blocked_by": list(reply.blocked_by)},
        )
    if outcome is Outcome.OVERDRAFT_LIMIT_IN_USE:
        return ProblemError(
            409,
            "OVERDRAFT_LIMIT_IN_USE",
            f"wallet {wallet_id} owes {format_minor(-(reply.balance_seen or 0), exponent)} "
            "beyond what it holds; the overdraft limit cannot go below that",
        )
    if outcome is Outcome.METADATA_TOO_MANY_KEYS:
        # The same 422 as a creation's metadata past the bound: only the count differs.
        return ValidationProblem(
            [{"field": "metadata", "message": f"must have at most {METADATA_KEYS_MAX} keys "
              f"(after the merge: {reply.balance_seen})"}]
        )  # fmt: skip
    return None
