"""Wiring: storage, migrations, the shard leases and the engine, started and stopped in order.

Start-up: embedded PostgreSQL (when no URL) → durability check → version check →
migrations → the cluster's shard count checked (or stored) → pools → engine → lease keeper
(claims this process's share of the shards) → warm-up. Shut-down runs the same steps in
reverse, after the HTTP server has finished every in-flight request: the engine drains,
then the leases are released so other processes take the shards at once instead of waiting
for them to expire.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re
import time
from collections.abc import AsyncIterator, Callable

from walletd.cli.config import SETTINGS, Config
from walletd.cli.credential import cluster_credential
from walletd.cli.data_dir import DataDirClaim
from walletd.engine.limits import EngineLimits
from walletd.engine.observer import EngineObserver
from walletd.engine.ownership import Ownership
from walletd.engine.ports import StorageError
from walletd.engine.router import Engine
from walletd.http.internal import ClusterCredential
from walletd.http.legs import HttpLegs
from walletd.http.state import Services
from walletd.persistence.database import (
    DatabaseUnreachable,
    DatabaseUnsafe,
    PoolSettings,
    check_durability,
    check_server_version,
    check_sync_replica,
    connect,
    create_pool,
    describe_settings,
    unsafe_settings,
)
from walletd.persistence.embedded import EmbeddedPostgres, EmbeddedPostgresError
from walletd.persistence.leases import (
    LeaseKeeper,
    LeaseSettings,
    ensure_cluster,
    new_owner_id,
)
from walletd.persistence.log_reads import PostgresLogReader
from walletd.persistence.migrate import apply_migrations, require_current_schema
from walletd.persistence.postgres_log import PostgresLog
from walletd.persistence.webhooks import PostgresWebhookStore

__all__ = [
    "check_cluster",
    "engine_limits",
    "migrate_database",
    "pool_settings",
    "require_durable",
    "require_migrated",
    "require_sync_replica",
    "running_services",
    "storage",
]

_log = logging.getLogger("walletd")

READINESS_CACHE_S = 1.0
READINESS_PING_TIMEOUT_S = 1.0
# Between two looks for the embedded server of the walletd that holds the data dir.
ATTACH_RETRY_INTERVAL_S = 0.1


def engine_limits(config: Config) -> EngineLimits:
    """The engine's limits from the settings; a ValueError names the settings involved as
    an operator sets them (``batch_ops_max`` -> ``WALLETD_BATCH_MAX (--batch-max)``)."""
    try:
        return _engine_limits(config)
    except ValueError as error:
        raise ValueError(_as_settings(str(error))) from None


def _as_settings(message: str) -> str:
    for setting in SETTINGS:
        names = setting.env[0] + (f" ({setting.flag})" if setting.flag else "")
        message = re.sub(rf"\b{setting.name}\b", names, message)
    return message


def _engine_limits(config: Config) -> EngineLimits:
    return EngineLimits(
        pipelines=config.pipelines,
        mailbox_commands_max=config.mailbox_commands_max,
        batch_ops_max=config.batch_ops_max,
        inflight_batches_max=config.inflight_batches_max,
        resident_wallets_max=config.resident_wallets_max,
        idempotency_keys_max=config.idempotency_keys_max,
        commit_timeout_s=config.commit_timeout_s,
        bulk_items_max=config.bulk_items_max or None,
        bulk_admission_wait_s=config.bulk_admission_wait_s,
        bulk_waiting_max=config.bulk_waiting_max,
        shard_restarts_max=config.shard_restarts_max,
        shard_restart_window_s=config.shard_restart_window_s,
        transfer_redrive_interval_s=config.transfer_redrive_interval_s,
        transfer_redrive_batch_max=config.transfer_redrive_batch_max,
        payment_postings_max=config.payment_postings_max,
        holds_per_wallet_max=config.holds_per_wallet_max,
        hold_expires_in_s_default=config.hold_expires_in_s_default,
        hold_expires_in_s_max=config.hold_expires_in_s_max,
        hold_sweep_interval_s=config.hold_sweep_interval_s,
        hold_sweep_batch_max=config.hold_sweep_batch_max,
        transfer_leg_tries_max=config.transfer_leg_tries_max,
        refusal_isolation_commits_max=config.refusal_isolation_commits_max,
        currency_cache_wallets_max=config.currency_cache_wallets_max,
    )


def pool_settings(config: Config) -> PoolSettings:
    return PoolSettings(
        size_max=config.pool_size,
        acquire_timeout_s=config.db_connect_timeout_s,
        connect_timeout_s=config.db_connect_timeout_s,
        command_timeout_s=config.db_command_timeout_s,
    )


@contextlib.asynccontextmanager
async def storage(config: Config, command: str, *, owner: bool = False) -> AsyncIterator[str]:
    """The DSN of the configured PostgreSQL, or of the embedded one in the data dir;
    ``command`` (e.g. "verify") names this process in the data dir's lock file.

    ``owner``: the caller holds the data dir's claim (``walletd serve`` or ``cluster``,
    cli/data_dir.py): it starts the embedded server (or takes over one a killed owner left
    running) and stops it at the end. Otherwise (the operator commands) the data dir is
    claimed for the command's run when free; when a serve or cluster holds it, the command
    uses that server and never starts or stops it.
    """
    if config.database_url is not None:
        yield config.database_url
        return
    if owner:
        async with _embedded(config) as dsn:
            yield dsn
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + config.embedded_start_timeout_s
    embedded = EmbeddedPostgres(config.data_dir, start_timeout_s=config.embedded_start_timeout_s)
    while True:
        claim = DataDirClaim.try_take(config.data_dir, f"walletd {command}")
        if claim is not None:
            with claim:
                async with _embedded(config) as dsn:
                    yield dsn
            return
        attached = await asyncio.to_thread(embedded.attach)
        if attached is not None:
            _log.info("using the embedded PostgreSQL of the walletd that holds the data dir")
            yield attached
            return
        if loop.time() >= deadline:
            # The owner is still starting its server (or stuck): not ours to start.
            raise EmbeddedPostgresError(
                f"the data dir {config.data_dir.resolve()} is held by another walletd whose "
                f"embedded PostgreSQL did not run within {config.embedded_start_timeout_s:g} s"
            )
        await asyncio.sleep(ATTACH_RETRY_INTERVAL_S)


@contextlib.asynccontextmanager
async def _embedded(config: Config) -> AsyncIterator[str]:
    """Start (or take over) the embedded server; stop it at the end. The caller holds the
    data dir's claim, so no other walletd uses this server."""
    config.data_dir.mkdir(parents=True, exist_ok=True)
    embedded = EmbeddedPostgres(config.data_dir, start_timeout_s=config.embedded_start_timeout_s)
    dsn = await asyncio.to_thread(embedded.start)
    _log.info("embedded PostgreSQL running in %s", embedded.pgdata)
    try:
        yield dsn
    finally:
        await asyncio.to_thread(embedded.stop)


async def migrate_database(dsn: str) -> list[str]:
    connection = await connect(dsn)
    try:
        await check_server_version(connection)
        return [f"{m.version:04d}_{m.name}" for m in await apply_migrations(connection)]
    finally:
        await connection.close()


async def require_durable(dsn: str, *, allow_unsafe: bool) -> None:
    """Refuse to serve on a server that could lose acknowledged writes (see check_durability)."""
    connection = await connect(dsn)
    try:
        settings = await check_durability(connection, allow_unsafe=allow_unsafe)
    finally:
        await connection.close()
    # The bench report quotes this line: the settings of the server it measured.
    _log.info("PostgreSQL durability: %s", describe_settings(settings))
    unsafe = unsafe_settings(settings)
    if unsafe:
        _log.warning(
            "serving with %s (--allow-unsafe-durability): a crash may lose acknowledged writes",
            ", ".join(unsafe),
        )


# Between two looks for a synchronous standby at start-up.
SYNC_REPLICA_POLL_S = 0.5


async def require_sync_replica(dsn: str, wait_s: float) -> None:
    """Wait up to ``wait_s`` for the server to promise a synchronous standby's copy of every
    COMMIT (persistence/database.py check_sync_replica); past it raise DatabaseUnsafe, so
    walletd never starts acknowledging on a server that keeps one copy."""
    if not wait_s > 0:
        raise ValueError("--sync-replica-wait must be positive")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    reason: str | None = "not checked"
    while True:
        try:
            connection = await connect(dsn)
            try:
                reason = await check_sync_replica(connection)
            finally:
                await connection.close()
        except DatabaseUnreachable as error:  # a failover in progress: look again
            reason = str(error)
        if reason is None:
            _log.info("PostgreSQL keeps a synchronous standby's copy of every commit")
            return
        if loop.time() >= deadline:
            raise DatabaseUnsafe(
                f"--require-sync-replica: {reason} (waited {wait_s:g} s); walletd will not "
                "acknowledge writes that only one server holds"
            )
        await asyncio.sleep(SYNC_REPLICA_POLL_S)


async def require_migrated(dsn: str) -> None:
    """For the operator commands: refuse a database with pending migrations, change nothing."""
    connection = await connect(dsn)
    try:
        await check_server_version(connection)
        await require_current_schema(connection)
    finally:
        await connection.close()


async def check_cluster(dsn: str, shard_count: int) -> None:
    """Store the shard count on first use; raise ShardCountMismatch on another count."""
    connection = await connect(dsn)
    try:
        await ensure_cluster(connection, shard_count)
    finally:
        await connection.close()


class _Readiness:
    """Storage answers, the engine accepts, the lease keeper steps; pings are cached briefly.

    A process that serves no shard right now is still ready: it forwards to the owners.
    """

    def __init__(
        self,
        engine: Engine,
        log: PostgresLog,
        keeper: LeaseKeeper,
        sync_replica_dsn: str | None = None,
    ) -> None:
        self._engine = engine
        self._log = log
        self._keeper = keeper
        # --require-sync-replica: the server must promise two copies to be ready.
        self._sync_replica_dsn = sync_replica_dsn
        self._checked_at = -READINESS_CACHE_S
        self._storage_reason: str | None = None

    async def __call__(self) -> str | None:
        if not self._engine.accepting:
            return "the engine is not accepting work"
        now = time.monotonic()
        stepped_at = self._keeper.last_step_at
        if stepped_at is None or now - stepped_at > self._keeper.settings.lease_ttl_s:
            return "the shard leases cannot be renewed (PostgreSQL unreachable?)"
        if now - self._checked_at >= READINESS_CACHE_S:
            self._checked_at = now
            self._storage_reason = await self._check_storage()
        return self._storage_reason

    async def _check_storage(self) -> str | None:
        try:
            await asyncio.wait_for(self._log.ping(), READINESS_PING_TIMEOUT_S)
        except (StorageError, TimeoutError):
            return "PostgreSQL is unreachable"
        if self._sync_replica_dsn is not None:
            return await self._check_sync_replica(self._sync_replica_dsn)
        return None

    async def _check_sync_replica(self, dsn: str) -> str | None:
        try:
            async with asyncio.timeout(READINESS_PING_TIMEOUT_S):
                connection = await connect(dsn, READINESS_PING_TIMEOUT_S)
                try:
                    reason = await check_sync_replica(connection)
                finally:
                    await connection.close()
        except (DatabaseUnreachable, TimeoutError):
            return "PostgreSQL is unreachable"
        return None if reason is None else f"no second copy: {reason}"


@contextlib.asynccontextmanager
async def running_services(
    config: Config,
    observer: EngineObserver | None = None,
    on_fatal: Callable[[str], None] | None = None,
    *,
    credential: ClusterCredential | None = None,
) -> AsyncIterator[Services]:
    """Storage, the pools, the engine and the shard leases, for as long as the app runs.

    ``on_fatal`` is called when the engine gives up (shards crashing past the restart
    rate): the caller should stop serving and exit non-zero. ``credential``: the cluster
    credential legs to other processes carry (read from the configuration when None).
    """
    credential = credential or cluster_credential(config)
    async with storage(config, "serve", owner=True) as dsn:
        # Before migrating: a server walletd will not serve is left exactly as it was.
        await require_durable(dsn, allow_unsafe=config.allow_unsafe_durability)
        if config.require_sync_replica:
            await require_sync_replica(dsn, config.sync_replica_wait_s)
        applied = await migrate_database(dsn)
        if applied:
            _log.info("applied migrations: %s", ", ".join(applied))
        await check_cluster(dsn, config.shards)
        pool = await create_pool(dsn, pool_settings(config))
        read_pool = None
        remote_legs: HttpLegs | None = None
        try:
            # Reads of history and the feed get connections of their own: a burst of
            # them never makes a commit wait for a connection.
            read_pool = await create_pool(
                dsn, dataclasses.replace(pool_settings(config), size_max=config.read_pool_size)
            )
            reader = PostgresLogReader(read_pool, acquire_timeout_s=config.db_connect_timeout_s)
            log = PostgresLog(pool, acquire_timeout_s=config.db_connect_timeout_s)
            ownership = Ownership(config.shards)
            # Transfer legs for wallets another process serves go to its internal listener
            # with the cluster credential (never a client key), bounded like forwarded
            # requests (the same knobs).
            remote_legs = HttpLegs(
                timeout_s=config.forward_timeout_s,
                connections_max=config.forward_connections_max,
                credential=credential,
            )
            await remote_legs.__aenter__()
            engine = Engine(
                log, engine_limits(config), ownership=ownership, observer=observer,
                on_fatal=on_fatal, remote_legs=remote_legs, self_url=config.url,
                default_currency=config.currencies.default,
            )  # fmt: skip
            settings = LeaseSettings(
                new_owner_id(), config.url, config.lease_ttl_s, config.lease_moves_max,
                # Port 0 here: no internal listener was bound (a test's app alone).
                internal_url=config.internal_url if config.internal_port else None,
            )  # fmt: skip
            keeper = LeaseKeeper(
                dsn, ownership, settings, forget=engine.forget_shards,
                drain=engine.drain_shards,
            )  # fmt: skip
            await keeper.start()
            try:
                await keeper.ready(config.commit_timeout_s * 2)
                # After a crash the dead process's leases hold its shards for up to a ttl.
                if not await keeper.settle(config.lease_ttl_s * 2 + settings.step_s * 4):
                    _log.warning("some shards have no live owner yet; serving anyway")
                _log.info(
                    "serving %d of %d shards as %s",
                    len(ownership.served()), config.shards, settings.owner,
                )  # fmt: skip
                warmed = await engine.warm_up(config.warm_wallets)
                if warmed:
                    _log.info("warm-up: %d wallets resident", warmed)
                await engine.start()
                try:
                    yield Services(
                        engine, log,
                        _Readiness(
                            engine, log, keeper,
                            dsn if config.require_sync_replica else None,
                        ),
                        reader,
                        self_url=config.url, hand_over=keeper.leave,
                        # On the read pool: the sender never takes a commit's connection.
                        webhooks=PostgresWebhookStore(
                            read_pool, acquire_timeout_s=config.db_connect_timeout_s
                        ),
                    )  # fmt: skip
                finally:
                    await engine.stop()
            finally:
                await keeper.stop()
        finally:
            if remote_legs is not None:
                await remote_legs.__aexit__(None, None, None)
            for open_pool in (read_pool, pool):
                if open_pool is None:
                    continue
                try:
                    await asyncio.wait_for(open_pool.close(), 10.0)
                except TimeoutError:
                    open_pool.terminate()
