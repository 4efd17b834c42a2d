"""The upstream's side of the relay: kept-alive connections, each an asyncio protocol whose
responses llhttp (aiohttp's C ``HttpResponseParser``) parses.

A connection is opened only to an address the egress policy passed (``--resolve`` and the
resolver's checks, as for every connection the proxy opens), with the one verified
``SSLContext``; it goes back to the pool only when its last response ended exactly where its
framing said and the upstream did not ask to close. Idle connections are bounded in number
(per host and in all) and in age.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque

from aiohttp.base_protocol import BaseProtocol
from aiohttp.helpers import set_exception
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.http_parser import HttpResponseParser, RawResponseMessage
from aiohttp.streams import StreamReader

from keyhole_common.spec import is_ip_literal
from keyhole_sidecar.proxy.exchange import UpstreamClosed
from keyhole_sidecar.proxy.h2client import H2Upstream
from keyhole_sidecar.upstream import OverridingResolver

BODY_BUFFER = 2**16  # the response reader pauses the upstream socket at twice this
MAX_LINE = 16384  # an upstream's status line or header line
MAX_HEADERS = 128
Key = tuple[str, str, int]  # scheme, host, port


class ResolveFailed(OSError):
    """The name did not resolve (the resolver's own error is the cause)."""


class UpstreamConnection(BaseProtocol):
    """One connection to an upstream, carrying one request at a time."""

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
            self._fail(exc)
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


class _Door(asyncio.Protocol):
    """Owns a new upstream connection for as long as it takes to read which protocol the
    upstream chose by ALPN, then hands the transport to that protocol's connection."""

    def __init__(self, loop: asyncio.AbstractEventLoop, key: Key):
        self._loop, self._key = loop, key

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        tls = transport.get_extra_info("ssl_object")
        chosen = tls.selected_alpn_protocol() if tls is not None else None
        owner: asyncio.Protocol = (H2Upstream(self._key) if chosen == "h2"
                                   else UpstreamConnection(self._loop, self._key))
        transport.set_protocol(owner)
        owner.connection_made(transport)


Connection = UpstreamConnection | H2Upstream


class UpstreamPool:
    """Idle kept-alive connections by (scheme, host, port); opens new ones when none is idle.

    ``tls`` offers ``h2`` and ``http/1.1``: an upstream that picks ``h2`` gets one shared
    connection carrying many streams; one that picks HTTP/1.1 is remembered and gets a kept-alive
    connection per request in flight, as an upstream over plain HTTP does."""

    def __init__(self, resolver: OverridingResolver, tls: ssl.SSLContext, *,
                 idle_per_host: int = 32, idle_total: int = 512, idle_seconds: float = 30.0,
                 connect_seconds: float = 15.0):
        self.resolver, self.tls = resolver, tls
        self._h2: dict[Key, list[H2Upstream]] = {}
        self._h2_opening: dict[Key, asyncio.Future] = {}
        self._http11: set[Key] = set()  # upstreams that answered h2 with http/1.1
        self.idle_per_host, self.idle_total = idle_per_host, idle_total
        self.idle_seconds, self.connect_seconds = idle_seconds, connect_seconds
        self._idle: dict[Key, list[UpstreamConnection]] = {}
        self._idle_count = 0
        self._sweeper: asyncio.TimerHandle | None = None

    async def acquire(self, scheme: str, host: str, port: int) -> Connection:
        """A connection to the upstream: a shared HTTP/2 one when the upstream picked h2, else
        an HTTP/1.1 one for this request alone."""
        key = (scheme, host, port)
        if scheme == "https" and key not in self._http11:
            shared = await self._shared(key)
            if shared is not None:
                return shared
        stack = self._idle.get(key)
        horizon = time.monotonic() - self.idle_seconds
        while stack:
            conn = stack.pop()
            self._idle_count -= 1
            if conn.idle_since > horizon and conn.reusable():
                conn.reused = True
                conn._parser = None
                return conn
            conn.close()
        return await self._connect(key)

    def release(self, conn: UpstreamConnection) -> None:
        """Keep ``conn`` for the next request to its host, or close it."""
        stack = self._idle.setdefault(conn.key, [])
        if not conn.reusable() or len(stack) >= self.idle_per_host \
                or self._idle_count >= self.idle_total:
            conn.close()
            return
        conn._parser = None
        conn.idle_since = time.monotonic()
        stack.append(conn)
        self._idle_count += 1
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(self.idle_seconds, self._sweep)

    def _sweep(self) -> None:
        self._sweeper = None
        loop = asyncio.get_running_loop()
        for key, shared in list(self._h2.items()):
            keep = []
            for conn in shared:
                if conn.closed or (not conn.busy
                                   and conn.idle_since < loop.time() - self.idle_seconds):
                    conn.close()
                else:
                    keep.append(conn)
            if keep:
                self._h2[key] = keep
            else:
                del self._h2[key]
        horizon = time.monotonic() - self.idle_seconds
        for key, stack in list(self._idle.items()):
            keep = [c for c in stack if c.idle_since > horizon and c.reusable()]
            for conn in stack:
                if conn not in keep:
                    conn.close()
            self._idle_count -= len(stack) - len(keep)
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]
        if self._idle_count or self._h2:
            self._sweeper = loop.call_later(self.idle_seconds / 2, self._sweep)

    async def _shared(self, key: Key) -> Connection | None:
        """An HTTP/2 connection with room for a stream, opening one (once, however many
        requests ask at the same time) if none has; an HTTP/1.1 connection when the upstream
        did not pick h2."""
        while True:
            for conn in self._h2.get(key, ()):
                if conn.available():
                    return conn
            opening = self._h2_opening.get(key)
            if opening is None:
                break
            await asyncio.shield(opening)
            if opening.result() is False:
                return None  # the upstream speaks HTTP/1.1: the caller takes the usual way
        opening = self._h2_opening[key] = asyncio.get_running_loop().create_future()
        speaks_h2 = False
        try:
            conn = await self._connect(key)
            if isinstance(conn, H2Upstream):
                speaks_h2 = True
                live = [c for c in self._h2.get(key, ()) if not c.closed]
                self._h2[key] = [*live, conn]
                if self._sweeper is None:
                    self._sweeper = asyncio.get_running_loop().call_later(self.idle_seconds,
                                                                          self._sweep)
            elif len(self._http11) < 4096:
                self._http11.add(key)
            return conn
        finally:
            del self._h2_opening[key]
            opening.set_result(speaks_h2)

    async def _connect(self, key: Key) -> Connection:
        scheme, host, port = key
        loop = asyncio.get_running_loop()
        bare = host.strip("[]")
        if is_ip_literal(host) and self.resolver.lookup_override(host, port) is None:
            self.resolver.check_literal(host, port)  # the egress policy, on the literal itself
            addresses = [bare]
        else:
            try:
                async with asyncio.timeout(self.connect_seconds):
                    answers = await self.resolver.resolve(host, port)  # egress-checked
            except OSError as exc:
                raise ResolveFailed(f"cannot resolve {host}") from exc
            addresses = [a["host"] for a in answers]
        tls = self.tls if scheme == "https" else None
        error: BaseException | None = None
        for address in addresses:
            try:
                async with asyncio.timeout(self.connect_seconds):
                    transport, _ = await loop.create_connection(
                        lambda: _Door(loop, key), address, port, ssl=tls,
                        server_hostname=bare if tls else None,
                        ssl_handshake_timeout=self.connect_seconds if tls else None)
                return transport.get_protocol()  # type: ignore[return-value]
            except ssl.SSLError:
                raise  # a certificate that fails verification fails for every address
            except OSError as exc:
                error = exc
        assert error is not None
        raise error

    def close(self) -> None:
        for stack in [*self._idle.values(), *self._h2.values()]:
            for conn in stack:
                conn.close()
        self._idle.clear()
        self._h2.clear()
        self._idle_count = 0
        if self._sweeper is not None:
            self._sweeper.cancel()
