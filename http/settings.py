"""Settings of the HTTP edge (the CLI fills them from flags and the environment)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from walletd.http.currencies import Currencies
from walletd.http.keys import ApiKey

__all__ = ["LISTING_LIMIT_MAX", "HttpSettings", "WebhookSettings"]

# The largest page a listing may be configured to serve: a page reads at most
# 4 x (limit + 1) rows (http/listings.py), and its body holds them all.
LISTING_LIMIT_MAX: Final = 5000


@dataclass(frozen=True, slots=True)
class WebhookSettings:
    """The webhook sender's bounds (http/webhooks.py); each knob is in cli/config.py."""

    # Hosts webhooks may be sent to (lowercase names or IP literals); empty = any host
    # whose every address is public (no loopback, private, link-local or reserved one).
    allowed_hosts: frozenset[str] = frozenset()
    subscriptions_max: int = 100
    # Subscriptions this process delivers at once (each one request at a time).
    in_flight_max: int = 16
    timeout_s: float = 10.0
    retry_period_s: float = 3 * 24 * 3600.0
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 3600.0
    poll_interval_s: float = 1.0
    lease_ttl_s: float = 15.0
    page_events: int = 100
    deliveries_kept: int = 100

    def __post_init__(self) -> None:
        if self.subscriptions_max < 1 or self.in_flight_max < 1:
            raise ValueError("webhook subscriptions_max and in_flight_max must be at least 1")
        if min(self.timeout_s, self.backoff_initial_s, self.poll_interval_s) <= 0:
            raise ValueError("webhook timeout, backoff and poll interval must be positive")
        if self.backoff_max_s < self.backoff_initial_s or self.retry_period_s <= 0:
            raise ValueError("webhook backoff_max_s must be >= backoff_initial_s, retry > 0")
        if not 1.0 <= self.lease_ttl_s <= 600:
            raise ValueError("webhook lease_ttl_s must be within 1..600")
        if self.page_events < 1 or not 1 <= self.deliveries_kept <= 1000:
            raise ValueError("webhook page_events must be at least 1, deliveries_kept 1..1000")


@dataclass(frozen=True, slots=True)
class HttpSettings:
    body_bytes_max: int = 64 * 1024
    body_read_timeout_s: float = 10.0
    bulk_body_bytes_max: int = 1024 * 1024
    history_limit_default: int = 50
    history_limit_max: int = 500
    # Listings (http/listings.py): items per page when the request gives no limit, and the
    # most it may ask for.
    listing_limit_default: int = 50
    listing_limit_max: int = 500
    # Client keys (keys.py); empty = auth off. The rate limit is per key, off at 0.
    api_keys: tuple[ApiKey, ...] = ()
    key_rate_per_s: float = 0.0
    key_rate_burst: int = 20
    access_log: bool = False
    # The change feed (http/feed.py) and as-of reads; each knob is in cli/config.py.
    events_limit_default: int = 100
    events_limit_max: int = 1000
    feed_streams_max: int = 64
    feed_streams_per_key_max: int = 16
    feed_stream_buffer_bytes: int = 256 * 1024
    feed_poll_interval_s: float = 0.5
    feed_heartbeat_s: float = 15.0
    feed_write_timeout_s: float = 10.0
    as_of_wait_s: float = 5.0
    forward_timeout_s: float = 10.0
    forward_connections_max: int = 64
    webhooks: WebhookSettings = WebhookSettings()
    # What a wallet may be created in, and the default (http/currencies.py).
    currencies: Currencies = field(default_factory=Currencies)

    def __post_init__(self) -> None:
        if self.body_bytes_max < 1024:
            raise ValueError("body_bytes_max must be at least 1024")
        if not self.body_read_timeout_s > 0:
            raise ValueError("body_read_timeout_s must be greater than 0")
        if self.bulk_body_bytes_max < self.body_bytes_max:
            raise ValueError("bulk_body_bytes_max must be at least body_bytes_max")
        if not 1 <= self.history_limit_default <= self.history_limit_max:
            raise ValueError("history_limit_default must be within 1..history_limit_max")
        if not 1 <= self.listing_limit_default <= self.listing_limit_max:
            raise ValueError("listing_limit_default must be within 1..listing_limit_max")
        if self.listing_limit_max > LISTING_LIMIT_MAX:
            raise ValueError(f"listing_limit_max must be at most {LISTING_LIMIT_MAX}")
        if not 1 <= self.events_limit_default <= self.events_limit_max:
            raise ValueError("events_limit_default must be within 1..events_limit_max")
        if self.feed_streams_max < 0:
            raise ValueError("feed_streams_max must not be negative (0 turns streams off)")
        if self.feed_streams_per_key_max < 1:
            raise ValueError("feed_streams_per_key_max must be at least 1")
        if self.key_rate_per_s < 0 or self.key_rate_burst < 1:
            raise ValueError("key_rate_per_s must not be negative, key_rate_burst at least 1")
        if self.feed_stream_buffer_bytes < 4096:
            raise ValueError("feed_stream_buffer_bytes must be at least 4096")
        if min(self.feed_poll_interval_s, self.feed_heartbeat_s, self.feed_write_timeout_s) <= 0:
            raise ValueError("feed intervals and timeouts must be positive")
        if not self.as_of_wait_s > 0:
            raise ValueError("as_of_wait_s must be greater than 0")
        if self.forward_timeout_s <= 0 or self.forward_connections_max < 1:
            raise ValueError("forwarding needs a positive timeout and at least one connection")
