"""Listings of wallets, transfers and holds: what a page asks for and what it holds.

A listing is read from storage (``LogReader.list_page``), never from a shard: it shows
committed rows, and every acknowledged change is committed before its answer is sent, so a
listing read after an answer reflects it (a transfer answered 201 is listed COMPLETED).

Order and keyset::

    newest first by (created_at, id); a page continues strictly below its position
    ┌──────────── page 1 ────────────┐┌──────── page 2 ────────┐
    (t9,a) (t8,c) (t8,b) ... (t5,d) ▶ (t5,c) (t4,f) ...           position = (t5, d)

A row's (created_at, id) never changes, so a walk never shows a row twice, and shows every
row committed before it started that matches. A row committed during the walk is shown if
it sorts below the walk's position; one stamped above it (or stamped before it but
committed after the walk passed) is not: a listing is a view of rows, not a log of changes
(the change feed, engine/log_reads.py, never skips one).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final
from uuid import UUID

from walletd.engine.model import HoldRecord, TransferRecord, WalletView

__all__ = [
    "INSTANT_MAX_US",
    "INSTANT_MIN_US",
    "FilterValue",
    "Listing",
    "ListingItem",
    "ListingPage",
    "ListingPosition",
    "ListingQuery",
]


# Below and above every instant a request can name (RFC 3339 years 0000-9999), and inside
# PostgreSQL's timestamptz range (4713 BC to 294276 AD): storage sends them for absent
# bounds, and a position outside them is none a row can have.
INSTANT_MIN_US: Final = -(2**57)  # about 2600 BC
INSTANT_MAX_US: Final = 2**62  # about 148,000 AD


class Listing(enum.Enum):
    WALLETS = "wallets"
    TRANSFERS = "transfers"
    HOLDS = "holds"


@dataclass(frozen=True, slots=True, order=True)
class ListingPosition:
    """A row's place in a listing's order (newest first: larger positions come first)."""

    created_at_us: int
    id: UUID


ListingItem = WalletView | TransferRecord | HoldRecord
# A filter's value: a wallet id, a status number, an instant in microseconds, a text.
FilterValue = UUID | int | str


@dataclass(frozen=True, slots=True)
class ListingQuery:
    """One page of a listing: the rows with ``since_us <= created_at < until_us`` (either
    bound optional) that match every filter, below ``after`` (None: from the newest).

    ``filters`` are (name, value) pairs, sorted by name; the names a listing takes are
    storage's table of them (persistence/listings.py). Storage reads at most ``scan_max``
    rows (``limit`` + 1 when every filter is served by an index), so a page may hold fewer
    than ``limit`` items and still have a next one.
    """

    listing: Listing
    filters: tuple[tuple[str, FilterValue], ...] = ()
    since_us: int | None = None
    until_us: int | None = None
    after: ListingPosition | None = None
    limit: int = 50
    scan_max: int = 51

    def __post_init__(self) -> None:
        if not 1 <= self.limit < self.scan_max:
            raise ValueError("a listing page needs 1 <= limit < scan_max")
        if list(self.filters) != sorted(self.filters, key=lambda pair: pair[0]):
            raise ValueError("listing filters must be sorted by name")


@dataclass(frozen=True, slots=True)
class ListingPage:
    """The items of a page, in order, and the position to continue below (None: the
    listing is read through)."""

    items: list[ListingItem]
    next: ListingPosition | None
