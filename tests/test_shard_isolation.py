"""Isolation of a refused batch (engine/shard.py): its bound, its answers for races, how
storage errors are classified, and the ledger's bounds (engine/bounds.py), on the in-memory
log; the real PostgreSQL run is tests/test_poison.py. Also the stamps as-of reads wait for
(engine/shard.py, "Stamps") across isolation and a pipeline's restart."""

from __future__ import annotations

import asyncio
from uuid import UUID, uuid4

import pytest

from tests.engine_doubles import (
    WAIT_S,
    ControlledLog,
    Gate,
    RecordingObserver,
    running_engine,
    until,
)
from walletd.engine.commands import Outcome, TransferLeg
from walletd.engine.holds import capture_transfer_id
from walletd.engine.limits import EngineLimits
from walletd.engine.listings import ListingPage, ListingQuery
from walletd.engine.log_reads import FeedEvent, FeedPosition, HistoryFilter, LogReader, WalletAsOf
from walletd.engine.model import OperationKind, OperationRecord, TransferRecord, TransferStatus
from walletd.engine.money import AMOUNT_MINOR_MAX
from walletd.engine.observer import REASON_ISOLATION_LIMIT
from walletd.persistence.postgres_log import is_definite_refusal

WALLETS = [UUID(int=n) for n in range(1, 9)]
POISON = 13
DEPOSIT = OperationKind.DEPOSIT


def poisoned(op: OperationRecord) -> bool:
    return op.amount == POISON


async def test_commands_queued_behind_a_refused_batch_get_their_true_answers() -> None:
    """A batch storage refuses, and the batches built on its pending state while it was in
    flight: the refused command alone is STORAGE_REFUSED, every other one is applied (none
    is a 503), each wallet's commands in arrival order."""
    log = ControlledLog()
    limits = EngineLimits(pipelines=1, batch_ops_max=4, inflight_batches_max=2)
    async with running_engine(log, limits) as engine:
        for wallet in WALLETS:
            await engine.create_wallet(wallet, None)
        log.refuse_operation = poisoned
        gate = log.append_gate = Gate()
        # The first batch waits in its append while three more fill up behind it.
        first = asyncio.ensure_future(engine.apply(WALLETS[0], DEPOSIT, POISON, None))
        await until(lambda: gate.waiting == 1)
        rest = [
            asyncio.ensure_future(engine.apply(wallet, DEPOSIT, 1 + n % 3, None))
            for n, wallet in enumerate(WALLETS * 2)
        ]
        await asyncio.sleep(0.01)
        log.append_gate = None
        gate.open()
        replies = await asyncio.gather(first, *rest)
    assert replies[0].outcome is Outcome.STORAGE_REFUSED
    assert {reply.outcome for reply in replies[1:]} == {Outcome.OK}
    for n, wallet in enumerate(WALLETS):
        deposits = [1 + n % 3, 1 + (n + len(WALLETS)) % 3]
        assert [op.amount for op in log.operations[wallet]] == deposits
        assert log.wallets[wallet].balance == sum(deposits)


async def test_past_the_isolation_bound_the_rest_is_answered_503_unapplied() -> None:
    """With refusal_isolation_commits_max=1 and two refused commands, the one isolation
    commit is refused again: every command, the refused ones too, is answered 503 under
    ``isolation_limit``, nothing applied, and the shard serves the next command as usual."""
    log = ControlledLog()
    observer = RecordingObserver()
    limits = EngineLimits(pipelines=1, batch_ops_max=8, refusal_isolation_commits_max=1)
    async with running_engine(log, limits, observer) as engine:
        for wallet in WALLETS[:4]:
            await engine.create_wallet(wallet, None)
        log.refuse_operation = poisoned
        gate = log.append_gate = Gate()
        first = asyncio.ensure_future(engine.apply(WALLETS[0], DEPOSIT, POISON, None))
        await until(lambda: gate.waiting == 1)
        rest = [asyncio.ensure_future(engine.apply(w, DEPOSIT, 5, None)) for w in WALLETS[:4]]
        rest.append(asyncio.ensure_future(engine.apply(WALLETS[1], DEPOSIT, POISON, None)))
        await asyncio.sleep(0.01)
        log.append_gate = None
        gate.open()
        replies = await asyncio.gather(first, *rest)
        log.refuse_operation = None
        after = await engine.apply(WALLETS[1], DEPOSIT, 7, None)
    assert {reply.outcome for reply in replies} == {Outcome.UNAVAILABLE}
    assert sum(n for _, n, why in observer.failed if why == REASON_ISOLATION_LIMIT) == 6
    assert after.outcome is Outcome.OK
    assert [op.amount for op in log.operations[WALLETS[1]]] == [7]


async def test_a_close_refused_because_another_driver_closed_first_is_a_503() -> None:
    """A credit leg whose transfer is not PENDING in storage (another driver closed it
    first: TransferNotPending) shares a batch with deposits: the deposits are applied, and
    the leg, isolated, is answered UNAVAILABLE (not the caller's fault; its driver reads
    storage), nothing of it written."""
    log = ControlledLog()
    limits = EngineLimits(pipelines=1, batch_ops_max=8)
    async with running_engine(log, limits) as engine:
        for wallet in WALLETS[:4]:
            await engine.create_wallet(wallet, None)
        gate = log.append_gate = Gate()
        first = asyncio.ensure_future(engine.apply(WALLETS[3], DEPOSIT, 1, None))
        await until(lambda: gate.waiting == 1)
        transfer = TransferRecord(
            uuid4(), WALLETS[5], WALLETS[0], 5, None, TransferStatus.PENDING, None, 0, 0
        )
        leg = TransferLeg(
            OperationKind.TRANSFER_IN, transfer, asyncio.get_running_loop().create_future()
        )
        together = [
            asyncio.ensure_future(engine.deliver_leg(leg)),
            *(asyncio.ensure_future(engine.apply(w, DEPOSIT, 2, None)) for w in WALLETS[:3]),
        ]
        await asyncio.sleep(0.01)
        log.append_gate = None
        gate.open()
        await first
        replies = await asyncio.gather(*together)
    assert [reply.outcome for reply in replies] == [Outcome.UNAVAILABLE] + [Outcome.OK] * 3
    assert [op.amount for op in log.operations[WALLETS[0]]] == [2]
    assert transfer.transfer_id not in log.transfers


async def test_the_ledger_refuses_what_storage_would() -> None:
    """Legs past the schema's bounds (an actor too), or a debit under a capture's reserved
    id, are NOT_STORABLE before they join a batch: nothing written, no batch refused."""
    log = ControlledLog()
    async with running_engine(log) as engine:
        for wallet in WALLETS[:2]:
            await engine.create_wallet(wallet, None)
            await engine.apply(wallet, DEPOSIT, 1000, None)
        loop = asyncio.get_running_loop()

        def leg(kind: OperationKind, transfer_id: UUID, amount: int, reference: str | None,
                failure_code: str | None = None,
                actor: str | None = None) -> TransferLeg:  # fmt: skip
            record = TransferRecord(
                transfer_id, WALLETS[0], WALLETS[1], amount, reference,
                TransferStatus.PENDING, None, 0, 0, actor,
            )  # fmt: skip
            return TransferLeg(kind, record, loop.create_future(), failure_code)

        out, into = OperationKind.TRANSFER_OUT, OperationKind.TRANSFER_IN
        forged = [
            leg(out, uuid4(), 5, "r" * 256),
            leg(out, uuid4(), 5, "nul\x00"),
            leg(out, uuid4(), AMOUNT_MINOR_MAX + 1, None),
            leg(out, capture_transfer_id(uuid4()), 5, None),
            leg(into, uuid4(), 5, None, "WALLET_NOT_FOUND"),
            leg(OperationKind.TRANSFER_REFUND, uuid4(), 5, None, "no such code"),
            leg(into, uuid4(), 5, None, actor="a" * 65),  # past a key name (log row CHECK)
        ]
        replies = [await engine.deliver_leg(one) for one in forged]
        appends = log.appends
        long_key = await engine.apply(WALLETS[0], DEPOSIT, 5, "k" * 256)
    assert {reply.outcome for reply in replies} == {Outcome.NOT_STORABLE}
    assert long_key.outcome is Outcome.NOT_STORABLE
    assert log.appends == appends


@pytest.mark.parametrize(
    ("sqlstate", "definite"),
    [
        ("23514", True), ("23505", True), ("22001", True), ("P0001", True), ("WD004", True),
        ("WDL01", True), ("WD001", False), ("WD002", False), ("WDF01", False),
        ("40001", False), ("57014", False), ("08006", False), (None, False),
    ],
)  # fmt: skip
def test_which_postgresql_errors_are_definite_refusals(
    sqlstate: str | None, definite: bool
) -> None:
    """Integrity (23), data (22), RAISE (P0001) and walletd's own checks (WD...) refuse the
    rows; fencing, leases, serialization, cancellation and connections do not."""
    assert is_definite_refusal(sqlstate) is definite


class _AsOfReader(LogReader):
    """``wallet_as_of`` over the in-memory log: the balance after the last row stamped at or
    before the instant (the other reads are not needed here)."""

    def __init__(self, log: ControlledLog) -> None:
        self._log = log

    async def wallet_as_of(self, wallet_id: UUID, at_us: int) -> WalletAsOf | None:
        rows = [op for op in self._log.operations.get(wallet_id, []) if op.created_at_us <= at_us]
        if not rows:
            return WalletAsOf(wallet_id, 0, 0, 0, 0)
        last = rows[-1]
        return WalletAsOf(wallet_id, last.balance_after, last.seq, 0, last.created_at_us)

    async def filtered_history(
        self, wallet_id: UUID, history_filter: HistoryFilter, before_seq: int | None,
        limit: int, scan_max: int,
    ) -> tuple[list[tuple[int, OperationRecord]], int | None]:  # fmt: skip
        raise NotImplementedError

    async def events_after(self, position: FeedPosition, limit: int) -> list[FeedEvent]:
        raise NotImplementedError

    async def list_page(self, query: ListingQuery) -> ListingPage:
        raise NotImplementedError


async def test_an_as_of_read_waits_for_commands_reapplied_after_a_refusal() -> None:
    """A deposit in a batch storage refused is prepared again for isolation, with a new
    stamp: an as-of read for an instant after that stamp waits while its commit is in
    flight, then answers the balance with the deposit, the same as read again later."""
    log = ControlledLog()
    now = [1_000]
    limits = EngineLimits(pipelines=1, batch_ops_max=4)
    reader = _AsOfReader(log)
    async with running_engine(log, limits, clock_us=lambda: now[0]) as engine:
        good, bad = WALLETS[0], WALLETS[1]
        for wallet in (good, bad):
            await engine.create_wallet(wallet, None)
        log.refuse_operation = poisoned
        first = log.append_gate = Gate()
        now[0] = 2_000  # the batch of both deposits is stamped 2000, then refused
        replies = [
            asyncio.ensure_future(engine.apply(good, DEPOSIT, 5, None)),
            asyncio.ensure_future(engine.apply(bad, DEPOSIT, POISON, None)),
        ]
        await until(lambda: first.waiting == 1)
        isolation = log.append_gate = Gate()
        now[0] = 3_000  # the good deposit alone is prepared again, stamped 3000
        first.open()
        await until(lambda: isolation.waiting == 1)
        now[0] = 4_000
        read = asyncio.ensure_future(engine.read_as_of(good, 3_500, reader, WAIT_S))
        await asyncio.sleep(0.05)
        assert not read.done(), read.result()  # an answer now would lack the deposit
        log.append_gate = None
        isolation.open()
        good_reply, bad_reply = await asyncio.gather(*replies)
        found = await read
        again = await engine.read_as_of(good, 3_500, reader, WAIT_S)
    assert (good_reply.outcome, bad_reply.outcome) == (Outcome.OK, Outcome.STORAGE_REFUSED)
    assert found is not None
    assert again is not None
    assert (found.balance, found.updated_at_us) == (5, 3_000)
    assert (again.balance, again.updated_at_us) == (5, 3_000)


async def test_an_as_of_read_waits_for_the_commits_of_a_pipeline_being_replaced() -> None:
    """A pipeline restarted while a deposit's commit is in flight: the fresh pipeline knows
    nothing of it, yet an as-of read routed to it waits for that commit, then includes it."""
    log = ControlledLog()
    now = [1_000]
    reader = _AsOfReader(log)
    async with running_engine(log, EngineLimits(pipelines=1), clock_us=lambda: now[0]) as engine:
        wallet = WALLETS[0]
        await engine.create_wallet(wallet, None)
        gate = log.append_gate = Gate()
        now[0] = 2_000
        deposit = asyncio.ensure_future(engine.apply(wallet, DEPOSIT, 5, None))
        await until(lambda: gate.waiting == 1)
        restart = asyncio.ensure_future(engine.restart_shard(0))
        await asyncio.sleep(0.01)  # the old pipeline is stopping, the fresh one routed to
        now[0] = 3_000
        read = asyncio.ensure_future(engine.read_as_of(wallet, 2_500, reader, WAIT_S))
        await asyncio.sleep(0.05)
        assert not read.done(), read.result()  # an answer now would lack the deposit
        log.append_gate = None
        gate.open()
        assert (await deposit).outcome is Outcome.OK
        await restart
        found = await read
    assert found is not None
    assert (found.balance, found.updated_at_us) == (5, 2_000)
