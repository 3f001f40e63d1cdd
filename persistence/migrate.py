"""Versioned SQL migrations: applied in order, recorded, re-run as a no-op, safe in parallel.

Each file ``NNNN_name.sql`` in ``migrations/`` is one version. All pending versions are
applied in one transaction under a transaction-scoped advisory lock, so two processes that
migrate at once serialize: the second finds everything applied and does nothing.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources

import asyncpg

__all__ = [
    "MIGRATION_LOCK_ID",
    "Migration",
    "MigrationError",
    "apply_migrations",
    "migrations",
    "require_current_schema",
]

# An arbitrary constant shared by every walletd process ("walletd-m" in ASCII, truncated).
MIGRATION_LOCK_ID = 0x77616C6C6574642D


class MigrationError(Exception):
    """The database's recorded migrations do not match this walletd's files."""


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def migrations() -> list[Migration]:
    found = []
    folder = resources.files("walletd.persistence.migrations")
    for entry in folder.iterdir():
        if not entry.name.endswith(".sql"):
            continue
        version_text, _, rest = entry.name.partition("_")
        found.append(Migration(int(version_text), rest.removesuffix(".sql"), entry.read_text()))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise MigrationError(f"migration versions must be 1..N without gaps: {versions}")
    return found


def _pending(recorded: dict[int, str]) -> list[Migration]:
    """The migrations not yet recorded; refuses a database that differs from the files."""
    known = migrations()
    unknown = set(recorded) - {m.version for m in known}
    if unknown:
        raise MigrationError(
            f"database has migrations {sorted(unknown)} that this walletd does not know; "
            "it is older than the schema"
        )
    pending = []
    for migration in known:
        checksum = recorded.get(migration.version)
        if checksum is None:
            pending.append(migration)
        elif checksum != migration.checksum:
            raise MigrationError(
                f"migration {migration.version} ({migration.name}) was changed after it was applied"
            )
    return pending


async def _recorded(connection: asyncpg.Connection) -> dict[int, str]:
    exists = await connection.fetchval(
        "SELECT to_regclass('walletd_schema_migrations') IS NOT NULL"
    )
    if not exists:
        return {}
    rows = await connection.fetch("SELECT version, checksum FROM walletd_schema_migrations")
    return {row["version"]: row["checksum"] for row in rows}


async def require_current_schema(connection: asyncpg.Connection) -> None:
    """Refuse to go on when migrations are pending, changing nothing.

    The operator commands (verify, restore, seed) call this: running a check must never
    change a schema; only ``walletd migrate`` and ``walletd serve`` apply migrations.
    """
    pending = _pending(await _recorded(connection))
    if pending:
        names = ", ".join(f"{m.version:04d}_{m.name}" for m in pending)
        raise MigrationError(
            f"the database schema is not up to date (pending: {names}); run `walletd migrate` first"
        )


async def apply_migrations(connection: asyncpg.Connection) -> list[Migration]:
    """Apply pending migrations; return the ones applied now (empty when up to date)."""
    applied_now: list[Migration] = []
    async with connection.transaction():
        await connection.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK_ID)
        await connection.execute(
            """
            CREATE TABLE IF NOT EXISTS walletd_schema_migrations (
                version     integer PRIMARY KEY,
                name        text        NOT NULL,
                checksum    text        NOT NULL,
                applied_at  timestamptz NOT NULL DEFAULT now()
            )
            """
        )
        for migration in _pending(await _recorded(connection)):
            await connection.execute(migration.sql)
            await connection.execute(
                "INSERT INTO walletd_schema_migrations (version, name, checksum) "
                "VALUES ($1, $2, $3)",
                migration.version,
                migration.name,
                migration.checksum,
            )
            applied_now.append(migration)
    return applied_now
