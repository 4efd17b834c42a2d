"""What ``spec.mcp`` allows: each governed call judged (by name or URI, then its conditions
in CEL), and each listing cut to what may be used. Pure functions of the spec and a message.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any

from keyhole_common.spec.expressions import compile_expression
from keyhole_common.spec.model import Approval, Mcp, McpAccess
from keyhole_sidecar.mcp.jsonrpc import Message

# method → (the kind it uses, the field naming what it uses)
_SUBJECT = {"tools/call": ("tools", "name"), "prompts/get": ("prompts", "name"),
            "resources/read": ("resources", "uri"), "resources/subscribe": ("resources", "uri")}
NOUN = {"tools": "tool", "prompts": "prompt", "resources": "resource"}
"""One of a kind: how the agent's answer and the audit line name it."""
# listing key in a result → (the kind, the field naming each entry)
LISTINGS = {"tools": ("tools", "name"), "prompts": ("prompts", "name"),
            "resources": ("resources", "uri"), "resourceTemplates": ("resources", "uriTemplate")}


@dataclass(frozen=True, slots=True)
class Verdict:
    """What was decided on one message: ``kind`` and ``subject`` name what it used (a tool,
    resource or prompt; None for the rest), ``reason`` is a short bounded code for metrics
    and the audit line, ``detail`` the sentence the agent reads."""

    allowed: bool
    kind: str | None = None
    subject: str | None = None
    reason: str = "allowed"
    detail: str = ""
    approval: Approval | None = None
    """Allowed once a person approves it (``approval`` in the spec): how long it is held."""


PASS = Verdict(True, reason="not_governed")


def _matches(value: str, globs: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(value, glob) for glob in globs)


def judge(spec: Mcp, message: Message) -> Verdict:
    """Allowed or refused, and why, for one message from the agent."""
    if message.method == "completion/complete":  # suggestions only: never held for approval
        ref = message.params["ref"]
        if ref["type"] == "ref/prompt":
            return _judge(spec.prompts, "prompts", ref["name"], {"name": ref["name"]}, False)
        return _judge(spec.resources, "resources", ref["uri"], {"uri": ref["uri"]}, False)
    if message.method not in _SUBJECT:
        return PASS
    kind, field = _SUBJECT[message.method]
    subject = message.params[field]
    variables: dict[str, Any] = {field: subject}
    if field == "name":
        variables["arguments"] = message.params.get("arguments", {})
    return _judge(getattr(spec, kind), kind, subject, variables)


def _refused_by_name(access: McpAccess, name: str) -> str | None:
    """``denied`` or ``not_allowed`` when the globs alone refuse ``name``; None: they let it
    be (a call then meets its conditions; a listing keeps it)."""
    if _matches(name, access.deny):
        return "denied"
    if access.allow is not None and not _matches(name, access.allow):
        return "not_allowed"
    return None


def _judge(access: McpAccess, kind: str, subject: str, variables: dict[str, Any],
           use: bool = True) -> Verdict:
    what = NOUN[kind]
    refused = _refused_by_name(access, subject)
    if refused is not None:
        return Verdict(False, kind, subject, refused, f"the {what} {subject!r} is " + (
            "denied" if refused == "denied" else "not among those allowed"))
    for condition in access.when:
        if not _matches(subject, condition.match):
            continue
        try:
            result = compile_expression(condition.expression).execute(variables)
        except Exception as exc:
            return Verdict(False, kind, subject, "condition_error",
                           f"the {what} {subject!r} is refused: its condition could not be "
                           f"evaluated ({type(exc).__name__}: {str(exc)[:200]})")
        if result is not True:
            because = condition.message or f"the condition {condition.expression[:200]!r} " \
                                           f"is {'false' if result is False else 'not true'}"
            return Verdict(False, kind, subject, "condition",
                           f"the {what} {subject!r} is refused: {because}")
    held = next((a.approval for a in access.approval if _matches(subject, a.match)), None) \
        if use else None
    return Verdict(True, kind, subject, "allowed", approval=held)


def visible(spec: Mcp, kind: str, entry: Any, field: str) -> bool:
    """Whether a listed entry may stay in a listing: by name (or URI) alone; conditions on
    arguments are for calls. An entry without its name is dropped."""
    access: McpAccess = getattr(spec, kind)
    if not isinstance(entry, dict) or not isinstance(entry.get(field), str):
        return False
    return _refused_by_name(access, entry[field]) is None


def filter_result(spec: Mcp, message: Any) -> Any | None:
    """A JSON-RPC response with a listing (tools, resources, templates, prompts) cut to what
    may be used, or None when nothing in it changes."""
    result = message.get("result") if isinstance(message, dict) else None
    if not isinstance(result, dict):
        return None
    changed = False
    for key, (kind, field) in LISTINGS.items():
        entries = result.get(key)
        if not isinstance(entries, list):
            continue
        kept = [e for e in entries if visible(spec, kind, e, field)]
        if len(kept) != len(entries):
            result = {**result, key: kept}
            changed = True
    return {**message, "result": result} if changed else None
