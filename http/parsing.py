"""Parsing and validating requests at the edge: ids, bodies, money, headers.

Money is parsed exactly: a JSON number that arrives as a float is re-read from the raw body
as a ``Decimal``, so no binary float ever decides an amount.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import re
from collections.abc import Mapping
from decimal import Decimal
from typing import Any, Final, NamedTuple
from uuid import UUID

import orjson
from aiohttp import web

from walletd.engine.bounds import (
    KEY_LENGTH_MAX,
    METADATA_KEY_LENGTH_MAX,
    METADATA_KEYS_MAX,
    METADATA_PATCH_KEYS_MAX,
    METADATA_VALUE_LENGTH_MAX,
)
from walletd.engine.bounds import REFERENCE_LENGTH_MAX as REFERENCE_LENGTH_MAX
from walletd.engine.holds import is_derived_transfer_id
from walletd.engine.model import (
    NO_METADATA,
    Metadata,
    MetadataPatch,
    OperationKind,
    WalletStatus,
    as_metadata,
)
from walletd.engine.money import (
    AMOUNT_MINOR_MAX,
    EDGE_SCALE_MIN,
    EXPONENT_MAX,
    Currency,
    format_minor,
)
from walletd.http.problems import FieldError, ProblemError, ValidationProblem
from walletd.http.settings import HttpSettings

__all__ = [
    "AMOUNT_UNITS_MAX",
    "DERIVED_KEY_SEPARATOR",
    "IDEMPOTENCY_KEY_LENGTH_MAX",
    "METADATA_KEY_PATTERN",
    "OPERATION_KINDS",
    "REFERENCE_LENGTH_MAX",
    "WALLET_ID_CACHE_ENTRIES_MAX",
    "WALLET_ID_MESSAGE",
    "WALLET_ID_PATTERN",
    "Amount",
    "HoldRequest",
    "OperationFields",
    "TransferRequest",
    "WalletChanges",
    "body_wallet_id",
    "derived_key",
    "is_idempotency_key",
    "loads_exact",
    "metadata_filter_problem",
    "operation_fields",
    "parse_amount",
    "parse_capture_body",
    "parse_create_body",
    "parse_empty_body",
    "parse_hold_body",
    "parse_idempotency_key",
    "parse_if_match",
    "parse_json_object",
    "parse_metadata",
    "parse_operation_body",
    "parse_reference",
    "parse_transfer_body",
    "parse_update_body",
    "parse_wallet_id",
    "path_id",
    "path_wallet_id",
    "read_body",
    "read_json_object",
    "require_json_content_type",
    "shown_key",
]

IDEMPOTENCY_KEY_LENGTH_MAX: Final = KEY_LENGTH_MAX
# The unit separator (0x1F): in keys walletd makes (bulk items' derived keys, transfer legs,
# hold rows), never in a client's, which is printable ASCII.
DERIVED_KEY_SEPARATOR: Final = "\x1f"
# The one spelling of a wallet id: canonical 8-4-4-4-12 hex, either case. A proxy routes by
# the id as written (docs/ARCHITECTURE.md), so every other form UUID() would take (urn:uuid:,
# braces, no hyphens, percent-encoded) is refused rather than given a second spelling.
# http/openapi.yaml states this same pattern (tests/test_docs_page.py checks they agree).
WALLET_ID_PATTERN: Final = (
    r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
)
_WALLET_ID: Final = re.compile(WALLET_ID_PATTERN.strip("^$"))
# The wallet routes' path up to the id (routes_v1.py's PREFIX + "/wallets/"), and the scheme
# and authority in front of it in an absolute-form request target (RFC 9112 3.2.2).
_WALLETS_PATH: Final = "/api/v1/wallets/"
_ABSOLUTE_FORM: Final = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*")
WALLET_ID_MESSAGE: Final = "must be a UUID in the canonical 8-4-4-4-12 hex form"
WALLET_ID_CACHE_ENTRIES_MAX: Final = 16384
_DECIMAL_STRING: Final = re.compile(r"[0-9]+(\.[0-9]+)?")
_LONE_SURROGATE: Final = re.compile("[\ud800-\udfff]")
# The kinds a client may send (transfer legs are the engine's own).
OPERATION_KINDS: Final = {"DEPOSIT": OperationKind.DEPOSIT, "WITHDRAW": OperationKind.WITHDRAW}
_OPERATION_FIELDS: Final = frozenset(
    {"operation_type", "operationType", "amount", "reference", "metadata"}
)
# The edge does not know the wallet's currency: it takes what some currency can hold (up to
# AMOUNT_MINOR_MAX units of a zero-decimal one, up to EXPONENT_MAX decimals), and the
# wallet's shard checks the amount against its own currency (AMOUNT_NOT_IN_CURRENCY, 422).
AMOUNT_UNITS_MAX: Final = AMOUNT_MINOR_MAX
_AMOUNT_MAX_TEXT: Final = str(AMOUNT_UNITS_MAX)
# Past this many units (10^15, above any valid amount) a number is refused before any
# arithmetic, so exponent tricks such as 1e999999999 cost nothing.
_AMOUNT_ADJUSTED_EXPONENT_MAX: Final = 15
_FRACTION_DIGITS_MAX: Final = EXPONENT_MAX
_SCALED_MAX: Final = tuple(AMOUNT_UNITS_MAX * 10**n for n in range(EXPONENT_MAX + 1))
_PLAIN_DECIMAL: Final = re.compile(r"([0-9]{1,15})(?:\.([0-9]{1,2}))?")


class Amount(NamedTuple):
    """An amount as the client wrote it: ``value`` / 10^``scale``, exactly; ``scale`` is
    at least EDGE_SCALE_MIN (so for a two-decimal wallet ``value`` is in minor units) and
    no more than needed beyond it (trailing zeros dropped: one amount, one spelling)."""

    value: int
    scale: int

    def text(self, currency: Currency | None = None) -> str:
        """The amount rendered in ``currency``'s decimals when it has them exactly, else as
        written."""
        if currency is not None and self.scale >= currency.exponent:
            step = 10 ** (self.scale - currency.exponent)
            if self.value % step == 0:
                return format_minor(self.value // step, currency.exponent)
        return format_minor(self.value, self.scale)


_CREATE_FIELDS: Final = frozenset({"id", "currency", "metadata"})
_TRANSFER_FIELDS: Final = frozenset(
    {"id", "from_wallet_id", "to_wallet_id", "amount", "reference", "metadata"}
)
# A client's own text for reconciliation: any characters but the C0/C1 controls (the
# OpenAPI document states this same pattern).
REFERENCE_PATTERN: Final = "^[^\\x00-\\x1f\\x7f-\\x9f]{1,255}$"
_REFERENCE: Final = re.compile(REFERENCE_PATTERN.strip("^$"))
# A metadata key: no control characters, and no square brackets (a listing filters by
# ``metadata[key]=value``, where a bracket in the key could not be written). A value is any
# text but NUL, which PostgreSQL's jsonb cannot hold. The OpenAPI document states both.
METADATA_KEY_PATTERN: Final = f"^[^\\x00-\\x1f\\x7f-\\x9f\\[\\]]{{1,{METADATA_KEY_LENGTH_MAX}}}$"
_METADATA_KEY: Final = re.compile(METADATA_KEY_PATTERN.strip("^$"))


class _NonFinite:
    """Stands for NaN/Infinity literals, which JSON does not allow but some clients send."""


class _NotCanonical(Exception):
    """A text that is not a canonical wallet id."""


def parse_wallet_id(text: str) -> UUID:
    """The wallet id written as ``text``, or 400 INVALID_WALLET_ID unless it is canonical."""
    try:
        return _wallet_uuid(text)
    except _NotCanonical:
        raise ProblemError(
            400, "INVALID_WALLET_ID", f"{text[:64]!r} is not a canonical UUID"
        ) from None


@functools.lru_cache(maxsize=WALLET_ID_CACHE_ENTRIES_MAX)
def _wallet_uuid(text: str) -> UUID:
    # Busy wallets are named again and again; UUID() is ~2 us of Python, a cache hit ~0.1 us.
    # lru_cache keeps results, never exceptions: only canonical texts (36 characters) are
    # stored, so junk ids neither grow the cache nor evict the busy ones.
    if len(text) != 36 or _WALLET_ID.fullmatch(text) is None:
        raise _NotCanonical
    return UUID(text)


def path_wallet_id(request: web.Request) -> UUID:
    """The wallet id of a /api/v1/wallets/{wallet_id} route, as the client wrote it.

    aiohttp routes on the decoded path, where ``%31`` is already ``1``; a proxy routes on the
    raw one. An id is served only when the raw request target holds exactly the routed text
    (so decoding changed nothing) and that text is canonical.
    """
    text = request.match_info["wallet_id"]
    if not _written_as_routed(request.raw_path, _WALLETS_PATH, text):
        raise ProblemError(
            400,
            "INVALID_WALLET_ID",
            f"{text[:64]!r} must be written as a canonical UUID, not percent-encoded",
        )
    return parse_wallet_id(text)


def path_id(request: web.Request, name: str, resource_path: str, code: str) -> UUID:
    """The id (of a hold, a transfer) in ``resource_path`` + ``{name}``, held to the wallet
    id's rules: the raw request target holds exactly the routed text, which is canonical
    (8-4-4-4-12 hex, either case); anything else is 400 ``code``. HAProxy hashes a hold id
    as written, so a second spelling would reach another shard's process."""
    text = request.match_info[name]
    if not _written_as_routed(request.raw_path, resource_path, text):
        raise ProblemError(
            400, code, f"{text[:64]!r} must be written as a canonical UUID, not percent-encoded"
        )
    if len(text) != 36 or _WALLET_ID.fullmatch(text) is None:
        raise ProblemError(400, code, f"{text[:64]!r} is not a canonical UUID")
    return UUID(text)


def _written_as_routed(target: str, resource_path: str, text: str) -> bool:
    """Whether the raw request target's id segment (after ``resource_path``) is ``text``."""
    start = 0
    if not target.startswith(resource_path):  # absolute form: scheme://authority/path
        authority = _ABSOLUTE_FORM.match(target)
        if authority is None or not target.startswith(resource_path, authority.end()):
            return False
        start = authority.end()
    start += len(resource_path)
    end = start + len(text)
    return target.startswith(text, start) and (len(target) == end or target[end] in "/?#")


def require_json_content_type(request: web.Request) -> None:
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
    request: web.Request, settings: HttpSettings, *, optional: bool = False
) -> tuple[dict[str, Any], bytes]:
    """The body as a JSON object, and its raw bytes; 415/413/408/400 as the contract says.

    With ``optional``, an empty body is an empty object and needs no Content-Type.
    """
    if optional and not request.body_exists:
        return {}, b""
    length = request.content_length
    # Refused from the header alone, before reading; aiohttp's client_max_size (set to the
    # same limit) stops a body without Content-Length while it streams in.
    if length is not None and length > settings.body_bytes_max:
        raise ProblemError(413, "PAYLOAD_TOO_LARGE", "request body is larger than the limit")
    require_json_content_type(request)
    raw = await read_body(request, settings.body_read_timeout_s)
    if optional and not raw.strip():
        return {}, raw
    return parse_json_object(raw), raw


async def read_body(request: web.Request, timeout_s: float) -> bytes:
    """The whole body, or 408 when it has not arrived ``timeout_s`` after reading began.

    A client that trickles its body would otherwise hold a handler (and its memory) for as
    long as it likes. A small body usually came with the headers: then no timer is armed.
    """
    if request.content.is_eof():
        return await request.read()
    try:
        async with asyncio.timeout(timeout_s):
            return await request.read()
    except TimeoutError:
        raise ProblemError(
            408, "REQUEST_TIMEOUT", f"the request body did not arrive within {timeout_s:g} s"
        ) from None


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
        if _holds_lone_surrogate(value):
            # orjson refuses these; the standard library passes them through as text that
            # cannot be encoded again (nor stored, nor echoed in an error): not Unicode.
            raise ProblemError(
                400, "INVALID_JSON", "the body holds a lone surrogate (\\uD800-\\uDFFF)"
            ) from None
    if not isinstance(value, dict):
        raise ProblemError(400, "INVALID_JSON", "the body must be a JSON object")
    return value


def _holds_lone_surrogate(value: Any) -> bool:
    """Whether any name or string in a parsed JSON value holds a lone UTF-16 surrogate."""
    pending = [value]  # bounded by the body size: one entry per value read from it
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            if _LONE_SURROGATE.search(item):
                return True
        elif isinstance(item, dict):
            pending.extend(item)
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return False


def loads_exact(raw: bytes) -> Any:
    """JSON with every fractional number as the exact ``Decimal`` the client wrote, and
    NaN/Infinity literals kept as markers that ``parse_amount`` refuses; raises ValueError,
    also for a lone surrogate (not Unicode: it could not be stored or echoed)."""
    value = json.loads(raw, parse_float=Decimal, parse_constant=lambda _n: _NonFinite())
    if _holds_lone_surrogate(value):
        raise ValueError("the JSON holds a lone surrogate")
    return value


def _exact_number(raw_body: bytes, field: str) -> Decimal | None:
    """The exact decimal the client wrote for a float field, read again from the body."""
    try:
        exact = loads_exact(raw_body)
    except (ValueError, RecursionError):
        return None
    value = exact.get(field) if isinstance(exact, dict) else None
    if isinstance(value, Decimal):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return Decimal(value)
    return None


def parse_amount(value: Any, raw_body: bytes, field: str = "amount") -> Amount | FieldError:
    """The exact ``Amount`` of a JSON number (an int, a float re-read exactly from
    ``raw_body``, or a ``Decimal`` from ``loads_exact``) or a decimal string, or the
    field's error."""
    if type(value) is int and 0 < value <= AMOUNT_UNITS_MAX:  # the common cases, quickly
        return Amount(value * 100, EDGE_SCALE_MIN)
    if type(value) is str and (plain := _PLAIN_DECIMAL.fullmatch(value)) is not None:
        units, cents = plain.groups()
        minor = int(units) * 100 + (int(cents.ljust(2, "0")) if cents else 0)
        if 0 < minor <= _SCALED_MAX[EDGE_SCALE_MIN]:
            return Amount(minor, EDGE_SCALE_MIN)
    if isinstance(value, bool) or value is None or isinstance(value, _NonFinite):
        return _amount_error(field, "must be a number or a decimal string")
    if isinstance(value, int):
        decimal = Decimal(value)
    elif isinstance(value, float):
        exact = _exact_number(raw_body, field)
        if exact is None:
            return _amount_error(field, "must be a finite decimal number")
        decimal = exact
    elif isinstance(value, Decimal):  # read by loads_exact
        decimal = value
    elif isinstance(value, str):
        if not _DECIMAL_STRING.fullmatch(value):
            return _amount_error(field, 'must be a decimal string like "10.50"')
        decimal = Decimal(value)
    else:
        return _amount_error(field, "must be a number or a decimal string")
    return _to_minor(decimal, field)


def _amount_error(field: str, message: str) -> FieldError:
    return {"field": field, "message": message}


def _to_minor(decimal: Decimal, field: str) -> Amount | FieldError:
    """The ``Amount`` of an exact decimal, with integer arithmetic only.

    Decimal arithmetic rounds to its context's 28 digits, so ``10.009999999999999999999999999
    * 100`` would come out as 1001: here the digits themselves decide, and a non-zero digit
    past the eighteenth decimal is refused however it was written (past the wallet's
    currency's, by the wallet's shard).
    """
    if not decimal.is_finite():
        return _amount_error(field, "must be finite")
    if decimal.is_signed() or decimal.is_zero():
        return _amount_error(field, "must be greater than 0")
    if decimal.adjusted() > _AMOUNT_ADJUSTED_EXPONENT_MAX:
        return _amount_error(field, f"must be at most {_AMOUNT_MAX_TEXT}")
    _sign, digits, exponent = decimal.as_tuple()
    assert isinstance(exponent, int)  # finite, checked above
    # value = coefficient * 10^exponent. Trailing zeros of the coefficient say nothing:
    # dropped (one spelling per amount), then -exponent is the decimals it really has.
    kept = len(digits)
    while kept > 1 and digits[kept - 1] == 0:
        kept -= 1
    exponent += len(digits) - kept
    scale = max(-exponent, EDGE_SCALE_MIN)
    if scale > _FRACTION_DIGITS_MAX:
        return _amount_error(field, f"must have at most {_FRACTION_DIGITS_MAX} fractional digits")
    # At most 34 digits are left (adjusted <= 15, 18 decimals), inside int()'s digit limit.
    value: int = int("".join(map(str, digits[:kept])) or "0") * 10 ** (scale + exponent)
    if value > _SCALED_MAX[scale]:
        return _amount_error(field, f"must be at most {_AMOUNT_MAX_TEXT}")
    return Amount(value, scale)


class OperationFields(NamedTuple):
    """An operation body's fields as read: the kind and amount when valid, and the errors."""

    kind: OperationKind | None
    amount: Amount | None
    unknown: list[FieldError]  # names not in the allowed set
    errors: list[FieldError]  # operation_type / operationType / amount / reference / metadata
    reference: str | None = None
    metadata: Metadata = NO_METADATA


def operation_fields(
    body: dict[str, Any], raw: bytes, allowed: frozenset[str] = _OPERATION_FIELDS
) -> OperationFields:
    """The money rules of an operation body, shared by the single endpoint and bulk items."""
    unknown: list[FieldError] = [
        {"field": str(name)[:64], "message": "unknown field"}
        for name in body
        if name not in allowed
    ]
    errors: list[FieldError] = []
    kind_text = body.get("operation_type", body.get("operationType"))
    if "operation_type" in body and "operationType" in body:
        errors.append(
            {"field": "operationType", "message": "give operation_type or operationType, not both"}
        )
    kind = OPERATION_KINDS.get(kind_text) if isinstance(kind_text, str) else None
    if kind is None:
        message = "is required" if kind_text is None else "must be DEPOSIT or WITHDRAW"
        errors.append({"field": "operation_type", "message": message})
    amount: Amount | None = None
    if "amount" not in body:
        errors.append({"field": "amount", "message": "is required"})
    else:
        parsed = parse_amount(body["amount"], raw)
        if isinstance(parsed, dict):
            errors.append(parsed)
        else:
            amount = parsed
    reference = parse_reference(body, errors)
    metadata = parse_metadata(body, errors)
    return OperationFields(kind, amount, unknown, errors, reference, metadata)


def parse_reference(body: dict[str, Any], errors: list[FieldError]) -> str | None:
    """The optional client ``reference`` (1..255 characters, no control characters); an
    error is added to ``errors`` when it is there and invalid."""
    reference = body.get("reference")
    if reference is not None and not (
        isinstance(reference, str) and _REFERENCE.fullmatch(reference)
    ):
        errors.append(
            {
                "field": "reference",
                "message": f"must be 1 to {REFERENCE_LENGTH_MAX} characters, no control characters",
            }
        )
        return None
    return reference


def parse_metadata(body: dict[str, Any], errors: list[FieldError]) -> Metadata:
    """The optional ``metadata`` object (docs/API.md, "Metadata"): at most
    ``METADATA_KEYS_MAX`` keys, each 1 to ``METADATA_KEY_LENGTH_MAX`` characters (no control
    characters, no square brackets), each value a string of at most
    ``METADATA_VALUE_LENGTH_MAX`` characters (no NUL). Null or ``{}`` is none. Errors are
    added to ``errors``, naming the key (``metadata.<key>``)."""
    pairs = _metadata_pairs(body, errors, METADATA_KEYS_MAX, deletes=False)
    return as_metadata({key: value for key, value in pairs if value is not None})


def parse_metadata_patch(body: dict[str, Any], errors: list[FieldError]) -> MetadataPatch | None:
    """A PATCH's ``metadata``: as ``parse_metadata`` reads it, but a null value deletes its
    key, and it may name up to ``METADATA_PATCH_KEYS_MAX`` keys (a whole replacement: the
    merge is bounded by the wallet's shard). None when absent; null or ``{}`` is 422 (a
    change names a key: the OpenAPI document says so, and a client that sends none most
    likely meant something else)."""
    value = body.get("metadata")
    if value is None or value == {}:
        if "metadata" in body:
            errors.append(
                {"field": "metadata", "message": "must be an object naming at least one key"}
            )
        return None
    pairs = _metadata_pairs(body, errors, METADATA_PATCH_KEYS_MAX, deletes=True)
    return tuple(sorted(pairs))


def _metadata_pairs(
    body: dict[str, Any], errors: list[FieldError], keys_max: int, *, deletes: bool
) -> list[tuple[str, str | None]]:
    """The pairs of a ``metadata`` object within the bounds (a None value only with
    ``deletes``), or none with the errors added."""
    value = body.get("metadata")
    if value is None:
        return []
    if type(value) is not dict:
        errors.append({"field": "metadata", "message": "must be an object of strings"})
        return []
    found: list[FieldError] = []
    if len(value) > keys_max:
        found.append({"field": "metadata", "message": f"must have at most {keys_max} keys"})
    for key, text in value.items():
        field = f"metadata.{key[:64]}"
        if not _METADATA_KEY.fullmatch(key):
            found.append(
                {
                    "field": field,
                    "message": f"a key must be 1 to {METADATA_KEY_LENGTH_MAX} characters, no "
                    "control characters or square brackets",
                }
            )
        elif text is None and deletes:
            pass
        elif type(text) is not str:
            found.append(
                {"field": field, "message": "must be a string or null" if deletes else
                 "must be a string"}
            )  # fmt: skip
        elif len(text) > METADATA_VALUE_LENGTH_MAX or "\x00" in text:
            found.append(
                {
                    "field": field,
                    "message": f"must be at most {METADATA_VALUE_LENGTH_MAX} characters, no NUL",
                }
            )
        if len(found) >= _METADATA_ERRORS_MAX:  # one answer stays small
            break
    if found:
        errors.extend(found)
        return []
    return list(value.items())


def metadata_filter_problem(key: str, value: str) -> str | None:
    """Why a listing's ``metadata[<key>]=<value>`` names no metadata a wallet can hold (the
    bounds of ``parse_metadata``), or None."""
    if not _METADATA_KEY.fullmatch(key):
        return (
            f"the key must be 1 to {METADATA_KEY_LENGTH_MAX} characters, no control characters"
            " or square brackets"
        )
    if len(value) > METADATA_VALUE_LENGTH_MAX or "\x00" in value:
        return f"must be at most {METADATA_VALUE_LENGTH_MAX} characters, no NUL"
    return None


# The per-key errors one answer lists, at most (a body may hold thousands of bad keys).
_METADATA_ERRORS_MAX: Final = 10


def parse_operation_body(
    body: dict[str, Any], raw: bytes
) -> tuple[OperationKind, Amount, str | None, Metadata]:
    kind, amount, unknown, errors, reference, metadata = operation_fields(body, raw)
    if unknown or errors:
        raise ValidationProblem(unknown + errors)
    assert kind is not None
    assert amount is not None
    return kind, amount, reference, metadata


_HOLD_FIELDS: Final = frozenset({"amount", "expires_in_s", "reference", "metadata"})
_CAPTURE_FIELDS: Final = frozenset({"amount", "to_wallet_id"})


class HoldRequest(NamedTuple):
    amount: Amount
    expires_in_s: int | None
    reference: str | None
    metadata: Metadata = NO_METADATA


def parse_hold_body(body: dict[str, Any], raw: bytes, expires_in_s_max: int) -> HoldRequest:
    """``{"amount", "expires_in_s"?, "reference"?}``: the amount as for operations,
    ``expires_in_s`` a whole number of seconds from 1 to ``expires_in_s_max``."""
    errors: list[FieldError] = [
        {"field": str(name)[:64], "message": "unknown field"}
        for name in body
        if name not in _HOLD_FIELDS
    ]
    amount: Amount | FieldError = Amount(0, EDGE_SCALE_MIN)
    if "amount" not in body:
        errors.append({"field": "amount", "message": "is required"})
    else:
        amount = parse_amount(body["amount"], raw)
        if isinstance(amount, dict):
            errors.append(amount)
    expires_in_s = body.get("expires_in_s")
    if type(expires_in_s) is float and expires_in_s.is_integer():
        expires_in_s = int(expires_in_s)  # 64.0 is an integer to JSON Schema too
    if expires_in_s is not None and not (
        type(expires_in_s) is int and 1 <= expires_in_s <= expires_in_s_max
    ):
        errors.append(
            {"field": "expires_in_s", "message": f"must be an integer from 1 to {expires_in_s_max}"}
        )
    reference = parse_reference(body, errors)
    metadata = parse_metadata(body, errors)
    if errors:
        raise ValidationProblem(errors)
    assert isinstance(amount, Amount)
    return HoldRequest(amount, expires_in_s, reference, metadata)


def parse_capture_body(body: dict[str, Any], raw: bytes) -> tuple[Amount | None, UUID | None]:
    """``{"amount"?, "to_wallet_id"?}``: the amount to capture (as for operations), None for
    all of it; the wallet to move it into, None to take it out of the system."""
    errors: list[FieldError] = [
        {"field": str(name)[:64], "message": "unknown field"}
        for name in body
        if name not in _CAPTURE_FIELDS
    ]
    amount: Amount | FieldError | None = None
    if "amount" in body:
        amount = parse_amount(body["amount"], raw)
        if isinstance(amount, dict):
            errors.append(amount)
    to_wallet_id = _body_uuid(body, "to_wallet_id", errors) if "to_wallet_id" in body else None
    if errors:
        raise ValidationProblem(errors)
    assert amount is None or isinstance(amount, Amount)
    return amount, to_wallet_id


def parse_empty_body(body: dict[str, Any]) -> None:
    """A body that must hold no field (void): any field is unknown."""
    if body:
        raise ValidationProblem(
            [{"field": str(name)[:64], "message": "unknown field"} for name in body]
        )


def is_idempotency_key(value: Any) -> bool:
    """1 to ``IDEMPOTENCY_KEY_LENGTH_MAX`` printable ASCII characters (so never the unit
    separator, which keys of walletd's own making hold: ``derived_key``, transfer legs)."""
    return (
        isinstance(value, str)
        and 1 <= len(value) <= IDEMPOTENCY_KEY_LENGTH_MAX
        and value.isascii()
        and value.isprintable()
    )


def derived_key(request_key: str, index: int) -> str:
    """The key of item ``index`` of a bulk request keyed ``request_key`` that has none of its
    own: ``<request key><US><index>``. No client key holds US, so none is ever a derived key;
    a derived key never starts with US, so it is never a transfer leg's or a hold row's key
    (``<US>KIND:<id>``, engine/commands.py)."""
    return f"{request_key}{DERIVED_KEY_SEPARATOR}{index}"


def shown_key(stored: str | None) -> str | None:
    """A stored operation key as the history and the feed show it: a derived key reads
    ``<request key>/<index>`` (a key in an answer is printable ASCII; only storage tells it
    from a client's key ``R/0``)."""
    if stored is None or DERIVED_KEY_SEPARATOR not in stored:
        return stored
    return stored.replace(DERIVED_KEY_SEPARATOR, "/")


def body_wallet_id(value: Any) -> UUID | None:
    """The wallet id a JSON body names, or None unless it is a canonical id string."""
    if type(value) is str and len(value) == 36 and _WALLET_ID.fullmatch(value):
        return _wallet_uuid(value)
    return None


def parse_create_body(
    body: dict[str, Any], currencies: Mapping[str, Currency] | None = None
) -> tuple[UUID | None, Currency | None, Metadata]:
    """``{"id"?, "currency"?, "metadata"?}``: the chosen id (None: walletd picks one), the
    currency (None: the default one) named by a code ``currencies`` holds
    (http/currencies.py), and the metadata."""
    errors: list[FieldError] = []
    wallet_id: UUID | None = None
    currency: Currency | None = None
    for name in body:
        if name not in _CREATE_FIELDS:
            errors.append({"field": str(name)[:64], "message": "unknown field"})
    if "id" in body:
        wallet_id = body_wallet_id(body["id"])
        if wallet_id is None:
            errors.append({"field": "id", "message": WALLET_ID_MESSAGE})
    if "currency" in body:
        code = body["currency"]
        currency = currencies.get(code) if type(code) is str and currencies else None
        if currency is None:
            errors.append(
                {"field": "currency", "message": "must be an ISO 4217 code or a declared asset"}
            )
    metadata = parse_metadata(body, errors)
    if errors:
        raise ValidationProblem(errors)
    return wallet_id, currency, metadata


class TransferRequest(NamedTuple):
    transfer_id: UUID | None
    from_wallet_id: UUID
    to_wallet_id: UUID
    amount: Amount
    reference: str | None
    metadata: Metadata = NO_METADATA


def _body_uuid(body: dict[str, Any], name: str, errors: list[FieldError]) -> UUID | None:
    value = body.get(name)
    found = body_wallet_id(value)  # one canonical spelling, as for wallet ids
    if found is None:
        message = "is required" if value is None else WALLET_ID_MESSAGE
        errors.append({"field": name, "message": message})
    return found


def parse_transfer_body(body: dict[str, Any], raw: bytes) -> TransferRequest:
    errors: list[FieldError] = []
    for name in body:
        if name not in _TRANSFER_FIELDS:
            errors.append({"field": str(name)[:64], "message": "unknown field"})
    transfer_id = _body_uuid(body, "id", errors) if "id" in body else None
    if transfer_id is not None and is_derived_transfer_id(transfer_id):
        # Reserved to the ids walletd derives (engine/holds.py): a client that took one
        # first could block the capture that derives it.
        errors.append({"field": "id", "message": "must not be a version 8 UUID (reserved)"})
    from_wallet_id = _body_uuid(body, "from_wallet_id", errors)
    to_wallet_id = _body_uuid(body, "to_wallet_id", errors)
    if from_wallet_id is not None and from_wallet_id == to_wallet_id:
        errors.append({"field": "to_wallet_id", "message": "must differ from from_wallet_id"})
    amount: Amount | FieldError = Amount(0, EDGE_SCALE_MIN)
    if "amount" not in body:
        errors.append({"field": "amount", "message": "is required"})
    else:
        amount = parse_amount(body["amount"], raw)
        if isinstance(amount, dict):
            errors.append(amount)
    reference = parse_reference(body, errors)
    metadata = parse_metadata(body, errors)
    if errors:
        raise ValidationProblem(errors)
    assert from_wallet_id is not None
    assert to_wallet_id is not None
    assert isinstance(amount, Amount)
    return TransferRequest(transfer_id, from_wallet_id, to_wallet_id, amount, reference, metadata)


# -- refunds and reversals (docs/API.md, "Refunds and reversals") ---------------------------

_REFUND_FIELDS: Final = frozenset({"amount", "reason", "metadata"})
_REVERSAL_FIELDS: Final = frozenset({"reason", "metadata"})


def _parse_reason(body: dict[str, Any], errors: list[FieldError]) -> str | None:
    """The optional ``reason``: the rules of a ``reference`` (it is stored as the refund's
    or reversal's reference)."""
    if "reason" not in body:
        return None
    found: list[FieldError] = []
    reason = parse_reference({"reference": body["reason"]}, found)
    errors.extend({"field": "reason", "message": error["message"]} for error in found)
    return reason


def parse_refund_body(
    body: dict[str, Any], raw: bytes
) -> tuple[Amount | None, str | None, Metadata]:
    """``{"amount"?, "reason"?, "metadata"?}``: the amount to refund (None: what is left),
    why, and the refund's metadata."""
    errors: list[FieldError] = [
        {"field": str(name)[:64], "message": "unknown field"}
        for name in body
        if name not in _REFUND_FIELDS
    ]
    amount: Amount | FieldError | None = None
    if "amount" in body:
        amount = parse_amount(body["amount"], raw)
        if isinstance(amount, dict):
            errors.append(amount)
    reason = _parse_reason(body, errors)
    metadata = parse_metadata(body, errors)
    if errors:
        raise ValidationProblem(errors)
    assert amount is None or isinstance(amount, Amount)
    return amount, reason, metadata


def parse_reversal_body(body: dict[str, Any]) -> tuple[str | None, Metadata]:
    """``{"reason"?, "metadata"?}`` (an empty or absent body: neither)."""
    errors: list[FieldError] = [
        {"field": str(name)[:64], "message": "unknown field"}
        for name in body
        if name not in _REVERSAL_FIELDS
    ]
    reason = _parse_reason(body, errors)
    metadata = parse_metadata(body, errors)
    if errors:
        raise ValidationProblem(errors)
    return reason, metadata


def require_idempotency_key(request: web.Request) -> str:
    """The Idempotency-Key a refund or reversal must carry (422 without one): the refund's
    id and the reversal's log key are derived from it, so a retry finds the first answer."""
    key = parse_idempotency_key(request)
    if key is None:
        raise ValidationProblem([{"field": "Idempotency-Key", "message": "is required"}])
    return key


def parse_idempotency_key(request: web.Request) -> str | None:
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not is_idempotency_key(key):
        raise ValidationProblem(
            [
                {
                    "field": "Idempotency-Key",
                    "message": "must be 1 to 255 printable ASCII characters",
                }
            ]
        )
    return key


# -- PATCH /api/v1/wallets/{id} ------------------------------------------------------------

# What a PATCH may change.
_UPDATE_FIELDS: Final = frozenset({"status", "overdraft_limit", "metadata"})
_STATUSES: Final = {status.name: status for status in WalletStatus}
_STATUSES_MESSAGE: Final = "must be one of " + ", ".join(_STATUSES)
# One strong entity tag: the wallet's seq in double quotes, as the ETag header sends it.
_ENTITY_TAG: Final = re.compile(r'"(0|[1-9][0-9]{0,17})"')


class WalletChanges(NamedTuple):
    """A PATCH body read: each field None when absent (unchanged). ``fingerprint`` says
    what the request was, in a canonical text stored with its log row (a retry under the
    same Idempotency-Key must send the same changes)."""

    status: WalletStatus | None
    # As the client wrote it: the wallet's shard holds it to the wallet's currency.
    overdraft_limit: Amount | None
    fingerprint: str
    # Merged into the wallet's by its shard (a None value deletes its key).
    metadata: MetadataPatch | None = None


def _parse_limit(value: Any, raw: bytes) -> Amount | FieldError:
    """An overdraft limit: an amount as for operations (what some currency can hold; the
    wallet's shard then holds it to the wallet's currency), or zero."""
    if (isinstance(value, int | float) and not isinstance(value, bool) and value == 0) or (
        isinstance(value, str) and _DECIMAL_STRING.fullmatch(value) and Decimal(value) == 0
    ):
        return Amount(0, EDGE_SCALE_MIN)
    return parse_amount(value, raw, "overdraft_limit")


def parse_update_body(body: dict[str, Any], raw: bytes) -> WalletChanges:
    """``{"status"?, "overdraft_limit"?, "metadata"?}``, at least one change (a metadata
    object naming at least one key); unknown fields are 422."""
    errors: list[FieldError] = [
        {"field": str(name)[:64], "message": "unknown field"}
        for name in body
        if name not in _UPDATE_FIELDS
    ]
    status: WalletStatus | None = None
    if "status" in body:
        text = body["status"]
        found = _STATUSES.get(text) if isinstance(text, str) else None
        if found is None:
            errors.append({"field": "status", "message": _STATUSES_MESSAGE})
        status = found
    limit: Amount | FieldError | None = None
    if "overdraft_limit" in body:
        limit = _parse_limit(body["overdraft_limit"], raw)
        if isinstance(limit, dict):
            errors.append(limit)
    metadata = parse_metadata_patch(body, errors) if "metadata" in body else None
    if not errors and status is None and limit is None and not metadata:
        errors.append(
            {"field": "body", "message": "must change status, overdraft_limit or metadata"}
        )
    if errors:
        raise ValidationProblem(errors)
    assert limit is None or isinstance(limit, Amount)
    # The limit as value/10^scale, one spelling per amount (at the edge's scale, the minor
    # units of a two-decimal wallet: the fingerprints written before currencies).
    limit_text = (
        ""
        if limit is None
        else str(limit.value)
        if limit.scale == EDGE_SCALE_MIN
        else f"{limit.value}e-{limit.scale}"
    )
    fingerprint = (
        f"PATCH status={'' if status is None else status.name} overdraft_limit={limit_text}"
    )
    if metadata:
        # A digest: the change may be ~50 KB, the fingerprint is stored as the row's
        # reference (at most 255 characters). Absent without metadata, so the
        # fingerprints stored before metadata could change still replay.
        canonical = orjson.dumps([list(pair) for pair in metadata])
        fingerprint += f" metadata=sha256:{hashlib.sha256(canonical).hexdigest()}"
    return WalletChanges(status, limit, fingerprint, metadata or None)


def parse_if_match(request: web.Request) -> int | None:
    """The wallet seq an ``If-Match`` header asks for; None without one (or ``*``: any
    version of an existing wallet). Anything but one strong entity tag of a seq names no
    version of the wallet: 412."""
    text = request.headers.get("If-Match")
    if text is None:
        return None
    text = text.strip()
    if text == "*":
        return None
    match = _ENTITY_TAG.fullmatch(text)
    if match is None:
        raise ProblemError(
            412,
            "PRECONDITION_FAILED",
            'If-Match must be one entity tag as the ETag header gives it, such as "12"',
        )
    return int(match[1])
