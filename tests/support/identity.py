"""Local stand-ins for the services that issue and check short-lived credentials, each
checking what it receives as the real one would:

- GitHub (``github-api.test``): verifies the App's JWT with the App's public key (PyJWT) and
  its claims, issues installation tokens, narrows them as asked; ``github.test`` serves a real
  git repository over smart HTTP (``git http-backend``) only to ``x-access-token:<token>``.
- an OAuth 2.0 authorisation server (``auth.test``): client credentials grant, checking the
  client secret in either auth method; ``api.oauth.test`` accepts only its access tokens.
- an AWS-style service (``aws.test``): verifies Signature Version 4 with requests-aws4auth
  (an implementation independent of keyhole's) for signed payloads.

Every API endpoint echoes the credential it received, so tests can check redaction.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import parse_qsl, unquote_plus

import jwt
import requests
import trustme
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from requests_aws4auth import AWS4Auth

from tests.support.serving import ThreadedApp

HOSTS = ("github-api.test", "github.test", "auth.test", "api.oauth.test", "aws.test")
APP_ID = "424242"
INSTALLATION_ID = 77
INSTALLED_REPOSITORY = "acme/widgets"
CLIENT_ID = "keyhole-agent client"  # a space: form-encoding in client_secret_basic matters
CLIENT_SECRET = "s3cr3t:with+reserved/chars=="
AWS_KEY_ID = "AKIDKEYHOLETEST0001"
AWS_SECRET = "wJalrXUtnFEMI/K7MDENG+keyholeTESTKEY"
AWS_SESSION_TOKEN = "FwoGZXIvYXdzEKEYHOLE//session+token=="


def rsa_key_pem() -> tuple[rsa.RSAPrivateKey, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption()).decode()
    return key, pem


@dataclass
class Issued:
    value: str
    expires_at: float
    request: dict = field(default_factory=dict)


@dataclass
class IdentityState:
    app_key: rsa.RSAPrivateKey
    app_key_pem: str
    git_root: str
    token_lifetime: float = 3600.0
    issued: list[Issued] = field(default_factory=list)
    token_requests: list[dict] = field(default_factory=list)  # what each mint sent
    aws_seen: list[dict] = field(default_factory=list)
    port: int = 0

    def valid(self, value: str) -> bool:
        return any(t.value == value and t.expires_at > time.time() for t in self.issued)

    def issue(self, prefix: str, request: dict) -> Issued:
        token = Issued(f"{prefix}{secrets.token_hex(16)}", time.time() + self.token_lifetime,
                       request)
        self.issued.append(token)
        return token


def _echo(request: web.Request, credential: str) -> web.Response:
    return web.json_response({"path": request.raw_path, "you_sent": credential})


def build_app(state: IdentityState) -> web.Application:
    async def dispatch(request: web.Request) -> web.StreamResponse:
        host = request.host.split(":")[0]
        handler = {"github-api.test": github_api, "github.test": github_git,
                   "auth.test": oauth_token, "api.oauth.test": oauth_api,
                   "aws.test": aws}.get(host)
        if handler is None:
            return web.Response(status=421, text=f"no such host here: {host}\n")
        return await handler(request)

    # -- GitHub ---------------------------------------------------------------------------
    def app_claims(request: web.Request) -> dict | web.Response:
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer "):
            return web.json_response({"message": "Requires authentication"}, status=401)
        try:
            claims = jwt.decode(auth[7:], state.app_key.public_key(), algorithms=["RS256"],
                                options={"require": ["iat", "exp", "iss"]}, leeway=5)
        except jwt.PyJWTError as exc:  # echoing what it got, as careless servers do
            return web.json_response({"message": f"A JSON web token could not be decoded ({exc}):"
                                                 f" {auth[7:]}"}, status=401)
        if str(claims["iss"]) != APP_ID or claims["exp"] - claims["iat"] > 660:
            return web.json_response({"message": "'Issuer' or 'Expiration time' claim is wrong"},
                                     status=401)
        return claims

    async def github_api(request: web.Request) -> web.StreamResponse:
        path = request.path
        if path.startswith("/app/installations/") and path.endswith("/access_tokens"):
            claims = app_claims(request)
            if isinstance(claims, web.Response):
                return claims
            if request.method != "POST" or path.split("/")[3] != str(INSTALLATION_ID):
                return web.json_response({"message": "Not Found"}, status=404)
            body = await request.json() if request.can_read_body else {}
            state.token_requests.append(body)
            if body.get("repositories") and set(body["repositories"]) - {"widgets", "gadgets"}:
                return web.json_response({"message": "There is at least one repository that does"
                                          " not exist or is not accessible"}, status=422)
            token = state.issue("ghs_", body)
            expires = datetime.fromtimestamp(token.expires_at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            return web.json_response({"token": token.value, "expires_at": expires,
                                      "permissions": body.get("permissions", {"contents": "read"})},
                                     status=201)
        if path.startswith("/repos/") and path.endswith("/installation"):
            claims = app_claims(request)
            if isinstance(claims, web.Response):
                return claims
            if path != f"/repos/{INSTALLED_REPOSITORY}/installation":
                return web.json_response({"message": "Not Found"}, status=404)
            return web.json_response({"id": INSTALLATION_ID})
        auth = request.headers.get("Authorization", "")
        if not (auth.startswith("token ") and state.valid(auth[6:])):
            return web.json_response({"message": "Bad credentials"}, status=401)
        return _echo(request, auth)

    async def github_git(request: web.Request) -> web.StreamResponse:
        auth = request.headers.get("Authorization", "")
        user, _, token = (base64.b64decode(auth[6:]).decode().partition(":")
                          if auth.startswith("Basic ") else ("", "", ""))
        if user != "x-access-token" or not state.valid(token):
            return web.Response(status=401, headers={"WWW-Authenticate": 'Basic realm="GitHub"'})
        return await git_http_backend(request, state.git_root)

    # -- OAuth 2.0 ------------------------------------------------------------------------
    async def oauth_token(request: web.Request) -> web.StreamResponse:
        form = dict(parse_qsl(await request.text(), keep_blank_values=True))
        state.token_requests.append({**form, "client_secret": "<checked>" if "client_secret"
                                     in form else None,
                                     "basic": "Authorization" in request.headers})
        auth = request.headers.get("Authorization", "")
        if auth and "client_secret" in form:
            return web.json_response({"error": "invalid_request", "error_description":
                                      "more than one client authentication method"}, status=400)
        if auth.startswith("Basic "):
            raw_id, _, raw_secret = base64.b64decode(auth[6:]).decode().partition(":")
            client_id, secret = unquote_plus(raw_id), unquote_plus(raw_secret)
        else:
            client_id, secret = form.get("client_id", ""), form.get("client_secret", "")
        if form.get("grant_type") != "client_credentials":
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
        if client_id != CLIENT_ID or secret != CLIENT_SECRET:  # echoing what it got, carelessly
            return web.json_response({"error": "invalid_client", "error_description":
                                      f"client authentication failed for {auth or form}"},
                                     status=401)
        token = state.issue("at-", form)
        return web.json_response({"access_token": token.value, "token_type": "Bearer",
                                  "expires_in": int(state.token_lifetime)})

    async def oauth_api(request: web.Request) -> web.StreamResponse:
        auth = request.headers.get("Authorization", "")
        if not (auth.startswith("Bearer ") and state.valid(auth[7:])):
            return web.json_response({"error": "invalid_token"}, status=401)
        return _echo(request, auth)

    # -- AWS ------------------------------------------------------------------------------
    async def aws(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        seen = {"path": request.raw_path, "headers": dict(request.headers),
                "body_sha256": hashlib.sha256(body).hexdigest(), "size": len(body)}
        state.aws_seen.append(seen)
        problem = verify_sigv4(request, body)
        if problem:
            return web.json_response({"message": problem}, status=403)
        return web.json_response({"path": request.raw_path, "size": len(body),
                                  "you_sent": request.headers.get("X-Amz-Security-Token", "")})

    app = web.Application(client_max_size=2**31)
    app.router.add_route("*", "/{tail:.*}", dispatch)
    return app


def static_keys(key_id: str) -> tuple[str, str] | None:
    """The one key pair the AWS stand-in knows: (secret, session token)."""
    return (AWS_SECRET, AWS_SESSION_TOKEN) if key_id == AWS_KEY_ID else None


def verify_sigv4(request: web.Request, body: bytes,
                 keys: Callable[[str], tuple[str, str] | None] = static_keys) -> str | None:
    """What is wrong with the request's signature, or None. Signed payloads are checked with
    requests-aws4auth; UNSIGNED-PAYLOAD (which it cannot express) with keyhole's own signer,
    whose correctness the AWS test vectors establish. ``keys``: the secret and session token
    of an access key ID, as the service knows them."""
    auth = request.headers.get("Authorization", "")
    try:
        credential = auth.split("Credential=")[1].split(",")[0]
        signed = auth.split("SignedHeaders=")[1].split(",")[0].split(";")
    except IndexError:
        return f"malformed Authorization: {auth[:40]!r}"
    key_id, date, region, service, _ = credential.split("/")
    known = keys(key_id)
    if known is None:
        return f"unknown access key {key_id}"
    secret, session_token = known
    amz_date = request.headers.get("X-Amz-Date", "")
    if abs(datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC).timestamp()
           - time.time()) > 300:
        return "x-amz-date is more than five minutes off"
    if request.headers.get("X-Amz-Security-Token") != session_token or \
            "x-amz-security-token" not in signed:
        return "the session token is missing or unsigned"
    content_hash = request.headers.get("X-Amz-Content-Sha256", "")
    headers = {name: value for name, value in request.headers.items() if name.lower() in signed}
    url = f"https://{request.host}{request.raw_path}"
    if content_hash == "UNSIGNED-PAYLOAD":
        if service != "s3":
            return "UNSIGNED-PAYLOAD is for S3 only"
        from keyhole_sidecar.credentials.sigv4 import AwsKeys, Scope, Unsigned, sign
        path, _, query = request.raw_path.partition("?")
        expected = sign(Unsigned(request.method, path, query, headers.items(), signed,
                                 content_hash),
                        AwsKeys(key_id, secret), Scope(region, service, amz_date)).authorization
    else:
        if content_hash != hashlib.sha256(body).hexdigest():
            return "x-amz-content-sha256 does not match the body"
        prepared = requests.Request(request.method, url, headers=headers, data=body).prepare()
        prepared.headers = requests.structures.CaseInsensitiveDict(
            {k: v for k, v in prepared.headers.items() if k.lower() in signed})
        signer = AWS4Auth(key_id, secret, region, service, date, session_token=session_token)
        expected = signer(prepared).headers["Authorization"]
    if expected != auth:
        return "SignatureDoesNotMatch"
    return None


async def git_http_backend(request: web.Request, root: str) -> web.StreamResponse:
    """Smart-HTTP git, by running ``git http-backend`` as a CGI program."""
    env = {**os.environ, "GIT_PROJECT_ROOT": root, "GIT_HTTP_EXPORT_ALL": "1",
           "PATH_INFO": request.path, "QUERY_STRING": request.query_string,
           "REQUEST_METHOD": request.method, "REMOTE_USER": "x-access-token",
           "REMOTE_ADDR": "127.0.0.1", "CONTENT_TYPE": request.headers.get("Content-Type", ""),
           "GIT_HTTP_MAX_REQUEST_BUFFER": "100M"}
    body = await request.read()
    if request.headers.get("Content-Encoding") == "gzip":
        import gzip

        body = gzip.decompress(body)
    env["CONTENT_LENGTH"] = str(len(body))
    process = await asyncio.create_subprocess_exec(
        "git", "http-backend", env=env, stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, _ = await process.communicate(body)
    head, _, payload = out.partition(b"\r\n\r\n")
    status, headers = 200, {}
    for line in head.decode().split("\r\n"):
        name, _, value = line.partition(":")
        if name.lower() == "status":
            status = int(value.strip().split()[0])
        elif name:
            headers[name] = value.strip()
    return web.Response(status=status, body=payload, headers=headers)


class IdentityServer:
    """Runs :func:`build_app` over TLS in a thread, on 127.0.0.1 and a free port."""

    def __init__(self, ca: trustme.CA, git_root: str):
        key, pem = rsa_key_pem()
        self.state = IdentityState(app_key=key, app_key_pem=pem, git_root=git_root)
        self._server = ThreadedApp(lambda: build_app(self.state), ca.issue_cert(*HOSTS))

    def start(self) -> IdentityState:
        self.state.port = self._server.start()
        return self.state

    def stop(self) -> None:
        self._server.stop()
