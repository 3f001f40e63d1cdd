"""The aiohttp application factory."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from walletd.http import health, routes_v1
from walletd.http.docs_page import add_docs_routes
from walletd.http.problems import problems_middleware
from walletd.http.settings import HttpSettings
from walletd.http.state import STATE_KEY, AppState, ServicesFactory

__all__ = ["create_app"]


def create_app(settings: HttpSettings, services: ServicesFactory) -> web.Application:
    """The walletd app; ``services`` starts storage and the engine, and stops them."""
    app = web.Application(
        client_max_size=settings.body_bytes_max,
        middlewares=[problems_middleware],
    )
    state = AppState(settings)
    app[STATE_KEY] = state

    async def run_services(_app: web.Application) -> AsyncIterator[None]:
        async with services() as running:
            state.attach(running)
            try:
                yield
            finally:
                state.attach(None)

    app.cleanup_ctx.append(run_services)
    app.router.add_routes(routes_v1.routes)
    app.router.add_routes(health.routes)
    add_docs_routes(app)
    return app
