"""Durability is enforced, not assumed: synchronous_commit on walletd's own connections, and
no serving on a server with fsync or full_page_writes off unless the operator overrides."""

from __future__ import annotations

import argparse
import asyncio
import subprocess
from collections.abc import Callable
from urllib.parse import urlsplit

import asyncpg
import pytest

from loadtest.bench_report import measured_durability
from tests.processes import WalletdProcess, walletd_command
from walletd.cli.config import add_flags, load_config
from walletd.persistence.database import (
    DatabaseUnsafe,
    PoolSettings,
    check_durability,
    connect,
    create_pool,
    durability_settings,
    unsafe_settings,
)


async def _show(connection: asyncpg.Connection) -> str:
    value: str = await connection.fetchval("SHOW synchronous_commit")
    return value


async def test_walletd_connections_commit_synchronously_whatever_the_role_database_or_dsn_say(
    database_url: str,
) -> None:
    """With synchronous_commit=off set on the role (in this database), on the database and in
    the DSN's options, a plain session sees off but walletd's pool and command
    connections all report on."""
    database = urlsplit(database_url).path.lstrip("/")
    admin = await asyncpg.connect(database_url)
    try:
        role = await admin.fetchval("SELECT current_user")
        await admin.execute(
            f'ALTER ROLE "{role}" IN DATABASE "{database}" SET synchronous_commit = off'
        )
        await admin.execute(f'ALTER DATABASE "{database}" SET synchronous_commit = off')
    finally:
        await admin.close()
    lax_url = database_url + "?options=-c%20synchronous_commit%3Doff"
    for url in (database_url, lax_url):
        plain = await asyncpg.connect(url)
        try:
            assert await _show(plain) == "off"  # the setup really turns it off
        finally:
            await plain.close()

        pool = await create_pool(url, PoolSettings(size_max=3))
        try:
            async with pool.acquire() as first, pool.acquire() as second:
                assert [await _show(first), await _show(second)] == ["on", "on"]
        finally:
            await pool.close()
        command_connection = await connect(url)
        try:
            assert await _show(command_connection) == "on"
            assert (await durability_settings(command_connection))["synchronous_commit"] == "on"
        finally:
            await command_connection.close()


async def _set_system(dsn: str, **settings: str) -> None:
    connection = await asyncpg.connect(dsn)
    try:
        for name, value in settings.items():
            await connection.execute(f"ALTER SYSTEM SET {name} = {value}")
        await connection.execute("SELECT pg_reload_conf()")
    finally:
        await connection.close()


async def _wait_for_setting(dsn: str, name: str, value: str) -> None:
    """pg_reload_conf() signals the postmaster; new sessions see the change shortly after."""
    deadline = asyncio.get_running_loop().time() + 10.0
    while True:
        connection = await asyncpg.connect(dsn)
        try:
            if await connection.fetchval(f"SHOW {name}") == value:
                return
        finally:
            await connection.close()
        assert asyncio.get_running_loop().time() < deadline, f"{name} never became {value}"
        await asyncio.sleep(0.05)


def _serve_once(dsn: str, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        walletd_command(["serve", "--port", "0", "--database-url", dsn, *flags]),
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


@pytest.mark.slow
async def test_serve_refuses_a_server_without_fsync_or_full_page_writes_unless_overridden(
    own_server: str, walletd_process: Callable[..., WalletdProcess]
) -> None:
    """fsync=off, then full_page_writes=off: serve exits 2 with one line naming the setting
    and the override; with --allow-unsafe-durability it serves and warns."""
    connection = await asyncpg.connect(own_server)
    try:
        settings = await check_durability(connection, allow_unsafe=False)
        assert unsafe_settings(settings) == []
    finally:
        await connection.close()

    for setting in ("fsync", "full_page_writes"):
        await _set_system(own_server, **{"fsync": "on", "full_page_writes": "on", setting: "off"})
        await _wait_for_setting(own_server, setting, "off")
        connection = await asyncpg.connect(own_server)
        try:
            with pytest.raises(DatabaseUnsafe, match=f"{setting}=off"):
                await check_durability(connection, allow_unsafe=False)
            settings = await check_durability(connection, allow_unsafe=True)
            assert unsafe_settings(settings) == [f"{setting}=off"]
        finally:
            await connection.close()

        done = _serve_once(own_server)
        assert done.returncode == 2, done.stdout
        assert "Traceback" not in done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1, done.stderr
        assert lines[0].startswith(f"walletd: error: PostgreSQL runs with {setting}=off")
        assert "--allow-unsafe-durability" in lines[0]
        assert "walletd listening" not in done.stdout

        process = walletd_process("--database-url", own_server, "--allow-unsafe-durability")
        log = process.log()
        assert f"serving with {setting}=off (--allow-unsafe-durability)" in log
        # What the bench report prints, read from walletd's real log line.
        expected = {"fsync": "on", "full_page_writes": "on", setting: "off"}
        assert measured_durability(log) == (
            f"PostgreSQL durability: fsync={expected['fsync']}, "
            f"full_page_writes={expected['full_page_writes']}, synchronous_commit=on."
        )
        assert process.terminate() == 0


def test_the_override_is_off_by_default_and_a_flag_or_an_environment_variable() -> None:
    """--allow-unsafe-durability alone or =true, or its variable, turns it on; default off."""
    parser = argparse.ArgumentParser()
    add_flags(parser)

    def loaded(argv: list[str], environ: dict[str, str]) -> bool:
        return load_config(parser.parse_args(argv), environ).allow_unsafe_durability

    assert loaded([], {}) is False
    assert loaded(["--allow-unsafe-durability"], {}) is True
    assert loaded(["--allow-unsafe-durability", "false"], {}) is False
    assert loaded([], {"WALLETD_ALLOW_UNSAFE_DURABILITY": "true"}) is True
    assert (
        loaded(["--allow-unsafe-durability", "no"], {"WALLETD_ALLOW_UNSAFE_DURABILITY": "1"})
        is False
    )
