"""Short real Locust runs: against a fresh walletd (it must reconcile, with real traffic),
and against a fake that loses writes on purpose (the reconciliation must catch it)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from loadtest.procs import REPO_ROOT

pytestmark = pytest.mark.slow

RUN_TIMEOUT_S = 300
# Five seconds of 20 users do thousands of operations on a quiet machine; a run below this
# is next to empty and would reconcile trivially.
ACKED_OPS_MIN = 200
DROP_EVERY = 25  # the fake acknowledges every 25th deposit without applying it
# Locust's run time includes the wallet set-up, which must stay a small part of it even on a
# busy machine.
WALLETS = 50
_RECONCILED = re.compile(r"reconciliation (PASSED|FAILED): \d+ wallets, (\d+) acknowledged ops")


def _run_locust(*args: str) -> tuple[int, str]:
    completed = subprocess.run(
        [sys.executable, "-m", "loadtest.run_locust", "--duration", "5", "--users", "20",
         "--min-acked-ops", str(ACKED_OPS_MIN), "--wallets", str(WALLETS), *args],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False,
    )  # fmt: skip
    return completed.returncode, completed.stdout + completed.stderr


def _acked_ops(output: str) -> int:
    match = _RECONCILED.search(output)
    assert match, output[-5000:]
    return int(match.group(2))


def test_short_locust_run_reconciles_every_balance() -> None:
    """Five seconds of mixed traffic: no failed request, at least ACKED_OPS_MIN operations
    acknowledged, and every balance matches the acknowledgements."""
    returncode, output = _run_locust()
    assert returncode == 0, output[-5000:]
    assert "reconciliation PASSED" in output
    assert _acked_ops(output) >= ACKED_OPS_MIN


def test_reconciliation_catches_a_lost_write() -> None:
    """The same run against loadtest/fake_walletd.py --drop-every N, which acknowledges every
    Nth deposit without applying it: Locust exits 1 and reports a balance mismatch."""
    fake = f"{sys.executable} -m loadtest.fake_walletd --drop-every {DROP_EVERY}"
    returncode, output = _run_locust("--walletd-cmd", fake)
    assert returncode == 1, output[-5000:]
    assert "BALANCE MISMATCH" in output
    assert "reconciliation FAILED" in output
    assert _acked_ops(output) >= ACKED_OPS_MIN  # enough deposits that some were dropped
