"""The client's side of the relay over HTTP/2: streams in, each one a request for the policy.

Framing, HPACK and the protocol's rules are libnghttp2's, through ``ngh2`` (a request it
refuses never becomes a stream here: it resets it, or the connection). Each stream gets a
:class:`~keyhole_sidecar.proxy.exchange.Request` and a task running the same handler HTTP/1.1
requests get; a stream the client resets cancels its task (and so its upstream stream). The
attacks particular to HTTP/2 are bounded per connection: streams by
SETTINGS_MAX_CONCURRENT_STREAMS (more is a protocol error), header lists by
SETTINGS_MAX_HEADER_LIST_SIZE (HPACK bombs), CONTINUATION frames per block (floods: libnghttp2
counts both), and resets, PINGs and SETTINGS by a budget per window — past it the connection
is closed with ENHANCE_YOUR_CALM (rapid reset, CVE-2023-44487).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import ngh2
from multidict import CIMultiDict
from yarl import URL

from keyhole_sidecar.proxy.context import ProxyContext
from keyhole_sidecar.proxy.exchange import Request, Trailers
from keyhole_sidecar.proxy.wire import heads
from keyhole_sidecar.proxy.wire.h2guard import FLOW_CONTROL_ERROR, FrameGuard, Window
from keyhole_sidecar.proxy.wire.h2peer import (
    CONNECTION_WINDOW,
    MAX_FRAME,
    Gone,
    H2Body,
    H2Peer,
    StreamGone,
    configuration,
)

log = logging.getLogger("keyhole.proxy")
MAX_STREAMS = 100  # SETTINGS_MAX_CONCURRENT_STREAMS we advertise
MAX_HEADER_LIST = 2**16  # SETTINGS_MAX_HEADER_LIST_SIZE: decoded bytes, HPACK bombs included
# Control frames a client may make us answer or account for, per window: far above what a
# real client sends, far below what an attacker needs.
BUDGET_WINDOW = 10.0
BUDGETS = {"reset": 200, "ping": 100, "settings": 100}
# After a GOAWAY the connection reads and drops what the client still sends until it has been
# quiet this long (at most LINGER_MAX in all) before closing: closing a socket with unread
# bytes resets it, and the reset can overtake the GOAWAY that says why.
LINGER = 1.0
LINGER_MAX = 5.0
# A stream answered before its request body ended (a refusal, an early answer) reads and drops
# the rest of the body for this long and up to this many bytes, so the client finishes sending
# and then reads its answer (httpx reads none until its body is sent); past either it is reset
# with NO_ERROR (RFC 9113 §8.1). A reset sent at once, behind the answer, made curl drop the
# answer it had not yet read. Dropping holds no memory; the bound is the connection's time.
DISCARD_SECONDS = 2.0
DISCARD_BYTES = 4 << 20

Handler = Callable[[Request], Awaitable[None]]
Codes = ngh2.ErrorCode
# What libnghttp2's refusals mean, for the log: its words for each (a GOAWAY's code when it
# closes the connection itself, an exception's message when it cannot go on).
_REFUSALS = (
    ("header list", f"its header list was over {MAX_HEADER_LIST} bytes"),
    ("continuation", "it sent more CONTINUATION frames than a header block may have"),
    ("settings", "it sent more SETTINGS entries or acknowledgements than allowed"),
    ("flood", "it sent more of a kind of frame than allowed"),
    ("frame size", "a frame was over SETTINGS_MAX_FRAME_SIZE"),
    ("flow control", "it sent more than its flow-control window"),
)
_GOAWAYS = {
    Codes.PROTOCOL_ERROR: "it broke the HTTP/2 protocol (or opened more than "
                          f"{MAX_STREAMS} streams at once)",
    Codes.FLOW_CONTROL_ERROR: "it sent more than its flow-control window",
    Codes.FRAME_SIZE_ERROR: "a frame was over SETTINGS_MAX_FRAME_SIZE",
    Codes.COMPRESSION_ERROR: "its header block could not be decoded (HPACK)",
    Codes.ENHANCE_YOUR_CALM: "it sent more of a kind of frame than allowed",
}


def _refusal(exc: BaseException) -> str:
    words = str(exc).lower()
    return next((said for key, said in _REFUSALS if key in words),
                "it broke the HTTP/2 protocol")


class H2Reply:
    """Answers one stream. Headers go out at the end of the turn of the event loop that
    started them — with END_STREAM when the answer ended in that turn, so a gRPC
    trailers-only answer keeps its shape; alone otherwise, so a client sees the head of a
    stream whose first message is late (gRPC's initial metadata, SSE) as it comes."""

    __slots__ = ("_conn", "_head", "_stream_id", "close", "ended", "started")

    def __init__(self, conn: H2ClientConnection, stream_id: int):
        self._conn, self._stream_id = conn, stream_id
        self.started = False
        self.ended = False
        self.close = False  # one stream cannot close the connection
        self._head: list[tuple[bytes, bytes]] | None = None

    async def client_left(self) -> None:
        """A stream the client resets cancels its request's task: nothing to wait for."""
        await asyncio.Future()

    def interim(self, status: int) -> None:
        """HTTP/2 clients do not wait for 100 Continue; nothing to send."""

    def start(self, status: int, reason: str, headers: list[tuple[str, str]], *,
              length: int | None = None) -> None:
        fields = heads.h2_fields(headers)
        if length is not None:
            fields.append(("content-length", str(length)))
        self._head = heads.header_block("response", [(":status", str(status))], fields)
        self.started = True
        self._conn._loop.call_soon(self._head_now)

    def _head_now(self) -> None:
        with contextlib.suppress(StreamGone):  # reset meanwhile: the task hears of it
            self._send_head(False)

    def _send_head(self, end_stream: bool) -> None:
        head, self._head = self._head, None
        if head is None:
            return
        try:
            self._conn.h2.send_response(self._stream_id, head, end_stream=end_stream)
        except Gone:
            raise StreamGone("the stream was reset") from None
        self._conn.flush()
        if end_stream:
            self.ended = True

    async def write(self, data: bytes) -> None:
        if data:
            self._send_head(False)
            await self._conn.send_data(self._stream_id, data)

    async def end(self, trailers: Trailers = ()) -> None:
        fields = heads.h2_fields(trailers)
        if self._head is not None and not fields:
            self._send_head(True)
            return
        self._send_head(False)
        if fields:
            block = heads.header_block("trailers", (), fields)
            try:
                self._conn.h2.send_trailers(self._stream_id, block)
            except Gone:
                raise StreamGone("the stream was reset") from None
            self._conn.flush()
        else:
            await self._conn.send_data(self._stream_id, b"", end_stream=True)
        self.ended = True
        await self._conn.drain()

    async def send(self, status: int, reason: str, headers: list[tuple[str, str]],
                   body: bytes, trailers: Trailers = ()) -> None:
        self.start(status, reason, headers, length=len(body))
        await self.write(body)
        await self.end(trailers)

    def abort(self) -> None:
        """The answer cannot be finished: reset this stream (the connection carries on)."""
        self._conn.reset(self._stream_id, Codes.INTERNAL_ERROR)


class H2ClientConnection(H2Peer):
    """One client connection speaking HTTP/2 (``h2`` by ALPN, or ``h2c`` by prior knowledge)."""

    def __init__(self, ctx: ProxyContext, handler: Handler, *, on_request: Callable[[], None],
                 on_lost: Callable[[], None], where: tuple[str, str] = ("plain", "-")):
        # Inbound blocks are checked by libnghttp2 (RFC 9113 §8.2, a malformed request's
        # stream is reset); outbound ones were built by heads.header_block, which refuses all
        # a strict peer would (tests/unit/test_heads.py holds it to h2's own checks).
        super().__init__(ngh2.Connection(ngh2.Role.SERVER, configuration(MAX_HEADER_LIST)))
        self._ctx = ctx
        self._handler = handler
        self._on_request = on_request
        self._on_lost = on_lost
        self._where = where  # (mode, host) of the audit line of a connection h2 refused
        self._streams: dict[int, tuple[H2Body, asyncio.Task]] = {}
        # streams answered before their body ended: what is left of their discard allowance
        self._discarding: dict[int, list] = {}  # stream id → [bytes left, reset timer]
        self._spent = dict.fromkeys(BUDGETS, 0)
        self._window_start = self._loop.time()
        self._idle: asyncio.TimerHandle | None = None
        self._lingering: asyncio.TimerHandle | None = None
        self._linger_until = self._linger_end = 0.0
        self._draining = False
        self._guard = FrameGuard(MAX_STREAMS)
        self._resetting: set[int] = set()  # streams either side reset, until they close
        self._we_reset: set[int] = set()  # of those, the ones keyhole reset

    # -- transport events --------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.h2.initiate_connection({
            ngh2.Setting.MAX_CONCURRENT_STREAMS: MAX_STREAMS,
            ngh2.Setting.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST,
            ngh2.Setting.MAX_FRAME_SIZE: MAX_FRAME,
            ngh2.Setting.ENABLE_CONNECT_PROTOCOL: 0,
        })
        self.h2.set_local_window_size(CONNECTION_WINDOW)
        self.flush()
        self._arm_idle()

    def data_received(self, data: bytes) -> None:
        """The client's bytes through the guard to libnghttp2; then, before any stream of this
        read is served, what it refused: a request it reset as malformed or over the stream
        limit closes the connection (it is known once the reset is framed, so that is framed
        now)."""
        if self._lingering is not None:
            self._linger_until = self._loop.time() + LINGER  # still talking: not yet
            return
        if self.failed:
            return
        for event in self.h2.events():  # what our writes concluded: streams now closed
            self.on_event(event)
        events: list[ngh2.Event] = []
        for item in self._guard.feed(data):
            if isinstance(item, Window):
                if not self._pass(b"", events):
                    return
                if item.overflows(self._stream_window(item.stream_id)):
                    log.warning("resetting an HTTP/2 stream: the client took its window over "
                                "2^31-1")
                    self.reset(item.stream_id, FLOW_CONTROL_ERROR)
                    continue
                item = item.frame
            if isinstance(item, bytes):
                if not self._pass(item, events):
                    return
                continue
            if not self._pass(b"", events):  # what came before the refusal first
                return
            self._malformed(f"it sent {item.why}", ngh2.ErrorCode(item.code).name)
            self._close(item.code)
            return
        self._pass(b"", events)

    def _pass(self, data: bytes, events: list[ngh2.Event]) -> bool:
        """Hand ``data`` to libnghttp2; with no data, act on what it said so far. False once
        the connection is closing."""
        if data:
            try:
                self.h2.receive_data(data)
            except ngh2.ConnectionProtocolError as exc:  # DenialOfServiceError too
                self.failed = True
                self.protocol_error(exc)
                return False
            except ngh2.ConnectionStateError:  # it ended the connection (the client's GOAWAY)
                self._pass(b"", events)
                return False
            events += self.h2.events()
            return True
        self.flush_now()  # frames libnghttp2's own refusals: their StreamClosed follows
        events += self.h2.events()
        refused = self._refused(events)
        if refused is not None:
            self._malformed(refused, "PROTOCOL_ERROR")
            self._close(Codes.PROTOCOL_ERROR)
            return False
        batch = list(events)
        events.clear()
        for event in batch:
            self.on_event(event)
        self.flush()
        return not self.done_writing

    def _refused(self, events: list[ngh2.Event]) -> str | None:
        """What libnghttp2 refused of the client's new streams, if anything."""
        asked = {e.stream_id for e in events if isinstance(e, ngh2.RequestReceived)}
        reset = self._resetting | {e.stream_id for e in events
                                   if isinstance(e, ngh2.StreamReset)}
        for event in events:
            if isinstance(event, ngh2.StreamClosed) and event.error_code \
                    and event.stream_id not in asked and event.stream_id not in self._streams \
                    and event.stream_id not in reset:
                if event.error_code == Codes.REFUSED_STREAM:
                    return f"it opened more than {MAX_STREAMS} streams at once"
                return "it sent a malformed request (RFC 9113 §8.1.1)"
        return None

    def _stream_window(self, stream_id: int) -> int | None:
        try:
            return self.h2.stream_remote_window_size(stream_id)
        except (ngh2.NGH2Error, ValueError):
            return None

    def reset(self, stream_id: int, code: int) -> None:
        self._resetting.add(stream_id)
        self._we_reset.add(stream_id)
        super().reset(stream_id, code)

    def protocol_error(self, exc: ngh2.ConnectionProtocolError) -> None:
        """libnghttp2 refused the client's bytes (an oversized header list, a CONTINUATION
        flood) and can frame nothing more: our own GOAWAY, then close."""
        self._malformed(_refusal(exc), type(exc).__name__)
        self.write_goaway(exc)
        self._close()

    def _malformed(self, detail: str, name: str) -> None:
        """The client broke HTTP/2: one audit line, a log line that says so — and the request
        counts as seen, so the connection's end is not blamed on the client rejecting the CA."""
        if self._draining:  # frames after the client's own GOAWAY: its goodbye, not a fault
            log.info("closing an HTTP/2 connection the client ended (%s)", name)
            return
        log.warning("closing an HTTP/2 connection: %s (%s)", detail, name)
        mode, host = self._where
        self._ctx.account(mode, "-", host, "denied", "malformed", protocol="h2")
        self._on_request()

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        self._on_lost()
        if self._idle is not None:
            self._idle.cancel()
        if self._lingering is not None:
            self._lingering.cancel()
        self._idle = self._lingering = None  # their callbacks hold this connection
        for body, task in self._streams.values():
            body.set_exception(ConnectionResetError("the client closed the connection"))
            task.cancel()
        self._streams.clear()
        for stream_id in list(self._discarding):
            self._stop_discarding(stream_id)

    def _close(self, code: int | None = None) -> None:
        """Send the GOAWAY (``h2`` queued one for a protocol error), then linger and close.
        Once: the events after the one that closed the connection are not acted on."""
        if self.done_writing:
            return
        if code is not None and not self.failed:
            with contextlib.suppress(ngh2.NGH2Error):
                self.h2.terminate_connection(code, last_stream_id=self.last_stream_id)
        self.flush_now()
        for body, task in self._streams.values():
            body.set_exception(ConnectionResetError("the connection is closing"))
            task.cancel()
        self._streams.clear()
        transport = self.transport
        if transport is None or self._lingering is not None:
            return
        self.done_writing = True
        if transport.can_write_eof():
            transport.write_eof()
        self._linger_until = self._loop.time() + LINGER
        self._linger_end = self._loop.time() + LINGER_MAX
        self._lingering = self._loop.call_later(LINGER, self._linger)

    def _linger(self) -> None:
        now = self._loop.time()
        if self.transport is None:
            return
        if now >= min(self._linger_until, self._linger_end):
            self.transport.close()
            return
        self._lingering = self._loop.call_later(min(self._linger_until, self._linger_end) - now,
                                                self._linger)

    # -- events --------------------------------------------------------------------------------
    def on_event(self, event: ngh2.Event) -> None:
        if self.done_writing:
            return  # closing: what came after the GOAWAY's cause is not served
        if isinstance(event, ngh2.RequestReceived):
            self._start_stream(event)
        elif isinstance(event, ngh2.DataReceived):
            stream_id = event.stream_id
            entry = self._streams.get(stream_id)
            if entry is not None:
                entry[0].feed(event.data)
                if event.end_stream:
                    entry[0].feed_eof()
            elif stream_id in self._discarding:
                self._discard(stream_id, len(event.data))
            else:
                self.acknowledge(stream_id, len(event.data))
            if event.end_stream:
                self._stop_discarding(stream_id)  # the client is done: no reset needed
        elif isinstance(event, ngh2.TrailersReceived):  # a request's trailers end its body
            entry = self._streams.get(event.stream_id)
            if entry is not None:
                entry[0].feed_eof()
            self._stop_discarding(event.stream_id)
        elif isinstance(event, ngh2.StreamReset):
            self._resetting.add(event.stream_id)
            self._stop_discarding(event.stream_id)
            self._stream_reset(event.stream_id)
        elif isinstance(event, ngh2.StreamClosed):
            self.stream_done(event.stream_id)
            self._guard.closed(event.stream_id, by_us=event.stream_id in self._we_reset)
            self._resetting.discard(event.stream_id)
            self._we_reset.discard(event.stream_id)
            if event.error_code and event.stream_id in self._streams:
                # libnghttp2 reset it (a body longer or shorter than its content-length)
                self._stream_gone(event.stream_id, "the request broke HTTP/2")
        elif isinstance(event, ngh2.SettingsReceived):
            self._spend("settings")
        elif isinstance(event, ngh2.PingReceived):
            self._spend("ping")
        elif isinstance(event, ngh2.GoAwayReceived):
            self._draining = True  # the client's GOAWAY: finish what it asked, then close
            if not self._streams:
                self._close()
        elif isinstance(event, ngh2.ConnectionClosed):
            # libnghttp2 ended the connection with its GOAWAY (a protocol error, more
            # streams than advertised) — or our own terminate, whose cause is already said.
            if event.error_code and not self.done_writing:
                self._malformed(_GOAWAYS.get(event.error_code, "it broke the HTTP/2 protocol"),
                                ngh2.ErrorCode(event.error_code).name)
            self._close()

    def _spend(self, kind: str) -> None:
        now = self._loop.time()
        if now - self._window_start > BUDGET_WINDOW:
            self._window_start, self._spent = now, dict.fromkeys(BUDGETS, 0)
        self._spent[kind] += 1
        if self._spent[kind] > BUDGETS[kind]:
            log.warning("closing an HTTP/2 connection that sent over %d %s frames in %.0fs",
                        BUDGETS[kind], kind, BUDGET_WINDOW)
            self._ctx.metrics.decisions.labels("denied", f"h2_{kind}_flood").inc()
            self._close(Codes.ENHANCE_YOUR_CALM)

    def _stream_reset(self, stream_id: int) -> None:
        self._stream_gone(stream_id, "the client reset the stream")
        self._spend("reset")

    def _stream_gone(self, stream_id: int, why: str) -> None:
        entry = self._streams.pop(stream_id, None)
        if entry is not None:
            body, task = entry
            body.set_exception(ConnectionResetError(why))
            task.cancel()  # the upstream's stream goes with it
        self._arm_idle()

    def _start_stream(self, event: ngh2.RequestReceived) -> None:
        self._on_request()
        stream_id = event.stream_id
        self.last_stream_id = max(self.last_stream_id, stream_id)
        pseudo: dict[bytes, bytes] = {}
        headers: CIMultiDict[str] = CIMultiDict()
        cookies: list[str] = []
        for name, value in event.headers:
            if name.startswith(b":"):
                pseudo[name] = value
                continue
            text = value.decode("utf-8", "surrogateescape")
            if name == b"cookie":  # RFC 9113 §8.2.3: crumbs are joined for HTTP/1.1
                cookies.append(text)
            else:
                headers.add(name.decode("ascii", "surrogateescape"), text)
        if cookies:
            headers["cookie"] = "; ".join(cookies)
        method = pseudo.get(b":method", b"").decode("ascii", "surrogateescape")
        authority = pseudo.get(b":authority", b"").decode("ascii", "surrogateescape")
        if authority and "host" not in headers:
            headers["host"] = authority
        reply = H2Reply(self, stream_id)
        if method == "CONNECT":  # extended CONNECT (WebSockets) is not offered
            self._refuse(stream_id, 405, "CONNECT inside an HTTP/2 connection is not supported")
            return
        path = pseudo.get(b":path", b"/").decode("ascii", "surrogateescape")
        raw_path, _, raw_query = path.partition("?")
        url = URL.build(path=raw_path, query_string=raw_query, encoded=True)
        ended = event.end_stream
        body = H2Body(lambda size: self.acknowledge(stream_id, size))
        if ended:
            body.feed_eof()
        request = Request(method, url, headers, body, not ended,
                          ended or "content-length" in headers, reply, (2, 0))
        task = self._loop.create_task(self._serve(stream_id, request, reply, body))
        self._streams[stream_id] = (body, task)
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None

    def _refuse(self, stream_id: int, status: int, text: str) -> None:
        body = f"keyhole: {text}\n".encode()
        with contextlib.suppress(Gone):
            self.h2.send_response(stream_id, heads.header_block(
                "response", [(":status", str(status))], [
                    ("content-type", "text/plain; charset=utf-8"),
                    ("x-keyhole-error", "bad_request"), ("content-length", str(len(body)))]))
            self.h2.send_data(stream_id, body, end_stream=True)
        self.flush()

    async def _serve(self, stream_id: int, request: Request, reply: H2Reply,
                     body: H2Body) -> None:
        try:
            await self._handler(request)
        except StreamGone:
            pass
        finally:
            self._streams.pop(stream_id, None)
            if not self.closed:
                if not reply.ended:
                    self.reset(stream_id, Codes.INTERNAL_ERROR)
                elif not body.is_eof():  # answered before the body ended
                    self._start_discarding(stream_id, body)
                if self._draining and not self._streams:
                    self._close()
                self._arm_idle()

    # -- a body after its answer -------------------------------------------------------------
    def _start_discarding(self, stream_id: int, body: H2Body) -> None:
        """The answer is out: let the client finish its body (read and dropped, within a
        bound) so it reads the answer, then reset the stream if it is still sending."""
        body.read_nowait(-1)  # what it held: dropped, its window given back
        if body.is_eof():
            return  # it had ended; only unread pieces were left
        self._discarding[stream_id] = [  # later DATA comes to _discard
            DISCARD_BYTES, self._loop.call_later(DISCARD_SECONDS, self._end_discarding, stream_id)]

    def _discard(self, stream_id: int, size: int) -> None:
        entry = self._discarding[stream_id]
        entry[0] -= size
        if entry[0] < 0:
            self._end_discarding(stream_id)
        else:
            self.acknowledge(stream_id, size)

    def _end_discarding(self, stream_id: int) -> None:
        """Still sending after the allowance: RST_STREAM NO_ERROR, "stop, you were answered"."""
        if self._stop_discarding(stream_id) and not self.closed:
            self.reset(stream_id, Codes.NO_ERROR)

    def _stop_discarding(self, stream_id: int) -> bool:
        entry = self._discarding.pop(stream_id, None)
        if entry is None:
            return False
        entry[1].cancel()
        return True

    # -- idle ------------------------------------------------------------------------------------
    def _arm_idle(self) -> None:
        if self._streams or self.closed or self._idle is not None:
            return
        self._idle = self._loop.call_later(self._ctx.settings.idle_timeout, self._idle_timeout)

    def _idle_timeout(self) -> None:
        self._idle = None
        if not self._streams and not self.closed:
            self._close(Codes.NO_ERROR)
