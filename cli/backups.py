"""The backup commands: ``walletd backup`` (a verified base backup, then retention),
``walletd archive-wal`` (keeps the WAL archive current, reconnecting by itself) and
``walletd recover`` (a fresh data dir restored to an instant, for ``walletd serve``).
persistence/backups.py does the work; docs/OPERATIONS.md, "Backups and point-in-time
recovery", is the runbook.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import logging
import signal
import time
from pathlib import Path

from walletd.cli.config import Config
from walletd.cli.data_dir import DataDirClaim
from walletd.cli.service import storage
from walletd.persistence.backups import (
    ARCHIVE_APPLICATION_NAME,
    WAL_FOLDER,
    create_slot_command,
    receivewal_command,
    recover,
    take_base_backup,
)
from walletd.persistence.database import connect
from walletd.persistence.embedded import EmbeddedPostgres

__all__ = ["add_backup_flags", "archive_wal_command", "backup_command", "recover_command"]

_log = logging.getLogger("walletd.backups")

KEEP_DEFAULT = 7
RECOVERY_TIMEOUT_S_DEFAULT = 3600.0
# pg_receivewal lost its server: wait this long before the next try, doubling up to the max.
# Short: with a synchronous archive every commit (walletd's start too) waits for it.
RECONNECT_BACKOFF_S_MIN = 0.25
RECONNECT_BACKOFF_S_MAX = 2.0
# No embedded server runs on the data dir (walletd serve restarting): look again this often
# (reading its lock file costs nothing), so the archive is back as soon as the server is.
ATTACH_POLL_S = 0.1
# A run that lasted this long was a working connection: the backoff starts over.
RECONNECT_BACKOFF_RESET_S = 10.0
# After a connection, when the archiver says whether commits wait for it.
SYNC_STATE_DELAY_S = 1.0
# pg_receivewal gets this long to flush and exit after SIGINT.
STOP_TIMEOUT_S = 10.0


def add_backup_flags(sub: argparse.ArgumentParser, command: str) -> None:
    sub.add_argument(
        "--backup-dir", type=Path, required=True,
        help="where base backups (base/) and the WAL archive (wal/) live; mode 0700",
    )  # fmt: skip
    if command == "backup":
        sub.add_argument(
            "--keep", type=int, default=KEEP_DEFAULT,
            help=f"base backups to keep, with the WAL they need (default {KEEP_DEFAULT})",
        )  # fmt: skip
    if command == "archive-wal":
        sub.add_argument(
            "--synchronous", action="store_true",
            help="flush each WAL write at once and report it, so that a server naming "
            f"{ARCHIVE_APPLICATION_NAME} in synchronous_standby_names commits only once the "
            "archive has it (RPO 0 for the archive)",
        )  # fmt: skip
    if command == "recover":
        sub.add_argument(
            "--to", type=_instant, default=None, metavar="INSTANT",
            help="an RFC 3339 instant (2026-12-07T03:50:00.5Z): restore every transaction "
            "committed at or before it, none after (default: the end of the archive)",
        )  # fmt: skip
        sub.add_argument(
            "--recovery-timeout", type=float, default=RECOVERY_TIMEOUT_S_DEFAULT,
            help=f"seconds the replay may take (default {RECOVERY_TIMEOUT_S_DEFAULT:g})",
        )  # fmt: skip


def _instant(text: str) -> dt.datetime:
    try:
        instant = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an RFC 3339 instant like 2026-12-07T03:50:00Z"
        ) from None
    if instant.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} has no offset: add Z or +HH:MM")
    return instant


async def backup_command(config: Config, args: argparse.Namespace) -> int:
    async with storage(config, "backup") as dsn:
        backup = await asyncio.to_thread(take_base_backup, dsn, args.backup_dir, args.keep)
    print(
        f"base backup {backup.path} verified (started {backup.started_at.isoformat()}, "
        f"finished {backup.finished_at.isoformat()}, WAL from {backup.start_segment})",
        flush=True,
    )
    return 0


async def recover_command(config: Config, args: argparse.Namespace) -> int:
    # Held through the replay: a `walletd serve` on this data dir meanwhile is refused.
    with DataDirClaim.take(config.data_dir, "walletd recover"):
        recovery = await asyncio.to_thread(
            recover, args.backup_dir, args.to, config.data_dir, args.recovery_timeout
        )
    print(recovery.summary(), flush=True)
    print(
        f"next: walletd verify --data-dir {config.data_dir}, then walletd serve --data-dir "
        f"{config.data_dir} (a new database password is made at its first start); archive "
        f"it into a new --backup-dir: its history forks from {args.backup_dir} "
        f"{'at its end' if args.to is None else 'at ' + args.to.isoformat()}",
        flush=True,
    )
    return 0


async def _server_dsn(config: Config) -> str | None:
    """The configured server, or the embedded one of the walletd holding the data dir (never
    started here: the archiver follows the server, it does not own it); None while none runs."""
    if config.database_url is not None:
        return config.database_url
    return await asyncio.to_thread(EmbeddedPostgres(config.data_dir).attach)


async def archive_wal_command(config: Config, args: argparse.Namespace) -> int:
    wal_dir = args.backup_dir / WAL_FOLDER
    wal_dir.mkdir(parents=True, exist_ok=True)
    args.backup_dir.chmod(0o700)
    wal_dir.chmod(0o700)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    backoff_s = RECONNECT_BACKOFF_S_MIN
    waiting_logged = False
    print(f"walletd archive-wal streaming into {wal_dir}", flush=True)
    while not stop.is_set():
        dsn = await _server_dsn(config)
        if dsn is None:
            if not waiting_logged:
                _log.warning(
                    "archive: waiting for the embedded PostgreSQL of a walletd serve on %s",
                    config.data_dir,
                )
            waiting_logged = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), ATTACH_POLL_S)
            continue
        waiting_logged = False
        began = time.monotonic()
        if await _run_until_stopped(*create_slot_command(dsn), stop) == 0:
            await _stream(dsn, wal_dir, args.synchronous, stop)
        if stop.is_set():
            break
        if time.monotonic() - began >= RECONNECT_BACKOFF_RESET_S:
            backoff_s = RECONNECT_BACKOFF_S_MIN
        _log.warning("archive: no connection to the server; trying again in %g s", backoff_s)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), backoff_s)
        backoff_s = min(backoff_s * 2, RECONNECT_BACKOFF_S_MAX)
    return 0


async def _stream(dsn: str, wal_dir: Path, synchronous: bool, stop: asyncio.Event) -> None:
    command, environment = receivewal_command(dsn, wal_dir, synchronous=synchronous)
    reporter = asyncio.ensure_future(_report_sync_state(dsn))
    try:
        code = await _run_until_stopped(command, environment, stop)
    finally:
        reporter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reporter
    if not stop.is_set():
        _log.warning("archive: pg_receivewal exited with %s", code)


async def _run_until_stopped(
    command: list[str], environment: dict[str, str], stop: asyncio.Event
) -> int | None:
    """Run ``command``; on ``stop`` send it SIGINT (pg_receivewal flushes and exits)."""
    process = await asyncio.create_subprocess_exec(*command, env=environment)
    stopping = asyncio.ensure_future(stop.wait())
    exiting = asyncio.ensure_future(process.wait())
    await asyncio.wait([stopping, exiting], return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    if process.returncode is None:
        process.send_signal(signal.SIGINT)
        try:
            await asyncio.wait_for(exiting, STOP_TIMEOUT_S)
        except TimeoutError:
            process.kill()
            await process.wait()
    return process.returncode


async def _report_sync_state(dsn: str) -> None:
    """Say once whether the server's commits wait for the archive (the RPO it gives)."""
    await asyncio.sleep(SYNC_STATE_DELAY_S)
    try:
        connection = await connect(dsn)
    except Exception as error:  # only a report: the archive goes on without it
        _log.info("archive: could not read its replication state: %s", error)
        return
    try:
        state = await connection.fetchval(
            "SELECT sync_state FROM pg_stat_replication WHERE application_name = $1",
            ARCHIVE_APPLICATION_NAME,
        )
    finally:
        await connection.close()
    if state in ("sync", "quorum"):
        _log.info("archive: synchronous: every commit waits until the archive has flushed it")
    else:
        _log.warning(
            "archive: %s: a commit does not wait for the archive, which may lag behind by "
            "what was committed in the last instants (name %s in synchronous_standby_names "
            "and pass --synchronous for RPO 0)",
            state or "not streaming yet", ARCHIVE_APPLICATION_NAME,
        )  # fmt: skip
