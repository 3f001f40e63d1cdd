"""The engine on real PostgreSQL where the in-memory log cannot show it: a batch whose
backend is terminated mid-commit, with the batch behind it stored meanwhile."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from uuid import UUID

import asyncpg
import pytest

from tests.engine_doubles import WAIT_S, RecordingObserver
from walletd.engine.commands import Outcome
from walletd.engine.limits import EngineLimits
from walletd.engine.model import OperationKind
from walletd.engine.observer import REASON_COMMIT_UNKNOWN
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
