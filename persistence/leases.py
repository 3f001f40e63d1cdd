"""Shard leases in PostgreSQL: who serves which shard, under which epoch (docs/SCALING.md).

Tables (migration shard_leases): ``walletd_cluster`` (the shard count, stored by the first
server), ``walletd_shard_leases`` (a row per shard: owner, owner_url, epoch, expires_at) and
``walletd_members`` (live processes, for the fair share; and where each one's internal
listener takes transfer legs, migration internal_listener). Expiry is set by the database's
clock; a process measures its own validity on its monotonic clock from the moment it *sent*
the renewal, so it always stops serving before the database can hand the shard to anyone::

    t_send ─── renewal ──▶ database: expires_at = now() + ttl   (now() ≥ t_send)
    local deadline = t_send + ttl − margin                      (margin = ttl / 4)

One step of the keeper, every ``ttl / 4`` on its own connection:

    1. heartbeat the member row; renew every held lease whose epoch is unchanged
       (a shard not renewed is lost: not served from that instant)
    2. read the whole table (ownership table: forwarding, metrics, /cluster)
    3. fair share = ceil(shards / live members);
       below it: claim free or expired shards (epoch + 1), then drop the memory of
       their pipelines and serve them;
       above it: stop serving up to ``moves_max`` shards, wait (bounded) for their
       commands in flight, release them (owner NULL, expired at once)

Claims stop at the fair share and releases start above it, so a stable membership does not
flap. A killed process's shards are free ``ttl`` after its last renewal and claimed at the
survivors' next step: kill → serving within ttl + ttl / 4 (3.75 s with the default 3 s).

Exceptions: ``ShardCountMismatch`` (a DatabaseError) at start when the configured shard count
differs from the database's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass

import asyncpg

from walletd.engine.ownership import OwnerInfo, Ownership
from walletd.persistence.database import DatabaseBusy, DatabaseError, connect

__all__ = [
    "LEASE_TTL_S_DEFAULT",
    "OPERATOR_OWNER",
    "LeaseKeeper",
    "LeaseSettings",
    "ShardCountMismatch",
    "describe_leases",
    "ensure_cluster",
    "hold_every_lease",
    "new_owner_id",
    "ownership_table",
]

_log = logging.getLogger("walletd.leases")

LEASE_TTL_S_DEFAULT = 3.0
# The owner name `walletd restore` holds every lease under while it rewrites snapshots.
OPERATOR_OWNER = "walletd-operator"
# How long an expired member row is kept before it is deleted (it only feeds the fair share).
_MEMBER_FORGET = "1 hour"


class ShardCountMismatch(DatabaseError):
    """The configured shard count is not the one stored in the database."""


def new_owner_id() -> str:
    """Unique per process start: host, pid and a random tag (a restarted pid is new)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


@dataclass(frozen=True, slots=True)
class LeaseSettings:
    owner: str
    url: str
    lease_ttl_s: float = LEASE_TTL_S_DEFAULT
    moves_max: int = 8
    # Where this process's internal listener takes transfer legs (None: it takes none).
    internal_url: str | None = None

    def __post_init__(self) -> None:
        if not 0.2 <= self.lease_ttl_s <= 600:
            raise ValueError("lease_ttl_s must be within 0.2..600")
        if self.moves_max < 1:
            raise ValueError("moves_max must be at least 1")

    @property
    def step_s(self) -> float:
        return self.lease_ttl_s / 4

    @property
    def margin_s(self) -> float:
        return self.lease_ttl_s / 4


_ENSURE_CLUSTER = """
WITH cluster AS (
    INSERT INTO walletd_cluster (shard_count) VALUES ($1)
    ON CONFLICT (singleton) DO NOTHING RETURNING shard_count
)
INSERT INTO walletd_shard_leases (shard)
SELECT s FROM cluster, generate_series(0, cluster.shard_count - 1) AS s
"""


async def ensure_cluster(connection: asyncpg.Connection, shard_count: int) -> int:
    """Store the shard count and its lease rows on first use; refuse another count."""
    async with connection.transaction():
        await connection.execute("LOCK TABLE walletd_cluster IN EXCLUSIVE MODE")
        await connection.execute(_ENSURE_CLUSTER, shard_count)
        stored = int(await connection.fetchval("SELECT shard_count FROM walletd_cluster"))
    if stored != shard_count:
        raise ShardCountMismatch(
            f"this database's cluster has {stored} shards, walletd was started with "
            f"{shard_count}; start it with --shards {stored} (the count cannot change)"
        )
    return stored


# The owner's internal listener (transfer legs) is in its member row, heartbeated in the
# same transaction as its renewals: a live lease has a live member row beside it.
_TABLE = """
SELECT l.shard, l.owner, l.owner_url, l.epoch, l.expires_at > now() AS live, m.internal_url
  FROM walletd_shard_leases AS l LEFT JOIN walletd_members AS m ON m.owner = l.owner
 ORDER BY l.shard
"""


async def ownership_table(connection: asyncpg.Connection) -> dict[int, OwnerInfo]:
    rows = await connection.fetch(_TABLE)
    return {row[0]: OwnerInfo(row[1], row[2], row[3], row[4], row[5]) for row in rows}


_DESCRIBE = """
SELECT l.shard, l.owner, l.owner_url, l.epoch,
       CASE WHEN l.owner IS NULL THEN 'free'
            WHEN l.expires_at > now() THEN 'live' ELSE 'expired' END,
       extract(epoch FROM l.expires_at - now())::float8
  FROM walletd_shard_leases AS l ORDER BY l.shard
"""


async def describe_leases(connection: asyncpg.Connection) -> str:
    """The whole ownership table as text: one line per shard, then one per live member."""
    lines = [f"{'shard':>5}  {'state':<7}  {'epoch':>6}  {'expires in':>10}  owner (url)"]
    for shard, owner, url, epoch, state, left_s in await connection.fetch(_DESCRIBE):
        left = f"{left_s:.1f} s" if state == "live" else "-"
        who = f"{owner} ({url})" if owner else "-"
        lines.append(f"{shard:>5}  {state:<7}  {epoch:>6}  {left:>10}  {who}")
    members = await connection.fetch(
        "SELECT owner, url FROM walletd_members WHERE expires_at > now() ORDER BY owner"
    )
    lines.append(f"{len(members)} live walletd processes")
    lines += [f"  {owner} {url}" for owner, url in members]
    return "\n".join(lines)


_HEARTBEAT = """
INSERT INTO walletd_members (owner, url, expires_at, internal_url)
VALUES ($1, $2, now() + make_interval(secs => $3), $4)
ON CONFLICT (owner) DO UPDATE SET url = EXCLUDED.url, expires_at = EXCLUDED.expires_at,
                                  internal_url = EXCLUDED.internal_url
"""
_LIVE_MEMBERS = "SELECT count(*) FROM walletd_members WHERE expires_at > now()"
_FORGET_MEMBERS = (
    f"DELETE FROM walletd_members WHERE expires_at < now() - interval '{_MEMBER_FORGET}'"
)
_RENEW = """
UPDATE walletd_shard_leases AS l
   SET expires_at = now() + make_interval(secs => $4)
  FROM unnest($2::integer[], $3::bigint[]) AS h(shard, epoch)
 WHERE l.shard = h.shard AND l.epoch = h.epoch AND l.owner = $1
RETURNING l.shard, l.epoch
"""
# FOR UPDATE conflicts with the fence's FOR KEY SHARE: the epoch is bumped only when no
# append of the old epoch is in flight (SKIP LOCKED: such a row is left for a later step).
# Renewals and releases are plain UPDATEs of non-key columns, which appends do not block.
_CLAIM = """
UPDATE walletd_shard_leases AS l
   SET owner = $1, owner_url = $2, epoch = l.epoch + 1,
       expires_at = now() + make_interval(secs => $3)
 WHERE l.shard IN (SELECT shard FROM walletd_shard_leases
                    WHERE owner IS NULL OR expires_at <= now()
                    ORDER BY random() LIMIT $4 FOR UPDATE SKIP LOCKED)
   AND (l.owner IS NULL OR l.expires_at <= now())
RETURNING l.shard, l.epoch
"""
_RELEASE = """
UPDATE walletd_shard_leases AS l
   SET owner = NULL, owner_url = NULL, expires_at = '-infinity'
  FROM unnest($2::integer[], $3::bigint[]) AS h(shard, epoch)
 WHERE l.shard = h.shard AND l.epoch = h.epoch AND l.owner = $1
"""
_LEAVE = "DELETE FROM walletd_members WHERE owner = $1"


class LeaseKeeper:
    """Claims, renews and releases this process's shard leases; see the module docstring.

    ``forget`` is the engine's ``forget_shards``: called before a gained shard is served.
    ``drain`` is the engine's ``drain_shards``: a release waits (bounded) for the shards'
    commands in flight.
    """

    def __init__(
        self,
        dsn: str,
        ownership: Ownership,
        settings: LeaseSettings,
        *,
        forget: Callable[[Iterable[int]], Awaitable[None]],
        drain: Callable[[list[int], float], Awaitable[bool]],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._dsn = dsn
        self._ownership = ownership
        self._settings = settings
        self._forget = forget
        self._drain = drain
        self._clock = clock
        ownership.table_stale_s = settings.lease_ttl_s
        self._connection: asyncpg.Connection | None = None
        self._task: asyncio.Task[None] | None = None
        self._readying: set[asyncio.Task[None]] = set()
        self.last_step_at: float | None = None
        self.live_members = 0
        # Set by ``leave``: the next step hands every shard over and stops claiming.
        self._leaving = False
        self._left = asyncio.Event()

    @property
    def settings(self) -> LeaseSettings:
        return self._settings

    async def _conn(self) -> asyncpg.Connection:
        if self._connection is None or self._connection.is_closed():
            self._connection = await connect(self._dsn, self._settings.step_s * 2)
        return self._connection

    def _drop_connection(self) -> None:
        if self._connection is not None:
            self._connection.terminate()
            self._connection = None

    async def step(self) -> None:
        """One round: heartbeat + renew, read the table, claim or release toward the share."""
        settings = self._settings
        ownership = self._ownership
        timeout_s = settings.step_s * 2
        connection = await self._conn()
        held = ownership.held()
        if self._leaving:
            await self._hand_over(connection)
            return
        sent_at = self._clock()
        async with connection.transaction():
            await connection.execute(
                _HEARTBEAT, settings.owner, settings.url, settings.lease_ttl_s,
                settings.internal_url, timeout=timeout_s,
            )  # fmt: skip
            renewed = await connection.fetch(
                _RENEW, settings.owner, list(held), list(held.values()),
                settings.lease_ttl_s, timeout=timeout_s,
            )  # fmt: skip
        deadline = sent_at + settings.lease_ttl_s - settings.margin_s
        kept = {row[0] for row in renewed}
        for row in renewed:
            ownership.renewed(row[0], row[1], deadline)
        lost = [shard for shard in held if shard not in kept]
        if lost:
            ownership.lost(lost)
            self._ownership.moves["lost"] += len(lost)
            _log.warning("lost the leases of %d shards: %s", len(lost), lost)
        ownership.set_table(await ownership_table(connection))
        self.live_members = max(1, int(await connection.fetchval(_LIVE_MEMBERS)))
        fair = math.ceil(ownership.shard_count / self.live_members)
        held_now = len(ownership.held())
        if held_now < fair:
            await self._claim(connection, fair - held_now)
        elif held_now > fair:
            await self._release(connection, held_now - fair)
        self.last_step_at = self._clock()

    async def leave(self, timeout_s: float) -> bool:
        """Hand every shard over before this process stops, while it still serves HTTP:
        the next step releases them all (each drained first) and leaves the members, so
        the other processes take them at once, and from then on only reads the ownership
        table, so requests that still arrive here are forwarded to the new owners. False
        when that did not happen within ``timeout_s`` (``stop`` releases them then).
        Alone in the cluster there is nobody to take them: it keeps serving them."""
        if self.live_members <= 1:
            return True
        self._leaving = True
        try:
            await asyncio.wait_for(self._left.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def _hand_over(self, connection: asyncpg.Connection) -> None:
        if not self._left.is_set():
            await self.release(list(self._ownership.held()), connection)
            await connection.execute(
                _LEAVE, self._settings.owner, timeout=self._settings.step_s * 2
            )
            self._left.set()
        self._ownership.set_table(await ownership_table(connection))
        self.last_step_at = self._clock()

    async def _claim(self, connection: asyncpg.Connection, count: int) -> None:
        settings = self._settings
        sent_at = self._clock()
        rows = await connection.fetch(
            _CLAIM, settings.owner, settings.url, settings.lease_ttl_s, count,
            timeout=settings.step_s * 2,
        )  # fmt: skip
        if not rows:
            return
        deadline = sent_at + settings.lease_ttl_s - settings.margin_s
        gained = [row[0] for row in rows]
        for row in rows:
            self._ownership.gained(row[0], row[1], deadline)
            self._ownership.table[row[0]] = OwnerInfo(
                settings.owner, settings.url, row[1], True, settings.internal_url
            )
        self._ownership.moves["gained"] += len(gained)
        _log.info("gained %d shards: %s", len(gained), sorted(gained))
        # Dropping a pipeline's memory waits for its batches in flight: off the keeper's path,
        # so renewals never wait for it.
        task = asyncio.create_task(self._make_ready(gained))
        self._readying.add(task)
        task.add_done_callback(self._readying.discard)

    async def _make_ready(self, shards: list[int]) -> None:
        await self._forget(shards)
        self._ownership.memory_ready(shards)

    async def _release(self, connection: asyncpg.Connection, count: int) -> None:
        held = self._ownership.held()
        chosen = sorted(held)[-min(count, self._settings.moves_max) :]
        await self.release(chosen, connection)

    async def release(
        self, shards: list[int], connection: asyncpg.Connection | None = None
    ) -> None:
        """Stop serving, wait (≤ one step) for the shards' commands in flight, release."""
        ownership = self._ownership
        held = ownership.held()
        shards = [shard for shard in shards if shard in held]
        if not shards:
            return
        ownership.withhold(shards)
        await self._drain(shards, self._settings.step_s)
        connection = connection or await self._conn()
        await connection.execute(
            _RELEASE, self._settings.owner, shards, [held[s] for s in shards],
            timeout=self._settings.step_s * 2,
        )  # fmt: skip
        ownership.lost(shards)
        self._ownership.moves["released"] += len(shards)
        _log.info("released %d shards: %s", len(shards), shards)

    async def start(self) -> None:
        """The first step (claims this process's share), then the loop in the background."""
        await self.step()
        self._task = asyncio.create_task(self._run(), name="walletd-leases")

    async def ready(self, timeout_s: float) -> None:
        """Wait until every gained shard is served (its pipeline's memory dropped)."""
        if self._readying:
            await asyncio.wait_for(asyncio.gather(*self._readying), timeout_s)

    async def settle(self, timeout_s: float) -> bool:
        """Wait (bounded) until every shard has a live owner and this process holds some.

        After a crash, the restarted process finds the dead one's leases live until they
        expire (one ttl): listening before it holds them would answer NOT_OWNER for all of
        its shards. A process joining a cluster waits for its first shards to be released to
        it. False on timeout (more processes than shards: some legitimately hold none)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not (self._ownership.settled() and self._ownership.held()):
            left_s = deadline - loop.time()
            if left_s <= 0 or not await self._ownership.next_table(left_s):
                return False
        await self.ready(max(0.0, deadline - loop.time()))
        return True

    async def _run(self) -> None:
        step_s = self._settings.step_s
        while True:
            started = self._clock()
            try:
                await self.step()
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError,
                    DatabaseError) as error:  # fmt: skip
                # Leases lapse by themselves past their local deadline: nothing else to do.
                _log.warning("lease step failed: %r", error)
                self._drop_connection()
            await asyncio.sleep(max(0.0, step_s - (self._clock() - started)))

    async def stop(self) -> None:
        """Stop renewing and release every lease (after the engine drained)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for task in list(self._readying):
            task.cancel()
        try:
            await self.release(list(self._ownership.held()))
            connection = await self._conn()
            await connection.execute(_LEAVE, self._settings.owner, timeout=self._settings.step_s)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError,
                DatabaseError) as error:  # fmt: skip
            _log.warning("could not release the leases (they expire by themselves): %r", error)
        finally:
            self._ownership.lost(list(self._ownership.held()))
            if self._connection is not None:
                with contextlib.suppress(OSError, TimeoutError, asyncpg.InterfaceError):
                    await asyncio.wait_for(self._connection.close(), 2.0)
                self._drop_connection()


_LIVE_LEASES = (
    "SELECT count(*) FROM walletd_shard_leases WHERE owner IS NOT NULL AND expires_at > now()"
)
_HOLD_ALL = """
UPDATE walletd_shard_leases
   SET owner = $1, owner_url = NULL, epoch = epoch + 1, expires_at = 'infinity'
"""
_FREE_ALL = """
UPDATE walletd_shard_leases SET owner = NULL, expires_at = '-infinity' WHERE owner = $1
"""


@contextlib.asynccontextmanager
async def hold_every_lease(connection: asyncpg.Connection) -> AsyncIterator[None]:
    """For an operator command that must run with no server serving (``walletd restore``).

    Refuses with ``DatabaseBusy`` while any lease is live. Otherwise takes every lease for
    the operator with a bumped epoch and no expiry, so no server can claim a shard, and a
    server that still believed it held one is refused by the fence, until it is given back.
    """
    async with connection.transaction():
        # EXCLUSIVE waits for appends in flight (their fence holds the rows FOR KEY SHARE).
        await connection.execute("LOCK TABLE walletd_shard_leases IN EXCLUSIVE MODE")
        live = int(await connection.fetchval(_LIVE_LEASES))
        if live:
            raise DatabaseBusy(
                f"walletd servers hold {live} live shard leases on this database; stop them "
                "(or wait for their leases to expire) before running this command"
            )
        await connection.execute(_HOLD_ALL, OPERATOR_OWNER)
    try:
        yield
    finally:
        await connection.execute(_FREE_ALL, OPERATOR_OWNER)
