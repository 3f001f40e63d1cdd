"""Random (version 4) ids, drawn from the OS's CSPRNG in blocks rather than one call each.

``uuid.uuid4()`` makes a ``getrandom`` system call per id. Reading ``_BLOCK_IDS`` ids'
worth of bytes at once keeps the same source (``os.urandom``) and makes the call once per
block: ~1% of the engine's transfer (docs/BENCHMARKS.md, "Issue #25's yardsticks on an
idle Intel host"). A child process made by ``fork`` starts with an empty block, so it never
hands out its parent's ids.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from typing import Final
from uuid import UUID

__all__ = ["new_uuid4", "uuid_with_version"]

_BLOCK_IDS: Final = 256
# An id's 16 bytes as two unsigned 64-bit words, read off the block one id at a time.
_ID_WORDS: Final = struct.Struct(">QQ")
# The bits a UUID's variant and version take; RFC 4122's variant is 10 in its top two.
_VARIANT_AND_VERSION: Final = (0xC000 << 48) | (0xF000 << 64)
_KEEP: Final = ~_VARIANT_AND_VERSION & ((1 << 128) - 1)
_RFC_4122_VARIANT: Final = 0x8000 << 48
_VERSION_SHIFT: Final = 76

# The current block's ids not handed out yet. Taking one is a single next() on a C
# iterator, atomic under the GIL: two threads never get the same id (at worst both read a
# new block, and one of the two is dropped).
_block: Iterator[tuple[int, int]] = iter(())


def uuid_with_version(value: int, version: int) -> UUID:
    """128 bits as a UUID of ``version`` and the RFC 4122 variant: what ``uuid.UUID(int=value,
    version=version)`` makes, without its checks, and for version 8 too (which Python 3.11's
    constructor refuses)."""
    return UUID(int=(value & _KEEP) | _RFC_4122_VARIANT | (version << _VERSION_SHIFT))


def new_uuid4() -> UUID:
    """A random version 4 UUID, as ``uuid.uuid4()`` makes."""
    global _block
    try:
        high, low = next(_block)
    except StopIteration:
        _block = _ID_WORDS.iter_unpack(os.urandom(_BLOCK_IDS * _ID_WORDS.size))
        high, low = next(_block)
    return uuid_with_version((high << 64) | low, 4)


def _forget_block() -> None:
    global _block
    _block = iter(())


os.register_at_fork(after_in_child=_forget_block)
