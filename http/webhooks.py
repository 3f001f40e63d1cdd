"""Webhooks: subscriptions (``/api/v1/webhooks``, admin scope) and the sender that
delivers the change feed's events to them, signed.

Each subscription is delivered by one process at a time (a lease on its cursor row,
persistence/webhooks.py), in feed order, one event per request, at least once::

    every lease_ttl / 3: claim ── renew own leases, take expired ones (≤ in_flight_max)
      │                           start a task per new claim, stop those not renewed
      ▼
    task: read a page after the cursor (the read pool, LogReader.events_after)
      ├─ event of a type not wanted: passed over (the cursor moves past it)
      └─ event wanted: POST it ── 2xx ──▶ cursor := its position (fenced by the lease)
                                  else ──▶ attempt logged; wait backoff (doubling from
                                           backoff_initial_s to backoff_max_s, jittered
                                           to 50–100 %), send again; once the event has
                                           failed for retry_period_s: failing, stop (the
                                           cursor stays on it)

The sender never touches the write path: it reads committed events through the read pool
like any feed consumer, in its own tasks, so a slow endpoint only slows its own
subscription. A cursor moves only after a 2xx, so a crash resends at most the event in
flight (at least once); a receiver deduplicates by the event's ``position``.

Each request carries ``Walletd-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret,
"<t>.<body>")>`` (Stripe's scheme); ``walletd.client.verify_webhook_signature`` checks it.

SSRF guard: with ``allowed_hosts`` set, a URL's host must be one of them (checked when a
subscription is written and again at each send); without it, every address the host
resolves to must be public, checked at send time on the addresses the connection then
uses (no second lookup an attacker's DNS could answer differently). Redirects are not
followed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import logging
import os
import random
import secrets
import socket
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any, Final
from uuid import UUID

import aiohttp
import orjson
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from yarl import URL

from walletd.engine.ids import new_uuid4
from walletd.engine.log_reads import FeedEvent, FeedPosition, LogReader
from walletd.engine.ports import StorageError
from walletd.engine.webhooks import EVENT_TYPES, Claim, Delivery, Subscription, WebhookStore
from walletd.http.feed import event_json
from walletd.http.keys import Scope, requires
from walletd.http.parsing import parse_empty_body, path_id, read_json_object
from walletd.http.problems import FieldError, ProblemError, ValidationProblem
from walletd.http.responses import format_timestamp
from walletd.http.settings import WebhookSettings
from walletd.http.state import STATE_KEY

__all__ = [
    "SIGNATURE_HEADER",
    "WEBHOOKS_KEY",
    "DestinationRefused",
    "WebhookSender",
    "WebhookSenderCollector",
    "check_url",
    "routes",
    "sign",
]

_log = logging.getLogger("walletd.webhooks")

PREFIX: Final = "/api/v1/webhooks"
SIGNATURE_HEADER: Final = "Walletd-Signature"
URL_LENGTH_MAX: Final = 2048
# The most attempts one GET .../deliveries returns (the log keeps deliveries_kept of them).
DELIVERIES_LIMIT_MAX: Final = 1000
_ERROR_LENGTH_MAX: Final = 200
_JSON_HEADERS: Final = {"Content-Type": "application/json"}
_FIELDS: Final = frozenset({"url", "event_types", "enabled"})

routes = web.RouteTableDef()


# -- signing and the destination guard ------------------------------------------------------


def sign(secret: str, body: bytes, timestamp_s: int) -> str:
    """The ``Walletd-Signature`` value of ``body`` sent at ``timestamp_s``."""
    mac = hmac.new(secret.encode(), f"{timestamp_s}.".encode() + body, hashlib.sha256)
    return f"t={timestamp_s},v1={mac.hexdigest()}"


def _is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def _ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def check_url(text: str, allowed_hosts: frozenset[str]) -> str | None:
    """Why ``text`` may not be a webhook URL, or None when it may."""
    if len(text) > URL_LENGTH_MAX:
        return f"must be at most {URL_LENGTH_MAX} characters"
    try:
        url = URL(text)
    except ValueError:
        return "is not a URL"
    if url.scheme not in ("http", "https") or not url.absolute:
        return "must be an absolute http or https URL"
    if url.user is not None or url.password is not None:
        return "must not carry credentials (user:password@)"
    host = (url.host or "").lower()
    if not host:
        return "must name a host"
    if url.fragment:
        return "must not have a fragment"
    if allowed_hosts:
        if host not in allowed_hosts:
            return f"host {host!r} is not in the webhook allowlist (WALLETD_WEBHOOK_ALLOWED_HOSTS)"
    elif _ip_literal(host) and not _is_public(host):
        return "must not be a loopback, private, link-local or reserved address"
    return None


class DestinationRefused(Exception):
    """A webhook host resolved to an address the SSRF guard refuses (not an OSError, so
    aiohttp passes it through with its reason instead of as a generic DNS failure)."""


class _PublicOnlyResolver(AbstractResolver):
    """Resolves a name once and refuses it when any address is not public; aiohttp then
    connects to exactly the addresses returned (no rebinding between check and connect)."""

    def __init__(self) -> None:
        self._inner = ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        for result in results:
            if not _is_public(result["host"]):
                raise DestinationRefused(
                    f"{host} resolves to {result['host']}, which is not public"
                )
        return results

    async def close(self) -> None:
        await self._inner.close()


# -- the sender -------------------------------------------------------------------------------


class _Outcome:
    __slots__ = ("duration_ms", "error", "status")

    def __init__(self, status: int | None, error: str | None, duration_ms: int) -> None:
        self.status = status
        self.error = error
        self.duration_ms = duration_ms

    @property
    def succeeded(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


def payload(subscription_id: UUID, event: FeedEvent) -> bytes:
    return orjson.dumps({"webhook_id": str(subscription_id), "event": event_json(event)})


class WebhookSender:
    """Delivers the subscriptions this process holds the lease of; see the module doc."""

    def __init__(self, settings: WebhookSettings) -> None:
        self._settings = settings
        self._store: WebhookStore | None = None
        self._reader: LogReader | None = None
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self._tasks: dict[UUID, asyncio.Task[None]] = {}
        # Per subscription: the monotonic instant its lease may have lapsed (sent + ttl −
        # margin), as the shard keeper measures its own.
        self._valid_until: dict[UUID, float] = {}
        self._session: aiohttp.ClientSession | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self.sent = 0
        self.failed = 0
        self.failing = 0

    @contextlib.asynccontextmanager
    async def running(self, store: WebhookStore, reader: LogReader) -> AsyncIterator[None]:
        """Deliver while the block runs; the session serves redeliveries too."""
        self._store = store
        self._reader = reader
        self._session = self._new_session()
        self._loop_task = asyncio.create_task(self._run(), name="walletd-webhooks")
        try:
            yield
        finally:
            self._loop_task.cancel()
            tasks = [self._loop_task, *self._tasks.values()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            with contextlib.suppress(StorageError):
                await store.release(self.owner)
            await self._session.close()
            self._session = None
            self._tasks.clear()

    def _new_session(self) -> aiohttp.ClientSession:
        settings = self._settings
        resolver: AbstractResolver = (
            ThreadedResolver() if settings.allowed_hosts else _PublicOnlyResolver()
        )
        connector = aiohttp.TCPConnector(
            limit=settings.in_flight_max + 1, resolver=resolver, use_dns_cache=False
        )
        return aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=settings.timeout_s),
            headers={"User-Agent": "walletd-webhooks"},
        )

    async def _run(self) -> None:
        step_s = self._settings.lease_ttl_s / 3
        while True:
            try:
                await self._step()
            except StorageError as error:
                _log.warning("webhook leases not renewed: %r", error)
            await asyncio.sleep(step_s)

    @property
    def _running(self) -> tuple[WebhookStore, LogReader]:
        if self._store is None or self._reader is None:
            raise RuntimeError("the webhook sender is not running")
        return self._store, self._reader

    async def _step(self) -> None:
        settings = self._settings
        store, _reader = self._running
        sent_at = time.monotonic()
        claims = await store.claim(self.owner, settings.lease_ttl_s, settings.in_flight_max)
        valid_until = sent_at + settings.lease_ttl_s * 0.75
        held = {claim.id for claim in claims}
        for subscription_id in list(self._tasks):
            if subscription_id not in held:
                self._tasks.pop(subscription_id).cancel()
                self._valid_until.pop(subscription_id, None)
        for claim in claims:
            self._valid_until[claim.id] = valid_until
            task = self._tasks.get(claim.id)
            if task is None or task.done():
                self._tasks[claim.id] = asyncio.create_task(
                    self._deliver(claim), name=f"walletd-webhook-{claim.id}"
                )
        self.failing = await store.failing_count()

    def _holds(self, subscription_id: UUID) -> bool:
        return time.monotonic() < self._valid_until.get(subscription_id, 0.0)

    async def _deliver(self, claim: Claim) -> None:
        position = claim.position
        settings = self._settings
        store, reader = self._running
        try:
            while self._holds(claim.id):
                events = await reader.events_after(position, settings.page_events)
                for event in events:
                    if event.type in claim.event_types and not await self._until_sent(claim, event):
                        return
                    position = event.position
                if events and not await store.advance(claim.id, self.owner, position):
                    return
                if len(events) < settings.page_events:
                    await asyncio.sleep(settings.poll_interval_s)
        except StorageError as error:
            # The next claim step starts the subscription again from its durable cursor.
            _log.warning("webhook %s paused: %r", claim.id, error)
        finally:
            self._valid_until.pop(claim.id, None)

    async def _until_sent(self, claim: Claim, event: FeedEvent) -> bool:
        """Send until a 2xx (True); False when the lease is lost or the subscription fails."""
        settings = self._settings
        store, _reader = self._running
        body = payload(claim.id, event)
        attempt = 0
        while self._holds(claim.id):
            outcome = await self.send(claim.id, claim.url, claim.secret, body)
            await store.record(
                claim.id, event.position, event.type, outcome.status, outcome.error,
                outcome.duration_ms, False, settings.deliveries_kept,
            )  # fmt: skip
            if outcome.succeeded:
                self.sent += 1
                return await store.advance(claim.id, self.owner, event.position)
            self.failed += 1
            age_s = await store.retrying(claim.id, self.owner)
            if age_s is None:
                return False
            if age_s >= settings.retry_period_s:
                _log.warning(
                    "webhook %s failing: event %s undelivered for %.0f s; its cursor is kept",
                    claim.id, event.position, age_s,
                )  # fmt: skip
                await store.mark_failing(claim.id, self.owner)
                return False
            delay_s = min(settings.backoff_max_s, settings.backoff_initial_s * 2.0**attempt)
            attempt = min(attempt + 1, 62)
            await asyncio.sleep(random.uniform(delay_s / 2, delay_s))
        return False

    async def send(self, subscription_id: UUID, url: str, secret: str, body: bytes) -> _Outcome:
        """One signed POST; never raises for the endpoint's failures."""
        started = time.monotonic()
        reason = check_url(url, self._settings.allowed_hosts)
        if reason is not None:
            return _Outcome(None, f"refused: the URL {reason}", 0)
        session = self._session
        if session is None:
            raise RuntimeError("the webhook sender is not running")
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign(secret, body, int(time.time())),
            "Walletd-Webhook-Id": str(subscription_id),
        }
        try:
            async with session.post(
                url, data=body, headers=headers, allow_redirects=False
            ) as response:
                status = response.status
        except DestinationRefused as error:
            return _Outcome(None, f"refused: {error}"[:_ERROR_LENGTH_MAX], _elapsed_ms(started))
        except (aiohttp.ClientError, OSError, TimeoutError) as error:
            text = f"{type(error).__name__}: {error}"[:_ERROR_LENGTH_MAX]
            return _Outcome(None, text, _elapsed_ms(started))
        return _Outcome(status, None, _elapsed_ms(started))


def _elapsed_ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)


WEBHOOKS_KEY: Final = web.AppKey("walletd_webhooks", WebhookSender)


class WebhookSenderCollector(Collector):
    """/metrics figures of the sender, read at scrape time (the failing count is the
    cluster's, refreshed at each lease step)."""

    def __init__(self, sender: WebhookSender) -> None:
        self._sender = sender

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "walletd_webhooks_failing",
            "Webhook subscriptions marked failing (undelivered for the retry period)",
            value=self._sender.failing,
        )
        yield CounterMetricFamily(
            "walletd_webhook_deliveries_succeeded", "Webhook requests answered 2xx",
            value=self._sender.sent,
        )  # fmt: skip
        yield CounterMetricFamily(
            "walletd_webhook_deliveries_failed", "Webhook requests not answered 2xx",
            value=self._sender.failed,
        )  # fmt: skip


# -- the routes -------------------------------------------------------------------------------


def _subscription_json(subscription: Subscription) -> dict[str, Any]:
    if not subscription.enabled:
        status = "disabled"
    elif subscription.failing_since_us is not None:
        status = "failing"
    else:
        status = "active"
    return {
        "id": str(subscription.id),
        "url": subscription.url,
        "event_types": list(subscription.event_types),
        "enabled": subscription.enabled,
        "status": status,
        "position": str(subscription.position),
        "failing_since": (
            None
            if subscription.failing_since_us is None
            else format_timestamp(subscription.failing_since_us)
        ),
        "created_at": format_timestamp(subscription.created_at_us),
        "updated_at": format_timestamp(subscription.updated_at_us),
    }


def _delivery_json(delivery: Delivery) -> dict[str, Any]:
    return {
        "id": str(delivery.id),
        "webhook_id": str(delivery.webhook_id),
        "position": str(delivery.position),
        "event_type": delivery.event_type,
        "attempted_at": format_timestamp(delivery.attempted_at_us),
        "status": delivery.status,
        "error": delivery.error,
        "duration_ms": delivery.duration_ms,
        "succeeded": delivery.succeeded,
        "redelivery": delivery.redelivery,
    }


def _json(body: object, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=orjson.dumps(body), status=status, headers={**_JSON_HEADERS, **(headers or {})}
    )


def _store(request: web.Request) -> WebhookStore:
    store = request.app[STATE_KEY].services.webhooks
    if store is None:
        raise ProblemError(503, "UNAVAILABLE", "webhooks are not available on this server")
    return store


def _settings(request: web.Request) -> WebhookSettings:
    return request.app[STATE_KEY].settings.webhooks


def _parse_fields(
    body: dict[str, Any], settings: WebhookSettings, *, creating: bool
) -> tuple[str | None, tuple[str, ...] | None, bool | None]:
    errors: list[FieldError] = []
    allowed = _FIELDS | {"after"} if creating else _FIELDS
    for name in sorted(set(body) - allowed):
        errors.append({"field": name[:64], "message": "is not a known field"})
    url = body.get("url")
    if url is None and creating:
        errors.append({"field": "url", "message": "is required"})
    elif url is not None:
        reason = (
            "must be a string"
            if not isinstance(url, str)
            else check_url(url, settings.allowed_hosts)
        )
        if reason is not None:
            errors.append({"field": "url", "message": reason})
    types = body.get("event_types")
    if types is not None and (
        not isinstance(types, list)
        or not types
        or any(t not in EVENT_TYPES for t in types)
        or len(set(types)) != len(types)
    ):
        errors.append(
            {
                "field": "event_types",
                "message": f"must be a non-empty list of distinct types of {list(EVENT_TYPES)}",
            }
        )
    enabled = body.get("enabled")
    if enabled is not None and not isinstance(enabled, bool):
        errors.append({"field": "enabled", "message": "must be true or false"})
    if errors:
        raise ValidationProblem(errors)
    return url, None if types is None else tuple(types), enabled


def _webhook_id(request: web.Request) -> UUID:
    return path_id(request, "webhook_id", PREFIX + "/", "INVALID_WEBHOOK_ID")


def _not_found(subscription_id: UUID) -> ProblemError:
    return ProblemError(404, "WEBHOOK_NOT_FOUND", f"webhook {subscription_id} does not exist")


@routes.post(PREFIX)
@requires(Scope.ADMIN)
async def create_webhook(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    settings = state.settings.webhooks
    body, _raw = await read_json_object(request, state.settings)
    url, types, enabled = _parse_fields(body, settings, creating=True)
    after_text = body.get("after")
    after = None
    if after_text is not None:
        after = FeedPosition.parse(after_text) if isinstance(after_text, str) else None
        if after is None:
            raise ValidationProblem([{"field": "after", "message": "is not a feed position"}])
    assert url is not None
    secret = "whsec_" + secrets.token_urlsafe(32)
    subscription = await _store(request).create(
        new_uuid4(), url, types or EVENT_TYPES, True if enabled is None else enabled,
        secret, after, settings.subscriptions_max,
    )  # fmt: skip
    if subscription is None:
        raise ProblemError(
            409, "TOO_MANY_WEBHOOKS",
            f"{settings.subscriptions_max} webhooks exist, the most this server keeps; "
            "delete one first",
        )  # fmt: skip
    # The only answer that ever shows the secret.
    shown = {**_subscription_json(subscription), "secret": secret}
    return _json(shown, 201, {"Location": f"{PREFIX}/{subscription.id}"})


@routes.get(PREFIX)
@requires(Scope.ADMIN)
async def list_webhooks(request: web.Request) -> web.Response:
    found = await _store(request).list_all(_settings(request).subscriptions_max)
    return _json({"items": [_subscription_json(s) for s in found]})


@routes.get(PREFIX + "/{webhook_id}")
@requires(Scope.ADMIN)
async def get_webhook(request: web.Request) -> web.Response:
    subscription_id = _webhook_id(request)
    subscription = await _store(request).get(subscription_id)
    if subscription is None:
        raise _not_found(subscription_id)
    return _json(_subscription_json(subscription))


@routes.patch(PREFIX + "/{webhook_id}")
@requires(Scope.ADMIN)
async def update_webhook(request: web.Request) -> web.Response:
    subscription_id = _webhook_id(request)
    state = request.app[STATE_KEY]
    body, _raw = await read_json_object(request, state.settings)
    url, types, enabled = _parse_fields(body, state.settings.webhooks, creating=False)
    subscription = await _store(request).update(subscription_id, url, types, enabled)
    if subscription is None:
        raise _not_found(subscription_id)
    return _json(_subscription_json(subscription))


@routes.delete(PREFIX + "/{webhook_id}")
@requires(Scope.ADMIN)
async def delete_webhook(request: web.Request) -> web.Response:
    subscription_id = _webhook_id(request)
    if not await _store(request).delete(subscription_id):
        raise _not_found(subscription_id)
    return web.Response(status=204)


def _deliveries_limit(request: web.Request, default: int) -> int:
    text = request.query.get("limit")
    if text is None:
        return default
    maximum = DELIVERIES_LIMIT_MAX
    if not (text.isascii() and text.isdigit() and len(text) <= 6) or not 1 <= int(text) <= maximum:
        raise ValidationProblem(
            [{"field": "limit", "message": f"must be an integer from 1 to {maximum}"}]
        )
    return int(text)


@routes.get(PREFIX + "/{webhook_id}/deliveries")
@requires(Scope.ADMIN)
async def list_deliveries(request: web.Request) -> web.Response:
    subscription_id = _webhook_id(request)
    store = _store(request)
    limit = _deliveries_limit(request, _settings(request).deliveries_kept)
    if await store.get(subscription_id) is None:
        raise _not_found(subscription_id)
    found = await store.deliveries(subscription_id, limit)
    return _json({"items": [_delivery_json(d) for d in found]})


@routes.post(PREFIX + "/{webhook_id}/deliveries/{delivery_id}/redeliver")
@requires(Scope.ADMIN)
async def redeliver(request: web.Request) -> web.Response:
    """Send the event of a logged attempt again, now, from this process; out of feed order
    by nature, so a receiver deduplicates by the event's position as for any retry."""
    subscription_id = _webhook_id(request)
    body, _raw = await read_json_object(request, request.app[STATE_KEY].settings, optional=True)
    parse_empty_body(body)
    text = request.match_info["delivery_id"]
    if not (text.isascii() and text.isdigit() and 0 < len(text) <= 18):
        raise ProblemError(404, "DELIVERY_NOT_FOUND", f"delivery {text[:32]!r} does not exist")
    store = _store(request)
    subscription = await store.get(subscription_id)
    secret = await store.secret(subscription_id)
    if subscription is None or secret is None:
        raise _not_found(subscription_id)
    delivery = await store.delivery(subscription_id, int(text))
    if delivery is None:
        raise ProblemError(404, "DELIVERY_NOT_FOUND", f"delivery {text} does not exist")
    position = delivery.position
    # The event at `position`: the first after the one just before it.
    events = await request.app[STATE_KEY].services.reader.events_after(
        FeedPosition(position.xid, position.id - 1), 1
    )
    if not events or events[0].position != position:
        raise ProblemError(404, "DELIVERY_NOT_FOUND", f"the event at {position} is not in the feed")
    sender = request.app[WEBHOOKS_KEY]
    outcome = await sender.send(
        subscription_id, subscription.url, secret, payload(subscription_id, events[0])
    )
    attempt = await store.record(
        subscription_id, position, delivery.event_type, outcome.status, outcome.error,
        outcome.duration_ms, True, _settings(request).deliveries_kept,
    )  # fmt: skip
    return _json(_delivery_json(attempt))
