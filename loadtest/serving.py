"""Runs an aiohttp app on uvloop until SIGTERM/SIGINT; shared by the ceiling and the fake."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

import uvloop
from aiohttp import web

__all__ = ["parse_serve_args", "run"]


def parse_serve_args(description: str, argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    return parser.parse_args(argv)


async def _serve(app: web.Application, host: str, port: int, name: str) -> None:
    # No access log: the point of these servers is to cost as little as possible per request.
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await web.TCPSite(runner, host, port, backlog=1024).start()
        # The same readiness line as `walletd serve`, so one launcher handles all three.
        print(f"{name} listening on http://{host}:{port}", flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()


def run(app: web.Application, host: str, port: int, name: str) -> int:
    uvloop.run(_serve(app, host, port, name))
    sys.stdout.flush()
    return 0
