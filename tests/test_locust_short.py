"""A short real Locust run against a fresh walletd (needs the server: `walletd serve`)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from loadtest.procs import REPO_ROOT

RUN_TIMEOUT_S = 300


@pytest.mark.slow
def test_short_locust_run_reconciles_every_balance() -> None:
    """Five seconds of mixed traffic: no failed request, and every balance matches the acks."""
    completed = subprocess.run(
        [sys.executable, "-m", "loadtest.run_locust", "--duration", "5", "--users", "20"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output[-5000:]
    assert "reconciliation PASSED" in output
