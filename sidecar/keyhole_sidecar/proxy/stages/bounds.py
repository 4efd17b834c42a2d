"""``requestBodyBytes`` on a body of unannounced length (chunked, HTTP/2 without
content-length): read up to the limit before anything is sent, so one over it is a 413 with
nothing upstream. A body with a Content-Length was judged on it by the limits and streams."""

from __future__ import annotations

from keyhole_sidecar.limits import Refusal
from keyhole_sidecar.proxy.errors import LimitExceeded
from keyhole_sidecar.proxy.flow import Exchange, Stage, read_up_to


class Bounds(Stage):
    __slots__ = ("limit",)

    def __init__(self, ex: Exchange, limit: int):
        super().__init__(ex)
        self.limit = limit

    @classmethod
    def open(cls, ex: Exchange) -> Bounds | None:
        limit = min((lim.request_body_bytes for _, _, lim in ex.target.limits
                     if lim.request_body_bytes is not None), default=None)
        return None if limit is None else cls(ex, limit)

    async def before(self) -> None:
        ex = self.ex
        if ex.body is None or not (isinstance(ex.body, bytes) or not ex.request.length_known):
            return  # no body, or one whose announced length was judged
        parts, over = await read_up_to(ex.body, self.limit)
        if over:
            name = next(n for n, _, lim in ex.target.limits
                        if lim.request_body_bytes == self.limit)
            ex.ctx.metrics.limit_refused(name, "requestBodyBytes")
            raise LimitExceeded(Refusal(name, "requestBodyBytes", 413, None, None,
                                        f"the body is over injection {name!r}'s "
                                        f"requestBodyBytes ({self.limit})"))
        ex.body = b"".join(parts)
