"""JSON-RPC 2.0 bodies as an MCP server will read them, read strictly: anything two parsers
could read two ways is refused, so the proxy judges exactly the call the server will run.

Refused: invalid UTF-8, a byte-order mark, duplicate keys at any depth, lone surrogates
(``"\\ud800"``), NaN and Infinity (and numbers past a double or 64-bit integers), nesting
deeper than :data:`MAX_DEPTH`, more than :data:`MAX_BATCH` messages, a message that is not a
JSON-RPC 2.0 request, notification or response, an id that is not a string or an integer,
a method with odd case or spaces that looks like one keyhole governs, and a governed call
whose name or arguments are of the wrong type. Escapes are undone by the parser
(``"\\u0064elete"`` is ``delete``), as the server's.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

MAX_BODY = 4 << 20
"""The largest request body read (a bigger one is refused, never passed unread)."""
MAX_DEPTH = 64
MAX_BATCH = 100
TOOL_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,128}$")
"""The characters MCP (2025-11-25, *Tool names*) allows in a tool name."""

GOVERNED = frozenset({"tools/call", "resources/read", "prompts/get", "completion/complete",
                      "resources/subscribe"})
"""The methods that use a tool, resource or prompt; judged by the policy."""
KNOWN = GOVERNED | {
    "initialize", "ping", "tools/list", "resources/list", "resources/templates/list",
    "resources/unsubscribe", "prompts/list", "logging/setLevel", "tasks/get", "tasks/result",
    "tasks/list", "tasks/cancel", "notifications/initialized", "notifications/cancelled",
    "notifications/progress", "notifications/roots/list_changed", "notifications/message",
    "notifications/tasks/status",
}
_FOLD = re.compile(r"[^a-z0-9]")
_FOLDED = {_FOLD.sub("", m.lower()): m for m in KNOWN}
"""Each known method by its letters and digits alone: ``Tools/Call``, ``tools_call`` and
``tools/call `` all read like ``tools/call`` and are refused as not it."""


class Unreadable(ValueError):
    """The body is not one the policy can judge; the message says what was wrong."""


@dataclass(frozen=True, slots=True)
class Message:
    """One JSON-RPC message from the client: a request (``id`` set), a notification (no id)
    or a response to a server's request (``method`` None)."""

    method: str | None
    id: str | int | None
    params: dict


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    found = dict(pairs)
    if len(found) != len(pairs):
        seen: set[str] = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise Unreadable(f"the key {twice!r} appears twice in one object")
    return found


def _no_constant(name: str) -> None:
    raise Unreadable(f"{name} is not JSON")


def _check(value: Any, depth: int = 0) -> None:
    """No lone surrogate in any string (key or value), no nesting past MAX_DEPTH."""
    if depth > MAX_DEPTH:
        raise Unreadable(f"nested deeper than {MAX_DEPTH}")
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise Unreadable("a string holds a lone surrogate (an unpaired \\ud800-\\udfff "
                             "escape)") from None
    elif isinstance(value, bool):
        return
    elif isinstance(value, int) and not -(1 << 63) <= value < (1 << 64):
        raise Unreadable("an integer outside 64 bits (readers round it differently)")
    elif isinstance(value, float) and not math.isfinite(value):
        raise Unreadable("a number too large for a double (readers read it as infinity, or "
                         "refuse it)")
    elif isinstance(value, dict):
        for key, item in value.items():
            _check(key, depth + 1)
            _check(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _check(item, depth + 1)


def read(body: bytes) -> tuple[list[Message], bool]:
    """The messages of a request body, and whether they came as a batch. Raises Unreadable."""
    if len(body) > MAX_BODY:
        raise Unreadable(f"the body is over {MAX_BODY >> 20} MiB")
    if body.startswith(b"\xef\xbb\xbf"):
        raise Unreadable("the body begins with a byte-order mark")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise Unreadable("the body is not valid UTF-8") from None
    try:
        document = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except RecursionError:
        raise Unreadable(f"nested deeper than {MAX_DEPTH}") from None
    except json.JSONDecodeError as exc:
        raise Unreadable(f"the body is not JSON ({exc.msg} at line {exc.lineno} column "
                         f"{exc.colno})") from None
    _check(document)
    if isinstance(document, list):
        if not 0 < len(document) <= MAX_BATCH:
            raise Unreadable(f"a batch holds 1 to {MAX_BATCH} messages")
        return [_message(item) for item in document], True
    return [_message(document)], False


def _message(item: Any) -> Message:
    if not isinstance(item, dict):
        raise Unreadable("a JSON-RPC message is an object")
    if item.get("jsonrpc") != "2.0":
        raise Unreadable('a JSON-RPC message says "jsonrpc": "2.0"')
    ident = item.get("id")
    if "id" in item and (isinstance(ident, bool) or not isinstance(ident, str | int)):
        raise Unreadable("an id is a string or an integer")
    if "method" not in item:
        if "id" not in item or ("result" in item) == ("error" in item):
            raise Unreadable("a message is a request (method), or a response (id with result "
                             "or error)")
        return Message(None, ident, {})
    method = item["method"]
    if not isinstance(method, str):
        raise Unreadable("a method is a string")
    meant = _FOLDED.get(_FOLD.sub("", method.lower()))
    if meant is not None and method != meant:
        raise Unreadable(f"the method {method[:64]!r} reads like {meant!r} but is not it; "
                         "methods are exact")
    if any(ch.isspace() or not ch.isprintable() for ch in method):
        raise Unreadable("a method holds a space or a control character")
    params = item.get("params", {})
    if not isinstance(params, dict):
        raise Unreadable(f"{method}: params is an object")
    if method in GOVERNED:
        _governed(method, params)
    return Message(method, ident if "id" in item else None, params)


def _governed(method: str, params: dict) -> None:
    """The fields the policy reads, of the types the protocol gives them."""
    if method == "tools/call":
        name = params.get("name")
        if not isinstance(name, str):
            raise Unreadable("tools/call: params.name is the tool's name, a string")
        if not TOOL_NAME.match(name):
            raise Unreadable("tools/call: a tool name is 1 to 128 of A-Z a-z 0-9 _ - .")
        if not isinstance(params.get("arguments", {}), dict):
            raise Unreadable("tools/call: params.arguments is an object")
    elif method in ("resources/read", "resources/subscribe"):
        if not isinstance(params.get("uri"), str) or not params["uri"]:
            raise Unreadable(f"{method}: params.uri is the resource's URI, a string")
    elif method == "prompts/get":
        if not isinstance(params.get("name"), str) or not params["name"]:
            raise Unreadable("prompts/get: params.name is the prompt's name, a string")
        if not isinstance(params.get("arguments", {}), dict):
            raise Unreadable("prompts/get: params.arguments is an object")
    elif method == "completion/complete":
        ref = params.get("ref")
        if not isinstance(ref, dict) or ref.get("type") not in ("ref/prompt", "ref/resource"):
            raise Unreadable("completion/complete: params.ref is a ref/prompt or ref/resource")
        key = "name" if ref["type"] == "ref/prompt" else "uri"
        if not isinstance(ref.get(key), str):
            raise Unreadable(f"completion/complete: params.ref.{key} is a string")
