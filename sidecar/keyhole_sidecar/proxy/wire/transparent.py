"""The transparent port: outbound connections that ``keyhole-init``'s rules redirected here.

The client asked for no proxy, so the decision comes from what it sends, read without
consuming it (``MSG_PEEK`` on the accepted socket, before any transport reads from it): the
TLS ClientHello's server name, or a plain request's ``Host`` (parsed by llhttp). Then exactly
what a CONNECT to that name would get:

- a routed name: TLS terminated with the namespace CA's leaf for that name, requests injected
  and sent upstream over the sidecar's own verified connection to the *name*, resolved by the
  sidecar and checked by the egress policy — never to the address the client chose;
- no name, or an unrouted one: spliced blindly to the original destination (``passthrough``,
  the egress policy applied) or reset (``deny``).

A plain request to a routed host goes upstream over HTTPS, as an absolute-form one does. From
the chosen route on, the code is the one every mode shares (:mod:`frontdoor`'s TLS termination
and hand-over, :func:`handle_intercepted`, the blind tunnel); a client that picks ``h2`` by
ALPN is served over HTTP/2, as through a CONNECT tunnel.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import socket
import ssl
import struct
import time
from typing import Any

from aiohttp.base_protocol import BaseProtocol
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.http_parser import HttpRequestParser

from keyhole_common.spec import normalise_hostname, split_authority
from keyhole_sidecar.audit import AuditRecord
from keyhole_sidecar.clienthello import MAX_CLIENT_HELLO, Verdict, read_sni
from keyhole_sidecar.proxy.context import ProxyContext
from keyhole_sidecar.proxy.errors import BadRequest, Denied, ProxyError, UpstreamFailed
from keyhole_sidecar.proxy.handlers import handle_transparent_http
from keyhole_sidecar.proxy.target import refuse_unrouted, routes_label
from keyhole_sidecar.proxy.wire.frontdoor import (
    Life,
    Pending,
    hand_over,
    handshake_failed,
    http_owner,
    leaf_context,
    serve_tls,
)
from keyhole_sidecar.proxy.wire.tunnel import open_blind_tunnel

log = logging.getLogger("keyhole.proxy")
SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h; IP6T_SO_ORIGINAL_DST has the same number
MAX_PLAIN_HEAD = 65536


def original_destination(sock: socket.socket) -> tuple[str, int] | None:
    """Where the client was connecting before the REDIRECT rule sent it here."""
    try:
        if sock.family == socket.AF_INET6:
            raw = sock.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)
            return str(ipaddress.IPv6Address(raw[8:24])), struct.unpack_from("!H", raw, 2)[0]
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        return socket.inet_ntoa(raw[4:8]), struct.unpack_from("!H", raw, 2)[0]
    except OSError:
        return None  # not redirected (no conntrack entry): someone dialled the port directly


def _reset(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class _TunnelDoor(asyncio.Protocol):
    """A captured connection to an unrouted destination, until its blind tunnel is up (bytes
    that arrive meanwhile are kept); a client that asked for no proxy is refused with a
    reset, never an HTTP answer."""

    def __init__(self, ctx: ProxyContext, address: str, port: int, record: AuditRecord):
        self.ctx = ctx
        self.transport: asyncio.Transport | None = None
        self._plan = (address, port, record)
        self._buffer = bytearray()
        self._life: Life | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._life = Life(self.ctx, transport)
        self._life.seen()
        transport.pause_reading()
        asyncio.get_running_loop().create_task(self._open())

    def data_received(self, data: bytes) -> None:
        self._buffer += data

    def connection_lost(self, exc: BaseException | None) -> None:
        self.transport = None
        self._life.closed()

    async def _open(self) -> None:
        tunnel = await open_blind_tunnel(self, *self._plan[:2], record=self._plan[2])
        if tunnel is not None and self.transport is not None:
            transport = self.transport
            hand_over(transport, tunnel.client_side(self._life.closed),
                      initial=bytes(self._buffer))
            transport.resume_reading()

    def refuse(self, error: ProxyError, host: str = "", injection: str | None = None) -> None:
        """A transparent client asked nothing: it is reset, and the line says why."""
        _refused(self.ctx, host, error, injection)
        if self.transport is not None and not self.transport.is_closing():
            _reset(self.transport.get_extra_info("socket"))
            self.transport.abort()


def _refused(ctx: ProxyContext, host: str, error: ProxyError,
             injection: str | None = None) -> None:
    ctx.account("transparent", "TCP", host, error.decision, error.reason, injection=injection)
    log.info("transparent connection to %s reset: %s", host or "?", error.message)


class TransparentPort:
    """Accepts on the transparent port, peeks, decides, and hands each connection on."""

    def __init__(self, ctx: ProxyContext, server_kwargs: dict[str, Any], address: tuple[str, int]):
        self.ctx, self._server_kwargs = ctx, server_kwargs
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind(address)
            self.sock.listen(1024)
        except OSError:
            self.sock.close()
            raise
        self.sock.setblocking(False)
        self.address = self.sock.getsockname()[:2]
        self._loop = asyncio.get_running_loop()
        self._accepting = self._loop.create_task(self._accept())
        self._handlers: set[asyncio.Task] = set()

    def close(self) -> None:
        self._accepting.cancel()
        for task in self._handlers:
            task.cancel()
        self.sock.close()

    async def _accept(self) -> None:
        while True:
            try:
                conn, _ = await self._loop.sock_accept(self.sock)
            except OSError as exc:  # EMFILE and friends: keep serving the others
                log.warning("transparent port: accept failed: %s", exc.strerror)
                await asyncio.sleep(0.1)
                continue
            conn.setblocking(False)
            task = self._loop.create_task(self._handle(conn))
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)

    async def _handle(self, conn: socket.socket) -> None:
        destination = original_destination(conn)
        if destination is None or destination == tuple(self.address):
            _refused(self.ctx, "", Denied("not_redirected", "not a redirected connection: the "
                     "transparent port serves only what keyhole-init's rules send it"))
            _reset(conn)
            return
        address, port = destination
        try:
            peeked, kind = await self._peek(conn)
        except TimeoutError:
            _refused(self.ctx, f"{address}:{port}", Denied(
                "header_timeout", "no ClientHello or request head in "
                f"{self.ctx.settings.header_timeout}s"))
            _reset(conn)
            return
        except (ConnectionError, OSError):
            conn.close()
            return
        except asyncio.CancelledError:
            conn.close()
            raise
        try:
            if kind == "tls":
                await self._tls(conn, peeked, address, port)
            else:
                await self._plain(conn, peeked, address, port)
        except OSError:  # the client went away while it was handed on
            conn.close()
        except Exception as exc:  # a bug: close this one, keep serving (type only: no data)
            log.error("unexpected %s on a transparent connection to %s:%s",
                      type(exc).__name__, address, port)
            conn.close()

    async def _peek(self, conn: socket.socket) -> tuple[bytes, str]:
        """What waits on the socket, left there, until it is a whole ClientHello or a whole
        request head. SO_RCVLOWAT makes the socket readable only once more has arrived."""
        deadline = time.monotonic() + self.ctx.settings.header_timeout
        try:
            while True:
                data = await self._peek_once(conn, deadline)
                if not data:
                    raise ConnectionResetError("closed before a request")
                if data[0] == 0x16:
                    if read_sni(data).verdict != Verdict.MORE:
                        return data, "tls"
                    limit = MAX_CLIENT_HELLO + 5
                elif b"\r\n\r\n" in data or len(data) >= MAX_PLAIN_HEAD:
                    return data, "plain"
                else:
                    limit = MAX_PLAIN_HEAD
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, min(len(data) + 1, limit))
        finally:
            with contextlib.suppress(OSError):
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)

    async def _peek_once(self, conn: socket.socket, deadline: float) -> bytes:
        while True:
            try:
                return conn.recv(MAX_PLAIN_HEAD, socket.MSG_PEEK)
            except BlockingIOError:
                pass
            ready = self._loop.create_future()
            self._loop.add_reader(conn.fileno(), _settle, ready)
            try:
                await asyncio.wait_for(ready, max(0.0, deadline - time.monotonic()))
            finally:
                self._loop.remove_reader(conn.fileno())

    async def _tls(self, conn: socket.socket, peeked: bytes, address: str, port: int) -> None:
        sni = read_sni(peeked)
        if sni.verdict == Verdict.MALFORMED:
            _refused(self.ctx, f"{address}:{port}", BadRequest(
                "bad_client_hello", "a malformed or oversized TLS ClientHello"))
            _reset(conn)
            return
        name = normalise_hostname(sni.name) if sni.verdict == Verdict.NAME else ""
        if not (name and self.ctx.routes().match(name, port)):
            await self._pass(conn, address, port, name, "unrouted" if name else "no_sni")
            return
        tls = leaf_context(self.ctx, name)
        if tls is None:
            _refused(self.ctx, f"{name}:{port}", UpstreamFailed(
                "ca_error", "the keyhole CA cannot sign certificates; see the sidecar log"),
                routes_label(self.ctx.routes().match(name, port)))
            _reset(conn)
            return
        pending = Pending()
        try:
            tls_transport, _ = await self._loop.connect_accepted_socket(
                lambda: pending, conn, ssl=tls,
                ssl_handshake_timeout=self.ctx.settings.header_timeout)
        except (TimeoutError, ssl.SSLError, ConnectionError, OSError) as exc:
            handshake_failed(self.ctx, name, port, exc, "transparent")
            conn.close()
            return
        serve_tls(self.ctx, Life(self.ctx, tls_transport), name, port, pending, tls_transport,
                  "transparent", self._server_kwargs)

    async def _plain(self, conn: socket.socket, peeked: bytes, address: str, port: int) -> None:
        host = _host_of(peeked, self.ctx.settings)
        if host is None:
            _refused(self.ctx, f"{address}:{port}", BadRequest(
                "malformed", "a malformed plain-HTTP request head"))
            _reset(conn)
            return
        if host and self.ctx.routes().match(host, port, plain_http=True):
            pending = Pending()
            transport, _ = await self._loop.connect_accepted_socket(lambda: pending, conn)
            life = Life(self.ctx, transport)
            hand_over(transport, http_owner(
                self.ctx, life, functools.partial(handle_transparent_http, self.ctx, host, port),
                h2=False, server_kwargs=self._server_kwargs), pending)
            return
        await self._pass(conn, address, port, host, "unrouted" if host else "no_host")

    async def _pass(self, conn: socket.socket, address: str, port: int, name: str,
                    reason: str) -> None:
        label = f"{name or address}:{port}"
        try:
            refuse_unrouted(self.ctx.settings.unmatched, label, reason)
        except Denied as denied:
            _refused(self.ctx, label, denied)
            _reset(conn)
            return
        record = AuditRecord(mode="transparent", method="TCP", host=label,
                             decision="passthrough", reason=reason)
        await self._loop.connect_accepted_socket(
            lambda: _TunnelDoor(self.ctx, address, port, record), conn)


def _settle(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


def _host_of(head: bytes, settings) -> str | None:
    """The first request's Host, normalised ("" when it has none), parsed by llhttp; None when
    llhttp refuses the head."""
    loop = asyncio.get_running_loop()
    parser = HttpRequestParser(BaseProtocol(loop), loop, 2**16,
                               max_line_size=settings.max_line_size,
                               max_field_size=settings.max_field_size,
                               max_headers=settings.max_headers)
    try:
        messages, _, _ = parser.feed_data(head)
    except HttpProcessingError:
        return None
    if not messages:
        return None
    values = messages[0][0].headers.getall("Host", [])
    if len(values) != 1:
        return "" if not values else None
    try:
        host, _port = split_authority(values[0])
    except ValueError:
        return None
    return normalise_hostname(host)
