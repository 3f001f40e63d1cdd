"""Payments on the engine and the in-memory log: every posting applied or none, the refusal
naming the posting, replay, the decision stored once, and the re-drive finishing a payment
left PENDING. No PostgreSQL, no HTTP (tests/test_payments_api.py has the route)."""

from __future__ import annotations

from uuid import UUID, uuid4

from tests.engine_doubles import ControlledLog, running_engine, wallet_ids_on_shard
from walletd.engine.commands import Outcome
from walletd.engine.limits import EngineLimits
from walletd.engine.model import (
    Batch,
    OperationKind,
    PaymentPhase,
    PaymentStatus,
    TransferStatus,
    WalletStatus,
)
from walletd.engine.money import AMOUNT_MINOR_MAX, BALANCE_MINOR_MAX
from walletd.engine.payments import Posting, posting_transfer_id
from walletd.engine.ports import StorageUnavailable
from walletd.engine.router import Engine
from walletd.engine.transfers import SIDE_FROM, SIDE_TO

TWO_SHARDS = EngineLimits(
    pipelines=2, batch_ops_max=64, mailbox_commands_max=256, transfer_redrive_interval_s=60.0
)
BUYER, PLATFORM = wallet_ids_on_shard(0, 2, 2)
MERCHANT = wallet_ids_on_shard(1, 2, 1)[0]


async def wallets(engine: Engine, buyer_funds: int) -> None:
    for wallet_id in (BUYER, MERCHANT, PLATFORM):
        _id, reply = await engine.create_wallet(wallet_id, None)
        assert reply.outcome is Outcome.CREATED
    reply = await engine.apply(BUYER, OperationKind.DEPOSIT, buyer_funds, None)
    assert reply.outcome is Outcome.OK


def conserved(log: ControlledLog, deposited: int) -> bool:
    pending = sum(t.amount for t in log.transfers.values() if t.status is TransferStatus.PENDING)
    return sum(w.balance for w in log.wallets.values()) + pending == deposited


FEE = [Posting(BUYER, MERCHANT, 97), Posting(BUYER, PLATFORM, 3)]


async def test_a_payment_applies_every_posting_and_completes() -> None:
    log = ControlledLog()
    async with running_engine(log, TWO_SHARDS) as engine:
        await wallets(engine, 100)
        payment_id, reply = await engine.pay(None, None, FEE, "order 7")
    assert reply.outcome is Outcome.OK
    assert reply.payment is not None
    assert reply.payment.status is PaymentStatus.COMPLETED
    assert [log.wallets[w].balance for w in (BUYER, MERCHANT, PLATFORM)] == [0, 97, 3]
    for index in (0, 1):
        posting = log.transfers[posting_transfer_id(payment_id, index)]
        assert (posting.status, posting.payment_id, posting.reference) == (
            TransferStatus.COMPLETED, payment_id, "order 7",
        )  # fmt: skip
    assert conserved(log, 100)


async def test_a_refused_debit_names_its_posting_and_nothing_is_applied() -> None:
    """The buyer pays the first posting but not both: the first debit is refunded, the
    payment FAILED naming postings[1], and a retry replays the refusal."""
    log = ControlledLog()
    async with running_engine(log, TWO_SHARDS) as engine:
        await wallets(engine, 98)
        payment_id, reply = await engine.pay(None, "k-1", FEE, None)
        assert (reply.outcome, reply.posting, reply.side, reply.balance_seen) == (
            Outcome.INSUFFICIENT_FUNDS, 1, SIDE_FROM, 1,
        )  # fmt: skip
        assert reply.payment is not None
        assert reply.payment.status is PaymentStatus.FAILED
        assert [log.wallets[w].balance for w in (BUYER, MERCHANT, PLATFORM)] == [98, 0, 0]
        assert conserved(log, 98)
        await engine.apply(BUYER, OperationKind.DEPOSIT, 10, None)
        again_id, again = await engine.pay(None, "k-1", FEE, None)
    assert again_id == payment_id
    assert (again.outcome, again.posting, again.replayed) == (Outcome.INSUFFICIENT_FUNDS, 1, True)
    assert log.wallets[MERCHANT].balance == 0


async def test_a_closed_receiver_fails_the_payment_at_its_decision() -> None:
    """Storage turns the decision into FAILING (WALLET_CLOSED naming the posting's "to"):
    the debits made are refunded, nothing reaches the other receiver."""
    log = ControlledLog()
    async with running_engine(log, TWO_SHARDS) as engine:
        await wallets(engine, 100)
        closed = await engine.update_wallet(PLATFORM, WalletStatus.CLOSED, None, None, "")
        assert closed.outcome is Outcome.OK
        payment_id = uuid4()
        _id, reply = await engine.pay(payment_id, None, FEE, None)
    assert (reply.outcome, reply.posting, reply.side) == (Outcome.WALLET_CLOSED, 1, SIDE_TO)
    assert log.wallets[BUYER].balance == 100
    assert log.wallets[MERCHANT].balance == 0
    assert log.payments[payment_id].phase is PaymentPhase.FAILING
    assert {log.transfers[posting_transfer_id(payment_id, i)].status for i in (0, 1)} == {
        TransferStatus.FAILED
    }
    assert conserved(log, 100)


async def test_a_payment_left_pending_is_finished_by_the_redrive_once() -> None:
    """Every credit commit fails: the payment stays PENDING (503), money in flight in its
    postings; the re-drive credits each posting once and the payment completes."""
    log = ControlledLog()
    async with running_engine(log, TWO_SHARDS) as engine:
        await wallets(engine, 100)
        payment_id = uuid4()
        original = log.append_batch

        async def credits_fail(batch: Batch) -> None:
            if any(op.kind is OperationKind.TRANSFER_IN for op in batch.operations):
                raise StorageUnavailable("injected: credits do not commit")
            await original(batch)

        log.append_batch = credits_fail  # type: ignore[method-assign]
        _id, reply = await engine.pay(payment_id, None, FEE, None)
        assert reply.outcome is Outcome.UNAVAILABLE
        stored = await engine.read_payment(payment_id)
        assert stored is not None
        assert stored.status is PaymentStatus.PENDING
        assert stored.phase is PaymentPhase.CREDITING
        assert conserved(log, 100)
        log.append_batch = original  # type: ignore[method-assign]
        ended = await engine.redrive_payments()
        again = await engine.redrive_payments()
        stored = await engine.read_payment(payment_id)
    assert (ended, again) == (1, 0)
    assert stored is not None
    assert stored.status is PaymentStatus.COMPLETED
    assert [log.wallets[w].balance for w in (BUYER, MERCHANT, PLATFORM)] == [0, 97, 3]
    assert [op.kind for op in log.operations[MERCHANT]] == [OperationKind.TRANSFER_IN]


async def test_currencies_must_match_and_a_reused_key_is_refused() -> None:
    log = ControlledLog()
    async with running_engine(log, TWO_SHARDS) as engine:
        await wallets(engine, 100)
        _id, first = await engine.pay(None, "k-2", FEE[:1], None)
        assert first.outcome is Outcome.OK
        _id, reused = await engine.pay(None, "k-2", FEE, None)
        missing = UUID(int=7)
        _id, unknown = await engine.pay(None, None, [*FEE, Posting(BUYER, missing, 1)], None)
    assert reused.outcome is Outcome.IDEMPOTENCY_KEY_REUSED
    assert (unknown.outcome, unknown.posting, unknown.side) == (
        Outcome.WALLET_NOT_FOUND,
        2,
        SIDE_TO,
    )


ONE_PIPELINE = EngineLimits(
    pipelines=1, batch_ops_max=64, mailbox_commands_max=256, transfer_redrive_interval_s=60.0
)


async def test_wallets_of_one_pipeline_are_paid_in_one_commit_or_by_the_saga() -> None:
    """One pipeline owns every wallet: the payment's debits and credits travel in one
    commit (its transfers written COMPLETED, never PENDING); when one posting would be
    refused, nothing of that commit applies and the saga records the refusal and fails it."""
    log = ControlledLog()
    async with running_engine(log, ONE_PIPELINE) as engine:
        await wallets(engine, 100)
        before = log.appends
        payment_id, reply = await engine.pay(None, None, FEE, None)
        assert reply.outcome is Outcome.OK
        assert log.appends == before + 1  # debits and credits in one batch
        assert log.payments[payment_id].phase is PaymentPhase.CREDITING
        assert [log.wallets[w].balance for w in (BUYER, MERCHANT, PLATFORM)] == [0, 97, 3]
        await engine.apply(BUYER, OperationKind.DEPOSIT, 5, None)
        _id, refused = await engine.pay(None, None, [*FEE[:1], Posting(BUYER, PLATFORM, 6)], None)
    assert (refused.outcome, refused.posting) == (Outcome.INSUFFICIENT_FUNDS, 0)
    assert [log.wallets[w].balance for w in (BUYER, MERCHANT, PLATFORM)] == [5, 97, 3]
    assert conserved(log, 105)


async def test_a_receivers_pending_refund_keeps_its_room_under_the_ceiling() -> None:
    """A receiver whose own PENDING transfer keeps room under the ceiling for its refund is
    never credited into that room by a payment: the posting waits PENDING (the payment stays
    CREDITING, as for any receiver at its ceiling), the other posting completes, and the
    pipeline goes on serving."""
    log = ControlledLog()
    nowhere = uuid4()
    async with running_engine(log, ONE_PIPELINE) as engine:
        await wallets(engine, 100)
        await engine.apply(MERCHANT, OperationKind.DEPOSIT, 10, None)
        log.fail_next_closes = 1  # the refund's commit fails once: PENDING, room kept
        pending_id, opened = await engine.transfer(None, None, MERCHANT, nowhere, 10, None)
        assert opened.outcome is Outcome.UNAVAILABLE
        assert log.transfers[pending_id].status is TransferStatus.PENDING
        room = BALANCE_MINOR_MAX - 10  # all but what the PENDING transfer may need back
        while room - log.wallets[MERCHANT].balance >= AMOUNT_MINOR_MAX:
            reply = await engine.apply(MERCHANT, OperationKind.DEPOSIT, AMOUNT_MINOR_MAX, None)
            assert reply.outcome is Outcome.OK
        top_up = room - log.wallets[MERCHANT].balance - 90
        assert (await engine.apply(MERCHANT, OperationKind.DEPOSIT, top_up, None)).outcome is (
            Outcome.OK
        )
        payment_id, paid = await engine.pay(None, None, FEE, None)  # 97: under the ceiling,
        after = await engine.apply(BUYER, OperationKind.DEPOSIT, 1, None)  # not the room
    assert paid.outcome is Outcome.UNAVAILABLE
    assert log.payments[payment_id].phase is PaymentPhase.CREDITING
    assert [log.transfers[posting_transfer_id(payment_id, i)].status for i in (0, 1)] == [
        TransferStatus.PENDING, TransferStatus.COMPLETED,
    ]  # fmt: skip
    assert after.outcome is Outcome.OK  # the pipeline is alive
    assert log.wallets[MERCHANT].balance == room - 90
