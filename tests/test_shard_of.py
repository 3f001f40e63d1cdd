"""shard_of, remembered: the same shard as the hash of the id's canonical text, for either
UUID type walletd meets (parsed from requests; read back by asyncpg), for every shard count,
past the memo's bound, whatever the bound (a setting)."""

from __future__ import annotations

import random
import uuid
import zlib
from argparse import Namespace

import asyncpg.pgproto.pgproto as pgproto
import pytest

from walletd.cli.config import SETTINGS, load_config
from walletd.engine import ownership
from walletd.engine.ownership import (
    SHARD_MEMO_ENTRIES,
    SHARD_MEMO_ENTRIES_MAX,
    set_shard_memo_entries,
    shard_of,
    shard_of_text,
)


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


def test_the_memo_bound_is_a_setting_and_any_bound_gives_the_same_shards() -> None:
    """WALLETD_SHARD_MEMO_ENTRIES bounds the memo (least recently used forgotten past it; 0
    hashes every time); the answers do not depend on it; out-of-range values are refused."""
    rng = random.Random(7)
    ids = [uuid.UUID(int=rng.getrandbits(128)) for _ in range(300)]
    try:
        for entries in (0, 1, 100):
            set_shard_memo_entries(entries)
            for _ in range(2):
                assert [shard_of(i, 64) for i in ids] == [_expected(i, 64) for i in ids]
            info = getattr(ownership._shard_of_int, "cache_info", None)
            if entries:
                # Bounded: 300 ids seen, ``entries`` remembered.
                assert info is not None
                assert (info().maxsize, info().currsize) == (entries, entries)
            else:
                assert info is None  # the plain hash, no memo
        for wrong in (-1, SHARD_MEMO_ENTRIES_MAX + 1):
            with pytest.raises(ValueError, match="shard memo entries"):
                set_shard_memo_entries(wrong)
    finally:
        set_shard_memo_entries(SHARD_MEMO_ENTRIES)
    flags = Namespace(**{setting.name: None for setting in SETTINGS})
    assert load_config(flags, {}).shard_memo_entries == SHARD_MEMO_ENTRIES
    assert load_config(flags, {"WALLETD_SHARD_MEMO_ENTRIES": "0"}).shard_memo_entries == 0
    for bad in ("-1", str(SHARD_MEMO_ENTRIES_MAX + 1), "lots"):
        with pytest.raises(ValueError, match="WALLETD_SHARD_MEMO_ENTRIES"):
            load_config(flags, {"WALLETD_SHARD_MEMO_ENTRIES": bad})
