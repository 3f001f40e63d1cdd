"""Listings on PostgreSQL: one statement per page, a backward range scan of an index.

Each listing is a table, the columns its items are built from, and the filters it takes.
A filter is SQL on the table (alias ``r``) with ``{}`` where its value goes, and says
whether an index leads with its column, followed by (created_at, id) (migration
"listings"). The first such filter a query has *drives* the page: its predicate bounds the
index scan, so the page reads ``limit`` + 1 rows. Every other filter is checked on the rows
read (the ``matched`` column), which are then at most ``scan_max``: a page may hold fewer
items than asked for and still have a next one (the plain history does the same with its
``operation_type`` filter). A filter with several predicates (a transfer's wallet, on either
side) drives one scan per predicate, merged::

    (SELECT cols, matched FROM t r WHERE <drive 1> AND <created range> AND <keyset>
      ORDER BY r.created_at DESC, r.id DESC LIMIT n)
    UNION ALL (... <drive 2> ...)            ORDER BY created_at DESC, id DESC LIMIT n

Absent bounds are sent as instants no request can name (``BOTTOM_US``, ``TOP_US``), so a
listing has one statement per set of filters, whatever their values: prepared once per
connection, and planned for the index (tests/test_listings.py reads the plans on a table of
a million rows).

Adding a filter is one entry in ``LISTINGS`` (and, to drive pages, an index in a migration),
plus its parser at the edge (http/listings.py ``FILTERS``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final
from uuid import UUID

import asyncpg

from walletd.engine.listings import (
    INSTANT_MAX_US,
    INSTANT_MIN_US,
    Listing,
    ListingItem,
    ListingPage,
    ListingPosition,
    ListingQuery,
)
from walletd.engine.model import (
    HoldRecord,
    HoldStatus,
    TransferRecord,
    TransferStatus,
    WalletStatus,
    WalletView,
)
from walletd.engine.money import Currency, currency_of
from walletd.persistence.postgres_log import stored_metadata

__all__ = [
    "BOTTOM_US",
    "LISTINGS",
    "TOP_US",
    "ListingFilter",
    "listing_args",
    "listing_page",
    "listing_sql",
    "rows_to_read",
]

_MICROS: Final = "(extract(epoch FROM {0}) * 1000000)::bigint"
_AT: Final = "(timestamptz 'epoch' + {0} * interval '1 microsecond')"
BOTTOM_US: Final = INSTANT_MIN_US
TOP_US: Final = INSTANT_MAX_US
_TOP_ID: Final = UUID(int=2**128 - 1)
# $1 since, $2 until, $3-$4 the position to continue below, $5 rows to read; filters from $6.
_FIRST_FILTER_PARAMETER: Final = 6
_RANGE: Final = (
    f"r.created_at >= {_AT.format('$1::bigint')} AND r.created_at < {_AT.format('$2::bigint')}"
    f" AND (r.created_at, r.id) < ({_AT.format('$3::bigint')}, $4::uuid)"
)


@dataclass(frozen=True, slots=True)
class ListingFilter:
    """``predicates``: SQL with ``{}`` for the value (a row matches if any holds);
    ``cast``: the value's SQL type; ``indexed``: an index leads with it, then
    (created_at, id), one per predicate, so it can drive a page."""

    predicates: tuple[str, ...]
    cast: str
    indexed: bool

    def condition(self, placeholder: str) -> str:
        held = [p.replace("{}", placeholder) for p in self.predicates]
        return held[0] if len(held) == 1 else "(" + " OR ".join(held) + ")"


@dataclass(frozen=True, slots=True)
class _Table:
    name: str
    columns: str  # the item's columns, then created_at in microseconds, over alias r
    item: Callable[[asyncpg.Record], ListingItem]
    # In order of preference to drive a page (the more selective first).
    filters: Mapping[str, ListingFilter]
    # How a page with no driving filter is read: one scan per predicate, merged. A table
    # whose status index covers every status needs no (created_at, id) index of its own:
    # one scan per status, each at most a page, saves the index's entries on every write.
    undriven: tuple[str, ...] = ("true",)


def _columns(*names: str) -> str:
    return ", ".join(
        _MICROS.format(f"r.{name[:-3]}") if name.endswith("_us") else f"r.{name}" for name in names
    )


def _wallet(row: asyncpg.Record) -> WalletView:
    return WalletView(
        row[0], row[1], row[2], row[3], row[4], row[5], currency_of(row[9], row[10]),
        WalletStatus(row[6]), row[7], stored_metadata(row[8]),
    )  # fmt: skip


def _joined_currency(text: str | None) -> Currency | None:
    """A wallet's currency read as "<code>:<exponent>" (None: no such wallet)."""
    if text is None:
        return None
    code, _, exponent = text.partition(":")
    return currency_of(code, int(exponent))


def _transfer(row: asyncpg.Record) -> TransferRecord:
    return TransferRecord(
        row[0], row[1], row[2], row[3], row[4], TransferStatus(row[5]), row[6], row[7], row[8],
        currency=_joined_currency(row[10]), metadata=stored_metadata(row[9]),
        refund_of=row[11], refunded=int(row[12]), payment_id=row[13],
    )  # fmt: skip


def _hold(row: asyncpg.Record) -> HoldRecord:
    return HoldRecord(
        row[0], row[1], row[2], row[3], HoldStatus(row[4]), row[5], row[6], row[7], row[8],
        row[9], None, "", None, None, row[10], row[11], _joined_currency(row[13]),
        stored_metadata(row[12]),
    )  # fmt: skip


# An item's wallet's currency, as its GET reads it (persistence/postgres_log.py): one
# primary-key lookup per row the page reads.
_CURRENCY_OF: Final = "(SELECT w.currency || ':' || w.exponent FROM wallets w WHERE w.id = r.{})"


# A transfer's metadata is its debit row's and a hold's its HOLD row's (migration
# "metadata"), as GET reads them (persistence/postgres_log.py): one probe of the unique
# (wallet_id, idempotency_key) index per row the page reads.
def _row_metadata(wallet_column: str, kind: str) -> str:
    return (
        f"(SELECT o.metadata FROM wallet_operations o WHERE o.wallet_id = r.{wallet_column}"
        f" AND o.idempotency_key = chr(31) || '{kind}:' || r.id::text)"
    )


_TRANSFER_COLUMNS: Final = _columns(
    "id", "from_wallet_id", "to_wallet_id", "amount", "reference", "status", "failure_code",
    "created_at_us", "updated_at_us",
) + ", " + _row_metadata("from_wallet_id", "TRANSFER_OUT") + ", " + _CURRENCY_OF.format(
    "from_wallet_id"
) + (
    ", r.refund_of, (SELECT coalesce(sum(f.amount), 0) FROM transfers f"
    " WHERE f.refund_of = r.id AND f.status <> 3)"
    # A payment's posting names its payment (one probe of payment_postings' primary key).
    ", (SELECT pp.payment_id FROM payment_postings pp WHERE pp.transfer_id = r.id)"
)  # fmt: skip
_WALLET_COLUMNS: Final = _columns(
    "id", "balance", "seq", "created_at_us", "updated_at_us", "held", "status",
    "overdraft_limit", "metadata", "currency", "exponent",
)  # fmt: skip
_HOLD_COLUMNS: Final = _columns(
    "id", "wallet_id", "shard", "amount", "status", "expires_at_us", "captured",
    "to_wallet_id", "transfer_id", "reference", "created_at_us", "updated_at_us",
) + ", " + _row_metadata("wallet_id", "HOLD") + ", " + _CURRENCY_OF.format("wallet_id")  # fmt: skip
LISTINGS: Final[Mapping[Listing, _Table]] = {
    Listing.WALLETS: _Table(
        "wallets",
        _WALLET_COLUMNS,
        _wallet,
        {
            # Both indexed (migration "wallet_metadata_changes_and_filters"); with both, the
            # status drives (a FROZEN or CLOSED page is the usual ask) and the currency is
            # checked on the rows read.
            "status": ListingFilter(("r.status = {}",), "smallint", indexed=True),
            "currency": ListingFilter(("r.currency = {}",), "text", indexed=True),
            # One key's value, as a jsonb object {"key": "value"}: no index (a GIN index
            # would serve containment, not a page in (created_at, id) order), so it is
            # checked on the bounded rows a page reads, like the holds' expires_before.
            "metadata": ListingFilter(("r.metadata @> {}",), "jsonb", indexed=False),
        },
    ),
    Listing.TRANSFERS: _Table(
        "transfers",
        _TRANSFER_COLUMNS,
        _transfer,
        {
            # The refunds of a transfer (index transfers_refunds, migration
            # "refunds_and_reversals"): the most selective, so it drives when given.
            "refund_of": ListingFilter(("r.refund_of = {}",), "uuid", indexed=True),
            "wallet_id": ListingFilter(
                ("r.from_wallet_id = {}", "r.to_wallet_id = {}"), "uuid", indexed=True
            ),
            "status": ListingFilter(("r.status = {}",), "smallint", indexed=True),
        },
        tuple(f"r.status = {int(status)}" for status in TransferStatus),
    ),
    Listing.HOLDS: _Table(
        "holds",
        _HOLD_COLUMNS,
        _hold,
        {
            "wallet_id": ListingFilter(("r.wallet_id = {}",), "uuid", indexed=True),
            "status": ListingFilter(("r.status = {}",), "smallint", indexed=True),
            "expires_before": ListingFilter(
                ("r.expires_at < " + _AT.format("{}"),), "bigint", indexed=False
            ),
        },
        tuple(f"r.status = {int(status)}" for status in HoldStatus),
    ),
}
# The column of each item's created_at in microseconds.
_CREATED_AT: Final = {Listing.WALLETS: 3, Listing.TRANSFERS: 7, Listing.HOLDS: 10}


def _driver(table: _Table, names: tuple[str, ...]) -> str | None:
    return next((n for n, f in table.filters.items() if f.indexed and n in names), None)


@functools.cache
def listing_sql(listing: Listing, names: tuple[str, ...]) -> str:
    """The statement of a page with these filters (names sorted, as in ``ListingQuery``)."""
    table = LISTINGS[listing]
    placeholder = {
        name: f"${number}::{table.filters[name].cast}"
        for number, name in enumerate(names, _FIRST_FILTER_PARAMETER)
    }
    driver = _driver(table, names)
    matched = " AND ".join(
        table.filters[name].condition(placeholder[name]) for name in names if name != driver
    )
    drives = table.undriven if driver is None else table.filters[driver].predicates
    scans = [
        f"SELECT {table.columns}, {matched or 'true'} AS matched, r.created_at AS listed_at"
        f" FROM {table.name} r"
        f" WHERE {drive.replace('{}', placeholder[driver]) if driver else drive} AND {_RANGE}"
        " ORDER BY r.created_at DESC, r.id DESC LIMIT $5"
        for drive in drives
    ]
    if len(scans) == 1:
        return scans[0]
    return (
        "SELECT * FROM ("
        + " UNION ALL ".join(f"({scan})" for scan in scans)
        + ") AS scans ORDER BY scans.listed_at DESC, scans.id DESC LIMIT $5"
    )


def rows_to_read(query: ListingQuery) -> int:
    """``limit`` + 1 when an index serves every filter, else ``scan_max``."""
    table = LISTINGS[query.listing]
    names = tuple(name for name, _ in query.filters)
    driver = _driver(table, names)
    return query.limit + 1 if all(n == driver for n in names) else query.scan_max


def listing_args(query: ListingQuery) -> tuple[object, ...]:
    """The statement's parameters, in order."""
    after = query.after
    return (
        BOTTOM_US if query.since_us is None else query.since_us,
        TOP_US if query.until_us is None else query.until_us,
        TOP_US if after is None else after.created_at_us,
        _TOP_ID if after is None else after.id,
        rows_to_read(query),
        *(value for _, value in query.filters),
    )


def listing_page(query: ListingQuery, rows: list[asyncpg.Record]) -> ListingPage:
    """The page those rows make: the matching ones up to ``limit``, and where to go on."""
    table = LISTINGS[query.listing]
    created = _CREATED_AT[query.listing]
    matched = [row for row in rows if row["matched"]]
    items = [table.item(row) for row in matched[: query.limit]]
    if len(matched) > query.limit:
        last = matched[query.limit - 1]
    elif len(rows) == rows_to_read(query):  # read all a page may: the walk goes on below
        last = rows[-1]
    else:
        return ListingPage(items, None)
    return ListingPage(items, ListingPosition(last[created], last[0]))
