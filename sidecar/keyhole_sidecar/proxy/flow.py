"""One request on its way through the proxy: the :class:`Exchange` the stages share, and the
:class:`Stage` hooks each concern implements.

A stage is one concern (limits, body bounds, MCP policy, approvals, budgets, credentials,
redaction), made for one exchange and only when it applies to it, so a passthrough request
runs none.
:mod:`~keyhole_sidecar.proxy.forward` keeps their order and calls, in that order on the way
out and in the reverse order on the way back (the stage nearest the upstream sees the answer
first):

- ``before``: the request is about to be sent. Refuse it (raise ProxyError) or change what
  goes upstream (``headers``, ``body``, ``query``).
- ``head``: the answer's head is in. Refuse it or change the headers the client gets.
- ``chunk``: a piece of the answer's body, and whether it is the last; returns what goes on.
- ``end``: the answer's trailers; returns those that go on.
- ``close``: the exchange is over, however it ended: settle and give back what was held.

Stages never import each other or the wire; what they share is on the :class:`Exchange`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

from multidict import CIMultiDict

from keyhole_sidecar.approvals import Hold
from keyhole_sidecar.audit import AuditRecord
from keyhole_sidecar.egress import TargetRefused
from keyhole_sidecar.proxy.context import ProxyContext
from keyhole_sidecar.proxy.errors import Denied
from keyhole_sidecar.proxy.exchange import Answer, Body, Request, Trailers
from keyhole_sidecar.proxy.target import Target

Fields = list[tuple[str, str]]


@dataclass(slots=True, eq=False)
class Exchange:
    """What the stages of one request share."""

    ctx: ProxyContext
    request: Request
    target: Target
    record: AuditRecord
    headers: CIMultiDict[str] | None = None
    """The request's headers as they will be sent (hop-by-hop and the client's credentials
    already gone): set by forward (or the WebSocket hand-over) before any stage runs."""
    body: Body = None
    """The request's body as it will be sent: in hand whole, arriving, or none."""
    query: str | None = None
    """The query to send, once a stage has fixed it (a signature covers it); None: as
    forwarded."""
    answer: Answer | None = None
    """The upstream's answer, once its head is in."""
    bodyless: bool = False
    """The answer carries no body (a HEAD, a 204 or 304): no ``chunk`` comes."""
    hold: Hold | None = None
    """What a person must approve before this request is sent, set by the stage that knows
    (MCP's, for a use with approval); the approvals stage asks and waits."""
    interjections: asyncio.Lock | None = None
    """Set by a stage that writes into this answer from another exchange (MCP's legacy
    transport answers a POST on the session's event stream): the relay then writes each piece
    under it, so pieces never interleave."""


class Stage:
    """One concern's hooks over one exchange; each does nothing unless overridden."""

    __slots__ = ("ex",)

    def __init__(self, ex: Exchange):
        self.ex = ex

    @classmethod
    def open(cls, ex: Exchange) -> Stage | None:
        """This stage for ``ex``, or None when its concern does not apply to it."""
        return cls(ex)

    async def before(self) -> None:
        return None

    def head(self, headers: Fields) -> Fields:
        return headers

    def chunk(self, data: bytes, last: bool) -> bytes:
        return data

    def end(self, trailers: Trailers) -> Trailers:
        return trailers

    def close(self) -> None:
        return None


def check_egress(ex: Exchange) -> None:
    """The egress policy on a target given as an IP literal (names are checked as they are
    resolved); Denied before anything is sent."""
    try:
        ex.ctx.resolver.check_literal(ex.target.host, ex.target.port)
    except TargetRefused as refused:
        raise Denied(refused.reason, str(refused)) from None


def client_body(request: Request, record: AuditRecord) -> Body:
    """The client's body: in hand when all of it came with the head (sent in one write),
    else read as it arrives (a ``100 Continue`` first, if the client waits for one)."""
    if not request.can_read_body:
        return None
    if request.body.is_eof():
        data = request.body.read_nowait(-1)
        record.bytes_in += len(data)
        return data
    return _arriving(request, record)


async def _arriving(request: Request, record: AuditRecord) -> AsyncIterator[bytes]:
    if request.headers.get("Expect", "").lower() == "100-continue":
        request.reply.interim(100)  # only once a stage or the upstream reads the body
    body = request.body
    while True:
        data = await body.readany()
        if not data:
            return
        record.bytes_in += len(data)
        yield data


async def read_up_to(body: Body, limit: int) -> tuple[list[bytes], bool]:
    """The body's pieces, read until it ends or passes ``limit`` bytes (the piece that passed
    it included), and whether it passed: what every "read it whole, up to a size" needs."""
    if body is None:
        return [], False
    if isinstance(body, bytes):
        return [body], len(body) > limit
    parts, size = [], 0
    async for data in body:
        parts.append(data)
        size += len(data)
        if size > limit:
            return parts, True
    return parts, False


def rejoin(parts: list[bytes], rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """A body some of which was read (``parts``), streamed on whole as it came."""
    async def body() -> AsyncIterator[bytes]:
        for part in parts:
            yield part
        async for more in rest:
            yield more
    return body()
