"""A ``text/event-stream`` cut into whole events, each kept as the bytes that came, so an
event the policy leaves alone goes on unchanged and one it changes is written afresh.

Lines end in CRLF, LF or CR (WHATWG HTML, *Server-sent events*); an empty line ends an event.
An event that grows past ``limit`` without ending cannot be judged: :class:`EventTooLarge`.
"""

from __future__ import annotations

import re
from collections.abc import Callable

_LINE_END = re.compile(rb"\r\n|\r|\n")


class EventTooLarge(ValueError):
    """An event longer than the limit: the stream cannot be judged past it."""


class EventStream:
    def __init__(self, limit: int):
        self.limit = limit
        self._pending = b""  # the bytes of the event in progress
        self._scanned = 0  # where in _pending the search for its end resumes

    def feed(self, chunk: bytes) -> list[bytes]:
        """The events ``chunk`` completed, each with its closing blank line."""
        buffer = self._pending + chunk
        events, start, position = [], 0, self._scanned
        line_start = position
        while (found := _LINE_END.search(buffer, position)) is not None:
            if found.group() == b"\r" and found.end() == len(buffer):
                break  # a CR at the very end may be the first half of a CRLF
            if found.start() == line_start:  # an empty line: the event ends here
                events.append(buffer[start:found.end()])
                start = found.end()
            position = line_start = found.end()
        self._pending = buffer[start:]
        self._scanned = line_start - start
        if len(self._pending) > self.limit:
            raise EventTooLarge(f"an event over {self.limit >> 20} MiB")
        return events

    def rest(self) -> bytes:
        """What came after the last complete event (an unterminated one, passed as it is)."""
        rest, self._pending, self._scanned = self._pending, b"", 0
        return rest


def fields(event: bytes) -> tuple[str, str]:
    """An event's name (``message`` when it names none) and its data."""
    name, data = "message", []
    for line in _LINE_END.split(event):
        if line.startswith(b"event:"):
            name = line[6:].removeprefix(b" ").decode("utf-8", "replace")
        elif line.startswith(b"data:") or line == b"data":
            data.append(line[5:].removeprefix(b" ").decode("utf-8", "replace"))
    return name, "\n".join(data)


def event(data: str) -> bytes:
    """A ``message`` event carrying ``data`` (one JSON-RPC message: one line)."""
    return b"event: message\ndata: " + data.encode() + b"\n\n"


def rewrite(event: bytes, change: Callable[[str], str | None]) -> bytes:
    """``event`` with its data replaced by ``change(data)``, or unchanged when that is None
    (or the event has no data). Its other fields (id, event, retry) and comments keep their
    order; the new data is written as one ``data:`` line per line of it."""
    lines = _LINE_END.split(event)
    data = [line[5:].removeprefix(b" ") for line in lines if line.startswith(b"data:")
            or line == b"data"]
    if not data:
        return event
    replaced = change(b"\n".join(data).decode("utf-8", "replace"))
    if replaced is None:
        return event
    out, written = [], False
    for line in lines:
        if line.startswith(b"data:") or line == b"data":
            if not written:
                out.extend(b"data: " + part.encode() for part in replaced.split("\n"))
                written = True
        elif line:
            out.append(line)
    return b"\n".join(out) + b"\n\n"
