"""Check a real HTTP response against walletd's OpenAPI document.

Tests call `assert_response_matches` with what the server sent; it fails when the status or
the media type is not documented for the route, when the body breaks the documented schema
(JSON Schema 2020-12, formats checked), when a required documented header is missing, or,
for a problem, when its `code` is not in the response's `x-problem-codes` or its `status`
is not the response's (every error refers to one problem schema; these two say the rest).

The schema is not copied out of the document: it is validated through a `$ref` into the
document itself, registered under DOCUMENT_URI, so every `#/components/...` reference
inside it resolves exactly as an OpenAPI tool would resolve it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final
from urllib.parse import quote

from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

__all__ = ["assert_response_matches", "documented_response", "schema_errors"]

DOCUMENT_URI: Final = "urn:walletd:openapi"
PROBLEM_CODES_KEY: Final = "x-problem-codes"
REF_HOPS_MAX: Final = 16  # a $ref chain longer than this is a cycle in the document


def _escape(segment: str) -> str:
    """One JSON Pointer segment (RFC 6901), percent-encoded for use in a URI fragment."""
    return quote(segment.replace("~", "~0").replace("/", "~1"), safe="~")


def _lookup(document: Mapping[str, Any], pointer: str) -> Any:
    node: Any = document
    for segment in pointer.split("/")[1:]:
        node = node[segment.replace("~1", "/").replace("~0", "~")]
    return node


def _follow_refs(document: Mapping[str, Any], node: Any, pointer: str) -> tuple[Any, str]:
    """Follow local `$ref`s from `node`; return the target and its raw JSON Pointer."""
    for _ in range(REF_HOPS_MAX):
        if not (isinstance(node, Mapping) and "$ref" in node):
            return node, pointer
        ref = node["$ref"]
        assert ref.startswith("#/"), f"only local references are supported, got {ref!r}"
        pointer = ref[1:]
        node = _lookup(document, pointer)
    raise AssertionError(f"$ref chain longer than {REF_HOPS_MAX} at {pointer}")


def _media_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


def documented_response(
    document: Mapping[str, Any], method: str, path_template: str, status: int
) -> tuple[Mapping[str, Any], str]:
    """The response object documented for this route and status, with its JSON Pointer."""
    operation = document["paths"].get(path_template, {}).get(method.lower())
    assert operation is not None, f"{method.upper()} {path_template} is not documented"
    responses = operation["responses"]
    base = f"/paths/{_escape(path_template)}/{method.lower()}/responses"
    for key in (str(status), f"{status // 100}XX", "default"):
        if key in responses:
            response, pointer = _follow_refs(document, responses[key], f"{base}/{key}")
            return response, pointer
    raise AssertionError(
        f"{method.upper()} {path_template}: status {status} is not documented "
        f"(documented: {sorted(responses)})"
    )


def schema_errors(document: Mapping[str, Any], schema_pointer: str, instance: Any) -> list[str]:
    """Messages of every way `instance` breaks the schema at `schema_pointer` in `document`."""
    registry: Registry[Any] = Registry().with_resource(
        DOCUMENT_URI, Resource.from_contents(document, default_specification=DRAFT202012)
    )
    validator = Draft202012Validator(
        {"$ref": f"{DOCUMENT_URI}#{schema_pointer}"},
        registry=registry,
        format_checker=Draft202012Validator.FORMAT_CHECKER,
    )
    return [
        f"at {error.json_path}: {error.message}"
        for error in sorted(validator.iter_errors(instance), key=lambda e: list(e.path))
    ]


def _header_instance(schema: Mapping[str, Any], value: str) -> Any:
    """A header value is text on the wire; integer headers are compared as integers."""
    if schema.get("type") != "integer":
        return value
    try:
        return int(value)
    except ValueError:
        return value  # left a string, so the schema reports it as not an integer


def _check_headers(
    document: Mapping[str, Any],
    response: Mapping[str, Any],
    pointer: str,
    headers: Mapping[str, str],
) -> None:
    sent = {name.lower(): value for name, value in headers.items()}
    for name, header in response.get("headers", {}).items():
        header, header_pointer = _follow_refs(
            document, header, f"{pointer}/headers/{_escape(name)}"
        )
        value = sent.get(name.lower())
        if value is None:
            assert not header.get("required", False), f"required header {name} is missing"
            continue
        schema, schema_pointer = _follow_refs(
            document, header["schema"], f"{header_pointer}/schema"
        )
        errors = schema_errors(document, schema_pointer, _header_instance(schema, value))
        assert not errors, f"header {name}: {value!r} does not match: {errors}"


def assert_response_matches(
    document: Mapping[str, Any],
    method: str,
    path_template: str,
    status: int,
    content_type: str,
    body_json: Any,
    *,
    headers: Mapping[str, str] | None = None,
) -> None:
    """Fail unless the response is documented and its body matches the documented schema.

    `body_json` is the decoded JSON body (or the text, for text media types). When
    `headers` is given, every required documented header must be present and valid.
    """
    response, pointer = documented_response(document, method, path_template, status)
    content = response.get("content", {})
    by_media_type = {_media_type(key): key for key in content}
    key = by_media_type.get(_media_type(content_type))
    route = f"{method.upper()} {path_template} {status}"
    assert key is not None, (
        f"{route}: content type {content_type!r} is not documented (documented: {sorted(content)})"
    )
    schema_pointer = f"{pointer}/content/{_escape(key)}/schema"
    errors = schema_errors(document, schema_pointer, body_json)
    assert not errors, f"{route}: body does not match the document:\n" + "\n".join(errors)
    codes = response.get(PROBLEM_CODES_KEY)
    if codes is not None:
        assert body_json.get("status") == status, f"{route}: problem status {body_json!r}"
        assert body_json.get("code") in codes, (
            f"{route}: code {body_json.get('code')!r} is not in {PROBLEM_CODES_KEY} {codes}"
        )
    if headers is not None:
        _check_headers(document, response, pointer, headers)
