"""Progress of seed, verify and restore: the bar and log line rendered exactly, shown on a
terminal or logged otherwise, fed by the real commands; and each subcommand's --help."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import pty
import subprocess

import pytest

from tests.processes import walletd_command
from walletd.cli.main import _parser
from walletd.cli.progress import Progress, render_bar, render_line
from walletd.persistence.operator import restore, seed, verify


class FakeClock:
    def __init__(self) -> None:
        self.now_s = 100.0

    def __call__(self) -> float:
        return self.now_s


class Recorder:
    """A ProgressSink that remembers what it heard."""

    def __init__(self) -> None:
        self.total: int | None = None
        self.steps: list[int] = []

    def set_total(self, total: int | None) -> None:
        self.total = total

    def advance(self, units: int) -> None:
        self.steps.append(units)


def test_bar_shows_fraction_counts_rate_and_eta() -> None:
    """Half done in 10 s: a half-filled bar, 50%, the counts, 5,000/s and 0:10 to go."""
    line = render_bar("seed", 50_000, 100_000, "wallets", 10.0, width=10)
    assert line == "seed    ━━━━━─────  50%  50,000/100,000 wallets  5,000/s  ETA 0:10"


def test_bar_when_done_or_total_unknown() -> None:
    """Done: the elapsed time instead of an ETA; no total: counts and rate only."""
    assert render_bar("verify", 10, 10, "wallets", 75.0, width=4).endswith("in 1:15")
    assert render_bar("verify", 7, None, "wallets", 3600.0) == (
        "verify   7 wallets  0.0/s  in 1:00:00"
    )


def test_log_line_is_plain_text() -> None:
    """A log line has no bar or control characters, and says the percentage in words."""
    assert render_line("restore", 16, 64, "slices", 4.0) == (
        "restore: 16/64 slices (25%), 4.0/s, ETA 0:12"
    )


def test_on_a_terminal_the_bar_is_redrawn_in_place() -> None:
    """A terminal gets the bar after carriage return + clear, at most every redraw_s, and
    a final newline."""
    stream, clock = io.StringIO(), FakeClock()
    progress = Progress("seed", 4, "wallets", stream=stream, terminal=True, clock=clock)
    clock.now_s += 0.05
    progress.advance(1)
    assert stream.getvalue() == ""  # too soon after the start
    clock.now_s += 0.2
    progress.advance(1)
    clock.now_s += 0.2
    progress.advance(2)
    progress.finish()
    frames = stream.getvalue().split("\r\x1b[2K")
    assert frames[0] == ""
    assert [frame.split()[2] for frame in frames[1:]] == ["50%", "100%", "100%"]
    assert stream.getvalue().endswith("in 0:00\n")


def test_elsewhere_one_line_is_logged_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    """Without a terminal nothing is drawn; one INFO line per log_every_s is logged."""
    stream, clock = io.StringIO(), FakeClock()
    caplog.set_level(logging.INFO, logger="walletd.progress")
    progress = Progress(
        "verify", 100, "wallets", stream=stream, terminal=False, clock=clock, log_every_s=10
    )
    for _ in range(100):
        clock.now_s += 0.5
        progress.advance(1)
    progress.finish()
    assert stream.getvalue() == ""
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 6  # at 10, 20, 30, 40, 50 s and the finish
    assert lines[0] == "verify: 20/100 wallets (20%), 2.0/s, ETA 0:40"
    assert lines[-1] == "verify: 100/100 wallets (100%), 2.0/s, in 0:50"


async def test_seed_verify_and_restore_report_their_progress(database_url: str) -> None:
    """Each command tells its total first and then steps that add up to it."""
    seeding, verifying, restoring = Recorder(), Recorder(), Recorder()
    await seed(database_url, 25_000, 30_000, seeding)
    assert seeding.total == 25_000
    assert seeding.steps == [20_000, 5_000]
    report = await verify(database_url, fetch_rows=10_000, progress=verifying)
    assert report.clean
    assert verifying.total == 25_000
    assert sum(verifying.steps) == 25_000
    assert len(verifying.steps) == 3
    restored = await restore(database_url, restoring)
    assert (restored.wallets, restored.repaired) == (25_000, 0)
    assert restoring.total == 1
    assert restoring.steps == [1]


def test_a_long_single_step_shows_its_elapsed_time() -> None:
    """Before the first unit is done there is no rate: the line says how long it has run."""
    assert render_line("restore", 0, 1, "statements", 65.0) == (
        "restore: 0/1 statements (0%), running 1:05"
    )


@pytest.mark.slow
async def test_seed_on_a_real_terminal_draws_the_bar(database_url: str) -> None:
    """`walletd seed` with its stderr on a pseudo-terminal draws the bar and ends its line."""
    leader, follower = pty.openpty()
    try:
        command = walletd_command(["seed", "--database-url", database_url, "--wallets", "2000"])
        process = await asyncio.to_thread(
            subprocess.run, command, stdout=subprocess.PIPE, stderr=follower, timeout=120
        )
        assert process.returncode == 0
        os.close(follower)
        follower = -1
        drawn = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the terminal's other end is closed: all is read
                break
            if not chunk:
                break
            drawn += chunk
    finally:
        os.close(leader)
        if follower >= 0:
            os.close(follower)
    text = drawn.decode()
    assert "\r\x1b[2Kseed    ━" in text
    assert "100%  2,000/2,000 wallets" in text
    assert b"seed: 2000 wallets" in process.stdout


def _flags(command: str) -> set[str]:
    parser = _parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    sub = subparsers.choices[command]  # type: ignore[index]
    return {flag for action in sub._actions for flag in action.option_strings}


def test_each_subcommand_help_lists_only_its_flags() -> None:
    """serve lists the server's flags; the operator commands only storage and logging."""
    assert {"--port", "--shards", "--mailbox-max", "--database-url"} <= _flags("serve")
    for command in ("migrate", "verify", "restore", "seed"):
        flags = _flags(command) - {"-h", "--help", "--wallets", "--operations"}
        assert flags == {"--data-dir", "--database-url", "--log-level"}, command
    assert {"--wallets", "--operations"} <= _flags("seed")
