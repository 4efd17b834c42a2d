"""Workload identity federation, its decisions alone: the spec, each provider's request as
its documentation gives it, the answers read, the subject tokens held and dropped, and the
operator's choice of whose identity a pod may present (tests/integration/test_federation.py
and tests/cluster/test_federation.py run them for real)."""

from __future__ import annotations

import asyncio
import json
from urllib.parse import parse_qs

import jwt
import pytest

from keyhole_common.spec import parse_injection
from keyhole_common.spec.model import WorkloadIdentity
from keyhole_operator import identities
from keyhole_sidecar.credentials import federation
from keyhole_sidecar.credentials.subject import ChannelSubjectTokens, FileSubjectTokens
from keyhole_sidecar.credentials.tokens import CredentialError, TokenCache
from keyhole_sidecar.operator_channel import ChannelRefused
from keyhole_sidecar.usage.shared import ChannelUnavailable


def _doc(identity: dict, hosts=("api.anthropic.com",), name="fed") -> dict:
    return {"apiVersion": "keyhole.dev/v1alpha1", "kind": "SecretInjection",
            "metadata": {"name": name, "namespace": "agents"},
            "spec": {"podSelector": {"matchLabels": {"keyhole.dev/fed": "true"}},
                     "hosts": list(hosts), "workloadIdentity": identity}}


def _parse(identity: dict, **kw) -> tuple[WorkloadIdentity | None, list[str]]:
    spec, problems = parse_injection(_doc(identity, **kw), "test")
    return (spec.credential if spec else None), [f"{p.field}: {p.message}" for p in problems]


# -- the spec ---------------------------------------------------------------------------------

def test_each_provider_fills_in_its_documented_audience_and_endpoint():
    found, _ = _parse({"claude": {"organizationID": "org", "federationRuleID": "fdrl_1"}})
    assert (found.audience, found.token_url) == ("https://api.anthropic.com",
                                                 "https://api.anthropic.com/v1/oauth/token")
    found, _ = _parse({"aws": {"roleARN": "arn:aws:iam::123456789012:role/a",
                               "region": "eu-west-1", "service": "bedrock"}},
                      hosts=("bedrock-runtime.eu-west-1.amazonaws.com",))
    assert (found.audience, found.token_url) == ("sts.amazonaws.com",
                                                 "https://sts.eu-west-1.amazonaws.com/")
    assert found.header_names >= {"authorization", "x-amz-date", "x-amz-security-token"}
    provider = "projects/1/locations/global/workloadIdentityPools/pool/providers/kube"
    found, _ = _parse({"gcp": {"workloadIdentityProvider": provider}},
                      hosts=("aiplatform.googleapis.com",))
    assert found.audience == f"https://iam.googleapis.com/{provider}"
    found, _ = _parse({"entra": {"tenantID": "t1", "clientID": "c1",
                                 "scopes": ["https://graph.microsoft.com/.default"]}},
                      hosts=("graph.microsoft.com",))
    assert (found.audience, found.token_url) == (
        "api://AzureADTokenExchange", "https://login.microsoftonline.com/t1/oauth2/v2.0/token")


@pytest.mark.parametrize(("identity", "expected"), [
    ({}, "spec.workloadIdentity: name exactly one provider"),
    ({"claude": {"organizationID": "o", "federationRuleID": "f"}, "entra": {}},
     "name exactly one provider: claude, aws, gcp, entra, tokenExchange, jwtBearer, "
     "clientAssertion (got claude and entra)"),
    ({"claude": {"organizationID": "o"}},
     "spec.workloadIdentity.claude.federationRuleID: is required for claude"),
    ({"tokenExchange": {"tokenURL": "https://sts.example.com/token"}},
     "spec.workloadIdentity.audience: is required for tokenExchange"),
    ({"audience": "a", "jwtBearer": {"tokenURL": "http://sts.example.com/token"}},
     "must be an https:// URL"),
    ({"aws": {"roleARN": "role/agent", "region": "us-east-1", "service": "s3"}},
     "spec.workloadIdentity.aws.roleARN: 'role/agent' is not valid: "
     "arn:aws:iam::123456789012:role/NAME"),
    ({"aws": {"roleARN": "arn:aws:iam::123456789012:role/a", "region": "us-east-1",
              "service": "s3", "durationSeconds": 60}},
     "durationSeconds: must be a whole number of seconds from 900 to 43200"),
    ({"gcp": {"workloadIdentityProvider": "pools/x"}}, "workloadIdentityProvider: 'pools/x' is "
                                                      "not valid"),
    ({"audience": "a", "tokenExchange": {"tokenURL": "https://api.anthropic.com/token"}},
     "the token endpoint's host is one of spec.hosts"),
    ({"claude": {"organizationID": "o", "federationRuleID": "f", "color": "red"}},
     "spec.workloadIdentity.claude.color: unknown field"),
])
def test_a_bad_identity_is_refused_naming_the_field_and_the_fix(identity, expected):
    found, problems = _parse(identity)
    assert found is None
    assert any(expected in p for p in problems), problems


def test_claudes_own_token_endpoint_may_sit_on_its_api_host():
    found, problems = _parse({"claude": {"organizationID": "o", "federationRuleID": "f"}})
    assert problems == [] and found.provider == "claude"


def test_a_federated_injection_owns_the_headers_its_credential_sets():
    spec, _ = parse_injection(_doc({"claude": {"organizationID": "o", "federationRuleID": "f"}}),
                              "test")
    assert {"authorization", "x-api-key"} <= spec.dropped_header_names()
    document = _doc({"claude": {"organizationID": "o", "federationRuleID": "f"}})
    document["spec"]["headers"] = [{"name": "X-Api-Key", "valueFrom": {
        "secretKeyRef": {"name": "s", "key": "k"}}}]
    _, problems = parse_injection(document, "test")
    assert any("workloadIdentity sets X-Api-Key, which spec.headers also sets" in p.message
               for p in problems)


# -- the requests, as each provider documents them --------------------------------------------

def _identity(provider: str, **settings) -> WorkloadIdentity:
    scopes = settings.pop("scopes", ())
    return WorkloadIdentity(provider, "aud", "https://t.example/token",
                            tuple(sorted(settings.items())), tuple(scopes))


def test_the_claude_exchange_is_a_jwt_bearer_grant_with_its_rule():
    body = federation.claude_request(_identity("claude", organizationID="org",
                                               federationRuleID="fdrl", workspaceID="default"),
                                     "SUBJECT")
    assert body == {"grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer",
                    "assertion": "SUBJECT", "federation_rule_id": "fdrl",
                    "organization_id": "org", "workspace_id": "default"}


def test_the_aws_exchange_is_assume_role_with_web_identity():
    form = parse_qs(federation.aws_request(
        _identity("aws", roleARN="arn:aws:iam::1:role/r", durationSeconds="900"), "SUBJECT",
        "keyhole-bedrock"))
    assert form == {"Action": ["AssumeRoleWithWebIdentity"], "Version": ["2011-06-15"],
                    "RoleArn": ["arn:aws:iam::1:role/r"], "RoleSessionName": ["keyhole-bedrock"],
                    "WebIdentityToken": ["SUBJECT"], "DurationSeconds": ["900"]}


def test_the_gcp_exchange_is_an_rfc_8693_exchange_for_the_pool_provider():
    form = parse_qs(federation.gcp_request(
        _identity("gcp", workloadIdentityProvider="projects/1/locations/global/"
                  "workloadIdentityPools/p/providers/k"), "SUBJECT"))
    assert form["audience"] == ["//iam.googleapis.com/projects/1/locations/global/"
                                "workloadIdentityPools/p/providers/k"]
    assert form["subject_token_type"] == ["urn:ietf:params:oauth:token-type:jwt"]
    assert form["requested_token_type"] == ["urn:ietf:params:oauth:token-type:access_token"]
    assert form["scope"] == ["https://www.googleapis.com/auth/cloud-platform"]


@pytest.mark.parametrize(("provider", "expected"), [
    ("entra", {"grant_type": ["client_credentials"], "client_id": ["c"],
               "client_assertion_type": ["urn:ietf:params:oauth:client-assertion-type:"
                                         "jwt-bearer"],
               "client_assertion": ["SUBJECT"], "scope": ["s1 s2"]}),
    ("jwtBearer", {"grant_type": ["urn:ietf:params:oauth:grant-type:jwt-bearer"],
                   "assertion": ["SUBJECT"], "client_id": ["c"], "scope": ["s1 s2"]}),
    ("tokenExchange", {"grant_type": ["urn:ietf:params:oauth:grant-type:token-exchange"],
                       "subject_token": ["SUBJECT"],
                       "subject_token_type": ["urn:ietf:params:oauth:token-type:jwt"],
                       "audience": ["https://api"], "scope": ["s1 s2"]}),
])
def test_the_oauth_shaped_grants(provider, expected):
    spec = _identity(provider, clientID="c", targetAudience="https://api", scopes=("s1", "s2"))
    assert parse_qs(federation.oauth_request(spec, "SUBJECT")) == expected


def test_an_sts_answer_is_read_by_local_name_and_a_document_type_is_never_parsed():
    ok = (b'<AssumeRoleWithWebIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">'
          b"<AssumeRoleWithWebIdentityResult><Credentials><AccessKeyId>ASIA1</AccessKeyId>"
          b"<SecretAccessKey>s</SecretAccessKey><SessionToken>t</SessionToken>"
          b"<Expiration>2026-12-07T19:00:00Z</Expiration></Credentials>"
          b"</AssumeRoleWithWebIdentityResult></AssumeRoleWithWebIdentityResponse>")
    assert federation.sts_fields(ok)["AccessKeyId"] == "ASIA1"
    bomb = (b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY a "aaaa"><!ENTITY b "&a;&a;&a;">]>'
            b"<r><Code>&b;</Code></r>")
    assert federation.sts_fields(bomb) == {}
    assert federation.sts_fields(b"not xml") == {}


def test_an_absolute_expiry_never_outlives_what_was_asked_for():
    now = 1_800_000_000.0  # 2027-01-15T08:00:00Z
    ahead = "2027-01-15T10:00:00Z"  # a provider whose clock runs two hours ahead of ours
    assert federation.expiry(ahead, now, "AWS STS", 900) == now + 900
    behind = "2027-01-15T08:05:00Z"  # one behind: the credential is replaced early, not late
    assert federation.expiry(behind, now, "AWS STS", 900) == now + 300
    with pytest.raises(CredentialError, match="is not a timestamp"):
        federation.expiry("tomorrow", now, "AWS STS", 900)


def test_failed_exchanges_back_off_doubling_to_a_minute():
    async def fail():
        raise CredentialError("refused", "no")

    class Clock:
        now = 0.0

        def __call__(self):
            return self.now

    async def main():
        clock = Clock()
        cache = TokenCache(fail, clock=clock)
        holds = []
        for _ in range(8):
            with pytest.raises(CredentialError):
                await cache.get()
            holds.append(cache.hold)
            clock.now += cache.hold
        assert holds == [2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0]
    asyncio.run(main())


# -- subject tokens in the sidecar --------------------------------------------------------------

class Channel:
    """The operator channel's answers, scripted (the real one: tests/cluster)."""

    def __init__(self):
        self.answers: list[object] = []
        self.calls = 0
        self.reports: list[dict] = []

    async def identity(self, body):
        self.calls += 1
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def report_exchange(self, body):
        self.reports.append(body)


def test_the_channels_token_is_kept_for_half_its_life_then_asked_again():
    class Clock:
        now = 1000.0

        def __call__(self):
            return self.now

    async def main():
        channel, clock = Channel(), Clock()
        tokens = ChannelSubjectTokens(channel, clock)
        channel.answers = [{"token": "one", "expiresIn": 600}, {"token": "two", "expiresIn": 600}]
        assert await tokens.get("fed", "aud") == "one"
        clock.now += 290
        assert await tokens.get("fed", "aud") == "one" and channel.calls == 1
        clock.now += 20  # past half its life
        assert await tokens.get("fed", "aud") == "two" and channel.calls == 2
        # the operator away: the one held serves while usable, then it fails closed
        clock.now += 400
        channel.answers = [ChannelUnavailable("down"), ChannelUnavailable("down")]
        assert await tokens.get("fed", "aud") == "two"
        clock.now += 150
        with pytest.raises(CredentialError, match="no identity for injection 'fed'") as caught:
            await tokens.get("fed", "aud")
        assert caught.value.status == 503
        # a refusal drops what is held at once
        channel.answers = [{"token": "three", "expiresIn": 600}, ChannelRefused("not served")]
        assert await tokens.get("fed", "aud") == "three"
        clock.now += 400
        with pytest.raises(CredentialError, match="refused the identity"):
            await tokens.get("fed", "aud")
        channel.answers = [ChannelUnavailable("down")]
        with pytest.raises(CredentialError):
            await tokens.get("fed", "aud")
    asyncio.run(main())


def test_a_token_file_for_another_audience_is_named_before_anything_is_sent(tmp_path):
    path = tmp_path / "token"
    path.write_text(jwt.encode({"aud": "other", "exp": 4102444800}, "k" * 32))
    with pytest.raises(CredentialError, match="is for audience other; injection 'fed' presents "
                                              "it for 'aud'"):
        asyncio.run(FileSubjectTokens(path).get("fed", "aud"))
    path.write_text("not a jwt")
    with pytest.raises(CredentialError, match="holds no JWT"):
        asyncio.run(FileSubjectTokens(path).get("fed", "aud"))


# -- the operator: whose identity, for which pod -------------------------------------------------

def test_each_injection_has_an_account_no_other_can_claim():
    assert identities.account_name("team-a", "claude") == "ns.team-a.claude"
    assert identities.account_name(None, "claude") == "cluster.claude"
    # a namespace has no dot, so these never meet
    assert identities.account_name("a", "b.c") != identities.account_name(None, "a.b.c")
    with pytest.raises(ValueError, match="longer than 253"):
        identities.account_name("n" * 63, "x" * 200)
    manifest = identities.account_manifest("keyhole", "ns.team-a.claude", "team-a", "claude")
    assert manifest["automountServiceAccountToken"] is False
    assert identities.owner_of(manifest) == ("team-a", "claude")
    assert identities.owner_of(identities.account_manifest("keyhole", "cluster.c", None, "c")) \
        == (None, "c")
    assert identities.owner_of({"metadata": {"name": "default"}}) is None


def _routes(*items: dict) -> dict:
    return {"apiVersion": "keyhole.dev/v1alpha1", "kind": "SecretInjectionList",
            "items": list(items)}


FED = {"claude": {"organizationID": "o", "federationRuleID": "f"}}
POD = {"metadata": {"name": "agent", "namespace": "agents",
                    "labels": {"keyhole.dev/fed": "true"}}}


def _live(spec_by_name: dict):
    def live(namespace, name):
        document = spec_by_name.get((namespace, name))
        if document is None:
            return None
        found, _ = parse_injection(document, "live")
        return found
    return live


def test_a_pod_gets_the_identity_only_of_an_injection_that_serves_it_now_and_federates():
    item = _doc(FED)
    routes = _routes({k: item[k] for k in ("apiVersion", "kind", "spec")} | {
        "metadata": {"name": "fed"}})
    live = {("agents", "fed"): item}
    owner, spec = identities.identity_for(routes, POD, "agents", {}, "fed", _live(live))
    assert (owner, spec.audience) == ("agents", "https://api.anthropic.com")
    with pytest.raises(PermissionError, match="is not served by injection 'other'"):
        identities.identity_for(routes, POD, "agents", {}, "other", _live(live))
    with pytest.raises(PermissionError, match="no longer exists"):
        identities.identity_for(routes, POD, "agents", {}, "fed", _live({}))
    untagged = {"metadata": {"name": "agent", "labels": {}}}
    with pytest.raises(PermissionError, match="does not select this pod now"):
        identities.identity_for(routes, untagged, "agents", {}, "fed", _live(live))
    keyed = _doc(FED)
    keyed["spec"] = {**keyed["spec"], "headers": [{"name": "X-Key", "valueFrom": {
        "secretKeyRef": {"name": "s", "key": "k"}}}]}
    del keyed["spec"]["workloadIdentity"]
    with pytest.raises(PermissionError, match=r"has no spec\.workloadIdentity"):
        identities.identity_for(routes, POD, "agents", {}, "fed", _live({("agents", "fed"): keyed}))
    # the audience is the injection's as it is now, not as the routes carried it
    moved = _doc({"audience": "https://new.example", **FED})
    _, spec = identities.identity_for(routes, POD, "agents", {}, "fed",
                                      _live({("agents", "fed"): moved}))
    assert spec.audience == "https://new.example"


def test_a_sidecars_report_is_checked_and_never_carries_more_than_it_should():
    report = identities.Exchange.from_json({"injection": "fed", "expiresAt": 1_800_000_000,
                                            "error": None})
    assert report.record("agent-1", 1_799_999_000) == {
        "pod": "agent-1", "at": "2027-01-15T07:43:20Z", "ok": True,
        "expiresAt": "2027-01-15T08:00:00Z"}
    failed = identities.Exchange.from_json({"injection": "fed", "expiresAt": None,
                                            "error": "refused\nthe exchange" + "x" * 900})
    entry = failed.record("agent-1", 1_799_999_000)
    assert entry["ok"] is False and "\n" not in entry["error"] and len(entry["error"]) == 500
    for bad in ({"injection": "fed"}, {"injection": "fed", "expiresAt": 1, "error": "x"},
                {"injection": "", "error": "x"}, {"injection": "fed", "expiresAt": "soon"},
                [], {"injection": "fed", "expiresAt": float("nan")}):
        with pytest.raises(ValueError):
            identities.Exchange.from_json(json.loads(json.dumps(bad)) if bad == [] else bad)
    same = {"ok": True}
    assert identities.worth_writing(None, same, 0, None)
    assert not identities.worth_writing(same, same, 10, 0)
    assert identities.worth_writing(same, same, 31, 0)
    assert identities.worth_writing(same, {"ok": False, "error": "x"}, 1, 0)


def test_check_and_config_name_the_provider_and_audience(tmp_path):
    from keyhole_sidecar.credentials import CredentialRegistry
    from keyhole_sidecar.inventory import inventory, render_text
    from keyhole_sidecar.routes import build_route_table

    spec, _ = parse_injection(_doc(FED), "test")
    table = build_route_table([spec], lambda ref, **_: "", CredentialRegistry().source)
    described = inventory(table, None, version="test")
    (entry,) = described["injections"]
    assert entry["credential"] == ["workloadIdentity: claude, audience https://api.anthropic.com"]
    assert "fed: api.anthropic.com ← Authorization (workloadIdentity: claude" in \
        "\n".join(render_text(described))


def test_a_cluster_injection_gives_its_identity_only_where_it_serves_now():
    cluster = {"apiVersion": "keyhole.dev/v1alpha1", "kind": "ClusterSecretInjection",
               "metadata": {"name": "fleet"},
               "spec": {"namespaceSelector": {"matchLabels": {"team": "a"}},
                        "podSelector": {"matchLabels": {"keyhole.dev/fed": "true"}},
                        "hosts": ["api.anthropic.com"], "workloadIdentity": FED}}
    routes = _routes({k: cluster[k] for k in ("apiVersion", "kind", "metadata", "spec")})
    live = _live({(None, "fleet"): cluster})
    owner, spec = identities.identity_for(routes, POD, "agents", {"team": "a"}, "fleet", live)
    assert owner is None and spec.provider == "claude"
    with pytest.raises(PermissionError, match="does not serve namespace agents now"):
        identities.identity_for(routes, POD, "agents", {"team": "b"}, "fleet", live)
    with pytest.raises(PermissionError, match="no longer exists"):
        identities.identity_for(routes, POD, "agents", {"team": "a"}, "fleet", _live({}))
