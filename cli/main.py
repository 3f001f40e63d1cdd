"""The ``walletd`` command: ``serve`` and ``migrate``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

import uvloop
from aiohttp import web

from walletd.cli.config import Config, add_flags, load_config
from walletd.cli.service import engine_limits, migrate_database, running_services, storage
from walletd.http.access_log import access_log_options
from walletd.http.app import create_app
from walletd.http.metrics import Metrics
from walletd.http.settings import HttpSettings
from walletd.persistence.database import DatabaseError
from walletd.persistence.embedded import EmbeddedPostgresError
from walletd.persistence.migrate import MigrationError

__all__ = ["main"]

_log = logging.getLogger("walletd")

SHUTDOWN_TIMEOUT_S = 30.0

# Errors that end start-up with one readable line and exit code 2, not a traceback.
_STARTUP_ERRORS = (DatabaseError, EmbeddedPostgresError, MigrationError, ValueError, OSError)


def http_settings(config: Config) -> HttpSettings:
    return HttpSettings(
        body_bytes_max=config.body_bytes_max,
        api_keys=config.api_keys,
        access_log=config.access_log,
    )


async def _serve(config: Config) -> None:
    metrics = Metrics()
    app = create_app(
        http_settings(config), lambda: running_services(config, metrics.engine), metrics=metrics
    )
    runner = web.AppRunner(
        app, shutdown_timeout=SHUTDOWN_TIMEOUT_S, **access_log_options(config.access_log)
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.host, config.port, backlog=2048)
        await site.start()
        host, port = runner.addresses[0][:2]
        print(f"walletd listening on http://{host}:{port}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
        _log.info("stopping: draining in-flight requests")
    finally:
        await runner.cleanup()
    _log.info("stopped")


async def _migrate(config: Config) -> None:
    async with storage(config) as dsn:
        applied = await migrate_database(dsn)
    print("applied: " + ", ".join(applied) if applied else "schema is up to date")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="walletd", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("serve", "run the HTTP service"),
        ("migrate", "apply database migrations and exit"),
    ):
        add_flags(commands.add_parser(name, help=help_text))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = load_config(args)
        engine_limits(config)  # validates the limits before anything starts
    except ValueError as error:
        print(f"walletd: error: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    command = _serve if args.command == "serve" else _migrate
    try:
        uvloop.run(command(config))
    except _STARTUP_ERRORS as error:
        print(f"walletd: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
