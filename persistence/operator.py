"""Operator commands on the durable log: verify, restore, seed.

- ``verify`` replays the log in wallet order through two server-side cursors (wallets by id,
  operations by (wallet id, seq)) on two connections sharing one REPEATABLE READ snapshot
  (``pg_export_snapshot``), each with its next fetch in flight, and checks, for every
  wallet, that the snapshot's balance and seq equal the log's sum and last seq, and that the
  log's own chain holds (seq = 1, 2, 3, ..., each balance_after = the running balance,
  each held_after = the running held with 0 <= held <= balance + the overdraft limit in
  force (the last WALLET_UPDATE row's), nothing after a close, and created_at never goes
  back: as-of reads binary-search by it); the snapshot's held, status, overdraft limit and
  metadata equal the log's too (metadata: the last WALLET_UPDATE row's, else the
  creation's). Then
  that every wallet's held is the sum of its PENDING holds (``HELD_CHECK``, one statement).
  Memory is bounded by the cursor fetch size, whatever the table sizes. Meanwhile, on a
  third connection in the same snapshot, it checks that money is conserved across wallets:
  every transfer has exactly the legs its status allows, each on its wallet and of its
  amount, and no leg names no transfer (``TRANSFER_LEGS_CHECK``); every hold has exactly
  the HOLD / CAPTURE / RELEASE rows its resolution calls for (``HOLD_ROWS_CHECK``), and a
  capture into another wallet names its transfer (``HOLD_TRANSFERS_CHECK``); and
  sum(balance) + sum(PENDING transfers) = deposits - withdrawals - captures (deposits and
  withdrawals net of their reversals), for each currency on its own (``CONSERVATION``, by
  the wallets' currency column); that the refunds of each transfer that are not FAILED sum
  to at most its amount, of a COMPLETED transfer that is no refund, between its wallets the
  other way (``REFUNDS_CHECK``); that every reversal reverses a DEPOSIT or WITHDRAW of its
  wallet and amount (``REVERSALS_CHECK``); that every
  transfer and every capture into a wallet joins two wallets of one currency, and that a
  currency code has one exponent (``CURRENCY_CHECK``); that each payment's postings are all
  or nothing as its phase says (``PAYMENTS_CHECK``). Each is one statement aggregating
  or joining on the server, returning at most ``FEED_MISMATCHES_MAX`` rows. Then it checks
  that every log row and every wallet creation has exactly one change-feed position: none
  without one, no two sharing one (``FEED_POSITIONS_CHECK``).
- ``restore`` rebuilds every wallet's balance, held, seq, updated_at, status, overdraft
  limit and metadata from the log in one transaction, holding every shard lease so no
  walletd serves the database meanwhile. It is one statement on purpose: split into 64
  slices of the id space (to report progress) it took 3-4 times as long (200k wallets, 1M
  operations: 1.1-4.3 s against 5.8-8.8 s).
- ``seed`` bulk-loads wallets and their history with COPY, snapshot and log consistent.

Each takes an optional ``ProgressSink`` (the CLI's progress bar) that hears the expected
total and each step done: wallets for verify and seed, its one statement for restore.

Exceptions: ``DatabaseBusy`` (restore while a server runs), ``DatabaseError`` (connect).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol
from uuid import UUID

import asyncpg

from walletd.engine.ids import new_uuid4
from walletd.persistence.database import connect
from walletd.persistence.leases import hold_every_lease

__all__ = [
    "SEED_CHUNK_WALLETS",
    "VERIFY_FETCH_ROWS",
    "Mismatch",
    "ProgressSink",
    "RestoreReport",
    "SeedReport",
    "VerifyReport",
    "restore",
    "seed",
    "verify",
]

# Rows per FETCH from each cursor: the whole of verify's memory, whatever the table sizes.
VERIFY_FETCH_ROWS = 20_000
# Wallets generated and copied per COPY round by seed (with their operations).
SEED_CHUNK_WALLETS = 20_000
# Wallets replayed between two turns of the event loop during verify.
VERIFY_YIELD_WALLETS = 500

_DEPOSIT = 1
_WITHDRAW = 2
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


class ProgressSink(Protocol):
    """Hears how much work a command expects and each part of it done (cli/progress.py)."""

    def set_total(self, total: int | None) -> None: ...

    def advance(self, units: int) -> None: ...


class _NoProgress:
    def set_total(self, total: int | None) -> None:
        pass

    def advance(self, units: int) -> None:
        pass


@dataclass(frozen=True, slots=True)
class Mismatch:
    """A problem found by verify: in one wallet (its snapshot, or a log row it carries), or
    in the log as a whole (``wallet_id`` None: the conservation equation)."""

    wallet_id: UUID | None
    problem: str

    def __str__(self) -> str:
        if self.wallet_id is None:
            return f"mismatch: the whole log: {self.problem}"
        return f"mismatch: wallet {self.wallet_id}: {self.problem}"


@dataclass(slots=True)
class VerifyReport:
    wallets: int = 0
    operations: int = 0
    transfers: int = 0
    holds: int = 0
    payments: int = 0
    mismatches: int = 0
    seconds: float = 0.0
    first_mismatches: list[Mismatch] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return self.mismatches == 0

    def summary(self) -> str:
        verdict = "OK" if self.clean else f"{self.mismatches} MISMATCHES"
        return (
            f"verify: {self.wallets} wallets, {self.operations} operations checked, "
            f"{self.transfers} transfers, {self.holds} holds and {self.payments} payments "
            "matched to their rows in "
            f"{self.seconds:.1f} s: {verdict}"
        )


# How many mismatches the report keeps (all are passed to the callback, none accumulate).
MISMATCHES_KEPT_MAX = 100


# Rows of the change feed with no position, or sharing theirs with another row, each named
# by its wallet; at most FEED_MISMATCHES_MAX come back. Log rows cannot share one among
# themselves (id is their primary key), so only wallet creations are looked up: in the
# log's (xid, id) index and among each other. 3.3 s on 1M wallets / 5M operations, where
# one hash aggregate over both tables took 18 s.
FEED_MISMATCHES_MAX = 1000
FEED_POSITIONS_CHECK = f"""
SELECT w.id, w.created_xid::text, w.feed_id FROM wallets w
 WHERE w.created_xid IS NULL OR w.feed_id IS NULL
    OR EXISTS (SELECT 1 FROM wallet_operations o
                WHERE o.xid = w.created_xid AND o.id = w.feed_id)
UNION ALL
SELECT o.wallet_id, o.xid::text, o.id FROM wallet_operations o WHERE o.xid IS NULL
UNION ALL
SELECT w.id, w.created_xid::text, w.feed_id
  FROM wallets w
  JOIN (SELECT created_xid, feed_id FROM wallets GROUP BY 1, 2 HAVING count(*) > 1) AS d
       USING (created_xid, feed_id)
 LIMIT {FEED_MISMATCHES_MAX}
"""

# Metadata as canonical jsonb text (equal objects, equal texts), NULL for none or {}: the
# wallet's, and its creation's (migration "wallet_metadata_changes_and_filters").
_METADATA_TEXT = "nullif({0}, '{{}}'::jsonb)::text"
_WALLETS_IN_ORDER = (
    "SELECT id, balance, seq, held, status, overdraft_limit, "
    + _METADATA_TEXT.format("metadata")
    + ", "
    + _METADATA_TEXT.format("walletd_creation_metadata(create_fingerprint)")
    + " FROM wallets ORDER BY id"
)
# How each kind moves balance and held (migration 0008): DEPOSIT, TRANSFER_IN and
# TRANSFER_REFUND add money, HOLD and RELEASE move none, the others take it out (a
# WALLET_UPDATE row's amount is 0: it moves none); HOLD adds to held, CAPTURE and RELEASE
# take from it.
# WITHDRAW_REVERSAL (11) adds money like a deposit, DEPOSIT_REVERSAL (10) takes it out
# (migration "refunds_and_reversals").
SIGNED_BALANCE_SQL = (
    "CASE WHEN kind IN (1, 4, 5, 11) THEN amount WHEN kind IN (6, 8) THEN 0 ELSE -amount END"
)
SIGNED_HELD_SQL = "CASE kind WHEN 6 THEN amount WHEN 7 THEN -amount WHEN 8 THEN -amount ELSE 0 END"
# The signed amounts are computed by the server: fewer columns to decode per row. So is
# whether a row is stamped before the one before it (as-of reads binary-search a wallet's
# log by created_at, so it must not go back): a boolean, where a timestamp would be decoded.
_OPERATIONS_IN_ORDER = (
    f"SELECT wallet_id, seq, {SIGNED_BALANCE_SQL}, balance_after, "
    "created_at < lag(created_at) OVER (PARTITION BY wallet_id ORDER BY seq), "
    f"{SIGNED_HELD_SQL}, held_after, status_after, overdraft_limit_after, "
    # A WALLET_UPDATE row's metadata is the wallet's after it; other rows' are their own.
    f"CASE WHEN kind = 9 THEN {_METADATA_TEXT.format('metadata')} END "
    "FROM wallet_operations ORDER BY wallet_id, seq"
)
# Wallets whose held is not the sum of their PENDING holds (one statement: one snapshot).
HELD_CHECK = f"""
SELECT w.id, w.held, coalesce(h.pending, 0)
  FROM wallets w
  FULL JOIN (SELECT wallet_id, sum(amount) AS pending FROM holds WHERE status = 1
              GROUP BY wallet_id) AS h ON h.wallet_id = w.id
 WHERE w.held IS DISTINCT FROM coalesce(h.pending, 0)
 LIMIT {FEED_MISMATCHES_MAX}
"""


# Conservation across wallets (migration legs_match_their_transfers_and_holds; the append
# refuses these at write time, verify finds rows that bypassed it). A leg or hold row is
# tied to its transfer or hold by its key, "<US>KIND:<id>" (engine/commands.py). Each check
# lists, for every transfer (hold), the rows it may have (`wanted`: the ones its status
# calls for), full-joins them on the key with the log's rows of those kinds, and returns
# the differences: a wanted row missing, a row of no transfer (hold), a row its status does
# not allow, or one on another wallet, of another kind or amount. One hash join each, on
# the server (it spills to disk past work_mem); at most FEED_MISMATCHES_MAX rows come back.
TRANSFER_LEGS_CHECK = f"""
SELECT a.wallet_id, a.seq, a.kind, a.amount,
       e.id, e.status, e.kind, e.wallet_id, e.amount, e.wanted
  FROM (SELECT t.id, t.status, t.amount, l.kind, l.wallet_id, l.wanted,
               chr(31) || l.name || ':' || t.id AS key
          FROM transfers AS t
         CROSS JOIN LATERAL (VALUES
               -- A payment's posting closed before its debit (migration "payments") has
               -- no leg at all.
               (3::smallint, 'TRANSFER_OUT', t.from_wallet_id,
                t.failure_code IS DISTINCT FROM 'PAYMENT_NOT_DEBITED'),
               (4::smallint, 'TRANSFER_IN', t.to_wallet_id, t.status = 2),
               (5::smallint, 'TRANSFER_REFUND', t.from_wallet_id,
                t.status = 3 AND t.failure_code IS DISTINCT FROM 'PAYMENT_NOT_DEBITED'))
               AS l(kind, name, wallet_id, wanted)) AS e
  FULL JOIN (SELECT wallet_id, seq, kind, amount, idempotency_key AS key
               FROM wallet_operations WHERE kind BETWEEN 3 AND 5) AS a
    ON a.key = e.key
 WHERE CASE WHEN a.seq IS NULL THEN e.wanted
            ELSE e.id IS NULL OR NOT e.wanted OR a.wallet_id <> e.wallet_id
                 OR a.kind <> e.kind OR a.amount <> e.amount END
 LIMIT {FEED_MISMATCHES_MAX}
"""
# A hold's rows: HOLD of its amount; resolved, CAPTURE of `captured` and RELEASE of the
# rest; captured into another wallet, RELEASE of the whole (the captured part leaves as its
# transfer's TRANSFER_OUT, checked with the transfers). Rows of 0 are never written.
HOLD_ROWS_CHECK = f"""
SELECT a.wallet_id, a.seq, a.kind, a.amount,
       e.id, e.status, e.kind, e.wallet_id, e.amount, e.wanted
  FROM (SELECT h.id, h.status, h.wallet_id, l.kind, l.amount,
               l.wanted AND l.amount <> 0 AS wanted,
               chr(31) || l.name || ':' || h.id AS key
          FROM holds AS h
         CROSS JOIN LATERAL (VALUES
               (6::smallint, 'HOLD', h.amount, true),
               (7::smallint, 'CAPTURE', h.captured, h.status = 2 AND h.to_wallet_id IS NULL),
               (8::smallint, 'RELEASE',
                CASE WHEN h.to_wallet_id IS NULL THEN h.amount - h.captured ELSE h.amount END,
                h.status <> 1))
               AS l(kind, name, amount, wanted)) AS e
  FULL JOIN (SELECT wallet_id, seq, kind, amount, idempotency_key AS key
               FROM wallet_operations WHERE kind BETWEEN 6 AND 8) AS a
    ON a.key = e.key
 WHERE CASE WHEN a.seq IS NULL THEN e.wanted
            ELSE e.id IS NULL OR NOT e.wanted OR a.wallet_id <> e.wallet_id
                 OR a.kind <> e.kind OR a.amount <> e.amount END
 LIMIT {FEED_MISMATCHES_MAX}
"""
# A capture into another wallet names the transfer that carries the captured money: from
# the hold's wallet to to_wallet_id, of `captured`.
HOLD_TRANSFERS_CHECK = f"""
SELECT h.wallet_id, h.id, h.captured, h.to_wallet_id, h.transfer_id,
       t.from_wallet_id, t.to_wallet_id, t.amount
  FROM holds AS h
  LEFT JOIN transfers AS t ON t.id = h.transfer_id
 WHERE (h.to_wallet_id IS NOT NULL OR h.transfer_id IS NOT NULL)
   AND (t.id IS NULL OR h.status <> 2 OR h.to_wallet_id IS NULL
        OR t.from_wallet_id <> h.wallet_id OR t.to_wallet_id <> h.to_wallet_id
        OR t.amount <> h.captured)
 LIMIT {FEED_MISMATCHES_MAX}
"""
# The conservation equation (docs/ARCHITECTURE.md, "Holds") per currency: money never moves
# between currencies, so each one's sum balances alone (migration "wallet_currencies"). A
# PENDING transfer's money is its sending wallet's currency.
CONSERVATION = """
WITH b AS (SELECT currency, sum(balance) AS balances FROM wallets GROUP BY currency),
     p AS (SELECT w.currency, sum(t.amount) AS pending
             FROM transfers t JOIN wallets w ON w.id = t.from_wallet_id
            WHERE t.status = 1 GROUP BY w.currency),
     o AS (SELECT w.currency,
                  sum(o.amount) FILTER (WHERE o.kind = 1) AS deposits,
                  sum(o.amount) FILTER (WHERE o.kind = 2) AS withdrawals,
                  sum(o.amount) FILTER (WHERE o.kind = 7) AS captures,
                  sum(o.amount) FILTER (WHERE o.kind = 10) AS deposit_reversals,
                  sum(o.amount) FILTER (WHERE o.kind = 11) AS withdraw_reversals
             FROM wallet_operations o JOIN wallets w ON w.id = o.wallet_id
            WHERE o.kind IN (1, 2, 7, 10, 11) GROUP BY w.currency)
SELECT currency, coalesce(balances, 0), coalesce(pending, 0), coalesce(deposits, 0),
       coalesce(withdrawals, 0), coalesce(captures, 0), coalesce(deposit_reversals, 0),
       coalesce(withdraw_reversals, 0)
  FROM b FULL JOIN p USING (currency) FULL JOIN o USING (currency)
 ORDER BY currency
"""
# Refunds (migration "refunds_and_reversals"; the append refuses these with WD010, verify
# finds rows that bypassed it): per refunded transfer, its refunds that are not FAILED sum
# to at most its amount; it is COMPLETED and no refund itself; each refund goes between its
# wallets the other way. One aggregate over the refunds (the partial index holds them all).
REFUNDS_CHECK = f"""
SELECT o.to_wallet_id, r.refund_of, o.status, o.amount, o.refund_of,
       sum(r.amount) FILTER (WHERE r.status <> 3) AS refunded,
       count(*) FILTER (WHERE r.from_wallet_id <> o.to_wallet_id
                           OR r.to_wallet_id <> o.from_wallet_id) AS astray
  FROM transfers r
  LEFT JOIN transfers o ON o.id = r.refund_of
 WHERE r.refund_of IS NOT NULL
 GROUP BY r.refund_of, o.id
HAVING o.id IS NULL OR o.status <> 2 OR o.refund_of IS NOT NULL
    OR coalesce(sum(r.amount) FILTER (WHERE r.status <> 3), 0) > o.amount
    OR count(*) FILTER (WHERE r.from_wallet_id <> o.to_wallet_id
                           OR r.to_wallet_id <> o.from_wallet_id) > 0
 LIMIT {FEED_MISMATCHES_MAX}
"""
# Reversals: each reverses a DEPOSIT (10) or WITHDRAW (11) of its wallet, of its amount,
# named by its key's seq (the unique index makes it at most one per operation).
REVERSALS_CHECK = f"""
SELECT v.wallet_id, v.seq, v.kind, v.amount, o.seq, o.kind, o.amount
  FROM wallet_operations v
  LEFT JOIN wallet_operations o
    ON o.wallet_id = v.wallet_id
   AND o.seq = CASE WHEN split_part(v.idempotency_key, ':', 2) ~ '^[0-9]{{1,18}}$'
                    THEN split_part(v.idempotency_key, ':', 2)::bigint END
 WHERE v.kind IN (10, 11)
   AND (o.seq IS NULL OR o.kind <> v.kind - 9 OR o.amount <> v.amount)
 LIMIT {FEED_MISMATCHES_MAX}
"""
COUNTS = (
    "SELECT (SELECT count(*) FROM transfers), (SELECT count(*) FROM holds),"
    " (SELECT count(*) FROM payments)"
)
# A payment against its postings (migration "payments"): all or nothing. Each posting is
# its payment's (wallets, amount) transfer; DEBITING: none FAILED (a joint commit may have
# completed all before the decision lands); CREDITING: none FAILED; FAILING: none
# COMPLETED; and as many postings as the payment says.
PAYMENTS_CHECK = f"""
SELECT p.id, p.phase, count(pp.transfer_id), p.postings,
       count(*) FILTER (WHERE t.status = 2), count(*) FILTER (WHERE t.status = 3),
       count(*) FILTER (WHERE t.id IS NOT NULL AND (t.from_wallet_id, t.to_wallet_id, t.amount)
                        IS DISTINCT FROM (pp.from_wallet_id, pp.to_wallet_id, pp.amount))
  FROM payments p
  LEFT JOIN payment_postings pp ON pp.payment_id = p.id
  LEFT JOIN transfers t ON t.id = pp.transfer_id
 GROUP BY p.id
HAVING count(pp.transfer_id) <> p.postings
    OR count(*) FILTER (WHERE t.id IS NOT NULL AND (t.from_wallet_id, t.to_wallet_id, t.amount)
                        IS DISTINCT FROM (pp.from_wallet_id, pp.to_wallet_id, pp.amount)) > 0
    OR (p.phase = 1 AND count(*) FILTER (WHERE t.status = 3) > 0)
    OR (p.phase = 2 AND count(*) FILTER (WHERE t.status = 3) > 0)
    OR (p.phase = 3 AND count(*) FILTER (WHERE t.status = 2) > 0)
 LIMIT {FEED_MISMATCHES_MAX}
"""
_PHASES = {1: "DEBITING", 2: "CREDITING", 3: "FAILING"}
# Money between wallets of different currencies (a COMPLETED transfer, hence also a capture
# into a wallet, which opens one; a FAILED one was refunded, as when its receiver was
# created in another currency after the debit), and a code stored with two exponents.
CURRENCY_CHECK = f"""
(SELECT t.from_wallet_id, 'transfer ' || t.id || ' moves ' || f.currency || ' into wallet '
        || t.to_wallet_id || ', which holds ' || r.currency
   FROM transfers t
   JOIN wallets f ON f.id = t.from_wallet_id
   JOIN wallets r ON r.id = t.to_wallet_id
  WHERE t.status = 2 AND (f.currency, f.exponent) <> (r.currency, r.exponent)
  LIMIT {FEED_MISMATCHES_MAX})
UNION ALL
(SELECT min(w.id::text)::uuid, 'currency ' || w.currency || ' is stored with exponents '
        || string_agg(DISTINCT w.exponent::text, ', ')
   FROM wallets w GROUP BY w.currency HAVING count(DISTINCT w.exponent) > 1
  LIMIT {FEED_MISMATCHES_MAX})
"""
_KIND_NAMES = {
    1: "DEPOSIT", 2: "WITHDRAW", 3: "TRANSFER_OUT", 4: "TRANSFER_IN", 5: "TRANSFER_REFUND",
    6: "HOLD", 7: "CAPTURE", 8: "RELEASE", 9: "WALLET_UPDATE", 10: "DEPOSIT_REVERSAL",
    11: "WITHDRAW_REVERSAL",
}  # fmt: skip
_TRANSFER_STATUSES = {1: "PENDING", 2: "COMPLETED", 3: "FAILED"}
_HOLD_STATUSES = {1: "PENDING", 2: "CAPTURED", 3: "VOIDED", 4: "EXPIRED"}


class _Rows:
    """A server-side cursor read in fixed-size fetches, the next one always in flight.

    Each reader owns its connection, so the fetch of the next batch overlaps with the
    replay of the current one: the server walks the index while Python checks rows.
    """

    def __init__(
        self, cursor: asyncpg.cursor.Cursor, fetch_rows: int, row_count: int | None = None
    ) -> None:
        self.row_count = row_count  # when known: the progress bar's total
        self._cursor = cursor
        self._fetch_rows = fetch_rows
        self._next: asyncio.Task[list[asyncpg.Record]] | None = asyncio.create_task(
            cursor.fetch(fetch_rows)
        )

    async def take_batch(self) -> list[asyncpg.Record]:
        """The next batch of rows; empty at the end."""
        if self._next is None:
            return []
        rows = await self._next
        self._next = None
        if len(rows) == self._fetch_rows:
            self._next = asyncio.create_task(self._cursor.fetch(self._fetch_rows))
        return rows

    async def close(self) -> None:
        if self._next is not None:
            self._next.cancel()
            with contextlib.suppress(asyncio.CancelledError, asyncpg.PostgresError):
                await self._next
            self._next = None


@contextlib.asynccontextmanager
async def _snapshot_readers(
    dsn: str, fetch_rows: int
) -> AsyncIterator[tuple[_Rows, _Rows, asyncpg.Connection]]:
    """Wallets and operations readers on two connections, and a third connection for the
    checks across wallets, all three sharing one snapshot."""
    first = await connect(dsn)
    others: list[asyncpg.Connection] = []
    readers: list[_Rows] = []
    try:
        others.append(await connect(dsn))
        others.append(await connect(dsn))
        second, third = others
        async with (
            first.transaction(isolation="repeatable_read", readonly=True),
            second.transaction(isolation="repeatable_read", readonly=True),
            third.transaction(isolation="repeatable_read", readonly=True),
        ):
            snapshot = await first.fetchval("SELECT pg_export_snapshot()")
            for connection in others:
                await connection.execute(f"SET TRANSACTION SNAPSHOT '{snapshot}'")
            # The progress bar's total, counted in the same snapshot the cursor reads.
            wallet_count = await first.fetchval("SELECT count(*) FROM wallets")
            readers.append(
                _Rows(await first.cursor(_WALLETS_IN_ORDER), fetch_rows, int(wallet_count))
            )
            readers.append(_Rows(await second.cursor(_OPERATIONS_IN_ORDER), fetch_rows))
            try:
                yield readers[0], readers[1], third
            finally:
                for reader in readers:
                    await reader.close()
    finally:
        for connection in (first, *others):
            await connection.close()


async def verify(
    dsn: str,
    on_mismatch: Callable[[Mismatch], None] = lambda _m: None,
    *,
    fetch_rows: int = VERIFY_FETCH_ROWS,
    progress: ProgressSink | None = None,
) -> VerifyReport:
    """Check every wallet's snapshot against its log; see the module docstring."""
    started = time.perf_counter()
    report = VerifyReport()
    progress = progress or _NoProgress()

    def found(wallet_id: UUID | None, problem: str) -> None:
        mismatch = Mismatch(wallet_id, problem)
        report.mismatches += 1
        if len(report.first_mismatches) < MISMATCHES_KEPT_MAX:
            report.first_mismatches.append(mismatch)
        on_mismatch(mismatch)

    async with _snapshot_readers(dsn, fetch_rows) as (wallets, operations, checks):
        # On its own connection, while this task replays: the server runs both at once.
        across = asyncio.create_task(_check_across_wallets(checks, found, report))
        try:
            operations_checked = await _replay(wallets, operations, found, report, progress)
            await across
        finally:
            if not across.done():  # the replay failed: stop the checks, close the readers
                across.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await across
    report.operations = operations_checked
    await _check_feed_positions(dsn, found)
    await _check_held(dsn, found)
    report.seconds = time.perf_counter() - started
    return report


async def _replay(
    wallets: _Rows,
    operations: _Rows,
    found: Callable[[UUID, str], None],
    report: VerifyReport,
    progress: ProgressSink,
) -> int:
    """Each wallet's snapshot against its log's chain; returns the log rows read."""
    operations_checked = 0
    progress.set_total(wallets.row_count)
    pending: list[asyncpg.Record] = []  # log rows fetched, not yet replayed
    position = 0
    pending_rows = 0  # len(pending), kept in a local: this loop runs per log row
    for_wallets = await wallets.take_batch()
    while for_wallets:
        report.wallets += len(for_wallets)
        for index, row in enumerate(for_wallets):
            (
                wallet_id, snap_balance, snap_seq, snap_held, snap_status, snap_limit,
                snap_metadata, metadata,
            ) = row  # fmt: skip
            if not index % VERIFY_YIELD_WALLETS:
                # Let the event loop read the fetches in flight: the server streams on
                # (another core) instead of stalling on a full socket buffer.
                await asyncio.sleep(0)
            balance = 0
            held = 0
            seq = 0
            # Status, overdraft limit and metadata in force: changed by WALLET_UPDATE rows
            # only (migrations "wallet_status_and_overdraft", "wallet_metadata_changes_and_
            # filters"; metadata starts as the creation's); nothing follows a close.
            status = 1
            limit = 0
            chain_ok = True
            while True:
                if position >= pending_rows:
                    operations_checked += pending_rows
                    pending = await operations.take_batch()
                    position = 0
                    pending_rows = len(pending)
                    if not pending:
                        break
                (
                    op_wallet,
                    op_seq,
                    signed_amount,
                    balance_after,
                    back,
                    signed_held,
                    held_after,
                    status_after,
                    limit_after,
                    metadata_after,
                ) = pending[position]
                if op_wallet != wallet_id:
                    if op_wallet < wallet_id:
                        found(op_wallet, "log rows without a snapshot row")
                        position += 1
                        continue
                    break
                position += 1
                if status == 3:
                    found(wallet_id, f"seq {op_seq} follows the wallet's close")
                balance += signed_amount
                held += signed_held
                seq += 1
                if status_after is not None:
                    status, limit, metadata = status_after, limit_after, metadata_after
                if chain_ok and (
                    op_seq != seq
                    or balance_after != balance
                    or held_after != held
                    or not 0 <= held <= balance + limit
                ):
                    chain_ok = False
                    found(
                        wallet_id,
                        f"log chain broken at seq {op_seq} (expected seq {seq}, "
                        f"balance_after {balance_after}, replayed balance {balance}, "
                        f"held_after {held_after}, replayed held {held})",
                    )
                if back:
                    found(wallet_id, f"created_at of seq {op_seq} is before seq {op_seq - 1}'s")
            if snap_balance != balance:
                found(wallet_id, f"snapshot balance {snap_balance} != log sum {balance}")
            if snap_seq != seq:
                found(wallet_id, f"snapshot seq {snap_seq} != log operations {seq}")
            if snap_held != held:
                found(wallet_id, f"snapshot held {snap_held} != log held {held}")
            if (snap_status, snap_limit) != (status, limit):
                found(
                    wallet_id,
                    f"snapshot status {snap_status} / overdraft_limit {snap_limit} != the log's "
                    f"last update: {status} / {limit}",
                )
            if snap_metadata != metadata:
                found(
                    wallet_id,
                    f"snapshot metadata {snap_metadata or '{}'} != the log's last update's "
                    f"(else the creation's): {metadata or '{}'}",
                )
        progress.advance(len(for_wallets))
        for_wallets = await wallets.take_batch()
    # Log rows past the last wallet belong to no snapshot row.
    while True:
        if position >= pending_rows:
            operations_checked += pending_rows
            pending = await operations.take_batch()
            position = 0
            pending_rows = len(pending)
            if not pending:
                break
        found(pending[position][0], "log rows without a snapshot row")
        position += 1
    return operations_checked


async def _check_across_wallets(
    connection: asyncpg.Connection,
    found: Callable[[UUID | None, str], None],
    report: VerifyReport,
) -> None:
    """Conservation across wallets, in the replay's snapshot (module docstring)."""
    for check, owner in ((TRANSFER_LEGS_CHECK, "transfer"), (HOLD_ROWS_CHECK, "hold")):
        for row in await connection.fetch(check):
            wallet_id, problem = _row_problem(owner, row)
            found(wallet_id, problem)
    for row in await connection.fetch(HOLD_TRANSFERS_CHECK):
        wallet_id, hold_id, captured, to_wallet, transfer_id, source, target, amount = row
        carried = "none" if source is None else f"{amount} from {source} to {target}"
        found(
            wallet_id,
            f"hold {hold_id} captured {captured} into wallet {to_wallet} by transfer "
            f"{transfer_id}, which carries {carried}",
        )
    for wallet_id, problem in await connection.fetch(CURRENCY_CHECK):
        found(wallet_id, problem)
    for totals in await connection.fetch(CONSERVATION):
        # Sums of bigint are numeric (Decimal): exact, made int for the comparison and text.
        currency = totals[0]
        balances, pending, deposits, withdrawals, captures, undeposits, unwithdrawals = (
            int(t) for t in totals[1:8]
        )
        # A reversal undoes its operation's money: a deposit's takes it back out.
        deposits -= undeposits
        withdrawals -= unwithdrawals
        if balances + pending != deposits - withdrawals - captures:
            found(
                None,
                f"{currency}: sum(balance) {balances} + PENDING transfers {pending} != "
                f"deposits {deposits} - withdrawals {withdrawals} - captures {captures} "
                "(net of reversals): money was made or lost",
            )
    for (
        wallet_id,
        original_id,
        status,
        amount,
        refund_of,
        refunded,
        astray,
    ) in await connection.fetch(REFUNDS_CHECK):
        if status is None:
            problem = f"refunds name transfer {original_id}, which does not exist"
        elif refund_of is not None:
            problem = f"transfer {original_id} is a refund, and is refunded"
        elif status != 2:
            problem = f"transfer {original_id} ({_TRANSFER_STATUSES[status]}) is refunded"
        elif astray:
            problem = f"{astray} refunds of transfer {original_id} go between other wallets"
        else:
            problem = (
                f"the refunds of transfer {original_id} that are not FAILED sum to {refunded},"
                f" past its amount {amount}"
            )
        found(wallet_id, problem)
    for (
        wallet_id,
        seq,
        kind,
        amount,
        original_seq,
        original_kind,
        original_amount,
    ) in await connection.fetch(REVERSALS_CHECK):
        reversed_text = (
            "no row of its wallet"
            if original_seq is None
            else f"seq {original_seq} ({_KIND_NAMES[original_kind]} of {original_amount})"
        )
        found(
            wallet_id,
            f"log row seq {seq} ({_KIND_NAMES[kind]} of {amount}) reverses {reversed_text}",
        )
    for payment_id, phase, postings, expected, completed, failed, unlike in await connection.fetch(
        PAYMENTS_CHECK
    ):
        found(
            None,
            f"payment {payment_id} ({_PHASES.get(phase, phase)}) has {postings} of {expected} "
            f"postings, {completed} COMPLETED and {failed} FAILED, {unlike} unlike their "
            "transfer: not all or nothing",
        )
    counts = await connection.fetchrow(COUNTS)
    assert counts is not None
    report.transfers, report.holds, report.payments = counts[0], counts[1], counts[2]


def _row_problem(owner: str, row: asyncpg.Record) -> tuple[UUID, str]:
    """The wallet and the words for one row of TRANSFER_LEGS_CHECK or HOLD_ROWS_CHECK."""
    wallet_id, seq, kind, amount, owner_id, status, want_kind, want_wallet, want, wanted = row
    statuses = _TRANSFER_STATUSES if owner == "transfer" else _HOLD_STATUSES
    if seq is None:
        return want_wallet, (
            f"{owner} {owner_id} ({statuses[status]}) has no {_KIND_NAMES[want_kind]} row "
            f"of {want} on this wallet"
        )
    logged = f"log row seq {seq} ({_KIND_NAMES[kind]} of {amount})"
    if owner_id is None:
        return wallet_id, f"{logged} belongs to no {owner}: its key names none"
    if not wanted:
        return wallet_id, (f"{logged} is a row {owner} {owner_id} ({statuses[status]}) cannot have")
    return wallet_id, (
        f"{logged} does not match {owner} {owner_id} ({statuses[status]}), whose "
        f"{_KIND_NAMES[want_kind]} is {want} on wallet {want_wallet}"
    )


async def _check_held(dsn: str, found: Callable[[UUID, str], None]) -> None:
    connection = await connect(dsn)
    try:
        rows = await connection.fetch(HELD_CHECK)
    finally:
        await connection.close()
    for wallet_id, held, pending in rows:
        found(wallet_id, f"held {held} != sum of its PENDING holds {pending}")


async def _check_feed_positions(dsn: str, found: Callable[[UUID, str], None]) -> None:
    connection = await connect(dsn)
    try:
        rows = await connection.fetch(FEED_POSITIONS_CHECK)
    finally:
        await connection.close()
    for wallet_id, xid, row_id in rows:
        if xid is None or row_id is None:
            found(wallet_id, "a change-feed row has no position")
        else:
            found(wallet_id, f"change-feed position {xid}-{row_id} is shared by several rows")


@dataclass(frozen=True, slots=True)
class RestoreReport:
    wallets: int
    repaired: int
    seconds: float

    def summary(self) -> str:
        return (
            f"restore: {self.wallets} wallets, {self.repaired} snapshot rows rebuilt from the "
            f"log in {self.seconds:.1f} s"
        )


# Every wallet's snapshot from its log; rows already equal are left alone.
_RESTORE = f"""
WITH replay AS (
    SELECT wallet_id,
           sum({SIGNED_BALANCE_SQL}) AS balance,
           sum({SIGNED_HELD_SQL}) AS held,
           max(seq) AS seq,
           max(created_at) AS updated_at
      FROM wallet_operations
     GROUP BY wallet_id
), target AS (
    SELECT w.id,
           coalesce(r.balance, 0)::bigint AS balance,
           coalesce(r.held, 0)::bigint AS held,
           coalesce(r.seq, 0) AS seq,
           coalesce(r.updated_at, w.created_at) AS updated_at,
           coalesce(u.status_after, 1)::smallint AS status,
           coalesce(u.overdraft_limit_after, 0)::bigint AS overdraft_limit,
           nullif(CASE WHEN u.seq IS NULL THEN walletd_creation_metadata(w.create_fingerprint)
                       ELSE u.metadata END, '{{}}'::jsonb) AS metadata
      FROM wallets w LEFT JOIN replay r ON r.wallet_id = w.id
      -- The status, overdraft limit and metadata of the wallet's last WALLET_UPDATE row
      -- (index wallet_operations_updates), or the defaults and the creation's metadata.
      LEFT JOIN LATERAL (
          SELECT c.seq, c.status_after, c.overdraft_limit_after, c.metadata
            FROM wallet_operations c
           WHERE c.wallet_id = w.id AND c.kind = 9 ORDER BY c.seq DESC LIMIT 1) u ON true
)
UPDATE wallets AS w
   SET balance = t.balance, held = t.held, seq = t.seq, updated_at = t.updated_at,
       status = t.status, overdraft_limit = t.overdraft_limit, metadata = t.metadata
  FROM target t
 WHERE w.id = t.id
   AND (w.balance, w.held, w.seq, w.updated_at, w.status, w.overdraft_limit,
        nullif(w.metadata, '{{}}'::jsonb))
       IS DISTINCT FROM (t.balance, t.held, t.seq, t.updated_at, t.status, t.overdraft_limit,
                         t.metadata)
"""


async def restore(dsn: str, progress: ProgressSink | None = None) -> RestoreReport:
    """Rebuild the snapshot from the log; refuses (DatabaseBusy) while walletd serves."""
    started = time.perf_counter()
    progress = progress or _NoProgress()
    connection = await connect(dsn)
    try:
        # Every shard lease taken for the operator: refused while a server holds one, and
        # no server can claim (or write to) a shard until the restore is over.
        progress.set_total(1)
        async with hold_every_lease(connection), connection.transaction():
            await connection.execute("LOCK TABLE wallets, wallet_operations IN EXCLUSIVE MODE")
            # A CLOSED wallet's row may be rebuilt too (migration
            # "wallet_status_and_overdraft": its trigger lets this transaction through).
            await connection.execute("SET LOCAL walletd.restoring = 'on'")
            status = await connection.execute(_RESTORE)
            wallets = await connection.fetchval("SELECT count(*) FROM wallets")
        progress.advance(1)
    finally:
        await connection.close()
    repaired = int(status.split()[-1])
    return RestoreReport(int(wallets), repaired, time.perf_counter() - started)


@dataclass(frozen=True, slots=True)
class SeedReport:
    wallets: int
    operations: int
    seconds: float

    def summary(self) -> str:
        return (
            f"seed: {self.wallets} wallets and {self.operations} operations created in "
            f"{self.seconds:.1f} s"
        )


# Seeded history: deposits of 100.00 on odd seqs, withdrawals of 30.00 on even ones, so
# every balance stays positive and the chain is easy to check by eye.
_SEED_DEPOSIT_MINOR = 10_000
_SEED_WITHDRAW_MINOR = 3_000


def _seed_chunk(
    count: int, ops_each: int, ops_extra: int, base_us: int
) -> tuple[list[tuple[object, ...]], list[tuple[object, ...]], int]:
    """Rows for ``count`` wallets: the first ``ops_extra`` get one operation more."""
    wallet_rows: list[tuple[object, ...]] = []
    op_rows: list[tuple[object, ...]] = []
    created = _EPOCH + dt.timedelta(microseconds=base_us)
    step = dt.timedelta(microseconds=1)
    for index in range(count):
        wallet_id = new_uuid4()
        ops = ops_each + (1 if index < ops_extra else 0)
        balance = 0
        at = created
        for seq in range(1, ops + 1):
            at = created + seq * step
            if seq % 2:
                balance += _SEED_DEPOSIT_MINOR
                op_rows.append((wallet_id, seq, _DEPOSIT, _SEED_DEPOSIT_MINOR, balance, at))
            else:
                balance -= _SEED_WITHDRAW_MINOR
                op_rows.append((wallet_id, seq, _WITHDRAW, _SEED_WITHDRAW_MINOR, balance, at))
        wallet_rows.append((wallet_id, balance, ops, created, at))
    return wallet_rows, op_rows, len(op_rows)


def _chunks(wallets: int, chunk: int) -> Iterator[tuple[int, int]]:
    """(first wallet index, wallets in the chunk) for every chunk."""
    for first in range(0, wallets, chunk):
        yield first, min(chunk, wallets - first)


async def seed(
    dsn: str, wallets: int, operations: int = 0, progress: ProgressSink | None = None
) -> SeedReport:
    """Create ``wallets`` wallets and ``operations`` operations spread evenly, in one
    transaction, with COPY; snapshot rows match their logs exactly."""
    if wallets < 0 or operations < 0:
        raise ValueError("--wallets and --operations must not be negative")
    if operations and not wallets:
        raise ValueError("operations need wallets: give --wallets too")
    started = time.perf_counter()
    progress = progress or _NoProgress()
    progress.set_total(wallets)
    ops_each, ops_extra_total = divmod(operations, wallets) if wallets else (0, 0)
    base_us = time.time_ns() // 1000
    written_ops = 0
    connection = await connect(dsn)
    try:
        async with connection.transaction():
            for first, count in _chunks(wallets, SEED_CHUNK_WALLETS):
                extra = max(0, min(count, ops_extra_total - first))
                wallet_rows, op_rows, made = _seed_chunk(count, ops_each, extra, base_us)
                await connection.copy_records_to_table(
                    "wallets",
                    records=wallet_rows,
                    columns=("id", "balance", "seq", "created_at", "updated_at"),
                )
                if op_rows:
                    await connection.copy_records_to_table(
                        "wallet_operations",
                        records=op_rows,
                        columns=("wallet_id", "seq", "kind", "amount", "balance_after",
                                 "created_at"),
                    )  # fmt: skip
                written_ops += made
                progress.advance(count)
        await connection.execute("ANALYZE wallets, wallet_operations")
    finally:
        await connection.close()
    return SeedReport(wallets, written_ops, time.perf_counter() - started)
