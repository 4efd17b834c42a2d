"""OAuth 2.0 client credentials (RFC 6749 §4.4): the proxy is the client, the agent gets
the access token's effect without the token or the client secret."""

from __future__ import annotations

import base64
import time
from urllib.parse import quote_plus, urlencode

import aiohttp

from keyhole_common.spec.model import OAuth2ClientCredentials
from keyhole_sidecar.credentials.endpoint import FORM, bearer_token, call, detail, where
from keyhole_sidecar.credentials.source import Outgoing, TokenSource
from keyhole_sidecar.credentials.tokens import CredentialError, Token


def token_request(spec: OAuth2ClientCredentials, client_id: str,
                  client_secret: str) -> tuple[dict[str, str], str]:
    """(headers, form body) of the token request for ``spec.auth_method``."""
    form = {"grant_type": "client_credentials"}
    if spec.scopes:
        form["scope"] = " ".join(spec.scopes)
    if spec.audience:
        form["audience"] = spec.audience
    headers = {"Content-Type": FORM, "Accept": "application/json"}
    if spec.auth_method == "client_secret_post":
        form.update(client_id=client_id, client_secret=client_secret)
    else:  # §2.3.1: each part form-urlencoded before base64
        pair = f"{quote_plus(client_id)}:{quote_plus(client_secret)}"
        headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
    return headers, urlencode(form)


class OAuth2Source(TokenSource):
    kind = "oauth2"

    def __init__(self, injection: str, spec: OAuth2ClientCredentials, client_id: str,
                 client_secret: str, **hooks):
        # The secret as sent in client_secret_basic is form-encoded first: mask that form too.
        super().__init__(injection, (client_secret, quote_plus(client_secret)), **hooks)
        self.spec = spec
        self._client_id, self._client_secret = client_id, client_secret

    async def mint(self, session: aiohttp.ClientSession) -> Token:
        now = time.time()
        headers, form = token_request(self.spec, self._client_id, self._client_secret)
        endpoint = where(self.spec.token_url)
        answer = await call(session, "POST", self.spec.token_url, what="the token endpoint",
                            headers=headers, data=form)
        if answer.status != 200:
            said = detail(answer, self.redactor(), "error", "error_description")
            hint = ("check clientIDFrom, clientSecretFrom and authMethod"
                    if answer.status in (400, 401) else "see the endpoint's own logs")
            reason = "refused" if answer.status in (400, 401, 403) else "endpoint_answer"
            raise CredentialError(reason, f"the token endpoint {endpoint} answered "
                                               f"{answer.status}{said}: {hint}")
        return bearer_token(answer, endpoint, now)

    def present(self, token: str, out: Outgoing) -> None:
        out.headers["Authorization"] = f"Bearer {token}"
