"""The OpenAPI 3.1 document of walletd's HTTP API: http/openapi.yaml, read as data.

The document is one reviewed file, shipped in the package, that every reader takes whole:

    http/openapi.yaml ──load_document()──> dict ──> openapi_json_bytes() (orjson, cached)
                                             │                │
          tests/openapi_validation.py, ◀─────┘                └──> GET /api/openapi.json
          schemathesis, openapi-python-client                      and /api/docs (docs_page.py)

Tests hold the server to the document, never the other way round: it lists every status a
route can answer, and every request it accepts (tests/test_schemathesis.py sends both sides).

How the file is written (read this before editing it):

* Every error is a plain `$ref` to the one problem schema (`#/components/schemas/Problem`);
  the codes a response can carry are listed beside it in `x-problem-codes`, which
  tests/openapi_validation.py checks (the code is in the list, the status is the response's).
  A generator then types every error as one model instead of dropping it.
* The section `x-shared` holds YAML anchors only, and is removed on load:
  `<<: *v1-errors` merges the refusals every /api/v1 route shares into a route's responses,
  `<<: *body-errors` those of every route with a JSON body, `<<: *problem` the headers and
  content of a problem response. Declaring a new error on every route is one line under
  `v1-errors` (and its `components.responses` entry).
* Bearer auth is declared once, at the top level, as optional (`[{}, {bearerAuth: []}]`);
  routes outside /api/v1 opt out with `security: []`. Why: see the comment in the file.
* Each /api/v1 operation names the scope its key needs in `x-scope` (read, create, move,
  feed); tests/test_scopes.py holds it to the handler's @requires (http/keys.py).
* `info.version` is filled in from the installed package on load; nothing else is computed.

Unknown routes (404 NOT_FOUND) and wrong methods (405 METHOD_NOT_ALLOWED) cannot be
attached to an operation, so they are documented as reusable responses in `components`.
"""

from __future__ import annotations

import copy
import functools
import importlib.metadata
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import orjson
import yaml

__all__ = [
    "DOCS_ASSETS",
    "DOCS_PATH",
    "DOCS_STATIC_PREFIX",
    "OPENAPI_PATH",
    "build_openapi_document",
    "openapi_json_bytes",
]

OPENAPI_PATH: Final = "/api/openapi.json"
DOCS_PATH: Final = "/api/docs"
DOCS_STATIC_PREFIX: Final = "/api/docs/static/"
DOCUMENT_FILE: Final = "openapi.yaml"
SHARED_SECTION: Final = "x-shared"

# The files the docs page serves under DOCS_STATIC_PREFIX, with their media types. The
# document enumerates them (the `asset` parameter); tests/test_docs_page.py checks both agree.
DOCS_ASSETS: Final[Mapping[str, str]] = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "favicon-32x32.png": "image/png",
    "favicon-16x16.png": "image/png",
    "walletd-docs.js": "text/javascript",
}


def _api_version() -> str:
    try:
        return importlib.metadata.version("walletd")
    except importlib.metadata.PackageNotFoundError:
        # Running from a source tree that was never installed.
        return "0.0.0"


@functools.cache
def _document() -> dict[str, Any]:
    # Beside this module, in a wheel as in a checkout (package data in pyproject.toml).
    text = Path(__file__).with_name(DOCUMENT_FILE).read_text("utf-8")
    # The C loader when PyYAML has it (10x faster); both resolve `<<` merge keys.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    document: dict[str, Any] = yaml.load(text, Loader=loader)  # a safe loader: data only
    del document[SHARED_SECTION]
    document["info"]["version"] = _api_version()
    # A round trip through JSON: merged mappings become plain, unshared objects, and
    # anything JSON cannot hold (a YAML date, a non-string key) fails here, not in a client.
    parsed: dict[str, Any] = orjson.loads(orjson.dumps(document))
    return parsed


def build_openapi_document() -> dict[str, Any]:
    """A new copy of the OpenAPI 3.1.0 document (callers may change it)."""
    return copy.deepcopy(_document())


@functools.cache
def openapi_json_bytes() -> bytes:
    """The document as JSON, built once per process: it only changes with the code."""
    return orjson.dumps(_document(), option=orjson.OPT_INDENT_2)
