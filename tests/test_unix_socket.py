"""`walletd serve --unix-socket`: the public app on a socket file (cli/unix_socket.py).

The file's rules (mode 0600, a live path refused, a stale file replaced, removed at exit)
first on the listener itself, then on real `walletd serve` processes (marked slow).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import orjson
import pytest

from tests.processes import start_walletd, walletd_command
from walletd.cli.main import main
from walletd.cli.unix_socket import (
    UNIX_PATH_BYTES_MAX,
    UnixSocketError,
    UnixSocketInUse,
    UnixSocketListener,
)

KEY = "unix-test-key-0123456789"
TIMEOUT = aiohttp.ClientTimeout(total=30)


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def connects(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(os.fspath(path))
        except OSError:
            return False
        return True


def stale_socket_file(path: Path) -> None:
    """A socket file nothing listens on, as a kill -9 leaves it."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(os.fspath(path))


def test_the_socket_file_is_owner_only_whatever_the_umask(tmp_path: Path) -> None:
    """Mode 0600 even under umask 0, which would leave it connectable by every user."""
    path = tmp_path / "w.sock"
    with umask(0):
        listener = UnixSocketListener.bind(path)
    try:
        mode = path.lstat().st_mode
        assert stat.S_ISSOCK(mode)
        assert stat.S_IMODE(mode) == 0o600
        assert connects(path)
    finally:
        listener.remove()
    assert not path.exists()


def test_a_stale_socket_file_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "w.sock"
    stale_socket_file(path)
    assert path.exists()
    assert not connects(path)
    listener = UnixSocketListener.bind(path)
    try:
        assert connects(path)
    finally:
        listener.remove()


def test_a_live_socket_is_refused_and_left_to_its_owner(tmp_path: Path) -> None:
    path = tmp_path / "w.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as owner:
        owner.bind(os.fspath(path))
        owner.listen(1)
        with pytest.raises(UnixSocketInUse, match="something is listening on it already"):
            UnixSocketListener.bind(path)
        assert connects(path)  # the owner's file was not removed


def test_a_file_that_is_not_a_socket_is_refused_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "w.sock"
    path.write_text("data")
    with pytest.raises(UnixSocketError, match="is not a socket"):
        UnixSocketListener.bind(path)
    assert path.read_text() == "data"


def test_a_path_past_the_sun_path_limit_is_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / ("s" * (UNIX_PATH_BYTES_MAX + 1 - len(os.fsencode(tmp_path)) - 1))
    assert len(os.fsencode(path)) == UNIX_PATH_BYTES_MAX + 1
    with pytest.raises(UnixSocketError, match=f"{UNIX_PATH_BYTES_MAX}-byte limit"):
        UnixSocketListener.bind(path)
    assert not path.exists()


def test_removal_leaves_a_file_another_process_bound_since(tmp_path: Path) -> None:
    path = tmp_path / "w.sock"
    listener = UnixSocketListener.bind(path)
    path.unlink()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as successor:
        successor.bind(os.fspath(path))
        successor.listen(1)
        listener.remove()
        assert connects(path)


def test_walletd_cluster_refuses_a_data_dir_too_long_for_its_sockets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Exit 2 and one line naming the limit, before anything starts (nothing created)."""
    data_dir = tmp_path / ("d" * 100)
    code = main(["cluster", "--processes", "2", "--data-dir", str(data_dir)])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert f"walletd-1.sock is {len(os.fsencode(data_dir / 'cluster/walletd-1.sock'))} bytes" in err
    assert f"past the {UNIX_PATH_BYTES_MAX}-byte limit" in err
    assert "use a shorter --data-dir" in err
    assert not data_dir.exists()


def unix_connector(path: Path) -> aiohttp.UnixConnector:
    return aiohttp.UnixConnector(path=os.fspath(path))


@pytest.mark.slow
async def test_serve_answers_on_its_socket_with_the_same_keys_and_removes_it_at_exit(
    database_url: str, tmp_path: Path
) -> None:
    """The Unix listener is the public app: /api/v1 needs the same key (401 without), a
    request with it works, the internal route is not there (404), the access log shows
    the request came over no TCP connection (no peer address); during the SIGTERM drain
    it still accepts connections and answers (/healthz 503, `Connection: close`); at exit
    0 the file is gone."""
    path = tmp_path / "w.sock"
    process = start_walletd(
        ["--database-url", database_url, "--unix-socket", str(path), "--access-log",
         "--drain-grace", "3"],
        env={"WALLETD_API_KEYS": KEY}, log_dir=tmp_path,
    )  # fmt: skip
    try:
        assert stat.S_IMODE(path.lstat().st_mode) == 0o600
        async with aiohttp.ClientSession(timeout=TIMEOUT, connector=unix_connector(path)) as http:
            async with http.get("http://walletd/api/v1/wallets") as response:
                assert response.status == 401
            async with http.post(
                "http://walletd/api/v1/wallets",
                headers={"Authorization": f"Bearer {KEY}", "X-Request-Id": "over-unix"},
            ) as response:
                assert response.status == 201, await response.text()
            # The public app: no internal route, whatever the key.
            async with http.post(
                "http://walletd/internal/v1/legs", json={},
                headers={"Authorization": f"Bearer {KEY}"},
            ) as response:  # fmt: skip
                assert response.status == 404
        process.process.send_signal(signal.SIGTERM)
        # Each check on a new connection: the listener itself still accepts while draining.
        for _attempt in range(100):
            async with (
                aiohttp.ClientSession(timeout=TIMEOUT, connector=unix_connector(path)) as fresh,
                fresh.get("http://walletd/healthz") as response,
            ):
                if response.status == 200:  # the signal not handled yet
                    await asyncio.sleep(0.01)
                    continue
                assert response.status == 503
                assert response.headers.get("Connection", "").lower() == "close"
                break
        else:
            raise AssertionError("/healthz never failed after SIGTERM")
        code = await asyncio.to_thread(process.process.wait, 60)
        assert code == 0, process.log()
        assert not path.exists()
    finally:
        process.kill()
    lines = [orjson.loads(line) for line in process.log().splitlines() if line.startswith("{")]
    (created,) = [line for line in lines if line["request_id"] == "over-unix"]
    assert created["status"] == 201
    assert created["remote"] == ""  # a TCP peer always has an address


@pytest.mark.slow
async def test_serve_refuses_a_live_socket_with_exit_2_and_replaces_a_stale_one(
    database_url: str, tmp_path: Path
) -> None:
    """A second serve on the socket a live one listens on: exit 2, one line, and the first
    still serves on its file. Once the first is killed (-9: its file stays, stale), the
    next serve replaces the file and serves on it."""
    path = tmp_path / "w.sock"
    args = ["--database-url", database_url, "--unix-socket", str(path)]
    first = start_walletd(args, log_dir=tmp_path)
    try:
        refused = await asyncio.to_thread(
            subprocess.run,
            walletd_command(["serve", "--port", "0", "--unix-socket", str(path),
                             "--database-url", database_url, "--log-level", "ERROR"]),
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert refused.returncode == 2, refused.stderr
        assert refused.stderr.splitlines() == [
            f"walletd: error: --unix-socket {path}: something is listening on it already "
            "(another walletd?); stop it or use another path"
        ]
        async with (
            aiohttp.ClientSession(timeout=TIMEOUT, connector=unix_connector(path)) as http,
            http.get("http://walletd/healthz") as response,
        ):
            assert response.status == 200
        first.kill()
        assert path.exists()
        assert not connects(path)
        second = start_walletd(args, log_dir=tmp_path)
        try:
            async with (
                aiohttp.ClientSession(timeout=TIMEOUT, connector=unix_connector(path)) as http,
                http.post("http://walletd/api/v1/wallets") as response,
            ):
                assert response.status == 201, await response.text()
            assert second.terminate() == 0
            assert not path.exists()
        finally:
            second.kill()
    finally:
        first.kill()
