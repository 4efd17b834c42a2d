"""From a parsed request to a :class:`Target`: the routing decision of each mode.

- intercepted: a request inside a CONNECT tunnel we terminated; the CONNECT authority decides.
- absolute-form: ``GET http://host/path`` sent to the proxy in the clear.
- base-URL: ``GET /<injection>/path`` for clients that ignore proxy variables.
- transparent: a connection redirected to the transparent port; the ClientHello's SNI (or a
  plain request's Host) decides, exactly as a CONNECT authority.

Every routed decision passes through :func:`routed_target`, which applies the rules.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from urllib.parse import unquote_plus

from keyhole_common.approvals import LOCAL_ACCESS_PATH
from keyhole_common.spec import normalise_hostname, split_authority
from keyhole_sidecar.audit import AuditRecord
from keyhole_sidecar.policy import BaseUrlError, PathRejected, check_rules, normalise_path, split_base_url
from keyhole_sidecar.proxy import access
from keyhole_sidecar.proxy.context import ProxyContext
from keyhole_sidecar.proxy.errors import (
    BadRequest,
    Denied,
    ProxyError,
    Unavailable,
    UpstreamFailed,
    render,
)
from keyhole_sidecar.proxy.exchange import Request
from keyhole_sidecar.proxy.flow import Exchange
from keyhole_sidecar.proxy.forward import forward
from keyhole_sidecar.proxy.target import Target, is_websocket, routes_label, unrouted_target
from keyhole_sidecar.proxy.websocket import forward_websocket
from keyhole_sidecar.routes import Route

MAX_AUDIT_QUERY_KEYS = 20
ECHO_METHODS = frozenset({"TRACE", "TRACK"})
log = logging.getLogger("keyhole.proxy")


def routed_target(method: str, routes: tuple[Route, ...], host: str, upstream_port: int,
                  raw_path: str, raw_query: str) -> Target:
    """The target for a routed request, after every applicable injection's rules agreed."""
    concerned = routes_label(routes)
    if method in ECHO_METHODS:
        raise Denied("echo_method", f"{method} echoes the request back, credentials included; "
                                    "keyhole never sends it to a routed host", status=405,
                     injection=concerned)
    try:
        path = normalise_path(raw_path or "/")
    except PathRejected as exc:
        raise BadRequest("bad_path", str(exc), injection=concerned) from None
    for route in routes:
        if route.unavailable is not None:
            raise Unavailable("secret_unavailable", f"{route.unavailable}; nothing was sent",
                              injection=route.name)
    limits, approvals = [], []
    for route in routes:
        verdict = check_rules(route.injection.rules, method, path)
        if not verdict.allowed:
            status = 405 if verdict.reason.startswith("method") else 403
            raise Denied("rule", f"injection {route.name!r} refuses this request: "
                                 f"{verdict.reason}", status=status, injection=route.name)
        rule = route.injection.rules[verdict.index] if verdict.index is not None else None
        if rule is not None and rule.limits is not None:  # the rule's own replace the spec's
            limits.append((route.name, verdict.reason, rule.limits))
        elif route.injection.limits is not None:
            limits.append((route.name, "spec", route.injection.limits))
        if rule is not None and rule.approval is not None:
            approvals.append((route.name, rule.approval))
    if not any(r.injection.rules is not None for r in routes):
        path = raw_path or "/"  # nothing was judged on the path: forward it untouched
    return Target("https", normalise_hostname(host), upstream_port, path, raw_query, routes,
                  tuple(limits), tuple(approvals))


def _query_keys(raw_query: str) -> list[str]:
    keys = [unquote_plus(pair.partition("=")[0]) for pair in raw_query.split("&") if pair]
    return keys[:MAX_AUDIT_QUERY_KEYS]


async def _serve(ctx: ProxyContext, request: Request, record: AuditRecord,
                 decide: Callable[[], Target]) -> None:
    """Decide, forward, and account for the request whatever happens."""
    label = "-"
    started = time.monotonic()
    record.protocol = request.protocol
    ctx.inflight.enter()
    try:
        if tuple(request.version) not in ((1, 0), (1, 1), (2, 0)):
            major, minor = request.version
            raise BadRequest("bad_request", f"HTTP/{major}.{minor} is not supported; speak "
                                            "HTTP/1.1 or HTTP/2")
        target = decide()
        label = target.label
        record.injection = label if target.routed else None
        record.source = "+".join(sorted({r.source for r in target.routes})) or None
        record.decision = "injected" if target.routed else "passthrough"
        record.reason = "routed" if target.routed else "unrouted"
        exchange = Exchange(ctx, request, target, record)
        if target.routed and request.protocol == "http/1.1" and is_websocket(request.headers):
            await forward_websocket(exchange)  # the one exchange the relay does not carry
        else:
            await forward(exchange)
    except ProxyError as error:
        record.decision, record.reason, record.status = error.decision, error.reason, error.status
        if error.injection is not None:  # refused before a target existed: still name it
            label = record.injection = error.injection
        await _answer_error(request, error)
    except asyncio.CancelledError:
        record.reason = "client_closed"
        raise
    except Exception as exc:  # a bug: answer cleanly, log the type only (a message may hold a URL)
        log.error("unexpected %s while handling %s %s for %s", type(exc).__name__,
                  request.method, record.mode, record.host or "-")
        record.decision, record.reason, record.status = "error", "internal_error", 502
        await _answer_error(request, UpstreamFailed("internal_error", "the proxy failed on this "
                                                    "request; see the sidecar log"))
    finally:  # reasons are short codes: bounded labels
        ctx.inflight.leave()
        ctx.metrics.request_done(label, record, time.monotonic() - started)
        ctx.audit.write(record)
        if ctx.traces is not None:
            ctx.traces(record)


async def _answer_error(request: Request, error: ProxyError) -> None:
    """Answer ``error``, or break the connection if part of an answer was already sent."""
    reply = request.reply
    if reply.started:
        reply.abort()
        return
    answer = render(error, grpc=request.headers.get("Content-Type", "").startswith(
        "application/grpc"))
    reply.close = reply.close or answer.close
    with contextlib.suppress(ConnectionError):
        await reply.send(answer.status, answer.phrase, answer.headers, answer.body)


async def handle_plain(ctx: ProxyContext, request: Request) -> None:
    """Requests on the proxy port that are not CONNECT: absolute-form or base-URL."""
    url = request.url
    host = ""
    if url.absolute and url.raw_host:
        host = f"{url.raw_host}:{url.port}" if url.port is not None else url.raw_host
    record = AuditRecord(mode="absolute" if url.absolute else "base-url", method=request.method,
                         host=host, path=url.raw_path,
                         query_keys=_query_keys(url.raw_query_string))
    if not url.absolute and url.raw_path == LOCAL_ACCESS_PATH:
        await access.serve(ctx, request, record)  # the agent asks for access it lacks
        return

    def decide() -> Target:
        if request.method == "CONNECT":
            raise BadRequest("bad_request", "CONNECT must be the first request on a new "
                                            "connection to the proxy")
        if url.absolute:
            return _decide_absolute(ctx, request, url)
        return _decide_base_url(ctx, record, url.raw_path, url.raw_query_string)

    await _serve(ctx, request, record, decide)


_LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})


def _decide_absolute(ctx: ProxyContext, request: Request, url) -> Target:
    if url.scheme not in ("http", "https"):
        raise BadRequest("bad_request", f"scheme {url.scheme!r} is not proxied; use http or https")
    if url.user is not None or url.password is not None:
        raise BadRequest("bad_request", "credentials in the request URL are refused; the proxy "
                                        "adds credentials itself")
    host, port = url.raw_host, url.port
    if not host or port is None:
        raise BadRequest("bad_request", "the request URL has no host")
    table = ctx.routes()
    routes = table.match(host, port, plain_http=url.scheme == "http")
    name = url.raw_path.lstrip("/").split("/", 1)[0]
    if not routes and host.strip("[]").lower() in _LOOPBACK_NAMES and table.by_name(name):
        raise BadRequest("base_url_via_proxy", f"this is a base-URL request to keyhole itself "
                         f"(http://{host}:{port}/{name}/…), but it came through a proxy: the "
                         "client's HTTP_PROXY covers 127.0.0.1 too. Add 127.0.0.1,localhost to "
                         "NO_PROXY (keyhole sets it in pods), or run the client without a "
                         "proxy variable")
    if not routes:
        return unrouted_target(ctx.settings.unmatched, url.scheme, host, port, url.raw_path,
                               url.raw_query_string)
    entry = table.upstream_for(routes, host, port, plain_http=url.scheme == "http")
    return routed_target(request.method, routes, host, entry.upstream_port, url.raw_path,
                         url.raw_query_string)


def _decide_base_url(ctx: ProxyContext, record: AuditRecord, raw_path: str,
                     raw_query: str) -> Target:
    try:
        name, rest = split_base_url(raw_path)
    except BaseUrlError as exc:
        raise Denied("not_found" if exc.status == 404 else "bad_path", str(exc),
                     status=exc.status) from None
    table = ctx.routes()
    route = table.by_name(name)
    if route is None:
        raise Denied("not_found", f"no injection is named {name!r} in this pod; base-URL "
                                  "requests look like /<injection>/<path> (to ask a person "
                                  f"for one it lacks: POST {LOCAL_ACCESS_PATH})", status=404)
    upstream = route.injection.base_url_upstream
    if upstream is None:
        raise Denied("not_found", f"injection {name!r} lists only wildcard hosts; base-URL "
                                  "mode needs an exact host", status=404, injection=name)
    record.host = f"{upstream.name}:{upstream.upstream_port}"
    routes = table.match(upstream.name, upstream.upstream_port)
    return routed_target(record.method, routes, upstream.name, upstream.upstream_port, rest,
                         raw_query)


async def handle_intercepted(ctx: ProxyContext, host: str, port: int,
                             request: Request, *, mode: str = "intercept"
                             ) -> None:
    """A request decrypted from a TLS connection to ``host:port``: a CONNECT tunnel, or a
    transparently captured connection whose ClientHello named ``host`` (``mode``)."""
    url = request.url
    record = AuditRecord(mode=mode, method=request.method, host=f"{host}:{port}",
                         path=url.raw_path, query_keys=_query_keys(url.raw_query_string))

    def decide() -> Target:
        _require_same_authority(request, url, host, port)
        table = ctx.routes()
        routes = table.match(host, port)
        if not routes:  # revoked while the tunnel was open
            return unrouted_target(ctx.settings.unmatched, "https", host, port, url.raw_path,
                                   url.raw_query_string)
        entry = table.upstream_for(routes, host, port)
        return routed_target(request.method, routes, host, entry.upstream_port, url.raw_path,
                             url.raw_query_string)

    await _serve(ctx, request, record, decide)


async def handle_transparent_http(ctx: ProxyContext, host: str, port: int,
                                  request: Request) -> None:
    """A plain-HTTP request captured on its way to port ``port``: the first request's Host
    decided the route, as a CONNECT authority does; a routed host goes upstream over HTTPS."""
    url = request.url
    record = AuditRecord(mode="transparent", method=request.method, host=f"{host}:{port}",
                         path=url.raw_path, query_keys=_query_keys(url.raw_query_string))

    def decide() -> Target:
        _require_same_authority(request, url, host, port, default_port=80)
        table = ctx.routes()
        routes = table.match(host, port, plain_http=True)
        if not routes:  # revoked while the connection was open
            return unrouted_target(ctx.settings.unmatched, "http", host, port, url.raw_path,
                                   url.raw_query_string)
        entry = table.upstream_for(routes, host, port, plain_http=True)
        return routed_target(request.method, routes, host, entry.upstream_port, url.raw_path,
                             url.raw_query_string)

    await _serve(ctx, request, record, decide)


def _require_same_authority(request: Request, url, host: str, port: int,
                            default_port: int = 443) -> None:
    """Inside a tunnel the CONNECT authority decides; a different Host or URL is refused."""
    claims = []
    if url.absolute:
        claims.append((url.raw_host or "", url.port))
    host_header = request.headers.getall("Host", [])
    if len(host_header) > 1:
        raise BadRequest("bad_request", "more than one Host header")
    if host_header:
        try:
            claims.append(split_authority(host_header[0]))
        except ValueError as exc:
            raise BadRequest("bad_request", f"malformed Host header: {exc}") from None
    for claimed_host, claimed_port in claims:
        if (normalise_hostname(claimed_host) != normalise_hostname(host)
                or (claimed_port or default_port) != port):
            raise Denied("host_mismatch", f"this tunnel was opened to {host}:{port}; a "
                                          "request for another host must open its own",
                         status=421)
