"""Connecting to PostgreSQL: the pool, the version and durability checks, the serving lock.

Every connection walletd opens sets ``synchronous_commit=on`` in its startup packet: that
beats a role's, a database's or the DSN's ``options`` setting, so a COMMIT that returned is
in the fsync'd WAL whatever the server's defaults, and a 2xx means durable.

Exceptions::

    DatabaseError               start-up cannot go on; the message is one readable line
    ├── DatabaseUnreachable     no connection could be made
    ├── DatabaseTooOld          the server is older than PostgreSQL 14
    ├── DatabaseUnsafe          the server runs with fsync or full_page_writes off
    └── DatabaseBusy            another walletd server holds the serving lock
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass

import asyncpg

__all__ = [
    "DURABILITY_SETTINGS",
    "POSTGRES_VERSION_MIN",
    "SERVE_LOCK_ID",
    "DatabaseBusy",
    "DatabaseError",
    "DatabaseTooOld",
    "DatabaseUnreachable",
    "DatabaseUnsafe",
    "PoolSettings",
    "ServingLock",
    "check_durability",
    "check_server_version",
    "connect",
    "create_pool",
    "describe_settings",
    "durability_settings",
    "unsafe_settings",
]

POSTGRES_VERSION_MIN = 140000
# Held for the life of a serving process: one walletd per database ("walletd-s").
SERVE_LOCK_ID = 0x77616C6C65742D73


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


class ServingLock:
    """A session advisory lock held on its own connection while walletd serves.

    It keeps a second walletd (or ``walletd restore``) off a database that one is serving.
    Correctness does not rest on it: the append's seq fencing refuses a second writer.
    A database outage drops the lock with its connection; ``reacquire`` takes it again once
    the database is back (readiness calls it), unless someone else took it meanwhile.
    """

    def __init__(self, dsn: str, *, connect_timeout_s: float = 5.0) -> None:
        self._dsn = dsn
        self._connect_timeout_s = connect_timeout_s
        self._connection: asyncpg.Connection | None = None

    async def acquire(self) -> None:
        connection = await connect(self._dsn, self._connect_timeout_s)
        try:
            held = await connection.fetchval(
                "SELECT pg_try_advisory_lock($1)", SERVE_LOCK_ID, timeout=self._connect_timeout_s
            )
        except BaseException:
            connection.terminate()
            raise
        if not held:
            await connection.close()
            raise DatabaseBusy("another walletd server is serving this database")
        self._connection = connection

    async def reacquire(self) -> bool:
        """Take the lock again after its connection was lost (PostgreSQL restarted).

        Returns whether it is held. Another server may have taken it meanwhile; then it
        stays lost and readiness keeps saying so.
        """
        if self.held:
            return True
        if self._connection is not None:
            self._connection.terminate()
            self._connection = None
        try:
            await self.acquire()
        except (DatabaseError, OSError, TimeoutError, asyncpg.PostgresError,
                asyncpg.InterfaceError):  # fmt: skip
            return False
        return True

    @property
    def held(self) -> bool:
        return self._connection is not None and not self._connection.is_closed()

    async def release(self) -> None:
        if self._connection is not None:
            try:
                await asyncio.wait_for(self._connection.close(), 5.0)
            except (OSError, TimeoutError, asyncpg.InterfaceError):
                self._connection.terminate()
            self._connection = None
