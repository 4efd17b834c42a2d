"""Everything about connections the proxy opens: name resolution, upstream TLS, the pool.

``--resolve HOST:PORT:ADDR`` (curl's meaning, the port kept) applies to every connection:
routed requests, passthrough forwarding and blind tunnels alike.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver

from keyhole_common.spec import is_ip_literal, normalise_hostname, split_authority
from keyhole_sidecar.egress import EgressPolicy


@dataclass(frozen=True, slots=True)
class ResolveOverride:
    host: str
    port: int
    address: str

    @classmethod
    def parse(cls, text: str) -> ResolveOverride:
        """``api.openai.com:443:127.0.0.1`` (IPv6 addresses may be bracketed)."""
        host, sep, rest = text.partition(":")
        port_text, sep2, address = rest.partition(":")
        if not (sep and sep2 and host and address) or not port_text.isdigit():
            raise ValueError(f"--resolve {text!r}: expected HOST:PORT:ADDRESS, "
                             "e.g. api.openai.com:443:127.0.0.1")
        port = int(port_text)
        if not 0 < port < 65536:
            raise ValueError(f"--resolve {text!r}: port must be 1-65535")
        return cls(normalise_hostname(host), port, address.strip("[]"))


class OverridingResolver(AbstractResolver):
    """The system resolver, except for names pinned with ``--resolve``; every address it hands
    out has passed the egress policy, so callers connect only to what was checked."""

    def __init__(self, overrides: list[ResolveOverride], egress: EgressPolicy | None = None):
        self._overrides = {(o.host, o.port): o.address for o in overrides}
        self._system = ThreadedResolver()
        self.egress = egress or EgressPolicy()

    def lookup_override(self, host: str, port: int) -> str | None:
        return self._overrides.get((normalise_hostname(host), port))

    def check_literal(self, host: str, port: int) -> None:
        """aiohttp connects to IP-literal hosts without asking the resolver: check them here."""
        if is_ip_literal(host) and self.lookup_override(host, port) is None:
            self.egress.check(host, host.strip("[]"))

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_UNSPEC) -> list[ResolveResult]:
        address = self.lookup_override(host, port)
        if address is not None:  # the operator's explicit choice: not subject to the policy
            fam = socket.AF_INET6 if ":" in address else socket.AF_INET
            return [ResolveResult(hostname=host, host=address, port=port, family=fam, proto=0,
                                  flags=socket.AI_NUMERICHOST)]
        results = await self._system.resolve(host.strip("[]"), port, family)
        for result in results:
            self.egress.check(host, result["host"])  # every answer, before any connect
        return results

    async def close(self) -> None:
        await self._system.close()


def upstream_tls_context(extra_ca: Path | None,
                         alpn: tuple[str, ...] = ("http/1.1",)) -> ssl.SSLContext:
    """Verified TLS: the system roots (certifi where the system has none), plus ``--upstream-ca``;
    ``alpn``: the protocols offered (``h2`` only for HTTP/2 clients' requests)."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if not context.cert_store_stats().get("x509_ca"):
        import certifi

        context.load_verify_locations(certifi.where())
    if extra_ca is not None:
        try:
            context.load_verify_locations(cafile=str(extra_ca))
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"--upstream-ca {extra_ca}: not a readable PEM bundle ({exc})") from None
    context.set_alpn_protocols(list(alpn))
    return context


def make_session(resolver: OverridingResolver, tls: ssl.SSLContext, *,
                 limit: int = 256) -> aiohttp.ClientSession:
    """The one pooled client session the proxy forwards through.

    No cookies, no environment proxies, no redirects (set per request), no timeouts on the
    body: streams may run for as long as the client keeps reading.
    """
    connector = aiohttp.TCPConnector(
        resolver=resolver, ssl=tls, limit=limit, limit_per_host=0, ttl_dns_cache=10,
        enable_cleanup_closed=False, keepalive_timeout=30,
    )
    return aiohttp.ClientSession(
        connector=connector, cookie_jar=aiohttp.DummyCookieJar(), trust_env=False,
        auto_decompress=False, skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept"),
        timeout=aiohttp.ClientTimeout(total=None, connect=15, sock_connect=10,
                                      sock_read=None),
        max_line_size=16384, max_field_size=16384,
    )


def parse_connect_target(target: str) -> tuple[str, int]:
    """``host:port`` of a CONNECT request; the port is required (RFC 9110 §9.3.6)."""
    host, port = split_authority(target)
    if port is None:
        raise ValueError(f"CONNECT target {target!r} has no port")
    return host, port
