"""The garbage collector's tuning (cli/gc_tuning.py): start-up objects frozen, the young
threshold raised, the setting bounded; and `walletd serve` applies it once ready."""

from __future__ import annotations

import gc
from argparse import Namespace
from collections.abc import Callable, Iterator

import pytest

from tests.processes import WalletdProcess
from walletd.cli.config import SETTINGS, load_config
from walletd.cli.gc_tuning import GC_GEN0_THRESHOLD_MAX, tune_gc


@pytest.fixture
def restored_gc() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


@pytest.mark.usefixtures("restored_gc")
def test_tune_gc_freezes_what_is_alive_and_raises_only_the_young_threshold() -> None:
    _young, middle, old = gc.get_threshold()
    garbage: list[object] = []
    garbage.append(garbage)  # a cycle that only the collector frees
    del garbage
    frozen = tune_gc(12_345)
    assert frozen > 1000  # this interpreter's modules, functions, classes
    assert gc.get_freeze_count() == frozen
    assert gc.get_threshold() == (12_345, middle, old)
    assert gc.collect() == 0  # the cycle was collected before freezing, not frozen


@pytest.mark.usefixtures("restored_gc")
def test_zero_keeps_the_young_threshold_and_still_freezes() -> None:
    before = gc.get_threshold()
    assert tune_gc(0) > 0
    assert gc.get_threshold() == before


def test_the_setting_is_bounded() -> None:
    flags = Namespace(**{setting.name: None for setting in SETTINGS})
    assert load_config(flags, {}).gc_gen0_threshold == 20_000
    assert load_config(flags, {"WALLETD_GC_GEN0_THRESHOLD": "0"}).gc_gen0_threshold == 0
    for bad in ("-1", str(GC_GEN0_THRESHOLD_MAX + 1), "lots"):
        with pytest.raises(ValueError, match="WALLETD_GC_GEN0_THRESHOLD"):
            load_config(flags, {"WALLETD_GC_GEN0_THRESHOLD": bad})
    with pytest.raises(ValueError, match=r"0\.\.1000000"):
        tune_gc(GC_GEN0_THRESHOLD_MAX + 1)


@pytest.mark.slow
def test_serve_tunes_the_collector_once_ready(
    walletd_process: Callable[..., WalletdProcess], fresh_database_url: str
) -> None:
    process = walletd_process("--database-url", fresh_database_url, "--gc-gen0-threshold", "54321")
    process.terminate()
    log = process.log()
    assert "objects frozen, thresholds (54321, 10, 10)" in log, log[-2000:]
