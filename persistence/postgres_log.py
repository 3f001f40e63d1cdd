"""``WalletLog`` on PostgreSQL.

A batch is appended with ONE statement, ``SELECT walletd_append_batch(...)``, sent in
autocommit: one round trip, one implicit transaction (log rows + snapshot moves), atomic.
Which calls may have committed when they fail:

- the pool could not hand out a connection      -> StorageUnavailable (nothing sent)
- the server answered with an error              -> StorageError (rolled back); a definite
                                                    refusal of the rows (a constraint, a
                                                    walletd check) -> StorageRefused
- the connection broke or timed out after send   -> CommitOutcomeUnknown

Every call is bounded: waiting for a connection by ``acquire_timeout_s``, each statement by
the pool's ``command_timeout``; an outage therefore surfaces as an error within seconds.

Alternatives to the function call were measured (``python -m loadtest.append_bench``,
docs/BENCHMARKS.md): ``executemany`` (BEGIN, two pipelined statements, COMMIT, and no row
counts to fence with) and COPY into a temporary table + INSERT..SELECT + UPDATE (five round
trips). The function call was fastest at batch sizes 1 to 100 and tied with COPY at 1000,
where the server-side work (FK checks, index inserts) dominates, so it stays.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from operator import attrgetter
from uuid import UUID

import asyncpg
import orjson

from walletd.engine.model import (
    HOLD_KINDS,
    NO_METADATA,
    Batch,
    HoldRecord,
    HoldStatus,
    Metadata,
    NewWallet,
    OperationKind,
    OperationRecord,
    PaymentDecision,
    PaymentPhase,
    PaymentRecord,
    PostingRecord,
    RefusalReason,
    RefusalRecord,
    SnapshotUpdate,
    TransferRecord,
    TransferStatus,
    WalletRecord,
    WalletStatus,
    as_metadata,
)
from walletd.engine.money import Currency, currency_of
from walletd.engine.ports import (
    CommitOutcomeUnknown,
    HoldNotPending,
    PredecessorPending,
    StaleEpoch,
    StorageError,
    StorageRefused,
    StorageUnavailable,
    TransferNotPending,
    WalletLog,
)

__all__ = ["HISTORY_BEFORE_SQL", "HISTORY_FIRST_SQL", "PostgresLog", "is_definite_refusal"]

# The fence runs first, in the same statement and so the same transaction: it locks the
# lease rows of the batch's shards (FOR KEY SHARE) and refuses a stale epoch (WDF01) before
# anything is written (migration shard_leases, docs/SCALING.md).
# $25-$28 (migration "holds"): held_after and reference per log row, held per snapshot,
# reference per refusal; $29-$30 (migration "actors_on_log_rows"): the actor (API key name)
# per log row and per refusal; $33-$35 (migration "metadata"): the metadata of each new
# wallet, log row and refusal, as JSON text, each list empty when the batch has none
# (a NULL per element is padded in by unnest: no encoding on the path without metadata).
_APPEND_BATCH = (
    "walletd_append_batch($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14,"
    " $15, $16, $17, $18, $19, $20, $21, $22, $23, $24, $27, $28, $29, $30, $31, $32,"
    " $33, $34, $35)"
)
_FENCE = " FROM walletd_fence($25::integer[], $26::bigint[])"
_APPEND = "SELECT " + _APPEND_BATCH + _FENCE
# Sent instead of eight (nine) empty lists for the common batch with no refusal.
_NO_REFUSALS: tuple[list[object], ...] = ([],) * 8
_NO_REFUSAL_REFERENCES: list[object] = []
_NO_METADATA_ARGS: tuple[list[object], ...] = ([],) * 3

# A batch that opens or closes transfers, or creates or resolves holds, writes them in the
# same statement, hence the same implicit transaction, as its log rows and snapshots
# (migrations "transfers" and "holds"). The placeholders after $35 are numbered in order.
# Each call also gets the batch's log rows (wallet, seq, kind, amount, key: $5 $6 $7 $8 $10,
# sent once) and refuses legs or hold rows that do not match its transfers or holds
# (migration "legs_match_their_transfers_and_holds": WD006, WD007). So it is called whenever
# the batch has a row of its kinds, even with no transfer or hold to write: a leg row
# without its transfer is refused there too.
# The last argument: the refund_of of each opened transfer (migration
# "refunds_and_reversals", which checks the refunds' bound: WD010).
_TRANSFERS_CALL = "walletd_append_transfers({}, $5, $6, $7, $8, $10, {})"
_TRANSFERS_ARGS = 11
_HOLDS_CALL = "walletd_append_holds({}, $5, $6, $7, $8, $10)"
_HOLDS_ARGS = 17
# The currency of the batch's new wallets (migration "wallet_currencies"), right after the
# call that inserts them; the new wallets' ids are $1.
_CURRENCIES_CALL = "walletd_set_currencies($1, {})"
_CURRENCIES_ARGS = 2
_LEG_KINDS = frozenset(
    {OperationKind.TRANSFER_OUT, OperationKind.TRANSFER_IN, OperationKind.TRANSFER_REFUND}
)
# A batch with WALLET_UPDATE rows (status, overdraft limit: migration
# "wallet_status_and_overdraft") calls walletd_append_wallet_updates last, after the
# transfers and holds it writes (a close is refused while one is PENDING); it checks the
# rows against the updates like the two calls above (WD008).
_UPDATES_CALL = "walletd_append_wallet_updates({}, $5, $6, $7)"
_UPDATES_ARGS = 4


def _append_statement(transfers: bool, holds: bool, updates: bool, currencies: bool) -> str:
    calls = [_APPEND_BATCH]
    next_arg = 36
    for wanted, call, count in (
        (currencies, _CURRENCIES_CALL, _CURRENCIES_ARGS),
        (transfers, _TRANSFERS_CALL, _TRANSFERS_ARGS),
        (holds, _HOLDS_CALL, _HOLDS_ARGS),
        (updates, _UPDATES_CALL, _UPDATES_ARGS),
    ):
        if wanted:
            numbers = [f"${n}" for n in range(next_arg, next_arg + count)]
            if call is _TRANSFERS_CALL:  # its last argument comes after the batch's rows
                calls.append(call.format(", ".join(numbers[:-1]), numbers[-1]))
            else:
                calls.append(call.format(", ".join(numbers)))
            next_arg += count
    if updates:
        # The snapshots' metadata (walletd_append_batch's snap_metadata), last: a batch with
        # WALLET_UPDATE rows moves the metadata of their wallets (NULL: unchanged).
        calls[0] = _APPEND_BATCH[:-1] + f", ${next_arg})"
    return "SELECT " + ", ".join(calls) + _FENCE


_APPEND_STATEMENTS = {
    (transfers, holds, updates, currencies): _append_statement(
        transfers, holds, updates, currencies
    )
    for transfers in (False, True)
    for holds in (False, True)
    for updates in (False, True)
    for currencies in (False, True)
}

_MICROS = "(extract(epoch FROM {0}) * 1000000)::bigint"

_WALLET_COLUMNS = (
    "id, balance, seq, "
    + _MICROS.format("created_at")
    + ", "
    + _MICROS.format("updated_at")
    + ", create_idempotency_key, create_fingerprint, held, status, overdraft_limit, metadata,"
    + " currency, exponent"
)
# Each wallet's outgoing PENDING transfers (ids and amounts, columns 13-14; NULL: none),
# in the same statement as the wallets, no second round trip: the room under the balance
# ceiling their refunds need (engine/ledger.py ``Resident.outs``). Their sender's shard,
# the only one that opens them, is not writing these wallets while it loads them. Served
# by transfers_by_status (the PENDING ones, few) or transfers_from (the wallets' history),
# as the planner picks: a partial index on from_wallet_id WHERE status = 1 would make it
# one short probe per wallet (docs/ARCHITECTURE.md, "Transfers").
_PENDING_OUT = (
    "SELECT from_wallet_id, array_agg(id) AS out_ids, array_agg(amount) AS out_amounts"
    " FROM transfers WHERE status = 1 AND from_wallet_id = ANY({0}) GROUP BY from_wallet_id"
)
_LOAD_WALLETS = (
    f"WITH o AS ({_PENDING_OUT.format('$1::uuid[]')})"
    f" SELECT {_WALLET_COLUMNS}, o.out_ids, o.out_amounts"
    " FROM wallets LEFT JOIN o ON o.from_wallet_id = wallets.id"
    " WHERE wallets.id = ANY($1::uuid[])"
)
_HOLD_COLUMNS = (
    "id, wallet_id, shard, amount, status, "
    + _MICROS.format("expires_at")
    + ", captured, to_wallet_id, transfer_id, reference, create_key, create_fingerprint,"
    " resolve_key, resolve_fingerprint, "
    + _MICROS.format("created_at")
    + ", "
    + _MICROS.format("updated_at")
    # A hold's metadata is its HOLD row's (migration "metadata"): one lookup of the unique
    # (wallet_id, idempotency_key) index by the row's key.
    + (
        ", (SELECT o.metadata FROM wallet_operations o WHERE o.wallet_id = holds.wallet_id"
        " AND o.idempotency_key = chr(31) || 'HOLD:' || holds.id::text)"
    )
    # Its wallet's currency (a hold has none of its own): one primary-key lookup.
    + ", (SELECT w.currency || ':' || w.exponent FROM wallets w WHERE w.id = holds.wallet_id)"
)
_LOAD_HOLDS = f"SELECT {_HOLD_COLUMNS} FROM holds WHERE id = ANY($1::uuid[])"
# The PENDING holds of the loaded wallets that have any (index holds_pending_by_wallet).
_PENDING_HOLDS_OF = (
    f"SELECT {_HOLD_COLUMNS} FROM holds WHERE wallet_id = ANY($1::uuid[]) AND status = 1"
)
_EXPIRED_HOLDS = f"""
SELECT {_HOLD_COLUMNS} FROM holds
 WHERE status = 1 AND shard = ANY($1::integer[])
   AND expires_at <= timestamptz 'epoch' + $2 * interval '1 microsecond'
 ORDER BY expires_at, id LIMIT $3
"""
# No index on updated_at on purpose: it would turn every snapshot move into a non-HOT
# update. Warm-up is opt-in and runs once at start; a top-N sort of the table is its cost.
_RECENT_WALLETS = (
    "WITH w AS (SELECT id AS wid FROM wallets ORDER BY updated_at DESC LIMIT $1),"
    f" o AS ({_PENDING_OUT.format('ARRAY(SELECT wid FROM w)')})"
    f" SELECT {_WALLET_COLUMNS}, o.out_ids, o.out_amounts"
    " FROM w JOIN wallets ON wallets.id = w.wid LEFT JOIN o ON o.from_wallet_id = wallets.id"
    " ORDER BY updated_at DESC"
)
_FIND_BY_CREATE_KEY = (
    f"SELECT {_WALLET_COLUMNS} FROM wallets WHERE create_idempotency_key = ANY($1::text[])"
)
_OP_BASE_COLUMNS = (
    "o.id, o.wallet_id, o.seq, o.kind, o.amount, o.balance_after, o.idempotency_key, "
    + _MICROS.format("o.created_at")
    + ", o.held_after, o.reference, o.actor, o.metadata"
)
# Columns 0-11: a log row (11: its metadata). History: then a WALLET_UPDATE row's status
# and limit (NULL on every other row).
_OP_COLUMNS = _OP_BASE_COLUMNS + ", o.status_after, o.overdraft_limit_after"
# A found row's status and overdraft limit in force, what its replay answers with: the
# wallet's last WALLET_UPDATE row at or before it (index wallet_operations_updates).
_OP_TERMS_COLUMNS = _OP_BASE_COLUMNS + ", t.status_after, t.overdraft_limit_after"
_TERMS_JOIN = (
    " LEFT JOIN LATERAL (SELECT c.status_after, c.overdraft_limit_after FROM wallet_operations c"
    " WHERE c.wallet_id = o.wallet_id AND c.kind = 9 AND c.seq <= o.seq"
    " ORDER BY c.seq DESC LIMIT 1) t ON true"
)
# A refusal in the columns of a found log row (id 0, seq = fence_seq, actor, metadata; no
# status or limit), then its reason (column 14).
_REFUSAL_COLUMNS = (
    "0::bigint, r.wallet_id, r.fence_seq, r.kind, r.amount, r.balance_seen,"
    f" r.idempotency_key, {_MICROS.format('r.created_at')}, 0::bigint, r.reference, r.actor,"
    " r.metadata, NULL::smallint, NULL::bigint, r.reason"
)
# The decided outcome of each key: its log row, or its recorded refusal (reason > 0), and
# the key asked for (last column). A bulk item's derived key "<request key><US><index>"
# (US inside, never first: http/parsing.py derived_key) also finds a row stored under the
# old spelling "<request key>/<index>" that existed before the upgrade (old_key_spelling,
# migration "old_key_spelling"): a retry of a bulk request sent before the upgrade replays
# its items. A row written since under that spelling is a client's key and never matches.
_FIND_OPERATIONS = f"""
WITH k AS (SELECT * FROM unnest($1::uuid[], $2::text[]) AS k(wallet_id, key)),
     old AS (SELECT wallet_id, key, replace(key, chr(31), '/') AS spelled
               FROM k WHERE strpos(key, chr(31)) > 1)
SELECT {_OP_TERMS_COLUMNS}, 0::smallint, k.key
  FROM k JOIN wallet_operations o ON o.wallet_id = k.wallet_id AND o.idempotency_key = k.key
  {_TERMS_JOIN}
UNION ALL
SELECT {_OP_TERMS_COLUMNS}, 0::smallint, old.key
  FROM old JOIN wallet_operations o
    ON o.wallet_id = old.wallet_id AND o.idempotency_key = old.spelled AND o.old_key_spelling
  {_TERMS_JOIN}
UNION ALL
SELECT {_REFUSAL_COLUMNS}, k.key
  FROM k JOIN wallet_refusals r ON r.wallet_id = k.wallet_id AND r.idempotency_key = k.key
UNION ALL
SELECT {_REFUSAL_COLUMNS}, old.key
  FROM old JOIN wallet_refusals r
    ON r.wallet_id = old.wallet_id AND r.idempotency_key = old.spelled AND r.old_key_spelling
"""
HISTORY_FIRST_SQL = f"""
SELECT {_OP_COLUMNS} FROM wallet_operations o
 WHERE o.wallet_id = $1 ORDER BY o.seq DESC LIMIT $2
"""
HISTORY_BEFORE_SQL = f"""
SELECT {_OP_COLUMNS} FROM wallet_operations o
 WHERE o.wallet_id = $1 AND o.seq < $2 ORDER BY o.seq DESC LIMIT $3
"""

# A transfer's actor and metadata are its debit row's (migrations "actors_on_log_rows",
# "metadata"): one lookup of the unique (wallet_id, idempotency_key) index by the debit
# leg's key.
_TRANSFER_COLUMNS = (
    "t.id, t.from_wallet_id, t.to_wallet_id, t.amount, t.reference, t.status, t.failure_code, "
    + _MICROS.format("t.created_at")
    + ", "
    + _MICROS.format("t.updated_at")
    + ", d.actor, d.metadata"
    # The transfer's currency is its wallets' (the sender's read): one primary-key lookup.
    ", (SELECT w.currency || ':' || w.exponent FROM wallets w WHERE w.id = t.from_wallet_id)"
    # The transfer a refund gives money back for, and what the transfer's own refunds
    # that are not FAILED sum to (migration "refunds_and_reversals": one probe of the
    # partial index transfers_refunds, empty but for refunds).
    ", t.refund_of, (SELECT coalesce(sum(r.amount), 0) FROM transfers r"
    " WHERE r.refund_of = t.id AND r.status <> 3)"
    # A payment's posting names its payment (migration "payments").
    ", pp.payment_id, pp.idx"
)
_TRANSFERS = (
    "transfers t LEFT JOIN LATERAL (SELECT o.actor, o.metadata FROM wallet_operations o"
    " WHERE o.wallet_id = t.from_wallet_id"
    " AND o.idempotency_key = chr(31) || 'TRANSFER_OUT:' || t.id::text) d ON true"
    " LEFT JOIN payment_postings pp ON pp.transfer_id = t.id"
)
_LOAD_TRANSFERS = f"SELECT {_TRANSFER_COLUMNS} FROM {_TRANSFERS} WHERE t.id = ANY($1::uuid[])"
_PENDING_TRANSFERS = f"""
SELECT {_TRANSFER_COLUMNS} FROM {_TRANSFERS}
 WHERE status = 1 AND created_at < timestamptz 'epoch' + $1 * interval '1 microsecond'
   AND pp.transfer_id IS NULL -- a payment's posting is driven by its payment
   AND ($3::bigint IS NULL
        OR (created_at, id) > (timestamptz 'epoch' + $3 * interval '1 microsecond', $4::uuid))
 ORDER BY created_at, id LIMIT $2
"""

# What a transfer's refunds that are not FAILED sum to (index transfers_refunds).
_REFUNDED_AMOUNT = (
    "SELECT coalesce(sum(amount), 0) FROM transfers WHERE refund_of = $1 AND status <> 3"
)
# A wallet's log row by seq, and the row that reverses it (index
# wallet_operations_reversed_once, migration "refunds_and_reversals"), in one statement.
_READ_OPERATION = f"""
SELECT {_OP_COLUMNS}, 0 AS which FROM wallet_operations o WHERE o.wallet_id = $1 AND o.seq = $2
UNION ALL
SELECT {_OP_COLUMNS}, 1 FROM wallet_operations o
 WHERE o.wallet_id = $1 AND o.kind IN (10, 11)
   AND split_part(o.idempotency_key, ':', 2) = $2::bigint::text
"""

# Payments (migration "payments"): the row and its postings, in order, with each posting's
# transfer status (NULL: not debited yet).
_PAYMENT_COLUMNS = (
    "p.id, p.phase, p.currency, p.exponent, p.reference, p.metadata::text, p.actor, "
    + _MICROS.format("p.created_at")
    + ", "
    + _MICROS.format("p.updated_at")
    + ", p.failed_index, p.failure_code, p.balance_seen, p.failed_side, pp.transfer_id,"
    " pp.from_wallet_id, pp.to_wallet_id, pp.amount, pp.metadata::text, t.status,"
    " t.failure_code"
)
_PAYMENT_ROWS = (
    "payments p JOIN payment_postings pp ON pp.payment_id = p.id"
    " LEFT JOIN transfers t ON t.id = pp.transfer_id"
)
_LOAD_PAYMENTS = (
    f"SELECT {_PAYMENT_COLUMNS} FROM {_PAYMENT_ROWS} WHERE p.id = ANY($1::uuid[])"
    " ORDER BY p.id, pp.idx"
)
# A wave of payments opened, or decided, in one statement (engine/payments.py).
_OPEN_PAYMENTS = (
    "SELECT walletd_open_payments($1, $2, $3, $4, $5::jsonb[], $6, $7, $8, $9, $10, $11, $12,"
    " $13::jsonb[])"
)
_DECIDE_PAYMENTS = "SELECT walletd_decide_payments($1, $2, $3, $4, $5, $6)"
# Payments not final: DEBITING ones (index payments_debiting), and those with a PENDING
# posting (index transfers_pending).
_PENDING_PAYMENTS = """
SELECT id FROM (
    SELECT p.id, p.created_at FROM payments p
     WHERE p.phase = 1 AND p.created_at < timestamptz 'epoch' + $1 * interval '1 microsecond'
    UNION
    SELECT p.id, p.created_at FROM transfers t
      JOIN payment_postings pp ON pp.transfer_id = t.id
      JOIN payments p ON p.id = pp.payment_id
     WHERE t.status = 1 AND t.created_at < timestamptz 'epoch' + $1 * interval '1 microsecond'
) AS pending
ORDER BY created_at, id LIMIT $2
"""
# How many PENDING transfers a wallet is on, either side (index transfers_pending: the
# PENDING ones only, a short list).
_PENDING_TRANSFERS_OF = """
SELECT count(*) FROM transfers
 WHERE status = 1 AND (from_wallet_id = $1 OR to_wallet_id = $1)
"""

# Raised by walletd_append_batch when an earlier batch of the shard has not landed yet.
_PREDECESSOR_PENDING = "WD002"
# Raised by walletd_append_transfers when a transfer to close is no longer PENDING.
_TRANSFER_NOT_PENDING = "WD004"
# Raised by walletd_append_holds when a hold to close is no longer PENDING.
_HOLD_NOT_PENDING = "WD005"
# Raised by walletd_fence when a shard's lease epoch is newer than the batch's.
_STALE_EPOCH = "WDF01"
# Raised by walletd_append_transfers (WD006: a transfer leg unlike its transfer) and
# walletd_append_holds (WD007: a hold row unlike its hold): definite refusals (below),
# nothing written, the message names the row; no retry can make such a batch pass.
# Raised by walletd_append_batch when a snapshot's seq is ahead of the batch's: another
# writer. Not the batch's content at fault: the whole batch fails (503) and is re-read.
_ANOTHER_WRITER = "WD001"
# Definite refusals of what a batch holds: the same rows would be refused again, so the
# pipeline isolates the command at fault instead of failing its neighbours with it
# (engine/shard.py). Class 22 (data exception: a value out of its type's range), class 23
# (integrity: CHECK, UNIQUE, NOT NULL), P0001 (RAISE EXCEPTION without a code, as an
# operator's trigger raises it), and walletd's own raised checks ("WD...", except the
# fencing and lease codes above, which say nothing about the rows).
_REFUSAL_CLASSES = ("22", "23")
_REFUSAL_CODES = frozenset({"P0001"})
_NOT_REFUSALS = frozenset({_PREDECESSOR_PENDING, _ANOTHER_WRITER, _STALE_EPOCH})


def is_definite_refusal(sqlstate: str | None) -> bool:
    """Whether a PostgreSQL error refuses the rows themselves (see _REFUSAL_CLASSES)."""
    if not sqlstate or sqlstate in _NOT_REFUSALS:
        return False
    return sqlstate[:2] in _REFUSAL_CLASSES or sqlstate in _REFUSAL_CODES or sqlstate[:2] == "WD"


# Errors after which nobody knows whether the server ran the statement. A broken connection
# surfaces as ConnectionDoesNotExistError, a PostgresError subclass, so order matters.
_BROKEN_CONNECTION = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
)
# Server-side ends of a connection (pg_terminate_backend, a crash, a dropped socket):
# PostgresError subclasses that say nothing about whether a commit landed.
_CONNECTION_LOST = (
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
)


def _joined_currency(text: str | None) -> Currency | None:
    """A wallet's currency read as "<code>:<exponent>" (None: no such wallet)."""
    if text is None:
        return None
    code, _, exponent = text.partition(":")
    return currency_of(code, int(exponent))


def stored_metadata(text: str | None) -> Metadata:
    """A jsonb metadata column as the engine holds it (NULL: none)."""
    if text is None:
        return NO_METADATA
    return as_metadata(orjson.loads(text))


def metadata_args(metadata: Sequence[Metadata]) -> list[object]:
    """Metadata objects as jsonb parameters (JSON text; NULL for none). Called only for a
    list that holds some: the caller sends an empty list otherwise (unnest pads NULLs)."""
    return [orjson.dumps(dict(m)).decode() if m else None for m in metadata]


def _snapshot_metadata(
    ops: Sequence[OperationRecord], snaps: Sequence[SnapshotUpdate]
) -> list[object]:
    """Each snapshot's metadata for a batch with WALLET_UPDATE rows: its wallet's last such
    row's (the wallet's metadata after it), ``{}`` when that is empty (NULL would leave the
    stored one), NULL for a wallet the batch does not update."""
    updated = {o.wallet_id: o.metadata for o in ops if o.kind == OperationKind.WALLET_UPDATE}
    return [
        None if (m := updated.get(s.wallet_id)) is None else orjson.dumps(dict(m)).decode()
        for s in snaps
    ]


def _wallet(row: asyncpg.Record) -> WalletRecord:
    # Columns 13-14 (the outgoing PENDING transfers) only where the statement reads them.
    out_ids = row[13] if len(row) > 13 else None
    return WalletRecord(
        row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7], (),
        currency_of(row[11], row[12]), WalletStatus(row[8]), row[9], stored_metadata(row[10]),
        () if out_ids is None else tuple(zip(out_ids, row[14], strict=True)),
    )  # fmt: skip


def _hold(row: asyncpg.Record) -> HoldRecord:
    return HoldRecord(
        row[0], row[1], row[2], row[3], HoldStatus(row[4]), row[5], row[6], row[7], row[8],
        row[9], row[10], row[11], row[12], row[13], row[14], row[15], _joined_currency(row[17]),
        stored_metadata(row[16]),
    )  # fmt: skip


def _operation(row: asyncpg.Record) -> OperationRecord:
    """A log row; its status and limit are the row's own (a WALLET_UPDATE row's), else
    those in force when selected with them (find_operations), else the defaults."""
    return OperationRecord(
        row[1], row[2], OperationKind(row[3]), row[4], row[5], row[6], row[7], row[8], row[9],
        row[10], WalletStatus(row[12] or WalletStatus.ACTIVE), row[13] or 0,
        stored_metadata(row[11]),
    )  # fmt: skip


def _transfer(row: asyncpg.Record) -> TransferRecord:
    return TransferRecord(
        row[0], row[1], row[2], row[3], row[4], TransferStatus(row[5]), row[6], row[7], row[8],
        row[9], _joined_currency(row[11]), stored_metadata(row[10]), row[12], int(row[13]),
        row[14], row[15],
    )  # fmt: skip


def _payments(rows: Sequence[asyncpg.Record]) -> dict[UUID, PaymentRecord]:
    """Payments from their rows (one per posting, in order)."""
    found: dict[UUID, PaymentRecord] = {}
    postings: dict[UUID, list[PostingRecord]] = {}
    for row in rows:
        payment_id = row[0]
        if payment_id not in found:
            found[payment_id] = PaymentRecord(
                payment_id, (), PaymentPhase(row[1]), currency_of(row[2], row[3]), row[4],
                stored_metadata(row[5]), row[6], row[7], row[8], row[9], row[10], row[11],
                row[12],
            )  # fmt: skip
        postings.setdefault(payment_id, []).append(
            PostingRecord(
                row[13],
                row[14],
                row[15],
                row[16],
                stored_metadata(row[17]),
                None if row[18] is None else TransferStatus(row[18]),
                row[19],
            )
        )
    return {i: p._replace(postings=tuple(postings[i])) for i, p in found.items()}


def _decided(row: asyncpg.Record) -> OperationRecord | RefusalRecord:
    if not row[14]:
        return _operation(row)
    return RefusalRecord(
        row[1], row[6], OperationKind(row[3]), row[4], RefusalReason(row[14]), row[5], row[2],
        row[7], row[9], row[10], stored_metadata(row[11]),
    )  # fmt: skip


def _any_metadata(records: Sequence[NewWallet | OperationRecord | RefusalRecord]) -> bool:
    return any(map(_METADATA_OF, records))


_METADATA_OF = attrgetter("metadata")


class ConnectBackoff:
    """Fail fast while PostgreSQL is known to be unreachable, probing with growing gaps.

    After a failed connect, calls fail at once (503) until the backoff window ends; the next
    call then tries for real. The window doubles on each failure, from ``first_s`` up to
    ``max_s``, and resets on success. It keeps an outage from turning every request into a
    connect attempt that waits out the connect timeout.
    """

    def __init__(self, first_s: float = 0.05, max_s: float = 1.0) -> None:
        self._first_s = first_s
        self._max_s = max_s
        self._window_s = 0.0
        self._retry_at = 0.0
        self.last_error = ""

    def check(self, now: float) -> None:
        if now < self._retry_at:
            raise StorageUnavailable(
                f"PostgreSQL unreachable (retrying in {self._retry_at - now:.2f} s): "
                f"{self.last_error}"
            )

    def failed(self, now: float, error: BaseException) -> None:
        self._window_s = min(self._max_s, max(self._first_s, 2 * self._window_s))
        self._retry_at = now + self._window_s
        self.last_error = repr(error)

    def succeeded(self) -> None:
        self._window_s = 0.0
        self._retry_at = 0.0


class PostgresLog(WalletLog):
    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        acquire_timeout_s: float = 2.0,
        backoff: ConnectBackoff | None = None,
    ) -> None:
        self._pool = pool
        self._acquire_timeout_s = acquire_timeout_s
        self._backoff = backoff or ConnectBackoff()

    async def _acquire(self) -> asyncpg.Connection:
        self._backoff.check(time.monotonic())
        try:
            connection: asyncpg.Connection = await self._pool.acquire(
                timeout=self._acquire_timeout_s
            )
        except TimeoutError as error:
            # Every connection busy (or a connect too slow): not a sign of an outage alone.
            raise StorageUnavailable(f"no PostgreSQL connection: {error!r}") from error
        except (*_BROKEN_CONNECTION, asyncpg.PostgresError) as error:
            self._backoff.failed(time.monotonic(), error)
            raise StorageUnavailable(f"no PostgreSQL connection: {error!r}") from error
        self._backoff.succeeded()
        return connection

    async def _fetch(self, query: str, *args: object) -> list[asyncpg.Record]:
        connection = await self._acquire()
        try:
            rows: list[asyncpg.Record] = await connection.fetch(query, *args)
            return rows
        except _BROKEN_CONNECTION as error:
            raise StorageUnavailable(f"storage unreachable: {error!r}") from error
        except asyncpg.PostgresError as error:
            raise StorageError(f"query failed: {error}") from error
        finally:
            await self._pool.release(connection)

    async def load_wallets(self, wallet_ids: Sequence[UUID]) -> dict[UUID, WalletRecord]:
        rows = await self._fetch(_LOAD_WALLETS, wallet_ids)
        return {record.wallet_id: record for record in await self._with_holds(rows)}

    async def _with_holds(self, rows: list[asyncpg.Record]) -> list[WalletRecord]:
        """The wallets of the rows, each with its PENDING holds: a second query, only for
        wallets that hold something. Their shard is the only writer of both and is not
        writing them while it loads them, so the two reads agree."""
        records = [_wallet(row) for row in rows]
        holding = [record.wallet_id for record in records if record.held]
        if not holding:
            return records
        by_wallet: dict[UUID, list[HoldRecord]] = {}
        for row in await self._fetch(_PENDING_HOLDS_OF, holding):
            hold = _hold(row)
            by_wallet.setdefault(hold.wallet_id, []).append(hold)
        return [
            replace(record, holds=tuple(by_wallet.get(record.wallet_id, ())))
            if record.held else record
            for record in records
        ]  # fmt: skip

    async def load_holds(self, hold_ids: Sequence[UUID]) -> dict[UUID, HoldRecord]:
        rows = await self._fetch(_LOAD_HOLDS, hold_ids)
        return {row[0]: _hold(row) for row in rows}

    async def expired_holds(
        self, shards: Sequence[int], now_us: int, limit: int
    ) -> list[HoldRecord]:
        rows = await self._fetch(_EXPIRED_HOLDS, list(shards), now_us, limit)
        return [_hold(row) for row in rows]

    async def find_operations(
        self, keys: Sequence[tuple[UUID, str]]
    ) -> dict[tuple[UUID, str], OperationRecord | RefusalRecord]:
        rows = await self._fetch(_FIND_OPERATIONS, [k[0] for k in keys], [k[1] for k in keys])
        found: dict[tuple[UUID, str], OperationRecord | RefusalRecord] = {}
        for row in rows:
            record = _decided(row)
            asked: str = row[15]
            if record.idempotency_key == asked:
                found[(record.wallet_id, asked)] = record
            elif (record.wallet_id, asked) not in found:
                # A row of the old spelling, known as the derived key asked for (the key
                # cache and the replay speak of that key); a row stored under the key
                # itself, if both ever exist, wins.
                found[(record.wallet_id, asked)] = record._replace(idempotency_key=asked)
        return found

    async def find_wallets_by_create_key(self, keys: Sequence[str]) -> dict[str, WalletRecord]:
        rows = await self._fetch(_FIND_BY_CREATE_KEY, keys)
        return {row[5]: _wallet(row) for row in rows}

    async def pending_transfers_of(self, wallet_id: UUID) -> int:
        rows = await self._fetch(_PENDING_TRANSFERS_OF, wallet_id)
        return int(rows[0][0])

    async def load_transfers(self, transfer_ids: Sequence[UUID]) -> dict[UUID, TransferRecord]:
        rows = await self._fetch(_LOAD_TRANSFERS, transfer_ids)
        return {row[0]: _transfer(row) for row in rows}

    async def refunded_amount(self, transfer_id: UUID) -> int:
        rows = await self._fetch(_REFUNDED_AMOUNT, transfer_id)
        return int(rows[0][0])

    async def read_operation(
        self, wallet_id: UUID, seq: int
    ) -> tuple[OperationRecord | None, OperationRecord | None]:
        found: list[OperationRecord | None] = [None, None]
        for row in await self._fetch(_READ_OPERATION, wallet_id, seq):
            found[row[14]] = _operation(row)
        return found[0], found[1]

    async def pending_transfers(
        self, created_before_us: int, limit: int, after: tuple[int, UUID] | None = None
    ) -> list[TransferRecord]:
        after_us, after_id = after if after is not None else (None, None)
        rows = await self._fetch(_PENDING_TRANSFERS, created_before_us, limit, after_us, after_id)
        return [_transfer(row) for row in rows]

    async def load_payments(self, payment_ids: Sequence[UUID]) -> dict[UUID, PaymentRecord]:
        return _payments(await self._fetch(_LOAD_PAYMENTS, payment_ids))

    async def open_payment(self, payment: PaymentRecord) -> PaymentRecord:
        return (await self.open_payments([payment]))[0]

    async def open_payments(self, payments: Sequence[PaymentRecord]) -> list[PaymentRecord]:
        postings = [p for payment in payments for p in payment.postings]
        rows = await self._fetch(
            _OPEN_PAYMENTS, [p.payment_id for p in payments],
            [p.currency.code for p in payments], [p.currency.exponent for p in payments],
            [p.reference for p in payments], metadata_args([p.metadata for p in payments]),
            [p.actor for p in payments], [p.created_at_us for p in payments],
            [len(p.postings) for p in payments], [p.transfer_id for p in postings],
            [p.from_wallet_id for p in postings], [p.to_wallet_id for p in postings],
            [p.amount for p in postings], metadata_args([p.metadata for p in postings]),
        )  # fmt: skip
        stored_us: list[int | None] = list(rows[0][0])
        # Stored now, as asked (its own instant), or found stored before: read back.
        known = [p.payment_id for p, us in zip(payments, stored_us, strict=True)
                 if us != p.created_at_us]  # fmt: skip
        loaded = await self.load_payments(known) if known else {}
        return [
            p if us == p.created_at_us else loaded[p.payment_id]
            for p, us in zip(payments, stored_us, strict=True)
        ]

    async def decide_payment(
        self,
        payment: PaymentRecord,
        phase: PaymentPhase,
        failed_index: int | None,
        failure_code: str | None,
        balance_seen: int | None,
        now_us: int,
    ) -> PaymentRecord:
        decision = PaymentDecision(payment, phase, failed_index, failure_code, balance_seen, now_us)
        (decided,) = await self.decide_payments([decision])
        if decided is None:
            raise StorageRefused(f"payment {payment.payment_id} cannot be decided {phase.name}")
        return decided

    async def decide_payments(
        self, decisions: Sequence[PaymentDecision]
    ) -> list[PaymentRecord | None]:
        # In payment id order: the rows' locks are taken in one order by every wave.
        order = sorted(range(len(decisions)), key=lambda i: decisions[i].payment.payment_id)
        wave = [decisions[i] for i in order]
        now_us = max(d.now_us for d in wave)  # the wave's one instant, stored on each
        rows = await self._fetch(
            _DECIDE_PAYMENTS, [d.payment.payment_id for d in wave], [int(d.phase) for d in wave],
            [d.failed_index for d in wave], [d.failure_code for d in wave],
            [d.balance_seen for d in wave], now_us,
        )  # fmt: skip
        phases: list[int] = list(rows[0][0])
        decided: dict[int, PaymentRecord | None] = {}
        reread: list[int] = []
        for i, phase in zip(order, phases, strict=True):
            asked = decisions[i]
            if phase == 0:
                decided[i] = None
            elif phase == PaymentPhase.CREDITING and asked.phase is PaymentPhase.CREDITING:
                # As asked: every posting PENDING (the function checked it): no read back.
                payment = asked.payment
                pending = tuple(
                    p._replace(status=TransferStatus.PENDING) if p.status is None else p
                    for p in payment.postings
                )
                decided[i] = payment._replace(
                    phase=PaymentPhase.CREDITING, postings=pending, updated_at_us=now_us
                )
            else:
                reread.append(i)
        if reread:
            loaded = await self.load_payments([decisions[i].payment.payment_id for i in reread])
            for i in reread:
                decided[i] = loaded.get(decisions[i].payment.payment_id)
        return [decided[i] for i in range(len(decisions))]

    async def pending_payments(self, created_before_us: int, limit: int) -> list[PaymentRecord]:
        ids = [row[0] for row in await self._fetch(_PENDING_PAYMENTS, created_before_us, limit)]
        found = await self.load_payments(ids) if ids else {}
        return sorted(found.values(), key=lambda p: (p.created_at_us, p.payment_id))

    async def append_batch(self, batch: Batch) -> None:
        news, ops, snaps = batch.new_wallets, batch.operations, batch.snapshots
        refusals = batch.refusals
        args: tuple[list[object], ...] = (
            [n.wallet_id for n in news],
            [n.created_at_us for n in news],
            [n.create_idempotency_key for n in news],
            [n.create_fingerprint for n in news],
            [o.wallet_id for o in ops],
            [o.seq for o in ops],
            [int(o.kind) for o in ops],
            [o.amount for o in ops],
            [o.balance_after for o in ops],
            [o.idempotency_key for o in ops],
            [o.created_at_us for o in ops],
            [s.wallet_id for s in snaps],
            [s.prev_seq for s in snaps],
            [s.seq for s in snaps],
            [s.balance for s in snaps],
            [s.updated_at_us for s in snaps],
        )
        refusal_args = _NO_REFUSALS
        if refusals:
            refusal_args = (
                [r.wallet_id for r in refusals],
                [r.idempotency_key for r in refusals],
                [int(r.kind) for r in refusals],
                [r.amount for r in refusals],
                [int(r.reason) for r in refusals],
                [r.balance_seen for r in refusals],
                [r.fence_seq for r in refusals],
                [r.created_at_us for r in refusals],
            )
        fence: tuple[list[object], ...] = (
            [shard for shard, _ in batch.fence],
            [epoch for _, epoch in batch.fence],
        )
        args += refusal_args + fence
        args += (
            [o.held_after for o in ops],
            [o.reference for o in ops],
            [s.held for s in snaps],
            [r.reference for r in refusals] if refusals else _NO_REFUSAL_REFERENCES,
            [o.actor for o in ops],
            [r.actor for r in refusals] if refusals else _NO_REFUSAL_REFERENCES,
        )
        # Metadata only when some is there (the hot path sends three empty lists): the
        # wallets, log rows and refusals of the batch each checked by one pass in C.
        if _any_metadata(news) or _any_metadata(ops) or _any_metadata(refusals):
            args += (
                metadata_args([n.metadata for n in news]),
                metadata_args([o.metadata for o in ops]),
                metadata_args([r.metadata for r in refusals]),
            )
        else:
            args += _NO_METADATA_ARGS
        kinds = args[6]
        opens_or_closes = bool(batch.new_transfers or batch.transfer_updates)
        transfers = opens_or_closes or not _LEG_KINDS.isdisjoint(kinds)
        holds = bool(batch.new_holds or batch.hold_updates) or not HOLD_KINDS.isdisjoint(kinds)
        updates = bool(batch.wallet_updates) or OperationKind.WALLET_UPDATE in kinds
        statement = _APPEND_STATEMENTS[(transfers, holds, updates, bool(news))]
        if news:
            args += ([n.currency.code for n in news], [n.currency.exponent for n in news])
        if transfers:
            opened, closed = batch.new_transfers, batch.transfer_updates
            args += (
                [t.transfer_id for t in opened],
                [t.from_wallet_id for t in opened],
                [t.to_wallet_id for t in opened],
                [t.amount for t in opened],
                [t.reference for t in opened],
                [t.created_at_us for t in opened],
                [u.transfer_id for u in closed],
                [int(u.status) for u in closed],
                [u.failure_code for u in closed],
                [u.updated_at_us for u in closed],
                [t.refund_of for t in opened],
            )
        if holds:
            created, resolved = batch.new_holds, batch.hold_updates
            args += (
                [h.hold_id for h in created],
                [h.wallet_id for h in created],
                [h.shard for h in created],
                [h.amount for h in created],
                [h.expires_at_us for h in created],
                [h.reference for h in created],
                [h.create_key for h in created],
                [h.create_fingerprint for h in created],
                [h.created_at_us for h in created],
                [u.hold_id for u in resolved],
                [int(u.status) for u in resolved],
                [u.captured for u in resolved],
                [u.to_wallet_id for u in resolved],
                [u.transfer_id for u in resolved],
                [u.resolve_key for u in resolved],
                [u.resolve_fingerprint for u in resolved],
                [u.updated_at_us for u in resolved],
            )
        if updates:
            changed = batch.wallet_updates
            args += (
                [u.wallet_id for u in changed],
                [u.seq for u in changed],
                [int(u.status) for u in changed],
                [u.overdraft_limit for u in changed],
                _snapshot_metadata(ops, snaps),
            )
        connection = await self._acquire()
        try:
            await connection.execute(statement, *args)
        except asyncpg.DataError as error:
            # asyncpg could not encode an argument: refused before anything was sent.
            raise StorageRefused(f"batch refused: {error}", "22000") from error
        except (*_BROKEN_CONNECTION, *_CONNECTION_LOST) as error:
            # Checked before PostgresError: these are PostgresError subclasses, yet the
            # commit may have happened before the connection went.
            raise CommitOutcomeUnknown(f"connection lost during commit: {error!r}") from error
        except asyncpg.PostgresError as error:
            if error.sqlstate == _PREDECESSOR_PENDING:
                raise PredecessorPending(str(error)) from error
            if error.sqlstate == _TRANSFER_NOT_PENDING:
                raise TransferNotPending(str(error), error.sqlstate) from error
            if error.sqlstate == _HOLD_NOT_PENDING:
                raise HoldNotPending(str(error), error.sqlstate) from error
            if error.sqlstate == _STALE_EPOCH:
                raise StaleEpoch(str(error), [shard for shard, _ in batch.fence]) from error
            if is_definite_refusal(error.sqlstate):
                # The detail names the row ("Failing row contains (<id>, ...)", "Key
                # (id)=(<id>) already exists"): the pipeline starts isolating from it.
                detail = getattr(error, "detail", None) or ""
                raise StorageRefused(
                    f"batch refused: {error} {detail}".rstrip(), error.sqlstate
                ) from error
            raise StorageError(f"batch refused: {error}") from error
        finally:
            await self._pool.release(connection)

    async def read_history(
        self, wallet_id: UUID, before_seq: int | None, limit: int
    ) -> list[tuple[int, OperationRecord]]:
        if before_seq is None:
            rows = await self._fetch(HISTORY_FIRST_SQL, wallet_id, limit)
        else:
            rows = await self._fetch(HISTORY_BEFORE_SQL, wallet_id, before_seq, limit)
        return [(row[0], _operation(row)) for row in rows]

    async def recent_wallets(self, limit: int) -> list[WalletRecord]:
        rows = await self._fetch(_RECENT_WALLETS, limit)
        return await self._with_holds(rows)

    async def ping(self) -> None:
        await self._fetch("SELECT 1")
