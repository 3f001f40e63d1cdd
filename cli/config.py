"""walletd's configuration: one table of settings, read from flags and the environment.

Flags win over the environment, which wins over the defaults. The same table produces the
command-line flags, the README's configuration table and ``env.example``.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from walletd.cli.gc_tuning import GC_GEN0_THRESHOLD_MAX
from walletd.engine.money import Currency
from walletd.engine.ownership import SHARD_MEMO_ENTRIES, SHARD_MEMO_ENTRIES_MAX
from walletd.http.currencies import Currencies, parse_assets
from walletd.http.keys import ApiKey, merge_keys, parse_keys, parse_keys_file

__all__ = [
    "SETTINGS",
    "SETTINGS_TABLE_END",
    "SETTINGS_TABLE_START",
    "Config",
    "Setting",
    "add_flags",
    "default_text",
    "load_config",
    "render_env_example",
    "render_settings_table",
    "replace_settings_table",
]


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _positive_or_zero(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise ValueError(f"{text!r} is not a number of at least 0")
    return value


@dataclass(frozen=True, slots=True)
class Setting:
    name: str  # the Config field
    env: tuple[str, ...]  # environment variables, first one preferred
    flag: str | None  # command-line flag, when it has one
    parse: Callable[[str], Any]
    default: Any
    help: str


def _hosts(text: str) -> tuple[str, ...]:
    """Comma-separated host names or IP literals, lowercased (IPv6 without brackets)."""
    hosts = tuple(h.strip().lower().strip("[]") for h in text.split(",") if h.strip())
    for host in hosts:
        if ":" in host:
            ipaddress.IPv6Address(host)  # ValueError names it
        elif not all(part and part.replace("-", "").replace("_", "").isalnum()
                     for part in host.split(".")):  # fmt: skip
            raise ValueError(f"{host[:64]!r} is not a host name or IP address")
    return hosts


def _shard_memo_entries(text: str) -> int:
    value = int(text)
    if not 0 <= value <= SHARD_MEMO_ENTRIES_MAX:
        raise ValueError(f"{value} is not in 0..{SHARD_MEMO_ENTRIES_MAX}")
    return value


def _gc_threshold(text: str) -> int:
    value = int(text)
    if not 0 <= value <= GC_GEN0_THRESHOLD_MAX:
        raise ValueError(f"{value} is not in 0..{GC_GEN0_THRESHOLD_MAX}")
    return value


SETTINGS: tuple[Setting, ...] = (
    Setting("host", ("WALLETD_HOST",), "--host", str, "127.0.0.1", "address to listen on"),
    Setting("port", ("WALLETD_PORT",), "--port", int, 8000, "port to listen on"),
    Setting("unix_socket", ("WALLETD_UNIX_SOCKET",), "--unix-socket", Path, None,
            "a Unix socket file the public listener also serves on (same routes, API keys "
            "and drain), for a proxy on this host: `walletd cluster` gives each process one "
            "(docs/SCALING.md); created mode 0600, since whoever can connect has the public "
            "API; a path something listens on is refused (exit 2), a stale socket file "
            "replaced; removed at exit"),
    Setting("data_dir", ("WALLETD_DATA_DIR",), "--data-dir", Path, Path(".walletd"),
            "folder for the embedded PostgreSQL's data (used when no database URL is set)"),
    Setting("database_url", ("WALLETD_DATABASE_URL", "DATABASE_URL"), "--database-url", str, None,
            "PostgreSQL URL; unset = start an embedded PostgreSQL in the data dir"),
    Setting("embedded_start_timeout_s", ("WALLETD_EMBEDDED_START_TIMEOUT",),
            "--embedded-start-timeout", float, 60.0,
            "seconds the embedded PostgreSQL may take to start, including the wait for a "
            "crashed server's processes to release the data dir; past it walletd exits 2"),
    Setting("shards", ("WALLETD_SHARDS",), "--shards", int, 64,
            "the cluster's shard count (units of ownership and routing); stored in the "
            "database by the first server, a different count is refused (docs/SCALING.md)"),
    Setting("pipelines", ("WALLETD_PIPELINES",), "--pipelines", int, 1,
            "actor loops (mailbox + commit pipeline) in this process, shared by its shards; "
            "they share one core, so more only split batches (docs/BENCHMARKS.md)"),
    Setting("advertise_url", ("WALLETD_ADVERTISE_URL",), "--advertise-url", str, None,
            "URL other walletd processes forward requests to this one at; unset = "
            "http://HOST:PORT (the machine's host name when HOST is 0.0.0.0)"),
    Setting("internal_host", ("WALLETD_INTERNAL_HOST",), "--internal-host", str, "127.0.0.1",
            "address of the internal listener, where walletd processes deliver transfer legs "
            "to each other; clients and HAProxy must not reach it (docs/OPERATIONS.md)"),
    Setting("internal_port", ("WALLETD_INTERNAL_PORT",), "--internal-port", int, 0,
            "port of the internal listener; 0 = any free port (published in the database "
            "for the other processes)"),
    Setting("cluster_credential_file", ("WALLETD_CLUSTER_CREDENTIAL_FILE",),
            "--cluster-credential-file", Path, None,
            "file holding the cluster credential the internal listener requires (mode 0600; "
            "created with a random one when missing); unset = DATA_DIR/cluster-credential"),
    Setting("cluster_credential", ("WALLETD_CLUSTER_CREDENTIAL",), None, str, None,
            "the cluster credential itself (beats the file); every process of one cluster "
            "needs the same one, and no client API key may equal it"),
    Setting("lease_ttl_s", ("WALLETD_LEASE_TTL",), "--lease-ttl", float, 3.0,
            "seconds a shard lease lasts without renewal (renewed every quarter of it); a "
            "killed process's shards move after about 1.25 times this"),
    Setting("lease_moves_max", ("WALLETD_LEASE_MOVES_MAX",), "--lease-moves-max", int, 8,
            "shards a process releases per lease step when it holds more than its share"),
    Setting("member_restarts_max", ("WALLETD_MEMBER_RESTARTS_MAX",), "--member-restarts-max",
            int, 5, "walletd cluster: restarts of one dead member per restart window; one "
            "more death and the cluster stops with exit 5"),
    Setting("member_restart_window_s", ("WALLETD_MEMBER_RESTART_WINDOW",),
            "--member-restart-window", float, 60.0,
            "walletd cluster: seconds over which a member's restarts are counted"),
    Setting("member_restart_backoff_s", ("WALLETD_MEMBER_RESTART_BACKOFF",),
            "--member-restart-backoff", float, 0.5,
            "walletd cluster: seconds before a dead member's first restart in the window, "
            "doubled for each further one"),
    Setting("forward_timeout_s", ("WALLETD_FORWARD_TIMEOUT",), "--forward-timeout", float,
            10.0, "seconds a request forwarded to a shard's owner may take before 503"),
    Setting("forward_connections_max", ("WALLETD_FORWARD_CONNECTIONS_MAX",),
            "--forward-connections-max", int, 64,
            "connections to other walletd processes for forwarding; past it requests wait"),
    Setting("mailbox_commands_max", ("WALLETD_MAILBOX_MAX",), "--mailbox-max", int, 1024,
            "commands waiting per pipeline; past it requests get 503 OVERLOADED"),
    Setting("batch_ops_max", ("WALLETD_BATCH_MAX",), "--batch-max", int, 1024,
            "commands per commit at most (a bulk request of up to this many items commits "
            "as one batch)"),
    Setting("inflight_batches_max", ("WALLETD_INFLIGHT_BATCHES",), "--inflight-batches", int, 2,
            "batches one pipeline may be committing at once (commit pipelining); unset, "
            "`walletd cluster` with two or more processes gives each member 1"),
    Setting("resident_wallets_max", ("WALLETD_RESIDENT_WALLETS_MAX",), "--resident-wallets-max",
            int, 1_000_000, "wallets kept in memory; idle ones past it are evicted"),
    Setting("warm_wallets", ("WALLETD_WARM_WALLETS",), "--warm-wallets", int, 0,
            "at start, load this many most recently updated wallets into memory (0 = none)"),
    Setting("idempotency_keys_max", ("WALLETD_IDEMPOTENCY_KEYS_MAX",), "--idempotency-keys-max",
            int, 100_000, "idempotency keys cached in memory (PostgreSQL keeps them all)"),
    Setting("commit_timeout_s", ("WALLETD_COMMIT_TIMEOUT",), "--commit-timeout", float, 5.0,
            "seconds a batch commit may take before it is failed with 503"),
    Setting("shard_restarts_max", ("WALLETD_SHARD_RESTARTS_MAX",), "--shard-restarts-max", int,
            3, "crashed shards restarted from storage per restart window; one more crash "
            "and walletd fails /readyz and exits 3"),
    Setting("shard_restart_window_s", ("WALLETD_SHARD_RESTART_WINDOW",),
            "--shard-restart-window", float, 60.0,
            "seconds over which shard restarts are counted"),
    Setting("transfer_redrive_interval_s", ("WALLETD_TRANSFER_REDRIVE_INTERVAL",),
            "--transfer-redrive-interval", float, 2.0,
            "seconds between passes that finish PENDING transfers left by a 503 or a restart "
            "(each pass takes those older than this)"),
    Setting("transfer_redrive_batch_max", ("WALLETD_TRANSFER_REDRIVE_BATCH_MAX",),
            "--transfer-redrive-batch-max", int, 256,
            "PENDING transfers one re-drive pass finishes at most; the rest wait for the next"),
    Setting("payment_postings_max", ("WALLETD_PAYMENT_POSTINGS_MAX",),
            "--payment-postings-max", int, 16,
            "postings one payment may have (1..256); more is 422"),
    Setting("holds_per_wallet_max", ("WALLETD_HOLDS_PER_WALLET_MAX",),
            "--holds-per-wallet-max", int, 100,
            "PENDING holds one wallet may have; one more is 409 TOO_MANY_HOLDS"),
    Setting("hold_expires_in_s_default", ("WALLETD_HOLD_EXPIRES_IN_DEFAULT",),
            "--hold-expires-in-default", int, 86_400,
            "seconds until a hold created without expires_in_s expires"),
    Setting("hold_expires_in_s_max", ("WALLETD_HOLD_EXPIRES_IN_MAX",),
            "--hold-expires-in-max", int, 2_592_000,
            "the longest expires_in_s a hold may ask for (longer is 422)"),
    Setting("hold_sweep_interval_s", ("WALLETD_HOLD_SWEEP_INTERVAL",), "--hold-sweep-interval",
            float, 1.0, "seconds between passes that release expired holds (an expired hold's "
            "money is back in available within about this long)"),
    Setting("hold_sweep_batch_max", ("WALLETD_HOLD_SWEEP_BATCH_MAX",),
            "--hold-sweep-batch-max", int, 256,
            "expired holds one sweep pass releases at most; a full pass is followed by another"),
    Setting("transfer_leg_tries_max", ("WALLETD_TRANSFER_LEG_TRIES_MAX",),
            "--transfer-leg-tries-max", int, 3,
            "tries to deliver a transfer leg whose wallet's shard has no reachable owner (each "
            "after the next read of the ownership table); then 503, nothing applied or PENDING"),
    Setting("currency_cache_wallets_max", ("WALLETD_CURRENCY_CACHE_WALLETS_MAX",),
            "--currency-cache-wallets-max", int, 65_536,
            "wallet currencies a transfer's coordinator remembers (each read once at the "
            "receiver's owner before any money moves); past it the least recently used is "
            "read again when needed"),
    Setting("refusal_isolation_commits_max", ("WALLETD_REFUSAL_ISOLATION_COMMITS_MAX",),
            "--refusal-isolation-commits-max", int, 64,
            "commits a shard may spend finding the command(s) the database refused in a batch "
            "(re-applied in halves, so the others get their true answers); past it the rest "
            "are answered 503, nothing applied"),
    Setting("pool_size_max", ("WALLETD_POOL_SIZE",), "--pool-size", int, 0,
            "PostgreSQL connections at most; 0 = (in-flight batches + 1) per pipeline + 4"),
    Setting("db_connect_timeout_s", ("WALLETD_DB_CONNECT_TIMEOUT",), "--db-connect-timeout",
            float, 2.0, "seconds to get a PostgreSQL connection (pool wait + connect) before "
            "a request gets 503"),
    Setting("db_command_timeout_s", ("WALLETD_DB_COMMAND_TIMEOUT",), "--db-command-timeout",
            float, 10.0, "seconds one SQL statement may run before it is cancelled"),
    Setting("allow_unsafe_durability", ("WALLETD_ALLOW_UNSAFE_DURABILITY",),
            "--allow-unsafe-durability", _bool, False,
            "serve even when PostgreSQL runs with fsync or full_page_writes off (a crash "
            "may then lose acknowledged writes); for throwaway test servers only"),
    Setting("require_sync_replica", ("WALLETD_REQUIRE_SYNC_REPLICA",),
            "--require-sync-replica", _bool, False,
            "serve only on a primary that holds each COMMIT until a synchronous standby has "
            "it (synchronous_standby_names set, a sync standby streaming): checked at start "
            "(exit 2 past --sync-replica-wait) and by /readyz; on in `walletd ha-dev` "
            "(docs/HA.md)"),
    Setting("sync_replica_wait_s", ("WALLETD_SYNC_REPLICA_WAIT",), "--sync-replica-wait",
            float, 30.0,
            "seconds start-up waits for a synchronous standby when --require-sync-replica is "
            "on, before it exits 2"),
    Setting("read_pool_size", ("WALLETD_READ_POOL_SIZE",), "--read-pool-size", int, 4,
            "PostgreSQL connections for as-of, filtered history, feed and listing reads, apart "
            "from the commits' pool; a read past them waits up to the connect timeout, then 503"),
    Setting("listing_limit_default", ("WALLETD_LISTING_LIMIT_DEFAULT",),
            "--listing-limit-default", int, 50,
            "items in a page of GET /api/v1/wallets, /transfers or /holds when the request "
            "gives no limit"),
    Setting("listing_limit_max", ("WALLETD_LISTING_LIMIT_MAX",), "--listing-limit-max", int,
            500, "the largest limit a listing request may give (larger is 422; at most 5000)"),
    Setting("feed_streams_max", ("WALLETD_FEED_STREAMS_MAX",), "--feed-streams-max", int, 64,
            "open /api/v1/events/stream connections at most; past it 503 OVERLOADED"),
    Setting("feed_streams_per_key_max", ("WALLETD_FEED_STREAMS_PER_KEY_MAX",),
            "--feed-streams-per-key-max", int, 16,
            "open feed streams one API key may hold; past it 429 TOO_MANY_STREAMS"),
    Setting("feed_stream_buffer_bytes", ("WALLETD_FEED_STREAM_BUFFER_BYTES",),
            "--feed-stream-buffer-bytes", int, 262144,
            "bytes queued for one stream's socket before its writes block"),
    Setting("feed_write_timeout_s", ("WALLETD_FEED_WRITE_TIMEOUT",), "--feed-write-timeout",
            float, 10.0, "seconds a stream's write may stay blocked (full buffer) before the "
            "slow consumer is disconnected; it resumes with Last-Event-ID"),
    Setting("feed_poll_interval_s", ("WALLETD_FEED_POLL_INTERVAL",), "--feed-poll-interval",
            float, 0.5, "seconds between a caught-up stream's reads of the log"),
    Setting("feed_heartbeat_s", ("WALLETD_FEED_HEARTBEAT",), "--feed-heartbeat", float, 15.0,
            "seconds of silence after which a stream sends a heartbeat comment"),
    Setting("as_of_wait_s", ("WALLETD_AS_OF_WAIT",), "--as-of-wait", float, 0.0,
            "seconds an as_of read waits at most for the wallet's commits in flight stamped "
            "at or before its instant; past it 503 (Retry-After 1); 0 = the commit timeout"),
    Setting("drain_grace_s", ("WALLETD_DRAIN_GRACE",), "--drain-grace", float, 2.0,
            "seconds walletd keeps serving after SIGTERM with /healthz answering 503, so a "
            "proxy that checks it (HAProxy marks it down within 1.5 s) stops opening "
            "connections before the listener closes; 0 closes it at once"),
    Setting("keepalive_timeout_s", ("WALLETD_KEEPALIVE_TIMEOUT",), "--keepalive-timeout", float,
            120.0, "seconds an idle client connection is kept open; longer than any proxy in "
            "front keeps its idle connections to walletd (HAProxy: timeout http-keep-alive "
            "75 s), so the proxy closes them first and never sends on one walletd closes"),
    Setting("body_bytes_max", ("WALLETD_MAX_BODY_BYTES",), "--max-body-bytes", int, 65536,
            "largest request body accepted; larger gets 413"),
    Setting("body_read_timeout_s", ("WALLETD_BODY_READ_TIMEOUT",), "--body-read-timeout", float,
            10.0, "seconds a request body may take to arrive once its handler reads it; "
            "slower gets 408 and the connection is closed"),
    Setting("bulk_items_max", ("WALLETD_BULK_ITEMS_MAX",), "--bulk-items-max", int, 0,
            "most operations in one bulk request; more gets 413 TOO_MANY_ITEMS; at most the "
            "mailbox bound, so one request fits an empty mailbox (0 = 1000, or the mailbox "
            "bound when smaller)"),
    Setting("bulk_admission_wait_s", ("WALLETD_BULK_ADMISSION_WAIT",), "--bulk-admission-wait",
            float, 1.0, "seconds a bulk request may wait for mailbox room before 503 OVERLOADED"),
    Setting("bulk_waiting_max", ("WALLETD_BULK_WAITING_MAX",), "--bulk-waiting-max", int, 16,
            "bulk requests that may wait for mailbox room at once; past it 503 OVERLOADED"),
    Setting("bulk_body_bytes_max", ("WALLETD_BULK_MAX_BODY_BYTES",), "--bulk-max-body-bytes",
            int, 1048576, "largest bulk request body accepted; larger gets 413"),
    Setting("api_keys", ("WALLETD_API_KEYS",), None, parse_keys, (),
            "client API keys, comma-separated, each name:scope+scope:secret (scopes: read, "
            "create, move, feed, admin; a bare secret holds all of them); when any key is set, "
            "/api/v1 requires one (docs/OPERATIONS.md)"),
    Setting("api_keys_file", ("WALLETD_API_KEYS_FILE",), "--api-keys-file", Path, None,
            "a file of client API keys, one name:scope+scope:secret per line (# comments); "
            "mode 0600 recommended; read at start, added to WALLETD_API_KEYS"),
    Setting("key_rate_per_s", ("WALLETD_KEY_RATE",), "--key-rate", _positive_or_zero, 0.0,
            "requests per second each API key may make to this process (a token bucket); "
            "past it 429 RATE_LIMITED with Retry-After; 0 = no limit"),
    Setting("key_rate_burst", ("WALLETD_KEY_RATE_BURST",), "--key-rate-burst", int, 20,
            "requests an API key may make at once above its rate (the bucket's size)"),
    Setting("access_log", ("WALLETD_ACCESS_LOG",), "--access-log", _bool, False,
            "write a JSON access log line per request to stderr"),
    Setting("webhook_allowed_hosts", ("WALLETD_WEBHOOK_ALLOWED_HOSTS",),
            "--webhook-allowed-hosts", _hosts, (),
            "hosts webhooks may be sent to, comma-separated (names or IP addresses, exact "
            "match); set = only these, whatever they resolve to; unset = any host whose every "
            "address is public (loopback, private, link-local and reserved ones refused at "
            "send time) (docs/OPERATIONS.md, Webhooks)"),
    Setting("webhook_subscriptions_max", ("WALLETD_WEBHOOK_SUBSCRIPTIONS_MAX",),
            "--webhook-subscriptions-max", int, 100,
            "webhook subscriptions at most; past it 409 TOO_MANY_WEBHOOKS"),
    Setting("webhook_in_flight_max", ("WALLETD_WEBHOOK_IN_FLIGHT_MAX",),
            "--webhook-in-flight-max", int, 16,
            "webhook subscriptions one process delivers at once (one request each in "
            "flight); the others wait for another process or a free slot"),
    Setting("webhook_timeout_s", ("WALLETD_WEBHOOK_TIMEOUT",), "--webhook-timeout", float,
            10.0, "seconds a webhook request may take (connect to answer) before it counts "
            "as failed and is retried"),
    Setting("webhook_retry_period_s", ("WALLETD_WEBHOOK_RETRY_PERIOD",),
            "--webhook-retry-period", float, 259200.0,
            "seconds an event is retried (from its first failed attempt) before its "
            "subscription is marked failing and stops; the cursor stays on the event"),
    Setting("webhook_backoff_initial_s", ("WALLETD_WEBHOOK_BACKOFF_INITIAL",),
            "--webhook-backoff-initial", float, 1.0,
            "seconds before the first webhook retry, doubled for each further one"),
    Setting("webhook_backoff_max_s", ("WALLETD_WEBHOOK_BACKOFF_MAX",),
            "--webhook-backoff-max", float, 3600.0,
            "longest wait between two webhook retries (each wait is jittered to half to all "
            "of it)"),
    Setting("webhook_poll_interval_s", ("WALLETD_WEBHOOK_POLL_INTERVAL",),
            "--webhook-poll-interval", float, 1.0,
            "seconds between a caught-up webhook subscription's reads of the feed"),
    Setting("webhook_lease_ttl_s", ("WALLETD_WEBHOOK_LEASE_TTL",), "--webhook-lease-ttl",
            float, 15.0, "seconds a process's lease on a webhook subscription lasts without "
            "renewal (renewed every third of it); a killed process's subscriptions move "
            "after about this"),
    Setting("webhook_page_events", ("WALLETD_WEBHOOK_PAGE_EVENTS",), "--webhook-page-events",
            int, 100, "feed events a webhook subscription reads at once"),
    Setting("webhook_deliveries_kept", ("WALLETD_WEBHOOK_DELIVERIES_KEPT",),
            "--webhook-deliveries-kept", int, 100,
            "attempts kept per webhook subscription, 1 to 1000 (older ones deleted); what "
            "GET .../deliveries returns without a limit"),
    Setting("default_currency", ("WALLETD_DEFAULT_CURRENCY",), "--default-currency", str, "USD",
            "currency of a wallet created without one (an ISO 4217 code or a declared asset); "
            "the seed's request creates such a wallet"),
    Setting("assets", ("WALLETD_ASSETS",), "--assets", parse_assets, (),
            "operator-declared assets a wallet may be created in, comma-separated CODE:EXPONENT "
            "(exponent 0-18, e.g. POINTS:0,TOKEN:18); ISO 4217 codes need no declaration"),
    Setting("log_level", ("WALLETD_LOG_LEVEL",), "--log-level", str, "INFO",
            "logging level"),
    Setting("gc_gen0_threshold", ("WALLETD_GC_GEN0_THRESHOLD",), "--gc-gen0-threshold",
            _gc_threshold, 20_000, "net new objects between two young garbage collections, "
            "set once the service is ready (after freezing what start-up built); 0 = "
            "CPython's 700 (docs/BENCHMARKS.md, the POST latency tail)"),
    Setting("shard_memo_entries", ("WALLETD_SHARD_MEMO_ENTRIES",), "--shard-memo-entries",
            _shard_memo_entries, SHARD_MEMO_ENTRIES, "wallets whose shard this process "
            "remembers (~200 bytes each; least recently used forgotten past it; 0 = hash "
            f"every time; at most {SHARD_MEMO_ENTRIES_MAX:,})"),
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Config:
    host: str
    port: int
    unix_socket: Path | None
    data_dir: Path
    database_url: str | None
    embedded_start_timeout_s: float
    shards: int
    pipelines: int
    advertise_url: str | None
    internal_host: str
    internal_port: int
    cluster_credential_file: Path | None
    cluster_credential: str | None
    lease_ttl_s: float
    lease_moves_max: int
    member_restarts_max: int
    member_restart_window_s: float
    member_restart_backoff_s: float
    forward_timeout_s: float
    forward_connections_max: int
    mailbox_commands_max: int
    batch_ops_max: int
    inflight_batches_max: int
    resident_wallets_max: int
    warm_wallets: int
    idempotency_keys_max: int
    commit_timeout_s: float
    shard_restarts_max: int
    shard_restart_window_s: float
    transfer_redrive_interval_s: float
    transfer_redrive_batch_max: int
    payment_postings_max: int
    holds_per_wallet_max: int
    hold_expires_in_s_default: int
    hold_expires_in_s_max: int
    hold_sweep_interval_s: float
    hold_sweep_batch_max: int
    transfer_leg_tries_max: int
    currency_cache_wallets_max: int
    refusal_isolation_commits_max: int
    pool_size_max: int
    db_connect_timeout_s: float
    db_command_timeout_s: float
    allow_unsafe_durability: bool
    require_sync_replica: bool
    sync_replica_wait_s: float
    read_pool_size: int
    listing_limit_default: int
    listing_limit_max: int
    feed_streams_max: int
    feed_streams_per_key_max: int
    feed_stream_buffer_bytes: int
    feed_write_timeout_s: float
    feed_poll_interval_s: float
    feed_heartbeat_s: float
    as_of_wait_s: float
    drain_grace_s: float
    keepalive_timeout_s: float
    body_bytes_max: int
    body_read_timeout_s: float
    bulk_items_max: int
    bulk_admission_wait_s: float
    bulk_waiting_max: int
    bulk_body_bytes_max: int
    api_keys: tuple[ApiKey, ...]
    api_keys_file: Path | None
    key_rate_per_s: float
    key_rate_burst: int
    access_log: bool
    webhook_allowed_hosts: tuple[str, ...]
    webhook_subscriptions_max: int
    webhook_in_flight_max: int
    webhook_timeout_s: float
    webhook_retry_period_s: float
    webhook_backoff_initial_s: float
    webhook_backoff_max_s: float
    webhook_poll_interval_s: float
    webhook_lease_ttl_s: float
    webhook_page_events: int
    webhook_deliveries_kept: int
    default_currency: str
    assets: tuple[Currency, ...]
    log_level: str
    gc_gen0_threshold: int
    shard_memo_entries: int

    @property
    def client_keys(self) -> tuple[ApiKey, ...]:
        """WALLETD_API_KEYS and the keys file together; ValueError on a malformed entry, a
        name or secret declared twice (also across the two), or an unreadable file."""
        if self.api_keys_file is None:
            return self.api_keys
        try:
            from_file = parse_keys_file(self.api_keys_file)
        except OSError as error:
            raise ValueError(f"WALLETD_API_KEYS_FILE: cannot read it: {error}") from None
        return merge_keys(self.api_keys, from_file)

    @property
    def currencies(self) -> Currencies:
        """ISO 4217 and the declared assets; ValueError when the default currency is
        neither."""
        return Currencies(self.assets, self.default_currency)

    @property
    def pool_size(self) -> int:
        # Each pipeline holds a connection per committing batch, plus one for its loads.
        return self.pool_size_max or (self.inflight_batches_max + 1) * self.pipelines + 4

    @property
    def url(self) -> str:
        """Where other processes reach this one (forwarding, the ownership table)."""
        if self.advertise_url:
            return self.advertise_url.rstrip("/")
        host = self.host
        if host in ("0.0.0.0", "::", ""):
            # Listening everywhere: the host name, which other replicas resolve (compose).
            host = socket.gethostname()
        return f"http://{host}:{self.port}"

    @property
    def internal_url(self) -> str:
        """Where other processes deliver transfer legs to this one (the internal listener)."""
        host = self.internal_host
        if host in ("0.0.0.0", "::", ""):
            host = socket.gethostname()
        return f"http://{host}:{self.internal_port}"

    @property
    def as_of_wait_effective_s(self) -> float:
        """A batch in flight normally ends within a commit timeout (two attempts and a
        queue ahead of it are the rare worst case: those reads get 503 and retry)."""
        return self.as_of_wait_s or self.commit_timeout_s


def _default_help(setting: Setting) -> str:
    # `%` is argparse's format character; a default written as text never holds one today.
    default = default_text(setting)
    return f"default {default}" if default else "unset by default"


def add_flags(parser: argparse.ArgumentParser, names: Collection[str] | None = None) -> None:
    """The flags of the settings in ``names`` (every setting when None)."""
    for setting in SETTINGS:
        if setting.flag is None or (names is not None and setting.name not in names):
            continue
        env = " / ".join(setting.env)
        parser.add_argument(
            setting.flag,
            dest=setting.name,
            default=None,
            # A boolean flag alone means true (`--access-log`); a value is accepted too.
            nargs="?" if setting.parse is _bool else None,
            const="true" if setting.parse is _bool else None,
            help=f"{setting.help} (env {env}; {_default_help(setting)})",
        )


def load_config(flags: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Config:
    """Flags, then the environment, then defaults; raises ValueError naming the bad input."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        raw: str | None = getattr(flags, setting.name, None)
        source = setting.flag
        if raw is None:
            source, raw = next(
                ((name, environ[name]) for name in setting.env if environ.get(name)), (None, None)
            )
        if raw is None:
            values[setting.name] = setting.default
            continue
        try:
            values[setting.name] = setting.parse(raw)
        except ValueError as error:
            raise ValueError(f"{source}: {error}") from None
    return Config(**values)


def flags_as_environment(flags: argparse.Namespace) -> dict[str, str]:
    """The settings given as flags, as the environment a child walletd reads them from:
    each under its first name (which beats its aliases), exactly as typed, so the child
    parses what this process parsed. `walletd cluster` hands its members every setting it
    was given this way; the environment rather than argv, because a command line is
    readable by every user of the machine and a setting may name a secret."""
    given: dict[str, str] = {}
    for setting in SETTINGS:
        raw = getattr(flags, setting.name, None) if setting.flag is not None else None
        if raw is not None:
            given[setting.env[0]] = raw
    return given


def env_names() -> Sequence[str]:
    return [name for setting in SETTINGS for name in setting.env]


# The generated documentation: ``env.example`` and the Markdown table that README.md and
# docs/DOCKER.md carry between these markers. `make docs-config` rewrites both; a test
# (tests/test_deployment.py) fails when they differ from what SETTINGS renders.
SETTINGS_TABLE_START = "<!-- settings:start -->"
SETTINGS_TABLE_END = "<!-- settings:end -->"


def default_text(setting: Setting) -> str:
    """The default as it is written in the environment (``""`` = unset)."""
    default = setting.default
    if default is None:
        return ""
    if isinstance(default, bool):
        return "true" if default else "false"
    if isinstance(default, tuple):  # the (empty) key and host lists
        return ",".join(str(item) for item in default)
    return str(default)


def render_env_example() -> str:
    """Every variable walletd reads, commented out at its default, with what it means."""
    lines = [
        "# walletd's settings, generated from cli/config.py SETTINGS by `make docs-config`.",
        "# Copy to .env and uncomment what you change: docker-compose reads .env by itself,",
        "# so settings change without rebuilding the image. Flags beat the environment,",
        "# which beats these defaults. Inside docker-compose the listening address, the port",
        "# and the database URL are fixed by the compose file (docs/DOCKER.md).",
    ]
    for setting in SETTINGS:
        first, *aliases = setting.env
        lines.append("")
        lines.append(f"# {setting.help}")
        if setting.flag is not None:
            lines.append(f"# flag: {setting.flag}")
        if aliases:
            lines.append(f"# also read from: {', '.join(aliases)}")
        lines.append(f"# {first}={default_text(setting)}")
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_settings_table() -> str:
    """The README's configuration table in Markdown, one row per setting."""
    rows = [
        "| Variable | Flag | Default | Meaning |",
        "| --- | --- | --- | --- |",
    ]
    for setting in SETTINGS:
        names = ", ".join(f"`{name}`" for name in setting.env)
        flag = f"`{setting.flag}`" if setting.flag is not None else "(environment only)"
        default = default_text(setting)
        shown = f"`{default}`" if default else "(unset)"
        rows.append(f"| {names} | {flag} | {shown} | {_cell(setting.help)} |")
    return "\n".join(rows) + "\n"


def replace_settings_table(document: str) -> str:
    """The document with the text between the settings markers replaced by the table."""
    start = document.index(SETTINGS_TABLE_START) + len(SETTINGS_TABLE_START)
    end = document.index(SETTINGS_TABLE_END, start)
    return document[:start] + "\n" + render_settings_table() + document[end:]


def _main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m walletd.cli.config", description="Render walletd's settings documentation."
    )
    parser.add_argument("--env-example", action="store_true", help="print env.example")
    parser.add_argument("--settings-table", action="store_true", help="print the Markdown table")
    parser.add_argument(
        "--update-docs",
        nargs="+",
        type=Path,
        default=[],
        metavar="FILE",
        help=f"rewrite the table between {SETTINGS_TABLE_START} and {SETTINGS_TABLE_END}",
    )
    args = parser.parse_args(argv)
    if args.env_example:
        sys.stdout.write(render_env_example())
    if args.settings_table:
        sys.stdout.write(render_settings_table())
    for path in args.update_docs:
        path.write_text(replace_settings_table(path.read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
