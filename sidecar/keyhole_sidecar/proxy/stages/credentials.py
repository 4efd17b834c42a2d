"""Credentials: each of the request's credential sources sets its credential (a static
header, a minted token, a signature over the request). The client's own were removed with the
hop-by-hop headers before any stage ran."""

from __future__ import annotations

import hashlib

from keyhole_sidecar.credentials import CredentialError, Outgoing
from keyhole_sidecar.inject import forwarded_query
from keyhole_sidecar.proxy.errors import BadRequest, Unavailable, UpstreamFailed
from keyhole_sidecar.proxy.flow import Exchange, Stage, read_up_to

SIGNED_BODY_LIMIT = 16 * 1024 * 1024
"""A body whose hash goes into a signature (SigV4, payload: signed) is read whole first."""


class Credentials(Stage):
    __slots__ = ()

    @classmethod
    def open(cls, ex: Exchange) -> Credentials | None:
        return cls(ex) if ex.target.credentials else None

    async def before(self) -> None:
        ex = self.ex
        target, request = ex.target, ex.request
        out = Outgoing(request.method, target.host, target.port, target.path,
                       forwarded_query(target.query, target.routes), ex.headers, request.headers)
        sources = target.credentials
        if any(source.hashes_payload for source in sources):
            parts, over = await read_up_to(ex.body, SIGNED_BODY_LIMIT)
            if over:
                raise BadRequest("body_too_large", f"a body over {SIGNED_BODY_LIMIT >> 20} MiB "
                                 "cannot be hashed for its signature; for services that accept "
                                 "it (S3), set spec.awsSigV4.payload: unsigned", status=413)
            whole = b"".join(parts)
            out.payload_hash, ex.body = hashlib.sha256(whole).hexdigest(), whole
        try:
            for source in sources:
                await source.authorize(out, ex.ctx.session)
        except CredentialError as error:
            message = f"injection {target.label!r}: {error.message}"
            if error.reason == "unsupported":  # the client's request, not the credential
                raise BadRequest("credential_unsupported", message) from None
            if error.status == 503:  # federation: keyhole cannot make the credential now
                raise Unavailable("credential", message) from None
            raise UpstreamFailed("credential", message) from None
        ex.query = out.query
