"""Many operations in one request: ``POST /api/v1/operations/bulk``.

One request per operation caps a client at what aiohttp can parse and answer per second
(docs/BENCHMARKS.md); the engine already batches, so the client may hand it a batch. Each
item is what the single-item endpoint takes, plus the wallet id and an optional key::

    {"items": [{"wallet_id": "…", "operation_type": "DEPOSIT", "amount": "10.00",
                "idempotency_key": "order-17"}, …]}

The answer is ``200`` with one result per item, in order, each holding the status and body
the single-item endpoint would have given: the wallet after the operation, or its problem.
A ``200`` means every applied item is committed (the answer waits for all of them); an item
whose outcome is unknown says ``503`` in its own result, like the single endpoint would.

Admission is all or nothing: the whole request enters the shard mailboxes, or none of it
does (``503 OVERLOADED``), so a bulk request is never half-queued. Items on one wallet are
applied in array order, because they enter that wallet's mailbox in array order.

Across processes: items whose wallet another walletd process serves are sent on to that
process, one sub-request per process (with the forwarded marker and the request's key, each
item with every field it had: its own key, or the ``key_index`` its derived key is built
from), and their results are put back in place; a process that cannot be
connected to leaves its items ``503 NOT_OWNER`` (nothing applied), a sub-request sent and
not answered leaves them ``503 UNAVAILABLE`` (retry with the same keys). An ``atomic``
request stays one transaction, so one that needs another process is ``422``.

Keys: an item's ``idempotency_key`` works as the header does on the single endpoint (scope:
its wallet). The request's ``Idempotency-Key`` header gives every item without a key of its
own a derived key, ``<request key><US><index>`` (US = the unit separator, 0x1F), so a retry of
the same request replays item by item. No client key may contain US (``is_idempotency_key``),
so no key a client sends to any endpoint is ever a derived one (``R/0`` beside request key
``R`` is its own key, not a replay of item 0); and a derived key never starts with US, so it
is never a transfer leg's or a hold row's key either (``<US>KIND:<id>``, engine/commands.py).
The request key is limited to ``REQUEST_KEY_LENGTH_MAX`` characters so that every derived key
stays within the 255 characters of a key.
"""

from __future__ import annotations

import asyncio
import re
from decimal import Decimal
from typing import Any, Final, NamedTuple
from uuid import UUID

import orjson
from aiohttp import web

from walletd.engine.commands import Outcome, Reply
from walletd.engine.errors import AtomicSpansShards, AtomicTooLarge
from walletd.engine.model import NO_METADATA, Metadata, OperationKind
from walletd.engine.money import (
    AMOUNT_MINOR_MAX,
    EDGE_SCALE_MIN,
    MINOR_UNITS_PER_UNIT,
    format_minor,
)
from walletd.http.forwarding import (
    FORWARDED_HEADER,
    FORWARDER_KEY,
    AnswerLost,
    Unreachable,
    forwarded_headers,
)
from walletd.http.keys import KEY_NAME
from walletd.http.parsing import (
    DERIVED_KEY_SEPARATOR,
    IDEMPOTENCY_KEY_LENGTH_MAX,
    OPERATION_KINDS,
    WALLET_ID_MESSAGE,
    Amount,
    body_wallet_id,
    derived_key,
    is_idempotency_key,
    loads_exact,
    operation_fields,
    parse_idempotency_key,
    require_json_content_type,
)
from walletd.http.problems import FieldError, ProblemError, ValidationProblem, problem_body
from walletd.http.responses import amount_problem, reply_problem, wallet_body
from walletd.http.settings import HttpSettings
from walletd.http.state import METRICS_KEY, STATE_KEY

__all__ = [
    "BULK_PATH",
    "KEY_INDEX_MAX",
    "REQUEST_KEY_LENGTH_MAX",
    "BulkItem",
    "bulk_operations",
    "item_json",
    "parse_bulk",
]

BULK_PATH: Final = "/api/v1/operations/bulk"
# "<key><US><index>" must fit a key: room for US and the index of the largest allowed bulk.
_INDEX_DIGITS_MAX: Final = 6
KEY_INDEX_MAX: Final = 10**_INDEX_DIGITS_MAX - 1
REQUEST_KEY_LENGTH_MAX: Final = IDEMPOTENCY_KEY_LENGTH_MAX - 1 - _INDEX_DIGITS_MAX

_ITEM_FIELDS: Final = frozenset(
    {
        "wallet_id", "operation_type", "operationType", "amount", "idempotency_key",
        "reference", "key_index", "metadata",
    }
)  # fmt: skip
_TOP_FIELDS: Final = frozenset({"items", "atomic"})
_JSON_HEADERS: Final = {"Content-Type": "application/json"}


class BulkItem(NamedTuple):
    """A valid item, ready for the engine (a tuple: built in C, ~1,000 per request)."""

    wallet_id: UUID
    kind: OperationKind
    amount: int
    idempotency_key: str | None
    reference: str | None = None
    # ``amount`` / 10^scale as written (http/parsing.py ``Amount``); the wallet's shard
    # rescales it to its currency.
    scale: int = EDGE_SCALE_MIN
    metadata: Metadata = NO_METADATA

    @property
    def written(self) -> Amount:
        return Amount(self.amount, self.scale)


ParsedItem = BulkItem | list[FieldError]


def _key_index(key: str | None) -> int | None:
    """The index a derived key was built from; None for a client's key (or none)."""
    if key is None or DERIVED_KEY_SEPARATOR not in key:
        return None
    return int(key.rpartition(DERIVED_KEY_SEPARATOR)[2])


def _loads(raw: bytes) -> Any:
    """The body: orjson when it has no float; else again with exact decimals.

    A float in an item's amount would lose the digits the client wrote, so a body holding
    one is read again by the standard library with ``parse_float=Decimal`` (slower, and
    only then).
    """
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        value = None
    else:
        if not _has_float(value):
            return value
    try:
        return loads_exact(raw)
    except (ValueError, RecursionError):
        raise ProblemError(400, "INVALID_JSON", "the body is not valid JSON") from None


def _has_float(value: Any) -> bool:
    if not isinstance(value, dict):
        return False
    items = value.get("items")
    if not isinstance(items, list):
        return False
    return any(isinstance(item, dict) and isinstance(item.get("amount"), float) for item in items)


class BulkRequest(NamedTuple):
    items: list[ParsedItem]
    atomic: bool


def parse_bulk(raw: bytes, items_max: int, request_key: str | None) -> BulkRequest:
    """Each item parsed on its own: a ``BulkItem``, or the item's field errors.

    The envelope (a JSON object with ``items``, a list of 1..``items_max``, and an optional
    boolean ``atomic``) is checked for the whole request; an error there refuses the
    request (400/413/422).
    """
    body = _loads(raw)
    if not isinstance(body, dict):
        raise ProblemError(400, "INVALID_JSON", "the body must be a JSON object")
    errors: list[FieldError] = [
        {"field": str(name)[:64], "message": "unknown field"}
        for name in body
        if name not in _TOP_FIELDS
    ]
    items = body.get("items")
    if not isinstance(items, list) or not items:
        errors.append({"field": "items", "message": "must be a non-empty array of operations"})
    atomic = body.get("atomic", False)
    if not isinstance(atomic, bool):
        errors.append({"field": "atomic", "message": "must be true or false"})
    if errors:
        raise ValidationProblem(errors)
    assert isinstance(items, list)
    if len(items) > items_max:
        raise ProblemError(
            413,
            "TOO_MANY_ITEMS",
            f"a bulk request holds at most {items_max} items; this one has {len(items)}",
        )
    parsed = [_parse_item(index, item, request_key) for index, item in enumerate(items)]
    return BulkRequest(parsed, atomic)


# A plain decimal string that needs no Decimal to read: at most 13 integer digits (the
# largest amount has 13) and at most 2 fractional ones.
_PLAIN_AMOUNT: Final = re.compile(r"([0-9]{1,13})(?:\.([0-9]{1,2}))?")


def _parse_item(index: int, item: Any, request_key: str | None) -> ParsedItem:
    """An item as a ``BulkItem``: the common shape on a short path, the rest (and every
    invalid item) through the full check, which names each field's error."""
    if (
        type(item) is dict
        and _ITEM_FIELDS.issuperset(item)
        and "operationType" not in item
        and "reference" not in item  # checked by the full path
        and "metadata" not in item  # checked by the full path
        and "key_index" not in item
    ):
        wallet_id = body_wallet_id(item.get("wallet_id"))
        kind_text = item.get("operation_type")
        kind = OPERATION_KINDS.get(kind_text) if type(kind_text) is str else None
        amount = _plain_amount(item.get("amount"))
        key = item.get("idempotency_key")
        if (
            wallet_id is not None
            and kind is not None
            and amount is not None
            and (key is None or is_idempotency_key(key))
        ):
            if key is None and request_key is not None:
                key = derived_key(request_key, index)
            return BulkItem(wallet_id, kind, amount, key)
    return _checked_item(index, item, request_key)


def _plain_amount(value: Any) -> int | None:
    """Minor units of an int or a plain decimal string, when exact and in range; None for
    anything else, which the full check (``parse_amount``) then decides."""
    if type(value) is int:
        minor = value * MINOR_UNITS_PER_UNIT
    elif type(value) is str and (match := _PLAIN_AMOUNT.fullmatch(value)):
        units, cents = match.groups()
        minor = int(units) * MINOR_UNITS_PER_UNIT + (int(cents.ljust(2, "0")) if cents else 0)
    else:
        return None
    return minor if 0 < minor <= AMOUNT_MINOR_MAX else None


def _checked_item(index: int, item: Any, request_key: str | None) -> ParsedItem:
    prefix = f"items[{index}]"
    if not isinstance(item, dict):
        return [{"field": prefix, "message": "must be a JSON object"}]
    # The single endpoint's rules (bulk bodies hold no floats: see _loads), its fields named
    # within the item.
    kind, amount, unknown, field_errors, reference, metadata = operation_fields(
        item, b"", _ITEM_FIELDS
    )
    errors: list[FieldError] = [_within(prefix, error) for error in unknown]
    wallet_text = item.get("wallet_id")
    wallet_id = body_wallet_id(wallet_text)
    if wallet_id is None:
        message = "is required" if wallet_text is None else WALLET_ID_MESSAGE
        errors.append({"field": f"{prefix}.wallet_id", "message": message})
    errors.extend(_within(prefix, error) for error in field_errors)
    key = item.get("idempotency_key")
    if key is not None and not is_idempotency_key(key):
        errors.append(
            {
                "field": f"{prefix}.idempotency_key",
                "message": f"must be 1 to {IDEMPOTENCY_KEY_LENGTH_MAX} printable ASCII characters",
            }
        )
    key_index = _parse_key_index(prefix, item, request_key, errors)
    if errors:
        return errors
    assert wallet_id is not None
    assert kind is not None
    assert amount is not None
    if key is None and request_key is not None:
        key = derived_key(request_key, index if key_index is None else key_index)
    return BulkItem(wallet_id, kind, amount.value, key, reference, amount.scale, metadata)


def _parse_key_index(
    prefix: str, item: dict[str, Any], request_key: str | None, errors: list[FieldError]
) -> int | None:
    """The optional ``key_index``: the index to derive the item's key from instead of its
    position (a forwarded sub-request keeps each item's place in the original request)."""
    if "key_index" not in item:
        return None
    value = item["key_index"]
    # 7.0 is an integer to JSON Schema too; a body read exactly holds it as a Decimal.
    if _integral(value):
        value = int(value)
    field = f"{prefix}.key_index"
    if type(value) is not int or not 0 <= value <= KEY_INDEX_MAX:
        errors.append({"field": field, "message": f"must be an integer from 0 to {KEY_INDEX_MAX}"})
    elif request_key is None:
        errors.append({"field": field, "message": "needs the request's Idempotency-Key header"})
    elif item.get("idempotency_key") is not None:
        errors.append({"field": field, "message": "give idempotency_key or key_index, not both"})
    else:
        return value
    return None


def _integral(value: object) -> bool:
    """A JSON number with an integer value written as a fraction (``7.0``)."""
    if isinstance(value, Decimal):
        return value.is_finite() and value == value.to_integral_value()
    return type(value) is float and value.is_integer()


def _within(prefix: str, error: FieldError) -> FieldError:
    return {"field": f"{prefix}.{error['field']}", "message": error["message"]}


async def read_bulk_body(request: web.Request, settings: HttpSettings) -> bytes:
    """The raw body, refused with 413 as soon as it passes ``bulk_body_bytes_max`` and with
    408 when it has not arrived ``body_read_timeout_s`` after reading began.

    Read here rather than by ``request.read()``, whose limit is the app-wide one of the
    single-item endpoints; a bulk body has its own, larger bound.
    """
    body_bytes_max = settings.bulk_body_bytes_max
    length = request.content_length
    if length is not None and length > body_bytes_max:
        raise ProblemError(413, "PAYLOAD_TOO_LARGE", "request body is larger than the limit")
    require_json_content_type(request)
    chunks: list[bytes] = []
    size = 0
    timeout_s = settings.body_read_timeout_s
    try:
        async with asyncio.timeout(timeout_s):
            while chunk := await request.content.readany():
                size += len(chunk)
                if size > body_bytes_max:
                    raise ProblemError(
                        413, "PAYLOAD_TOO_LARGE", "request body is larger than the limit"
                    )
                chunks.append(chunk)
    except TimeoutError:
        raise ProblemError(
            408, "REQUEST_TIMEOUT", f"the request body did not arrive within {timeout_s:g} s"
        ) from None
    return b"".join(chunks)


def _result(index: int, item: ParsedItem, reply: Reply | None) -> bytes:
    """One item's result, written out: the wallet body is already JSON."""
    if isinstance(item, list):
        problem = problem_body(
            422, "VALIDATION_ERROR", _detail(item), BULK_PATH, extra={"errors": item}
        )
        return b'{"index":%d,"status":422,"body":%s}' % (index, orjson.dumps(problem))
    assert reply is not None
    outcome = reply.outcome
    if outcome is Outcome.OK and reply.wallet is not None:
        replayed = b"true" if reply.replayed else b"false"
        return b'{"index":%d,"status":200,"replayed":%s,"body":%s}' % (
            index,
            replayed,
            wallet_body(reply.wallet),
        )
    error = _item_problem_of(index, item, reply)
    problem = problem_body(
        error.status,
        error.code,
        error.detail,
        f"/api/v1/wallets/{item.wallet_id}/operation",
        extra=error.extra,
    )
    return b'{"index":%d,"status":%d,"body":%s}' % (index, error.status, orjson.dumps(problem))


def _detail(errors: list[FieldError]) -> str:
    return "; ".join(f"{e['field']}: {e['message']}" for e in errors)


async def bulk_operations(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    settings = state.settings
    raw = await read_bulk_body(request, settings)
    request_key = parse_idempotency_key(request)
    if request_key is not None and len(request_key) > REQUEST_KEY_LENGTH_MAX:
        raise ValidationProblem(
            [
                {
                    "field": "Idempotency-Key",
                    "message": f"on a bulk request, at most {REQUEST_KEY_LENGTH_MAX} "
                    "characters (item keys are derived from it)",
                }
            ]
        )
    engine = state.services.engine
    items, atomic = parse_bulk(raw, engine.limits.bulk_ops_max, request_key)
    valid = [item for item in items if isinstance(item, BulkItem)]
    if atomic and len(valid) < len(items):  # all or nothing: one invalid item refuses all
        raise ValidationProblem(
            [error for item in items if isinstance(item, list) for error in item]
        )
    try:
        # Raises EngineOverloaded, nothing queued, when the items do not fit in time.
        replies, refused_at = await engine.apply_operations(
            valid, atomic=atomic, actor=request.get(KEY_NAME)
        )
    except AtomicTooLarge as error:
        raise ProblemError(
            413,
            "TOO_MANY_ITEMS",
            f"{error} (one batch, one transaction: WALLETD_BATCH_MAX); split it, or send it "
            "without atomic",
        ) from None
    except AtomicSpansShards as error:
        raise ProblemError(
            422,
            "ATOMIC_NOT_POSSIBLE",
            f"an atomic bulk request must fit one transaction: {error}; send it without "
            "atomic, or to a walletd with one pipeline (--pipelines 1, the default)",
        ) from None
    if refused_at is not None:
        raise _atomic_refusal(refused_at, valid[refused_at], replies[refused_at])
    elsewhere = await _forward_foreign(request, valid, replies)
    parts: list[bytes] = []
    applied = refused = 0
    valid_index = 0
    for index, item in enumerate(items):
        reply = None
        if isinstance(item, BulkItem):
            forwarded = elsewhere.get(valid_index)
            reply = replies[valid_index]
            valid_index += 1
            if forwarded is not None:
                status, result = forwarded
                applied += status == 200
                refused += status != 200
                parts.append(orjson.dumps({**result, "index": index}))
                continue
            if reply.outcome is Outcome.OK:
                applied += 1
            else:
                refused += 1
        else:
            refused += 1
        parts.append(_result(index, item, reply))
    if FORWARDED_HEADER not in request.headers:  # the sub-request's items count where sent
        request.app[METRICS_KEY].observe_bulk(applied, refused)
    body = b'{"applied":%d,"refused":%d,"results":[%s]}' % (applied, refused, b",".join(parts))
    return web.Response(body=body, headers=_JSON_HEADERS)


def _atomic_refusal(index: int, item: BulkItem, reply: Reply) -> ProblemError:
    """The problem of the item that refused an atomic request, for the whole request."""
    error = _item_problem_of(index, item, reply)
    return ProblemError(
        error.status,
        error.code,
        f"items[{index}]: {error.detail}; nothing was applied (atomic)",
        headers=error.headers,
        extra={**(error.extra or {}), "index": index},
    )


def _item_problem_of(index: int, item: BulkItem, reply: Reply) -> ProblemError:
    """The single endpoint's problem for an item's reply; an amount its wallet's currency
    cannot hold names the item's field, as the edge's own 422s do."""
    if reply.outcome is Outcome.AMOUNT_NOT_IN_CURRENCY and reply.currency is not None:
        return amount_problem(reply.currency, item.written, f"items[{index}].amount")
    return reply_problem(reply, item.wallet_id, item.written)


async def _forward_foreign(
    request: web.Request, valid: list[BulkItem], replies: list[Reply]
) -> dict[int, tuple[int, dict[str, Any]]]:
    """Send the items another process serves (NOT_OWNER here) to their owners, one
    sub-request per owner, all at once; their results by index into ``valid``. Items with
    no live owner, or of a request that was forwarded already (never two hops), keep their
    NOT_OWNER result."""
    if FORWARDED_HEADER in request.headers:
        return {}
    engine = request.app[STATE_KEY].services.engine
    self_url = request.app[STATE_KEY].services.self_url
    by_owner: dict[str, list[int]] = {}
    for index, reply in enumerate(replies):
        if reply.outcome is Outcome.NOT_OWNER:
            url = engine.ownership.owner_url(engine.shard_of(valid[index].wallet_id))
            if url is not None and url != self_url:
                by_owner.setdefault(url, []).append(index)
    if not by_owner:
        return {}
    # The request's Idempotency-Key travels too: an item with a derived key carries the
    # key_index to derive it from, and the owner derives the very same key.
    headers = forwarded_headers(request)
    sent = await asyncio.gather(
        *(_sub_request(request, url, [valid[i] for i in indexes], headers)
          for url, indexes in by_owner.items())
    )  # fmt: skip
    found: dict[int, tuple[int, dict[str, Any]]] = {}
    for indexes, results in zip(by_owner.values(), sent, strict=True):
        found.update(zip(indexes, results, strict=True))
    return found


async def _sub_request(
    request: web.Request, url: str, items: list[BulkItem], headers: dict[str, str]
) -> list[tuple[int, dict[str, Any]]]:
    """One owner's items as one bulk request; a result per item, in order."""
    body = orjson.dumps({"items": [item_json(item) for item in items]})
    try:
        status, _headers, payload = await request.app[FORWARDER_KEY].exchange(
            "POST", url + BULK_PATH, body, {**headers, "Content-Type": "application/json"}
        )
    except Unreachable:
        return [_item_problem(item, 503, "NOT_OWNER", _UNREACHABLE) for item in items]
    except AnswerLost:
        return [_item_problem(item, 503, "UNAVAILABLE", _LOST) for item in items]
    try:
        answer = orjson.loads(payload)
        if status == 200:
            results = answer["results"]
            if len(results) == len(items):
                return [(int(result["status"]), result) for result in results]
        elif 400 <= status < 500 or answer.get("code") in ("NOT_OWNER", "OVERLOADED"):
            # Refused whole by the owner (nothing applied): its problem for every item.
            return [(status, {"status": status, "body": answer}) for _item in items]
    except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError):
        pass
    return [_item_problem(item, 503, "UNAVAILABLE", _LOST) for item in items]


_UNREACHABLE: Final = (
    "the wallet's owner (another walletd process) cannot be reached; nothing was applied, retry"
)
_LOST: Final = (
    "the item was sent to the wallet's owner (another walletd process) and its answer was "
    "lost; retry with the same idempotency key"
)


def item_json(item: BulkItem) -> dict[str, object]:
    """An item as a sub-request spells it: every field of ``BulkItem``, so the owner parses
    it back to the same item (a derived key as the ``key_index`` it was built from, under
    the same request key; tests/test_bulk.py round-trips every field)."""
    spelled: dict[str, object] = {
        "wallet_id": str(item.wallet_id),
        "operation_type": item.kind.name,
        "amount": format_minor(item.amount, item.scale),
    }
    key_index = _key_index(item.idempotency_key)
    if key_index is not None:
        spelled["key_index"] = key_index
    elif item.idempotency_key is not None:
        spelled["idempotency_key"] = item.idempotency_key
    if item.reference is not None:
        spelled["reference"] = item.reference
    if item.metadata:
        spelled["metadata"] = dict(item.metadata)
    return spelled


def _item_problem(
    item: BulkItem, status: int, code: str, detail: str
) -> tuple[int, dict[str, Any]]:
    problem = problem_body(status, code, detail, f"/api/v1/wallets/{item.wallet_id}/operation")
    return status, {"status": status, "body": problem}
