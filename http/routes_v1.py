"""Version 1 of the wallet API. A v2 would sit beside it as its own route table."""

from __future__ import annotations

import base64
import re
from typing import Final

import orjson
from aiohttp import web

from walletd.engine.commands import Outcome
from walletd.http.bulk import BULK_PATH, bulk_operations
from walletd.http.parsing import (
    parse_create_body,
    parse_idempotency_key,
    parse_operation_body,
    path_wallet_id,
    read_json_object,
)
from walletd.http.problems import ValidationProblem
from walletd.http.responses import history_item, reply_response, wallet_response
from walletd.http.state import STATE_KEY

__all__ = ["CURSOR_PATTERN", "PREFIX", "routes"]

PREFIX: Final = "/api/v1"
_JSON_HEADERS: Final = {"Content-Type": "application/json"}
# Enough digits for any valid limit, few enough that int() never meets Python's digit limit.
_LIMIT_DIGITS_MAX: Final = 6

# Any segment reaches the handler, braces included (aiohttp's default {name} stops at them
# and would answer 404 NOT_FOUND), so every malformed id gets 400 INVALID_WALLET_ID.
_WALLET: Final = PREFIX + "/wallets/{wallet_id:[^/]+}"

routes = web.RouteTableDef()
routes.post(BULK_PATH)(bulk_operations)


@routes.post(PREFIX + "/wallets")
async def create_wallet(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    body, _raw = await read_json_object(request, state.settings, optional=True)
    wallet_id = parse_create_body(body)
    key = parse_idempotency_key(request)
    chosen_id, reply = await state.services.engine.create_wallet(wallet_id, key)
    return reply_response(reply, chosen_id)


@routes.get(_WALLET)
async def get_wallet(request: web.Request) -> web.Response:
    wallet_id = path_wallet_id(request)
    engine = request.app[STATE_KEY].services.engine
    view = engine.read_resident(wallet_id)  # no coroutine for the common, resident case
    if view is not None:
        return wallet_response(view)
    return reply_response(await engine.read(wallet_id), wallet_id)


@routes.post(_WALLET + "/operation")
async def apply_operation(request: web.Request) -> web.Response:
    wallet_id = path_wallet_id(request)
    state = request.app[STATE_KEY]
    body, raw = await read_json_object(request, state.settings)
    kind, amount = parse_operation_body(body, raw)
    key = parse_idempotency_key(request)
    reply = await state.services.engine.apply(wallet_id, kind, amount, key)
    return reply_response(reply, wallet_id, amount)


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


@routes.get(_WALLET + "/operations")
async def list_operations(request: web.Request) -> web.Response:
    wallet_id = path_wallet_id(request)
    state = request.app[STATE_KEY]
    settings = state.settings
    limit = _parse_limit(
        request.query.get("limit"), settings.history_limit_default, settings.history_limit_max
    )
    cursor = request.query.get("cursor")
    before_seq = _decode_cursor(cursor) if cursor else None
    services = state.services
    reply = await services.engine.read(wallet_id)
    if reply.outcome is not Outcome.OK:
        return reply_response(reply, wallet_id)
    rows = await services.log.read_history(wallet_id, before_seq, limit + 1)
    items = [history_item(operation_id, op) for operation_id, op in rows[:limit]]
    next_cursor = _encode_cursor(rows[limit - 1][1].seq) if len(rows) > limit else None
    body = orjson.dumps({"items": items, "next_cursor": next_cursor})
    return web.Response(body=body, headers=_JSON_HEADERS)
