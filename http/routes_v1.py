"""Version 1 of the wallet API. A v2 would sit beside it as its own route table."""

from __future__ import annotations

import base64
import math
import re
import time
from typing import Final, cast
from uuid import UUID

import orjson
from aiohttp import web

from walletd.engine.commands import HoldAction, Outcome
from walletd.engine.log_reads import HistoryFilter
from walletd.engine.model import OperationKind, WalletView
from walletd.engine.router import Engine
from walletd.engine.transfers import TransferReply
from walletd.http.bulk import BULK_PATH, bulk_operations
from walletd.http.instants import parse_instant_us
from walletd.http.keys import KEY_NAME, Scope, requires
from walletd.http.parsing import (
    Amount,
    parse_capture_body,
    parse_create_body,
    parse_empty_body,
    parse_hold_body,
    parse_idempotency_key,
    parse_if_match,
    parse_operation_body,
    parse_refund_body,
    parse_reversal_body,
    parse_transfer_body,
    parse_update_body,
    path_id,
    path_wallet_id,
    read_json_object,
    require_idempotency_key,
)
from walletd.http.payments import (
    parse_payment_body,
    payment_reply_response,
    payment_response,
)
from walletd.http.problems import ProblemError, ValidationProblem, problem_body
from walletd.http.responses import (
    amount_problem,
    format_timestamp,
    history_item,
    hold_reply_response,
    hold_response,
    refund_problem,
    reply_response,
    reversal_problem,
    transfer_reply_response,
    transfer_response,
    wallet_body,
    wallet_response,
)
from walletd.http.state import STATE_KEY

__all__ = ["AS_OF_AHEAD_S_MAX", "CURSOR_PATTERN", "PREFIX", "routes"]

PREFIX: Final = "/api/v1"
_JSON_HEADERS: Final = {"Content-Type": "application/json"}
# Enough digits for any valid limit, few enough that int() never meets Python's digit limit.
_LIMIT_DIGITS_MAX: Final = 6
# A filtered history page reads at most this many rows per item asked for: with an
# operation_type filter a page may then hold fewer items, and its cursor goes on.
HISTORY_SCAN_ROWS_PER_ITEM: Final = 4
_OPERATION_KINDS: Final = {kind.name: kind for kind in OperationKind}
_LEG_KINDS: Final = frozenset(
    {OperationKind.TRANSFER_OUT, OperationKind.TRANSFER_IN, OperationKind.TRANSFER_REFUND}
)
_REVERSIBLE: Final = frozenset({OperationKind.DEPOSIT, OperationKind.WITHDRAW})
# The history filter takes any kind of row, so its error names them all.
_OPERATION_KINDS_MESSAGE: Final = "must be one of " + ", ".join(_OPERATION_KINDS)

# How far ahead of this process's clock an as_of instant may be and still be waited for
# rather than refused: the skew tolerated between the clocks of clients and of walletd.
AS_OF_AHEAD_S_MAX: Final = 1.0

# Any segment reaches the handler, braces included (aiohttp's default {name} stops at them
# and would answer 404 NOT_FOUND), so every malformed id gets 400 INVALID_WALLET_ID.
_WALLET: Final = PREFIX + "/wallets/{wallet_id:[^/]+}"

routes = web.RouteTableDef()
routes.post(BULK_PATH)(requires(Scope.MOVE)(bulk_operations))


@routes.post(PREFIX + "/wallets")
@requires(Scope.CREATE)
async def create_wallet(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    body, _raw = await read_json_object(request, state.settings, optional=True)
    wallet_id, currency, metadata = parse_create_body(body, state.settings.currencies)
    key = parse_idempotency_key(request)
    chosen_id, reply = await state.services.engine.create_wallet(wallet_id, key, currency, metadata)
    return reply_response(reply, chosen_id)


@routes.get(_WALLET)
@requires(Scope.READ)
async def get_wallet(request: web.Request) -> web.Response:
    wallet_id = path_wallet_id(request)
    if request.query_string and "as_of" in request.query:
        return await _wallet_as_of(request, wallet_id, request.query["as_of"])
    engine = request.app[STATE_KEY].services.engine
    view = engine.read_resident(wallet_id)  # no coroutine for the common, resident case
    if view is not None:
        return wallet_response(view)
    return reply_response(await engine.read(wallet_id), wallet_id)


async def _wallet_as_of(request: web.Request, wallet_id: UUID, text: str) -> web.Response:
    """The wallet as it was at an instant, from the log, answered once that is final.

    The owner of the wallet's shard answers (the engine raises NotOwner elsewhere, and the
    request is forwarded) as soon as none of its batches stamped at or before the instant
    is in flight: at once for the past, after the commits in flight for "now". An instant
    up to ``AS_OF_AHEAD_S_MAX`` ahead of this process's clock (another clock's skew) waits
    for it; one further ahead is refused (422 AS_OF_NOT_SETTLED with Retry-After); a wait
    longer than ``as_of_wait_s`` (a slow commit) is 503 UNAVAILABLE with Retry-After.
    """
    state = request.app[STATE_KEY]
    at_us = parse_instant_us("as_of", text)
    ahead_us = at_us - time.time_ns() // 1000
    if ahead_us > AS_OF_AHEAD_S_MAX * 1_000_000:
        ahead_s = math.ceil(ahead_us / 1_000_000)
        raise ProblemError(
            422,
            "AS_OF_NOT_SETTLED",
            f"the instant is {ahead_s} s ahead of this server's clock; operations may still be"
            f" stamped before it: ask for it again in {ahead_s} s",
            headers={"Retry-After": str(ahead_s)},
        )
    wait_s = state.settings.as_of_wait_s
    try:
        found = await state.services.engine.read_as_of(
            wallet_id, at_us, state.services.reader, wait_s
        )
    except TimeoutError:
        raise ProblemError(
            503,
            "UNAVAILABLE",
            f"commits stamped at or before this instant are still in flight after {wait_s:g} s;"
            " retry shortly",
            headers={"Retry-After": "1"},
        ) from None
    if found is None:
        raise ProblemError(
            404,
            "WALLET_NOT_FOUND",
            f"wallet {wallet_id} did not exist at {format_timestamp(at_us)}",
        )
    view = WalletView(
        wallet_id, found.balance, found.seq, found.created_at_us, found.updated_at_us, found.held,
        found.currency, found.status, found.overdraft_limit, found.metadata,
    )  # fmt: skip
    body = wallet_body(view)[:-1] + f',"as_of":"{format_timestamp(at_us)}"}}'.encode()
    # The version the wallet had then (If-Match against it fails once it moved since).
    return web.Response(body=body, headers={**_JSON_HEADERS, "ETag": f'"{found.seq}"'})


@routes.post(_WALLET + "/operation")
@requires(Scope.MOVE)
async def apply_operation(request: web.Request) -> web.Response:
    wallet_id = path_wallet_id(request)
    state = request.app[STATE_KEY]
    body, raw = await read_json_object(request, state.settings)
    kind, amount, reference, metadata = parse_operation_body(body, raw)
    key = parse_idempotency_key(request)
    # No header lookup beyond the one dict probe on the hot path.
    expected_seq = parse_if_match(request) if "If-Match" in request.headers else None
    reply = await state.services.engine.apply(
        wallet_id, kind, amount.value, key, reference, request.get(KEY_NAME), expected_seq,
        amount.scale, metadata,
    )  # fmt: skip
    return reply_response(reply, wallet_id, amount)


@routes.patch(_WALLET)
@requires(Scope.ADMIN)
async def update_wallet(request: web.Request) -> web.Response:
    """Status, overdraft limit and metadata (docs/API.md, "Changing a wallet")."""
    wallet_id = path_wallet_id(request)
    state = request.app[STATE_KEY]
    body, raw = await read_json_object(request, state.settings)
    changes = parse_update_body(body, raw)
    key = parse_idempotency_key(request)
    expected_seq = parse_if_match(request)
    limit = changes.overdraft_limit
    reply = await state.services.engine.update_wallet(
        wallet_id, changes.status, None if limit is None else limit.value, key,
        changes.fingerprint, expected_seq=expected_seq, actor=request.get(KEY_NAME),
        limit_scale=None if limit is None else limit.scale, metadata=changes.metadata,
    )  # fmt: skip
    if reply.outcome is Outcome.AMOUNT_NOT_IN_CURRENCY and reply.currency is not None:
        raise amount_problem(reply.currency, limit, "overdraft_limit")
    return reply_response(reply, wallet_id)


@routes.post(_WALLET + "/holds")
@requires(Scope.MOVE)
async def create_hold(request: web.Request) -> web.Response:
    wallet_id = path_wallet_id(request)
    state = request.app[STATE_KEY]
    body, raw = await read_json_object(request, state.settings)
    engine = state.services.engine
    wanted = parse_hold_body(body, raw, engine.limits.hold_expires_in_s_max)
    key = parse_idempotency_key(request)
    hold_id, reply = await engine.create_hold(
        wallet_id, wanted.amount.value, wanted.expires_in_s, wanted.reference, key,
        request.get(KEY_NAME), wanted.amount.scale, wanted.metadata,
    )  # fmt: skip
    return hold_reply_response(reply, hold_id, wallet_id, wanted.amount)


# The hold id sits where a wallet id sits in /api/v1/wallets/{id}: HAProxy hashes it the
# same way, and it hashes to its wallet's shard (engine/holds.py).
_HOLD: Final = PREFIX + "/holds/{hold_id:[^/]+}"


def _path_hold_id(request: web.Request) -> UUID:
    return path_id(request, "hold_id", PREFIX + "/holds/", "INVALID_HOLD_ID")


@routes.post(_HOLD + "/capture")
@requires(Scope.MOVE)
async def capture_hold(request: web.Request) -> web.Response:
    hold_id = _path_hold_id(request)
    state = request.app[STATE_KEY]
    body, raw = await read_json_object(request, state.settings, optional=True)
    amount, to_wallet_id = parse_capture_body(body, raw)
    key = parse_idempotency_key(request)
    engine = state.services.engine
    reply = await engine.resolve_hold(
        HoldAction.CAPTURE, hold_id, None if amount is None else amount.value, key,
        to_wallet_id, request.get(KEY_NAME), None if amount is None else amount.scale,
    )  # fmt: skip
    transfer = None
    if reply.hold is not None and reply.hold.transfer_id is not None:
        # A capture into a wallet: the transfer as it is now (COMPLETED, FAILED and
        # refunded, or PENDING until the re-drive finishes it).
        transfer = await engine.read_transfer(reply.hold.transfer_id)
    return hold_reply_response(reply, hold_id, None, amount, transfer)


@routes.post(_HOLD + "/void")
@requires(Scope.MOVE)
async def void_hold(request: web.Request) -> web.Response:
    hold_id = _path_hold_id(request)
    state = request.app[STATE_KEY]
    body, _raw = await read_json_object(request, state.settings, optional=True)
    parse_empty_body(body)
    key = parse_idempotency_key(request)
    reply = await state.services.engine.resolve_hold(
        HoldAction.VOID, hold_id, None, key, actor=request.get(KEY_NAME)
    )
    return hold_reply_response(reply, hold_id, None)


@routes.get(_HOLD)
@requires(Scope.READ)
async def get_hold(request: web.Request) -> web.Response:
    hold_id = _path_hold_id(request)
    hold = await request.app[STATE_KEY].services.engine.read_hold(hold_id)
    if hold is None:
        raise ProblemError(404, "HOLD_NOT_FOUND", f"hold {hold_id} does not exist")
    return hold_response(hold, 200, replayed=False)


@routes.post(PREFIX + "/transfers")
@requires(Scope.MOVE)
async def create_transfer(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    body, raw = await read_json_object(request, state.settings)
    wanted = parse_transfer_body(body, raw)
    key = parse_idempotency_key(request)
    transfer_id, reply = await state.services.engine.transfer(
        wanted.transfer_id, key, wanted.from_wallet_id, wanted.to_wallet_id,
        wanted.amount.value, wanted.reference, request.get(KEY_NAME), wanted.amount.scale,
        wanted.metadata,
    )  # fmt: skip
    return transfer_reply_response(
        reply, transfer_id, wanted.from_wallet_id, wanted.to_wallet_id, wanted.amount
    )


# Any segment, braces included, as for wallet ids: every malformed id is 400.
@routes.get(PREFIX + "/transfers/{transfer_id:[^/]+}")
@requires(Scope.READ)
async def get_transfer(request: web.Request) -> web.Response:
    transfer_id = path_id(request, "transfer_id", PREFIX + "/transfers/", "INVALID_TRANSFER_ID")
    transfer = await request.app[STATE_KEY].services.engine.read_transfer(transfer_id)
    if transfer is None:
        raise ProblemError(404, "TRANSFER_NOT_FOUND", f"transfer {transfer_id} does not exist")
    return transfer_response(transfer, 200, replayed=False)


@routes.post(PREFIX + "/transfers/{transfer_id:[^/]+}/refunds")
@requires(Scope.MOVE)
async def refund_transfer(request: web.Request) -> web.Response:
    """Refund a COMPLETED transfer (docs/API.md, "Refunds"): 201 with the refund, itself a
    transfer (``refund_of``) from the original's receiver to its sender."""
    original_id = path_id(request, "transfer_id", PREFIX + "/transfers/", "INVALID_TRANSFER_ID")
    state = request.app[STATE_KEY]
    body, raw = await read_json_object(request, state.settings, optional=True)
    amount, reason, metadata = parse_refund_body(body, raw)
    key = require_idempotency_key(request)
    engine = state.services.engine
    refund_id, reply = await engine.refund(
        original_id, key, None if amount is None else amount.value, reason,
        request.get(KEY_NAME), None if amount is None else amount.scale, metadata,
    )  # fmt: skip
    return await _refund_response(engine, original_id, refund_id, reply, amount)


async def _refund_response(
    engine: Engine, original_id: UUID, refund_id: UUID, reply: TransferReply, amount: Amount | None
) -> web.Response:
    """201 with the refund, or raises its problem (a refund's own refusals, or a transfer's)."""
    problem = refund_problem(reply, original_id, refund_id)
    if problem is not None:
        raise problem
    if reply.outcome is Outcome.AMOUNT_NOT_IN_CURRENCY and reply.currency is not None:
        raise amount_problem(reply.currency, amount)
    refund = reply.transfer
    if refund is not None and reply.outcome is not Outcome.OK:
        from_id, to_id = refund.from_wallet_id, refund.to_wallet_id
    else:
        # A refusal of the refund's debit: its wallets are the original's, the other way.
        original = await engine.read_transfer(original_id)
        if original is None:  # it was there a moment ago: only its refusal is known
            raise ProblemError(404, "TRANSFER_NOT_FOUND", f"transfer {original_id} does not exist")
        from_id, to_id = original.to_wallet_id, original.from_wallet_id
    return transfer_reply_response(reply, refund_id, from_id, to_id, amount)


@routes.post(PREFIX + "/payments/{payment_id:[^/]+}/refunds")
@requires(Scope.MOVE)
async def refund_payment(request: web.Request) -> web.Response:
    """Refund what is left of every posting of a COMPLETED payment (docs/API.md,
    "Payments"): 200 with one result per posting, each what ``POST
    /transfers/{posting's transfer id}/refunds`` without an amount would have answered."""
    payment_id = path_id(request, "payment_id", PREFIX + "/payments/", "INVALID_PAYMENT_ID")
    state = request.app[STATE_KEY]
    body, _raw = await read_json_object(request, state.settings, optional=True)
    reason, metadata = parse_reversal_body(body)
    key = require_idempotency_key(request)
    engine = state.services.engine
    payment, replies = await engine.refund_payment(
        payment_id, key, reason, request.get(KEY_NAME), metadata
    )
    if payment is None:
        raise ProblemError(404, "PAYMENT_NOT_FOUND", f"payment {payment_id} does not exist")
    if not replies:
        raise ProblemError(
            409, "PAYMENT_NOT_COMPLETED",
            f"payment {payment_id} is {payment.status.name}; only a COMPLETED payment is "
            "refunded", extra={"payment_id": str(payment_id)},
        )  # fmt: skip
    results: list[dict[str, object]] = []
    for index, (posting, (refund_id, reply)) in enumerate(
        zip(payment.postings, replies, strict=True)
    ):
        try:
            answer = await _refund_response(engine, posting.transfer_id, refund_id, reply, None)
            status, item = answer.status, orjson.loads(cast(bytes, answer.body))
        except ProblemError as problem:
            status = problem.status
            item = problem_body(
                problem.status, problem.code, problem.detail,
                f"{PREFIX}/transfers/{posting.transfer_id}/refunds", extra=problem.extra,
            )  # fmt: skip
        results.append({
            "posting": index, "transfer_id": str(posting.transfer_id),
            "refund_id": str(refund_id), "status": status, "replayed": reply.replayed,
            "body": item,
        })  # fmt: skip
    refunded = sum(1 for result in results if result["status"] == 201)
    answer_body = {
        "payment_id": str(payment_id),
        "refunded": refunded,
        "refused": len(results) - refunded,
        "results": results,
    }
    headers = dict(_JSON_HEADERS)
    if all(reply.replayed for _refund_id, reply in replies):
        headers["Idempotent-Replayed"] = "true"
    return web.Response(status=200, body=orjson.dumps(answer_body), headers=headers)


# The wallet id leads the path, so HAProxy routes a reversal to the wallet's owner (and a
# process that does not serve it forwards it: http/forwarding.py).
@routes.post(_WALLET + "/operations/{seq:[^/]+}/reversal")
@requires(Scope.MOVE)
async def reverse_operation(request: web.Request) -> web.Response:
    """Reverse a DEPOSIT or WITHDRAW (docs/API.md, "Reversals"): 200 with the wallet after
    the opposite movement (its ``seq`` is the reversal's row), at most once per operation."""
    wallet_id = path_wallet_id(request)
    seq = _path_seq(request.match_info["seq"])
    state = request.app[STATE_KEY]
    body, _raw = await read_json_object(request, state.settings, optional=True)
    reason, metadata = parse_reversal_body(body)
    key = require_idempotency_key(request)
    reply, original = await state.services.engine.reverse(
        wallet_id, seq, key, reason, request.get(KEY_NAME), metadata
    )
    problem = reversal_problem(reply, wallet_id, seq)
    if problem is not None:
        raise problem
    amount = None
    if original is not None and reply.wallet is not None:
        amount = Amount(original.amount, reply.wallet.currency.exponent)
    return reply_response(reply, wallet_id, amount)


def _path_seq(text: str) -> int:
    """A log row's seq in a path: 1 to 2^63 - 1, plain decimal digits (422 otherwise)."""
    if not (text.isascii() and text.isdigit() and len(text) <= 19 and text[0] != "0"):
        raise ValidationProblem([{"field": "seq", "message": "must be an integer from 1"}])
    seq = int(text)
    if seq > 2**63 - 1:
        raise ValidationProblem([{"field": "seq", "message": "must be at most 2^63 - 1"}])
    return seq


@routes.post(PREFIX + "/payments")
@requires(Scope.MOVE)
async def create_payment(request: web.Request) -> web.Response:
    """Every posting applied, or none (docs/API.md, "Payments")."""
    state = request.app[STATE_KEY]
    body, raw = await read_json_object(request, state.settings)
    engine = state.services.engine
    wanted = parse_payment_body(body, raw, engine.limits.payment_postings_max)
    key = parse_idempotency_key(request)
    payment_id, reply = await engine.pay(
        wanted.payment_id, key, wanted.postings, wanted.reference, wanted.metadata,
        request.get(KEY_NAME),
    )  # fmt: skip
    return payment_reply_response(reply, payment_id, wanted)


@routes.get(PREFIX + "/payments/{payment_id:[^/]+}")
@requires(Scope.READ)
async def get_payment(request: web.Request) -> web.Response:
    payment_id = path_id(request, "payment_id", PREFIX + "/payments/", "INVALID_PAYMENT_ID")
    payment = await request.app[STATE_KEY].services.engine.read_payment(payment_id)
    if payment is None:
        raise ProblemError(404, "PAYMENT_NOT_FOUND", f"payment {payment_id} does not exist")
    return payment_response(payment, 200, replayed=False)


def _encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(f"s{seq}".encode()).decode().rstrip("=")


# A cursor is "s<seq>" in unpadded URL-safe base64, seq of at most 18 digits (10^18
# operations on one wallet is out of reach). CURSOR_PATTERN is exactly the set of such texts
# (the encoding written out group by group: 3 ASCII digits make 4 base64 characters), so the
# OpenAPI document can state it and a generator from it only makes cursors that are accepted.
_DIGIT_PAIR: Final = "(?:[MN][DTjz]|O[DT])"  # the 12 bits that start a digit
_DIGIT_GROUP: Final = f"(?:{_DIGIT_PAIR}[AEIMQUYcgk][w-z0-5])"  # 3 digits
_DIGIT_TAIL_1: Final = "(?:[MN][AQgw]|O[AQ])"  # 1 digit
_DIGIT_TAIL: Final = f"(?:{_DIGIT_TAIL_1}|{_DIGIT_PAIR}[AEIMQUYcgk])"  # 1 or 2 digits
CURSOR_PATTERN: Final = (
    # "s" and a first digit 1-9, then a second digit and up to 16 more: 4 groups and a tail
    # of up to 2, or 5 groups and a tail of up to 1.
    f"^cz(?:[EIMQUYcgk]|[EIMQUYcgk][w-z0-5]"
    f"(?:{_DIGIT_GROUP}{{0,4}}{_DIGIT_TAIL}?|{_DIGIT_GROUP}{{5}}{_DIGIT_TAIL_1}?))$"
)
_CURSOR: Final = re.compile(CURSOR_PATTERN.strip("^$"))


def _decode_cursor(cursor: str) -> int:
    if _CURSOR.fullmatch(cursor) is None:
        raise ValidationProblem([{"field": "cursor", "message": "is not a valid cursor"}])
    return int(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))[1:])


def _parse_limit(text: str | None, default: int, maximum: int) -> int:
    if text is None:
        return default
    # isascii: str.isdigit() also accepts digits such as "²" that int() refuses.
    if (
        not (text.isascii() and text.isdigit() and len(text) <= _LIMIT_DIGITS_MAX)
        or not 1 <= int(text) <= maximum
    ):
        raise ValidationProblem(
            [{"field": "limit", "message": f"must be an integer from 1 to {maximum}"}]
        )
    return int(text)


def _history_filter(request: web.Request) -> HistoryFilter:
    query = request.query
    since = query.get("since")
    until = query.get("until")
    kind_text = query.get("operation_type")
    kind: OperationKind | None = None
    if kind_text is not None:
        kind = _OPERATION_KINDS.get(kind_text)
        if kind is None:
            raise ValidationProblem(
                [{"field": "operation_type", "message": _OPERATION_KINDS_MESSAGE}]
            )
    return HistoryFilter(
        since_us=None if since is None else parse_instant_us("since", since),
        until_us=None if until is None else parse_instant_us("until", until),
        kind=kind,
    )


@routes.get(_WALLET + "/operations")
@requires(Scope.READ)
async def list_operations(request: web.Request) -> web.Response:
    wallet_id = path_wallet_id(request)
    state = request.app[STATE_KEY]
    settings = state.settings
    limit = _parse_limit(
        request.query.get("limit"), settings.history_limit_default, settings.history_limit_max
    )
    cursor = request.query.get("cursor")
    before_seq = _decode_cursor(cursor) if cursor is not None else None  # "" is 422
    history_filter = _history_filter(request)
    services = state.services
    reply = await services.engine.read(wallet_id)
    if reply.outcome is not Outcome.OK:
        return reply_response(reply, wallet_id)
    if history_filter.is_empty:
        rows = await services.log.read_history(wallet_id, before_seq, limit + 1)
        next_seq = rows[limit - 1][1].seq if len(rows) > limit else None
        rows = rows[:limit]
    else:
        scan_max = (limit + 1) * (1 if history_filter.kind is None else HISTORY_SCAN_ROWS_PER_ITEM)
        rows, next_seq = await services.reader.filtered_history(
            wallet_id, history_filter, before_seq, limit, scan_max
        )
    assert reply.wallet is not None
    exponent = reply.wallet.currency.exponent
    links = await services.reader.history_links(
        wallet_id,
        [UUID(op.idempotency_key.partition(":")[2]) for _, op in rows
         if op.kind in _LEG_KINDS and op.idempotency_key is not None],
        [op.seq for _, op in rows if op.kind in _REVERSIBLE],
    )  # fmt: skip
    items = [history_item(operation_id, op, exponent, links) for operation_id, op in rows]
    next_cursor = _encode_cursor(next_seq) if next_seq is not None else None
    body = orjson.dumps({"items": items, "next_cursor": next_cursor})
    return web.Response(body=body, headers=_JSON_HEADERS)
