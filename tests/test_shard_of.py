"""shard_of, remembered: the same shard as the hash of the id's canonical text, for either
UUID type walletd meets (parsed from requests; read back by asyncpg), for every shard count,
past the memo's bound."""

from __future__ import annotations

import random
import uuid
import zlib

import asyncpg.pgproto.pgproto as pgproto

from walletd.engine.ownership import SHARD_MEMO_ENTRIES, shard_of, shard_of_text


def _expected(wallet_id: uuid.UUID, shard_count: int) -> int:
    return zlib.crc32(str(wallet_id).lower().encode("ascii")) % shard_count


def test_shard_of_is_the_hash_of_the_canonical_text_for_both_uuid_types() -> None:
    rng = random.Random(20261207)
    ids = [uuid.UUID(int=rng.getrandbits(128)) for _ in range(SHARD_MEMO_ENTRIES + 2_000)]
    # Twice over: the second pass meets remembered ids (the first 2,000 pushed out again).
    for _ in range(2):
        for number, wallet_id in enumerate(ids):
            count = (1, 7, 64, 4096)[number % 4]
            expected = _expected(wallet_id, count)
            assert shard_of(wallet_id, count) == expected, wallet_id
            assert shard_of_text(str(wallet_id).upper(), count) == expected
    for wallet_id in ids[:2_000]:
        same = pgproto.UUID(str(wallet_id))
        for count in (1, 7, 64, 4096):  # one id under several counts: each its own answer
            assert shard_of(same, count) == _expected(wallet_id, count)
            assert shard_of(wallet_id, count) == _expected(wallet_id, count)
