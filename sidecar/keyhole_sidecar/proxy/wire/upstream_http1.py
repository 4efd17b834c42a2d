"""HTTP/1.1 to an upstream: a kept-alive connection whose answers llhttp (aiohttp's C
``HttpResponseParser``) parses, and one exchange on it — the request head built by
:mod:`~keyhole_sidecar.proxy.wire.heads`, the body framed by length or chunks and copied with
flow control, the answer's head awaited; a kept-alive connection found closed before any byte
is tried once more when the request can be replayed (RFC 9110 §9.2.2).

Errors leave this module as the exchange's own (:class:`BadResponse`, :class:`UpstreamClosed`),
never as aiohttp's.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp.base_protocol import BaseProtocol
from aiohttp.helpers import set_exception
from aiohttp.http_exceptions import ContentEncodingError, HttpProcessingError
from aiohttp.http_parser import HttpResponseParser, RawResponseMessage
from aiohttp.streams import StreamReader

from keyhole_sidecar.proxy.exchange import Answer, BadResponse, Outbound, UpstreamClosed
from keyhole_sidecar.proxy.wire.heads import LAST_CHUNK, chunk, request_head, within_length

BODY_BUFFER = 2**16  # the response reader pauses the upstream socket at twice this
MAX_LINE = 16384  # an upstream's status line or header line
MAX_HEADERS = 128
Key = tuple[str, str, int]  # scheme, host, port
# Encodings llhttp's payload reader undoes; a readable answer may use only these.
DECODABLE = frozenset({"gzip", "deflate", "br"})
# Requests sent again, once, on a fresh connection when a kept-alive one turns out closed
# before any byte of an answer; a streamed body cannot be replayed.
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})  # announce an empty body as length 0


def _bad_response(exc: HttpProcessingError) -> BadResponse:
    return BadResponse(f"malformed response ({type(exc).__name__})",
                       encoding=isinstance(exc, ContentEncodingError))


class UpstreamConnection(BaseProtocol):
    """One connection to an upstream, carrying one request at a time."""

    multiplexed = False

    def __init__(self, loop: asyncio.AbstractEventLoop, key: Key):
        super().__init__(loop)
        self.key = key
        self.reused = False
        self.heard = False  # any byte of the current response arrived
        self.idle_since = 0.0
        self._responses: deque[tuple[RawResponseMessage, StreamReader]] = deque()
        self._waiter: asyncio.Future | None = None
        self._body: StreamReader | None = None
        self._lost = False
        self._clean = True  # nothing arrived that the current response did not account for
        self._final = False

    # -- one exchange ----------------------------------------------------------------------
    def expect(self, method: str, *, decode: bool) -> None:
        """Get ready to parse the answer to a ``method`` request (``decode``: undo gzip,
        deflate or br so the body can be redacted)."""
        self._parser = HttpResponseParser(
            self, self._loop, BODY_BUFFER, max_line_size=MAX_LINE, max_field_size=MAX_LINE,
            max_headers=MAX_HEADERS, response_with_body=method != "HEAD", read_until_eof=True,
            auto_decompress=decode)
        self.heard = False
        self._final = False
        self._body = None

    async def response(self, timeout: float) -> tuple[RawResponseMessage, StreamReader]:
        """The final response's head (interim 1xx answers are skipped) and its body; raises
        TimeoutError after ``timeout`` seconds without one."""
        if self._responses:
            return self._responses.popleft()
        timer = self._loop.call_later(timeout, self._time_out)  # cheaper than asyncio.timeout
        try:
            while not self._responses:
                if self._lost:
                    raise UpstreamClosed(self.heard)
                self._waiter = self._loop.create_future()
                await self._waiter
        finally:
            timer.cancel()
        return self._responses.popleft()

    def _time_out(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(TimeoutError())

    def reusable(self) -> bool:
        """After a response was read to its end: may this connection carry another?"""
        return (not self._lost and self._clean and self._body is not None
                and self._body.is_eof() and self._body.exception() is None
                and self.transport is not None and not self.transport.is_closing())

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    # -- transport events ------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if not data and self._parser is None:
            return  # a resume after the exchange ended
        if data:
            self.heard = True
        if self._parser is None or (self._final and data and self._body.is_eof()):
            self._clean = False  # bytes nobody asked for: this connection is not reused
            self.close()
            return
        try:
            messages, upgraded, _tail = self._parser.feed_data(data)
        except HttpProcessingError as exc:
            self._clean = False
            self._fail(_bad_response(exc))
            self.close()
            return
        for message, body in messages:
            if self._final:
                self._clean = False  # a second answer to one request
                self.close()
                return
            if 100 <= message.code < 200 and message.code != 101:
                continue  # interim (100 Continue, 103 Early Hints): not passed on
            self._final = True
            self._body = body
            self._responses.append((message, body))
            if upgraded or message.code == 101:
                self._clean = False
        self._wake()

    def eof_received(self) -> bool | None:
        return None  # close; connection_lost ends a body that runs to the close

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        self._lost = True
        if self._parser is not None:
            try:
                self._parser.feed_eof()
            except HttpProcessingError as error:  # a framed body cut short
                if self._body is not None:
                    set_exception(self._body, UpstreamClosed(True), error)
        self._parser = None  # it holds this connection: no cycle outlives the socket
        self._wake()

    def _fail(self, exc: BaseException) -> None:
        if self._body is not None and not self._body.is_eof():
            set_exception(self._body, exc)
        elif not self._responses and self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc)
            self._waiter = None

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- writing ---------------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            raise UpstreamClosed(self.heard)
        self.transport.write(data)

    async def drain(self) -> None:
        if self._paused:
            await self._drain_helper()



def accept_encoding(client_value: str | None) -> str | None:
    """What a readable request may ask the upstream for: only encodings we can decode."""
    if not client_value:
        return None
    offered = [part.split(";")[0].strip().lower() for part in client_value.split(",")]
    chosen = [enc for enc in ("gzip", "deflate", "br") if enc in offered or "*" in offered]
    return ", ".join(chosen) if chosen else None


class Http1Leg:
    """An exchange on an HTTP/1.1 connection, after its answer's head."""

    __slots__ = ("_answer", "_conn", "_release", "_sending")

    def __init__(self, conn: UpstreamConnection, answer: Answer, sending: asyncio.Task | None,
                 release: Callable[[UpstreamConnection], None]):
        self._conn, self._answer, self._sending, self._release = conn, answer, sending, release

    def sent_whole(self) -> bool:
        sending = self._sending
        return sending is None or (sending.done() and not sending.cancelled()
                                   and sending.exception() is None)

    def finish(self) -> None:
        sent = self.sent_whole()
        if self._sending is not None and not self._sending.done():
            self._sending.cancel()
        if sent and self._answer.reusable:
            self._release(self._conn)  # closes it unless the answer was read to its end
        else:
            self._conn.close()


async def exchange(conn: UpstreamConnection, out: Outbound, timeout: float,
                   acquire: Callable[[], Awaitable[UpstreamConnection]],
                   release: Callable[[UpstreamConnection], None]) -> tuple[Answer, Http1Leg]:
    """Send ``out`` on ``conn`` and wait for the answer's head."""
    head = _head(out)  # UnsafeHead before anything is written
    body = out.body
    chunked = out.length is None and body is not None and not isinstance(body, bytes)
    replayable = out.method in IDEMPOTENT and not isinstance(body, AsyncIterator)
    sending: asyncio.Task | None = None
    answered = False
    for attempt in (1, 2):
        if attempt == 2:
            conn = await acquire()
        conn.expect(out.method, decode=out.readable)
        try:
            if isinstance(body, bytes):
                conn.write(head + body)
            else:
                conn.write(head)
                if body is not None:
                    sending = asyncio.ensure_future(
                        _send_body(conn, within_length(body, out.length), chunked))
                    sending.add_done_callback(_seen)
            message, payload = await conn.response(timeout)
            answered = True
            break
        except UpstreamClosed as exc:
            conn.close()
            if attempt == 1 and conn.reused and replayable and not exc.answered:
                continue  # a kept-alive connection the upstream had closed: once more
            raise
        except HttpProcessingError as exc:
            conn.close()
            raise _bad_response(exc) from None
        except BaseException:
            conn.close()
            raise
        finally:
            if not answered and sending is not None:
                sending.cancel()  # the connection it wrote to is gone
    answer = Answer(message.code, message.reason, message.headers, payload,
                    reusable=not message.should_close,
                    decoded=DECODABLE if out.readable else frozenset())
    return answer, Http1Leg(conn, answer, sending, release)


def _head(out: Outbound) -> bytes:
    headers = [(name, value) for name, value in out.headers
               if name.lower() not in ("accept-encoding", "content-length", "transfer-encoding")]
    if out.readable:
        accept = accept_encoding(", ".join(v for n, v in out.headers
                                           if n.lower() == "accept-encoding"))
        if accept:
            headers.append(("Accept-Encoding", accept))
    else:
        headers += [(n, v) for n, v in out.headers if n.lower() == "accept-encoding"]
    body = out.body
    if isinstance(body, bytes):
        if body or out.method in BODY_METHODS:
            headers.append(("Content-Length", str(len(body))))
    elif body is not None:
        headers.append(("Content-Length", str(out.length)) if out.length is not None
                       else ("Transfer-Encoding", "chunked"))
    elif out.method in BODY_METHODS:
        headers.append(("Content-Length", "0"))
    return request_head(out.method, out.target, [("Host", out.authority), *headers])


def _seen(task: asyncio.Task) -> None:
    """A body copy that failed is answered for by the exchange (the client's stream is closed
    after the answer); its exception needs no log line of its own."""
    if not task.cancelled():
        task.exception()


async def _send_body(conn: UpstreamConnection, body: AsyncIterator[bytes], chunked: bool) -> None:
    """Copy the client's body upstream, pausing while the upstream's socket is full."""
    async for data in body:
        conn.write(chunk(data) if chunked else data)
        await conn.drain()
    if chunked:
        conn.write(LAST_CHUNK)
