"""The engine's records: what a wallet looks like, and what a batch writes to the log.

Times are integer microseconds since the Unix epoch (UTC): exact, cheap, and free of
time zones; the HTTP edge renders them.

Records made for every operation are NamedTuples: immutable like a frozen dataclass, but
built in C (a frozen dataclass costs 1.5-2.5 µs per instance in its ``__init__``, and the
hot path makes three per operation).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Final, NamedTuple
from uuid import UUID

from walletd.engine.money import SEED_CURRENCY, Currency

__all__ = [
    "CREDIT_KINDS",
    "HOLD_KINDS",
    "NO_METADATA",
    "REVERSAL_KINDS",
    "Batch",
    "HoldRecord",
    "HoldStatus",
    "HoldUpdate",
    "Metadata",
    "MetadataPatch",
    "NewWallet",
    "OperationKind",
    "OperationRecord",
    "PaymentDecision",
    "PaymentPhase",
    "PaymentRecord",
    "PaymentStatus",
    "PostingRecord",
    "RefusalReason",
    "RefusalRecord",
    "SnapshotUpdate",
    "TransferRecord",
    "TransferStatus",
    "TransferUpdate",
    "WalletRecord",
    "WalletStatus",
    "WalletUpdate",
    "WalletView",
    "as_metadata",
    "merge_metadata",
]


# A client's metadata object (wallets, operations, transfers, holds): its (key, value) pairs
# sorted by key. Immutable and hashable like the records that carry it, and one spelling
# per object, so two requests carry the same metadata exactly when their tuples are equal
# (an idempotent retry is compared so). Bounds: engine/bounds.py storable_metadata.
Metadata = tuple[tuple[str, str], ...]
# No metadata: an empty object and an absent one are the same.
NO_METADATA: Final[Metadata] = ()


def as_metadata(mapping: dict[str, str]) -> Metadata:
    """The one spelling of a metadata object (its pairs sorted by key)."""
    return tuple(sorted(mapping.items())) if mapping else NO_METADATA


# A change of a wallet's metadata (PATCH): (key, value) pairs sorted by key, a None value
# deleting its key; merged into the wallet's by ``merge_metadata``.
MetadataPatch = tuple[tuple[str, str | None], ...]


def merge_metadata(metadata: Metadata, patch: MetadataPatch) -> Metadata:
    """``metadata`` with ``patch`` merged in: each key set to its value, or deleted (None;
    a key it does not have is no change). The result is spelled as ``as_metadata``'s, so an
    unchanged merge compares equal to what it started from."""
    merged = dict(metadata)
    for key, value in patch:
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = value
    return as_metadata(merged)


class OperationKind(enum.IntEnum):
    DEPOSIT = 1
    WITHDRAW = 2
    # The legs of a transfer (docs/ARCHITECTURE.md, "Transfers"): the debit on the sending
    # wallet, the credit on the receiving one, and the refund that compensates a debit
    # whose credit was refused.
    TRANSFER_OUT = 3
    TRANSFER_IN = 4
    TRANSFER_REFUND = 5
    # Holds (docs/ARCHITECTURE.md, "Holds"): HOLD reserves money (balance unchanged, held
    # up), CAPTURE takes captured money out of the wallet (balance and held down), RELEASE
    # gives the rest of a hold back to ``available`` (held down) on capture, void or expiry.
    HOLD = 6
    CAPTURE = 7
    RELEASE = 8
    # A change of the wallet itself (PATCH /api/v1/wallets/{id}: status, overdraft limit,
    # metadata): amount 0, balance and held unchanged; its row carries the wallet's status,
    # overdraft limit and metadata after the change (``status_after``,
    # ``overdraft_limit_after``, ``metadata``), whichever of them it changed.
    WALLET_UPDATE = 9
    # Reversals of a client's DEPOSIT or WITHDRAW (docs/ARCHITECTURE.md, "Refunds and
    # reversals"): the opposite movement of the same amount on the same wallet, at most once
    # per operation. Their key is "<US>REVERSAL:<seq of the original>:<key digest>"
    # (engine.commands.reversal_key); storage allows one per (wallet, original seq).
    DEPOSIT_REVERSAL = 10
    WITHDRAW_REVERSAL = 11


# Kinds that add money to their wallet; every other kind takes it out.
CREDIT_KINDS = frozenset(
    {
        OperationKind.DEPOSIT,
        OperationKind.TRANSFER_IN,
        OperationKind.TRANSFER_REFUND,
        OperationKind.WITHDRAW_REVERSAL,
    }
)

# The reversal of each reversible kind (a client's deposit or withdrawal), and back.
REVERSAL_KINDS = {
    OperationKind.DEPOSIT: OperationKind.DEPOSIT_REVERSAL,
    OperationKind.WITHDRAW: OperationKind.WITHDRAW_REVERSAL,
}


# Kinds that move ``held``: their log key is "<US>KIND:<hold id>" (engine.commands.hold_key).
HOLD_KINDS = frozenset({OperationKind.HOLD, OperationKind.CAPTURE, OperationKind.RELEASE})


class HoldStatus(enum.IntEnum):
    """PENDING: the amount is held (in ``held``, out of ``available``). The others are final:
    CAPTURED (captured part taken, rest released), VOIDED and EXPIRED (all released)."""

    PENDING = 1
    CAPTURED = 2
    VOIDED = 3
    EXPIRED = 4


class TransferStatus(enum.IntEnum):
    """PENDING: debited, not yet credited (the money is in flight, visibly). COMPLETED and
    FAILED (debit refunded) are final."""

    PENDING = 1
    COMPLETED = 2
    FAILED = 3


class RefusalReason(enum.IntEnum):
    """Why the engine refused an operation: the business refusals (409s) it records."""

    INSUFFICIENT_FUNDS = 1
    BALANCE_LIMIT_EXCEEDED = 2
    WALLET_FROZEN = 3
    WALLET_CLOSED = 4


class WalletStatus(enum.IntEnum):
    """ACTIVE: everything goes. FROZEN: credits only (every debit is refused). CLOSED:
    nothing moves, ever again; reached only with a zero balance, nothing held and no
    PENDING transfer."""

    ACTIVE = 1
    FROZEN = 2
    CLOSED = 3


class WalletView(NamedTuple):
    """A committed wallet as a client may see it."""

    wallet_id: UUID
    balance: int
    seq: int
    created_at_us: int
    updated_at_us: int
    # The part of ``balance`` that PENDING holds reserve; available = balance - held
    # + overdraft_limit.
    held: int = 0
    currency: Currency = SEED_CURRENCY
    status: WalletStatus = WalletStatus.ACTIVE
    # How far below zero a debit may take ``balance`` (minor units, >= 0).
    overdraft_limit: int = 0
    metadata: Metadata = NO_METADATA


@dataclass(frozen=True, slots=True)
class WalletRecord:
    """A wallet's snapshot row as stored, with the idempotency data of its creation."""

    wallet_id: UUID
    balance: int
    seq: int
    created_at_us: int
    updated_at_us: int
    create_idempotency_key: str | None = None
    create_fingerprint: str = ""
    held: int = 0
    # Its PENDING holds, loaded with it (their amounts sum to ``held``).
    holds: tuple[HoldRecord, ...] = ()
    currency: Currency = SEED_CURRENCY
    status: WalletStatus = WalletStatus.ACTIVE
    overdraft_limit: int = 0
    metadata: Metadata = NO_METADATA
    # Its outgoing PENDING transfers (id, amount), loaded with it: the room under the
    # balance ceiling their refunds may need (engine/ledger.py ``Resident.outs``).
    pending_out: tuple[tuple[UUID, int], ...] = ()

    def view(self) -> WalletView:
        return WalletView(
            self.wallet_id, self.balance, self.seq, self.created_at_us, self.updated_at_us,
            self.held, self.currency, self.status, self.overdraft_limit, self.metadata,
        )  # fmt: skip


class OperationRecord(NamedTuple):
    """One row of the durable log: the operation and the balance right after it."""

    wallet_id: UUID
    seq: int
    kind: OperationKind
    amount: int
    balance_after: int
    idempotency_key: str | None
    created_at_us: int
    held_after: int = 0
    # The client's reconciliation string (DEPOSIT/WITHDRAW), part of the request's identity.
    reference: str | None = None
    # The name of the API key whose request wrote the row (a transfer's legs: the key that
    # asked for the transfer); None when auth is off, or for the expiry sweep's releases.
    actor: str | None = None
    # The wallet's status and overdraft limit at this row (changed only by WALLET_UPDATE
    # rows): what a replay of the row answers with.
    status_after: WalletStatus = WalletStatus.ACTIVE
    overdraft_limit_after: int = 0
    # The metadata of what wrote the row, fixed at its creation and part of the request's
    # identity like ``reference``: the operation's own, or its transfer's or hold's; on a
    # WALLET_UPDATE row, the wallet's after the change.
    metadata: Metadata = NO_METADATA


class RefusalRecord(NamedTuple):
    """A keyed operation the engine refused, stored so a retry with its key replays it.

    ``fence_seq`` is the wallet's seq the refusal rests on, not counting its own batch's
    writes: storage writes it only once that seq is stored (behind: ``PredecessorPending``),
    so a refusal decided on state that never committed is never recorded.
    """

    wallet_id: UUID
    idempotency_key: str
    kind: OperationKind
    amount: int
    reason: RefusalReason
    balance_seen: int
    fence_seq: int
    created_at_us: int
    reference: str | None = None
    actor: str | None = None  # as OperationRecord.actor
    metadata: Metadata = NO_METADATA  # as OperationRecord.metadata


@dataclass(frozen=True, slots=True)
class NewWallet:
    wallet_id: UUID
    created_at_us: int
    create_idempotency_key: str | None
    create_fingerprint: str
    currency: Currency = SEED_CURRENCY
    metadata: Metadata = NO_METADATA


class SnapshotUpdate(NamedTuple):
    """The snapshot row of a wallet after a batch; ``prev_seq`` fences concurrent writers."""

    wallet_id: UUID
    prev_seq: int
    seq: int
    balance: int
    updated_at_us: int
    held: int = 0


class WalletUpdate(NamedTuple):
    """A WALLET_UPDATE row's change, written with it: the wallet's status and overdraft
    limit from ``seq`` on. Storage refuses a close while the wallet has a PENDING hold or
    transfer, and any change of a CLOSED wallet."""

    wallet_id: UUID
    seq: int
    status: WalletStatus
    overdraft_limit: int


class HoldRecord(NamedTuple):
    """A hold as stored. ``shard`` is its wallet's (and its own id's) shard, kept so the
    expiry sweep reads only the holds of the shards its process serves. ``create_key`` /
    ``create_fingerprint``: the Idempotency-Key it was created with and what the request
    was; ``resolve_key`` / ``resolve_fingerprint`` the same for the capture or void."""

    hold_id: UUID
    wallet_id: UUID
    shard: int
    amount: int
    status: HoldStatus
    expires_at_us: int
    captured: int
    to_wallet_id: UUID | None
    transfer_id: UUID | None
    reference: str | None
    create_key: str | None
    create_fingerprint: str
    resolve_key: str | None
    resolve_fingerprint: str | None
    created_at_us: int
    updated_at_us: int
    # Its wallet's (not a stored column of the hold: read with the wallet's).
    currency: Currency | None = None
    # Fixed at creation; stored on its HOLD row and carried by its CAPTURE / RELEASE rows
    # (and by the transfer a capture into another wallet opens), as ``reference`` is.
    metadata: Metadata = NO_METADATA


class HoldUpdate(NamedTuple):
    """A hold leaving PENDING; storage refuses it unless the hold is PENDING."""

    hold_id: UUID
    status: HoldStatus
    captured: int
    to_wallet_id: UUID | None
    transfer_id: UUID | None
    resolve_key: str | None
    resolve_fingerprint: str | None
    updated_at_us: int


class TransferRecord(NamedTuple):
    """A transfer as stored; ``failure_code`` says why a FAILED one was refunded."""

    transfer_id: UUID
    from_wallet_id: UUID
    to_wallet_id: UUID
    amount: int
    reference: str | None
    status: TransferStatus
    failure_code: str | None
    created_at_us: int
    updated_at_us: int
    # The API key that asked for the transfer (or the capture that opened it): every leg's
    # row carries it, on whichever process applies the leg. Stored as the debit row's actor.
    actor: str | None = None
    # The currency of both wallets (the sender's, read with it; not a column of its own):
    # each leg is refused (CURRENCY_MISMATCH) on a wallet of another currency. None when
    # not known (a leg from a process that predates currencies): not checked.
    currency: Currency | None = None
    # Fixed at the request, part of its identity; every leg's row carries it, and the
    # transfer's is its debit row's (like ``actor``).
    metadata: Metadata = NO_METADATA
    # A refund (docs/API.md, "Refunds"): the COMPLETED transfer it gives money back for,
    # from that transfer's receiver to its sender. Storage refuses the refund's debit when
    # the refunds of that transfer that are not FAILED would sum past its amount (WD010).
    refund_of: UUID | None = None
    # What its refunds that are not FAILED sum to, as storage read it with the transfer
    # (0 for one the engine just built: a new transfer has no refunds).
    refunded: int = 0
    # The payment whose posting this transfer is (docs/ARCHITECTURE.md, "Payments"), and
    # the posting's index: such a transfer is driven by its payment only, never alone.
    payment_id: UUID | None = None
    payment_index: int | None = None


class TransferUpdate(NamedTuple):
    """A transfer leaving PENDING; storage refuses it unless the transfer is PENDING."""

    transfer_id: UUID
    status: TransferStatus
    failure_code: str | None
    updated_at_us: int


class PaymentPhase(enum.IntEnum):
    """What storage decided of a payment (docs/ARCHITECTURE.md, "Payments"), once:
    DEBITING until every posting is debited or one debit is refused; then CREDITING (every
    posting gets its credit, none is refunded) or FAILING (every debited posting is refunded,
    the others can never be debited)."""

    DEBITING = 1
    CREDITING = 2
    FAILING = 3


class PaymentStatus(enum.IntEnum):
    """A payment as clients see it: PENDING until its phase is decided and every posting
    closed; then COMPLETED (every posting credited) or FAILED (none applied)."""

    PENDING = 1
    COMPLETED = 2
    FAILED = 3


class PostingRecord(NamedTuple):
    """One posting of a payment: a transfer (``transfer_id``, derived from the payment's id
    and the index) with its stored status; None while it is not debited (no transfer row)."""

    transfer_id: UUID
    from_wallet_id: UUID
    to_wallet_id: UUID
    amount: int
    metadata: Metadata = NO_METADATA
    status: TransferStatus | None = None
    failure_code: str | None = None


class PaymentRecord(NamedTuple):
    """A payment as stored: its postings (in order), its phase, and for a failed one the
    posting refused first (``failed_index``) with the refusal's code and the balance the
    refusal was decided against."""

    payment_id: UUID
    postings: tuple[PostingRecord, ...]
    phase: PaymentPhase
    currency: Currency
    reference: str | None
    metadata: Metadata
    actor: str | None
    created_at_us: int
    updated_at_us: int
    failed_index: int | None = None
    failure_code: str | None = None
    balance_seen: int | None = None
    # Which wallet of the refused posting refused: "from" (its debit) or "to" (CLOSED).
    failed_side: str | None = None

    @property
    def status(self) -> PaymentStatus:
        if self.phase is PaymentPhase.DEBITING:
            return PaymentStatus.PENDING
        final = (
            TransferStatus.COMPLETED
            if self.phase is PaymentPhase.CREDITING
            else (TransferStatus.FAILED)
        )
        if all(posting.status is final for posting in self.postings):
            return (
                PaymentStatus.COMPLETED
                if final is TransferStatus.COMPLETED
                else (PaymentStatus.FAILED)
            )
        return PaymentStatus.PENDING

    def same_request(self, other: PaymentRecord) -> bool:
        """Whether ``other`` asks for the same payment (what a retry under its key is)."""
        mine = [(p.from_wallet_id, p.to_wallet_id, p.amount, p.metadata) for p in self.postings]
        theirs = [(p.from_wallet_id, p.to_wallet_id, p.amount, p.metadata) for p in other.postings]
        return (mine, self.reference, self.metadata) == (theirs, other.reference, other.metadata)


class PaymentDecision(NamedTuple):
    """What a driver asks storage to decide of a DEBITING payment (WalletLog.decide_payments):
    CREDITING, or FAILING naming the posting refused first."""

    payment: PaymentRecord
    phase: PaymentPhase
    failed_index: int | None
    failure_code: str | None
    balance_seen: int | None
    now_us: int


@dataclass(slots=True)
class Batch:
    """Everything one shard commit writes, atomically: created wallets, log rows, snapshots,
    the keyed refusals to replay, and the transfers its legs open (debits) or close
    (credits, refunds)."""

    new_wallets: list[NewWallet] = field(default_factory=list)
    operations: list[OperationRecord] = field(default_factory=list)
    snapshots: list[SnapshotUpdate] = field(default_factory=list)
    refusals: list[RefusalRecord] = field(default_factory=list)
    new_transfers: list[TransferRecord] = field(default_factory=list)
    transfer_updates: list[TransferUpdate] = field(default_factory=list)
    # Holds created (PENDING) and resolved by the batch's HOLD / CAPTURE / RELEASE rows.
    new_holds: list[HoldRecord] = field(default_factory=list)
    hold_updates: list[HoldUpdate] = field(default_factory=list)
    # The status / overdraft limit changes of its WALLET_UPDATE rows.
    wallet_updates: list[WalletUpdate] = field(default_factory=list)
    # (shard, lease epoch) of every shard the batch writes: the database refuses the batch
    # if one epoch is stale (engine/ownership.py). Empty when no leases are in use.
    fence: list[tuple[int, int]] = field(default_factory=list)

    def is_empty(self) -> bool:
        return not (self.new_wallets or self.operations or self.snapshots or self.refusals)
