"""Server-sent events split incrementally from a byte stream (the WHATWG ``text/event-stream``
format): only what counting needs — the ``event`` name and the joined ``data`` lines."""

from __future__ import annotations

from collections.abc import Iterator

MAX_EVENT = 1 << 20  # an event larger than this is not held whole
HEAD, TAIL = 16 << 10, 256 << 10  # what is kept of one: its start, and its end


class Oversized(str):
    """The data of an event over MAX_EVENT, as much as was kept: its first HEAD and last TAIL
    bytes (``head`` and ``tail``). The usage of a model's answer sits at the end of its last
    event, so an image generation's ``response.completed`` still counts."""

    head: str
    tail: str

    def __new__(cls, head: bytes, tail: bytes) -> Oversized:
        text = super().__new__(cls, "")
        text.head = head.decode("utf-8", "replace")
        text.tail = tail.decode("utf-8", "replace")
        return text


class EventSplitter:
    """Feed it chunks cut anywhere; it yields each complete event once its blank line came:
    ``(name, data)``, where data is :class:`Oversized` for an event too large to hold."""

    def __init__(self) -> None:
        self._pending = b""
        self._event = ""
        self._data: list[str] = []
        self._size = 0
        self._head = self._tail = None  # an oversized event's kept bytes, or None
        self._long_line = False  # the pending line is past MAX_EVENT: only its ends are kept
        self.dropped = 0  # events over MAX_EVENT (yielded as Oversized)

    def feed(self, chunk: bytes) -> Iterator[tuple[str, str]]:
        """(event name, data) for each event completed by ``chunk``."""
        if self._long_line:
            end = chunk.find(b"\n")
            self._keep(chunk if end < 0 else chunk[:end])
            if end < 0:
                return
            self._long_line = False
            chunk = chunk[end + 1:]
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
        if len(rest) + self._size > MAX_EVENT:  # a line too long to hold: keep its ends
            if rest.startswith(b"data:"):
                self._oversize()
                self._keep(rest[5:].removeprefix(b" "))
            self._long_line = True
            rest = b""
        self._pending = rest

    def _oversize(self) -> None:
        """From here on this event keeps only its head and tail."""
        if self._head is None:
            joined = "\n".join(self._data).encode()
            self._head, self._tail = joined[:HEAD], joined[-TAIL:]
            self._data = []
            self.dropped += 1

    def _keep(self, data: bytes) -> None:
        if self._head is None:
            return  # not a data line: nothing of it counts
        if len(self._head) < HEAD:
            self._head += data[:HEAD - len(self._head)]
        self._tail = (self._tail + data)[-TAIL:]

    def _line(self, line: bytes) -> tuple[str, str] | None:
        if not line:  # the blank line that ends an event
            if self._head is not None:
                event = (self._event or "message", Oversized(self._head, self._tail))
                self._event, self._data, self._size = "", [], 0
                self._head = self._tail = None
                return event
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
        if name == b"data":
            if self._head is not None or self._size > MAX_EVENT:
                self._oversize()
                self._keep((b"\n" if self._tail else b"") + value)
            else:
                self._data.append(value.decode("utf-8", "replace"))
        elif name == b"event":
            self._event = value.decode("utf-8", "replace")
        return None
