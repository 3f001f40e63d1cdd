"""The engine against a trivial sequential model, driven by Hypothesis, twice: through the
pipeline (the Engine on the in-memory log) and on the pure ledger state machine directly.

Random creates, deposits, withdrawals, reads, keyed retries (of applied and of refused
operations), concurrent bursts, commit failures (plain and apply-then-fail), two batches in
flight with the first failing, transfers through the engine (replayed, reused ids, refused
and refunded, with failed and ambiguous credit or refund commits, finished by a re-drive or
by the recovery of a restart), and restarts, across several wallets on several shards with a
tiny resident bound (so passivation runs all the time) and more idempotency keys than the
key cache holds (so keys are forgotten and looked up again). After every step the log must
equal the model: balances, histories, recorded refusals, transfers, never negative,
balance == sum(log), and balances + PENDING transfers == deposits - withdrawals.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import TypeVar
from uuid import UUID

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from tests.engine_doubles import WAIT_S, ControlledLog, until
from walletd.engine.commands import (
    ApplyOperation,
    Command,
    CreateWallet,
    Outcome,
    ReadWallet,
    Reply,
    transfer_leg_key,
)
from walletd.engine.ledger import Applied, Ledger
from walletd.engine.limits import EngineLimits
from walletd.engine.memory_log import InMemoryLog
from walletd.engine.model import CREDIT_KINDS, OperationKind, TransferStatus
from walletd.engine.money import BALANCE_MINOR_MAX
from walletd.engine.router import Engine, shard_of
from walletd.engine.transfers import SIDE_FROM, SIDE_TO, TransferReply

settings.register_profile(
    "engine-model",
    max_examples=40,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

T = TypeVar("T")

WALLETS = [UUID(int=n) for n in range(1, 7)]
KEYS = [f"k{n}" for n in range(1, 7)]
# Two shards, batches of two, two in flight: each shard's key cache holds 6 keys (the least
# the limits allow), while 6 wallets x 6 keys give ~18 per shard: the cache overflows, and a
# forgotten key must be found in storage, never applied twice.
LIMITS = EngineLimits(
    pipelines=2, batch_ops_max=2, inflight_batches_max=2, mailbox_commands_max=64,
    resident_wallets_max=3, idempotency_keys_max=12,
    # Re-drives run only when a rule asks (and once at each start), so the model knows when.
    transfer_redrive_interval_s=3600.0,
)  # fmt: skip
TRANSFER_IDS = [UUID(int=1000 + n) for n in range(4)]

wallets = st.sampled_from(WALLETS)
kinds = st.sampled_from([OperationKind.DEPOSIT, OperationKind.WITHDRAW])
amounts = st.integers(min_value=1, max_value=50)
keys = st.none() | st.sampled_from(KEYS)
transfer_ids = st.sampled_from(TRANSFER_IDS)
OUT, IN = OperationKind.TRANSFER_OUT, OperationKind.TRANSFER_IN
REFUND = OperationKind.TRANSFER_REFUND


@dataclass
class _Op:
    kind: OperationKind
    amount: int
    balance_after: int
    key: str | None


@dataclass
class _Refusal:
    kind: OperationKind
    amount: int
    outcome: Outcome
    balance_seen: int


@dataclass(frozen=True)
class Expect:
    """What a command must get: the outcome, the balance in the reply (a refusal's: the
    balance it saw), whether it logs an operation or records a refusal, and whether the
    reply is a replay."""

    outcome: Outcome
    balance: int | None = None
    writes: bool = False
    records: bool = False
    replayed: bool = False


@dataclass
class Model:
    """What a sequential, single-threaded ledger would hold."""

    balances: dict[UUID, int] = field(default_factory=dict)
    history: dict[UUID, list[_Op]] = field(default_factory=dict)
    keyed: dict[tuple[UUID, str], _Op | _Refusal] = field(default_factory=dict)
    create_keys: dict[str, UUID] = field(default_factory=dict)
    # transfer id -> [from, to, amount, status, failure code]
    transfers: dict[UUID, list[object]] = field(default_factory=dict)
    external: int = 0  # deposits - withdrawals

    def move(self, wallet: UUID, kind: OperationKind, amount: int, key: str) -> None:
        """Log one leg of a transfer."""
        balance = self.balances[wallet] + (amount if kind in CREDIT_KINDS else -amount)
        assert balance >= 0
        op = _Op(kind, amount, balance, key)
        self.balances[wallet] = balance
        self.history[wallet].append(op)
        self.keyed[(wallet, key)] = op

    def transfer_reply(self, transfer_id: UUID) -> tuple[Outcome, str | None]:
        """The final answer a stored transfer gives."""
        _from, _to, _amount, status, failure = self.transfers[transfer_id]
        if status is TransferStatus.COMPLETED:
            return Outcome.OK, None
        if status is TransferStatus.PENDING:
            return Outcome.UNAVAILABLE, None
        assert isinstance(failure, str)
        return Outcome(failure), SIDE_TO

    def debit(self, transfer_id: UUID, sender: UUID, receiver: UUID, amount: int) -> None:
        self.move(sender, OUT, amount, transfer_leg_key(OUT, transfer_id))
        self.transfers[transfer_id] = [sender, receiver, amount, TransferStatus.PENDING, None]

    def finish(self, transfer_id: UUID) -> None:
        """Drive a PENDING transfer: credit, or refund when the receiver does not exist."""
        sender, receiver, amount, _status, _failure = self.transfers[transfer_id]
        assert isinstance(sender, UUID)
        assert isinstance(receiver, UUID)
        assert isinstance(amount, int)
        if receiver in self.balances:
            self.move(receiver, IN, amount, transfer_leg_key(IN, transfer_id))
            self.transfers[transfer_id][3] = TransferStatus.COMPLETED
        else:
            self.move(sender, REFUND, amount, transfer_leg_key(REFUND, transfer_id))
            self.transfers[transfer_id][3:] = [TransferStatus.FAILED, "WALLET_NOT_FOUND"]

    def pending(self) -> list[UUID]:
        return [t for t, v in self.transfers.items() if v[3] is TransferStatus.PENDING]

    def expect_apply(
        self, wallet: UUID, kind: OperationKind, amount: int, key: str | None
    ) -> Expect:
        """What the command gets, without changing the model."""
        if wallet not in self.balances:
            return Expect(Outcome.WALLET_NOT_FOUND)
        if key is not None and (wallet, key) in self.keyed:
            earlier = self.keyed[(wallet, key)]
            if (earlier.kind, earlier.amount) != (kind, amount):
                return Expect(Outcome.IDEMPOTENCY_KEY_REUSED)
            if isinstance(earlier, _Refusal):
                return Expect(earlier.outcome, earlier.balance_seen, replayed=True)
            return Expect(Outcome.OK, earlier.balance_after, replayed=True)
        balance = self.balances[wallet]
        keyed = key is not None
        if kind is OperationKind.WITHDRAW:
            if amount > balance:
                return Expect(Outcome.INSUFFICIENT_FUNDS, balance, records=keyed)
            return Expect(Outcome.OK, balance - amount, writes=True)
        if balance + amount > BALANCE_MINOR_MAX:
            return Expect(Outcome.BALANCE_LIMIT_EXCEEDED, balance, records=keyed)
        return Expect(Outcome.OK, balance + amount, writes=True)

    def apply(
        self, wallet: UUID, kind: OperationKind, amount: int, key: str | None, expect: Expect
    ) -> None:
        """Take the effect of a command that got ``expect``."""
        if expect.writes:
            assert expect.balance is not None
            op = _Op(kind, amount, expect.balance, key)
            self.balances[wallet] = expect.balance
            self.history[wallet].append(op)
            self.external += amount if kind is OperationKind.DEPOSIT else -amount
            if key is not None:
                self.keyed[(wallet, key)] = op
        elif expect.records:
            assert key is not None
            assert expect.balance is not None
            self.keyed[(wallet, key)] = _Refusal(kind, amount, expect.outcome, expect.balance)

    def expect_create(self, wallet: UUID, key: str | None) -> tuple[Outcome, bool]:
        if key is not None and key in self.create_keys:
            same = self.create_keys[key] == wallet
            return (Outcome.CREATED if same else Outcome.IDEMPOTENCY_KEY_REUSED), False
        if wallet in self.balances:
            return Outcome.WALLET_ALREADY_EXISTS, False
        return Outcome.CREATED, True

    def create(self, wallet: UUID, key: str | None) -> None:
        self.balances[wallet] = 0
        self.history[wallet] = []
        if key is not None:
            self.create_keys[key] = wallet


def _check_apply(reply: Reply, expected: Expect) -> None:
    assert reply.outcome is expected.outcome, (reply, expected)
    assert reply.replayed is expected.replayed, (reply, expected)
    if expected.outcome is Outcome.OK:
        assert reply.wallet is not None
        assert reply.wallet.balance == expected.balance
    elif expected.outcome in (Outcome.INSUFFICIENT_FUNDS, Outcome.BALANCE_LIMIT_EXCEEDED):
        assert reply.balance_seen == expected.balance


def _check_log(log: InMemoryLog, model: Model) -> None:
    """The log holds exactly what the model does: wallets, balances, histories, refusals."""
    assert set(log.wallets) == set(model.balances)
    for wallet, balance in model.balances.items():
        stored = log.wallets[wallet]
        assert stored.balance == balance >= 0
        ops = log.operations.get(wallet, [])
        assert sum(o.amount if o.kind in CREDIT_KINDS else -o.amount for o in ops) == balance
        assert [(o.kind, o.amount, o.balance_after, o.idempotency_key) for o in ops] == [
            (o.kind, o.amount, o.balance_after, o.key) for o in model.history[wallet]
        ]
        assert [o.seq for o in ops] == list(range(1, len(ops) + 1))
    refusals = {k: v for k, v in model.keyed.items() if isinstance(v, _Refusal)}
    assert {
        k: (r.kind, r.amount, r.reason.name, r.balance_seen) for k, r in log.refusals.items()
    } == {k: (r.kind, r.amount, r.outcome.name, r.balance_seen) for k, r in refusals.items()}


class EngineMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.log = ControlledLog()
        self.model = Model()
        self.engine = self._start_engine()

    def _run(self, awaitable: Awaitable[T]) -> T:
        return self.loop.run_until_complete(asyncio.wait_for(awaitable, WAIT_S))

    def _start_engine(self) -> Engine:
        engine = Engine(self.log, LIMITS)
        self._run(engine.start())
        return engine

    def teardown(self) -> None:
        self._run(self.engine.stop())
        self.loop.close()

    # -- rules ---------------------------------------------------------------------------

    @rule(wallet=wallets, key=keys)
    def create(self, wallet: UUID, key: str | None) -> None:
        expected, writes = self.model.expect_create(wallet, key)
        _id, reply = self._run(self.engine.create_wallet(wallet, key))
        assert reply.outcome is expected, (reply, expected)
        if writes:
            self.model.create(wallet, key)

    @rule(wallet=wallets, kind=kinds, amount=amounts, key=keys)
    def apply(self, wallet: UUID, kind: OperationKind, amount: int, key: str | None) -> None:
        expected = self.model.expect_apply(wallet, kind, amount, key)
        reply = self._run(self.engine.apply(wallet, kind, amount, key))
        assert isinstance(reply, Reply)
        _check_apply(reply, expected)
        self.model.apply(wallet, kind, amount, key, expected)

    @rule(
        ops=st.lists(st.tuples(wallets, kinds, amounts, keys), min_size=2, max_size=12),
    )
    def burst(self, ops: list[tuple[UUID, OperationKind, int, str | None]]) -> None:
        """Concurrent commands: per wallet, the engine must act as if they ran in order."""

        async def all_at_once() -> list[Reply]:
            return list(await asyncio.gather(*(self.engine.apply(*op) for op in ops)))

        replies = self._run(all_at_once())
        assert isinstance(replies, list)
        for op, reply in zip(ops, replies, strict=True):
            expected = self.model.expect_apply(*op)
            _check_apply(reply, expected)
            self.model.apply(*op, expected)

    @rule(
        wallet=wallets,
        kind=kinds,
        amount=amounts,
        key=st.sampled_from(KEYS),
        lands=st.booleans(),
    )
    def apply_with_failed_commit(
        self, wallet: UUID, kind: OperationKind, amount: int, key: str, lands: bool
    ) -> None:
        """The commit fails; with ``lands`` it was written first (ambiguous outcome)."""
        expected = self.model.expect_apply(wallet, kind, amount, key)
        self.log.fail_next_appends, self.log.apply_then_fail = 1, lands
        reply = self._run(self.engine.apply(wallet, kind, amount, key))
        self.log.fail_next_appends, self.log.apply_then_fail = 0, False
        assert isinstance(reply, Reply)
        if not (expected.writes or expected.records):  # nothing to write, nothing fails
            _check_apply(reply, expected)
            return
        assert reply.outcome is Outcome.UNAVAILABLE
        if lands:
            self.model.apply(wallet, kind, amount, key, expected)

    @rule(wallet=wallets, key=keys, lands=st.booleans())
    def create_with_failed_commit(self, wallet: UUID, key: str | None, lands: bool) -> None:
        expected, writes = self.model.expect_create(wallet, key)
        self.log.fail_next_appends, self.log.apply_then_fail = 1, lands
        _id, reply = self._run(self.engine.create_wallet(wallet, key))
        self.log.fail_next_appends, self.log.apply_then_fail = 0, False
        if not writes:
            assert reply.outcome is expected
            return
        assert reply.outcome is Outcome.UNAVAILABLE
        if lands:
            self.model.create(wallet, key)

    @precondition(lambda self: bool(self.model.keyed))
    @rule(data=st.data())
    def retry_keyed(self, data: st.DataObject) -> None:
        """A retry of a decided keyed operation (applied or refused) replays its original
        result exactly, also after its key left the bounded cache."""
        (wallet, key), earlier = data.draw(st.sampled_from(sorted(self.model.keyed.items())))
        expected = self.model.expect_apply(wallet, earlier.kind, earlier.amount, key)
        assert expected.replayed
        reply = self._run(self.engine.apply(wallet, earlier.kind, earlier.amount, key))
        assert isinstance(reply, Reply)
        _check_apply(reply, expected)

    @rule(transfer_id=transfer_ids, sender=wallets, receiver=wallets, amount=amounts)
    def transfer(self, transfer_id: UUID, sender: UUID, receiver: UUID, amount: int) -> None:
        """A transfer, new or a retry of its id: the saga's answer and rows as the model's."""
        if sender == receiver:
            return  # refused at the edge
        model = self.model
        _id, reply = self._run(self.engine.transfer(transfer_id, None, sender, receiver, amount,
                                                    None))  # fmt: skip
        if transfer_id in model.transfers:
            if model.transfers[transfer_id][:3] != [sender, receiver, amount]:
                assert reply.outcome is Outcome.IDEMPOTENCY_KEY_REUSED, reply
                return
            if model.transfers[transfer_id][3] is TransferStatus.PENDING:
                model.finish(transfer_id)  # a retry drives it to its end
            self._check_transfer(reply, transfer_id, replayed=True)
            return
        if sender not in model.balances:
            assert (reply.outcome, reply.side) == (Outcome.WALLET_NOT_FOUND, SIDE_FROM), reply
            return
        if amount > model.balances[sender]:
            assert (reply.outcome, reply.side) == (Outcome.INSUFFICIENT_FUNDS, SIDE_FROM), reply
            return
        model.debit(transfer_id, sender, receiver, amount)
        model.finish(transfer_id)
        self._check_transfer(reply, transfer_id, replayed=False)

    @precondition(lambda self: not self.model.pending())
    @rule(
        transfer_id=transfer_ids,
        sender=wallets,
        receiver=wallets,
        amount=amounts,
        lands=st.booleans(),
    )
    def transfer_with_failed_close(
        self, transfer_id: UUID, sender: UUID, receiver: UUID, amount: int, lands: bool
    ) -> None:
        """The commit of the credit (or refund) fails; with ``lands`` it was written first.
        Unlanded: 503 and the transfer stays PENDING, debited, visible (or, both legs in one
        commit, absent); landed: the answer read back from storage is the final one."""
        model = self.model
        if (
            sender == receiver
            or transfer_id in model.transfers
            or sender not in model.balances
            or amount > model.balances[sender]
        ):
            return  # covered by ``transfer``; here only the saga's second commit fails
        self.log.fail_next_closes, self.log.closes_land = 1, lands
        _id, reply = self._run(self.engine.transfer(transfer_id, None, sender, receiver, amount,
                                                    None))  # fmt: skip
        self.log.fail_next_closes, self.log.closes_land = 0, False
        if not lands:
            assert reply.outcome is Outcome.UNAVAILABLE, reply
            if not self._joint(sender, receiver, amount):
                model.debit(transfer_id, sender, receiver, amount)
            # else both legs travelled in the failed commit (JointTransfer): nothing moved
            return
        model.debit(transfer_id, sender, receiver, amount)
        model.finish(transfer_id)
        self._check_transfer(reply, transfer_id, replayed=False)

    @rule()
    def redrive(self) -> None:
        """A re-drive pass finishes every PENDING transfer (at most one here)."""
        ended = self._run(self.engine.redrive_transfers())
        pending = self.model.pending()
        assert ended == len(pending)
        for transfer_id in pending:
            self.model.finish(transfer_id)

    def _joint(self, sender: UUID, receiver: UUID, amount: int) -> bool:
        """Whether a new transfer's legs travel in one commit: both wallets' shards are
        served by one pipeline, and the receiver takes the credit (else the debit commits
        alone and the saga goes on)."""
        count, pipelines = self.engine.ownership.shard_count, LIMITS.pipelines
        balances = self.model.balances
        return (
            shard_of(sender, count) % pipelines == shard_of(receiver, count) % pipelines
            and receiver in balances
            and balances[receiver] + amount <= BALANCE_MINOR_MAX
        )

    def _check_transfer(self, reply: TransferReply, transfer_id: UUID, *, replayed: bool) -> None:
        outcome, side = self.model.transfer_reply(transfer_id)
        assert (reply.outcome, reply.side, reply.replayed) == (outcome, side, replayed), reply

    @rule()
    def restart(self) -> None:
        """A new engine on the same log rebuilds everything from storage, and its recovery
        finishes a transfer left PENDING without any request."""
        self._run(self.engine.stop())
        self.engine = self._start_engine()
        for transfer_id in self.model.pending():
            self._run(until(lambda: not self._stored_pending()))
            self.model.finish(transfer_id)

    def _stored_pending(self) -> list[UUID]:
        return [t.transfer_id for t in self.log.transfers.values()
                if t.status is TransferStatus.PENDING]  # fmt: skip

    # -- invariants ----------------------------------------------------------------------

    @invariant()
    def log_matches_model(self) -> None:
        _check_log(self.log, self.model)

    @invariant()
    def transfers_match_model_and_money_is_conserved(self) -> None:
        stored = {
            t.transfer_id: [t.from_wallet_id, t.to_wallet_id, t.amount, t.status, t.failure_code]
            for t in self.log.transfers.values()
        }
        assert stored == self.model.transfers
        in_flight = sum(t.amount for t in self.log.transfers.values()
                        if t.status is TransferStatus.PENDING)  # fmt: skip
        held = sum(w.balance for w in self.log.wallets.values())
        assert held + in_flight == self.model.external

    @invariant()
    def reads_match_model(self) -> None:
        for wallet in WALLETS:
            reply = self._run(self.engine.read(wallet))
            assert isinstance(reply, Reply)
            if wallet in self.model.balances:
                assert reply.wallet is not None
                assert reply.wallet.balance == self.model.balances[wallet]
            else:
                assert reply.outcome is Outcome.WALLET_NOT_FOUND


TestEngineModel = EngineMachine.TestCase
TestEngineModel.settings = settings.get_profile("engine-model")


# -- the pure ledger, driven directly ----------------------------------------------------

Op = tuple[UUID, OperationKind, int, "str | None"]
# At most batch_ops_max commands per batch, as the pipeline drains them.
ops = st.lists(st.tuples(wallets, kinds, amounts, keys), min_size=1, max_size=2)


class LedgerMachine(RuleBasedStateMachine):
    """The ledger state machine without the pipeline: this test plays the pipeline (load,
    write to the log, tell the ledger how it ended), so every interleaving it draws is
    exact, including two batches open at once with the first one failing."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()  # only to make reply futures; never run
        self.log = InMemoryLog()
        self.model = Model()
        self.now_us = 0
        self.ledger = self._new_ledger()

    def teardown(self) -> None:
        self.loop.close()

    def _clock_us(self) -> int:
        self.now_us += 1
        return self.now_us

    def _new_ledger(self) -> Ledger:
        # One shard's share of the bounds: the same cache overflow as the engine's test.
        return Ledger(
            EngineLimits(
                pipelines=1, batch_ops_max=2, inflight_batches_max=2, mailbox_commands_max=64,
                resident_wallets_max=2, idempotency_keys_max=6,
            ),
            self._clock_us,
        )  # fmt: skip

    def _commands(self, batch: list[Op]) -> list[Command]:
        return [ApplyOperation(*op, self.loop.create_future()) for op in batch]

    def _execute(self, commands: list[Command]) -> Applied:
        """Load what the ledger asks for from the log, as the pipeline does, then decide."""
        wallet_ids, op_keys, create_keys = self.ledger.missing(commands)
        log = self.log
        self.ledger.add_wallets(log.wallets[w] for w in wallet_ids if w in log.wallets)
        self.ledger.add_operations({k: log._by_key[k] for k in op_keys if k in log._by_key})
        assert not create_keys
        applied = self.ledger.execute(commands)
        self.ledger.evict_idle()
        return applied

    def _store(self, applied: Applied) -> bool:
        try:
            self.log._apply(applied.batch)
        except Exception:  # refused by fencing: nothing written
            return False
        return True

    def _check_batch(self, batch: list[Op], replies: list[Reply], earlier_failed: bool) -> None:
        """Stored replies are the model's, in order; a 503 only behind a failed batch, and
        then the command took no effect (it was decided on state that did not commit)."""
        for op, reply in zip(batch, replies, strict=True):
            if reply.outcome is Outcome.UNAVAILABLE:
                assert earlier_failed
                continue
            expected = self.model.expect_apply(*op)
            _check_apply(reply, expected)
            self.model.apply(*op, expected)

    @rule(wallet=wallets)
    def create(self, wallet: UUID) -> None:
        commands: list[Command] = [CreateWallet(wallet, None, "", self.loop.create_future())]
        expected, writes = self.model.expect_create(wallet, None)
        applied = self._execute(commands)
        assert self._store(applied)
        self.ledger.committed(applied)
        assert [r.outcome for r in self.ledger.answers(applied)] == [expected]
        if writes:
            self.model.create(wallet, None)

    @rule(batch=ops)
    def one_batch(self, batch: list[Op]) -> None:
        applied = self._execute(self._commands(batch))
        assert self._store(applied)
        self.ledger.committed(applied)
        self._check_batch(batch, self.ledger.answers(applied), earlier_failed=False)

    @rule(first=ops, second=ops, fate=st.sampled_from(["commits", "fails", "lands"]))
    def two_batches_open(self, first: list[Op], second: list[Op], fate: str) -> None:
        """Batch N+1 is decided on N's pending state; then N commits, fails, or lands with
        an unknown outcome; N+1 is written after it (fenced if it built on N)."""
        applied_n = self._execute(self._commands(first))
        applied_n1 = self._execute(self._commands(second))
        stored_n = fate != "fails" and self._store(applied_n)
        assert stored_n or fate == "fails"
        if fate == "commits":
            self.ledger.committed(applied_n)
            self._check_batch(first, self.ledger.answers(applied_n), earlier_failed=False)
        else:
            self.ledger.unknown(applied_n)
            if stored_n:  # landed: its effects are the model's, though nobody was told
                self._check_batch(first, self.ledger.answers(applied_n), earlier_failed=True)
        earlier_failed = fate != "commits"
        if self._store(applied_n1):
            self.ledger.committed(applied_n1)
            replies = self.ledger.answers(applied_n1, earlier_failed=earlier_failed)
            self._check_batch(second, replies, earlier_failed)
        else:
            assert earlier_failed  # only a failed predecessor makes storage refuse it
            self.ledger.unknown(applied_n1)
        if earlier_failed:  # the pipeline forgets everything both touched
            self.ledger.forget(applied_n)
            self.ledger.forget(applied_n1)

    @precondition(lambda self: bool(self.model.keyed))
    @rule(data=st.data())
    def retry_keyed(self, data: st.DataObject) -> None:
        (wallet, key), earlier = data.draw(st.sampled_from(sorted(self.model.keyed.items())))
        self.one_batch([(wallet, earlier.kind, earlier.amount, key)])

    @rule()
    def restart(self) -> None:
        self.ledger = self._new_ledger()

    @invariant()
    def log_matches_model(self) -> None:
        _check_log(self.log, self.model)

    @invariant()
    def reads_match_model(self) -> None:
        commands: list[Command] = [ReadWallet(w, self.loop.create_future()) for w in WALLETS]
        applied = self._execute(commands)
        assert applied.batch.is_empty()
        self.ledger.committed(applied)
        for wallet, reply in zip(WALLETS, self.ledger.answers(applied), strict=True):
            if wallet in self.model.balances:
                assert reply.wallet is not None
                assert reply.wallet.balance == self.model.balances[wallet]
            else:
                assert reply.outcome is Outcome.WALLET_NOT_FOUND


TestLedgerModel = LedgerMachine.TestCase
TestLedgerModel.settings = settings.get_profile("engine-model")
