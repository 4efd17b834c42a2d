"""The audit log: one JSON line per request on stdout, the record of every decision.

Never a header value, never a query value, never a body: a path, the names of the query
parameters, and what the proxy decided and why.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import dataclass, field
from typing import TextIO

_ENCODE = json.JSONEncoder(separators=(",", ":")).encode  # one encoder, not one per line


@dataclass(slots=True)
class AuditRecord:
    mode: str  # "intercept", "tunnel", "absolute", "base-url", "transparent", "plain"
    method: str
    host: str
    path: str = ""
    query_keys: list[str] = field(default_factory=list)
    injection: str | None = None
    source: str | None = None  # what served the credential: static, github_app, oauth2, aws_sigv4
    decision: str = "denied"  # injected | passthrough | denied | error
    reason: str = ""
    status: int = 0
    bytes_in: int = 0  # from the client, towards the upstream
    bytes_out: int = 0  # to the client
    protocol: str | None = None  # the client's: "http/1.1" or "h2" (none for tunnels)
    llm: dict | None = None  # model and tokens of a model API's answer (spec.llm)
    mcp: list[dict] | None = None  # each JSON-RPC message's method, tool and decision (spec.mcp)
    approval: dict | None = None  # the ApprovalRequest, its decision, who, how long it waited
    started: float = field(default_factory=time.monotonic)


class AuditLog:
    """Lines are flushed once per turn of the event loop, not once per line: every request
    that finished in the same turn shares one write, and no line waits longer than that."""

    def __init__(self, stream: TextIO | None = None):
        self._stream = stream or sys.stdout
        self._flush_pending = False
        self._second, self._second_text = -1, ""

    def _timestamp(self, now: float) -> str:
        second = int(now)
        if second != self._second:  # strftime once a second, not once a request
            self._second = second
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._second_text}.{int(now * 1000) % 1000:03d}Z"

    def write(self, record: AuditRecord) -> None:
        now = time.time()
        line = {  # built by hand: dataclasses.asdict deep-copies, on every request
            "time": self._timestamp(now),
            "mode": record.mode, "method": record.method, "host": record.host,
            "path": record.path, "query_keys": record.query_keys,
            "injection": record.injection, "source": record.source,
            "decision": record.decision,
            "reason": record.reason, "status": record.status, "bytes_in": record.bytes_in,
            "bytes_out": record.bytes_out, "protocol": record.protocol, "llm": record.llm,
            "duration_ms": round((time.monotonic() - record.started) * 1000, 3),
        }
        if record.mcp is not None:
            line["mcp"] = record.mcp
        if record.approval is not None:
            line["approval"] = record.approval
        self._stream.write(_ENCODE(line) + "\n")
        if self._flush_pending:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a tool, a test): write through
            self._stream.flush()
            return
        self._flush_pending = True
        loop.call_soon(self.flush)

    def flush(self) -> None:
        self._flush_pending = False
        self._stream.flush()
