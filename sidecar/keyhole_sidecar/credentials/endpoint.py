"""Talking to a token endpoint: one request, a JSON answer, every failure a CredentialError.

These requests are the proxy's own: they use the proxy's client session (``--resolve``, the
egress policy and ``--upstream-ca`` apply) but never pass through routing or injection, and
redirects are never followed, so a credential is only ever sent to the URL in the spec.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import urlsplit

import aiohttp

from keyhole_sidecar.credentials.tokens import DEFAULT_LIFETIME, CredentialError, Token
from keyhole_sidecar.redact import Redactor

FORM = "application/x-www-form-urlencoded"
TIMEOUT = aiohttp.ClientTimeout(total=15)
MAX_ANSWER = 64 * 1024
DETAIL_LENGTH = 200


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: dict


def where(url: str) -> str:
    """The endpoint without its query: enough to name it in an error."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


async def call_raw(session: aiohttp.ClientSession, method: str, url: str, *, what: str,
                   headers: dict[str, str], data: str | None = None,
                   json_body: dict | None = None) -> tuple[int, bytes]:
    """Send one request; return its status and body (at most MAX_ANSWER bytes)."""
    try:
        async with session.request(method, url, headers=headers, data=data, json=json_body,
                                   allow_redirects=False, timeout=TIMEOUT) as response:
            raw = await response.content.read(MAX_ANSWER + 1)
            status = response.status
    except TimeoutError:
        raise CredentialError("endpoint_unreachable",
                              f"{what} at {where(url)} did not answer within "
                              f"{TIMEOUT.total:.0f} s") from None
    except (aiohttp.ClientError, OSError) as exc:
        raise CredentialError("endpoint_unreachable",
                              f"cannot reach {what} at {where(url)} ({type(exc).__name__}: "
                              f"{_first_line(exc)})") from None
    if len(raw) > MAX_ANSWER:
        raise CredentialError("endpoint_answer", f"{what} at {where(url)} answered more than "
                                                 f"{MAX_ANSWER // 1024} KiB")
    return status, raw


async def call(session: aiohttp.ClientSession, method: str, url: str, *, what: str,
               headers: dict[str, str], data: str | None = None,
               json_body: dict | None = None) -> Answer:
    """Send one request; return the status and the JSON object it answered (or {})."""
    status, raw = await call_raw(session, method, url, what=what, headers=headers, data=data,
                                 json_body=json_body)
    try:
        body = json.loads(raw) if raw.strip() else {}
    except ValueError:
        body = None
    if not isinstance(body, dict):
        if 200 <= status < 300:
            raise CredentialError("endpoint_answer", f"{what} at {where(url)} answered "
                                                     f"{status} without a JSON object")
        body = {}
    return Answer(status, body)


def detail(answer: Answer, redactor: Redactor, *keys: str) -> str:
    """The endpoint's own explanation, for the error message: redacted, one line, short."""
    parts = [str(answer.body[k]) for k in keys if isinstance(answer.body.get(k), str | int)]
    text = redactor.redact_text(" ".join(parts)).replace("\n", " ").strip()
    if len(text) > DETAIL_LENGTH:
        text = text[:DETAIL_LENGTH] + "…"
    return f": {text}" if text else ""


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [""])[0][:DETAIL_LENGTH]


def timestamp(stamp: object, who: str) -> float:
    """An endpoint's absolute expiry (RFC 3339, ``Z`` or an offset) as wall-clock seconds."""
    if not isinstance(stamp, str):
        raise CredentialError("endpoint_answer", f"{who} answered no expiry")
    try:
        return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    except ValueError:
        raise CredentialError("endpoint_answer", f"{who}'s expiry {stamp!r} is not a "
                                                 "timestamp") from None


def bearer_token(answer: Answer, endpoint: str, now: float,
                 types: tuple[str, ...] = ("bearer",)) -> Token:
    """An OAuth 2.0 token answer (RFC 6749 §5.1) as a Token; ``types``: the token_type values
    accepted (RFC 8693 answers N_A for a token that is not an access token; "" where the
    endpoint may leave it out)."""
    token = answer.body.get("access_token")
    kind = str(answer.body.get("token_type", "")).lower()
    if not isinstance(token, str) or not token:
        raise CredentialError("endpoint_answer", f"{endpoint} answered without an access_token")
    if kind not in types:
        raise CredentialError("endpoint_answer", f"{endpoint} issued a {kind or 'untyped'!r} "
                                                 "token; keyhole presents bearer tokens only")
    lifetime = answer.body.get("expires_in")
    if isinstance(lifetime, str) and lifetime.isdigit():
        lifetime = int(lifetime)
    seconds = float(lifetime) if isinstance(lifetime, int | float) and not isinstance(
        lifetime, bool) and lifetime > 0 else DEFAULT_LIFETIME
    return Token(token, now + seconds, now)
