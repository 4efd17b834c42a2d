"""Stand-ins for the providers that federate workload identity, each verifying the subject
token for real: the issuer's OIDC discovery document and JWKS fetched over HTTPS, then the
signature, ``iss``, ``aud``, ``sub`` and ``exp`` checked with PyJWT, as the provider's trust
rule would. The issuer is a test one (:class:`Issuer`, keys it can rotate) or the test
cluster's own API server (tests/cluster).

- ``claude.test``: the Claude API's ``POST /v1/oauth/token`` (RFC 7523 jwt-bearer with
  ``federation_rule_id`` and ``organization_id``), and an API that takes only its tokens with
  ``anthropic-beta: oauth-2025-04-20``;
- ``sts.aws.test``: AWS STS; the token is verified here, then ``AssumeRoleWithWebIdentity``
  is answered by moto's STS (a real implementation, run in this process), and
  ``bedrock.aws.test`` checks SigV4 against the session keys moto issued;
- ``sts.gcp.test`` / ``iamcredentials.gcp.test`` / ``api.gcp.test``: Google Cloud's STS token
  exchange and ``generateAccessToken`` (impersonation);
- ``login.entra.test`` / ``graph.entra.test``: Entra's client credentials grant with the token
  as client assertion;
- ``exchange.test`` / ``api.exchange.test``: a generic RFC 8693 token exchange.

Every API echoes the credential it received, so tests can check redaction.
"""

from __future__ import annotations

import base64
import json
import secrets
import socket
import ssl
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import aiohttp
import jwt
from aiohttp import web
from aiohttp.abc import AbstractResolver
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.support.config import injection
from tests.support.identity import verify_sigv4
from tests.support.serving import ThreadedApp

HOSTS = ("issuer.test", "claude.test", "sts.aws.test", "bedrock.aws.test", "sts.gcp.test",
         "iamcredentials.gcp.test", "api.gcp.test", "login.entra.test", "graph.entra.test",
         "exchange.test", "api.exchange.test")
ORGANIZATION = "org-keyhole-test"
RULE = "fdrl_01keyholetest"
ROLE_ARN = "arn:aws:iam::123456789012:role/keyhole-agent"
GCP_PROVIDER = "projects/123456/locations/global/workloadIdentityPools/agents/providers/kube"
GCP_ACCOUNT = "agent@proj.iam.gserviceaccount.com"
TENANT = "7f3c-tenant"
ENTRA_CLIENT = "0c1d-client"
EXCHANGE_CLIENT = "keyhole-agents"  # the generic server's client, for clientAssertion
TOKEN_HOSTS = frozenset({"sts.aws.test", "sts.gcp.test", "iamcredentials.gcp.test",
                         "login.entra.test", "exchange.test"})  # claude.test: the API's too
AUDIENCES = {"claude": "https://api.anthropic.com", "aws": "sts.amazonaws.com",
             "gcp": f"https://iam.googleapis.com/{GCP_PROVIDER}",
             "entra": "api://AzureADTokenExchange", "tokenExchange": "https://exchange.test"}


class Issuer:
    """A test OIDC issuer: RS256 keys it can rotate, its discovery document and JWKS served by
    :class:`FederationServer` under ``/issuer``."""

    def __init__(self):
        self.keys: list[tuple[str, rsa.RSAPrivateKey]] = []
        self.url = ""  # set when served
        self.rotate()

    def rotate(self) -> None:
        """A new signing key; the old one leaves the JWKS (as a rotation completes)."""
        self.keys = [(secrets.token_hex(8), rsa.generate_private_key(65537, 2048))]

    def mint(self, subject: str, audience: str, lifetime: float = 600) -> str:
        return self.mint_for(subject, [audience], lifetime)

    def mint_for(self, subject: str, audiences: list[str], lifetime: float = 600) -> str:
        kid, key = self.keys[-1]
        now = int(time.time())
        return jwt.encode({"iss": self.url, "sub": subject, "aud": audiences, "iat": now,
                           "nbf": now, "exp": now + int(lifetime)}, key, algorithm="RS256",
                          headers={"kid": kid})

    def jwks(self) -> dict:
        found = []
        for kid, key in self.keys:
            numbers = key.public_key().public_numbers()
            found.append({"kty": "RSA", "alg": "RS256", "use": "sig", "kid": kid,
                          "n": _b64(numbers.n), "e": _b64(numbers.e)})
        return {"keys": found}


def _b64(number: int) -> str:
    raw = number.to_bytes((number.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


@dataclass
class Trust:
    """What every stand-in trusts: tokens of ``issuer`` whose ``sub`` is ``subject``, keys
    from the issuer's discovery document (``discovery``: fetched afresh when a token names a
    key not yet seen, as providers do on rotation)."""

    issuer: str
    subject: str | dict[str, str]  # one subject, or the subject each provider's rule names
    discovery: Callable[[], Awaitable[dict]]  # the issuer's discovery document
    fetch: Callable[[str], Awaitable[dict]]  # GET a URL of the issuer's (the JWKS)
    _keys: dict = field(default_factory=dict)

    async def verify(self, token: str, audience: str, provider: str = "") -> dict | str:
        """The token's claims, or what a provider would say is wrong with it."""
        try:
            kid = jwt.get_unverified_header(token).get("kid")
        except jwt.PyJWTError as exc:
            return f"not a JWT ({exc})"
        if kid not in self._keys:
            document = await self.discovery()
            if document.get("issuer") != self.issuer:
                return f"discovery names issuer {document.get('issuer')!r}"
            jwks = await self.fetch(document["jwks_uri"])
            self._keys = {k.get("kid"): k for k in jwks.get("keys", [])}
        if kid not in self._keys:
            return f"no key {kid!r} in the issuer's JWKS"
        try:
            claims = jwt.decode(token, jwt.PyJWK(self._keys[kid]).key,
                                algorithms=["RS256", "ES256"], audience=audience,
                                issuer=self.issuer,
                                options={"require": ["iss", "sub", "aud", "exp", "iat"]})
        except jwt.PyJWTError as exc:
            return f"token rejected: {exc}"
        expected = self.subject.get(provider) if isinstance(self.subject, dict) else self.subject
        if claims["sub"] != expected:
            return f"no rule matches subject {claims['sub']!r}"
        return claims


@dataclass
class Issued:
    value: str
    expires_at: float
    kind: str


@dataclass
class FederationState:
    trust: Trust | None = None
    lifetime: int = 3600
    refuse: str | None = None  # every exchange answered with this error, while set
    down: bool = False  # connections to the token endpoints are cut, while set
    exchanges: list[dict] = field(default_factory=list)  # what each token endpoint received
    issued: list[Issued] = field(default_factory=list)
    port: int = 0
    moto_url: str = ""

    def issue(self, kind: str, prefix: str) -> Issued:
        token = Issued(f"{prefix}{secrets.token_urlsafe(24)}", time.time() + self.lifetime,
                       kind)
        self.issued.append(token)
        return token

    def valid(self, value: str, kind: str) -> bool:
        return any(t.value == value and t.kind == kind and t.expires_at > time.time()
                   for t in self.issued)

    def count(self, provider: str) -> int:
        return sum(1 for e in self.exchanges if e["provider"] == provider)


def _oauth_error(status: int, error: str, description: str) -> web.Response:
    return web.json_response({"error": error, "error_description": description}, status=status)


def _bearer(request: web.Request) -> str:
    auth = request.headers.get("Authorization", "")
    return auth[7:] if auth.startswith("Bearer ") else ""


def _echo(request: web.Request, credential: str) -> web.Response:
    return web.json_response({"path": request.raw_path, "you_sent": credential,
                              "beta": request.headers.get("anthropic-beta"),
                              "x_api_key": request.headers.get("x-api-key")})


def build_app(state: FederationState, issuer: Issuer | None) -> web.Application:
    async def dispatch(request: web.Request) -> web.StreamResponse:
        host = request.host.split(":")[0]
        handler = HANDLERS.get(host)
        if handler is None:
            return web.Response(status=421, text=f"no such host here: {host}\n")
        if state.down and host in TOKEN_HOSTS:
            request.transport.abort()  # unreachable, as far as the client can tell
            return web.Response(status=500)
        return await handler(request)

    async def verified(request: web.Request, provider: str, token: str,
                       audience: str) -> dict | web.Response:
        state.exchanges.append({"provider": provider, "subject_token": token,
                                "headers": dict(request.headers)})
        if state.refuse:
            return _oauth_error(401, "invalid_grant", state.refuse)
        claims = await state.trust.verify(token, audience, provider)
        if isinstance(claims, str):
            # as careless endpoints do: the error echoes the assertion it refused
            return _oauth_error(401, "invalid_grant", f"{claims} (assertion {token})")
        return claims

    async def issuer_documents(request: web.Request) -> web.Response:
        if request.path == "/issuer/.well-known/openid-configuration":
            return web.json_response({"issuer": issuer.url, "jwks_uri": f"{issuer.url}/jwks",
                                      "id_token_signing_alg_values_supported": ["RS256"]})
        if request.path == "/issuer/jwks":
            return web.json_response(issuer.jwks())
        return web.Response(status=404)

    # -- Claude ----------------------------------------------------------------------------
    async def claude(request: web.Request) -> web.StreamResponse:
        if request.path == "/v1/oauth/token":
            body = await request.json()
            if "oidc-federation-2026-04-01" not in request.headers.get("anthropic-beta", ""):
                return _oauth_error(400, "invalid_request", "missing the federation beta")
            if body.get("grant_type") != "urn:ietf:params:oauth:grant-type:jwt-bearer" or \
                    body.get("organization_id") != ORGANIZATION or \
                    body.get("federation_rule_id") != RULE:
                return _oauth_error(400, "invalid_request", "unknown rule or organization")
            claims = await verified(request, "claude", body.get("assertion", ""),
                                    AUDIENCES["claude"])
            if isinstance(claims, web.Response):
                return claims
            token = state.issue("claude", "sk-ant-oat01-fed-")
            return web.json_response({"access_token": token.value,
                                      "expires_in": state.lifetime})
        token = _bearer(request)
        if not state.valid(token, "claude") or request.headers.get("x-api-key") or \
                "oauth-2025-04-20" not in request.headers.get("anthropic-beta", ""):
            return web.json_response({"type": "error", "error": {
                "type": "authentication_error", "message": "invalid bearer token"}},
                status=401)
        return _echo(request, request.headers["Authorization"])

    # -- AWS: the token verified here, AssumeRoleWithWebIdentity answered by moto ----------
    async def aws_sts(request: web.Request) -> web.StreamResponse:
        form = dict(urllib.parse.parse_qsl(await request.text()))
        claims = await verified(request, "aws", form.get("WebIdentityToken", ""),
                                AUDIENCES["aws"])
        if isinstance(claims, web.Response):
            return web.Response(status=400, content_type="text/xml", text=(
                "<ErrorResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\"><Error>"
                "<Type>Sender</Type><Code>InvalidIdentityToken</Code><Message>"
                "Couldn't verify the token</Message></Error></ErrorResponse>"))
        if form.get("RoleArn") != ROLE_ARN:
            return web.Response(status=403, content_type="text/xml", text=(
                "<ErrorResponse><Error><Code>AccessDenied</Code><Message>Not authorized to "
                "perform sts:AssumeRoleWithWebIdentity</Message></Error></ErrorResponse>"))
        async with aiohttp.ClientSession() as session, session.post(
                state.moto_url, data=form,
                headers={"Host": "sts.amazonaws.com"}) as answer:
            return web.Response(status=answer.status, body=await answer.read(),
                                content_type="text/xml")

    async def bedrock(request: web.Request) -> web.StreamResponse:
        from moto.sts.models import sts_backends

        def moto_keys(key_id: str) -> tuple[str, str] | None:
            for backend in sts_backends["123456789012"].values():
                for role in backend.assumed_roles:
                    if role.access_key_id == key_id and \
                            role.expiration > datetime.now(UTC).replace(tzinfo=None):
                        return role.secret_access_key, role.session_token
            return None

        body = await request.read()
        problem = verify_sigv4(request, body, moto_keys)
        if problem:
            return web.json_response({"message": problem}, status=403)
        return _echo(request, request.headers.get("X-Amz-Security-Token", ""))

    def exchanged(token: Issued) -> web.Response:
        """An RFC 8693 answer (section 2.2.1)."""
        return web.json_response({"access_token": token.value, "token_type": "Bearer",
                                  "issued_token_type": "urn:ietf:params:oauth:token-type:"
                                                       "access_token",
                                  "expires_in": state.lifetime})

    # -- Google Cloud ----------------------------------------------------------------------
    async def gcp_sts(request: web.Request) -> web.StreamResponse:
        form = dict(urllib.parse.parse_qsl(await request.text()))
        if form.get("grant_type") != "urn:ietf:params:oauth:grant-type:token-exchange" or \
                form.get("audience") != f"//iam.googleapis.com/{GCP_PROVIDER}" or \
                form.get("subject_token_type") != "urn:ietf:params:oauth:token-type:jwt":
            return _oauth_error(400, "invalid_request", "not a token exchange for this pool")
        claims = await verified(request, "gcp", form.get("subject_token", ""),
                                AUDIENCES["gcp"])
        if isinstance(claims, web.Response):
            return claims
        return exchanged(state.issue("gcp-federated", "ya29.fed-"))

    async def gcp_iam(request: web.Request) -> web.StreamResponse:
        expected = f"/v1/projects/-/serviceAccounts/{GCP_ACCOUNT}:generateAccessToken"
        if request.path != expected or not state.valid(_bearer(request), "gcp-federated"):
            return web.json_response({"error": {"code": 403, "status": "PERMISSION_DENIED",
                                                "message": "Permission 'iam.serviceAccounts."
                                                           "getAccessToken' denied"}},
                                     status=403)
        token = state.issue("gcp", "ya29.sa-")
        expires = datetime.fromtimestamp(token.expires_at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return web.json_response({"accessToken": token.value, "expireTime": expires})

    async def gcp_api(request: web.Request) -> web.StreamResponse:
        if not (state.valid(_bearer(request), "gcp") or
                state.valid(_bearer(request), "gcp-federated")):
            return web.json_response({"error": {"code": 401}}, status=401)
        return _echo(request, request.headers["Authorization"])

    # -- Entra and a generic RFC 8693 endpoint ---------------------------------------------
    async def entra(request: web.Request) -> web.StreamResponse:
        form = dict(urllib.parse.parse_qsl(await request.text()))
        if request.path != f"/{TENANT}/oauth2/v2.0/token" or \
                form.get("grant_type") != "client_credentials" or \
                form.get("client_id") != ENTRA_CLIENT or form.get("client_assertion_type") != \
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer":
            return _oauth_error(400, "invalid_request", "AADSTS900144: bad request")
        claims = await verified(request, "entra", form.get("client_assertion", ""),
                                AUDIENCES["entra"])
        if isinstance(claims, web.Response):
            return claims
        token = state.issue("entra", "eyJ0eXAi.entra-")
        return web.json_response({"token_type": "Bearer", "expires_in": state.lifetime,
                                  "ext_expires_in": state.lifetime,
                                  "access_token": token.value})

    async def exchange(request: web.Request) -> web.StreamResponse:
        """An authorisation server of the generic kinds: RFC 8693 token exchange, the RFC 7523
        jwt-bearer grant (§2.1), client credentials with a client assertion (§2.2)."""
        form = dict(urllib.parse.parse_qsl(await request.text()))
        grant = form.get("grant_type")
        if grant == "urn:ietf:params:oauth:grant-type:token-exchange" and \
                form.get("subject_token_type") == "urn:ietf:params:oauth:token-type:jwt":
            provider, token = "tokenExchange", form.get("subject_token", "")
        elif grant == "urn:ietf:params:oauth:grant-type:jwt-bearer":
            provider, token = "jwtBearer", form.get("assertion", "")
        elif grant == "client_credentials" and form.get("client_id") == EXCHANGE_CLIENT and \
                form.get("client_assertion_type") == \
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer":
            provider, token = "clientAssertion", form.get("client_assertion", "")
        else:
            return _oauth_error(400, "unsupported_grant_type", f"{grant!r} with these fields")
        claims = await verified(request, provider, token, AUDIENCES["tokenExchange"])
        if isinstance(claims, web.Response):
            return claims
        return exchanged(state.issue("exchange", "xch-"))

    def api(kind: str):
        async def handler(request: web.Request) -> web.StreamResponse:
            if not state.valid(_bearer(request), kind):
                return web.json_response({"error": "invalid_token"}, status=401)
            return _echo(request, request.headers["Authorization"])
        return handler

    HANDLERS = {"issuer.test": issuer_documents, "claude.test": claude,
                "sts.aws.test": aws_sts, "bedrock.aws.test": bedrock,
                "sts.gcp.test": gcp_sts, "iamcredentials.gcp.test": gcp_iam,
                "api.gcp.test": gcp_api, "login.entra.test": entra,
                "graph.entra.test": api("entra"), "exchange.test": exchange,
                "api.exchange.test": api("exchange")}
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", dispatch)
    return app


def injection_for(provider: str, at: Callable[[str], str]) -> tuple[dict, str]:
    """(the injection, the URL an agent calls) for one provider's stand-in; ``at`` gives a
    host's authority as the agent and the sidecar reach it (``host:port``, or ``host``)."""
    if provider == "claude":
        spec = {"claude": {"organizationID": ORGANIZATION,
                           "federationRuleID": RULE,
                           "tokenURL": f"https://{at('claude.test')}/v1/oauth/token"}}
        return injection("claude", hosts=[at("claude.test")], workloadIdentity=spec), \
            f"https://{at('claude.test')}/v1/messages"
    if provider == "aws":
        spec = {"aws": {"roleARN": ROLE_ARN, "region": "eu-west-1",
                        "service": "bedrock", "stsURL": f"https://{at('sts.aws.test')}/"}}
        return injection("aws", hosts=[at("bedrock.aws.test")], workloadIdentity=spec), \
            f"https://{at('bedrock.aws.test')}/model/claude/invoke"
    if provider == "gcp":
        spec = {"gcp": {"workloadIdentityProvider": GCP_PROVIDER,
                        "serviceAccount": GCP_ACCOUNT,
                        "stsURL": f"https://{at('sts.gcp.test')}/v1/token",
                        "iamCredentialsURL": f"https://{at('iamcredentials.gcp.test')}"}}
        return injection("gcp", hosts=[at("api.gcp.test")], workloadIdentity=spec), \
            f"https://{at('api.gcp.test')}/v1/projects/p/locations/us/models"
    if provider == "entra":
        spec = {"entra": {"tenantID": TENANT, "clientID": ENTRA_CLIENT,
                          "scopes": ["https://graph.microsoft.com/.default"],
                          "authorityURL": f"https://{at('login.entra.test')}"}}
        return injection("entra", hosts=[at("graph.entra.test")], workloadIdentity=spec), \
            f"https://{at('graph.entra.test')}/v1.0/users"
    shape = {"tokenExchange": {"targetAudience": "https://api.exchange.test"},
             "jwtBearer": {"scopes": ["things.read"]},
             "clientAssertion": {"clientID": EXCHANGE_CLIENT}}[provider]
    spec = {"audience": AUDIENCES["tokenExchange"],
            provider: {"tokenURL": f"https://{at('exchange.test')}/token", **shape}}
    name = {"tokenExchange": "exchange"}.get(provider, provider.lower())
    return injection(name, hosts=[at("api.exchange.test")], workloadIdentity=spec), \
        f"https://{at('api.exchange.test')}/things"


class Loopback(AbstractResolver):
    """Every name resolves to where the stand-ins listen (127.0.0.1 unless told): their
    names, verified by TLS as they are."""

    def __init__(self, address: str = "127.0.0.1"):
        self.address = address

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list:
        return [{"hostname": host, "host": self.address, "port": port,
                 "family": socket.AF_INET, "proto": 0, "flags": 0}]

    async def close(self) -> None:
        return None


def https_fetcher(context: ssl.SSLContext, headers: dict[str, str] | None = None,
                  resolver: AbstractResolver | None = None) -> Callable[[str], Awaitable[dict]]:
    """GET a JSON document over verified TLS."""
    async def fetch(url: str) -> dict:
        connector = aiohttp.TCPConnector(ssl=context, resolver=resolver or Loopback())
        async with aiohttp.ClientSession(connector=connector) as session, session.get(
                url, headers=headers or {}) as answer:
            answer.raise_for_status()
            return json.loads(await answer.read())
    return fetch


class FederationServer:
    """The stand-ins over TLS in a thread on 127.0.0.1, with moto's STS beside them."""

    def __init__(self, ca, issuer: Issuer | None = None, sock: socket.socket | None = None):
        from moto.server import ThreadedMotoServer

        self.ca = ca
        self.issuer = issuer
        self.state = FederationState()
        self._moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server = ThreadedApp(lambda: build_app(self.state, self.issuer),
                                   ca.issue_cert(*HOSTS), sock=sock)
        self._default_port = sock is not None and sock.getsockname()[1] == 443
        self.address = "127.0.0.1" if sock is None else sock.getsockname()[0]

    def start(self) -> FederationState:
        self._moto.start()
        host, port = self._moto.get_host_and_port()
        self.state.moto_url = f"http://{host}:{port}/"
        self.state.port = self._server.start()
        if self.issuer is not None:
            where = "issuer.test" if self._default_port else f"issuer.test:{self.state.port}"
            self.issuer.url = f"https://{where}/issuer"
        return self.state

    def trust_issuer(self, subject: str) -> Trust:
        """Trust the test issuer (its documents fetched from this server, TLS verified)."""
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        fetch = https_fetcher(context, resolver=Loopback(self.address))
        return Trust(self.issuer.url, subject,
                     lambda: fetch(f"{self.issuer.url}/.well-known/openid-configuration"), fetch)

    def stop(self) -> None:
        self._server.stop()
        self._moto.stop()
