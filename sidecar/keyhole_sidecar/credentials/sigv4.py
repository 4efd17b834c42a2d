"""AWS Signature Version 4, as pure functions: request in, ``Authorization`` out.

Checked against AWS's published test suite (tests/unit/test_sigv4.py). The steps and their
names follow AWS's description: canonical request → string to sign → signing key → signature.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import quote, unquote

ALGORITHM = "AWS4-HMAC-SHA256"
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
_UNRESERVED = "-_.~"  # with letters and digits: RFC 3986's unreserved set, never encoded
# Query parameters of a presigned URL: the proxy signs in the header, so a client's presigned
# parameters would only make AWS see two signatures.
PRESIGN_PARAMETERS = frozenset({"x-amz-algorithm", "x-amz-credential", "x-amz-date",
                                "x-amz-expires", "x-amz-signedheaders", "x-amz-signature",
                                "x-amz-security-token"})


@dataclass(frozen=True, slots=True)
class AwsKeys:
    access_key_id: str
    secret_access_key: str
    session_token: str | None = None


@dataclass(frozen=True, slots=True)
class Signed:
    canonical_request: str
    string_to_sign: str
    authorization: str


def canonical_uri(raw_path: str, service: str) -> str:
    """S3 signs the path as sent; every other service signs it with dot segments and empty
    segments removed, each segment URI-encoded once more (so ``%20`` is signed as ``%2520``)."""
    if service == "s3":
        return raw_path or "/"
    segments: list[str] = []
    for segment in raw_path.split("/"):
        if segment in ("", "."):
            continue
        if segment == "..":
            if segments:
                segments.pop()
            continue
        segments.append(quote(segment, safe=_UNRESERVED))
    path = "/" + "/".join(segments)
    if raw_path.endswith("/") and path != "/":
        path += "/"
    return path


def canonical_query(raw_query: str) -> str:
    """Every name and value percent-decoded, re-encoded strictly, sorted by name then value."""
    pairs = []
    for item in raw_query.split("&"):
        if not item:
            continue
        name, _, value = item.partition("=")
        pairs.append((quote(unquote(name), safe=_UNRESERVED), quote(unquote(value), safe=_UNRESERVED)))
    return "&".join(f"{name}={value}" for name, value in sorted(pairs))


def without_presign_parameters(raw_query: str) -> str:
    return "&".join(item for item in raw_query.split("&") if item and unquote(
        item.partition("=")[0]).lower() not in PRESIGN_PARAMETERS)


def canonical_headers(headers: Iterable[tuple[str, str]],
                      signed: Iterable[str]) -> tuple[str, str]:
    """(the canonical header block, the signed-headers list), for the names in ``signed``."""
    wanted = {name.lower() for name in signed}
    values: dict[str, list[str]] = {}
    for name, value in headers:
        lower = name.lower()
        if lower in wanted:
            values.setdefault(lower, []).append(" ".join(value.split()))
    names = sorted(values)
    block = "".join(f"{name}:{','.join(values[name])}\n" for name in names)
    return block, ";".join(names)


def signing_key(secret_access_key: str, date: str, region: str, service: str) -> bytes:
    key = f"AWS4{secret_access_key}".encode()
    for part in (date, region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return key


@dataclass(frozen=True, slots=True)
class Unsigned:
    """The parts of a request that are signed. ``headers`` must already hold ``host`` and
    ``x-amz-date`` (and the session token, when it is to be signed)."""
    method: str
    raw_path: str
    raw_query: str
    headers: Iterable[tuple[str, str]]
    signed_headers: Iterable[str]
    payload_hash: str


@dataclass(frozen=True, slots=True)
class Scope:
    """Where and when a signature holds; ``amz_date`` is ``YYYYMMDDTHHMMSSZ``."""
    region: str
    service: str
    amz_date: str


def sign(request: Unsigned, keys: AwsKeys, scope: Scope) -> Signed:
    """Sign one request."""
    block, signed_list = canonical_headers(request.headers, request.signed_headers)
    creq = "\n".join((request.method, canonical_uri(request.raw_path, scope.service),
                      canonical_query(request.raw_query), block, signed_list,
                      request.payload_hash))
    day = scope.amz_date[:8]
    credential_scope = f"{day}/{scope.region}/{scope.service}/aws4_request"
    sts = "\n".join((ALGORITHM, scope.amz_date, credential_scope,
                     hashlib.sha256(creq.encode()).hexdigest()))
    key = signing_key(keys.secret_access_key, day, scope.region, scope.service)
    signature = hmac.new(key, sts.encode(), hashlib.sha256).hexdigest()
    authorization = (f"{ALGORITHM} Credential={keys.access_key_id}/{credential_scope}, "
                     f"SignedHeaders={signed_list}, Signature={signature}")
    return Signed(creq, sts, authorization)
