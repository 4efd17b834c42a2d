"""GitHub App installation tokens: the App's private key signs a short JWT, the JWT buys an
installation token (an hour, narrowed to the listed repositories and permissions), and the
token is presented as ``Authorization: token …`` to the API and as basic auth
``x-access-token:…`` to every other listed host, which is how git over HTTPS takes it. git
sends no credentials until challenged, so the proxy adds them to every request up front.
"""

from __future__ import annotations

import base64
import json
import time

import aiohttp
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from keyhole_common.spec.model import GitHubApp
from keyhole_sidecar.credentials.endpoint import call, detail, timestamp
from keyhole_sidecar.credentials.source import Outgoing, TokenSource
from keyhole_sidecar.credentials.tokens import CredentialError, Token
from keyhole_sidecar.redact import Redactor, secret_forms

JWT_LIFETIME = 540  # GitHub allows ten minutes; leave room for clock skew
JWT_BACKDATE = 60  # "iat" a minute in the past, as GitHub recommends against skew
API_HEADERS = {"Accept": "application/vnd.github+json", "X-GitHub-Api-Version": "2022-11-28",
               "User-Agent": "keyhole"}


def load_private_key(pem: str, where: str) -> rsa.RSAPrivateKey:
    """The App's key, or a ValueError naming the Secret (never its content)."""
    try:
        key = serialization.load_pem_private_key(pem.encode(), password=None)
    except (ValueError, TypeError):
        raise ValueError(f"Secret {where}: not a PEM private key (GitHub's download starts "
                         "with -----BEGIN RSA PRIVATE KEY-----)") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError(f"Secret {where}: a GitHub App key is an RSA key")
    return key


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def app_jwt(app_id: str, key: rsa.RSAPrivateKey, now: float) -> str:
    """The RS256 JWT that authenticates as the App itself."""
    header = _b64url(json.dumps({"alg": "RS256", "typ": "JWT"}, separators=(",", ":")).encode())
    claims = {"iat": int(now) - JWT_BACKDATE, "exp": int(now) + JWT_LIFETIME, "iss": app_id}
    payload = _b64url(json.dumps(claims, separators=(",", ":")).encode())
    signature = key.sign(f"{header}.{payload}".encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{header}.{payload}.{_b64url(signature)}"


def token_request(spec: GitHubApp) -> dict | None:
    """The narrowing asked for, as GitHub's access_tokens endpoint takes it."""
    body: dict = {}
    if spec.repositories:
        body["repositories"] = list(spec.repositories)
    if spec.permissions:
        body["permissions"] = dict(spec.permissions)
    return body or None


class GitHubAppSource(TokenSource):
    kind = "github_app"

    def __init__(self, injection: str, spec: GitHubApp, private_key_pem: str, **hooks):
        super().__init__(injection, (), **hooks)  # the key itself never leaves the proxy
        self.spec = spec
        self._key = load_private_key(private_key_pem, str(spec.private_key))
        self._installation = spec.installation_id

    async def mint(self, session: aiohttp.ClientSession) -> Token:
        now = time.time()
        jwt = app_jwt(self.spec.app_id, self._key, now)  # itself a credential for 9 minutes
        auth = {**API_HEADERS, "Authorization": f"Bearer {jwt}"}
        installation = self._installation or await self._look_up_installation(session, auth)
        url = f"{self.spec.api_url}/app/installations/{installation}/access_tokens"
        answer = await call(session, "POST", url, what="GitHub", headers=auth,
                            json_body=token_request(self.spec))
        if answer.status != 201:
            raise self._refused(answer, f"installation {installation}", jwt)
        token, expires = answer.body.get("token"), answer.body.get("expires_at")
        if not isinstance(token, str) or not token or not isinstance(expires, str):
            raise CredentialError("endpoint_answer", "GitHub's answer had no token or expires_at")
        return Token(token, timestamp(expires, "GitHub"), now)

    async def _look_up_installation(self, session: aiohttp.ClientSession,
                                    auth: dict[str, str]) -> str:
        jwt = auth["Authorization"].removeprefix("Bearer ")
        url = f"{self.spec.api_url}/repos/{self.spec.repository}/installation"
        answer = await call(session, "GET", url, what="GitHub", headers=auth)
        if answer.status != 200 or not isinstance(answer.body.get("id"), int):
            raise self._refused(answer, f"installation on {self.spec.repository}", jwt)
        self._installation = str(answer.body["id"])  # installations do not move: keep it
        return self._installation

    def _refused(self, answer, looking_for: str, jwt: str) -> CredentialError:
        app = f"GitHub App {self.spec.app_id}"
        # GitHub's own words go into the error; the JWT it was sent must not come back in them.
        said = detail(answer, Redactor((*self.redactor().forms, *secret_forms([jwt]))), "message")
        if answer.status == 401:
            return CredentialError("refused", f"GitHub refused the JWT of {app} (401{said}): "
                                   "check appID and that privateKeyFrom holds this App's "
                                   "current private key")
        if answer.status == 404:
            return CredentialError("not_found", f"GitHub found no {looking_for} for {app} "
                                   f"(404{said}): check installationID or repository, and "
                                   "that the App is installed there")
        if answer.status == 422:
            return CredentialError("refused", f"GitHub refused the requested repositories or "
                                   f"permissions for {app} (422{said}): the App must hold every "
                                   "permission listed and be installed on every repository")
        return CredentialError("refused", f"GitHub answered {answer.status} when {app} asked "
                               f"for a token{said}")

    def present(self, token: str, out: Outgoing) -> None:
        if self.spec.is_api_request(out.authority, out.path):
            out.headers["Authorization"] = f"token {token}"
        else:
            basic = base64.b64encode(f"x-access-token:{token}".encode()).decode()
            out.headers["Authorization"] = f"Basic {basic}"
