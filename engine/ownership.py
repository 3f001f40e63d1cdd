"""Which shards this process may serve now, and under which epoch (fencing token).

The shard is the unit of ownership and routing: ``shard_of(id) = crc32(canonical lowercase
id text) % shard_count``, which a proxy can compute from the path. A process serves a shard
only while it holds its lease; the lease keeper (persistence/leases.py) sets what is held.

Each owned shard carries:

- its **epoch**, which every batch writing the shard carries to the database, where the
  fence refuses it once a successor has bumped the epoch;
- its **deadline** on this process's monotonic clock: the send time of the last renewal that
  the database confirmed, plus the lease's time to live, minus a safety margin. Past it the
  database may already have expired the lease, so the process stops answering for the shard,
  reads included (``serving`` is checked on every request, the resident fast path too);
- whether its **memory is ready**: a shard gained with a new epoch is served only after the
  engine dropped what it remembered of the shard's wallets, since another process may have
  changed them meanwhile.

Everything here runs on the event loop thread; the keeper and the request handlers share it.
"""

from __future__ import annotations

import asyncio
import functools
import math
import os
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from uuid import UUID

from walletd.engine.ids import new_uuid4

__all__ = [
    "SHARD_COUNT_MAX",
    "SHARD_MEMO_ENTRIES",
    "SHARD_MEMO_ENTRIES_MAX",
    "OwnerInfo",
    "Ownership",
    "random_id_on_shard",
    "set_shard_memo_entries",
    "shard_of",
    "shard_of_text",
    "shard_of_unremembered",
]

SHARD_COUNT_MAX = 4096


def shard_of_text(wallet_id_text: str, shard_count: int) -> int:
    """The shard of a wallet id written in canonical form (8-4-4-4-12 hex, any case)."""
    return zlib.crc32(wallet_id_text.lower().encode("ascii")) % shard_count


# Wallets whose shard is remembered, by default (~200 bytes each): a hit costs ~0.1 µs, a
# miss what the hash costs without it (~0.6-1 µs). The shard is computed for every request
# routed and for every wallet a batch's fence covers, several times per operation (a tenth
# of walletd's CPU on 1,000-item bulk requests on 10,000 wallets, py-spy); wallets busier
# than this many mostly hit, the others pay the plain hash. Past the bound the least
# recently used entry goes (`functools.lru_cache`). `walletd serve` sets it from
# WALLETD_SHARD_MEMO_ENTRIES (``set_shard_memo_entries``; 0 = no memo).
SHARD_MEMO_ENTRIES = 32_768
SHARD_MEMO_ENTRIES_MAX = 4_194_304


def shard_of(wallet_id: UUID, shard_count: int) -> int:
    return _shard_of_int(wallet_id.int, shard_count)


def _shard_hash(value: int, shard_count: int) -> int:
    # The canonical lowercase 8-4-4-4-12 form (what str(UUID) writes, and HAProxy sees after
    # `lower`), written from the integer: the same for uuid.UUID and asyncpg's UUID.
    h = f"{value:032x}"
    text = f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
    return zlib.crc32(text.encode("ascii")) % shard_count


_shard_of_int: Callable[[int, int], int] = functools.lru_cache(maxsize=SHARD_MEMO_ENTRIES)(
    _shard_hash
)


def shard_of_unremembered(wallet_id: UUID, shard_count: int) -> int:
    """``shard_of`` without the memo: for ids drawn and mostly thrown away (a hold's id is
    drawn until it lands on its wallet's shard), which would otherwise push the shards of
    real wallets out of it."""
    return _shard_hash(wallet_id.int, shard_count)


# Hex digits of an id's text that random_id_on_shard draws again (the node field, 48
# random bits), and how many such tails one os.urandom call provides.
_TAIL_DIGITS = 12
_TAILS_PER_READ = 256


def random_id_on_shard(target: int, shard_count: int, tries_max: int) -> UUID | None:
    """A random version 4 id whose shard is ``target``, or None after ``tries_max`` tries.

    The shard is the CRC-32 of the id's text, and CRC-32 can go on from the CRC of a prefix:
    so the first 24 characters (random, with the version and variant) are drawn and hashed
    once, and each try draws and hashes only the last 12 hex digits. For a given prefix
    every tail is equally likely to be kept among those on the shard, so the id is as
    random as a whole one drawn again each time (74 + 48 random bits)."""
    text = str(new_uuid4())
    prefix = text[:-_TAIL_DIGITS]
    prefix_crc = zlib.crc32(prefix.encode("ascii"))
    tries = 0
    while tries < tries_max:
        tails = os.urandom(_TAILS_PER_READ * _TAIL_DIGITS // 2).hex().encode("ascii")
        end = min(len(tails), (tries_max - tries) * _TAIL_DIGITS)
        for start in range(0, end, _TAIL_DIGITS):
            tail = tails[start : start + _TAIL_DIGITS]
            if zlib.crc32(tail, prefix_crc) % shard_count == target:
                return UUID(prefix + tail.decode("ascii"))
        tries += end // _TAIL_DIGITS
    return None


def set_shard_memo_entries(entries: int) -> None:
    """Remember the shards of at most ``entries`` wallets (0: none, every call hashes).
    The memo starts empty; a pure function's memo, so any size gives the same answers."""
    global _shard_of_int
    if not 0 <= entries <= SHARD_MEMO_ENTRIES_MAX:
        raise ValueError(f"shard memo entries must be within 0..{SHARD_MEMO_ENTRIES_MAX}")
    _shard_of_int = functools.lru_cache(maxsize=entries)(_shard_hash) if entries else _shard_hash


@dataclass(frozen=True, slots=True)
class OwnerInfo:
    """A row of the ownership table as last read from the database."""

    owner: str | None
    url: str | None  # the public listener: requests forwarded by path
    epoch: int
    live: bool
    # The internal listener, where transfer legs are delivered (None: unknown, send none).
    internal_url: str | None = None


class _Held:
    __slots__ = ("deadline", "epoch", "ready")

    def __init__(self, epoch: int, deadline: float) -> None:
        self.epoch = epoch
        self.deadline = deadline
        self.ready = False


class Ownership:
    """The shards this process holds, their epochs and deadlines; and the last table read.

    ``Ownership.everything(n)`` holds every shard forever with no epoch: an engine alone
    (tests, tools) that no other process competes with; its batches carry no fence.
    """

    def __init__(self, shard_count: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        if not 1 <= shard_count <= SHARD_COUNT_MAX:
            raise ValueError(f"shard_count must be within 1..{SHARD_COUNT_MAX}")
        self.shard_count = shard_count
        self._clock = clock
        self._held: dict[int, _Held] = {}
        self._unfenced = False
        self.table: dict[int, OwnerInfo] = {}
        # When the table was last read (this clock), and how old it may get before the
        # process counts as cut off from PostgreSQL (set by the lease keeper: the lease ttl).
        self.table_read_at: float | None = None
        self.table_stale_s = math.inf
        self._table_read = asyncio.Event()
        # Shards gained / lost (not renewed, stale epoch) / released since start (metrics).
        self.moves: dict[str, int] = {"gained": 0, "lost": 0, "released": 0}
        # Told which gained shards became served (the engine's re-drive takes them over).
        self.on_ready: Callable[[Iterable[int]], None] | None = None

    @classmethod
    def everything(cls, shard_count: int) -> Ownership:
        ownership = cls(shard_count)
        ownership._unfenced = True
        return ownership

    @property
    def fenced(self) -> bool:
        return not self._unfenced

    def serving(self, shard: int) -> bool:
        """True while this process may answer for the shard (checked on every request)."""
        if self._unfenced:
            return True
        held = self._held.get(shard)
        return held is not None and held.ready and self._clock() < held.deadline

    def epoch(self, shard: int) -> int | None:
        """The epoch to fence a write of the shard with; None when it is not held now."""
        held = self._held.get(shard)
        if held is None or self._clock() >= held.deadline:
            return None
        return held.epoch

    def held(self) -> dict[int, int]:
        """Every shard held (lapsed locally or not), with its epoch: what the keeper renews."""
        return {shard: held.epoch for shard, held in self._held.items()}

    def served(self) -> list[int]:
        return sorted(shard for shard in self._held if self.serving(shard))

    def gained(self, shard: int, epoch: int, deadline: float) -> None:
        """A lease taken with a new epoch; not served until ``memory_ready``."""
        self._held[shard] = _Held(epoch, deadline)

    def memory_ready(self, shards: Iterable[int]) -> None:
        ready = []
        for shard in shards:
            held = self._held.get(shard)
            if held is not None:
                held.ready = True
                ready.append(shard)
        if ready and self.on_ready is not None:
            self.on_ready(ready)

    def renewed(self, shard: int, epoch: int, deadline: float) -> None:
        held = self._held.get(shard)
        if held is not None and held.epoch == epoch:
            held.deadline = max(held.deadline, deadline)

    def lost(self, shards: Iterable[int]) -> None:
        """Stop serving these shards at once (lease not renewed, stale epoch, released)."""
        for shard in shards:
            self._held.pop(shard, None)

    def withhold(self, shards: Iterable[int]) -> None:
        """Stop serving before a release: requests are forwarded, the lease is still held."""
        for shard in shards:
            held = self._held.get(shard)
            if held is not None:
                held.ready = False

    def set_table(self, table: dict[int, OwnerInfo]) -> None:
        """A fresh read of the whole table; wakes whoever waits for one."""
        self.table = table
        self.table_read_at = self._clock()
        self._table_read.set()
        self._table_read = asyncio.Event()

    async def next_table(self, timeout_s: float) -> bool:
        """Wait for the next table read; False when ``timeout_s`` passed first."""
        try:
            await asyncio.wait_for(self._table_read.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    def table_stale(self) -> bool:
        """True when the table was not read for longer than a lease lasts: this process
        cannot reach PostgreSQL, so it cannot tell who owns a shard."""
        read_at = self.table_read_at
        return read_at is None or self._clock() - read_at > self.table_stale_s

    def settled(self) -> bool:
        """Every shard has a live owner in the last table read."""
        table = self.table
        return len(table) == self.shard_count and all(i.live for i in table.values())

    def owner_url(self, shard: int) -> str | None:
        """Where the last table read says the shard's live owner listens."""
        info = self.table.get(shard)
        if info is None or not info.live:
            return None
        return info.url

    def owner_internal_url(self, shard: int) -> str | None:
        """Where the last table read says the shard's live owner takes transfer legs."""
        info = self.table.get(shard)
        if info is None or not info.live:
            return None
        return info.internal_url
