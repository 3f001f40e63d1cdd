"""The edge around the handlers: body limits on the wire, request ids, metrics, access log."""

from __future__ import annotations

import asyncio
import io
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any, Final

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import AppFactory
from walletd.http.access_log import access_log_options
from walletd.http.edge import REQUEST_ID_LENGTH_MAX
from walletd.http.server_log import SERVER_LOGGER_NAME, quiet_malformed_requests
from walletd.http.settings import HttpSettings

Client = TestClient[web.Request, web.Application]
AiohttpClient = Callable[..., Any]

READ_TIMEOUT_S: Final = 10.0
OPERATION_BODY: Final = b'{"operation_type": "DEPOSIT", "amount": "1.00"}'


async def _wallet(client: Client) -> str:
    response = await client.post("/api/v1/wallets")
    assert response.status == 201
    wallet_id: str = (await response.json())["id"]
    return wallet_id


async def _balance(client: Client, wallet_id: str) -> str:
    balance: str = (await (await client.get(f"/api/v1/wallets/{wallet_id}")).json())["balance"]
    return balance


class RawResponse:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body


async def _read_response(reader: asyncio.StreamReader) -> RawResponse:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT_S)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    body = await asyncio.wait_for(
        reader.readexactly(int(headers["content-length"])), READ_TIMEOUT_S
    )
    return RawResponse(status, headers, body)


async def _send_raw(client: Client, head: str, chunks: list[bytes]) -> RawResponse:
    """Send a request head and some body bytes, then read the answer without finishing."""
    server = client.server
    assert isinstance(server, TestServer)
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        writer.write(head.encode("latin-1"))
        for chunk in chunks:
            writer.write(chunk)
        await writer.drain()
        return await _read_response(reader)
    finally:
        writer.close()


def _head(path: str, **headers: str) -> str:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json"]
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    return "\r\n".join(lines) + "\r\n\r\n"


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


async def test_oversize_content_length_is_refused_before_the_body_is_read(
    module_client: Client,
) -> None:
    """A Content-Length past the limit is 413 at once, with only 100 of 10 MB bytes sent."""
    wallet_id = await _wallet(module_client)
    path = f"/api/v1/wallets/{wallet_id}/operation"
    response = await _send_raw(module_client, _head(path, Content_Length="10000000"), [b" " * 100])
    assert response.status == 413
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["connection"] == "close"
    assert orjson.loads(response.body)["code"] == "PAYLOAD_TOO_LARGE"
    assert await _balance(module_client, wallet_id) == "0.00"


async def test_oversize_chunked_body_is_refused_while_it_streams(module_client: Client) -> None:
    """A chunked body is cut off with 413 once it passes the limit; its end is never sent."""
    wallet_id = await _wallet(module_client)
    path = f"/api/v1/wallets/{wallet_id}/operation"
    chunks = [_chunk(b" " * 16384) for _ in range(5)]  # 80 KiB, and no terminating chunk
    response = await _send_raw(module_client, _head(path, Transfer_Encoding="chunked"), chunks)
    assert response.status == 413
    assert orjson.loads(response.body)["code"] == "PAYLOAD_TOO_LARGE"
    assert await _balance(module_client, wallet_id) == "0.00"


async def test_chunked_body_at_the_limit_is_accepted(module_client: Client) -> None:
    """A chunked body of exactly the limit (64 KiB) is read and applied."""
    wallet_id = await _wallet(module_client)
    path = f"/api/v1/wallets/{wallet_id}/operation"
    body = OPERATION_BODY + b" " * (64 * 1024 - len(OPERATION_BODY))
    chunks = [_chunk(body[i : i + 10000]) for i in range(0, len(body), 10000)] + [b"0\r\n\r\n"]
    response = await _send_raw(module_client, _head(path, Transfer_Encoding="chunked"), chunks)
    assert response.status == 200, response.body
    assert orjson.loads(response.body)["balance"] == "1.00"


async def test_body_limit_is_configurable(
    make_app: AppFactory, aiohttp_client: AiohttpClient
) -> None:
    """With body_bytes_max=2048, 2048 bytes are accepted and 2049 refused, chunked or not."""
    client: Client = await aiohttp_client(make_app(HttpSettings(body_bytes_max=2048)))
    wallet_id = await _wallet(client)
    path = f"/api/v1/wallets/{wallet_id}/operation"
    at_limit = OPERATION_BODY + b" " * (2048 - len(OPERATION_BODY))
    response = await client.post(path, data=at_limit, headers={"Content-Type": "application/json"})
    assert response.status == 200
    for body in (at_limit + b" ",):
        refused = await client.post(path, data=body, headers={"Content-Type": "application/json"})
        assert refused.status == 413
        streamed = await _send_raw(
            client, _head(path, Transfer_Encoding="chunked"), [_chunk(body), b"0\r\n\r\n"]
        )
        assert streamed.status == 413
    assert await _balance(client, wallet_id) == "1.00"


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_a_trickling_body_gets_408_at_the_read_timeout(
    make_app: AppFactory, aiohttp_client: AiohttpClient, framing: str
) -> None:
    """A client that sends its headers and then one body byte every 0.2 s (the whole body
    would take ~10 s) gets 408 REQUEST_TIMEOUT as problem+json about 0.5 s in, with
    Connection: close, and nothing is applied. (aiohttp then discards what still comes for at
    most its lingering time, so that the client can read the answer, and closes.)"""
    timeout_s = 0.5
    client: Client = await aiohttp_client(make_app(HttpSettings(body_read_timeout_s=timeout_s)))
    wallet_id = await _wallet(client)
    path = f"/api/v1/wallets/{wallet_id}/operation"
    body = OPERATION_BODY
    server = client.server
    assert isinstance(server, TestServer)
    reader, writer = await asyncio.open_connection(server.host, server.port)

    async def trickle() -> None:
        for index in range(len(body)):
            piece = body[index : index + 1]
            writer.write(_chunk(piece) if framing == "chunked" else piece)
            await writer.drain()
            await asyncio.sleep(0.2)  # the client's pace, not a wait for the server

    if framing == "chunked":
        writer.write(_head(path, Transfer_Encoding="chunked").encode("latin-1"))
    else:
        writer.write(_head(path, Content_Length=str(len(body))).encode("latin-1"))
    started = time.monotonic()
    sender = asyncio.create_task(trickle())
    try:
        response = await _read_response(reader)
        elapsed_s = time.monotonic() - started
        assert not sender.done(), "the answer must come before the body is complete"
    finally:
        sender.cancel()
        writer.close()
    assert response.status == 408, response.body
    assert response.headers["content-type"] == "application/problem+json"
    assert orjson.loads(response.body)["code"] == "REQUEST_TIMEOUT"
    assert response.headers["connection"] == "close"
    assert timeout_s <= elapsed_s < timeout_s + 3.0
    assert await _balance(client, wallet_id) == "0.00"


def test_body_read_timeout_must_be_positive() -> None:
    """A zero or negative read timeout is a configuration error, not 'no timeout'."""
    for value in (0.0, -1.0):
        with pytest.raises(ValueError, match="body_read_timeout_s"):
            HttpSettings(body_read_timeout_s=value)


async def test_request_id_is_echoed_or_generated(module_client: Client) -> None:
    """X-Request-Id is echoed when sane, otherwise generated unique, on success and error."""
    response = await module_client.get("/healthz", headers={"X-Request-Id": "trace-42"})
    assert response.headers["X-Request-Id"] == "trace-42"
    response = await module_client.get("/nothing", headers={"X-Request-Id": "trace-43"})
    assert (response.status, response.headers["X-Request-Id"]) == (404, "trace-43")
    generated = set()
    for _ in range(5):
        response = await module_client.get("/healthz")
        generated.add(response.headers["X-Request-Id"])
    assert len(generated) == 5
    too_long = "x" * (REQUEST_ID_LENGTH_MAX + 1)
    response = await module_client.get("/healthz", headers={"X-Request-Id": too_long})
    assert response.headers["X-Request-Id"] not in (too_long, "")
    response = await module_client.get("/healthz", headers={"X-Request-Id": "tab\there"})
    assert response.headers["X-Request-Id"] != "tab\there"


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


async def test_metrics_count_requests_by_route_and_report_the_engine(client: Client) -> None:
    """/metrics (Prometheus text) counts requests by canonical route and status, and shows
    batch sizes, commit latency, mailbox depth per pipeline and resident wallets."""
    wallet_id = await _wallet(client)
    for _ in range(3):
        await client.post(
            f"/api/v1/wallets/{wallet_id}/operation",
            json={"operation_type": "DEPOSIT", "amount": 1},
        )
    await client.get(f"/api/v1/wallets/{uuid.uuid4()}")
    await client.get(f"/no/such/{uuid.uuid4()}")
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    samples = _samples(await response.text())

    def requests(route: str, method: str, status: str) -> float:
        labels = (("method", method), ("route", route), ("status", status))
        return samples.get(("walletd_http_requests_total", labels), 0.0)

    assert requests("/api/v1/wallets/{wallet_id}/operation", "POST", "200") == 3
    assert requests("/api/v1/wallets", "POST", "201") == 1
    assert requests("/api/v1/wallets/{wallet_id}", "GET", "404") == 1
    assert requests("unmatched", "GET", "404") == 1
    latency_count = samples[
        (
            "walletd_http_request_duration_seconds_count",
            (("method", "POST"), ("route", "/api/v1/wallets/{wallet_id}/operation")),
        )
    ]
    assert latency_count == 3
    # 3 deposits wrote 3 log rows; the creation and the reads are commands, not rows.
    assert samples[("walletd_batch_ops_sum", ())] == 3
    assert samples[("walletd_batch_commands_sum", ())] >= 4
    assert samples[("walletd_commit_seconds_count", ())] >= 1
    assert samples[("walletd_mailbox_depth", (("pipeline", "0"),))] == 0
    assert ("walletd_mailbox_depth", (("pipeline", "1"),)) in samples
    assert samples[("walletd_resident_wallets", ())] >= 1
    assert ("process_cpu_seconds_total", ()) in samples


async def test_metrics_count_503s_by_reason_and_rejected_commands(client: Client) -> None:
    """A stopped engine's refusals show as 503s by reason and as rejected commands."""
    wallet_id = await _wallet(client)
    from walletd.http.state import STATE_KEY

    await client.app[STATE_KEY].services.engine.stop()
    response = await client.post(
        f"/api/v1/wallets/{wallet_id}/operation", json={"operation_type": "DEPOSIT", "amount": 1}
    )
    assert response.status == 503
    samples = _samples(await (await client.get("/metrics")).text())
    assert samples[("walletd_http_unavailable_total", (("reason", "UNAVAILABLE"),))] == 1
    assert samples[("walletd_commands_rejected_total", (("reason", "STOPPING"),))] == 1


async def test_two_apps_have_separate_registries(client: Client, module_client: Client) -> None:
    """Each app counts its own requests: metrics are not process-global."""
    first, second = client, module_client
    before = _samples(await (await second.get("/metrics")).text())
    await first.get("/healthz")
    await first.get("/healthz")
    await second.get("/healthz")
    key = (
        "walletd_http_requests_total",
        (("method", "GET"), ("route", "/healthz"), ("status", "200")),
    )
    assert _samples(await (await first.get("/metrics")).text())[key] == 2
    after = _samples(await (await second.get("/metrics")).text())
    assert after[key] == before.get(key, 0) + 1


async def test_access_log_writes_json_lines_when_enabled(
    make_app: AppFactory, aiohttp_client: AiohttpClient
) -> None:
    """With the access log on, each request is one JSON line with its request id and route."""
    stream = io.StringIO()
    # TestServer ignores keyword arguments given to its constructor: pass them at start.
    server = TestServer(make_app())
    await server.start_server(**access_log_options(True, stream))
    client: Client = await aiohttp_client(server)
    await client.get("/healthz", headers={"X-Request-Id": "log-me"})
    await client.get(f"/api/v1/wallets/{uuid.uuid4()}")
    for _ in range(100):  # bounded: aiohttp logs after the response is written
        if stream.getvalue().count("\n") >= 2:
            break
        await asyncio.sleep(0.01)
    first, second = (orjson.loads(line) for line in stream.getvalue().splitlines())
    assert first["request_id"] == "log-me"
    assert (first["method"], first["path"], first["status"]) == ("GET", "/healthz", 200)
    assert second["route"] == "/api/v1/wallets/{wallet_id}"
    assert second["status"] == 404
    assert second["duration_ms"] >= 0


def test_access_log_is_off_by_default() -> None:
    """Default settings install no access logger at all (nothing to pay per request)."""
    assert HttpSettings().access_log is False
    assert access_log_options(False) == {"access_log": None}


async def test_a_malformed_request_gets_its_access_log_line_and_no_traceback(
    make_app: AppFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A request aiohttp refuses before routing (a bad request line, a header it cannot
    parse) is logged like any other, route "unmatched", status 400: the access logger
    itself never fails on it (it used to assert on the missing match info)."""
    stream = io.StringIO()
    server = TestServer(make_app())
    await server.start_server(**access_log_options(True, stream))
    try:
        for raw in (
            b"GET /api/v1/wallets/\x01 HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad\x7fName: 1\r\n\r\n",
        ):
            reader, writer = await asyncio.open_connection(server.host, server.port)
            writer.write(raw)
            status_line = await asyncio.wait_for(reader.readline(), READ_TIMEOUT_S)
            assert status_line.split(b" ")[1] == b"400"
            writer.close()
        for _ in range(100):  # bounded: aiohttp logs after the response is written
            if stream.getvalue().count("\n") >= 2:
                break
            await asyncio.sleep(0.01)
    finally:
        await server.close()
    lines = [orjson.loads(line) for line in stream.getvalue().splitlines()]
    assert [(line["status"], line["route"]) for line in lines] == [(400, "unmatched")] * 2
    assert not [r for r in caplog.records if r.getMessage() == "Unhandled exception"]


async def test_a_malformed_request_is_one_log_line_without_a_traceback(
    make_app: AppFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """aiohttp logs each request it refuses as malformed at ERROR with a traceback; with
    walletd's filter it is one INFO line naming the reason, so a client looping bad
    requests cannot flood the log a dozen lines at a time."""
    quiet_malformed_requests()
    server = TestServer(make_app())
    await server.start_server()
    try:
        reader, writer = await asyncio.open_connection(server.host, server.port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad\x7fName: 1\r\n\r\n")
        status_line = await asyncio.wait_for(reader.readline(), READ_TIMEOUT_S)
        writer.close()
        for _ in range(100):  # bounded: aiohttp logs around writing the answer
            if [r for r in caplog.records if r.name == SERVER_LOGGER_NAME]:
                break
            await asyncio.sleep(0.01)
    finally:
        await server.close()
    assert status_line.split(b" ")[1] == b"400"
    records = [r for r in caplog.records if r.name == SERVER_LOGGER_NAME]
    assert [(r.levelno, r.exc_info) for r in records] == [(logging.INFO, None)]
    assert "answered 400" in records[0].getMessage()
    assert "\n" not in records[0].getMessage()
