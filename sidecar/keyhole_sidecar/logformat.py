"""The sidecar's own log (stderr) as text for people or as one JSON object per line for log
collectors (``--log-format json``). The audit log on stdout is JSON either way.

No secret is in any line, at any level. Libraries on the data path log what they handle at
DEBUG (``hpack`` every header it encodes, the key among them), so ``--log-level debug`` is
keyhole's own debug: other loggers stay at INFO and the HTTP/2 ones at WARNING. And whatever a
logger writes, every record passes :class:`SecretScrubber` on its way out, which masks every
form of every secret being served, as answers are masked.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable

from keyhole_sidecar.redact import Redactor

# Loggers that write what they frame or send (header blocks, frames, request lines) at DEBUG.
QUIET_LIBRARIES = ("hpack", "h2", "hyperframe", "urllib3", "opentelemetry", "aiohttp.access")


class SecretScrubber(logging.Filter):
    """Masks every form of the secrets being served in a record's message and traceback.
    ``source`` gives the redactor of the moment (the routes change on reload, minted tokens
    on refresh); until it is set, records pass as they are (nothing is served yet)."""

    def __init__(self):
        super().__init__()
        self.source: Callable[[], Redactor] | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if self.source is None:
            return True
        redactor = self.source()
        if not redactor:
            return True
        message = record.getMessage()
        if redactor.found_in_text(message):
            record.msg, record.args = redactor.redact_text(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text and redactor.found_in_text(record.exc_text):
            record.exc_text = redactor.redact_text(record.exc_text)
        if record.stack_info and redactor.found_in_text(record.stack_info):
            record.stack_info = redactor.redact_text(record.stack_info)
        return True


SCRUBBER = SecretScrubber()

TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonLines(logging.Formatter):
    """``{"time", "level", "logger", "message"[, "exception"]}`` on one line: newlines inside
    a message or a traceback are escaped by JSON, never written raw."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info or record.exc_text:  # the scrubbed text when the scrubber made one
            line["exception"] = record.exc_text or self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def configure(level: str, form: str) -> None:
    """Send every logger's records to stderr at ``level``, as ``form`` (text or json)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLines() if form == "json" else logging.Formatter(TEXT))
    handler.addFilter(SCRUBBER)
    wanted = logging.getLevelName(level.upper())
    logging.basicConfig(level=max(wanted, logging.INFO), handlers=[handler], force=True)
    logging.getLogger("keyhole").setLevel(wanted)
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(logging.WARNING)
