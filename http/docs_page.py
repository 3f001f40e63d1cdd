"""GET routes for the OpenAPI document and the Swagger UI page, served with no CDN.

Swagger UI's files come from the PyPI package `swagger-ui-py` (module `swagger_ui`), which
ships Swagger UI 5: the first major version that renders OpenAPI 3.1. (`swagger-ui-bundle`
1.1.0 ships 4.15.5, which refuses a 3.1 document with "Unable to render this definition".)
Only the few files the page needs are served, read into memory once at startup, so the
routes answer 200 or 404 and nothing else (no ranges, no 304s to document).

The page's Content-Security-Policy allows loads from this origin only, so the browser
itself guarantees that nothing is fetched from the network.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Final

from aiohttp import web

from walletd.http.openapi import (
    DOCS_ASSETS,
    DOCS_PATH,
    DOCS_STATIC_PREFIX,
    OPENAPI_PATH,
    openapi_json_bytes,
)

__all__ = ["DOCS_CSP", "DOCS_HTML", "add_docs_routes", "swagger_ui_static_dir"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

SWAGGER_UI_MODULE: Final = "swagger_ui"
INITIALIZER_ASSET: Final = "walletd-docs.js"

# 'unsafe-inline' styles: Swagger UI's React components inject <style> elements.
# data: images: swagger-ui.css embeds its icons as data URIs.
DOCS_CSP: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; font-src 'self' data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

# Relative URLs, resolved against /api/docs, so the page also works behind a path prefix.
DOCS_HTML: Final = """\
<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>walletd API</title>
  <link rel="stylesheet" href="docs/static/swagger-ui.css">
  <link rel="icon" type="image/png" href="docs/static/favicon-32x32.png" sizes="32x32">
  <link rel="icon" type="image/png" href="docs/static/favicon-16x16.png" sizes="16x16">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="docs/static/swagger-ui-bundle.js"></script>
  <script src="docs/static/walletd-docs.js"></script>
</body>
</html>
"""

# A file, not an inline script, so that the CSP can forbid inline scripts. validatorUrl
# null: Swagger UI would otherwise load a badge from validator.swagger.io. BaseLayout: the
# standalone top bar would let a visitor point the page at any URL.
INITIALIZER_JS: Final = """\
window.ui = SwaggerUIBundle({
  url: "openapi.json",
  dom_id: "#swagger-ui",
  layout: "BaseLayout",
  deepLinking: true,
  validatorUrl: null,
  presets: [SwaggerUIBundle.presets.apis],
});
"""


def swagger_ui_static_dir() -> Path:
    """Folder of Swagger UI's files, found without importing `swagger_ui` (it pulls jinja2)."""
    spec = importlib.util.find_spec(SWAGGER_UI_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("package swagger-ui-py (module swagger_ui) is not installed")
    return Path(spec.submodule_search_locations[0]) / "static"


def _load_assets(static_dir: Path) -> dict[str, bytes]:
    assets = {
        name: (static_dir / name).read_bytes() for name in DOCS_ASSETS if name != INITIALIZER_ASSET
    }
    assets[INITIALIZER_ASSET] = INITIALIZER_JS.encode()
    return assets


def _charset_of(media_type: str) -> str | None:
    return "utf-8" if media_type.startswith("text/") else None


async def _openapi_json(request: web.Request) -> web.Response:
    return web.Response(body=openapi_json_bytes(), content_type="application/json")


async def _docs_page(request: web.Request) -> web.Response:
    return web.Response(
        text=DOCS_HTML,
        content_type="text/html",
        headers={"Content-Security-Policy": DOCS_CSP, "Cache-Control": "no-cache"},
    )


def _asset_handler(assets: Mapping[str, bytes]) -> Handler:
    async def asset(request: web.Request) -> web.Response:
        name = request.match_info["asset"]
        body = assets.get(name)
        if body is None:
            # The app's error middleware renders this as problem JSON NOT_FOUND.
            raise web.HTTPNotFound()
        media_type = DOCS_ASSETS[name]
        return web.Response(
            body=body,
            content_type=media_type,
            charset=_charset_of(media_type),
            headers={"Cache-Control": "public, max-age=3600", "X-Content-Type-Options": "nosniff"},
        )

    return asset


def add_docs_routes(app: web.Application, static_dir: Path | None = None) -> None:
    """Register GET /api/openapi.json, GET /api/docs and GET /api/docs/static/{asset}.

    `static_dir` overrides where Swagger UI's files are read from (tests use it).
    """
    assets = _load_assets(static_dir or swagger_ui_static_dir())
    # GET only: HEAD would be one more method per route for schemathesis to reconcile.
    app.router.add_get(OPENAPI_PATH, _openapi_json, allow_head=False)
    app.router.add_get(DOCS_PATH, _docs_page, allow_head=False)
    app.router.add_get(DOCS_STATIC_PREFIX + "{asset}", _asset_handler(assets), allow_head=False)
