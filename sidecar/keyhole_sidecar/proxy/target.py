"""Where a request goes: what the doors and the stages both need to know of it.

A door (CONNECT, absolute-form, base-URL, transparent) decides a :class:`Target`; the stages
read it. Nothing here knows of the wire or of any one stage.
"""

from __future__ import annotations

from dataclasses import dataclass

from yarl import URL

from keyhole_common.spec import Limits
from keyhole_common.spec.model import Approval
from keyhole_sidecar.credentials import CredentialSource
from keyhole_sidecar.inject import forwarded_query
from keyhole_sidecar.proxy.errors import Denied
from keyhole_sidecar.redact import Redactor
from keyhole_sidecar.routes import Route

_DEFAULT_PORT = {"https": 443, "http": 80}


def routes_label(routes: tuple[Route, ...]) -> str:
    """The injections a decision concerned, as one bounded label: ``a+b``, or ``-`` for none."""
    if len(routes) == 1:  # the common case, asked several times per request
        return routes[0].injection.name
    return "+".join(sorted(r.name for r in routes)) or "-"


@dataclass(frozen=True, slots=True)
class Target:
    """Where a request goes and which injections apply (none: passthrough)."""

    scheme: str
    host: str
    port: int
    path: str  # raw (percent-encoded) path to send
    query: str  # raw query string from the client
    routes: tuple[Route, ...] = ()
    limits: tuple[tuple[str, str, Limits], ...] = ()
    """(injection, scope, limits) for each injection whose limits apply to this request."""
    approvals: tuple[tuple[str, Approval], ...] = ()
    """(injection, approval) for each injection whose rule holds this request for a person."""

    @property
    def routed(self) -> bool:
        return bool(self.routes)

    @property
    def label(self) -> str:
        """Bounded metric label: the injection names, or '-' when unrouted."""
        return routes_label(self.routes)

    @property
    def authority(self) -> str:
        """The Host header: the port only when it is not the scheme's default."""
        host = f"[{self.host.strip('[]')}]" if ":" in self.host else self.host
        return host if self.port == _DEFAULT_PORT.get(self.scheme) else f"{host}:{self.port}"

    @property
    def where(self) -> str:
        """``host:port``, as errors name the upstream."""
        return f"{self.host}:{self.port}"

    def url(self, scheme: str | None = None, query: str | None = None) -> URL:
        return URL.build(scheme=scheme or self.scheme, host=self.host, port=self.port,
                         path=self.path, encoded=True, query_string=(
                             forwarded_query(self.query, self.routes) if query is None else query))

    def redactor(self) -> Redactor:
        if len(self.routes) == 1:
            return self.routes[0].live_redactor()
        return Redactor(form for r in self.routes for form in r.live_redactor().forms)

    @property
    def credentials(self) -> list[CredentialSource]:
        return [r.credential for r in self.routes if r.credential is not None]


def refuse_unrouted(unmatched: str, where: str, reason: str = "unrouted") -> None:
    """The one decision on a host no injection routes: under ``--unmatched deny`` it is
    refused (raises Denied), else it passes untouched. Every door asks here."""
    if unmatched == "deny":
        raise Denied(reason, f"{where} is not routed by any injection and this proxy runs "
                             "with --unmatched deny")


def unrouted_target(unmatched: str, scheme: str, host: str, port: int, raw_path: str,
                    raw_query: str) -> Target:
    """A request to a host no injection routes: passed through as it came, or refused."""
    refuse_unrouted(unmatched, f"{host}:{port}")
    return Target(scheme, host, port, raw_path or "/", raw_query)


def is_websocket(headers) -> bool:
    return (headers.get("Upgrade", "").lower() == "websocket"
            and "upgrade" in headers.get("Connection", "").lower())


def content_length(headers) -> int | None:
    """A head's Content-Length as a number (llhttp checked the digits), or None."""
    value = headers.get("Content-Length")
    return int(value) if value is not None and value.isdigit() else None


_ALWAYS_SENSITIVE = frozenset({"authorization", "proxy-authorization"})


def sensitive_fields(target: Target) -> frozenset[str]:
    """The fields that carry a secret on this request: every credential header its routes set
    (static, minted or signed) and, when a query parameter holds one, the path."""
    names = set(_ALWAYS_SENSITIVE)
    for route in target.routes:
        names |= route.header_names
        if route.query:
            names.add(":path")
    return frozenset(names)
