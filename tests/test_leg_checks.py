"""Storage refuses money legs that do not match their transfer or hold (migration
legs_match_their_transfers_and_holds): forged batches sent through PostgresLog.append_batch,
and forged legs delivered through the engine (Engine.deliver_leg, the ledger) on real
PostgreSQL. Each forgery is refused with its own SQLSTATE, as a definite error (not an
unknown outcome), and writes nothing; the honest leg after it still applies."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from uuid import UUID

import asyncpg
import pytest

from walletd.engine.commands import Outcome, TransferLeg, hold_key, transfer_leg_key
from walletd.engine.limits import EngineLimits
from walletd.engine.model import (
    Batch,
    HoldRecord,
    HoldStatus,
    HoldUpdate,
    NewWallet,
    OperationKind,
    OperationRecord,
    SnapshotUpdate,
    TransferRecord,
    TransferStatus,
    TransferUpdate,
)
from walletd.engine.ports import (
    CommitOutcomeUnknown,
    StorageError,
    StorageRefused,
    StorageUnavailable,
)
from walletd.engine.router import Engine
from walletd.persistence.database import PoolSettings, create_pool
from walletd.persistence.operator import verify
from walletd.persistence.postgres_log import PostgresLog

K = OperationKind
SENDER, RECEIVER, ATTACKER = UUID(int=0xA), UUID(int=0xB), UUID(int=0xC)
T_ID, HOLD_ID, OTHER_HOLD_ID = UUID(int=0x7), UUID(int=0x40), UUID(int=0x41)
T0 = 1_700_000_000_000_000
CLOSED_US = T0 + 1_000  # when the drafts' closes happen: after the opening
BILLION_MINOR = 100_000_000_000  # 1,000,000,000.00
TRANSFER_LEG = "WD006"
HOLD_ROW = "WD007"

# How each kind moves (balance, held): the chain walletd_append_batch and verify replay.
_MOVES: dict[OperationKind, tuple[int, int]] = {
    K.DEPOSIT: (1, 0), K.WITHDRAW: (-1, 0), K.TRANSFER_OUT: (-1, 0), K.TRANSFER_IN: (1, 0),
    K.TRANSFER_REFUND: (1, 0), K.HOLD: (0, 1), K.CAPTURE: (-1, -1), K.RELEASE: (0, -1),
}  # fmt: skip


@dataclass
class Book:
    """The stored (seq, balance, held) of each wallet, so that every batch the tests build
    is a correct chain and snapshot move: a forged batch fails only for what it forges."""

    wallets: dict[UUID, list[int]] = field(default_factory=dict)

    def batch(self) -> Draft:
        return Draft(self)


@dataclass
class Draft:
    book: Book
    batch: Batch = field(default_factory=Batch)
    moved: dict[UUID, list[int]] = field(default_factory=dict)  # prev_seq, seq, balance, held

    def row(self, wallet: UUID, kind: OperationKind, amount: int, key: str | None) -> Draft:
        seq, balance, held = self.book.wallets[wallet]
        state = self.moved.setdefault(wallet, [seq, seq, balance, held])
        signed_balance, signed_held = _MOVES[kind]
        state[1] += 1
        state[2] += signed_balance * amount
        state[3] += signed_held * amount
        self.batch.operations.append(
            OperationRecord(wallet, state[1], kind, amount, state[2], key, T0 + state[1],
                            state[3])
        )  # fmt: skip
        return self

    def leg(self, wallet: UUID, kind: OperationKind, amount: int, transfer: UUID) -> Draft:
        return self.row(wallet, kind, amount, transfer_leg_key(kind, transfer))

    def hold_row(self, wallet: UUID, kind: OperationKind, amount: int, hold: UUID) -> Draft:
        return self.row(wallet, kind, amount, hold_key(kind, hold))

    def opens(self, transfer: UUID, source: UUID, target: UUID, amount: int) -> Draft:
        self.batch.new_transfers.append(
            TransferRecord(transfer, source, target, amount, None, TransferStatus.PENDING,
                           None, T0, T0)
        )  # fmt: skip
        return self

    def closes(self, transfer: UUID, status: TransferStatus) -> Draft:
        failure = "WALLET_NOT_FOUND" if status is TransferStatus.FAILED else None
        self.batch.transfer_updates.append(TransferUpdate(transfer, status, failure, CLOSED_US))
        return self

    def holds(self, hold: UUID, wallet: UUID, amount: int) -> Draft:
        self.batch.new_holds.append(
            HoldRecord(hold, wallet, 0, amount, HoldStatus.PENDING, T0 + 10**9, 0, None, None,
                       None, None, "", None, None, T0, T0)
        )  # fmt: skip
        return self

    def resolves(
        self,
        hold: UUID,
        status: HoldStatus,
        captured: int = 0,
        to_wallet: UUID | None = None,
        transfer: UUID | None = None,
    ) -> Draft:
        self.batch.hold_updates.append(
            HoldUpdate(hold, status, captured, to_wallet, transfer, None, None, T0)
        )
        return self

    def done(self) -> Batch:
        self.batch.snapshots = [
            SnapshotUpdate(wallet, prev, seq, balance, T0 + seq, held)
            for wallet, (prev, seq, balance, held) in self.moved.items()
        ]
        return self.batch

    def stored(self) -> None:
        """The batch landed: its moves are the book's stored state."""
        for wallet, (_prev, seq, balance, held) in self.moved.items():
            self.book.wallets[wallet] = [seq, balance, held]


@dataclass
class Storage:
    log: PostgresLog
    dsn: str
    book: Book

    async def append(self, draft: Draft) -> None:
        await self.log.append_batch(draft.done())
        draft.stored()

    async def refused(self, draft: Draft, sqlstate: str) -> str:
        """Appends the forged batch: refused by the server with ``sqlstate`` (a definite
        StorageError, not an unknown outcome), nothing written. Returns the message."""
        before = await dump(self.dsn)
        with pytest.raises(StorageError) as refused:
            await self.log.append_batch(draft.done())
        # Definite: the batch's commands can be answered (or isolated), not "unknown".
        assert not isinstance(refused.value, (CommitOutcomeUnknown, StorageUnavailable))
        cause = refused.value.__cause__
        assert isinstance(cause, asyncpg.PostgresError)
        assert cause.sqlstate == sqlstate, cause
        if sqlstate in (TRANSFER_LEG, HOLD_ROW):  # isolated alone by the pipeline
            assert isinstance(refused.value, StorageRefused)
        assert await dump(self.dsn) == before
        return str(cause)


async def dump(dsn: str) -> list[object]:
    """Everything a batch can write, in a comparable form."""
    connection = await asyncpg.connect(dsn)
    try:
        return [
            [tuple(row) for row in await connection.fetch(query)]
            for query in (
                "SELECT id, balance, seq, held FROM wallets ORDER BY id",
                "SELECT wallet_id, seq, kind, amount, idempotency_key FROM wallet_operations"
                " ORDER BY wallet_id, seq",
                "SELECT id, status, amount FROM transfers ORDER BY id",
                "SELECT id, status, captured FROM holds ORDER BY id",
            )
        ]
    finally:
        await connection.close()


@pytest.fixture
async def storage(database_url: str) -> AsyncIterator[Storage]:
    """Three wallets: the sender with 1,000 minor units, the receiver and the attacker."""
    pool = await create_pool(database_url, PoolSettings(size_max=2))
    try:
        storage = Storage(PostgresLog(pool), database_url, Book())
        await storage.log.append_batch(
            Batch(new_wallets=[NewWallet(w, T0, None, "") for w in (SENDER, RECEIVER, ATTACKER)])
        )
        for wallet in (SENDER, RECEIVER, ATTACKER):
            storage.book.wallets[wallet] = [0, 0, 0]
        await storage.append(storage.book.batch().row(SENDER, K.DEPOSIT, 1_000, None))
        yield storage
    finally:
        await pool.close()


async def opened(storage: Storage, amount: int = 1) -> None:
    """The transfer T_ID of ``amount`` from the sender to the receiver, PENDING, honestly."""
    await storage.append(
        storage.book.batch()
        .leg(SENDER, K.TRANSFER_OUT, amount, T_ID)
        .opens(T_ID, SENDER, RECEIVER, amount)
    )


# Forged batches on a PENDING transfer T_ID of 1 (sender -> receiver): each returns the draft.
PENDING_FORGERIES: dict[str, Callable[[Book], Draft]] = {
    # The review's mint: a credit of 1,000,000,000.00 for a transfer of 0.01.
    "credit_of_another_amount": lambda book: (
        book.batch()
        .leg(RECEIVER, K.TRANSFER_IN, BILLION_MINOR, T_ID)
        .closes(T_ID, TransferStatus.COMPLETED)
    ),
    "credit_to_another_wallet": lambda book: (
        book.batch().leg(ATTACKER, K.TRANSFER_IN, 1, T_ID).closes(T_ID, TransferStatus.COMPLETED)
    ),
    "credit_that_closes_nothing": lambda book: book.batch().leg(RECEIVER, K.TRANSFER_IN, 1, T_ID),
    "credit_without_its_key": lambda book: (
        book.batch().row(RECEIVER, K.TRANSFER_IN, 1, None).closes(T_ID, TransferStatus.COMPLETED)
    ),
    "close_without_its_credit": lambda book: (
        book.batch().row(RECEIVER, K.DEPOSIT, 1, None).closes(T_ID, TransferStatus.COMPLETED)
    ),
    "refund_of_another_amount": lambda book: (
        book.batch().leg(SENDER, K.TRANSFER_REFUND, 2, T_ID).closes(T_ID, TransferStatus.FAILED)
    ),
    "refund_to_another_wallet": lambda book: (
        book.batch().leg(ATTACKER, K.TRANSFER_REFUND, 1, T_ID).closes(T_ID, TransferStatus.FAILED)
    ),
    "refund_closing_as_completed": lambda book: (
        book.batch().leg(SENDER, K.TRANSFER_REFUND, 1, T_ID).closes(T_ID, TransferStatus.COMPLETED)
    ),
}


@pytest.mark.parametrize("forgery", sorted(PENDING_FORGERIES))
async def test_a_credit_or_refund_unlike_its_transfer_is_refused(
    storage: Storage, forgery: str
) -> None:
    """A credit or refund leg whose wallet, amount, key or kind is not its transfer's, or a
    close without its leg, is refused (WD006) and writes nothing; the honest credit of the
    same transfer then lands."""
    await opened(storage)
    message = await storage.refused(PENDING_FORGERIES[forgery](storage.book), TRANSFER_LEG)
    assert "walletd:" in message
    await storage.append(
        storage.book.batch()
        .leg(RECEIVER, K.TRANSFER_IN, 1, T_ID)
        .closes(T_ID, TransferStatus.COMPLETED)
    )
    assert (await verify(storage.dsn)).clean


async def test_the_refused_row_is_named(storage: Storage) -> None:
    """The refusal names the forged row (wallet, seq, kind, amount) and the transfer's leg."""
    await opened(storage)
    message = await storage.refused(PENDING_FORGERIES["credit_to_another_wallet"](storage.book),
                                    TRANSFER_LEG)  # fmt: skip
    assert f"log row (wallet {ATTACKER}, seq 1, TRANSFER_IN of 1)" in message
    assert f"transfer {T_ID}, whose TRANSFER_IN is 1 on wallet {RECEIVER}" in message


async def test_a_second_credit_of_a_completed_transfer_is_refused(storage: Storage) -> None:
    """After the honest credit, another TRANSFER_IN of the transfer on another wallet is
    refused, whether it closes the transfer again (WD004) or closes nothing (WD006)."""
    await opened(storage)
    await storage.append(
        storage.book.batch()
        .leg(RECEIVER, K.TRANSFER_IN, 1, T_ID)
        .closes(T_ID, TransferStatus.COMPLETED)
    )
    await storage.refused(storage.book.batch().leg(ATTACKER, K.TRANSFER_IN, 1, T_ID), TRANSFER_LEG)
    await storage.refused(
        storage.book.batch()
        .leg(ATTACKER, K.TRANSFER_IN, 1, T_ID)
        .closes(T_ID, TransferStatus.COMPLETED),
        "WD004",
    )


# Forged openings: each returns the draft of a batch that opens T_ID (or claims to).
OPENING_FORGERIES: dict[str, Callable[[Book], Draft]] = {
    "debit_of_another_amount": lambda book: (
        book.batch().leg(SENDER, K.TRANSFER_OUT, 1, T_ID).opens(T_ID, SENDER, RECEIVER, 500)
    ),
    "debit_from_another_wallet": lambda book: (
        book.batch()
        .row(RECEIVER, K.DEPOSIT, 5, None)
        .leg(RECEIVER, K.TRANSFER_OUT, 5, T_ID)
        .opens(T_ID, SENDER, RECEIVER, 5)
    ),
    "transfer_without_its_debit": lambda book: (
        book.batch().row(SENDER, K.DEPOSIT, 1, None).opens(T_ID, SENDER, RECEIVER, 500)
    ),
    "debit_without_its_transfer": lambda book: book.batch().leg(SENDER, K.TRANSFER_OUT, 5, T_ID),
    "joint_credit_of_another_amount": lambda book: (
        book.batch()
        .leg(SENDER, K.TRANSFER_OUT, 1, T_ID)
        .leg(RECEIVER, K.TRANSFER_IN, BILLION_MINOR, T_ID)
        .opens(T_ID, SENDER, RECEIVER, 1)
        .closes(T_ID, TransferStatus.COMPLETED)
    ),
}


@pytest.mark.parametrize("forgery", sorted(OPENING_FORGERIES))
async def test_a_debit_unlike_the_transfer_it_opens_is_refused(
    storage: Storage, forgery: str
) -> None:
    """A TRANSFER_OUT must open its transfer in the same statement, from its wallet, of its
    amount (and a transfer is opened only with it); otherwise WD006, nothing written."""
    await storage.refused(OPENING_FORGERIES[forgery](storage.book), TRANSFER_LEG)
    # The honest joint transfer (both legs in one batch, as one pipeline writes it) lands.
    await storage.append(
        storage.book.batch()
        .leg(SENDER, K.TRANSFER_OUT, 5, T_ID)
        .leg(RECEIVER, K.TRANSFER_IN, 5, T_ID)
        .opens(T_ID, SENDER, RECEIVER, 5)
        .closes(T_ID, TransferStatus.COMPLETED)
    )
    assert (await verify(storage.dsn)).clean


async def transfer_rows(dsn: str) -> list[tuple[object, ...]]:
    """Each stored transfer: where its live row version is, its status, failure and
    updated_at (µs)."""
    connection = await asyncpg.connect(dsn)
    try:
        rows = await connection.fetch(
            "SELECT id, ctid::text, status, failure_code,"
            " (extract(epoch FROM updated_at) * 1000000)::bigint FROM transfers"
            " ORDER BY created_at, id"
        )
        return [tuple(row) for row in rows]
    finally:
        await connection.close()


@pytest.mark.parametrize(
    ("status", "second_leg", "failure"),
    [
        (TransferStatus.COMPLETED, (RECEIVER, K.TRANSFER_IN), None),
        (TransferStatus.FAILED, (SENDER, K.TRANSFER_REFUND), "WALLET_NOT_FOUND"),
    ],
)
async def test_a_transfer_opened_and_closed_in_one_append_is_stored_as_one_row_version(
    storage: Storage,
    status: TransferStatus,
    second_leg: tuple[UUID, OperationKind],
    failure: str | None,
) -> None:
    """Both legs in one commit (what one pipeline writes for most transfers): the transfer
    row is inserted closed, not inserted PENDING and then updated (status is indexed, so
    that update was never HOT: a second row version and index entries for nothing). The
    first row of a fresh table is at (0,1); an insert-then-update leaves it at (0,2)."""
    wallet, kind = second_leg
    await storage.append(
        storage.book.batch()
        .leg(SENDER, K.TRANSFER_OUT, 5, T_ID)
        .leg(wallet, kind, 5, T_ID)
        .opens(T_ID, SENDER, RECEIVER, 5)
        .closes(T_ID, status)
    )
    assert await transfer_rows(storage.dsn) == [(T_ID, "(0,1)", int(status), failure, CLOSED_US)]
    assert (await verify(storage.dsn)).clean


async def test_a_transfer_opened_earlier_is_still_closed_by_an_update(storage: Storage) -> None:
    """The other path of the same statement: a transfer opened by one append (PENDING) and
    credited by a later one is updated in place, its close time stored."""
    await opened(storage, 5)
    await storage.append(
        storage.book.batch()
        .leg(RECEIVER, K.TRANSFER_IN, 5, T_ID)
        .closes(T_ID, TransferStatus.COMPLETED)
    )
    [(transfer_id, _where, status, failure, updated_us)] = await transfer_rows(storage.dsn)
    assert (transfer_id, status, failure, updated_us) == (
        T_ID,
        int(TransferStatus.COMPLETED),
        None,
        CLOSED_US,
    )
    assert (await verify(storage.dsn)).clean


async def test_a_transfer_closed_twice_in_one_append_is_refused(storage: Storage) -> None:
    """A batch never closes one transfer twice; one that says so is refused whole (WD004),
    whether the transfer is opened in the same append or was opened before."""
    await storage.refused(
        storage.book.batch()
        .leg(SENDER, K.TRANSFER_OUT, 5, T_ID)
        .leg(RECEIVER, K.TRANSFER_IN, 5, T_ID)
        .opens(T_ID, SENDER, RECEIVER, 5)
        .closes(T_ID, TransferStatus.COMPLETED)
        .closes(T_ID, TransferStatus.COMPLETED),
        "WD004",
    )
    await opened(storage, 5)
    await storage.refused(
        storage.book.batch()
        .leg(RECEIVER, K.TRANSFER_IN, 5, T_ID)
        .closes(T_ID, TransferStatus.COMPLETED)
        .closes(T_ID, TransferStatus.COMPLETED),
        "WD004",
    )


async def held(storage: Storage, *holds: tuple[UUID, int]) -> None:
    """Holds on the sender, PENDING, created honestly."""
    draft = storage.book.batch()
    for hold, amount in holds:
        draft.hold_row(SENDER, K.HOLD, amount, hold).holds(hold, SENDER, amount)
    await storage.append(draft)


# Forged resolutions of HOLD_ID (50 held, beside OTHER_HOLD_ID, 50 held, on the sender).
HOLD_FORGERIES: dict[str, Callable[[Book], Draft]] = {
    "release_of_more_than_held": lambda book: (
        book.batch().hold_row(SENDER, K.RELEASE, 80, HOLD_ID).resolves(HOLD_ID, HoldStatus.VOIDED)
    ),
    "capture_and_release_unlike_the_capture": lambda book: (
        book.batch()
        .hold_row(SENDER, K.CAPTURE, 10, HOLD_ID)
        .hold_row(SENDER, K.RELEASE, 40, HOLD_ID)
        .resolves(HOLD_ID, HoldStatus.CAPTURED, captured=30)
    ),
    "capture_that_resolves_nothing": lambda book: book.batch().hold_row(
        SENDER, K.CAPTURE, 50, HOLD_ID
    ),
    "void_without_its_release": lambda book: (
        book.batch().row(SENDER, K.DEPOSIT, 1, None).resolves(HOLD_ID, HoldStatus.VOIDED)
    ),
    "release_of_another_hold": lambda book: (
        book.batch()
        .hold_row(SENDER, K.RELEASE, 50, OTHER_HOLD_ID)
        .resolves(HOLD_ID, HoldStatus.VOIDED)
    ),
    "capture_into_a_transfer_of_more": lambda book: (
        book.batch()
        .hold_row(SENDER, K.RELEASE, 50, HOLD_ID)
        .leg(SENDER, K.TRANSFER_OUT, 80, T_ID)
        .opens(T_ID, SENDER, ATTACKER, 80)
        .resolves(HOLD_ID, HoldStatus.CAPTURED, captured=50, to_wallet=ATTACKER, transfer=T_ID)
    ),
    "capture_into_a_transfer_to_another_wallet": lambda book: (
        book.batch()
        .hold_row(SENDER, K.RELEASE, 50, HOLD_ID)
        .leg(SENDER, K.TRANSFER_OUT, 50, T_ID)
        .opens(T_ID, SENDER, ATTACKER, 50)
        .resolves(HOLD_ID, HoldStatus.CAPTURED, captured=50, to_wallet=RECEIVER, transfer=T_ID)
    ),
    "capture_into_a_transfer_not_opened": lambda book: (
        book.batch()
        .hold_row(SENDER, K.RELEASE, 50, HOLD_ID)
        .resolves(HOLD_ID, HoldStatus.CAPTURED, captured=50, to_wallet=RECEIVER, transfer=T_ID)
    ),
}


@pytest.mark.parametrize("forgery", sorted(HOLD_FORGERIES))
async def test_a_hold_resolution_unlike_its_hold_is_refused(storage: Storage, forgery: str) -> None:
    """CAPTURE / RELEASE rows must be what their hold's resolution calls for (captured +
    released = the hold's amount, on its wallet; into another wallet: the whole hold
    released and a transfer of the captured part to that wallet opened in the batch);
    otherwise WD007, nothing written. The honest capture then lands."""
    await held(storage, (HOLD_ID, 50), (OTHER_HOLD_ID, 50))
    await storage.refused(HOLD_FORGERIES[forgery](storage.book), HOLD_ROW)
    await storage.append(
        storage.book.batch()
        .hold_row(SENDER, K.RELEASE, 50, HOLD_ID)
        .leg(SENDER, K.TRANSFER_OUT, 30, T_ID)
        .opens(T_ID, SENDER, RECEIVER, 30)
        .resolves(HOLD_ID, HoldStatus.CAPTURED, captured=30, to_wallet=RECEIVER, transfer=T_ID)
    )
    await storage.append(
        storage.book.batch()
        .hold_row(SENDER, K.CAPTURE, 20, OTHER_HOLD_ID)
        .hold_row(SENDER, K.RELEASE, 30, OTHER_HOLD_ID)
        .resolves(OTHER_HOLD_ID, HoldStatus.CAPTURED, captured=20)
    )
    assert (await verify(storage.dsn)).clean


@pytest.mark.parametrize(
    "forgery",
    [
        pytest.param(lambda book: book.batch().hold_row(SENDER, K.HOLD, 50, HOLD_ID)
                     .holds(HOLD_ID, SENDER, 10), id="hold_row_of_another_amount"),
        pytest.param(lambda book: book.batch().row(SENDER, K.DEPOSIT, 1, None)
                     .holds(HOLD_ID, SENDER, 10), id="hold_without_its_row"),
        pytest.param(lambda book: book.batch().hold_row(SENDER, K.HOLD, 10, HOLD_ID),
                     id="hold_row_without_its_hold"),
    ],
)  # fmt: skip
async def test_a_hold_creation_unlike_its_hold_is_refused(
    storage: Storage, forgery: Callable[[Book], Draft]
) -> None:
    """A HOLD row reserves exactly its hold's amount on its wallet, and a hold is created
    only with it; otherwise WD007, nothing written."""
    await storage.refused(forgery(storage.book), HOLD_ROW)


# -- through the engine: the ledger applies what a forged leg says, storage refuses it ------

LIMITS = EngineLimits(pipelines=2, batch_ops_max=64, mailbox_commands_max=256)


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[Engine]:
    pool = await create_pool(database_url, PoolSettings(size_max=4))
    engine = Engine(PostgresLog(pool), LIMITS)
    await engine.start()
    try:
        yield engine
    finally:
        await engine.stop()
        await pool.close()


async def deliver(
    engine: Engine, kind: OperationKind, transfer: TransferRecord, failure: str | None = None
) -> Outcome:
    future = asyncio.get_running_loop().create_future()
    return (await engine.deliver_leg(TransferLeg(kind, transfer, future, failure))).outcome


@pytest.mark.parametrize(
    ("kind", "forge"),
    [
        pytest.param(K.TRANSFER_IN, {"amount": BILLION_MINOR}, id="credit_of_a_billion"),
        pytest.param(K.TRANSFER_IN, {"to_wallet_id": ATTACKER}, id="credit_to_the_attacker"),
        pytest.param(
            K.TRANSFER_IN, {"to_wallet_id": ATTACKER, "amount": BILLION_MINOR},
            id="credit_of_a_billion_to_the_attacker",
        ),
        pytest.param(K.TRANSFER_REFUND, {"amount": BILLION_MINOR}, id="refund_of_a_billion"),
        pytest.param(
            K.TRANSFER_REFUND, {"from_wallet_id": ATTACKER}, id="refund_to_the_attacker"
        ),
    ],
)  # fmt: skip
async def test_a_forged_leg_delivered_to_the_engine_mints_nothing(
    engine: Engine, database_url: str, kind: OperationKind, forge: dict[str, object]
) -> None:
    """The review's attack: a leg for a real PENDING transfer of 0.01, naming another amount
    or wallet, reaches Engine.deliver_leg. The ledger applies it in memory, storage refuses
    it (a definite refusal: the engine answers it alone, STORAGE_REFUSED) and memory is
    re-read: no balance moved, the transfer still PENDING. The honest credit then completes
    it, and verify finds the log clean."""
    for wallet in (SENDER, RECEIVER, ATTACKER):
        _id, created = await engine.create_wallet(wallet, None)
        assert created.outcome is Outcome.CREATED
    assert (await engine.apply(SENDER, K.DEPOSIT, 100, None)).outcome is Outcome.OK
    transfer = TransferRecord(T_ID, SENDER, RECEIVER, 1, None, TransferStatus.PENDING, None, T0, T0)
    assert await deliver(engine, K.TRANSFER_OUT, transfer) is Outcome.OK
    before = await dump(database_url)

    forged = transfer._replace(**forge)  # type: ignore[arg-type]
    failure = "WALLET_NOT_FOUND" if kind is K.TRANSFER_REFUND else None
    # Refused alone (the pipeline isolates a definite refusal), nothing applied.
    assert await deliver(engine, kind, forged, failure) is Outcome.STORAGE_REFUSED
    assert await dump(database_url) == before
    for wallet, balance in ((SENDER, 99), (RECEIVER, 0), (ATTACKER, 0)):
        read = await engine.read(wallet)
        assert read.wallet is not None
        assert read.wallet.balance == balance  # memory re-read: not ahead of the database
    stored = await engine.read_transfer(T_ID)
    assert stored is not None
    assert stored.status is TransferStatus.PENDING

    assert await deliver(engine, K.TRANSFER_IN, transfer) is Outcome.OK
    stored = await engine.read_transfer(T_ID)
    assert stored is not None
    assert (stored.status, stored.amount) == (TransferStatus.COMPLETED, 1)
    assert (await verify(database_url)).clean
