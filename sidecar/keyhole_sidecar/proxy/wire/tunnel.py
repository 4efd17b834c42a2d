"""Blind CONNECT tunnels for unrouted hosts under ``--unmatched passthrough``.

Bytes are copied both ways with back-pressure (a slow reader pauses the other side) and
half-close (one side's EOF is passed on); nothing is inspected, so nothing is injected.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol

from keyhole_sidecar.audit import AuditRecord
from keyhole_sidecar.proxy.context import ProxyContext
from keyhole_sidecar.proxy.errors import ProxyError, connect_failure
from keyhole_sidecar.proxy.exchange import ResolveFailed


class Door(Protocol):
    """What a blind tunnel needs of the door that accepted the client (the proxy port's or the
    transparent port's): the transport, the proxy's context, and a way to refuse."""

    ctx: ProxyContext
    transport: asyncio.Transport | None

    def refuse(self, error: ProxyError, host: str = "", injection: str | None = None
               ) -> None: ...


log = logging.getLogger("keyhole.proxy")
CONNECT_TIMEOUT = 10.0


class _UpstreamSide(asyncio.Protocol):
    def __init__(self, tunnel: BlindTunnel):
        self.tunnel = tunnel

    def data_received(self, data: bytes) -> None:
        self.tunnel.from_upstream(data)

    def eof_received(self) -> bool:
        return self.tunnel.upstream_eof()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.tunnel.upstream_lost()

    def pause_writing(self) -> None:
        self.tunnel.door.transport.pause_reading()

    def resume_writing(self) -> None:
        self.tunnel.door.transport.resume_reading()


class _ClientSide(asyncio.Protocol):
    """Owns the client's transport once the tunnel is up (handed over by the door)."""

    def __init__(self, tunnel: BlindTunnel, on_lost):
        self.tunnel, self._on_lost = tunnel, on_lost

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        pass  # the door's transport, which the tunnel already writes to

    def data_received(self, data: bytes) -> None:
        self.tunnel.from_client(data)

    def eof_received(self) -> bool:
        return self.tunnel.client_eof()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.tunnel.client_lost()
        self._on_lost()

    def pause_writing(self) -> None:
        self.tunnel.client_pause_writing()

    def resume_writing(self) -> None:
        self.tunnel.client_resume_writing()


class BlindTunnel:
    def __init__(self, door: Door, record: AuditRecord):
        self.door = door
        self.record = record
        self.upstream: asyncio.Transport | None = None
        self._eofs = 0
        self._lost = 0  # sides whose connection closed
        self._finished = False
        self._last_activity = time.monotonic()
        self._idle_handle: asyncio.TimerHandle | None = None

    def client_side(self, on_lost) -> asyncio.Protocol:
        """The protocol the door hands the client's transport to; ``on_lost`` when it closes."""
        return _ClientSide(self, on_lost)

    # client → upstream
    def from_client(self, data: bytes) -> None:
        self._last_activity = time.monotonic()
        self.record.bytes_in += len(data)
        if self.upstream is not None:
            self.upstream.write(data)

    def client_eof(self) -> bool:
        if self.upstream is not None and self.upstream.can_write_eof():
            self.upstream.write_eof()
        return self._count_eof()

    def client_lost(self) -> None:
        if self.upstream is not None:
            self.upstream.close()
        self._finish()
        self._side_lost()

    def client_pause_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.pause_reading()

    def client_resume_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.resume_reading()

    # upstream → client
    def from_upstream(self, data: bytes) -> None:
        self._last_activity = time.monotonic()
        self.record.bytes_out += len(data)
        self.door.transport.write(data)

    def upstream_eof(self) -> bool:
        if self.door.transport.can_write_eof():
            self.door.transport.write_eof()
        return self._count_eof()

    def upstream_lost(self) -> None:
        if self.door.transport is not None:
            self.door.transport.close()
        self._finish()
        self._side_lost()

    def _side_lost(self) -> None:
        """Once both sides are gone, drop the transports that point back here (through their
        protocols): reference counting frees the tunnel at once, not the cycle collector."""
        self._lost += 1
        if self._lost == 2:
            self.upstream = None
            self.door.transport = None

    def _count_eof(self) -> bool:
        self._eofs += 1
        if self._eofs >= 2:
            self.door.transport.close()
            if self.upstream is not None:
                self.upstream.close()
            return False
        return True  # keep the other direction open

    def watch_idle(self, timeout: float) -> None:
        """Close the tunnel once no byte crossed it for ``timeout`` seconds (a method, not a
        closure: a closure that schedules itself is a cycle that outlives the tunnel)."""
        self._idle_handle = asyncio.get_running_loop().call_later(timeout, self._check_idle,
                                                                  timeout)

    def _check_idle(self, timeout: float) -> None:
        self._idle_handle = None
        if self._finished:
            return
        idle = time.monotonic() - self._last_activity
        if idle >= timeout:
            log.info("closing blind tunnel to %s after %.0fs without traffic",
                     self.record.host, idle)
            self.door.transport.close()
            if self.upstream is not None:
                self.upstream.close()
            return
        self._idle_handle = asyncio.get_running_loop().call_later(timeout - idle,
                                                                  self._check_idle, timeout)

    def _finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        if self._idle_handle is not None:
            self._idle_handle.cancel()
            self._idle_handle = None  # its callback holds this tunnel
        self.door.ctx.metrics.open_tunnels.labels("blind").dec()
        m = self.door.ctx.metrics
        m.bytes.labels("-", "upstream").inc(self.record.bytes_in)
        m.bytes.labels("-", "downstream").inc(self.record.bytes_out)
        self.door.ctx.audit.write(self.record)


async def open_blind_tunnel(door: Door, host: str, port: int,
                            record: AuditRecord | None = None) -> BlindTunnel | None:
    """Connect to ``host:port`` (``--resolve`` and the egress policy applied), answer the
    CONNECT with 200 and start piping. A transparent connection passes its own ``record``
    (it asked nothing, so nothing is answered)."""
    ctx = door.ctx
    answer = record is None
    record = record or AuditRecord(mode="tunnel", method="CONNECT", host=f"{host}:{port}",
                                   decision="passthrough", reason="unrouted")
    loop = asyncio.get_running_loop()
    tunnel = BlindTunnel(door, record)
    try:
        # Resolve once through the egress policy, then connect to exactly what was checked.
        try:
            addresses = await asyncio.wait_for(ctx.resolver.resolve(host, port),
                                               CONNECT_TIMEOUT)
        except OSError as exc:  # TargetRefused and timeouts too: the cause says which
            raise ResolveFailed(f"cannot resolve {host}") from exc
        transport, _ = await asyncio.wait_for(
            loop.create_connection(lambda: _UpstreamSide(tunnel), addresses[0]["host"], port),
            CONNECT_TIMEOUT,
        )
    except (OSError, ValueError) as exc:  # classified as a plain request's would be
        failure = connect_failure(exc, host, port)
        if failure.decision == "error":
            ctx.metrics.upstream_errors.labels(failure.reason).inc()
        door.refuse(failure, f"{host}:{port}")
        return None
    if door.transport is None or door.transport.is_closing():
        transport.close()
        return None
    tunnel.upstream = transport
    ctx.metrics.open_tunnels.labels("blind").inc()
    ctx.metrics.decisions.labels("passthrough", record.reason).inc()
    record.status = 200
    if answer:
        door.transport.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
    tunnel.watch_idle(ctx.settings.tunnel_idle_timeout)
    return tunnel  # the door hands its transport over, then resumes reading
