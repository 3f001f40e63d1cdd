"""Start, await and stop the servers under test; every wait here has a deadline."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "REPO_ROOT",
    "Server",
    "free_port",
    "running_ceiling",
    "running_walletd",
    "server_environment",
    "wait_ready",
    "walletd_command",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 180.0  # the embedded PostgreSQL's first initdb is the slow part
STOP_TIMEOUT_S = 30.0
POLL_INTERVAL_S = 0.2
LOG_TAIL_CHARS = 4000


@dataclass(frozen=True, slots=True)
class Server:
    url: str
    process: subprocess.Popen[bytes] | None
    log_path: Path | None


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` now (from /proc; one that ends meanwhile is
    left out)."""
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def walletd_command(override: str) -> list[str]:
    """`walletd` from this venv when present, so `make` works without an activated venv."""
    if override:
        return shlex.split(override)
    beside_python = Path(sys.executable).parent / "walletd"
    return [str(beside_python) if beside_python.exists() else "walletd"]


def _log_tail(log_path: Path | None) -> str:
    if log_path is None or not log_path.exists():
        return ""
    return log_path.read_text(errors="replace")[-LOG_TAIL_CHARS:]


def wait_ready(server: Server, timeout_s: float = READY_TIMEOUT_S) -> None:
    """Polls GET /readyz until 200; raises if the process dies or the deadline passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process is not None and server.process.poll() is not None:
            raise RuntimeError(
                f"server exited with {server.process.returncode} before it was ready:\n"
                + _log_tail(server.log_path)
            )
        try:
            with urllib.request.urlopen(f"{server.url}/readyz", timeout=2.0) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass  # not listening yet, or 503 while storage starts
        time.sleep(POLL_INTERVAL_S)
    raise TimeoutError(f"{server.url} not ready after {timeout_s}s:\n" + _log_tail(server.log_path))


def stop(server: Server, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
    """SIGTERM (walletd drains and exits 0), then SIGKILL past the deadline."""
    process = server.process
    if process is None or process.poll() is not None:
        return None if process is None else process.returncode
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait(timeout=timeout_s)


# Measurements and load tests run on a server that keeps every acknowledged write.
_NEVER_INHERITED = ("WALLETD_ALLOW_UNSAFE_DURABILITY",)


def server_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment of a server under test: ours, less the durability override."""
    return {k: v for k, v in environ.items() if k not in _NEVER_INHERITED}


@contextlib.contextmanager
def _running(command: list[str], url: str, log_path: Path) -> Iterator[Server]:
    environment = server_environment(os.environ)
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            command, stdout=log_file, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=environment
        )
        server = Server(url, process, log_path)
        try:
            wait_ready(server)
            yield server
        finally:
            code = stop(server)
            if code not in (0, None):
                print(f"warning: {command[0]} exited with {code}; log: {log_path}", file=sys.stderr)


@contextlib.contextmanager
def running_walletd(url: str = "", walletd_cmd: str = "") -> Iterator[Server]:
    """Uses `url` when given; otherwise `walletd serve` on a free port with a temp data dir."""
    if url:
        server = Server(url.rstrip("/"), None, None)
        wait_ready(server)
        yield server
        return
    with tempfile.TemporaryDirectory(prefix="walletd-load-") as tmp:
        port = free_port()
        command = [
            *walletd_command(walletd_cmd),
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--data-dir",
            str(Path(tmp) / "data"),
        ]
        with _running(command, f"http://127.0.0.1:{port}", Path(tmp) / "walletd.log") as server:
            yield server


@contextlib.contextmanager
def running_ceiling() -> Iterator[Server]:
    with tempfile.TemporaryDirectory(prefix="walletd-ceiling-") as tmp:
        port = free_port()
        command = [sys.executable, "-m", "loadtest.ceiling", "--port", str(port)]
        with _running(command, f"http://127.0.0.1:{port}", Path(tmp) / "ceiling.log") as server:
            yield server
