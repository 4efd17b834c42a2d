"""WebSocket upgrades to routed hosts: the one request that stays on aiohttp's machinery.

The relay hands the upgrade request (and the connection) to aiohttp's server, which speaks
the WebSocket protocol to the client; aiohttp's client speaks it to the upstream, with the
credential in the handshake. Every message from the upstream is redacted on its way back.
"""

from __future__ import annotations

import asyncio
import contextlib

import aiohttp
from aiohttp import WSMsgType, web

from keyhole_sidecar.audit import AuditRecord
from keyhole_sidecar.inject import forwarded_headers
from keyhole_sidecar.proxy.context import ProxyContext
from keyhole_sidecar.proxy.errors import ProxyError, UpstreamFailed
from keyhole_sidecar.proxy.exchange import Request
from keyhole_sidecar.proxy.forward import Target, _authorize, check_target, connect_failure

_WS_HANDSHAKE = frozenset({"sec-websocket-key", "sec-websocket-version",
                           "sec-websocket-protocol", "sec-websocket-extensions"})


async def forward_websocket(ctx: ProxyContext, request: Request, target: Target,
                            record: AuditRecord) -> None:
    """Inject into the handshake, redact every message; errors before the upgrade are
    answered by aiohttp's server as the relay would have answered them."""
    check_target(ctx, target)
    failure: list[ProxyError] = []

    async def serve(web_request: web.BaseRequest) -> web.StreamResponse:
        try:
            return await _relay(ctx, web_request, target, record)
        except ProxyError as error:
            failure.append(error)
            return _error_response(error)

    await request.reply.hand_over(serve)
    if failure:
        error = failure[0]
        record.decision, record.reason, record.status = error.decision, error.reason, error.status


async def _relay(ctx: ProxyContext, request: web.BaseRequest, target: Target,
                 record: AuditRecord) -> web.StreamResponse:
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
        cause = getattr(exc, "os_error", None) or getattr(exc, "certificate_error", None) or exc
        failure = connect_failure(cause, target.host, target.port)
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


def _error_response(error: ProxyError) -> web.Response:
    """The same answer through aiohttp's server (a WebSocket upgrade's)."""
    return web.Response(
        status=error.status,
        text=f"keyhole: {error.message}\n",
        headers={"X-Keyhole-Error": error.reason, "Connection": "close"}
        if error.status == 400 else {"X-Keyhole-Error": error.reason},
    )
