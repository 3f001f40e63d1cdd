"""aiohttp's own log of requests it refuses before walletd sees them, cut to one line.

aiohttp answers a malformed request (a bad request line or header, an HTTP/2 preface, too
many headers) with 400 itself and logs it on ``aiohttp.server`` at ERROR with a full
traceback: about a dozen lines per request, for a fault of the client's, which any client,
keyed or not, can send in a loop. The filter keeps the record (an operator still sees the
probe) as one INFO line naming the reason, without the traceback; every other record of
that logger, an unhandled exception in walletd's code above all, is left as it is.
"""

from __future__ import annotations

import logging
from typing import Final

from aiohttp.http_exceptions import HttpProcessingError

__all__ = ["SERVER_LOGGER_NAME", "MalformedRequestFilter", "quiet_malformed_requests"]

SERVER_LOGGER_NAME: Final = "aiohttp.server"
# The reason aiohttp gives can quote the offending bytes; a line stays a line.
_REASON_CHARS_MAX: Final = 200


class MalformedRequestFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError):
            reason = " ".join(str(error.message).split())[:_REASON_CHARS_MAX]
            said = record.getMessage()
            record.msg, record.args = "%s (answered %d: %s)", (said, error.code, reason)
            record.exc_info = None
            record.exc_text = None
            record.levelno, record.levelname = logging.INFO, logging.getLevelName(logging.INFO)
        return True


def quiet_malformed_requests() -> None:
    """Install the filter on aiohttp's server logger, once."""
    logger = logging.getLogger(SERVER_LOGGER_NAME)
    if not any(isinstance(f, MalformedRequestFilter) for f in logger.filters):
        logger.addFilter(MalformedRequestFilter())
