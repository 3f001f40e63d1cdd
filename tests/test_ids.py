"""Random ids drawn in blocks (engine/ids.py): what uuid.uuid4() would make, never repeated
across a block's end or a fork, every random bit random."""

from __future__ import annotations

import os
import uuid

import pytest

from walletd.engine import ids
from walletd.engine.ids import new_uuid4

# Two blocks and a bit: the draws cross a block's end twice.
DRAWS = 2 * 256 + 7


def test_ids_are_version_4_of_the_rfc_4122_variant_and_never_repeat() -> None:
    drawn = [new_uuid4() for _ in range(DRAWS)]
    assert all(type(i) is uuid.UUID for i in drawn)
    assert {(i.version, i.variant) for i in drawn} == {(4, uuid.RFC_4122)}
    assert len(set(drawn)) == DRAWS
    # Parsed back from their text, as a client sends them: the same ids.
    assert [uuid.UUID(str(i)) for i in drawn] == drawn


def test_every_bit_but_version_and_variant_takes_both_values() -> None:
    # A wrong mask would pin random bits: 122 of the 128 must vary over a few hundred draws
    # (each stays constant with probability 2 * 2^-519).
    drawn = [new_uuid4().int for _ in range(DRAWS)]
    ones = 0
    zeros = 0
    for value in drawn:
        ones |= value
        zeros |= ~value & ((1 << 128) - 1)
    varying = ones & zeros
    fixed = (0xF000 << 64) | (0xC000 << 48)
    assert varying == ((1 << 128) - 1) & ~fixed
    assert {(v >> 76) & 0xF for v in drawn} == {4}


@pytest.mark.slow
def test_a_forked_child_does_not_draw_its_parents_next_ids() -> None:
    new_uuid4()  # the parent holds a block with ids left in it
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports through the pipe and exits
        try:
            os.write(write_end, new_uuid4().bytes + new_uuid4().bytes)
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        child_bytes = pipe.read()
    _pid, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    child_ids = {uuid.UUID(bytes=child_bytes[:16]), uuid.UUID(bytes=child_bytes[16:])}
    parent_ids = {new_uuid4(), new_uuid4()}
    assert len(child_ids) == 2
    assert not child_ids & parent_ids


def test_the_block_is_read_from_the_os_once_per_block(monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[int] = []
    real_urandom = os.urandom

    def counting_urandom(size: int) -> bytes:
        reads.append(size)
        return real_urandom(size)

    monkeypatch.setattr(os, "urandom", counting_urandom)
    ids._forget_block()
    for _ in range(DRAWS):
        new_uuid4()
    assert reads == [256 * 16] * 3
