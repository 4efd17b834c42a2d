"""Server-sent events split incrementally from a byte stream (the WHATWG ``text/event-stream``
format): only what counting needs — the ``event`` name and the joined ``data`` lines."""

from __future__ import annotations

from collections.abc import Iterator

MAX_EVENT = 1 << 20  # an event larger than this is dropped rather than held (usage is small)


class EventSplitter:
    """Feed it chunks cut anywhere; it yields each complete event once its blank line came."""

    def __init__(self) -> None:
        self._pending = b""
        self._event = ""
        self._data: list[str] = []
        self._size = 0
        self.dropped = 0  # events over MAX_EVENT, skipped

    def feed(self, chunk: bytes) -> Iterator[tuple[str, str]]:
        """(event name, data) for each event completed by ``chunk``."""
        buffer = self._pending + chunk if self._pending else chunk
        start = 0
        while True:
            end = buffer.find(b"\n", start)
            if end < 0:
                break
            line = buffer[start:end]
            start = end + 1
            if line.endswith(b"\r"):
                line = line[:-1]
            event = self._line(line)
            if event is not None:
                yield event
        rest = buffer[start:]
        if len(rest) + self._size > MAX_EVENT:  # a line that never ends: do not hold it
            self._skip()
            rest = b""
        self._pending = rest

    def _line(self, line: bytes) -> tuple[str, str] | None:
        if not line:  # the blank line that ends an event
            if not self._data:
                self._event = ""
                return None
            event = (self._event or "message", "\n".join(self._data))
            self._event, self._data, self._size = "", [], 0
            return event
        if line.startswith(b":"):
            return None  # a comment (keep-alive)
        name, _, value = line.partition(b":")
        if value.startswith(b" "):
            value = value[1:]
        self._size += len(value)
        if self._size > MAX_EVENT:
            self._skip()
            return None
        if name == b"data":
            self._data.append(value.decode("utf-8", "replace"))
        elif name == b"event":
            self._event = value.decode("utf-8", "replace")
        return None

    def _skip(self) -> None:
        self.dropped += 1
        self._event, self._data, self._size = "", [], 0
