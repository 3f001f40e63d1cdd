"""Reads of the durable log beyond the engine's own: as of an instant, filtered history,
and the change feed. The HTTP edge asks these of storage directly; no shard is involved,
since they read what is committed and the engine's memory holds only the present.

Feed positions::

    (xid, id)   xid = the writing transaction's 64-bit id, id = the row's id
                ordered by xid, then id; a reader returns only rows whose xid is below
                the oldest transaction still running, so a row can never commit behind a
                position that a reader has already passed

The text form is ``"<xid>-<id>"``, opaque to clients; ``FeedPosition.START`` is before
every event.
"""

from __future__ import annotations

import abc
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Final
from uuid import UUID

from walletd.engine.listings import ListingPage, ListingQuery
from walletd.engine.model import (
    NO_METADATA,
    Metadata,
    OperationKind,
    OperationRecord,
    WalletStatus,
)
from walletd.engine.money import SEED_CURRENCY, Currency

__all__ = [
    "FeedEvent",
    "FeedPosition",
    "HistoryFilter",
    "LogReader",
    "WalletAsOf",
]

# Both parts fit PostgreSQL's bigint (xid8 values in use stay far below 2**63).
_POSITION_TEXT: Final = re.compile(r"(0|[1-9][0-9]{0,18})-(0|[1-9][0-9]{0,18})")
_PART_MAX: Final = 2**63 - 1


@dataclass(frozen=True, slots=True, order=True)
class FeedPosition:
    xid: int
    id: int

    START: ClassVar[FeedPosition]

    def __str__(self) -> str:
        return f"{self.xid}-{self.id}"

    @classmethod
    def parse(cls, text: str) -> FeedPosition | None:
        """The position a text names, or None when it names none."""
        match = _POSITION_TEXT.fullmatch(text)
        if match is None:
            return None
        xid, row_id = int(match[1]), int(match[2])
        if xid > _PART_MAX or row_id > _PART_MAX:
            return None
        return cls(xid, row_id)


FeedPosition.START = FeedPosition(0, 0)


@dataclass(frozen=True, slots=True)
class FeedEvent:
    """One committed change. ``data`` holds the type's own fields, money in minor units
    under the names in ``MONEY_FIELDS``; the HTTP edge renders them."""

    position: FeedPosition
    type: str
    created_at_us: int
    data: dict[str, Any]

    MONEY_FIELDS: ClassVar[frozenset[str]] = frozenset(
        {"amount", "balance_after", "held_after", "overdraft_limit"}
    )


@dataclass(frozen=True, slots=True)
class WalletAsOf:
    """A wallet as it was at an instant: its balance after the last operation at or
    before it (0 before the first), and when that operation happened."""

    wallet_id: UUID
    balance: int
    seq: int
    created_at_us: int
    updated_at_us: int
    held: int = 0  # held after that operation
    currency: Currency = SEED_CURRENCY
    # The status and overdraft limit then (the last WALLET_UPDATE row at or before it).
    status: WalletStatus = WalletStatus.ACTIVE
    overdraft_limit: int = 0
    metadata: Metadata = NO_METADATA  # the wallet's at that instant


@dataclass(frozen=True, slots=True)
class HistoryFilter:
    """Operations with ``since_us <= created_at < until_us`` (either bound optional), of
    one kind or all."""

    since_us: int | None = None
    until_us: int | None = None
    kind: OperationKind | None = None

    @property
    def is_empty(self) -> bool:
        return self.since_us is None and self.until_us is None and self.kind is None


class LogReader(abc.ABC):
    """Committed history, read straight from storage.

    Contract:
    - ``wallet_as_of``: None when the wallet did not exist at ``at_us``.
    - ``filtered_history``: newest first, keyset-paged by seq like the plain history;
      it reads at most ``scan_max`` rows, so with a kind filter a page may hold fewer than
      ``limit`` items and still have more after it: it returns the items and the seq to
      continue below (None when the walk is over).
    - ``events_after``: up to ``limit`` events after ``position``, in position order;
      an event returned once is never followed, in any later call, by one with a smaller
      position.
    - ``list_page``: one page of a listing (engine/listings.py), reading at most
      ``query.scan_max`` rows.
    """

    @abc.abstractmethod
    async def wallet_as_of(self, wallet_id: UUID, at_us: int) -> WalletAsOf | None: ...

    @abc.abstractmethod
    async def filtered_history(
        self,
        wallet_id: UUID,
        history_filter: HistoryFilter,
        before_seq: int | None,
        limit: int,
        scan_max: int,
    ) -> tuple[list[tuple[int, OperationRecord]], int | None]: ...

    @abc.abstractmethod
    async def events_after(self, position: FeedPosition, limit: int) -> list[FeedEvent]: ...

    @abc.abstractmethod
    async def list_page(self, query: ListingQuery) -> ListingPage: ...

    async def history_links(
        self, wallet_id: UUID, transfer_ids: Sequence[UUID], seqs: Sequence[int]
    ) -> tuple[dict[UUID, UUID], dict[int, int]]:
        """What a history page links its rows to (docs/API.md, "Refunds", "Reversals"):
        the ``refund_of`` of those transfers that are refunds, and the seq of the row that
        reversed each of those seqs of the wallet that was reversed. None by default (a
        reader without refunds or reversals)."""
        return {}, {}
