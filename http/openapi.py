"""The OpenAPI 3.1 document of walletd's HTTP API, built from Python data.

The document is the contract that schemathesis and the response-validation tests hold the
server to, so it lists every status a route can really answer and nothing more:

    build_openapi_document() ──> dict ──> openapi_json_bytes() (orjson, cached)
           │                                     │
           └── tests/openapi_validation.py       └── GET /api/openapi.json (docs_page.py)

Unknown routes (404 NOT_FOUND) and wrong methods (405 METHOD_NOT_ALLOWED) cannot be
attached to an operation, so they are documented as reusable responses in `components`.
"""

from __future__ import annotations

import functools
import importlib.metadata
from collections.abc import Mapping
from typing import Any, Final

import orjson

from walletd.http.bulk import KEY_INDEX_MAX, REQUEST_KEY_LENGTH_MAX
from walletd.http.parsing import REFERENCE_PATTERN, WALLET_ID_PATTERN
from walletd.http.routes_v1 import CURSOR_PATTERN

__all__ = [
    "DOCS_ASSETS",
    "DOCS_PATH",
    "DOCS_STATIC_PREFIX",
    "OPENAPI_PATH",
    "PROBLEM_CODES",
    "build_openapi_document",
    "openapi_json_bytes",
]

OPENAPI_PATH: Final = "/api/openapi.json"
DOCS_PATH: Final = "/api/docs"
DOCS_STATIC_PREFIX: Final = "/api/docs/static/"

# The files the docs page serves under DOCS_STATIC_PREFIX, with their media types. The
# OpenAPI document enumerates them, so the route and its description cannot drift apart.
DOCS_ASSETS: Final[Mapping[str, str]] = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "favicon-32x32.png": "image/png",
    "favicon-16x16.png": "image/png",
    "walletd-docs.js": "text/javascript",
}

PROBLEM_CODES: Final = (
    "INVALID_JSON",
    "INVALID_WALLET_ID",
    "INVALID_TRANSFER_ID",
    "VALIDATION_ERROR",
    "TRANSFER_NOT_FOUND",
    "WALLET_NOT_FOUND",
    "WALLET_ALREADY_EXISTS",
    "INSUFFICIENT_FUNDS",
    "BALANCE_LIMIT_EXCEEDED",
    "IDEMPOTENCY_KEY_REUSED",
    "PAYLOAD_TOO_LARGE",
    "REQUEST_TIMEOUT",
    "TOO_MANY_ITEMS",
    "ATOMIC_NOT_POSSIBLE",
    "UNSUPPORTED_MEDIA_TYPE",
    "NOT_FOUND",
    "METHOD_NOT_ALLOWED",
    "UNAVAILABLE",
    "OVERLOADED",
    "NOT_OWNER",
    "UNAUTHORIZED",
    "INTERNAL_ERROR",
    "AS_OF_NOT_SETTLED",
    "INVALID_HOLD_ID",
    "HOLD_NOT_FOUND",
    "HOLD_EXPIRED",
    "HOLD_ALREADY_CAPTURED",
    "HOLD_ALREADY_VOIDED",
    "CAPTURE_EXCEEDS_HOLD",
    "TOO_MANY_HOLDS",
)
HOLD_EXPIRES_IN_S_MAX: Final = 2_592_000  # WALLETD_HOLD_EXPIRES_IN_MAX's default
HOLD_EXPIRES_IN_S_DEFAULT: Final = 86_400

AMOUNT_MAX: Final = "1000000000000.00"  # 10^12
BALANCE_MAX: Final = "1000000000000000.00"  # 10^15
HISTORY_LIMIT_DEFAULT: Final = 50
HISTORY_LIMIT_MAX: Final = 500
IDEMPOTENCY_KEY_LENGTH_MAX: Final = 255
BULK_ITEMS_MAX_DEFAULT: Final = 1000
EVENTS_LIMIT_DEFAULT: Final = 100
EVENTS_LIMIT_MAX: Final = 1000
FEED_POSITION_PATTERN: Final = r"^(0|[1-9][0-9]{0,18})-(0|[1-9][0-9]{0,18})$"

# A positive decimal string with at most 2 fractional digits, no sign, no exponent, no
# leading zeros, at most AMOUNT_MAX. Written without look-arounds so that schemathesis
# (hypothesis) can generate from it.
AMOUNT_STRING_PATTERN: Final = (
    r"^(0\.(0[1-9]|[1-9][0-9]?)|[1-9][0-9]{0,11}(\.[0-9]{1,2})?|1000000000000(\.00?)?)$"
)
MONEY_PATTERN: Final = r"^(0|[1-9][0-9]{0,15})\.[0-9]{2}$"
TIMESTAMP_PATTERN: Final = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{6}Z$"
IDEMPOTENCY_KEY_PATTERN: Final = r"^[\x20-\x7E]+$"

JSON: Final = "application/json"
PROBLEM_JSON: Final = "application/problem+json"

# Every /api/v1 operation: open when WALLETD_API_KEYS is unset (the empty requirement),
# bearer token when it is set.
API_SECURITY: Final[tuple[dict[str, list[str]], ...]] = ({}, {"bearerAuth": []})

JsonObject = dict[str, Any]


def _ref(kind: str, name: str) -> JsonObject:
    return {"$ref": f"#/components/{kind}/{name}"}


# ── components: schemas ──────────────────────────────────────────────────────────────


def _money_schema(description: str) -> JsonObject:
    return {
        "type": "string",
        "pattern": MONEY_PATTERN,
        "description": description,
        "examples": ["1000.00"],
    }


def _schemas() -> JsonObject:
    timestamp = {
        "type": "string",
        "format": "date-time",
        "pattern": TIMESTAMP_PATTERN,
        "description": "RFC 3339, UTC, microseconds, `Z` suffix.",
        "examples": ["2025-01-19T10:00:00.123456Z"],
    }
    return {
        "WalletId": {
            "type": "string",
            "format": "uuid",
            "pattern": WALLET_ID_PATTERN,
            "description": (
                "The canonical 8-4-4-4-12 hexadecimal form, either case; answers use "
                "lowercase. Any other spelling (urn:uuid:, braces, no hyphens, "
                "percent-encoded) is refused."
            ),
            "examples": ["123e4567-e89b-12d3-a456-426614174000"],
        },
        "Money": _money_schema(
            f"Decimal string with exactly 2 fractional digits, 0 to {BALANCE_MAX}."
        ),
        "Timestamp": timestamp,
        "OperationType": {
            "type": "string",
            "enum": [
                "DEPOSIT",
                "WITHDRAW",
                "TRANSFER_OUT",
                "TRANSFER_IN",
                "TRANSFER_REFUND",
                "HOLD",
                "CAPTURE",
                "RELEASE",
            ],
            "description": (
                "A request sends DEPOSIT or WITHDRAW; history also lists the legs of "
                "transfers: TRANSFER_OUT (debit), TRANSFER_IN (credit), TRANSFER_REFUND "
                "(a refused credit compensated), and the moves of holds: HOLD (money "
                "reserved: held up, balance unchanged), CAPTURE (captured money taken out: "
                "balance and held down), RELEASE (the rest given back to available on "
                "capture, void or expiry: held down)."
            ),
        },
        "RequestOperationType": {"type": "string", "enum": ["DEPOSIT", "WITHDRAW"]},
        "Amount": _amount_schema(),
        "IdempotencyKey": _idempotency_key_schema(),
        "Wallet": _wallet_schema(),
        "CreateWalletRequest": _create_wallet_request_schema(),
        "OperationRequest": _operation_request_schema(),
        "BulkItem": _bulk_item_schema(),
        "BulkRequest": _bulk_request_schema(),
        "BulkResult": _bulk_result_schema(),
        "BulkResponse": _bulk_response_schema(),
        "HistoryItem": _history_item_schema(),
        "HistoryPage": _history_page_schema(),
        "FeedPosition": {
            "type": "string",
            "pattern": FEED_POSITION_PATTERN,
            "description": "Opaque position in the change feed; positions only grow in the "
            "order a reader receives events.",
            "examples": ["7342-1081"],
        },
        "Event": _event_schema(),
        "EventsPage": _events_page_schema(),
        "TransferRequest": _transfer_request_schema(),
        "Transfer": _transfer_schema(),
        "Reference": _reference_schema(),
        "HoldId": _ref("schemas", "WalletId"),
        "HoldRequest": _hold_request_schema(),
        "CaptureRequest": _capture_request_schema(),
        "VoidRequest": {
            "type": "object",
            "additionalProperties": False,
            "description": "Optional; no fields.",
        },
        "Hold": _hold_schema(),
        "HealthStatus": {
            "type": "object",
            "required": ["status"],
            "properties": {"status": {"const": "ok"}},
            "examples": [{"status": "ok"}],
        },
        "ReadyStatus": {
            "type": "object",
            "required": ["status"],
            "properties": {"status": {"const": "ready"}},
            "examples": [{"status": "ready"}],
        },
        "ProblemCode": {"type": "string", "enum": list(PROBLEM_CODES)},
        "Problem": _problem_schema(),
        "FieldError": {
            "type": "object",
            "required": ["field", "message"],
            "properties": {"field": {"type": "string"}, "message": {"type": "string"}},
        },
        "ValidationProblem": _validation_problem_schema(),
    }


def _amount_schema() -> JsonObject:
    return {
        "description": (
            f"Greater than 0, at most 2 fractional digits, at most {AMOUNT_MAX}. A JSON number "
            "or a decimal string; booleans, null, NaN, Infinity, empty strings and exponents "
            "that hide more than 2 decimals are rejected with 422."
        ),
        "oneOf": [
            {
                # Exact per JSON Schema and in jsonschema-rs (schemathesis); the Python
                # `jsonschema` package divides floats and wrongly rejects e.g. 0.07.
                "type": "number",
                "exclusiveMinimum": 0,
                "maximum": 1_000_000_000_000,
                "multipleOf": 0.01,
            },
            {"type": "string", "pattern": AMOUNT_STRING_PATTERN},
        ],
        "examples": ["10.50", 25],
    }


def _idempotency_key_schema() -> JsonObject:
    return {
        "type": "string",
        "minLength": 1,
        "maxLength": IDEMPOTENCY_KEY_LENGTH_MAX,
        "pattern": IDEMPOTENCY_KEY_PATTERN,
        "description": "1–255 printable ASCII characters (0x20–0x7E).",
    }


def _wallet_schema() -> JsonObject:
    # More fields may be added to a wallet, never removed: extra properties stay allowed.
    return {
        "type": "object",
        "required": ["id", "balance", "available", "held", "created_at", "updated_at"],
        "properties": {
            "id": _ref("schemas", "WalletId"),
            "balance": {
                **_ref("schemas", "Money"),
                "description": "Everything the wallet owns, held money included.",
            },
            "available": {
                **_ref("schemas", "Money"),
                "description": "balance - held: what withdrawals, transfers and new holds "
                "may take.",
            },
            "held": {
                **_ref("schemas", "Money"),
                "description": "The sum of the wallet's PENDING holds.",
            },
            "created_at": _ref("schemas", "Timestamp"),
            "updated_at": _ref("schemas", "Timestamp"),
            "as_of": {
                **_ref("schemas", "Timestamp"),
                "description": "Only on `?as_of=` reads: the instant the wallet is shown at; "
                "`updated_at` is then the time of the last operation at or before it.",
            },
        },
        "examples": [
            {
                "id": "123e4567-e89b-12d3-a456-426614174000",
                "balance": "1000.00",
                "available": "750.00",
                "held": "250.00",
                "created_at": "2025-01-19T10:00:00.123456Z",
                "updated_at": "2025-01-19T10:30:00.000001Z",
            }
        ],
    }


def _reference_schema() -> JsonObject:
    return {
        "type": "string",
        "minLength": 1,
        "maxLength": 255,
        "pattern": REFERENCE_PATTERN,
        "description": "Optional client text for reconciliation (no control characters); "
        "stored and returned in history and the feed. Part of the request's identity: the "
        "same Idempotency-Key with another reference is 422 IDEMPOTENCY_KEY_REUSED.",
    }


def _hold_request_schema() -> JsonObject:
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["amount"],
        "properties": {
            "amount": _ref("schemas", "Amount"),
            "expires_in_s": {
                "type": "integer",
                "minimum": 1,
                "maximum": HOLD_EXPIRES_IN_S_MAX,
                "default": HOLD_EXPIRES_IN_S_DEFAULT,
                "description": "Seconds until the hold expires (WALLETD_HOLD_EXPIRES_IN_DEFAULT "
                "when absent; at most WALLETD_HOLD_EXPIRES_IN_MAX, else 422).",
            },
            "reference": _ref("schemas", "Reference"),
        },
        "examples": [{"amount": "25.00", "expires_in_s": 600, "reference": "order 7"}],
    }


def _capture_request_schema() -> JsonObject:
    return {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "amount": {
                **_ref("schemas", "Amount"),
                "description": "The part to capture (at most the hold's amount); the rest is "
                "released. Absent: all of it.",
            },
            "to_wallet_id": {
                **_ref("schemas", "WalletId"),
                "description": "Move the captured money into this wallet (not the hold's "
                "own): the capture opens a transfer whose credit is driven like any "
                "transfer's; the answer carries it as `transfer`. Absent: the captured "
                "money leaves the system, like a withdrawal.",
            },
        },
        "description": "Optional; an empty body captures the whole hold.",
        "examples": [{}, {"amount": "10.00"}],
    }


_HOLD_FIELDS: Final = (
    "id", "wallet_id", "amount", "status", "captured_amount", "to_wallet_id", "transfer_id",
    "released_amount", "reference", "expires_at", "created_at", "updated_at",
)  # fmt: skip


def _hold_schema() -> JsonObject:
    return {
        "type": "object",
        "required": list(_HOLD_FIELDS),
        "properties": {
            "id": _ref("schemas", "HoldId"),
            "wallet_id": _ref("schemas", "WalletId"),
            "amount": _ref("schemas", "Money"),
            "status": {
                "type": "string",
                "enum": ["PENDING", "CAPTURED", "VOIDED", "EXPIRED"],
                "description": "PENDING: the amount is held. CAPTURED: `captured_amount` left "
                "the wallet, the rest was released. VOIDED / EXPIRED: all released (EXPIRED "
                "by the sweep, after `expires_at`). A PENDING hold past `expires_at` can no "
                "longer be captured or voided; the sweep releases it shortly.",
            },
            "captured_amount": _ref("schemas", "Money"),
            "to_wallet_id": {
                "oneOf": [_ref("schemas", "WalletId"), {"type": "null"}],
                "description": "Where a capture into a wallet moved the captured money.",
            },
            "transfer_id": {
                "oneOf": [{"type": "string", "format": "uuid"}, {"type": "null"}],
                "description": "The transfer a capture into a wallet opened.",
            },
            "transfer": {
                **_ref("schemas", "Transfer"),
                "description": "Only in the answer to a capture into a wallet: the transfer "
                "as it is now: COMPLETED, FAILED (the credit refused, the debit refunded to "
                "the hold's wallet) or PENDING (finished by the re-drive loop).",
            },
            "released_amount": _ref("schemas", "Money"),
            "reference": {"oneOf": [_ref("schemas", "Reference"), {"type": "null"}]},
            "expires_at": _ref("schemas", "Timestamp"),
            "created_at": _ref("schemas", "Timestamp"),
            "updated_at": _ref("schemas", "Timestamp"),
        },
    }


def _event_schema() -> JsonObject:
    common = {
        "position": _ref("schemas", "FeedPosition"),
        "created_at": _ref("schemas", "Timestamp"),
        "wallet_id": _ref("schemas", "WalletId"),
    }
    created = {
        "type": "object",
        "required": ["position", "type", "created_at", "wallet_id"],
        "properties": {**common, "type": {"const": "wallet.created"}},
    }
    applied = {
        "type": "object",
        "required": [
            "position", "type", "created_at", "wallet_id", "operation_id", "seq",
            "operation_type", "amount", "balance_after", "idempotency_key",
        ],
        "properties": {
            **common,
            "type": {"const": "operation.applied"},
            "operation_id": {"type": "integer", "minimum": 1},
            "seq": {"type": "integer", "minimum": 1},
            "operation_type": _ref("schemas", "OperationType"),
            "amount": _ref("schemas", "Money"),
            "balance_after": _ref("schemas", "Money"),
            "held_after": _ref("schemas", "Money"),
            "reference": {"oneOf": [_ref("schemas", "Reference"), {"type": "null"}]},
            "idempotency_key": {"oneOf": [_ref("schemas", "IdempotencyKey"), {"type": "null"}]},
            "transfer_id": {
                "oneOf": [{"type": "string", "format": "uuid"}, {"type": "null"}],
                "description": "The transfer a TRANSFER_* leg belongs to; null otherwise.",
            },
            "hold_id": {
                "oneOf": [{"type": "string", "format": "uuid"}, {"type": "null"}],
                "description": "The hold a HOLD / CAPTURE / RELEASE row belongs to; null "
                "otherwise.",
            },
        },
    }  # fmt: skip
    # More event types (transfers, holds) may be added: a consumer skips types it does not
    # know, so the schema names the known ones without closing the list.
    return {
        "description": "One committed change. Known types: `wallet.created`, "
        "`operation.applied`; skip others.",
        "oneOf": [
            created,
            applied,
            {
                "type": "object",
                "required": ["position", "type", "created_at"],
                "properties": {
                    "position": _ref("schemas", "FeedPosition"),
                    "created_at": _ref("schemas", "Timestamp"),
                    "type": {"type": "string", "not": {"enum": ["wallet.created",
                                                                "operation.applied"]}},
                },
            },
        ],
        "examples": [
            {
                "position": "7342-1081",
                "type": "operation.applied",
                "created_at": "2025-01-19T10:00:00.123456Z",
                "wallet_id": "123e4567-e89b-12d3-a456-426614174000",
                "operation_id": 1081,
                "seq": 2,
                "operation_type": "DEPOSIT",
                "amount": "10.00",
                "balance_after": "110.00",
                "idempotency_key": None,
            }
        ],
    }  # fmt: skip


def _events_page_schema() -> JsonObject:
    return {
        "type": "object",
        "required": ["events", "next_position"],
        "properties": {
            "events": {
                "type": "array",
                "maxItems": EVENTS_LIMIT_MAX,
                "items": _ref("schemas", "Event"),
                "description": "In position order.",
            },
            "next_position": {
                **_ref("schemas", "FeedPosition"),
                "description": "Pass as `after` for the next page: the last event's position, "
                "or `after` itself when nothing new has committed.",
            },
        },
    }


def _create_wallet_request_schema() -> JsonObject:
    return {
        "type": "object",
        "additionalProperties": False,
        "properties": {"id": _ref("schemas", "WalletId")},
        "description": "Optional; an empty body or `{}` lets the server pick the id.",
        "examples": [{}, {"id": "123e4567-e89b-12d3-a456-426614174000"}],
    }


def _operation_request_schema() -> JsonObject:
    # `operationType` is an accepted alias of `operation_type`; exactly one is sent.
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["amount"],
        "properties": {
            "operation_type": _ref("schemas", "RequestOperationType"),
            "operationType": {
                **_ref("schemas", "RequestOperationType"),
                "description": "Alias of `operation_type`.",
            },
            "amount": _ref("schemas", "Amount"),
            "reference": _ref("schemas", "Reference"),
        },
        "oneOf": [{"required": ["operation_type"]}, {"required": ["operationType"]}],
        "examples": [
            {"operation_type": "DEPOSIT", "amount": 1000},
            {"operationType": "WITHDRAW", "amount": "10.50"},
        ],
    }


def _bulk_item_schema() -> JsonObject:
    return {
        "type": "object",
        "description": "One operation of a bulk request: the single endpoint's body plus the "
        "wallet and an optional key (scope: the wallet, as the header's).",
        "required": ["wallet_id", "operation_type", "amount"],
        "additionalProperties": False,
        "properties": {
            "wallet_id": _ref("schemas", "WalletId"),
            "operation_type": _ref("schemas", "RequestOperationType"),
            "amount": _ref("schemas", "Amount"),
            "idempotency_key": _ref("schemas", "IdempotencyKey"),
            "reference": _ref("schemas", "Reference"),
            "key_index": {
                "type": "integer",
                "minimum": 0,
                "maximum": KEY_INDEX_MAX,
                "description": "With the request's Idempotency-Key and no idempotency_key: "
                "the index the item's derived key is built from, instead of its position "
                "(walletd sets it when it sends part of a request on to another process).",
            },
        },
    }


def _bulk_request_schema() -> JsonObject:
    return {
        "type": "object",
        "required": ["items"],
        "additionalProperties": False,
        "properties": {
            "atomic": {
                "type": "boolean",
                "default": False,
                "description": "All or nothing, in one PostgreSQL transaction: the first "
                "refused or invalid item refuses the whole request with its problem (and "
                "`index`), nothing applied. At most WALLETD_BATCH_MAX (256) items, on one "
                "shard actor (else 413 TOO_MANY_ITEMS / 422 ATOMIC_NOT_POSSIBLE).",
            },
            "items": {
                "type": "array",
                "minItems": 1,
                "maxItems": BULK_ITEMS_MAX_DEFAULT,
                "description": "Up to WALLETD_BULK_ITEMS_MAX operations "
                f"({BULK_ITEMS_MAX_DEFAULT} by default; more is 413 TOO_MANY_ITEMS). "
                "Items on one wallet apply in array order.",
                "items": _ref("schemas", "BulkItem"),
            },
        },
        "examples": [
            {
                "items": [
                    {
                        "wallet_id": "123e4567-e89b-12d3-a456-426614174000",
                        "operation_type": "DEPOSIT",
                        "amount": "10.00",
                        "idempotency_key": "order-17",
                    }
                ]
            }
        ],
    }


def _bulk_result_schema() -> JsonObject:
    return {
        "type": "object",
        "description": "What the single endpoint would have answered for this item: its "
        "status, and the wallet after the operation or the problem.",
        "required": ["index", "status", "body"],
        "properties": {
            "index": {"type": "integer", "minimum": 0},
            "status": {"type": "integer", "enum": [200, 404, 409, 422, 503]},
            "replayed": {
                "type": "boolean",
                "description": "On a 200: the answer was replayed for an earlier key.",
            },
            "body": {"oneOf": [_ref("schemas", "Wallet"), _ref("schemas", "Problem")]},
        },
    }


def _bulk_response_schema() -> JsonObject:
    return {
        "type": "object",
        "required": ["applied", "refused", "results"],
        "additionalProperties": False,
        "properties": {
            "applied": {"type": "integer", "minimum": 0},
            "refused": {"type": "integer", "minimum": 0},
            "results": {"type": "array", "items": _ref("schemas", "BulkResult")},
        },
    }


def _history_item_schema() -> JsonObject:
    return {
        "type": "object",
        "required": [
            "id",
            "seq",
            "operation_type",
            "amount",
            "balance_after",
            "held_after",
            "idempotency_key",
            "transfer_id",
            "hold_id",
            "reference",
            "created_at",
        ],
        "properties": {
            "id": {"type": "integer", "minimum": 1, "description": "Global operation id."},
            "seq": {
                "type": "integer",
                "minimum": 1,
                "description": "Per-wallet sequence number, starting at 1.",
            },
            "operation_type": _ref("schemas", "OperationType"),
            "amount": _ref("schemas", "Money"),
            "balance_after": _ref("schemas", "Money"),
            "held_after": {
                **_ref("schemas", "Money"),
                "description": "The wallet's held right after this row.",
            },
            "idempotency_key": {"oneOf": [_ref("schemas", "IdempotencyKey"), {"type": "null"}]},
            "transfer_id": {
                "oneOf": [{"type": "string", "format": "uuid"}, {"type": "null"}],
                "description": "The transfer of a TRANSFER_* leg; null otherwise.",
            },
            "hold_id": {
                "oneOf": [{"type": "string", "format": "uuid"}, {"type": "null"}],
                "description": "The hold of a HOLD / CAPTURE / RELEASE row; null otherwise.",
            },
            "reference": {
                "oneOf": [_ref("schemas", "Reference"), {"type": "null"}],
                "description": "The client's reference of the operation (a transfer's or "
                "hold's for their rows); null when none was sent.",
            },
            "created_at": _ref("schemas", "Timestamp"),
        },
        "examples": [
            {
                "id": 42,
                "seq": 2,
                "operation_type": "DEPOSIT",
                "amount": "10.00",
                "balance_after": "110.00",
                "held_after": "0.00",
                "idempotency_key": None,
                "transfer_id": None,
                "hold_id": None,
                "reference": "invoice 17",
                "created_at": "2025-01-19T10:00:00.123456Z",
            }
        ],
    }


def _transfer_request_schema() -> JsonObject:
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["from_wallet_id", "to_wallet_id", "amount"],
        "properties": {
            "id": {
                **_ref("schemas", "WalletId"),
                "description": (
                    "Optional transfer id chosen by the client; it is the request's "
                    "idempotency key (global scope)."
                ),
            },
            "from_wallet_id": _ref("schemas", "WalletId"),
            "to_wallet_id": {
                **_ref("schemas", "WalletId"),
                "description": "Must differ from from_wallet_id.",
            },
            "amount": _ref("schemas", "Amount"),
            "reference": {
                "type": "string",
                "minLength": 1,
                "maxLength": 255,
                "pattern": REFERENCE_PATTERN,
                "description": "Optional client text for reconciliation (no control characters).",
            },
        },
        "examples": [
            {
                "from_wallet_id": "123e4567-e89b-12d3-a456-426614174000",
                "to_wallet_id": "9b2f0c1e-6a55-4f0e-8f0a-2d9c6f1b7e31",
                "amount": "25.00",
                "reference": "order 7",
            }
        ],
    }


_TRANSFER_FIELDS: Final = (
    "id", "from_wallet_id", "to_wallet_id", "amount", "reference", "status", "failure_code",
    "created_at", "updated_at",
)  # fmt: skip


def _transfer_schema() -> JsonObject:
    return {
        "type": "object",
        "required": list(_TRANSFER_FIELDS),
        "properties": {
            "id": {"type": "string", "format": "uuid"},
            "from_wallet_id": _ref("schemas", "WalletId"),
            "to_wallet_id": _ref("schemas", "WalletId"),
            "amount": _ref("schemas", "Money"),
            "reference": {"type": ["string", "null"]},
            "status": {
                "type": "string",
                "enum": ["PENDING", "COMPLETED", "FAILED"],
                "description": (
                    "PENDING: debited, not yet credited (the money is in flight, and counted "
                    "as such); COMPLETED: both legs committed; FAILED: the credit was "
                    "refused and the debit refunded."
                ),
            },
            "failure_code": {
                "oneOf": [
                    {"type": "string", "enum": ["WALLET_NOT_FOUND", "BALANCE_LIMIT_EXCEEDED"]},
                    {"type": "null"},
                ],
                "description": "Why a FAILED transfer's credit was refused.",
            },
            "created_at": _ref("schemas", "Timestamp"),
            "updated_at": _ref("schemas", "Timestamp"),
        },
    }


def _history_page_schema() -> JsonObject:
    return {
        "type": "object",
        "required": ["items", "next_cursor"],
        "properties": {
            "items": {
                "type": "array",
                "maxItems": HISTORY_LIMIT_MAX,
                "items": _ref("schemas", "HistoryItem"),
                "description": "Newest first.",
            },
            "next_cursor": {
                "type": ["string", "null"],
                "description": "Pass as `cursor` for the next page; null on the last page.",
            },
        },
    }


def _problem_schema() -> JsonObject:
    # RFC 9457 allows extension members, so extra properties stay allowed.
    return {
        "type": "object",
        "required": ["type", "title", "status", "detail", "code", "instance"],
        "properties": {
            "type": {"const": "about:blank"},
            "title": {"type": "string"},
            "status": {"type": "integer", "minimum": 400, "maximum": 599},
            "detail": {"type": "string"},
            "code": _ref("schemas", "ProblemCode"),
            "instance": {"type": "string", "description": "The request path."},
        },
        "examples": [
            {
                "type": "about:blank",
                "title": "Insufficient funds",
                "status": 409,
                "detail": "wallet 123e4567-e89b-12d3-a456-426614174000 has 10.00, "
                "cannot withdraw 25.00",
                "code": "INSUFFICIENT_FUNDS",
                "instance": "/api/v1/wallets/123e4567-e89b-12d3-a456-426614174000/operation",
            }
        ],
    }


def _validation_problem_schema() -> JsonObject:
    return {
        "allOf": [
            _ref("schemas", "Problem"),
            {
                "type": "object",
                "required": ["errors"],
                "properties": {
                    "code": {"const": "VALIDATION_ERROR"},
                    "errors": {"type": "array", "items": _ref("schemas", "FieldError")},
                },
            },
        ]
    }


# ── components: headers, parameters, responses ───────────────────────────────────────


def _headers() -> JsonObject:
    return {
        "X-Request-Id": {
            "description": "Echo of the request's X-Request-Id, or one generated by the server.",
            "required": True,
            "schema": {"type": "string", "minLength": 1},
        },
        "Location": {
            "description": "Path of the created wallet: `/api/v1/wallets/{id}`.",
            "required": True,
            "schema": {
                "type": "string",
                "pattern": "^/api/v1/wallets/[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-"
                "[0-9a-f]{12}$",
            },
        },
        "HoldLocation": {
            "description": "Path of the hold: `/api/v1/holds/{id}`.",
            "required": True,
            "schema": {"type": "string", "pattern": "^/api/v1/holds/[0-9a-fA-F-]{36}$"},
        },
        "TransferLocation": {
            "description": "Path of the transfer: `/api/v1/transfers/{id}`.",
            "required": True,
            "schema": {"type": "string", "pattern": "^/api/v1/transfers/[0-9a-fA-F-]{36}$"},
        },
        "Idempotent-Replayed": {
            "description": "Present when this is the stored response of an earlier request "
            "with the same Idempotency-Key.",
            "schema": {"type": "string", "enum": ["true"]},
        },
        "Retry-After": {
            "description": "Seconds to wait before retrying.",
            "required": True,
            "schema": {"type": "integer", "minimum": 0},
        },
        "WWW-Authenticate": {
            "description": "Bearer challenge.",
            "required": True,
            "schema": {"type": "string", "pattern": "^Bearer"},
        },
        "Allow": {
            "description": "The methods the path supports.",
            "required": True,
            "schema": {"type": "string"},
        },
    }


def _parameters() -> JsonObject:
    return {
        "WalletId": {
            "name": "wallet_id",
            "in": "path",
            "required": True,
            "description": (
                "A UUID in the canonical 8-4-4-4-12 hex form, either case, written as is "
                "(not percent-encoded); anything else is 400 INVALID_WALLET_ID."
            ),
            "schema": _ref("schemas", "WalletId"),
        },
        "IdempotencyKey": {
            "name": "Idempotency-Key",
            "in": "header",
            "required": False,
            "description": (
                "A retry with the same key and the same request returns the original status "
                "and body with `Idempotent-Replayed: true`; the same key with a different "
                "request is 422 IDEMPOTENCY_KEY_REUSED. A business refusal of an operation "
                "(409 INSUFFICIENT_FUNDS / BALANCE_LIMIT_EXCEEDED) is an original response "
                "too and is replayed; a request refused before that (400, 404, 413, 415, "
                "422) does not use up its key."
            ),
            "schema": _ref("schemas", "IdempotencyKey"),
        },
        "Limit": {
            "name": "limit",
            "in": "query",
            "required": False,
            "description": f"Page size, 1 to {HISTORY_LIMIT_MAX}; anything else is 422.",
            "schema": {
                "type": "integer",
                "minimum": 1,
                "maximum": HISTORY_LIMIT_MAX,
                "default": HISTORY_LIMIT_DEFAULT,
            },
        },
        "AsOf": {
            "name": "as_of",
            "in": "query",
            "required": False,
            "description": "RFC 3339 instant: the wallet as it was then, read from the log. "
            "404 if it did not exist yet; 422 VALIDATION_ERROR if malformed or in the future; "
            "422 AS_OF_NOT_SETTLED (with Retry-After) if so recent that a commit stamped "
            "before it may still land (WALLETD_AS_OF_SETTLE).",
            "schema": {"type": "string", "format": "date-time"},
        },
        "Since": {
            "name": "since",
            "in": "query",
            "required": False,
            "description": "RFC 3339 instant: operations at or after it.",
            "schema": {"type": "string", "format": "date-time"},
        },
        "Until": {
            "name": "until",
            "in": "query",
            "required": False,
            "description": "RFC 3339 instant: operations strictly before it.",
            "schema": {"type": "string", "format": "date-time"},
        },
        "OperationTypeFilter": {
            "name": "operation_type",
            "in": "query",
            "required": False,
            "description": "Only operations of this type. A page then reads at most 4 rows "
            "per item asked for: it may hold fewer items (even none) with a `next_cursor`.",
            "schema": _ref("schemas", "OperationType"),
        },
        "After": {
            "name": "after",
            "in": "query",
            "required": False,
            "description": "Events after this position (the `next_position` of the previous "
            "page); from the start when absent.",
            "schema": _ref("schemas", "FeedPosition"),
        },
        "EventsLimit": {
            "name": "limit",
            "in": "query",
            "required": False,
            "description": f"Events per page, 1 to {EVENTS_LIMIT_MAX}; anything else is 422.",
            "schema": {
                "type": "integer",
                "minimum": 1,
                "maximum": EVENTS_LIMIT_MAX,
                "default": EVENTS_LIMIT_DEFAULT,
            },
        },
        "LastEventId": {
            "name": "Last-Event-ID",
            "in": "header",
            "required": False,
            "description": "Resume after this position (browsers' EventSource sends it on "
            "reconnect); wins over `after`.",
            "schema": _ref("schemas", "FeedPosition"),
        },
        "Cursor": {
            "name": "cursor",
            "in": "query",
            "required": False,
            "description": "Opaque `next_cursor` of the previous page; anything else is 422.",
            "schema": {"type": "string", "pattern": CURSOR_PATTERN},
        },
    }


def _problem_schema_for(status: int, codes: tuple[str, ...]) -> JsonObject:
    """Problem JSON narrowed to the status and the codes one response can carry."""
    narrowed = {
        "type": "object",
        "properties": {"status": {"const": status}, "code": {"enum": list(codes)}},
    }
    return {"allOf": [_ref("schemas", "Problem"), narrowed]}


def _validation_problem_schema_for(status: int) -> JsonObject:
    narrowed = {"type": "object", "properties": {"status": {"const": status}}}
    return {"allOf": [_ref("schemas", "ValidationProblem"), narrowed]}


def _problem_response_of(description: str, schema: JsonObject, *headers: str) -> JsonObject:
    return {
        "description": description,
        "headers": _header_refs(headers),
        "content": {PROBLEM_JSON: {"schema": schema}},
    }


def _problem_response(
    description: str, status: int, codes: tuple[str, ...], headers: tuple[str, ...] = ()
) -> JsonObject:
    return _problem_response_of(description, _problem_schema_for(status, codes), *headers)


def _header_refs(names: tuple[str, ...]) -> JsonObject:
    return {name: _ref("headers", name) for name in ("X-Request-Id", *names)}


def _responses() -> JsonObject:
    return {
        "Unauthorized": _problem_response(
            "WALLETD_API_KEYS is set and the bearer token is missing or wrong.",
            401,
            ("UNAUTHORIZED",),
            ("WWW-Authenticate",),
        ),
        "RequestTimeout": _problem_response(
            "The body did not arrive within WALLETD_BODY_READ_TIMEOUT (10 s by default) of "
            "the server starting to read it; the connection is closed.",
            408,
            ("REQUEST_TIMEOUT",),
        ),
        "PayloadTooLarge": _problem_response(
            "The body is larger than WALLETD_MAX_BODY_BYTES (64 KiB by default).",
            413,
            ("PAYLOAD_TOO_LARGE",),
        ),
        "UnsupportedMediaType": _problem_response(
            "The body's Content-Type is not application/json (a charset is allowed).",
            415,
            ("UNSUPPORTED_MEDIA_TYPE",),
        ),
        "Unavailable": _problem_response(
            "Storage unreachable, commit outcome unknown (retry with the same Idempotency-Key), "
            "the engine is over its bounded capacity, or the wallet's shard is moving between "
            "walletd processes (NOT_OWNER: nothing was applied).",
            503,
            ("UNAVAILABLE", "OVERLOADED", "NOT_OWNER"),
            ("Retry-After",),
        ),
        "WalletNotFound": _problem_response("No wallet has this id.", 404, ("WALLET_NOT_FOUND",)),
        "NotFound": _problem_response("No route matches the path.", 404, ("NOT_FOUND",)),
        "MethodNotAllowed": _problem_response(
            "The path exists but not with this method.",
            405,
            ("METHOD_NOT_ALLOWED",),
            ("Allow",),
        ),
        "ValidationFailed": _problem_response_of(
            "Invalid fields, amount, query or Idempotency-Key header; "
            "or an Idempotency-Key reused with a different request.",
            {
                # Disjoint by `code`, so exactly one branch matches.
                "oneOf": [
                    _validation_problem_schema_for(422),
                    _problem_schema_for(422, ("IDEMPOTENCY_KEY_REUSED",)),
                ]
            },
        ),
    }


# ── paths ────────────────────────────────────────────────────────────────────────────


def _json_response(description: str, schema_name: str, headers: tuple[str, ...] = ()) -> JsonObject:
    return {
        "description": description,
        "headers": _header_refs(headers),
        "content": {JSON: {"schema": _ref("schemas", schema_name)}},
    }


def _json_body(schema_name: str, *, required: bool) -> JsonObject:
    return {"required": required, "content": {JSON: {"schema": _ref("schemas", schema_name)}}}


def _post_errors() -> JsonObject:
    """The refusals every JSON-body POST shares, before any business rule runs."""
    return {
        "401": _ref("responses", "Unauthorized"),
        "408": _ref("responses", "RequestTimeout"),
        "413": _ref("responses", "PayloadTooLarge"),
        "415": _ref("responses", "UnsupportedMediaType"),
        "422": _ref("responses", "ValidationFailed"),
        "503": _ref("responses", "Unavailable"),
    }


def _create_wallet() -> JsonObject:
    return {
        "operationId": "createWallet",
        "tags": ["wallets"],
        "summary": "Create a wallet with balance 0.00",
        "security": list(API_SECURITY),
        "parameters": [_ref("parameters", "IdempotencyKey")],
        "requestBody": _json_body("CreateWalletRequest", required=False),
        "responses": {
            "201": _json_response("Created.", "Wallet", ("Location", "Idempotent-Replayed")),
            "400": _problem_response(
                "The body is not JSON or not a JSON object.", 400, ("INVALID_JSON",)
            ),
            "409": _problem_response(
                "A wallet with this id exists.", 409, ("WALLET_ALREADY_EXISTS",)
            ),
            **_post_errors(),
        },
    }


def _get_wallet() -> JsonObject:
    return {
        "operationId": "getWallet",
        "tags": ["wallets"],
        "summary": "Read a wallet's committed balance, now or as of a past instant",
        "security": list(API_SECURITY),
        "parameters": [_ref("parameters", "WalletId"), _ref("parameters", "AsOf")],
        "responses": {
            "200": _json_response("The wallet.", "Wallet"),
            "400": _problem_response(
                "The id is not a canonical UUID.", 400, ("INVALID_WALLET_ID",)
            ),
            "401": _ref("responses", "Unauthorized"),
            "404": _problem_response(
                "No wallet has this id (or had it at `as_of`).", 404, ("WALLET_NOT_FOUND",)
            ),
            "422": {
                "description": "`as_of` malformed or in the future (VALIDATION_ERROR), or not "
                "settled yet (AS_OF_NOT_SETTLED, with Retry-After).",
                "headers": {
                    **_header_refs(()),
                    "Retry-After": {
                        "description": "With AS_OF_NOT_SETTLED: seconds until the instant "
                        "is settled.",
                        "schema": {"type": "integer", "minimum": 0},
                    },
                },
                "content": {
                    PROBLEM_JSON: {
                        "schema": {
                            "oneOf": [
                                _validation_problem_schema_for(422),
                                _problem_schema_for(422, ("AS_OF_NOT_SETTLED",)),
                            ]
                        }
                    }
                },
            },
            "503": _ref("responses", "Unavailable"),
        },
    }


def _apply_operation() -> JsonObject:
    return {
        "operationId": "applyOperation",
        "tags": ["wallets"],
        "summary": "Deposit to or withdraw from a wallet",
        "description": "A 200 means the operation is committed to PostgreSQL.",
        "security": list(API_SECURITY),
        "parameters": [_ref("parameters", "WalletId"), _ref("parameters", "IdempotencyKey")],
        "requestBody": _json_body("OperationRequest", required=True),
        "responses": {
            "200": _json_response(
                "The wallet after the operation.", "Wallet", ("Idempotent-Replayed",)
            ),
            "400": _problem_response(
                "The id is not a canonical UUID, or the body is not a JSON object.",
                400,
                ("INVALID_WALLET_ID", "INVALID_JSON"),
            ),
            "404": _ref("responses", "WalletNotFound"),
            "409": _problem_response(
                "Withdrawal larger than the balance, or deposit past the balance ceiling "
                f"({BALANCE_MAX}); the balance is unchanged. With an Idempotency-Key the "
                "refusal is recorded: a retry with that key gets it again (replayed).",
                409,
                ("INSUFFICIENT_FUNDS", "BALANCE_LIMIT_EXCEEDED"),
                ("Idempotent-Replayed",),
            ),
            **_post_errors(),
        },
    }


def _bulk_operations() -> JsonObject:
    return {
        "operationId": "bulkOperations",
        "tags": ["wallets"],
        "summary": "Apply many deposits and withdrawals in one request",
        "description": "By default each item succeeds or fails on its own; with "
        '`"atomic": true` all apply in one transaction or none does. The answer lists one result '
        "per item, in order. A 200 means every applied item is committed. The request is "
        "admitted whole or refused whole (503 OVERLOADED, nothing queued). With an "
        f"Idempotency-Key (at most {REQUEST_KEY_LENGTH_MAX} characters here), every item "
        "without a key of its own gets a key derived from it and its index (shown "
        "`<request key>/<index>` in the history; stored apart from every key a client can "
        "send, so a client key `R/0` is never item 0 of request `R`), so a retry of the "
        "same request replays item by item. Without any key, a retry after a lost answer "
        "may apply items twice.",
        "security": list(API_SECURITY),
        "parameters": [_ref("parameters", "IdempotencyKey")],
        "requestBody": _json_body("BulkRequest", required=True),
        "responses": {
            "200": _json_response("One result per item, in order.", "BulkResponse"),
            "400": _problem_response(
                "The body is not JSON or not a JSON object.", 400, ("INVALID_JSON",)
            ),
            **_post_errors(),
            "422": _problem_response_of(
                "Invalid envelope, items (atomic) or Idempotency-Key header; an item key reused "
                "(atomic); or an atomic request whose wallets span shard actors.",
                {
                    "oneOf": [
                        _validation_problem_schema_for(422),
                        _problem_schema_for(422, ("IDEMPOTENCY_KEY_REUSED", "ATOMIC_NOT_POSSIBLE")),
                    ]
                },
            ),
            "404": _ref("responses", "WalletNotFound"),
            "409": _problem_response(
                "Atomic: an item was refused (its problem, with `index`); nothing applied.",
                409,
                ("INSUFFICIENT_FUNDS", "BALANCE_LIMIT_EXCEEDED"),
            ),
            "413": _problem_response_of(
                "The body is larger than WALLETD_BULK_MAX_BODY_BYTES (1 MiB by default), or "
                "holds more items than WALLETD_BULK_ITEMS_MAX (atomic: WALLETD_BATCH_MAX).",
                _problem_schema_for(413, ("PAYLOAD_TOO_LARGE", "TOO_MANY_ITEMS")),
            ),
        },
    }


def _list_operations() -> JsonObject:
    return {
        "operationId": "listOperations",
        "tags": ["wallets"],
        "summary": "A wallet's operation history, newest first, optionally filtered",
        "security": list(API_SECURITY),
        "parameters": [
            _ref("parameters", "WalletId"),
            _ref("parameters", "Limit"),
            _ref("parameters", "Cursor"),
            _ref("parameters", "Since"),
            _ref("parameters", "Until"),
            _ref("parameters", "OperationTypeFilter"),
        ],
        "responses": {
            "200": _json_response("One page of history.", "HistoryPage"),
            "400": _problem_response_of(
                "The id is not a canonical UUID.",
                {
                    "oneOf": [
                        _problem_schema_for(400, ("INVALID_WALLET_ID",)),
                        _validation_problem_schema_for(400),
                    ]
                },
            ),
            "401": _ref("responses", "Unauthorized"),
            "404": _ref("responses", "WalletNotFound"),
            "422": _problem_response_of(
                "limit out of range or not an integer, cursor invalid, or a filter malformed.",
                _validation_problem_schema_for(422),
            ),
            "503": _ref("responses", "Unavailable"),
        },
    }


def _feed_errors() -> JsonObject:
    return {
        "401": _ref("responses", "Unauthorized"),
        "422": _problem_response_of(
            "`after`, `Last-Event-ID` or `limit` invalid.", _validation_problem_schema_for(422)
        ),
        "503": _ref("responses", "Unavailable"),
    }


def _list_events() -> JsonObject:
    return {
        "operationId": "listEvents",
        "tags": ["feed"],
        "summary": "The change feed, one page at a time",
        "description": "Every committed change (wallet created, operation applied) once, in "
        "position order, across all shards and processes. A change shows up once every "
        "transaction that began before it has ended, so a page never skips one that commits "
        "late. Delivery is at least once when a consumer stores its position after "
        "processing.",
        "security": list(API_SECURITY),
        "parameters": [_ref("parameters", "After"), _ref("parameters", "EventsLimit")],
        "responses": {"200": _json_response("One page of events.", "EventsPage"), **_feed_errors()},
    }


def _stream_events() -> JsonObject:
    return {
        "operationId": "streamEvents",
        "tags": ["feed"],
        "summary": "The change feed as Server-Sent Events",
        "description": "Each event: `id: <position>`, `event: <type>`, `data: <Event JSON>`. "
        "Resume with `Last-Event-ID`. A `: heartbeat` comment is sent after "
        "WALLETD_FEED_HEARTBEAT seconds of silence. A consumer whose buffer stays full for "
        "WALLETD_FEED_WRITE_TIMEOUT seconds is disconnected; past WALLETD_FEED_STREAMS_MAX open "
        "streams the answer is 503 OVERLOADED.",
        "security": list(API_SECURITY),
        "parameters": [_ref("parameters", "After"), _ref("parameters", "LastEventId")],
        "responses": {
            "200": {
                "description": "An endless event stream.",
                "headers": _header_refs(()),
                "content": {"text/event-stream": {"schema": {"type": "string"}}},
            },
            **_feed_errors(),
        },
    }


def _create_transfer() -> JsonObject:
    return {
        "operationId": "createTransfer",
        "tags": ["transfers"],
        "summary": "Move money from one wallet to another",
        "description": (
            "A 201 means both legs are committed. The transfer's `id` (chosen, or derived "
            "from the Idempotency-Key, else new) is its idempotency key: the same id with the "
            "same request returns the original answer, with another request 422. A refusal "
            "names its `side` (`from` or `to`); a credit refused after the debit (receiving "
            "wallet missing, or past the ceiling) ends the transfer FAILED with the debit "
            "refunded, and the problem carries the `transfer`. A 503 leaves the transfer "
            "absent or PENDING; retry with the same id or key for the final answer."
        ),
        "security": list(API_SECURITY),
        "parameters": [_ref("parameters", "IdempotencyKey")],
        "requestBody": _json_body("TransferRequest", required=True),
        "responses": {
            "201": {
                **_json_response("The COMPLETED transfer.", "Transfer", ("Idempotent-Replayed",)),
                "headers": {
                    **_header_refs(("Idempotent-Replayed",)),
                    "Location": _ref("headers", "TransferLocation"),
                },
            },
            "400": _problem_response(
                "The body is not JSON or not a JSON object.", 400, ("INVALID_JSON",)
            ),
            "404": _problem_response(
                "The `side` wallet does not exist.", 404, ("WALLET_NOT_FOUND",)
            ),
            "409": _problem_response(
                "Not enough money on the from side, or the to side would pass the ceiling "
                f"({BALANCE_MAX}).",
                409,
                ("INSUFFICIENT_FUNDS", "BALANCE_LIMIT_EXCEEDED"),
            ),
            **_post_errors(),
        },
    }


def _get_transfer() -> JsonObject:
    return {
        "operationId": "getTransfer",
        "tags": ["transfers"],
        "summary": "Read a transfer and its status",
        "security": list(API_SECURITY),
        "parameters": [
            {
                "name": "transfer_id",
                "in": "path",
                "required": True,
                "description": "A UUID in the canonical form, either case, written as is (not "
                "percent-encoded); anything else is 400 INVALID_TRANSFER_ID.",
                "schema": _ref("schemas", "WalletId"),
            }
        ],
        "responses": {
            "200": _json_response("The transfer.", "Transfer"),
            "400": _problem_response("The id is not a UUID.", 400, ("INVALID_TRANSFER_ID",)),
            "401": _ref("responses", "Unauthorized"),
            "404": _problem_response("No transfer has this id.", 404, ("TRANSFER_NOT_FOUND",)),
            "503": _ref("responses", "Unavailable"),
        },
    }


def _hold_id_parameter() -> JsonObject:
    return {
        "name": "hold_id",
        "in": "path",
        "required": True,
        "description": "A UUID in the canonical form, either case, written as is (not "
        "percent-encoded); anything else is 400 INVALID_HOLD_ID. "
        "A hold id hashes to its wallet's shard, so it routes like the wallet.",
        "schema": _ref("schemas", "HoldId"),
    }


_HOLD_KEY_DESCRIPTION: Final = (
    "Scope: this hold. The request that captured or voided the hold, retried with its key, "
    "gets the original answer (`Idempotent-Replayed: true`); the same key with another "
    "request is 422 IDEMPOTENCY_KEY_REUSED; without it a resolved hold is 409."
)


def _create_hold() -> JsonObject:
    return {
        "operationId": "createHold",
        "tags": ["holds"],
        "summary": "Reserve money of a wallet (authorize)",
        "description": (
            "A 201 means the hold is committed: `held` grew by the amount and `available` "
            "shrank; `balance` is unchanged. With an Idempotency-Key (scope: the wallet) the "
            "hold id is derived from it: a retry with the same body gets the same hold "
            "(as it is now), another body 422. A refusal (409) records nothing."
        ),
        "security": list(API_SECURITY),
        "parameters": [_ref("parameters", "WalletId"), _ref("parameters", "IdempotencyKey")],
        "requestBody": _json_body("HoldRequest", required=True),
        "responses": {
            "201": {
                **_json_response("The PENDING hold.", "Hold", ("Idempotent-Replayed",)),
                "headers": {
                    **_header_refs(("Idempotent-Replayed",)),
                    "Location": _ref("headers", "HoldLocation"),
                },
            },
            "400": _problem_response(
                "The id is not a canonical UUID, or the body is not a JSON object.",
                400,
                ("INVALID_WALLET_ID", "INVALID_JSON"),
            ),
            "404": _ref("responses", "WalletNotFound"),
            "409": _problem_response(
                "The amount is more than `available`, or the wallet has "
                "WALLETD_HOLDS_PER_WALLET_MAX PENDING holds already.",
                409,
                ("INSUFFICIENT_FUNDS", "TOO_MANY_HOLDS"),
            ),
            **_post_errors(),
        },
    }


def _hold_refusals(action: str) -> JsonObject:
    return {
        "400": _problem_response(
            "The id is not a UUID, or the body is not a JSON object.",
            400,
            ("INVALID_HOLD_ID", "INVALID_JSON"),
        ),
        "404": _problem_response("No hold has this id.", 404, ("HOLD_NOT_FOUND",)),
        "409": _problem_response(
            f"The hold cannot be {action}: its expires_at has passed (whether or not the "
            "sweep has released it yet), it was captured or voided already, or (capture) "
            "the amount is more than the hold. The problem carries the `hold`.",
            409,
            (
                "HOLD_EXPIRED",
                "HOLD_ALREADY_CAPTURED",
                "HOLD_ALREADY_VOIDED",
                "CAPTURE_EXCEEDS_HOLD",
            ),
        ),
        **_post_errors(),
    }


def _resolve_hold(action: str) -> JsonObject:
    captured = action == "capture"
    return {
        "operationId": "captureHold" if captured else "voidHold",
        "tags": ["holds"],
        "summary": "Capture a hold (all or part; the rest released)"
        if captured
        else "Void a hold (release all of it)",
        "description": (
            "A hold resolves once. A capture takes the captured amount out of the wallet "
            "(like a withdrawal: `balance` and `held` drop) and releases the rest to "
            "`available`; a void releases everything."
        ),
        "security": list(API_SECURITY),
        "parameters": [
            _hold_id_parameter(),
            {**_ref("parameters", "IdempotencyKey"), "description": _HOLD_KEY_DESCRIPTION},
        ],
        "requestBody": _json_body("CaptureRequest" if captured else "VoidRequest", required=False),
        "responses": {
            "200": _json_response(
                "The hold, CAPTURED or VOIDED.", "Hold", ("Idempotent-Replayed",)
            ),
            **_hold_refusals("captured" if captured else "voided"),
        },
    }


def _get_hold() -> JsonObject:
    return {
        "operationId": "getHold",
        "tags": ["holds"],
        "summary": "Read a hold and its status",
        "security": list(API_SECURITY),
        "parameters": [_hold_id_parameter()],
        "responses": {
            "200": _json_response("The hold.", "Hold"),
            "400": _problem_response("The id is not a UUID.", 400, ("INVALID_HOLD_ID",)),
            "401": _ref("responses", "Unauthorized"),
            "404": _problem_response("No hold has this id.", 404, ("HOLD_NOT_FOUND",)),
            "503": _ref("responses", "Unavailable"),
        },
    }


def _service_paths() -> JsonObject:
    return {
        "/healthz": {
            "get": {
                "operationId": "healthz",
                "tags": ["service"],
                "summary": "Liveness",
                "responses": {
                    "200": _json_response("The process is up.", "HealthStatus"),
                    "503": _problem_response(
                        "Draining after SIGTERM: send requests to another process.",
                        503,
                        ("UNAVAILABLE",),
                        ("Retry-After",),
                    ),
                },
            }
        },
        "/readyz": {
            "get": {
                "operationId": "readyz",
                "tags": ["service"],
                "summary": "Readiness: storage reachable and engine accepting work",
                "responses": {
                    "200": _json_response("Ready.", "ReadyStatus"),
                    "503": _problem_response("Not ready.", 503, ("UNAVAILABLE",), ("Retry-After",)),
                },
            }
        },
        "/metrics": {
            "get": {
                "operationId": "metrics",
                "tags": ["service"],
                "summary": "Prometheus metrics",
                "responses": {
                    "200": {
                        "description": "Prometheus text exposition format "
                        "(`text/plain; version=0.0.4`).",
                        "headers": _header_refs(()),
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
    }


def _docs_paths() -> JsonObject:
    return {
        OPENAPI_PATH: {
            "get": {
                "operationId": "getOpenApiDocument",
                "tags": ["docs"],
                "summary": "This document",
                "responses": {
                    "200": {
                        "description": "OpenAPI 3.1 document.",
                        "headers": _header_refs(()),
                        "content": {JSON: {"schema": {"type": "object"}}},
                    }
                },
            }
        },
        DOCS_PATH: {
            "get": {
                "operationId": "getDocsPage",
                "tags": ["docs"],
                "summary": "Interactive docs (Swagger UI, served locally)",
                "responses": {
                    "200": {
                        "description": "HTML page.",
                        "headers": _header_refs(()),
                        "content": {"text/html": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        DOCS_STATIC_PREFIX + "{asset}": {
            "get": {
                "operationId": "getDocsAsset",
                "tags": ["docs"],
                "summary": "A static file of the docs page",
                "parameters": [
                    {
                        "name": "asset",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string", "enum": sorted(DOCS_ASSETS)},
                    }
                ],
                "responses": {
                    "200": {
                        "description": "The file.",
                        "headers": _header_refs(()),
                        "content": {
                            media_type: {"schema": {"type": "string"}}
                            for media_type in sorted(set(DOCS_ASSETS.values()))
                        },
                    },
                    "404": _ref("responses", "NotFound"),
                },
            }
        },
    }


def _paths() -> JsonObject:
    wallet = "/api/v1/wallets/{wallet_id}"
    return {
        "/api/v1/wallets": {"post": _create_wallet()},
        wallet: {"get": _get_wallet()},
        wallet + "/operation": {"post": _apply_operation()},
        wallet + "/operations": {"get": _list_operations()},
        "/api/v1/operations/bulk": {"post": _bulk_operations()},
        "/api/v1/events": {"get": _list_events()},
        "/api/v1/events/stream": {"get": _stream_events()},
        "/api/v1/transfers": {"post": _create_transfer()},
        "/api/v1/transfers/{transfer_id}": {"get": _get_transfer()},
        wallet + "/holds": {"post": _create_hold()},
        "/api/v1/holds/{hold_id}": {"get": _get_hold()},
        "/api/v1/holds/{hold_id}/capture": {"post": _resolve_hold("capture")},
        "/api/v1/holds/{hold_id}/void": {"post": _resolve_hold("void")},
        **_service_paths(),
        **_docs_paths(),
    }


def _api_version() -> str:
    try:
        return importlib.metadata.version("walletd")
    except importlib.metadata.PackageNotFoundError:
        # Running from a source tree that was never installed.
        return "0.0.0"


DESCRIPTION: Final = """\
Wallet balances with exact decimal arithmetic.

* Money in responses is a string with exactly 2 fractional digits (`"1000.00"`).
* Every error is RFC 9457 problem JSON (`application/problem+json`) with a stable `code`.
  An unknown route is 404 `NOT_FOUND`; a wrong method is 405 `METHOD_NOT_ALLOWED` with an
  `Allow` header (see `components.responses`).
* Every response carries `X-Request-Id` (echoed, or generated when absent).
* Bearer auth applies to `/api/v1/...` only, and only when the server runs with
  `WALLETD_API_KEYS` set; otherwise those routes are open.
"""


def build_openapi_document() -> dict[str, Any]:
    """Return a new OpenAPI 3.1.0 document for every walletd route."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "walletd",
            "version": _api_version(),
            "description": DESCRIPTION,
        },
        "servers": [{"url": "/"}],
        "tags": [
            {"name": "wallets", "description": "Wallets and their operations"},
            {"name": "feed", "description": "Every committed change, in order"},
            {"name": "transfers", "description": "Money moved between wallets"},
            {"name": "holds", "description": "Money reserved, then captured or released"},
            {"name": "service", "description": "Health and metrics"},
            {"name": "docs", "description": "This document and its docs page"},
        ],
        "paths": _paths(),
        "components": {
            "schemas": _schemas(),
            "parameters": _parameters(),
            "headers": _headers(),
            "responses": _responses(),
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "One of the comma-separated keys in WALLETD_API_KEYS; "
                    "required only when that variable is set.",
                }
            },
        },
    }


@functools.cache
def openapi_json_bytes() -> bytes:
    """The document as JSON, built once per process: it only changes with the code."""
    return orjson.dumps(build_openapi_document(), option=orjson.OPT_INDENT_2)
