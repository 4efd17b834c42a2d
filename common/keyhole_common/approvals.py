"""Approvals, written once for both ends: the sidecar that holds a request and asks, the
operator that records the ApprovalRequest and says what a person decided (docs/approvals.md).

An approval binds to a digest of the exact request: the sidecar computes it from the bytes it
would send, the operator stores it in the object, and a decision (or a grant made with
``--for``) serves only a request with the same digest, from the same pod.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
from dataclasses import dataclass

GROUP, VERSION = "keyhole.dev", "v1alpha1"
KIND, PLURAL = "ApprovalRequest", "approvalrequests"
APPROVALS_PATH = "/v1/approvals"
WITHDRAW_PATH = "/v1/approvals/withdraw"
ACCESS_PATH = "/v1/access"
LOCAL_ACCESS_PATH = "/.keyhole/access"
"""Where an agent asks its own sidecar for access it lacks (the proxy port, base-URL form: no
injection may be named ``.keyhole``)."""
ACCESS_WAIT = 3600.0
"""Seconds an agent's ask for access waits for a person."""
MAX_WAIT = 20.0
"""The longest one channel call waits for a decision; the sidecar calls again until its
timeout."""
MAX_PREVIEW = 4096
"""The most of a request's arguments (redacted) an ApprovalRequest shows a person."""
MAX_GRANT_SECONDS = 7 * 24 * 3600

APPROVED, DENIED, PENDING, EXPIRED, GONE = "approved", "denied", "pending", "expired", "gone"
STATES = (APPROVED, DENIED, PENDING, EXPIRED, GONE)
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,251}[a-z0-9])?$")
KINDS = ("request", "tool", "resource", "prompt")
"""What a sidecar holds for approval; ``access`` (an agent's ask) has a path of its own."""


def _digest(parts: list[bytes]) -> str:
    """SHA-256 over length-prefixed parts: no two different lists of parts give one input."""
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return "sha256:" + h.hexdigest()


def request_digest(method: str, host: str, port: int, path: str, query: str,
                   content_type: str, content_encoding: str, body: bytes) -> str:
    """What an approval of an HTTP request binds to: the method, where it goes, the body as
    sent, and the two headers that say how to read that body. Other headers are not covered
    (docs/approvals.md says which and why)."""
    return _digest([b"request", method.encode(), host.lower().encode(), str(port).encode(),
                    path.encode(), query.encode(), content_type.encode(),
                    content_encoding.encode(), body])


def call_digest(host: str, port: int, path: str, kind: str, subject: str,
                arguments: object) -> str:
    """What an approval of an MCP use binds to: the server, the kind, the name (or URI) and
    the arguments — not the JSON-RPC id, which differs on every call of the same thing."""
    canonical = json.dumps(arguments, sort_keys=True, separators=(",", ":"),
                           ensure_ascii=False, allow_nan=False)
    return _digest([b"mcp", host.lower().encode(), str(port).encode(), path.encode(),
                    kind.encode(), subject.encode(), canonical.encode()])


def access_digest(injection: str, seconds: int) -> str:
    """What an agent's ask for access binds to: the injection and the time asked for."""
    return _digest([b"access", injection.encode(), str(seconds).encode()])


@dataclass(frozen=True, slots=True)
class Ask:
    """A sidecar's ``POST /v1/approvals``: record (or find) the approval of this request for
    the caller's pod and wait up to ``wait`` seconds for a decision. ``what`` is what a
    person reads: host, method, path, and the MCP kind, name and arguments (redacted)."""

    injection: str
    digest: str
    timeout: float
    wait: float
    what: dict
    name: str | None = None
    """The object asked of before: wait on it again (every call after the first)."""

    def as_json(self) -> dict:
        return {"injection": self.injection, "digest": self.digest, "timeout": self.timeout,
                "wait": self.wait, "what": self.what, "name": self.name}

    @classmethod
    def from_json(cls, body: object) -> Ask:
        """ValueError naming the field that is wrong."""
        if not isinstance(body, dict):
            raise ValueError("the body must be a JSON object")
        injection, digest, name = body.get("injection"), body.get("digest"), body.get("name")
        if not isinstance(injection, str) or not _NAME.match(injection):
            raise ValueError("'injection' must name the injection")
        if not isinstance(digest, str) or not _DIGEST.match(digest):
            raise ValueError("'digest' must be sha256: and 64 lowercase hex digits")
        if name is not None and (not isinstance(name, str) or not _NAME.match(name)):
            raise ValueError("'name' must be an ApprovalRequest's name, or absent")
        timeout, wait = _seconds(body.get("timeout"), "timeout", 3600), \
            _seconds(body.get("wait"), "wait", MAX_WAIT, zero=True)
        what = body.get("what")
        if not isinstance(what, dict) or len(json.dumps(what)) > 2 * MAX_PREVIEW:
            raise ValueError(f"'what' must be an object of at most {2 * MAX_PREVIEW} bytes")
        if what.get("kind") not in KINDS:
            raise ValueError(f"'what.kind' must be one of {', '.join(KINDS)}")
        return cls(injection, digest, timeout, wait, what, name)


def _seconds(value: object, field: str, most: float, zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(
            value) or not (value >= 0 if zero else value > 0) or value > most:
        raise ValueError(f"'{field}' must be a number of seconds up to {most:g}")
    return float(value)


@dataclass(frozen=True, slots=True)
class Answer:
    """What the operator says of an approval: its object's ``name``, its ``state``, who
    decided and why, and (approved with ``--for``) the grant's seconds left, which the
    sidecar counts down on its own clock (never comparing the operator's)."""

    name: str
    state: str
    by: str | None = None
    reason: str | None = None
    grant_seconds: float = 0.0

    def as_json(self) -> dict:
        return {"name": self.name, "state": self.state, "by": self.by, "reason": self.reason,
                "grantSeconds": self.grant_seconds}

    @classmethod
    def from_json(cls, body: object) -> Answer:
        """ValueError when the operator's answer is not one."""
        try:
            state, grant = body["state"], float(body.get("grantSeconds") or 0.0)
            by, reason = body.get("by"), body.get("reason")
            answer = cls(str(body["name"]), state, None if by is None else str(by)[:300],
                         None if reason is None else str(reason)[:1000],
                         max(0.0, min(grant, MAX_GRANT_SECONDS)))
        except (TypeError, KeyError, ValueError, AttributeError):
            raise ValueError("an approval answer needs name and state") from None
        if state not in STATES:
            raise ValueError(f"unknown approval state {state!r}")
        return answer


def seal(key: bytes, fields: dict) -> str:
    """An HMAC over ``fields`` (canonical JSON) with the namespace's key: the operator seals
    what it wrote (an object's spec) and what passed its webhook (a decision), and honours
    only what carries a good seal — whoever else may write the object."""
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hmac.new(key, b"keyhole-approval\0" + canonical.encode(), hashlib.sha256).hexdigest()


def sealed(key: bytes, fields: dict, found: object) -> bool:
    return isinstance(found, str) and hmac.compare_digest(seal(key, fields), found)
