"""The engine on the in-memory log: ordering, ack after commit, pipelining, bounds,
passivation, failure semantics, drain and crashes. No PostgreSQL, no HTTP."""

from __future__ import annotations

import asyncio
from uuid import UUID

import pytest

from tests.engine_doubles import (
    WAIT_S,
    ControlledLog,
    Gate,
    RecordingObserver,
    running_engine,
    until,
    wallet_ids_on_shard,
)
from walletd.engine.commands import Outcome, Reply
from walletd.engine.errors import EngineOverloaded, EngineStopping
from walletd.engine.limits import EngineLimits
from walletd.engine.memory_log import InMemoryLog
from walletd.engine.model import Batch, OperationKind
from walletd.engine.observer import (
    REASON_COMMIT_FAILED,
    REASON_COMMIT_TIMEOUT,
    REASON_COMMIT_UNKNOWN,
    REASON_LOAD_FAILED,
    REASON_PREVIOUS_FAILED,
    REASON_SHARD_CRASHED,
)
from walletd.engine.router import Engine

DEPOSIT = OperationKind.DEPOSIT
WITHDRAW = OperationKind.WITHDRAW
ONE_SHARD = EngineLimits(
    pipelines=1, batch_ops_max=64, mailbox_commands_max=256, inflight_batches_max=1
)


async def create(engine: Engine, wallet_id: UUID) -> None:
    _id, reply = await engine.create_wallet(wallet_id, None)
    assert reply.outcome is Outcome.CREATED


def start(engine: Engine, wallet_id: UUID, kind: OperationKind, amount: int, key: str | None = None
          ) -> asyncio.Task[Reply]:  # fmt: skip
    return asyncio.create_task(engine.apply(wallet_id, kind, amount, key))


async def submitted(engine: Engine, count: int = 1) -> None:
    """Let freshly created tasks run up to their submit."""
    for _ in range(count + 2):
        await asyncio.sleep(0)


# Event-loop steps with no timer: far more than any reply takes to reach its task (a few).
IDLE_STEPS = 100


async def run_idle() -> None:
    """Let everything runnable run, without waiting on a clock: whatever the engine would
    do while storage does not answer (a premature reply included) has happened after this,
    on a fast machine or a slow one. The "not done yet" checks below rest on it."""
    for _ in range(IDLE_STEPS):
        await asyncio.sleep(0)


async def answers(*tasks: asyncio.Task[Reply]) -> list[Reply]:
    return list(await asyncio.wait_for(asyncio.gather(*tasks), WAIT_S))


# -- ordering and acknowledgement --------------------------------------------------------


async def test_operations_apply_in_submission_order() -> None:
    """Concurrent commands on one wallet are applied in the order they were submitted."""
    log = ControlledLog()
    wallet = UUID(int=1)
    async with running_engine(log) as engine:
        await create(engine, wallet)
        replies = await answers(
            start(engine, wallet, DEPOSIT, 100),
            start(engine, wallet, WITHDRAW, 60),
            start(engine, wallet, WITHDRAW, 60),
            start(engine, wallet, DEPOSIT, 5),
        )
    assert [r.outcome for r in replies] == [
        Outcome.OK, Outcome.OK, Outcome.INSUFFICIENT_FUNDS, Outcome.OK,
    ]  # fmt: skip
    assert [r.wallet.balance for r in replies if r.wallet] == [100, 40, 45]
    assert replies[2].balance_seen == 40
    assert [(op.seq, op.balance_after) for op in log.operations[wallet]] == [
        (1, 100), (2, 40), (3, 45),
    ]  # fmt: skip


async def test_no_reply_before_its_batch_commits() -> None:
    """A deposit is not answered, and reads do not show it, until the append returns."""
    log = ControlledLog()
    wallet = UUID(int=1)
    async with running_engine(log) as engine:
        await create(engine, wallet)
        log.append_gate = gate = Gate()
        deposit = start(engine, wallet, DEPOSIT, 70)
        await gate.wait_for_arrivals(1)
        await run_idle()
        assert not deposit.done()
        assert (await engine.read(wallet)).wallet == engine.read_resident(wallet)
        view = engine.read_resident(wallet)
        assert view is not None
        assert view.balance == 0
        gate.open()
        (reply,) = await answers(deposit)
    assert reply.outcome is Outcome.OK
    assert reply.wallet
    assert reply.wallet.balance == 70
    assert log.wallets[wallet].balance == 70


async def test_refusals_wait_for_the_batches_ahead_of_them() -> None:
    """A refusal decided on pending state is sent only after the batch it depends on commits."""
    log = ControlledLog()
    wallet = UUID(int=1)
    async with running_engine(log, ONE_SHARD) as engine:
        await create(engine, wallet)
        log.append_gate = gate = Gate()
        deposit = start(engine, wallet, DEPOSIT, 50)
        await gate.wait_for_arrivals(1)
        too_much = start(engine, wallet, WITHDRAW, 80)
        enough = start(engine, wallet, WITHDRAW, 30)
        missing = start(engine, UUID(int=999), DEPOSIT, 1)
        await submitted(engine, 3)
        await until(lambda: engine.mailbox_depths() == [0])  # all three drained and decided
        await run_idle()
        assert not any(t.done() for t in (deposit, too_much, enough, missing))
        gate.open()
        replies = await answers(deposit, too_much, enough, missing)
    assert [r.outcome for r in replies] == [
        Outcome.OK, Outcome.INSUFFICIENT_FUNDS, Outcome.OK, Outcome.WALLET_NOT_FOUND,
    ]  # fmt: skip
    assert replies[1].balance_seen == 50
    assert log.wallets[wallet].balance == 20


# -- pipelining and batching -------------------------------------------------------------


async def test_next_batch_is_prepared_while_a_commit_is_in_flight() -> None:
    """While batch N commits, N+1 is drained and loaded; N+1 commits only after N."""
    log = ControlledLog()
    first, later = UUID(int=1), UUID(int=2)
    log.add_wallet(later)  # in the log but not resident: batch N+1 must load it
    async with running_engine(log, ONE_SHARD) as engine:
        await create(engine, first)
        log.append_gate = gate = Gate()
        batch_n = start(engine, first, DEPOSIT, 1)
        await gate.wait_for_arrivals(1)
        batch_n1 = [start(engine, later, DEPOSIT, 2), start(engine, first, DEPOSIT, 3)]
        await until(lambda: log.loads_of(later) == 1)
        assert gate.arrived == 1  # N+1 is prepared but not committing yet
        gate.open()
        await answers(batch_n, *batch_n1)
    assert log.appends_in_flight_max == 1
    assert [len(b.operations) for b in log.appended[-2:]] == [1, 2]
    assert [op.balance_after for op in log.operations[first]] == [1, 4]


class OrderedGatesLog(ControlledLog):
    """Each append waits on its own gate, so a test decides which one finishes first."""

    def __init__(self) -> None:
        super().__init__()
        self.gates: list[Gate] = []
        self.gates_open = False  # True: appends pass at once

    async def append_batch(self, batch: Batch) -> None:
        gate = Gate()
        if self.gates_open:
            gate.open()
        self.gates.append(gate)
        self.appends_in_flight += 1
        try:
            await gate.pass_through()
            await InMemoryLog.append_batch(self, batch)
        finally:
            self.appends_in_flight -= 1


PIPELINED = EngineLimits(
    pipelines=1, batch_ops_max=64, mailbox_commands_max=256, inflight_batches_max=2
)


async def test_two_batches_commit_at_once_and_take_effect_in_order() -> None:
    """With two batches in flight, the later one's replies wait for the earlier commit."""
    log = OrderedGatesLog()
    first, second = UUID(int=1), UUID(int=2)
    log.add_wallet(first)
    log.add_wallet(second)
    async with running_engine(log, PIPELINED) as engine:
        batch_n = start(engine, first, DEPOSIT, 5)
        await until(lambda: len(log.gates) == 1)
        batch_n1 = start(engine, second, DEPOSIT, 7)
        await until(lambda: len(log.gates) == 2)
        assert log.appends_in_flight == 2  # both appends are under way at once
        log.gates[1].open()  # the later batch's write finishes first...
        await until(lambda: log.appends_in_flight == 1)
        await run_idle()
        assert not batch_n1.done()  # ...but it is not answered before the earlier one
        unpromoted = engine.read_resident(second)
        assert unpromoted is not None
        assert unpromoted.balance == 0  # nor promoted
        log.gates[0].open()
        replies = await answers(batch_n, batch_n1)
    assert [r.outcome for r in replies] == [Outcome.OK, Outcome.OK]
    assert (log.wallets[first].balance, log.wallets[second].balance) == (5, 7)


async def test_a_later_batch_that_reaches_storage_first_is_written_again_after() -> None:
    """N+1 on the same wallet overtakes N on the way to storage: storage refuses it as
    PredecessorPending, and it is written again once N has committed; both succeed."""
    log = OrderedGatesLog()
    wallet = UUID(int=1)
    log.add_wallet(wallet)
    async with running_engine(log, PIPELINED) as engine:
        batch_n = start(engine, wallet, DEPOSIT, 5)
        await until(lambda: len(log.gates) == 1)
        batch_n1 = start(engine, wallet, DEPOSIT, 7)
        await until(lambda: len(log.gates) == 2)
        log.gates[1].open()  # N+1 first: its prev_seq is ahead of the stored seq
        await until(lambda: log.appends_in_flight == 1)
        assert log.wallets[wallet].seq == 0  # refused, nothing written
        log.gates[0].open()
        await until(lambda: len(log.gates) == 3)  # N+1 written again, after N
        log.gates[2].open()
        replies = await answers(batch_n, batch_n1)
    assert [r.outcome for r in replies] == [Outcome.OK, Outcome.OK]
    assert [op.balance_after for op in log.operations[wallet]] == [5, 12]


async def test_a_batch_stored_behind_a_failed_one_gets_its_true_answers() -> None:
    """N fails while N+1 (other wallets) was stored: N+1's replies are the true ones (its
    write, a refusal on committed state, a read, a 404), not 503; memory shows the log."""
    log = OrderedGatesLog()
    observer = RecordingObserver()
    first, second, poor = UUID(int=1), UUID(int=2), UUID(int=3)
    unloaded = UUID(int=4)
    for wallet in (first, second, poor, unloaded):
        log.add_wallet(wallet)
    async with running_engine(log, PIPELINED, observer) as engine:
        for wallet in (first, second, poor):
            await engine.read(wallet)
        batch_n = start(engine, first, DEPOSIT, 5)
        await until(lambda: len(log.gates) == 1)
        batch_n1 = [
            start(engine, second, DEPOSIT, 7),
            start(engine, poor, WITHDRAW, 1),
            asyncio.create_task(engine.read(unloaded)),
            start(engine, UUID(int=999), DEPOSIT, 1),
        ]
        await until(lambda: len(log.gates) == 2)
        log.fail_next_appends = 1
        log.gates[0].open()
        await until(lambda: log.appends_in_flight == 1)
        log.gates[1].open()
        failed, *stored = await answers(batch_n, *batch_n1)
        assert failed.outcome is Outcome.UNAVAILABLE
        assert [r.outcome for r in stored] == [
            Outcome.OK, Outcome.INSUFFICIENT_FUNDS, Outcome.OK, Outcome.WALLET_NOT_FOUND,
        ]  # fmt: skip
        assert stored[0].wallet is not None
        assert stored[0].wallet.balance == 7
        assert (log.wallets[first].balance, log.wallets[second].balance) == (0, 7)
        reads = [await engine.read(first), await engine.read(second)]
    assert [r.wallet.balance for r in reads if r.wallet] == [0, 7]
    assert [(c, r) for _s, c, r in observer.failed] == [(1, REASON_COMMIT_FAILED)]


async def test_answers_that_rest_on_a_failed_batch_are_unavailable() -> None:
    """N fails; N+1 is stored, but its answers decided on N's pending state (a replay or a
    reuse of N's key, a refusal on N's pending balance, a wallet N created, its creation
    key, a read of it) are 503, while N+1's own independent write is answered OK."""
    log = OrderedGatesLog()
    observer = RecordingObserver()
    moved, other, created = UUID(int=1), UUID(int=2), UUID(int=3)
    log.add_wallet(moved)
    log.add_wallet(other)
    async with running_engine(log, PIPELINED, observer) as engine:
        await engine.read(moved)
        await engine.read(other)
        n_deposit = start(engine, moved, DEPOSIT, 50, "k1")
        n_create = asyncio.create_task(engine.create_wallet(created, "make-3"))
        await until(lambda: len(log.gates) == 1)
        dependent = [
            start(engine, moved, DEPOSIT, 50, "k1"),  # replay of N's key
            start(engine, moved, DEPOSIT, 51, "k1"),  # reuse of N's key
            start(engine, moved, WITHDRAW, 80),  # refused on N's pending 50
            asyncio.create_task(engine.read(created)),
        ]
        creations = [
            asyncio.create_task(engine.create_wallet(created, None)),  # exists: N made it
            asyncio.create_task(engine.create_wallet(created, "make-3")),  # N's key
        ]
        independent = start(engine, other, DEPOSIT, 7)
        await until(lambda: len(log.gates) == 2)
        log.fail_next_appends = 1
        log.gates[0].open()
        await until(lambda: log.appends_in_flight == 1)
        log.gates[1].open()
        (n_deposited,) = await answers(n_deposit)
        _id, n_created = await asyncio.wait_for(n_create, WAIT_S)
        replies = await answers(*dependent)
        created_replies = await asyncio.wait_for(asyncio.gather(*creations), WAIT_S)
        (own,) = await answers(independent)
    assert [r.outcome for r in (n_deposited, n_created)] == [Outcome.UNAVAILABLE] * 2
    assert [r.outcome for r in replies] == [Outcome.UNAVAILABLE] * 4
    assert [r.outcome for _id, r in created_replies] == [Outcome.UNAVAILABLE] * 2
    assert own.outcome is Outcome.OK
    assert (log.wallets[moved].balance, log.wallets[other].balance) == (0, 7)
    assert created not in log.wallets
    assert [(c, r) for _s, c, r in observer.failed] == [
        (2, REASON_COMMIT_FAILED), (6, REASON_PREVIOUS_FAILED),
    ]  # fmt: skip


async def test_a_write_on_what_a_failed_batch_moved_or_created_is_not_stored() -> None:
    """N fails; N+1 deposits on a wallet N moved and on one N created: its append is
    fenced (the seqs it builds on never landed), so nothing of N+1 is stored, all 503."""
    log = OrderedGatesLog()
    moved, other, created = UUID(int=1), UUID(int=2), UUID(int=3)
    log.add_wallet(moved)
    log.add_wallet(other)
    async with running_engine(log, PIPELINED) as engine:
        await engine.read(moved)
        await engine.read(other)
        batch_n = [
            start(engine, moved, DEPOSIT, 5),
            asyncio.create_task(engine.create_wallet(created, None)),
        ]
        await until(lambda: len(log.gates) == 1)
        batch_n1 = [
            start(engine, moved, DEPOSIT, 3),
            start(engine, created, DEPOSIT, 4),
            start(engine, other, DEPOSIT, 7),
        ]
        await until(lambda: len(log.gates) == 2)
        log.fail_next_appends = 1
        log.gates[0].open()
        await asyncio.wait_for(asyncio.gather(*batch_n), WAIT_S)
        log.gates[1].open()
        replies = await answers(*batch_n1)
    assert [r.outcome for r in replies] == [Outcome.UNAVAILABLE] * 3
    assert (log.wallets[moved].balance, log.wallets[other].balance) == (0, 0)
    assert created not in log.wallets


async def test_batch_size_is_one_at_idle_and_grows_under_load() -> None:
    """Sequential commands commit one per batch; commands queued behind a commit share one."""
    log = ControlledLog()
    observer = RecordingObserver()
    wallet = UUID(int=1)
    async with running_engine(log, ONE_SHARD, observer) as engine:
        await create(engine, wallet)
        for _ in range(5):
            await engine.apply(wallet, DEPOSIT, 1, None)
        idle = [commands for _shard, _ops, commands in observer.committed]
        log.append_gate = gate = Gate()
        head = start(engine, wallet, DEPOSIT, 1)
        await gate.wait_for_arrivals(1)
        queued = [start(engine, wallet, DEPOSIT, 1) for _ in range(200)]
        await submitted(engine, 200)
        gate.open()
        await answers(head, *queued)
    assert idle == [1] * 6  # the creation, then five deposits
    loaded = [commands for _shard, _ops, commands in observer.committed[6:]]
    # 200 commands queued behind one commit: drained in batches of at most batch_ops_max.
    assert loaded[0] == 1
    assert loaded[1:] == [64, 64, 64, 8]
    assert log.wallets[wallet].balance == 206


class SlowLog(ControlledLog):
    """Appends take a little time, so that batches really overlap."""

    async def append_batch(self, batch: Batch) -> None:
        self.appends_in_flight += 1
        self.appends_in_flight_max = max(self.appends_in_flight_max, self.appends_in_flight)
        try:
            await asyncio.sleep(0.001)
            await InMemoryLog.append_batch(self, batch)
        finally:
            self.appends_in_flight -= 1


async def test_appends_in_flight_are_bounded_and_seqs_contiguous() -> None:
    """Under concurrent load a shard has at most inflight_batches_max appends in flight
    (and does use them), and each wallet's log is contiguous, balance = sum of the log."""
    log = SlowLog()
    wallets = [UUID(int=n) for n in range(1, 9)]
    limits = EngineLimits(
        pipelines=1, batch_ops_max=16, mailbox_commands_max=4096, inflight_batches_max=2
    )
    async with running_engine(log, limits) as engine:
        for wallet in wallets:
            await create(engine, wallet)
        tasks = [
            start(engine, wallets[n % 8], DEPOSIT if n % 3 else WITHDRAW, 1 + n % 7)
            for n in range(400)
        ]
        await answers(*tasks)
    assert log.appends_in_flight_max == 2
    for wallet in wallets:
        ops = log.operations[wallet]
        assert [op.seq for op in ops] == list(range(1, len(ops) + 1))
        assert log.wallets[wallet].balance == log.balance_from_log(wallet) >= 0


# -- bounds ------------------------------------------------------------------------------


async def test_a_full_mailbox_refuses_at_once() -> None:
    """Past mailbox_commands_max a command raises EngineOverloaded synchronously; accepted
    commands all complete correctly."""
    log = ControlledLog()
    observer = RecordingObserver()
    wallet = UUID(int=1)
    limits = EngineLimits(
        pipelines=1, batch_ops_max=2, mailbox_commands_max=4, inflight_batches_max=1
    )
    async with running_engine(log, limits, observer) as engine:
        await create(engine, wallet)
        log.append_gate = gate = Gate()
        accepted = [start(engine, wallet, DEPOSIT, 1)]
        await gate.wait_for_arrivals(1)
        accepted += [start(engine, wallet, DEPOSIT, 1) for _ in range(2)]  # batch N+1
        await submitted(engine, 2)
        await until(lambda: engine.mailbox_depths() == [0])
        accepted += [start(engine, wallet, DEPOSIT, 1) for _ in range(4)]  # the mailbox
        await submitted(engine, 4)
        assert engine.mailbox_depths() == [4]
        refused = start(engine, wallet, DEPOSIT, 1)
        await asyncio.sleep(0)
        assert refused.done()
        assert isinstance(refused.exception(), EngineOverloaded)
        assert observer.rejected == ["overloaded"]
        gate.open()
        replies = await answers(*accepted)
    assert all(r.outcome is Outcome.OK for r in replies)
    assert log.wallets[wallet].balance == len(accepted)


# -- passivation -------------------------------------------------------------------------


async def test_resident_wallets_stay_bounded_and_reload_correctly() -> None:
    """Past the resident bound idle wallets are evicted; evicted wallets reload exactly."""
    log = ControlledLog()
    observer = RecordingObserver()
    limits = EngineLimits(
        pipelines=1, batch_ops_max=4, mailbox_commands_max=64, resident_wallets_max=8
    )
    wallets = [UUID(int=n) for n in range(1, 41)]
    async with running_engine(log, limits, observer) as engine:
        for n, wallet in enumerate(wallets):
            await create(engine, wallet)
            await engine.apply(wallet, DEPOSIT, n + 1, None)
            assert engine.resident_wallets() <= 8 + 2 * limits.batch_ops_max
        assert observer.evicted > 0
        for n, wallet in enumerate(wallets):
            reply = await engine.apply(wallet, WITHDRAW, 1, None)
            assert reply.wallet is not None
            assert reply.wallet.balance == n
            read = await engine.read(wallet)
            assert read.wallet is not None
            assert read.wallet.balance == n
            assert engine.resident_wallets() <= 8 + 2 * limits.batch_ops_max
    assert observer.loaded >= len(wallets)


async def test_concurrent_first_requests_load_a_wallet_once() -> None:
    """Many first requests for one stored wallet cause a single load."""
    log = ControlledLog()
    wallet = UUID(int=7)
    log.add_wallet(wallet)
    async with running_engine(log, ONE_SHARD) as engine:
        log.load_gate = gate = Gate()
        deposits = [start(engine, wallet, DEPOSIT, 1) for _ in range(20)]
        reads = [asyncio.create_task(engine.read(wallet)) for _ in range(20)]
        await gate.wait_for_arrivals(1)
        gate.open()
        await answers(*deposits, *reads)
    assert log.loads_of(wallet) == 1
    assert log.wallets[wallet].balance == 20


async def test_a_wallet_found_resident_is_not_evicted_while_its_batch_loads() -> None:
    """Regression: a commit ending while the next batch awaits a load must not evict a
    wallet that batch already counted on (it was answered WALLET_NOT_FOUND)."""
    log = ControlledLog()
    resident, created, stored = UUID(int=1), UUID(int=2), UUID(int=3)
    log.add_wallet(stored)
    limits = EngineLimits(
        pipelines=1, batch_ops_max=4, mailbox_commands_max=64, resident_wallets_max=1
    )
    async with running_engine(log, limits) as engine:
        await create(engine, resident)
        log.append_gate = append_gate = Gate()
        creating = asyncio.create_task(engine.create_wallet(created, None))
        await append_gate.wait_for_arrivals(1)
        log.load_gate = load_gate = Gate()
        on_resident = start(engine, resident, DEPOSIT, 5)
        on_stored = start(engine, stored, DEPOSIT, 6)
        await load_gate.wait_for_arrivals(1)
        append_gate.open()
        await asyncio.wait_for(creating, WAIT_S)
        load_gate.open()
        replies = await answers(on_resident, on_stored)
    assert [r.outcome for r in replies] == [Outcome.OK, Outcome.OK]
    assert log.wallets[resident].balance == 5


# -- failure semantics -------------------------------------------------------------------


async def test_a_failed_commit_fails_its_batch_and_the_one_prepared_on_top() -> None:
    """Commit N fails: N and N+1 get UNAVAILABLE, nothing is written, memory is re-read."""
    log = ControlledLog()
    observer = RecordingObserver()
    first, second = UUID(int=1), UUID(int=2)
    async with running_engine(log, ONE_SHARD, observer) as engine:
        await create(engine, first)
        await create(engine, second)
        await engine.apply(first, DEPOSIT, 100, None)
        log.append_gate = gate = Gate()
        batch_n = start(engine, first, DEPOSIT, 10)
        await gate.wait_for_arrivals(1)
        batch_n1 = [start(engine, first, WITHDRAW, 105), start(engine, second, DEPOSIT, 7)]
        await submitted(engine, 2)
        log.fail_next_appends = 1
        gate.open()
        replies = await answers(batch_n, *batch_n1)
        assert [r.outcome for r in replies] == [Outcome.UNAVAILABLE] * 3
        assert (log.wallets[first].balance, log.wallets[second].balance) == (100, 0)
        # Memory is not ahead of the log: a withdrawal of 105 is refused against 100.
        after = await engine.apply(first, WITHDRAW, 105, None)
        assert after.outcome is Outcome.INSUFFICIENT_FUNDS
        assert after.balance_seen == 100
        read = await engine.read(second)
        assert read.wallet is not None
        assert read.wallet.balance == 0
    assert [(c, r) for _s, c, r in observer.failed] == [
        (1, REASON_COMMIT_FAILED), (2, REASON_PREVIOUS_FAILED),
    ]  # fmt: skip


async def test_an_ambiguous_commit_is_resolved_exactly_once_by_a_keyed_retry() -> None:
    """The batch lands but the commit reports failure: the retry with the same key replays
    the stored result instead of applying twice, and memory is re-read from the log."""
    log = ControlledLog()
    observer = RecordingObserver()
    wallet = UUID(int=1)
    async with running_engine(log, ONE_SHARD, observer) as engine:
        await create(engine, wallet)
        log.fail_next_appends, log.apply_then_fail = 1, True
        lost = await engine.apply(wallet, DEPOSIT, 40, "pay-1")
        assert lost.outcome is Outcome.UNAVAILABLE
        read = await engine.read(wallet)  # re-read: the deposit did land
        assert read.wallet is not None
        assert read.wallet.balance == 40
        retries = [await engine.apply(wallet, DEPOSIT, 40, "pay-1") for _ in range(2)]
        reused = await engine.apply(wallet, DEPOSIT, 41, "pay-1")
        log.fail_next_appends = 1
        _id, created_lost = await engine.create_wallet(UUID(int=2), "make-2")
        _id, created = await engine.create_wallet(UUID(int=2), "make-2")
    assert all(r.outcome is Outcome.OK and r.replayed for r in retries)
    assert all(r.wallet is not None and r.wallet.balance == 40 for r in retries)
    assert reused.outcome is Outcome.IDEMPOTENCY_KEY_REUSED
    assert [op.amount for op in log.operations[wallet]] == [40]
    assert created_lost.outcome is Outcome.UNAVAILABLE
    assert created.outcome is Outcome.CREATED
    assert created.replayed
    assert [r for _s, _c, r in observer.failed] == [REASON_COMMIT_UNKNOWN] * 2


async def test_a_keyed_refusal_is_replayed_after_its_key_left_the_cache() -> None:
    """A keyed refusal is recorded with its batch; after a deposit that would cover it and
    after its key was pushed out of the bounded cache by newer keys, the retry replays the
    refusal (from storage) and the same key never applies."""
    log = ControlledLog()
    wallet = UUID(int=1)
    limits = EngineLimits(
        pipelines=1, batch_ops_max=1, mailbox_commands_max=8, inflight_batches_max=1,
        idempotency_keys_max=2,
    )  # fmt: skip
    async with running_engine(log, limits) as engine:
        await create(engine, wallet)
        refused = await engine.apply(wallet, WITHDRAW, 30, "w")
        assert (refused.outcome, refused.balance_seen, refused.replayed) == (
            Outcome.INSUFFICIENT_FUNDS, 0, False,
        )  # fmt: skip
        for number in range(3):  # more keys than the cache holds
            await engine.apply(wallet, DEPOSIT, 20, f"d{number}")
        finds_before = log.finds
        replayed = await engine.apply(wallet, WITHDRAW, 30, "w")
        assert log.finds == finds_before + 1  # the key was not in memory any more
        reused = await engine.apply(wallet, WITHDRAW, 31, "w")
    assert (replayed.outcome, replayed.balance_seen, replayed.replayed) == (
        Outcome.INSUFFICIENT_FUNDS, 0, True,
    )  # fmt: skip
    assert reused.outcome is Outcome.IDEMPOTENCY_KEY_REUSED
    assert log.wallets[wallet].balance == 60
    assert list(log.refusals) == [(wallet, "w")]


async def test_a_key_reuse_judged_on_a_failed_refusal_is_unavailable() -> None:
    """N records a keyed refusal and fails; N+1 reuses that key with another request and
    also moves the wallet (stored: a refusal moves no seq, so the fence does not cover
    it). The 422 rests on a refusal that was never stored: it is 503, and the key is
    free afterwards."""
    log = OrderedGatesLog()
    wallet = UUID(int=1)
    log.add_wallet(wallet)
    async with running_engine(log, PIPELINED) as engine:
        await engine.read(wallet)
        refused = start(engine, wallet, WITHDRAW, 5, "k")
        await until(lambda: len(log.gates) == 1)
        batch_n1 = [start(engine, wallet, DEPOSIT, 1), start(engine, wallet, DEPOSIT, 7, "k")]
        await until(lambda: len(log.gates) == 2)
        log.fail_next_appends = 1
        log.gates[0].open()
        (n_reply,) = await answers(refused)
        log.gates_open = True
        log.gates[1].open()
        replies = await answers(*batch_n1)
        fresh = await engine.apply(wallet, DEPOSIT, 7, "k")
    assert n_reply.outcome is Outcome.UNAVAILABLE
    assert [r.outcome for r in replies] == [Outcome.OK, Outcome.UNAVAILABLE]
    assert (fresh.outcome, fresh.replayed) == (Outcome.OK, False)
    assert log.wallets[wallet].balance == 8


async def test_a_cached_key_is_not_pushed_out_by_the_keys_its_own_batch_loads() -> None:
    """A batch retries key a (cached, the oldest entry) and key b (only in storage): loading
    b must not evict a before a is decided, or a would be applied again (here storage's
    unique key refuses it and both retries get 503). Both are replayed."""
    log = ControlledLog()
    wallet = UUID(int=1)
    limits = EngineLimits(
        pipelines=1, batch_ops_max=2, mailbox_commands_max=8, inflight_batches_max=1,
        idempotency_keys_max=4,
    )  # fmt: skip
    async with running_engine(log, limits) as engine:
        await create(engine, wallet)
        for key in ("b", "a", "x1", "x2", "x3"):  # b falls out of the 4-entry cache
            await engine.apply(wallet, DEPOSIT, 1, key)
        retries = await answers(
            start(engine, wallet, DEPOSIT, 1, "a"), start(engine, wallet, DEPOSIT, 1, "b")
        )
    assert [(r.outcome, r.replayed) for r in retries] == [(Outcome.OK, True)] * 2
    assert log.wallets[wallet].balance == 5


async def test_a_refusal_decided_on_a_failed_batch_is_not_recorded() -> None:
    """N (a withdrawal) fails; N+1's keyed refusal was decided on N's pending balance, so it
    is not recorded (its batch is refused by storage, 503), and the retry with the same key
    is decided again, on what committed: applied."""
    log = OrderedGatesLog()
    wallet, other = UUID(int=1), UUID(int=2)
    log.add_wallet(wallet)
    log.add_wallet(other)
    async with running_engine(log, PIPELINED) as engine:
        log.gates_open = True
        await engine.apply(wallet, DEPOSIT, 100, None)
        log.gates_open = False
        batch_n = start(engine, wallet, WITHDRAW, 60)
        await until(lambda: len(log.gates) == 2)
        batch_n1 = [start(engine, wallet, WITHDRAW, 70, "w"), start(engine, other, DEPOSIT, 1)]
        await until(lambda: len(log.gates) == 3)
        log.fail_next_appends = 1
        log.gates[1].open()
        await answers(batch_n)
        log.gates_open = True
        log.gates[2].open()
        replies = await answers(*batch_n1)
        assert [r.outcome for r in replies] == [Outcome.UNAVAILABLE] * 2
        assert log.refusals == {}
        retried = await engine.apply(wallet, WITHDRAW, 70, "w")
    assert retried.outcome is Outcome.OK
    assert not retried.replayed
    assert log.wallets[wallet].balance == 30
    assert log.wallets[other].balance == 0


async def test_a_load_failure_answers_unavailable_and_recovers() -> None:
    """When storage cannot load, commands get UNAVAILABLE; once it answers, work goes on."""
    log = ControlledLog()
    observer = RecordingObserver()
    wallet = UUID(int=1)
    log.add_wallet(wallet)
    async with running_engine(log, ONE_SHARD, observer) as engine:
        log.fail_loads = True
        failed = await engine.apply(wallet, DEPOSIT, 3, None)
        log.fail_loads = False
        ok = await engine.apply(wallet, DEPOSIT, 3, None)
    assert failed.outcome is Outcome.UNAVAILABLE
    assert ok.wallet is not None
    assert ok.wallet.balance == 3
    assert [r for _s, _c, r in observer.failed] == [REASON_LOAD_FAILED]


async def test_a_commit_past_its_timeout_is_answered_unavailable() -> None:
    """An append that never returns is abandoned after commit_timeout_s with UNAVAILABLE."""
    log = ControlledLog()
    observer = RecordingObserver()
    wallet = UUID(int=1)
    limits = EngineLimits(
        pipelines=1, batch_ops_max=4, mailbox_commands_max=64, commit_timeout_s=0.05
    )
    async with running_engine(log, limits, observer) as engine:
        await create(engine, wallet)
        log.append_gate = Gate()  # never opened
        reply = await asyncio.wait_for(engine.apply(wallet, DEPOSIT, 3, None), WAIT_S)
        log.append_gate = None
        after = await engine.apply(wallet, DEPOSIT, 4, None)
    assert reply.outcome is Outcome.UNAVAILABLE
    assert after.wallet is not None
    assert after.wallet.balance == 4
    assert [r for _s, _c, r in observer.failed] == [REASON_COMMIT_TIMEOUT]


async def test_an_unexpected_storage_exception_is_an_unknown_commit_not_a_hang() -> None:
    """A log raising something outside its contract fails the batch with 503; the shard lives."""
    log = ControlledLog()
    wallet = UUID(int=1)
    async with running_engine(log, ONE_SHARD) as engine:
        await create(engine, wallet)
        log.raise_on_append = RuntimeError("driver bug")
        reply = await asyncio.wait_for(engine.apply(wallet, DEPOSIT, 3, None), WAIT_S)
        after = await engine.apply(wallet, DEPOSIT, 4, None)
        assert engine.accepting
    assert reply.outcome is Outcome.UNAVAILABLE
    assert after.wallet is not None
    assert after.wallet.balance == 4


# -- stopping and crashing ---------------------------------------------------------------


async def test_stop_answers_every_accepted_command_and_refuses_new_ones() -> None:
    """A graceful stop commits what was accepted, answers it, and refuses what comes after."""
    log = ControlledLog()
    wallets = [UUID(int=n) for n in range(1, 7)]
    engine = Engine(log, EngineLimits(pipelines=3, batch_ops_max=8, mailbox_commands_max=256))
    await engine.start()
    for wallet in wallets:
        await create(engine, wallet)
    log.append_gate = gate = Gate()
    accepted = [start(engine, wallets[n % 6], DEPOSIT, 1) for n in range(60)]
    await submitted(engine, 60)
    stopping = asyncio.create_task(engine.stop())
    await asyncio.sleep(0)
    late = start(engine, wallets[0], DEPOSIT, 1)
    await asyncio.sleep(0)
    assert isinstance(late.exception(), EngineStopping)
    assert not engine.accepting
    gate.open()
    replies = await answers(*accepted)
    await asyncio.wait_for(stopping, WAIT_S)
    assert all(r.outcome is Outcome.OK for r in replies)
    assert sum(log.wallets[w].balance for w in wallets) == 60


class _BreakableClock:
    def __init__(self) -> None:
        self.broken = False
        self.now_us = 1_000_000

    def __call__(self) -> int:
        if self.broken:
            raise RuntimeError("clock broke: stands in for any bug in the loop")
        self.now_us += 1
        return self.now_us


async def test_a_crashed_shard_answers_everything_it_held() -> None:
    """A bug that kills a shard's loop answers the committing, prepared and queued commands
    with UNAVAILABLE; with no restart allowed the engine gives up (not accepting, the
    process told to exit) and the shard refuses new work; no caller hangs."""
    log = ControlledLog()
    observer = RecordingObserver()
    clock = _BreakableClock()
    wallet = UUID(int=1)
    fatal: list[str] = []
    limits = EngineLimits(
        pipelines=1, batch_ops_max=2, mailbox_commands_max=64, shard_restarts_max=0
    )
    async with running_engine(log, limits, observer, clock, fatal.append) as engine:
        await create(engine, wallet)
        log.append_gate = gate = Gate()
        committing = start(engine, wallet, DEPOSIT, 1)
        await gate.wait_for_arrivals(1)
        clock.broken = True
        held = [start(engine, wallet, DEPOSIT, 1) for _ in range(6)]
        replies = await answers(committing, *held)
        assert [r.outcome for r in replies] == [Outcome.UNAVAILABLE] * 7
        await until(lambda: bool(fatal))
        assert not engine.accepting
        assert engine.failure == fatal[0]
        with pytest.raises(EngineStopping):
            await engine.apply(wallet, DEPOSIT, 1, None)
    assert {r for _s, _c, r in observer.failed} == {REASON_SHARD_CRASHED}
    assert sum(c for _s, c, _r in observer.failed) == 7
    assert log.wallets[wallet].balance == 0


async def test_a_crashed_shard_is_restarted_from_storage_within_the_rate() -> None:
    """A broken invariant (a corrupt row from storage) crashes a shard: its commands get
    503, a fresh shard with empty memory takes its place and serves from storage; past
    shard_restarts_max crashes in the window the engine gives up and asks to exit."""
    log = ControlledLog()
    observer = RecordingObserver()
    wallet, other = UUID(int=1), UUID(int=2)
    log.add_wallet(wallet)
    log.add_wallet(other)
    fatal: list[str] = []
    limits = EngineLimits(
        pipelines=1, batch_ops_max=4, mailbox_commands_max=64, shard_restarts_max=1,
        shard_restart_window_s=600,
    )  # fmt: skip
    async with running_engine(log, limits, observer, on_fatal=fatal.append) as engine:
        assert (await engine.apply(other, DEPOSIT, 5, None)).outcome is Outcome.OK
        log.corrupt_loads = 1
        crashed = await engine.apply(wallet, DEPOSIT, 1, None)
        assert crashed.outcome is Outcome.UNAVAILABLE
        await until(lambda: engine.accepting)  # restarted
        assert observer.restarted == [0]
        assert engine.read_resident(other) is None  # memory dropped: re-read from storage
        after = await engine.apply(wallet, DEPOSIT, 1, None)
        assert after.outcome is Outcome.OK
        assert after.wallet is not None
        assert after.wallet.balance == 1
        read = await engine.read(other)
        assert read.wallet is not None
        assert read.wallet.balance == 5
        assert not fatal
        # A second crash within the window is one more than allowed: the engine gives up.
        log.corrupt_loads = 1
        assert (await engine.apply(other, DEPOSIT, 1, "x")).outcome is Outcome.OK  # resident
        await engine.restart_shard(0)  # drop memory, so the next use loads (corrupt)
        crashed = await engine.apply(other, DEPOSIT, 1, None)
        assert crashed.outcome is Outcome.UNAVAILABLE
        await until(lambda: bool(fatal))
        assert not engine.accepting
        with pytest.raises(EngineStopping):
            await engine.apply(other, DEPOSIT, 1, None)
    assert "after 1 restarts" in fatal[0]
    assert observer.restarted == [0]
    assert (log.wallets[wallet].balance, log.wallets[other].balance) == (1, 6)


async def test_restart_shard_drops_memory_and_answers_what_it_held() -> None:
    """Engine.restart_shard: the old shard answers what it accepted (committed here), new
    commands wait for the fresh shard, which re-reads wallets from storage."""
    log = ControlledLog()
    wallet = UUID(int=1)
    log.add_wallet(wallet)
    async with running_engine(log, ONE_SHARD) as engine:
        await engine.apply(wallet, DEPOSIT, 5, None)
        log.append_gate = gate = Gate()
        held = start(engine, wallet, DEPOSIT, 1)
        await gate.wait_for_arrivals(1)
        restarting = asyncio.create_task(engine.restart_shard(0))
        queued = start(engine, wallet, DEPOSIT, 2)
        await submitted(engine)
        assert not queued.done()
        gate.open()
        await asyncio.wait_for(restarting, WAIT_S)
        replies = await answers(held, queued)
        loads = log.loads_of(wallet)
    assert [r.outcome for r in replies] == [Outcome.OK, Outcome.OK]
    assert replies[1].wallet is not None
    assert replies[1].wallet.balance == 8
    assert loads == 2  # loaded again by the fresh shard


async def test_shards_are_independent() -> None:
    """A commit held on one shard does not hold another shard's commands."""
    log = ControlledLog()
    limits = EngineLimits(pipelines=2, batch_ops_max=4, mailbox_commands_max=64)
    (left,) = wallet_ids_on_shard(0, 2, 1)
    (right,) = wallet_ids_on_shard(1, 2, 1)
    async with running_engine(log, limits) as engine:
        await create(engine, left)
        await create(engine, right)
        log.append_gate = gate = Gate()
        held = start(engine, left, DEPOSIT, 1)
        await gate.wait_for_arrivals(1)
        log.append_gate = None  # later appends pass; the held one still waits on its gate
        free = await asyncio.wait_for(engine.apply(right, DEPOSIT, 2, None), WAIT_S)
        assert not held.done()
        gate.open()
        await answers(held)
    assert free.wallet is not None
    assert free.wallet.balance == 2


async def test_warm_up_makes_recent_wallets_resident_up_to_the_bound() -> None:
    """warm_up loads the most recently updated wallets before start, never past the
    resident bound; requests for them then need no load."""
    log = ControlledLog()
    wallets = [UUID(int=n) for n in range(1, 6)]
    for wallet in wallets:
        log.add_wallet(wallet)
    limits = EngineLimits(
        pipelines=1, batch_ops_max=2, mailbox_commands_max=8, resident_wallets_max=3
    )
    engine = Engine(log, limits)
    assert await engine.warm_up(10) == 3
    await engine.start()
    try:
        assert engine.resident_wallets() == 3
        warm = [w for w in wallets if engine.read_resident(w) is not None]
        assert len(warm) == 3
        reply = await engine.apply(warm[0], DEPOSIT, 5, None)
        assert reply.outcome is Outcome.OK
        assert log.load_calls == []  # served from memory: warm-up did the loading
    finally:
        await engine.stop()
    assert await Engine(log, limits).warm_up(0) == 0
