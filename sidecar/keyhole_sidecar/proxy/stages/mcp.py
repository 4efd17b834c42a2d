"""MCP tool policy (``spec.mcp``): every JSON-RPC body the agent sends to an MCP host is read
strictly and each call judged before anything is sent; every answer, JSON or a stream of
events, reaches the agent without the tools, resources and prompts it may not use.

The body goes upstream as the agent's exact bytes: the policy judged those bytes, read as
the server reads them (``keyhole_sidecar.mcp.jsonrpc`` refuses whatever two readers could
read two ways). A body it cannot read is refused, never passed.
"""

from __future__ import annotations

import asyncio
import json
from urllib.parse import urlsplit

from keyhole_common.approvals import MAX_PREVIEW, call_digest
from keyhole_sidecar.approvals import Hold
from keyhole_sidecar.mcp import jsonrpc
from keyhole_sidecar.mcp.policy import NOUN, Verdict, filter_result, judge
from keyhole_sidecar.mcp.sse import EventStream, EventTooLarge, event, fields, rewrite
from keyhole_sidecar.proxy.errors import McpRefused, McpUnreadable
from keyhole_sidecar.proxy.flow import Exchange, Fields, Stage, read_up_to
from keyhole_sidecar.routes import Route

MAX_LEGACY_SESSIONS = 1000
"""Legacy (HTTP+SSE) sessions remembered at once; more are still filtered, but a refused POST
of theirs is answered on the POST (their clients then wait for the answer in vain)."""
MAX_ANSWER = 16 << 20
"""The largest JSON answer (or one event of a stream) held to be filtered."""


class McpPolicy(Stage):
    __slots__ = ("endpoint", "events", "held", "injection", "mode", "size", "spec")

    def __init__(self, ex: Exchange, route: Route):
        super().__init__(ex)
        self.injection, self.spec = route.name, route.injection.mcp
        self.mode: str | None = None  # how the answer is read: "json", "sse" or None
        self.held: list[bytes] = []
        self.size = 0
        self.events: EventStream | None = None
        self.endpoint: tuple[str, str] | None = None  # a legacy session this stream serves

    @classmethod
    def open(cls, ex: Exchange) -> McpPolicy | None:
        route = next((r for r in ex.target.routes if r.injection.mcp is not None), None)
        return None if route is None else cls(ex, route)

    async def before(self) -> None:
        ex = self.ex
        if ex.request.method != "POST":  # GET: the server's stream; DELETE ends a session
            parts, _ = await read_up_to(ex.body, 0)
            if any(parts):  # a JSON-RPC body rides only on a POST: no other method carries one
                raise McpUnreadable(f"injection {self.injection!r} speaks MCP: only a POST "
                                    f"carries a body, not a {ex.request.method}", self.injection)
            ex.body = None if ex.body is None else b""
            return
        try:
            messages, batch = jsonrpc.read(await self._body())
        except jsonrpc.Unreadable as exc:
            raise McpUnreadable(f"injection {self.injection!r} speaks MCP and keyhole reads "
                                f"every body it sends strictly: {exc}", self.injection) from None
        verdicts = [judge(self.spec, m) for m in messages]
        calls = []
        for message, verdict in zip(messages, verdicts, strict=True):
            if verdict.kind is not None:
                ex.ctx.metrics.mcp_call(self.injection, verdict.subject, verdict.kind,
                                        "allowed" if verdict.allowed else "denied")
                calls.append({"method": message.method, NOUN[verdict.kind]: verdict.subject,
                              "decision": "allowed" if verdict.allowed else "denied",
                              "reason": verdict.reason})
        ex.record.mcp = calls or [{"method": m.method} for m in messages][:20]
        if all(v.allowed for v in verdicts):
            self._hold(messages, verdicts, batch)
            return
        refused = next(v for v in verdicts if not v.allowed)
        refusal = McpRefused(self.injection, [
            (m.id, m.method, v.reason if not v.allowed else McpRefused.BATCH,
             v.detail if not v.allowed else "not sent: the same batch held a refused call "
             f"({refused.detail})")
            for m, v in zip(messages, verdicts, strict=True)], batch)
        target = ex.target
        stream = ex.ctx.legacy_mcp.get((self.injection, _endpoint(target.path, target.query)))
        if stream is not None:  # the legacy transport: answers go on the session's stream
            _, body = refusal.parts()
            try:
                if body:
                    await stream(event(body.decode()))
            except ConnectionError:
                raise refusal from None  # the stream is gone: the POST carries the answer
            refusal.answered_on_stream()
        raise refusal

    def _hold(self, messages: list[jsonrpc.Message], verdicts: list[Verdict],
              batch: bool) -> None:
        """A use a person approves first: described for them and bound to its digest (the
        use and its arguments, not the JSON-RPC id) on the exchange; the approvals stage
        waits. One at a time: a batch holding one is refused."""
        held = [(m, v) for m, v in zip(messages, verdicts, strict=True) if v.approval]
        if not held:
            return
        if batch or len(messages) > 1:
            raise McpRefused(self.injection, [
                (m.id, m.method, "approval_batch", "a use that needs a person's approval is "
                 "sent alone, not in a batch") for m in messages], batch)
        message, verdict = held[0]
        target, noun = self.ex.target, NOUN[verdict.kind]
        arguments = message.params.get("arguments", {}) if verdict.kind != "resources" else {}
        shown = self.ex.target.redactor().redact_text(json.dumps(arguments)[:MAX_PREVIEW])
        self.ex.hold = Hold(
            self.injection, call_digest(target.host, target.port, target.path, noun,
                                        verdict.subject, arguments),
            verdict.approval.timeout,
            {"kind": noun, "host": target.host, "method": "POST", "path": target.path,
             "subject": verdict.subject, "arguments": shown}, (message.id, message.method))

    async def _body(self) -> bytes:
        """The body whole, as sent: JSON, uncompressed, at most jsonrpc.MAX_BODY."""
        headers = self.ex.request.headers
        types = headers.getall("Content-Type", [])
        if len(types) != 1 or types[0].split(";")[0].strip().lower() != "application/json":
            raise McpUnreadable(f"injection {self.injection!r} speaks MCP: a POST carries one "
                                "JSON-RPC body with Content-Type application/json",
                                self.injection, status=415)
        if any(v.strip().lower() != "identity" for v in headers.getall("Content-Encoding", [])):
            raise McpUnreadable(f"injection {self.injection!r} speaks MCP: send the JSON-RPC "
                                "body uncompressed (keyhole judges the bytes the server "
                                "reads)", self.injection, status=415)
        parts, over = await read_up_to(self.ex.body, jsonrpc.MAX_BODY)
        if over:
            raise McpUnreadable(f"a JSON-RPC body over {jsonrpc.MAX_BODY >> 20} MiB is not "
                                "read, so not sent", self.injection, status=413)
        self.ex.body = body = b"".join(parts)
        return body

    def head(self, headers: Fields) -> Fields:
        kind = self.ex.answer.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if not self.ex.bodyless and 200 <= self.ex.answer.code < 300:
            if kind == "application/json":
                self.mode = "json"
            elif kind == "text/event-stream":
                self.mode, self.events = "sse", EventStream(MAX_ANSWER)
        return headers

    def _legacy_session(self, data: str) -> None:
        """The legacy transport's ``endpoint`` event: POSTs to that URL are this session's,
        answered on this stream."""
        if self.endpoint is not None or len(self.ex.ctx.legacy_mcp) >= MAX_LEGACY_SESSIONS:
            return
        where = urlsplit(data.strip())
        self.endpoint = (self.injection, _endpoint(where.path, where.query))
        self.ex.interjections = asyncio.Lock()
        reply, lock = self.ex.request.reply, self.ex.interjections

        async def write(answer: bytes) -> None:
            async with lock:
                await reply.write(answer)
        self.ex.ctx.legacy_mcp[self.endpoint] = write

    def close(self) -> None:
        if self.endpoint is not None:
            self.ex.ctx.legacy_mcp.pop(self.endpoint, None)
            self.endpoint = None

    def chunk(self, data: bytes, last: bool) -> bytes:
        if self.mode == "json":
            return self._json(data, last)
        if self.mode == "sse":
            try:
                events = self.events.feed(data) if data else []
            except EventTooLarge as exc:
                raise self._unreadable(str(exc)) from None
            if last and (rest := self.events.rest()):
                events.append(rest)
            return b"".join(self._event(each) for each in events)
        return data

    def _event(self, each: bytes) -> bytes:
        """One whole event on its way to the agent: a legacy session's ``endpoint`` noted
        (and, at a base URL, put under it), any other filtered."""
        if self.ex.request.method == "GET" and self.endpoint is None:
            name, data = fields(each)
            if name == "endpoint":
                self._legacy_session(data)
                if self.ex.record.mode == "base-url" and data.startswith("/"):
                    return rewrite(each, lambda d: f"/{self.injection}{d.strip()}")
                return each
        return rewrite(each, self._filtered)

    def _json(self, data: bytes, last: bool) -> bytes:
        """A JSON answer is held whole, then filtered."""
        self.size += len(data)
        if self.size > MAX_ANSWER:
            raise self._unreadable(f"a JSON answer over {MAX_ANSWER >> 20} MiB")
        self.held.append(data)
        if not last:
            return b""
        body, self.held = b"".join(self.held), []
        changed = self._filtered(body.decode("utf-8", "replace")) if body.strip() else None
        return body if changed is None else changed.encode()

    def _filtered(self, text: str) -> str | None:
        """The JSON-RPC message (or batch) ``text`` with its listings cut, or None: as it is."""
        try:
            document = json.loads(text)
        except ValueError:
            return None  # not JSON-RPC (a keep-alive, an endpoint event): nothing listed in it
        if isinstance(document, list):
            cut = [filter_result(self.spec, m) for m in document]
            if all(c is None for c in cut):
                return None
            return json.dumps([m if c is None else c for m, c in zip(document, cut,
                                                                       strict=True)])
        cut = filter_result(self.spec, document)
        return None if cut is None else json.dumps(cut)

    def _unreadable(self, why: str) -> ConnectionError:
        self.ex.ctx.metrics.upstream_errors.labels("mcp_unreadable").inc()
        return _Unjudged(f"{self.ex.target.host}: {why}; keyhole cannot filter it")


def _endpoint(path: str, query: str) -> str:
    return f"{path}?{query}" if query else path


class _Unjudged(ConnectionError):
    """An answer too large to filter: the relay ends it (a ConnectionError mid-body)."""

