"""Transfers on the engine and the in-memory log: the saga's commits, its refusals, its
idempotency, and its recovery after a failed or ambiguous credit. No PostgreSQL, no HTTP."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from uuid import UUID, uuid4

import pytest

from tests.engine_doubles import WAIT_S, ControlledLog, running_engine, until, wallet_ids_on_shard
from walletd.engine.commands import HoldAction, Outcome, transfer_leg_key
from walletd.engine.limits import EngineLimits
from walletd.engine.model import OperationKind, TransferRecord, TransferStatus
from walletd.engine.money import AMOUNT_MINOR_MAX, BALANCE_MINOR_MAX
from walletd.engine.observer import DRIVER_REDRIVE, DRIVER_REQUEST, EngineObserver
from walletd.engine.router import Engine
from walletd.engine.transfers import SIDE_FROM, SIDE_TO

TWO_SHARDS = EngineLimits(
    pipelines=2, batch_ops_max=64, mailbox_commands_max=256, transfer_redrive_interval_s=60.0
)
SENDER, RECEIVER = wallet_ids_on_shard(0, 2, 1)[0], wallet_ids_on_shard(1, 2, 1)[0]


async def funded(engine: Engine, amount: int) -> None:
    for wallet_id in (SENDER, RECEIVER):
        _id, reply = await engine.create_wallet(wallet_id, None)
        assert reply.outcome is Outcome.CREATED
    reply = await engine.apply(SENDER, OperationKind.DEPOSIT, amount, None)
    assert reply.outcome is Outcome.OK


def in_flight(log: ControlledLog) -> int:
    return sum(t.amount for t in log.transfers.values() if t.status is TransferStatus.PENDING)


def conserved(log: ControlledLog, deposited: int) -> bool:
    return sum(w.balance for w in log.wallets.values()) + in_flight(log) == deposited


async def test_a_transfer_across_shards_debits_credits_and_completes() -> None:
    """Both legs commit on their own shards; the transfer ends COMPLETED, the sum holds."""
    log = ControlledLog()
    async with running_engine(log, TWO_SHARDS) as engine:
        await funded(engine, 100)
        transfer_id, reply = await engine.transfer(None, None, SENDER, RECEIVER, 30, "order 7")
    assert reply.outcome is Outcome.OK
    assert reply.transfer is not None
    assert reply.transfer.status is TransferStatus.COMPLETED
    assert log.wallets[SENDER].balance == 70
    assert log.wallets[RECEIVER].balance == 30
    stored = log.transfers[transfer_id]
    assert (stored.status, stored.reference) == (TransferStatus.COMPLETED, "order 7")
    assert [op.kind for op in log.operations[RECEIVER]] == [OperationKind.TRANSFER_IN]
    assert conserved(log, 100)


async def test_insufficient_funds_refuses_on_the_from_side_and_moves_nothing() -> None:
    """A debit past the balance is 409 on the sending side, with no transfer stored and no
    money moved; the refusal itself is recorded under the debit leg's key."""
    log = ControlledLog()
    async with running_engine(log, TWO_SHARDS) as engine:
        await funded(engine, 10)
        transfer_id, reply = await engine.transfer(None, None, SENDER, RECEIVER, 11, None)
    assert (reply.outcome, reply.side, reply.balance_seen) == (
        Outcome.INSUFFICIENT_FUNDS, SIDE_FROM, 10,
    )  # fmt: skip
    assert transfer_id not in log.transfers
    assert log.wallets[SENDER].balance == 10
    assert [op.kind for op in log.operations[SENDER]] == [OperationKind.DEPOSIT]
    refusal = log.refusals[(SENDER, transfer_leg_key(OperationKind.TRANSFER_OUT, transfer_id))]
    assert (refusal.kind, refusal.amount, refusal.balance_seen) == (
        OperationKind.TRANSFER_OUT, 11, 10,
    )  # fmt: skip


async def test_a_refused_debit_is_replayed_after_money_arrives_and_after_a_restart() -> None:
    """Same id, same request → the original 409, also once the sender could now pay and
    once the engine restarted (the refusal is read back from storage); another amount under
    that id → IDEMPOTENCY_KEY_REUSED."""
    log = ControlledLog()
    async with running_engine(log, TWO_SHARDS) as engine:
        await funded(engine, 10)
        transfer_id, first = await engine.transfer(None, "pay-1", SENDER, RECEIVER, 11, None)
        assert (first.outcome, first.replayed) == (Outcome.INSUFFICIENT_FUNDS, False)
        topped_up = await engine.apply(SENDER, OperationKind.DEPOSIT, 5, None)
        assert topped_up.outcome is Outcome.OK
        _, again = await engine.transfer(None, "pay-1", SENDER, RECEIVER, 11, None)
    assert (again.outcome, again.side, again.balance_seen, again.replayed) == (
        Outcome.INSUFFICIENT_FUNDS, SIDE_FROM, 10, True,
    )  # fmt: skip
    async with running_engine(log, TWO_SHARDS) as engine:
        _, after_restart = await engine.transfer(None, "pay-1", SENDER, RECEIVER, 11, None)
        _, other_amount = await engine.transfer(None, "pay-1", SENDER, RECEIVER, 12, None)
    assert (after_restart.outcome, after_restart.balance_seen, after_restart.replayed) == (
        Outcome.INSUFFICIENT_FUNDS, 10, True,
    )  # fmt: skip
    assert other_amount.outcome is Outcome.IDEMPOTENCY_KEY_REUSED
    assert transfer_id not in log.transfers
    assert log.wallets[SENDER].balance == 15


async def test_a_missing_receiver_fails_the_transfer_and_refunds_the_debit() -> None:
    """A refused credit is compensated in one commit: refund row + FAILED, visible."""
    log = ControlledLog()
    nowhere = wallet_ids_on_shard(1, 2, 2)[1]
    async with running_engine(log, TWO_SHARDS) as engine:
        await funded(engine, 50)
        transfer_id, reply = await engine.transfer(None, None, SENDER, nowhere, 20, None)
        again_id, again = await engine.transfer(transfer_id, None, SENDER, nowhere, 20, None)
    assert (reply.outcome, reply.side) == (Outcome.WALLET_NOT_FOUND, SIDE_TO)
    assert (again_id, again.outcome, again.replayed) == (
        transfer_id, Outcome.WALLET_NOT_FOUND, True,
    )  # fmt: skip
    stored = log.transfers[transfer_id]
    assert (stored.status, stored.failure_code) == (TransferStatus.FAILED, "WALLET_NOT_FOUND")
    assert [op.kind for op in log.operations[SENDER]] == [
        OperationKind.DEPOSIT, OperationKind.TRANSFER_OUT, OperationKind.TRANSFER_REFUND,
    ]  # fmt: skip
    assert log.wallets[SENDER].balance == 50
    assert conserved(log, 50)


async def test_the_id_is_an_idempotency_key() -> None:
    """Same id + same request replays without moving money; another request is 422;
    an Idempotency-Key alone derives the same id each time."""
    log = ControlledLog()
    chosen = uuid4()
    async with running_engine(log, TWO_SHARDS) as engine:
        await funded(engine, 100)
        _id, first = await engine.transfer(chosen, None, SENDER, RECEIVER, 40, None)
        _id, replay = await engine.transfer(chosen, None, SENDER, RECEIVER, 40, None)
        _id, other = await engine.transfer(chosen, None, SENDER, RECEIVER, 41, None)
        keyed_id, keyed = await engine.transfer(None, "k-1", SENDER, RECEIVER, 5, None)
        again_id, keyed_again = await engine.transfer(None, "k-1", SENDER, RECEIVER, 5, None)
    assert (first.outcome, first.replayed) == (Outcome.OK, False)
    assert (replay.outcome, replay.replayed) == (Outcome.OK, True)
    assert other.outcome is Outcome.IDEMPOTENCY_KEY_REUSED
    assert keyed_id == again_id
    assert (keyed.replayed, keyed_again.replayed) == (False, True)
    assert log.wallets[SENDER].balance == 55
    assert log.wallets[RECEIVER].balance == 45


async def test_concurrent_requests_with_one_id_move_the_money_once() -> None:
    """Requests racing with the same id join the one drive: applied once, all answered."""
    log = ControlledLog()
    chosen = uuid4()
    async with running_engine(log, TWO_SHARDS) as engine:
        await funded(engine, 100)
        replies = await asyncio.wait_for(
            asyncio.gather(
                *(engine.transfer(chosen, None, SENDER, RECEIVER, 25, None) for _ in range(5))
            ),
            WAIT_S,
        )
    assert [reply.outcome for _id, reply in replies] == [Outcome.OK] * 5
    assert sum(not reply.replayed for _id, reply in replies) == 1
    assert log.wallets[RECEIVER].balance == 25


async def test_a_failed_credit_leaves_it_pending_and_a_retry_completes_it() -> None:
    """A credit commit that fails answers 503 with the transfer PENDING (money visibly in
    flight, the sum conserved); the client's retry with the id completes it once."""
    log = ControlledLog()
    async with running_engine(log, TWO_SHARDS) as engine:
        await funded(engine, 100)
        log.fail_next_closes = 1
        transfer_id, reply = await engine.transfer(None, None, SENDER, RECEIVER, 60, None)
        assert reply.outcome is Outcome.UNAVAILABLE
        assert log.transfers[transfer_id].status is TransferStatus.PENDING
        assert (log.wallets[SENDER].balance, log.wallets[RECEIVER].balance) == (40, 0)
        assert conserved(log, 100)
        _id, retry = await engine.transfer(transfer_id, None, SENDER, RECEIVER, 60, None)
    assert (retry.outcome, retry.replayed) == (Outcome.OK, True)
    assert log.transfers[transfer_id].status is TransferStatus.COMPLETED
    assert (log.wallets[SENDER].balance, log.wallets[RECEIVER].balance) == (40, 60)


async def test_an_ambiguous_credit_is_answered_from_storage_and_credited_once() -> None:
    """A credit that landed but came back as outcome-unknown is answered with the stored
    truth (COMPLETED, not a 503); a retry replays it; the receiver is credited once."""
    log = ControlledLog()
    async with running_engine(log, TWO_SHARDS) as engine:
        await funded(engine, 100)
        log.fail_next_closes = 1
        log.closes_land = True
        transfer_id, reply = await engine.transfer(None, None, SENDER, RECEIVER, 70, None)
        assert reply.outcome is Outcome.OK
        assert log.transfers[transfer_id].status is TransferStatus.COMPLETED
        assert await engine.redrive_transfers() == 0  # nothing PENDING: nothing to do
        _id, retry = await engine.transfer(transfer_id, None, SENDER, RECEIVER, 70, None)
    assert (retry.outcome, retry.replayed) == (Outcome.OK, True)
    assert [op.kind for op in log.operations[RECEIVER]] == [OperationKind.TRANSFER_IN]
    assert log.wallets[RECEIVER].balance == 70


async def test_recovery_on_start_finishes_what_a_previous_run_left_pending() -> None:
    """A transfer left PENDING by a stopped engine is completed by the next engine's start,
    without any request."""
    log = ControlledLog()
    async with running_engine(log, TWO_SHARDS) as engine:
        await funded(engine, 100)
        log.fail_next_closes = 1
        transfer_id, reply = await engine.transfer(None, None, SENDER, RECEIVER, 10, None)
        assert reply.outcome is Outcome.UNAVAILABLE
    assert log.transfers[transfer_id].status is TransferStatus.PENDING
    async with running_engine(log, TWO_SHARDS):
        await until(lambda: log.transfers[transfer_id].status is TransferStatus.COMPLETED)
    assert (log.wallets[SENDER].balance, log.wallets[RECEIVER].balance) == (90, 10)


async def test_the_redrive_loop_finishes_a_pending_transfer_by_itself() -> None:
    """With no retry from the client, the periodic re-drive completes a PENDING transfer."""
    log = ControlledLog()
    quick = EngineLimits(
        pipelines=2, batch_ops_max=64, mailbox_commands_max=256, transfer_redrive_interval_s=0.05
    )
    async with running_engine(log, quick) as engine:
        await funded(engine, 100)
        log.fail_next_closes = 1
        transfer_id, reply = await engine.transfer(None, None, SENDER, RECEIVER, 10, None)
        assert reply.outcome is Outcome.UNAVAILABLE
        await until(lambda: log.transfers[transfer_id].status is TransferStatus.COMPLETED)
    assert log.wallets[RECEIVER].balance == 10


# Two wallets of one pipeline (shard 0 of two): their transfers travel as a JointTransfer.
PAYER, PAYEE, ABSENT = wallet_ids_on_shard(0, 2, 3)


async def funded_pair(engine: Engine, amount: int) -> None:
    for wallet_id in (PAYER, PAYEE):
        _id, reply = await engine.create_wallet(wallet_id, None)
        assert reply.outcome is Outcome.CREATED
    reply = await engine.apply(PAYER, OperationKind.DEPOSIT, amount, None)
    assert reply.outcome is Outcome.OK


async def test_wallets_of_one_pipeline_transfer_in_one_commit() -> None:
    """Both legs and the COMPLETED transfer are one batch: the transfer is never stored
    PENDING, no money is ever in flight, and a replay of the id moves nothing."""
    log = ControlledLog()
    async with running_engine(log, TWO_SHARDS) as engine:
        await funded_pair(engine, 100)
        before = len(log.appended)
        transfer_id, reply = await engine.transfer(None, None, PAYER, PAYEE, 30, "joint")
        batches = log.appended[before:]
        _id, replay = await engine.transfer(transfer_id, None, PAYER, PAYEE, 30, "joint")
    assert reply.outcome is Outcome.OK
    assert reply.transfer is not None
    assert reply.transfer.status is TransferStatus.COMPLETED
    assert [(len(b.operations), len(b.new_transfers), len(b.transfer_updates))
            for b in batches] == [(2, 1, 1)]  # fmt: skip
    assert [op.kind for op in batches[0].operations] == [
        OperationKind.TRANSFER_OUT, OperationKind.TRANSFER_IN,
    ]  # fmt: skip
    assert (replay.outcome, replay.replayed) == (Outcome.OK, True)
    assert (log.wallets[PAYER].balance, log.wallets[PAYEE].balance) == (70, 30)
    stored = log.transfers[transfer_id]
    assert (stored.status, stored.reference) == (TransferStatus.COMPLETED, "joint")
    assert stored.updated_at_us == reply.transfer.updated_at_us
    assert conserved(log, 100)


class _CountingLog(ControlledLog):
    """Counts the transfers read back by id (a stale reservation's check reads them)."""

    def __init__(self) -> None:
        super().__init__()
        self.transfers_read: list[UUID] = []

    async def load_transfers(self, transfer_ids: Sequence[UUID]) -> dict[UUID, TransferRecord]:
        self.transfers_read.extend(transfer_ids)
        return await super().load_transfers(transfer_ids)


async def test_a_joint_transfer_leaves_no_room_kept_for_a_refund() -> None:
    """Both legs in one commit: the transfer is COMPLETED in that commit, so the sender keeps
    no room for its refund, and filling it to the ceiling needs no read of storage."""
    log = _CountingLog()
    async with running_engine(log, TWO_SHARDS) as engine:
        await funded_pair(engine, 10)
        _id, reply = await engine.transfer(None, None, PAYER, PAYEE, 10, None)
        assert reply.outcome is Outcome.OK
        log.transfers_read.clear()
        outcomes = {
            (await engine.apply(PAYER, OperationKind.DEPOSIT, AMOUNT_MINOR_MAX, None)).outcome
            for _ in range(BALANCE_MINOR_MAX // AMOUNT_MINOR_MAX)
        }
    assert outcomes == {Outcome.OK}
    assert log.transfers_read == []
    assert log.wallets[PAYER].balance == BALANCE_MINOR_MAX


async def test_a_failed_joint_commit_moves_nothing_and_a_landed_one_is_answered() -> None:
    """The joint commit fails: nothing stored, 503 (a plain retry is safe). It lands but
    its outcome is unknown: the answer is read back from storage, COMPLETED, credited once."""
    log = ControlledLog()
    async with running_engine(log, TWO_SHARDS) as engine:
        await funded_pair(engine, 100)
        log.fail_next_closes = 1
        lost_id, lost = await engine.transfer(None, None, PAYER, PAYEE, 60, None)
        assert lost.outcome is Outcome.UNAVAILABLE
        assert lost_id not in log.transfers
        assert (log.wallets[PAYER].balance, log.wallets[PAYEE].balance) == (100, 0)
        log.fail_next_closes, log.closes_land = 1, True
        landed_id, landed = await engine.transfer(None, None, PAYER, PAYEE, 60, None)
        log.closes_land = False
        _id, retry = await engine.transfer(landed_id, None, PAYER, PAYEE, 60, None)
    assert (landed.outcome, landed.replayed) == (Outcome.OK, False)
    assert (retry.outcome, retry.replayed) == (Outcome.OK, True)
    assert log.transfers[landed_id].status is TransferStatus.COMPLETED
    assert (log.wallets[PAYER].balance, log.wallets[PAYEE].balance) == (40, 60)
    assert conserved(log, 100)


async def test_a_joint_transfer_the_receiver_would_refuse_goes_on_as_a_saga() -> None:
    """A receiver that is missing or at the balance ceiling is never credited in the joint
    commit: the debit alone is stored (PENDING), then the refund ends it FAILED."""
    log = ControlledLog()
    async with running_engine(log, TWO_SHARDS) as engine:
        await funded_pair(engine, 100)
        # Up to the ceiling in the largest deposits storage takes (AMOUNT_MINOR_MAX each).
        for _ in range(BALANCE_MINOR_MAX // AMOUNT_MINOR_MAX):
            reply = await engine.apply(PAYEE, OperationKind.DEPOSIT, AMOUNT_MINOR_MAX, None)
            assert reply.outcome is Outcome.OK
        missing_id, missing = await engine.transfer(None, None, PAYER, ABSENT, 10, None)
        full_id, full = await engine.transfer(None, None, PAYER, PAYEE, 10, None)
    assert (missing.outcome, missing.side) == (Outcome.WALLET_NOT_FOUND, SIDE_TO)
    assert (full.outcome, full.side) == (Outcome.BALANCE_LIMIT_EXCEEDED, SIDE_TO)
    for transfer_id in (missing_id, full_id):
        assert log.transfers[transfer_id].status is TransferStatus.FAILED
    assert [op.kind for op in log.operations[PAYER]][1:] == [
        OperationKind.TRANSFER_OUT, OperationKind.TRANSFER_REFUND,
    ] * 2  # fmt: skip
    assert (log.wallets[PAYER].balance, log.wallets[PAYEE].balance) == (100, BALANCE_MINOR_MAX)


async def test_batches_of_one_operation_keep_the_saga_on_one_pipeline() -> None:
    """A joint transfer weighs two operations: with --batch-max 1 it would never fit a
    batch, so the legs travel one by one (no crash, no 500)."""
    log = ControlledLog()
    limits = EngineLimits(
        pipelines=2, batch_ops_max=1, mailbox_commands_max=64, transfer_redrive_interval_s=60.0
    )
    async with running_engine(log, limits) as engine:
        await funded_pair(engine, 100)
        transfer_id, reply = await engine.transfer(None, None, PAYER, PAYEE, 30, None)
    assert reply.outcome is Outcome.OK
    assert log.transfers[transfer_id].status is TransferStatus.COMPLETED
    assert all(len(batch.operations) <= 1 for batch in log.appended)
    assert (log.wallets[PAYER].balance, log.wallets[PAYEE].balance) == (70, 30)


async def test_a_transfer_closes_once_even_when_two_drivers_race() -> None:
    """Storage refuses a second close: after a refund, a late credit cannot land too."""
    log = ControlledLog()
    nowhere = UUID(int=999_999)
    async with running_engine(log, TWO_SHARDS) as engine:
        await funded(engine, 30)
        transfer_id, reply = await engine.transfer(None, None, SENDER, nowhere, 30, None)
        assert reply.outcome is Outcome.WALLET_NOT_FOUND
        failed = log.transfers[transfer_id]
        # A stale driver that still believes it PENDING, once the receiver exists.
        _id, created = await engine.create_wallet(nowhere, None)
        assert created.outcome is Outcome.CREATED
        stale = failed._replace(status=TransferStatus.PENDING, failure_code=None)
        late = await engine.transfers._drive(stale, replayed=True, driver=DRIVER_REQUEST)
    assert late.outcome is Outcome.WALLET_NOT_FOUND  # the stored, final answer
    assert log.wallets[nowhere].balance == 0
    assert log.transfers[transfer_id].status is TransferStatus.FAILED
    assert conserved(log, 30)


class CountingLog(ControlledLog):
    def __init__(self) -> None:
        super().__init__()
        self.transfer_loads: list[int] = []

    async def load_transfers(self, transfer_ids: Sequence[UUID]) -> dict[UUID, TransferRecord]:
        self.transfer_loads.append(len(transfer_ids))
        return await super().load_transfers(transfer_ids)


async def test_concurrent_lookups_by_id_share_one_query() -> None:
    """Transfers with client ids sent at once are looked up together: a query per wave,
    not per request, so lookups hold one storage connection at most."""
    log = CountingLog()
    async with running_engine(log, TWO_SHARDS) as engine:
        await funded(engine, 100)
        replies = await asyncio.wait_for(
            asyncio.gather(
                *(engine.transfer(uuid4(), None, SENDER, RECEIVER, 1, None) for _ in range(20))
            ),
            WAIT_S,
        )
    assert [reply.outcome for _id, reply in replies] == [Outcome.OK] * 20
    assert sum(log.transfer_loads) == 20
    assert len(log.transfer_loads) <= 2


async def test_a_failed_lookup_answers_unavailable_and_moves_nothing() -> None:
    """Storage away during the lookup by id: 503 at once, nothing debited."""
    log = ControlledLog()
    async with running_engine(log, TWO_SHARDS) as engine:
        await funded(engine, 100)
        log.fail_loads = True
        _id, reply = await engine.transfer(uuid4(), None, SENDER, RECEIVER, 5, None)
        log.fail_loads = False
    assert reply.outcome is Outcome.UNAVAILABLE
    assert log.transfers == {}
    assert log.wallets[SENDER].balance == 100


class EndedObserver(EngineObserver):
    def __init__(self) -> None:
        self.ended: list[tuple[str, str]] = []

    def transfer_ended(self, status: str, driver: str) -> None:
        self.ended.append((status, driver))


async def test_the_observer_counts_transfers_ended_by_status_and_driver() -> None:
    """Each transfer closed by this process is reported once: COMPLETED or FAILED, by its
    request or by the re-drive; replays report nothing."""
    log = ControlledLog()
    observer = EndedObserver()
    nowhere = wallet_ids_on_shard(1, 2, 2)[1]
    async with running_engine(log, TWO_SHARDS, observer=observer) as engine:
        await funded(engine, 100)
        done_id, _ = await engine.transfer(None, None, SENDER, RECEIVER, 1, None)
        await engine.transfer(done_id, None, SENDER, RECEIVER, 1, None)  # a replay
        await engine.transfer(None, None, SENDER, nowhere, 1, None)
        log.fail_next_closes = 1
        await engine.transfer(None, None, SENDER, RECEIVER, 1, None)
        assert await engine.redrive_transfers() == 1
    assert observer.ended == [
        ("COMPLETED", DRIVER_REQUEST), ("FAILED", DRIVER_REQUEST), ("COMPLETED", DRIVER_REDRIVE),
    ]  # fmt: skip


async def test_a_refund_always_finds_room_under_the_balance_ceiling() -> None:
    """A transfer whose credit is refused ends FAILED with its debit refunded, even when the
    sender was topped up to the ceiling while the refund was pending: a credit into the
    sender never takes the room its own PENDING debits will need back."""
    log = ControlledLog()
    nowhere = wallet_ids_on_shard(1, 2, 2)[1]
    async with running_engine(log, TWO_SHARDS) as engine:
        await funded(engine, 10)
        log.fail_next_closes = 1  # the refund's commit fails once: PENDING, debited
        transfer_id, reply = await engine.transfer(None, None, SENDER, nowhere, 10, None)
        assert reply.outcome is Outcome.UNAVAILABLE
        assert log.transfers[transfer_id].status is TransferStatus.PENDING
        # Any key with the move scope may deposit into any wallet: up to the ceiling, less
        # the room the PENDING transfer's refund needs (the last deposit is refused).
        outcomes = [
            (await engine.apply(SENDER, OperationKind.DEPOSIT, AMOUNT_MINOR_MAX, None)).outcome
            for _ in range(BALANCE_MINOR_MAX // AMOUNT_MINOR_MAX)
        ]
        _id, retry = await engine.transfer(transfer_id, None, SENDER, nowhere, 10, None)
        await engine.redrive_transfers()
    assert outcomes[-1] is Outcome.BALANCE_LIMIT_EXCEEDED
    assert set(outcomes[:-1]) == {Outcome.OK}
    assert (retry.outcome, retry.side) == (Outcome.WALLET_NOT_FOUND, SIDE_TO)
    assert log.transfers[transfer_id].status is TransferStatus.FAILED
    assert log.wallets[SENDER].balance == BALANCE_MINOR_MAX - AMOUNT_MINOR_MAX + 10


@pytest.mark.parametrize("opened_by", ["transfer", "capture"])
async def test_the_debit_that_opens_a_transfer_keeps_its_refunds_room(opened_by: str) -> None:
    """The room is kept from the debit on, in memory (the sender is never re-read here):
    a transfer's debit, or a capture into another wallet, which opens a transfer too. The
    credit's commit fails (PENDING); both wallets fill up to the ceiling; the re-drive's
    credit is then refused, and the refund fits into the room kept for it."""
    log = ControlledLog()
    async with running_engine(log, TWO_SHARDS) as engine:
        await funded(engine, 10)
        log.fail_next_closes = 1  # the credit's commit (on the receiver's shard) fails
        if opened_by == "transfer":
            transfer_id, reply = await engine.transfer(None, None, SENDER, RECEIVER, 10, None)
            assert reply.outcome is Outcome.UNAVAILABLE
        else:
            hold_id, created = await engine.create_hold(SENDER, 10, None, None, None)
            assert created.outcome is Outcome.CREATED
            captured = await engine.resolve_hold(HoldAction.CAPTURE, hold_id, None, None, RECEIVER)
            assert captured.outcome is Outcome.OK
            assert captured.hold is not None
            assert captured.hold.transfer_id is not None
            transfer_id = captured.hold.transfer_id
        assert log.transfers[transfer_id].status is TransferStatus.PENDING
        outcomes = {
            wallet_id: [
                (
                    await engine.apply(wallet_id, OperationKind.DEPOSIT, AMOUNT_MINOR_MAX, None)
                ).outcome
                for _ in range(BALANCE_MINOR_MAX // AMOUNT_MINOR_MAX)
            ]
            for wallet_id in (SENDER, RECEIVER)
        }
        await engine.redrive_transfers()
    assert outcomes[SENDER][-1] is Outcome.BALANCE_LIMIT_EXCEEDED
    assert set(outcomes[SENDER][:-1]) == set(outcomes[RECEIVER]) == {Outcome.OK}
    assert log.transfers[transfer_id].failure_code == Outcome.BALANCE_LIMIT_EXCEEDED.value
    assert log.wallets[SENDER].balance == BALANCE_MINOR_MAX - AMOUNT_MINOR_MAX + 10
    assert log.wallets[RECEIVER].balance == BALANCE_MINOR_MAX


async def test_a_transfer_completed_by_another_shard_frees_its_room_under_the_ceiling() -> None:
    """The receiver's shard completes a transfer without telling the sender's, whose
    reservation of the refund's room is then stale: a credit that would fit were it gone
    has it checked against storage first, and is taken."""
    log = ControlledLog()
    async with running_engine(log, TWO_SHARDS) as engine:
        await funded(engine, 10)
        transfer_id, reply = await engine.transfer(None, None, SENDER, RECEIVER, 10, None)
        assert reply.outcome is Outcome.OK
        outcomes = {
            (await engine.apply(SENDER, OperationKind.DEPOSIT, AMOUNT_MINOR_MAX, None)).outcome
            for _ in range(BALANCE_MINOR_MAX // AMOUNT_MINOR_MAX)
        }
    assert log.transfers[transfer_id].status is TransferStatus.COMPLETED
    assert outcomes == {Outcome.OK}
    assert log.wallets[SENDER].balance == BALANCE_MINOR_MAX


async def test_a_reloaded_senders_stale_reservation_is_checked_too() -> None:
    """A sender loaded from storage with a PENDING transfer out gets its reservation with
    it; once the receiver's shard completes that transfer, the reservation is stale like
    one this shard opened, and a credit that fits without it is checked and taken."""
    log = ControlledLog()
    one_each = EngineLimits(
        pipelines=2, batch_ops_max=64, mailbox_commands_max=256,
        transfer_redrive_interval_s=60.0, resident_wallets_max=2,
    )  # fmt: skip
    other = wallet_ids_on_shard(0, 2, 2)[1]  # SENDER's pipeline, which holds one resident
    async with running_engine(log, one_each) as engine:
        await funded(engine, 10)
        _id, created = await engine.create_wallet(other, None)
        assert created.outcome is Outcome.CREATED
        log.fail_next_closes = 1  # the credit's commit fails: PENDING, SENDER's entry kept
        transfer_id, reply = await engine.transfer(None, None, SENDER, RECEIVER, 10, None)
        assert reply.outcome is Outcome.UNAVAILABLE
        assert (await engine.apply(other, OperationKind.DEPOSIT, 1, None)).outcome is Outcome.OK
        assert engine.read_resident(SENDER) is None  # evicted, its entry with it
        assert (await engine.read(SENDER)).outcome is Outcome.OK  # reloaded: PENDING out
        await engine.redrive_transfers()  # completed by RECEIVER's shard
        assert log.transfers[transfer_id].status is TransferStatus.COMPLETED
        outcomes = {
            (await engine.apply(SENDER, OperationKind.DEPOSIT, AMOUNT_MINOR_MAX, None)).outcome
            for _ in range(BALANCE_MINOR_MAX // AMOUNT_MINOR_MAX)
        }
    assert outcomes == {Outcome.OK}
    assert log.wallets[SENDER].balance == BALANCE_MINOR_MAX


async def test_transfers_the_redrive_cannot_end_never_starve_the_ones_it_can() -> None:
    """Each re-drive pass goes on where the previous one stopped: PENDING transfers that
    stay PENDING (a refund storage keeps refusing, a receiver that keeps failing)
    and outnumber one pass's batch do not keep a younger transfer from being finished."""
    log = ControlledLog()
    stuck_sender, sender = wallet_ids_on_shard(0, 2, 2)
    nowhere, receiver = wallet_ids_on_shard(1, 2, 2)
    small = EngineLimits(
        pipelines=2, batch_ops_max=64, mailbox_commands_max=256,
        transfer_redrive_interval_s=60.0, transfer_redrive_batch_max=2,
    )  # fmt: skip
    async with running_engine(log, small) as engine:
        for wallet_id in (stuck_sender, sender, receiver):
            _id, created = await engine.create_wallet(wallet_id, None)
            assert created.outcome is Outcome.CREATED
        assert (await engine.apply(stuck_sender, OperationKind.DEPOSIT, 3, None)).outcome is (
            Outcome.OK
        )
        assert (await engine.apply(sender, OperationKind.DEPOSIT, 5, None)).outcome is Outcome.OK
        # Storage refuses every refund into this sender (as an operator's CHECK would):
        # their transfers stay PENDING, whoever drives them.
        log.refuse_operation = lambda op: (
            op.wallet_id == stuck_sender and op.kind is OperationKind.TRANSFER_REFUND
        )
        stuck: list[UUID] = []
        for _ in range(3):  # more than a pass takes, each left PENDING by a refused refund
            transfer_id, _ = await engine.transfer(None, None, stuck_sender, nowhere, 1, None)
            assert log.transfers[transfer_id].status is TransferStatus.PENDING
            stuck.append(transfer_id)
        log.fail_next_closes = 1  # a younger transfer whose credit's commit failed
        young_id, young = await engine.transfer(None, None, sender, receiver, 5, None)
        assert young.outcome is Outcome.UNAVAILABLE
        for _ in range(4):
            await engine.redrive_transfers()
    assert all(log.transfers[t].status is TransferStatus.PENDING for t in stuck)
    assert log.transfers[young_id].status is TransferStatus.COMPLETED
    assert log.wallets[receiver].balance == 5
