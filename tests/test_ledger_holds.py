"""Holds in the pure ledger state machine: no pipeline, no storage, a clock the test sets.

Each test plays the pipeline (execute, then committed / unknown / forget) and checks the
replies and the rows the batch would write.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from uuid import UUID

import pytest

from walletd.engine.commands import (
    ApplyOperation,
    Command,
    CreateWallet,
    HoldAction,
    HoldCommand,
    Outcome,
    Reply,
)
from walletd.engine.ledger import Applied, Ledger
from walletd.engine.limits import EngineLimits
from walletd.engine.model import HoldStatus, OperationKind, WalletRecord

WALLET = UUID(int=1)
HOLD_A, HOLD_B = UUID(int=101), UUID(int=102)
SECOND = 1_000_000


class Harness:
    def __init__(self, holds_max: int = 100) -> None:
        self.loop = asyncio.new_event_loop()  # only to make reply futures; never run
        self.now = 1_000 * SECOND
        self.ledger = Ledger(EngineLimits(holds_per_wallet_max=holds_max), lambda: self.now)

    def future(self) -> asyncio.Future[Reply]:
        return self.loop.create_future()

    def run(self, *commands: Command, commit: bool = True) -> tuple[Applied, list[Reply]]:
        applied = self.ledger.execute(list(commands))
        if not commit:
            return applied, applied.replies
        self.ledger.committed(applied)
        return applied, self.ledger.answers(applied)

    def deposit(self, amount: int) -> Reply:
        return self.operation(OperationKind.DEPOSIT, amount)

    def operation(self, kind: OperationKind, amount: int) -> Reply:
        return self.run(ApplyOperation(WALLET, kind, amount, None, self.future()))[1][0]

    def hold(self, hold_id: UUID, amount: int, expires_in_s: int = 10) -> Reply:
        return self.run(self.create_hold(hold_id, amount, expires_in_s))[1][0]

    def create_hold(self, hold_id: UUID, amount: int, expires_in_s: int = 10) -> HoldCommand:
        return HoldCommand(
            HoldAction.CREATE, WALLET, hold_id, self.future(), amount=amount,
            expires_in_us=expires_in_s * SECOND, fingerprint="f",
        )  # fmt: skip

    def resolve(self, action: HoldAction, hold_id: UUID, amount: int | None = None) -> Reply:
        command = HoldCommand(action, WALLET, hold_id, self.future(), amount=amount)
        return self.run(command)[1][0]


@pytest.fixture
def ledger() -> Iterator[Harness]:
    harness = Harness()
    harness.run(CreateWallet(WALLET, None, "", harness.future()))
    yield harness
    harness.loop.close()


def test_a_hold_takes_available_not_balance(ledger: Harness) -> None:
    ledger.deposit(100)
    reply = ledger.hold(HOLD_A, 60)
    assert reply.outcome is Outcome.CREATED
    assert reply.wallet is not None
    assert (reply.wallet.balance, reply.wallet.held) == (100, 60)
    assert reply.hold is not None
    assert (reply.hold.status, reply.hold.expires_at_us) == (
        HoldStatus.PENDING,
        ledger.now + 10 * SECOND,
    )
    withdraw = ledger.operation(OperationKind.WITHDRAW, 41)
    assert (withdraw.outcome, withdraw.balance_seen) == (Outcome.INSUFFICIENT_FUNDS, 40)
    refused = ledger.hold(HOLD_B, 41)
    assert (refused.outcome, refused.balance_seen) == (Outcome.INSUFFICIENT_FUNDS, 40)
    assert ledger.hold(HOLD_B, 40).outcome is Outcome.CREATED
    assert ledger.operation(OperationKind.WITHDRAW, 1).outcome is Outcome.INSUFFICIENT_FUNDS
    view = ledger.ledger.read_committed(WALLET)
    assert view is not None
    assert (view.balance, view.held) == (100, 100)


def test_a_partial_capture_writes_capture_and_release_and_closes_the_hold(
    ledger: Harness,
) -> None:
    ledger.deposit(100)
    ledger.hold(HOLD_A, 60)
    command = HoldCommand(HoldAction.CAPTURE, WALLET, HOLD_A, ledger.future(), amount=25,
                          key="c", fingerprint="fp")  # fmt: skip
    applied, (reply,) = ledger.run(command)
    assert reply.outcome is Outcome.OK
    assert reply.hold is not None
    assert (reply.hold.status, reply.hold.captured, reply.hold.resolve_key) == (
        HoldStatus.CAPTURED, 25, "c",
    )  # fmt: skip
    rows = [(o.kind, o.amount, o.balance_after, o.held_after) for o in applied.batch.operations]
    assert rows == [(OperationKind.CAPTURE, 25, 75, 35), (OperationKind.RELEASE, 35, 75, 0)]
    assert [(u.hold_id, u.status, u.captured) for u in applied.batch.hold_updates] == [
        (HOLD_A, HoldStatus.CAPTURED, 25)
    ]
    assert [(s.balance, s.held) for s in applied.batch.snapshots] == [(75, 0)]
    # Resolved once: the ledger no longer has it PENDING.
    assert ledger.resolve(HoldAction.CAPTURE, HOLD_A).outcome is Outcome.HOLD_NOT_PENDING
    assert ledger.resolve(HoldAction.VOID, HOLD_A).outcome is Outcome.HOLD_NOT_PENDING


def test_capture_more_than_the_hold_is_refused_and_void_releases_all(ledger: Harness) -> None:
    ledger.deposit(10)
    ledger.hold(HOLD_A, 4)
    assert ledger.resolve(HoldAction.CAPTURE, HOLD_A, 5).outcome is Outcome.CAPTURE_EXCEEDS_HOLD
    applied, (reply,) = ledger.run(HoldCommand(HoldAction.VOID, WALLET, HOLD_A, ledger.future()))
    assert reply.outcome is Outcome.OK
    assert [(o.kind, o.amount, o.held_after) for o in applied.batch.operations] == [
        (OperationKind.RELEASE, 4, 0)
    ]
    assert reply.wallet is not None
    assert (reply.wallet.balance, reply.wallet.held) == (10, 0)


def test_expiry_goes_by_the_clock(ledger: Harness) -> None:
    ledger.deposit(10)
    ledger.hold(HOLD_A, 4, expires_in_s=5)
    assert ledger.resolve(HoldAction.EXPIRE, HOLD_A).outcome is Outcome.HOLD_NOT_PENDING
    ledger.now += 5 * SECOND  # exactly at expires_at: expired
    assert ledger.resolve(HoldAction.CAPTURE, HOLD_A).outcome is Outcome.HOLD_EXPIRED
    assert ledger.resolve(HoldAction.VOID, HOLD_A).outcome is Outcome.HOLD_EXPIRED
    reply = ledger.resolve(HoldAction.EXPIRE, HOLD_A)
    assert reply.outcome is Outcome.OK
    assert reply.hold is not None
    assert reply.hold.status is HoldStatus.EXPIRED
    view = ledger.ledger.read_committed(WALLET)
    assert view is not None
    assert (view.balance, view.held) == (10, 0)


def test_pending_holds_per_wallet_are_bounded() -> None:
    harness = Harness(holds_max=2)
    harness.run(CreateWallet(WALLET, None, "", harness.future()))
    harness.deposit(10)
    assert harness.hold(HOLD_A, 1).outcome is Outcome.CREATED
    assert harness.hold(HOLD_B, 1).outcome is Outcome.CREATED
    assert harness.hold(UUID(int=103), 1).outcome is Outcome.TOO_MANY_HOLDS
    harness.resolve(HoldAction.VOID, HOLD_A)
    assert harness.hold(UUID(int=103), 1).outcome is Outcome.CREATED
    harness.loop.close()


def test_a_failed_batch_forgets_its_holds_and_a_reload_brings_back_the_stored_ones(
    ledger: Harness,
) -> None:
    """Memory is never ahead of storage: a hold of a batch that failed is gone with the
    wallet; the wallet reloaded with its stored PENDING holds can capture them."""
    ledger.deposit(10)
    _, (stored,) = ledger.run(ledger.create_hold(HOLD_A, 3))
    applied, _ = ledger.run(ledger.create_hold(HOLD_B, 4), commit=False)
    ledger.ledger.unknown(applied)
    ledger.ledger.forget(applied)
    assert ledger.ledger.read_committed(WALLET) is None
    assert stored.hold is not None
    record = WalletRecord(WALLET, 10, 2, 0, ledger.now, held=3, holds=(stored.hold,))
    assert ledger.ledger.add_wallets([record]) == 1
    assert ledger.resolve(HoldAction.CAPTURE, HOLD_B).outcome is Outcome.HOLD_NOT_PENDING
    reply = ledger.resolve(HoldAction.CAPTURE, HOLD_A)
    assert reply.outcome is Outcome.OK
    assert reply.wallet is not None
    assert (reply.wallet.balance, reply.wallet.held) == (7, 0)


def test_a_batch_decided_on_an_open_batchs_hold_depends_on_it(ledger: Harness) -> None:
    """A capture decided while the hold's creation is still committing is true only if
    that creation commits: after a failure it answers 503, like any dependent reply."""
    ledger.deposit(10)
    first, _ = ledger.run(ledger.create_hold(HOLD_A, 3), commit=False)
    second, _ = ledger.run(
        HoldCommand(HoldAction.CAPTURE, WALLET, UUID(int=999), ledger.future()), commit=False
    )
    ledger.ledger.unknown(first)
    replies = ledger.ledger.answers(second, earlier_failed=True)
    assert replies[0].outcome is Outcome.UNAVAILABLE
