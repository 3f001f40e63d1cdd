"""Running ``walletd`` as a real process in tests: start, wait for readiness, kill."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

STARTUP_TIMEOUT_S = 60.0
_LISTENING = re.compile(r"walletd listening on (http://\S+)")


@dataclass
class WalletdProcess:
    process: subprocess.Popen[str]
    url: str
    log_path: Path

    def terminate(self, timeout_s: float = 30.0) -> int:
        """SIGTERM, then wait: the graceful drain."""
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout_s)
        self._close_pipe()
        return code

    def kill(self) -> None:
        """SIGKILL: no drain, no cleanup, like a crash."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self._close_pipe()

    def _close_pipe(self) -> None:
        # An unclosed pipe is a ResourceWarning, which the suite turns into an error.
        if self.process.stdout is not None:
            self.process.stdout.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def walletd_command(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "walletd.cli.main", *args]


def start_walletd(
    args: list[str], *, env: dict[str, str] | None = None, log_dir: Path
) -> WalletdProcess:
    log_path = log_dir / f"walletd-{time.monotonic_ns()}.log"
    merged_env = {**os.environ, **(env or {})}
    args = list(args)
    if "--database-url" in args:
        # A URL may carry the embedded server's password: pass it in the environment, which
        # only this user can read, not on the command line, which every user can. (The flag
        # beat any WALLETD_DATABASE_URL given; so does this.)
        at = args.index("--database-url")
        merged_env["WALLETD_DATABASE_URL"] = args[at + 1]
        merged_env.pop("DATABASE_URL", None)
        del args[at : at + 2]
    with log_path.open("w") as log_file:  # the child keeps its own descriptor
        process = subprocess.Popen(
            walletd_command(["serve", "--port", "0", *args]),
            stdout=subprocess.PIPE,
            stderr=log_file,
            text=True,
            env=merged_env,
        )
    assert process.stdout is not None
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        match = _LISTENING.search(line)
        if match:
            return WalletdProcess(process, match.group(1), log_path)
    process.kill()
    process.wait(10)
    process.stdout.close()
    raise RuntimeError(f"walletd did not start: {log_path.read_text(errors='replace')}")
