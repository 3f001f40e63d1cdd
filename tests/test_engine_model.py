"""The engine against a trivial sequential model, driven by Hypothesis.

Random creates, deposits, withdrawals, reads, keyed retries, concurrent bursts, commit
failures (plain and apply-then-fail), transfers (replayed, reused ids, refused and refunded,
with failed and ambiguous credit or refund commits, finished by a re-drive or by the
recovery of a restart), and restarts, across several wallets on several shards with a tiny
resident bound (so passivation runs all the time). After every step the log must equal the
model: balances, histories, transfers, never negative, balance == sum(log), and the sum of
balances plus PENDING transfers == deposits - withdrawals.
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
from walletd.engine.commands import Outcome, Reply, transfer_leg_key
from walletd.engine.limits import EngineLimits
from walletd.engine.model import OperationKind, TransferStatus
from walletd.engine.router import Engine
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
KEYS = ["k1", "k2", "k3"]
LIMITS = EngineLimits(
    shards=3, batch_ops_max=4, mailbox_commands_max=64, resident_wallets_max=3,
    idempotency_keys_max=36,
    # Re-drives run only when a rule asks (and once at each start), so the model knows when.
    transfer_redrive_interval_s=3600.0,
)  # fmt: skip
TRANSFER_IDS = [UUID(int=1000 + n) for n in range(4)]

wallets = st.sampled_from(WALLETS)
kinds = st.sampled_from([OperationKind.DEPOSIT, OperationKind.WITHDRAW])
amounts = st.integers(min_value=1, max_value=50)
keys = st.none() | st.sampled_from(KEYS)
transfer_ids = st.sampled_from(TRANSFER_IDS)
OUT, IN, REFUND = (
    OperationKind.TRANSFER_OUT,
    OperationKind.TRANSFER_IN,
    OperationKind.TRANSFER_REFUND,
)


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
    # transfer id -> [from, to, amount, status, failure code]
    transfers: dict[UUID, list[object]] = field(default_factory=dict)
    external: int = 0  # deposits - withdrawals

    def move(self, wallet: UUID, kind: OperationKind, amount: int, key: str | None) -> None:
        """Log one money movement (a client operation or a transfer leg)."""
        credit = kind in (OperationKind.DEPOSIT, IN, REFUND)
        balance = self.balances[wallet] + (amount if credit else -amount)
        assert balance >= 0
        op = _Op(kind, amount, balance, key)
        self.balances[wallet] = balance
        self.history[wallet].append(op)
        if key is not None:
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
        outcome, _balance, writes = self.expect_apply(wallet, kind, amount, key)
        assert outcome is Outcome.OK
        assert writes
        self.move(wallet, kind, amount, key)
        self.external += amount if kind is OperationKind.DEPOSIT else -amount

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
        Unlanded: 503 and the transfer stays PENDING, debited, visible; landed: the answer
        read back from storage is the final one."""
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
        model.debit(transfer_id, sender, receiver, amount)
        if not lands:
            assert reply.outcome is Outcome.UNAVAILABLE, reply
            return
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
