"""Credential sources: their spec, the token cache's timing and single flight, the requests
they make. The cache is driven by an async mint function and a clock the test sets: it is the
unit under test, and those are its inputs (the real endpoints are in the integration tests)."""

import asyncio
import base64
import json
from urllib.parse import parse_qsl

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from keyhole_common.spec import parse_injection, parse_injections
from keyhole_common.spec.model import AwsSigV4, GitHubApp, OAuth2ClientCredentials, SecretKeyRef
from keyhole_sidecar.credentials.github_app import app_jwt, load_private_key
from keyhole_sidecar.credentials.oauth2 import token_request
from keyhole_sidecar.credentials.tokens import FAILURE_HOLD, CredentialError, Token, TokenCache
from tests.support.config import injection, ref


def problems(doc) -> list[str]:
    _, found = parse_injection(doc, "doc")
    return [f"{p.field}: {p.message}" for p in found]


GITHUB = {"appID": 12345, "installationID": 678, "privateKeyFrom": ref("gh", "key.pem")}
OAUTH = {"tokenURL": "https://auth.example.com/token", "clientIDFrom": ref("o", "id"),
         "clientSecretFrom": ref("o", "secret")}
AWS = {"region": "us-east-1", "service": "s3", "accessKeyIDFrom": ref("aws", "id"),
       "secretAccessKeyFrom": ref("aws", "secret")}


def test_each_source_parses_and_names_the_secrets_it_reads():
    docs = [injection("gh", hosts=["api.github.com", "github.com"],
                      githubApp={**GITHUB, "permissions": {"contents": "read"}}),
            injection("oa", hosts=["api.example.com"], oauth2={**OAUTH, "scopes": ["a", "b"]}),
            injection("aws", hosts=["s3.amazonaws.com"], awsSigV4={**AWS, "payload": "unsigned"})]
    gh, oa, aws = parse_injections([("t", d) for d in docs])
    assert gh.credential == GitHubApp(app_id="12345", private_key=SecretKeyRef("gh", "key.pem"),
                                      installation_id="678", permissions=(("contents", "read"),))
    assert gh.credential.api_host == "api.github.com"
    assert isinstance(oa.credential, OAuth2ClientCredentials) and oa.credential.scopes == ("a", "b")
    assert isinstance(aws.credential, AwsSigV4) and aws.credential.payload == "unsigned"
    assert oa.secret_refs() == (SecretKeyRef("o", "id"), SecretKeyRef("o", "secret"))
    assert "x-amz-date" in aws.injected_header_names()  # a client's own is dropped


@pytest.mark.parametrize(("spec", "expected"), [
    ({"githubApp": {**GITHUB, "repository": "a/b"}}, "give exactly one of installationID or "
                                                     "repository"),
    ({"githubApp": {"appID": 1, "installationID": 2}}, "spec.githubApp.privateKeyFrom: is "
                                                       "required"),
    ({"githubApp": {**GITHUB, "apiURL": "http://github.example.com/api/v3"}},
     "must be an https:// URL"),
    ({"githubApp": {**GITHUB, "permissions": {"contents": "everything"}}},
     "spec.githubApp.permissions.contents: must be one of read, write, admin"),
    ({"oauth2": {**OAUTH, "authMethod": "private_key_jwt"}}, "must be client_secret_basic"),
    ({"oauth2": {**OAUTH, "tokenURL": "https://user:pw@auth.example.com/t"}}, "must have no user"),
    ({"oauth2": {**OAUTH, "tokenURL": "https://169.254.169.254/token"}}, "names an IP address"),
    ({"githubApp": {**GITHUB, "apiURL": "https://[::1]:8443/api/v3"}}, "names an IP address"),
    ({"oauth2": {**OAUTH, "scopes": ["a b"]}}, "a scope has no spaces"),
    ({"oauth2": {**OAUTH, "tokenURL": "https://a.test/token"}},
     "the token endpoint's host is one of spec.hosts"),
    ({"awsSigV4": {**AWS, "payload": "streaming"}}, "spec.awsSigV4.payload: must be signed"),
    ({"awsSigV4": {**AWS, "region": "US East"}}, "spec.awsSigV4.region: 'US East' is not valid"),
    ({"awsSigV4": AWS, "oauth2": OAUTH}, "oauth2 and awsSigV4 are both credential sources"),
    ({"oauth2": OAUTH, "basicAuth": {"usernameFrom": ref("s", "u")}},
     "oauth2 and basicAuth both set Authorization"),
    ({"githubApp": GITHUB, "headers": [{"name": "authorization", "valueFrom": ref("s", "k")}]},
     "githubApp sets authorization, which spec.headers also sets"),
    ({"awsSigV4": AWS, "headers": [{"name": "X-Amz-Date", "valueFrom": ref("s", "k")}]},
     "awsSigV4 sets X-Amz-Date"),
])
def test_credential_mistakes_name_the_field_and_the_fix(spec, expected):
    found = problems(injection("x", hosts=["a.test"], **spec))
    assert any(expected in p for p in found), found


def test_two_injections_cannot_both_authorise_one_host():
    docs = [injection("a", hosts=["api.test"], oauth2=OAUTH),
            injection("b", hosts=["api.test"], headers=[{"name": "Authorization",
                                                         "valueFrom": ref("s", "k")}])]
    with pytest.raises(ValueError, match="both set authorization"):
        parse_injections([("t", d) for d in docs])


# -- requests the sources make --------------------------------------------------------------

def test_the_app_jwt_is_rs256_with_the_claims_github_checks():
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = app_jwt("12345", key, now=1_800_000_000)
    claims = jwt.decode(token, key.public_key(), algorithms=["RS256"],
                        options={"verify_exp": False, "verify_iat": False})
    assert claims == {"iss": "12345", "iat": 1_800_000_000 - 60, "exp": 1_800_000_000 + 540}


def test_a_key_that_is_not_a_pem_rsa_key_is_named_without_its_content():
    with pytest.raises(ValueError, match=r"Secret gh/key.pem: not a PEM private key") as caught:
        load_private_key("-----BEGIN NONSENSE-----\nc2VjcmV0\n-----END NONSENSE-----", "gh/key.pem")
    assert "c2VjcmV0" not in str(caught.value)


def test_client_secret_basic_form_encodes_before_base64_and_post_puts_both_in_the_body():
    spec = OAuth2ClientCredentials("https://a/t", SecretKeyRef("o", "i"), SecretKeyRef("o", "s"),
                                   scopes=("read",), audience="https://api")
    headers, form = token_request(spec, "my client", "p@ss:w+rd")
    assert base64.b64decode(headers["Authorization"][6:]) == b"my+client:p%40ss%3Aw%2Brd"
    assert dict(parse_qsl(form)) == {"grant_type": "client_credentials", "scope": "read",
                                     "audience": "https://api"}
    post = OAuth2ClientCredentials("https://a/t", spec.client_id, spec.client_secret,
                                   auth_method="client_secret_post")
    headers, form = token_request(post, "my client", "p@ss:w+rd")
    assert "Authorization" not in headers
    assert dict(parse_qsl(form)) == {"grant_type": "client_credentials", "client_id": "my client",
                                     "client_secret": "p@ss:w+rd"}


# -- the token cache ------------------------------------------------------------------------

class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _cache(clock, lifetime=100.0, fail=False):
    minted: list[Token] = []

    async def mint():
        await asyncio.sleep(0.01)
        if fail:
            raise CredentialError("refused", "no")
        token = Token(f"t{len(minted)}", clock.now + lifetime, clock.now)
        minted.append(token)
        return token

    return TokenCache(mint, clock=clock), minted


def test_concurrent_requests_share_one_mint():
    async def main():
        clock = Clock()
        cache, minted = _cache(clock)
        tokens = await asyncio.gather(*(cache.get() for _ in range(50)))
        assert {t.value for t in tokens} == {"t0"} and len(minted) == 1
    asyncio.run(main())


def test_inside_the_refresh_window_the_old_token_serves_while_one_mint_runs():
    async def main():
        clock = Clock()
        cache, minted = _cache(clock, lifetime=100.0)  # refresh 25 s ahead
        await cache.get()
        clock.now += 80
        served = await asyncio.gather(*(cache.get() for _ in range(10)))
        assert {t.value for t in served} == {"t0"}  # nobody waited
        await asyncio.sleep(0.05)
        assert len(minted) == 2 and (await cache.get()).value == "t1"
        assert cache.previous.value == "t0"  # still redacted
    asyncio.run(main())


def test_an_expired_token_is_never_handed_out():
    async def main():
        clock = Clock()
        cache, minted = _cache(clock, lifetime=100.0)
        await cache.get()
        clock.now += 99  # inside the stale margin
        assert (await cache.get()).value == "t1"
        assert len(minted) == 2
    asyncio.run(main())


def test_a_failed_mint_is_answered_from_memory_for_a_moment_then_retried():
    async def main():
        clock = Clock()
        cache, _ = _cache(clock, fail=True)
        calls = 0
        original = cache._mint

        async def counting():
            nonlocal calls
            calls += 1
            return await original()

        cache._mint = counting
        for _ in range(5):
            with pytest.raises(CredentialError):
                await cache.get()
        assert calls == 1
        clock.now += FAILURE_HOLD + 0.1
        with pytest.raises(CredentialError):
            await cache.get()
        assert calls == 2
    asyncio.run(main())


def test_the_github_token_request_narrows_only_when_asked():
    from keyhole_sidecar.credentials.github_app import token_request as github_request
    spec = GitHubApp("1", SecretKeyRef("g", "k"), installation_id="2")
    assert github_request(spec) is None
    narrowed = GitHubApp("1", SecretKeyRef("g", "k"), installation_id="2",
                         repositories=("a",), permissions=(("issues", "write"),))
    assert json.dumps(github_request(narrowed)) == ('{"repositories": ["a"], '
                                                    '"permissions": {"issues": "write"}}')


@pytest.mark.parametrize(("api_url", "authority", "path", "api"), [
    ("https://api.github.com", "api.github.com", "/repos/a/b", True),
    ("https://api.github.com", "github.com", "/a/b.git/info/refs", False),
    ("https://API.GitHub.com:443", "api.github.com", "/user", True),
    ("https://ghe.example.com/api/v3", "ghe.example.com", "/api/v3/repos/a/b", True),
    ("https://ghe.example.com/api/v3", "ghe.example.com", "/api/graphql", True),
    ("https://ghe.example.com/api/v3", "ghe.example.com", "/a/b.git/git-upload-pack", False),
])
def test_the_api_gets_the_token_scheme_and_git_gets_basic_auth(api_url, authority, path, api):
    spec = GitHubApp("1", SecretKeyRef("g", "k"), installation_id="2", api_url=api_url)
    assert spec.is_api_request(authority, path) is api
