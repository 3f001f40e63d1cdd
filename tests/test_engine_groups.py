"""Bulk groups (ApplyOperations) against the same operations sent one by one (Hypothesis).

Independent groups must answer and write exactly what the operations sent one at a time
would; an atomic group must do that when none of them is refused, and otherwise refuse at
the first operation the one-by-one run refuses and change nothing. Both engines run on the
in-memory log, with small bounds so that groups split into several batches.
"""

from __future__ import annotations

import asyncio
from typing import NamedTuple
from uuid import UUID

from hypothesis import given, settings
from hypothesis import strategies as st

from walletd.engine.commands import Outcome, Reply
from walletd.engine.limits import EngineLimits
from walletd.engine.memory_log import InMemoryLog
from walletd.engine.model import NO_METADATA, Metadata, OperationKind
from walletd.engine.money import BALANCE_MINOR_MAX
from walletd.engine.router import Engine

WALLETS = [UUID(int=n) for n in range(1, 5)]
MISSING = UUID(int=99)
LIMITS = EngineLimits(pipelines=1, batch_ops_max=6, mailbox_commands_max=64)


class Op(NamedTuple):
    wallet_id: UUID
    kind: OperationKind
    amount: int
    idempotency_key: str | None
    reference: str | None = None
    metadata: Metadata = NO_METADATA
    scale: None = None  # in minor units already


operations = st.lists(
    st.builds(
        Op,
        st.sampled_from([*WALLETS, MISSING]),
        st.sampled_from([OperationKind.DEPOSIT, OperationKind.WITHDRAW]),
        st.one_of(st.integers(1, 60), st.just(BALANCE_MINOR_MAX)),
        st.one_of(st.none(), st.sampled_from(["a", "b", "c"])),
        st.none(),
        # A key used twice in a group with other metadata is a reuse (the trial run too).
        st.sampled_from([NO_METADATA, (("m", "1"),), (("m", "2"),)]),
    ),
    min_size=1,
    max_size=LIMITS.batch_ops_max,
)
seed_balances = st.lists(st.integers(0, 100), min_size=len(WALLETS), max_size=len(WALLETS))


async def _engine(balances: list[int]) -> Engine:
    engine = Engine(InMemoryLog(), LIMITS)
    await engine.start()
    for wallet_id, balance in zip(WALLETS, balances, strict=True):
        await engine.create_wallet(wallet_id, None)
        if balance:
            await engine.apply(wallet_id, OperationKind.DEPOSIT, balance, None)
    return engine


async def _state(engine: Engine) -> list[int | None]:
    replies = [await engine.read(wallet_id) for wallet_id in WALLETS]
    return [reply.wallet.balance if reply.wallet else None for reply in replies]


def _same(one: Reply, other: Reply) -> bool:
    """Equal as a client sees them (timestamps aside)."""
    balance = (one.wallet.balance if one.wallet else None, one.wallet and one.wallet.seq)
    balance_other = (
        other.wallet.balance if other.wallet else None,
        other.wallet and other.wallet.seq,
    )
    return (one.outcome, one.replayed, one.balance_seen, balance) == (
        other.outcome,
        other.replayed,
        other.balance_seen,
        balance_other,
    )


async def _compare(balances: list[int], ops: list[Op], atomic: bool) -> None:
    one_by_one, grouped = await _engine(balances), await _engine(balances)
    try:
        before = await _state(grouped)
        expected = [
            await one_by_one.apply(
                op.wallet_id, op.kind, op.amount, op.idempotency_key, op.reference,
                metadata=op.metadata,
            )
            for op in ops
        ]  # fmt: skip
        replies, refused_at = await grouped.apply_operations(ops, atomic=atomic)
        ok = (Outcome.OK,)
        first_refused = next((i for i, r in enumerate(expected) if r.outcome not in ok), None)
        if atomic and first_refused is not None:
            assert refused_at == first_refused
            assert _same(replies[-1], expected[first_refused])
            assert await _state(grouped) == before
            return
        assert refused_at is None
        assert len(replies) == len(expected)
        for reply, want in zip(replies, expected, strict=True):
            assert _same(reply, want), (reply, want)
        assert await _state(grouped) == await _state(one_by_one)
    finally:
        await one_by_one.stop()
        await grouped.stop()


@settings(max_examples=150, deadline=None)
@given(seed_balances, operations)
def test_an_independent_group_is_the_operations_one_by_one(
    balances: list[int], ops: list[Op]
) -> None:
    """Replies and balances of a group equal those of its operations sent one at a time."""
    asyncio.run(_compare(balances, ops, atomic=False))


@settings(max_examples=150, deadline=None)
@given(seed_balances, operations)
def test_an_atomic_group_applies_whole_or_not_at_all(balances: list[int], ops: list[Op]) -> None:
    """An atomic group equals the one-by-one run when nothing is refused; else it refuses at
    the first refused operation and changes nothing."""
    asyncio.run(_compare(balances, ops, atomic=True))
