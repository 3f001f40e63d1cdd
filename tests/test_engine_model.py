"""The engine against a trivial sequential model, driven by Hypothesis.

Random creates, deposits, withdrawals, reads, keyed retries, concurrent bursts, commit
failures (plain and apply-then-fail), and restarts, across several wallets on several shards
with a tiny resident bound (so passivation runs all the time). After every step the log
must equal the model: balances, histories, never negative, balance == sum(log).
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

from tests.engine_doubles import WAIT_S, ControlledLog
from walletd.engine.commands import Outcome, Reply
from walletd.engine.limits import EngineLimits
from walletd.engine.model import OperationKind
from walletd.engine.router import Engine

settings.register_profile(
    "engine-model",
    max_examples=40,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

T = TypeVar("T")

WALLETS = [UUID(int=n) for n in range(1, 7)]
KEYS = ["k1", "k2", "k3"]
LIMITS = EngineLimits(
    pipelines=3, batch_ops_max=4, mailbox_commands_max=64, resident_wallets_max=3,
    idempotency_keys_max=36,
)  # fmt: skip

wallets = st.sampled_from(WALLETS)
kinds = st.sampled_from([OperationKind.DEPOSIT, OperationKind.WITHDRAW])
amounts = st.integers(min_value=1, max_value=50)
keys = st.none() | st.sampled_from(KEYS)


@dataclass
class _Op:
    kind: OperationKind
    amount: int
    balance_after: int
    key: str | None


@dataclass
class Model:
    """What a sequential, single-threaded ledger would hold."""

    balances: dict[UUID, int] = field(default_factory=dict)
    history: dict[UUID, list[_Op]] = field(default_factory=dict)
    keyed: dict[tuple[UUID, str], _Op] = field(default_factory=dict)
    create_keys: dict[str, UUID] = field(default_factory=dict)

    def expect_apply(
        self, wallet: UUID, kind: OperationKind, amount: int, key: str | None
    ) -> tuple[Outcome, int | None, bool]:
        """(outcome, balance in the reply, whether it writes) without changing the model."""
        if wallet not in self.balances:
            return Outcome.WALLET_NOT_FOUND, None, False
        if key is not None and (wallet, key) in self.keyed:
            earlier = self.keyed[(wallet, key)]
            if (earlier.kind, earlier.amount) != (kind, amount):
                return Outcome.IDEMPOTENCY_KEY_REUSED, None, False
            return Outcome.OK, earlier.balance_after, False
        balance = self.balances[wallet]
        if kind is OperationKind.WITHDRAW:
            if amount > balance:
                return Outcome.INSUFFICIENT_FUNDS, None, False
            return Outcome.OK, balance - amount, True
        return Outcome.OK, balance + amount, True

    def apply(self, wallet: UUID, kind: OperationKind, amount: int, key: str | None) -> None:
        outcome, balance, writes = self.expect_apply(wallet, kind, amount, key)
        assert outcome is Outcome.OK
        assert writes
        assert balance is not None
        op = _Op(kind, amount, balance, key)
        self.balances[wallet] = balance
        self.history[wallet].append(op)
        if key is not None:
            self.keyed[(wallet, key)] = op

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


def _check_apply(reply: Reply, expected: tuple[Outcome, int | None, bool]) -> None:
    outcome, balance, writes = expected
    assert reply.outcome is outcome, (reply, expected)
    if outcome is Outcome.OK:
        assert reply.wallet is not None
        assert reply.wallet.balance == balance
        assert reply.replayed is (not writes)


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
        if expected[2]:
            self.model.apply(wallet, kind, amount, key)

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
            if expected[2]:
                self.model.apply(*op)

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
        if not expected[2]:  # a refusal or a replay writes nothing, so nothing fails
            _check_apply(reply, expected)
            return
        assert reply.outcome is Outcome.UNAVAILABLE
        if lands:
            self.model.apply(wallet, kind, amount, key)

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
        """A retry of a stored keyed operation replays its original result exactly."""
        (wallet, key), op = data.draw(st.sampled_from(sorted(self.model.keyed.items())))
        reply = self._run(self.engine.apply(wallet, op.kind, op.amount, key))
        assert isinstance(reply, Reply)
        assert reply.outcome is Outcome.OK
        assert reply.replayed
        assert reply.wallet is not None
        assert reply.wallet.balance == op.balance_after

    @rule()
    def restart(self) -> None:
        """A new engine on the same log rebuilds everything from storage."""
        self._run(self.engine.stop())
        self.engine = self._start_engine()

    # -- invariants ----------------------------------------------------------------------

    @invariant()
    def log_matches_model(self) -> None:
        assert set(self.log.wallets) == set(self.model.balances)
        for wallet, balance in self.model.balances.items():
            stored = self.log.wallets[wallet]
            assert stored.balance == balance >= 0
            assert self.log.balance_from_log(wallet) == balance
            ops = self.log.operations.get(wallet, [])
            assert [(o.kind, o.amount, o.balance_after, o.idempotency_key) for o in ops] == [
                (o.kind, o.amount, o.balance_after, o.key) for o in self.model.history[wallet]
            ]
            assert [o.seq for o in ops] == list(range(1, len(ops) + 1))

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
