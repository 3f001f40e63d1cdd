"""What the handlers reach through the app: typed keys and the running services.

The services (engine, log, readiness) are started by a ``cleanup_ctx`` after the app is
frozen, so they live on one mutable ``AppState`` set on the app up front, not on the app.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass

from aiohttp import web

from walletd.engine.log_reads import LogReader
from walletd.engine.ports import WalletLog
from walletd.engine.router import Engine
from walletd.engine.webhooks import WebhookStore
from walletd.http.metrics import Metrics
from walletd.http.settings import HttpSettings

__all__ = ["METRICS_KEY", "STATE_KEY", "AppState", "Readiness", "Services", "ServicesFactory"]

# Returns None when ready, or the reason it is not.
Readiness = Callable[[], Awaitable[str | None]]


@dataclass(frozen=True, slots=True)
class Services:
    engine: Engine
    log: WalletLog
    readiness: Readiness
    reader: LogReader
    # Where other walletd processes reach this one; None when it runs alone (tests, tools).
    self_url: str | None = None
    # Gives this process's shards to the others before it stops (SIGTERM), bounded by the
    # seconds given; True once done. None when there is nothing to hand over.
    hand_over: Callable[[float], Awaitable[bool]] | None = None
    # Webhook subscriptions, cursors and attempts (http/webhooks.py); None: no webhooks.
    webhooks: WebhookStore | None = None


ServicesFactory = Callable[[], AbstractAsyncContextManager[Services]]


class AppState:
    __slots__ = ("_services", "draining", "settings")

    def __init__(self, settings: HttpSettings) -> None:
        self.settings = settings
        self._services: Services | None = None
        # Set on SIGTERM: /healthz fails so proxies stop sending, while requests are still
        # served until the listener closes (cli/main.py).
        self.draining = False

    @property
    def services(self) -> Services:
        if self._services is None:
            raise RuntimeError("walletd services are not running")
        return self._services

    @property
    def running(self) -> Services | None:
        """The services, or None while starting or stopping."""
        return self._services

    def attach(self, services: Services | None) -> None:
        self._services = services


STATE_KEY = web.AppKey("walletd_state", AppState)
METRICS_KEY = web.AppKey("walletd_metrics", Metrics)
