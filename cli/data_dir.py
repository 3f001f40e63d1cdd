"""One data dir, one owner: ``walletd serve`` (on the embedded PostgreSQL) and ``walletd
cluster`` hold an exclusive lock on ``<data dir>/walletd.lock`` for as long as they run.

    walletd serve   ──claims──▶ walletd.lock ◀──refused, exit 4── a second serve / cluster
    (starts, owns and stops          ▲
     the embedded PostgreSQL)        └── walletd verify / migrate / seed / …: uses the
                                         owner's server, never starts or stops it

The lock is ``flock``: the kernel drops it when its holder exits, kill -9 included, so a
crashed owner never leaves the data dir locked and the next ``serve`` takes it at once.
Before this, a second ``serve`` adopted the first one's PostgreSQL, and SIGTERM to the
first stopped the database under the second.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path

__all__ = ["EXIT_DATA_DIR_IN_USE", "LOCK_FILE_NAME", "DataDirClaim", "DataDirInUse"]

LOCK_FILE_NAME = "walletd.lock"
# Exit status of `walletd serve` and `walletd cluster` refused a data dir another walletd
# holds: distinct from 2 (bad configuration, storage unreachable) so that a supervisor can
# tell "already running" apart (systemd: RestartPreventExitStatus=4).
EXIT_DATA_DIR_IN_USE = 4
# What a refused process reads of the holder's line (its name and PID).
_HOLDER_BYTES_MAX = 200


class DataDirInUse(Exception):
    """Another walletd process holds the data dir."""


class DataDirClaim:
    """The data dir's lock, held until ``release`` (or until this process exits)."""

    def __init__(self, descriptor: int, path: Path) -> None:
        self._descriptor: int | None = descriptor
        self.path = path

    @classmethod
    def take(cls, data_dir: Path, holder: str) -> DataDirClaim:
        """Claim the data dir for ``holder`` (e.g. "walletd serve"); DataDirInUse if taken."""
        claim = cls.try_take(data_dir, holder)
        if claim is None:
            path = data_dir.resolve() / LOCK_FILE_NAME
            raise DataDirInUse(
                f"the data dir {data_dir.resolve()} is in use by {_holder(path)}: one data dir "
                f"serves one walletd serve or cluster; stop it or use another --data-dir"
            )
        return claim

    @classmethod
    def try_take(cls, data_dir: Path, holder: str) -> DataDirClaim | None:
        """The claim, or None when another process holds it (never waits)."""
        data_dir.mkdir(parents=True, exist_ok=True)
        path = data_dir.resolve() / LOCK_FILE_NAME
        # 0600: a user who could open the file could lock it and keep walletd from starting.
        # Not inherited by children (Python's default): PostgreSQL or a cluster member that
        # outlives its walletd must not hold the data dir.
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(descriptor)
            if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return None
            raise
        os.fchmod(descriptor, 0o600)  # also a file left with wider permissions
        # Only for the message a refused process prints; the lock is what counts.
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"{holder} (pid {os.getpid()})\n".encode(), 0)
        return cls(descriptor, path)

    def release(self) -> None:
        if self._descriptor is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self._descriptor, 0)
        os.close(self._descriptor)  # closing drops the lock
        self._descriptor = None

    def __enter__(self) -> DataDirClaim:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.release()


def _holder(path: Path) -> str:
    try:
        with path.open("rb") as file:
            text = file.read(_HOLDER_BYTES_MAX).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text or "another walletd process"
