"""A person's yes (a rule's ``approval``, an MCP use's): the request is held — read whole,
within the injection's body bound, nothing sent — until it is approved, denied or its time is
up (docs/approvals.md). Approved, it goes out as it arrived; otherwise it is refused in the
protocol's own shape and never sent.
"""

from __future__ import annotations

import asyncio

from keyhole_common.approvals import MAX_PREVIEW, request_digest
from keyhole_sidecar.approvals import Hold, Outcome
from keyhole_sidecar.proxy.errors import ApprovalRefused, Denied, McpRefused
from keyhole_sidecar.proxy.flow import Exchange, Stage, read_up_to

DEFAULT_HELD_BODY = 1 << 20
"""The largest body held for approval when the injection sets no ``requestBodyBytes``."""
REASONS = {"denied": "approval_denied", "gone": "approval_denied",
           "withdrawn": "approval_withdrawn",
           "timeout": "approval_timeout", "unavailable": "approval_unavailable",
           "backlog": "approval_backlog"}


class Approvals(Stage):
    __slots__ = ()

    @classmethod
    def open(cls, ex: Exchange) -> Approvals | None:
        target = ex.target
        if target.approvals or any(r.injection.mcp is not None and any(
                getattr(r.injection.mcp, kind).approval
                for kind in ("tools", "resources", "prompts")) for r in target.routes):
            return cls(ex)
        return None

    async def before(self) -> None:
        ex = self.ex
        hold = ex.hold or (await self._request_hold() if ex.target.approvals else None)
        if hold is None:
            return
        try:
            outcome = await self._decided(hold)
        except asyncio.CancelledError:
            self._account(hold, Outcome("withdrawn"))
            raise
        self._account(hold, outcome)
        if outcome.decision in ("approved", "granted"):
            return
        raise self._refusal(hold, outcome)

    async def _decided(self, hold: Hold) -> Outcome:
        """The decision, or ``withdrawn`` when the client leaves first (the ApprovalRequest
        is withdrawn as the wait is cancelled)."""
        deciding = asyncio.ensure_future(self.ex.ctx.approvals.decide(hold))
        leaving = asyncio.ensure_future(self.ex.request.reply.client_left())
        try:
            await asyncio.wait((deciding, leaving), return_when=asyncio.FIRST_COMPLETED)
        finally:
            leaving.cancel()
            if not deciding.done():
                deciding.cancel()
            await asyncio.gather(deciding, leaving, return_exceptions=True)
        if deciding.cancelled():
            return Outcome("withdrawn", detail="the client left before anyone decided")
        return deciding.result()

    async def _request_hold(self) -> Hold:
        """The whole request, read within its bound, described and digested."""
        ex = self.ex
        target, headers = ex.target, ex.request.headers
        bound = min((lim.request_body_bytes for _, _, lim in target.limits
                     if lim.request_body_bytes is not None), default=DEFAULT_HELD_BODY)
        injection = target.approvals[0][0]
        parts, over = await read_up_to(ex.body, bound)
        if over:
            raise Denied("body_too_large", f"a request held for approval is read whole first, "
                         f"and this one is over {bound} bytes (the injection's "
                         "limits.requestBodyBytes, or 1 MiB)", status=413, injection=injection)
        body = b"".join(parts)
        ex.body = None if ex.body is None else body
        shown = body[:MAX_PREVIEW].decode("utf-8", "replace") if body else None
        return Hold(
            injection,
            request_digest(ex.request.method, target.host, target.port, target.path,
                           target.query, headers.get("Content-Type", ""),
                           headers.get("Content-Encoding", ""), body),
            min(a.timeout for _, a in target.approvals),
            {"kind": "request", "host": target.host, "method": ex.request.method,
             "path": target.path + (f"?{target.query}" if target.query else ""),
             "arguments": None if shown is None else target.redactor().redact_text(shown)})

    def _account(self, hold: Hold, outcome: Outcome) -> None:
        ctx = self.ex.ctx
        ctx.metrics.approvals.labels(hold.injection, outcome.decision).inc()
        if outcome.decision != "granted":
            ctx.metrics.approval_wait.labels(hold.injection).observe(outcome.waited)
        self.ex.record.approval = {k: v for k, v in {
            "name": outcome.name, "decision": outcome.decision, "by": outcome.by,
            "waited": round(outcome.waited, 3)}.items() if v is not None}

    def _refusal(self, hold: Hold, outcome: Outcome) -> Exception:
        reason = REASONS[outcome.decision]
        what = hold.describe()
        named = f" (ApprovalRequest {outcome.name})" if outcome.name else ""
        if outcome.decision == "denied":
            message = f"{what} was denied by {outcome.by}{named}" + (
                f": {outcome.reason}" if outcome.reason else "")
        elif outcome.decision == "timeout":
            message = f"nobody approved {what} within {hold.timeout:g}s{named}"
        else:
            message = f"{what} was not sent: {outcome.detail}{named}"
        if hold.answer_as is not None:
            ident, method = hold.answer_as
            return McpRefused(hold.injection, [(ident, method, reason, message)], False)
        return ApprovalRefused(reason, message, hold.injection, {
            k: v for k, v in {"name": outcome.name, "decidedBy": outcome.by,
                              "reason": outcome.reason}.items() if v is not None})
