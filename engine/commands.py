"""Commands a shard accepts, and the replies it sends back.

A command carries its reply future (the pykka envelope idea); the shard resolves it only
after the batch holding the command has committed, refusals included, because a refusal
depends on the operations ahead of it.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
from collections.abc import Sequence
from typing import Final, NamedTuple, Protocol
from uuid import UUID

from walletd.engine.model import (
    NO_METADATA,
    HoldRecord,
    Metadata,
    MetadataPatch,
    OperationKind,
    TransferRecord,
    TransferStatus,
    WalletStatus,
    WalletView,
)
from walletd.engine.money import SEED_CURRENCY, Currency

__all__ = [
    "REFUND_FAILURE_CODES",
    "ApplyOperation",
    "ApplyOperations",
    "Command",
    "CreateWallet",
    "HoldAction",
    "HoldCommand",
    "JointPayment",
    "JointTransfer",
    "Operation",
    "Outcome",
    "ReadWallet",
    "Reply",
    "TransferLeg",
    "UpdateWallet",
    "command_ids",
    "hold_key",
    "reversal_key",
    "reversal_of",
    "transfer_leg_key",
]


class Outcome(enum.Enum):
    OK = "OK"
    CREATED = "CREATED"
    WALLET_NOT_FOUND = "WALLET_NOT_FOUND"
    WALLET_ALREADY_EXISTS = "WALLET_ALREADY_EXISTS"
    INSUFFICIENT_FUNDS = "INSUFFICIENT_FUNDS"
    BALANCE_LIMIT_EXCEEDED = "BALANCE_LIMIT_EXCEEDED"
    IDEMPOTENCY_KEY_REUSED = "IDEMPOTENCY_KEY_REUSED"
    UNAVAILABLE = "UNAVAILABLE"
    # Not decided here: another walletd process serves the wallet's shard (bulk items).
    NOT_OWNER = "NOT_OWNER"
    # Holds: the hold is not PENDING in memory (resolved, or unknown): the caller reads
    # the stored hold to answer; past expires_at; too many PENDING holds on the wallet; a
    # capture of more than the hold.
    HOLD_NOT_PENDING = "HOLD_NOT_PENDING"
    HOLD_EXPIRED = "HOLD_EXPIRED"
    TOO_MANY_HOLDS = "TOO_MANY_HOLDS"
    CAPTURE_EXCEEDS_HOLD = "CAPTURE_EXCEEDS_HOLD"
    # Decided from the stored hold (engine/holds.py), not by the ledger.
    HOLD_NOT_FOUND = "HOLD_NOT_FOUND"
    HOLD_ALREADY_CAPTURED = "HOLD_ALREADY_CAPTURED"
    HOLD_ALREADY_VOIDED = "HOLD_ALREADY_VOIDED"
    # A capture into the hold's own wallet (422).
    SAME_WALLET = "SAME_WALLET"
    # A field past what storage can hold (a reference over 255 characters, an amount over
    # the maximum, a leg that does not match its kind): the ledger refuses it before it
    # joins a batch, so storage never refuses a batch for it (422).
    NOT_STORABLE = "NOT_STORABLE"
    # Storage refused the command when it stood alone in its batch (a constraint the
    # ledger cannot foresee, found by isolation in engine/shard.py): nothing applied (409).
    STORAGE_REFUSED = "STORAGE_REFUSED"
    # Wallet status (docs/ARCHITECTURE.md, "Wallet status and overdraft"): a debit of a
    # FROZEN wallet, anything on a CLOSED one (recorded under a client's key, replayed).
    WALLET_FROZEN = "WALLET_FROZEN"
    WALLET_CLOSED = "WALLET_CLOSED"
    # An If-Match that names another seq than the wallet's, decided in arrival order (412).
    PRECONDITION_FAILED = "PRECONDITION_FAILED"
    # A wallet update refused: a close of a wallet with money, holds or transfers in it
    # (``blocked_by`` says which); an overdraft limit below what the wallet already owes.
    CLOSE_BLOCKED = "CLOSE_BLOCKED"
    OVERDRAFT_LIMIT_IN_USE = "OVERDRAFT_LIMIT_IN_USE"
    # A metadata change whose merge leaves the wallet more keys than METADATA_KEYS_MAX
    # (422; the reply's balance_seen is how many).
    METADATA_TOO_MANY_KEYS = "METADATA_TOO_MANY_KEYS"
    # Money between wallets of different currencies (a transfer, a capture into another
    # wallet, an atomic group): refused before anything moves (422).
    CURRENCY_MISMATCH = "CURRENCY_MISMATCH"
    # An amount the wallet's currency cannot hold: more decimals than its exponent, or past
    # the maximum amount in its minor units (422 naming the field); the reply's currency
    # says which currency.
    AMOUNT_NOT_IN_CURRENCY = "AMOUNT_NOT_IN_CURRENCY"
    # Refunds (engine/transfers.py ``refund``), all 409 and never recorded (a retry is
    # decided again): more than the transfer has left to refund (also storage's WD010,
    # found alone by isolation); a refund of a transfer that is not COMPLETED; a refund of
    # a refund.
    REFUND_EXCEEDS_TRANSFER = "REFUND_EXCEEDS_TRANSFER"
    TRANSFER_NOT_FOUND = "TRANSFER_NOT_FOUND"
    TRANSFER_NOT_COMPLETED = "TRANSFER_NOT_COMPLETED"
    TRANSFER_IS_REFUND = "TRANSFER_IS_REFUND"
    # A refund of a payment's posting (or of the whole payment) while the payment is not
    # COMPLETED: its postings' outcome is not final yet (docs/API.md, "Payments").
    PAYMENT_NOT_COMPLETED = "PAYMENT_NOT_COMPLETED"
    # Reversals (engine/router.py ``reverse``): the operation was reversed already (under
    # another Idempotency-Key; also storage's unique index, found alone by isolation); it
    # is not a deposit or withdrawal; no such operation on the wallet.
    ALREADY_REVERSED = "ALREADY_REVERSED"
    NOT_REVERSIBLE = "NOT_REVERSIBLE"
    OPERATION_NOT_FOUND = "OPERATION_NOT_FOUND"
    # A posting of a payment that failed (engine/payments.py): its debit is refunded with
    # this code (another posting was refused; the payment names it).
    PAYMENT_FAILED = "PAYMENT_FAILED"


# The refusals of a transfer's credit that end it FAILED (the debit refunded): a refund leg
# carries one of these as its failure_code, stored on the transfer and read back as its
# outcome.
REFUND_FAILURE_CODES: Final = frozenset(
    {
        Outcome.WALLET_NOT_FOUND.value,
        Outcome.BALANCE_LIMIT_EXCEEDED.value,
        Outcome.WALLET_CLOSED.value,
        # Only when the receiver was created in another currency after the coordinator
        # read its currency (it was missing then): the debit is refunded.
        Outcome.CURRENCY_MISMATCH.value,
        # A debited posting of a payment that failed: refunded, never credited.
        Outcome.PAYMENT_FAILED.value,
    }
)


class Reply(NamedTuple):
    outcome: Outcome
    wallet: WalletView | None = None
    replayed: bool = False
    # For refusals: the balance the decision was made against (INSUFFICIENT_FUNDS detail).
    balance_seen: int | None = None
    # For ApplyOperations: one reply per item, in order. When an atomic group is refused,
    # the items up to and including the one refused (the last), none of them applied.
    # For a JointTransfer credited in the same batch: the credit's reply.
    items: tuple[Reply, ...] | None = None
    # For hold commands: the hold after the command (created or resolved), or as it was
    # when refused.
    hold: HoldRecord | None = None
    # For refusals that render money (INSUFFICIENT_FUNDS, BALANCE_LIMIT_EXCEEDED,
    # AMOUNT_NOT_IN_CURRENCY): the wallet's currency.
    currency: Currency | None = None
    # For CLOSE_BLOCKED: what blocks the close ("BALANCE", "HOLDS", "TRANSFERS").
    blocked_by: tuple[str, ...] = ()


class Operation(Protocol):
    """What the ledger reads of a deposit or withdrawal (an ApplyOperation, a bulk item)."""

    @property
    def wallet_id(self) -> UUID: ...
    @property
    def kind(self) -> OperationKind: ...
    @property
    def amount(self) -> int: ...
    @property
    def idempotency_key(self) -> str | None: ...
    @property
    def reference(self) -> str | None: ...
    # ``amount`` / 10^scale as the client wrote it, rescaled by the ledger to the wallet's
    # minor units (engine/money.py ``to_minor``); None: ``amount`` is in them already.
    @property
    def scale(self) -> int | None: ...
    @property
    def metadata(self) -> Metadata: ...


class ApplyOperation:
    __slots__ = (
        "actor", "amount", "expected_seq", "idempotency_key", "kind", "metadata", "reference",
        "reply", "scale", "wallet_id",
    )  # fmt: skip
    # Mailbox and batch bounds count operations: a command's weight is how many it holds.
    weight = 1

    def __init__(
        self,
        wallet_id: UUID,
        kind: OperationKind,
        amount: int,
        idempotency_key: str | None,
        reply: asyncio.Future[Reply],
        reference: str | None = None,
        actor: str | None = None,
        scale: int | None = None,
        expected_seq: int | None = None,
        metadata: Metadata = NO_METADATA,
    ) -> None:
        self.wallet_id = wallet_id
        self.kind = kind
        self.amount = amount
        self.scale = scale
        self.idempotency_key = idempotency_key
        self.reply = reply
        self.reference = reference
        # The API key's name, recorded on the row (model.OperationRecord.actor).
        self.actor = actor
        # If-Match: apply only if the wallet's seq is this one when the command's turn comes.
        self.expected_seq = expected_seq
        self.metadata = metadata


class ApplyOperations:
    """Many deposits/withdrawals of one shard travelling as one command: a bulk request's
    share. Decided in one batch, hence written in one PostgreSQL transaction; ``atomic``
    groups apply whole or not at all (the first refusal refuses the group)."""

    __slots__ = ("actor", "atomic", "items", "reply", "wallet_id", "weight")

    def __init__(
        self,
        items: Sequence[Operation],
        atomic: bool,
        reply: asyncio.Future[Reply],
        actor: str | None = None,
    ) -> None:
        self.items = items
        self.atomic = atomic
        self.actor = actor  # every item's: one request, one key
        self.reply = reply
        self.wallet_id = items[0].wallet_id  # for logs; the ledger reads every item's
        self.weight = len(items)


class CreateWallet:
    __slots__ = ("currency", "fingerprint", "idempotency_key", "metadata", "reply", "wallet_id")
    weight = 1

    def __init__(
        self,
        wallet_id: UUID,
        idempotency_key: str | None,
        fingerprint: str,
        reply: asyncio.Future[Reply],
        currency: Currency = SEED_CURRENCY,
        metadata: Metadata = NO_METADATA,
    ) -> None:
        self.wallet_id = wallet_id
        self.currency = currency
        self.idempotency_key = idempotency_key
        # What distinguishes one creation request from another under the same key (the
        # metadata included: engine/router.py create_wallet).
        self.fingerprint = fingerprint
        self.reply = reply
        self.metadata = metadata


def transfer_leg_key(kind: OperationKind, transfer_id: UUID) -> str:
    """The log key of one leg of a transfer on its wallet.

    It starts with the unit separator (0x1F), which the edge refuses in a client's
    Idempotency-Key, so a leg never collides with a client's operation; the unique
    (wallet, key) index of the log makes a second copy of a leg impossible.
    """
    return f"\x1f{kind.name}:{transfer_id}"


REVERSAL_KEY_PREFIX: Final = "\x1fREVERSAL:"


def reversal_key(original_seq: int, idempotency_key: str) -> str:
    """The log key of the reversal of the wallet's operation ``original_seq``, asked for
    under the client's ``idempotency_key``: "<US>REVERSAL:<seq>:<digest of the key>".

    Like a leg's it starts with the unit separator, so no client key collides with it. The
    client's key is in it (as a digest: the key may be 255 characters), so a retry under
    that key finds the reversal (or its recorded refusal) and replays it, while a reversal
    under another key is another key: storage's unique index on (wallet, original seq) of
    the reversal kinds (migration "refunds_and_reversals") refuses a second one."""
    digest = hashlib.sha256(idempotency_key.encode()).hexdigest()[:32]
    return f"{REVERSAL_KEY_PREFIX}{original_seq}:{digest}"


def reversal_of(key: str | None) -> int | None:
    """The seq of the operation a reversal's log key names (None: not a reversal key)."""
    if key is None or not key.startswith(REVERSAL_KEY_PREFIX):
        return None
    seq_text = key[len(REVERSAL_KEY_PREFIX) :].partition(":")[0]
    return int(seq_text) if seq_text.isdigit() else None


class TransferLeg:
    """One leg of a transfer, applied on the shard of its wallet.

    TRANSFER_OUT debits the sending wallet and opens the transfer (PENDING); TRANSFER_IN
    credits the receiving wallet and closes it COMPLETED; TRANSFER_REFUND credits the sending
    wallet back and closes it FAILED with ``failure_code``. Each leg is keyed by the
    transfer id, so delivering it again replays the first answer.

    ``fresh``: the coordinator knows the leg's key cannot be stored yet (its transfer id was
    just drawn, or the leg follows the debit this very drive committed), so the shard skips
    the key's lookup, a round trip in the pipeline's prepare step. The key cache still
    answers a replay; a key stored meanwhile by another driver (only across an ownership
    move) is refused by the unique (wallet_id, idempotency_key) index: a failed batch, 503,
    never a second leg.
    """

    __slots__ = (
        "closes_as", "failure_code", "fresh", "key", "kind", "reply", "transfer", "wallet_id",
    )  # fmt: skip
    weight = 1

    def __init__(
        self,
        kind: OperationKind,
        transfer: TransferRecord,
        reply: asyncio.Future[Reply],
        failure_code: str | None = None,
        *,
        fresh: bool = False,
    ) -> None:
        self.kind = kind
        self.transfer = transfer
        self.fresh = fresh
        self.reply = reply
        self.failure_code = failure_code
        self.wallet_id = (
            transfer.to_wallet_id if kind is OperationKind.TRANSFER_IN else transfer.from_wallet_id
        )
        self.key = transfer_leg_key(kind, transfer.transfer_id)
        self.closes_as: TransferStatus | None = {
            OperationKind.TRANSFER_IN: TransferStatus.COMPLETED,
            OperationKind.TRANSFER_REFUND: TransferStatus.FAILED,
        }.get(kind)

    # The debit leg is read by the ledger as an ``Operation`` keyed by its leg key, so its
    # refusal is recorded and replayed like a keyed withdrawal's (docs/ARCHITECTURE.md,
    # "Transfers": a retry of a refused transfer gets the original answer).
    @property
    def amount(self) -> int:
        return self.transfer.amount

    @property
    def idempotency_key(self) -> str:
        return self.key

    @property
    def reference(self) -> str | None:
        return self.transfer.reference

    # A transfer's amount is in its currency's minor units (the coordinator rescaled it).
    scale = None

    @property
    def metadata(self) -> Metadata:
        return self.transfer.metadata


def hold_key(kind: OperationKind, hold_id: UUID) -> str:
    """The log key of a HOLD / CAPTURE / RELEASE row of a hold: like a transfer leg's, it
    starts with the unit separator, so no client key collides with it, and the unique
    (wallet, key) index makes a second copy of any of them impossible."""
    return f"\x1f{kind.name}:{hold_id}"


class HoldAction(enum.Enum):
    CREATE = "CREATE"
    CAPTURE = "CAPTURE"
    VOID = "VOID"
    # The sweep: release a hold past its expires_at.
    EXPIRE = "EXPIRE"


class HoldCommand:
    """Create, capture, void or expire a hold of a wallet (the hold id hashes to the
    wallet's shard). CREATE carries the new ``hold`` (PENDING; its times are stamped by the
    ledger); CAPTURE takes ``amount`` (None: all of it) and releases the rest; VOID and
    EXPIRE release all of it. ``key`` / ``fingerprint``: the client's Idempotency-Key of
    a capture or void and what that request was, stored on the hold."""

    __slots__ = ("action", "actor", "amount", "expires_in_us", "fingerprint", "hold_id", "key",
                 "log_key", "metadata", "reference", "reply", "scale", "shard", "to_currency",
                 "to_wallet_id", "transfer_id", "wallet_id")  # fmt: skip
    weight = 1

    def __init__(
        self,
        action: HoldAction,
        wallet_id: UUID,
        hold_id: UUID,
        reply: asyncio.Future[Reply],
        *,
        amount: int | None = None,
        expires_in_us: int = 0,
        reference: str | None = None,
        shard: int = 0,
        key: str | None = None,
        fingerprint: str | None = None,
        to_wallet_id: UUID | None = None,
        transfer_id: UUID | None = None,
        actor: str | None = None,
        scale: int | None = None,
        to_currency: Currency | None = None,
        metadata: Metadata = NO_METADATA,
    ) -> None:
        self.action = action
        # ``amount`` / 10^scale as the client wrote it (None: in minor units already).
        self.scale = scale
        # A capture into another wallet: that wallet's currency, read before (None: not
        # known, it did not exist then); another currency than the hold's is refused.
        self.to_currency = to_currency
        self.metadata = metadata  # a creation's (a resolution carries the hold's own)
        self.actor = actor  # the key's name on the rows it writes; None for the sweep
        # A capture into another wallet opens this transfer (engine/holds.py).
        self.to_wallet_id = to_wallet_id
        self.transfer_id = transfer_id
        self.wallet_id = wallet_id
        self.hold_id = hold_id
        self.reply = reply
        self.amount = amount
        self.expires_in_us = expires_in_us
        self.reference = reference
        self.shard = shard
        self.key = key
        self.fingerprint = fingerprint
        # A keyed creation's HOLD row key, which the shard loads first: the id is derived
        # from the client's key, so the hold may exist already (a retry).
        self.log_key = (
            hold_key(OperationKind.HOLD, hold_id)
            if action is HoldAction.CREATE and key is not None
            else None
        )


class JointTransfer:
    """Both legs of a new transfer whose two wallets share one pipeline, decided in one
    batch, so stored in one commit: the debit, then the credit only if the receiver
    certainly takes it (resident, below the balance ceiling). The transfer is then written
    COMPLETED by that one transaction: no money in flight, one commit to wait for instead
    of two. Otherwise only the debit is applied (the transfer PENDING) and the coordinator
    goes on with the saga's credit, as for wallets on different pipelines.

    Answered with the debit's reply; when credited as well, its ``items`` hold the credit's.
    """

    __slots__ = ("credit", "debit", "reply", "wallet_id")
    # Two log rows; never split over batches (the drain keeps a command whole).
    weight = 2

    def __init__(
        self, transfer: TransferRecord, reply: asyncio.Future[Reply], *, fresh_debit: bool
    ) -> None:
        # The debit's key may hold a recorded refusal unless the id was just drawn; the
        # credit follows this very debit, so its key cannot be stored yet.
        self.debit = TransferLeg(OperationKind.TRANSFER_OUT, transfer, reply, fresh=fresh_debit)
        self.credit = TransferLeg(OperationKind.TRANSFER_IN, transfer, reply, fresh=True)
        self.reply = reply
        self.wallet_id = transfer.from_wallet_id


class JointPayment:
    """Every posting of a payment in one batch, when one pipeline owns all its wallets
    (engine/payments.py): decided whole on a scratch copy of the wallets first, as an atomic
    bulk group is; then every debit and every credit applied, so the payment's transfers
    are written COMPLETED by one commit, nothing in flight. When any leg would not apply
    (a refusal, a key already used, a wallet not resident), nothing is applied and the
    answer is NOT_OWNER: the coordinator then runs the saga, which records the refusal.

    Answered OK with ``items``: the credits' replies (the debits' are implied)."""

    __slots__ = ("credits", "debits", "reply", "wallet_id", "weight")

    def __init__(self, transfers: Sequence[TransferRecord], reply: asyncio.Future[Reply]) -> None:
        # The legs' keys cannot be stored yet (the payment was just opened by this driver);
        # one stored meanwhile by another driver is caught by storage's unique index.
        self.debits = tuple(
            TransferLeg(OperationKind.TRANSFER_OUT, t, reply, fresh=True) for t in transfers
        )
        self.credits = tuple(
            TransferLeg(OperationKind.TRANSFER_IN, t, reply, fresh=True) for t in transfers
        )
        self.reply = reply
        self.wallet_id = transfers[0].from_wallet_id
        # Two log rows per posting; never split over batches.
        self.weight = 2 * len(transfers)


class UpdateWallet:
    """PATCH /api/v1/wallets/{id}: a new status, overdraft limit and/or metadata change
    (None: unchanged; ``metadata`` is merged into the wallet's, a None value deleting its
    key), written as one WALLET_UPDATE row. ``fingerprint``: what the request was, stored on the
    row (as its reference) so that a retry with the same Idempotency-Key replays it and a
    different request under that key is refused. ``expected_seq``: If-Match.
    ``transfers_pending``: how many PENDING transfers storage had for the wallet when the
    request came (read only for a close; storage checks again when the close commits).
    ``limit_scale``: ``overdraft_limit`` is overdraft_limit / 10^limit_scale as the client
    wrote it, rescaled to the wallet's currency by its shard (None: in its minor units)."""

    __slots__ = (
        "actor", "expected_seq", "fingerprint", "idempotency_key", "limit_scale", "metadata",
        "overdraft_limit", "reply", "status", "transfers_pending", "wallet_id",
    )  # fmt: skip
    weight = 1

    def __init__(
        self,
        wallet_id: UUID,
        status: WalletStatus | None,
        overdraft_limit: int | None,
        idempotency_key: str | None,
        fingerprint: str,
        reply: asyncio.Future[Reply],
        *,
        expected_seq: int | None = None,
        actor: str | None = None,
        transfers_pending: int = 0,
        limit_scale: int | None = None,
        metadata: MetadataPatch | None = None,
    ) -> None:
        self.wallet_id = wallet_id
        self.metadata = metadata
        self.limit_scale = limit_scale
        self.status = status
        self.overdraft_limit = overdraft_limit
        self.idempotency_key = idempotency_key
        self.fingerprint = fingerprint
        self.reply = reply
        self.expected_seq = expected_seq
        self.actor = actor
        self.transfers_pending = transfers_pending


class ReadWallet:
    """A read of a wallet that is not resident: the shard loads it, then answers."""

    __slots__ = ("reply", "wallet_id")
    weight = 1

    def __init__(self, wallet_id: UUID, reply: asyncio.Future[Reply]) -> None:
        self.wallet_id = wallet_id
        self.reply = reply


Command = (
    ApplyOperation | ApplyOperations | CreateWallet | HoldCommand | ReadWallet | TransferLeg
    | JointTransfer | JointPayment | UpdateWallet
)  # fmt: skip


def command_ids(command: Command) -> tuple[set[int], set[int]]:
    """The wallets whose state a command reads or writes, and every id it names (those
    wallets, a hold's, a transfer's, a capture's receiver), as ints: what the pipeline
    matches against the ids a storage refusal names (engine/shard.py)."""
    if isinstance(command, ApplyOperations):
        wallets = {item.wallet_id.int for item in command.items}
        return wallets, set(wallets)
    if isinstance(command, JointTransfer):
        transfer = command.debit.transfer
        wallets = {transfer.from_wallet_id.int, transfer.to_wallet_id.int}
        return wallets, wallets | {transfer.transfer_id.int}
    if isinstance(command, JointPayment):
        wallets = set()
        named = set()
        for leg in command.debits:
            transfer = leg.transfer
            wallets |= {transfer.from_wallet_id.int, transfer.to_wallet_id.int}
            named.add(transfer.transfer_id.int)
        return wallets, wallets | named
    wallets = {command.wallet_id.int}
    named = set(wallets)
    if isinstance(command, TransferLeg):
        transfer = command.transfer
        named |= {transfer.transfer_id.int, transfer.from_wallet_id.int, transfer.to_wallet_id.int}
    elif isinstance(command, HoldCommand):
        named.add(command.hold_id.int)
        for other in (command.to_wallet_id, command.transfer_id):
            if other is not None:
                named.add(other.int)
    return wallets, named
