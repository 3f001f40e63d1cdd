"""The ledger state machine of one shard: the wallets it holds and the rules that move money.

Pure, like TigerBeetle's ``state_machine``: no asyncio, no I/O, no futures (a command's
reply future rides along but only the pipeline in engine/shard.py touches it). It is a
function of its state and the commands it is given; the pipeline does the waiting::

    missing(commands)        what must be loaded before these commands can be decided
    add_wallets / add_operations / add_creations    the rows the pipeline loaded
    execute(commands)        decide every command on the pending state; returns an
                             ``Applied``: one reply per command and the Batch to write
    committed(applied)       the Batch is stored: its pending state becomes committed
    answers(applied, ...)    the replies, reads answered from committed state; after an
                             earlier batch failed, 503 for those that rest on its state
    unknown(applied)         the Batch's write failed: what it touched is no longer known
    forget(applied)          drop what it touched (and the keys it added): re-read later

Adding a kind of command (a transfer, a hold) means: its class in engine/commands.py, its
handler here in ``_HANDLERS`` (the one dispatch point), the wallets and keys it needs in
``missing``, and the rows it writes added to the Batch in engine/model.py.

Memory is never ahead of storage: committed fields change only in ``committed``; pending
state lives on a wallet only while a batch that wrote it is open.

What the ledger accepts, storage accepts: every field a command brings is checked against
what storage holds (engine/bounds.py) before anything is decided, and a command past a
bound is answered ``NOT_STORABLE`` alone (the HTTP edge refuses the same with 422 first;
this covers every other way in, such as a forged leg). The checks depend on the command
only, never on state, so such a refusal rests on no open batch.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final, NamedTuple
from uuid import UUID

from walletd.engine.bounds import (
    ACTOR_LENGTH_MAX,
    KEY_LENGTH_MAX,
    METADATA_KEYS_MAX,
    REFERENCE_LENGTH_MAX,
    storable_amount,
    storable_metadata,
    storable_metadata_patch,
    storable_text,
)
from walletd.engine.commands import (
    REFUND_FAILURE_CODES,
    ApplyOperation,
    ApplyOperations,
    Command,
    CreateWallet,
    HoldAction,
    HoldCommand,
    JointPayment,
    JointTransfer,
    Operation,
    Outcome,
    ReadWallet,
    Reply,
    TransferLeg,
    UpdateWallet,
    hold_key,
    reversal_of,
    transfer_leg_key,
)
from walletd.engine.holds import is_derived_transfer_id
from walletd.engine.invariants import require
from walletd.engine.limits import EngineLimits
from walletd.engine.model import (
    CREDIT_KINDS,
    NO_METADATA,
    Batch,
    HoldRecord,
    HoldStatus,
    HoldUpdate,
    Metadata,
    NewWallet,
    OperationKind,
    OperationRecord,
    RefusalReason,
    RefusalRecord,
    SnapshotUpdate,
    TransferRecord,
    TransferStatus,
    TransferUpdate,
    WalletRecord,
    WalletStatus,
    WalletUpdate,
    WalletView,
    merge_metadata,
)
from walletd.engine.money import (
    BALANCE_MINOR_MAX,
    OVERDRAFT_LIMIT_MINOR_MAX,
    SEED_CURRENCY,
    Currency,
    to_minor,
)

__all__ = ["Applied", "Ledger"]

# A resident's committed seq while no committed state is known, one sentinel per reason:
# its creation is in flight (pending holds the new wallet) ...
SEQ_CREATING: Final = -1
# ... or a batch that touched it failed, so its stored state is unknown until re-read.
SEQ_UNKNOWN: Final = -2

# What an atomic group's trial run says of an item that would apply (never sent).
_WOULD_APPLY: Final = Reply(Outcome.OK)

# The wallet of a dependent reply that no write of its own batch can vouch for: a refusal
# record of an open batch moves no seq, so fencing a wallet's seq does not cover it.
_NO_WALLET: Final = -1

# Placeholder reply of a read: answered from committed state once its batch resolves.
_READ_LATER: Final = Reply(Outcome.OK)
_UNAVAILABLE: Final = Reply(Outcome.UNAVAILABLE)
_NOT_STORABLE: Final = Reply(Outcome.NOT_STORABLE)
_CLIENT_KINDS: Final = frozenset({OperationKind.DEPOSIT, OperationKind.WITHDRAW})
_REVERSALS: Final = frozenset({OperationKind.DEPOSIT_REVERSAL, OperationKind.WITHDRAW_REVERSAL})
_NO_HOLDS: Final[dict[int, HoldRecord]] = {}
_NO_OUTS: Final[dict[int, int]] = {}
_REFUND: Final = OperationKind.TRANSFER_REFUND
# A resident's outgoing PENDING transfers past this many are checked against storage
# before its next batch (``Ledger.stale_outs``): the ones the receiver's shard completed go,
# so the map of a wallet that keeps sending stays small.
OUTS_CHECK_MIN: Final = 64
_REFUSAL_OUTCOMES: Final = {
    RefusalReason.INSUFFICIENT_FUNDS: Outcome.INSUFFICIENT_FUNDS,
    RefusalReason.BALANCE_LIMIT_EXCEEDED: Outcome.BALANCE_LIMIT_EXCEEDED,
    RefusalReason.WALLET_FROZEN: Outcome.WALLET_FROZEN,
    RefusalReason.WALLET_CLOSED: Outcome.WALLET_CLOSED,
}
_ACTIVE: Final = WalletStatus.ACTIVE
_FROZEN: Final = WalletStatus.FROZEN
_CLOSED: Final = WalletStatus.CLOSED
# The status refusal of a debit (FROZEN and CLOSED) and of a credit (CLOSED only).
_DEBIT_REFUSALS: Final = {
    _FROZEN: RefusalReason.WALLET_FROZEN, _CLOSED: RefusalReason.WALLET_CLOSED,
}  # fmt: skip
_CREDIT_REFUSALS: Final = {_CLOSED: RefusalReason.WALLET_CLOSED}
_PRECONDITION_FAILED: Final = Reply(Outcome.PRECONDITION_FAILED)


class Pending:
    """Applied but not yet committed state of a wallet: exists only while a batch is open.

    ``holds`` is None while no open batch changed the wallet's PENDING holds (the committed
    ones apply); else the pending set, copied at each batch's end into its final state.
    ``outs`` likewise for its outgoing PENDING transfers (``Resident.outs``).
    """

    __slots__ = (
        "balance", "held", "holds", "metadata", "outs", "overdraft_limit", "seq", "status",
        "updated_at_us",
    )  # fmt: skip

    def __init__(
        self,
        balance: int,
        seq: int,
        updated_at_us: int,
        held: int = 0,
        status: WalletStatus = _ACTIVE,
        overdraft_limit: int = 0,
        metadata: Metadata = NO_METADATA,
    ) -> None:
        self.balance = balance
        self.seq = seq
        self.updated_at_us = updated_at_us
        self.held = held
        self.holds: dict[int, HoldRecord] | None = None
        self.outs: dict[int, int] | None = None
        self.status = status
        self.overdraft_limit = overdraft_limit
        # The wallet's metadata (changed only by a WALLET_UPDATE row, like status).
        self.metadata = metadata


class Resident:
    """A wallet held in memory: its committed state, and pending state while it is dirty.

    Kept small on purpose (one of these per resident wallet, up to a million): the id is the
    table's key, and the pending part is a separate object only while a batch is open.
    """

    __slots__ = (
        "balance", "created_at_us", "currency", "held", "holds", "metadata", "outs",
        "overdraft_limit", "pending", "seq", "status", "updated_at_us",
    )  # fmt: skip

    def __init__(
        self,
        balance: int,
        seq: int,
        created_at_us: int,
        updated_at_us: int,
        held: int = 0,
        currency: Currency = SEED_CURRENCY,
        status: WalletStatus = _ACTIVE,
        overdraft_limit: int = 0,
        metadata: Metadata = NO_METADATA,
    ) -> None:
        self.balance = balance
        # Immutable (one interned object shared by every wallet of the currency).
        self.currency = currency
        self.seq = seq
        self.created_at_us = created_at_us
        self.updated_at_us = updated_at_us
        self.pending: Pending | None = None
        self.held = held
        # Its committed PENDING holds by id (as int); None when it has none (most wallets).
        self.holds: dict[int, HoldRecord] | None = None
        # Its outgoing PENDING transfers, id (as int) -> amount; None when it has none (most
        # wallets). Their sum is the room under the balance ceiling their refunds may need:
        # a credit other than a refund leaves it free (``reserved``). Opened by this shard
        # (a TRANSFER_OUT) and closed here by a refund, but completed by the receiver's
        # shard, which does not tell this one: an entry may outlive its transfer (never the
        # reverse), until ``Ledger.drop_closed`` or a reload drops it (docs/ARCHITECTURE.md,
        # "Transfers").
        self.outs: dict[int, int] | None = None
        self.status = status
        self.overdraft_limit = overdraft_limit
        # Its metadata (a shared empty tuple for most wallets): set at creation, changed by
        # a WALLET_UPDATE row (PATCH), pending then committed like status.
        self.metadata = metadata

    @classmethod
    def loaded(cls, record: WalletRecord) -> Resident:
        resident = cls(
            record.balance, record.seq, record.created_at_us, record.updated_at_us, record.held,
            record.currency, record.status, record.overdraft_limit, record.metadata,
        )  # fmt: skip
        if record.holds:
            resident.holds = {hold.hold_id.int: hold for hold in record.holds}
        if record.pending_out:
            resident.outs = {transfer_id.int: amount for transfer_id, amount in record.pending_out}
        require(
            sum(hold.amount for hold in record.holds) == record.held,
            "a loaded wallet's held differs from the sum of its PENDING holds",
        )
        return resident

    @classmethod
    def being_created(cls, created_at_us: int, currency: Currency, metadata: Metadata) -> Resident:
        resident = cls(
            0, SEQ_CREATING, created_at_us, created_at_us, 0, currency, metadata=metadata
        )
        resident.pending = Pending(0, 0, created_at_us, metadata=metadata)
        return resident

    @property
    def committed(self) -> bool:
        return self.seq >= 0

    def is_dirty(self) -> bool:
        return self.pending is not None or self.seq < 0

    def committed_view(self, wallet_id: UUID) -> WalletView:
        return WalletView(
            wallet_id, self.balance, self.seq, self.created_at_us, self.updated_at_us, self.held,
            self.currency, self.status, self.overdraft_limit, self.metadata,
        )  # fmt: skip

    def start_pending(self) -> Pending:
        """Its pending state, opened from its committed state when no open batch has one."""
        pending = self.pending
        if pending is None:
            pending = self.pending = Pending(
                self.balance, self.seq, self.updated_at_us, self.held, self.status,
                self.overdraft_limit, self.metadata,
            )  # fmt: skip
        return pending

    def terms(self) -> tuple[WalletStatus, int]:
        """Its status and overdraft limit as the next command sees them."""
        pending = self.pending
        if pending is None:
            return self.status, self.overdraft_limit
        return pending.status, pending.overdraft_limit

    def balance_and_held(self) -> tuple[int, int]:
        """Its balance and held money as the next command sees them (pending state first)."""
        pending = self.pending
        if pending is None:
            return self.balance, self.held
        return pending.balance, pending.held

    def pending_holds(self) -> dict[int, HoldRecord]:
        """Its PENDING holds as the next command sees them (pending state first)."""
        pending = self.pending
        if pending is not None and pending.holds is not None:
            return pending.holds
        return self.holds or _NO_HOLDS

    def pending_outs(self) -> dict[int, int]:
        """Its outgoing PENDING transfers as the next command sees them (pending first)."""
        pending = self.pending
        if pending is not None and pending.outs is not None:
            return pending.outs
        return self.outs or _NO_OUTS

    def reserved(self) -> int:
        """The room under the balance ceiling kept for the refunds of its outgoing PENDING
        transfers: what an ordinary credit may not take (a refund may)."""
        outs = self.pending_outs()
        return sum(outs.values()) if outs else 0

    def open_out(self, transfer_id: UUID, amount: int) -> None:
        """A transfer debit written on its pending state: its refund's room is reserved."""
        pending = self.start_pending()
        if pending.outs is None:
            pending.outs = dict(self.outs or _NO_OUTS)
        pending.outs[transfer_id.int] = amount

    def close_out(self, transfer_id: UUID) -> None:
        """One of its transfers closed on its pending state (refunded, or completed in the
        same batch): the reservation goes."""
        outs = self.pending_outs()
        if transfer_id.int in outs:
            pending = self.start_pending()
            if pending.outs is None:
                pending.outs = dict(outs)
            del pending.outs[transfer_id.int]


@dataclass(frozen=True, slots=True)
class CreationKey:
    wallet_id: UUID
    fingerprint: str
    created_at_us: int


@dataclass(slots=True)
class Applied:
    """One batch after ``execute``: what to write, what to answer, and what it touched."""

    batch: Batch = field(default_factory=Batch)
    # One per command, in order; a read's is ``_READ_LATER`` until ``answers``.
    replies: list[Reply] = field(default_factory=list)
    # Reads are answered from committed state when the batch resolves, not when applied.
    # The resident is captured at apply time: it may be evicted from the table before the
    # batch resolves, and its committed fields stay exact until then (it is clean, so no
    # other batch can commit it in between). (index in replies, wallet id, resident)
    reads: list[tuple[int, UUID, Resident | None]] = field(default_factory=list)
    # Each wallet the batch writes, with its seq before the batch.
    written: dict[int, tuple[UUID, Resident, int]] = field(default_factory=dict)
    # Final state of each written wallet: (resident, balance, seq, updated_at_us, held,
    # its PENDING holds or None when no open batch changed them, status, overdraft limit,
    # metadata, its outgoing PENDING transfers or None when no open batch changed them).
    finals: list[
        tuple[
            Resident,
            int,
            int,
            int,
            int,
            dict[int, HoldRecord] | None,
            WalletStatus,
            int,
            Metadata,
            dict[int, int] | None,
        ]
    ] = field(default_factory=list)
    touched_wallets: set[int] = field(default_factory=set)  # wallet ids as ints
    # Replies decided on state an earlier open batch wrote, and the wallet whose state it
    # was: (index in replies, wallet id as int, or _NO_WALLET). Such a reply is true only if
    # that batch commits, or if this batch's own write of the wallet was stored (its seq
    # fencing proves the state it built on was stored).
    dependent: list[tuple[int, int]] = field(default_factory=list)
    added_keys: list[tuple[UUID, str]] = field(default_factory=list)
    added_create_keys: list[str] = field(default_factory=list)
    # (wallet id as int, reversed seq) of the reversals the batch applied.
    added_reversals: list[tuple[int, int]] = field(default_factory=list)


class Ledger:
    def __init__(self, limits: EngineLimits, clock_us: Callable[[], int]) -> None:
        self._clock_us = clock_us
        self._residents_max = limits.resident_wallets_per_shard_max
        self._keys_max = limits.idempotency_keys_per_shard_max
        # Dirty wallets sit near the end of the LRU; an eviction scan steps over at most
        # about two batches of them.
        self._evict_scan_slack = 2 * limits.batch_ops_max
        # Insertion-ordered plain dict used as an LRU: a use re-inserts the wallet at the
        # end; eviction takes from the front (an OrderedDict costs ~180 B more per entry).
        # Keyed by the id's 128-bit int: hashed in C, and no UUID object kept per wallet
        # (asyncpg's UUIDs also grow a cached int when hashed). ~250 B per resident wallet.
        self._residents: dict[int, Resident] = {}
        # The resident wallets that may hold outgoing PENDING transfers (``Resident.outs``,
        # committed or pending): every one that does, and some that no longer do, until
        # ``stale_outs`` meets them (or they leave memory). Empty (the usual case when
        # every transfer completes in its debit's commit), ``stale_outs`` scans nothing.
        self._sending: set[int] = set()
        # What was decided under each recent (wallet, key): the operation or the refusal.
        self._keys: OrderedDict[tuple[UUID, str], OperationRecord | RefusalRecord] = OrderedDict()
        # Keys of refusals whose batch has not committed yet (an operation's record tells
        # by its seq; a refusal's cannot). Bounded by the open batches.
        self._uncommitted_refusals: set[tuple[UUID, str]] = set()
        self._create_keys: OrderedDict[str, CreationKey] = OrderedDict()
        # The recent reversals, (wallet id as int, reversed seq) -> the reversal's key: a
        # second one under another key is ALREADY_REVERSED before its balance is checked.
        self._reversals: OrderedDict[tuple[int, int], str] = OrderedDict()
        self._holds_per_wallet_max = limits.holds_per_wallet_max
        # A hold's expires_at must stay a timestamp storage holds: bounded like the edge's.
        self._expires_in_us_max = limits.hold_expires_in_s_max * 1_000_000

    @property
    def resident_wallets(self) -> int:
        return len(self._residents)

    # -- reads outside a batch ---------------------------------------------------------

    def read_committed(self, wallet_id: UUID) -> WalletView | None:
        """The committed view of a resident wallet, or None when it is not resident."""
        residents = self._residents
        wid = wallet_id.int
        resident = residents.get(wid)
        if resident is None or resident.seq < 0:
            return None
        residents[wid] = residents.pop(wid)  # a read is a use, for passivation
        return resident.committed_view(wallet_id)

    # -- loading -------------------------------------------------------------------------

    def warm(self, records: Iterable[WalletRecord]) -> int:
        """Make stored wallets resident, up to the bound (never evicting); how many added."""
        residents = self._residents
        added = 0
        for record in records:
            if len(residents) >= self._residents_max:
                break
            wid = record.wallet_id.int
            if wid not in residents:
                residents[wid] = Resident.loaded(record)
                if record.pending_out:
                    self._sending.add(wid)
                added += 1
        return added

    def missing(
        self, commands: Sequence[Command]
    ) -> tuple[set[UUID], set[tuple[UUID, str]], set[str]]:
        """Wallets, operation keys and creation keys to load before ``execute``.

        A key found in a cache is made the most recent: the keys loaded next must not push
        out one this batch relies on (it would then be decided as new and applied twice,
        were storage not to refuse it). With every command touching at most one entry, the
        entries of the open batches are the newest (inflight_batches_max + 1) *
        batch_ops_max, which the cache bound holds (engine/limits.py).
        """
        wallet_ids: set[UUID] = set()
        op_keys: set[tuple[UUID, str]] = set()
        create_keys: set[str] = set()
        residents, keys = self._residents, self._keys
        for command in commands:
            if isinstance(command, ApplyOperations):
                for item in command.items:
                    if item.wallet_id.int not in residents:
                        wallet_ids.add(item.wallet_id)
                    if item.idempotency_key is not None:
                        key = (item.wallet_id, item.idempotency_key)
                        if key in keys:
                            keys.move_to_end(key)
                        else:
                            op_keys.add(key)
                continue
            if command.wallet_id.int not in residents:
                wallet_ids.add(command.wallet_id)
            legs: tuple[TransferLeg, ...] = ()
            if isinstance(command, ApplyOperation | UpdateWallet):
                if command.idempotency_key is not None:
                    key = (command.wallet_id, command.idempotency_key)
                    if key in keys:
                        keys.move_to_end(key)
                    else:
                        op_keys.add(key)
            # ``type() is`` (these classes have no subclasses): cheaper than isinstance on
            # the hot path, and mypy narrows it.
            elif type(command) is JointTransfer:
                legs = (command.debit, command.credit)
            elif type(command) is TransferLeg:
                legs = (command,)
            elif type(command) is JointPayment:
                legs = command.debits + command.credits
            elif isinstance(command, HoldCommand) and command.log_key is not None:
                # A keyed creation's hold id is derived from its key: it may exist already.
                key = (command.wallet_id, command.log_key)
                if key in keys:
                    keys.move_to_end(key)
                else:
                    op_keys.add(key)
            elif isinstance(command, CreateWallet) and command.idempotency_key is not None:
                create_key = command.idempotency_key
                if create_key in self._create_keys:
                    self._create_keys.move_to_end(create_key)
                else:
                    create_keys.add(create_key)
            for leg in legs:
                if leg.wallet_id.int not in residents:
                    wallet_ids.add(leg.wallet_id)
                key = (leg.wallet_id, leg.key)
                if key in keys:
                    keys.move_to_end(key)
                elif not leg.fresh:  # a fresh leg's key cannot be stored yet
                    op_keys.add(key)
        return wallet_ids, op_keys, create_keys

    def add_wallets(self, records: Iterable[WalletRecord]) -> int:
        """Make loaded wallets resident; how many were added.

        A wallet already resident keeps its state: memory is never older than a row read
        while it was resident.
        """
        residents = self._residents
        added = 0
        for record in records:
            wid = record.wallet_id.int
            if wid not in residents:
                residents[wid] = Resident.loaded(record)
                if record.pending_out:
                    self._sending.add(wid)
                added += 1
        return added

    def stale_outs(self, commands: Sequence[Command]) -> list[UUID]:
        """Outgoing PENDING transfers of resident wallets to check against storage before
        ``execute`` (then ``drop_closed``): the receiver's shard completes a transfer
        without telling the sender's, so an entry of ``Resident.outs`` may be stale, and a
        stale one only ever refuses a credit that would fit. Asked for, after the wallets
        are loaded, only where it matters: a wallet the batch credits past its room when
        all its reservations count (rare: near the ceiling), or one that opens another
        transfer while holding ``OUTS_CHECK_MIN`` entries (bounds the map of a wallet that
        keeps sending to other shards). Only the wallets of ``_sending`` can matter: none
        (no wallet holds an entry), nothing is scanned."""
        sending = self._sending
        if not sending:
            return []
        residents = self._residents
        # Only wallets holding entries matter (most hold none): one set lookup for the rest.
        credits: dict[int, int] = {}
        opens: set[int] = set()
        for command in commands:
            # ``type() is``: cheaper than isinstance on the hot path, and mypy narrows it.
            items: Sequence[Operation] = ()
            legs: tuple[TransferLeg, ...] = ()
            if type(command) is ApplyOperation:
                items = (command,)
            elif type(command) is ApplyOperations:
                items = command.items
            elif type(command) is TransferLeg:
                legs = (command,)
            elif type(command) is JointTransfer:
                legs = (command.debit, command.credit)
            elif type(command) is HoldCommand and command.transfer_id is not None:
                opens.add(command.wallet_id.int)
            for item in items:
                wid = item.wallet_id.int
                if wid in sending and item.kind in CREDIT_KINDS:
                    resident = residents.get(wid)
                    credits[wid] = credits.get(wid, 0) + _minor_amount(item, resident)
            for leg in legs:
                wid = leg.wallet_id.int
                if wid not in sending:
                    continue
                if leg.kind is OperationKind.TRANSFER_IN:
                    credits[wid] = credits.get(wid, 0) + leg.transfer.amount
                elif leg.kind is OperationKind.TRANSFER_OUT:
                    opens.add(wid)
        if not credits and not opens:
            return []
        stale: dict[int, UUID] = {}
        for wid in credits.keys() | opens:
            resident = residents.get(wid)
            if resident is None or (resident.pending is None and not resident.outs):
                # Holds none, and any it gets from now on is added again (``open_out``
                # callers, a load): no open batch holds its state.
                sending.discard(wid)
                continue
            outs = resident.pending_outs()
            if not outs:
                continue
            balance = resident.balance_and_held()[0]
            if (wid in opens and len(outs) >= OUTS_CHECK_MIN) or (
                balance + credits.get(wid, 0) + sum(outs.values()) > BALANCE_MINOR_MAX
            ):
                for transfer_int in outs.keys() | (resident.outs or _NO_OUTS).keys():
                    stale[transfer_int] = UUID(int=transfer_int)
        return list(stale.values())

    def drop_closed(self, transfers: Iterable[TransferRecord]) -> None:
        """Drop the reservations of transfers storage holds closed (a transfer closes once:
        dropping them is right whatever the open batches hold)."""
        residents = self._residents
        for transfer in transfers:
            if transfer.status is TransferStatus.PENDING:
                continue
            resident = residents.get(transfer.from_wallet_id.int)
            if resident is None:
                continue
            tid = transfer.transfer_id.int
            if resident.outs is not None:
                resident.outs.pop(tid, None)
                if not resident.outs:
                    resident.outs = None
            pending = resident.pending
            if pending is not None and pending.outs is not None:
                pending.outs.pop(tid, None)

    def add_operations(
        self, found: dict[tuple[UUID, str], OperationRecord | RefusalRecord]
    ) -> None:
        for key, record in found.items():
            self._remember_key(key, record)

    def add_creations(self, found: dict[str, WalletRecord]) -> None:
        for create_key, record in found.items():
            self._remember_create_key(
                create_key,
                CreationKey(record.wallet_id, record.create_fingerprint, record.created_at_us),
            )

    # -- deciding ------------------------------------------------------------------------

    def execute(self, commands: Sequence[Command]) -> Applied:
        """Decide each command in order on the pending state; the batch and its replies."""
        applied = Applied()
        replies = applied.replies
        handlers = _HANDLERS
        for command in commands:
            replies.append(handlers[type(command)](self, command, applied))
        self._write_snapshots(applied)
        return applied

    def _read_wallet(self, command: ReadWallet, applied: Applied) -> Reply:
        wallet_id = command.wallet_id
        resident = self._residents.get(wallet_id.int)
        applied.reads.append((len(applied.replies), wallet_id, resident))
        return _READ_LATER

    def _apply_operations(self, command: ApplyOperations, applied: Applied) -> Reply:
        """A group of operations, each decided as ``_apply_operation`` decides it alone.

        An atomic group is first decided on a scratch copy of the balances it touches; the
        first item that would be refused refuses the group and nothing is applied. Else the
        items are applied for real, on the same state in the same order, so each is
        applied or replayed (a refusal then would be a bug: the invariant below says so).
        """
        items = command.items
        if command.atomic:
            refused = self._first_refusal(items)
            if refused is not None:
                return refused
        apply = self._apply_item
        actor = command.actor
        replies = tuple([apply(item, applied, actor) for item in items])
        if command.atomic:
            require(
                all(reply.outcome is Outcome.OK for reply in replies),
                "an atomic group decided whole was refused in part",
            )
        return Reply(Outcome.OK, items=replies)

    def _first_refusal(self, items: Sequence[Operation]) -> Reply | None:
        """The refusal of an atomic group, or None when every item would apply or replay.

        The same rules as ``_apply_operation``, on a scratch copy: balances the group has
        moved so far, and keys it has used so far (a key used twice in one group replays).
        """
        balances: dict[int, int] = {}
        used: dict[tuple[UUID, str], tuple[OperationKind, int, str | None, Metadata]] = {}
        replies: list[Reply] = []
        group_currency: Currency | None = None
        for original in items:
            wallet_id = original.wallet_id
            wid = wallet_id.int
            resident = self._residents.get(wid)
            item = self._rescaled(original, resident)
            reply = _WOULD_APPLY
            if isinstance(item, Reply):  # not in the wallet's currency: refuses the group
                replies.append(item)
                return item._replace(items=tuple(replies))
            if resident is not None:
                # One currency per group: all or nothing cannot span two currencies.
                if group_currency is None:
                    group_currency = resident.currency
                elif resident.currency != group_currency:
                    replies.append(Reply(Outcome.CURRENCY_MISMATCH))
                    return replies[-1]._replace(items=tuple(replies))
            key = item.idempotency_key
            earlier: tuple[OperationKind, int, str | None, Metadata] | None = None
            refused: RefusalRecord | None = None
            if key is not None:
                earlier = used.get((wallet_id, key))
                recorded = self._keys.get((wallet_id, key))
                if earlier is None and recorded is not None:
                    earlier = (recorded.kind, recorded.amount, recorded.reference,
                               recorded.metadata)  # fmt: skip
                    if isinstance(recorded, RefusalRecord):
                        refused = recorded
            if not _storable_operation(item):
                reply = _NOT_STORABLE
            elif resident is None:
                reply = Reply(Outcome.WALLET_NOT_FOUND)
            elif refused is not None:  # replays a recorded refusal, which refuses the group
                reply = _replay_refusal(item, refused, resident.currency)
            elif earlier is not None:  # a replay: moves nothing, unless the key is misused
                if earlier != (item.kind, item.amount, item.reference, item.metadata):
                    reply = Reply(Outcome.IDEMPOTENCY_KEY_REUSED)
            else:
                pending = resident.pending
                balance = balances.get(
                    wid, resident.balance if pending is None else pending.balance
                )
                status, overdraft_limit = resident.terms()
                if item.kind is OperationKind.WITHDRAW:
                    # Held money is not available (a group moves no holds).
                    available = (
                        balance - (resident.held if pending is None else pending.held)
                        + overdraft_limit
                    )  # fmt: skip
                    if status is not _ACTIVE:
                        reply = Reply(_REFUSAL_OUTCOMES[_DEBIT_REFUSALS[status]])
                    elif item.amount > available:
                        reply = Reply(
                            Outcome.INSUFFICIENT_FUNDS, balance_seen=available,
                            currency=resident.currency,
                        )  # fmt: skip
                    balance -= item.amount
                else:
                    if status is _CLOSED:
                        reply = Reply(Outcome.WALLET_CLOSED)
                    elif balance + item.amount + resident.reserved() > BALANCE_MINOR_MAX:
                        reply = Reply(
                            Outcome.BALANCE_LIMIT_EXCEEDED, balance_seen=balance,
                            currency=resident.currency,
                        )  # fmt: skip
                    balance += item.amount
                balances[wid] = balance
                if key is not None:
                    used[(wallet_id, key)] = (item.kind, item.amount, item.reference,
                                              item.metadata)  # fmt: skip
            replies.append(reply)
            if reply is not _WOULD_APPLY:
                return reply._replace(items=tuple(replies))
        return None

    def _apply_operation(self, command: ApplyOperation, applied: Applied) -> Reply:
        # If-Match (expected_seq) is checked by _move, after the amount is in the wallet's
        # currency: an amount it cannot hold is 422 whatever the wallet's version.
        return self._apply_item(command, applied, command.actor, command.expected_seq)

    def _apply_item(
        self,
        command: Operation,
        applied: Applied,
        actor: str | None,
        expected_seq: int | None = None,
    ) -> Reply:
        if command.scale is not None:
            rescaled = self._rescaled(command, self._residents.get(command.wallet_id.int))
            if isinstance(rescaled, Reply):
                return rescaled
            command = rescaled
        if not _storable_operation(command):
            return _NOT_STORABLE
        if command.kind in _REVERSALS:
            return self._reverse(command, applied, actor)
        return self._move(
            command.wallet_id, command.kind, command.amount, command.idempotency_key, applied,
            command, command.reference, actor, command.metadata, expected_seq,
        )  # fmt: skip

    def _reverse(self, command: Operation, applied: Applied, actor: str | None) -> Reply:
        """A reversal (engine/router.py ``reverse``): moved like a keyed deposit or
        withdrawal, unless a reversal of the same operation under another key is known
        here (applied by an open batch, or committed and remembered): ALREADY_REVERSED,
        decided before the balance is, so a burst of reversals of one deposit under many
        keys is answered for what it is. The reversals remembered are the recent ones
        (bounded like the keys); storage's unique index refuses any other second one."""
        key = command.idempotency_key
        assert key is not None  # _storable_operation: a reversal carries its key
        wid = command.wallet_id.int
        slot = (wid, reversal_of(key) or 0)
        other = self._reversals.get(slot)
        if other is not None and other != key:
            # True only if the batch that applied it commits: an earlier failure makes it 503.
            applied.dependent.append((len(applied.replies), wid))
            return Reply(Outcome.ALREADY_REVERSED)
        reply = self._move(
            command.wallet_id, command.kind, command.amount, key, applied, command,
            command.reference, actor, command.metadata,
        )  # fmt: skip
        if reply.outcome is Outcome.OK and not reply.replayed:
            self._reversals[slot] = key
            self._reversals.move_to_end(slot)
            applied.added_reversals.append(slot)
            while len(self._reversals) > self._keys_max:
                self._reversals.popitem(last=False)
        return reply

    @staticmethod
    def _rescaled(command: Operation, resident: Resident | None) -> Operation | Reply:
        """The operation with its amount in the wallet's minor units (the edge read it at
        its own scale, not knowing the wallet's currency), or the refusal: the wallet is not
        there, or its currency cannot hold the amount (AMOUNT_NOT_IN_CURRENCY: nothing is
        recorded, like the edge's own 422s)."""
        scale = command.scale
        if scale is None:
            return command
        if resident is None:
            return Reply(Outcome.WALLET_NOT_FOUND)
        currency = resident.currency
        exponent = currency.exponent
        # The hot path (a two-decimal wallet): nothing to rescale, only the bound to check.
        minor = command.amount if scale == exponent else to_minor(command.amount, scale, exponent)
        if minor is None or not storable_amount(minor):
            return Reply(Outcome.AMOUNT_NOT_IN_CURRENCY, currency=currency)
        if scale == exponent:
            return command
        return _Rescaled(
            command.wallet_id, command.kind, minor, command.idempotency_key, command.reference,
            command.metadata,
        )  # fmt: skip

    def _currency_refused(self, leg: TransferLeg, wallet_id: UUID) -> bool:
        """Whether a leg's transfer is in another currency than its (resident) wallet."""
        currency = leg.transfer.currency
        if currency is None:
            return False
        resident = self._residents.get(wallet_id.int)
        return resident is not None and resident.currency != currency

    def _apply_transfer_leg(
        self, command: TransferLeg, applied: Applied, *, credited_here: bool = False
    ) -> Reply:
        """A leg of a transfer (engine/transfers.py) moves money like a deposit or a
        withdrawal, keyed by the transfer id, and opens (TRANSFER_OUT) or closes
        (TRANSFER_IN, TRANSFER_REFUND) its transfer in the same batch. A replayed leg (its
        key is logged) writes nothing. A refused debit is recorded under its leg key like a
        keyed withdrawal's refusal, so the transfer's retry gets the original answer even
        after money arrived; a refused credit is recorded by the refund that follows it.

        ``credited_here``: a joint transfer's legs, the credit certain to apply right after
        the debit (``_apply_joint_transfer``): the transfer is COMPLETED by this batch, so
        the debit keeps no room for a refund that cannot come (``Resident.outs``), and the
        credit has none to close. Nothing runs between the two legs, so no decision could
        have seen that room."""
        if not _storable_leg(command):
            return _NOT_STORABLE
        if self._currency_refused(command, command.wallet_id):
            # Before anything moves; never recorded (a currency never changes, so a retry
            # is refused the same way).
            return Reply(Outcome.CURRENCY_MISMATCH)
        transfer = command.transfer
        debit = command if command.kind is OperationKind.TRANSFER_OUT else None
        reply = self._move(
            command.wallet_id, command.kind, transfer.amount, command.key, applied, debit,
            transfer.reference, transfer.actor, transfer.metadata,
        )  # fmt: skip
        if reply.outcome is not Outcome.OK or reply.replayed:
            return reply
        assert reply.wallet is not None
        now_us = reply.wallet.updated_at_us
        if command.closes_as is None:
            if not credited_here:
                wid = command.wallet_id.int
                self._residents[wid].open_out(transfer.transfer_id, transfer.amount)
                self._sending.add(wid)
            # Opened PENDING whatever the leg's record said (storage writes it so too).
            applied.batch.new_transfers.append(
                transfer._replace(
                    status=TransferStatus.PENDING, failure_code=None, created_at_us=now_us,
                    updated_at_us=now_us,
                )
            )  # fmt: skip
        else:
            if command.kind is OperationKind.TRANSFER_REFUND:
                self._residents[command.wallet_id.int].close_out(transfer.transfer_id)
            elif not credited_here:
                # Completed. When this batch writes the sender too (both legs in one
                # commit, or another of its rows), its entry goes with this commit; else
                # it lingers, too cautious only, until ``stale_outs`` (nothing to write it
                # with here).
                sender = self._residents.get(transfer.from_wallet_id.int)
                if sender is not None and transfer.from_wallet_id.int in applied.written:
                    sender.close_out(transfer.transfer_id)
            applied.batch.transfer_updates.append(
                TransferUpdate(transfer.transfer_id, command.closes_as, command.failure_code,
                               now_us)
            )  # fmt: skip
        return reply

    def _apply_joint_transfer(self, command: JointTransfer, applied: Applied) -> Reply:
        """Both legs of a transfer in this batch: the debit, then the credit only when the
        receiver will certainly take it; otherwise the debit alone (the saga's first
        commit), and the coordinator delivers the credit as usual. Never a credit without
        its debit. Whether the receiver takes it is checked before the debit, on the
        receiver's pending state, which the debit (of another wallet) does not change: the
        state the credit is then decided on."""
        leg = command.credit
        receiver = self._residents.get(leg.wallet_id.int)
        takes = not (
            receiver is None
            or (leg.wallet_id, leg.key) in self._keys
            # Refused by the coordinator's credit then: refunded, never half-applied.
            or self._currency_refused(leg, leg.wallet_id)
        )
        if receiver is not None and takes:
            # As ``_move`` decides a credit, with ``Resident.reserved`` inlined.
            pending = receiver.pending
            state = receiver if pending is None else pending
            outs = receiver.outs if pending is None or pending.outs is None else pending.outs
            reserved = sum(outs.values()) if outs else 0
            takes = (
                state.balance + leg.transfer.amount + reserved <= BALANCE_MINOR_MAX
                and state.status is not _CLOSED
            )
        debit = self._apply_transfer_leg(command.debit, applied, credited_here=takes)
        if not takes or debit.outcome is not Outcome.OK or debit.replayed:
            return debit
        credit = self._apply_transfer_leg(leg, applied, credited_here=True)
        require(credit.outcome is Outcome.OK and not credit.replayed, "joint credit refused")
        # The debit's reply (OK, its wallet) with the credit's.
        return Reply(Outcome.OK, debit.wallet, items=(credit,))

    def _apply_joint_payment(self, command: JointPayment, applied: Applied) -> Reply:
        """Every posting's debit and credit in this batch, or none (``JointPayment``): first
        decided on a scratch copy of the wallets (the same rules as ``_move``'s, on the
        pending state, the postings in order), then applied for real on that same state."""
        # wallet -> [balance, available, reserved: its outgoing PENDING transfers' sum]
        scratch: dict[int, list[int]] = {}
        residents, keys = self._residents, self._keys
        for leg in command.debits + command.credits:
            wid = leg.wallet_id.int
            resident = residents.get(wid)
            if (
                resident is None
                or (leg.wallet_id, leg.key) in keys
                or not _storable_leg(leg)
                or self._currency_refused(leg, leg.wallet_id)
            ):
                return _NOT_TAKEN
            pending = resident.pending
            state = pending if pending is not None else resident
            status = state.status
            if wid not in scratch:
                scratch[wid] = [
                    state.balance, state.balance - state.held + state.overdraft_limit,
                    resident.reserved(),
                ]  # fmt: skip
            amount = leg.transfer.amount
            money = scratch[wid]
            if leg.kind is OperationKind.TRANSFER_OUT:
                if status is not _ACTIVE or amount > money[1]:
                    return _NOT_TAKEN
                money[0] -= amount
                money[1] -= amount
                money[2] += amount  # the debit keeps its refund's room (_apply_transfer_leg)
            else:
                # As _move: the room its own PENDING transfers keep is not this credit's.
                if status is _CLOSED or money[0] + amount + money[2] > BALANCE_MINOR_MAX:
                    return _NOT_TAKEN
                money[0] += amount
                money[1] += amount
                # Completed with its debit in this batch: the sender's room goes.
                scratch[leg.transfer.from_wallet_id.int][2] -= amount
        for leg in command.debits:
            debit = self._apply_transfer_leg(leg, applied)
            require(debit.outcome is Outcome.OK and not debit.replayed, "joint debit refused")
        credits = []
        for leg in command.credits:
            credit = self._apply_transfer_leg(leg, applied)
            require(credit.outcome is Outcome.OK and not credit.replayed, "joint credit refused")
            credits.append(credit)
        return Reply(Outcome.OK, items=tuple(credits))

    def _move(
        self,
        wallet_id: UUID,
        kind: OperationKind,
        amount: int,
        key: str | None,
        applied: Applied,
        command: Operation | None,
        reference: str | None,
        actor: str | None,
        metadata: Metadata,
        expected_seq: int | None = None,
    ) -> Reply:
        """Add or take ``amount`` (by ``kind``) on the wallet's pending state, logged, with
        ``actor`` (the API key's name) and ``metadata`` on the row or recorded refusal.
        ``command`` is the client operation (or a transfer's debit leg), whose keyed refusals
        are recorded; None for a credit or refund leg. A debit is checked against
        ``available`` (balance - held + overdraft_limit) and the wallet's status (FROZEN
        and CLOSED refuse debits, CLOSED refuses credits too). ``expected_seq`` (If-Match):
        refused 412 unless the wallet's seq is that one; a replay is answered first."""
        residents = self._residents
        wid = wallet_id.int
        resident = residents.get(wid)
        if resident is None:
            return Reply(Outcome.WALLET_NOT_FOUND)
        if key is not None:
            earlier = self._keys.get((wallet_id, key))
            if earlier is not None:
                if isinstance(earlier, RefusalRecord):
                    # Only client operations and debit legs record refusals, and a leg's
                    # key cannot be a client's (it starts with a character the edge
                    # refuses).
                    assert command is not None
                    if (wallet_id, key) in self._uncommitted_refusals and (
                        earlier not in applied.batch.refusals
                    ):
                        applied.dependent.append((len(applied.replies), _NO_WALLET))
                    return _replay_refusal(command, earlier, resident.currency)
                if earlier.seq > resident.seq:  # recorded by a batch not committed yet
                    applied.dependent.append((len(applied.replies), wid))
                if command is not None and (
                    earlier.reference != reference or earlier.metadata != metadata
                ):
                    return Reply(Outcome.IDEMPOTENCY_KEY_REUSED)
                return _replay_operation(kind, amount, earlier, resident)
        pending = resident.pending
        if pending is None:
            balance_before, held = resident.balance, resident.held
            status, overdraft_limit, seq = resident.status, resident.overdraft_limit, resident.seq
        else:
            balance_before, held = pending.balance, pending.held
            status, overdraft_limit, seq = pending.status, pending.overdraft_limit, pending.seq
        if expected_seq is not None and expected_seq != seq:
            self._rests_on_open_state(resident, wid, applied)
            return Reply(Outcome.PRECONDITION_FAILED, balance_seen=seq)
        if kind not in CREDIT_KINDS:
            available = balance_before - held + overdraft_limit
            if status is not _ACTIVE:
                return self._refuse(
                    command, wallet_id, _DEBIT_REFUSALS[status], available, resident, applied,
                    actor,
                )  # fmt: skip
            if amount > available:
                return self._refuse(
                    command, wallet_id, RefusalReason.INSUFFICIENT_FUNDS, available,
                    resident, applied, actor,
                )  # fmt: skip
            balance = balance_before - amount
        else:
            if status is _CLOSED:
                return self._refuse(
                    command, wallet_id, RefusalReason.WALLET_CLOSED, 0, resident, applied, actor
                )
            # A refund may use the room its transfer's debit reserved; any other credit
            # leaves the room of the wallet's outgoing PENDING transfers free
            # (``Resident.reserved``, inlined: an attribute read when it has none).
            outs = resident.outs if pending is None or pending.outs is None else pending.outs
            reserved = sum(outs.values()) if outs and kind is not _REFUND else 0
            if balance_before + amount + reserved > BALANCE_MINOR_MAX:
                return self._refuse(
                    command, wallet_id, RefusalReason.BALANCE_LIMIT_EXCEEDED, balance_before,
                    resident, applied, actor,
                )  # fmt: skip
            balance = balance_before + amount
        view = self._write(
            wallet_id, resident, kind, amount, balance, held, key, reference, applied,
            remember=True, actor=actor, metadata=metadata,
        )  # fmt: skip
        return Reply(Outcome.OK, view)

    def _write(
        self,
        wallet_id: UUID,
        resident: Resident,
        kind: OperationKind,
        amount: int,
        balance: int,
        held: int,
        key: str | None,
        reference: str | None,
        applied: Applied,
        *,
        remember: bool,
        actor: str | None,
        metadata: Metadata,
    ) -> WalletView:
        """Log one move on the wallet's pending state: its new balance and held, a log row.
        ``remember``: cache the row under its key (the rows a retry may look up)."""
        wid = wallet_id.int
        pending = resident.pending
        if pending is None:  # ``Resident.start_pending``, inlined: once per write
            pending = resident.pending = Pending(
                resident.balance, resident.seq, resident.updated_at_us, resident.held,
                resident.status, resident.overdraft_limit, resident.metadata,
            )  # fmt: skip
        overdraft_limit = pending.overdraft_limit
        require(
            0 <= held <= balance + overdraft_limit and balance <= BALANCE_MINOR_MAX,
            "balance or held out of range",
        )
        require(
            pending.status is not _CLOSED or kind is OperationKind.WALLET_UPDATE,
            "a closed wallet moved",
        )
        if wid not in applied.written:
            applied.written[wid] = (wallet_id, resident, pending.seq)
            applied.touched_wallets.add(wid)
            residents = self._residents
            residents[wid] = residents.pop(wid)  # a use, for LRU passivation
        now_us = max(self._clock_us(), pending.updated_at_us)
        seq = pending.seq + 1
        pending.balance = balance
        pending.held = held
        pending.seq = seq
        pending.updated_at_us = now_us
        status = pending.status
        record = OperationRecord(
            wallet_id, seq, kind, amount, balance, key, now_us, held, reference, actor, status,
            overdraft_limit, metadata,
        )  # fmt: skip
        applied.batch.operations.append(record)
        if remember and key is not None:
            self._remember_key((wallet_id, key), record)
            applied.added_keys.append((wallet_id, key))
        return WalletView(
            wallet_id, balance, seq, resident.created_at_us, now_us, held, resident.currency,
            status, overdraft_limit, pending.metadata,
        )  # fmt: skip

    # -- wallet updates --------------------------------------------------------------

    def _update_wallet(self, command: UpdateWallet, applied: Applied) -> Reply:
        """A new status, overdraft limit and/or metadata (docs/ARCHITECTURE.md, "Wallet
        status and overdraft"), written as one WALLET_UPDATE row (amount 0, balance and held
        as they are) whose reference is the request's fingerprint, so a retry with its key
        replays it, and whose metadata is the wallet's after the change (whatever the
        change: so the wallet's metadata at any seq is its last WALLET_UPDATE row's, else
        its creation's). Transitions: ACTIVE <-> FROZEN, either -> CLOSED, never out of
        CLOSED. A close needs a zero balance, no PENDING hold and no PENDING transfer; a
        lower limit must still cover what the wallet owes (balance - held >= -limit); the
        metadata merged (a None value deletes its key) must keep within
        ``METADATA_KEYS_MAX`` keys. A request that changes nothing writes nothing and
        answers the wallet as it is. Refusals are not recorded: a retry is decided again. A
        limit the edge read at its own scale is rescaled to the wallet's currency first
        (AMOUNT_NOT_IN_CURRENCY when it cannot hold it)."""
        key = command.idempotency_key
        new_limit = command.overdraft_limit
        limit_scale = command.limit_scale
        patch = command.metadata
        if (
            (key is not None and not storable_text(key, 1, KEY_LENGTH_MAX))
            or (new_limit is not None and limit_scale is None
                and not 0 <= new_limit <= OVERDRAFT_LIMIT_MINOR_MAX)
            or (command.actor is not None
                and not storable_text(command.actor, 1, ACTOR_LENGTH_MAX))
            or not storable_text(command.fingerprint, 0, REFERENCE_LENGTH_MAX)
            or (patch is not None and not storable_metadata_patch(patch))
        ):  # fmt: skip
            return _NOT_STORABLE
        wallet_id = command.wallet_id
        wid = wallet_id.int
        resident = self._residents.get(wid)
        if resident is None:
            return Reply(Outcome.WALLET_NOT_FOUND)
        if new_limit is not None and limit_scale is not None:
            currency = resident.currency
            new_limit = to_minor(new_limit, limit_scale, currency.exponent)
            if new_limit is None or not 0 <= new_limit <= OVERDRAFT_LIMIT_MINOR_MAX:
                return Reply(Outcome.AMOUNT_NOT_IN_CURRENCY, currency=currency)
        if key is not None:
            earlier = self._keys.get((wallet_id, key))
            if earlier is not None:
                if isinstance(earlier, RefusalRecord):  # a refused money movement's key
                    return Reply(Outcome.IDEMPOTENCY_KEY_REUSED)
                if earlier.seq > resident.seq:  # recorded by a batch not committed yet
                    applied.dependent.append((len(applied.replies), wid))
                if (
                    earlier.kind is not OperationKind.WALLET_UPDATE
                    or earlier.reference != command.fingerprint
                ):
                    return Reply(Outcome.IDEMPOTENCY_KEY_REUSED)
                return _replay_operation(OperationKind.WALLET_UPDATE, 0, earlier, resident)
        pending = resident.pending
        if pending is None:
            balance, held, seq = resident.balance, resident.held, resident.seq
            metadata = resident.metadata
        else:
            balance, held, seq = pending.balance, pending.held, pending.seq
            metadata = pending.metadata
        status, overdraft_limit = resident.terms()
        new_metadata = metadata if patch is None else merge_metadata(metadata, patch)
        refusal = self._update_refusal(
            command, new_limit, status, balance, held, seq, resident, len(new_metadata)
        )
        if refusal is not None:
            self._rests_on_open_state(resident, wid, applied)
            return refusal
        new_status = status if command.status is None else command.status
        if new_limit is None:
            new_limit = overdraft_limit
        if (new_status, new_limit, new_metadata) == (status, overdraft_limit, metadata):
            # Nothing to change: the wallet as the command sees it (pending state when an
            # open batch wrote it: true only if that batch commits).
            self._rests_on_open_state(resident, wid, applied)
            applied.reads.append((len(applied.replies), wallet_id, resident))
            return _READ_LATER
        pending = resident.start_pending()
        pending.status = new_status
        pending.overdraft_limit = new_limit
        pending.metadata = new_metadata
        view = self._write(
            wallet_id, resident, OperationKind.WALLET_UPDATE, 0, balance, held, key,
            command.fingerprint, applied, remember=True, actor=command.actor,
            metadata=new_metadata,
        )  # fmt: skip
        applied.batch.wallet_updates.append(
            WalletUpdate(wallet_id, view.seq, new_status, new_limit)
        )
        return Reply(Outcome.OK, view)

    @staticmethod
    def _update_refusal(
        command: UpdateWallet,
        new_limit: int | None,
        status: WalletStatus,
        balance: int,
        held: int,
        seq: int,
        resident: Resident,
        metadata_keys: int,
    ) -> Reply | None:
        """Why a wallet update cannot apply, or None (a flat list of early returns).
        ``metadata_keys``: how many keys the wallet's metadata would have after it."""
        if command.expected_seq is not None and command.expected_seq != seq:
            return Reply(Outcome.PRECONDITION_FAILED, balance_seen=seq)
        if status is _CLOSED:
            return Reply(Outcome.WALLET_CLOSED)
        if new_limit is not None and balance - held < -new_limit:
            return Reply(
                Outcome.OVERDRAFT_LIMIT_IN_USE, balance_seen=balance - held,
                currency=resident.currency,
            )  # fmt: skip
        if command.status is _CLOSED:
            blocked_by = tuple(
                what for what, blocks in (
                    ("BALANCE", balance != 0),
                    ("HOLDS", bool(resident.pending_holds()) or held != 0),
                    ("TRANSFERS", command.transfers_pending > 0),
                ) if blocks
            )  # fmt: skip
            if blocked_by:
                return Reply(Outcome.CLOSE_BLOCKED, balance_seen=balance, blocked_by=blocked_by)
        if metadata_keys > METADATA_KEYS_MAX:
            # The merge would hold more keys than storage takes (422; the count rides in
            # balance_seen, as the seq of a PRECONDITION_FAILED does).
            return Reply(Outcome.METADATA_TOO_MANY_KEYS, balance_seen=metadata_keys)
        return None

    # -- holds ---------------------------------------------------------------------------

    def _hold(self, command: HoldCommand, applied: Applied) -> Reply:
        """Create, capture, void or expire a hold (docs/ARCHITECTURE.md, "Holds").

        A hold's money stays in ``balance`` and is counted in ``held``; ``available`` =
        balance - held is what withdrawals, transfers and new holds may take. A resolution
        writes CAPTURE (balance and held down by the captured amount) and/or RELEASE (held
        down by the rest) rows and closes the hold in the same batch; the hold leaves the
        wallet's PENDING set, so it resolves once. A command on a hold that is not PENDING
        in memory answers HOLD_NOT_PENDING: the caller reads the stored hold to say why.
        """
        wallet_id = command.wallet_id
        wid = wallet_id.int
        resident = self._residents.get(wid)
        if command.scale is not None and command.amount is not None:
            if resident is None:  # no currency to read the amount in: nothing to decide
                return Reply(Outcome.WALLET_NOT_FOUND)
            currency = resident.currency
            minor = to_minor(command.amount, command.scale, currency.exponent)
            if minor is None or not storable_amount(minor):
                return Reply(Outcome.AMOUNT_NOT_IN_CURRENCY, currency=currency)
            command.amount, command.scale = minor, None  # decided once: it is this command's
        if not self._storable_hold(command):
            return _NOT_STORABLE
        if resident is None:
            return Reply(Outcome.WALLET_NOT_FOUND)
        if command.to_wallet_id == wallet_id:
            return Reply(Outcome.SAME_WALLET)
        if command.to_currency is not None and command.to_currency != resident.currency:
            return Reply(Outcome.CURRENCY_MISMATCH)
        if command.action is HoldAction.CREATE:
            return self._create_hold(command, wallet_id, resident, applied)
        hold = resident.pending_holds().get(command.hold_id.int)
        if hold is None:
            self._rests_on_open_state(resident, wid, applied)
            return Reply(Outcome.HOLD_NOT_PENDING)
        expired = self._clock_us() >= hold.expires_at_us
        captured = 0
        if command.action is HoldAction.EXPIRE:
            if not expired:
                self._rests_on_open_state(resident, wid, applied)
                return Reply(Outcome.HOLD_NOT_PENDING, hold=hold)
            status = HoldStatus.EXPIRED
        elif expired:  # by expires_at, whether or not the sweep has released it yet
            self._rests_on_open_state(resident, wid, applied)
            return Reply(Outcome.HOLD_EXPIRED, hold=hold)
        elif command.action is HoldAction.CAPTURE:
            captured = hold.amount if command.amount is None else command.amount
            if captured > hold.amount:
                self._rests_on_open_state(resident, wid, applied)
                return Reply(Outcome.CAPTURE_EXCEEDS_HOLD, hold=hold)
            # A capture takes money out: a debit (a void or an expiry only gives it back to
            # ``available``, so they go on in any status). Not recorded: a capture's key is
            # stored on the hold when it resolves.
            wallet_status = resident.terms()[0]
            if wallet_status is not _ACTIVE:
                self._rests_on_open_state(resident, wid, applied)
                return Reply(_REFUSAL_OUTCOMES[_DEBIT_REFUSALS[wallet_status]], hold=hold)
            status = HoldStatus.CAPTURED
        else:
            status = HoldStatus.VOIDED
        balance, held = resident.balance_and_held()
        hold_id = command.hold_id
        actor = command.actor
        view: WalletView | None = None
        to_wallet_id = command.to_wallet_id
        transfer_id = command.transfer_id
        if to_wallet_id is not None and transfer_id is not None and captured:
            # Into another wallet: the whole hold is released and the captured part leaves
            # as a transfer's debit (TRANSFER_OUT, keyed by the transfer id) in the same
            # commit, the transfer opened PENDING; its credit leg is driven as any
            # transfer's (engine/transfers.py). Captured money never leaves the system here.
            held -= hold.amount
            self._write(
                wallet_id, resident, OperationKind.RELEASE, hold.amount, balance, held,
                hold_key(OperationKind.RELEASE, hold_id), hold.reference, applied,
                remember=False, actor=actor, metadata=hold.metadata,
            )  # fmt: skip
            balance -= captured
            view = self._write(
                wallet_id, resident, OperationKind.TRANSFER_OUT, captured, balance, held,
                transfer_leg_key(OperationKind.TRANSFER_OUT, transfer_id), hold.reference,
                applied, remember=False, actor=actor, metadata=hold.metadata,
            )  # fmt: skip
            resident.open_out(transfer_id, captured)
            self._sending.add(wallet_id.int)
            now_us = view.updated_at_us
            applied.batch.new_transfers.append(
                TransferRecord(
                    transfer_id, wallet_id, to_wallet_id, captured, hold.reference,
                    TransferStatus.PENDING, None, now_us, now_us, actor, resident.currency,
                    hold.metadata,
                )
            )  # fmt: skip
            captured_in = captured
            captured = 0  # the rows below: none (all released above)
            rest = 0
        else:
            to_wallet_id = transfer_id = None
            captured_in = 0
            rest = hold.amount - captured
        if captured:
            balance -= captured
            held -= captured
            view = self._write(
                wallet_id, resident, OperationKind.CAPTURE, captured, balance, held,
                hold_key(OperationKind.CAPTURE, hold_id), hold.reference, applied,
                remember=False, actor=actor, metadata=hold.metadata,
            )  # fmt: skip
        captured += captured_in
        if rest:
            held -= rest
            view = self._write(
                wallet_id, resident, OperationKind.RELEASE, rest, balance, held,
                hold_key(OperationKind.RELEASE, hold_id), hold.reference, applied,
                remember=False, actor=actor, metadata=hold.metadata,
            )  # fmt: skip
        assert view is not None  # a hold's amount is positive: one row at least
        pending = resident.pending
        assert pending is not None
        if pending.holds is None:
            pending.holds = dict(resident.holds or _NO_HOLDS)
        del pending.holds[hold_id.int]
        now_us = view.updated_at_us
        applied.batch.hold_updates.append(
            HoldUpdate(hold_id, status, captured, to_wallet_id, transfer_id, command.key,
                       command.fingerprint, now_us)
        )  # fmt: skip
        resolved = hold._replace(
            currency=resident.currency,
            status=status, captured=captured, to_wallet_id=to_wallet_id, transfer_id=transfer_id,
            resolve_key=command.key, resolve_fingerprint=command.fingerprint,
            updated_at_us=now_us,
        )  # fmt: skip
        return Reply(Outcome.OK, view, hold=resolved)

    def _create_hold(
        self, command: HoldCommand, wallet_id: UUID, resident: Resident, applied: Applied
    ) -> Reply:
        wid = wallet_id.int
        log_key = command.log_key
        # What a refusal of a keyed creation records and a retry is compared with.
        request = (
            None
            if log_key is None or command.amount is None
            else _HoldRequest(wallet_id, OperationKind.HOLD, command.amount, log_key,
                              command.reference, command.metadata)
        )  # fmt: skip
        if log_key is not None:
            earlier = self._keys.get((wallet_id, log_key))
            if isinstance(earlier, RefusalRecord):  # a retry of a refused keyed creation
                assert request is not None
                if (wallet_id, log_key) in self._uncommitted_refusals and (
                    earlier not in applied.batch.refusals
                ):
                    applied.dependent.append((len(applied.replies), _NO_WALLET))
                return _replay_refusal(request, earlier, resident.currency)
            if earlier is not None:  # a retry of a keyed creation: the caller reads it
                if earlier.seq > resident.seq:
                    applied.dependent.append((len(applied.replies), wid))
                return Reply(Outcome.CREATED, replayed=True)
        wallet_status = resident.terms()[0]
        if wallet_status is not _ACTIVE:  # a hold takes money out of available: a debit
            reason = _DEBIT_REFUSALS[wallet_status]
            if request is not None:  # recorded like a keyed withdrawal's refusal
                return self._refuse(request, wallet_id, reason, 0, resident, applied, command.actor)
            self._rests_on_open_state(resident, wid, applied)
            return Reply(_REFUSAL_OUTCOMES[reason])
        holds = resident.pending_holds()
        if len(holds) >= self._holds_per_wallet_max:
            self._rests_on_open_state(resident, wid, applied)
            return Reply(Outcome.TOO_MANY_HOLDS)
        balance, held = resident.balance_and_held()
        available = balance - held + resident.terms()[1]
        amount = command.amount
        assert amount is not None
        if amount > available:
            if request is not None:  # recorded like a keyed withdrawal's refusal
                return self._refuse(
                    request, wallet_id, RefusalReason.INSUFFICIENT_FUNDS, available,
                    resident, applied, command.actor,
                )  # fmt: skip
            self._rests_on_open_state(resident, wid, applied)
            return Reply(
                Outcome.INSUFFICIENT_FUNDS, balance_seen=available, currency=resident.currency
            )
        hold_id = command.hold_id
        view = self._write(
            wallet_id, resident, OperationKind.HOLD, amount, balance, held + amount,
            hold_key(OperationKind.HOLD, hold_id), command.reference, applied,
            remember=log_key is not None, actor=command.actor, metadata=command.metadata,
        )  # fmt: skip
        now_us = view.updated_at_us
        hold = HoldRecord(
            hold_id, wallet_id, command.shard, amount, HoldStatus.PENDING,
            now_us + command.expires_in_us, 0, None, None, command.reference, command.key,
            command.fingerprint or "", None, None, now_us, now_us, resident.currency,
            command.metadata,
        )  # fmt: skip
        pending = resident.pending
        assert pending is not None
        if pending.holds is None:
            pending.holds = dict(resident.holds or _NO_HOLDS)
        pending.holds[hold_id.int] = hold
        applied.batch.new_holds.append(hold)
        return Reply(Outcome.CREATED, view, hold=hold)

    @staticmethod
    def _rests_on_open_state(resident: Resident, wid: int, applied: Applied) -> None:
        """A refusal decided on state an open batch wrote is true only if that batch
        commits (``answers``)."""
        if resident.pending is not None or resident.seq < 0:
            applied.dependent.append((len(applied.replies), wid))

    def _refuse(
        self,
        command: Operation | None,
        wallet_id: UUID,
        reason: RefusalReason,
        balance_seen: int,
        resident: Resident,
        applied: Applied,
        actor: str | None,
    ) -> Reply:
        """A business refusal; a client operation's with a key is recorded in the batch, to
        be replayed (``command`` None: a credit or refund leg, refused like an unkeyed
        operation; the refund records the credit's refusal in the transfer)."""
        pending = resident.pending
        key = None if command is None else command.idempotency_key
        if command is None or key is None:
            if pending is not None or resident.seq < 0:  # decided on an open batch's state
                applied.dependent.append((len(applied.replies), wallet_id.int))
        else:
            # The seq the decision rests on, not counting this batch's own writes: storage
            # records the refusal only once that state is stored, so a stored refusal is
            # always true (and needs no dependent mark).
            written = applied.written.get(wallet_id.int)
            if written is not None:
                fence_seq = written[2]
            elif pending is not None:
                fence_seq = pending.seq
            else:
                fence_seq = resident.seq
            record = RefusalRecord(
                wallet_id, key, command.kind, command.amount, reason, balance_seen, fence_seq,
                self._clock_us(), command.reference, actor, command.metadata,
            )  # fmt: skip
            applied.batch.refusals.append(record)
            self._remember_key((wallet_id, key), record)
            self._uncommitted_refusals.add((wallet_id, key))
            applied.added_keys.append((wallet_id, key))
        return Reply(
            _REFUSAL_OUTCOMES[reason], balance_seen=balance_seen, currency=resident.currency
        )

    def _storable_hold(self, command: HoldCommand) -> bool:
        """A hold command's fields within what storage holds (engine/bounds.py)."""
        amount, key, reference = command.amount, command.key, command.reference
        if command.action is HoldAction.CREATE and (
            amount is None or not 0 < command.expires_in_us <= self._expires_in_us_max
        ):
            return False
        if amount is not None and not storable_amount(amount):
            return False
        if (command.to_wallet_id is None) != (command.transfer_id is None):
            return False
        if command.metadata and not storable_metadata(command.metadata):
            return False
        return (key is None or storable_text(key, 1, KEY_LENGTH_MAX)) and (
            reference is None or storable_text(reference, 0, REFERENCE_LENGTH_MAX)
        )

    def _create_wallet(self, command: CreateWallet, applied: Applied) -> Reply:
        wallet_id = command.wallet_id
        key = command.idempotency_key
        if key is not None and not storable_text(key, 1, KEY_LENGTH_MAX):
            return _NOT_STORABLE
        metadata = command.metadata
        if metadata and not storable_metadata(metadata):
            return _NOT_STORABLE
        if key is not None:
            earlier = self._create_keys.get(key)
            if earlier is not None:
                owner_wid = earlier.wallet_id.int
                owner = self._residents.get(owner_wid)
                if owner is not None and owner.seq < 0:  # its creation is not committed
                    applied.dependent.append((len(applied.replies), owner_wid))
                if earlier.wallet_id != wallet_id or earlier.fingerprint != command.fingerprint:
                    return Reply(Outcome.IDEMPOTENCY_KEY_REUSED)
                # The same fingerprint: the same metadata (engine/router.py create_wallet).
                created = earlier.created_at_us
                # The same fingerprint: the same currency and metadata (engine/router.py
                # create_wallet).
                view = WalletView(
                    wallet_id, 0, 0, created, created, 0, command.currency, metadata=metadata
                )
                return Reply(Outcome.CREATED, view, replayed=True)
        wid = wallet_id.int
        existing = self._residents.get(wid)
        if existing is not None:
            if existing.seq < 0:  # its creation is not committed
                applied.dependent.append((len(applied.replies), wid))
            return Reply(Outcome.WALLET_ALREADY_EXISTS)
        now_us = self._clock_us()
        currency = command.currency
        self._residents[wid] = Resident.being_created(now_us, currency, metadata)
        applied.touched_wallets.add(wid)
        applied.batch.new_wallets.append(
            NewWallet(wallet_id, now_us, key, command.fingerprint, currency, metadata)
        )
        if key is not None:
            self._remember_create_key(key, CreationKey(wallet_id, command.fingerprint, now_us))
            applied.added_create_keys.append(key)
        view = WalletView(wallet_id, 0, 0, now_us, now_us, 0, currency, metadata=metadata)
        return Reply(Outcome.CREATED, view)

    @staticmethod
    def _write_snapshots(applied: Applied) -> None:
        """The snapshot row of each written wallet: its pending state at the batch's end."""
        snapshots = applied.batch.snapshots
        finals = applied.finals
        for wallet_id, resident, prev_seq in applied.written.values():
            pending = resident.pending
            assert pending is not None
            snapshots.append(
                SnapshotUpdate(wallet_id, prev_seq, pending.seq, pending.balance,
                               pending.updated_at_us, pending.held)
            )  # fmt: skip
            # A copy: later batches go on changing the pending set before this one commits.
            holds = None if pending.holds is None else dict(pending.holds)
            outs = None if pending.outs is None else dict(pending.outs)
            finals.append(
                (resident, pending.balance, pending.seq, pending.updated_at_us, pending.held,
                 holds, pending.status, pending.overdraft_limit, pending.metadata, outs)
            )  # fmt: skip

    # -- how the write ended -------------------------------------------------------------

    def committed(self, applied: Applied) -> None:
        """The batch is stored: promote its pending state to committed."""
        for refusal in applied.batch.refusals:
            self._uncommitted_refusals.discard((refusal.wallet_id, refusal.idempotency_key))
        residents = self._residents
        for new in applied.batch.new_wallets:
            resident = residents.get(new.wallet_id.int)
            if resident is not None and resident.seq == SEQ_CREATING:
                resident.seq = 0
                _drop_pending_if_caught_up(resident)
        for (
            resident, balance, seq, updated_at_us, held, holds, status, limit, metadata, outs,
        ) in applied.finals:  # fmt: skip
            require(seq > resident.seq, "commits of one wallet must be in order")
            resident.balance = balance
            resident.seq = seq
            resident.updated_at_us = updated_at_us
            resident.held = held
            resident.status = status
            resident.overdraft_limit = limit
            resident.metadata = metadata
            if holds is not None:
                resident.holds = holds or None
            if outs is not None:
                resident.outs = outs or None
            _drop_pending_if_caught_up(resident)

    def answers(self, applied: Applied, *, earlier_failed: bool = False) -> list[Reply]:
        """The replies of a stored batch, in command order, reads from committed state.

        With ``earlier_failed`` (a batch before this one did not commit, or its outcome is
        unknown) a reply that rests on state such a batch wrote is not known to be true:
        it becomes 503 ``UNAVAILABLE``. The rest are true: this batch's writes were fenced
        on stored state, and its other decisions read committed state only.
        """
        replies = applied.replies
        for index, wallet_id, resident in applied.reads:
            replies[index] = self._committed_reply(wallet_id, resident)
        if earlier_failed:
            touched = applied.touched_wallets
            for index, wid in applied.dependent:
                if wid not in touched:
                    replies[index] = _UNAVAILABLE
        return replies

    def _committed_reply(self, wallet_id: UUID, resident: Resident | None) -> Reply:
        if resident is None:  # not there when applied; perhaps created later in the batch
            resident = self._residents.get(wallet_id.int)
        if resident is None or resident.seq == SEQ_CREATING:
            return Reply(Outcome.WALLET_NOT_FOUND)
        if resident.seq == SEQ_UNKNOWN:  # an earlier batch that touched it failed
            return _UNAVAILABLE
        return Reply(Outcome.OK, resident.committed_view(wallet_id))

    def unknown(self, applied: Applied) -> None:
        """The batch's write failed: what it touched is unknown until re-read.

        Fast-path reads of those wallets then miss and go through the mailbox, behind the
        ``forget`` that makes them re-read from storage.
        """
        residents = self._residents
        for wid in applied.touched_wallets:
            resident = residents.get(wid)
            if resident is not None:
                resident.seq = SEQ_UNKNOWN

    def forget(self, applied: Applied) -> None:
        """Drop what a failed batch touched, so it is re-read from storage before use."""
        for wid in applied.touched_wallets:
            self._residents.pop(wid, None)
            self._sending.discard(wid)  # re-read with its PENDING transfers out
        for key in applied.added_keys:
            self._keys.pop(key, None)
            self._uncommitted_refusals.discard(key)
        for slot in applied.added_reversals:
            self._reversals.pop(slot, None)
        for create_key in applied.added_create_keys:
            self._create_keys.pop(create_key, None)

    # -- bounded memory ------------------------------------------------------------------

    def evict_idle(self) -> int:
        """Passivation: drop the least recently used clean wallets past the resident bound.

        Only between batches (no ``execute`` may be waiting on a load that checked the
        residents). Dirty wallets (pending changes of open batches) stay: the overshoot is
        bounded by the wallets of the open batches. Returns how many were dropped.
        """
        residents = self._residents
        bound = self._residents_max
        if len(residents) <= bound:
            return 0
        # Evict down to a little under the bound, so the scan from the front of the dict
        # (which steps over the holes re-insertions leave) is paid once per chunk.
        target = len(residents) - bound + bound // 16
        victims: list[int] = []
        # Dirty wallets are the most recently used, near the end: the scan stops early.
        scan_max = target + self._evict_scan_slack
        for scanned, (wallet_id, resident) in enumerate(residents.items()):
            if len(victims) >= target or scanned >= scan_max:
                break
            if not resident.is_dirty():
                victims.append(wallet_id)
        sending = self._sending
        for wallet_id in victims:
            del residents[wallet_id]
            sending.discard(wallet_id)
        return len(victims)

    def _remember_key(self, key: tuple[UUID, str], record: OperationRecord | RefusalRecord) -> None:
        self._keys[key] = record
        self._keys.move_to_end(key)
        while len(self._keys) > self._keys_max:
            self._keys.popitem(last=False)

    def _remember_create_key(self, key: str, entry: CreationKey) -> None:
        self._create_keys[key] = entry
        self._create_keys.move_to_end(key)
        while len(self._create_keys) > self._keys_max:
            self._create_keys.popitem(last=False)


def _storable_operation(command: Operation) -> bool:
    """A client operation's fields within what storage holds (engine/bounds.py)."""
    key, reference, metadata = command.idempotency_key, command.reference, command.metadata
    kind = command.kind
    return (
        storable_amount(command.amount)
        # A reversal (engine/router.py ``reverse``) only under its own key, which names the
        # operation it reverses (storage allows one per operation).
        and (kind in _CLIENT_KINDS or (kind in _REVERSALS and reversal_of(key) is not None))
        and (key is None or storable_text(key, 1, KEY_LENGTH_MAX))
        and (reference is None or storable_text(reference, 0, REFERENCE_LENGTH_MAX))
        and (not metadata or storable_metadata(metadata))
    )


def _storable_leg(leg: TransferLeg) -> bool:
    """A transfer leg that storage takes and that matches its kind: an amount in range, two
    different wallets, a storable reference, a failure code only on a refund (one that
    reads back as an outcome), and no debit opening a transfer under an id reserved to
    captures (engine/holds.py)."""
    transfer, kind = leg.transfer, leg.kind
    reference = transfer.reference
    if not storable_amount(transfer.amount) or transfer.from_wallet_id == transfer.to_wallet_id:
        return False
    if reference is not None and not storable_text(reference, 0, REFERENCE_LENGTH_MAX):
        return False
    if transfer.actor is not None and not storable_text(transfer.actor, 1, ACTOR_LENGTH_MAX):
        return False
    if transfer.metadata and not storable_metadata(transfer.metadata):
        return False
    if kind is OperationKind.TRANSFER_REFUND:
        return leg.failure_code in REFUND_FAILURE_CODES
    if leg.failure_code is not None:
        return False
    if kind is OperationKind.TRANSFER_OUT:
        return not is_derived_transfer_id(transfer.transfer_id)
    return kind is OperationKind.TRANSFER_IN


def _minor_amount(item: Operation, resident: Resident | None) -> int:
    """An operation's amount in its wallet's minor units, as far as ``stale_outs`` needs
    it (0 when it cannot be read so: such an operation is refused, it credits nothing)."""
    scale = item.scale
    if scale is None or resident is None:
        return item.amount
    return to_minor(item.amount, scale, resident.currency.exponent) or 0


def _replay_operation(
    kind: OperationKind, amount: int, earlier: OperationRecord, resident: Resident
) -> Reply:
    if earlier.kind is not kind or earlier.amount != amount:
        return Reply(Outcome.IDEMPOTENCY_KEY_REUSED)
    view = WalletView(
        earlier.wallet_id,
        earlier.balance_after,
        earlier.seq,
        resident.created_at_us,
        earlier.created_at_us,
        earlier.held_after,
        resident.currency,
        earlier.status_after,
        earlier.overdraft_limit_after,
        # A WALLET_UPDATE row carries the wallet's metadata after it; any other row its
        # own (the operation's): the wallet's is shown as it is now.
        earlier.metadata if kind is OperationKind.WALLET_UPDATE else resident.metadata,
    )
    return Reply(Outcome.OK, view, replayed=True)


class _Rescaled(NamedTuple):
    """A client operation with its amount rescaled to its wallet's minor units."""

    wallet_id: UUID
    kind: OperationKind
    amount: int
    idempotency_key: str | None
    reference: str | None
    metadata: Metadata = NO_METADATA
    scale: None = None


class _HoldRequest(NamedTuple):
    """A keyed hold creation read as an ``Operation``: its refusal is recorded and replayed
    like a keyed withdrawal's, under the HOLD row's key."""

    wallet_id: UUID
    kind: OperationKind
    amount: int
    idempotency_key: str
    reference: str | None
    metadata: Metadata
    scale: None = None


def _replay_refusal(command: Operation, earlier: RefusalRecord, currency: Currency) -> Reply:
    if (earlier.kind, earlier.amount, earlier.reference, earlier.metadata) != (
        command.kind,
        command.amount,
        command.reference,
        command.metadata,
    ):
        return Reply(Outcome.IDEMPOTENCY_KEY_REUSED)
    return Reply(
        _REFUSAL_OUTCOMES[earlier.reason], balance_seen=earlier.balance_seen, replayed=True,
        currency=currency,
    )  # fmt: skip


def _drop_pending_if_caught_up(resident: Resident) -> None:
    pending = resident.pending
    if pending is not None and pending.seq == resident.seq:
        resident.pending = None


# A JointPayment the ledger does not take whole: nothing applied (the saga goes on).
_NOT_TAKEN: Final = Reply(Outcome.NOT_OWNER)

# The one dispatch point: a command's type -> the rule that decides it.
_HANDLERS: Final[dict[type, Callable[[Ledger, Command, Applied], Reply]]] = {
    ApplyOperation: Ledger._apply_operation,  # type: ignore[dict-item]
    ApplyOperations: Ledger._apply_operations,  # type: ignore[dict-item]
    CreateWallet: Ledger._create_wallet,  # type: ignore[dict-item]
    HoldCommand: Ledger._hold,  # type: ignore[dict-item]
    ReadWallet: Ledger._read_wallet,  # type: ignore[dict-item]
    TransferLeg: Ledger._apply_transfer_leg,  # type: ignore[dict-item]
    JointTransfer: Ledger._apply_joint_transfer,  # type: ignore[dict-item]
    JointPayment: Ledger._apply_joint_payment,  # type: ignore[dict-item]
    UpdateWallet: Ledger._update_wallet,  # type: ignore[dict-item]
}
