"""Shard leases, epochs and the fence on a real PostgreSQL, with engines in this process.

Each "process" here is an Engine + a LeaseKeeper of its own on its own connections, as
`walletd serve` wires them; a TCP relay between one of them and PostgreSQL stands for its
network, so a cut is a real one (connections dropped, new ones refused).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit
from uuid import UUID, uuid4

import asyncpg
import pytest

from walletd.engine.commands import Outcome
from walletd.engine.errors import NotOwner
from walletd.engine.limits import EngineLimits
from walletd.engine.model import OperationKind
from walletd.engine.ownership import Ownership, shard_of
from walletd.engine.router import Engine
from walletd.persistence.database import PoolSettings, create_pool
from walletd.persistence.leases import (
    _CLAIM,
    LeaseKeeper,
    LeaseSettings,
    ShardCountMismatch,
    ensure_cluster,
)
from walletd.persistence.postgres_log import PostgresLog

SHARDS = 8
LEASE_TTL_S = 1.0
WAIT_S = 20.0


async def until(condition: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"not reached in {timeout_s} s: {what}")
        await asyncio.sleep(0.01)


class Relay:
    """A TCP relay to PostgreSQL that the test can cut (drop every connection, refuse new
    ones) and mend."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.cut_off = False
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.cut_off:
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.close()
            return
        self._writers.update((writer, up_writer))

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            sink.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        self._writers.difference_update((writer, up_writer))

    def cut(self) -> None:
        self.cut_off = True
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    def mend(self) -> None:
        self.cut_off = False

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


def through(dsn: str, relay: Relay) -> str:
    parts = urlsplit(dsn)
    netloc = parts.netloc.rsplit("@", 1)
    userinfo = netloc[0] + "@" if len(netloc) == 2 else ""
    return urlunsplit(parts._replace(netloc=f"{userinfo}127.0.0.1:{relay.port}"))


@dataclass
class Node:
    """One would-be walletd process: engine, leases, ownership."""

    name: str
    engine: Engine
    keeper: LeaseKeeper

    @property
    def ownership(self) -> Ownership:
        return self.engine.ownership


@contextlib.asynccontextmanager
async def node(dsn: str, name: str, *, start_keeper: bool = True) -> AsyncIterator[Node]:
    connection = await asyncpg.connect(dsn)
    try:
        await ensure_cluster(connection, SHARDS)
    finally:
        await connection.close()
    pool = await create_pool(
        dsn, PoolSettings(size_max=4, acquire_timeout_s=0.5, connect_timeout_s=0.5)
    )
    ownership = Ownership(SHARDS)
    engine = Engine(
        PostgresLog(pool, acquire_timeout_s=0.5),
        EngineLimits(pipelines=1, commit_timeout_s=1.0, load_timeout_s=1.0),
        ownership=ownership,
    )
    keeper = LeaseKeeper(
        dsn,
        ownership,
        LeaseSettings(name, f"http://{name}.invalid", LEASE_TTL_S, moves_max=2),
        forget=engine.forget_shards,
        drain=engine.drain_shards,
    )
    await engine.start()
    try:
        if start_keeper:
            await keeper.start()
            await keeper.ready(WAIT_S)
        yield Node(name, engine, keeper)
    finally:
        await engine.stop()
        await keeper.stop()
        pool.terminate()


def wallet_in(shard: int) -> UUID:
    while True:
        candidate = uuid4()
        if shard_of(candidate, SHARDS) == shard:
            return candidate


async def lease_rows(dsn: str) -> list[asyncpg.Record]:
    connection = await asyncpg.connect(dsn)
    try:
        rows: list[asyncpg.Record] = await connection.fetch(
            "SELECT shard, owner, epoch, expires_at > now() AS live"
            " FROM walletd_shard_leases ORDER BY shard"
        )
        return rows
    finally:
        await connection.close()


async def test_the_shard_count_is_stored_once_and_another_is_refused(database_url: str) -> None:
    """The first server stores the shard count and a lease row per shard; another count is
    refused with a message naming both counts."""
    connection = await asyncpg.connect(database_url)
    try:
        assert await ensure_cluster(connection, 16) == 16
        assert await ensure_cluster(connection, 16) == 16
        assert await connection.fetchval("SELECT count(*) FROM walletd_shard_leases") == 16
        with pytest.raises(ShardCountMismatch, match=r"has 16 shards.*started with 64"):
            await ensure_cluster(connection, 64)
    finally:
        await connection.close()


async def test_a_stale_epoch_is_refused_by_the_database_and_nothing_is_written(
    database_url: str,
) -> None:
    """A zombie whose own clock still says it holds shard 3 (epoch 1) while the database has
    epoch 2 commits nothing: its creation is answered 503, no row is written, and it gives
    the shard up. With the current epoch the same write commits."""
    async with node(database_url, "zombie", start_keeper=False) as zombie:
        connection = await asyncpg.connect(database_url)
        try:
            await connection.execute(
                "UPDATE walletd_shard_leases SET owner = 'successor', epoch = 2,"
                " expires_at = now() + interval '1 minute' WHERE shard = 3"
            )
            zombie.ownership.gained(3, epoch=1, deadline=math.inf)
            zombie.ownership.memory_ready([3])
            wallet = wallet_in(3)
            _, reply = await zombie.engine.create_wallet(wallet, None)
            assert reply.outcome is Outcome.UNAVAILABLE
            assert await connection.fetchval("SELECT count(*) FROM wallets") == 0
            assert not zombie.ownership.serving(3)
            assert zombie.ownership.held() == {}

            zombie.ownership.gained(3, epoch=2, deadline=math.inf)
            zombie.ownership.memory_ready([3])
            _, reply = await zombie.engine.create_wallet(wallet, None)
            assert reply.outcome is Outcome.CREATED
            assert await connection.fetchval("SELECT count(*) FROM wallets") == 1
        finally:
            await connection.close()


async def _claimed_during_append(connection: asyncpg.Connection, dsn: str, fence: str) -> bool:
    """Whether a successor's claim (the keeper's own statement) takes shard 3 while an append
    of the old epoch, fenced by ``fence``, is in flight (its transaction open). Afterwards,
    with the append committed, the claim takes it (epoch 2): asserted here."""
    await connection.execute(
        "UPDATE walletd_shard_leases SET owner = 'other', epoch = 1,"
        " expires_at = now() + interval '1 hour'"
    )
    await connection.execute(
        "UPDATE walletd_shard_leases SET owner = 'old', expires_at = now() - interval '1 second'"
        " WHERE shard = 3"
    )
    appending = await asyncpg.connect(dsn)
    try:
        async with appending.transaction():
            assert await appending.fetchval(f"SELECT {fence}(ARRAY[3], ARRAY[1]::bigint[])") == 1
            during = await connection.fetch(_CLAIM, "successor", "http://s", 60.0, SHARDS)
    finally:
        await appending.close()
    after = await connection.fetch(_CLAIM, "successor", "http://s", 60.0, SHARDS)
    assert [tuple(row) for row in during + after] == [(3, 2)]
    return bool(during)


async def test_a_claim_waits_for_an_append_in_flight(database_url: str) -> None:
    """Issue 20 item 11: the fence's row lock (FOR KEY SHARE) makes a successor's claim pass
    over a shard while an append of the old epoch is in flight (its transaction open at the
    lock) and take it once the append committed, so no append of the old epoch lands after
    the bump. The same check on a scratch copy of the fence without FOR KEY SHARE sees the
    claim bump the epoch under the open append: what this test catches."""
    connection = await asyncpg.connect(database_url)
    try:
        await ensure_cluster(connection, SHARDS)
        assert not await _claimed_during_append(connection, database_url, "walletd_fence")
        definition: str = await connection.fetchval(
            "SELECT pg_get_functiondef('walletd_fence(integer[], bigint[])'::regprocedure)"
        )
        assert definition.count("FOR KEY SHARE") == 1
        await connection.execute(
            definition.replace("FOR KEY SHARE", "").replace(
                "walletd_fence(", "walletd_fence_unlocked(", 1
            )
        )
        assert await _claimed_during_append(connection, database_url, "walletd_fence_unlocked")
    finally:
        await connection.close()


async def test_two_processes_share_the_shards_fairly_and_never_serve_one_at_once(
    database_url: str,
) -> None:
    """A second process joins: the first releases shards (a few per step) and the second
    claims them until each holds half; at no observed instant do both serve one shard."""
    async with node(database_url, "first") as first:
        assert first.ownership.served() == list(range(SHARDS))
        async with node(database_url, "second") as second:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + WAIT_S
            while True:
                served_first = set(first.ownership.served())
                served_second = set(second.ownership.served())
                assert not served_first & served_second
                if len(served_first) == len(served_second) == SHARDS // 2:
                    break
                assert loop.time() < deadline, (served_first, served_second)
                await asyncio.sleep(0.005)
            rows = await lease_rows(database_url)
            owners = {row["shard"]: row["owner"] for row in rows}
            assert {s for s, o in owners.items() if o == "first"} == served_first
            assert {s for s, o in owners.items() if o == "second"} == served_second
        # The second one released its shards on the way out; the first takes them back.
        await until(lambda: len(first.ownership.served()) == SHARDS, "first serves all again")


async def test_a_lost_lease_stops_every_answer_from_memory_and_the_successor_serves_the_truth(
    database_url: str,
) -> None:
    """Issue 10 item 4: the first process's connections to PostgreSQL are cut (its lease
    session dies with them). Within its local deadline it stops answering from memory, the
    resident read path included; a second process takes the shards and moves money; when the
    network comes back the first one never shows the old balance."""
    host_port = urlsplit(database_url).netloc.rsplit("@", 1)[-1]
    host, _, port = host_port.rpartition(":")
    relay = Relay(host, int(port))
    await relay.start()
    try:
        async with node(through(database_url, relay), "first") as first:
            wallet = wallet_in(5)
            _, created = await first.engine.create_wallet(wallet, None)
            assert created.outcome is Outcome.CREATED
            deposited = await first.engine.apply(wallet, OperationKind.DEPOSIT, 1000, "k1")
            assert deposited.outcome is Outcome.OK
            view = first.engine.read_resident(wallet)
            assert view is not None
            assert view.balance == 1000

            relay.cut()
            cut_at = asyncio.get_running_loop().time()

            def first_refuses() -> bool:
                try:
                    first.engine.read_resident(wallet)
                except NotOwner:
                    return True
                return False

            await until(first_refuses, "the first process stops serving the resident wallet")
            # It stops on its own clock, before the lease can expire in the database.
            assert asyncio.get_running_loop().time() - cut_at < LEASE_TTL_S

            async with node(database_url, "second") as second:
                await until(lambda: second.ownership.serving(5), "the second serves shard 5")
                moved = await second.engine.apply(wallet, OperationKind.DEPOSIT, 500, "k2")
                assert moved.outcome is Outcome.OK
                assert moved.wallet is not None
                assert moved.wallet.balance == 1500

                relay.mend()
                # The first one comes back: it learns it lost the leases, later claims its
                # share with new epochs and re-reads. Whatever it answers is never 1000.
                balances_seen: list[int] = []

                def first_serves_shard_5() -> bool:
                    """Sample what the first answers from memory for the wallet, if anything."""
                    try:
                        view = first.engine.read_resident(wallet)
                    except NotOwner:
                        return False
                    if view is not None:
                        balances_seen.append(view.balance)
                    return True

                await until(
                    lambda: first_serves_shard_5() or len(first.ownership.served()) > 0,
                    "first claims its share",
                )
                rows = await lease_rows(database_url)
                assert all(row["epoch"] >= 2 for row in rows if row["owner"] == "first")
            # The second leaves and releases its shards: the first claims shard 5 again (in
            # three runs it never did while the second was there; the check was then empty)
            # and, from the first moment it serves it, answers the successor's 1500.
            await until(first_serves_shard_5, "the first serves shard 5 again")
            reply = await first.engine.read(wallet)
            assert reply.wallet is not None
            balances_seen.append(reply.wallet.balance)
            first_serves_shard_5()
            assert balances_seen
            assert all(balance == 1500 for balance in balances_seen), balances_seen
    finally:
        await relay.close()
