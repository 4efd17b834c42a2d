"""An HTTP/2 client that sends whatever frames a test says, valid or not: the attacker's tool.

Frames are built by ``hyperframe`` and header blocks by ``hpack`` (the libraries ``h2`` stands
on), so the bytes are exactly the frames named; what comes back is parsed by them too.
"""

from __future__ import annotations

import socket
import time

import hpack
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
ENHANCE_YOUR_CALM = 0xB


class RawH2:
    """One HTTP/2 connection (h2c, prior knowledge) to 127.0.0.1:``port``."""

    def __init__(self, port: int, *, initial_window: int | None = None):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.encoder = hpack.Encoder()
        self.frames: list[Frame] = []
        self._buffer = b""
        settings = SettingsFrame(0)
        if initial_window is not None:
            settings.settings = {SettingsFrame.INITIAL_WINDOW_SIZE: initial_window}
        self.sock.sendall(PREFACE + settings.serialize())
        self.closed = False

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawH2:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- sending -------------------------------------------------------------------------------
    def send(self, *frames: Frame) -> bool:
        """Send frames; False once the peer has closed the connection."""
        try:
            self.sock.sendall(b"".join(f.serialize() for f in frames))
            return True
        except OSError:
            self.closed = True
            return False

    def request_block(self, path: str, extra: list[tuple[str, str]] = ()) -> bytes:
        return self.encoder.encode([(":method", "GET"), (":scheme", "http"),
                                    (":authority", "127.0.0.1"), (":path", path), *extra])

    def headers(self, stream_id: int, path: str, *, end_stream: bool = True,
                extra: list[tuple[str, str]] = ()) -> HeadersFrame:
        frame = HeadersFrame(stream_id, self.request_block(path, extra))
        frame.flags.add("END_HEADERS")
        if end_stream:
            frame.flags.add("END_STREAM")
        return frame

    @staticmethod
    def rst(stream_id: int, code: int = 0x8) -> RstStreamFrame:
        return RstStreamFrame(stream_id, error_code=code)

    @staticmethod
    def ping(n: int) -> PingFrame:
        return PingFrame(0, opaque_data=n.to_bytes(8, "big"))

    @staticmethod
    def settings() -> SettingsFrame:
        return SettingsFrame(0)

    @staticmethod
    def continuation(stream_id: int, data: bytes) -> ContinuationFrame:
        return ContinuationFrame(stream_id, data)

    @staticmethod
    def window_update(stream_id: int, increment: int) -> WindowUpdateFrame:
        return WindowUpdateFrame(stream_id, window_increment=increment)

    @staticmethod
    def data(stream_id: int, data: bytes, end_stream: bool = False) -> DataFrame:
        frame = DataFrame(stream_id, data)
        if end_stream:
            frame.flags.add("END_STREAM")
        return frame

    # -- receiving -----------------------------------------------------------------------------
    def read(self, until, timeout: float = 10.0) -> bool:
        """Read frames until ``until(frames)`` holds or the connection closes; True if it held."""
        deadline = time.monotonic() + timeout
        while not until(self.frames):
            if self.closed:
                return False
            self.sock.settimeout(max(deadline - time.monotonic(), 0.01))
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                return until(self.frames)
            except OSError:
                data = b""
            if not data:
                self.closed = True
                return until(self.frames)
            self._buffer += data
            while len(self._buffer) >= 9:
                frame, length = Frame.parse_frame_header(memoryview(self._buffer[:9]))
                if len(self._buffer) < 9 + length:
                    break
                frame.parse_body(memoryview(self._buffer[9:9 + length]))
                self._buffer = self._buffer[9 + length:]
                self.frames.append(frame)
            if time.monotonic() > deadline:
                return until(self.frames)
        return True

    def goaway(self, timeout: float = 10.0) -> GoAwayFrame | None:
        """The GOAWAY the peer sent (reading until it comes or the connection closes)."""
        self.read(lambda frames: any(isinstance(f, GoAwayFrame) for f in frames), timeout)
        return next((f for f in self.frames if isinstance(f, GoAwayFrame)), None)

    def answered(self, stream_id: int, timeout: float = 10.0) -> bool:
        """Did a HEADERS frame come back on ``stream_id``?"""
        return self.read(lambda frames: any(isinstance(f, HeadersFrame)
                                            and f.stream_id == stream_id for f in frames),
                         timeout)
