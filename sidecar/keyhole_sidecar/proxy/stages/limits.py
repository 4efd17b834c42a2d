"""``spec.limits`` (and a rule's own): rate, concurrency and window counts, admitted before
anything is sent and given back when the exchange ends."""

from __future__ import annotations

from keyhole_sidecar.limits import Refusal
from keyhole_sidecar.proxy.errors import LimitExceeded
from keyhole_sidecar.proxy.flow import Exchange, Stage
from keyhole_sidecar.proxy.target import content_length


class Limits(Stage):
    __slots__ = ("ticket",)

    def __init__(self, ex: Exchange):
        super().__init__(ex)
        self.ticket = None

    @classmethod
    def open(cls, ex: Exchange) -> Limits | None:
        return cls(ex) if ex.target.limits else None

    async def before(self) -> None:
        ex = self.ex
        ticket = ex.ctx.limiter.admit(ex.target.limits, _announced_length(ex))
        if isinstance(ticket, Refusal):
            raise LimitExceeded(ticket)
        self.ticket = ticket

    def close(self) -> None:
        if self.ticket is not None:
            self.ex.ctx.limiter.release(self.ticket)
            self.ticket = None


def _announced_length(ex: Exchange) -> int | None:
    """The body's length when the head says it (llhttp checked the digits); else None."""
    request = ex.request
    if not request.length_known or not request.can_read_body:
        return None if request.can_read_body else 0
    return content_length(request.headers)
