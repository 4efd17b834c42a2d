"""The log of aiohttp's protocol layer, made safe to expose to a hostile client.

aiohttp logs every malformed request as an ERROR with a full traceback; an agent could flood
the sidecar's log at will. Here each becomes one WARNING line (exception type and the first
160 characters of its message, no traceback), at most a few per second; the rest are counted.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

BURST = 5
PER_SECOND = 2.0


class OneLineRateLimited(logging.Filter):
    def __init__(self, on_refused: Callable[[], None] | None = None):
        super().__init__()
        self._tokens = float(BURST)
        self._last = time.monotonic()
        self._dropped = 0
        self._on_refused = on_refused

    def filter(self, record: logging.LogRecord) -> bool:
        if self._on_refused is not None:
            self._on_refused()
        now = time.monotonic()
        self._tokens = min(BURST, self._tokens + (now - self._last) * PER_SECOND)
        self._last = now
        if self._tokens < 1:
            self._dropped += 1
            return False
        self._tokens -= 1
        exc = record.exc_info[1] if record.exc_info else None
        detail = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}" if exc else \
            record.getMessage()[:160]
        suppressed = f" ({self._dropped} more since the last line)" if self._dropped else ""
        self._dropped = 0
        record.msg = f"refused a malformed or broken request: {detail}{suppressed}"
        record.args = ()
        record.exc_info = None
        record.exc_text = None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def protocol_logger(on_refused: Callable[[], None] | None = None) -> logging.Logger:
    logger = logging.getLogger("keyhole.http")
    logger.filters.clear()
    logger.addFilter(OneLineRateLimited(on_refused))
    return logger
