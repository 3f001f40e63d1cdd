"""One data dir, one owner (cli/data_dir.py): a second `walletd serve` or `cluster` on a data
dir in use is refused with exit 4 and one line; the operator commands use the owner's
embedded PostgreSQL and never stop it; kill -9 of the owner frees the data dir at once."""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.processes import start_walletd, walletd_command
from walletd.cli.cluster import EXIT_CLUSTER_FAILED
from walletd.cli.data_dir import EXIT_DATA_DIR_IN_USE, DataDirClaim, DataDirInUse
from walletd.cli.main import EXIT_ENGINE_FAILED, main
from walletd.persistence.embedded import EmbeddedPostgres

ROOT = Path(__file__).resolve().parent.parent
# A refused start does nothing slow; generous all the same on a loaded 2-core machine.
REFUSAL_TIMEOUT_S = 60.0


@pytest.fixture
def data_dir() -> Iterator[Path]:
    # Not under tmp_path: every pytest session run as root resets /tmp/pytest-of-root to
    # 0700, which would lock the cluster's unprivileged owner out of its own data.
    path = Path(tempfile.mkdtemp(prefix="walletd-test-data-dir-"))
    yield path
    EmbeddedPostgres(path).stop("immediate")
    shutil.rmtree(path, ignore_errors=True)


def _refused_line(data_dir: Path, holder: str, pid: int) -> str:
    return (
        f"walletd: error: the data dir {data_dir.resolve()} is in use by {holder} (pid {pid}): "
        "one data dir serves one walletd serve or cluster; stop it or use another --data-dir"
    )


def _walletd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        walletd_command(list(args)), capture_output=True, text=True,
        timeout=REFUSAL_TIMEOUT_S, check=False,
    )  # fmt: skip


def _errors(done: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in done.stderr.splitlines() if line.startswith("walletd: error:")]


def test_a_claimed_data_dir_cannot_be_claimed_twice_until_released(tmp_path: Path) -> None:
    """The lock file is 0600; the lock is per open file: a second claim (even in this
    process) is refused, naming the holder; released, the data dir is free again."""
    claim = DataDirClaim.take(tmp_path, "walletd serve")
    try:
        # Only walletd's user can open it, so only it can hold the lock.
        assert stat.S_IMODE(claim.path.stat().st_mode) == 0o600
        assert DataDirClaim.try_take(tmp_path, "walletd verify") is None
        with pytest.raises(DataDirInUse, match=rf"in use by walletd serve \(pid {os.getpid()}\)"):
            DataDirClaim.take(tmp_path, "walletd cluster")
    finally:
        claim.release()
    with DataDirClaim.take(tmp_path, "walletd cluster"):
        pass


def _help(capsys: pytest.CaptureFixture[str], *command: str) -> str:
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    return capsys.readouterr().out


def _listed_exit_codes(help_text: str) -> dict[int, str]:
    """The `exit codes:` list at the end of a `--help`: one `  N  meaning` per line."""
    assert "exit codes:\n" in help_text, help_text
    listed = help_text.split("exit codes:\n", 1)[1]
    return {
        int(code): meaning for code, meaning in re.findall(r"^  (\d+)  (.+)$", listed, re.MULTILINE)
    }


def test_the_exit_codes_in_the_help_match_the_runbook(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`walletd --help` lists every exit status of docs/OPERATIONS.md's table with the same
    meaning; each `walletd <command> --help` lists 0 and 2 and the ones only it can end
    with, each meaning as in the runbook; and the ones the code names are the runbook's."""
    runbook = (ROOT / "docs" / "OPERATIONS.md").read_text()
    table = runbook.split("| status | meaning |", 1)[1].split("\n\n", 1)[0]
    documented = {
        int(code): meaning.replace("`", "")
        for code, meaning in re.findall(r"^\| (\d+) \| (.+) \|$", table, re.MULTILINE)
    }
    assert documented[EXIT_ENGINE_FAILED].startswith("serve:")
    assert documented[EXIT_DATA_DIR_IN_USE].startswith("serve / cluster:")
    assert documented[EXIT_CLUSTER_FAILED].startswith("cluster:")
    assert _listed_exit_codes(_help(capsys)) == documented
    for command in ("serve", "migrate", "verify", "restore", "seed", "cluster", "shards",
                    "haproxy-config", "haproxy-sync", "backup", "archive-wal",
                    "recover"):  # fmt: skip
        listed = _listed_exit_codes(_help(capsys, command))
        assert {0, 2} <= listed.keys(), command
        for code, meaning in listed.items():
            assert documented.get(code) == meaning, (command, code, meaning)
        # A status the runbook gives to named commands is listed by exactly those.
        for code, meaning in documented.items():
            owners = re.match(r"([a-z /-]+): ", meaning)
            if owners:
                named = {name.strip() for name in owners.group(1).split("/")}
                assert (code in listed) == (command in named), (command, code)
    assert 1 in _listed_exit_codes(_help(capsys, "verify"))


def _walletd_flags(capsys: pytest.CaptureFixture[str]) -> dict[str, set[str]]:
    """Each command's flags, as its `--help` prints them ("": `walletd`'s own)."""
    commands = re.findall(r"^    ([a-z-]+)  ", _help(capsys), re.MULTILINE)
    assert "serve" in commands, commands
    flags = {
        command: set(re.findall(r"(--[a-z][a-z0-9-]+)", _help(capsys, command)))
        for command in commands
    }
    flags[""] = set(re.findall(r"(--[a-z][a-z0-9-]+)", _help(capsys)))  # walletd --version
    return flags


def test_the_help_reads_as_text_and_version_comes_from_the_package(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """No `--help` shows reStructuredText markup or a `default None`; `walletd --version`
    prints the installed package's version."""
    for command in ((), *((name,) for name in _walletd_flags(capsys) if name)):
        help_text = _help(capsys, *command)
        assert "``" not in help_text, command
        assert "default None" not in help_text, command
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out == f"walletd {importlib.metadata.version('walletd')}\n"


# Flags the docs name that belong to other tools, each with its tool.
OTHER_TOOLS_FLAGS = {
    "--build": "docker-compose up",
    "--profile": "docker-compose",
    "--rounds": "python -m loadtest.restart_loop",
    "--runs": "python -m loadtest.ha_failover",
    "--leader": "patronictl switchover",
    "--candidate": "patronictl switchover",
    "--force": "patronictl switchover",
}
# The docs of walletd itself (docs/BENCHMARKS.md names the loadtest modules' flags).
WALLETD_DOCS = ("README.md", "docs/API.md", "docs/OPERATIONS.md", "docs/SCALING.md",
                "docs/ARCHITECTURE.md", "docs/DOCKER.md", "docs/HTTP.md", "docs/HA.md")  # fmt: skip


def test_every_flag_the_docs_name_is_a_flag_of_walletd(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Every `--flag` in the docs is printed by some `walletd … --help` (or is another
    tool's, listed), and a flag written after `walletd <command>` is one of that command's."""
    flags = _walletd_flags(capsys)
    every = set().union(*flags.values())
    for name in WALLETD_DOCS:
        text = (ROOT / name).read_text()
        for flag in set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]+)", text)):
            assert flag in every or flag in OTHER_TOOLS_FLAGS, f"{name}: {flag}"
        for command, rest in re.findall(r"walletd ([a-z-]+)((?: [^`\n|]*)?)", text):
            if command in flags:
                for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]+)", rest):
                    assert flag in flags[command], f"{name}: walletd {command} … {flag}"


@pytest.mark.slow
async def test_a_second_serve_is_refused_and_operator_commands_never_stop_the_database(
    data_dir: Path, tmp_path: Path
) -> None:
    """Beside a running `walletd serve` on the embedded PostgreSQL: a second serve and a
    cluster exit 4 with one line naming the holder; verify and migrate use its database and
    leave it running; the first serve still answers; its SIGTERM stops its database."""
    flags = ["--data-dir", str(data_dir), "--log-level", "WARNING"]
    first = start_walletd(flags, log_dir=tmp_path)
    embedded = EmbeddedPostgres(data_dir)
    try:
        for command in (["serve", "--port", "0"], ["cluster", "--processes", "1", "--port", "0"]):
            done = _walletd(*command, *flags)
            assert done.returncode == EXIT_DATA_DIR_IN_USE, done.stderr
            assert _errors(done) == [_refused_line(data_dir, "walletd serve", first.process.pid)], (
                done.stderr
            )
            assert embedded.is_running()
        for command in (["verify"], ["migrate"]):
            done = _walletd(*command, *flags)
            assert done.returncode == 0, done.stderr
            assert embedded.is_running()  # the operator command left it running
        async with (
            aiohttp.ClientSession() as http,
            http.post(f"{first.url}/api/v1/wallets") as response,
        ):
            assert response.status == 201, await response.text()
        assert first.terminate() == 0
        assert not embedded.is_running()  # the owner stops the server it ran
    finally:
        first.kill()
        embedded.stop("immediate")


@pytest.mark.slow
async def test_kill_9_of_the_owner_frees_the_data_dir_for_a_new_serve_at_once(
    data_dir: Path, tmp_path: Path
) -> None:
    """kill -9 of `walletd serve` (its PostgreSQL keeps running): a new serve takes the data
    dir at once, serves the wallets, owns the data dir (a third serve is refused naming it)
    and, on SIGTERM, stops the server it took over."""
    flags = ["--data-dir", str(data_dir), "--log-level", "WARNING"]
    first = start_walletd(flags, log_dir=tmp_path)
    embedded = EmbeddedPostgres(data_dir)
    second = None
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{first.url}/api/v1/wallets") as response:
                assert response.status == 201
                wallet = (await response.json())["id"]
            first.process.send_signal(signal.SIGKILL)
            first.kill()
            assert embedded.is_running()  # a kill -9 of walletd leaves its postmaster
            started = time.monotonic()
            second = start_walletd(flags, log_dir=tmp_path)
            print(f"kill -9 -> new serve listening in {time.monotonic() - started:.2f} s")
            async with http.get(f"{second.url}/api/v1/wallets/{wallet}") as response:
                assert response.status == 200, await response.text()
        done = _walletd("serve", "--port", "0", *flags)
        assert done.returncode == EXIT_DATA_DIR_IN_USE, done.stderr
        assert _errors(done) == [_refused_line(data_dir, "walletd serve", second.process.pid)]
        assert second.terminate() == 0
        assert not embedded.is_running()  # taken over, so stopped by its new owner
    finally:
        first.kill()
        if second is not None:
            second.kill()
        embedded.stop("immediate")
