"""The Grafana dashboard and the Prometheus alerts, proven on a real Prometheus.

`promtool check rules` and `promtool test rules` (each alert fires on bad series and stays
quiet on healthy ones); the dashboard JSON and the compose `observability` profile checked
statically (no Grafana or Docker engine here): importable into any Grafana (a datasource
input, no datasource uid of ours, every query filtered by the `$job` and `$instance`
variables); and a real Prometheus scraping a live two-process cluster under a little load
of every kind (operations, transfers, holds, bulk, a feed stream), asked through its HTTP
API for every dashboard query (its variables substituted as Grafana does) and every alert
expression with its threshold removed: each must return a series.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests import test_deployment as deployment
from tests.processes import WalletdProcess
from walletd.client.api import BulkItem, WalletdClient
from walletd.client.errors import InsufficientFunds
from walletd.http.metrics import Metrics

# Every test here starts PostgreSQL, walletd or Prometheus processes.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
OBSERVABILITY = ROOT / "observability"
ALERTS = OBSERVABILITY / "alerts.yml"
ALERTS_TEST = OBSERVABILITY / "alerts_test.yml"
PROMETHEUS_CONFIG = OBSERVABILITY / "prometheus.yml"
DASHBOARD = OBSERVABILITY / "grafana" / "dashboards" / "walletd.json"
DATASOURCES = OBSERVABILITY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
PROVIDERS = OBSERVABILITY / "grafana" / "provisioning" / "dashboards" / "walletd.yml"
COMPOSE_FILE = ROOT / "docker-compose.yml"
TOOL_TIMEOUT_S = 60.0
PROMETHEUS_READY_S = 60.0
ALL_SERIES_WITHIN_S = 120.0
SCRAPE_INTERVAL = "1s"
SHARDS = 4  # the live cluster's shard count: two processes serve two each
# What Grafana puts in place of its built-in variables when it runs a panel's query.
GRAFANA_VARIABLES = {"$__rate_interval": "15s", "$__interval": "5s", "$__range": "1m"}
# The dashboard's own variables, as every query must filter by them.
JOB_FILTER = 'job=~"$job"'
INSTANCE_FILTER = 'instance=~"$instance"'
# Labels whose values are not an enumeration: paths, numbers, bucket bounds.
FREE_LABELS = frozenset({"route", "status", "shard", "pipeline", "le"})
# An alert expression ends in "<comparison> <number>"; removing it leaves what is compared.
THRESHOLD = re.compile(r"\s*(==|!=|>=|<=|>|<)\s*[-+]?[0-9]*\.?[0-9]+(e[-+]?[0-9]+)?\s*$")

# The load moves every figure the new panels show, not only its pre-set zeros: each query
# must return this many series above 0.
MOVED_FIGURES = {
    "sum by (event) (increase(walletd_holds_total[1m])) > 0": 4,
    'sum by (status) (increase(walletd_transfers_ended_total{status="COMPLETED"}[1m])) > 0': 1,
    "sum by (result) (increase(walletd_bulk_items_total[1m])) > 0": 2,
    "sum(increase(walletd_bulk_requests_total[1m])) > 0": 1,
    "sum(walletd_feed_streams_open) > 0": 1,
    "sum(increase(walletd_feed_events_sent_total[1m])) > 0": 1,
    'sum(increase(walletd_forwards_total{result="ANSWERED"}[1m])) > 0': 1,
    'sum(walletd_shard_moves_total{direction="GAINED"}) > 0': 1,
    "sum by (instance) (walletd_shards_served) > 0": 2,
    "sum(walletd_lease_renewal_age_seconds) > 0": 1,
}

StartWalletd = Callable[..., WalletdProcess]


def tool(name: str) -> str:
    """The real tool's path; its absence fails (the suite never skips a missing install)."""
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: run .ci/install-prometheus")
    return found


def alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(ALERTS.read_text())
    return [rule for group in document["groups"] for rule in group["rules"] if "alert" in rule]


def dashboard_panels() -> list[dict[str, Any]]:
    panels: list[dict[str, Any]] = json.loads(DASHBOARD.read_text())["panels"]
    nested = [inner for panel in panels for inner in panel.get("panels", [])]
    return panels + nested


def dashboard_queries(job: str = "walletd", instances: tuple[str, ...] = ()) -> list[str]:
    """Every panel query as Grafana sends it: ``$job`` the job picked, ``$instance`` the
    instances picked (regex-escaped inside the PromQL string, so ``\\\\.`` for a dot; joined
    by ``|``; ``.*`` for All)."""
    instance = "|".join(re.escape(i).replace("\\", "\\\\") for i in instances) or ".*"
    values = {**GRAFANA_VARIABLES, "$job": job, "$instance": instance}
    queries = []
    for panel in dashboard_panels():
        for target in panel.get("targets", []):
            query = target["expr"]
            for variable, value in values.items():
                query = query.replace(variable, value)
            queries.append(query)
    return queries


def alert_queries() -> dict[str, str]:
    """Each alert's expression with its threshold removed."""
    stripped = {}
    for rule in alert_rules():
        expression = " ".join(rule["expr"].split())
        without = THRESHOLD.sub("", expression)
        assert without != expression, f"{rule['alert']}: no trailing threshold to remove"
        stripped[rule["alert"]] = without
    return stripped


# --- promtool --------------------------------------------------------------------------------


def run_tool(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, cwd=OBSERVABILITY, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S
    )


def test_prometheus_installer_is_run_by_ci() -> None:
    """.ci/run runs every executable .ci/install-*: the Prometheus installer must be one."""
    assert os.access(ROOT / ".ci" / "install-prometheus", os.X_OK)


def test_alert_rules_pass_promtool_check() -> None:
    """`promtool check rules` accepts alerts.yml and finds every rule."""
    done = run_tool(tool("promtool"), "check", "rules", ALERTS.name)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in done.stdout


def test_alert_rules_pass_their_promtool_unit_tests() -> None:
    """`promtool test rules alerts_test.yml` passes: each alert fires and stays quiet as meant."""
    done = run_tool(tool("promtool"), "test", "rules", ALERTS_TEST.name)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    """alerts_test.yml holds, for every alert, a case where it fires and one where it does not."""
    cases = yaml.safe_load(ALERTS_TEST.read_text())["tests"]
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in cases:
        for check in case["alert_rule_test"]:
            (firing if check["exp_alerts"] else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in alert_rules()}
    assert names <= firing, f"never seen firing: {names - firing}"
    assert names <= quiet, f"never seen quiet: {names - quiet}"


def test_alerts_carry_severity_and_a_summary() -> None:
    """Each alert routes by a severity label (page or ticket) and says what is wrong."""
    for rule in alert_rules():
        assert re.fullmatch(r"Walletd[A-Z][A-Za-z]+", rule["alert"]), rule["alert"]
        assert rule["labels"]["severity"] in {"page", "ticket"}, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]


# --- the dashboard and its provisioning, statically -----------------------------------------


def test_dashboard_is_a_grafana_dashboard() -> None:
    """The JSON has what Grafana needs: a uid and title, unique panel ids on a 24-wide grid,
    and at least one query in each query panel."""
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"]
    assert dashboard["title"]
    assert dashboard["schemaVersion"] >= 36
    panels = dashboard_panels()
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0, panel["title"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] in {"row", "text"}:
            continue
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
    assert len(dashboard_queries()) >= 30
    assert "reserved" not in DASHBOARD.read_text().lower()


def test_dashboard_imports_into_any_grafana() -> None:
    """Dashboards → Import asks for a Prometheus datasource (the DS_PROMETHEUS input), which
    a `datasource` variable carries to every panel and query; no datasource uid of ours is
    written anywhere, and `job` / `instance` variables filter every query."""
    text = DASHBOARD.read_text()
    dashboard = json.loads(text)
    (ds_input,) = dashboard["__inputs"]
    assert (ds_input["name"], ds_input["type"], ds_input["pluginId"]) == (
        "DS_PROMETHEUS", "datasource", "prometheus",
    )  # fmt: skip
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["datasource"]["current"]["value"] == "${DS_PROMETHEUS}"
    for name in ("job", "instance"):
        assert variables[name]["type"] == "query"
        assert variables[name]["datasource"]["uid"] == "${datasource}"
    assert variables["instance"]["multi"]
    assert variables["instance"]["includeAll"]
    provisioned_uid = yaml.safe_load(DATASOURCES.read_text())["datasources"][0]["uid"]
    assert provisioned_uid not in text, "a datasource uid of this repository's provisioning"
    for panel in dashboard_panels():
        if panel["type"] in {"row", "text"}:
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        for target in panel["targets"]:
            assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            expr = target["expr"]
            selectors = re.findall(r"\b[a-z_:]+\{[^}]*\}", expr)
            bare = re.findall(r"\b(?:walletd|process|python|up)[a-z_]*\b(?![{(])", expr)
            assert not bare, f"{panel['title']}: a series without the filters: {bare}"
            for selector in selectors:
                assert JOB_FILTER in selector, f"{panel['title']}: {selector}"
                assert INSTANCE_FILTER in selector, f"{panel['title']}: {selector}"
            assert 'job="' not in expr, panel["title"]


def test_metrics_export_no_created_series_and_one_casing() -> None:
    """/metrics has no `*_created` series (prometheus-client's creation timestamps), and
    every enumerated label value is upper case (the API's spelling of codes and statuses)."""
    metrics = Metrics()
    metrics.engine.transfer_ended("COMPLETED", "request")
    metrics.engine.batch_failed(0, 3, "commit_failed")
    metrics.engine.command_rejected("overloaded")
    metrics.engine.hold_changed("CREATED")
    metrics.observe_request("/healthz", "GET", 200, 0.001)
    metrics.observe_unavailable("OVERLOADED")
    metrics.observe_forward("answered")
    metrics.observe_bulk(2, 1)
    text = metrics.exposition().decode()
    assert not [line for line in text.splitlines() if "_created" in line]
    assert_one_casing(text)


def assert_one_casing(text: str) -> None:
    """Every walletd_* label value outside FREE_LABELS is written in upper case."""
    mixed = set()
    for family in text_string_to_metric_families(text):
        if not family.name.startswith("walletd_"):
            continue
        for sample in family.samples:
            for label, value in sample.labels.items():
                if label not in FREE_LABELS and value != value.upper():
                    mixed.add(f"{sample.name}{{{label}={value!r}}}")
    assert not mixed, sorted(mixed)


def _mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> host path, for each bind mount of a compose service."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        if source.startswith("./"):
            mounts[target] = ROOT / source
    return mounts


def test_compose_observability_profile_wires_prometheus_and_grafana() -> None:
    """Prometheus and Grafana sit in the `observability` profile only, mounting the files
    this suite tests, at the paths their own configuration names."""
    services = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    prometheus, grafana = services["prometheus"], services["grafana"]
    assert prometheus["profiles"] == grafana["profiles"] == ["observability"]
    assert "profiles" not in services["walletd"]
    assert "profiles" not in services["postgres"]
    prometheus_mounts = _mounts(prometheus)
    assert prometheus_mounts["/etc/prometheus/prometheus.yml"] == PROMETHEUS_CONFIG
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    for rule_file in config["rule_files"]:
        assert prometheus_mounts[rule_file] == ALERTS
    targets = config["scrape_configs"][0]["static_configs"][0]["targets"]
    assert targets == ["walletd:8000"]
    grafana_mounts = _mounts(grafana)
    provisioning = grafana_mounts["/etc/grafana/provisioning"]
    assert provisioning / "datasources" / DATASOURCES.name == DATASOURCES
    provider_path = yaml.safe_load(PROVIDERS.read_text())["providers"][0]["options"]["path"]
    assert grafana_mounts[provider_path] == DASHBOARD.parent
    datasource_url = yaml.safe_load(DATASOURCES.read_text())["datasources"][0]["url"]
    assert datasource_url == "http://prometheus:9090"
    for host_path in [*prometheus_mounts.values(), *grafana_mounts.values()]:
        assert host_path.exists(), host_path


def test_compose_accepts_the_observability_profile(tmp_path: Path) -> None:
    """`docker-compose --profile observability config` validates the file and resolves
    every bind mount of Prometheus and Grafana to a file or folder of this repository."""
    empty_env_file = tmp_path / "empty.env"
    empty_env_file.write_text("")
    done = subprocess.run(
        [deployment.tool("docker-compose"), "--env-file", str(empty_env_file),
         "--file", str(COMPOSE_FILE), "--profile", "observability", "config"],
        cwd=ROOT, env=deployment.clean_environment(), capture_output=True, text=True,
        timeout=TOOL_TIMEOUT_S,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    services = yaml.safe_load(done.stdout)["services"]
    for name in ("prometheus", "grafana"):
        # docker-compose 1.x resolves a volume to "source:target[:mode]", 2.x to a mapping.
        sources = [
            volume["source"] if isinstance(volume, dict) else volume.split(":")[0]
            for volume in services[name]["volumes"]
        ]
        binds = [source for source in sources if source.startswith("/")]
        assert binds, name
        for source in binds:
            assert Path(source).exists(), source


# --- a real Prometheus scraping a live walletd ------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@contextlib.contextmanager
def running_prometheus(tmp_path: Path, targets: list[str]) -> Iterator[str]:
    """Prometheus scraping ``targets`` every second, with alerts.yml loaded; its base URL."""
    config = {
        "global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": SCRAPE_INTERVAL},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [{"job_name": "walletd", "static_configs": [{"targets": targets}]}],
    }
    config_path = tmp_path / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    port = free_port()
    log_path = tmp_path / "prometheus.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [
                tool("prometheus"),
                f"--config.file={config_path}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


async def until_ready(session: aiohttp.ClientSession, url: str) -> None:
    deadline = time.monotonic() + PROMETHEUS_READY_S
    while True:
        with contextlib.suppress(aiohttp.ClientError):
            async with session.get(f"{url}/-/ready") as response:
                if response.status == 200:
                    return
        assert time.monotonic() < deadline, "Prometheus did not become ready"
        await asyncio.sleep(0.2)


async def series_count(session: aiohttp.ClientSession, url: str, query: str) -> int:
    async with session.get(f"{url}/api/v1/query", params={"query": query}) as response:
        body = await response.json()
    assert body["status"] == "success", f"{query}: {body}"
    assert body["data"]["resultType"] == "vector", query
    return len(body["data"]["result"])


async def metrics_text(session: aiohttp.ClientSession, base_url: str) -> str:
    async with session.get(f"{base_url.rstrip('/')}/metrics") as response:
        assert response.status == 200
        return await response.text()


async def balanced(session: aiohttp.ClientSession, urls: list[str]) -> bool:
    """Every process serves its share of the shards (the cluster settled after the join)."""
    served = []
    for url in urls:
        match = re.search(r"^walletd_shards_served (\S+)$", await metrics_text(session, url),
                          re.MULTILINE)  # fmt: skip
        served.append(float(match.group(1)) if match else 0.0)
    return all(count == SHARDS / len(urls) for count in served)


@contextlib.asynccontextmanager
async def light_load(base_url: str) -> AsyncIterator[None]:
    """Until the block ends, a little of everything the dashboard shows: creations,
    deposits, reads, history, refused withdrawals, transfers, holds (captured, voided,
    expired), bulk requests with a refused item, and one open feed stream. The wallets
    spread over both processes' shards, so requests are forwarded and transfers cross."""

    async def operations(walletd: WalletdClient, http: aiohttp.ClientSession) -> None:
        wallet = await walletd.create_wallet()
        other = await walletd.create_wallet()
        for _ in range(5):
            await walletd.deposit(wallet.id, "1.00")
            await walletd.get_wallet(wallet.id)
        with contextlib.suppress(InsufficientFunds):
            await walletd.withdraw(wallet.id, "100.00")
        _ = [item async for item in walletd.history(wallet.id)]
        async with http.post(
            f"{base_url}/api/v1/transfers",
            json={"from_wallet_id": wallet.id, "to_wallet_id": other.id, "amount": "1.00"},
        ) as response:
            assert response.status == 201, await response.text()
        captured = await walletd.create_hold(wallet.id, "0.50")
        await walletd.capture(captured.id)
        voided = await walletd.create_hold(wallet.id, "0.50")
        await walletd.void(voided.id)
        await walletd.create_hold(other.id, "0.10", expires_in_s=1)  # the sweep expires it
        await walletd.bulk([
            BulkItem(wallet.id, "DEPOSIT", "1.00"),
            BulkItem(other.id, "DEPOSIT", "1.00"),
            BulkItem(other.id, "WITHDRAW", "1000.00"),  # refused: insufficient funds
        ])  # fmt: skip

    async def loop() -> None:
        async with WalletdClient(base_url) as walletd, aiohttp.ClientSession() as http:
            while True:
                await operations(walletd, http)
                await asyncio.sleep(0.05)  # a little load, not a benchmark

    async def stream() -> None:
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{base_url}/api/v1/events/stream") as response,
        ):
            assert response.status == 200
            async for _chunk in response.content.iter_any():
                pass

    tasks = [asyncio.create_task(loop()), asyncio.create_task(stream())]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
            if not task.cancelled() and task.exception() is not None:
                raise AssertionError("the load failed") from task.exception()


@pytest.mark.slow
async def test_every_dashboard_query_and_alert_expression_returns_series(
    walletd_process: StartWalletd, database_url: str, tmp_path: Path
) -> None:
    """On a real Prometheus scraping a live two-process cluster under load of every kind,
    every dashboard query (its job and instance variables set to the scraped targets) and
    every alert expression without its threshold returns at least one series, the figures
    of transfers, holds, bulk, the feed and the leases move (MOVED_FIGURES); Prometheus
    loaded every alert rule healthy; and /metrics has no `*_created` series and writes every
    enumerated label value in upper case."""
    flags = ("--database-url", database_url, "--shards", str(SHARDS), "--lease-ttl", "2",
             "--hold-sweep-interval", "0.5")  # fmt: skip
    first = await asyncio.to_thread(walletd_process, *flags)
    second = await asyncio.to_thread(walletd_process, *flags)
    urls = [first.url.rstrip("/"), second.url.rstrip("/")]
    targets = [url.removeprefix("http://") for url in urls]
    queries = {f"dashboard: {q}": q for q in dashboard_queries("walletd", tuple(targets))}
    queries.update({f"alert {name}: {q}": q for name, q in alert_queries().items()})
    with running_prometheus(tmp_path, targets) as prometheus:
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            deadline = time.monotonic() + ALL_SERIES_WITHIN_S
            while not await balanced(session, urls):
                assert time.monotonic() < deadline, "the two processes never split the shards"
                await asyncio.sleep(0.2)
            async with light_load(urls[0]):
                await until_ready(session, prometheus)
                while True:
                    empty = [label for label, q in queries.items()
                             if await series_count(session, prometheus, q) == 0]  # fmt: skip
                    empty += [f"moved: {q}" for q, count in MOVED_FIGURES.items()
                              if await series_count(session, prometheus, q) < count]  # fmt: skip
                    if not empty:
                        break
                    assert time.monotonic() < deadline, "no series for:\n" + "\n".join(empty)
                    await asyncio.sleep(1)
                async with session.get(f"{prometheus}/api/v1/rules") as response:
                    groups = (await response.json())["data"]["groups"]
                exposed = [await metrics_text(session, url) for url in urls]
    rules = [rule for group in groups for rule in group["rules"]]
    assert {rule["name"] for rule in rules} == {rule["alert"] for rule in alert_rules()}
    assert all(rule["health"] == "ok" for rule in rules), rules
    for text in exposed:
        assert "_created" not in text
        assert_one_casing(text)
