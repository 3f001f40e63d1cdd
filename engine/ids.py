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
from typing import Final
from uuid import UUID

__all__ = ["new_uuid4"]

_BLOCK_IDS: Final = 256
_ID_BYTES: Final = 16
# Version 4 and the RFC 4122 variant: clear these bits of the random 128, then set those.
_CLEAR: Final = ~((0xF000 << 64) | (0xC000 << 48)) & ((1 << 128) - 1)
_SET: Final = (0x4000 << 64) | (0x8000 << 48)

_block = b""
_offset = 0


def new_uuid4() -> UUID:
    """A random version 4 UUID, as ``uuid.uuid4()`` makes."""
    global _block, _offset
    if _offset >= len(_block):
        _block, _offset = os.urandom(_BLOCK_IDS * _ID_BYTES), 0
    start = _offset
    _offset = start + _ID_BYTES
    return UUID(int=(int.from_bytes(_block[start:_offset]) & _CLEAR) | _SET)


def _forget_block() -> None:
    global _block, _offset
    _block, _offset = b"", 0


os.register_at_fork(after_in_child=_forget_block)
