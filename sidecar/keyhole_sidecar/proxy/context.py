"""What every connection handler needs, gathered once at start-up."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import aiohttp

from keyhole_sidecar.audit import AuditLog
from keyhole_sidecar.certs import LeafCache
from keyhole_sidecar.limits import Limiter
from keyhole_sidecar.metrics import Metrics
from keyhole_sidecar.proxy.exchange import Upstreams
from keyhole_sidecar.routes import RouteTable
from keyhole_sidecar.upstream import OverridingResolver

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
