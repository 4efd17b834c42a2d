"""The upstream's side of the wire: connections by (scheme, host, port), in the protocol each
upstream picks by ALPN, and the one entry the policy calls (:meth:`UpstreamPool.exchange`).

A connection is opened only to an address the egress policy passed (``--resolve`` and the
resolver's checks, as for every connection the proxy opens), with the one verified
``SSLContext`` (offering ``h2`` and ``http/1.1``). An HTTP/1.1 connection goes back to the pool
only when its last answer ended exactly where its framing said and the upstream did not ask to
close; idle ones are bounded in number (per host and in all) and in age. An HTTP/2 connection
is shared by every request to its upstream (:mod:`upstream_http2`).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from typing import Any

from keyhole_common.spec import is_ip_literal
from keyhole_sidecar.proxy.exchange import Answer, Leg, Outbound, ResolveFailed, Unprocessed
from keyhole_sidecar.proxy.wire import upstream_http1
from keyhole_sidecar.proxy.wire.upstream_http1 import UpstreamConnection
from keyhole_sidecar.upstream import OverridingResolver

Key = tuple[str, str, int]  # scheme, host, port


class _Door(asyncio.Protocol):
    """Owns a new upstream connection for as long as it takes to read which protocol the
    upstream chose by ALPN, then hands the transport to that protocol's connection."""

    def __init__(self, loop: asyncio.AbstractEventLoop, key: Key):
        self._loop, self._key = loop, key

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        tls = transport.get_extra_info("ssl_object")
        chosen = tls.selected_alpn_protocol() if tls is not None else None
        owner: asyncio.Protocol
        if chosen == "h2":
            from keyhole_sidecar.proxy.wire.upstream_http2 import H2Upstream  # see _h2_exchange

            owner = H2Upstream(self._key)
        else:
            owner = UpstreamConnection(self._loop, self._key)
        transport.set_protocol(owner)
        owner.connection_made(transport)


Connection = Any  # UpstreamConnection, or upstream_http2.H2Upstream (its .multiplexed is True)


async def _h2_exchange(conn, out: Outbound, timeout: float) -> tuple[Answer, Leg]:
    """The HTTP/2 exchange, imported when first needed: a sidecar whose upstreams all speak
    HTTP/1.1 never loads the HTTP/2 stack (its memory counts in figure (d))."""
    from keyhole_sidecar.proxy.wire import upstream_http2

    return await upstream_http2.exchange(conn, out, timeout)


class UpstreamPool:
    """Idle kept-alive connections by (scheme, host, port); opens new ones when none is idle.

    An HTTP/2 client's request offers the upstream ``h2`` and ``http/1.1`` (``tls_h2``): an
    upstream that picks ``h2`` gets one shared connection carrying many streams; one that picks
    HTTP/1.1 is remembered. An HTTP/1.1 client's request rides an HTTP/2 connection already
    open to its upstream, and otherwise offers ``http/1.1`` alone (``tls``): llhttp's path is
    the faster one (docs/performance.md), and upstreams that speak HTTP/2 speak HTTP/1.1 too."""

    def __init__(self, resolver: OverridingResolver, tls: ssl.SSLContext,
                 tls_h2: ssl.SSLContext | None = None, *,
                 idle_per_host: int = 32, idle_total: int = 512, idle_seconds: float = 30.0,
                 connect_seconds: float = 15.0):
        self.resolver, self.tls, self.tls_h2 = resolver, tls, tls_h2 or tls
        self._h2: dict[Key, list[Connection]] = {}  # shared HTTP/2 connections
        self._h2_opening: dict[Key, asyncio.Future] = {}
        self._http11: set[Key] = set()  # upstreams that answered h2 with http/1.1
        self.idle_per_host, self.idle_total = idle_per_host, idle_total
        self.idle_seconds, self.connect_seconds = idle_seconds, connect_seconds
        self._idle: dict[Key, list[UpstreamConnection]] = {}
        self._idle_count = 0
        self._sweeper: asyncio.TimerHandle | None = None

    async def exchange(self, out: Outbound, timeout: float) -> tuple[Answer, Leg]:
        """Send ``out`` on a connection to its upstream and wait for the answer's head."""
        h2 = out.client_protocol == "h2"
        conn = await self.acquire(out.scheme, out.host, out.port, h2=h2)
        if conn.multiplexed:
            try:
                return await _h2_exchange(conn, out, timeout)
            except Unprocessed:
                if not isinstance(out.body, bytes | None):
                    raise  # part of a streamed body is gone: it cannot be sent again
            conn = await self.acquire(out.scheme, out.host, out.port, h2=h2)  # RFC 9113 §8.7
            if conn.multiplexed:
                return await _h2_exchange(conn, out, timeout)
        return await upstream_http1.exchange(
            conn, out, timeout, lambda: self.acquire(out.scheme, out.host, out.port, h2=h2),
            self.release)

    async def acquire(self, scheme: str, host: str, port: int, *, h2: bool = False
                      ) -> Connection:
        """A connection to the upstream: a shared HTTP/2 one when one is open, or when ``h2`` (an
        HTTP/2 client's request) is offered and the upstream picks it; else an HTTP/1.1 one for
        this request alone."""
        key = (scheme, host, port)
        if scheme == "https" and key not in self._http11:
            if h2:
                shared = await self._shared(key)
                if shared is not None:
                    return shared
            else:
                for conn in self._h2.get(key, ()):
                    if conn.available():
                        return conn
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
        return await self._connect(key, self.tls)

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
            conn = await self._connect(key, self.tls_h2)
            if conn.multiplexed:
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

    async def _connect(self, key: Key, tls_context: ssl.SSLContext) -> Connection:
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
        tls = tls_context if scheme == "https" else None
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
