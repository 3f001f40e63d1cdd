"""Listings: ``GET /api/v1/wallets``, ``/api/v1/transfers`` and ``/api/v1/holds``.

Each reads one page from storage through the read pool (``LogReader.list_page``; the
statements and indexes are persistence/listings.py's), never through a shard, so any
process answers any listing. A page::

    query ──parse: known parameters only, each once──▶ 422 VALIDATION_ERROR
      │  filters (each listing's FILTERS), since/until, limit, cursor
      ▼
    cursor ──not one this listing issued for these filters──▶ 422 (field "cursor")
      ▼
    one statement: at most limit + 1 rows (4 x that with a filter no index serves)
      ▼
    {"items": [...], "next_cursor": "<opaque>" | null}

A cursor is the position of the page's last row (created_at, id), with a check value over
that position, the listing and its filters (since and until included; not ``limit``): a
cursor is accepted only by the query that issued it, and one altered in transit is refused.
It is not signed with a secret: any position it can name, the ``until`` filter can name too,
so a forged one reaches nothing its query does not.
"""

from __future__ import annotations

import base64
import hashlib
import re
import struct
from collections.abc import Callable, Mapping
from typing import Final
from uuid import UUID

import orjson
from aiohttp import web
from multidict import MultiMapping

from walletd.engine.listings import (
    INSTANT_MAX_US,
    INSTANT_MIN_US,
    FilterValue,
    Listing,
    ListingItem,
    ListingPosition,
    ListingQuery,
)
from walletd.engine.model import (
    HoldRecord,
    HoldStatus,
    TransferRecord,
    TransferStatus,
    WalletStatus,
)
from walletd.http.currencies import ASSET_CODE_PATTERN
from walletd.http.instants import parse_instant_us
from walletd.http.keys import Scope, requires
from walletd.http.parsing import WALLET_ID_MESSAGE, body_wallet_id, metadata_filter_problem
from walletd.http.problems import FieldError, ValidationProblem
from walletd.http.responses import hold_body, transfer_body, wallet_body
from walletd.http.state import STATE_KEY

__all__ = [
    "CURSOR_LENGTH",
    "FILTERS",
    "LISTING_SCAN_ROWS_PER_ITEM",
    "decode_cursor",
    "encode_cursor",
    "parse_parameters",
    "routes",
]

PREFIX: Final = "/api/v1"
_JSON_HEADERS: Final = {"Content-Type": "application/json"}
# With a filter no index serves, a page reads at most this many rows per item asked for
# (persistence/listings.py): it may then hold fewer items, and its cursor goes on.
LISTING_SCAN_ROWS_PER_ITEM: Final = 4
# Enough digits for any valid limit, few enough that int() never meets Python's digit limit.
_LIMIT_DIGITS_MAX: Final = 6

# A cursor: version, created_at (µs, signed 64-bit), id (16 bytes), check (12 bytes), in
# unpadded URL-safe base64.
_CURSOR_VERSION: Final = 1
_CURSOR_LAYOUT: Final = struct.Struct(">Bq16s")
_CHECK_BYTES: Final = 12
_CURSOR_BYTES: Final = _CURSOR_LAYOUT.size + _CHECK_BYTES
CURSOR_LENGTH: Final = (_CURSOR_BYTES * 8 + 5) // 6
_CURSOR_MESSAGE: Final = "is not a cursor this listing issued for these filters"

_Parser = Callable[[str, str], FilterValue]


def _wallet_id(field: str, text: str) -> FilterValue:
    wallet_id = body_wallet_id(text)
    if wallet_id is None:
        raise ValidationProblem([{"field": field, "message": WALLET_ID_MESSAGE}])
    return wallet_id


def _status(names: Mapping[str, int]) -> _Parser:
    message = "must be one of " + ", ".join(names)

    def parse(field: str, text: str) -> FilterValue:
        status = names.get(text)
        if status is None:
            raise ValidationProblem([{"field": field, "message": message}])
        return status

    return parse


def _instant(field: str, text: str) -> FilterValue:
    return parse_instant_us(field, text)


_CURRENCY_CODE: Final = re.compile(ASSET_CODE_PATTERN.strip("^$"))


def _currency(field: str, text: str) -> FilterValue:
    """A currency code as a wallet shows it; a well-formed code no wallet has lists none."""
    if _CURRENCY_CODE.fullmatch(text) is None:
        raise ValidationProblem(
            [{"field": field, "message": f"must be a currency code ({ASSET_CODE_PATTERN})"}]
        )
    return text


def _metadata(field: str, text: str) -> FilterValue:
    """``metadata[<key>]=<value>``: the key and value within the bounds of metadata, as the
    jsonb object the wallet's metadata must contain."""
    key = field[len("metadata[") : -1]
    problem = metadata_filter_problem(key, text)
    if problem is not None:
        raise ValidationProblem([{"field": field, "message": problem}])
    return orjson.dumps({key: text}).decode()


# The filters each listing takes besides since/until, by query parameter; storage's table
# (persistence/listings.py LISTINGS) has the same names.
FILTERS: Final[Mapping[Listing, Mapping[str, _Parser]]] = {
    Listing.WALLETS: {
        "status": _status({s.name: int(s) for s in WalletStatus}),
        "currency": _currency,
        "metadata[]": _metadata,
    },
    Listing.TRANSFERS: {
        # The refunds of a transfer (docs/API.md, "Refunds"): any canonical id.
        "refund_of": _wallet_id,
        "wallet_id": _wallet_id,
        "status": _status({s.name: int(s) for s in TransferStatus}),
    },
    Listing.HOLDS: {
        "wallet_id": _wallet_id,
        "status": _status({s.name: int(s) for s in HoldStatus}),
        "expires_before": _instant,
    },
}
_PAGING: Final = frozenset({"limit", "cursor", "since", "until"})

routes = web.RouteTableDef()


@routes.get(PREFIX + "/wallets")
@requires(Scope.READ)
async def list_wallets(request: web.Request) -> web.Response:
    return await _list(request, Listing.WALLETS)


@routes.get(PREFIX + "/transfers")
@requires(Scope.READ)
async def list_transfers(request: web.Request) -> web.Response:
    return await _list(request, Listing.TRANSFERS)


@routes.get(PREFIX + "/holds")
@requires(Scope.READ)
async def list_holds(request: web.Request) -> web.Response:
    return await _list(request, Listing.HOLDS)


async def _list(request: web.Request, listing: Listing) -> web.Response:
    state = request.app[STATE_KEY]
    settings = state.settings
    values, filters = parse_parameters(request.query, FILTERS[listing])
    since, until = values.get("since"), values.get("until")
    since_us = None if since is None else parse_instant_us("since", since)
    until_us = None if until is None else parse_instant_us("until", until)
    limit = _parse_limit(values.get("limit"), settings.listing_limit_default,
                         settings.listing_limit_max)  # fmt: skip
    check = _query_check(listing, filters, since_us, until_us)
    cursor = values.get("cursor")
    after = None if cursor is None else decode_cursor(cursor, check)
    query = ListingQuery(
        listing, filters, since_us, until_us, after, limit,
        scan_max=(limit + 1) * LISTING_SCAN_ROWS_PER_ITEM,
    )  # fmt: skip
    page = await state.services.reader.list_page(query)
    next_cursor = None if page.next is None else encode_cursor(page.next, check)
    body = (
        b'{"items":['
        + b",".join(_item_json(item) for item in page.items)
        + b'],"next_cursor":'
        + orjson.dumps(next_cursor)
        + b"}"
    )
    return web.Response(body=body, headers=_JSON_HEADERS)


def parse_parameters(
    query: MultiMapping[str], parsers: Mapping[str, _Parser]
) -> tuple[dict[str, str], tuple[tuple[str, FilterValue], ...]]:
    """The paging parameters' texts, and the filters parsed (sorted by name); 422 for a
    parameter the listing does not take or one given twice.

    A filter declared as ``name[]`` takes one parameter ``name[<key>]`` (its parser gets the
    whole parameter name as ``field``, and says what a key may be), under the filter name
    ``name``: ``metadata[color]=red`` once wallets have metadata.
    """
    errors: list[FieldError] = []
    paging: dict[str, str] = {}
    chosen: dict[str, tuple[str, str, str]] = {}  # filter -> (parser, parameter, text)
    for name in dict.fromkeys(query):
        texts = query.getall(name)
        family, bracket, key = name.partition("[")
        keyed = family + "[]" if bracket and len(key) > 1 and key.endswith("]") else None
        if len(texts) > 1:
            errors.append({"field": name, "message": "may be given once"})
        elif name in _PAGING:
            paging[name] = texts[0]
        elif name in parsers and not name.endswith("[]"):
            chosen[name] = (name, name, texts[0])
        elif keyed is not None and keyed in parsers:
            if family in chosen:
                errors.append({"field": name, "message": f"one {family}[...] filter at most"})
            else:
                chosen[family] = (keyed, name, texts[0])
        else:
            errors.append({"field": name, "message": "is not a parameter of this listing"})
    if errors:
        raise ValidationProblem(errors)
    filters = tuple(
        (family, parsers[parser](parameter, text))
        for family, (parser, parameter, text) in sorted(chosen.items())
    )
    return paging, filters


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


def _item_json(item: ListingItem) -> bytes:
    if isinstance(item, TransferRecord):
        return orjson.dumps(transfer_body(item))
    if isinstance(item, HoldRecord):
        return orjson.dumps(hold_body(item))
    return wallet_body(item)


def _query_check(
    listing: Listing,
    filters: tuple[tuple[str, FilterValue], ...],
    since_us: int | None,
    until_us: int | None,
) -> bytes:
    """What a cursor is bound to: the listing and every filter of the query."""
    parts = [listing.value, f"since={since_us}", f"until={until_us}"]
    parts += [f"{name}={value}" for name, value in filters]
    return "\n".join(parts).encode()


def _check(payload: bytes, query_check: bytes) -> bytes:
    digest = hashlib.blake2b(digest_size=_CHECK_BYTES, person=b"walletd-cursor")
    digest.update(payload)
    digest.update(query_check)
    check: bytes = digest.digest()
    return check


def encode_cursor(position: ListingPosition, query_check: bytes) -> str:
    payload = _CURSOR_LAYOUT.pack(_CURSOR_VERSION, position.created_at_us, position.id.bytes)
    return _text(payload + _check(payload, query_check))


def decode_cursor(text: str, query_check: bytes) -> ListingPosition:
    """The position a cursor names, or 422 unless this query issued it."""
    if len(text) != CURSOR_LENGTH or not text.isascii():
        raise _bad_cursor()
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except ValueError:
        raise _bad_cursor() from None
    payload, check = raw[: _CURSOR_LAYOUT.size], raw[_CURSOR_LAYOUT.size :]
    # An unpadded text decodes from several spellings (unused low bits); only the one
    # encode_cursor writes is accepted, so a cursor has one text.
    if len(raw) != _CURSOR_BYTES or _text(raw) != text:
        raise _bad_cursor()
    version, created_at_us, id_bytes = _CURSOR_LAYOUT.unpack(payload)
    if version != _CURSOR_VERSION or check != _check(payload, query_check):
        raise _bad_cursor()
    # The check value is not secret: a made-up position must still be one storage can
    # compare with (else PostgreSQL's timestamp overflow would answer 503, not 422).
    if not INSTANT_MIN_US < created_at_us < INSTANT_MAX_US:
        raise _bad_cursor()
    return ListingPosition(created_at_us, UUID(bytes=id_bytes))


def _text(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def _bad_cursor() -> ValidationProblem:
    return ValidationProblem([{"field": "cursor", "message": _CURSOR_MESSAGE}])
