"""A hold's id lands on its wallet's shard (engine/holds.py, engine/ownership.py): drawn
ones as random as uuid4, keyed ones exactly the uuid5 they always were, and neither fills
the shard memo with the candidates it throws away."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from walletd.engine import ownership
from walletd.engine.holds import HOLD_KEY_NAMESPACE, new_hold_id
from walletd.engine.ownership import (
    SHARD_MEMO_ENTRIES,
    random_id_on_shard,
    set_shard_memo_entries,
    shard_of,
    shard_of_text,
)

SHARD_COUNTS = (1, 2, 7, 64, 4096)


def _first_keyed_on_shard(wallet: uuid.UUID, key: str, shard_count: int) -> uuid.UUID:
    """The definition: uuid5 of "<wallet>:<counter>:<key>" for counter 0, 1, ..., the first
    on the wallet's shard (hash of the id's text, as the proxy computes it)."""
    target = shard_of_text(str(wallet), shard_count)
    for counter in range(100_000):
        candidate = uuid.uuid5(HOLD_KEY_NAMESPACE, f"{wallet}:{counter}:{key}")
        if shard_of_text(str(candidate), shard_count) == target:
            return candidate
    raise AssertionError("no candidate on the shard")


@pytest.fixture
def fresh_memo() -> Iterator[None]:
    set_shard_memo_entries(SHARD_MEMO_ENTRIES)
    yield
    set_shard_memo_entries(SHARD_MEMO_ENTRIES)


@pytest.mark.parametrize("shard_count", SHARD_COUNTS)
def test_a_drawn_hold_id_is_a_random_uuid4_on_its_wallets_shard(shard_count: int) -> None:
    wallets = [uuid.uuid4() for _ in range(40)]
    drawn = [new_hold_id(wallet, None, shard_count) for wallet in wallets]
    for wallet, hold_id in zip(wallets, drawn, strict=True):
        assert shard_of_text(str(hold_id), shard_count) == shard_of_text(str(wallet), shard_count)
        assert (hold_id.version, hold_id.variant) == (4, uuid.RFC_4122)
    assert len(set(drawn)) == len(drawn)


def test_drawn_hold_ids_vary_in_every_random_bit() -> None:
    # The first 20 hex digits are drawn once per id, the last 12 per try: a mistake in
    # either (a fixed prefix, a tail never redrawn) pins bits.
    wallet = uuid.uuid4()
    values = [new_hold_id(wallet, None, 64).int for _ in range(400)]
    ones = zeros = 0
    for value in values:
        ones |= value
        zeros |= ~value & ((1 << 128) - 1)
    fixed = (0xF000 << 64) | (0xC000 << 48)
    assert ones & zeros == ((1 << 128) - 1) & ~fixed


@pytest.mark.parametrize("shard_count", SHARD_COUNTS)
def test_a_keyed_hold_id_is_the_first_uuid5_candidate_on_the_shard(shard_count: int) -> None:
    # Retries, and holds created by earlier versions, depend on the very same id.
    for index, key in enumerate(["a", "key-1", "ключ-é", "x" * 255, "k:0:colons"]):
        wallet = uuid.UUID(int=(index + 1) * 0x1234567890ABCDEF1234567890ABCDEF % (1 << 128))
        assert new_hold_id(wallet, key, shard_count) == _first_keyed_on_shard(
            wallet, key, shard_count
        )


@pytest.mark.usefixtures("fresh_memo")
def test_drawing_hold_ids_leaves_the_shard_memo_to_the_wallets() -> None:
    wallet = uuid.uuid4()
    shard_of(wallet, 64)
    for index in range(100):
        new_hold_id(wallet, None, 64)
        new_hold_id(wallet, f"key-{index}", 64)
    # Only the wallet is remembered; ~200 × 64 thrown-away candidates are not.
    info = ownership._shard_of_int.cache_info()  # type: ignore[attr-defined]
    assert info.currsize == 1


def test_random_id_on_shard_gives_up_after_its_tries() -> None:
    results = [random_id_on_shard(4095, 4096, tries_max=1) for _ in range(200)]
    landed = [r for r in results if r is not None]
    assert len(landed) < 10  # one try in 4,096 lands
    assert all(shard_of_text(str(r), 4096) == 4095 for r in landed)
    assert random_id_on_shard(3, 7, tries_max=100_000) is not None
