"""Start-up against a PostgreSQL that is unreachable or too old: exit 2, one line, no traceback."""

from __future__ import annotations

import socket
import subprocess

import asyncpg
import pytest

from tests.processes import walletd_command
from walletd.cli.main import main
from walletd.persistence import database
from walletd.persistence.database import DatabaseTooOld, check_server_version


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port  # nothing listens once the probe is closed


@pytest.mark.slow
def test_serve_against_an_unreachable_port_exits_2_with_one_line() -> None:
    """walletd serve with nothing listening on the port: exit 2 and one readable line."""
    url = f"postgresql://postgres@127.0.0.1:{_closed_port()}/postgres"
    done = subprocess.run(
        walletd_command(["serve", "--port", "0", "--database-url", url, "--log-level", "ERROR"]),
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines == [lines[0]]
    assert lines[0].startswith("walletd: error: cannot connect to PostgreSQL")


async def test_check_server_version_refuses_a_server_older_than_required(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server below the minimum version raises DatabaseTooOld naming both versions."""
    connection = await asyncpg.connect(database_url)
    try:
        actual = await check_server_version(connection)
        assert actual >= database.POSTGRES_VERSION_MIN
        # No old server at hand: raise the bar above the real one instead.
        monkeypatch.setattr(database, "POSTGRES_VERSION_MIN", (actual // 10000 + 1) * 10000)
        with pytest.raises(DatabaseTooOld, match=rf"PostgreSQL {actual // 10000} is too old"):
            await check_server_version(connection)
    finally:
        await connection.close()


def test_migrate_against_a_too_old_server_exits_2_with_one_line(
    database_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """walletd migrate on a server below the minimum: exit 2, one line, no traceback."""
    monkeypatch.setattr(database, "POSTGRES_VERSION_MIN", 99_0000)
    assert main(["migrate", "--database-url", database_url, "--log-level", "ERROR"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "is too old; walletd needs 99 or newer" in err
