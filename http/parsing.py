"""Parsing and validating requests at the edge: ids, bodies, money, headers.

Money is parsed exactly: a JSON number that arrives as a float is re-read from the raw body
as a ``Decimal``, so no binary float ever decides an amount.
"""

from __future__ import annotations

import functools
import json
import re
from decimal import Decimal, InvalidOperation
from typing import Any, Final, NamedTuple
from uuid import UUID

import orjson
from aiohttp import web

from walletd.engine.model import OperationKind
from walletd.engine.money import AMOUNT_MINOR_MAX, MINOR_UNITS_PER_UNIT, format_minor
from walletd.http.problems import FieldError, ProblemError, ValidationProblem

__all__ = [
    "IDEMPOTENCY_KEY_LENGTH_MAX",
    "REFERENCE_LENGTH_MAX",
    "TransferRequest",
    "parse_amount",
    "parse_create_body",
    "parse_idempotency_key",
    "parse_json_object",
    "parse_operation_body",
    "parse_transfer_body",
    "parse_wallet_id",
    "read_json_object",
]

IDEMPOTENCY_KEY_LENGTH_MAX: Final = 255
_DECIMAL_STRING: Final = re.compile(r"[0-9]+(\.[0-9]+)?")
_OPERATION_KINDS: Final = {"DEPOSIT": OperationKind.DEPOSIT, "WITHDRAW": OperationKind.WITHDRAW}
_OPERATION_FIELDS: Final = frozenset({"operation_type", "operationType", "amount"})
_AMOUNT_MAX_TEXT: Final = format_minor(AMOUNT_MINOR_MAX)
_TRANSFER_FIELDS: Final = frozenset({"id", "from_wallet_id", "to_wallet_id", "amount", "reference"})
_CANONICAL_UUID: Final = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)
REFERENCE_LENGTH_MAX: Final = 255


class _NonFinite:
    """Stands for NaN/Infinity literals, which JSON does not allow but some clients send."""


def parse_wallet_id(text: str) -> UUID:
    wallet_id = _known_wallet_id(text)
    if wallet_id is None:
        raise ProblemError(400, "INVALID_WALLET_ID", f"{text[:64]!r} is not a UUID")
    return wallet_id


@functools.lru_cache(maxsize=16384)
def _known_wallet_id(text: str) -> UUID | None:
    # Busy wallets are named again and again; parsing a UUID is ~2 us of Python, a cache
    # hit ~0.1 us. Bounded; invalid texts are cached as None like any other.
    try:
        return UUID(text)
    except ValueError:
        return None


def _require_json_content_type(request: web.Request) -> None:
    # The exact header most clients send skips aiohttp's header parsing (~1 us).
    if request.headers.get("Content-Type") == "application/json":
        return
    if request.content_type != "application/json":
        raise ProblemError(
            415,
            "UNSUPPORTED_MEDIA_TYPE",
            f"Content-Type {request.content_type!r} is not supported; send application/json",
        )


def _lenient_loads(raw: bytes) -> Any:
    return json.loads(raw, parse_constant=lambda _name: _NonFinite())


async def read_json_object(
    request: web.Request, body_bytes_max: int, *, optional: bool = False
) -> tuple[dict[str, Any], bytes]:
    """The body as a JSON object, and its raw bytes; 415/413/400 as the contract says.

    With ``optional``, an empty body is an empty object and needs no Content-Type.
    """
    if optional and not request.body_exists:
        return {}, b""
    length = request.content_length
    # Refused from the header alone, before reading; aiohttp's client_max_size (set to the
    # same limit) stops a body without Content-Length while it streams in.
    if length is not None and length > body_bytes_max:
        raise ProblemError(413, "PAYLOAD_TOO_LARGE", "request body is larger than the limit")
    _require_json_content_type(request)
    raw = await request.read()
    if optional and not raw.strip():
        return {}, raw
    return parse_json_object(raw), raw


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object, or 400 INVALID_JSON.

    orjson first (fast, strict); what it refuses is read again by the standard library,
    which also takes NaN/Infinity literals and integers past 64 bits, so that those reach
    validation and get a per-field 422 instead of a blanket 400.
    """
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        try:
            value = _lenient_loads(raw)
        except (ValueError, RecursionError):
            raise ProblemError(400, "INVALID_JSON", "the body is not valid JSON") from None
    if not isinstance(value, dict):
        raise ProblemError(400, "INVALID_JSON", "the body must be a JSON object")
    return value


def _exact_number(raw_body: bytes, field: str) -> Decimal | None:
    """The exact decimal the client wrote for a float field, read again from the body."""
    try:
        exact = json.loads(raw_body, parse_float=Decimal, parse_constant=lambda _n: _NonFinite())
    except (ValueError, RecursionError):
        return None
    value = exact.get(field) if isinstance(exact, dict) else None
    if isinstance(value, Decimal):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return Decimal(value)
    return None


def parse_amount(value: Any, raw_body: bytes, field: str = "amount") -> int | FieldError:
    """Minor units from a JSON number or a decimal string, or the field's error."""
    if isinstance(value, bool) or value is None or isinstance(value, _NonFinite):
        return _amount_error(field, "must be a number or a decimal string")
    if isinstance(value, int):
        decimal = Decimal(value)
    elif isinstance(value, float):
        exact = _exact_number(raw_body, field)
        if exact is None:
            return _amount_error(field, "must be a finite decimal number")
        decimal = exact
    elif isinstance(value, str):
        if not _DECIMAL_STRING.fullmatch(value):
            return _amount_error(field, 'must be a decimal string like "10.50"')
        decimal = Decimal(value)
    else:
        return _amount_error(field, "must be a number or a decimal string")
    return _to_minor(decimal, field)


def _amount_error(field: str, message: str) -> FieldError:
    return {"field": field, "message": message}


def _to_minor(decimal: Decimal, field: str) -> int | FieldError:
    if not decimal.is_finite():
        return _amount_error(field, "must be finite")
    # Reject huge magnitudes before any arithmetic, so exponent tricks cost nothing.
    if decimal.adjusted() > 15:
        return _amount_error(field, f"must be at most {_AMOUNT_MAX_TEXT}")
    try:
        scaled = decimal * MINOR_UNITS_PER_UNIT
        if scaled != scaled.to_integral_value():
            return _amount_error(field, "must have at most 2 fractional digits")
    except InvalidOperation:
        return _amount_error(field, "must be a decimal number")
    minor = int(scaled)
    if minor <= 0:
        return _amount_error(field, "must be greater than 0")
    if minor > AMOUNT_MINOR_MAX:
        return _amount_error(field, f"must be at most {_AMOUNT_MAX_TEXT}")
    return minor


def parse_operation_body(body: dict[str, Any], raw: bytes) -> tuple[OperationKind, int]:
    errors: list[FieldError] = []
    for name in body:
        if name not in _OPERATION_FIELDS:
            errors.append({"field": str(name)[:64], "message": "unknown field"})
    kind_text = body.get("operation_type", body.get("operationType"))
    if "operation_type" in body and "operationType" in body:
        errors.append(
            {"field": "operationType", "message": "give operation_type or operationType, not both"}
        )
    kind = _OPERATION_KINDS.get(kind_text) if isinstance(kind_text, str) else None
    if kind is None:
        message = "is required" if kind_text is None else "must be DEPOSIT or WITHDRAW"
        errors.append({"field": "operation_type", "message": message})
    if "amount" not in body:
        errors.append({"field": "amount", "message": "is required"})
        amount: int | FieldError = 0
    else:
        amount = parse_amount(body["amount"], raw)
        if isinstance(amount, dict):
            errors.append(amount)
    if errors:
        raise ValidationProblem(errors)
    assert kind is not None
    assert isinstance(amount, int)
    return kind, amount


def parse_create_body(body: dict[str, Any]) -> UUID | None:
    errors: list[FieldError] = []
    wallet_id: UUID | None = None
    for name in body:
        if name != "id":
            errors.append({"field": str(name)[:64], "message": "unknown field"})
    if "id" in body:
        value = body["id"]
        try:
            if not isinstance(value, str):
                raise ValueError
            wallet_id = UUID(value)
        except ValueError:
            errors.append({"field": "id", "message": "must be a UUID string"})
    if errors:
        raise ValidationProblem(errors)
    return wallet_id


class TransferRequest(NamedTuple):
    transfer_id: UUID | None
    from_wallet_id: UUID
    to_wallet_id: UUID
    amount: int
    reference: str | None


def _body_uuid(body: dict[str, Any], name: str, errors: list[FieldError]) -> UUID | None:
    value = body.get(name)
    if isinstance(value, str) and _CANONICAL_UUID.fullmatch(value):
        return UUID(value)
    message = "is required" if value is None else "must be a UUID in its 8-4-4-4-12 form"
    errors.append({"field": name, "message": message})
    return None


def parse_transfer_body(body: dict[str, Any], raw: bytes) -> TransferRequest:
    errors: list[FieldError] = []
    for name in body:
        if name not in _TRANSFER_FIELDS:
            errors.append({"field": str(name)[:64], "message": "unknown field"})
    transfer_id = _body_uuid(body, "id", errors) if "id" in body else None
    from_wallet_id = _body_uuid(body, "from_wallet_id", errors)
    to_wallet_id = _body_uuid(body, "to_wallet_id", errors)
    if from_wallet_id is not None and from_wallet_id == to_wallet_id:
        errors.append({"field": "to_wallet_id", "message": "must differ from from_wallet_id"})
    amount: int | FieldError = 0
    if "amount" not in body:
        errors.append({"field": "amount", "message": "is required"})
    else:
        amount = parse_amount(body["amount"], raw)
        if isinstance(amount, dict):
            errors.append(amount)
    reference = body.get("reference")
    if reference is not None and not (
        isinstance(reference, str)
        and 1 <= len(reference) <= REFERENCE_LENGTH_MAX
        and reference.isprintable()
    ):
        errors.append(
            {
                "field": "reference",
                "message": f"must be 1 to {REFERENCE_LENGTH_MAX} printable characters",
            }
        )
    if errors:
        raise ValidationProblem(errors)
    assert from_wallet_id is not None
    assert to_wallet_id is not None
    assert isinstance(amount, int)
    return TransferRequest(transfer_id, from_wallet_id, to_wallet_id, amount, reference)


def parse_idempotency_key(request: web.Request) -> str | None:
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not (1 <= len(key) <= IDEMPOTENCY_KEY_LENGTH_MAX and key.isascii() and key.isprintable()):
        raise ValidationProblem(
            [
                {
                    "field": "Idempotency-Key",
                    "message": "must be 1 to 255 printable ASCII characters",
                }
            ]
        )
    return key
