"""AWS: every request re-signed with Signature Version 4, so agents call AWS APIs through the
proxy with no AWS credentials in their container (an SDK given placeholder keys signs with
them; the proxy drops that signature and signs again)."""

from __future__ import annotations

import time

import aiohttp

from keyhole_common.spec.model import SIGV4_HEADERS, AwsSigV4
from keyhole_sidecar.credentials import sigv4
from keyhole_sidecar.credentials.source import CredentialSource, Outgoing
from keyhole_sidecar.credentials.tokens import CredentialError

# Signed besides host and every x-amz-* header: the only other header AWS documents as signed
# that aiohttp leaves as the client sent it. Content-Length is not signed: it may be rewritten.
EXTRA_SIGNED = frozenset({"content-type", "content-md5"})


class AwsSigV4Source(CredentialSource):
    kind = "aws_sigv4"
    header_names = SIGV4_HEADERS

    def __init__(self, injection: str, spec: AwsSigV4, keys: sigv4.AwsKeys):
        secrets = [keys.secret_access_key, *((keys.session_token,) if keys.session_token else ())]
        super().__init__(injection, secrets)
        self.spec = spec
        self.keys = keys
        self.hashes_payload = spec.payload == "signed"

    async def authorize(self, out: Outgoing, session: aiohttp.ClientSession) -> None:
        sign_outgoing(out, self.keys, self.spec.region, self.spec.service)


def sign_outgoing(out: Outgoing, keys: sigv4.AwsKeys, region: str, service: str) -> None:
    """Sign ``out`` with ``keys``: the client's own signature (headers or presigned query)
    never leaves; ``out.payload_hash`` is the body's hash, or None for UNSIGNED-PAYLOAD."""
    content_hash = out.client_headers.get("x-amz-content-sha256", "")
    if content_hash.upper().startswith("STREAMING-"):
        raise CredentialError("unsupported", "the client signs its body in chunks "
                              f"({content_hash}), which only its own key can do; turn "
                              "chunked signing off in the SDK (the proxy re-signs)")
    payload_hash = out.payload_hash or sigv4.UNSIGNED_PAYLOAD
    for name in SIGV4_HEADERS:  # the client's own signature, if any, never leaves
        out.headers.popall(name, None)
    out.query = sigv4.without_presign_parameters(out.query)
    amz_date = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out.headers["Host"] = out.authority
    out.headers["X-Amz-Date"] = amz_date
    out.headers["X-Amz-Content-Sha256"] = payload_hash
    if keys.session_token:
        out.headers["X-Amz-Security-Token"] = keys.session_token
    signed_names = {name.lower() for name in out.headers
                    if name.lower().startswith("x-amz-") or name.lower() in EXTRA_SIGNED}
    signed = sigv4.sign(
        sigv4.Unsigned(out.method, out.path, out.query, out.headers.items(),
                       signed_names | {"host"}, payload_hash),
        keys, sigv4.Scope(region, service, amz_date))
    out.headers["Authorization"] = signed.authorization
