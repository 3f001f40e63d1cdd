"""``WebhookStore`` on PostgreSQL (migration webhooks): subscriptions, cursors with their
leases, and the bounded attempts log.

It uses the read pool (``read_pool_size``), never the commits' pool: the sender's cursor
moves and attempt rows, and the admin routes, cannot make a commit wait for a connection.
A lease is a row lock-free compare on the cursor row, set by the database's clock, like the
shard leases (persistence/leases.py): claimed when expired, renewed by its owner, and every
cursor move checks it in the same statement.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Final
from uuid import UUID

import asyncpg

from walletd.engine.log_reads import FeedPosition
from walletd.engine.ports import StorageError, StorageUnavailable
from walletd.engine.webhooks import Claim, Delivery, Subscription, WebhookStore

__all__ = ["PostgresWebhookStore"]

_MICROS: Final = "(extract(epoch FROM {0}) * 1000000)::bigint"
_POSITION_MAX: Final = 2**63 - 1

_COLUMNS: Final = (
    f"w.id, w.url, w.event_types, w.enabled, {_MICROS.format('w.created_at')}, "
    f"{_MICROS.format('w.updated_at')}, c.position_xid, c.position_id, "
    f"{_MICROS.format('c.failing_since')}"
)
_SELECT: Final = (
    f"SELECT {_COLUMNS} FROM walletd_webhooks w JOIN walletd_webhook_cursors c "
    "ON c.webhook_id = w.id"
)

# The count check and the insert in one statement under a table lock: two creations at
# once cannot both pass a count of count_max - 1.
_CREATE: Final = """
WITH created AS (
    INSERT INTO walletd_webhooks (id, url, event_types, enabled, secret)
    SELECT $1, $2, $3, $4, $5 WHERE (SELECT count(*) FROM walletd_webhooks) < $8
    RETURNING id
)
INSERT INTO walletd_webhook_cursors (webhook_id, position_xid, position_id)
SELECT id,
       -- No start given: after every transaction that has ended (the feed's horizon), so
       -- no committed event is delivered and none committed later is passed.
       coalesce($6, (pg_snapshot_xmin(pg_current_snapshot())::text::bigint) - 1),
       coalesce($7, $9::bigint)
  FROM created
RETURNING webhook_id
"""

_UPDATE: Final = """
WITH changed AS (
    UPDATE walletd_webhooks
       SET url = coalesce($2, url), event_types = coalesce($3, event_types),
           enabled = coalesce($4, enabled), updated_at = now()
     WHERE id = $1 RETURNING id
)
UPDATE walletd_webhook_cursors c
   SET failing_since = CASE WHEN $4 THEN NULL ELSE c.failing_since END,
       retrying_since = CASE WHEN $4 THEN NULL ELSE c.retrying_since END
  FROM changed WHERE c.webhook_id = changed.id
RETURNING c.webhook_id
"""

# Renew this owner's leases and take expired ones (SKIP LOCKED: two processes claiming at
# once never wait on each other), of enabled subscriptions that are not failing.
_CLAIM: Final = """
WITH candidates AS (
    SELECT c.webhook_id
      FROM walletd_webhook_cursors c JOIN walletd_webhooks w ON w.id = c.webhook_id
     WHERE w.enabled AND c.failing_since IS NULL
       AND (c.lease_owner = $1 OR c.lease_expires_at < now())
     ORDER BY c.lease_owner = $1 DESC NULLS LAST, c.webhook_id
     LIMIT $3
       FOR UPDATE OF c SKIP LOCKED
)
UPDATE walletd_webhook_cursors c
   SET lease_owner = $1, lease_expires_at = now() + $2 * interval '1 second'
  FROM candidates, walletd_webhooks w
 WHERE c.webhook_id = candidates.webhook_id AND w.id = c.webhook_id
RETURNING c.webhook_id, w.url, w.event_types, w.secret, c.position_xid, c.position_id
"""

_LIVE: Final = "lease_owner = $2 AND lease_expires_at > now()"

_DELIVERY_COLUMNS: Final = (
    f"id, webhook_id, position, event_type, {_MICROS.format('attempted_at')}, status, "
    "error, duration_ms, redelivery"
)
# Appended, then all but the newest `keep` of the subscription deleted, in one statement.
_RECORD: Final = f"""
WITH added AS (
    INSERT INTO walletd_webhook_deliveries
           (webhook_id, position, event_type, status, error, duration_ms, redelivery)
    VALUES ($1, $2, $3, $4, $5, $6, $7)
    RETURNING {_DELIVERY_COLUMNS}
), pruned AS (
    DELETE FROM walletd_webhook_deliveries
     WHERE webhook_id = $1
       AND id <= (SELECT id FROM walletd_webhook_deliveries WHERE webhook_id = $1
                   ORDER BY id DESC OFFSET $8 - 1 LIMIT 1)
       AND id < (SELECT id FROM added)
)
SELECT * FROM added
"""


def _subscription(row: asyncpg.Record) -> Subscription:
    return Subscription(
        id=row[0], url=row[1], event_types=tuple(row[2]), enabled=row[3],
        created_at_us=row[4], updated_at_us=row[5], position=FeedPosition(row[6], row[7]),
        failing_since_us=row[8],
    )  # fmt: skip


def _delivery(row: asyncpg.Record) -> Delivery:
    position = FeedPosition.parse(row[2]) or FeedPosition.START
    return Delivery(
        id=row[0], webhook_id=row[1], position=position, event_type=row[3],
        attempted_at_us=row[4], status=row[5], error=row[6], duration_ms=row[7],
        redelivery=row[8],
    )  # fmt: skip


class PostgresWebhookStore(WebhookStore):
    def __init__(self, pool: asyncpg.Pool, *, acquire_timeout_s: float = 2.0) -> None:
        self._pool = pool
        self._acquire_timeout_s = acquire_timeout_s

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[asyncpg.Connection]:
        try:
            connection: asyncpg.Connection = await self._pool.acquire(
                timeout=self._acquire_timeout_s
            )
        except (OSError, TimeoutError, asyncpg.InterfaceError, asyncpg.PostgresError) as error:
            raise StorageUnavailable(f"no PostgreSQL connection: {error!r}") from error
        try:
            yield connection
        except (OSError, TimeoutError, asyncpg.InterfaceError) as error:
            raise StorageUnavailable(f"storage unreachable: {error!r}") from error
        except asyncpg.PostgresError as error:
            raise StorageError(f"query failed: {error}") from error
        finally:
            await self._pool.release(connection)

    async def create(
        self, subscription_id: UUID, url: str, event_types: tuple[str, ...], enabled: bool,
        secret: str, position: FeedPosition | None, count_max: int,
    ) -> Subscription | None:  # fmt: skip
        xid = None if position is None else position.xid
        row_id = None if position is None else position.id
        async with self._connection() as connection, connection.transaction():
            await connection.execute("LOCK TABLE walletd_webhooks IN SHARE ROW EXCLUSIVE MODE")
            created = await connection.fetchval(
                _CREATE, subscription_id, url, list(event_types), enabled, secret,
                xid, row_id, count_max, _POSITION_MAX,
            )  # fmt: skip
        if created is None:
            return None
        return await self.get(subscription_id)

    async def list_all(self, limit: int) -> list[Subscription]:
        async with self._connection() as connection:
            rows = await connection.fetch(f"{_SELECT} ORDER BY w.created_at, w.id LIMIT $1", limit)
        return [_subscription(row) for row in rows]

    async def get(self, subscription_id: UUID) -> Subscription | None:
        async with self._connection() as connection:
            row = await connection.fetchrow(f"{_SELECT} WHERE w.id = $1", subscription_id)
        return None if row is None else _subscription(row)

    async def update(
        self, subscription_id: UUID, url: str | None, event_types: tuple[str, ...] | None,
        enabled: bool | None,
    ) -> Subscription | None:  # fmt: skip
        types = None if event_types is None else list(event_types)
        async with self._connection() as connection:
            found = await connection.fetchval(_UPDATE, subscription_id, url, types, enabled)
        return None if found is None else await self.get(subscription_id)

    async def delete(self, subscription_id: UUID) -> bool:
        async with self._connection() as connection:
            done = await connection.execute(
                "DELETE FROM walletd_webhooks WHERE id = $1", subscription_id
            )
        return bool(done != "DELETE 0")

    async def secret(self, subscription_id: UUID) -> str | None:
        async with self._connection() as connection:
            found: str | None = await connection.fetchval(
                "SELECT secret FROM walletd_webhooks WHERE id = $1", subscription_id
            )
        return found

    async def claim(self, owner: str, ttl_s: float, limit: int) -> list[Claim]:
        async with self._connection() as connection:
            rows = await connection.fetch(_CLAIM, owner, ttl_s, limit)
        return [
            Claim(row[0], row[1], frozenset(row[2]), row[3], FeedPosition(row[4], row[5]))
            for row in rows
        ]

    async def release(self, owner: str) -> None:
        async with self._connection() as connection:
            await connection.execute(
                "UPDATE walletd_webhook_cursors SET lease_owner = NULL, "
                "lease_expires_at = '-infinity' WHERE lease_owner = $1",
                owner,
            )

    async def advance(self, subscription_id: UUID, owner: str, position: FeedPosition) -> bool:
        async with self._connection() as connection:
            done = await connection.execute(
                "UPDATE walletd_webhook_cursors SET position_xid = $3, position_id = $4, "
                f"retrying_since = NULL WHERE webhook_id = $1 AND {_LIVE} "
                "AND (position_xid, position_id) <= ($3, $4)",
                subscription_id, owner, position.xid, position.id,
            )  # fmt: skip
        return bool(done != "UPDATE 0")

    async def retrying(self, subscription_id: UUID, owner: str) -> float | None:
        async with self._connection() as connection:
            age = await connection.fetchval(
                "UPDATE walletd_webhook_cursors SET retrying_since = coalesce(retrying_since, "
                f"now()) WHERE webhook_id = $1 AND {_LIVE} "
                "RETURNING extract(epoch FROM now() - retrying_since)::float8",
                subscription_id, owner,
            )  # fmt: skip
        return None if age is None else float(age)

    async def mark_failing(self, subscription_id: UUID, owner: str) -> None:
        async with self._connection() as connection:
            await connection.execute(
                "UPDATE walletd_webhook_cursors SET failing_since = now(), lease_owner = NULL, "
                f"lease_expires_at = '-infinity' WHERE webhook_id = $1 AND {_LIVE}",
                subscription_id, owner,
            )  # fmt: skip

    async def record(
        self, subscription_id: UUID, position: FeedPosition, event_type: str,
        status: int | None, error: str | None, duration_ms: int, redelivery: bool, keep: int,
    ) -> Delivery:  # fmt: skip
        async with self._connection() as connection:
            row = await connection.fetchrow(
                _RECORD, subscription_id, str(position), event_type, status, error,
                duration_ms, redelivery, keep,
            )  # fmt: skip
        if row is None:
            raise StorageError("the attempt was not recorded")
        return _delivery(row)

    async def deliveries(self, subscription_id: UUID, limit: int) -> list[Delivery]:
        async with self._connection() as connection:
            rows = await connection.fetch(
                f"SELECT {_DELIVERY_COLUMNS} FROM walletd_webhook_deliveries "
                "WHERE webhook_id = $1 ORDER BY id DESC LIMIT $2",
                subscription_id, limit,
            )  # fmt: skip
        return [_delivery(row) for row in rows]

    async def delivery(self, subscription_id: UUID, delivery_id: int) -> Delivery | None:
        async with self._connection() as connection:
            row = await connection.fetchrow(
                f"SELECT {_DELIVERY_COLUMNS} FROM walletd_webhook_deliveries "
                "WHERE webhook_id = $1 AND id = $2",
                subscription_id, delivery_id,
            )  # fmt: skip
        return None if row is None else _delivery(row)

    async def failing_count(self) -> int:
        async with self._connection() as connection:
            count: int = await connection.fetchval(
                "SELECT count(*) FROM walletd_webhook_cursors WHERE failing_since IS NOT NULL"
            )
        return count
