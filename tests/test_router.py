"""The shard function is part of walletd's storage and routing contract: fixed vectors keep it
stable, and a bitwise CRC-32 written here from the IEEE definition checks zlib's."""

from __future__ import annotations

import asyncio
from uuid import UUID

import pytest

from tests.engine_doubles import ControlledLog
from walletd.engine.errors import NotOwner
from walletd.engine.limits import EngineLimits
from walletd.engine.ownership import Ownership, shard_of, shard_of_text
from walletd.engine.router import Engine

# (wallet id, IEEE CRC-32 of its canonical lowercase text, shard for 1, 2, 4, 8, 16, 64, 1024).
VECTORS = [
    ("00000000-0000-0000-0000-000000000000", 0x8151DA89, [0, 1, 1, 1, 9, 9, 649]),
    ("00000000-0000-0000-0000-000000000001", 0xF656EA1F, [0, 1, 3, 7, 15, 31, 543]),
    ("6f1c9a52-3f0e-4d8e-9d0a-5b7f2c1e8a44", 0xCD44B2AA, [0, 0, 2, 2, 10, 42, 682]),
    ("ffffffff-ffff-ffff-ffff-ffffffffffff", 0x5289E08F, [0, 1, 3, 7, 15, 15, 143]),
    ("123e4567-e89b-12d3-a456-426614174000", 0xBA07B9B6, [0, 0, 2, 6, 6, 54, 438]),
]
SHARD_COUNTS = [1, 2, 4, 8, 16, 64, 1024]


def bitwise_crc32(data: bytes) -> int:
    """CRC-32/ISO-HDLC (IEEE 802.3): reflected polynomial 0xEDB88320, init and xorout ~0."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0xEDB88320 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def test_the_reference_crc_has_the_published_check_value() -> None:
    """The bitwise CRC-32 gives 0xCBF43926 for "123456789", the catalogue's check value."""
    assert bitwise_crc32(b"123456789") == 0xCBF43926


@pytest.mark.parametrize(("wallet_id", "crc", "shards"), VECTORS)
def test_shard_of_matches_fixed_vectors(wallet_id: str, crc: int, shards: list[int]) -> None:
    """shard_of is crc32(canonical lowercase id text) % count, for every count, any case."""
    assert bitwise_crc32(wallet_id.encode()) == crc
    assert [shard_of(UUID(wallet_id), n) for n in SHARD_COUNTS] == shards
    assert [shard_of_text(wallet_id.upper(), n) for n in SHARD_COUNTS] == shards
    assert [crc % n for n in SHARD_COUNTS] == shards


async def test_the_engine_routes_by_shard_of() -> None:
    """A command for a wallet lands in the mailbox of pipeline shard_of(wallet) % pipelines."""
    engine = Engine(
        ControlledLog(), EngineLimits(pipelines=8, batch_ops_max=4, mailbox_commands_max=8)
    )
    wallet = UUID(VECTORS[0][0])  # shard 1 of 8; the engine is not started, so it stays queued
    future = asyncio.ensure_future(engine.read(wallet))
    await asyncio.sleep(0)
    assert engine.mailbox_depths() == [0, 1, 0, 0, 0, 0, 0, 0]
    future.cancel()


async def test_the_engine_admits_nothing_for_a_shard_it_does_not_serve() -> None:
    """Reads (the resident path too), writes and creations of an unserved shard raise NotOwner,
    and nothing reaches a mailbox; once the lease is held and memory ready, they are admitted."""
    clock = [0.0]
    ownership = Ownership(64, clock=lambda: clock[0])
    engine = Engine(ControlledLog(), EngineLimits(pipelines=2), ownership=ownership)
    wallet = UUID(VECTORS[2][0])  # shard 42 of 64
    with pytest.raises(NotOwner) as refused:
        engine.read_resident(wallet)
    assert refused.value.shard == 42
    with pytest.raises(NotOwner):
        await engine.read(wallet)
    with pytest.raises(NotOwner):
        await engine.create_wallet(wallet, None)
    assert engine.mailbox_depths() == [0, 0]
    ownership.gained(42, epoch=3, deadline=10.0)
    with pytest.raises(NotOwner):  # gained, but its memory is not dropped yet
        engine.read_resident(wallet)
    ownership.memory_ready([42])
    assert engine.read_resident(wallet) is None  # admitted: not resident
    clock[0] = 10.0  # the local deadline: the lease may have lapsed in the database
    with pytest.raises(NotOwner):
        engine.read_resident(wallet)
    assert ownership.epoch(42) is None
