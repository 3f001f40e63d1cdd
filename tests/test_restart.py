"""Restarts always work: after kill -9 of the embedded PostgreSQL (and walletd) the next
start waits for the old processes and comes up by itself; it adopts only a live postmaster
of its own data dir and never removes a live server's lock file."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from loadtest.restart_loop import RESTART_TIMEOUT_S, run_loop
from loadtest.transfer_crash_loop import run_crash_loop
from walletd.persistence.embedded import EmbeddedPostgres, EmbeddedPostgresError, binaries_path

# Every test here starts PostgreSQL, walletd or Prometheus processes.
pytestmark = pytest.mark.slow

BUSY_BACKENDS = 4


@pytest.fixture
def folder() -> Iterator[Path]:
    # Not under tmp_path: every pytest session run as root resets /tmp/pytest-of-root to
    # 0700, which would lock the cluster's unprivileged owner out of its own data.
    path = Path(tempfile.mkdtemp(prefix="walletd-test-restart-"))
    yield path
    EmbeddedPostgres(path).stop("immediate")
    shutil.rmtree(path, ignore_errors=True)


def _busy_backends(embedded: EmbeddedPostgres) -> list[subprocess.Popen[bytes]]:
    """Sessions in the middle of a statement, as under load."""
    environment = {**os.environ, "PGPASSWORD": embedded.secret_path.read_text().strip()}
    command = [
        str(binaries_path() / "psql"), "-X", "-w", "-h", "127.0.0.1", "-p", str(embedded.port),
        "-U", "postgres", "-c",
        "CREATE TEMP TABLE t AS SELECT g FROM generate_series(1, 200000) g; SELECT pg_sleep(30)",
    ]  # fmt: skip
    return [
        subprocess.Popen(
            command, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        for _ in range(BUSY_BACKENDS)
    ]


def _postmaster_pid(embedded: EmbeddedPostgres) -> int:
    return int((embedded.pgdata / "postmaster.pid").read_text().splitlines()[0])


def test_start_right_after_the_postmaster_is_killed_waits_for_its_processes(
    folder: Path,
) -> None:
    """kill -9 of a busy postmaster, then start() at once, three times: each start comes
    up (its own server, not adopted) within the restart bound, and the data is kept."""
    embedded = EmbeddedPostgres(folder)
    embedded.start()
    for round_index in range(3):
        sessions = _busy_backends(embedded)
        try:
            time.sleep(0.3)  # let the sessions connect and start working (not a sync point)
            os.kill(_postmaster_pid(embedded), signal.SIGKILL)
            started = time.monotonic()
            embedded = EmbeddedPostgres(folder, start_timeout_s=RESTART_TIMEOUT_S)
            embedded.start()
            took_s = time.monotonic() - started
        finally:
            for session in sessions:
                session.kill()
                session.wait(10)
        assert not embedded.adopted, round_index
        assert took_s < RESTART_TIMEOUT_S
        assert embedded.is_running()


def test_a_lock_file_naming_another_live_process_is_neither_adopted_nor_a_blocker(
    folder: Path,
) -> None:
    """A lock file left by a crash whose PID now belongs to another process (of the
    cluster's owner, so PostgreSQL itself would call it running): start() does not adopt
    that process's "server", removes the stale lock and starts its own."""
    embedded = EmbeddedPostgres(folder)
    embedded.start()
    embedded.stop()
    owner = ["setpriv", "--reuid=walletd-pg", "--regid=walletd-pg", "--clear-groups"]
    impostor = subprocess.Popen([*(owner if os.geteuid() == 0 else []), "/usr/bin/sleep", "60"])
    try:
        lock = embedded.pgdata / "postmaster.pid"
        lock.write_text(f"{impostor.pid}\n{embedded.pgdata}\n1700000000\n5\n\nlocalhost\n")
        if os.geteuid() == 0:
            shutil.chown(lock, "walletd-pg", "walletd-pg")
        again = EmbeddedPostgres(folder, start_timeout_s=RESTART_TIMEOUT_S)
        again.start()
        assert not again.adopted
        assert again.port != 5
        assert again.is_running()
        assert impostor.poll() is None  # left alone
    finally:
        impostor.kill()
        impostor.wait(10)


def test_a_live_servers_lock_file_is_adopted_never_removed(folder: Path) -> None:
    """A second start() beside a running server (one a killed walletd left) adopts it; its
    lock file stays as it was; attach() finds it too, with the same DSN."""
    first = EmbeddedPostgres(folder)
    first.start()
    lock = (first.pgdata / "postmaster.pid").read_text()
    second = EmbeddedPostgres(folder)
    second.start()
    assert second.adopted
    assert second.port == first.port
    assert (first.pgdata / "postmaster.pid").read_text() == lock
    assert EmbeddedPostgres(folder).attach() == first.dsn
    assert first.is_running()


def test_a_start_that_cannot_succeed_gives_up_at_the_timeout(folder: Path) -> None:
    """While a process of the old server keeps working in the data dir, start() waits at
    most its timeout, then fails with one line naming the holder."""
    embedded = EmbeddedPostgres(folder)
    embedded.start()
    embedded.stop()
    owner = ["setpriv", "--reuid=walletd-pg", "--regid=walletd-pg", "--clear-groups"]
    # A stand-in for a child of a killed postmaster: a process working in pgdata.
    holder = subprocess.Popen(
        [*(owner if os.geteuid() == 0 else []), "/usr/bin/sleep", "60"], cwd=embedded.pgdata
    )
    try:
        started = time.monotonic()
        with pytest.raises(EmbeddedPostgresError, match=rf"PIDs \[{holder.pid}\]"):
            EmbeddedPostgres(folder, start_timeout_s=1.0).start()
        assert time.monotonic() - started < 10.0
    finally:
        holder.kill()
        holder.wait(10)
    EmbeddedPostgres(folder).start()  # once it is gone, the data dir starts again


@pytest.mark.slow
def test_walletd_comes_back_after_kill_9_of_both_under_load(folder: Path) -> None:
    """A short version of `python -m loadtest.restart_loop --rounds 20`: kill -9 of walletd
    and its postmaster under keyed deposits, restart, every acknowledged deposit present."""
    report = run_loop(3, folder, load_s=1.0, progress=False)
    assert not report.failures, [(r.index, r.problem) for r in report.failures]
    assert len(report.rounds) == 4
    assert report.worst_restart_s < RESTART_TIMEOUT_S
    assert sum(r.acked for r in report.rounds) > 0


@pytest.mark.slow
def test_transfers_survive_kill_9_of_walletd_and_of_both_in_a_loop(folder: Path) -> None:
    """A short version of `python -m loadtest.transfer_crash_loop --rounds 10`: kill -9 of
    walletd alone, then of walletd and its postmaster, mid-transfers; each restart finishes
    every PENDING transfer by itself; a retry of every transfer sent gives the answer it
    gave (or a final one) and applies each once; conservation exact in every snapshot."""
    report = run_crash_loop(2, folder, load_s=1.0, wallets=10, progress=False)
    assert not report.failures, [(r.index, r.problem) for r in report.failures]
    crashes = report.rounds[1:]
    assert [r.killed for r in crashes] == ["walletd", "walletd + postgres"]
    assert all(r.acked > 0 and r.snapshots > 0 for r in crashes), crashes
    assert sum(r.refused for r in crashes) > 0, crashes  # recorded refusals replayed too
