"""Pure request decisions: path normalisation, the rules allowlist, base-URL path splitting.

Every mode normalises the path the same way before a rule sees it, and forwards the path
the rule saw, so ``/v1/models/%2e%2e/admin`` cannot slip past a ``/v1/models/*`` rule.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from keyhole_common.spec import Rule

_ENCODED_DOT_OR_SLASH = re.compile(r"%(2[eEfF])")


class PathRejected(ValueError):
    """The path cannot be interpreted safely (answered 400)."""


def normalise_path(raw_path: str) -> str:
    """Decode ``%2e``/``%2f`` and remove dot segments (RFC 3986 §5.2.4); keep other escapes.

    Raises :class:`PathRejected` for paths that are not origin-form.
    """
    if not raw_path.startswith("/"):
        raise PathRejected(f"path must start with '/', got {raw_path[:40]!r}")
    decoded = _ENCODED_DOT_OR_SLASH.sub(lambda m: "." if m.group(1) in "2e2E" else "/", raw_path)
    if "\\" in decoded or "%5c" in decoded.lower():
        raise PathRejected("backslashes in paths are refused (servers disagree on their meaning)")
    output: list[str] = []
    for segment in decoded.split("/")[1:]:
        if segment == ".":
            continue
        if segment == "..":
            if output:
                output.pop()
            continue
        output.append(segment)
    normalised = "/" + "/".join(output)
    if decoded.endswith(("/.", "/..")) and not normalised.endswith("/"):
        normalised += "/"
    return normalised


@lru_cache(maxsize=1024)
def _glob(pattern: str) -> re.Pattern[str]:
    """``*`` matches within a segment, ``**`` across segments; everything else literally."""
    parts = re.split(r"(\*\*|\*)", pattern)
    regex = "".join(
        ".*" if part == "**" else "[^/]*" if part == "*" else re.escape(part) for part in parts
    )
    return re.compile(f"^{regex}$")


@dataclass(frozen=True, slots=True)
class RuleVerdict:
    allowed: bool
    reason: str  # e.g. "method DELETE not in any rule"
    index: int | None = None  # the rule that admitted the request


def check_rules(rules: tuple[Rule, ...] | None, method: str, path: str) -> RuleVerdict:
    """Apply an injection's allowlist to a normalised path. No rules: everything passes."""
    if rules is None:
        return RuleVerdict(True, "no rules")
    method_matched = False
    for index, rule in enumerate(rules):
        if rule.methods is not None and method not in rule.methods:
            continue
        method_matched = True
        if rule.paths is None or any(_glob(p).match(path) for p in rule.paths):
            return RuleVerdict(True, f"rules[{index}]", index)
    if not method_matched:
        return RuleVerdict(False, f"method {method} is not allowed by any rule")
    return RuleVerdict(False, f"path {path} is not allowed for {method} by any rule")


class BaseUrlError(ValueError):
    """A base-URL path that names no injection; ``status`` is 400 or 404."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def split_base_url(raw_path: str) -> tuple[str, str]:
    """``/openai/v1/chat`` → (``openai``, ``/v1/chat``) after normalisation."""
    try:
        path = normalise_path(raw_path)
    except PathRejected as exc:
        raise BaseUrlError(400, str(exc)) from None
    name, slash, rest = path[1:].partition("/")
    if not name:
        raise BaseUrlError(
            404, "base-URL mode needs the injection's name as the first path segment, "
                 "e.g. http://127.0.0.1:15080/<injection>/v1/..."
        )
    return name, "/" + rest if slash else "/"
