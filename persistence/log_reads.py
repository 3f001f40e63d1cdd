"""``LogReader`` on PostgreSQL: as-of balances, filtered history and the change feed.

Each read is one statement, on a pool of its own (``read_pool_size``), so feed consumers
and history readers never take a connection a commit is waiting for. Each one reads a
bounded number of rows through an index (tests/test_log_reads.py checks the plans):

- as of:    a binary search over (wallet_id, seq) in ``walletd_last_seq_at`` (migration
            migration says why not an index on created_at): at most 63 + 2 rows;
- filtered: two such searches, then one range scan of at most ``scan_max`` rows;
- feed:     ``wallet_operations_feed`` (xid, id) and ``wallets_feed`` (created_xid,
            feed_id), at most ``limit`` rows from each source;
- listings: persistence/listings.py, one backward index range scan per page.

Adding an event source (transfers, holds) is one more entry in ``FEED_SOURCES``: a SELECT
of (xid, id, type, created_us, data) from a table whose rows carry ``xid8 DEFAULT
pg_current_xact_id()`` and an id drawn from ``wallet_operations_id_seq``, with an index on
(xid, id); money in ``data`` goes under the names in ``FeedEvent.MONEY_FIELDS``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final
from uuid import UUID

import asyncpg
import orjson

from walletd.engine.listings import ListingPage, ListingQuery
from walletd.engine.log_reads import (
    FeedEvent,
    FeedPosition,
    HistoryFilter,
    LogReader,
    WalletAsOf,
)
from walletd.engine.model import OperationKind, OperationRecord, WalletStatus
from walletd.engine.money import currency_of
from walletd.engine.ports import StorageError, StorageUnavailable
from walletd.persistence.listings import listing_args, listing_page, listing_sql
from walletd.persistence.postgres_log import stored_metadata

__all__ = [
    "AS_OF_SQL",
    "EVENTS_SQL",
    "FEED_SOURCES",
    "FILTERED_HISTORY_SQL",
    "HISTORY_LINKS_SQL",
    "PostgresLogReader",
]

_MICROS: Final = "(extract(epoch FROM {0}) * 1000000)::bigint"
_AT: Final = "(timestamptz 'epoch' + {0} * interval '1 microsecond')"
_SEQ_MAX: Final = 2**63 - 1

AS_OF_SQL: Final = f"""
SELECT {_MICROS.format("w.created_at")}, o.balance_after, s.seq, {_MICROS.format("o.created_at")},
       o.held_after, u.status_after, u.overdraft_limit_after, w.currency, w.exponent,
       -- The metadata then: its last WALLET_UPDATE row's, else its creation's (migration
       -- "wallet_metadata_changes_and_filters").
       CASE WHEN u.seq IS NULL THEN walletd_creation_metadata(w.create_fingerprint)
            ELSE u.metadata END
  FROM wallets w
 CROSS JOIN LATERAL (SELECT walletd_last_seq_at(w.id, {_AT.format("$2")}, true) AS seq
                      OFFSET 0) s  -- not pulled up: the search would run once per use
  LEFT JOIN wallet_operations o ON o.wallet_id = w.id AND o.seq = s.seq
  -- The status, limit and metadata then: the last WALLET_UPDATE row at or before that seq.
  LEFT JOIN LATERAL (SELECT c.seq, c.status_after, c.overdraft_limit_after, c.metadata
                       FROM wallet_operations c
                      WHERE c.wallet_id = w.id AND c.kind = 9 AND c.seq <= s.seq
                      ORDER BY c.seq DESC LIMIT 1) u ON true
 WHERE w.id = $1 AND w.created_at <= {_AT.format("$2")}
"""

_OP_COLUMNS: Final = (
    "o.id, o.wallet_id, o.seq, o.kind, o.amount, o.balance_after, o.idempotency_key, "
    + _MICROS.format("o.created_at")
    + ", o.held_after, o.reference, o.actor, o.metadata, o.status_after, o.overdraft_limit_after"
)
# since/until become a seq range (created_at < since: seq <= first bound; created_at <
# until: seq <= second), so a page is one range scan of the (wallet_id, seq) index, keyset
# by seq like the plain history. $2/$3 NULL = no bound; $4 = the cursor's seq.
FILTERED_HISTORY_SQL: Final = f"""
WITH bounds AS MATERIALIZED (  -- each search runs once, then bounds one index range scan
    SELECT CASE WHEN $2::bigint IS NULL THEN 0
                ELSE walletd_last_seq_at($1, {_AT.format("$2::bigint")}, false) END AS above,
           CASE WHEN $3::bigint IS NULL THEN {_SEQ_MAX}
                ELSE walletd_last_seq_at($1, {_AT.format("$3::bigint")}, false) END AS upto
)
SELECT {_OP_COLUMNS}
  FROM bounds b
 CROSS JOIN LATERAL (
        SELECT * FROM wallet_operations o
         WHERE o.wallet_id = $1 AND o.seq > b.above AND o.seq <= b.upto AND o.seq < $4
         ORDER BY o.seq DESC LIMIT $5) o
 ORDER BY o.seq DESC
"""

# The links of a history page (LogReader.history_links): the refunds among its legs'
# transfers (primary key), the reversals of its deposits and withdrawals (index
# wallet_operations_reversed_once, migration "refunds_and_reversals"). Sent only for a
# page that has such rows.
HISTORY_LINKS_SQL: Final = """
SELECT 0, t.id::text, t.refund_of::text FROM transfers t
 WHERE t.id = ANY($2::uuid[]) AND t.refund_of IS NOT NULL
UNION ALL
SELECT 1, split_part(o.idempotency_key, ':', 2), o.seq::text FROM wallet_operations o
 WHERE o.wallet_id = $1 AND o.kind IN (10, 11)
   AND split_part(o.idempotency_key, ':', 2) = ANY($3::text[])
"""

# Each source: rows after the position $1-$2 whose transaction is below the horizon,
# in position order, at most $3. Columns: xid, id, type, created_us, data (JSON).
FEED_SOURCES: Final = (
    f"""
    SELECT w.created_xid AS xid, w.feed_id AS id, 'wallet.created' AS type,
           {_MICROS.format("w.created_at")} AS created_us,
           -- The creation's metadata (the wallet's may have changed since).
           json_build_object('wallet_id', w.id, 'currency', w.currency,
                             'exponent', w.exponent,
                             'metadata', coalesce(walletd_creation_metadata(w.create_fingerprint),
                                                  '{{}}'::jsonb)) AS data
      FROM wallets w
     WHERE (w.created_xid, w.feed_id) > ($1::text::xid8, $2)
       AND w.created_xid < (SELECT horizon FROM snapshot)
     ORDER BY w.created_xid, w.feed_id LIMIT $3
    """,
    f"""
    SELECT o.xid, o.id,
           CASE WHEN o.kind = 9 THEN 'wallet.updated' ELSE 'operation.applied' END,
           {_MICROS.format("o.created_at")},
           CASE WHEN o.kind = 9 THEN json_build_object(
               -- A WALLET_UPDATE row (PATCH): the wallet's status, overdraft limit and
               -- metadata from this seq on, and who changed them; no money moved.
               'wallet_id', o.wallet_id, 'operation_id', o.id, 'seq', o.seq,
               'status', CASE o.status_after WHEN 1 THEN 'ACTIVE' WHEN 2 THEN 'FROZEN'
                                             WHEN 3 THEN 'CLOSED' END,
               'overdraft_limit', o.overdraft_limit_after,
               'metadata', coalesce(o.metadata, '{{}}'::jsonb),
               'balance_after', o.balance_after, 'held_after', o.held_after,
               'actor', o.actor,
               'idempotency_key', replace(o.idempotency_key, chr(31), '/'),
               'currency', c.currency, 'exponent', c.exponent)
           ELSE json_build_object(
               'wallet_id', o.wallet_id, 'operation_id', o.id, 'seq', o.seq,
               'operation_type', CASE o.kind WHEN 1 THEN 'DEPOSIT' WHEN 2 THEN 'WITHDRAW'
                                             WHEN 3 THEN 'TRANSFER_OUT' WHEN 4 THEN 'TRANSFER_IN'
                                             WHEN 5 THEN 'TRANSFER_REFUND' WHEN 6 THEN 'HOLD'
                                             WHEN 7 THEN 'CAPTURE' WHEN 8 THEN 'RELEASE'
                                             WHEN 10 THEN 'DEPOSIT_REVERSAL'
                                             WHEN 11 THEN 'WITHDRAW_REVERSAL' END,
               'amount', o.amount, 'balance_after', o.balance_after,
               'held_after', o.held_after, 'reference', o.reference,
               -- The API key's name whose request wrote the row (null: auth off, sweep).
               'actor', o.actor,
               -- What wrote the row: the operation's, its transfer's or its hold's.
               'metadata', coalesce(o.metadata, '{{}}'::jsonb),
               -- A transfer leg's or hold row's key is internal ("<US>KIND:<id>"): the
               -- event names the transfer or hold instead, as the history does
               -- (http/responses.py). A bulk item's derived key "<request key><US><index>"
               -- reads "<request key>/<index>", as in the history (http/parsing.py
               -- shown_key).
               'idempotency_key', CASE WHEN o.kind IN (1, 2)
                                       THEN replace(o.idempotency_key, chr(31), '/') END,
               'transfer_id', CASE WHEN o.kind IN (3, 4, 5)
                                   THEN split_part(o.idempotency_key, ':', 2) END,
               'hold_id', CASE WHEN o.kind IN (6, 7, 8)
                               THEN split_part(o.idempotency_key, ':', 2) END,
               -- A refund's legs name the transfer it refunds (one primary-key lookup per
               -- leg event); a reversal names the seq of the row it reverses, from its key
               -- "<US>REVERSAL:<seq>:<digest>" (migration "refunds_and_reversals").
               'refund_of', CASE WHEN o.kind IN (3, 4, 5)
                                 THEN (SELECT t.refund_of FROM transfers t
                                        WHERE t.id = split_part(o.idempotency_key, ':', 2)::uuid)
                            END,
               'reversal_of', CASE WHEN o.kind IN (10, 11)
                                   THEN split_part(o.idempotency_key, ':', 2)::bigint END,
               -- The wallet's currency: its money fields are in its minor units.
               'currency', c.currency, 'exponent', c.exponent) END
      FROM wallet_operations o
      -- One primary-key lookup per event of the page (below the LIMIT: rows pulled only).
      LEFT JOIN LATERAL (SELECT w.currency, w.exponent FROM wallets w WHERE w.id = o.wallet_id)
           AS c ON true
     WHERE (o.xid, o.id) > ($1::text::xid8, $2)
       AND o.xid < (SELECT horizon FROM snapshot)
     ORDER BY o.xid, o.id LIMIT $3
    """,
    # A payment stored (migration "payments"), before any of its legs: its postings'
    # total in `amount`; each posting's legs follow as operation.applied events naming
    # its transfer.
    f"""
    SELECT p.created_xid, p.feed_id, 'payment.created', {_MICROS.format("p.created_at")},
           json_build_object(
               'payment_id', p.id, 'postings', p.postings,
               'amount', (SELECT sum(pp.amount) FROM payment_postings pp
                           WHERE pp.payment_id = p.id),
               'reference', p.reference, 'actor', p.actor,
               'metadata', coalesce(p.metadata, '{{}}'::jsonb),
               'currency', p.currency, 'exponent', p.exponent)
      FROM payments p
     WHERE (p.created_xid, p.feed_id) > ($1::text::xid8, $2)
       AND p.created_xid < (SELECT horizon FROM snapshot)
     ORDER BY p.created_xid, p.feed_id LIMIT $3
    """,
    # Its outcome decided, once: COMPLETED (the credits follow) or FAILED (the refunds
    # follow), with the posting refused first.
    f"""
    SELECT p.decided_xid, p.decided_feed_id, 'payment.decided',
           {_MICROS.format("p.updated_at")},
           json_build_object(
               'payment_id', p.id,
               'outcome', CASE p.phase WHEN 2 THEN 'COMPLETED' ELSE 'FAILED' END,
               'failure', CASE WHEN p.phase = 3 THEN json_build_object(
                   'posting', p.failed_index, 'side', p.failed_side, 'code', p.failure_code)
                   END,
               'currency', p.currency, 'exponent', p.exponent)
      FROM payments p
     WHERE p.decided_xid IS NOT NULL
       AND (p.decided_xid, p.decided_feed_id) > ($1::text::xid8, $2)
       AND p.decided_xid < (SELECT horizon FROM snapshot)
     ORDER BY p.decided_xid, p.decided_feed_id LIMIT $3
    """,
)
# The horizon: every transaction with a smaller xid has ended (committed or rolled back),
# so whatever it wrote is visible to this statement and nothing more can appear below it.
EVENTS_SQL: Final = (
    "WITH snapshot AS MATERIALIZED (SELECT pg_snapshot_xmin(pg_current_snapshot()) AS horizon)"
    "\nSELECT xid::text AS xid_text, id, type, created_us, data FROM ("
    + " UNION ALL ".join(f"({source})" for source in FEED_SOURCES)
    + ") AS events ORDER BY xid, id LIMIT $3"
)


class PostgresLogReader(LogReader):
    def __init__(self, pool: asyncpg.Pool, *, acquire_timeout_s: float = 2.0) -> None:
        self._pool = pool
        self._acquire_timeout_s = acquire_timeout_s

    async def _fetch(self, query: str, *args: object) -> list[asyncpg.Record]:
        try:
            connection: asyncpg.Connection = await self._pool.acquire(
                timeout=self._acquire_timeout_s
            )
        except (OSError, TimeoutError, asyncpg.InterfaceError, asyncpg.PostgresError) as error:
            raise StorageUnavailable(f"no PostgreSQL connection: {error!r}") from error
        try:
            rows: list[asyncpg.Record] = await connection.fetch(query, *args)
            return rows
        except (OSError, TimeoutError, asyncpg.InterfaceError) as error:
            raise StorageUnavailable(f"storage unreachable: {error!r}") from error
        except asyncpg.PostgresError as error:
            raise StorageError(f"query failed: {error}") from error
        finally:
            await self._pool.release(connection)

    async def wallet_as_of(self, wallet_id: UUID, at_us: int) -> WalletAsOf | None:
        rows = await self._fetch(AS_OF_SQL, wallet_id, at_us)
        if not rows:
            return None
        created_us, balance, seq, updated_us, held, status, limit, code, exponent, metadata_text = (
            rows[0]
        )
        currency = currency_of(code, exponent)
        metadata = stored_metadata(metadata_text)
        if not seq:  # seq 0: no operation yet at that instant
            return WalletAsOf(
                wallet_id, 0, 0, created_us, created_us, 0, currency, metadata=metadata
            )
        return WalletAsOf(
            wallet_id, balance, seq, created_us, updated_us, held, currency,
            WalletStatus(status or WalletStatus.ACTIVE), limit or 0, metadata,
        )  # fmt: skip

    async def filtered_history(
        self,
        wallet_id: UUID,
        history_filter: HistoryFilter,
        before_seq: int | None,
        limit: int,
        scan_max: int,
    ) -> tuple[list[tuple[int, OperationRecord]], int | None]:
        rows = await self._fetch(
            FILTERED_HISTORY_SQL,
            wallet_id,
            history_filter.since_us,
            history_filter.until_us,
            _SEQ_MAX if before_seq is None else before_seq,
            scan_max,
        )
        kind = history_filter.kind
        matched = [row for row in rows if kind is None or row[3] == kind]
        items = [(row[0], _operation(row)) for row in matched[:limit]]
        if len(matched) > limit:
            return items, items[-1][1].seq
        if len(rows) == scan_max:  # read as much as one page may: the walk goes on below
            return items, rows[-1][2]
        return items, None

    async def events_after(self, position: FeedPosition, limit: int) -> list[FeedEvent]:
        rows = await self._fetch(EVENTS_SQL, str(position.xid), position.id, limit)
        return [
            FeedEvent(FeedPosition(int(xid), row_id), kind, created_us, orjson.loads(data))
            for xid, row_id, kind, created_us, data in rows
        ]

    async def history_links(
        self, wallet_id: UUID, transfer_ids: Sequence[UUID], seqs: Sequence[int]
    ) -> tuple[dict[UUID, UUID], dict[int, int]]:
        if not transfer_ids and not seqs:
            return {}, {}
        refunds: dict[UUID, UUID] = {}
        reversed_by: dict[int, int] = {}
        rows = await self._fetch(
            HISTORY_LINKS_SQL, wallet_id, list(transfer_ids), [str(seq) for seq in seqs]
        )
        for which, source, target in rows:
            if which == 0:
                refunds[UUID(source)] = UUID(target)
            else:
                reversed_by[int(source)] = int(target)
        return refunds, reversed_by

    async def list_page(self, query: ListingQuery) -> ListingPage:
        names = tuple(name for name, _ in query.filters)
        rows = await self._fetch(listing_sql(query.listing, names), *listing_args(query))
        return listing_page(query, rows)


def _operation(row: asyncpg.Record) -> OperationRecord:
    return OperationRecord(
        row[1], row[2], OperationKind(row[3]), row[4], row[5], row[6], row[7], row[8], row[9],
        row[10], WalletStatus(row[12] or WalletStatus.ACTIVE), row[13] or 0,
        stored_metadata(row[11]),
    )  # fmt: skip
