"""Random (version 4) ids, drawn from the OS's CSPRNG in blocks rather than one call each.

``uuid.uuid4()`` makes a ``getrandom`` system call per id. Reading ``_BLOCK_IDS`` ids'
worth of bytes at once keeps the same source (``os.urandom``) and makes the call once per
block: ~1% of the engine's transfer, a fifth of a hold id's draw loop, which draws 64 ids
on average (docs/BENCHMARKS.md, "Issue #25's yardsticks on an idle Intel host"). A child
process made by ``fork`` starts with an empty block, so it never hands out its parent's
ids.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from typing import Final
from uuid import UUID

__all__ = ["new_uuid4"]

_BLOCK_IDS: Final = 256
# An id's 16 bytes as two unsigned 64-bit words, read off the block one id at a time.
_ID_WORDS: Final = struct.Struct(">QQ")
# Version 4 and the RFC 4122 variant: clear these bits of the random 128, then set those.
_CLEAR: Final = ~((0xF000 << 64) | (0xC000 << 48)) & ((1 << 128) - 1)
_SET: Final = (0x4000 << 64) | (0x8000 << 48)

# The current block's ids not handed out yet. Taking one is a single next() on a C
# iterator, atomic under the GIL: two threads never get the same id (at worst both read a
# new block, and one of the two is dropped).
_block: Iterator[tuple[int, int]] = iter(())


def new_uuid4() -> UUID:
    """A random version 4 UUID, as ``uuid.uuid4()`` makes."""
    global _block
    try:
        high, low = next(_block)
    except StopIteration:
        _block = _ID_WORDS.iter_unpack(os.urandom(_BLOCK_IDS * _ID_WORDS.size))
        high, low = next(_block)
    return UUID(int=(((high << 64) | low) & _CLEAR) | _SET)


def _forget_block() -> None:
    global _block
    _block = iter(())


os.register_at_fork(after_in_child=_forget_block)
