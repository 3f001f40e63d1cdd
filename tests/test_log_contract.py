"""The WalletLog contract, checked the same way on InMemoryLog and PostgresLog."""

from __future__ import annotations

from collections.abc import AsyncIterator
from uuid import UUID

import pytest

from tests.conftest import PostgresServer
from walletd.cli.service import migrate_database
from walletd.engine.commands import reversal_key
from walletd.engine.memory_log import InMemoryLog
from walletd.engine.model import (
    Batch,
    NewWallet,
    OperationKind,
    OperationRecord,
    RefusalReason,
    RefusalRecord,
    SnapshotUpdate,
)
from walletd.engine.ports import PredecessorPending, StorageError, StorageRefused, WalletLog
from walletd.persistence.database import PoolSettings, create_pool
from walletd.persistence.postgres_log import PostgresLog

A, B = UUID(int=0xA), UUID(int=0xB)
T0 = 1_700_000_000_000_000  # microseconds; PostgreSQL keeps them exactly


@pytest.fixture(params=["memory", "postgres"])
async def wallet_log(request: pytest.FixtureRequest) -> AsyncIterator[WalletLog]:
    if request.param == "memory":
        yield InMemoryLog()
        return
    # A sync fixture may be fetched from here; the async database_url one may not.
    server: PostgresServer = request.getfixturevalue("pg_server")
    dsn = await server.create_database()
    try:
        await migrate_database(dsn)
        pool = await create_pool(dsn, PoolSettings(size_max=2))
        try:
            yield PostgresLog(pool)
        finally:
            await pool.close()
    finally:
        await server.drop_database(dsn)


def deposit(wallet: UUID, seq: int, amount: int, after: int, key: str | None = None) -> Batch:
    """One deposit moving the snapshot from seq-1 to seq."""
    op = OperationRecord(wallet, seq, OperationKind.DEPOSIT, amount, after, key, T0 + seq)
    return Batch(operations=[op], snapshots=[SnapshotUpdate(wallet, seq - 1, seq, after, T0 + seq)])


def create(*wallets: UUID, key: str | None = None) -> Batch:
    return Batch(new_wallets=[NewWallet(w, T0, key, str(w)) for w in wallets])


async def test_a_batch_is_visible_after_append(wallet_log: WalletLog) -> None:
    """After append_batch returns, loads see the wallets, snapshots and operations."""
    await wallet_log.append_batch(create(A, B))
    await wallet_log.append_batch(deposit(A, 1, 500, 500, key="k"))
    loaded = await wallet_log.load_wallets([A, B, UUID(int=0xC)])
    assert set(loaded) == {A, B}
    assert (loaded[A].balance, loaded[A].seq, loaded[A].updated_at_us) == (500, 1, T0 + 1)
    assert (loaded[B].balance, loaded[B].seq, loaded[B].created_at_us) == (0, 0, T0)


async def test_stale_prev_seq_is_refused_and_writes_nothing(wallet_log: WalletLog) -> None:
    """A snapshot update from a seq that is no longer stored fails the whole batch."""
    await wallet_log.append_batch(create(A, B))
    await wallet_log.append_batch(deposit(A, 1, 10, 10))
    stale = deposit(A, 1, 99, 99)  # built against seq 0 again: a second writer
    stale.new_wallets.append(NewWallet(UUID(int=0xC), T0, None, ""))
    stale.operations += deposit(B, 1, 5, 5).operations
    stale.snapshots += deposit(B, 1, 5, 5).snapshots
    with pytest.raises(StorageError):
        await wallet_log.append_batch(stale)
    loaded = await wallet_log.load_wallets([A, B, UUID(int=0xC)])
    assert set(loaded) == {A, B}
    assert (loaded[A].balance, loaded[A].seq) == (10, 1)
    assert (loaded[B].balance, loaded[B].seq) == (0, 0)
    assert [op.amount for _id, op in await wallet_log.read_history(A, None, 10)] == [10]
    assert await wallet_log.read_history(B, None, 10) == []


async def test_a_stored_seq_behind_the_batch_is_refused_as_predecessor_pending(
    wallet_log: WalletLog,
) -> None:
    """A batch built on an earlier batch that is not stored yet is refused, distinctly
    (the engine retries it after its predecessor), and writes nothing."""
    await wallet_log.append_batch(create(A))
    ahead = deposit(A, 1, 7, 12)
    ahead.snapshots[0] = ahead.snapshots[0]._replace(prev_seq=1, seq=2)
    ahead.operations[0] = ahead.operations[0]._replace(seq=2)
    with pytest.raises(PredecessorPending):
        await wallet_log.append_batch(ahead)
    assert (await wallet_log.load_wallets([A]))[A].seq == 0
    assert await wallet_log.read_history(A, None, 10) == []


async def test_a_log_row_for_a_wallet_the_batch_does_not_move_is_refused(
    wallet_log: WalletLog,
) -> None:
    """Every log row must belong to a wallet whose snapshot the batch moves (this stands
    in for a foreign key): otherwise the batch fails and writes nothing."""
    await wallet_log.append_batch(create(A, B))
    orphan = deposit(A, 1, 10, 10)
    orphan.operations += deposit(B, 1, 5, 5).operations  # no snapshot move for B
    with pytest.raises(StorageError):
        await wallet_log.append_batch(orphan)
    loaded = await wallet_log.load_wallets([A, B])
    assert (loaded[A].seq, loaded[B].seq) == (0, 0)
    assert await wallet_log.read_history(B, None, 10) == []


async def test_a_batch_is_atomic_across_wallets(wallet_log: WalletLog) -> None:
    """A batch that creates an existing wallet writes none of its other rows."""
    await wallet_log.append_batch(create(A))
    batch = create(B)
    batch.new_wallets.append(NewWallet(A, T0, None, ""))
    with pytest.raises(StorageError):
        await wallet_log.append_batch(batch)
    assert set(await wallet_log.load_wallets([A, B])) == {A}


async def test_operation_keys_are_found_and_unique_per_wallet(wallet_log: WalletLog) -> None:
    """find_operations returns the logged op per (wallet, key); a reused key is refused."""
    await wallet_log.append_batch(create(A, B))
    await wallet_log.append_batch(deposit(A, 1, 7, 7, key="pay"))
    await wallet_log.append_batch(deposit(B, 1, 8, 8, key="pay"))  # same key, other wallet
    found = await wallet_log.find_operations([(A, "pay"), (B, "pay"), (A, "other")])
    assert set(found) == {(A, "pay"), (B, "pay")}
    on_a, on_b = found[(A, "pay")], found[(B, "pay")]
    assert isinstance(on_a, OperationRecord)
    assert isinstance(on_b, OperationRecord)
    assert (on_a.amount, on_a.seq) == (7, 1)
    assert on_b.balance_after == 8
    with pytest.raises(StorageError):
        await wallet_log.append_batch(deposit(A, 2, 1, 8, key="pay"))
    assert (await wallet_log.load_wallets([A]))[A].seq == 1


def refusal(wallet: UUID, key: str, fence_seq: int, amount: int = 900) -> RefusalRecord:
    return RefusalRecord(
        wallet, key, OperationKind.WITHDRAW, amount, RefusalReason.INSUFFICIENT_FUNDS, 7,
        fence_seq, T0 + 99,
    )  # fmt: skip


async def test_a_refusal_is_recorded_and_found_by_its_key(wallet_log: WalletLog) -> None:
    """A refusal in a batch is stored with the batch and found by find_operations, field
    for field; the same key on another wallet is a different key."""
    await wallet_log.append_batch(create(A, B))
    batch = deposit(A, 1, 7, 7)
    # Decided after the batch's own deposit: it rests on the seq before the batch.
    batch.refusals.append(refusal(A, "no", fence_seq=0))
    await wallet_log.append_batch(batch)
    found = await wallet_log.find_operations([(A, "no"), (B, "no")])
    assert found == {(A, "no"): refusal(A, "no", fence_seq=0)}
    with pytest.raises(StorageError):  # a key is used once per wallet
        await wallet_log.append_batch(Batch(refusals=[refusal(A, "no", fence_seq=1)]))


async def test_a_refusal_on_state_not_stored_is_refused_and_writes_nothing(
    wallet_log: WalletLog,
) -> None:
    """A refusal whose fence_seq is ahead of the stored seq (it rests on an earlier batch
    that has not landed) is refused as PredecessorPending, and nothing of its batch is
    written; behind the stored seq (later batches moved the wallet on) it is fine."""
    await wallet_log.append_batch(create(A, B))
    batch = deposit(B, 1, 5, 5)
    batch.refusals.append(refusal(A, "early", fence_seq=1))
    with pytest.raises(PredecessorPending):
        await wallet_log.append_batch(batch)
    assert (await wallet_log.load_wallets([B]))[B].seq == 0
    assert await wallet_log.find_operations([(A, "early")]) == {}
    with pytest.raises(PredecessorPending):  # a wallet not there at all
        await wallet_log.append_batch(Batch(refusals=[refusal(UUID(int=0xC), "x", 0)]))
    await wallet_log.append_batch(deposit(A, 1, 5, 5))
    await wallet_log.append_batch(deposit(A, 2, 5, 10))
    await wallet_log.append_batch(Batch(refusals=[refusal(A, "early", fence_seq=1)]))
    assert set(await wallet_log.find_operations([(A, "early")])) == {(A, "early")}
    # On a wallet the same batch creates, the refusal needs nothing stored before it.
    created = create(UUID(int=0xD))
    created.refusals.append(refusal(UUID(int=0xD), "new", fence_seq=0))
    await wallet_log.append_batch(created)


async def test_a_key_is_used_by_an_operation_or_a_refusal_not_both(
    wallet_log: WalletLog,
) -> None:
    """A refusal cannot take the key of a logged operation, nor an operation that of a
    recorded refusal: either batch is refused whole."""
    await wallet_log.append_batch(create(A))
    await wallet_log.append_batch(deposit(A, 1, 7, 7, key="pay"))
    with pytest.raises(StorageError):
        await wallet_log.append_batch(Batch(refusals=[refusal(A, "pay", fence_seq=1)]))
    await wallet_log.append_batch(Batch(refusals=[refusal(A, "no", fence_seq=1)]))
    with pytest.raises(StorageError):
        await wallet_log.append_batch(deposit(A, 2, 1, 8, key="no"))
    assert (await wallet_log.load_wallets([A]))[A].seq == 1


async def test_creation_keys_are_found_and_unique(wallet_log: WalletLog) -> None:
    """find_wallets_by_create_key maps each stored creation key to its wallet."""
    await wallet_log.append_batch(create(A, key="make-a"))
    found = await wallet_log.find_wallets_by_create_key(["make-a", "missing"])
    assert list(found) == ["make-a"]
    assert found["make-a"].wallet_id == A
    assert found["make-a"].create_fingerprint == str(A)
    with pytest.raises(StorageError):
        await wallet_log.append_batch(create(B, key="make-a"))
    assert await wallet_log.load_wallets([B]) == {}


async def test_history_is_newest_first_and_pages_by_seq(wallet_log: WalletLog) -> None:
    """read_history returns ops newest first, limited, before a seq, with rising ids."""
    await wallet_log.append_batch(create(A))
    balance = 0
    for seq in range(1, 8):
        balance += seq
        await wallet_log.append_batch(deposit(A, seq, seq, balance))
    first = await wallet_log.read_history(A, None, 3)
    assert [op.seq for _id, op in first] == [7, 6, 5]
    rest = await wallet_log.read_history(A, 5, 10)
    assert [op.seq for _id, op in rest] == [4, 3, 2, 1]
    ids = [op_id for op_id, _op in first + rest]
    assert ids == sorted(ids, reverse=True)
    assert rest[-1][1] == OperationRecord(A, 1, OperationKind.DEPOSIT, 1, 1, None, T0 + 1)


async def test_ping_answers_while_storage_does_and_raises_once_it_does_not(
    wallet_log: WalletLog,
) -> None:
    """ping returns while storage answers, and raises StorageError once it cannot answer
    (readiness rests on it: a ping that never fails would keep /readyz at 200)."""
    await wallet_log.ping()  # answers: no exception
    if isinstance(wallet_log, InMemoryLog):
        wallet_log.fail_loads = True
    else:
        assert isinstance(wallet_log, PostgresLog)
        await wallet_log._pool.close()  # every connection gone, none can be made
    with pytest.raises(StorageError):
        await wallet_log.ping()


async def test_recent_wallets_are_the_most_recently_updated_first(wallet_log: WalletLog) -> None:
    """recent_wallets(n) returns at most n wallets, newest updated_at first (warm-up)."""
    c = UUID(int=0xC)
    await wallet_log.append_batch(create(A, B, c))
    await wallet_log.append_batch(deposit(B, 1, 5, 5))  # updated at T0 + 1
    await wallet_log.append_batch(deposit(A, 1, 7, 7))
    a_later = deposit(A, 2, 1, 8)
    a_later.operations[0] = a_later.operations[0]._replace(created_at_us=T0 + 9)
    a_later.snapshots[0] = a_later.snapshots[0]._replace(updated_at_us=T0 + 9)
    await wallet_log.append_batch(a_later)
    assert [w.wallet_id for w in await wallet_log.recent_wallets(2)] == [A, B]
    assert len(await wallet_log.recent_wallets(10)) == 3


META = (("order", "A-1"), ("note", 'é ✓ "quoted"'))


async def test_metadata_is_stored_and_read_back(wallet_log: WalletLog) -> None:
    """Metadata of a new wallet, a log row and a recorded refusal comes back from every
    load exactly as written (the read of a restart), and a batch without any stores none."""
    new = NewWallet(A, T0, "mk", "fp", metadata=tuple(sorted(META)))
    await wallet_log.append_batch(Batch(new_wallets=[new, NewWallet(B, T0, None, "")]))
    op = OperationRecord(A, 1, OperationKind.DEPOSIT, 5, 5, "pay", T0 + 1, metadata=(("x", ""),))
    refusal = RefusalRecord(
        A, "no", OperationKind.WITHDRAW, 50, RefusalReason.INSUFFICIENT_FUNDS, 0, 0, T0 + 2,
        metadata=(("why", "test"),),
    )  # fmt: skip
    await wallet_log.append_batch(
        Batch(operations=[op], snapshots=[SnapshotUpdate(A, 0, 1, 5, T0 + 1)], refusals=[refusal])
    )
    await wallet_log.append_batch(deposit(B, 1, 7, 7, "plain"))
    loaded = await wallet_log.load_wallets([A, B])
    assert loaded[A].metadata == tuple(sorted(META))
    assert loaded[B].metadata == ()
    assert (await wallet_log.find_wallets_by_create_key(["mk"]))["mk"].metadata == tuple(
        sorted(META)
    )
    found = await wallet_log.find_operations([(A, "pay"), (A, "no"), (B, "plain")])
    assert found[(A, "pay")].metadata == (("x", ""),)
    assert found[(A, "no")].metadata == (("why", "test"),)
    assert found[(B, "plain")].metadata == ()
    [(_, history)] = await wallet_log.read_history(A, None, 10)
    assert history.metadata == (("x", ""),)


async def test_storage_refuses_metadata_past_its_bounds(pg_server: PostgresServer) -> None:
    """The CHECK behind engine/bounds.py: a row whose metadata is past a bound (51 keys, a
    key of 41 characters, a value of 501, a value that is not a string) is refused whole,
    whatever way it came in; at the bounds it is stored."""
    import asyncpg
    import orjson

    dsn = await server_database(pg_server)
    try:
        connection = await asyncpg.connect(dsn)
        try:
            at_bounds = {f"{n:040d}": "v" * 500 for n in range(50)}
            await connection.execute(
                "INSERT INTO wallets (id, balance, seq, created_at, updated_at, "
                "create_fingerprint, metadata) VALUES ($1, 0, 0, now(), now(), '', $2)",
                A, orjson.dumps(at_bounds).decode(),
            )  # fmt: skip
            for bad in (
                {f"k{n}": "v" for n in range(51)},
                {"k" * 41: "v"},
                {"k": "v" * 501},
                {"k": 1},
                {"": "v"},
            ):
                with pytest.raises(asyncpg.CheckViolationError):
                    await connection.execute(
                        "INSERT INTO wallets (id, balance, seq, created_at, updated_at, "
                        "create_fingerprint, metadata) VALUES ($1, 0, 0, now(), now(), '', $2)",
                        B, orjson.dumps(bad).decode(),
                    )  # fmt: skip
            with pytest.raises(asyncpg.CheckViolationError):  # the log's rows too
                await connection.execute(
                    "INSERT INTO wallet_refusals (wallet_id, idempotency_key, kind, amount,"
                    " reason, balance_seen, fence_seq, created_at, metadata)"
                    " VALUES ($1, 'k', 2, 1, 1, 0, 0, now(), '\"text\"'::jsonb)",
                    A,
                )
        finally:
            await connection.close()
    finally:
        await pg_server.drop_database(dsn)


async def server_database(server: PostgresServer) -> str:
    dsn = await server.create_database()
    await migrate_database(dsn)
    return dsn


async def test_a_snapshot_may_carry_the_wallets_new_metadata(pg_server: PostgresServer) -> None:
    """The slot a wallet metadata update uses (a merge, recorded by its own log row): a
    snapshot move with metadata replaces the wallet's, one without (every money move, NULL)
    leaves it, and the CHECK refuses one past the bounds."""
    import asyncpg

    dsn = await server_database(pg_server)
    try:
        pool = await create_pool(dsn, PoolSettings(size_max=1))
        try:
            log = PostgresLog(pool)
            await log.append_batch(
                Batch(new_wallets=[NewWallet(A, T0, None, "", metadata=(("a", "1"),))])
            )
            await log.append_batch(deposit(A, 1, 5, 5))
            assert (await log.load_wallets([A]))[A].metadata == (("a", "1"),)
            append = (
                "SELECT walletd_append_batch('{}', '{}', '{}', '{}', $1, $2, $3, $4, $5, $6, $7,"
                " $1, $8, $2, $5, $7, '{}', '{}', '{}', '{}', '{}', '{}', '{}', '{}',"
                " snap_metadata => $9::jsonb[])"
            )
            move = ([A], [2], [1], [1], [6], [None], [T0 + 2], [1])
            await pool.execute(append, *move, ['{"a": "2", "b": "x"}'])
            assert (await log.load_wallets([A]))[A].metadata == (("a", "2"), ("b", "x"))
            with pytest.raises(asyncpg.CheckViolationError):
                await pool.execute(
                    append, [A], [3], [1], [1], [7], [None], [T0 + 3], [2], ['{"a": 1}']
                )
            stored = (await log.load_wallets([A]))[A]
            assert (stored.balance, stored.metadata) == (6, (("a", "2"), ("b", "x")))
        finally:
            await pool.close()
    finally:
        await pg_server.drop_database(dsn)


async def test_a_reversal_is_read_with_its_operation_and_stored_once(
    wallet_log: WalletLog,
) -> None:
    """read_operation finds a row by seq and the reversal that names it (engine/commands.py
    reversal_key); a second reversal of that row, under any key, is refused (PostgreSQL: the
    unique index of migration "refunds_and_reversals"; 23505), and nothing is written."""
    await wallet_log.append_batch(create(A))
    await wallet_log.append_batch(deposit(A, 1, 50, 50))
    assert await wallet_log.read_operation(A, 1) == (
        (await wallet_log.read_history(A, None, 1))[0][1], None,
    )  # fmt: skip
    assert await wallet_log.read_operation(A, 2) == (None, None)

    def reversal(seq: int, balance_before: int, key: str) -> Batch:
        row = OperationRecord(
            A, seq, OperationKind.DEPOSIT_REVERSAL, 50, balance_before - 50,
            reversal_key(1, key), T0 + seq,
        )  # fmt: skip
        return Batch(
            operations=[row],
            snapshots=[SnapshotUpdate(A, seq - 1, seq, balance_before - 50, T0 + seq)],
        )

    await wallet_log.append_batch(reversal(2, 50, "first"))
    original, reversed_by = await wallet_log.read_operation(A, 1)
    assert original is not None
    assert reversed_by is not None
    assert (original.kind, reversed_by.seq, reversed_by.idempotency_key) == (
        OperationKind.DEPOSIT, 2, reversal_key(1, "first"),
    )  # fmt: skip
    await wallet_log.append_batch(deposit(A, 3, 50, 50))
    with pytest.raises(StorageRefused) as refused:
        await wallet_log.append_batch(reversal(4, 50, "second"))
    assert refused.value.sqlstate == "23505"
    assert "wallet_operations_reversed_once" in str(refused.value)
    assert (await wallet_log.load_wallets([A]))[A].seq == 3
