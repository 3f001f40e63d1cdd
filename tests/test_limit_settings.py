"""The engine's bounds as an operator sets them: defaults that hold together, and a refusal at
start that names the settings to change."""

from __future__ import annotations

import pytest

from walletd.cli.main import main
from walletd.engine.limits import EngineLimits


def test_a_default_bulk_request_commits_as_one_batch() -> None:
    """A bulk request of the default item bound fits one batch (one commit, one fence, one
    key lookup), and the default mailbox holds that batch."""
    limits = EngineLimits()
    assert limits.bulk_ops_max <= limits.batch_ops_max <= limits.mailbox_commands_max


@pytest.mark.parametrize(
    ("variables", "named"),
    [
        ({"WALLETD_MAILBOX_MAX": "512"}, ("WALLETD_MAILBOX_MAX", "= 512", "WALLETD_BATCH_MAX")),
        (
            {"WALLETD_PIPELINES": "64"},
            ("WALLETD_IDEMPOTENCY_KEYS_MAX", "WALLETD_INFLIGHT_BATCHES"),
        ),
    ],
)
def test_limits_that_do_not_fit_together_are_refused_at_start_by_their_settings_names(
    variables: dict[str, str],
    named: tuple[str, ...],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A mailbox smaller than a batch, or a key cache too small for every open batch of each
    pipeline, stops walletd before anything runs (exit 2, one line) with the environment
    variables and flags an operator changes, not the engine's field names."""
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    code = main(["migrate"])  # any command: the configuration is read before anything runs
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("walletd: error: "), err
    assert err.count("\n") == 1
    for text in named:
        assert text in err, err
    assert "_max" not in err.replace("WALLETD_", ""), err  # no engine field name left
