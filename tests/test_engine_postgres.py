"""The engine on real PostgreSQL where the in-memory log cannot show it: a batch whose
backend is terminated mid-commit, with the batch behind it stored meanwhile; a PENDING
transfer's reservation under the balance ceiling restored by a restart."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from uuid import UUID

import asyncpg
import pytest

from tests.engine_doubles import WAIT_S, RecordingObserver, wallet_ids_on_shard
from walletd.engine.commands import Outcome
from walletd.engine.limits import EngineLimits
from walletd.engine.model import Batch, OperationKind, TransferStatus
from walletd.engine.money import AMOUNT_MINOR_MAX, BALANCE_MINOR_MAX
from walletd.engine.observer import REASON_COMMIT_UNKNOWN
from walletd.engine.ports import StorageError
from walletd.engine.router import Engine
from walletd.persistence.database import PoolSettings, create_pool
from walletd.persistence.postgres_log import PostgresLog

DEPOSIT = OperationKind.DEPOSIT
PIPELINED = EngineLimits(pipelines=1, batch_ops_max=64, mailbox_commands_max=256)

# The append of a batch that waits for a row lock held by the test's own transaction.
_BLOCKED_APPEND = """
SELECT pid FROM pg_stat_activity
 WHERE wait_event_type = 'Lock' AND query LIKE 'SELECT walletd_append_batch%'
"""


@pytest.fixture
async def admin(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(database_url)
    try:
        yield connection
    finally:
        await connection.close()


async def test_a_batch_stored_while_the_one_before_is_terminated_gets_its_answer(
    database_url: str, admin: asyncpg.Connection
) -> None:
    """Batch N waits on a row lock and its backend is terminated (outcome unknown: 503);
    batch N+1 on another wallet was stored meanwhile and is answered OK, not 503."""
    pool = await create_pool(database_url, PoolSettings(size_max=4))
    observer = RecordingObserver()
    engine = Engine(PostgresLog(pool), PIPELINED, observer=observer)
    await engine.start()
    try:
        locked, free = UUID(int=1), UUID(int=2)
        for wallet in (locked, free):
            _id, created = await engine.create_wallet(wallet, None)
            assert created.outcome is Outcome.CREATED
        locker = await asyncpg.connect(database_url)
        try:
            transaction = locker.transaction()
            await transaction.start()
            await locker.execute("SELECT 1 FROM wallets WHERE id = $1 FOR UPDATE", locked)
            batch_n = asyncio.create_task(engine.apply(locked, DEPOSIT, 5, "n"))
            pids: list[int] = []

            async def blocked() -> bool:
                pids[:] = [row[0] for row in await admin.fetch(_BLOCKED_APPEND)]
                return bool(pids)

            await _poll(blocked)
            batch_n1 = asyncio.create_task(engine.apply(free, DEPOSIT, 7, "n1"))
            await _poll(
                lambda: _fetch_int(admin, "SELECT balance FROM wallets WHERE id = $1", free, 7)
            )
            assert not batch_n1.done()  # stored, but not answered before N
            assert await admin.fetchval("SELECT pg_terminate_backend($1)", pids[0])
            n_reply, n1_reply = await asyncio.wait_for(asyncio.gather(batch_n, batch_n1), WAIT_S)
        finally:
            await locker.close()
        assert n_reply.outcome is Outcome.UNAVAILABLE
        assert n1_reply.outcome is Outcome.OK
        assert n1_reply.wallet is not None
        assert n1_reply.wallet.balance == 7
        balances = dict(await admin.fetch("SELECT id, balance FROM wallets"))
        assert balances == {locked: 0, free: 7}
        # Memory agrees with the database, and the keyed retry of N applies it once.
        retried = await engine.apply(locked, DEPOSIT, 5, "n")
        assert retried.outcome is Outcome.OK
        assert not retried.replayed
        again = await engine.apply(free, DEPOSIT, 7, "n1")
        assert again.replayed
        assert again.wallet is not None
        assert again.wallet.balance == 7
        assert [r for _s, _c, r in observer.failed] == [REASON_COMMIT_UNKNOWN]
    finally:
        await engine.stop()
        await pool.close()


class _ClosesFail(PostgresLog):
    """PostgreSQL whose commits that close a transfer fail while ``closes_fail`` is set
    (nothing written): a transfer whose refund is due stays PENDING."""

    closes_fail = True

    async def append_batch(self, batch: Batch) -> None:
        if self.closes_fail and batch.transfer_updates:
            raise StorageError("injected failure of a transfer-closing commit")
        await super().append_batch(batch)


async def test_a_pending_transfers_room_under_the_ceiling_survives_a_restart(
    database_url: str, admin: asyncpg.Connection
) -> None:
    """A transfer left PENDING (its refund's commit failed) keeps the room its refund needs
    under the sender's balance ceiling after a restart: the wallets are loaded with their
    outgoing PENDING transfers, so a deposit cannot take that room, and the refund, when
    its commit goes through, ends the transfer FAILED with the money back."""
    limits = EngineLimits(pipelines=2, batch_ops_max=64, mailbox_commands_max=256)
    sender, nowhere = wallet_ids_on_shard(0, 2, 1)[0], wallet_ids_on_shard(1, 2, 1)[0]
    pool = await create_pool(database_url, PoolSettings(size_max=4))
    try:
        engine = Engine(_ClosesFail(pool), limits)
        await engine.start()
        try:
            _id, created = await engine.create_wallet(sender, None)
            assert created.outcome is Outcome.CREATED
            assert (await engine.apply(sender, DEPOSIT, 10, None)).outcome is Outcome.OK
            transfer_id, reply = await engine.transfer(None, None, sender, nowhere, 10, None)
            assert reply.outcome is Outcome.UNAVAILABLE
        finally:
            await engine.stop()
        # Both ways a restarted process loads wallets read the reservation back.
        stored = PostgresLog(pool)
        assert (await stored.load_wallets([sender]))[sender].pending_out == ((transfer_id, 10),)
        assert [w.pending_out for w in await stored.recent_wallets(10)] == [((transfer_id, 10),)]
        log = _ClosesFail(pool)
        engine = Engine(log, limits)  # the restart: nothing in memory
        await engine.start()
        try:
            outcomes = [
                await _deposited(engine, sender, AMOUNT_MINOR_MAX, f"fill-{n}")
                for n in range(BALANCE_MINOR_MAX // AMOUNT_MINOR_MAX)
            ]
            log.closes_fail = False
            assert await engine.redrive_transfers() == 1
        finally:
            await engine.stop()
        assert outcomes[-1] is Outcome.BALANCE_LIMIT_EXCEEDED
        assert set(outcomes[:-1]) == {Outcome.OK}
        status = await admin.fetchval("SELECT status FROM transfers WHERE id = $1", transfer_id)
        assert TransferStatus(status) is TransferStatus.FAILED
        balance = await admin.fetchval("SELECT balance FROM wallets WHERE id = $1", sender)
        assert balance == BALANCE_MINOR_MAX - AMOUNT_MINOR_MAX + 10
    finally:
        await pool.close()


async def _deposited(engine: Engine, wallet_id: UUID, amount: int, key: str) -> Outcome:
    """A keyed deposit's outcome, retried with its key past a 503 (one decided on the state
    of the re-drive's refund, whose commit fails)."""
    for _ in range(10):
        reply = await engine.apply(wallet_id, DEPOSIT, amount, key)
        if reply.outcome is not Outcome.UNAVAILABLE:
            return reply.outcome
    raise AssertionError("a deposit kept answering 503")


async def _fetch_int(connection: asyncpg.Connection, query: str, arg: object, want: int) -> bool:
    return bool(await connection.fetchval(query, arg) == want)


async def _poll(check: Callable[[], Awaitable[bool]]) -> None:
    """Poll an async condition until it holds, bounded by WAIT_S."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while True:
        if await check():
            return
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)
