"""The client's side of the relay: HTTP/1.1 requests in, responses out, on an asyncio protocol.

llhttp (aiohttp's C ``HttpRequestParser``) parses every request; this module keeps order
(pipelined requests are answered one after another), flow control (a body the handler does not
read fast enough pauses the socket; a full socket pauses the handler) and the connection's
life (keep-alive, its idle timeout, close after anything that leaves the stream unclear). It
writes only heads built by :mod:`keyhole_sidecar.proxy.wire.heads` and the bodies handlers give it.

A WebSocket upgrade is the one request handed to aiohttp's server, which owns the connection
from then on (:meth:`Reply.hand_over`).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.base_protocol import BaseProtocol
from aiohttp.helpers import set_exception
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.http_parser import HttpRequestParser, RawRequestMessage
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader

from keyhole_sidecar.proxy.context import ProxyContext
from keyhole_sidecar.proxy.errors import parser_complaint
from keyhole_sidecar.proxy.exchange import Request, Trailers
from keyhole_sidecar.proxy.wire import heads

log = logging.getLogger("keyhole.proxy")
PIPELINE_DEPTH = 16  # parsed requests waiting for their turn before the socket is paused
BODY_BUFFER = 2**16  # the body reader pauses the socket at twice this
_NO_BODY = frozenset({204, 304})
_INTERIM = {100: "Continue", 103: "Early Hints"}


class Reply:
    """Writes one response, choosing its framing from what the request and the body allow."""

    __slots__ = (
        "_conn",
        "_handed_over",
        "_message",
        "_request_head",
        "_version",
        "chunked",
        "close",
        "started",
    )

    def __init__(self, conn: ClientConnection, message: RawRequestMessage):
        self._conn = conn
        self._message = message
        self._request_head = message.method == "HEAD"
        self._version = message.version
        self.started = False
        self.chunked = False
        self.close = message.should_close
        self._handed_over: asyncio.Future | None = None

    async def client_left(self) -> None:
        """Once the client has sent its FIN or gone. A FIN alone is half-close (the request
        is still answered), but a request held for approval takes it as leaving: a client
        that waits for its answer does not stop the connection it waits on."""
        await self._conn.left().wait()

    def interim(self, status: int) -> None:
        """A 1xx answer before the final one (``100 Continue``)."""
        if self._version >= (1, 1) and not self.started:
            self._conn.write(heads.response_head(status, _INTERIM.get(status, "Continue"), []))

    def start(self, status: int, reason: str, headers: list[tuple[str, str]], *,
              length: int | None = None, body: bytes = b"") -> None:
        """Write the head (and ``body``, in the same write). ``length`` is the body's size
        when known; otherwise the body is chunked (HTTP/1.1) or ends when the connection
        closes (HTTP/1.0)."""
        fields = list(headers)
        if self._request_head or status in _NO_BODY:
            pass  # no body follows whatever the headers say; a HEAD keeps its Content-Length
        elif length is not None:
            fields.append(("Content-Length", str(length)))
        elif self._version >= (1, 1):
            fields.append(("Transfer-Encoding", "chunked"))
            self.chunked = True
        else:
            self.close = True
        if self.close:
            fields.append(("Connection", "close"))
        elif self._version < (1, 1):
            fields.append(("Connection", "keep-alive"))
        head = heads.response_head(status, reason, fields)  # UnsafeHead before any byte
        self.started = True
        self._conn.write(head + body if body else head)  # one TLS record, one send

    async def write(self, data: bytes) -> None:
        if data:
            self._conn.write(heads.chunk(data) if self.chunked else data)
            await self._conn.drain()

    async def end(self, trailers: Trailers = ()) -> None:
        """End the body; trailers are not sent to an HTTP/1.1 client (none asks for them)."""
        if self.chunked:
            self._conn.write(heads.LAST_CHUNK)
        await self._conn.drain()

    async def send(self, status: int, reason: str, headers: list[tuple[str, str]],
                   body: bytes, trailers: Trailers = ()) -> None:
        """A whole response in one write."""
        if self._request_head or status in _NO_BODY:
            body = b""
        self.start(status, reason, headers, length=len(body), body=body)
        await self._conn.drain()

    def abort(self) -> None:
        """The response cannot be finished: the client must see a broken message, not a
        short one that looks whole."""
        self.close = True
        self._conn.abort()

    async def hand_over(self, handler: Callable[[web.BaseRequest],
                        Awaitable[web.StreamResponse]]) -> None:
        """Give this request and the connection to aiohttp's server (WebSocket upgrades), and
        wait until it has finished with them."""
        self._handed_over = asyncio.get_running_loop().create_future()
        await self._conn.hand_over(self._message, handler, self._handed_over)


Handler = Callable[[Request], Awaitable[None]]


class ClientConnection(BaseProtocol):
    """One client connection (plain, or decrypted from a terminated TLS tunnel)."""

    def __init__(self, ctx: ProxyContext, handler: Handler, *,
                 on_request: Callable[[], None], on_lost: Callable[[], None],
                 server_kwargs: dict[str, Any], where: tuple[str, str] = ("plain", "-")):
        loop = asyncio.get_running_loop()
        s = ctx.settings
        # auto_decompress=False: a body goes upstream as the bytes the client sent, under its
        # own Content-Encoding; decoded, it would outgrow the length the client announced and
        # the rest would be read upstream as a request of the agent's making.
        parser = HttpRequestParser(self, loop, BODY_BUFFER, max_line_size=s.max_line_size,
                                   max_field_size=s.max_field_size, max_headers=s.max_headers,
                                   max_msg_queue_size=PIPELINE_DEPTH, auto_decompress=False)
        super().__init__(loop, parser)
        self._ctx = ctx
        self._handler = handler
        self._on_request = on_request
        self._on_lost = on_lost
        self._server_kwargs = server_kwargs
        self._where = where  # (mode, host) of the audit line of a request llhttp refused
        self._queue: deque[tuple[RawRequestMessage, StreamReader]] = deque()
        self._task: asyncio.Task | None = None
        self._refusal: HttpProcessingError | None = None  # answered once earlier ones are
        self._upgraded = False  # after an upgrade (or CONNECT) request, bytes are not HTTP
        self._after_upgrade: list[bytes] = []
        self._other: asyncio.Protocol | None = None  # aiohttp's server, after a hand-over
        self._client_eof = False
        self._left: asyncio.Event | None = None  # made when a held request waits on it
        self._idle: asyncio.TimerHandle | None = None  # one timer, moved lazily
        self._idle_since = 0.0  # 0: a request is in flight
        self._last_body: StreamReader | None = None
        self._held_back = False  # the parser kept bytes because the queue was full

    # -- transport events (connection_made is BaseProtocol's: the transport, TCP_NODELAY) ---
    def data_received(self, data: bytes) -> None:
        if self._other is not None:
            self._other.data_received(data)
            return
        if self._upgraded:
            if data:
                self._after_upgrade.append(data)
            return
        if self._refusal is not None:
            return
        try:
            messages, upgraded, tail = self._parser.feed_data(data)
        except HttpProcessingError as exc:
            self._refuse(exc)
            return
        if upgraded:
            self._upgraded = True
            if tail:
                self._after_upgrade.append(tail)
        if messages:
            self._idle_since = 0.0
            self._on_request()
            self._queue.extend(messages)
            self._last_body = messages[-1][1]
            if len(self._queue) + 1 >= PIPELINE_DEPTH:
                self._held_back = True
            if len(self._queue) >= PIPELINE_DEPTH:
                self._pause_reading_for_buffer()
            if self._task is None:
                self._task = self._loop.create_task(self._serve())

    def eof_received(self) -> bool | None:
        if self._other is not None:
            return self._other.eof_received()
        self._client_eof = True
        if self._left is not None:
            self._left.set()
        try:
            self._parser.feed_eof()
        except HttpProcessingError as exc:  # a body cut short: its reader fails
            if self._last_body is not None and not self._last_body.is_eof():
                set_exception(self._last_body, exc)
        if self._task is None:
            return None  # nothing in flight: close
        return True  # answer what was asked, then close

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        if self._left is not None:
            self._left.set()
        self._on_lost()
        if self._other is not None:
            self._other.connection_lost(exc)
        if self._idle is not None:
            self._idle.cancel()
        if self._task is not None:
            self._task.cancel()
        for _message, body in self._queue:
            if not body.is_eof():
                set_exception(body, ConnectionResetError("the client closed the connection"))
        self._queue.clear()
        if self._last_body is not None and not self._last_body.is_eof():
            set_exception(self._last_body, ConnectionResetError("the client closed the "
                                                                "connection"))
        self._forget()

    def _forget(self) -> None:
        """Drop what points back at this connection (the parser holds it, the connection's
        life holds the transport that held it): reference counting frees a closed connection
        at once, with its TLS buffers, instead of leaving a cycle for the collector — which
        runs rarely for long-lived garbage, so memory climbed under load (issue 30)."""
        self._parser = None
        self._last_body = None
        self._idle = None
        self._on_request = self._on_lost = _nothing

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._other is not None:
            self._other.pause_writing()

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._other is not None:
            self._other.resume_writing()

    # -- writing ---------------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    async def drain(self) -> None:
        if self._paused:
            await self._drain_helper()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def left(self) -> asyncio.Event:
        """Set once the client has sent its FIN or the connection is gone."""
        if self._left is None:
            self._left = asyncio.Event()
            if self._client_eof or self.transport is None:
                self._left.set()
        return self._left

    # -- serving ---------------------------------------------------------------------------
    async def _serve(self) -> None:
        """Answer queued requests in order; then wait for more, or close."""
        try:
            while self._queue and self.transport is not None:
                message, body = self._queue.popleft()
                reply = Reply(self, message)
                await self._handler(Request(
                    message.method, message.url, message.headers, body,
                    body is not EMPTY_PAYLOAD, not message.chunked, reply, message.version))
                if reply._handed_over is not None:
                    return  # aiohttp's server owns the connection now
                if self._parser is None:
                    return  # the connection closed meanwhile (it forgot its parser)
                self._parser.message_consumed()
                if reply.close or not body.is_eof() or (self._upgraded and not self._queue):
                    self._close_after_writes()
                    return
                if self._buffer_paused and len(self._queue) < PIPELINE_DEPTH:
                    self._resume_reading_for_buffer()
                if self._held_back:
                    self._held_back = False
                    self.data_received(b"")  # parse what the queue limit held back
        finally:
            self._task = None
        if self.transport is None or self._other is not None:
            return
        if self._refusal is not None:
            self._answer_refusal()
        elif self._client_eof:
            self._close_after_writes()
        else:
            self._idle_since = self._loop.time()
            if self._idle is None:
                self._idle = self._loop.call_later(self._ctx.settings.idle_timeout,
                                                   self._idle_timeout)

    def _idle_timeout(self) -> None:
        """Close a connection idle for the whole timeout; otherwise look again when it could
        be (one timer per connection, not one per request)."""
        self._idle = None
        if self.transport is None:
            return
        timeout = self._ctx.settings.idle_timeout
        if self._task is None and self._idle_since and \
                self._loop.time() - self._idle_since >= timeout:
            self.transport.close()
            return
        left = timeout - (self._loop.time() - self._idle_since) if self._idle_since else timeout
        self._idle = self._loop.call_later(max(left, 0.05), self._idle_timeout)

    def _close_after_writes(self) -> None:
        if self.transport is not None:
            self.transport.close()  # flushes what was written first

    def _refuse(self, exc: HttpProcessingError) -> None:
        """llhttp refused the bytes: answer 400 after whatever came before, and close."""
        self._refusal = exc = exc.with_traceback(None)  # its frames hold this connection
        if self._last_body is not None and not self._last_body.is_eof():
            set_exception(self._last_body, exc)  # a body that went bad mid-way ends its request
        mode, host = self._where
        self._ctx.account(mode, "-", host, "denied", "malformed", status=exc.code,
                          protocol="http/1.1")
        _refusals.log(exc)
        self._on_request()
        if self._task is None:
            self._answer_refusal()

    def _answer_refusal(self) -> None:
        exc = self._refusal
        text = f"keyhole: malformed request: {parser_complaint(exc)}\n"
        head = heads.response_head(exc.code, "Bad Request" if exc.code == 400 else "Error", [
            ("Content-Type", "text/plain; charset=utf-8"), ("X-Keyhole-Error", "malformed"),
            ("Content-Length", str(len(text.encode()))), ("Connection", "close")])
        self.write(head + text.encode())
        self._close_after_writes()

    # -- hand-over -------------------------------------------------------------------------
    async def hand_over(self, message: RawRequestMessage, handler, done: asyncio.Future) -> None:
        """Replay ``message``'s head (llhttp-checked parts, rebuilt by :mod:`heads`) and what
        followed it into an aiohttp server protocol on this transport, then wait for it."""

        async def run(request: web.BaseRequest) -> web.StreamResponse:
            try:
                return await handler(request)
            finally:
                if not done.done():
                    done.set_result(None)

        server = web.Server(run, handler_cancellation=True, **self._server_kwargs)
        protocol = server()
        head = heads.request_head(message.method, message.path, [
            (name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
            for name, value in message.raw_headers])
        self._other = protocol
        protocol.connection_made(self.transport)
        protocol.data_received(head + b"".join(self._after_upgrade))
        self._after_upgrade.clear()
        await done


def _nothing() -> None:
    """What a closed connection's callbacks become."""


class _Refusals:
    """One log line per malformed request, at most a few per second (a client can send any
    number); the rest are counted in the next line."""

    def __init__(self):
        from keyhole_sidecar.httplog import OneLineRateLimited

        self._filter = OneLineRateLimited()

    def log(self, exc: HttpProcessingError) -> None:
        # Not through "keyhole.http": its own filter (aiohttp's server's) would say it again
        # and count the refusal twice.
        record = logging.LogRecord("keyhole.proxy", logging.WARNING, __file__, 0,
                                   "%s", (f"{type(exc).__name__}: {parser_complaint(exc)}",),
                                   None)
        if self._filter.filter(record):
            logging.getLogger("keyhole.proxy").handle(record)


_refusals = _Refusals()
