"""The backup commands' own rules, without a server: passwords stay off command lines,
retention keeps what a recovery needs, the WAL staged for a replay is the right WAL, and
recover refuses what it must (tests/test_pitr.py runs the whole drill with processes)."""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path

import pytest

from walletd.cli.backups import _instant
from walletd.persistence.backups import (
    BASE_FOLDER,
    METADATA_FILE,
    WAL_FOLDER,
    BackupError,
    _stage_wal,
    base_backups,
    prune,
    receivewal_command,
    recover,
    split_password,
)


def _base_backup(backup_dir: Path, stamp: str, finished: dt.datetime, start: str) -> Path:
    folder = backup_dir / BASE_FOLDER / stamp
    folder.mkdir(parents=True)
    (folder / "PG_VERSION").write_text("18\n")
    metadata = {
        "started_at": (finished - dt.timedelta(seconds=5)).isoformat(),
        "finished_at": finished.isoformat(),
        "start_segment": start,
    }
    (folder / METADATA_FILE).write_text(json.dumps(metadata))
    return folder


def _segments(backup_dir: Path, *names: str) -> Path:
    wal = backup_dir / WAL_FOLDER
    wal.mkdir(parents=True, exist_ok=True)
    for name in names:
        (wal / name).write_text(name)  # a file's content names the file it came from
    return wal


def test_the_password_travels_in_the_environment_never_on_the_command_line() -> None:
    """A DSN's password (percent-encoded or not) leaves the URL for PGPASSWORD; the rest of
    the URL, its port and query included, is kept; a DSN without one is unchanged."""
    bare, env = split_password(
        "postgresql://postgres:s3cr%40t@127.0.0.1:5433/postgres?sslmode=disable"
    )
    assert bare == "postgresql://postgres@127.0.0.1:5433/postgres?sslmode=disable"
    assert env == {"PGPASSWORD": "s3cr@t"}
    assert split_password("postgresql://u@db/x") == ("postgresql://u@db/x", {})
    command, environment = receivewal_command(
        "postgresql://postgres:hunter2@127.0.0.1:5433/postgres", Path("/b/wal"), synchronous=True
    )
    assert not any("hunter2" in part for part in command)
    assert environment["PGPASSWORD"] == "hunter2"
    assert "--synchronous" in command
    assert any("application_name=walletd_archive" in part for part in command)


def test_retention_keeps_the_newest_backups_and_the_wal_they_need(tmp_path: Path) -> None:
    """keep=2 of three backups: the oldest goes, with the archived WAL before the oldest kept
    backup's start segment; later WAL (a .partial one too) stays; an incomplete backup goes."""
    now = dt.datetime(2026, 12, 7, 12, 0, tzinfo=dt.UTC)
    _base_backup(tmp_path, "a", now - dt.timedelta(days=2), "000000010000000000000002")
    _base_backup(tmp_path, "b", now - dt.timedelta(days=1), "000000010000000000000005")
    _base_backup(tmp_path, "c", now, "000000010000000000000008")
    (tmp_path / BASE_FOLDER / ".incomplete-d").mkdir()
    wal = _segments(
        tmp_path, "000000010000000000000002", "000000010000000000000004",
        "000000010000000000000005", "000000010000000000000009.partial", "00000002.history",
    )  # fmt: skip
    prune(tmp_path, keep=2)
    assert [b.path.name for b in base_backups(tmp_path)] == ["b", "c"]
    assert sorted(p.name for p in (tmp_path / BASE_FOLDER).iterdir()) == ["b", "c"]
    assert sorted(p.name for p in wal.iterdir()) == [
        "000000010000000000000005", "000000010000000000000009.partial", "00000002.history",
    ]  # fmt: skip


def test_the_replay_gets_the_wal_from_the_backups_start_and_the_partial_segment(
    tmp_path: Path,
) -> None:
    """Segments before the base backup's start stay out; the segment pg_receivewal was still
    writing (.partial) goes in under its full name, unless the complete one exists."""
    wal = _segments(
        tmp_path, "000000010000000000000003", "000000010000000000000004",
        "000000010000000000000005", "000000010000000000000005.partial",
        "000000010000000000000006.partial", "00000002.history",
    )  # fmt: skip
    pg_wal = tmp_path / "pg_wal"
    pg_wal.mkdir()
    assert _stage_wal(wal, "000000010000000000000004", pg_wal) == 3
    assert sorted(p.name for p in pg_wal.iterdir()) == [
        "000000010000000000000004", "000000010000000000000005",
        "000000010000000000000006", "00000002.history",
    ]  # fmt: skip
    complete = pg_wal / "000000010000000000000005"
    assert complete.read_text() == "000000010000000000000005"  # not the .partial beside it
    assert (pg_wal / "000000010000000000000006").read_text().endswith("06.partial")


def test_recover_never_writes_over_a_cluster_nor_restores_from_a_later_backup(
    tmp_path: Path,
) -> None:
    """A data dir holding a cluster is refused; an instant before every complete backup
    finished is refused, naming the oldest; an incomplete backup is never used."""
    now = dt.datetime(2026, 12, 7, 12, 0, tzinfo=dt.UTC)
    backups = tmp_path / "backups"
    _base_backup(backups, "a", now, "000000010000000000000002")
    (backups / BASE_FOLDER / ".incomplete-b").mkdir()
    occupied = tmp_path / "occupied"
    (occupied / "pgdata").mkdir(parents=True)
    (occupied / "pgdata" / "PG_VERSION").write_text("18\n")
    with pytest.raises(BackupError, match="already holds a cluster"):
        recover(backups, None, occupied, 10)
    with pytest.raises(BackupError, match=r"no base backup .* finished before .* \(the oldest"):
        recover(backups, now - dt.timedelta(hours=1), tmp_path / "new", 10)
    assert not (tmp_path / "new" / "pgdata").exists()


def test_the_instant_needs_an_offset() -> None:
    """--to takes RFC 3339 with Z or an offset; a local time without one is refused."""
    assert _instant("2026-12-07T03:50:00.5Z") == dt.datetime(2026, 12, 7, 3, 50, 0, 500000, dt.UTC)
    with pytest.raises(argparse.ArgumentTypeError, match="no offset"):
        _instant("2026-12-07T03:50:00")
    with pytest.raises(argparse.ArgumentTypeError, match="not an RFC 3339"):
        _instant("yesterday")
