"""The upstream's side of the relay over HTTP/2: one connection, many streams, framed by
libnghttp2 (``ngh2``).

The pool opens it when the upstream picks ``h2`` by ALPN and shares it among requests until
the upstream's SETTINGS_MAX_CONCURRENT_STREAMS is reached or it sends GOAWAY. Each request is
an :class:`UpstreamStream`: headers out, the body with the upstream's flow control, the
:class:`~keyhole_sidecar.proxy.exchange.Answer` back with its body and, when the body ends,
its trailers. A stream the proxy no longer wants is reset (RST_STREAM CANCEL).
"""

from __future__ import annotations

import asyncio
import http

import ngh2
from multidict import CIMultiDict

from keyhole_sidecar.proxy.exchange import Answer, Outbound, Unprocessed, UpstreamClosed
from keyhole_sidecar.proxy.wire.h2peer import (
    CONNECTION_WINDOW,
    H2Body,
    H2Peer,
    configuration,
)
from keyhole_sidecar.proxy.wire.heads import h2_fields, header_block, within_length

MAX_HEADER_LIST = 2**16  # what we accept from an upstream, decoded


def reason(status: int) -> str:
    """HTTP/2 carries no reason phrase; an HTTP/1.1 client is given the standard one."""
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


class UpstreamStream:
    """One request on an :class:`H2Upstream`."""

    __slots__ = ("_answer", "_conn", "_failure", "_waiter", "body", "ended", "sending",
                 "stream_id")

    def __init__(self, conn: H2Upstream, stream_id: int):
        self._conn, self.stream_id = conn, stream_id
        self.body = H2Body(lambda size: conn.acknowledge(stream_id, size))
        self._answer: Answer | None = None
        self._failure: BaseException | None = None  # reset or lost before the answer's head
        self._waiter: asyncio.Future | None = None
        self.ended = False  # the upstream ended its side (END_STREAM or reset)
        self.sending: asyncio.Task | None = None  # the request body on its way

    async def send(self, data: bytes, end_stream: bool = False) -> None:
        await self._conn.send_data(self.stream_id, data, end_stream)

    async def answer(self, timeout: float) -> Answer:
        """The final answer's head (1xx skipped); TimeoutError after ``timeout``."""
        if self._answer is None:
            if self._failure is not None:
                raise self._failure
            self._waiter = self._conn._loop.create_future()
            async with asyncio.timeout(timeout):
                await self._waiter
        assert self._answer is not None
        return self._answer

    def sent_whole(self) -> bool:
        sending = self.sending
        return sending is None or (sending.done() and not sending.cancelled()
                                   and sending.exception() is None)

    def finish(self) -> None:
        """The exchange is over: reset the stream unless both sides ended it (a call the
        client cancelled is cancelled upstream)."""
        if self.sending is not None and not self.sending.done():
            self.sending.cancel()
        self._conn.forget(self.stream_id)
        if not self.ended or not self.sent_whole():
            self._conn.reset(self.stream_id, ngh2.ErrorCode.CANCEL)

    # -- the connection's side ---------------------------------------------------------------
    def answered(self, headers: list[tuple[bytes, bytes]], ended: bool) -> None:
        status, fields = 502, CIMultiDict()
        for name, value in headers:
            if name == b":status":
                status = int(value)
            elif not name.startswith(b":"):
                fields.add(name.decode("ascii", "surrogateescape"),
                           value.decode("utf-8", "surrogateescape"))
        self._answer = Answer(status, reason(status), fields, self.body)
        if ended:
            self.body.feed_eof()
            self.ended = True
        self._wake(None)

    def trailers(self, headers: list[tuple[bytes, bytes]]) -> None:
        if self._answer is not None:
            self._answer.trailers = [(n.decode("ascii", "surrogateescape"),
                                      v.decode("utf-8", "surrogateescape"))
                                     for n, v in headers if not n.startswith(b":")]

    def finished(self) -> None:
        self.ended = True
        self.body.feed_eof()

    def failed(self, exc: BaseException) -> None:
        self.ended = True
        self.body.set_exception(exc)
        if self._answer is None:
            self._failure = exc
        self._wake(exc)

    def _wake(self, exc: BaseException | None) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            if exc is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(exc)


class H2Upstream(H2Peer):
    """One HTTP/2 connection to an upstream, shared by the requests to its host."""

    multiplexed = True

    def __init__(self, key: tuple[str, str, int]):
        super().__init__(ngh2.Connection(ngh2.Role.CLIENT, configuration(MAX_HEADER_LIST)))
        self.key = key
        self.idle_since = self._loop.time()
        self._streams: dict[int, UpstreamStream] = {}
        self._goaway = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.h2.initiate_connection({
            ngh2.Setting.ENABLE_PUSH: 0,
            ngh2.Setting.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST,
            ngh2.Setting.MAX_CONCURRENT_STREAMS: 0,  # we accept no pushed streams
        })
        self.h2.set_local_window_size(CONNECTION_WINDOW)
        self.flush()

    def available(self) -> bool:
        """May this connection carry one more stream now?"""
        if self.closed or self.failed or self._goaway or self.transport is None \
                or self.transport.is_closing() or not self.h2.can_send_request:
            return False
        limit = self.h2.remote_settings.get(ngh2.Setting.MAX_CONCURRENT_STREAMS, 100)
        return len(self._streams) < limit

    @property
    def busy(self) -> bool:
        return bool(self._streams)

    def open(self, block: list[tuple[bytes, bytes]], end_stream: bool) -> UpstreamStream:
        """Send a request's header block on a new stream."""
        if not self.available():
            raise UpstreamClosed(False)
        try:
            stream_id = self.h2.send_request(block, end_stream=end_stream)
        except (ngh2.ConnectionClosingError, ngh2.NoAvailableStreamIDError,
                ngh2.ConnectionStateError):
            raise UpstreamClosed(False) from None
        stream = UpstreamStream(self, stream_id)
        self._streams[stream_id] = stream
        self.flush()
        return stream

    def forget(self, stream_id: int) -> None:
        self._streams.pop(stream_id, None)
        if not self._streams:
            self.idle_since = self._loop.time()
            if self._goaway:
                self.close()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    # -- transport events --------------------------------------------------------------------
    def protocol_error(self, exc: ngh2.ConnectionProtocolError) -> None:
        self.write_goaway(exc)
        self.close()

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream.failed(UpstreamClosed(stream.body.is_eof()))

    def on_event(self, event: ngh2.Event) -> None:
        if isinstance(event, ngh2.ResponseReceived):
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                stream.answered(event.headers, event.end_stream)
        elif isinstance(event, ngh2.DataReceived):
            stream = self._streams.get(event.stream_id)
            if stream is None:
                self.acknowledge(event.stream_id, len(event.data))
            else:
                stream.body.feed(event.data)
                if event.end_stream:
                    stream.finished()
        elif isinstance(event, ngh2.TrailersReceived):
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                stream.trailers(event.headers)
                stream.finished()
        elif isinstance(event, ngh2.StreamReset):
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                refused = event.error_code == ngh2.ErrorCode.REFUSED_STREAM
                stream.failed(Unprocessed() if refused and stream._answer is None
                              else UpstreamClosed(stream.body.is_eof()))
        elif isinstance(event, ngh2.StreamClosed):
            self.stream_done(event.stream_id)
            stream = self._streams.get(event.stream_id)
            if stream is not None and not stream.ended:
                # libnghttp2 reset it: a malformed answer (bad fields, a body longer or
                # shorter than its content-length)
                stream.failed(UpstreamClosed(stream.body.is_eof()))
        elif isinstance(event, ngh2.GoAwayReceived):
            self._goaway = True
            last = event.last_stream_id or 0
            for stream_id, stream in list(self._streams.items()):
                if stream_id > last:  # never processed: safe to say so
                    stream.failed(Unprocessed())
            if not self._streams:
                self.close()
        elif isinstance(event, ngh2.ConnectionClosed):
            self._goaway = True
            self.close()


async def exchange(conn: H2Upstream, out: Outbound, timeout: float
                   ) -> tuple[Answer, UpstreamStream]:
    """Send ``out`` as a stream on ``conn``; its body (if any) is sent alongside while the
    answer's head is awaited, so calls that stream both ways do."""
    fields = h2_fields(out.headers)
    body = out.body
    if isinstance(body, bytes):
        if body:
            fields.append(("content-length", str(len(body))))
    elif body is not None and out.length is not None:
        fields.append(("content-length", str(out.length)))
    if out.trailers:
        fields.append(("te", "trailers"))  # gRPC asks for trailers; HTTP/2 carries them
    if out.readable:  # nothing is decoded here: ask for bodies (and gRPC messages) as they are
        grpc = any(n == "grpc-accept-encoding" for n, _ in fields)
        fields = [(n, v) for n, v in fields if n not in ("accept-encoding", "grpc-accept-encoding")]
        fields.append(("accept-encoding", "identity"))
        if grpc:
            fields.append(("grpc-accept-encoding", "identity"))
    block = header_block("request", [(":method", out.method), (":scheme", out.scheme),
                                     (":authority", out.authority), (":path", out.target)],
                         fields, out.sensitive)  # UnsafeHead before anything is sent
    stream = conn.open(block, end_stream=not body)
    if body:
        stream.sending = asyncio.ensure_future(
            stream.send(body, end_stream=True) if isinstance(body, bytes)
            else _send_body(stream, within_length(body, out.length)))
        stream.sending.add_done_callback(_seen)
    try:
        answer = await stream.answer(timeout)
    except BaseException:
        stream.finish()
        raise
    return answer, stream


async def _send_body(stream: UpstreamStream, body) -> None:
    async for data in body:
        await stream.send(data)
    await stream.send(b"", end_stream=True)


def _seen(task: asyncio.Task) -> None:
    """A body copy that failed is accounted for by the exchange, not logged on its own."""
    if not task.cancelled():
        task.exception()
