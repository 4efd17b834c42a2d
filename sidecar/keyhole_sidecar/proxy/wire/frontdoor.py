"""The door of the proxy port: it owns each accepted socket only until it knows who should.

It looks at the first bytes. A ``CONNECT`` head is parsed by aiohttp's llhttp parser and
answered here: a blind tunnel, a 403, or TLS interception; the HTTP/2 preface means HTTP/2 with
prior knowledge (h2c); anything else is HTTP/1.1. Then the transport is handed, once, to its
owner (``set_protocol``): the HTTP/1.1 or HTTP/2 connection (after TLS, the protocol the client
picked by ALPN) or the tunnel, which get every event from then on. No HTTP message is parsed by
hand anywhere.

The transparent port (:mod:`transparent`) uses the same pieces — :class:`Life`,
:func:`serve_tls`, :func:`hand_over` — for connections it accepted itself.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import ssl
import time
from collections.abc import Callable
from typing import Any

from aiohttp.base_protocol import BaseProtocol
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.http_parser import HttpRequestParser

from keyhole_common.spec import normalise_hostname
from keyhole_sidecar.proxy.context import ProxyContext
from keyhole_sidecar.proxy.errors import (
    BadRequest,
    Denied,
    ProxyError,
    UpstreamFailed,
    parser_complaint,
    render,
)
from keyhole_sidecar.proxy.handlers import handle_intercepted, handle_plain
from keyhole_sidecar.proxy.target import refuse_unrouted, routes_label
from keyhole_sidecar.proxy.wire import heads
from keyhole_sidecar.proxy.wire.http1 import ClientConnection
from keyhole_sidecar.proxy.wire.tunnel import open_blind_tunnel
from keyhole_sidecar.upstream import parse_connect_target

log = logging.getLogger("keyhole.proxy")
_CONNECT = b"CONNECT "
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"  # what an HTTP/2 client sends first (h2c)
_CA_REJECTED = ("UNKNOWN_CA", "BAD_CERTIFICATE", "CERTIFICATE_UNKNOWN", "DECRYPT_ERROR",
                "UNSUPPORTED_CERTIFICATE", "ACCESS_DENIED")
CA_HINT = ("point the client at the keyhole CA: SSL_CERT_FILE / REQUESTS_CA_BUNDLE / "
           "CURL_CA_BUNDLE to a bundle holding it, or NODE_EXTRA_CA_CERTS for Node")


# -- handing a transport over ----------------------------------------------------------------
class Pending(asyncio.Protocol):
    """Holds what arrives on a connection whose owner is not chosen yet: after a TLS handshake
    asyncio delivers decrypted bytes before ``start_tls`` returns, and the owner depends on the
    protocol the handshake picked."""

    def __init__(self):
        self.data: list[bytes] = []
        self.eof = False
        self.lost: tuple[BaseException | None] | None = None

    def data_received(self, data: bytes) -> None:
        self.data.append(data)

    def eof_received(self) -> bool:
        self.eof = True
        return True  # the owner decides

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost = (exc,)


def hand_over(transport: asyncio.Transport, owner: asyncio.Protocol,
              pending: Pending | None = None, initial: bytes = b"") -> None:
    """Give ``transport`` to ``owner`` for the rest of its life, with what already arrived."""
    transport.set_protocol(owner)
    owner.connection_made(transport)
    if initial:
        owner.data_received(initial)
    if pending is not None:
        for data in pending.data:
            owner.data_received(data)
        pending.data.clear()
        if pending.eof and not owner.eof_received():
            transport.close()
        if pending.lost is not None:
            owner.connection_lost(pending.lost[0])


# -- what every client connection is accounted for ---------------------------------------------
class Life:
    """One client connection, whoever owns its transport: counted open until it closes, and
    closed when no complete request arrives within the header timeout (again after TLS)."""

    def __init__(self, ctx: ProxyContext, transport: asyncio.BaseTransport):
        self.ctx = ctx
        self.transport = transport
        self.request_seen = False
        self.intercepted: str | None = None  # the host of a terminated TLS connection
        self.mode = "plain"  # how its requests came, for an audit line with no request
        self._closed = False
        self._loop = asyncio.get_running_loop()
        ctx.metrics.open_connections.inc()
        self._timer = self._loop.call_later(ctx.settings.header_timeout, self._head_timeout)

    def seen(self) -> None:
        self.request_seen = True

    def rearm(self, transport: asyncio.BaseTransport) -> None:
        """A new layer (TLS) on the same connection: wait for its first request anew."""
        self.transport = transport
        self.request_seen = False
        self._timer.cancel()
        self._timer = self._loop.call_later(self.ctx.settings.header_timeout, self._head_timeout)

    def _head_timeout(self) -> None:
        if not self.request_seen and not self._closed and not self.transport.is_closing():
            log.info("closing a connection that sent no complete request in %ss",
                     self.ctx.settings.header_timeout)
            self.transport.close()

    def closed(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._timer.cancel()
        # The transport holds the protocol that holds this, the timer a method of this: let
        # go of both, so nothing of a closed connection waits for the cycle collector.
        self.transport = self._timer = None
        self.ctx.metrics.open_connections.dec()
        if self.intercepted is not None:
            self.ctx.metrics.open_tunnels.labels("intercepted").dec()
            if not self.request_seen:
                log.info("client closed the tunnel to %s right after the TLS handshake without "
                         "a request; if it rejected the keyhole CA: %s", self.intercepted,
                         CA_HINT)


def http_owner(ctx: ProxyContext, life: Life, handler: Callable, *, h2: bool,
               server_kwargs: dict[str, Any]) -> asyncio.Protocol:
    """The connection that serves requests with ``handler``: HTTP/2 (``h2``) or HTTP/1.1."""
    where = (life.mode, life.intercepted or "-")  # what a malformed request is audited as
    if h2:  # imported when first needed: an HTTP/1.1-only pod never loads the HTTP/2 stack
        from keyhole_sidecar.proxy.wire.http2 import H2ClientConnection

        return H2ClientConnection(ctx, handler, on_request=life.seen, on_lost=life.closed,
                                  where=where)
    return ClientConnection(ctx, handler, on_request=life.seen, on_lost=life.closed,
                            server_kwargs=server_kwargs, where=where)


# -- TLS termination, shared with the transparent port -------------------------------------------
def leaf_context(ctx: ProxyContext, host: str) -> ssl.SSLContext | None:
    """The server context with a leaf for ``host``; None (logged) when the CA cannot sign."""
    try:
        return ctx.leaves.context_for(host)
    except Exception:
        log.exception("cannot mint a certificate for %s", host)
        return None


def serve_tls(ctx: ProxyContext, life: Life, host: str, port: int, pending: Pending,
              tls_transport: asyncio.Transport, mode: str, server_kwargs: dict[str, Any]) -> None:
    """After the client's TLS handshake: hand the decrypted stream to the protocol the client
    picked by ALPN; every request on it goes to :func:`handle_intercepted` for ``host:port``
    (``mode``: intercept or transparent)."""
    ctx.metrics.open_tunnels.labels("intercepted").inc()
    life.intercepted, life.mode = f"{host}:{port}", mode
    life.rearm(tls_transport)
    tls = tls_transport.get_extra_info("ssl_object")
    owner = http_owner(ctx, life, functools.partial(handle_intercepted, ctx, host, port,
                                                    mode=mode),
                       h2=tls is not None and tls.selected_alpn_protocol() == "h2",
                       server_kwargs=server_kwargs)
    hand_over(tls_transport, owner, pending)


def handshake_failed(ctx: ProxyContext, host: str, port: int, exc: BaseException,
                     mode: str) -> None:
    text = f"{getattr(exc, 'reason', '')} {exc}".upper()
    if any(code in text for code in _CA_REJECTED):
        reason = "client_rejected_ca"
        log.warning("client rejected the keyhole CA for %s: %s", host, CA_HINT)
    else:
        reason = "client_tls_failed"
        log.info("TLS handshake with the client for %s failed: %s", host,
                 getattr(exc, "reason", None) or type(exc).__name__)
    ctx.account(mode, "CONNECT" if mode == "intercept" else "TLS", f"{host}:{port}", "error",
                reason, injection=routes_label(ctx.routes().match(host, port)))


# -- the proxy port's door ---------------------------------------------------------------------
class FrontDoor(asyncio.Protocol):
    """One client connection to the proxy port, until its owner takes it."""

    def __init__(self, ctx: ProxyContext, server_kwargs: dict[str, Any]):
        self.ctx = ctx
        self._server_kwargs = server_kwargs
        self._loop = asyncio.get_running_loop()
        self._buffer = bytearray()
        self._state = "sniff"  # sniff → connect-head → connecting → handed over
        self._parser: HttpRequestParser | None = None
        self._life: Life | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._life = Life(self.ctx, transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        """Lost before an owner took the transport (after, the owner hears of it)."""
        self.transport = None
        self._life.closed()

    def eof_received(self) -> bool | None:
        return None

    def data_received(self, data: bytes) -> None:
        if self._state == "connecting":
            self._buffer += data  # early bytes before the CONNECT was answered
            return
        if self._state == "sniff":
            self._buffer += data
            if self._buffer[:1] == b"\x16":  # a TLS handshake record, not a request
                self._tls_to_proxy_port()
                return
            if len(self._buffer) < len(_CONNECT) and _CONNECT.startswith(bytes(self._buffer)):
                return
            if len(self._buffer) < len(PREFACE) and PREFACE.startswith(bytes(self._buffer)):
                return  # HTTP/2 with prior knowledge, perhaps: wait for the whole preface
            if not self._buffer.startswith(_CONNECT):
                self._hand_to_http(bytes(self._buffer))
                return
            self._state = "connect-head"
            data, self._buffer = bytes(self._buffer), bytearray()
        self._feed_connect_head(data)

    def _tls_to_proxy_port(self) -> None:
        """A client began TLS with the proxy itself: its proxy URL says https://. Nothing it
        could read says why (it is mid-handshake), so the log and the audit line do."""
        self._state = "handed over"
        self._life.seen()
        self.ctx.account("plain", "-", "-", "denied", "tls_to_proxy_port")
        _tls_refusals.log("a client began TLS on the proxy port: its proxy URL starts with "
                          "https://, but the proxy port speaks plain HTTP (HTTPS is tunnelled "
                          "by CONNECT). Set HTTPS_PROXY=http://127.0.0.1:15080 (http, not https)")
        self.transport.close()

    # -- plain HTTP ------------------------------------------------------------------------
    def _hand_to_http(self, initial: bytes) -> None:
        """Plain requests: HTTP/1.1, or HTTP/2 with prior knowledge (h2c, base-URL mode)."""
        self._state = "handed over"
        self._buffer = bytearray()
        owner = http_owner(self.ctx, self._life, functools.partial(handle_plain, self.ctx),
                           h2=initial.startswith(PREFACE), server_kwargs=self._server_kwargs)
        hand_over(self.transport, owner, initial=initial)

    # -- CONNECT ---------------------------------------------------------------------------
    def _feed_connect_head(self, data: bytes) -> None:
        if self._parser is None:
            s = self.ctx.settings
            self._parser = HttpRequestParser(
                BaseProtocol(self._loop), self._loop, 2**16, max_line_size=s.max_line_size,
                max_field_size=s.max_field_size, max_headers=s.max_headers,
            )
        try:
            messages, _upgraded, tail = self._parser.feed_data(data)
        except HttpProcessingError as exc:
            self.refuse(BadRequest("malformed", "malformed CONNECT request: "
                                                  f"{parser_complaint(exc)}"))
            return
        if not messages:
            return
        self._life.seen()
        self._state = "connecting"
        self._buffer = bytearray(tail)
        self.transport.pause_reading()
        message = messages[0][0]
        self._loop.create_task(self._connect(message.path))

    def refuse(self, error: ProxyError, host: str = "", injection: str | None = None) -> None:
        """Answer the CONNECT with ``error`` (it was not opened), audited as any request."""
        self._life.seen()
        self.ctx.account("tunnel", "CONNECT", host, error.decision, error.reason,
                         status=error.status, injection=injection)
        if self.transport is not None and not self.transport.is_closing():
            answer = render(error)
            self.transport.write(heads.response_head(answer.status, answer.phrase, [
                *answer.headers, ("Content-Length", str(len(answer.body))),
                ("Connection", "close")]) + answer.body)
            self.transport.close()

    async def _connect(self, target: str) -> None:
        try:
            host, port = parse_connect_target(target)
        except ValueError as exc:
            self.refuse(BadRequest("bad_request", str(exc)))
            return
        if self._buffer:
            self.refuse(BadRequest("bad_request", "the client sent data before the CONNECT was "
                                   "answered"), f"{host}:{port}")
            return
        routes = self.ctx.routes().match(host, port)
        if routes:
            await self._intercept(normalise_hostname(host), port)
        else:
            try:
                refuse_unrouted(self.ctx.settings.unmatched, f"{host}:{port}")
            except Denied as denied:
                self.refuse(denied, f"{host}:{port}")
                return
            tunnel = await open_blind_tunnel(self, host, port)
            if tunnel is not None and self.transport is not None:
                self._state = "handed over"
                transport = self.transport
                hand_over(transport, tunnel.client_side(self._life.closed),
                          initial=bytes(self._buffer))
                transport.resume_reading()

    async def _intercept(self, host: str, port: int) -> None:
        """Answer the CONNECT, terminate the client's TLS with a leaf for ``host``, serve."""
        ctx = self.ctx
        tls = leaf_context(ctx, host)
        if tls is None:
            self.refuse(UpstreamFailed("ca_error", "the keyhole CA cannot sign certificates; see "
                                       "the sidecar log"), f"{host}:{port}",
                        routes_label(self.ctx.routes().match(host, port)))
            return
        if self.transport is None:
            return
        self.transport.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        pending = Pending()
        self._state = "handed over"  # start_tls takes the transport from here on
        life = self._life
        try:
            tls_transport = await self._loop.start_tls(
                self.transport, pending, tls, server_side=True,
                ssl_handshake_timeout=ctx.settings.header_timeout,
            )
        except (TimeoutError, ssl.SSLError, ConnectionError, OSError) as exc:
            handshake_failed(ctx, host, port, exc, "intercept")
            life.closed()
            return
        serve_tls(ctx, life, host, port, pending, tls_transport, "intercept",
                  self._server_kwargs)


class _RateLimitedWarning:
    """One warning line at most every few seconds: a misconfigured client retries."""

    def __init__(self, seconds: float = 10.0):
        self._seconds, self._last = seconds, float("-inf")

    def log(self, message: str) -> None:
        now = time.monotonic()
        if now - self._last >= self._seconds:
            self._last = now
            log.warning("%s", message)


_tls_refusals = _RateLimitedWarning()
