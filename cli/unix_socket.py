"""The optional Unix-socket listener of ``walletd serve`` (``--unix-socket``): the public app
on a socket file, for a proxy on the same host (``walletd cluster``'s HAProxy reaches each
member there: docs/SCALING.md, "Keep-alive and shutdown").

The file's rules:

- created with mode 0600: whoever can connect to it has the public listener (every route a
  client has, with the same API keys), so only walletd's own user (and root) may; the mode
  is set between ``bind`` and ``listen``, so no connection is ever accepted under another;
- a path where something listens is refused (``UnixSocketInUse``, exit 2): a second walletd
  must not take a live process's socket away from it;
- a socket file nothing listens on (left by a kill -9) is stale: removed and bound again;
  any other file at the path is refused, never removed;
- removed at exit, if it is still the one this process bound.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "UNIX_PATH_BYTES_MAX",
    "UnixSocketError",
    "UnixSocketInUse",
    "UnixSocketListener",
    "check_path_length",
]

# sun_path holds 108 bytes on Linux, the terminating NUL included.
UNIX_PATH_BYTES_MAX = 107
BACKLOG = 2048
_FILE_MODE = 0o600


class UnixSocketError(Exception):
    """The Unix socket cannot be created at that path (start-up ends with exit 2)."""


class UnixSocketInUse(UnixSocketError):
    """Something listens on the path already."""


def check_path_length(
    path: Path, what: str = "--unix-socket", remedy: str = "use a shorter path"
) -> None:
    """UnixSocketError when ``path`` does not fit a Unix socket address (sun_path)."""
    length = len(os.fsencode(path))
    if length > UNIX_PATH_BYTES_MAX:
        raise UnixSocketError(
            f"{what} {path} is {length} bytes, past the {UNIX_PATH_BYTES_MAX}-byte limit of a "
            f"Unix socket path; {remedy}"
        )


def _remove_stale(path: Path) -> None:
    """Remove a socket file nothing listens on; refuse a live one or any other file."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise UnixSocketError(f"--unix-socket {path} exists and is not a socket; not replacing it")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(os.fspath(path))
        except ConnectionRefusedError:
            pass  # stale: bound once, nobody listens
        except FileNotFoundError:
            return  # removed meanwhile
        except OSError as error:  # e.g. EACCES: another user's socket
            raise UnixSocketError(f"--unix-socket {path}: cannot check it: {error}") from None
        else:
            raise UnixSocketInUse(
                f"--unix-socket {path}: something is listening on it already (another "
                f"walletd?); stop it or use another path"
            )
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


@dataclass
class UnixSocketListener:
    """A listening AF_UNIX socket bound at ``path`` (mode 0600), for ``web.SockSite``."""

    path: Path
    sock: socket.socket
    _identity: tuple[int, int]

    @classmethod
    def bind(cls, path: Path) -> UnixSocketListener:
        check_path_length(path)
        _remove_stale(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(os.fspath(path))
        except OSError as error:
            sock.close()
            if error.errno == errno.EADDRINUSE:  # another process bound it just now
                raise UnixSocketInUse(
                    f"--unix-socket {path}: another process took it during start-up"
                ) from None
            raise UnixSocketError(f"--unix-socket {path}: {error.strerror}") from None
        try:
            # Bound, not listening yet: a connection is refused until the mode is 0600.
            os.chmod(path, _FILE_MODE)
            sock.listen(BACKLOG)
            info = path.stat()
        except BaseException:
            sock.close()
            with contextlib.suppress(OSError):
                path.unlink()
            raise
        return cls(path, sock, (info.st_dev, info.st_ino))

    def remove(self) -> None:
        """Close the socket (if the site did not) and remove the file, unless another
        process replaced it at the path meanwhile (then it is theirs)."""
        self.sock.close()
        with contextlib.suppress(OSError):
            info = self.path.lstat()
            if (info.st_dev, info.st_ino) == self._identity:
                self.path.unlink()
