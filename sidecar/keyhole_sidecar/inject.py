"""Building the outgoing request: what the client sent, minus what it must not send, plus secrets.

Client-sent values of injected headers and query parameters are dropped, never merged;
``Proxy-*`` and hop-by-hop headers never leave the proxy.
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import quote, unquote_plus

from multidict import CIMultiDict, CIMultiDictProxy

from keyhole_sidecar.routes import Route

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade",
    "proxy-connection", "proxy-authorization", "proxy-authenticate", "expect", "host",
})


def forwarded_headers(client: CIMultiDictProxy[str] | CIMultiDict[str],
                      routes: Iterable[Route] = (), *, keep_upgrade: bool = False
                      ) -> CIMultiDict[str]:
    """The headers to send upstream.

    Drops hop-by-hop headers (and those named in ``Connection``), every ``Proxy-*`` header,
    every header an injection sets and every one it strips, then adds the injected values.
    """
    named_in_connection = {
        token.strip().lower() for value in client.getall("Connection", ())
        for token in value.split(",") if token.strip()
    }
    routes = tuple(routes)
    injected = frozenset().union(*(r.dropped_headers for r in routes))  # credential sources' too
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in client.items():
        lower = name.lower()
        if keep_upgrade and lower in ("upgrade", "connection"):
            continue  # the websocket client library writes its own
        if (lower in HOP_BY_HOP or lower.startswith("proxy-") or lower in injected
                or lower in named_in_connection):
            continue
        out.add(name, value)
    for route in routes:
        for name, value in route.headers:
            out[name] = value
    return out


def forwarded_query(raw_query: str, routes: Iterable[Route]) -> str:
    """The raw query string to send: client pairs kept byte for byte, injected names replaced."""
    injected = [(name, value) for r in routes for name, value in r.query]
    if not injected:
        return raw_query
    names = {name for name, _ in injected}
    kept = [
        pair for pair in raw_query.split("&")
        if pair and unquote_plus(pair.partition("=")[0]) not in names
    ]
    kept.extend(f"{quote(name, safe='')}={quote(value, safe='')}" for name, value in injected)
    return "&".join(kept)
