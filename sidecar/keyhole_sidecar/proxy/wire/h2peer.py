"""What both ends of an HTTP/2 connection do the same way: framing by libnghttp2, flow control.

``ngh2`` (sans-I/O over libnghttp2, the C library nghttpx and curl use) parses and writes
every frame and header block, checks what a peer sends against RFC 9113 and bounds it (header
lists, CONTINUATION, SETTINGS, acknowledgements); this module gives it a transport — bytes
in, events out, bytes out — and the two kinds of back-pressure HTTP/2 has: the peer's window
(a body handed to ``ngh2`` waits in its queue until the peer's WINDOW_UPDATE lets it go; a
writer waits until its stream's queue is empty) and our own (received DATA is acknowledged
only as it is read, so a reader that stops stops its sender).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable

import ngh2

# Our receive window for the whole connection: large, so one stream whose reader stopped does
# not stall the others (each stream's own window stays at the default 64 KiB, which bounds
# what a stalled stream can hold).
CONNECTION_WINDOW = 2**24
MAX_FRAME = 2**14  # the default SETTINGS_MAX_FRAME_SIZE; larger frames are refused
# What ngh2 raises for a call on a stream (or a connection) that can no longer take it.
Gone = (ngh2.StreamProtocolError, ngh2.ConnectionStateError, ngh2.ConnectionClosingError)


def configuration(max_header_list: int) -> ngh2.Configuration:
    """Receive windows acknowledged by hand (as bodies are read); a decoded header list over
    ``max_header_list`` fails the connection (HPACK bombs); libnghttp2's other bounds as they
    come (8 CONTINUATION frames per block, 32 SETTINGS entries, 1,000 acknowledgements)."""
    return ngh2.Configuration(auto_window_update=False,
                              max_inbound_header_list_size=max_header_list)


class StreamGone(ConnectionResetError):
    """The stream was reset or its connection closed while we were writing to it."""


class H2Body:
    """A stream's body as it arrives: read like aiohttp's ``StreamReader``; each piece read is
    acknowledged to the peer (WINDOW_UPDATE), and nothing else is."""

    __slots__ = ("_acknowledge", "_chunks", "_eof", "_exception", "_waiter")

    def __init__(self, acknowledge: Callable[[int], None]):
        self._acknowledge = acknowledge
        self._chunks: deque[bytes] = deque()
        self._eof = False
        self._exception: BaseException | None = None
        self._waiter: asyncio.Future | None = None

    # -- the connection's side --------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        if self._eof or self._exception is not None:
            self._acknowledge(len(data))  # nobody will read it: give the window back
            return
        self._chunks.append(data)
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
        data = b"".join(self._chunks)
        self._chunks.clear()
        if data:
            self._acknowledge(len(data))
        return data

    async def readany(self) -> bytes:
        while not self._chunks:
            if self._exception is not None:
                raise self._exception
            if self._eof:
                return b""
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        data = self._chunks.popleft()
        if data:
            self._acknowledge(len(data))
        return data

    async def read(self) -> bytes:
        parts = []
        while data := await self.readany():
            parts.append(data)
        return b"".join(parts)


class H2Peer(asyncio.Protocol):
    """One HTTP/2 connection's transport, ``ngh2`` state machine and write-side back-pressure."""

    def __init__(self, conn: ngh2.Connection):
        self.h2 = conn
        self.transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self._paused = False
        self._drained: asyncio.Future | None = None
        self._sending: dict[int, asyncio.Future] = {}  # stream id → waiting for its queue
        self._flush_pending = False
        self.closed = False
        self.failed = False  # ngh2 refused the peer's bytes: the connection object is spent
        self.done_writing = False  # the GOAWAY went out and our side is shut: write nothing more
        self.last_stream_id = 0  # the highest stream the peer opened that we acted on

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        """Bytes in, ``ngh2``'s events out, each to :meth:`on_event`, and what they made us
        frame written; bytes it refuses go to :meth:`protocol_error`."""
        try:
            self.h2.receive_data(data)
        except ngh2.ConnectionProtocolError as exc:  # DenialOfServiceError too
            self.failed = True
            self.protocol_error(exc)
            return
        except ngh2.ConnectionStateError:
            return  # failed or closed before: nothing more is read
        for event in self.h2.events():
            self.on_event(event)
        self.flush_now()
        with contextlib.suppress(ngh2.ConnectionStateError):
            for event in self.h2.events():  # what writing concluded (ConnectionClosed)
                self.on_event(event)

    def on_event(self, event: ngh2.Event) -> None:
        raise NotImplementedError

    def protocol_error(self, exc: ngh2.ConnectionProtocolError) -> None:
        raise NotImplementedError

    def eof_received(self) -> bool | None:
        return None  # a half-closed HTTP/2 connection is over: close it

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        self.transport = None
        self._wake_all()

    def flush(self) -> None:
        """Write what ``ngh2`` has framed — once per turn of the event loop, however many
        frames were made in it (one TLS record and one send, not one per frame)."""
        if not self._flush_pending:
            self._flush_pending = True
            self._loop.call_soon(self.flush_now)

    def flush_now(self) -> None:
        self._flush_pending = False
        if self.failed:
            return
        try:
            data = self.h2.data_to_send()
        except ngh2.ConnectionStateError:
            return
        if data and not self.done_writing and self.transport is not None \
                and not self.transport.is_closing():
            self.transport.write(data)
        if self._sending:
            self._wake_sent()

    def write_goaway(self, refusal: ngh2.ConnectionProtocolError) -> None:
        """The GOAWAY for a connection ``ngh2`` can no longer frame for (it refused the peer's
        bytes): built by hyperframe from the last stream we acted on, ENHANCE_YOUR_CALM for a
        flood, PROTOCOL_ERROR for the rest."""
        from hyperframe.frame import GoAwayFrame

        code = (ngh2.ErrorCode.ENHANCE_YOUR_CALM if isinstance(refusal, ngh2.DenialOfServiceError)
                else ngh2.ErrorCode.PROTOCOL_ERROR)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(GoAwayFrame(0, last_stream_id=self.last_stream_id,
                                             error_code=code).serialize())

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
    def stream_done(self, stream_id: int) -> None:
        """The stream closed: a writer waiting on it hears so."""
        waiter = self._sending.pop(stream_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _wake_sent(self) -> None:
        """After a write: writers whose stream's queue emptied (or whose stream is gone)."""
        for stream_id, waiter in list(self._sending.items()):
            try:
                queued = self.h2.queued_body_size(stream_id)
            except ngh2.NGH2Error:  # the connection is spent; the writer finds out
                queued = 0
            if queued == 0:
                del self._sending[stream_id]
                if not waiter.done():
                    waiter.set_result(None)

    def _wake_all(self) -> None:
        sending, self._sending = self._sending, {}
        for waiter in sending.values():
            if not waiter.done():
                waiter.set_result(None)
        drained, self._drained = self._drained, None
        if drained is not None and not drained.done():
            drained.set_result(None)

    async def send_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        """Send ``data`` on a stream; return once ``ngh2`` has framed all of it (the peer's
        windows let it) and our socket takes more: one chunk per stream is ever held."""
        if self.closed or self.failed:
            raise StreamGone("the connection closed")
        try:
            if data:
                self.h2.send_data(stream_id, data, end_stream=end_stream)
            elif end_stream:
                self.h2.end_stream(stream_id)
        except Gone:
            raise StreamGone("the stream was reset") from None
        self.flush()
        if data:
            waiter = self._sending.get(stream_id)
            if waiter is None:
                waiter = self._sending[stream_id] = self._loop.create_future()
            await waiter
            if self.closed:
                raise StreamGone("the connection closed")
        await self.drain()

    def reset(self, stream_id: int, code: int) -> None:
        """RST_STREAM, if the stream is still open on either side."""
        if self.failed:
            return
        try:
            self.h2.reset_stream(stream_id, code)
        except (ngh2.NGH2Error, ValueError):
            return
        self.flush()

    def acknowledge(self, stream_id: int, size: int) -> None:
        """``size`` bytes of DATA on ``stream_id`` were read: open the windows again."""
        if self.closed or self.failed:
            return
        with contextlib.suppress(ngh2.NGH2Error, ValueError):
            self.h2.acknowledge_received_data(size, stream_id)
        self.flush()
