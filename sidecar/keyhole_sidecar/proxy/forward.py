"""One exchange, whatever the wire: the order of the stages, and the relay of the answer.

Shared by every mode (intercepted CONNECT, absolute-form, base-URL, transparent) and both
protocols: the doors only decide the :class:`~keyhole_sidecar.proxy.target.Target`. What is
done to a request and its answer is the stages' (:mod:`keyhole_sidecar.proxy.stages`, run
over one :class:`~keyhole_sidecar.proxy.flow.Exchange`); how either is framed (HTTP/1.1 or
HTTP/2, on the client's side or the upstream's) is the wire's
(:mod:`keyhole_sidecar.proxy.wire`). This module only sends, relays and calls the hooks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from multidict import CIMultiDict

from keyhole_sidecar.egress import TargetRefused
from keyhole_sidecar.inject import HOP_BY_HOP, forwarded_headers, forwarded_query
from keyhole_sidecar.proxy.context import ProxyContext
from keyhole_sidecar.proxy.errors import (
    BadRequest,
    Denied,
    UpstreamFailed,
    connect_failure,
)
from keyhole_sidecar.proxy.exchange import (
    BadResponse,
    Outbound,
    UnsafeHead,
    UpstreamClosed,
)
from keyhole_sidecar.proxy.flow import Exchange, Fields, Stage, check_egress, client_body
from keyhole_sidecar.proxy.stages.approval import Approvals
from keyhole_sidecar.proxy.stages.bounds import Bounds
from keyhole_sidecar.proxy.stages.credentials import Credentials
from keyhole_sidecar.proxy.stages.limits import Limits
from keyhole_sidecar.proxy.stages.mcp import McpPolicy
from keyhole_sidecar.proxy.stages.redaction import Redaction, refused_encoding
from keyhole_sidecar.proxy.stages.usage import Usage
from keyhole_sidecar.proxy.target import Target, content_length, sensitive_fields
from keyhole_sidecar.redact import GrpcBodyError

log = logging.getLogger("keyhole.proxy")

STAGES: tuple[type[Stage], ...] = (Limits, Bounds, McpPolicy, Approvals, Usage, Credentials,
                                   Redaction)
"""In the order they see the request; the answer meets them in reverse (redaction first, so
the meter counts what the client gets)."""
WHOLE_BODY_LIMIT = 64 * 1024
"""A body announced at most this long is read whole and answered with one write (with its
Content-Length) instead of being streamed in chunks: most API answers are this small, and
each write through TLS costs more than the bytes in it."""
_NO_BODY_STATUSES = frozenset({204, 304})
_RESPONSE_DROP = HOP_BY_HOP | {"content-length"}


def open_stages(ex: Exchange, kinds: Sequence[type[Stage]] = STAGES) -> list[Stage]:
    """The stages that apply to ``ex``, in order."""
    return [stage for kind in kinds if (stage := kind.open(ex)) is not None]


async def prepare(stages: list[Stage]) -> None:
    """Run every stage's ``before``: the request may be refused (ProxyError) or changed."""
    for stage in stages:
        await stage.before()


async def forward(ex: Exchange) -> None:
    """Send the exchange's request and relay the answer; raise ProxyError before any byte of
    the answer was written, abort the client's message after. (A WebSocket upgrade to a
    routed host is the caller's to hand to :mod:`websocket` instead.)"""
    ctx, request, target = ex.ctx, ex.request, ex.target
    check_egress(ex)
    ex.headers = forwarded_headers(request.headers, target.routes)
    ex.headers.popall("Content-Length", None)  # the framing is the wire's to write
    ex.body = client_body(request, ex.record)
    stages = open_stages(ex)
    try:
        await prepare(stages)
        out = _outbound(ex)
        started = time.monotonic()
        answer, leg = await _send(ctx, out, target)
        try:
            ctx.metrics.upstream_answered(target.label, time.monotonic() - started)
            ex.answer = answer
            await _relay(ex, stages[::-1])
            if not leg.sent_whole():
                request.reply.close = True  # the client's body was not all sent: unclear
        finally:
            leg.finish()
    finally:
        for stage in stages:
            stage.close()


def _outbound(ex: Exchange) -> Outbound:
    """What goes upstream, as the stages left it."""
    request, target, headers = ex.request, ex.target, ex.headers
    query = forwarded_query(target.query, target.routes) if ex.query is None else ex.query
    host = headers.popone("Host", target.authority)  # a signature may have set it
    return Outbound(
        request.method, target.scheme, target.host, target.port, host,
        f"{target.path}?{query}" if query else target.path, list(headers.items()), ex.body,
        content_length(request.headers)
        if request.length_known and not isinstance(ex.body, bytes) else None,
        readable=target.routed, trailers="trailers" in request.headers.get("TE", "").lower(),
        client_protocol=request.protocol, sensitive=sensitive_fields(target))


async def _send(ctx: ProxyContext, out: Outbound, target: Target):
    """The upstream's answer to ``out``, or the ProxyError that says why there is none."""
    try:
        return await ctx.pool.exchange(out, ctx.settings.upstream_timeout)
    except UnsafeHead as exc:
        raise BadRequest("bad_request", f"the request cannot be sent as it is: {exc}") from None
    except UpstreamClosed:
        ctx.metrics.upstream_errors.labels("upstream_reset").inc()
        raise UpstreamFailed("upstream_reset", f"{target.where} closed the connection before "
                             "answering") from None
    except BadResponse as exc:
        if exc.encoding:
            ctx.metrics.upstream_errors.labels("encoding").inc()
            raise refused_encoding(target.host, "unsupported") from None
        ctx.metrics.upstream_errors.labels("bad_response").inc()
        raise UpstreamFailed("bad_response", f"{target.where} sent a malformed response") from None
    except (TimeoutError, OSError, ValueError, TargetRefused) as exc:
        failure = connect_failure(exc, target.host, target.port)
        if not isinstance(failure, Denied):
            ctx.metrics.upstream_errors.labels(failure.reason).inc()
        raise failure from None


def _response_headers(upstream) -> Fields:
    """The answer's end-to-end headers: what describes the upstream connection stays there."""
    named_in_connection = {t.strip().lower() for v in upstream.getall("Connection", ())
                           for t in v.split(",")}
    return [(name, value) for name, value in upstream.items()
            if not ((lower := name.lower()) in _RESPONSE_DROP or lower.startswith("proxy-")
                    or lower in named_in_connection)]


async def _relay(ex: Exchange, stages: list[Stage]) -> None:
    """Pass the upstream's answer to the client through the stages (nearest the upstream
    first): small bodies in one write, the rest as they arrive."""
    answer, request, target = ex.answer, ex.request, ex.target
    if answer.code == 101:
        ex.ctx.metrics.upstream_errors.labels("bad_response").inc()
        raise UpstreamFailed("bad_response", f"{target.where} switched protocols unasked")
    ex.record.status = answer.code
    ex.bodyless = request.method == "HEAD" or answer.code in _NO_BODY_STATUSES
    length = content_length(answer.headers)
    encoded = answer.headers.get("Content-Encoding", "identity").strip().lower() not in (
        "identity", "")
    try:
        headers = _response_headers(answer.headers)
        for stage in stages:
            headers = stage.head(headers)
        if ex.bodyless:
            if length is not None and request.method == "HEAD" and not (
                    target.routed and encoded):  # a decoded answer's length is not known
                headers.append(("Content-Length", str(length)))
            request.reply.start(answer.code, answer.reason, headers)
            await request.reply.end(_trailers(ex, stages))
        elif length is not None and length <= WHOLE_BODY_LIMIT and not encoded:
            await _answer_whole(ex, headers, stages)
        else:
            await _stream(ex, headers, stages, None if target.routed else length)
    except UnsafeHead as exc:  # raised before the head's first byte was written
        ex.ctx.metrics.upstream_errors.labels("bad_response").inc()
        raise UpstreamFailed("bad_response", f"{target.where} sent a head the proxy will not pass "
                             f"on: {exc}") from None


def _trailers(ex: Exchange, stages: list[Stage]) -> Fields:
    """The answer's trailers (gRPC's status lives there), filtered like headers; the stages'
    ``end``."""
    trailers = _response_headers(CIMultiDict(ex.answer.trailers)) if ex.answer.trailers else []
    for stage in stages:
        trailers = stage.end(trailers)
    return trailers


def _through(stages: list[Stage], data: bytes, last: bool) -> bytes:
    for stage in stages:
        data = stage.chunk(data, last)
    return data


async def _answer_whole(ex: Exchange, headers: Fields, stages: list[Stage]) -> None:
    """Read a small body whole, pass it through the stages, answer in one write. Nothing has
    been sent to the client yet, so an upstream failing mid-body becomes a clean 502 here."""
    payload = ex.answer.body
    try:
        if payload.is_eof() and payload.exception() is None:
            body = payload.read_nowait(-1)  # it came with the head (the usual case): no await
        else:
            body = await payload.read()
    except (ConnectionError, TimeoutError):
        ex.ctx.metrics.upstream_errors.labels("mid_body").inc()
        raise UpstreamFailed("upstream_mid_body", f"{ex.target.where} closed the connection "
                             "before sending the whole response") from None
    try:
        body = _through(stages, body, True)
    except GrpcBodyError as exc:
        ex.ctx.metrics.upstream_errors.labels("encoding").inc()
        raise UpstreamFailed("grpc_uninspectable", f"{ex.target.host} sent a gRPC answer "
                             f"keyhole cannot inspect for secrets: {exc}") from None
    ex.record.bytes_out = len(body)
    await ex.request.reply.send(ex.answer.code, ex.answer.reason, headers, body,
                                _trailers(ex, stages))


async def _write(ex: Exchange, data: bytes) -> None:
    if ex.interjections is None:
        await ex.request.reply.write(data)
        return
    async with ex.interjections:
        await ex.request.reply.write(data)


async def _stream(ex: Exchange, headers: Fields, stages: list[Stage],
                  length: int | None) -> None:
    """Relay a body as it arrives; a break after the head aborts the client's connection
    (HTTP/2: resets the stream)."""
    payload, reply, record = ex.answer.body, ex.request.reply, ex.record
    reply.start(ex.answer.code, ex.answer.reason, headers, length=length)
    try:
        while data := await payload.readany():
            if out := _through(stages, data, False):
                record.bytes_out += len(out)
                await _write(ex, out)
        if tail := _through(stages, b"", True):
            record.bytes_out += len(tail)
            await _write(ex, tail)
    except (ConnectionError, TimeoutError):  # BadResponse and UpstreamClosed among them
        ex.ctx.metrics.upstream_errors.labels("mid_body").inc()
        record.reason = "upstream_mid_body"
        reply.abort()
        return
    except GrpcBodyError as exc:
        log.warning("ending a gRPC answer from %s: %s", ex.target.host, exc)
        ex.ctx.metrics.upstream_errors.labels("encoding").inc()
        record.reason = "grpc_uninspectable"
        reply.abort()
        return
    await reply.end(_trailers(ex, stages))
