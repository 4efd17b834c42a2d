"""Credentials the proxy mints or signs itself (githubApp, oauth2, awsSigV4), end to end: the
real sidecar, real clients (curl, git), and local services that check what they receive as
GitHub, an OAuth 2.0 server and AWS would (tests/support/identity.py)."""

from __future__ import annotations

import base64
import hashlib
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.integration.clients import curl
from tests.support import identity
from tests.support.config import injection, ref
from tests.support.identity import IdentityServer
from tests.support.sidecar import check_config, write_injections


@pytest.fixture(scope="module")
def idp(test_ca, tmp_path_factory):
    if shutil.which("git") is None:
        pytest.fail("git is required (apt-get install git)")
    root = tmp_path_factory.mktemp("github-repos")
    work = tmp_path_factory.mktemp("github-work")

    def git(*args, cwd=work):
        subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                       env={"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "HOME": str(work),
                            "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
                            "PATH": "/usr/bin:/bin"})

    git("init", "-q", "-b", "main")
    (work / "README.md").write_text("widgets\n")
    git("add", "README.md")
    git("commit", "-qm", "first")
    (root / "acme").mkdir()
    git("clone", "-q", "--bare", str(work), str(root / "acme" / "widgets.git"))
    server = IdentityServer(test_ca[0], str(root))
    state = server.start()
    yield state
    server.stop()


def _at(idp, host: str) -> str:
    return f"{host}:{idp.port}"


def _github(idp, **overrides) -> dict:
    spec = {"appID": int(identity.APP_ID), "installationID": identity.INSTALLATION_ID,
            "privateKeyFrom": ref("github-app", "private-key.pem"),
            "apiURL": f"https://{_at(idp, 'github-api.test')}",
            "repositories": ["widgets"], "permissions": {"contents": "read"}}
    spec.update(overrides)
    spec = {k: v for k, v in spec.items() if v is not None}
    return injection("github", hosts=[_at(idp, "github-api.test"), _at(idp, "github.test")],
                     githubApp=spec)


def _oauth(idp, **overrides) -> dict:
    spec = {"tokenURL": f"https://{_at(idp, 'auth.test')}/oauth2/token",
            "clientIDFrom": ref("oauth", "client-id"),
            "clientSecretFrom": ref("oauth", "client-secret"),
            "scopes": ["read", "write"], "audience": "https://api.oauth.test"}
    spec.update(overrides)
    return injection("oauth", hosts=[_at(idp, "api.oauth.test")], oauth2=spec)


def _aws(idp, **overrides) -> dict:
    spec = {"region": "eu-west-1", "service": "sqs",
            "accessKeyIDFrom": ref("aws", "access-key-id"),
            "secretAccessKeyFrom": ref("aws", "secret-access-key"),
            "sessionTokenFrom": ref("aws", "session-token")}
    spec.update(overrides)
    return injection("aws", hosts=[_at(idp, "aws.test")], awsSigV4=spec)


def _secrets(idp, key_pem: str | None = None, client_secret: str = identity.CLIENT_SECRET):
    return {
        "github-app": {"private-key.pem": key_pem or idp.app_key_pem},
        "oauth": {"client-id": identity.CLIENT_ID, "client-secret": client_secret},
        "aws": {"access-key-id": identity.AWS_KEY_ID, "secret-access-key": identity.AWS_SECRET,
                "session-token": identity.AWS_SESSION_TOKEN},
    }


def _resolve(idp) -> list[str]:
    return [arg for host in identity.HOSTS for arg in ("--resolve", f"{host}:{idp.port}:127.0.0.1")]


@pytest.fixture
def start(make_sidecar, idp):
    def start(*injections, secrets=None):
        return make_sidecar(list(injections), secrets or _secrets(idp), args=_resolve(idp))
    return start


def _never_leaked(sidecar, idp, *texts: str) -> None:
    """No minted token and no secret material in what the agent or an operator can see."""
    everything = "\n".join([*texts, sidecar.stderr(), sidecar.admin("/metrics")[1],
                            (sidecar.workdir / "stdout.log").read_text()])
    for token in idp.issued:
        assert token.value not in everything
    for secret in (identity.CLIENT_SECRET, identity.AWS_SECRET, identity.AWS_SESSION_TOKEN,
                   *idp.app_key_pem.splitlines()[1:-1]):
        assert secret not in everything


# -- GitHub App ---------------------------------------------------------------------------

def test_github_api_calls_carry_a_fresh_installation_token_the_agent_never_sees(start, idp):
    sidecar = start(_github(idp))
    reply = curl(sidecar, f"https://{_at(idp, 'github-api.test')}/user/repos")
    assert reply.status == 200  # GitHub accepted `Authorization: token <minted>`
    assert reply.json()["you_sent"] == "token [REDACTED]"
    assert idp.token_requests[-1] == {"repositories": ["widgets"],
                                      "permissions": {"contents": "read"}}
    assert sidecar.metric("keyhole_credential_mints_total", injection="github",
                          source="github_app", result="minted") == 1
    assert 3500 < sidecar.metric("keyhole_credential_expiry_seconds", injection="github") <= 3600
    record = sidecar.wait_audit(lambda r: r["path"] == "/user/repos")
    assert (record["source"], record["decision"]) == ("github_app", "injected")
    _never_leaked(sidecar, idp, reply.everything())


def test_git_clones_through_the_proxy_with_no_credential_helper(start, idp, tmp_path):
    sidecar = start(_github(idp))
    done = subprocess.run(
        ["git", "-c", "credential.helper=", "clone", "-q",
         f"https://{_at(idp, 'github.test')}/acme/widgets.git", str(tmp_path / "widgets")],
        env=sidecar.client_env(GIT_TERMINAL_PROMPT="0", GIT_ASKPASS="/bin/false",
                               HOME=str(tmp_path)),
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "widgets" / "README.md").read_text() == "widgets\n"
    _never_leaked(sidecar, idp, done.stdout, done.stderr)


def test_concurrent_first_requests_share_one_mint(start, idp):
    sidecar = start(_github(idp))
    url = f"https://{_at(idp, 'github-api.test')}/user/repos"
    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(lambda _: curl(sidecar, url), range(16)))
    assert [r.status for r in replies] == [200] * 16
    assert sidecar.metric("keyhole_credential_mints_total", injection="github",
                          result="minted") == 1


def test_the_installation_is_found_from_a_repository(start, idp):
    sidecar = start(_github(idp, installationID=None, repository=identity.INSTALLED_REPOSITORY))
    assert curl(sidecar, f"https://{_at(idp, 'github-api.test')}/user/repos").status == 200


@pytest.mark.parametrize(("overrides", "expected"), [
    ({"installationID": 999}, "GitHub found no installation 999 for GitHub App 424242 (404: "
                              "Not Found): check installationID"),
    ({"installationID": None, "repository": "acme/nope"},
     "GitHub found no installation on acme/nope for GitHub App 424242 (404"),
    ({"repositories": ["secret-plans"]}, "GitHub refused the requested repositories or "
                                         "permissions for GitHub App 424242 (422"),
])
def test_github_refusals_are_502s_that_say_what_to_check(start, idp, overrides, expected):
    sidecar = start(_github(idp, **overrides))
    reply = curl(sidecar, f"https://{_at(idp, 'github-api.test')}/user/repos")
    assert reply.status == 502
    assert expected in reply.body
    _never_leaked(sidecar, idp, reply.everything())


def test_a_key_that_is_not_the_apps_is_named_as_the_problem(start, idp):
    _, other_pem = identity.rsa_key_pem()
    sidecar = start(_github(idp), secrets=_secrets(idp, key_pem=other_pem))
    reply = curl(sidecar, f"https://{_at(idp, 'github-api.test')}/user/repos")
    assert reply.status == 502
    assert "GitHub refused the JWT of GitHub App 424242 (401" in reply.body
    assert "check appID and that privateKeyFrom holds this App's current private key" in reply.body
    assert "A JSON web token could not be decoded" in reply.body  # GitHub's words, but
    assert "eyJ" not in reply.everything()  # not the JWT it echoed (every JWT starts so)
    assert sidecar.metric("keyhole_credential_mints_total", injection="github",
                          result="refused") == 1
    for line in other_pem.splitlines()[1:-1]:
        assert line not in reply.everything() + sidecar.stderr()


def test_a_token_is_replaced_before_it_expires_without_making_requests_wait(start, idp):
    idp.token_lifetime = 4.0  # refreshed 1 s before expiry, unusable 0.4 s before
    try:
        sidecar = start(_github(idp))
        url = f"https://{_at(idp, 'github-api.test')}/user/repos"
        assert curl(sidecar, url).status == 200
        time.sleep(3.2)  # inside the refresh window, the first token still good
        assert curl(sidecar, url).status == 200
        deadline = time.monotonic() + 5
        while sidecar.metric("keyhole_credential_mints_total", injection="github",
                             result="minted") < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sidecar.metric("keyhole_credential_mints_total", injection="github",
                              result="minted") == 2
        time.sleep(1.5)  # the first token has expired now; the second serves
        assert curl(sidecar, url).status == 200
        assert sidecar.metric("keyhole_credential_mints_total", injection="github",
                              result="minted") == 2
    finally:
        idp.token_lifetime = 3600.0


def test_a_reload_that_changes_nothing_keeps_the_token(start, idp):
    sidecar = start(_github(idp), _oauth(idp))
    url = f"https://{_at(idp, 'github-api.test')}/user/repos"
    assert curl(sidecar, url).status == 200
    write_injections(sidecar.injections, [_oauth(idp), _github(idp)])  # reordered: reloaded
    sidecar.wait_for_log("reloaded configuration")
    assert curl(sidecar, url).status == 200
    assert sidecar.metric("keyhole_credential_mints_total", injection="github",
                          result="minted") == 1


def test_check_reads_each_sources_material_and_names_a_bad_key(idp, tmp_path):
    """`keyhole-sidecar check` builds the sources: a key that is not PEM is named, not shown."""
    good = check_config(tmp_path / "good", [_github(idp), _oauth(idp), _aws(idp)], _secrets(idp))
    assert good.returncode == 0, good.stderr
    assert "ok  github: " in good.stdout and "← Authorization (github_app)" in good.stdout
    assert "← Authorization (aws_sigv4)" in good.stdout
    bad = check_config(tmp_path / "bad", [_github(idp)],
                    _secrets(idp, key_pem="-----BEGIN RSA PRIVATE KEY-----\nbm90IGEga2V5\n"
                                          "-----END RSA PRIVATE KEY-----"))
    assert bad.returncode == 1
    assert "github: secrets: Secret github-app/private-key.pem: not a PEM private key" in bad.stderr
    assert "bm90IGEga2V5" not in bad.stdout + bad.stderr


# -- OAuth 2.0 client credentials -----------------------------------------------------------

@pytest.mark.parametrize("method", ["client_secret_basic", "client_secret_post"])
def test_oauth2_client_credentials_in_either_auth_method(start, idp, method):
    sidecar = start(_oauth(idp, authMethod=method))
    reply = curl(sidecar, f"https://{_at(idp, 'api.oauth.test')}/v1/things")
    assert reply.status == 200  # the resource server accepted the minted access token
    assert reply.json()["you_sent"] == "Bearer [REDACTED]"
    sent = idp.token_requests[-1]
    assert (sent["grant_type"], sent["scope"], sent["audience"]) == (
        "client_credentials", "read write", "https://api.oauth.test")
    assert sent["basic"] is (method == "client_secret_basic")
    record = sidecar.wait_audit(lambda r: r["path"] == "/v1/things")
    assert record["source"] == "oauth2"
    _never_leaked(sidecar, idp, reply.everything())


def test_a_wrong_client_secret_is_a_502_naming_the_endpoints_answer(start, idp):
    sidecar = start(_oauth(idp), secrets=_secrets(idp, client_secret="not-the-secret-1"))
    reply = curl(sidecar, f"https://{_at(idp, 'api.oauth.test')}/v1/things")
    assert reply.status == 502
    assert (f"the token endpoint https://{_at(idp, 'auth.test')}/oauth2/token answered 401: "
            "invalid_client client authentication failed for Basic ") in reply.body
    # the endpoint echoed the basic credential: the secret's part of it is masked
    sent = base64.b64encode(b"keyhole-agent+client:not-the-secret-1").decode()
    assert "[REDACTED]" in reply.body and sent not in reply.body
    assert "check clientIDFrom, clientSecretFrom and authMethod" in reply.body
    assert "not-the-secret-1" not in reply.everything() + sidecar.stderr()
    # a retrying agent does not become a flood: failures are held for a moment
    for _ in range(5):
        assert curl(sidecar, f"https://{_at(idp, 'api.oauth.test')}/v1/things").status == 502
    assert sidecar.metric("keyhole_credential_mints_total", injection="oauth",
                          result="refused") <= 2


# -- AWS Signature Version 4 ----------------------------------------------------------------

def test_aws_requests_are_signed_and_the_agents_own_signature_replaced(start, idp):
    sidecar = start(_aws(idp))
    body = "Action=SendMessage&MessageBody=hello%20world"
    reply = curl(sidecar, "-X", "POST", "--data", body,
                 "-H", "Content-Type: application/x-www-form-urlencoded",
                 "-H", "Authorization: AWS4-HMAC-SHA256 Credential=PLACEHOLDER/x, Signature=0",
                 "-H", "X-Amz-Date: 20000101T000000Z",
                 f"https://{_at(idp, 'aws.test')}/123456789012/queue?Version=2012-11-05&a=%20b")
    assert reply.status == 200, reply.body  # verified with requests-aws4auth
    assert reply.json()["you_sent"] == "[REDACTED]"  # the echoed session token
    seen = idp.aws_seen[-1]
    assert seen["headers"]["X-Amz-Content-Sha256"] == hashlib.sha256(body.encode()).hexdigest()
    assert "PLACEHOLDER" not in seen["headers"]["Authorization"]
    assert sidecar.wait_audit(lambda r: r["path"].endswith("/queue"))["source"] == "aws_sigv4"
    _never_leaked(sidecar, idp, reply.everything())


def test_credential_sources_serve_http2_clients_too(start, idp):
    """The same exchange, whatever the client speaks: an HTTP/2 client's request is minted for
    (OAuth 2.0) and signed (SigV4, the body hashed) exactly as an HTTP/1.1 client's."""
    sidecar = start(_oauth(idp), _aws(idp))
    reply = curl(sidecar, f"https://{_at(idp, 'api.oauth.test')}/v1/things", http2=True)
    assert (reply.status, reply.protocol) == (200, "HTTP/2")
    assert reply.json()["you_sent"] == "Bearer [REDACTED]"
    body = "Action=SendMessage&MessageBody=over%20h2"
    reply = curl(sidecar, "-X", "POST", "--data", body,
                 "-H", "Content-Type: application/x-www-form-urlencoded",
                 f"https://{_at(idp, 'aws.test')}/123456789012/queue?Version=2012-11-05",
                 http2=True)
    assert (reply.status, reply.protocol) == (200, "HTTP/2"), reply.body
    assert idp.aws_seen[-1]["headers"]["X-Amz-Content-Sha256"] == hashlib.sha256(
        body.encode()).hexdigest()
    _never_leaked(sidecar, idp, reply.everything())


def test_a_signature_made_with_other_keys_is_refused_by_the_service(start, idp):
    """The control for the test above: the service's check is real."""
    wrong = _secrets(idp)
    wrong["aws"]["secret-access-key"] = "not-the-real-secret-access-key"
    sidecar = start(_aws(idp), secrets=wrong)
    reply = curl(sidecar, f"https://{_at(idp, 'aws.test')}/123456789012/queue")
    assert (reply.status, reply.json()["message"]) == (403, "SignatureDoesNotMatch")


def test_s3_uploads_stream_with_an_unsigned_payload(start, idp, tmp_path):
    sidecar = start(_aws(idp, service="s3", payload="unsigned"))
    upload = tmp_path / "object.bin"
    upload.write_bytes(bytes(range(256)) * 40_000)  # 10 MB
    reply = curl(sidecar, "-X", "PUT", "-T", str(upload),
                 f"https://{_at(idp, 'aws.test')}/bucket/my%20object.bin?x-id=PutObject")
    assert reply.status == 200, reply.body
    seen = idp.aws_seen[-1]
    assert seen["headers"]["X-Amz-Content-Sha256"] == "UNSIGNED-PAYLOAD"
    assert seen["body_sha256"] == hashlib.sha256(upload.read_bytes()).hexdigest()


def test_a_body_signed_in_chunks_by_the_client_is_refused_with_the_fix(start, idp):
    sidecar = start(_aws(idp, service="s3"))
    reply = curl(sidecar, "-X", "PUT", "--data", "x",
                 "-H", "X-Amz-Content-Sha256: STREAMING-AWS4-HMAC-SHA256-PAYLOAD",
                 f"https://{_at(idp, 'aws.test')}/bucket/key")
    assert reply.status == 400
    assert "turn chunked signing off in the SDK" in reply.body


def test_no_minted_token_or_source_secret_reaches_any_output_at_debug_level(make_sidecar, idp):
    """Each credential source at --log-level debug, over HTTP/1.1 and HTTP/2, the resource
    servers echoing what they got: no minted token, client secret, AWS secret or App key —
    in any form (raw, base64, URL-encoded) — on stdout or stderr (issue 30, item 2)."""
    from keyhole_sidecar.redact import secret_forms

    sidecar = make_sidecar([_github(idp), _oauth(idp), _aws(idp)], _secrets(idp),
                           args=[*_resolve(idp), "--log-level", "debug"])
    for http2 in (False, True):
        assert curl(sidecar, f"https://{_at(idp, 'github-api.test')}/repos/acme/widgets",
                    http2=http2).status == 200
        assert curl(sidecar, f"https://{_at(idp, 'api.oauth.test')}/v1/things",
                    http2=http2).status == 200
        assert curl(sidecar, "-X", "POST", "-d", "Action=ListQueues",
                    f"https://{_at(idp, 'aws.test')}/", http2=http2).status == 200
    sidecar.stop()
    values = [token.value for token in idp.issued] + [
        identity.CLIENT_SECRET, identity.AWS_SECRET, identity.AWS_SESSION_TOKEN,
        *idp.app_key_pem.splitlines()[1:-1]]
    assert idp.issued, "no token was minted"
    output = (sidecar.workdir / "stdout.log").read_bytes() + sidecar.stderr().encode()
    found = [form for form in secret_forms(values) if form in output]
    assert not found, f"{len(found)} form(s) of a credential in the output"
