"""Connecting to PostgreSQL: the pool, the version and durability checks (shard leases:
leases.py).

Every connection walletd opens sets ``synchronous_commit=on`` in its startup packet: that
beats a role's, a database's or the DSN's ``options`` setting, so a COMMIT that returned is
in the fsync'd WAL whatever the server's defaults, and a 2xx means durable.

Exceptions::

    DatabaseError               start-up cannot go on; the message is one readable line
    ├── DatabaseUnreachable     no connection could be made
    ├── DatabaseTooOld          the server is older than PostgreSQL 14
    ├── DatabaseUnsafe          the server runs with fsync or full_page_writes off, or
    │                           cannot promise a synchronous standby's copy when one is
    │                           required (--require-sync-replica)
    └── DatabaseBusy            walletd servers hold leases (an operator command must wait)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import asyncpg

__all__ = [
    "DURABILITY_SETTINGS",
    "POSTGRES_VERSION_MIN",
    "DatabaseBusy",
    "DatabaseError",
    "DatabaseTooOld",
    "DatabaseUnreachable",
    "DatabaseUnsafe",
    "PoolSettings",
    "check_durability",
    "check_server_version",
    "check_sync_replica",
    "connect",
    "create_pool",
    "describe_settings",
    "durability_settings",
    "unsafe_settings",
]

POSTGRES_VERSION_MIN = 140000


class DatabaseError(Exception):
    """Start-up cannot go on."""


class DatabaseUnreachable(DatabaseError):
    pass


class DatabaseTooOld(DatabaseError):
    pass


class DatabaseUnsafe(DatabaseError):
    pass


class DatabaseBusy(DatabaseError):
    pass


# Sent in the startup packet of every connection (client settings beat role and database
# defaults): walletd answers a write only after COMMIT returns, so COMMIT must wait for the
# WAL flush.
SESSION_SETTINGS = {"synchronous_commit": "on"}
# What a 2xx's durability rests on; the bench report prints them too.
DURABILITY_SETTINGS = ("fsync", "full_page_writes", "synchronous_commit")
# Server-wide settings that, when off, let a crash lose or tear committed data; no session
# can turn them back on.
_SERVER_DURABILITY_SETTINGS = ("fsync", "full_page_writes")


@dataclass(frozen=True, slots=True)
class PoolSettings:
    """Bounds of the pool; each one turns an outage into a prompt error, never a hang.

    - ``size_max``: connections at most; a caller past it waits for a free one.
    - ``acquire_timeout_s``: waiting for a connection (free or newly connected) at most;
      past it the call fails with ``StorageUnavailable`` (503), nothing sent.
    - ``connect_timeout_s``: one connection attempt at most.
    - ``command_timeout_s``: one statement at most; past it the statement is cancelled and
      the call fails (a commit as outcome-unknown).
    """

    size_max: int = 12
    acquire_timeout_s: float = 2.0
    connect_timeout_s: float = 2.0
    command_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if self.size_max < 1:
            raise ValueError("pool size must be at least 1")
        if min(self.acquire_timeout_s, self.connect_timeout_s, self.command_timeout_s) <= 0:
            raise ValueError("database timeouts must be positive")


def _describe(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


async def connect(dsn: str, timeout_s: float = 5.0) -> asyncpg.Connection:
    try:
        return await asyncpg.connect(dsn, timeout=timeout_s, server_settings=SESSION_SETTINGS)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
        raise DatabaseUnreachable(f"cannot connect to PostgreSQL: {_describe(error)}") from error


async def check_server_version(connection: asyncpg.Connection) -> int:
    version = int(await connection.fetchval("SHOW server_version_num"))
    if version < POSTGRES_VERSION_MIN:
        raise DatabaseTooOld(
            f"PostgreSQL {version // 10000} is too old; walletd needs "
            f"{POSTGRES_VERSION_MIN // 10000} or newer"
        )
    return version


async def durability_settings(connection: asyncpg.Connection) -> dict[str, str]:
    """The values of DURABILITY_SETTINGS as this connection sees them."""
    rows = await connection.fetch(
        "SELECT name, setting FROM pg_settings WHERE name = any($1::text[])",
        list(DURABILITY_SETTINGS),
    )
    return {row["name"]: row["setting"] for row in rows}


def unsafe_settings(settings: Mapping[str, str]) -> list[str]:
    """The durability settings (of DURABILITY_SETTINGS' values) that are not safe, as text."""
    unsafe = [f"{name}=off" for name in _SERVER_DURABILITY_SETTINGS if settings[name] != "on"]
    if settings["synchronous_commit"] != "on":  # only if SESSION_SETTINGS were not applied
        unsafe.append(f"synchronous_commit={settings['synchronous_commit']}")
    return unsafe


def describe_settings(settings: Mapping[str, str]) -> str:
    return ", ".join(f"{name}={settings[name]}" for name in DURABILITY_SETTINGS)


async def check_durability(connection: asyncpg.Connection, *, allow_unsafe: bool) -> dict[str, str]:
    """Refuse a server that could lose acknowledged writes in a crash; return its settings.

    ``fsync=off`` or ``full_page_writes=off`` is a server-wide choice no session can undo:
    walletd would answer 2xx for writes a power loss can lose or tear. ``allow_unsafe`` (an
    operator's explicit override, e.g. for a throwaway test server) skips the refusal.
    """
    settings = await durability_settings(connection)
    unsafe = unsafe_settings(settings)
    if unsafe and not allow_unsafe:
        raise DatabaseUnsafe(
            f"PostgreSQL runs with {', '.join(unsafe)}: acknowledged writes could be lost in "
            "a crash; fix the server's settings, or start with --allow-unsafe-durability"
        )
    return settings


async def _keep_session(_connection: asyncpg.Connection) -> None:
    """Release a pooled connection without asyncpg's reset query.

    By default asyncpg sends ``SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *;
    RESET ALL`` on every release: one more round trip per commit, which the profile of the
    hot-wallet benchmark showed at ~7% of walletd's CPU and a good share of PostgreSQL's.
    Pooled connections here run single autocommit statements and never change session
    state (the serving lock and the operator commands use connections of their own); an
    open transaction is still rolled back by asyncpg before this is called.
    """


async def create_pool(dsn: str, settings: PoolSettings) -> asyncpg.Pool:
    try:
        pool = await asyncpg.create_pool(
            dsn,
            min_size=1,
            max_size=settings.size_max,
            timeout=settings.connect_timeout_s,
            command_timeout=settings.command_timeout_s,
            # Connections that survived an outage are checked by asyncpg on acquire; idle
            # ones are recycled so a restarted server is not met with stale sockets.
            max_inactive_connection_lifetime=60.0,
            reset=_keep_session,
            server_settings=SESSION_SETTINGS,
        )
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
        raise DatabaseUnreachable(f"cannot connect to PostgreSQL: {_describe(error)}") from error
    assert pool is not None
    return pool


# One round trip: what a COMMIT on this server waits for. pg_stat_replication shows a
# standby's sync_state only to a superuser or a member of pg_monitor / pg_read_all_stats.
_SYNC_REPLICA = """
SELECT pg_is_in_recovery() AS standby,
       current_setting('synchronous_standby_names') AS standby_names,
       current_setting('synchronous_commit') AS commit_level,
       (SELECT count(*) FROM pg_stat_replication
         WHERE state = 'streaming' AND sync_state IN ('sync', 'quorum')) AS sync_standbys
"""
# The levels at which a synchronous standby has flushed (on) or applied (remote_apply) the
# commit's WAL before COMMIT returns; remote_write and local promise less.
_TWO_COPY_LEVELS = frozenset({"on", "remote_apply"})


async def check_sync_replica(connection: asyncpg.Connection) -> str | None:
    """Why a COMMIT on this server cannot be a second copy right now, or None when it can.

    A commit is two copies when the server is a primary, names synchronous standbys, waits
    for their flush (synchronous_commit on or remote_apply), and one of them streams with
    sync_state sync or quorum. With Patroni's strict synchronous mode and no standby, the
    names stay ``*`` and a COMMIT waits instead of returning: safe, but nothing can be
    acknowledged, so this reports it too.
    """
    row = await connection.fetchrow(_SYNC_REPLICA)
    assert row is not None
    if row["standby"]:
        return "the server is a standby (in recovery), not the primary"
    if not row["standby_names"]:
        return "synchronous_standby_names is empty: a COMMIT returns with one copy"
    if row["commit_level"] not in _TWO_COPY_LEVELS:
        return (
            f"synchronous_commit is {row['commit_level']}: a COMMIT does not wait for the "
            "standby's flush"
        )
    if not row["sync_standbys"]:
        return "no synchronous standby is streaming: a COMMIT would wait for one"
    return None
