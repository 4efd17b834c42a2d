"""Workload identity federation (spec.workloadIdentity), end to end with no key at all: the
real sidecar presents a subject token (standalone: --identity-token FILE) to stand-ins that
verify it as each provider would — against the issuer's discovery document and JWKS, with
PyJWT; for AWS, moto's STS issues the session keys and the API checks SigV4 against them
(tests/support/federation.py). In Kubernetes the operator hands the token over instead:
tests/cluster/test_federation.py."""

from __future__ import annotations

import time

import pytest

from tests.integration.clients import curl
from tests.support import federation
from tests.support.federation import AUDIENCES, FederationServer, Issuer

SUBJECT = "system:serviceaccount:keyhole:ns.agents.claude"


@pytest.fixture(scope="module")
def fed(test_ca):
    server = FederationServer(test_ca[0], Issuer())
    state = server.start()
    state.trust = server.trust_issuer(SUBJECT)
    state.server = server
    yield state
    server.stop()


@pytest.fixture(autouse=True)
def _fresh(fed):
    """Each test starts from a provider that answers and trusts the current key."""
    fed.refuse, fed.lifetime, fed.down = None, 3600, False
    yield
    fed.refuse, fed.down = None, False


def _at(fed, host: str) -> str:
    return f"{host}:{fed.port}"


def _spec(fed, provider: str) -> tuple[dict, str]:
    return federation.injection_for(provider, lambda host: _at(fed, host))


@pytest.fixture
def start(make_sidecar, fed, tmp_path):
    def start(provider: str, token: str | None = None, *, subject: str = SUBJECT):
        spec, url = _spec(fed, provider)
        path = tmp_path / "identity-token"
        path.write_text(token or fed.server.issuer.mint(
            subject, AUDIENCES.get(provider, AUDIENCES["tokenExchange"])))
        resolve = [arg for host in federation.HOSTS
                   for arg in ("--resolve", f"{host}:{fed.port}:127.0.0.1")]
        sidecar = make_sidecar([spec], {}, args=[*resolve, "--identity-token", str(path)])
        sidecar.token_file, sidecar.target = path, url
        return sidecar
    return start


def _never_leaked(sidecar, fed, *texts: str) -> None:
    """No minted credential, no session key and no subject token where anyone can see."""
    from moto.sts.models import sts_backends

    everything = "\n".join([*texts, sidecar.stderr(), sidecar.admin("/metrics")[1],
                            (sidecar.workdir / "stdout.log").read_text()])
    secrets = [t.value for t in fed.issued]
    secrets += [e["subject_token"] for e in fed.exchanges]
    secrets += [sidecar.token_file.read_text()]
    for backend in sts_backends["123456789012"].values():
        secrets += [s for r in backend.assumed_roles for s in (r.secret_access_key,
                                                               r.session_token)]
    for secret in secrets:
        assert secret not in everything


@pytest.mark.parametrize("provider", ["claude", "aws", "gcp", "entra", "tokenExchange",
                                      "jwtBearer", "clientAssertion"])
def test_an_agent_with_no_key_reaches_each_provider_through_every_mode(start, fed, provider):
    sidecar = start(provider)
    name = {"tokenExchange": "exchange"}.get(provider, provider.lower())
    before = fed.count(provider)
    replies = [curl(sidecar, sidecar.target),  # CONNECT, HTTP/1.1 inside
               curl(sidecar, sidecar.target, http2=True),  # CONNECT, HTTP/2 inside
               curl(sidecar, f"{sidecar.url}/{name}/{sidecar.target.split('/', 3)[3]}")]
    for reply in replies:
        assert reply.status == 200, reply.body  # the provider's API took the credential
        assert "[REDACTED]" in reply.json()["you_sent"]  # echoed, and masked on the way back
    assert replies[1].protocol == "HTTP/2"
    assert fed.count(provider) - before == 1  # one exchange served all three
    exchange = fed.exchanges[-1]
    assert exchange["subject_token"] == sidecar.token_file.read_text()
    if provider == "claude":  # the token replaces any key, with the beta the API requires
        assert replies[0].json()["beta"] == "oauth-2025-04-20"
        assert "oidc-federation-2026-04-01" in exchange["headers"]["anthropic-beta"]
    assert sidecar.metric("keyhole_credential_mints_total", injection=name,
                          source="workload_identity", result="minted") == 1
    record = sidecar.wait_audit(lambda r: r.get("injection") == name)
    assert (record["source"], record["decision"]) == ("workload_identity", "injected")
    _never_leaked(sidecar, fed, *(r.everything() for r in replies))


def test_claude_keeps_the_agents_betas_and_drops_its_placeholder_key(start, fed):
    sidecar = start("claude")
    reply = curl(sidecar, "-H", "x-api-key: sk-ant-placeholder", "-H",
                 "anthropic-beta: prompt-caching-2024-07-31", sidecar.target)
    assert reply.status == 200, reply.body
    assert reply.json()["x_api_key"] is None
    assert reply.json()["beta"] == "prompt-caching-2024-07-31,oauth-2025-04-20"


def test_a_refusal_is_a_503_naming_the_injection_and_the_providers_words_once(start, fed):
    fed.refuse = "no federation rule matches"
    sidecar = start("claude")
    before = fed.count("claude")
    replies = [curl(sidecar, sidecar.target) for _ in range(5)]
    for reply in replies:
        assert reply.status == 503
        assert reply.header("X-Keyhole-Error") == "credential"
        assert "injection 'claude'" in reply.body
        assert "refused the exchange (401: invalid_grant no federation rule matches" in reply.body
    assert fed.count("claude") - before == 1  # the same answer from memory: no retry storm
    assert sidecar.metric("keyhole_credential_mints_total", injection="claude",
                          result="refused") == 1
    _never_leaked(sidecar, fed, *(r.everything() for r in replies))


def test_a_token_for_another_subject_or_audience_is_refused_by_the_provider(start, fed):
    sidecar = start("claude", subject="system:serviceaccount:agents:default")
    reply = curl(sidecar, sidecar.target)
    assert reply.status == 503
    assert "no rule matches subject" in reply.body
    assert "assertion [REDACTED]" in reply.body  # the stand-in echoed the token: masked
    other = start("claude", fed.server.issuer.mint(SUBJECT, "https://someone-else.example"))
    reply = curl(other, other.target)
    assert reply.status == 503  # caught before anything is sent: the file names its audience
    assert "is for audience https://someone-else.example; injection 'claude' presents it " \
           "for 'https://api.anthropic.com'" in reply.body
    _never_leaked(other, fed, reply.everything())


def test_a_token_signed_by_an_unknown_key_is_refused(start, fed):
    stranger = Issuer()  # same issuer URL, a key the JWKS does not hold
    stranger.url = fed.server.issuer.url
    sidecar = start("gcp", stranger.mint(SUBJECT, AUDIENCES["gcp"]))
    reply = curl(sidecar, sidecar.target)
    assert reply.status == 503
    assert "no key" in reply.body and "in the issuer's JWKS" in reply.body


def test_the_issuers_key_rotation_and_a_fresh_token_file_are_taken_up(start, fed):
    fed.lifetime = 4  # refreshed from 3 s on
    sidecar = start("entra")
    assert curl(sidecar, sidecar.target).status == 200
    first = fed.exchanges[-1]["subject_token"]
    fed.server.issuer.rotate()  # the old key leaves the JWKS
    sidecar.token_file.write_text(fed.server.issuer.mint(SUBJECT, AUDIENCES["entra"]))
    time.sleep(3.5)  # the token has 0.5 s left: the next request triggers the exchange
    deadline = time.monotonic() + 10
    while fed.exchanges[-1]["subject_token"] == first and time.monotonic() < deadline:
        assert curl(sidecar, sidecar.target).status == 200
        time.sleep(0.1)
    assert fed.exchanges[-1]["subject_token"] != first  # read again, verified by the new key
    assert curl(sidecar, sidecar.target).status == 200


def test_an_unreachable_provider_leaves_the_last_token_serving_until_it_expires(start, fed):
    fed.lifetime = 4
    sidecar = start("tokenExchange")
    assert curl(sidecar, sidecar.target).status == 200
    fed.down = True  # connections to the token endpoint are cut
    time.sleep(3.2)  # inside the refresh window: the refresh fails, the token still serves
    assert curl(sidecar, sidecar.target).status == 200
    time.sleep(1.0)  # expired
    reply = curl(sidecar, sidecar.target)
    assert reply.status == 503
    assert "cannot reach the tokenExchange endpoint" in reply.body
    _never_leaked(sidecar, fed, reply.everything())


def test_an_expired_token_file_is_named_and_never_sent(start, fed):
    sidecar = start("aws", fed.server.issuer.mint(SUBJECT, AUDIENCES["aws"], lifetime=-10))
    before = fed.count("aws")
    reply = curl(sidecar, sidecar.target)
    assert reply.status == 503
    assert "identity-token expired" in reply.body and "keep it fresh" in reply.body
    assert fed.count("aws") == before


def test_aws_refuses_a_role_its_trust_does_not_name(make_sidecar, fed, tmp_path):
    spec, url = _spec(fed, "aws")
    spec["spec"]["workloadIdentity"]["aws"]["roleARN"] = "arn:aws:iam::123456789012:role/other"
    path = tmp_path / "token"
    path.write_text(fed.server.issuer.mint(SUBJECT, AUDIENCES["aws"]))
    resolve = [arg for host in federation.HOSTS
               for arg in ("--resolve", f"{host}:{fed.port}:127.0.0.1")]
    sidecar = make_sidecar([spec], {}, args=[*resolve, "--identity-token", str(path)])
    reply = curl(sidecar, url)
    assert reply.status == 503
    assert "AWS STS at https://sts.aws.test" in reply.body
    assert "refused AssumeRoleWithWebIdentity for arn:aws:iam::123456789012:role/other (403: " \
           "AccessDenied Not authorized" in reply.body


def test_without_an_identity_the_sidecar_refuses_to_start_and_says_where_one_comes_from(
        tmp_path, fed):
    from tests.support.sidecar import start_sidecar

    spec, _ = _spec(fed, "claude")
    done = start_sidecar(tmp_path / "run", [spec], {}, expect_failure=True)
    assert done.returncode == 2
    assert "spec.workloadIdentity: needs an identity to present to the provider" in done.stderr
    assert "--identity-token FILE (a JWT for audience https://api.anthropic.com)" in done.stderr
