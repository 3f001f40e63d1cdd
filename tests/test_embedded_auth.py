"""The embedded PostgreSQL trusts no one: scram-sha-256 with a secret only walletd's user can
read, for root and unprivileged users alike; older trust data dirs are secured on start."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import asyncpg
import pytest

from tests.processes import WalletdProcess, walletd_command
from walletd.persistence.embedded import HBA_RULES, EmbeddedPostgres, binaries_path

# Every test here starts PostgreSQL, walletd or Prometheus processes.
pytestmark = pytest.mark.slow

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def _folder() -> Path:
    # Not under tmp_path: every pytest session run as root resets /tmp/pytest-of-root to
    # 0700, which would lock the cluster's unprivileged owner out of its own data.
    return Path(tempfile.mkdtemp(prefix="walletd-test-auth-"))


def _psql(
    port: int, *, password: str | None, as_nobody: bool = False, sql: str = "SELECT 1"
) -> subprocess.CompletedProcess[str]:
    """psql to the server as `postgres`, never prompting, with no password file."""
    environment = {
        "PATH": os.environ["PATH"],
        "PGPASSFILE": "/nonexistent",
        "PGCONNECT_TIMEOUT": "10",
    }
    if password is not None:
        environment["PGPASSWORD"] = password
    command = [
        str(binaries_path() / "psql"), "-X", "-w", "-tA", "-h", "127.0.0.1", "-p", str(port),
        "-U", "postgres", "-d", "postgres", "-c", sql,
    ]  # fmt: skip
    return subprocess.run(
        [*NOBODY, *command] if as_nobody else command,
        capture_output=True, text=True, timeout=60, check=False, env=environment, cwd="/",
    )  # fmt: skip


def _identities() -> list[bool]:
    """Connect as this user; and as `nobody` too when this user is root (otherwise this
    user already is an unprivileged one)."""
    return [False, True] if os.geteuid() == 0 else [False]


@pytest.fixture(scope="module")
def secured() -> Iterator[EmbeddedPostgres]:
    """A new embedded server, started the way walletd starts it."""
    folder = _folder()
    embedded = EmbeddedPostgres(folder)
    embedded.start()
    try:
        yield embedded
    finally:
        embedded.destroy()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize(
    "as_nobody", _identities(), ids=lambda nobody: "nobody" if nobody else "self"
)
def test_a_new_server_refuses_everyone_without_the_secret(
    secured: EmbeddedPostgres, as_nobody: bool
) -> None:
    """No password and a wrong one are refused; the secret file's password is accepted."""
    assert secured.port is not None
    secret = secured.secret_path.read_text().strip()
    refused = _psql(secured.port, password=None, as_nobody=as_nobody)
    assert refused.returncode == 2, refused.stdout
    assert "no password supplied" in refused.stderr
    wrong = _psql(secured.port, password="0" * len(secret), as_nobody=as_nobody)
    assert wrong.returncode == 2, wrong.stdout
    assert 'password authentication failed for user "postgres"' in wrong.stderr
    accepted = _psql(secured.port, password=secret, as_nobody=as_nobody)
    assert accepted.returncode == 0, accepted.stderr
    assert accepted.stdout.strip() == "1"


def test_the_secret_is_private_and_every_rule_asks_for_it(secured: EmbeddedPostgres) -> None:
    """The secret file is 0600 and this user's; nobody cannot read it; every hba rule, TCP
    and socket, databases and replication, is scram-sha-256; the DSN carries the secret."""
    assert secured.port is not None
    info = secured.secret_path.stat()
    assert info.st_mode & 0o777 == 0o600
    assert info.st_uid == os.geteuid()
    secret = secured.secret_path.read_text().strip()
    assert len(secret) >= 64
    assert f"postgres:{secret}@127.0.0.1:{secured.port}/" in secured.dsn
    if os.geteuid() == 0:
        peek = subprocess.run(
            [*NOBODY, "cat", str(secured.secret_path)],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert peek.returncode != 0
        assert secret not in peek.stdout
    rules = _psql(
        secured.port,
        password=secret,
        sql="SELECT type || ' ' || array_to_string(database, ',') || ' ' || auth_method "
        "|| ' ' || coalesce(error, '') FROM pg_hba_file_rules ORDER BY rule_number",
    )
    assert rules.returncode == 0, rules.stderr
    assert rules.stdout.split("\n")[:-1] == [
        "local all scram-sha-256 ",
        "host all scram-sha-256 ",
        "host all scram-sha-256 ",
        "local replication scram-sha-256 ",
        "host replication scram-sha-256 ",
        "host replication scram-sha-256 ",
    ]
    assert (secured.pgdata / "pg_hba.conf").read_text() == HBA_RULES


def _trust_cluster(folder: Path) -> EmbeddedPostgres:
    """A data dir as walletd made them before: initdb --auth=trust, a table with a row."""
    old = EmbeddedPostgres(folder)
    old._prepare_user()
    old._run(
        "initdb", "-D", str(old.pgdata), "-U", "postgres", "--auth=trust",
        "--encoding=UTF8", "--locale=C",
    )  # fmt: skip
    return old


def _start_the_old_way(old: EmbeddedPostgres, port: int) -> None:
    options = f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories=''"
    old._run(
        "pg_ctl", "-D", str(old.pgdata), "-w", "-l", str(old.pgdata / "server.log"),
        "-o", options, "start",
    )  # fmt: skip
    made = _psql(port, password=None, sql="CREATE TABLE kept AS SELECT 42 AS answer")
    assert made.returncode == 0, made.stderr  # trust: no password needed, for anyone


@pytest.mark.parametrize("running", [False, True], ids=["stopped", "still-running"])
def test_a_trust_data_dir_from_an_earlier_walletd_is_secured_in_place(running: bool) -> None:
    """start() on a trust data dir (stopped, or its server still running) sets the password,
    rewrites the rules, keeps the data; afterwards only the secret gets in."""
    folder = _folder()
    old = _trust_cluster(folder)
    port = _free_port()
    _start_the_old_way(old, port)
    if not running:
        old.stop()
    embedded = EmbeddedPostgres(folder)
    try:
        embedded.start()
        assert embedded.adopted is running
        assert embedded.port is not None
        refused = _psql(embedded.port, password=None)  # at once: start() waited for it
        assert refused.returncode == 2, refused.stdout
        if os.geteuid() == 0:
            assert _psql(embedded.port, password=None, as_nobody=True).returncode == 2
        secret = embedded.secret_path.read_text().strip()
        kept = _psql(embedded.port, password=secret, sql="SELECT answer FROM kept")
        assert kept.returncode == 0, kept.stderr
        assert kept.stdout.strip() == "42"
        assert (embedded.pgdata / "pg_hba.conf").read_text() == HBA_RULES
    finally:
        embedded.destroy()
        shutil.rmtree(folder, ignore_errors=True)


def test_a_lost_secret_is_replaced_and_the_old_one_stops_working() -> None:
    """Deleting the secret file of a stopped data dir: start() makes a new secret and sets
    it; the old password is refused from then on."""
    folder = _folder()
    embedded = EmbeddedPostgres(folder)
    try:
        embedded.start()
        old_secret = embedded.secret_path.read_text().strip()
        embedded.stop()
        embedded.secret_path.unlink()
        embedded.start()
        assert embedded.port is not None
        new_secret = embedded.secret_path.read_text().strip()
        assert new_secret != old_secret
        assert _psql(embedded.port, password=old_secret).returncode == 2
        assert _psql(embedded.port, password=new_secret).returncode == 0
    finally:
        embedded.destroy()
        shutil.rmtree(folder, ignore_errors=True)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _walletd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        walletd_command(list(args)), capture_output=True, text=True, timeout=120, check=False
    )


@pytest.mark.slow
async def test_walletd_and_its_operator_commands_use_the_secret(
    walletd_process: Callable[..., WalletdProcess],
) -> None:
    """migrate, seed, verify, restore and serve on an embedded data dir all connect (with the
    secret they read), also beside a running server; no password stays refused meanwhile."""
    folder = _folder()
    data_dir = ["--data-dir", str(folder), "--log-level", "WARNING"]
    try:
        for command in (
            ["migrate"], ["seed", "--wallets", "5", "--operations", "20"], ["verify"],
            ["restore"],
        ):  # fmt: skip
            done = _walletd(*command, *data_dir)
            assert done.returncode == 0, done.stderr
        process = walletd_process(*data_dir)
        embedded = EmbeddedPostgres(folder)
        port = embedded._running_port()
        assert port is not None
        assert _psql(port, password=None).returncode == 2
        beside = _walletd("verify", *data_dir)  # adopts the server walletd serve started
        assert beside.returncode == 0, beside.stderr
        assert "20 operations checked" in beside.stdout
        secret = embedded.secret_path.read_text().strip()
        connection = await asyncpg.connect(
            f"postgresql://postgres:{secret}@127.0.0.1:{port}/postgres"
        )
        try:
            assert await connection.fetchval("SELECT count(*) FROM wallets") == 5
        finally:
            await connection.close()
        assert process.terminate() == 0
        assert not embedded.is_running()  # serve stopped the server it started
    finally:
        EmbeddedPostgres(folder).destroy()
        shutil.rmtree(folder, ignore_errors=True)
