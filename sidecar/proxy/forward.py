"""Sending one request upstream and streaming the answer back, redacted.

Shared by every mode (intercepted CONNECT, absolute-form, base-URL): the modes only decide
the :class:`Target`; what leaves the proxy and what comes back is decided here, once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
from aiohttp import WSMsgType, web
from aiohttp.http_exceptions import ContentEncodingError
from multidict import CIMultiDict
from yarl import URL

from sidecar.audit import AuditRecord
from sidecar.credentials import CredentialError, CredentialSource, Outgoing
from sidecar.egress import TargetRefused
from sidecar.inject import HOP_BY_HOP, forwarded_headers, forwarded_query
from sidecar.proxy.context import ProxyContext
from sidecar.proxy.errors import BadRequest, Denied, ProxyError, UpstreamFailed
from sidecar.redact import Redactor
from sidecar.routes import Route

# Encodings the proxy can decode to redact; anything else from a routed host is refused.
DECODABLE = ("gzip", "deflate", "br")
# A body announced at most this long is read whole and answered with one write (with its
# Content-Length) instead of being streamed in chunks: most API answers are this small, and
# each write through TLS costs more than the bytes in it.
WHOLE_BODY_LIMIT = 64 * 1024
# A body whose hash goes into a signature (SigV4, payload: signed) is read whole first.
SIGNED_BODY_LIMIT = 16 * 1024 * 1024
_NO_BODY_STATUSES = frozenset({204, 304})
_RESPONSE_DROP = HOP_BY_HOP | {"content-length"}
_WS_HANDSHAKE = frozenset({"sec-websocket-key", "sec-websocket-version",
                           "sec-websocket-protocol", "sec-websocket-extensions"})


@dataclass(frozen=True, slots=True)
class Target:
    """Where a request goes and which injections apply (none: passthrough)."""

    scheme: str
    host: str
    port: int
    path: str  # raw (percent-encoded) path to send
    query: str  # raw query string from the client
    routes: tuple[Route, ...] = ()

    @property
    def routed(self) -> bool:
        return bool(self.routes)

    @property
    def label(self) -> str:
        """Bounded metric label: the injection names, or '-' when unrouted."""
        if len(self.routes) == 1:  # the common case, asked several times per request
            return self.routes[0].injection.name
        return "+".join(sorted(r.name for r in self.routes)) or "-"

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


def _is_websocket(request: web.BaseRequest) -> bool:
    return (request.headers.get("Upgrade", "").lower() == "websocket"
            and "upgrade" in request.headers.get("Connection", "").lower())


def _accept_encoding(client_value: str | None) -> str | None:
    """What a routed request may ask the upstream for: only encodings we can decode."""
    if not client_value:
        return None
    offered = [part.split(";")[0].strip().lower() for part in client_value.split(",")]
    chosen = [enc for enc in DECODABLE if enc in offered or "*" in offered]
    return ", ".join(chosen) if chosen else None


async def _client_body(request: web.BaseRequest, record: AuditRecord) -> AsyncIterator[bytes]:
    async for chunk in request.content.iter_any():
        record.bytes_in += len(chunk)
        yield chunk


def _cause(exc: BaseException | None, kind: type[BaseException]) -> BaseException | None:
    """The first exception of ``kind`` in the chain (aiohttp wraps resolver errors)."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, kind):
            return exc
        wrapped = getattr(exc, "os_error", None)
        if isinstance(wrapped, kind):
            return wrapped
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def _caused_by(exc: BaseException | None, kind: type[BaseException]) -> bool:
    return _cause(exc, kind) is not None


def _refused_encoding(target: Target, encoding: str) -> UpstreamFailed:
    return UpstreamFailed("encoding", f"{target.host} answered with Content-Encoding {encoding!r}, "
                          "which keyhole cannot inspect for secrets")


def _upstream_failure(exc: BaseException, target: Target) -> ProxyError:
    where = f"{target.host}:{target.port}"
    refused = _cause(exc, TargetRefused)
    if refused is not None:
        return Denied(refused.reason, str(refused))
    if _caused_by(exc, ContentEncodingError):
        return _refused_encoding(target, "unsupported")
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return UpstreamFailed("upstream_tls", f"the TLS certificate of {where} failed "
                              f"verification ({exc.certificate_error}); the request was not sent")
    if isinstance(exc, aiohttp.ClientSSLError):
        return UpstreamFailed("upstream_tls", f"TLS with {where} failed ({exc}); the request was "
                              "not sent")
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return UpstreamFailed("dns", f"cannot resolve {target.host}")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return UpstreamFailed("connect", f"cannot connect to {where} ({exc.os_error.strerror or exc})")
    if isinstance(exc, asyncio.TimeoutError):
        return UpstreamFailed("timeout", f"{where} did not answer in time", status=504)
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError):
        return UpstreamFailed("upstream_reset", f"{where} closed the connection before answering")
    if isinstance(exc, aiohttp.InvalidURL):
        return UpstreamFailed("bad_request", f"{target.host} is not a host name or address the "
                              "proxy can connect to", status=400)
    if isinstance(exc, aiohttp.ClientResponseError):
        return UpstreamFailed("bad_response", f"{where} sent a malformed response")
    return UpstreamFailed("upstream_error", f"talking to {where} failed ({type(exc).__name__})")


def _response_headers(upstream: aiohttp.ClientResponse, target: Target,
                      redactor: Redactor | None) -> CIMultiDict[str]:
    named_in_connection = {t.strip().lower() for v in upstream.headers.getall("Connection", ())
                           for t in v.split(",")}
    headers: CIMultiDict[str] = CIMultiDict()
    # One search over every value answers "does any header hold a secret?" (almost never).
    if redactor is not None and not redactor.found_in_text("\n".join(upstream.headers.values())):
        redactor = None
    for name, value in upstream.headers.items():
        lower = name.lower()
        if lower in _RESPONSE_DROP or lower.startswith("proxy-") or lower in named_in_connection:
            continue
        if target.routed and lower == "content-encoding":
            continue  # decoded for redaction
        headers.add(name, redactor.redact_text(value) if redactor else value)
    if not target.routed and "Content-Length" in upstream.headers:
        headers["Content-Length"] = upstream.headers["Content-Length"]
    return headers


async def forward(ctx: ProxyContext, request: web.BaseRequest, target: Target,
                  record: AuditRecord) -> web.StreamResponse:
    """Send ``request`` to ``target`` and stream the answer; raise ProxyError before any byte
    of the answer was written, abort the connection after."""
    try:
        ctx.resolver.check_literal(target.host, target.port)
    except TargetRefused as refused:
        raise Denied(refused.reason, str(refused)) from None
    if target.routed and _is_websocket(request):
        return await _forward_websocket(ctx, request, target, record)
    headers = forwarded_headers(request.headers, target.routes)
    if target.routed:
        headers.popall("Accept-Encoding", None)
        accept = _accept_encoding(request.headers.get("Accept-Encoding"))
        if accept:
            headers["Accept-Encoding"] = accept
    body = None
    if request.can_read_body:
        if request.headers.get("Expect", "").lower() == "100-continue":
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = _client_body(request, record)
    query = None
    if target.credentials:
        body, query = await _authorize(ctx, request, target, headers, body)

    label = target.label
    started = time.monotonic()
    try:
        upstream_cm = ctx.session.request(
            request.method, target.url(query=query), headers=headers, data=body, allow_redirects=False,
            auto_decompress=target.routed, compress=None, chunked=None,
        )
        async with asyncio.timeout(ctx.settings.upstream_timeout):  # no task, unlike wait_for
            upstream = await upstream_cm.__aenter__()
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        failure = _upstream_failure(exc, target)
        if not isinstance(failure, Denied):
            ctx.metrics.upstream_errors.labels(failure.reason).inc()
        raise failure from None
    try:
        ctx.metrics.upstream_answered(label, time.monotonic() - started)
        encoding = upstream.headers.get("Content-Encoding", "identity").strip().lower()
        if target.routed and encoding not in ("identity", "", *DECODABLE):
            ctx.metrics.upstream_errors.labels("encoding").inc()
            raise _refused_encoding(target, encoding)
        redactor = target.redactor() if target.routed else None
        headers = _response_headers(upstream, target, redactor)
        if _small_identity_body(request, upstream, encoding):
            return await _answer_whole(ctx, upstream, target, headers, redactor, record)
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason,
                                      headers=headers)
        record.status = upstream.status
        await response.prepare(request)
        stream = redactor.stream() if redactor else None
        try:
            async for chunk in upstream.content.iter_any():
                out = stream.feed(chunk) if stream else chunk
                if out:
                    record.bytes_out += len(out)
                    await response.write(out)
            if stream:
                tail = stream.flush()
                if tail:
                    record.bytes_out += len(tail)
                    await response.write(tail)
        except (TimeoutError, aiohttp.ClientError):
            ctx.metrics.upstream_errors.labels("mid_body").inc()
            record.reason = "upstream_mid_body"
            request.transport and request.transport.close()
            return response
        await response.write_eof()
        return response
    finally:
        await upstream_cm.__aexit__(None, None, None)


async def _authorize(ctx: ProxyContext, request: web.BaseRequest, target: Target,
                     headers: CIMultiDict[str], body: AsyncIterator[bytes] | None,
                     ) -> tuple[AsyncIterator[bytes] | bytes | None, str]:
    """Let each credential source set its credential (minting, or signing the request).
    Returns the body to send (read whole when a signature covers it) and the final query."""
    out = Outgoing(request.method, target.host, target.port, target.path,
                   forwarded_query(target.query, target.routes), headers, request.headers)
    sources = target.credentials
    if any(source.hashes_payload for source in sources):
        whole = b""
        if body is not None:
            parts, size = [], 0
            async for chunk in body:
                size += len(chunk)
                if size > SIGNED_BODY_LIMIT:
                    raise BadRequest("body_too_large", f"a body over {SIGNED_BODY_LIMIT >> 20} "
                                     "MiB cannot be hashed for its signature; for services that "
                                     "accept it (S3), set spec.awsSigV4.payload: unsigned",
                                     status=413)
                parts.append(chunk)
            whole = b"".join(parts)
        out.payload_hash, body = hashlib.sha256(whole).hexdigest(), whole
    try:
        for source in sources:
            await source.authorize(out, ctx.session)
    except CredentialError as error:
        message = f"injection {target.label!r}: {error.message}"
        if error.reason == "unsupported":  # the client's request, not the credential
            raise BadRequest("credential_unsupported", message) from None
        raise UpstreamFailed("credential", message) from None
    return body, out.query


def _small_identity_body(request: web.BaseRequest, upstream: aiohttp.ClientResponse,
                         encoding: str) -> bool:
    length = upstream.content_length
    return (length is not None and length <= WHOLE_BODY_LIMIT and encoding in ("identity", "")
            and request.method != "HEAD" and upstream.status not in _NO_BODY_STATUSES)


async def _answer_whole(ctx: ProxyContext, upstream: aiohttp.ClientResponse, target: Target,
                        headers: CIMultiDict[str], redactor: Redactor | None,
                        record: AuditRecord) -> web.Response:
    """Read a small body whole, redact it, answer in one write. Nothing has been sent to the
    client yet, so an upstream failing mid-body becomes a clean 502 here."""
    try:
        body = await upstream.read()
    except (TimeoutError, aiohttp.ClientError):
        ctx.metrics.upstream_errors.labels("mid_body").inc()
        raise UpstreamFailed("upstream_mid_body", f"{target.host}:{target.port} closed the "
                             "connection before sending the whole response") from None
    if redactor:
        body = redactor.redact(body)
    headers.popall("Content-Length", None)  # aiohttp writes the (redacted) body's own length
    record.status, record.bytes_out = upstream.status, len(body)
    return web.Response(status=upstream.status, reason=upstream.reason, headers=headers,
                        body=body)


async def _forward_websocket(ctx: ProxyContext, request: web.BaseRequest, target: Target,
                             record: AuditRecord) -> web.StreamResponse:
    """A WebSocket upgrade to a routed host: inject into the handshake, redact every message."""
    headers = forwarded_headers(request.headers, target.routes, keep_upgrade=True)
    for name in _WS_HANDSHAKE:
        headers.popall(name, None)
    query = None
    if target.credentials:
        _, query = await _authorize(ctx, request, target, headers, None)
    protocols = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",")
                 if p.strip()]
    try:
        upstream = await ctx.session.ws_connect(
            target.url("wss", query), headers=headers, protocols=protocols, autoclose=False,
            autoping=False, compress=0, max_msg_size=0,
        )
    except aiohttp.WSServerHandshakeError as exc:
        raise UpstreamFailed("websocket_refused", f"{target.host} refused the WebSocket upgrade "
                             f"with status {exc.status}", status=502) from None
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        failure = _upstream_failure(exc, target)
        ctx.metrics.upstream_errors.labels(failure.reason).inc()
        raise failure from None
    redactor = target.redactor()
    client = web.WebSocketResponse(protocols=[upstream.protocol] if upstream.protocol else (),
                                   autoclose=False, autoping=False, max_msg_size=0)
    await client.prepare(request)
    record.status = 101

    async def pump(source, sink, redact: bool) -> None:
        async for msg in source:
            if msg.type == WSMsgType.TEXT:
                await sink.send_str(redactor.redact_text(msg.data) if redact else msg.data)
            elif msg.type == WSMsgType.BINARY:
                await sink.send_bytes(redactor.redact(msg.data) if redact else msg.data)
            elif msg.type == WSMsgType.PING:
                await sink.ping(msg.data)
            elif msg.type == WSMsgType.PONG:
                await sink.pong(msg.data)
            elif msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                break
        await sink.close(code=source.close_code or 1000)

    tasks = [asyncio.ensure_future(pump(client, upstream, False)),
             asyncio.ensure_future(pump(upstream, client, True))]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        await upstream.close()
        await client.close()
    return client
