"""One exchange, whatever the wire: what is sent upstream, and what of the answer goes back.

Shared by every mode (intercepted CONNECT, absolute-form, base-URL, transparent) and both
protocols: the modes only decide the :class:`Target`; headers, limits on the body, credentials,
redaction of headers, bodies and trailers, and the audit's byte counts are decided here, once,
on a :class:`~keyhole_sidecar.proxy.exchange.Request` and an
:class:`~keyhole_sidecar.proxy.exchange.Answer`. How either is framed (HTTP/1.1 or HTTP/2, on
the client's side or the upstream's) is the wire's (:mod:`keyhole_sidecar.proxy.wire`).
"""

from __future__ import annotations

import hashlib
import logging
import socket
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from multidict import CIMultiDict
from yarl import URL

from keyhole_common.spec import Limits
from keyhole_common.spec.model import Llm
from keyhole_sidecar.audit import AuditRecord
from keyhole_sidecar.codings import Undecodable, codings, decoded_copy
from keyhole_sidecar.credentials import CredentialError, CredentialSource, Outgoing
from keyhole_sidecar.egress import TargetRefused
from keyhole_sidecar.inject import HOP_BY_HOP, forwarded_headers, forwarded_query
from keyhole_sidecar.limits import Refusal
from keyhole_sidecar.proxy.context import ProxyContext
from keyhole_sidecar.proxy.errors import (
    BadRequest,
    BudgetExceeded,
    Denied,
    LimitExceeded,
    ProxyError,
    UpstreamFailed,
)
from keyhole_sidecar.proxy.exchange import (
    Answer,
    BadResponse,
    Body,
    Outbound,
    Request,
    ResolveFailed,
    UnsafeHead,
    UpstreamClosed,
)
from keyhole_sidecar.redact import GrpcBodyError, GrpcStreamRedactor, Redactor, StreamRedactor
from keyhole_sidecar.routes import Route
from keyhole_sidecar.usage.budgets import Asked, BudgetRefusal, BudgetTicket, input_estimate
from keyhole_sidecar.usage.meter import Meter, is_metered, read_request
from keyhole_sidecar.usage.prices import cost, price_of
from keyhole_sidecar.usage.shared import SharedTicket

log = logging.getLogger("keyhole.proxy")
# A body announced at most this long is read whole and answered with one write (with its
# Content-Length) instead of being streamed in chunks: most API answers are this small, and
# each write through TLS costs more than the bytes in it.
WHOLE_BODY_LIMIT = 64 * 1024
# A body whose hash goes into a signature (SigV4, payload: signed) is read whole first.
SIGNED_BODY_LIMIT = 16 * 1024 * 1024
WHOLE_REQUEST_LIMIT = 1 << 20  # a model API request up to this size is read before it is sent
_NO_BODY_STATUSES = frozenset({204, 304})
_RESPONSE_DROP = HOP_BY_HOP | {"content-length"}
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


def is_websocket(headers) -> bool:
    return (headers.get("Upgrade", "").lower() == "websocket"
            and "upgrade" in headers.get("Connection", "").lower())


async def _client_body(request: Request, record: AuditRecord) -> AsyncIterator[bytes]:
    body = request.body
    while True:
        data = await body.readany()
        if not data:
            return
        record.bytes_in += len(data)
        yield data


async def _read_up_to(body: bytes | AsyncIterator[bytes], limit: int
                      ) -> tuple[list[bytes], bool]:
    """The body's pieces, read until it ends or passes ``limit`` bytes (the piece that passed
    it included), and whether it passed: what every "read it whole, up to a size" needs."""
    if isinstance(body, bytes):
        return [body], len(body) > limit
    parts, size = [], 0
    async for data in body:
        parts.append(data)
        size += len(data)
        if size > limit:
            return parts, True
    return parts, False


async def _gathered(body: AsyncIterator[bytes], limit: int) -> Body:
    """A model API request's body, whole when it is at most ``limit`` bytes (its JSON names
    the model and the output ceiling the budgets need); else streamed on as it came."""
    parts, over = await _read_up_to(body, limit)
    if not over:
        return b"".join(parts)

    async def rest() -> AsyncIterator[bytes]:
        for part in parts:
            yield part
        async for more in body:
            yield more
    return rest()


def _refused_encoding(target: Target, encoding: str) -> UpstreamFailed:
    return UpstreamFailed("encoding", f"{target.host} answered with Content-Encoding {encoding!r}, "
                          "which keyhole cannot inspect for secrets")


def connect_failure(exc: BaseException, host: str, port: int) -> ProxyError:
    """What the client is told when no connection to the upstream could be opened: one cause,
    one reason code, whichever mode (CONNECT tunnel, intercepted, plain) met it."""
    where = f"{host}:{port}"
    if isinstance(exc, TargetRefused):
        return Denied(exc.reason, str(exc))
    if isinstance(exc, ssl.SSLCertVerificationError):
        return UpstreamFailed("upstream_tls", f"the TLS certificate of {where} failed "
                              f"verification ({exc.verify_message or exc}); the request was not "
                              "sent")
    if isinstance(exc, ssl.SSLError):
        return UpstreamFailed("upstream_tls", f"TLS with {where} failed ({exc.reason or exc}); "
                              "the request was not sent")
    if isinstance(exc, ResolveFailed | socket.gaierror):
        refused = exc.__cause__
        if isinstance(refused, TargetRefused):
            return Denied(refused.reason, str(refused))
        return UpstreamFailed("dns", f"cannot resolve {host}")
    if isinstance(exc, TimeoutError):
        return UpstreamFailed("timeout", f"{where} did not answer in time", status=504)
    if isinstance(exc, UnicodeError | ValueError):
        return UpstreamFailed("bad_host", f"{host} is not a host name or address the "
                              "proxy can connect to", status=400)
    if isinstance(exc, OSError):
        return UpstreamFailed("connect", f"cannot connect to {where} "
                              f"({exc.strerror or type(exc).__name__})")
    return UpstreamFailed("upstream_error", f"talking to {where} failed ({type(exc).__name__})")


def _response_headers(upstream: CIMultiDict[str], target: Target,
                      redactor: Redactor | None) -> list[tuple[str, str]]:
    named_in_connection = {t.strip().lower() for v in upstream.getall("Connection", ())
                           for t in v.split(",")}
    headers: list[tuple[str, str]] = []
    # One search over every value answers "does any header hold a secret?" (almost never).
    if redactor is not None and not redactor.found_in_text("\n".join(upstream.values())):
        redactor = None
    for name, value in upstream.items():
        lower = name.lower()
        if lower in _RESPONSE_DROP or lower.startswith("proxy-") or lower in named_in_connection:
            continue
        if target.routed and lower == "content-encoding":
            continue  # decoded for redaction
        headers.append((name, redactor.redact_text(value) if redactor else value))
    return headers


def content_length(headers) -> int | None:
    """A head's Content-Length as a number (llhttp checked the digits), or None."""
    value = headers.get("Content-Length")
    return int(value) if value is not None and value.isdigit() else None


_ALWAYS_SENSITIVE = frozenset({"authorization", "proxy-authorization"})


def _sensitive_fields(target: Target) -> frozenset[str]:
    """The fields that carry a secret on this request: every credential header its routes set
    (static, minted or signed) and, when a query parameter holds one, the path."""
    names = set(_ALWAYS_SENSITIVE)
    for route in target.routes:
        names |= route.header_names
        if route.query:
            names.add(":path")
    return frozenset(names)


def check_target(ctx: ProxyContext, target: Target) -> None:
    """The egress policy on a target given as an IP literal (names are checked as they are
    resolved); Denied before anything is sent."""
    try:
        ctx.resolver.check_literal(target.host, target.port)
    except TargetRefused as refused:
        raise Denied(refused.reason, str(refused)) from None


async def forward(ctx: ProxyContext, request: Request, target: Target,
                  record: AuditRecord) -> None:
    """Send ``request`` to ``target`` and stream the answer; raise ProxyError before any byte
    of the answer was written, abort the client's message after. (A WebSocket upgrade to a
    routed host is the caller's to hand to :mod:`websocket` instead.)"""
    check_target(ctx, target)
    headers = forwarded_headers(request.headers, target.routes)
    headers.popall("Content-Length", None)  # the framing is the wire's to write
    body: Body = None
    if request.can_read_body:
        if request.headers.get("Expect", "").lower() == "100-continue":
            request.reply.interim(100)
        if request.body.is_eof():  # all of it arrived with the head: send it in one write
            body = request.body.read_nowait(-1)
            record.bytes_in += len(body)
        else:
            body = _client_body(request, record)
    limit = min((lim.request_body_bytes for _, _, lim in target.limits
                 if lim.request_body_bytes is not None), default=None)
    if limit is not None and body is not None and (
            isinstance(body, bytes) or not request.length_known):  # announced lengths: judged
        body = await _bounded(ctx, body, limit, target)
    llm_route = _metered_route(target)
    if llm_route is not None and body is not None and not isinstance(body, bytes):
        body = await _gathered(body, WHOLE_REQUEST_LIMIT)  # its model and ceiling decide
    query = None
    if target.credentials:
        body, query = await _authorize(ctx, request, target, headers, body)
    query = forwarded_query(target.query, target.routes) if query is None else query
    host = headers.popone("Host", target.authority)  # a signature may have set it
    out = Outbound(
        request.method, target.scheme, target.host, target.port, host,
        f"{target.path}?{query}" if query else target.path, list(headers.items()), body,
        content_length(request.headers) if request.length_known and not isinstance(body, bytes)
        else None, readable=target.routed,
        trailers="trailers" in request.headers.get("TE", "").lower(),
        client_protocol=request.protocol, sensitive=_sensitive_fields(target))
    llm = None
    if llm_route is not None:
        llm = await _llm_call(ctx, request, target, llm_route, body)
    try:
        started = time.monotonic()
        answer, leg = await _exchange(ctx, out, target)
        try:
            ctx.metrics.upstream_answered(target.label, time.monotonic() - started)
            await _relay_answer(ctx, request, target, record, answer, llm)
            if not leg.sent_whole():
                request.reply.close = True  # the client's body was not all sent: unclear
        finally:
            leg.finish()
    finally:
        if llm is not None:  # settled by the answer, or never spent
            _release(ctx, llm)


async def _exchange(ctx: ProxyContext, out: Outbound, target: Target):
    """The upstream's answer to ``out``, or the ProxyError that says why there is none."""
    where = f"{target.host}:{target.port}"
    try:
        return await ctx.pool.exchange(out, ctx.settings.upstream_timeout)
    except UnsafeHead as exc:
        raise BadRequest("bad_request", f"the request cannot be sent as it is: {exc}") from None
    except UpstreamClosed:
        ctx.metrics.upstream_errors.labels("upstream_reset").inc()
        raise UpstreamFailed("upstream_reset", f"{where} closed the connection before "
                             "answering") from None
    except BadResponse as exc:
        if exc.encoding:
            ctx.metrics.upstream_errors.labels("encoding").inc()
            raise _refused_encoding(target, "unsupported") from None
        ctx.metrics.upstream_errors.labels("bad_response").inc()
        raise UpstreamFailed("bad_response", f"{where} sent a malformed response") from None
    except (TimeoutError, OSError, ValueError, TargetRefused) as exc:
        failure = connect_failure(exc, target.host, target.port)
        if not isinstance(failure, Denied):
            ctx.metrics.upstream_errors.labels(failure.reason).inc()
        raise failure from None


@dataclass(slots=True)
class LlmCall:
    """A request to a model API (its injection states ``spec.llm``): what it asked for, and
    what it reserved of the budgets until its answer is counted."""

    injection: str
    spec: Llm
    model: str | None
    ticket: BudgetTicket | None = None
    shared: SharedTicket | None = None


def _metered_route(target: Target) -> Route | None:
    """The route whose ``spec.llm`` meters this request: its injection states the API and the
    path is one that bills tokens."""
    route = next((r for r in target.routes if r.injection.llm), None)
    if route is None or not is_metered(route.injection.llm.api, target.path):
        return None
    return route


async def _llm_call(ctx: ProxyContext, request: Request, target: Target, route: Route,
                    body: Body) -> LlmCall:
    """The model API call ``request`` is, admitted by its budgets: this pod's, then those
    its injection's pods share. Raises BudgetExceeded (nothing is sent) when a budget has no
    room left."""
    spec = route.injection.llm
    whole = _readable_copy(request, body, route.name, spec.budgets)
    model, ceiling = read_request(spec.api, target.path, whole)
    call = LlmCall(route.name, spec, model)
    if spec.budgets:
        size = len(whole) if whole is not None else content_length(request.headers) or 0
        asked = Asked(model, input_estimate(size), ceiling)
        admitted = ctx.budgets.admit(route.name, spec, asked)
        if isinstance(admitted, BudgetRefusal):
            raise BudgetExceeded(admitted, spec.api)
        call.ticket = admitted
        try:  # asking the operator for room may take a moment; the client may leave
            shared = await ctx.shared.admit(route.name, spec, asked, admitted.reserve_usd,
                                            priced=admitted.price is not None)
        except BaseException:
            _release(ctx, call)
            raise
        if isinstance(shared, BudgetRefusal):
            _release(ctx, call)
            raise BudgetExceeded(shared, spec.api)
        call.shared = shared
    return call


def _readable_copy(request: Request, body: Body, injection: str, budgeted: bool
                   ) -> bytes | None:
    """The request body as its JSON reads (a decoded copy when it is compressed; what goes
    upstream stays the client's bytes), or None when it is not in hand. A budget cannot be
    held without reading the request: one in a coding keyhole cannot undo is refused."""
    if not isinstance(body, bytes):
        return None
    encoding = request.headers.get("Content-Encoding")
    if not codings(encoding):
        return body
    try:
        return decoded_copy(body, encoding, WHOLE_REQUEST_LIMIT)
    except Undecodable as exc:
        if not budgeted:
            return None  # metered as an estimate, like any body that is not JSON
        raise BadRequest("unreadable_body", f"injection {injection!r} holds model API "
                         f"requests to budgets, so keyhole reads them: {exc}; send the body "
                         "uncompressed, or gzip, deflate or br", status=415) from None


def _release(ctx: ProxyContext, llm: LlmCall) -> None:
    """Give back what the call reserved of the budgets."""
    if llm.ticket is not None:
        ctx.budgets.release(llm.ticket)
    if llm.shared is not None:
        ctx.shared.release(llm.shared)


def _meter(llm: LlmCall | None, answer: Answer, record: AuditRecord) -> Meter | None:
    """A meter for a successful answer of a model API (errors are not billed)."""
    if llm is None or not 200 <= answer.code < 300:
        return None
    return Meter(llm.spec.api, answer.headers.get("Content-Type", ""), request_model=llm.model,
                 request_bytes=record.bytes_in)


def _settle(ctx: ProxyContext, llm: LlmCall, record: AuditRecord, meter: Meter) -> None:
    """Count the answer: the audit line, the metrics, the budgets."""
    meter.request_bytes = record.bytes_in  # all of it was sent by the answer's end
    usage = meter.finish()
    spent = cost(usage, price_of(usage.model, llm.spec.prices))
    record.llm = {**usage.as_record(), "cost_usd": round(spent, 8) if spent is not None
                  else None, "priced": spent is not None}
    ctx.metrics.llm_used(llm.injection, usage, spent)
    ctx.budgets.charge(llm.injection, llm.spec, usage, spent)
    ctx.shared.charge(llm.injection, llm.spec, usage, spent)


async def _relay_answer(ctx: ProxyContext, request: Request, target: Target,
                        record: AuditRecord, answer: Answer, llm: LlmCall | None = None) -> None:
    """Pass the upstream's answer to the client: headers filtered, body and trailers redacted
    on a routed request; a model API's answer metered on the way (``llm``)."""
    if answer.code == 101:
        ctx.metrics.upstream_errors.labels("bad_response").inc()
        raise UpstreamFailed("bad_response", f"{target.host}:{target.port} switched "
                             "protocols unasked")
    encoding = answer.headers.get("Content-Encoding", "identity").strip().lower()
    if target.routed and encoding not in ("identity", "") and encoding not in answer.decoded:
        ctx.metrics.upstream_errors.labels("encoding").inc()
        raise _refused_encoding(target, encoding)
    redactor = target.redactor() if target.routed else None
    headers = _response_headers(answer.headers, target, redactor)
    reply = request.reply
    record.status = answer.code
    length = content_length(answer.headers)
    no_body = request.method == "HEAD" or answer.code in _NO_BODY_STATUSES
    meter = None if no_body else _meter(llm, answer, record)
    try:
        if no_body:
            if length is not None and request.method == "HEAD" and (
                    not target.routed or encoding in ("identity", "")):
                headers.append(("Content-Length", str(length)))
            reply.start(answer.code, answer.reason, headers)
            await reply.end(_trailers(answer, target, redactor))
        elif length is not None and length <= WHOLE_BODY_LIMIT and encoding in ("identity", ""):
            await _answer_whole(ctx, reply, answer, target, headers, redactor, record,
                                llm, meter)
        else:
            await _stream(ctx, reply, answer, target, headers, redactor, record,
                          length if not target.routed else None, llm, meter)
    except UnsafeHead as exc:  # raised before the head's first byte was written
        ctx.metrics.upstream_errors.labels("bad_response").inc()
        raise UpstreamFailed("bad_response", f"{target.host}:{target.port} sent a head the "
                             f"proxy will not pass on: {exc}") from None


def _trailers(answer: Answer, target: Target, redactor: Redactor | None
              ) -> list[tuple[str, str]]:
    """The answer's trailers (gRPC's status lives there), filtered and redacted like headers."""
    if not answer.trailers:
        return []
    return _response_headers(CIMultiDict(answer.trailers), target, redactor)


async def _bounded(ctx: ProxyContext, body: Body, limit: int, target: Target) -> bytes:
    """A body of unannounced length under ``requestBodyBytes``: read it (up to the limit, so a
    chunked body is held in memory up to that size) before anything is sent, so one over it is
    a 413 with nothing upstream. Bodies with a Content-Length were judged before and stream."""
    parts, over = await _read_up_to(body, limit)
    if over:
        name = next(n for n, _, lim in target.limits if lim.request_body_bytes == limit)
        ctx.metrics.limit_refused(name, "requestBodyBytes")
        raise LimitExceeded(Refusal(name, "requestBodyBytes", 413, None, None,
                                    f"the body is over injection {name!r}'s requestBodyBytes "
                                    f"({limit})"))
    return b"".join(parts)


async def _stream(ctx: ProxyContext, reply, answer: Answer, target: Target,
                  headers: list[tuple[str, str]], redactor: Redactor | None, record: AuditRecord,
                  length: int | None, llm: LlmCall | None = None,
                  meter: Meter | None = None) -> None:
    """Relay a body as it arrives; a break after the head aborts the client's connection
    (HTTP/2: resets the stream)."""
    payload = answer.body
    reply.start(answer.code, answer.reason, headers, length=length)
    stream = _body_redactor(answer, redactor)
    try:
        while True:
            data = await payload.readany()
            if not data:
                break
            out = stream.feed(data) if stream else data
            if out:
                record.bytes_out += len(out)
                if meter is not None:
                    meter.feed(out)
                await reply.write(out)
        if stream:
            tail = stream.flush()
            if tail:
                record.bytes_out += len(tail)
                if meter is not None:
                    meter.feed(tail)
                await reply.write(tail)
    except (ConnectionError, TimeoutError):  # BadResponse and UpstreamClosed among them
        ctx.metrics.upstream_errors.labels("mid_body").inc()
        record.reason = "upstream_mid_body"
        reply.abort()
        return
    except GrpcBodyError as exc:
        log.warning("ending a gRPC answer from %s: %s", target.host, exc)
        ctx.metrics.upstream_errors.labels("encoding").inc()
        record.reason = "grpc_uninspectable"
        reply.abort()
        return
    finally:  # an answer cut short is counted too: what passed, estimated
        if llm is not None and meter is not None:
            _settle(ctx, llm, record, meter)
    await reply.end(_trailers(answer, target, redactor))


def _body_redactor(answer: Answer, redactor: Redactor | None
                   ) -> StreamRedactor | GrpcStreamRedactor | None:
    """gRPC bodies are redacted message by message; any other body as a byte stream."""
    if redactor is None:
        return None
    if answer.headers.get("Content-Type", "").startswith("application/grpc"):
        return GrpcStreamRedactor(redactor)
    return redactor.stream()


async def _authorize(ctx: ProxyContext, request, target: Target,
                     headers: CIMultiDict[str], body: Body,
                     ) -> tuple[Body, str]:
    """Let each credential source set its credential (minting, or signing the request).
    Returns the body to send (read whole when a signature covers it) and the final query."""
    out = Outgoing(request.method, target.host, target.port, target.path,
                   forwarded_query(target.query, target.routes), headers, request.headers)
    sources = target.credentials
    if any(source.hashes_payload for source in sources):
        whole = b""
        if body is not None:
            parts, over = await _read_up_to(body, SIGNED_BODY_LIMIT)
            if over:
                raise BadRequest("body_too_large", f"a body over {SIGNED_BODY_LIMIT >> 20} "
                                 "MiB cannot be hashed for its signature; for services that "
                                 "accept it (S3), set spec.awsSigV4.payload: unsigned",
                                 status=413)
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


async def _answer_whole(ctx: ProxyContext, reply, answer: Answer, target: Target,
                        headers: list[tuple[str, str]], redactor: Redactor | None,
                        record: AuditRecord, llm: LlmCall | None = None,
                        meter: Meter | None = None) -> None:
    """Read a small body whole, redact it, answer in one write. Nothing has been sent to the
    client yet, so an upstream failing mid-body becomes a clean 502 here."""
    payload = answer.body
    try:
        if payload.is_eof() and payload.exception() is None:
            body = payload.read_nowait(-1)  # it came with the head (the usual case): no await
        else:
            body = await payload.read()
    except (ConnectionError, TimeoutError):
        ctx.metrics.upstream_errors.labels("mid_body").inc()
        if llm is not None and meter is not None:  # it went upstream and was billed: estimated
            _settle(ctx, llm, record, meter)
        raise UpstreamFailed("upstream_mid_body", f"{target.host}:{target.port} closed the "
                             "connection before sending the whole response") from None
    if redactor:
        body = redactor.redact(body)
    record.bytes_out = len(body)
    if llm is not None and meter is not None:
        meter.feed(body)
        _settle(ctx, llm, record, meter)
    await reply.send(answer.code, answer.reason, headers, body,
                     _trailers(answer, target, redactor))
