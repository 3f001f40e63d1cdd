"""Secrets never on a command line: `walletd cluster` gives its children the database URL
(with its password) and the cluster credential through their environment or a 0600 file.

Any user of the machine can read any process's /proc/PID/cmdline (`ps` shows it); only the
process's own user and root can read /proc/PID/environ. So another user, `nobody` here, reads
the command line of every walletd, PostgreSQL and HAProxy process the cluster started, and
finds no secret in any of them.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from tests.processes import walletd_command
from walletd.cli.credential import CREDENTIAL_FILE_NAME
from walletd.persistence.embedded import SECRET_FILE_NAME

# Every test here starts walletd, PostgreSQL or HAProxy processes.
pytestmark = pytest.mark.slow

WAIT_S = 120.0
SHARDS = 8


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def parent_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])  # the field after the command's name


def started_by(root: int, mentioning: str) -> Iterator[int]:
    """The processes below ``root``, and those whose command line mentions ``mentioning``
    (PostgreSQL's server detaches from the process that started it)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ancestor: int | None = pid
        while ancestor is not None and ancestor not in (0, 1, root):
            ancestor = parent_of(ancestor)
        if pid != root and (ancestor == root or mentioning.encode() in cmdline):
            yield pid


def read_as_nobody(paths: list[str]) -> dict[str, bytes | None]:
    """Each file's bytes as user `nobody` reads them (None: not readable by nobody)."""
    script = (
        "import sys\n"
        "for path in sys.argv[1:]:\n"
        "    try:\n"
        "        data = open(path, 'rb').read()\n"
        "        sys.stdout.write('ok ' + data.hex() + '\\n')\n"
        "    except OSError:\n"
        "        sys.stdout.write('no\\n')\n"
    )
    done = subprocess.run(
        ["runuser", "-u", "nobody", "--", "/usr/bin/python3", "-c", script, *paths],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    lines = done.stdout.splitlines()
    assert len(lines) == len(paths), done.stderr
    return {
        path: bytes.fromhex(line[3:]) if line.startswith("ok ") else None
        for path, line in zip(paths, lines, strict=True)
    }


async def role_with_password(database_url: str) -> tuple[str, str]:
    """A new role with a password, owning a new database; its URL and the password."""
    password = "pw-" + secrets.token_hex(12)
    name = "secret_" + secrets.token_hex(4)
    connection = await asyncpg.connect(database_url)
    try:
        await connection.execute(f"CREATE ROLE {name} LOGIN PASSWORD '{password}'")
        await connection.execute(f"CREATE DATABASE {name} OWNER {name}")
    finally:
        await connection.close()
    parts = urlsplit(database_url)
    admin = urlunsplit(parts._replace(path=f"/{name}"))
    connection = await asyncpg.connect(admin)
    try:  # PostgreSQL 15+: only the schema's owner may create in it
        await connection.execute(f"ALTER SCHEMA public OWNER TO {name}")
    finally:
        await connection.close()
    netloc = f"{name}:{password}@{parts.hostname}:{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc, path=f"/{name}")), password


def start(args: list[str], environment: dict[str, str], log_path: Path) -> subprocess.Popen[str]:
    with log_path.open("w") as log_file:
        return subprocess.Popen(
            walletd_command(args), stdout=subprocess.PIPE, stderr=log_file, text=True,
            env=environment,
        )  # fmt: skip


def kind_of(command: bytes) -> bytes:
    return next((k for k in (b"walletd", b"postgres", b"haproxy") if k in command), command)


@pytest.mark.parametrize("database", ["given", "embedded"])
async def test_no_secret_is_on_the_command_line_of_any_process_the_cluster_starts(
    database: str, database_url: str, tmp_path: Path
) -> None:
    """`walletd cluster --processes 2`, with a database URL holding a password (or its own
    embedded PostgreSQL, whose URL holds one): as `nobody`, the command line of the cluster
    and of every walletd, PostgreSQL and HAProxy process it started holds neither the
    database password nor the cluster credential, and their environments are unreadable."""
    data_dir = tmp_path / "data"
    port = free_port()
    args = ["cluster", "--processes", "2", "--port", str(port), "--shards", str(SHARDS),
            "--data-dir", str(data_dir), "--lease-ttl", "1"]  # fmt: skip
    environment = {k: v for k, v in os.environ.items() if "DATABASE_URL" not in k}
    secrets_to_hide: list[str] = []
    if database == "given":
        url, password = await role_with_password(database_url)
        environment["WALLETD_DATABASE_URL"] = url  # the cluster's own line is the caller's
        secrets_to_hide.append(password)
    log_path = tmp_path / "cluster.log"
    cluster = start(args, environment, log_path)
    assert cluster.stdout is not None
    try:
        line = await asyncio.wait_for(asyncio.to_thread(cluster.stdout.readline), WAIT_S)
        assert "walletd cluster listening" in line, line + log_path.read_text()
        secrets_to_hide.append((data_dir / CREDENTIAL_FILE_NAME).read_text().strip())
        if database == "embedded":
            found = list(data_dir.rglob(SECRET_FILE_NAME))
            assert len(found) == 1, found
            secrets_to_hide.append(found[0].read_text().strip())
        pids = [cluster.pid, *started_by(cluster.pid, str(data_dir))]
        commands = read_as_nobody([f"/proc/{pid}/cmdline" for pid in pids])
        environments = read_as_nobody([f"/proc/{pid}/environ" for pid in pids])
    finally:
        cluster.send_signal(signal.SIGTERM)
        code = cluster.wait(60)
        cluster.stdout.close()
    assert code == 0, log_path.read_text()
    seen = {pid: (commands[f"/proc/{pid}/cmdline"] or b"").replace(b"\0", b" ") for pid in pids}
    kinds = [kind_of(command) for command in seen.values()]
    assert kinds.count(b"walletd") >= 3, seen  # the cluster itself and its two servers
    assert b"haproxy" in kinds, seen
    if database == "embedded":
        assert b"postgres" in kinds, seen
    assert all(command for command in seen.values()), "nobody can read every command line"
    for secret in secrets_to_hide:
        assert len(secret) >= 16
        assert not [pid for pid, command in seen.items() if secret.encode() in command], secret
    assert all(value is None for value in environments.values()), "environments are private"
