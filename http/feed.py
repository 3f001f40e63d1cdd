"""The change feed: ``GET /api/v1/events`` (pages) and ``GET /api/v1/events/stream`` (SSE).

Both read the log through ``LogReader.events_after`` (persistence/log_reads.py explains
why a position is never passed by a late commit). The stream is that same page read in a
loop::

    open ── streams open < feed_streams_max? ──no──▶ 503 OVERLOADED
      │ ── the key's streams < feed_streams_per_key_max? ──no──▶ 429 TOO_MANY_STREAMS
      │ first page read before the 200, so an outage is a 503, not an empty stream
      ▼
    write page ──write blocked > feed_write_timeout_s──▶ disconnect (slow consumer;
      │                                                 it resumes from Last-Event-ID)
      ├─ full page: read the next one at once (catching up)
      └─ short page: wait feed_poll_interval_s (a heartbeat comment when idle for
                     feed_heartbeat_s), then read again; shutdown ends the wait

Polling, not LISTEN/NOTIFY: a NOTIFY in the append transaction takes a cluster-wide lock
at commit (serialising every shard's commits), and one sent after it is a second round
trip per batch; a poll costs the write path nothing, and a consumer waits at most one
interval. Memory per stream: one page of events plus the socket's send buffer, both bounded
(``events_limit_max``, ``feed_stream_buffer_bytes``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Iterator
from typing import Any, Final

import orjson
from aiohttp import web
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from walletd.engine.log_reads import FeedEvent, FeedPosition, LogReader
from walletd.engine.money import format_minor
from walletd.engine.ports import StorageError
from walletd.http.edge import REQUEST_ID_HEADER, REQUEST_ID_KEY
from walletd.http.keys import KEY_NAME, Scope, requires
from walletd.http.problems import ProblemError, ValidationProblem
from walletd.http.responses import format_timestamp
from walletd.http.settings import HttpSettings
from walletd.http.state import STATE_KEY

__all__ = ["FEED_KEY", "FeedStreams", "FeedStreamsCollector", "event_json", "routes"]

_log = logging.getLogger("walletd.feed")

PREFIX: Final = "/api/v1"
_JSON_HEADERS: Final = {"Content-Type": "application/json"}
_STREAM_HEADERS: Final = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    # Proxies such as nginx would otherwise buffer the stream.
    "X-Accel-Buffering": "no",
}
_HEARTBEAT: Final = b": heartbeat\n\n"
# Enough digits for any valid limit, few enough that int() never meets Python's digit limit.
_LIMIT_DIGITS_MAX: Final = 6

routes = web.RouteTableDef()


class FeedStreams:
    """The streams this process serves: how many are open, and the signal to end them."""

    __slots__ = ("by_key", "closing", "events_sent", "lag_s", "open", "slow_disconnects")

    def __init__(self) -> None:
        self.open = 0
        # Open streams per key name; at most one entry per configured key (keys.API_KEYS_MAX).
        self.by_key: dict[str, int] = {}
        self.slow_disconnects = 0
        self.events_sent = 0
        # How old the newest event of the last page written was (any stream): how far
        # behind the log the consumers were served, not how far they have read.
        self.lag_s = 0.0
        # Set at shutdown: streams end at once instead of holding the server's drain.
        self.closing = asyncio.Event()

    def opened(self, key_name: str | None) -> None:
        self.open += 1
        if key_name is not None:
            self.by_key[key_name] = self.by_key.get(key_name, 0) + 1

    def closed(self, key_name: str | None) -> None:
        self.open -= 1
        if key_name is not None:
            left = self.by_key[key_name] - 1
            if left:
                self.by_key[key_name] = left
            else:
                del self.by_key[key_name]


FEED_KEY: Final = web.AppKey("walletd_feed", FeedStreams)


class FeedStreamsCollector(Collector):
    """/metrics figures of the streams, read at scrape time."""

    def __init__(self, streams: FeedStreams, streams_max: int) -> None:
        self._streams = streams
        self._streams_max = streams_max

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "walletd_feed_streams_open", "Open /api/v1/events/stream connections",
            value=self._streams.open,
        )  # fmt: skip
        yield GaugeMetricFamily(
            "walletd_feed_streams_max", "Stream bound; past it 503 OVERLOADED",
            value=self._streams_max,
        )  # fmt: skip
        yield CounterMetricFamily(
            "walletd_feed_slow_consumers_disconnected",
            "Streams dropped because their consumer stopped reading",
            value=self._streams.slow_disconnects,
        )
        yield CounterMetricFamily(
            "walletd_feed_events_sent", "Events written to /api/v1/events/stream connections",
            value=self._streams.events_sent,
        )  # fmt: skip
        yield GaugeMetricFamily(
            "walletd_feed_lag_seconds",
            "Age of the newest event of the last page a stream was sent (0 before any)",
            value=self._streams.lag_s,
        )


def event_json(event: FeedEvent) -> dict[str, Any]:
    body: dict[str, Any] = {
        "position": str(event.position),
        "type": event.type,
        "created_at": format_timestamp(event.created_at_us),
    }
    data = event.data
    # Money fields are in the minor units of the wallet's currency; the exponent is how to
    # read them, not a field of the event (the currency is). 2 for events of before.
    exponent = data.get("exponent")
    if type(exponent) is not int:
        exponent = 2
    for name, value in data.items():
        if name == "exponent":
            continue
        if name in FeedEvent.MONEY_FIELDS and isinstance(value, int):
            body[name] = format_minor(value, exponent)
        else:
            body[name] = value
    return body


def _parse_position(field: str, text: str) -> FeedPosition:
    position = FeedPosition.parse(text)
    if position is None:
        raise ValidationProblem([{"field": field, "message": "is not a feed position"}])
    return position


def _parse_events_limit(text: str | None, settings: HttpSettings) -> int:
    if text is None:
        return settings.events_limit_default
    maximum = settings.events_limit_max
    if (
        not (text.isascii() and text.isdigit() and len(text) <= _LIMIT_DIGITS_MAX)
        or not 1 <= int(text) <= maximum
    ):
        raise ValidationProblem(
            [{"field": "limit", "message": f"must be an integer from 1 to {maximum}"}]
        )
    return int(text)


@routes.get(PREFIX + "/events")
@requires(Scope.FEED)
async def list_events(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    limit = _parse_events_limit(request.query.get("limit"), state.settings)
    after_text = request.query.get("after")
    after = FeedPosition.START if after_text is None else _parse_position("after", after_text)
    events = await state.services.reader.events_after(after, limit)
    next_position = events[-1].position if events else after
    body = orjson.dumps(
        {"events": [event_json(e) for e in events], "next_position": str(next_position)}
    )
    return web.Response(body=body, headers=_JSON_HEADERS)


def _sse(event: FeedEvent) -> bytes:
    return (
        f"id: {event.position}\nevent: {event.type}\ndata: ".encode()
        + orjson.dumps(event_json(event))
        + b"\n\n"
    )


def _start_position(request: web.Request) -> FeedPosition:
    """Last-Event-ID wins over ``after``; both are checked, so a malformed one is a 422
    whichever is used."""
    after_text = request.query.get("after")
    after = FeedPosition.START if after_text is None else _parse_position("after", after_text)
    resumed = request.headers.get("Last-Event-ID")
    return after if resumed is None else _parse_position("Last-Event-ID", resumed)


@routes.get(PREFIX + "/events/stream")
@requires(Scope.FEED)
async def stream_events(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    settings = state.settings
    streams = request.app[FEED_KEY]
    position = _start_position(request)
    if streams.open >= settings.feed_streams_max:
        raise ProblemError(
            503,
            "OVERLOADED",
            f"{streams.open} feed streams are open, the most this server serves; retry "
            "later, or page through /api/v1/events",
            headers={"Retry-After": "5"},
        )
    key_name = request.get(KEY_NAME)
    if (
        key_name is not None
        and streams.by_key.get(key_name, 0) >= settings.feed_streams_per_key_max
    ):
        # One client cannot hold every slot: its own streams are bounded below the total.
        raise ProblemError(
            429,
            "TOO_MANY_STREAMS",
            f"key {key_name!r} has {settings.feed_streams_per_key_max} feed streams open, the "
            "most one key may; close one, or page through /api/v1/events",
            headers={"Retry-After": "5"},
        )
    streams.opened(key_name)
    try:
        return await _stream(request, state.services.reader, position, settings, streams)
    finally:
        streams.closed(key_name)


def _bound_send_buffer(request: web.Request, buffer_bytes: int) -> None:
    """Writes block (and the slow-consumer clock runs) once ``buffer_bytes`` are queued."""
    transport = request.transport
    if transport is None:
        return
    transport.set_write_buffer_limits(high=buffer_bytes)
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer_bytes)


async def _stream(
    request: web.Request,
    reader: LogReader,
    position: FeedPosition,
    settings: HttpSettings,
    streams: FeedStreams,
) -> web.StreamResponse:
    page = settings.events_limit_max
    events = await reader.events_after(position, page)  # an outage is a 503 here
    response = web.StreamResponse(headers=_STREAM_HEADERS)
    # Sent before the edge middleware sees the response, so the id is added here.
    request_id = request.get(REQUEST_ID_KEY)
    if request_id is not None:
        response.headers[REQUEST_ID_HEADER] = request_id
    _bound_send_buffer(request, settings.feed_stream_buffer_bytes)
    await response.prepare(request)
    written_at = time.monotonic()
    while not streams.closing.is_set():
        if events:
            data = b"".join(_sse(event) for event in events)
            if not await _write(request, response, data, settings, streams, position):
                return response
            position = events[-1].position
            written_at = time.monotonic()
            streams.events_sent += len(events)
            streams.lag_s = max(0.0, time.time() - events[-1].created_at_us / 1_000_000)
        elif time.monotonic() - written_at >= settings.feed_heartbeat_s:
            if not await _write(request, response, _HEARTBEAT, settings, streams, position):
                return response
            written_at = time.monotonic()
        if len(events) < page:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(streams.closing.wait(), settings.feed_poll_interval_s)
            if streams.closing.is_set():
                break
        transport = request.transport
        if transport is None or transport.is_closing():
            return response  # the consumer left: free its slot now, not at the next write
        try:
            events = await reader.events_after(position, page)
        except StorageError as error:
            # The client resumes from its Last-Event-ID once storage is back.
            _log.warning("feed stream ends at %s: %r", position, error)
            break
    with contextlib.suppress(ConnectionError):
        await response.write_eof()
    return response


async def _write(
    request: web.Request,
    response: web.StreamResponse,
    data: bytes,
    settings: HttpSettings,
    streams: FeedStreams,
    position: FeedPosition,
) -> bool:
    """Write, or give up on a consumer that is gone or too slow; False when given up."""
    try:
        await asyncio.wait_for(response.write(data), settings.feed_write_timeout_s)
    except TimeoutError:
        streams.slow_disconnects += 1
        _log.warning(
            "feed consumer too slow (blocked %.1f s): disconnected after position %s",
            settings.feed_write_timeout_s,
            position,
        )
        if request.transport is not None:
            request.transport.abort()
        return False
    except ConnectionError:
        return False
    return True
