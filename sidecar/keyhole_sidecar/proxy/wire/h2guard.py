"""The few frames libnghttp2 lets pass that RFC 9113 says an endpoint MUST refuse.

libnghttp2 forgets a stream once it closes and ignores what arrives for it later, and ignores
PRIORITY frames; nghttpx shares both leniencies (h2spec: five cases fail against it). keyhole's
HTTP/2 server refused all of them before it framed with libnghttp2, and a client that sends
them is broken or probing, so the client's bytes pass this guard first. It reads each frame's
header with ``hyperframe`` (and the few bytes of a PRIORITY or WINDOW_UPDATE payload), and
says what to do; every other byte goes to ``ngh2`` as it arrives, unread:

- DATA or HEADERS on a stream the client reset, or that both sides ended: connection error
  STREAM_CLOSED (RFC 9113 §5.1); on a stream keyhole reset, ignored (the client may not have
  seen the reset yet).
- HEADERS opening a stream numbered below one it already opened: PROTOCOL_ERROR (§5.1.1).
- HEADERS opening more streams than SETTINGS_MAX_CONCURRENT_STREAMS allows: PROTOCOL_ERROR
  (§5.1.2; libnghttp2 refuses each stream over the limit before its SETTINGS are
  acknowledged, and an attacker need not acknowledge them).
- A frame on a stream its type may not use (PRIORITY on stream 0, GOAWAY on a stream:
  ``hyperframe`` refuses its header), or a PRIORITY making a stream depend on itself:
  PROTOCOL_ERROR (§6, §5.3.1).
- WINDOW_UPDATE that takes a stream's window past 2^31-1: that stream is reset with
  FLOW_CONTROL_ERROR and the frame goes no further (§6.9.1). The window is libnghttp2's, read
  when the bytes before the frame have reached it: the guard hands back a :class:`Window`.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from hyperframe.exceptions import InvalidDataError
from hyperframe.frame import Frame

PREFACE_LENGTH = 24  # "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
HEADER_LENGTH = 9
MAX_WINDOW = 2**31 - 1
REMEMBERED = 1024  # closed streams whose ending is remembered (ten times those open at once)
_DATA, _HEADERS, _PRIORITY, _RST_STREAM, _WINDOW_UPDATE = 0x0, 0x1, 0x2, 0x3, 0x8
_READ = {_PRIORITY, _WINDOW_UPDATE}  # frames whose payload the guard reads (5 and 4 bytes)
PROTOCOL_ERROR, FLOW_CONTROL_ERROR, STREAM_CLOSED = 0x1, 0x3, 0x5


@dataclass(frozen=True)
class Refusal:
    """The client broke one of the rules: ``code`` for the whole connection, or for
    ``stream_id`` alone (its frame dropped)."""

    code: int
    why: str
    stream_id: int = 0


@dataclass(frozen=True)
class Window:
    """A WINDOW_UPDATE on a stream: the connection passes ``frame`` on unless it takes the
    stream's window past 2^31-1 (:func:`overflows`)."""

    stream_id: int
    increment: int
    frame: bytes

    def overflows(self, window: int | None) -> bool:
        return window is not None and window + self.increment > MAX_WINDOW


class FrameGuard:
    """One client connection's frames, as they arrive."""

    def __init__(self, max_streams: int):
        self._max_streams = max_streams
        self._skip = PREFACE_LENGTH  # checked by the door before this connection was made
        self._header = b""
        self._left = 0  # payload bytes of the current frame still to pass on
        self._frame: Frame | None = None  # a frame whose payload is being read
        self._payload = b""
        self._highest = 0
        self._open: set[int] = set()
        self._closed: OrderedDict[int, bool] = OrderedDict()  # stream → frames are an error

    # -- what the connection tells it ------------------------------------------------------
    def closed(self, stream_id: int, by_us: bool) -> None:
        """The stream closed: keyhole reset it (``by_us``: late frames are ignored), or the
        client reset it or both ended it (late DATA or HEADERS are its error)."""
        self._open.discard(stream_id)
        self._closed[stream_id] = not by_us
        self._closed.move_to_end(stream_id)
        while len(self._closed) > REMEMBERED:
            self._closed.popitem(last=False)

    # -- the client's bytes --------------------------------------------------------------------
    def feed(self, data: bytes) -> list[bytes | Refusal | Window]:
        """In order: bytes to hand to ``ngh2``, what the client broke (a connection refusal
        is last: nothing after it is passed) and stream WINDOW_UPDATEs to weigh."""
        out: list[bytes | Refusal | Window] = []
        view = memoryview(data)
        while view:
            if self._skip:
                taken = min(self._skip, len(view))
                out.append(bytes(view[:taken]))
                self._skip -= taken
                view = view[taken:]
            elif self._left and self._frame is None:  # a payload passed on unread
                taken = min(self._left, len(view))
                out.append(bytes(view[:taken]))
                self._left -= taken
                view = view[taken:]
            elif self._frame is not None:  # a payload read before deciding
                taken = min(self._left, len(view))
                self._payload += bytes(view[:taken])
                self._left -= taken
                view = view[taken:]
                if not self._left:
                    verdict = self._judge_payload()
                    out.append(self._header + self._payload if verdict is None else verdict)
                    self._frame, self._header, self._payload = None, b"", b""
                    if isinstance(verdict, Refusal):
                        break
            else:
                taken = min(HEADER_LENGTH - len(self._header), len(view))
                self._header += bytes(view[:taken])
                view = view[taken:]
                if len(self._header) < HEADER_LENGTH:
                    break
                # an unknown type is an ExtensionFrame: passed on for libnghttp2 to ignore
                try:
                    frame, length = Frame.parse_frame_header(memoryview(self._header))
                except InvalidDataError:  # a stream its type may not have (RFC 9113 §6)
                    out.append(Refusal(PROTOCOL_ERROR, "a frame on a stream its type may not "
                                                       "be sent on"))
                    break
                refusal = self._judge_header(frame)
                if refusal is not None:
                    out.append(refusal)
                    break
                self._left = length
                if frame.type in _READ and 0 < length <= 16:  # longer: libnghttp2 refuses it
                    self._frame = frame
                else:
                    out.append(self._header)
                    self._header = b""
        return _joined(out)

    def _judge_header(self, frame: Frame) -> Refusal | None:
        stream_id = frame.stream_id
        if frame.type == _RST_STREAM and stream_id:  # what follows for it is an error
            self.closed(stream_id, by_us=False)
            return None
        if frame.type not in (_DATA, _HEADERS):
            return None
        if self._closed.get(stream_id):
            return Refusal(STREAM_CLOSED, f"a frame on stream {stream_id}, which it had closed")
        if frame.type == _HEADERS and stream_id not in self._open:
            if stream_id in self._closed:
                return None  # keyhole reset it: the client may not know yet
            if stream_id < self._highest:
                return Refusal(PROTOCOL_ERROR, f"stream {stream_id} opened after stream "
                                               f"{self._highest}")
            if len(self._open) >= self._max_streams:
                return Refusal(PROTOCOL_ERROR, f"more than {self._max_streams} streams at once")
            self._highest = stream_id
            self._open.add(stream_id)
        return None

    def _judge_payload(self) -> Refusal | Window | None:
        frame = self._frame
        assert frame is not None
        try:
            frame.parse_body(memoryview(self._payload))
        except Exception:
            return None
        if frame.type == _PRIORITY:
            if frame.depends_on == frame.stream_id:
                return Refusal(PROTOCOL_ERROR, f"stream {frame.stream_id} made to depend on "
                                               "itself")
            return None
        if frame.stream_id:  # WINDOW_UPDATE on a stream
            return Window(frame.stream_id, frame.window_increment, self._header + self._payload)
        return None


def _joined(items: list[bytes | Refusal | Window]) -> list[bytes | Refusal | Window]:
    """Adjacent bytes as one piece: ``ngh2`` is handed each read once when nothing is held."""
    out: list[bytes | Refusal | Window] = []
    run: list[bytes] = []
    for item in items:
        if isinstance(item, bytes):
            run.append(item)
            continue
        if run:
            out.append(b"".join(run))
            run = []
        out.append(item)
    if run:
        out.append(b"".join(run))
    return out
