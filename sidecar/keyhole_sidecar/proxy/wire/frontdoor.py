"""The protocol that owns every accepted socket on the proxy port.

It looks at the first bytes only. A ``CONNECT`` head is parsed by aiohttp's llhttp parser
and answered here: a blind tunnel, a 403, or TLS interception, after which the decrypted
stream is served by the relay (:class:`~sidecar.proxy.downstream.ClientConnection`).
Anything else is served by the relay directly. No HTTP message is parsed by hand anywhere.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import ssl
from typing import Any

from aiohttp.base_protocol import BaseProtocol
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.http_parser import HttpRequestParser

from keyhole_common.spec import normalise_hostname
from keyhole_sidecar.audit import AuditRecord
from keyhole_sidecar.proxy.context import ProxyContext
from keyhole_sidecar.proxy.errors import parser_complaint
from keyhole_sidecar.proxy.handlers import handle_intercepted, handle_plain
from keyhole_sidecar.proxy.wire.http1 import ClientConnection
from keyhole_sidecar.proxy.wire.http2 import PREFACE, H2ClientConnection
from keyhole_sidecar.proxy.wire.tunnel import open_blind_tunnel
from keyhole_sidecar.upstream import parse_connect_target

log = logging.getLogger("keyhole.proxy")
_CONNECT = b"CONNECT "
_CA_REJECTED = ("UNKNOWN_CA", "BAD_CERTIFICATE", "CERTIFICATE_UNKNOWN", "DECRYPT_ERROR",
                "UNSUPPORTED_CERTIFICATE", "ACCESS_DENIED")
CA_HINT = ("point the client at the keyhole CA: SSL_CERT_FILE / REQUESTS_CA_BUNDLE / "
           "CURL_CA_BUNDLE to a bundle holding it, or NODE_EXTRA_CA_CERTS for Node")


def _status_line(status: int, reason: str, body: str = "") -> bytes:
    payload = body.encode()
    head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n")
    return head.encode() + payload


class Relay(asyncio.Protocol):
    """Passes a transport's events to the protocol serving it, and tells us when it closes.

    Buffers whatever arrives before the protocol is attached: after ``start_tls`` asyncio
    delivers decrypted data before it would call ``connection_made``.
    """

    def __init__(self, on_lost):
        self._target: asyncio.Protocol | None = None
        self._pending: list[bytes] = []
        self._eof = False
        self._on_lost = on_lost

    def attach(self, target: asyncio.Protocol, transport: asyncio.BaseTransport,
               initial: bytes = b"") -> None:
        self._target = target
        target.connection_made(transport)
        if initial:
            target.data_received(initial)
        for chunk in self._pending:
            target.data_received(chunk)
        self._pending.clear()
        if self._eof:
            target.eof_received()

    def data_received(self, data: bytes) -> None:
        if self._target is None:
            self._pending.append(data)
        else:
            self._target.data_received(data)

    def eof_received(self) -> bool | None:
        if self._target is None:
            self._eof = True
            return True
        return self._target.eof_received()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._on_lost()
        if self._target is not None:
            self._target.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._target is not None:
            self._target.pause_writing()

    def resume_writing(self) -> None:
        if self._target is not None:
            self._target.resume_writing()


class FrontDoor(asyncio.Protocol):
    """One client connection to the proxy port, from accept to close."""

    def __init__(self, ctx: ProxyContext, server_kwargs: dict[str, Any]):
        self.ctx = ctx
        self._server_kwargs = server_kwargs
        self._loop = asyncio.get_running_loop()
        self._buffer = bytearray()
        self._state = "sniff"  # sniff → connect-head → connecting → tunnel | tls; or plain
        self._parser: HttpRequestParser | None = None
        self._relay: Relay | None = None
        self._tunnel = None
        self._closed = False
        self._intercepted = False  # a TLS tunnel is up (counted in open_tunnels)
        self.request_seen = False
        self.transport: asyncio.Transport | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.ctx.metrics.open_connections.inc()
        self._timer = self._loop.call_later(self.ctx.settings.header_timeout, self._head_timeout)

    def _head_timeout(self) -> None:
        if not self.request_seen and not self._closed and self.transport is not None:
            log.info("closing a connection that sent no complete request in %ss",
                     self.ctx.settings.header_timeout)
            self.transport.close()

    def _on_closed(self) -> None:
        if not self._closed:
            self._closed = True
            self._timer.cancel()
            self.ctx.metrics.open_connections.dec()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._on_closed()
        if self._relay is not None:
            self._relay.connection_lost(exc)
        elif self._tunnel is not None:
            self._tunnel.client_lost()

    # -- bytes in --------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self._relay is not None:
            self._relay.data_received(data)
            return
        if self._tunnel is not None:
            self._tunnel.from_client(data)
            return
        if self._state == "connecting":
            self._buffer += data  # early bytes before the CONNECT was answered
            return
        if self._state == "sniff":
            self._buffer += data
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

    def eof_received(self) -> bool | None:
        if self._relay is not None:
            return self._relay.eof_received()
        if self._tunnel is not None:
            return self._tunnel.client_eof()
        return None

    def pause_writing(self) -> None:
        if self._relay is not None:
            self._relay.pause_writing()
        elif self._tunnel is not None:
            self._tunnel.client_pause_writing()

    def resume_writing(self) -> None:
        if self._relay is not None:
            self._relay.resume_writing()
        elif self._tunnel is not None:
            self._tunnel.client_resume_writing()

    # -- plain HTTP ------------------------------------------------------------------------
    def _http_server(self, handler, h2: bool = False) -> ClientConnection | H2ClientConnection:
        """The connection that serves requests with ``handler``: HTTP/2 (``h2``) or HTTP/1.1."""
        def first_seen() -> None:
            self.request_seen = True

        if h2:
            return H2ClientConnection(self.ctx, handler, on_request=first_seen)
        return ClientConnection(self.ctx, handler, on_request=first_seen,
                                server_kwargs=self._server_kwargs)

    def _hand_to_http(self, initial: bytes) -> None:
        """Plain requests: HTTP/1.1, or HTTP/2 with prior knowledge (h2c, base-URL mode)."""
        self._state = "plain"
        self._buffer = bytearray()
        self._relay = Relay(on_lost=lambda: None)
        server = self._http_server(functools.partial(handle_plain, self.ctx),
                                   h2=initial.startswith(PREFACE))
        self._relay.attach(server, self.transport, initial)

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
            self.refuse(400, "Bad Request", f"malformed CONNECT request: {parser_complaint(exc)}",
                         "bad_request")
            return
        if not messages:
            return
        self.request_seen = True
        self._state = "connecting"
        self._buffer = bytearray(tail)
        self.transport.pause_reading()
        message = messages[0][0]
        self._loop.create_task(self._connect(message.path))

    def refuse(self, status: int, reason: str, message: str, code: str,
                host: str = "") -> None:
        self.request_seen = True
        self._audit(AuditRecord(mode="tunnel", method="CONNECT", host=host, status=status,
                                decision="denied", reason=code))
        self.ctx.metrics.decisions.labels("denied", code).inc()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(_status_line(status, reason, f"keyhole: {message}\n"))
            self.transport.close()

    def _audit(self, record: AuditRecord) -> None:
        self.ctx.audit.write(record)

    async def _connect(self, target: str) -> None:
        try:
            host, port = parse_connect_target(target)
        except ValueError as exc:
            self.refuse(400, "Bad Request", str(exc), "bad_request")
            return
        if self._buffer:
            self.refuse(400, "Bad Request", "the client sent data before the CONNECT was "
                         "answered", "bad_request", f"{host}:{port}")
            return
        routes = self.ctx.routes().match(host, port)
        if routes:
            await self._intercept(normalise_hostname(host), port)
        elif self.ctx.settings.unmatched == "deny":
            self.refuse(403, "Forbidden", f"{host}:{port} is not routed by any injection and "
                         "this proxy runs with --unmatched deny", "unrouted", f"{host}:{port}")
        else:
            self._tunnel = await open_blind_tunnel(self, host, port)

    def leaf_context(self, host: str, port: int) -> ssl.SSLContext | None:
        """The server context with a leaf for ``host``; refuses the connection when the CA
        cannot sign."""
        try:
            return self.ctx.leaves.context_for(host)
        except Exception:
            log.exception("cannot mint a certificate for %s", host)
            self.refuse(502, "Bad Gateway", "the keyhole CA cannot sign certificates; see the "
                         "sidecar log", "ca_error", f"{host}:{port}")
            return None

    async def _intercept(self, host: str, port: int) -> None:
        """Answer the CONNECT, terminate the client's TLS with a leaf for ``host``, serve."""
        ctx = self.ctx
        tls = self.leaf_context(host, port)
        if tls is None:
            return
        self.transport.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        relay = self.tls_relay(host, port)
        self._relay = relay  # events now reach the relay until start_tls swaps protocols
        self._state = "tls"
        try:
            tls_transport = await self._loop.start_tls(
                self.transport, relay, tls, server_side=True,
                ssl_handshake_timeout=ctx.settings.header_timeout,
            )
        except (TimeoutError, ssl.SSLError, ConnectionError, OSError) as exc:
            self.handshake_failed(host, port, exc, "intercept")
            self._on_closed()
            return
        self.serve_tls(host, port, relay, tls_transport, "intercept")

    def tls_relay(self, host: str, port: int) -> Relay:
        return Relay(on_lost=functools.partial(self._tls_closed, host, port))

    def serve_tls(self, host: str, port: int, relay: Relay, tls_transport: asyncio.Transport,
                  mode: str) -> None:
        """After the client's TLS handshake: every request it sends goes to
        :func:`handle_intercepted` for ``host:port`` (``mode``: intercept or transparent)."""
        ctx = self.ctx
        ctx.metrics.open_tunnels.labels("intercepted").inc()
        self._intercepted = True
        self.request_seen = False
        self._timer.cancel()
        self._timer = self._loop.call_later(ctx.settings.header_timeout, self._head_timeout)
        tls = tls_transport.get_extra_info("ssl_object")
        server = self._http_server(functools.partial(handle_intercepted, ctx, host, port,
                                                     mode=mode),
                                   h2=tls is not None and tls.selected_alpn_protocol() == "h2")
        relay.attach(server, tls_transport)

    def handshake_failed(self, host: str, port: int, exc: BaseException, mode: str) -> None:
        text = f"{getattr(exc, 'reason', '')} {exc}".upper()
        if any(code in text for code in _CA_REJECTED):
            reason = "client_rejected_ca"
            log.warning("client rejected the keyhole CA for %s: %s", host, CA_HINT)
        else:
            reason = "client_tls_failed"
            log.info("TLS handshake with the client for %s failed: %s", host,
                     getattr(exc, "reason", None) or type(exc).__name__)
        self.ctx.metrics.decisions.labels("error", reason).inc()
        self._audit(AuditRecord(mode=mode, method="CONNECT" if mode == "intercept" else "TLS",
                                host=f"{host}:{port}", decision="error", reason=reason))

    def _tls_closed(self, host: str, port: int) -> None:
        if self._intercepted:
            self.ctx.metrics.open_tunnels.labels("intercepted").dec()
            self._intercepted = False
            if not self.request_seen:
                log.info("client closed the tunnel to %s right after the TLS handshake without a "
                         "request; if it rejected the keyhole CA: %s", host, CA_HINT)
        self._on_closed()
