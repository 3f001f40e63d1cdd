"""The aiohttp application factory."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from aiohttp import web

from walletd.engine.router import Engine
from walletd.http import feed, health, listings, routes_v1, webhooks
from walletd.http.docs_page import add_docs_routes
from walletd.http.edge import Middleware, auth_middleware, edge_middleware, is_protected_path
from walletd.http.forwarding import FORWARDER_KEY, Forwarder
from walletd.http.keys import check_route_scopes
from walletd.http.metrics import METRICS_PATH, Metrics, metrics_handler
from walletd.http.problems import problems_middleware
from walletd.http.settings import HttpSettings
from walletd.http.state import METRICS_KEY, STATE_KEY, AppState, ServicesFactory

__all__ = ["create_app"]


def create_app(
    settings: HttpSettings, services: ServicesFactory, *, metrics: Metrics | None = None
) -> web.Application:
    """The walletd app; ``services`` starts storage and the engine, and stops them.

    ``metrics`` is the registry /metrics shows; pass the one whose ``engine`` observer the
    engine reports to (cli/main.py does), or let the app make its own.

    The public app only: the routes walletd processes call on each other are not registered
    here in any form; they are on the internal app (http/internal.py, its own listener).
    """
    metrics = metrics or Metrics()
    # Outermost first; see edge.py for why this order.
    middlewares: list[Middleware] = [edge_middleware(metrics), problems_middleware]
    if settings.api_keys:
        middlewares.append(
            auth_middleware(
                settings.api_keys,
                metrics,
                rate_per_s=settings.key_rate_per_s,
                rate_burst=settings.key_rate_burst,
            )
        )
    # Innermost: a request is authorized here before it is sent on to a shard's owner.
    forwarder = Forwarder(
        metrics,
        timeout_s=settings.forward_timeout_s,
        connections_max=settings.forward_connections_max,
    )
    middlewares.append(forwarder.middleware())
    app = web.Application(client_max_size=settings.body_bytes_max, middlewares=middlewares)
    state = AppState(settings)
    app[STATE_KEY] = state
    app[FORWARDER_KEY] = forwarder  # bulk items of other processes go through its pool
    app[METRICS_KEY] = metrics
    streams = feed.FeedStreams()
    app[feed.FEED_KEY] = streams
    metrics.registry.register(feed.FeedStreamsCollector(streams, settings.feed_streams_max))

    async def end_streams(_app: web.Application) -> None:
        streams.closing.set()

    app.on_shutdown.append(end_streams)
    sender = webhooks.WebhookSender(settings.webhooks)
    app[webhooks.WEBHOOKS_KEY] = sender
    metrics.registry.register(webhooks.WebhookSenderCollector(sender))

    def running_engine() -> Engine | None:
        return state.running.engine if state.running is not None else None

    metrics.watch_engine(running_engine)

    async def run_services(_app: web.Application) -> AsyncIterator[None]:
        async with services() as running, contextlib.AsyncExitStack() as stack:
            if running.webhooks is not None:
                # Its own tasks and read-pool connections: never on the write path.
                await stack.enter_async_context(sender.running(running.webhooks, running.reader))
            state.attach(running)
            try:
                yield
            finally:
                state.attach(None)

    app.cleanup_ctx.append(run_services)
    app.cleanup_ctx.append(forwarder.session_ctx)
    app.router.add_routes(routes_v1.routes)
    app.router.add_routes(feed.routes)
    app.router.add_routes(listings.routes)
    app.router.add_routes(webhooks.routes)
    app.router.add_routes(health.routes)
    app.on_response_prepare.append(health.close_while_draining)
    app.router.add_get(METRICS_PATH, metrics_handler(metrics), allow_head=False)
    add_docs_routes(app)
    # Checked with auth off too: a route that declares no scope fails every start.
    check_route_scopes(app, is_protected_path)
    return app
