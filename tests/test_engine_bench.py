"""loadtest.engine_bench's measuring function, run in-process for a few operations: the
tool keeps working on this checkout's engine, and its money check holds (no timing)."""

from __future__ import annotations

import pytest

from loadtest.engine_bench import AMOUNT, FUND, SCENARIOS, Measurement, main, measure


@pytest.mark.parametrize("scenario", SCENARIOS)
async def test_each_scenario_applies_every_operation_and_the_money_adds_up(
    scenario: str,
) -> None:
    """Deposits add up (the warm-up's quarter and the timed ones), transfers conserve the
    total; nothing is refused; the CPU figure is there (not judged)."""
    result = await measure(scenario, 200, 20, concurrency=8)
    wallets = 1 if scenario == "hot" else 20
    assert (result.scenario, result.operations, result.wallets) == (scenario, 200, wallets)
    assert (result.applied, result.refused) == (250, 0)
    moved = 0 if scenario == "transfer" else 250 * AMOUNT
    assert result.expected_total == wallets * FUND + moved
    assert result.total == result.expected_total
    assert result.money_errors() == []
    assert result.cpu_s >= 0
    assert result.us_per_op >= 0


def test_money_errors_name_refusals_and_a_total_that_does_not_add_up() -> None:
    """A run with refusals or a wrong total is reported, not averaged into the figures."""
    result = Measurement("transfer", 10, 0.001, 2, 9, 1, 2 * FUND, 2 * FUND - 100)
    assert result.money_errors() == [
        "1 operations refused",
        f"balances add up to {2 * FUND - 100}, expected {2 * FUND}",
    ]


def test_arguments_out_of_range_are_refused() -> None:
    """Unknown scenarios and out-of-range counts stop before anything runs."""
    with pytest.raises(SystemExit):
        main(["--scenarios", "hot,nope"])
    with pytest.raises(SystemExit):
        main(["--runs", "0"])
