"""Unit tests of the load tools' pure pieces, and the ceiling server on loopback."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import orjson
import pytest

from loadtest.bench_report import (
    MARK_END,
    MARK_START,
    BatchOps,
    Summary,
    WrkRun,
    bounded_check,
    machine_info,
    measured_durability,
    median,
    ops_per_commit,
    parse_batch_ops,
    parse_wrk_output,
    ratio,
    render_section,
    replace_section,
    round_ratios,
    spread,
    summarize,
)
from loadtest.ledger import (
    Ledger,
    Outcome,
    format_cents,
    parse_cents,
    reconcile,
    reconcile_total,
)
from loadtest.procs import running_ceiling, server_environment

WRK_STDOUT = """Running 10s test @ http://127.0.0.1:8001
  2 threads and 64 connections
Requests/sec:  10000.00
WRKJSON {"duration_us":2000000,"requests":20000,"bytes":1,"sent":20064,"quiesce_sent":0,\
"errors":{"connect":0,"read":1,"write":0,"status":5,"timeout":2},\
"latency_us":{"p50":1500,"p90":3000,"p99":9000,"max":20000,"mean":1700.5},\
"statuses":{"200":19990,"409":5,"503":5}}
"""


def _run(rps_requests: int, p50_us: int, p99_us: int, statuses: dict[int, int]) -> WrkRun:
    return WrkRun(1_000_000, rps_requests, rps_requests, statuses, 0, p50_us, p99_us)


def test_round_ratios_pair_runs_of_one_round_and_spread_shows_median_and_range() -> None:
    """The transfer/deposit ratio is taken round by round, then summarised with its range."""
    transfers = [_run(500, 1, 2, {201: 500}), _run(300, 1, 2, {201: 300}), _run(9, 1, 2, {})]
    deposits = [_run(1000, 1, 2, {200: 1000}), _run(1000, 1, 2, {200: 1000})]
    assert round_ratios(transfers, deposits) == [0.5, 0.3]  # the unpaired round is left out
    assert round_ratios(transfers, [_run(0, 1, 2, {})]) == []
    assert spread([0.5, 0.3, 0.7]) == "0.50 (0.30-0.70)"
    assert spread([12.25, 30.0], ".1f") == "21.1 (12.2-30.0)"
    assert spread([]) == "n/a"


def test_median_and_ratio() -> None:
    """Medians take the middle (or mean of the middle two); ratios refuse a zero reference."""
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([1.0, 2.0, 3.0, 10.0]) == 2.5
    assert ratio(50.0, 200.0) == 0.25
    assert ratio(1.0, 0.0) is None
    with pytest.raises(ValueError, match="nothing"):
        median([])


def test_summarize_takes_medians_over_rounds() -> None:
    """A summary holds the per-round medians of rps, latency and non-2xx."""
    runs = [
        _run(100, 1000, 5000, {200: 100}),
        _run(300, 3000, 9000, {200: 290, 409: 10}),
        _run(200, 2000, 7000, {200: 198, 503: 2}),
    ]
    summary = summarize("hot", "walletd", runs, [4.0, 8.0, 6.0])
    assert summary == Summary("hot", "walletd", 3, 200.0, 2.0, 7.0, 2.0, 6.0)


def test_parse_wrk_output_reads_the_lua_json_line() -> None:
    """The WRKJSON line yields rps, percentiles, status counts and unknown outcomes."""
    run = parse_wrk_output(WRK_STDOUT)
    assert run.rps == 10_000.0
    assert (run.p50_us, run.p99_us) == (1500, 9000)
    assert (run.ok_2xx, run.non_2xx, run.server_errors) == (19990, 10, 5)
    assert run.socket_errors == 3
    # 64 unanswered requests plus 5 answered 503: their effect is unknown.
    assert run.unknown_outcomes == 69


def test_parse_wrk_output_without_json_fails_loudly() -> None:
    """Output without the Lua summary (script not loaded) is an error, not zeros."""
    with pytest.raises(ValueError, match="WRKJSON"):
        parse_wrk_output("Requests/sec: 5.00\n")


def test_quiesced_run_needs_a_quiet_answer_on_every_connection() -> None:
    """In a quiesce run unknown outcomes are only 5xx and socket errors, and the run counts as
    quiesced only when at least one 400 per connection came back."""
    run = WrkRun(1_000_000, 110, 50, {200: 50, 400: 60}, 0, 1, 2, quiesce_sent=61)
    assert run.unknown_outcomes == 0
    assert run.quiesced(connections=60)
    assert not run.quiesced(connections=64)


def test_parse_batch_ops_sums_label_sets_and_tolerates_absence() -> None:
    """The walletd_batch_ops histogram is read across labels; no histogram gives None."""
    text = (
        "# TYPE walletd_batch_ops histogram\n"
        'walletd_batch_ops_bucket{shard="0",le="+Inf"} 3\n'
        'walletd_batch_ops_sum{shard="0"} 30\n'
        'walletd_batch_ops_count{shard="0"} 3\n'
        'walletd_batch_ops_sum{shard="1"} 10.0\n'
        'walletd_batch_ops_count{shard="1"} 2\n'
    )
    assert parse_batch_ops(text) == BatchOps(40.0, 5.0)
    assert parse_batch_ops("walletd_requests_total 5\n") is None
    assert ops_per_commit(BatchOps(40.0, 5.0), BatchOps(140.0, 15.0)) == 10.0
    assert ops_per_commit(None, BatchOps(1.0, 1.0)) is None
    assert ops_per_commit(BatchOps(1.0, 1.0), BatchOps(1.0, 1.0)) is None


def test_bounded_check() -> None:
    """Applied deposits must cover every 2xx and exceed them by at most the unknown ones."""
    assert bounded_check(applied=100, acked=100, unknown=0)
    assert bounded_check(applied=164, acked=100, unknown=64)
    assert not bounded_check(applied=99, acked=100, unknown=64)
    assert not bounded_check(applied=165, acked=100, unknown=64)


def _section(body: str) -> str:
    return f"{MARK_START}\n{body}\n{MARK_END}\n"


def test_replace_section_keeps_text_around_the_markers() -> None:
    """An existing marked section is replaced in place; prose before and after survives."""
    document = "# Benchmarks\n\nintro\n\n" + _section("old table") + "\n## Notes\nkeep me\n"
    updated = replace_section(document, _section("new table"))
    assert "old table" not in updated
    assert updated.startswith("# Benchmarks\n\nintro\n\n" + _section("new table").rstrip("\n"))
    assert updated.endswith("\n## Notes\nkeep me\n")
    assert updated.count(MARK_START) == 1
    assert replace_section(updated, _section("new table")) == updated


def test_replace_section_appends_or_creates() -> None:
    """Without markers the section is appended; an empty file gets a title first."""
    assert replace_section(
        "# Bench\n\nprose\n", _section("t")
    ) == "# Bench\n\nprose\n\n" + _section("t")
    assert replace_section("", _section("t")) == "# Benchmarks\n\n" + _section("t")


def test_render_section_reports_ratio_to_ceiling() -> None:
    """The table carries each target's ratio to the ceiling of the same scenario."""
    section = render_section(
        [
            Summary("hot", "walletd", 3, 500.0, 1.0, 9.0, 0.0, 12.5),
            Summary("hot", "ceiling", 3, 1000.0, 0.5, 2.0, 0.0, None),
        ],
        machine="2 CPUs",
        command="python -m loadtest.bench",
        date="2025-01-19 10:00 UTC",
        settings="wrk 2 threads.",
        verification=["PASS hot"],
    )
    assert section.startswith(MARK_START)
    assert section.endswith(MARK_END + "\n")
    assert "| hot | walletd | 500 | 1.00 | 9.00 | 0 | 0.50 | 12.5 |" in section
    assert "| hot | ceiling | 1000 | 0.50 | 2.00 | 0 | 1.00 | n/a |" in section
    assert "- PASS hot" in section


def test_machine_info_reads_proc_files(tmp_path: Path) -> None:
    """CPU model and memory come from /proc-style files."""
    cpuinfo, meminfo = tmp_path / "cpuinfo", tmp_path / "meminfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Test CPU 9000\n")
    meminfo.write_text("MemTotal:       16777216 kB\n")
    info = machine_info(cpuinfo, meminfo)
    assert "Test CPU 9000" in info
    assert "16.0 GiB RAM" in info


def test_cents_round_trip_without_floats() -> None:
    """Money strings parse to exact cents and render back with two decimals."""
    assert parse_cents("1000.00") == 100_000
    assert parse_cents("0.1") == 10
    assert parse_cents("7") == 700
    assert format_cents(5) == "0.05"
    assert format_cents(-1234) == "-12.34"
    for bad in ("1.234", "abc", "", "1e5"):
        with pytest.raises(ValueError, match="money"):
            parse_cents(bad)


def test_reconcile_is_exact_without_uncertainty() -> None:
    """With only definitive answers, the balance must equal initial + acked net to the cent."""
    ledger = Ledger()
    ledger.record("w", 500, Outcome.APPLIED)
    ledger.record("w", -200, Outcome.APPLIED)
    ledger.record("w", -900, Outcome.REFUSED)
    assert reconcile(ledger, {"w": 1300}, {"w": 1000}) == []
    [mismatch] = reconcile(ledger, {"w": 1299}, {"w": 1000})
    assert mismatch.expected_cents == 1300
    assert "balance 12.99, expected 13.00" in mismatch.describe()
    assert reconcile(ledger, {"w": None}, {"w": 1000})[0].actual_cents is None


def test_reconcile_bounds_unknown_outcomes_and_merges_workers() -> None:
    """Unknown outcomes widen the allowed range; worker ledgers merge over the wire."""
    worker = Ledger()
    worker.record("w", 100, Outcome.APPLIED)
    worker.record("w", 50, Outcome.UNKNOWN)
    worker.record("w", -30, Outcome.UNKNOWN)
    master = Ledger()
    master.merge(Ledger.from_wire(orjson.loads(orjson.dumps(worker.to_wire()))))
    master.merge(Ledger.from_wire(worker.to_wire()))
    assert master.wallets["w"].acked_net == 200
    for balance in (140, 200, 250, 300):
        assert reconcile(master, {"w": balance}, {}) == [], balance
    assert len(reconcile(master, {"w": 139}, {})) == 1
    assert len(reconcile(master, {"w": 301}, {})) == 1


def _http(method: str, url: str, body: bytes | None = None) -> tuple[int, dict[str, object]]:
    headers = {"Content-Type": "application/json"} if body is not None else {}
    request = urllib.request.Request(url, data=body, method=method, headers=headers)
    with urllib.request.urlopen(request, timeout=5) as response:
        return int(response.status), orjson.loads(response.read())


def test_reconcile_total_checks_that_transfers_keep_the_global_sum() -> None:
    """Transfers move money between wallets without changing the sum; money created or lost
    anywhere is caught even when each wallet alone looks plausible."""
    ledger = Ledger()
    ledger.record("a", -500, Outcome.APPLIED)
    ledger.record("b", 500, Outcome.APPLIED)
    ledger.record("a", -100, Outcome.UNKNOWN)
    ledger.record("b", 100, Outcome.UNKNOWN)
    initial = {"a": 1000, "b": 0}
    assert reconcile_total(ledger, {"a": 500, "b": 500}, initial) is None
    assert reconcile_total(ledger, {"a": 400, "b": 500}, initial) is None  # PENDING at the end
    assert reconcile_total(ledger, {"a": 400, "b": 800}, initial) is not None
    assert reconcile_total(ledger, {"a": 500, "b": None}, initial) is not None


@pytest.mark.slow
def test_ceiling_server_answers_on_loopback() -> None:
    """`python -m loadtest.ceiling` serves walletd's routes with constant wallets."""
    with running_ceiling() as server:
        assert server.url.startswith("http://127.0.0.1:")
        status, created = _http("POST", f"{server.url}/api/v1/wallets", b"{}")
        assert status == 201
        assert created["balance"] == "1000.00"
        wallet = f"{server.url}/api/v1/wallets/{created['id']}"
        assert _http("GET", wallet) == (200, created)
        body = b'{"operation_type": "DEPOSIT", "amount": "1.00"}'
        assert _http("POST", f"{wallet}/operation", body) == (200, created)
    assert server.process is not None
    assert server.process.returncode == 0


def test_measured_durability_quotes_walletds_start_line() -> None:
    """The bench header quotes the durability settings walletd logged, or says unknown."""
    log = (
        "2026-12-02 10:00:00,000 INFO walletd: PostgreSQL durability: fsync=on, "
        "full_page_writes=on, synchronous_commit=on\nwalletd listening on http://x\n"
    )
    assert measured_durability(log) == (
        "PostgreSQL durability: fsync=on, full_page_writes=on, synchronous_commit=on."
    )
    assert "unknown" in measured_durability("walletd listening on http://x\n")


def test_servers_under_test_never_inherit_the_durability_override() -> None:
    """make bench / make loadtest start walletd without WALLETD_ALLOW_UNSAFE_DURABILITY,
    whatever the caller's environment says; the rest of the environment passes through."""
    given = {"WALLETD_ALLOW_UNSAFE_DURABILITY": "true", "WALLETD_SHARDS": "2", "PATH": "/bin"}
    assert server_environment(given) == {"WALLETD_SHARDS": "2", "PATH": "/bin"}


def test_the_cluster_bench_states_its_goals_as_ratios_of_medians_and_projects_cores() -> None:
    """cluster_bench's summary: ratios of the medians of the same run (via HAProxy ÷ direct,
    2 ÷ 1 processes) and a projection of N cores × 10^6 / (µs per request of walletd +
    HAProxy + PostgreSQL) with PostgreSQL's share, from the 2-process medians."""
    from loadtest.bench_report import WrkRun
    from loadtest.cluster_bench import PATHS, Sample, _projection, _ratios

    def sample(path: str, scenario: str, rps: int, walletd: float, postgres: float) -> Sample:
        run = WrkRun(
            duration_us=1_000_000, requests=rps, sent=rps, statuses={200: rps},
            socket_errors=0, p50_us=1000, p99_us=5000,
        )  # fmt: skip
        return Sample(path, scenario, run, {"walletd": walletd, "haproxy": 40.0,
                                            "postgres": postgres}, 0)  # fmt: skip

    direct, one, two = (path.name for path in PATHS)
    samples = [
        *(sample(direct, s, 2000, 100.0, 50.0) for s in ("hot", "many")),
        *(sample(one, s, 1800, 110.0, 55.0) for s in ("hot", "many")),
        *(sample(two, s, 1980, 160.0, 50.0) for s in ("hot", "many")),
        sample(two, "many", 9999, 10_000.0, 50.0),  # the median of three ignores one outlier
        sample(two, "many", 1, 1.0, 50.0),
    ]
    assert "| many | 1.10 | 1.10 | 40 | 1.10 |" in _ratios(samples)
    # 160 + 40 + 50 = 250 µs per request: 8 cores → 32,000 rps, PostgreSQL 20% = 1.6 cores.
    assert "| many | 250 | 20% | 32,000 rps (PostgreSQL 1.6 cores) |" in _projection(samples)


def test_the_cluster_bench_compares_two_clusters_by_the_ratios_of_each_round() -> None:
    """`--member-inflight N`: the default 2-process cluster and one with N batches in flight
    per member, each against one process behind HAProxy and against each other, as ratios
    within each round (a busy neighbour slows a round's paths alike), then their medians."""
    from loadtest.bench_report import WrkRun
    from loadtest.cluster_bench import PATHS, Sample, Target, _inflight_ratios

    other = Target("2 via HAProxy, 2 in flight", 2, True, 2)

    def sample(path: str, rps: int, postgres: float, round_number: int) -> Sample:
        run = WrkRun(
            duration_us=1_000_000, requests=rps, sent=rps, statuses={200: rps},
            socket_errors=0, p50_us=1000, p99_us=5000,
        )  # fmt: skip
        cpu = {"walletd": 100.0, "haproxy": 40.0, "postgres": postgres}
        return Sample(path, "many", run, cpu, 0, round_number)

    one, two = PATHS[1].name, PATHS[2].name
    # Round 0 on a quiet machine, round 1 at half speed: the per-round ratios agree.
    samples = [
        sample(one, 1000, 60.0, 0), sample(two, 900, 80.0, 0), sample(other.name, 800, 100.0, 0),
        sample(one, 500, 60.0, 1), sample(two, 450, 80.0, 1), sample(other.name, 400, 100.0, 1),
    ]  # fmt: skip
    table = _inflight_ratios(samples, other)
    assert "| many | 0.90 (0.90–0.90) | 0.80 (0.80–0.80) | 1.12 (1.12–1.12) | 80 / 100 |" in table
