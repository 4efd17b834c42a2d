"""The proxy's refusals and failures, each mapped to one status in one place.

``reason`` is a short, bounded code for metrics and the audit log; ``message`` is the
sentence a human reads in the response body. Neither ever holds a secret value.
"""

from __future__ import annotations

import json
import math
import re
import socket
import ssl
import time
from dataclasses import dataclass
from http import HTTPStatus

from keyhole_sidecar.egress import TargetRefused
from keyhole_sidecar.proxy.exchange import ResolveFailed

_QUOTED = re.compile(r"""(bytearray\(|\bb['"]|['"])""")  # where llhttp's quote of the bytes begins


class ProxyError(Exception):
    status = 502
    decision = "error"

    def __init__(self, reason: str, message: str, *, status: int | None = None,
                 injection: str | None = None):
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.injection = injection  # the injection the decision concerned, for the audit line
        if status is not None:
            self.status = status

    def parts(self) -> tuple[list[tuple[str, str]], bytes]:
        """The answer's headers and body: one plain-text sentence, unless a subclass speaks
        the client's own error shape."""
        return ([("Content-Type", "text/plain; charset=utf-8"), ("X-Keyhole-Error", self.reason)],
                f"keyhole: {self.message}\n".encode())


class Denied(ProxyError):
    """Policy said no: an unrouted host under ``--unmatched deny``, or a rule."""

    status = 403
    decision = "denied"


class Unavailable(ProxyError):
    """The host's injection cannot inject now (its Secret or key is gone): refused rather than
    sent without the key."""

    status = 503
    decision = "denied"


class BadRequest(ProxyError):
    """The request cannot be interpreted safely."""

    status = 400
    decision = "denied"


class UpstreamFailed(ProxyError):
    """The upstream could not be reached, failed TLS verification, or broke the protocol."""

    status = 502


def parser_complaint(exc: Exception) -> str:
    """What llhttp objected to, without the bytes it quotes: those are the client's own and may
    hold anything, so they are neither answered nor logged."""
    message = str(getattr(exc, "message", "") or "").strip()
    first = message.splitlines()[0] if message else ""
    quoted = _QUOTED.search(first)
    first = first[:quoted.start()] if quoted else first
    return first.strip(" :")[:160] or type(exc).__name__


class LimitExceeded(ProxyError):
    """Over one of an injection's limits: 429 (or 413 for a body) with a JSON body that names
    the injection, the limit and when it resets; nothing was sent upstream."""

    decision = "denied"
    REASONS = {"requestsPerMinute": "rate_limited", "concurrentRequests": "concurrency_limited",
               "requestBodyBytes": "body_too_large"}

    def __init__(self, refusal):
        reason = self.REASONS.get(refusal.limit, "window_exhausted")
        super().__init__(reason, refusal.detail, status=refusal.status)
        self.refusal = refusal

    def parts(self) -> tuple[list[tuple[str, str]], bytes]:
        from keyhole_sidecar.limits import retry_after_header

        refusal = self.refusal
        resets = (time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(refusal.resets_at))
                  if refusal.resets_at is not None else None)
        body = {"error": self.reason, "injection": refusal.injection, "limit": refusal.limit,
                "message": f"keyhole: {self.message}", "retryAfterSeconds": (
                    int(retry_after_header(refusal)) if refusal.retry_after is not None
                    else None), "resetsAt": resets}
        headers = [("Content-Type", "application/json"), ("X-Keyhole-Error", self.reason)]
        retry = retry_after_header(refusal)
        if retry is not None:
            headers.append(("Retry-After", retry))
        return headers, (json.dumps(body) + "\n").encode()


class BudgetExceeded(ProxyError):
    """Over one of ``spec.llm.budgets``: 429 until the window ends, in the model API's own
    error shape, so the agent's SDK reports a quota error (and, told ``x-should-retry:
    false``, does not retry it); nothing was sent upstream."""

    decision = "denied"
    status = 429
    # What each API answers when a quota is spent (its SDKs map a 429 to RateLimitError).
    SHAPES = {
        "openai": lambda text: {"error": {"message": text, "type": "insufficient_quota",
                                          "param": None, "code": "insufficient_quota"}},
        "anthropic": lambda text: {"type": "error", "error": {"type": "rate_limit_error",
                                                              "message": text}},
        "gemini": lambda text: {"error": {"code": 429, "message": text,
                                          "status": "RESOURCE_EXHAUSTED"}},
    }

    # What each API answers when it is briefly unavailable (its SDKs retry these).
    UNAVAILABLE = {
        "openai": lambda text: {"error": {"message": text, "type": "server_error",
                                          "param": None, "code": "budget_unavailable"}},
        "anthropic": lambda text: {"type": "error", "error": {"type": "overloaded_error",
                                                              "message": text}},
        "gemini": lambda text: {"error": {"code": 503, "message": text,
                                          "status": "UNAVAILABLE"}},
    }

    def __init__(self, refusal, api: str):
        super().__init__("budget_unavailable" if refusal.unavailable else "budget_exhausted",
                         refusal.detail, injection=refusal.injection)
        self.refusal, self.api = refusal, api
        if refusal.unavailable:  # the count's keeper is away: a short wait, then again
            self.status = 503

    def parts(self) -> tuple[list[tuple[str, str]], bytes]:
        refusal = self.refusal
        resets = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(refusal.resets_at))
        text = (f"keyhole: {self.message}" if refusal.unavailable
                else f"keyhole: {self.message}; the budget resets at {resets}")
        body = (self.UNAVAILABLE if refusal.unavailable else self.SHAPES)[self.api](text)
        headers = [("Content-Type", "application/json"), ("X-Keyhole-Error", self.reason),
                   ("Retry-After", str(max(1, math.ceil(refusal.retry_after))))]
        if not refusal.unavailable:
            headers.append(("x-should-retry", "false"))
        return headers, (json.dumps(body) + "\n").encode()


class ApprovalRefused(ProxyError):
    """A request held for a person's approval that was not approved: denied, timed out,
    withdrawn by an approver deleting its object, or no operator to ask. Nothing was sent.
    A JSON body names the ApprovalRequest (``kubectl get kar NAME``) and who decided; a gRPC
    client reads PERMISSION_DENIED (or UNAVAILABLE: no operator)."""

    decision = "denied"
    STATUS = {"approval_denied": 403, "approval_timeout": 403, "approval_withdrawn": 403,
              "approval_unavailable": 503, "approval_backlog": 429}

    def __init__(self, reason: str, message: str, injection: str, approval: dict):
        super().__init__(reason, message, status=self.STATUS[reason], injection=injection)
        self.approval = approval

    def parts(self) -> tuple[list[tuple[str, str]], bytes]:
        body = {"error": self.reason, "injection": self.injection,
                "message": f"keyhole: {self.message}", "approval": self.approval}
        return ([("Content-Type", "application/json"), ("X-Keyhole-Error", self.reason)],
                (json.dumps(body) + "\n").encode())


@dataclass(frozen=True, slots=True)
class Rendered:
    """A refusal as every protocol answers it: the wire frames these parts (an HTTP/1.1 head,
    an HTTP/2 HEADERS frame, aiohttp's response to a WebSocket handshake)."""

    status: int
    phrase: str
    headers: list[tuple[str, str]]
    body: bytes
    close: bool
    """The connection should end after it (HTTP/1.1): a 400 means the stream may not be where
    the client thinks it is."""


# The gRPC status a refusal is (grpc/doc/statuscodes.md): a gRPC client reads the code and
# the message from a trailers-only answer, where an HTTP status would reach it as a guess.
GRPC_STATUS = {400: 3, 415: 3, 403: 7, 405: 7, 421: 7, 404: 12, 413: 8, 429: 8, 503: 14,
               502: 14, 504: 4}
_GRPC_MESSAGE_SAFE = frozenset(range(0x20, 0x7F)) - {ord("%")}


def grpc_message(text: str) -> str:
    """``grpc-message``: percent-encoded UTF-8 outside printable ASCII (and ``%`` itself)."""
    return "".join(chr(b) if b in _GRPC_MESSAGE_SAFE else f"%{b:02X}" for b in text.encode())


def render(error: ProxyError, *, grpc: bool = False) -> Rendered:
    """The one renderer: what the client is answered for ``error``, whatever door it came in.
    A gRPC call (``grpc``) gets a trailers-only answer: its status and message as gRPC's."""
    if grpc:
        return Rendered(200, "OK", [
            ("Content-Type", "application/grpc"), ("X-Keyhole-Error", error.reason),
            ("grpc-status", str(GRPC_STATUS.get(error.status, 2))),
            ("grpc-message", grpc_message(f"keyhole: {error.message}"))], b"", False)
    headers, body = error.parts()
    return Rendered(error.status, HTTPStatus(error.status).phrase, headers, body,
                    error.status == 400)


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


class McpRefused(ProxyError):
    """A JSON-RPC body to an MCP server with a call the policy refuses: nothing was sent, and
    each request in it is answered in MCP's own terms (docs/mcp.md, *What the agent sees*).

    A refused ``tools/call`` is a tool result with ``isError``: the SDKs hand it to the
    model, which reads the reason and can choose another way. Any other refused request is a
    JSON-RPC error (the SDKs raise it to the program). A request refused only because it
    shared a batch with a refused one says so."""

    decision = "denied"
    status = 200  # a JSON-RPC answer: the HTTP exchange itself succeeded
    CODE = -32001  # the implementation-defined server error range (JSON-RPC 2.0, 5.1)

    BATCH = "batch"
    """The reason of a request refused only for the company it kept in its batch."""

    def __init__(self, injection: str, refusals: list[tuple[object, str | None, str, str]],
                 batch: bool, status: int | None = None):
        """``refusals``: (id, method, reason, detail) of each request the body held; the
        audit line and the metrics name the first refused on its own account (an approval's
        reason, ``approval_denied``, as it is: the same word for every protocol)."""
        first = next(r for r in refusals if r[2] != self.BATCH)
        reason = first[2] if first[2].startswith("approval_") else f"mcp_{first[2]}"
        super().__init__(reason, first[3], injection=injection, status=status)
        self.refusals, self.batch = refusals, batch
        self.on_stream = False
        if all(ident is None for ident, *_ in refusals):
            self.status = 202  # notifications only: accepted, never answered (and not sent)

    def answered_on_stream(self) -> None:
        """The legacy transport: the answers went on the session's event stream; the POST
        itself is accepted, as the server would (202, no body)."""
        self.on_stream, self.status = True, 202

    def parts(self) -> tuple[list[tuple[str, str]], bytes]:
        if self.on_stream:
            return [("X-Keyhole-Error", self.reason)], b""
        answers = []
        for ident, method, reason, detail in self.refusals:
            if ident is None:
                continue  # a notification is never answered
            text = f"keyhole: {detail}"
            if method == "tools/call":
                answers.append({"jsonrpc": "2.0", "id": ident, "result": {
                    "content": [{"type": "text", "text": text}], "isError": True}})
            else:
                answers.append({"jsonrpc": "2.0", "id": ident, "error": {
                    "code": self.CODE, "message": text,
                    "data": {"keyhole": reason, "injection": self.injection}}})
        if not answers:
            return [("X-Keyhole-Error", self.reason)], b""
        document = answers if self.batch else answers[0]
        return ([("Content-Type", "application/json"), ("X-Keyhole-Error", self.reason)],
                json.dumps(document).encode())


class McpUnreadable(BadRequest):
    """A body to an MCP server the policy cannot read (not JSON-RPC, compressed, ambiguous,
    too large): refused, never passed. Answered as MCP servers answer a body they cannot
    parse: an HTTP error status with a JSON-RPC error whose id is null."""

    def __init__(self, message: str, injection: str, status: int = 400):
        super().__init__("mcp_unreadable", message, status=status, injection=injection)

    def parts(self) -> tuple[list[tuple[str, str]], bytes]:
        body = {"jsonrpc": "2.0", "id": None, "error": {
            "code": -32700 if self.status == 400 else -32600,
            "message": f"keyhole: {self.message}",
            "data": {"keyhole": self.reason, "injection": self.injection}}}
        return ([("Content-Type", "application/json"), ("X-Keyhole-Error", self.reason)],
                json.dumps(body).encode())
