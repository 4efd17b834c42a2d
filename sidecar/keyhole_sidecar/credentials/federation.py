"""Workload identity federation (``spec.workloadIdentity``): no key at all. The proxy presents
a subject token (``subject``) to the provider's token endpoint and injects the short-lived
credential it answers — a bearer token, or for AWS session keys that sign each request.

Each exchange follows the provider's public documentation (docs/federation.md names the
pages): the Claude API's jwt-bearer grant (RFC 7523) with its federation rule; AWS STS
``AssumeRoleWithWebIdentity``; Google Cloud's STS token exchange (RFC 8693), then
``generateAccessToken`` when a service account is impersonated; Microsoft Entra's client
credentials grant with the token as client assertion; and the generic RFC 8693 token
exchange, RFC 7523 jwt-bearer grant and client assertion for any other API that federates.
"""

from __future__ import annotations

import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Awaitable, Callable
from urllib.parse import quote, urlencode

import aiohttp

from keyhole_common.spec.model import WorkloadIdentity
from keyhole_sidecar.credentials.aws import sign_outgoing
from keyhole_sidecar.credentials.endpoint import (
    FORM,
    Answer,
    bearer_token,
    call,
    call_raw,
    detail,
    timestamp,
    where,
)
from keyhole_sidecar.credentials.sigv4 import AwsKeys
from keyhole_sidecar.credentials.source import Outgoing, TokenSource
from keyhole_sidecar.credentials.subject import SubjectTokens, unavailable
from keyhole_sidecar.credentials.tokens import CredentialError, Token
from keyhole_sidecar.redact import Redactor, secret_forms

JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"  # noqa: S105 - a URN
JWT_TYPE = "urn:ietf:params:oauth:token-type:jwt"
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"  # noqa: S105 - a URN
CLIENT_ASSERTION = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
CLAUDE_BETA = "oauth-2025-04-20"  # on every API request made with a federated token
CLAUDE_EXCHANGE_BETA = "oidc-federation-2026-04-01"  # on the exchange itself
GCP_SCOPE = "https://www.googleapis.com/auth/cloud-platform"
AWS_STS_VERSION = "2011-06-15"
AWS_DEFAULT_DURATION = 3600  # AssumeRoleWithWebIdentity's, when DurationSeconds is not sent
GCP_DEFAULT_LIFETIME = 3600  # generateAccessToken's, when no lifetime is asked for
USER_AGENT = "keyhole"

Exchange = Callable[[aiohttp.ClientSession, WorkloadIdentity, str, Redactor, float, str],
                    Awaitable[Token]]
"""(session, spec, subject token, redactor, now, injection) → the minted credential."""


def _refusal(status: int, message: str) -> CredentialError:
    """A provider's no: ``refused`` for a 4xx (the rule, the token), else its answer."""
    return unavailable("refused" if 400 <= status < 500 else "endpoint_answer", message)


def _refused(spec: WorkloadIdentity, answer: Answer, redactor: Redactor, hint: str,
             *keys: str) -> CredentialError:
    said = detail(answer, redactor, *keys)
    return _refusal(answer.status, f"{spec.provider} at {where(spec.token_url)} refused the "
                                   f"exchange ({answer.status}{said}): {hint}")


OAUTH_ERROR = ("error", "error_description")


# -- the requests, as pure functions ------------------------------------------------------------

def claude_request(spec: WorkloadIdentity, subject: str) -> dict:
    body = {"grant_type": JWT_BEARER, "assertion": subject,
            "federation_rule_id": spec.get("federationRuleID"),
            "organization_id": spec.get("organizationID")}
    for field, name in (("serviceAccountID", "service_account_id"),
                        ("workspaceID", "workspace_id")):
        if spec.get(field):
            body[name] = spec.get(field)
    return body


def aws_request(spec: WorkloadIdentity, subject: str, session_name: str) -> str:
    form = {"Action": "AssumeRoleWithWebIdentity", "Version": AWS_STS_VERSION,
            "RoleArn": spec.get("roleARN"), "RoleSessionName": session_name,
            "WebIdentityToken": subject}
    if spec.get("durationSeconds"):
        form["DurationSeconds"] = spec.get("durationSeconds")
    return urlencode(form)


def gcp_request(spec: WorkloadIdentity, subject: str) -> str:
    scopes = spec.scopes or (GCP_SCOPE,)
    return urlencode({"grant_type": TOKEN_EXCHANGE,
                      "audience": f"//iam.googleapis.com/{spec.get('workloadIdentityProvider')}",
                      "scope": " ".join(scopes), "requested_token_type": ACCESS_TOKEN_TYPE,
                      "subject_token": subject, "subject_token_type": JWT_TYPE})


def oauth_request(spec: WorkloadIdentity, subject: str) -> str:
    """The form of the OAuth-shaped grants: Entra, tokenExchange, jwtBearer, clientAssertion."""
    if spec.provider == "tokenExchange":
        form = {"grant_type": TOKEN_EXCHANGE, "subject_token": subject,
                "subject_token_type": JWT_TYPE}
        for field, name in (("targetAudience", "audience"), ("resource", "resource"),
                            ("requestedTokenType", "requested_token_type")):
            if spec.get(field):
                form[name] = spec.get(field)
    elif spec.provider == "jwtBearer":
        form = {"grant_type": JWT_BEARER, "assertion": subject}
        if spec.get("clientID"):
            form["client_id"] = spec.get("clientID")
    else:  # entra, clientAssertion: the subject token authenticates the client
        form = {"grant_type": "client_credentials", "client_id": spec.get("clientID"),
                "client_assertion_type": CLIENT_ASSERTION, "client_assertion": subject}
    if spec.scopes:
        form["scope"] = " ".join(spec.scopes)
    return urlencode(form)


# -- the exchanges ----------------------------------------------------------------------------

async def claude(session, spec, subject, redactor, now, injection) -> Token:
    headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT,
               "anthropic-beta": f"{CLAUDE_BETA},{CLAUDE_EXCHANGE_BETA}"}
    answer = await call(session, "POST", spec.token_url, what="the Claude API's token endpoint",
                        headers=headers, json_body=claude_request(spec, subject))
    if answer.status != 200:
        message = answer.body.get("error") if isinstance(answer.body.get("error"), dict) else {}
        fallback = Answer(answer.status, {**answer.body, **message})
        raise _refused(spec, fallback, redactor,
                       "check organizationID, federationRuleID and that the rule matches the "
                       "issuer, subject and audience kubectl keyhole explain shows",
                       "error", "error_description", "message")
    return bearer_token(answer, where(spec.token_url), now, types=("bearer", ""))


async def aws(session, spec, subject, redactor, now, injection) -> Token:
    name = spec.get("sessionName") or f"keyhole-{injection}"[:64]
    status, raw = await call_raw(session, "POST", spec.token_url, what="AWS STS",
                                 headers={"Content-Type": FORM, "User-Agent": USER_AGENT},
                                 data=aws_request(spec, subject, name))
    found = sts_fields(raw)
    if status != 200:
        said = detail(Answer(status, found), redactor, "Code", "Message")
        raise _refusal(status, f"AWS STS at {where(spec.token_url)} refused "
                               f"AssumeRoleWithWebIdentity for {spec.get('roleARN')} ({status}"
                               f"{said}): check the role's trust policy (issuer, aud and sub "
                               "as kubectl keyhole explain shows them)")
    key_id, secret, token = (found.get(k) for k in ("AccessKeyId", "SecretAccessKey",
                                                     "SessionToken"))
    if not (key_id and secret and token):
        raise unavailable("endpoint_answer", "AWS STS answered 200 without Credentials")
    lifetime = float(spec.get("durationSeconds") or AWS_DEFAULT_DURATION)
    return Token(token, expiry(found.get("Expiration"), now, "AWS STS", lifetime), now,
                 AwsKeys(key_id, secret, token))


def sts_fields(raw: bytes) -> dict[str, str]:
    """The leaf elements of an STS answer (Credentials on success, Error otherwise) by local
    name; {} when it is not XML. The answer is at most 64 KiB, and one that declares a
    document type (where entities live) is not parsed at all."""
    if b"<!" in raw.replace(b"<![CDATA[", b""):
        return {}
    try:
        root = ElementTree.fromstring(raw)  # noqa: S314 - no DTD, so no entities to expand
    except ElementTree.ParseError:
        return {}
    return {element.tag.rsplit("}", 1)[-1]: (element.text or "").strip()
            for element in root.iter() if len(element) == 0}


def expiry(stamp: object, now: float, who: str, lifetime: float) -> float:
    """An absolute expiry as wall-clock seconds, never later than ``lifetime`` (what was
    asked for) from now: a provider whose clock runs ahead of ours would otherwise have a
    token served after it expired. One whose clock runs behind makes it end early."""
    return min(timestamp(stamp, who), now + lifetime)


async def gcp(session, spec, subject, redactor, now, injection) -> Token:
    answer = await call(session, "POST", spec.token_url, what="Google Cloud STS",
                        headers={"Content-Type": FORM, "User-Agent": USER_AGENT},
                        data=gcp_request(spec, subject))
    if answer.status != 200:
        raise _refused(spec, answer, redactor, "check the workload identity pool provider's "
                       "issuer, allowed audience and attribute condition", *OAUTH_ERROR)
    federated = bearer_token(answer, where(spec.token_url), now)
    account = spec.get("serviceAccount")
    if not account:
        return federated
    base = (spec.get("iamCredentialsURL") or "https://iamcredentials.googleapis.com").rstrip("/")
    url = f"{base}/v1/projects/-/serviceAccounts/{quote(account, safe='@.')}:generateAccessToken"
    answer = await call(session, "POST", url, what="Google Cloud IAM Credentials",
                        headers={"Authorization": f"Bearer {federated.value}",
                                 "User-Agent": USER_AGENT},
                        json_body={"scope": list(spec.scopes or (GCP_SCOPE,))})
    if answer.status != 200:
        error = answer.body.get("error") if isinstance(answer.body.get("error"), dict) else {}
        said = detail(Answer(answer.status, error), Redactor(
            (*redactor.forms, *secret_forms([federated.value]))), "status", "message")
        raise _refusal(answer.status, f"Google Cloud refused to impersonate {account} "
                                      f"({answer.status}{said}): grant the pool's principal "
                                      "roles/iam.workloadIdentityUser on it")
    token = answer.body.get("accessToken")
    if not isinstance(token, str) or not token:
        raise unavailable("endpoint_answer", "generateAccessToken answered no accessToken")
    return Token(token, expiry(answer.body.get("expireTime"), now, "generateAccessToken",
                               GCP_DEFAULT_LIFETIME), now)


async def oauth(session, spec, subject, redactor, now, injection) -> Token:
    answer = await call(session, "POST", spec.token_url, what=f"the {spec.provider} endpoint",
                        headers={"Content-Type": FORM, "Accept": "application/json",
                                 "User-Agent": USER_AGENT},
                        data=oauth_request(spec, subject))
    if answer.status != 200:
        hint = ("check tenantID, clientID and the app's federated credential (issuer, subject, "
                "audience as kubectl keyhole explain shows them)" if spec.provider == "entra"
                else "check the endpoint's trust in the issuer, subject and audience")
        raise _refused(spec, answer, redactor, hint, *OAUTH_ERROR)
    kinds = ("bearer", "n_a") if spec.provider == "tokenExchange" else ("bearer",)
    return bearer_token(answer, where(spec.token_url), now, types=kinds)


EXCHANGES: dict[str, Exchange] = {"claude": claude, "aws": aws, "gcp": gcp, "entra": oauth,
                                  "tokenExchange": oauth, "jwtBearer": oauth,
                                  "clientAssertion": oauth}


class FederatedSource(TokenSource):
    """One federated injection: its subject token in, a short-lived credential out."""

    kind = "workload_identity"

    def __init__(self, injection: str, spec: WorkloadIdentity, subjects: SubjectTokens,
                 **hooks):
        super().__init__(injection, (), **hooks)
        self.spec, self.subjects = spec, subjects
        self._subject: str | None = None  # the identity last presented: masked like a token
        self.header_names = spec.header_names
        self.hashes_payload = spec.signs and spec.get("payload") != "unsigned"

    async def mint(self, session: aiohttp.ClientSession) -> Token:
        now = time.time()
        subject = self._subject = await self.subjects.get(self.injection, self.spec.audience)
        # The subject token must never come back in an error message either.
        redactor = Redactor((*self.redactor().forms, *secret_forms([subject])))
        try:
            token = await EXCHANGES[self.spec.provider](session, self.spec, subject, redactor, now,
                                                        self.injection)
        except CredentialError as error:
            self.subjects.exchanged(self.injection, None, error.message)
            if error.status != 503:  # unreachable, unreadable: the credential is unavailable
                raise unavailable(error.reason, error.message) from None
            raise
        self.subjects.exchanged(self.injection, token.expires_at, None)
        return token

    async def authorize(self, out: Outgoing, session: aiohttp.ClientSession) -> None:
        self.session = session
        token = await self.cache.get()
        if self.spec.signs:
            sign_outgoing(out, token.material, self.spec.get("region"), self.spec.get("service"))
        else:
            self.present(token.value, out)

    def present(self, token: str, out: Outgoing) -> None:
        out.headers["Authorization"] = f"Bearer {token}"
        if self.spec.provider == "claude":
            out.headers.popall("x-api-key", None)
            betas = [b.strip() for value in out.headers.popall("anthropic-beta", [])
                     for b in value.split(",") if b.strip()]
            out.headers["anthropic-beta"] = ",".join(dict.fromkeys([*betas, CLAUDE_BETA]))

    def live_secrets(self) -> tuple[str, ...]:
        """The tokens (``TokenSource``'s), the subject presented, AWS's secret keys."""
        keys = tuple(t.material.secret_access_key for t in (self.cache.token, self.cache.previous)
                     if t is not None and isinstance(t.material, AwsKeys))
        return (*super().live_secrets(), *keys, *((self._subject,) if self._subject else ()))

