"""Version 1 of the wallet API. A v2 would sit beside it as its own route table."""

from __future__ import annotations

import base64
import binascii
import re
from typing import Final
from uuid import UUID

import orjson
from aiohttp import web

from walletd.engine.commands import Outcome
from walletd.http.parsing import (
    parse_create_body,
    parse_idempotency_key,
    parse_operation_body,
    parse_transfer_body,
    parse_wallet_id,
    read_json_object,
)
from walletd.http.problems import ProblemError, ValidationProblem
from walletd.http.responses import (
    history_item,
    reply_response,
    transfer_reply_response,
    transfer_response,
    wallet_response,
)
from walletd.http.state import STATE_KEY

__all__ = ["PREFIX", "routes"]

PREFIX: Final = "/api/v1"
_JSON_HEADERS: Final = {"Content-Type": "application/json"}
# Enough digits for any valid limit, few enough that int() never meets Python's digit limit.
_LIMIT_DIGITS_MAX: Final = 6

routes = web.RouteTableDef()


@routes.post(PREFIX + "/wallets")
async def create_wallet(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    body, _raw = await read_json_object(request, state.settings.body_bytes_max, optional=True)
    wallet_id = parse_create_body(body)
    key = parse_idempotency_key(request)
    chosen_id, reply = await state.services.engine.create_wallet(wallet_id, key)
    return reply_response(reply, chosen_id)


@routes.get(PREFIX + "/wallets/{wallet_id}")
async def get_wallet(request: web.Request) -> web.Response:
    wallet_id = parse_wallet_id(request.match_info["wallet_id"])
    engine = request.app[STATE_KEY].services.engine
    view = engine.read_resident(wallet_id)  # no coroutine for the common, resident case
    if view is not None:
        return wallet_response(view)
    return reply_response(await engine.read(wallet_id), wallet_id)


@routes.post(PREFIX + "/wallets/{wallet_id}/operation")
async def apply_operation(request: web.Request) -> web.Response:
    wallet_id = parse_wallet_id(request.match_info["wallet_id"])
    state = request.app[STATE_KEY]
    body, raw = await read_json_object(request, state.settings.body_bytes_max)
    kind, amount = parse_operation_body(body, raw)
    key = parse_idempotency_key(request)
    reply = await state.services.engine.apply(wallet_id, kind, amount, key)
    return reply_response(reply, wallet_id, amount)


@routes.post(PREFIX + "/transfers")
async def create_transfer(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    body, raw = await read_json_object(request, state.settings.body_bytes_max)
    wanted = parse_transfer_body(body, raw)
    key = parse_idempotency_key(request)
    transfer_id, reply = await state.services.engine.transfer(
        wanted.transfer_id, key, wanted.from_wallet_id, wanted.to_wallet_id, wanted.amount,
        wanted.reference,
    )  # fmt: skip
    return transfer_reply_response(
        reply, transfer_id, wanted.from_wallet_id, wanted.to_wallet_id, wanted.amount
    )


@routes.get(PREFIX + "/transfers/{transfer_id}")
async def get_transfer(request: web.Request) -> web.Response:
    text = request.match_info["transfer_id"]
    transfer_id = _known_transfer_id(text)
    if transfer_id is None:
        raise ProblemError(400, "INVALID_TRANSFER_ID", f"{text[:64]!r} is not a UUID")
    transfer = await request.app[STATE_KEY].services.engine.read_transfer(transfer_id)
    if transfer is None:
        raise ProblemError(404, "TRANSFER_NOT_FOUND", f"transfer {transfer_id} does not exist")
    return transfer_response(transfer, 200, replayed=False)


_CANONICAL_ID: Final = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)


def _known_transfer_id(text: str) -> UUID | None:
    return UUID(text) if _CANONICAL_ID.fullmatch(text) else None


def _encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(f"s{seq}".encode()).decode().rstrip("=")


# A cursor is "s<seq>" in unpadded URL-safe base64; seq fits PostgreSQL's bigint.
_CURSOR_TEXT: Final = re.compile(r"s[1-9][0-9]{0,18}")
_CURSOR_CHARS: Final = re.compile(r"[A-Za-z0-9_-]{1,32}")
_SEQ_MAX: Final = 2**63 - 1


def _decode_cursor(cursor: str) -> int:
    try:
        if not _CURSOR_CHARS.fullmatch(cursor):
            raise ValueError
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
        if not _CURSOR_TEXT.fullmatch(text) or int(text[1:]) > _SEQ_MAX:
            raise ValueError
        return int(text[1:])
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise ValidationProblem([{"field": "cursor", "message": "is not a valid cursor"}]) from None


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


@routes.get(PREFIX + "/wallets/{wallet_id}/operations")
async def list_operations(request: web.Request) -> web.Response:
    wallet_id = parse_wallet_id(request.match_info["wallet_id"])
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
