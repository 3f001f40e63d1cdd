"""RFC 3339 instants at the edge: parsed strictly, to integer microseconds since the epoch.

Fractions finer than a microsecond are cut, not rounded: the log stores microseconds, so a
row is at or before ``12:00:00.0000009`` exactly when it is at or before ``12:00:00``.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Final

from walletd.http.problems import ValidationProblem

__all__ = ["parse_instant_us"]

_RFC3339: Final = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt ]([0-9]{2}):([0-9]{2}):([0-9]{2})"
    r"(?:\.([0-9]{1,9}))?(?:([Zz])|([+-])([0-9]{2}):([0-9]{2}))"
)
_EPOCH: Final = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def parse_instant_us(field: str, text: str) -> int:
    """Microseconds since the epoch, or 422 naming ``field``."""
    match = _RFC3339.fullmatch(text)
    if match is None:
        raise _invalid(field)
    year, month, day, hour, minute, second = (int(match[i]) for i in range(1, 7))
    fraction = (match[7] or "").ljust(6, "0")[:6]
    try:
        offset = dt.timedelta(0)
        if match[9] is not None:
            offset = dt.timedelta(hours=int(match[10]), minutes=int(match[11]))
            if offset >= dt.timedelta(hours=24):
                raise ValueError
            offset = -offset if match[9] == "-" else offset
        # A leap second (:60) names the last instant of its minute.
        instant = dt.datetime(
            year, month, day, hour, minute, min(second, 59), int(fraction), dt.timezone(offset)
        )
    except ValueError:
        raise _invalid(field) from None
    if second > 60:
        raise _invalid(field)
    delta = instant - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _invalid(field: str) -> ValidationProblem:
    return ValidationProblem(
        [{"field": field, "message": "must be an RFC 3339 instant like 2025-01-31T23:59:59Z"}]
    )
