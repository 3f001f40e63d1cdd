"""Prometheus metrics: HTTP requests, and the engine's own figures, on a per-app registry.

Each app gets its own ``CollectorRegistry`` (never the global one), so tests and tools can
build several apps in one process. Three kinds of source feed it::

    edge middleware ──▶ Metrics.observe_request()   requests by route/method/status, latency,
                                                     503s by reason (the problem ``code``):
                                                     plain ints per request, turned into
                                                     families by _RequestCollector at scrape
    shard actors    ──▶ EngineMetrics (observer)     batch size, commit latency, failures,
                                                     commands rejected before a mailbox
    GET /metrics    ──▶ _EngineStateCollector        mailbox depth per pipeline, resident
                                                     wallets, leases: read at scrape time,
                                                     so the hot path pays nothing for them

Label cardinality is bounded: ``route`` is the route's canonical path (``unmatched`` for
requests no route matched), ``method`` is one of the HTTP methods walletd knows (else
``OTHER``), and ``status`` is a status code the server itself chose; every other label is
a closed set of values or a shard / pipeline number.

One casing: every enumerated label value is UPPER case (``reason="COMMIT_FAILED"``,
``status="COMPLETED"``, ``direction="LOST"``), as the API spells its problem codes and
statuses, so a value on a dashboard is the word a client saw; the engine's own lower-case
constants are upper-cased here. No ``*_created`` series: prometheus-client's creation
timestamps double the counter series and no panel or alert reads them.
"""

from __future__ import annotations

import itertools
import time
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Final

from aiohttp import web
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from walletd.engine.observer import (
    FAILURE_REASONS,
    HOLD_EVENTS,
    REJECTION_REASONS,
    TRANSFER_DRIVERS,
    EngineObserver,
)
from walletd.engine.router import Engine

__all__ = [
    "METRICS_CONTENT_TYPE",
    "METRICS_PATH",
    "UNMATCHED_ROUTE",
    "EngineMetrics",
    "Metrics",
    "metrics_handler",
]

METRICS_PATH: Final = "/metrics"
METRICS_CONTENT_TYPE: Final = CONTENT_TYPE_PLAIN_0_0_4
UNMATCHED_ROUTE: Final = "unmatched"
OTHER_METHOD: Final = "OTHER"
KNOWN_METHODS: Final = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"}
)

# Process-wide in prometheus-client (it has no per-registry switch); every registry walletd
# builds is this module's, so the switch is thrown where they are made.
disable_created_metrics()  # type: ignore[no-untyped-call]

# Seconds. The hot path answers in well under a millisecond, a commit in a few.
LATENCY_BUCKETS_S: Final = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
# The 503 reasons the server answers (problem codes). Each labelled family starts with its
# known label values at 0 (Prometheus' "avoid missing metrics"): a rate or an alert over
# them is 0 from the first scrape, not "no data" until the first failure.
UNAVAILABLE_REASONS: Final = ("OVERLOADED", "UNAVAILABLE")
TRANSFER_ENDS: Final = ("COMPLETED", "FAILED")
BULK_ITEM_RESULTS: Final = ("APPLIED", "REFUSED")
# Log rows per commit: powers of two up to the default batch_ops_max (1024) and past it.
BATCH_OPS_BUCKETS: Final = tuple(float(2**i) for i in range(13))
KEY_RESULTS: Final = ("ALLOWED", "FORBIDDEN", "RATE_LIMITED")


class _Latencies:
    """One latency histogram's state: plain counters, no lock (one event loop writes it)."""

    __slots__ = ("buckets", "total_s")

    def __init__(self) -> None:
        self.buckets = [0] * (len(LATENCY_BUCKETS_S) + 1)  # the last one is +Inf
        self.total_s = 0.0


class EngineMetrics(EngineObserver):
    """The engine's reports, as Prometheus metrics in ``registry``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.batch_ops = Histogram(
            "walletd_batch_ops",
            "Log rows written per committed batch",
            registry=registry,
            buckets=BATCH_OPS_BUCKETS,
        )
        self.batch_commands = Histogram(
            "walletd_batch_commands",
            "Commands (operations, creations, reads, refusals) answered per committed batch",
            registry=registry,
            buckets=BATCH_OPS_BUCKETS,
        )
        self.commit_seconds = Histogram(
            "walletd_commit_seconds",
            "Time to commit one batch to PostgreSQL",
            registry=registry,
            buckets=LATENCY_BUCKETS_S,
        )
        self.batches_failed = Counter(
            "walletd_batches_failed",
            "Batches whose commit failed; their commands were answered 503",
            ["reason"],
            registry=registry,
        )
        self.batch_failed_commands = Counter(
            "walletd_batch_failed_commands",
            "Commands answered 503 because their batch's commit failed",
            ["reason"],
            registry=registry,
        )
        self.commands_rejected = Counter(
            "walletd_commands_rejected",
            "Commands refused before entering a mailbox (overloaded, stopping)",
            ["reason"],
            registry=registry,
        )
        for reason in FAILURE_REASONS:
            self.batches_failed.labels(reason.upper())
            self.batch_failed_commands.labels(reason.upper())
        for reason in REJECTION_REASONS:
            self.commands_rejected.labels(reason.upper())
        self.isolation_commits = Counter(
            "walletd_isolation_commits",
            "Commits spent isolating the command(s) at fault after storage refused a batch "
            "for what it held (its neighbours then got their true answers)",
            registry=registry,
        )
        self.storage_refused_commands = Counter(
            "walletd_storage_refused_commands",
            "Commands storage refused when they stood alone (answered 409 STORAGE_REFUSED, "
            "or 503 when another driver closed the transfer or hold first)",
            registry=registry,
        )
        self.shard_restarts = Counter(
            "walletd_shard_restarts",
            "Crashed shards restarted from storage by the engine's supervisor",
            registry=registry,
        )
        self.transfers_ended = Counter(
            "walletd_transfers_ended",
            "Transfers this process closed: status COMPLETED or FAILED (refunded), driven by "
            "their request or by the re-drive loop (after a 503 or a restart)",
            ["status", "driver"],
            registry=registry,
        )
        for status in TRANSFER_ENDS:
            for driver in TRANSFER_DRIVERS:
                self.transfers_ended.labels(status, driver.upper())
        self.holds = Counter(
            "walletd_holds",
            "Holds this process committed: CREATED (PENDING), CAPTURED, VOIDED, EXPIRED",
            ["event"],
            registry=registry,
        )
        for event in HOLD_EVENTS:
            self.holds.labels(event)

    def transfer_ended(self, status: str, driver: str) -> None:
        self.transfers_ended.labels(status.upper(), driver.upper()).inc()

    def hold_changed(self, event: str) -> None:
        self.holds.labels(event.upper()).inc()

    def batch_committed(self, shard: int, ops: int, commands: int, seconds: float) -> None:
        self.batch_ops.observe(ops)
        self.batch_commands.observe(commands)
        self.commit_seconds.observe(seconds)

    def batch_failed(self, shard: int, commands: int, reason: str) -> None:
        self.batches_failed.labels(reason.upper()).inc()
        self.batch_failed_commands.labels(reason.upper()).inc(commands)

    def command_rejected(self, reason: str) -> None:
        self.commands_rejected.labels(reason.upper()).inc()

    def commands_isolated(self, shard: int, commits: int, refused: int) -> None:
        self.isolation_commits.inc(commits)
        self.storage_refused_commands.inc(refused)

    def shard_restarted(self, shard: int) -> None:
        self.shard_restarts.inc()


EngineSource = Callable[[], Engine | None]


class _EngineStateCollector(Collector):
    """Mailbox depths, resident wallets and leases, read from the running engine at scrape
    time."""

    def __init__(self, engine: EngineSource) -> None:
        self._engine = engine

    def collect(self) -> Iterator[Metric]:
        engine = self._engine()
        if engine is None:  # starting or stopping: report nothing rather than zeros
            return
        # A mailbox belongs to a pipeline (actor loop), which serves several shards.
        depth = GaugeMetricFamily(
            "walletd_mailbox_depth",
            "Commands waiting in a pipeline's mailbox",
            labels=["pipeline"],
        )
        for index, commands in enumerate(engine.mailbox_depths()):
            depth.add_metric([str(index)], commands)
        yield depth
        yield GaugeMetricFamily(
            "walletd_mailbox_commands_max",
            "Mailbox bound per pipeline; past it requests get 503 OVERLOADED",
            value=engine.limits.mailbox_commands_max,
        )
        yield GaugeMetricFamily(
            "walletd_resident_wallets",
            "Wallets held in memory across all shards",
            value=engine.resident_wallets(),
        )
        yield GaugeMetricFamily(
            "walletd_transfers_driving",
            "Transfers being driven by this process right now (requests and re-drives)",
            value=engine.transfers.driving,
        )
        yield from _ownership_families(engine)


def _ownership_families(engine: Engine) -> Iterator[Metric]:
    ownership = engine.ownership
    yield GaugeMetricFamily(
        "walletd_shard_count", "The cluster's shard count", value=ownership.shard_count
    )
    yield GaugeMetricFamily(
        "walletd_shards_served",
        "Shards this process answers for now (lease held, memory ready)",
        value=len(ownership.served()),
    )
    epochs = GaugeMetricFamily(
        "walletd_shard_lease_epoch",
        "Lease epoch (fencing token) of each shard this process holds",
        labels=["shard"],
    )
    for shard, epoch in sorted(ownership.held().items()):
        epochs.add_metric([str(shard)], epoch)
    yield epochs
    moves = CounterMetricFamily(
        "walletd_shard_moves",
        "Shard leases GAINED, LOST (not renewed in time, stale epoch) and RELEASED",
        labels=["direction"],
    )
    for direction, count in ownership.moves.items():
        moves.add_metric([direction.upper()], count)
    yield moves
    if ownership.fenced and ownership.table_read_at is not None:
        # The keeper reads the table at the end of every step that renewed: its age is the
        # time since the last successful renewal round (steps every ttl/4; past the ttl the
        # process serves nothing). Ownership keeps it on time.monotonic, its default clock.
        yield GaugeMetricFamily(
            "walletd_lease_renewal_age_seconds",
            "Seconds since the lease keeper last renewed and read the ownership table",
            value=max(0.0, time.monotonic() - ownership.table_read_at),
        )
        yield GaugeMetricFamily(
            "walletd_lease_ttl_seconds",
            "A lease's time to live: past it without a renewal every shard here is lost",
            value=ownership.table_stale_s,
        )


class _RequestCollector(Collector):
    """Exposes the request figures that the edge middleware keeps in plain dicts.

    The hot path only bumps ints (about 1 us per request, where prometheus-client's
    labelled Counter + Histogram cost about 3 us, with their locks); the Prometheus families
    are built here, at scrape time.
    """

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "walletd_http_requests",
            "HTTP requests answered, by route, method and status",
            labels=["route", "method", "status"],
        )
        for (route, method, status), count in self._metrics.request_counts.items():
            requests.add_metric([route, method, str(status)], count)
        yield requests
        latency = HistogramMetricFamily(
            "walletd_http_request_duration_seconds",
            "Time from the request reaching the app to its response being ready",
            labels=["route", "method"],
        )
        bounds = [*(str(bound) for bound in LATENCY_BUCKETS_S), "+Inf"]
        for (route, method), state in self._metrics.latencies.items():
            cumulative = list(itertools.accumulate(state.buckets))
            latency.add_metric(
                [route, method], list(zip(bounds, cumulative, strict=True)), state.total_s
            )
        yield latency
        unavailable = CounterMetricFamily(
            "walletd_http_unavailable",
            "503 responses by reason (the problem code: OVERLOADED, UNAVAILABLE)",
            labels=["reason"],
        )
        for reason, count in self._metrics.unavailable_counts.items():
            unavailable.add_metric([reason], count)
        yield unavailable
        forwards = CounterMetricFamily(
            "walletd_forwards",
            "Requests for a shard this process does not serve, by result (ANSWERED by the "
            "owner, SECOND_HOP / NO_OWNER / UNREACHABLE / CUT_OFF: 503 NOT_OWNER, UNKNOWN: 503)",
            labels=["result"],
        )
        for result, count in self._metrics.forward_counts.items():
            forwards.add_metric([result.upper()], count)
        yield forwards
        by_key = CounterMetricFamily(
            "walletd_key_requests",
            "Requests with a known API key, by the key's name (never its secret) and result: "
            "ALLOWED, FORBIDDEN (403: scope), RATE_LIMITED (429)",
            labels=["key", "result"],
        )
        for (name, result), count in self._metrics.key_counts.items():
            by_key.add_metric([name, result], count)
        yield by_key
        yield CounterMetricFamily(
            "walletd_bulk_requests",
            "POST /api/v1/operations/bulk answered 200 by this process (not sub-requests "
            "forwarded to it)",
            value=self._metrics.bulk_requests,
        )
        items = CounterMetricFamily(
            "walletd_bulk_items",
            "Items of those bulk requests, APPLIED or REFUSED (wherever they were applied)",
            labels=["result"],
        )
        for result, count in self._metrics.bulk_items.items():
            items.add_metric([result], count)
        yield items


class Metrics:
    """Everything /metrics shows for one app."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.engine = EngineMetrics(self.registry)
        self.request_counts: dict[tuple[str, str, int], int] = {}
        self.latencies: dict[tuple[str, str], _Latencies] = {}
        self.unavailable_counts: dict[str, int] = dict.fromkeys(UNAVAILABLE_REASONS, 0)
        self.forward_counts: dict[str, int] = {}
        # (key name, result): bounded by the configured keys (keys.API_KEYS_MAX) x results.
        self.key_counts: dict[tuple[str, str], int] = {}
        self.bulk_requests = 0
        self.bulk_items: dict[str, int] = dict.fromkeys(BULK_ITEM_RESULTS, 0)
        self._engine_source: EngineSource = lambda: None
        self.registry.register(_RequestCollector(self))
        self.registry.register(_EngineStateCollector(lambda: self._engine_source()))

    def watch_engine(self, source: EngineSource) -> None:
        """Where the scrape-time collector finds the running engine."""
        self._engine_source = source

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        if method not in KNOWN_METHODS:
            method = OTHER_METHOD
        key = (route, method, status)
        counts = self.request_counts
        counts[key] = counts.get(key, 0) + 1
        state = self.latencies.get((route, method))
        if state is None:
            state = self.latencies[(route, method)] = _Latencies()
        state.buckets[bisect_left(LATENCY_BUCKETS_S, seconds)] += 1
        state.total_s += seconds

    def observe_unavailable(self, reason: str) -> None:
        reason = reason.upper()
        self.unavailable_counts[reason] = self.unavailable_counts.get(reason, 0) + 1

    def observe_bulk(self, applied: int, refused: int) -> None:
        self.bulk_requests += 1
        self.bulk_items["APPLIED"] += applied
        self.bulk_items["REFUSED"] += refused

    def observe_forward(self, result: str) -> None:
        self.forward_counts[result] = self.forward_counts.get(result, 0) + 1

    def watch_keys(self, names: Iterable[str]) -> None:
        """Start every configured key's families at 0 (a rate over them is 0, not absent)."""
        for name in names:
            for result in KEY_RESULTS:
                self.key_counts.setdefault((name, result), 0)

    def observe_key(self, name: str, result: str) -> None:
        self.key_counts[(name, result)] += 1

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def metrics_handler(metrics: Metrics) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def serve_metrics(request: web.Request) -> web.Response:
        return web.Response(
            body=metrics.exposition(), headers={"Content-Type": METRICS_CONTENT_TYPE}
        )

    return serve_metrics
