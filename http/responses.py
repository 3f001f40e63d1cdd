"""Rendering engine replies as HTTP responses: the seed's wallet JSON and the errors."""

from __future__ import annotations

import functools
import time
from typing import Final
from uuid import UUID

from aiohttp import web

from walletd.engine.commands import Outcome, Reply
from walletd.engine.model import OperationKind, OperationRecord, WalletView
from walletd.engine.money import format_minor
from walletd.http.problems import ProblemError

__all__ = [
    "format_timestamp",
    "history_item",
    "reply_response",
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
    path's own cost. ``test_responses`` checks it equals orjson's encoding of the fields."""
    return (
        f'{{"id":"{view.wallet_id}","balance":"{format_minor(view.balance)}",'
        f'"created_at":"{format_timestamp(view.created_at_us)}",'
        f'"updated_at":"{format_timestamp(view.updated_at_us)}"}}'
    ).encode()


def history_item(operation_id: int, op: OperationRecord) -> dict[str, object]:
    return {
        "id": operation_id,
        "seq": op.seq,
        "operation_type": OperationKind(op.kind).name,
        "amount": format_minor(op.amount),
        "balance_after": format_minor(op.balance_after),
        "idempotency_key": op.idempotency_key,
        "created_at": format_timestamp(op.created_at_us),
    }


def wallet_response(view: WalletView) -> web.Response:
    """200 with the wallet: the response of almost every request, kept lean."""
    return web.Response(body=wallet_body(view), content_type=_JSON)


def _wallet_response(view: WalletView, status: int, replayed: bool) -> web.Response:
    headers = dict(_JSON_HEADERS)
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    if status == 201:
        headers["Location"] = f"/api/v1/wallets/{view.wallet_id}"
    return web.Response(status=status, body=wallet_body(view), headers=headers)


def reply_response(reply: Reply, wallet_id: UUID, amount: int = 0) -> web.Response:
    """The response for a reply, or the ProblemError it stands for."""
    outcome = reply.outcome
    if outcome is Outcome.OK and reply.wallet is not None:
        if not reply.replayed:  # the hot path: no header copy
            return wallet_response(reply.wallet)
        return _wallet_response(reply.wallet, 200, reply.replayed)
    if outcome is Outcome.CREATED and reply.wallet is not None:
        return _wallet_response(reply.wallet, 201, reply.replayed)
    raise _problem(reply, wallet_id, amount)


def _problem(reply: Reply, wallet_id: UUID, amount: int) -> ProblemError:
    outcome = reply.outcome
    if outcome is Outcome.WALLET_NOT_FOUND:
        return ProblemError(404, "WALLET_NOT_FOUND", f"wallet {wallet_id} does not exist")
    if outcome is Outcome.WALLET_ALREADY_EXISTS:
        return ProblemError(409, "WALLET_ALREADY_EXISTS", f"wallet {wallet_id} already exists")
    # A recorded refusal replayed to a retry with its key: same status and body.
    replayed = _REPLAYED if reply.replayed else None
    if outcome is Outcome.INSUFFICIENT_FUNDS:
        return ProblemError(
            409,
            "INSUFFICIENT_FUNDS",
            f"wallet {wallet_id} has {format_minor(reply.balance_seen or 0)}, "
            f"cannot withdraw {format_minor(amount)}",
            headers=replayed,
        )
    if outcome is Outcome.BALANCE_LIMIT_EXCEEDED:
        return ProblemError(
            409,
            "BALANCE_LIMIT_EXCEEDED",
            f"wallet {wallet_id} has {format_minor(reply.balance_seen or 0)}; depositing "
            f"{format_minor(amount)} would pass the balance ceiling",
            headers=replayed,
        )
    if outcome is Outcome.IDEMPOTENCY_KEY_REUSED:
        return ProblemError(
            422,
            "IDEMPOTENCY_KEY_REUSED",
            "this Idempotency-Key was already used with a different request",
        )
    return ProblemError(
        503,
        "UNAVAILABLE",
        "storage is unavailable or the outcome of the commit is unknown; retry with the "
        "same Idempotency-Key",
        headers=_RETRY_AFTER,
    )
