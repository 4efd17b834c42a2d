"""WebSocket upgrades to routed hosts: the one request that stays on aiohttp's machinery.

The handshake runs the same stages as any request (limits, credentials) before the relay
hands the upgrade (and the connection) to aiohttp's server, which speaks the WebSocket
protocol to the client; aiohttp's client speaks it to the upstream, with the credential in
the handshake. Every message from the upstream passes the redaction stage on its way back.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

import aiohttp
from aiohttp import WSMsgType, web
from multidict import CIMultiDict

from keyhole_sidecar.audit import AuditRecord
from keyhole_sidecar.inject import forwarded_headers
from keyhole_sidecar.proxy.context import ProxyContext
from keyhole_sidecar.proxy.errors import ProxyError, UpstreamFailed, connect_failure, render
from keyhole_sidecar.proxy.flow import Exchange, check_egress
from keyhole_sidecar.proxy.forward import open_stages, prepare
from keyhole_sidecar.proxy.stages.approval import Approvals
from keyhole_sidecar.proxy.stages.credentials import Credentials
from keyhole_sidecar.proxy.stages.limits import Limits
from keyhole_sidecar.proxy.stages.redaction import Redaction
from keyhole_sidecar.proxy.target import Target
from keyhole_sidecar.redact import Redactor

_WS_HANDSHAKE = frozenset({"sec-websocket-key", "sec-websocket-version",
                           "sec-websocket-protocol", "sec-websocket-extensions"})
WEBSOCKET_STAGES = (Limits, Approvals, Credentials, Redaction)


async def forward_websocket(ex: Exchange) -> None:
    """Run the handshake's stages, then relay; a refusal before the upgrade is answered as
    any request's (by the caller, or by aiohttp's server once it holds the connection)."""
    check_egress(ex)
    ex.headers = forwarded_headers(ex.request.headers, ex.target.routes, keep_upgrade=True)
    for name in _WS_HANDSHAKE:
        ex.headers.popall(name, None)
    stages = open_stages(ex, WEBSOCKET_STAGES)
    try:
        await prepare(stages)
        # What the relay needs, and not the Exchange: aiohttp's server keeps ``serve`` while
        # the request (which holds the reply, which holds that server) must not be reachable
        # from it, or a closed connection would wait for the cycle collector.
        upgrade = _Upgrade(ex.ctx, ex.target, ex.headers, ex.query, ex.record,
                           next(s for s in stages if isinstance(s, Redaction)).redactor)
        failure: list[ProxyError] = []

        async def serve(web_request: web.BaseRequest) -> web.StreamResponse:
            try:
                return await _relay(upgrade, web_request)
            except ProxyError as error:
                failure.append(error)
                answer = render(error)
                return web.Response(status=answer.status, body=answer.body,
                                    headers=[*answer.headers, *(
                                        [("Connection", "close")] if answer.close else [])])

        await ex.request.reply.hand_over(serve)
        if failure:
            error, record = failure[0], ex.record
            record.decision, record.reason, record.status = (error.decision, error.reason,
                                                             error.status)
    finally:
        for stage in stages:
            stage.close()


@dataclass(frozen=True, slots=True)
class _Upgrade:
    ctx: ProxyContext
    target: Target
    headers: CIMultiDict[str]
    query: str | None
    record: AuditRecord
    redactor: Redactor


async def _relay(ex: _Upgrade, request: web.BaseRequest) -> web.StreamResponse:
    target = ex.target
    protocols = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",")
                 if p.strip()]
    try:
        upstream = await ex.ctx.session.ws_connect(
            target.url("wss", ex.query), headers=ex.headers, protocols=protocols,
            autoclose=False, autoping=False, compress=0, max_msg_size=0,
        )
    except aiohttp.WSServerHandshakeError as exc:
        raise UpstreamFailed("websocket_refused", f"{target.host} refused the WebSocket upgrade "
                             f"with status {exc.status}", status=502) from None
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        cause = getattr(exc, "os_error", None) or getattr(exc, "certificate_error", None) or exc
        failure = connect_failure(cause, target.host, target.port)
        ex.ctx.metrics.upstream_errors.labels(failure.reason).inc()
        raise failure from None
    redactor = ex.redactor
    client = web.WebSocketResponse(protocols=[upstream.protocol] if upstream.protocol else (),
                                   autoclose=False, autoping=False, max_msg_size=0)
    await client.prepare(request)
    ex.record.status = 101

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
