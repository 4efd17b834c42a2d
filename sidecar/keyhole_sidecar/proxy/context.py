"""What every connection handler needs, gathered once at start-up."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal

import aiohttp

from keyhole_sidecar.approvals import Approvals
from keyhole_sidecar.audit import AuditLog, AuditRecord
from keyhole_sidecar.certs import LeafCache
from keyhole_sidecar.limits import Limiter
from keyhole_sidecar.metrics import Metrics
from keyhole_sidecar.proxy.exchange import Upstreams
from keyhole_sidecar.routes import RouteTable
from keyhole_sidecar.upstream import OverridingResolver
from keyhole_sidecar.usage.budgets import Budgets
from keyhole_sidecar.usage.shared import SharedBudgets

Unmatched = Literal["passthrough", "deny"]


@dataclass(frozen=True)
class ProxySettings:
    """Tunables of the proxy port; the defaults are what a pod gets."""

    unmatched: Unmatched = "passthrough"
    """What to do with hosts no injection routes: tunnel/forward them, or answer 403."""
    header_timeout: float = 15.0
    """Seconds a new connection has to send a complete first request head."""
    idle_timeout: float = 120.0
    """Seconds a keep-alive connection may sit idle between requests."""
    upstream_timeout: float = 300.0
    """Seconds to wait for an upstream's response headers (bodies may stream for longer)."""
    tunnel_idle_timeout: float = 600.0
    """Seconds a blind tunnel may carry no bytes in either direction before it is closed."""
    max_line_size: int = 8190
    """Longest request line accepted (longer: 400)."""
    max_field_size: int = 8190
    """Longest header line accepted (longer: 400)."""
    max_headers: int = 100
    """Most header lines in one request (more: 400)."""


class InFlight:
    """The requests being answered now: what a drain (SIGTERM) waits for."""

    def __init__(self):
        self.count = 0
        self._idle: asyncio.Future | None = None

    def enter(self) -> None:
        self.count += 1

    def leave(self) -> None:
        self.count -= 1
        if self.count == 0 and self._idle is not None and not self._idle.done():
            self._idle.set_result(None)

    async def wait_idle(self, timeout: float, interrupt: asyncio.Event) -> bool:
        """Wait until none is in flight (True), ``timeout`` passes or ``interrupt`` is set."""
        if self.count == 0:
            return True
        self._idle = asyncio.get_running_loop().create_future()
        interrupted = asyncio.ensure_future(interrupt.wait())
        try:
            await asyncio.wait([self._idle, interrupted], timeout=timeout,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            interrupted.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await interrupted
        return self.count == 0


@dataclass
class ProxyContext:
    settings: ProxySettings
    routes: Callable[[], RouteTable]
    """The table being served now; called per request so reloads apply at once."""
    leaves: LeafCache
    resolver: OverridingResolver
    pool: Upstreams
    """The upstream side of the wire every proxied request travels on (wire/pool.py)."""
    session: aiohttp.ClientSession
    """The proxy's own client: credential endpoints and WebSocket upstreams."""
    metrics: Metrics
    audit: AuditLog
    limiter: Limiter
    """spec.limits' counters, kept across reloads."""
    budgets: Budgets = field(default_factory=Budgets)
    """spec.llm.budgets' counts and reservations, kept across reloads."""
    shared: SharedBudgets = field(default_factory=lambda: SharedBudgets(None, time.time))
    """The budgets an injection's pods share: slices leased from the operator."""
    approvals: Approvals = field(default_factory=Approvals)
    """Requests held for a person's approval, and the grants alive (``approvals``)."""
    inflight: InFlight = field(default_factory=InFlight)
    """Requests being answered, for the drain on SIGTERM."""
    legacy_mcp: dict[tuple[str, str], Callable[[bytes], Awaitable[None]]] = field(
        default_factory=dict)
    """MCP's legacy HTTP+SSE sessions open now: (injection, the endpoint the server named) →
    how to write an event on that session's stream, where a POST to it is answered."""
    traces: Callable[[AuditRecord], None] | None = None
    """Where each answered request's record goes as a span (--otlp-endpoint), if anywhere."""

    def account(self, mode: str, method: str, host: str, decision: str, reason: str, *,
                status: int = 0, injection: str | None = None,
                protocol: str | None = None) -> None:
        """The one place a connection-level decision is written down: a refused CONNECT, a
        failed handshake, bytes the parser refused, a reset transparent connection. One audit
        line and one count; a request's own line is its exchange's (handlers)."""
        self.metrics.decisions.labels(decision, reason).inc()
        self.audit.write(AuditRecord(mode=mode, method=method, host=host, decision=decision,
                                     reason=reason, status=status, injection=injection,
                                     protocol=protocol))
