"""Checking that a webhook request came from walletd: ``verify_webhook_signature``.

walletd signs each webhook request's body with the subscription's secret, Stripe-style::

    Walletd-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<raw body>")>

Verify the raw bytes as received (before any JSON parsing), and refuse a timestamp older
than the tolerance, so that a captured request cannot be replayed later.
"""

from __future__ import annotations

import hashlib
import hmac
import time

__all__ = ["SIGNATURE_HEADER", "verify_webhook_signature"]

SIGNATURE_HEADER = "Walletd-Signature"


def verify_webhook_signature(
    payload: bytes | str,
    header: str,
    secret: str,
    tolerance_s: float = 300,
    *,
    now_s: float | None = None,
) -> bool:
    """True when ``header`` (the Walletd-Signature value) signs ``payload`` with ``secret``
    and its timestamp is within ``tolerance_s`` of now (``now_s``, for tests)."""
    body = payload.encode() if isinstance(payload, str) else payload
    timestamp_text = None
    signatures: list[str] = []
    for part in header.split(","):
        name, sep, value = part.strip().partition("=")
        if not sep:
            continue
        if name == "t":
            timestamp_text = value
        elif name == "v1":
            signatures.append(value)
    if timestamp_text is None or not timestamp_text.isascii() or not timestamp_text.isdigit():
        return False
    if len(timestamp_text) > 12 or not signatures:
        return False
    now = time.time() if now_s is None else now_s
    if abs(now - int(timestamp_text)) > tolerance_s:
        return False
    expected = hmac.new(
        secret.encode(), timestamp_text.encode() + b"." + body, hashlib.sha256
    ).hexdigest()
    # Every candidate compared (a rotated secret may sign twice), in constant time.
    matched = False
    for signature in signatures:
        if hmac.compare_digest(signature.encode(), expected.encode()):
            matched = True
    return matched
