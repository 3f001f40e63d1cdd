"""The connect backoff: fail fast during an outage, probe with growing gaps, reset."""

from __future__ import annotations

import pytest

from walletd.engine.ports import StorageUnavailable
from walletd.persistence.postgres_log import ConnectBackoff


def test_calls_pass_until_a_connect_fails() -> None:
    """With no failure recorded, check() lets every call through."""
    backoff = ConnectBackoff(first_s=0.05, max_s=1.0)
    backoff.check(0.0)
    backoff.check(100.0)


def test_after_a_failure_calls_fail_at_once_until_the_window_ends() -> None:
    """A failed connect opens a window in which calls fail without trying."""
    backoff = ConnectBackoff(first_s=0.05, max_s=1.0)
    backoff.failed(10.0, OSError("refused"))
    with pytest.raises(StorageUnavailable, match="refused"):
        backoff.check(10.04)
    backoff.check(10.05)  # the window is over: the next call probes


def test_the_window_doubles_up_to_the_cap_and_resets_on_success() -> None:
    """Repeated failures double the window up to max_s; one success resets it.

    Times are binary fractions so that the boundaries are exact."""
    backoff = ConnectBackoff(first_s=0.25, max_s=2.0)
    now = 0.0
    for window in (0.25, 0.5, 1.0, 2.0, 2.0):
        backoff.failed(now, OSError("down"))
        with pytest.raises(StorageUnavailable):
            backoff.check(now + window - 0.125)
        now += window
        backoff.check(now)  # the window is over: this call probes
    backoff.succeeded()
    backoff.check(now)
    backoff.failed(now, OSError("down again"))
    with pytest.raises(StorageUnavailable):
        backoff.check(now + 0.125)
    backoff.check(now + 0.25)  # back to the first window
