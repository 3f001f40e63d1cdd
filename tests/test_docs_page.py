"""The OpenAPI document, the routes that serve it, and the docs page in a real browser."""

from __future__ import annotations

import asyncio
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from html.parser import HTMLParser
from typing import Any, Final
from urllib.parse import urljoin, urlsplit

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from openapi_spec_validator import OpenAPIV31SpecValidator, validate
from pytest_aiohttp import AiohttpClient, AiohttpServer

from tests.openapi_validation import assert_response_matches, documented_response, schema_errors
from walletd.engine.bounds import (
    METADATA_KEY_LENGTH_MAX,
    METADATA_KEYS_MAX,
    METADATA_VALUE_LENGTH_MAX,
)
from walletd.engine.log_reads import FeedPosition
from walletd.http.bulk import KEY_INDEX_MAX
from walletd.http.docs_page import DOCS_CSP, add_docs_routes, swagger_ui_static_dir
from walletd.http.keys import KEY_NAME_PATTERN, Scope
from walletd.http.openapi import (
    DOCS_ASSETS,
    DOCS_PATH,
    OPENAPI_PATH,
    build_openapi_document,
    openapi_json_bytes,
)
from walletd.http.parsing import (
    IDEMPOTENCY_KEY_LENGTH_MAX,
    METADATA_KEY_PATTERN,
    REFERENCE_LENGTH_MAX,
    REFERENCE_PATTERN,
    WALLET_ID_PATTERN,
)
from walletd.http.routes_v1 import CURSOR_PATTERN

V1_OPERATIONS: Final = {
    ("post", "/api/v1/wallets"),
    ("get", "/api/v1/wallets/{wallet_id}"),
    ("patch", "/api/v1/wallets/{wallet_id}"),
    ("post", "/api/v1/wallets/{wallet_id}/operation"),
    ("get", "/api/v1/wallets/{wallet_id}/operations"),
    ("get", "/api/v1/events"),
    ("get", "/api/v1/events/stream"),
    ("post", "/api/v1/operations/bulk"),
    ("post", "/api/v1/transfers"),
    ("get", "/api/v1/transfers/{transfer_id}"),
    ("post", "/api/v1/transfers/{transfer_id}/refunds"),
    ("post", "/api/v1/wallets/{wallet_id}/operations/{seq}/reversal"),
    ("post", "/api/v1/payments"),
    ("get", "/api/v1/payments/{payment_id}"),
    ("post", "/api/v1/payments/{payment_id}/refunds"),
    ("post", "/api/v1/wallets/{wallet_id}/holds"),
    ("get", "/api/v1/holds/{hold_id}"),
    ("post", "/api/v1/holds/{hold_id}/capture"),
    ("post", "/api/v1/holds/{hold_id}/void"),
    ("get", "/api/v1/wallets"),
    ("get", "/api/v1/transfers"),
    ("get", "/api/v1/holds"),
    ("post", "/api/v1/webhooks"),
    ("get", "/api/v1/webhooks"),
    ("get", "/api/v1/webhooks/{webhook_id}"),
    ("patch", "/api/v1/webhooks/{webhook_id}"),
    ("delete", "/api/v1/webhooks/{webhook_id}"),
    ("get", "/api/v1/webhooks/{webhook_id}/deliveries"),
    ("post", "/api/v1/webhooks/{webhook_id}/deliveries/{delivery_id}/redeliver"),
}
OPEN_OPERATIONS: Final = {
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("get", "/metrics"),
    ("get", "/api/openapi.json"),
    ("get", "/api/docs"),
    ("get", "/api/docs/static/{asset}"),
}
HTTP_METHODS: Final = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
PROBLEM_JSON: Final = "application/problem+json"
CHROMIUM_TIMEOUT_S: Final = 90.0
CHROMIUM_VIRTUAL_TIME_MS: Final = 10_000


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    """The document under test, built once for the module."""
    return build_openapi_document()


def _operations(document: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method in HTTP_METHODS:
                yield method, path, operation


def _all_responses(
    document: dict[str, Any],
) -> Iterator[tuple[str, str, int, Mapping[str, Any]]]:
    for method, path, operation in _operations(document):
        for status in operation["responses"]:
            response, _ = documented_response(document, method, path, int(status))
            yield method, path, int(status), response


# ── (a) the document ─────────────────────────────────────────────────────────────────


def test_document_is_valid_openapi_31(document: dict[str, Any]) -> None:
    """openapi-spec-validator accepts the document as OpenAPI 3.1."""
    assert document["openapi"] == "3.1.0"
    validate(document, cls=OpenAPIV31SpecValidator)


def test_document_lists_every_route(document: dict[str, Any]) -> None:
    """Exactly the routes of docs/API.md's Routes table are documented, no more, no fewer."""
    documented = {(method, path) for method, path, _ in _operations(document)}
    assert documented == V1_OPERATIONS | OPEN_OPERATIONS


def test_only_v1_operations_take_optional_bearer_auth(document: dict[str, Any]) -> None:
    """Bearer auth is optional and stated once at the top level (so a generated client takes
    an unauthenticated client); /api/v1 inherits it, names its scope in `x-scope` and
    documents 401/403/429/503; the rest opts out."""
    assert document["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http",
        "scheme": "bearer",
        "description": document["components"]["securitySchemes"]["bearerAuth"]["description"],
    }
    assert document["security"] == [{}, {"bearerAuth": []}]
    for method, path, operation in _operations(document):
        if (method, path) in V1_OPERATIONS:
            assert "security" not in operation, path
            assert operation["x-scope"] in {scope.value for scope in Scope}, path
            assert {"401", "403", "429", "503"} <= set(operation["responses"]), path
        else:
            assert operation["security"] == [], path
            assert "x-scope" not in operation, path
            assert "401" not in operation["responses"], path


def test_every_error_refers_to_the_one_problem_schema(document: dict[str, Any]) -> None:
    """Each error response's schema is a plain $ref to Problem, with its codes beside it."""
    for method, path, status, response in _all_responses(document):
        if status >= 400:
            schema = response["content"][PROBLEM_JSON]["schema"]
            assert schema == {"$ref": "#/components/schemas/Problem"}, (method, path, status)
            assert response["x-problem-codes"], (method, path, status)


def test_docs_assets_are_the_documented_ones(document: dict[str, Any]) -> None:
    """The asset parameter's enum is exactly the files the docs route serves."""
    (parameter,) = document["paths"]["/api/docs/static/{asset}"]["get"]["parameters"]
    assert parameter["schema"]["enum"] == sorted(DOCS_ASSETS)


def test_document_states_the_parsers_rules(document: dict[str, Any]) -> None:
    """The patterns and bounds the document states are the ones the parsers apply."""
    schemas = document["components"]["schemas"]
    parameters = document["components"]["parameters"]
    assert schemas["WalletId"]["pattern"] == WALLET_ID_PATTERN
    # Hold and transfer ids in a path go through the wallet id's check (parsing.path_id).
    assert schemas["HoldId"]["pattern"] == WALLET_ID_PATTERN
    assert schemas["TransferId"]["pattern"] == WALLET_ID_PATTERN
    assert schemas["BulkItem"]["properties"]["key_index"]["maximum"] == KEY_INDEX_MAX
    assert schemas["Reference"]["pattern"] == REFERENCE_PATTERN
    assert schemas["KeyName"]["pattern"] == KEY_NAME_PATTERN
    assert schemas["Reference"]["maxLength"] == REFERENCE_LENGTH_MAX
    assert schemas["IdempotencyKey"]["maxLength"] == IDEMPOTENCY_KEY_LENGTH_MAX
    assert parameters["Cursor"]["schema"]["pattern"] == CURSOR_PATTERN
    metadata = schemas["Metadata"]
    assert metadata["maxProperties"] == METADATA_KEYS_MAX
    assert metadata["propertyNames"]["pattern"] == METADATA_KEY_PATTERN
    assert metadata["propertyNames"]["maxLength"] == METADATA_KEY_LENGTH_MAX
    assert metadata["additionalProperties"]["maxLength"] == METADATA_VALUE_LENGTH_MAX
    position = re.compile(schemas["FeedPosition"]["pattern"])
    assert position.fullmatch(str(FeedPosition(7342, 1081)))
    assert FeedPosition.parse("7342-1081") is not None


def test_posts_document_body_refusals(document: dict[str, Any]) -> None:
    """Every POST and PATCH documents 400, 413, 415 and 422, which its JSON body can cause."""
    for method, path, operation in _operations(document):
        if method in {"post", "patch"}:
            assert {"400", "413", "415", "422"} <= set(operation["responses"]), path
        else:
            assert not {"413", "415"} & set(operation["responses"]), path


def test_every_error_is_problem_json_and_every_response_has_request_id(
    document: dict[str, Any],
) -> None:
    """Each documented error is only problem+json; each response declares X-Request-Id."""
    responses = list(_all_responses(document))
    assert len(responses) > 30
    for method, path, status, response in responses:
        assert "X-Request-Id" in response["headers"], (method, path, status)
        if status >= 400:
            assert set(response["content"]) == {PROBLEM_JSON}, (method, path, status)


def test_unavailable_responses_require_retry_after(document: dict[str, Any]) -> None:
    """Every documented 503 carries a required Retry-After."""
    statuses = [(m, p, r) for m, p, status, r in _all_responses(document) if status == 503]
    # every /api/v1 operation, /readyz, and /healthz (draining after SIGTERM)
    assert len(statuses) == len(V1_OPERATIONS) + 2
    for method, path, response in statuses:
        assert "Retry-After" in response["headers"], (method, path)


def test_schema_examples_match_their_schemas(document: dict[str, Any]) -> None:
    """Every example in components.schemas validates against its own schema."""
    checked = 0
    for name, schema in document["components"]["schemas"].items():
        for example in schema.get("examples", []):
            errors = schema_errors(document, f"/components/schemas/{name}", example)
            assert not errors, (name, example, errors)
            checked += 1
    assert checked >= 8


@pytest.mark.parametrize(
    "amount",
    [25, 10.5, 0.01, 1_000_000_000_000, "10.50", "0.01", "0.1", "5", "1000000000000.00",
     "010.50", "10.500", "0000001", "05", "00.10", "1000000000000.000", "0.010",
     # The edge takes what some currency holds (BHD's 3 decimals, a token's 18, JPY's
     # 10^14); the wallet's currency decides the rest (tests/test_currencies_api.py).
     1.234, "1.234", "0.001", "0." + "0" * 17 + "1", "100000000000000", "99999999999999.5"],
)  # fmt: skip
def test_amount_accepts(document: dict[str, Any], amount: Any) -> None:
    """Positive numbers and decimal strings with at most 18 decimals up to 10^14 are valid;
    zeros in front, or after the last decimal, change nothing (as the server reads them)."""
    assert schema_errors(document, "/components/schemas/Amount", amount) == []


@pytest.mark.parametrize(
    "amount",
    [0, -1, 100_000_000_000_000.5, True, None, "", "0", "0.00", "1e3", "-5",
     "100000000000000.01", "1000000000000000", " 5", {"v": 1}, [1], "000", ".5", "5.",
     "+5", "0." + "0" * 18 + "1", "00100000000000000.01"],
)  # fmt: skip
def test_amount_rejects(document: dict[str, Any], amount: Any) -> None:
    """Zero, negatives, 19 decimals, exponents, past 10^14, non-numbers are invalid."""
    assert schema_errors(document, "/components/schemas/Amount", amount) != []


@pytest.mark.parametrize(
    ("key", "valid"),
    [("k", True), (" ~", True), ("x" * 255, True), ("", False), ("x" * 256, False),
     ("é", False), ("a\tb", False), ("a\x7f", False)],
)  # fmt: skip
def test_idempotency_key_schema(document: dict[str, Any], key: str, valid: bool) -> None:
    """Idempotency-Key is 1–255 printable ASCII characters (0x20–0x7E)."""
    errors = schema_errors(document, "/components/schemas/IdempotencyKey", key)
    assert (errors == []) is valid, errors


@pytest.mark.parametrize(("limit", "valid"), [(1, True), (500, True), (0, False), (501, False)])
def test_limit_bounds(document: dict[str, Any], limit: int, valid: bool) -> None:
    """The history page size is documented as 1..500."""
    errors = schema_errors(document, "/components/parameters/Limit/schema", limit)
    assert (errors == []) is valid, errors


def test_openapi_json_bytes_is_the_cached_document(document: dict[str, Any]) -> None:
    """The served bytes decode to the built document and are built once."""
    assert openapi_json_bytes() is openapi_json_bytes()
    assert orjson.loads(openapi_json_bytes()) == document


# ── (b) the routes, on a real loopback port ──────────────────────────────────────────


def _docs_app() -> web.Application:
    app = web.Application()
    add_docs_routes(app)
    return app


@pytest.fixture
async def docs_client(aiohttp_client: AiohttpClient) -> TestClient[web.Request, web.Application]:
    """A client of an app that has only the docs routes."""
    return await aiohttp_client(_docs_app())


class _AssetUrls(HTMLParser):
    """Collects the URLs of everything a page loads (src and href attributes)."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [value for name, value in attrs if name in {"src", "href"} and value]


async def test_openapi_json_is_served(
    docs_client: TestClient[web.Request, web.Application], document: dict[str, Any]
) -> None:
    """GET /api/openapi.json answers the document as application/json, as documented."""
    response = await docs_client.get(OPENAPI_PATH)
    assert response.status == 200
    assert response.content_type == "application/json"
    body = orjson.loads(await response.read())
    assert body == document
    assert_response_matches(
        document, "GET", OPENAPI_PATH, 200, response.headers["Content-Type"], body
    )


async def test_docs_page_loads_only_local_assets(
    docs_client: TestClient[web.Request, web.Application], document: dict[str, Any]
) -> None:
    """The page references no http(s) URL, forbids other origins by CSP, and its assets load."""
    response = await docs_client.get(DOCS_PATH)
    assert response.status == 200
    assert response.content_type == "text/html"
    assert response.headers["Content-Security-Policy"] == DOCS_CSP
    html = await response.text()
    assert "http://" not in html
    assert "https://" not in html
    assert_response_matches(document, "GET", DOCS_PATH, 200, response.content_type, html)

    parser = _AssetUrls()
    parser.feed(html)
    assert len(parser.urls) == 5
    page_url = str(response.url)
    for url in parser.urls:
        absolute = urljoin(page_url, url)
        assert urlsplit(absolute).netloc == urlsplit(page_url).netloc, url
        asset = await docs_client.get(urlsplit(absolute).path)
        assert asset.status == 200, url
        assert asset.content_type == DOCS_ASSETS[url.rsplit("/", 1)[1]], url


async def test_initializer_points_at_local_document(
    docs_client: TestClient[web.Request, web.Application],
) -> None:
    """The boot script loads ./openapi.json, and no validator badge from the network."""
    response = await docs_client.get("/api/docs/static/walletd-docs.js")
    assert response.status == 200
    script = await response.text()
    assert 'url: "openapi.json"' in script
    assert "validatorUrl: null" in script
    assert "http" not in script


async def test_static_asset_is_the_packaged_file(
    docs_client: TestClient[web.Request, web.Application], document: dict[str, Any]
) -> None:
    """swagger-ui-bundle.js is served byte for byte from the installed package."""
    response = await docs_client.get("/api/docs/static/swagger-ui-bundle.js")
    assert response.status == 200
    assert response.content_type == "text/javascript"
    body = await response.read()
    assert body == (swagger_ui_static_dir() / "swagger-ui-bundle.js").read_bytes()
    assert len(body) > 100_000
    assert_response_matches(
        document,
        "GET",
        "/api/docs/static/{asset}",
        200,
        response.content_type,
        body.decode(),
    )


@pytest.mark.parametrize(
    "path",
    [
        "/api/docs/static/index.html",
        "/api/docs/static/swagger-editor-bundle.js",
        "/api/docs/static/..%2F__init__.py",
        "/api/docs/static/",
    ],
)
async def test_unlisted_files_are_not_served(
    docs_client: TestClient[web.Request, web.Application], path: str
) -> None:
    """Files of the package that the page does not use, and path tricks, are 404."""
    response = await docs_client.get(path)
    assert response.status == 404


@pytest.mark.parametrize("method", ["HEAD", "POST", "PUT", "DELETE"])
async def test_docs_routes_are_get_only(
    docs_client: TestClient[web.Request, web.Application], method: str
) -> None:
    """Every docs route refuses any method but GET with 405."""
    for path in (OPENAPI_PATH, DOCS_PATH, "/api/docs/static/swagger-ui.css"):
        response = await docs_client.request(method, path)
        assert response.status == 405, (method, path)


# ── (c) the page in headless Chromium ────────────────────────────────────────────────


class _RenderedOperations(HTMLParser):
    """Collects the path of each operation block that Swagger UI rendered."""

    def __init__(self) -> None:
        super().__init__()
        self.paths: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        classes = (attributes.get("class") or "").split()
        if "opblock-summary-path" in classes and attributes.get("data-path"):
            self.paths.append(str(attributes["data-path"]))


def _chromium() -> str:
    """Chromium's path; missing, the test fails (a skip is not a pass): `make test` runs
    `.ci/install-chromium` first."""
    chromium = shutil.which("chromium")
    if chromium is not None:
        return chromium
    pytest.fail("chromium is not installed; install it with: .ci/install-chromium")


async def _dump_dom(chromium: str, url: str) -> str:
    with tempfile.TemporaryDirectory(prefix="walletd-chromium-") as profile:
        process = await asyncio.create_subprocess_exec(
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            # Any host but loopback fails to resolve, so the page cannot lean on the network.
            "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
            f"--user-data-dir={profile}",
            f"--virtual-time-budget={CHROMIUM_VIRTUAL_TIME_MS}",
            "--dump-dom",
            url,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            stdout, stderr = await asyncio.wait_for(process.communicate(), CHROMIUM_TIMEOUT_S)
        except TimeoutError:
            process.kill()
            await process.communicate()
            raise
    assert process.returncode == 0, stderr.decode(errors="replace")[-2000:]
    return stdout.decode()


@pytest.mark.slow
async def test_docs_page_renders_every_operation_in_chromium(
    aiohttp_server: AiohttpServer, document: dict[str, Any]
) -> None:
    """Headless Chromium, offline, renders one Swagger UI operation block per operation."""
    chromium = _chromium()
    server = await aiohttp_server(_docs_app(), host="127.0.0.1")
    dom = await _dump_dom(chromium, str(server.make_url(DOCS_PATH)))

    assert "Unable to render this definition" not in dom
    rendered = _RenderedOperations()
    rendered.feed(dom)
    expected = [path for _, path, _ in _operations(document)]
    assert sorted(rendered.paths) == sorted(expected), dom[-3000:]
    assert "/api/v1/wallets/{wallet_id}/operation" in rendered.paths
