"""The shard hash is part of walletd's storage contract: fixed vectors keep it stable."""

from __future__ import annotations

import asyncio
from uuid import UUID

import pytest

from tests.engine_doubles import ControlledLog
from walletd.engine.limits import EngineLimits
from walletd.engine.router import Engine, shard_of

# (wallet id, IEEE CRC-32 of its 16 bytes, shard for 1, 2, 4, 8, 16, 1024 shards).
# 0xECBB4B55 is the published CRC-32 of sixteen zero bytes: the vectors are not just
# whatever the code printed once.
VECTORS = [
    ("00000000-0000-0000-0000-000000000000", 0xECBB4B55, [0, 1, 1, 5, 5, 853]),
    ("00000000-0000-0000-0000-000000000001", 2612820931, [0, 1, 3, 3, 3, 963]),
    ("6f1c9a52-3f0e-4d8e-9d0a-5b7f2c1e8a44", 3019952930, [0, 0, 2, 2, 2, 802]),
    ("ffffffff-ffff-ffff-ffff-ffffffffffff", 1068746266, [0, 0, 2, 2, 10, 538]),
    ("123e4567-e89b-12d3-a456-426614174000", 2894570992, [0, 0, 0, 0, 0, 496]),
]
SHARD_COUNTS = [1, 2, 4, 8, 16, 1024]


@pytest.mark.parametrize(("wallet_id", "crc", "shards"), VECTORS)
def test_shard_of_matches_fixed_vectors(wallet_id: str, crc: int, shards: list[int]) -> None:
    """shard_of is crc32(uuid.bytes) % shards, bit for bit, for every shard count."""
    assert [shard_of(UUID(wallet_id), n) for n in SHARD_COUNTS] == shards
    assert [crc % n for n in SHARD_COUNTS] == shards


async def test_the_engine_routes_by_shard_of() -> None:
    """A command for a wallet lands in the mailbox of shard_of(wallet, shards)."""
    engine = Engine(
        ControlledLog(), EngineLimits(shards=8, batch_ops_max=4, mailbox_commands_max=8)
    )
    wallet = UUID(VECTORS[0][0])  # shard 5 of 8; the engine is not started, so it stays queued
    future = asyncio.ensure_future(engine.read(wallet))
    await asyncio.sleep(0)
    assert engine.mailbox_depths() == [0, 0, 0, 0, 0, 1, 0, 0]
    future.cancel()
