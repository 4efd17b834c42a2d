"""What both ends of an HTTP/2 connection do the same way: framing by ``h2``, flow control.

``h2`` (python-hyper) parses and writes every frame and header block; this module gives it a
transport: bytes in, events out, bytes out, and the two kinds of back-pressure HTTP/2 has —
a peer's window (wait for WINDOW_UPDATE before sending more DATA) and our own (acknowledge
received DATA only as it is read, so a reader that stops stops its sender).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

import h2.connection
import h2.events
import h2.exceptions

# Our receive window for the whole connection: large, so one stream whose reader stopped does
# not stall the others (each stream's own window stays at the default 64 KiB, which bounds
# what a stalled stream can hold).
CONNECTION_WINDOW = 2**24
MAX_FRAME = 2**14  # the default SETTINGS_MAX_FRAME_SIZE; larger frames are refused


class Connection(h2.connection.H2Connection):
    """``h2``'s connection, remembering fewer closed streams. It keeps how each closed stream
    ended, to answer a frame that arrives for it late, and by default 65,536 of them: a kept-
    alive connection grew by some 100 bytes a request up to ~6 MB, so a sidecar's memory
    climbed for hours under HTTP/2 load (issue 30). Ten times the streams a peer may have
    open at once covers what is still in flight when a stream closes (nghttp2 keeps about as
    many as may be open)."""

    MAX_CLOSED_STREAMS = 1024


class StreamGone(ConnectionResetError):
    """The stream was reset or its connection closed while we were writing to it."""


class H2Body:
    """A stream's body as it arrives: read like aiohttp's ``StreamReader``; each piece read is
    acknowledged to the peer (WINDOW_UPDATE), and nothing else is."""

    __slots__ = ("_acknowledge", "_chunks", "_eof", "_exception", "_waiter")

    def __init__(self, acknowledge: Callable[[int], None]):
        self._acknowledge = acknowledge
        self._chunks: deque[tuple[bytes, int]] = deque()
        self._eof = False
        self._exception: BaseException | None = None
        self._waiter: asyncio.Future | None = None

    # -- the connection's side --------------------------------------------------------------
    def feed(self, data: bytes, flow_controlled: int) -> None:
        if self._eof or self._exception is not None:
            self._acknowledge(flow_controlled)  # nobody will read it: give the window back
            return
        self._chunks.append((data, flow_controlled))
        self._wake()

    def feed_eof(self) -> None:
        self._eof = True
        self._wake()

    def set_exception(self, exc: BaseException) -> None:
        if not self._eof and self._exception is None:
            self._exception = exc
            self._wake()

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- the reader's side (aiohttp StreamReader's names) ---------------------------------
    def is_eof(self) -> bool:
        return self._eof and not self._chunks

    def exception(self) -> BaseException | None:
        return self._exception

    def read_nowait(self, n: int = -1) -> bytes:
        parts, acknowledged = [], 0
        while self._chunks:
            data, flow = self._chunks.popleft()
            parts.append(data)
            acknowledged += flow
        if acknowledged:
            self._acknowledge(acknowledged)
        return b"".join(parts)

    async def readany(self) -> bytes:
        while not self._chunks:
            if self._exception is not None:
                raise self._exception
            if self._eof:
                return b""
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        data, flow = self._chunks.popleft()
        if flow:
            self._acknowledge(flow)
        return data

    async def read(self) -> bytes:
        parts = []
        while data := await self.readany():
            parts.append(data)
        return b"".join(parts)


class H2Peer(asyncio.Protocol):
    """One HTTP/2 connection's transport, ``h2`` state machine and write-side back-pressure."""

    def __init__(self, conn: h2.connection.H2Connection):
        self.h2 = conn
        self.transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self._paused = False
        self._drained: asyncio.Future | None = None
        self._windows: dict[int, asyncio.Future] = {}  # stream id → waiting for a window
        self._flush_pending = False
        self.closed = False
        self.done_writing = False  # the GOAWAY went out and our side is shut: write nothing more

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        """Bytes in, ``h2``'s events out, each to :meth:`on_event`, and what they made us
        frame written; a protocol error goes to :meth:`protocol_error` (``h2`` has queued the
        GOAWAY that says why)."""
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self.protocol_error(exc)
            return
        for event in events:
            self.on_event(event)
        self.flush()

    def on_event(self, event: h2.events.Event) -> None:
        raise NotImplementedError

    def protocol_error(self, exc: h2.exceptions.ProtocolError) -> None:
        raise NotImplementedError

    def eof_received(self) -> bool | None:
        return None  # a half-closed HTTP/2 connection is over: close it

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        self.transport = None
        self._wake_all()
        # ``h2`` keeps its frame handlers as bound methods in a table of its own: a cycle
        # that holds the connection's HPACK tables and streams until the cycle collector
        # runs, which for long-lived garbage is rarely (memory climbed under load). No frame
        # is read after the connection is lost, so the table can go. (Private to h2, pinned
        # <5 in pyproject.toml; tests/security/test_memory.py fails if it stops working.)
        handlers = getattr(self.h2, "_frame_dispatch_table", None)
        if isinstance(handlers, dict):
            handlers.clear()

    def flush(self) -> None:
        """Write what ``h2`` has framed — once per turn of the event loop, however many frames
        were made in it (one TLS record and one send, not one per frame)."""
        if not self._flush_pending:
            self._flush_pending = True
            self._loop.call_soon(self.flush_now)

    def flush_now(self) -> None:
        self._flush_pending = False
        data = self.h2.data_to_send()
        if data and not self.done_writing and self.transport is not None \
                and not self.transport.is_closing():
            self.transport.write(data)

    # -- back-pressure: the socket -----------------------------------------------------------
    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        drained, self._drained = self._drained, None
        if drained is not None and not drained.done():
            drained.set_result(None)

    async def drain(self) -> None:
        if self._paused and self.transport is not None:
            if self._drained is None:
                self._drained = self._loop.create_future()
            await asyncio.shield(self._drained)

    # -- back-pressure: the peer's windows ---------------------------------------------------
    def window_opened(self, stream_id: int | None = None) -> None:
        """A WINDOW_UPDATE or a new SETTINGS arrived: let writers look again."""
        if stream_id:
            waiter = self._windows.pop(stream_id, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        else:
            self._wake_all()

    def _wake_all(self) -> None:
        windows, self._windows = self._windows, {}
        for waiter in windows.values():
            if not waiter.done():
                waiter.set_result(None)
        drained, self._drained = self._drained, None
        if drained is not None and not drained.done():
            drained.set_result(None)

    async def send_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        """Send ``data`` on a stream as fast as the peer's windows and our socket allow."""
        view = memoryview(data)
        while True:
            if self.closed:
                raise StreamGone("the connection closed")
            try:
                window = self.h2.local_flow_control_window(stream_id)
            except h2.exceptions.StreamClosedError:
                raise StreamGone("the stream was reset") from None
            size = min(window, self.h2.max_outbound_frame_size, len(view))
            if size > 0 or (not view and end_stream):
                try:
                    self.h2.send_data(stream_id, bytes(view[:size]),
                                      end_stream=end_stream and size == len(view))
                except h2.exceptions.StreamClosedError:
                    raise StreamGone("the stream was reset") from None
                view = view[size:]
                self.flush()
                if not view:
                    break
                continue
            if not view:
                break
            waiter = self._windows.get(stream_id)
            if waiter is None:
                waiter = self._windows[stream_id] = self._loop.create_future()
            await waiter
        await self.drain()

    def reset(self, stream_id: int, code: int) -> None:
        """RST_STREAM, if the stream is still open on either side."""
        try:
            self.h2.reset_stream(stream_id, code)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            return
        self.flush()

    def acknowledge(self, stream_id: int, size: int) -> None:
        """``size`` bytes of DATA on ``stream_id`` were read: open the windows again."""
        if self.closed:
            return
        try:  # a closed stream's bytes still count for the connection's window (h2 sees to it)
            self.h2.acknowledge_received_data(size, stream_id)
        except h2.exceptions.ProtocolError:
            return
        self.flush()
