"""``POST /.keyhole/access`` on the proxy port: an agent asks for access it lacks.

Served to the pod's own containers only (the proxy port listens on 127.0.0.1 in the pod).
The sidecar passes the ask to the operator, which records an ApprovalRequest of kind
``access``; nothing is granted until a person approves it (docs/approvals.md). The answer is
at once (202): the agent carries on, and its requests to the injection's hosts work once the
grant is made.

    POST http://127.0.0.1:15080/.keyhole/access
    {"injection": "stripe", "for": "30m", "reason": "refund ticket 4411"}
"""

from __future__ import annotations

import json
import time
from http import HTTPStatus

from keyhole_common.approvals import MAX_GRANT_SECONDS
from keyhole_common.spec.parse import parse_duration
from keyhole_sidecar.approvals import ApprovalUnavailable, AskRefused
from keyhole_sidecar.audit import AuditRecord
from keyhole_sidecar.proxy.context import ProxyContext
from keyhole_sidecar.proxy.exchange import Request
from keyhole_sidecar.proxy.flow import client_body, read_up_to

MAX_ASK = 4096
DEFAULT_FOR = "1h"


def ask_of(body: bytes) -> tuple[str, int, str | None]:
    """The injection, seconds and reason of an ask, or ValueError saying what is wrong."""
    try:
        found = json.loads(body)
    except ValueError:
        raise ValueError("send a JSON object: {\"injection\": NAME, \"for\": \"30m\", "
                         "\"reason\": WHY}") from None
    if not isinstance(found, dict) or not isinstance(found.get("injection"), str):
        raise ValueError("'injection' must name the injection to ask for")
    length = parse_duration(found.get("for", DEFAULT_FOR))
    if length is None or not 0 < length <= MAX_GRANT_SECONDS:
        raise ValueError("'for' must be a duration up to 168h, such as 30m or 2h")
    reason = found.get("reason")
    if reason is not None and (not isinstance(reason, str) or len(reason) > 1000
                               or not reason.isprintable()):
        raise ValueError("'reason' must be one printable line of at most 1000 characters")
    return found["injection"], int(length), reason


async def serve(ctx: ProxyContext, request: Request, record: AuditRecord) -> None:
    started = time.monotonic()
    status, body = await _answer(ctx, request, record)
    payload = (json.dumps(body) + "\n").encode()
    record.status, record.protocol, record.bytes_out = status, request.protocol, len(payload)
    try:
        await request.reply.send(status, HTTPStatus(status).phrase,
                                 [("Content-Type", "application/json")], payload)
    except ConnectionError:
        pass
    finally:
        ctx.metrics.request_done("-", record, time.monotonic() - started)
        ctx.audit.write(record)


async def _answer(ctx: ProxyContext, request: Request, record: AuditRecord
                  ) -> tuple[int, dict]:
    record.decision, record.reason = "denied", "access_refused"
    if request.method != "POST":
        return 405, {"error": "POST a JSON object here to ask for access: {\"injection\": "
                              "NAME, \"for\": \"30m\", \"reason\": WHY}"}
    parts, over = await read_up_to(client_body(request, record), MAX_ASK)
    if over:
        request.reply.close = True  # the rest of the body is not read: the stream is unclear
        return 413, {"error": f"an ask for access is at most {MAX_ASK} bytes"}
    try:
        injection, seconds, reason = ask_of(b"".join(parts))
    except ValueError as exc:
        return 400, {"error": str(exc)}
    record.injection = injection
    try:
        answer = await ctx.approvals.ask_access(injection, seconds, reason)
    except AskRefused as exc:
        return exc.status, {"error": f"keyhole: the ask for access was refused: {exc}"}
    except ApprovalUnavailable as exc:
        return 503, {"error": f"keyhole: cannot ask for access now: {exc}"}
    record.decision, record.reason = "local", "access_asked"
    return 202, {"approval": answer.get("name"), "state": answer.get("state"),
                 "message": "keyhole: a person must approve this ask before anything is "
                            f"granted: {answer.get('approve')}"}
