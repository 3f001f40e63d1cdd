"""The engine's bounds as an operator sets them: defaults that hold together, and a refusal at
start that names the settings to change."""

from __future__ import annotations

import argparse
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from loadtest.bench_report import parse_batch_ops
from tests.conftest import AppFactory
from walletd.cli.config import load_config
from walletd.cli.main import main
from walletd.cli.service import engine_limits
from walletd.engine.limits import EngineLimits
from walletd.http.settings import HttpSettings


def _serve_defaults() -> EngineLimits:
    return engine_limits(load_config(argparse.Namespace(), environ={}))


def test_the_engines_defaults_are_serves() -> None:
    assert _serve_defaults() == EngineLimits()


async def _commits(client: Any) -> tuple[float, float]:
    """walletd_batch_ops' count and sum: commits and the log rows they wrote."""
    batch_ops = parse_batch_ops(await (await client.get("/metrics")).text())
    assert batch_ops is not None
    return batch_ops.count, batch_ops.total


async def test_a_default_bulk_request_commits_as_one_batch(
    make_app: AppFactory, aiohttp_client: Callable[..., Any]
) -> None:
    """With serve's defaults a bulk request of the most items it takes, keyed, on many
    wallets, is one commit of all its rows (one statement, one fence, one key lookup), and
    the default mailbox holds that batch."""
    limits = _serve_defaults()
    assert limits.bulk_ops_max <= limits.batch_ops_max <= limits.mailbox_commands_max
    client = await aiohttp_client(make_app(HttpSettings(), limits))
    wallets = []
    for _ in range(50):
        response = await client.post("/api/v1/wallets")
        wallets.append((await response.json())["id"])
    items = [
        {
            "wallet_id": wallets[index % len(wallets)],
            "operation_type": "DEPOSIT",
            "amount": "1.00",
            "idempotency_key": uuid.uuid4().hex,
        }
        for index in range(limits.bulk_ops_max)
    ]
    commits_before, rows_before = await _commits(client)
    response = await client.post("/api/v1/operations/bulk", json={"items": items})
    assert response.status == 200
    results = (await response.json())["results"]
    assert [result["status"] for result in results] == [200] * len(items)
    commits_after, rows_after = await _commits(client)
    assert (commits_after - commits_before, rows_after - rows_before) == (1, len(items))


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
