"""Model API calls (``spec.llm``): admitted by their budgets before they are sent, metered on
the answer's way back, settled (counted, charged, given back) when the exchange ends."""

from __future__ import annotations

from keyhole_sidecar.codings import Undecodable, codings, decoded_copy
from keyhole_sidecar.proxy.errors import BadRequest, BudgetExceeded
from keyhole_sidecar.proxy.exchange import Trailers
from keyhole_sidecar.proxy.flow import Exchange, Fields, Stage, read_up_to, rejoin
from keyhole_sidecar.proxy.target import content_length
from keyhole_sidecar.routes import Route
from keyhole_sidecar.usage.budgets import Asked, BudgetRefusal, input_estimate
from keyhole_sidecar.usage.meter import Meter, is_metered, read_request
from keyhole_sidecar.usage.prices import cost, price_of

WHOLE_REQUEST_LIMIT = 1 << 20
"""A model API request up to this size is read before it is sent: its JSON names the model
and the output ceiling the budgets need."""


class Usage(Stage):
    __slots__ = ("injection", "meter", "model", "shared", "spec", "ticket")

    def __init__(self, ex: Exchange, route: Route):
        super().__init__(ex)
        self.injection, self.spec = route.name, route.injection.llm
        self.model: str | None = None
        self.ticket = self.shared = None
        self.meter: Meter | None = None

    @classmethod
    def open(cls, ex: Exchange) -> Usage | None:
        """The route whose ``spec.llm`` meters this request: its injection states the API and
        the path is one that bills tokens."""
        route = next((r for r in ex.target.routes if r.injection.llm), None)
        if route is None or not is_metered(route.injection.llm.api, ex.target.path):
            return None
        return cls(ex, route)

    async def before(self) -> None:
        """Read the call (what model, what ceiling) and admit it by its budgets: this pod's,
        then those its injection's pods share. BudgetExceeded: nothing is sent."""
        ex, spec = self.ex, self.spec
        if ex.body is not None and not isinstance(ex.body, bytes):
            parts, over = await read_up_to(ex.body, WHOLE_REQUEST_LIMIT)
            ex.body = rejoin(parts, ex.body) if over else b"".join(parts)
        whole = self._readable_copy()
        self.model, ceiling = read_request(spec.api, ex.target.path, whole)
        if not spec.budgets:
            return
        size = len(whole) if whole is not None else content_length(ex.request.headers) or 0
        asked = Asked(self.model, input_estimate(size), ceiling)
        admitted = ex.ctx.budgets.admit(self.injection, spec, asked)
        if isinstance(admitted, BudgetRefusal):
            raise BudgetExceeded(admitted, spec.api)
        self.ticket = admitted
        # Asking the operator for room may take a moment; the client may leave (close()
        # gives back what was held).
        shared = await ex.ctx.shared.admit(self.injection, spec, asked, admitted.reserve_usd,
                                           priced=admitted.price is not None)
        if isinstance(shared, BudgetRefusal):
            raise BudgetExceeded(shared, spec.api)
        self.shared = shared

    def _readable_copy(self) -> bytes | None:
        """The request body as its JSON reads (a decoded copy when it is compressed; what goes
        upstream stays the client's bytes), or None when it is not in hand. A budget cannot be
        held without reading the request: one in a coding keyhole cannot undo is refused."""
        body = self.ex.body
        if not isinstance(body, bytes):
            return None
        encoding = self.ex.request.headers.get("Content-Encoding")
        if not codings(encoding):
            return body
        try:
            return decoded_copy(body, encoding, WHOLE_REQUEST_LIMIT)
        except Undecodable as exc:
            if not self.spec.budgets:
                return None  # metered as an estimate, like any body that is not JSON
            raise BadRequest("unreadable_body", f"injection {self.injection!r} holds model "
                             f"API requests to budgets, so keyhole reads them: {exc}; send the "
                             "body uncompressed, or gzip, deflate or br", status=415) from None

    def head(self, headers: Fields) -> Fields:
        answer = self.ex.answer
        if not self.ex.bodyless and 200 <= answer.code < 300:  # errors are not billed
            self.meter = Meter(self.spec.api, answer.headers.get("Content-Type", ""),
                               request_model=self.model, request_bytes=self.ex.record.bytes_in)
        return headers

    def chunk(self, data: bytes, last: bool) -> bytes:
        if self.meter is not None and data:
            self.meter.feed(data)
        return data

    def end(self, trailers: Trailers) -> Trailers:
        self._settle()
        return trailers

    def close(self) -> None:
        """An answer cut short is counted too (what passed, estimated); then what the call
        reserved is given back."""
        self._settle()
        ctx = self.ex.ctx
        if self.ticket is not None:
            ctx.budgets.release(self.ticket)
            self.ticket = None
        if self.shared is not None:
            ctx.shared.release(self.shared)
            self.shared = None

    def _settle(self) -> None:
        """Count the answer: the audit line, the metrics, the budgets."""
        meter, self.meter = self.meter, None
        if meter is None:
            return
        ex = self.ex
        meter.request_bytes = ex.record.bytes_in  # all of it was sent by the answer's end
        usage = meter.finish()
        spent = cost(usage, price_of(usage.model, self.spec.prices))
        ex.record.llm = {**usage.as_record(), "cost_usd": round(spent, 8) if spent is not None
                         else None, "priced": spent is not None}
        ex.ctx.metrics.llm_used(self.injection, usage, spent)
        ex.ctx.budgets.charge(self.injection, self.spec, usage, spent)
        ex.ctx.shared.charge(self.injection, self.spec, usage, spent)
