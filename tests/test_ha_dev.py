"""`walletd ha-dev` (cli/cluster.py, cli/ha.py) as an operator runs it: one command brings
up etcd, three Patroni nodes, two walletd processes and both HAProxy frontends; a deposit
is acknowledged with a synchronous standby streaming; SIGTERM stops every process it
started (none is left holding its data dir) and exits 0."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import urllib.request
from pathlib import Path

import psutil
import pytest

from tests.processes import walletd_command

pytestmark = pytest.mark.slow

START_WAIT_S = 180.0
_LISTENING = re.compile(r"walletd cluster listening on (\S+) ")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _alive(pid: int) -> bool:
    try:
        status: str = psutil.Process(pid).status()
    except psutil.NoSuchProcess:
        return False
    return bool(status != psutil.STATUS_ZOMBIE)


def _processes_under(folder: Path) -> list[psutil.Process]:
    """Live processes whose command line or working folder is inside ``folder``."""
    found = []
    for process in psutil.process_iter(["cmdline", "cwd"]):
        try:
            text = " ".join(process.info["cmdline"] or []) + " " + (process.info["cwd"] or "")
        except psutil.Error:
            continue
        if str(folder) in text and process.status() != psutil.STATUS_ZOMBIE:
            found.append(process)
    return found


def test_ha_dev_serves_with_two_copies_and_stops_everything_on_sigterm(tmp_path: Path) -> None:
    """Up, a keyed deposit answered 200 while Patroni shows a streaming sync standby, then
    SIGTERM: exit 0 and no etcd, Patroni, PostgreSQL, walletd or HAProxy left behind."""
    data_dir = tmp_path / "data"
    environment = dict(os.environ)
    environment.pop("DATABASE_URL", None)
    environment.pop("WALLETD_DATABASE_URL", None)
    with (tmp_path / "ha-dev.log").open("w") as log_file:  # the child keeps its own descriptor
        process = subprocess.Popen(
            walletd_command(
                ["ha-dev", "--processes", "2", "--port", str(_free_port()),
                 "--data-dir", str(data_dir), "--shards", "8"]
            ),
            stdout=subprocess.PIPE, stderr=log_file, text=True, env=environment,
        )  # fmt: skip
    assert process.stdout is not None
    try:
        url = None
        for line in process.stdout:
            if match := _LISTENING.search(line):
                url = match.group(1)
                break
        assert url is not None, (tmp_path / "ha-dev.log").read_text()
        state = json.loads((data_dir / "ha" / "state.json").read_text())
        assert len(state["nodes"]) == 3
        created = urllib.request.urlopen(
            urllib.request.Request(f"{url}/api/v1/wallets", data=b"{}", method="POST",
                                   headers={"Content-Type": "application/json"}),
            timeout=30,
        )  # fmt: skip
        wallet = json.loads(created.read())["id"]
        deposit = urllib.request.urlopen(
            urllib.request.Request(
                f"{url}/api/v1/wallets/{wallet}/operation", method="POST",
                data=b'{"operation_type": "DEPOSIT", "amount": "1.00"}',
                headers={"Content-Type": "application/json", "Idempotency-Key": "ha-dev-1"},
            ),
            timeout=30,
        )  # fmt: skip
        assert deposit.status == 200
        rest = state["nodes"][0]["rest_port"]
        with urllib.request.urlopen(f"http://127.0.0.1:{rest}/cluster", timeout=5) as answer:
            roles = {m["role"]: m["state"] for m in json.loads(answer.read())["members"]}
        assert roles.get("leader") == "running"
        assert roles.get("sync_standby") == "streaming"
        # Every process it started: its children (walletd, HAProxy, etcd, Patroni) and what
        # works in its data dir (PostgreSQL, which Patroni detaches).
        started = {p.pid for p in psutil.Process(process.pid).children(recursive=True)}
        started |= {p.pid for p in _processes_under(data_dir)}
        assert len(started) >= 2 + 2 + 1 + 3 + 3  # walletd, HAProxy, etcd, Patroni, PostgreSQL
        process.send_signal(signal.SIGTERM)
        assert process.wait(120) == 0
        left = [pid for pid in started if _alive(pid)]
        assert not left, left
    finally:
        if process.poll() is None:
            for child in psutil.Process(process.pid).children(recursive=True):
                child.kill()
            process.kill()
            process.wait()
        process.stdout.close()
