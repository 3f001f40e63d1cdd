"""walletd verify / restore / seed against a real PostgreSQL, in-process and as commands."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from uuid import UUID, uuid4

import asyncpg
import pytest

from tests.processes import walletd_command
from walletd.engine.commands import HoldAction, Outcome, TransferLeg, hold_key, transfer_leg_key
from walletd.engine.limits import EngineLimits
from walletd.engine.model import OperationKind, TransferRecord, TransferStatus, WalletStatus
from walletd.engine.money import Currency
from walletd.engine.router import Engine
from walletd.persistence.database import DatabaseBusy, PoolSettings, connect, create_pool
from walletd.persistence.leases import ensure_cluster
from walletd.persistence.operator import Mismatch, restore, seed, verify
from walletd.persistence.postgres_log import PostgresLog


async def _execute(dsn: str, sql: str, *args: object) -> str:
    connection = await asyncpg.connect(dsn)
    try:
        status: str = await connection.execute(sql, *args)
        return status
    finally:
        await connection.close()


async def _some_wallet(dsn: str) -> UUID:
    connection = await asyncpg.connect(dsn)
    try:
        wallet_id: UUID = await connection.fetchval(
            "SELECT wallet_id FROM wallet_operations WHERE seq = 3 ORDER BY wallet_id LIMIT 1"
        )
        return wallet_id
    finally:
        await connection.close()


async def test_seed_makes_a_database_that_verify_passes(database_url: str) -> None:
    """seed spreads operations over wallets (some with none) and verify finds it clean."""
    report = await seed(database_url, 40, 101)
    assert (report.wallets, report.operations) == (40, 101)
    checked = await verify(database_url, fetch_rows=7)  # many fetches: batch edges exercised
    assert checked.clean, checked.first_mismatches
    assert (checked.wallets, checked.operations) == (40, 101)
    await seed(database_url, 10)  # wallets without history, added to a non-empty database
    again = await verify(database_url)
    assert again.clean
    assert again.wallets == 50


async def test_verify_detects_a_tampered_snapshot_and_restore_fixes_it(database_url: str) -> None:
    """A snapshot balance and a seq edited behind walletd's back are reported, then rebuilt."""
    await seed(database_url, 30, 120)
    wallet_id = await _some_wallet(database_url)
    await _execute(
        database_url, "UPDATE wallets SET balance = balance + 1 WHERE id = $1", wallet_id
    )
    await _execute(
        database_url,
        "UPDATE wallets SET seq = 0, balance = 0 WHERE id = "
        "(SELECT id FROM wallets WHERE id <> $1 AND seq > 0 ORDER BY id LIMIT 1)",
        wallet_id,
    )
    seen: list[Mismatch] = []
    report = await verify(database_url, seen.append)
    assert not report.clean
    # Balance of the first; balance and seq of the second; and the whole log's sum of
    # balances no longer matches deposits - withdrawals.
    assert report.mismatches == 4
    assert sum(m.wallet_id is None for m in seen) == 1
    assert any(m.wallet_id == wallet_id and "balance" in m.problem for m in seen)

    restored = await restore(database_url)
    assert restored.repaired == 2
    assert restored.wallets == 30
    assert (await verify(database_url)).clean
    assert (await restore(database_url)).repaired == 0  # nothing left to rebuild


async def test_verify_detects_a_broken_balance_chain(database_url: str) -> None:
    """A log row whose balance_after does not follow from the rows before it is reported."""
    await seed(database_url, 5, 25)
    wallet_id = await _some_wallet(database_url)
    await _execute(
        database_url,
        "UPDATE wallet_operations SET balance_after = balance_after + 5 "
        "WHERE wallet_id = $1 AND seq = 2",
        wallet_id,
    )
    seen: list[Mismatch] = []
    report = await verify(database_url, seen.append)
    assert report.mismatches == 1
    assert seen[0].wallet_id == wallet_id
    assert "chain broken at seq 2" in seen[0].problem


async def test_verify_detects_a_missing_log_row(database_url: str) -> None:
    """A deleted log row breaks the seq chain and the snapshot's sum."""
    await seed(database_url, 5, 25)
    wallet_id = await _some_wallet(database_url)
    await _execute(
        database_url, "DELETE FROM wallet_operations WHERE wallet_id = $1 AND seq = 3", wallet_id
    )
    seen: list[Mismatch] = []
    await verify(database_url, seen.append)
    problems = [m.problem for m in seen if m.wallet_id == wallet_id]
    assert any("chain broken" in p for p in problems)
    assert any("snapshot seq" in p for p in problems)


@contextlib.asynccontextmanager
async def _a_live_lease(dsn: str) -> AsyncIterator[None]:
    """One shard lease held the way a serving process holds it, for a minute at most."""
    connection = await connect(dsn)
    try:
        await ensure_cluster(connection, 4)
        await connection.execute(
            "UPDATE walletd_shard_leases SET owner = 'test', epoch = epoch + 1,"
            " expires_at = now() + interval '60 seconds' WHERE shard = 0"
        )
        yield
        await connection.execute(
            "UPDATE walletd_shard_leases SET owner = NULL, expires_at = '-infinity'"
            " WHERE owner = 'test'"
        )
    finally:
        await connection.close()


async def test_restore_refuses_while_a_server_holds_a_lease(database_url: str) -> None:
    """restore raises DatabaseBusy while a shard lease is live, and works once it is released."""
    await seed(database_url, 3, 6)
    async with _a_live_lease(database_url):
        with pytest.raises(DatabaseBusy):
            await restore(database_url)
    assert (await restore(database_url)).repaired == 0


async def test_restore_leaves_every_lease_free_for_a_server(database_url: str) -> None:
    """During a restore every lease is the operator's (epochs bumped); after it, all are free."""
    connection = await connect(database_url)
    try:
        await ensure_cluster(connection, 4)
        before = await connection.fetchval("SELECT sum(epoch) FROM walletd_shard_leases")
        await restore(database_url)
        after = await connection.fetchrow(
            "SELECT sum(epoch), bool_and(owner IS NULL AND expires_at = '-infinity')"
            " FROM walletd_shard_leases"
        )
        assert after is not None
        assert after[0] == before + 4  # a server that still believed it owned one is fenced
        assert after[1]
    finally:
        await connection.close()


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        walletd_command(list(args)), capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.slow
async def test_commands_exit_codes(database_url: str) -> None:
    """walletd seed/verify/restore as commands: 0 when clean, 1 on mismatch, 2 when busy."""
    done = _run("seed", "--database-url", database_url, "--wallets", "20", "--operations", "60")
    assert done.returncode == 0, done.stderr
    assert "20 wallets and 60 operations" in done.stdout
    done = _run("verify", "--database-url", database_url)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("OK")

    wallet_id = await _some_wallet(database_url)
    await _execute(database_url, "UPDATE wallets SET balance = 1 WHERE id = $1", wallet_id)
    done = _run("verify", "--database-url", database_url)
    assert done.returncode == 1
    assert f"mismatch: wallet {wallet_id}" in done.stdout
    assert "2 MISMATCHES" in done.stdout  # the wallet, and the whole log's sum of balances

    async with _a_live_lease(database_url):
        done = _run("restore", "--database-url", database_url)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0
    assert "live shard leases" in done.stderr
    assert "Traceback" not in done.stderr

    done = _run("restore", "--database-url", database_url)
    assert done.returncode == 0, done.stderr
    assert "1 snapshot rows rebuilt" in done.stdout
    assert _run("verify", "--database-url", database_url).returncode == 0


@pytest.mark.slow
@pytest.mark.parametrize("command", [["verify"], ["restore"], ["seed", "--wallets", "3"]])
async def test_maintenance_commands_refuse_pending_migrations(
    fresh_database_url: str, command: list[str]
) -> None:
    """verify/restore/seed on an unmigrated database exit 2, point to migrate, change nothing."""
    done = _run(*command, "--database-url", fresh_database_url)
    assert done.returncode == 2, done.stdout
    assert done.stderr.strip().count("\n") == 0, done.stderr
    assert "pending: 0001_" in done.stderr
    assert "run `walletd migrate` first" in done.stderr
    assert "Traceback" not in done.stderr
    connection = await asyncpg.connect(fresh_database_url)
    try:
        tables = await connection.fetchval(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
        )
    finally:
        await connection.close()
    assert tables == 0  # not even the migrations table was created


@pytest.mark.slow
async def test_maintenance_commands_refuse_a_partly_migrated_database(
    fresh_database_url: str,
) -> None:
    """A database missing only its newest migration is refused too, and left as it was."""
    from walletd.persistence.migrate import MigrationError, migrations, require_current_schema

    known = migrations()
    connection = await asyncpg.connect(fresh_database_url)
    try:
        await connection.execute(
            "CREATE TABLE walletd_schema_migrations (version integer PRIMARY KEY, "
            "name text NOT NULL, checksum text NOT NULL, applied_at timestamptz NOT NULL "
            "DEFAULT now())"
        )
        for migration in known[:-1]:
            await connection.execute(migration.sql)
            await connection.execute(
                "INSERT INTO walletd_schema_migrations (version, name, checksum) "
                "VALUES ($1, $2, $3)",
                migration.version, migration.name, migration.checksum,
            )  # fmt: skip
        newest = f"{known[-1].version:04d}_{known[-1].name}"
        with pytest.raises(MigrationError, match=f"pending: {newest}\\)"):
            await require_current_schema(connection)
        done = _run("verify", "--database-url", fresh_database_url)
        assert done.returncode == 2
        assert "walletd migrate" in done.stderr
        recorded = await connection.fetchval("SELECT max(version) FROM walletd_schema_migrations")
        assert recorded == known[-2].version
    finally:
        await connection.close()


async def test_verify_checks_every_change_has_exactly_one_feed_position(
    database_url: str,
) -> None:
    """A wallet creation given a log row's position, and a log row with none, are both
    reported; the seeded database itself is clean."""
    await seed(database_url, 20, 60)
    assert (await verify(database_url)).clean
    wallet_id = await _some_wallet(database_url)
    await _execute(
        database_url,
        "UPDATE wallets SET (created_xid, feed_id) = (SELECT xid, id FROM wallet_operations "
        "WHERE wallet_id = $1 AND seq = 1) WHERE id = $1",
        wallet_id,
    )
    await _execute(database_url, "ALTER TABLE wallet_operations ALTER COLUMN xid DROP NOT NULL")
    await _execute(
        database_url,
        "UPDATE wallet_operations SET xid = NULL WHERE wallet_id = $1 AND seq = 2",
        wallet_id,
    )
    found: list[Mismatch] = []
    report = await verify(database_url, found.append)
    problems = sorted(m.problem.rpartition(" ")[2] for m in found)
    assert all(m.wallet_id == wallet_id for m in found)
    assert problems == ["position", "rows"]  # a log row without one, a creation sharing one
    assert report.mismatches == 2


async def test_verify_reports_a_log_stamped_back_in_time(database_url: str) -> None:
    """As-of reads binary-search a wallet's log by created_at: verify reports a row stamped
    before the row ahead of it."""
    await seed(database_url, 10, 40)
    wallet_id = await _some_wallet(database_url)
    await _execute(
        database_url,
        "UPDATE wallet_operations SET created_at = created_at - interval '1 hour' "
        "WHERE wallet_id = $1 AND seq = 3",
        wallet_id,
    )
    found: list[Mismatch] = []
    report = await verify(database_url, found.append)
    assert [(m.wallet_id, m.problem) for m in found] == [
        (wallet_id, "created_at of seq 3 is before seq 2's")
    ]
    assert report.mismatches == 1


# -- conservation across wallets: rows forged straight into the database ------------------

SENDER, RECEIVER, ATTACKER = UUID(int=0xA), UUID(int=0xB), UUID(int=0xC)


@dataclass(frozen=True)
class Ledger:
    """What walletd wrote through its real engine: a COMPLETED and a PENDING transfer, and
    holds in every state (two PENDING, voided, captured out, captured into a wallet)."""

    completed: UUID
    pending: UUID
    held: UUID


async def _written_by_walletd(dsn: str) -> Ledger:
    pool = await create_pool(dsn, PoolSettings(size_max=4))
    engine = Engine(PostgresLog(pool), EngineLimits(pipelines=2))
    await engine.start()
    try:
        for wallet in (SENDER, RECEIVER, ATTACKER):
            assert (await engine.create_wallet(wallet, None))[1].outcome is Outcome.CREATED
        deposited = await engine.apply(SENDER, OperationKind.DEPOSIT, 1_000, None)
        assert deposited.outcome is Outcome.OK
        completed, reply = await engine.transfer(None, None, SENDER, RECEIVER, 100, None)
        assert reply.outcome is Outcome.OK
        # A transfer left PENDING: its debit alone, as after a crash between the commits.
        pending = TransferRecord(
            uuid4(), SENDER, RECEIVER, 1, None, TransferStatus.PENDING, None, 0, 0
        )
        debit = TransferLeg(OperationKind.TRANSFER_OUT, pending, asyncio.Future())
        assert (await engine.deliver_leg(debit)).outcome is Outcome.OK
        holds = []
        for held in (50, 50, 30, 40, 20):
            hold_id, created = await engine.create_hold(SENDER, held, 3600, None, None)
            assert created.outcome is Outcome.CREATED
            holds.append(hold_id)
        for action, hold_id, captured, to_wallet in (
            (HoldAction.VOID, holds[2], None, None),
            (HoldAction.CAPTURE, holds[3], 10, None),
            (HoldAction.CAPTURE, holds[4], None, ATTACKER),
        ):
            resolved = await engine.resolve_hold(action, hold_id, captured, None, to_wallet)
            assert resolved.outcome is Outcome.OK
    finally:
        await engine.stop()
        await pool.close()
    return Ledger(completed, pending.transfer_id, holds[0])


# One log row appended to a wallet as walletd would (seq + 1, balance_after and held_after
# the running ones, created_at after the last), and the wallet's snapshot moved with it: the
# wallet's own chain adds up, so only the checks across wallets can see the forgery.
_FORGE_ROW = """
WITH w AS (SELECT id, seq, balance, held FROM wallets WHERE id = $1),
     row AS (
    INSERT INTO wallet_operations (wallet_id, seq, kind, amount, balance_after,
                                   idempotency_key, created_at, held_after)
    SELECT w.id, w.seq + 1, $2, $3, w.balance + $4, $5,
           (SELECT max(created_at) + interval '1 microsecond' FROM wallet_operations
             WHERE wallet_id = $1),
           w.held + $6
      FROM w
    RETURNING seq)
UPDATE wallets SET seq = seq + 1, balance = balance + $4, held = held + $6
 WHERE id = $1
RETURNING (SELECT seq FROM row)
"""


async def _forge(
    dsn: str,
    wallet: UUID,
    kind: OperationKind,
    amount: int,
    key: str | None,
    *,
    balance: int = 0,
    held: int = 0,
    also: str | None = None,
) -> int:
    """Writes the row (and ``also``, one more statement) in one transaction; its seq."""
    connection = await asyncpg.connect(dsn)
    try:
        async with connection.transaction():
            seq: int = await connection.fetchval(
                _FORGE_ROW, wallet, int(kind), amount, balance, key, held
            )
            if also is not None:
                await connection.execute(also)
        return seq
    finally:
        await connection.close()


async def _forged_in_of_another_amount(dsn: str, ledger: Ledger) -> tuple[UUID, int, str]:
    """The review's mint: the PENDING 0.01 transfer credited with 1,000,000,000.00."""
    key = transfer_leg_key(OperationKind.TRANSFER_IN, ledger.pending)
    also = f"UPDATE transfers SET status = 2 WHERE id = '{ledger.pending}'"
    seq = await _forge(dsn, RECEIVER, OperationKind.TRANSFER_IN, 10**11, key, balance=10**11,
                       also=also)  # fmt: skip
    return (
        RECEIVER,
        seq,
        (
            f"(TRANSFER_IN of 100000000000) does not match transfer {ledger.pending} "
            f"(COMPLETED), whose TRANSFER_IN is 1 on wallet {RECEIVER}"
        ),
    )


async def _forged_in_for_another_wallet(dsn: str, ledger: Ledger) -> tuple[UUID, int, str]:
    key = transfer_leg_key(OperationKind.TRANSFER_IN, ledger.pending)
    also = f"UPDATE transfers SET status = 2 WHERE id = '{ledger.pending}'"
    seq = await _forge(dsn, ATTACKER, OperationKind.TRANSFER_IN, 1, key, balance=1, also=also)
    return (
        ATTACKER,
        seq,
        (
            f"(TRANSFER_IN of 1) does not match transfer {ledger.pending} (COMPLETED), whose "
            f"TRANSFER_IN is 1 on wallet {RECEIVER}"
        ),
    )


async def _forged_second_in(dsn: str, ledger: Ledger) -> tuple[UUID, int, str]:
    key = transfer_leg_key(OperationKind.TRANSFER_IN, ledger.completed)
    seq = await _forge(dsn, ATTACKER, OperationKind.TRANSFER_IN, 100, key, balance=100)
    return ATTACKER, seq, f"(TRANSFER_IN of 100) does not match transfer {ledger.completed}"


async def _forged_in_of_a_pending_transfer(dsn: str, ledger: Ledger) -> tuple[UUID, int, str]:
    key = transfer_leg_key(OperationKind.TRANSFER_IN, ledger.pending)
    seq = await _forge(dsn, RECEIVER, OperationKind.TRANSFER_IN, 1, key, balance=1)
    return (
        RECEIVER,
        seq,
        (f"(TRANSFER_IN of 1) is a row transfer {ledger.pending} (PENDING) cannot have"),
    )


async def _forged_orphan_leg(dsn: str, _ledger: Ledger) -> tuple[UUID, int, str]:
    key = transfer_leg_key(OperationKind.TRANSFER_IN, uuid4())
    seq = await _forge(dsn, ATTACKER, OperationKind.TRANSFER_IN, 5, key, balance=5)
    return ATTACKER, seq, "(TRANSFER_IN of 5) belongs to no transfer"


async def _forged_release_of_more_than_held(dsn: str, ledger: Ledger) -> tuple[UUID, int, str]:
    """A PENDING hold of 50 voided by a RELEASE of 80 (the wallet holds 100 in all)."""
    key = hold_key(OperationKind.RELEASE, ledger.held)
    also = f"UPDATE holds SET status = 3 WHERE id = '{ledger.held}'"
    seq = await _forge(dsn, SENDER, OperationKind.RELEASE, 80, key, held=-80, also=also)
    return (
        SENDER,
        seq,
        (
            f"(RELEASE of 80) does not match hold {ledger.held} (VOIDED), whose RELEASE is 50 on "
            f"wallet {SENDER}"
        ),
    )


@pytest.mark.parametrize(
    "forge",
    [
        _forged_in_of_another_amount,
        _forged_in_for_another_wallet,
        _forged_second_in,
        _forged_in_of_a_pending_transfer,
        _forged_orphan_leg,
        _forged_release_of_more_than_held,
    ],
    ids=lambda forge: forge.__name__.removeprefix("_forged_"),
)
async def test_verify_reports_a_forged_leg_whose_wallet_chain_adds_up(
    database_url: str,
    forge: Callable[[str, Ledger], Awaitable[tuple[UUID, int, str]]],
) -> None:
    """A leg or hold row written straight into the database (with its wallet's snapshot
    moved, so that wallet's chain adds up) is reported, naming the row: its wallet, seq,
    kind and amount, and how it differs from its transfer or hold."""
    ledger = await _written_by_walletd(database_url)
    clean = await verify(database_url)
    assert clean.clean, clean.first_mismatches
    assert (clean.transfers, clean.holds) == (3, 5)

    wallet_id, seq, problem = await forge(database_url, ledger)
    found: list[Mismatch] = []
    report = await verify(database_url, found.append)
    assert not report.clean
    named = [m for m in found if m.wallet_id == wallet_id and f"log row seq {seq} " in m.problem]
    assert len(named) == 1, found
    assert problem in named[0].problem


async def test_verify_reports_money_made_across_wallets(database_url: str) -> None:
    """A credit that mints money breaks the conservation equation, reported for the whole
    log with its terms."""
    ledger = await _written_by_walletd(database_url)
    await _forged_in_of_another_amount(database_url, ledger)
    found: list[Mismatch] = []
    await verify(database_url, found.append)
    whole = [str(m) for m in found if m.wallet_id is None]
    assert whole == [
        "mismatch: the whole log: USD: sum(balance) 100000000989 + PENDING transfers 0 != "
        "deposits 1000 - withdrawals 0 - captures 10 (net of reversals): money was made or "
        "lost"
    ]


@pytest.mark.slow
async def test_verify_command_exits_1_naming_a_minted_credit(database_url: str) -> None:
    """`walletd verify` on the review's forged credit: exit 1, the row named on stdout."""
    ledger = await _written_by_walletd(database_url)
    _wallet, seq, _problem = await _forged_in_of_another_amount(database_url, ledger)
    done = _run("verify", "--database-url", database_url)
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"mismatch: wallet {RECEIVER}: log row seq {seq} (TRANSFER_IN of 100000000000)" in (
        done.stdout
    )
    assert "mismatch: the whole log: USD: sum(balance)" in done.stdout


async def test_verify_checks_status_and_overdraft_against_the_log_and_restore_rebuilds_them(
    database_url: str,
) -> None:
    """A wallet's status or overdraft limit edited behind walletd's back (no WALLET_UPDATE
    row says so), a log row below the floor in force at it, and a row after a close are
    reported; restore rebuilds status and limit from the last WALLET_UPDATE row."""
    pool = await create_pool(database_url, PoolSettings(size_max=4))
    engine = Engine(PostgresLog(pool), EngineLimits(pipelines=1))
    await engine.start()
    try:
        limited, closed, plain = uuid4(), uuid4(), uuid4()
        for wallet in (limited, closed, plain):
            assert (await engine.create_wallet(wallet, None))[1].outcome is Outcome.CREATED
        reply = await engine.update_wallet(limited, None, 1_000, None, "f")
        assert reply.outcome is Outcome.OK
        reply = await engine.apply(limited, OperationKind.WITHDRAW, 600, None)
        assert reply.outcome is Outcome.OK
        reply = await engine.update_wallet(closed, WalletStatus.CLOSED, None, None, "f")
        assert reply.outcome is Outcome.OK
    finally:
        await engine.stop()
        await pool.close()
    assert (await verify(database_url)).clean
    await _execute(database_url, "UPDATE wallets SET status = 2 WHERE id = $1", plain)
    await _execute(database_url, "UPDATE wallets SET overdraft_limit = 700 WHERE id = $1", limited)
    seen: list[Mismatch] = []
    report = await verify(database_url, seen.append)
    assert report.mismatches == 2, seen
    assert {m.wallet_id for m in seen} == {plain, limited}
    assert all("overdraft_limit" in m.problem for m in seen)
    assert (await restore(database_url)).repaired == 2
    assert (await verify(database_url)).clean

    # Rows the triggers refuse, written with them off: verify still finds them.
    connection = await asyncpg.connect(database_url)
    try:
        await connection.execute("SET session_replication_role = replica")
        # The limit lowered under what the wallet owes, in its update row and snapshot
        # alike: the withdrawal's row (seq 2, balance -6.00) is below the floor (-5.00).
        await connection.execute(
            "UPDATE wallet_operations SET overdraft_limit_after = 500"
            " WHERE wallet_id = $1 AND kind = 9",
            limited,
        )
        await connection.execute("UPDATE wallets SET overdraft_limit = 500 WHERE id = $1", limited)
        await connection.execute(
            "INSERT INTO wallet_operations (wallet_id, seq, kind, amount, balance_after,"
            " created_at) VALUES ($1, 2, 1, 5, 5, now())",
            closed,
        )
    finally:
        await connection.close()
    seen.clear()
    await verify(database_url, seen.append)
    problems = {m.wallet_id: m.problem for m in seen if m.wallet_id is not None}
    assert "chain broken at seq 2" in problems[limited]
    assert any(m.wallet_id == closed and "follows the wallet's close" in m.problem for m in seen)


async def test_verify_checks_conservation_per_currency(database_url: str) -> None:
    """Money is conserved in each currency on its own, and a transfer joins two wallets of
    one currency: a wallet whose currency is edited behind walletd's back after a transfer
    into it breaks both (a JPY->USD transfer in the log, and neither sum balancing)."""
    pool = await create_pool(database_url, PoolSettings(size_max=4))
    engine = Engine(PostgresLog(pool), EngineLimits(pipelines=1))
    await engine.start()
    jpy = Currency("JPY", 0)
    try:
        wallets = [(await engine.create_wallet(None, None, currency))[0]
                   for currency in (jpy, jpy, None)]  # fmt: skip
        for wallet_id in wallets:
            await engine.apply(wallet_id, OperationKind.DEPOSIT, 500, None)
        _id, reply = await engine.transfer(None, None, wallets[0], wallets[1], 200, None)
        assert reply.outcome is Outcome.OK
        _id, reply = await engine.transfer(None, None, wallets[0], wallets[2], 1, None)
        assert reply.outcome is Outcome.CURRENCY_MISMATCH  # refused, nothing written
    finally:
        await engine.stop()
        await pool.close()
    assert (await verify(database_url)).clean
    await _execute(
        database_url, "UPDATE wallets SET currency = 'USD', exponent = 2 WHERE id = $1",
        wallets[1],
    )  # fmt: skip
    seen: list[Mismatch] = []
    await verify(database_url, seen.append)
    problems = [m.problem for m in seen]
    assert any("moves JPY into wallet" in p and "holds USD" in p for p in problems), problems
    assert sum(p.startswith(("JPY:", "USD:")) for p in problems) == 2, problems
